"""Fast retry and rejoin policies, so failure paths run in milliseconds."""

from __future__ import annotations

from anonjoin import RejoinPolicy, RetryPolicy

# The load runner's tests (runner, shards, Ray, the secrets chaos test): short waits, default deadlines.
FAST_RETRY = RetryPolicy(wait_initial=0.01, wait_max=0.05, jitter=0.01, retry_after_cap_s=0.05)
FAST_REJOIN = RejoinPolicy(wait_initial=0.01, wait_max=0.05, jitter=0.01, min_psat_lifetime_s=0.5)

# A client against the simulator (tests/e2e/client): bounded attempts and deadlines.
CLIENT_RETRY = RetryPolicy(attempts=4, wait_initial=0.02, wait_max=0.1, jitter=0.02, step_deadline_s=15,
                           guest_deadline_s=30, request_timeout_s=5)  # fmt: skip
CLIENT_REJOIN = RejoinPolicy(attempts=3, wait_initial=0.02, wait_max=0.1, jitter=0.02, expiry_margin_s=1.0,
                             min_psat_lifetime_s=0.5)  # short-lived psats: these tests' subject  # fmt: skip

# A client against the scripted fake service (tests/steps): no jitter, so the waits are exact.
STEP_RETRY = RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05, jitter=0.0, step_deadline_s=10,
                         guest_deadline_s=20, request_timeout_s=5)  # fmt: skip
STEP_REJOIN = RejoinPolicy(attempts=3, wait_initial=0.01, wait_max=0.05, jitter=0.0, expiry_margin_s=1.0,
                           min_psat_lifetime_s=0.5)  # short-lived psats are these tests' subject  # fmt: skip
