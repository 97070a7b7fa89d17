"""Retries (tenacity drives the loop), the shared throttle, and the retry/rejoin policies.

One step runs as attempts: before each, the shared throttle may hold it (another guest of the same
Client got a 429/503 and its ``Retry-After`` has not passed); after a failure, :func:`classify` decides
whether the step is repeated, and the wait is exponential backoff with jitter, never less than the
server's ``Retry-After`` (capped). Every wait is bounded: an attempt cap, a per-step deadline and the
guest's deadline. The clock, sleep and randomness are injectable (:class:`Clock`) so tests never wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_never

from anonjoin._core import constants as C
from anonjoin._core.events import Observer, Step, StepEvent, log_event
from anonjoin._core.policy import RejoinPolicy, RetryPolicy, StepStats, exponential_backoff
from anonjoin._core.protocol import THROTTLE_STATUSES, Action, classify
from anonjoin._exceptions import ServiceError

__all__ = [
    "Attempt",
    "Clock",
    "RejoinPolicy",
    "RetryPolicy",
    "StepRunner",
    "StepStats",
    "Throttle",
    "exponential_backoff",
]

log = logging.getLogger("anonjoin.client")
T = TypeVar("T")


@dataclass(slots=True)
class Clock:
    """Time as the client sees it; replace the parts in tests (``sleep`` that returns at once, ...)."""

    monotonic: Callable[[], float] = time.monotonic
    time: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rng: random.Random = field(default_factory=random.Random)


class Throttle:
    """Shared by the guests of one Client: after a 429/503 on a step, every guest's next request of that
    step waits until the Retry-After instant (plus a little jitter, so they do not all return at once).

    Scoped by step, as services throttle per API: a 429 on the token POST holds back token POSTs, not
    the event polls of guests that are already in.
    """

    __slots__ = ("_clock", "_jitter", "until")

    def __init__(self, clock: Clock, jitter: float) -> None:
        self._clock = clock
        self._jitter = jitter
        self.until: dict[str, float] = {}

    def note(self, step: Step, wait_s: float) -> None:
        self.until[step] = max(self.until.get(step, 0.0), self._clock.monotonic() + wait_s)

    async def wait_turn(self, guest_id: str | None, step: Step, deadline_at: float) -> None:
        delay = self.until.get(step, 0.0) - self._clock.monotonic()
        if delay <= 0:
            return
        delay += self._clock.rng.uniform(0, self._jitter) if self._jitter else 0.0
        delay = min(delay, max(0.0, deadline_at - self._clock.monotonic()))
        log_event(
            log, logging.DEBUG, "anonjoin.throttle.wait", guest_id=guest_id, step=step, wait_s=round(delay, 3)
        )
        await self._clock.sleep(delay)


@dataclass(slots=True)
class Attempt:
    """What one attempt knows: its number, the time it may take, and whether to refresh the AAD token."""

    number: int
    timeout_s: float
    refresh_auth: bool
    client_request_id: str | None = None
    status: int | None = None
    correlation_id: str | None = None
    cut: bool = False
    """The step's (or the guest's) deadline falls within this attempt: ``timeout_s`` is all it may take,
    connecting included."""


class _StepRun:
    """The bookkeeping of one step's attempts (synchronous; the awaiting is in StepRunner.run)."""

    __slots__ = (
        "attempts",
        "clock",
        "deadline",
        "guest_id",
        "holdoff",
        "last",
        "next_wait",
        "observer",
        "per_request",
        "preflight",
        "refresh_next",
        "refreshes",
        "report",
        "retry",
        "runner",
        "stats",
        "step",
    )

    def __init__(
        self,
        runner: StepRunner,
        step: Step,
        guest_id: str | None,
        deadline_at: float | None,
        stats: StepStats | None,
        timeout_s: float | None,
        preflight: bool,
        attempts: int | None = None,
    ) -> None:
        policy = runner.policy
        self.attempts = policy.attempts if attempts is None else attempts
        self.runner = runner
        self.clock = runner.clock
        self.observer = runner.observer
        self.step = step
        self.guest_id = guest_id
        self.stats = stats
        self.preflight = preflight
        self.per_request = timeout_s if timeout_s is not None else policy.request_timeout_s
        # A step whose one request may legitimately last longer than usual (the long poll, held by the
        # server for up to its timeout) gets that time on top of the step's budget for retries; otherwise
        # a parked poll would be cut at the step deadline and the guest lost.
        budget = policy.step_deadline_s + max(0.0, self.per_request - policy.request_timeout_s)
        step_deadline = self.clock.monotonic() + budget
        self.deadline = step_deadline if deadline_at is None else min(step_deadline, deadline_at)
        self.next_wait = 0.0
        self.retry = False
        self.refreshes = 0
        self.refresh_next = False
        self.last: BaseException | None = None
        self.report = False
        self.holdoff: dict[str, float] | None = None

    async def hold(self) -> None:
        """Wait out this guest's Retry-After for this step, if one is pending (bounded by the deadline)."""
        if self.holdoff is None:
            return
        wait = min(self.holdoff.get(self.step, 0.0), self.deadline) - self.clock.monotonic()
        if wait > 0:
            await self.clock.sleep(wait)

    def begin(self, number: int) -> tuple[Attempt, float]:
        t0 = self.clock.monotonic()
        left = self.deadline - t0
        att = Attempt(number, max(0.05, min(self.per_request, left)), self.refresh_next)
        # the deadline's last attempt: cut at the deadline, connecting included (issue 11)
        att.cut = left < self.per_request + self.runner.policy.connect_timeout_s
        self.refresh_next = False
        observer = self.observer
        self.report = observer.wants_steps()
        if self.report and observer.wants_step_starts():
            observer.step(StepEvent(self.guest_id, self.step, "start", number))
        return att, t0

    def succeeded(self, att: Attempt, t0: float) -> None:
        took = self.clock.monotonic() - t0
        if self.stats is not None:
            self.stats.add(self.step, took)
        if self.report:
            self.observer.step(
                StepEvent(
                    self.guest_id,
                    self.step,
                    "end",
                    att.number,
                    status=att.status,
                    duration_s=took,
                    outcome="ok",
                    client_request_id=att.client_request_id,
                    correlation_id=att.correlation_id,
                )
            )

    def failed(self, att: Attempt, t0: float, exc: Exception) -> bool:
        """Record a failed attempt; True when it will be retried (``next_wait`` says after how long)."""
        took = self.clock.monotonic() - t0
        if self.stats is not None:
            self.stats.add(self.step, took)
        self.last = exc
        if att.status is not None:  # the service answered (a redirect, an error status): no preflight now
            self.preflight = False
        self.retry = self.runner._decide(self.step, exc, att.number, self.deadline, self)
        is_service = isinstance(exc, ServiceError)
        self.observer.step(
            StepEvent(
                self.guest_id,
                self.step,
                "end",
                att.number,
                status=exc.status if is_service else att.status,  # type: ignore[attr-defined]
                retry_reason=_reason(exc) if self.retry else None,
                duration_s=took,
                outcome="retry" if self.retry else "error",
                client_request_id=att.client_request_id,
                correlation_id=exc.correlation_id if is_service else att.correlation_id,  # type: ignore[attr-defined]
            )
        )
        return self.retry

    async def again(self, number: int, attempt_fn: Callable[[Attempt], Awaitable[T]]) -> T:
        """A retry (run by tenacity): throttle, deadline, then the attempt."""
        runner = self.runner
        if self.holdoff:
            await self.hold()
        if runner.policy.shared_throttle and runner.throttle.until:
            await runner.throttle.wait_turn(self.guest_id, self.step, self.deadline)
        if self.deadline - self.clock.monotonic() <= 0 and self.last is not None:
            self.retry = False
            raise self.last
        att, t0 = self.begin(number)
        try:
            result = await attempt_fn(att)
        except Exception as exc:
            self.failed(att, t0, exc)
            raise
        self.succeeded(att, t0)
        return result


