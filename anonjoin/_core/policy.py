"""The retry knobs, named in frozen policies (defaults in ``anonjoin._core.constants``), and a join's step
bookkeeping. No I/O: the asyncio driver (``anonjoin._async.retry``) runs the steps with these.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from anonjoin._core import constants as C
from anonjoin._exceptions import ConfigurationError

__all__ = ["RejoinPolicy", "RetryPolicy", "StepStats", "exponential_backoff"]


def exponential_backoff(attempt: int, initial: float, cap: float, jitter: float, rng: random.Random) -> float:
    """``initial`` doubled per attempt after the first, at most ``cap``, plus up to ``jitter``."""
    base = min(cap, initial * (2 ** max(0, attempt - 1)))
    return float(base + (rng.uniform(0, jitter) if jitter else 0.0))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one step is retried. Every knob is named; the defaults live in ``anonjoin._core.constants``."""

    attempts: int = C.ATTEMPTS
    step_deadline_s: float = C.STEP_DEADLINE_S
    guest_deadline_s: float = C.GUEST_DEADLINE_S
    wait_initial: float = C.WAIT_INITIAL_S
    wait_max: float = C.WAIT_MAX_S
    jitter: float = C.WAIT_JITTER_S
    retry_after_cap_s: float = C.RETRY_AFTER_CAP_S
    request_timeout_s: float = C.REQUEST_TIMEOUT_S
    connect_timeout_s: float = C.CONNECT_TIMEOUT_S
    leave_deadline_s: float = C.LEAVE_DEADLINE_S
    shared_throttle: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError("RetryPolicy.attempts must be at least 1")
        for name in (
            "step_deadline_s",
            "guest_deadline_s",
            "request_timeout_s",
            "connect_timeout_s",
            "leave_deadline_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"RetryPolicy.{name} must be positive")
        for name in ("wait_initial", "wait_max", "jitter", "retry_after_cap_s"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"RetryPolicy.{name} must not be negative")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), before Retry-After."""
        return exponential_backoff(attempt, self.wait_initial, self.wait_max, self.jitter, rng)


@dataclass(frozen=True, slots=True)
class RejoinPolicy:
    """When and how often a joined guest comes back as the same guest (same applicationSessionId)."""

    enabled: bool = True
    attempts: int = C.REJOIN_ATTEMPTS
    expiry_margin_s: float = C.EXPIRY_MARGIN_S
    wait_initial: float = C.REJOIN_WAIT_INITIAL_S
    wait_max: float = C.REJOIN_WAIT_MAX_S
    jitter: float = C.REJOIN_JITTER_S
    on_drop: bool = True
    on_expiry: bool = True
    min_psat_lifetime_s: float = C.MIN_PSAT_LIFETIME_S

    def __post_init__(self) -> None:
        if self.attempts < 0:
            raise ConfigurationError("RejoinPolicy.attempts must not be negative")
        if self.min_psat_lifetime_s < 0:
            raise ConfigurationError("RejoinPolicy.min_psat_lifetime_s must not be negative")
        if self.expiry_margin_s < 0 or self.wait_initial < 0 or self.wait_max < 0 or self.jitter < 0:
            raise ConfigurationError("RejoinPolicy times must not be negative")

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The wait before consecutive recovery number ``attempt`` + 1."""
        return exponential_backoff(attempt, self.wait_initial, self.wait_max, self.jitter, rng)

    def margin_for(self, lifetime_s: float) -> float:
        """The rejoin margin before expiry, at most a quarter of the token's lifetime."""
        return min(self.expiry_margin_s, max(0.0, lifetime_s) * C.EXPIRY_MARGIN_FRACTION)


@dataclass(slots=True)
class StepStats:
    """Per-step time and attempts of one join (feeds JoinResult.steps/attempts)."""

    seconds: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    def add(self, step: str, seconds: float) -> None:
        self.seconds[step] = self.seconds.get(step, 0.0) + seconds
        self.attempts[step] = self.attempts.get(step, 0) + 1
