"""Every default of the anonjoin client, named, in one place (like openai-python's ``_constants.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from anonjoin._version import __version__

# --- HTTP -----------------------------------------------------------------------------------------
USER_AGENT: Final = f"anonjoin/{__version__}"
CULTURE: Final = "en-us"
MAX_CONNECTIONS: Final = 100
"""Connections for ordinary requests (per Client). Parked event polls use their own, unbounded pool."""
MAX_BODY_BYTES: Final = 1024 * 1024
"""A response body larger than this is a ProtocolError; bodies are read bounded."""
CONNECT_TIMEOUT_S: Final = 10.0
REQUEST_TIMEOUT_S: Final = 30.0
POLL_TIMEOUT_S: Final = 180.0
"""The server's default long-poll time (protocol.md §4.8); a poll read times out after this plus a margin."""
POLL_TIMEOUT_MARGIN_S: Final = 30.0
LEAVE_DEADLINE_S: Final = 60.0
"""Default budget of leaving as a whole (``RetryPolicy.leave_deadline_s``: a create in flight answering, a
fresh psat if the one in hand expired, the DELETEs). An application given up on stays live until the service
expires it, so leaving gets more time and attempts than other steps: under chaos on a loaded machine a leave
that must re-mint its psat and DELETE through 429s and 5xx took longer than 25 s. Attempts stay bounded
(DELETE_ATTEMPTS, LEAVE_REMINTS, EVICT_ATTEMPTS); against a service that answers, it is rarely all used."""
DELETE_ATTEMPTS: Final = 10
"""Attempts of one DELETE (429/503/5xx, Retry-After honoured); a 401 re-mints the psat and starts again."""
LEAVE_REMINTS: Final = 2
"""Fresh psats (same applicationSessionId) one leave may mint after a 401."""
EVICT_ATTEMPTS: Final = 3
"""Leaving when a create may have made an application whose href the guest never learnt: how many times a
new application (which evicts it, protocol.md §7) may be created, to be deleted in its turn."""
PSAT_SKEW_S: Final = 0.5
"""A psat with less than this left is treated as expired (clock skew, time in flight)."""
LEAVE_DRAIN_S: Final = 1.0
"""After the DELETE, how long a parked poll may take to come back (keeping its connection)."""

# --- Retries (per step) -----------------------------------------------------------------------------
ATTEMPTS: Final = 6
STEP_DEADLINE_S: Final = 60.0
GUEST_DEADLINE_S: Final = 300.0
WAIT_INITIAL_S: Final = 0.2
WAIT_MAX_S: Final = 10.0
WAIT_JITTER_S: Final = 0.5
RETRY_AFTER_CAP_S: Final = 60.0
AUTH_REFRESHES_PER_STEP: Final = 1

# --- Rejoin --------------------------------------------------------------------------------------------
REJOIN_ATTEMPTS: Final = 5
EXPIRY_MARGIN_S: Final = 300.0
EXPIRY_MARGIN_FRACTION: Final = 0.25
"""For a short-lived psat the margin is at most this fraction of its lifetime."""
MIN_PSAT_LIFETIME_S: Final = 60.0
"""A psat granted with less life than this (``expiryTime`` past, a bare number, missing, unparsable, or
near) is suspect (``RejoinPolicy.min_psat_lifetime_s``): each renewal of one counts against the recovery
budget (``RejoinPolicy.attempts``); past it the guest fails with reason ``BadExpiry`` (issue 11)."""
REMINT_FLOOR_S: Final = 1.0
"""A guest never mints psats closer together than this, whatever the service says about their expiry."""
REJOIN_WAIT_INITIAL_S: Final = 0.5
REJOIN_WAIT_MAX_S: Final = 30.0
REJOIN_JITTER_S: Final = 0.5

# --- Guests --------------------------------------------------------------------------------------------
LOBBY_TIMEOUT_S: Final = 300.0
CAPABILITIES_TTL_S: Final = 3600.0
"""Discover/applications/capabilities are shared by all guests and refetched after this long."""
POLL_FLOOR_S: Final = 0.05
"""An event poll answered faster than this with nothing in it (no event, a heartbeat, only ``resync``) is
idle: the next poll waits (issue 11), ``POLL_IDLE_WAIT_INITIAL_S`` doubling up to ``POLL_IDLE_WAIT_MAX_S``;
an answer with a real event, or one the service held, resets the wait."""
POLL_IDLE_WAIT_INITIAL_S: Final = 0.1
POLL_IDLE_WAIT_MAX_S: Final = 5.0
INVITATION_IMPORTANCE: Final = "Normal"

# --- Wire --------------------------------------------------------------------------------------------
ERROR_CODES: Final[Mapping[int, str]] = MappingProxyType(
    {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        405: "MethodNotAllowed",
        408: "ClientTimeout",
        409: "Conflict",
        410: "Gone",
        412: "PreConditionFailed",
        413: "EntityTooLarge",
        415: "UnsupportedMediaType",
        429: "TooManyRequests",
        500: "ServiceFailure",
        503: "ServiceUnavailable",
        504: "Timeout",
    }
)
"""An error body's ``code`` for each status (protocol.md): what the simulator sends, and what the client
assumes when an error body has none."""

RUN_FIELDS = (
    "guests",
    "concurrency",
    "rate",
    "ramp",
    "hold",
    "meetings",
    "guest_prefix",
    "lobby_timeout",
    "shared_throttle",
    "faults",
    "seed",
    "report",
    "html",
    "no_html",
    "csv",
    "junit",
    "fail_if",
    "progress",
    "progress_interval",
    "metrics_port",
    "metrics_host",
    "store",
    "run_id",
)
"""The run settings a config file may hold besides the target (``anonjoin load``'s flags of those names,
the same precedence as the target's: flag, ``ANONJOIN_<NAME>``, ``--config`` file, default;
``--i-own-this-service`` is not one: it is said on the command line, each time)."""