class StepRunner:
    """Runs one step with the retry policy, the shared throttle, hooks and logging."""

    __slots__ = ("clock", "observer", "policy", "throttle")

    def __init__(self, policy: RetryPolicy, clock: Clock, observer: Observer) -> None:
        self.policy = policy
        self.clock = clock
        self.observer = observer
        self.throttle = Throttle(clock, policy.jitter)

    async def run(
        self,
        step: Step,
        attempt_fn: Callable[[Attempt], Awaitable[T]],
        *,
        guest_id: str | None,
        deadline_at: float | None = None,
        stats: StepStats | None = None,
        timeout_s: float | None = None,
        attempts: int | None = None,
        holdoff: dict[str, float] | None = None,
        preflight: bool = False,
    ) -> T:
        """Run ``attempt_fn`` until it succeeds, the failure is not retryable, or a bound is hit.

        ``holdoff`` (one per guest): step -> the instant before which this guest sends no request of that
        step, because the service gave it a Retry-After (whichever request of the guest it was).
        ``preflight``: the service has not answered yet (see :func:`classify`'s ``answered``).
        """
        r = _StepRun(self, step, guest_id, deadline_at, stats, timeout_s, preflight, attempts)
        r.holdoff = holdoff
        if holdoff:
            await r.hold()
        # The first attempt runs inline (the hot path: most steps succeed at once, and every await level
        # costs on each resume); tenacity drives the retries, beginning with the wait the failure asked for.
        throttle = self.throttle
        if self.policy.shared_throttle and throttle.until:
            await throttle.wait_turn(guest_id, step, r.deadline)
        att, t0 = r.begin(1)
        try:
            result = await attempt_fn(att)
        except Exception as exc:
            if not r.failed(att, t0, exc):
                raise
        else:
            r.succeeded(att, t0)
            return result
        await self.clock.sleep(r.next_wait)
        retrying = AsyncRetrying(
            stop=stop_never,
            wait=lambda _rs: r.next_wait,
            retry=retry_if_exception(lambda _e: r.retry),
            sleep=self.clock.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                r.retry = False
                return await r.again(attempt.retry_state.attempt_number + 1, attempt_fn)
        raise AssertionError("unreachable")  # pragma: no cover

    def _decide(self, step: Step, exc: BaseException, number: int, deadline: float, loop: _StepRun) -> bool:
        """Whether to repeat the step: :func:`classify` says what the failure calls for; this applies the
        attempt cap, the backoff (at least the Retry-After) and the deadline."""
        refreshed = loop.refreshes >= C.AUTH_REFRESHES_PER_STEP
        d = classify(step, exc, answered=not loop.preflight, refreshed=refreshed)
        policy, clock = self.policy, self.clock
        if loop.holdoff is not None and isinstance(exc, ServiceError) and exc.retry_after is not None:
            # whatever happens next (a retry, a rejoin, a DELETE), this guest honours the Retry-After
            until = clock.monotonic() + min(exc.retry_after, policy.retry_after_cap_s)
            if until > loop.holdoff.get(step, 0.0):
                loop.holdoff[step] = until
        action = d.action
        if action is Action.REFRESH_AUTH:
            loop.refreshes += 1
            loop.refresh_next = True
            loop.next_wait = 0.0
            return clock.monotonic() < deadline and number < loop.attempts
        if action is not Action.RETRY or number >= loop.attempts:
            return False
        wait = policy.backoff(number, clock.rng)
        if isinstance(exc, ServiceError):
            if exc.retry_after is not None:
                wait = max(wait, min(exc.retry_after, policy.retry_after_cap_s))
            if exc.status in THROTTLE_STATUSES and policy.shared_throttle:
                self.throttle.note(step, wait)
        if clock.monotonic() + wait >= deadline:
            log_event(log, logging.INFO, "anonjoin.step.deadline", step=step, attempt=number)
            return False
        loop.next_wait = wait
        return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ServiceError):
        return f"status {exc.status}" + (f" {exc.subcode or exc.code}" if exc.subcode or exc.code else "")
    return type(exc).__name__
