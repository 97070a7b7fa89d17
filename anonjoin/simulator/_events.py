"""The event channel of one psanon application (protocol.md §4.8).

Rules:
- The channel numbers its batches. A poll carries ``ack=N``: N equal to the channel's ``ack`` asks for a
  new batch (the answer's ``next`` carries ``ack=N+1``); N equal to ``ack - 1`` is a retry of the previous
  poll and gets the very same batch again (exactly-once delivery survives a lost response); any other N,
  or a wrong ``key``, gets a ``resync`` link instead of ``next``.
- One poll is parked at a time: a second poll with the same ack replaces the parked one, which answers
  409 ``PGetReplaced``.
- A parked poll returns when its ``timeout`` passes (an empty batch: only ``self`` and ``next``), or when
  a pending event is due: a high-priority event at once, a medium one after ``medium`` seconds, a low one
  after ``low`` seconds (the knobs are remembered across polls; every knob is scaled by ``time_scale``).
- Resume (optional, ``resume_after_s``): a poll that arrives more than ``resume_after_s`` seconds after the
  previous one ended gets a ``resume`` link instead of ``next``; the remembered knobs are reset, so the
  client follows it and sends its knobs again. Pending events are kept.
- Closing the channel (application deleted, evicted or expired) releases a parked poll with the reason.
- Idle expiry: whenever no poll is parked, a timer runs; when it fires the owner's ``on_idle`` is called.
- Each parked poll waits on one future; nothing is scanned, no task is spawned per poll.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Closed", "Event", "EventChannel", "PollResult", "Priority", "Replaced", "Resume", "Resync"]

TIMEOUT_MIN_S = 180.0
TIMEOUT_MAX_S = 1800.0


class Priority(enum.IntEnum):
    HIGH = 0
    MEDIUM = 1
    LOW = 2


@dataclass(slots=True)
class Event:
    """One entry of a sender's ``events`` list, queued at loop time ``t``."""

    sender_rel: str
    sender_href: str
    body: dict[str, Any]
    priority: Priority
    t: float = 0.0


@dataclass(frozen=True, slots=True)
class Batch:
    ack: int  # the ack of the poll this batch answers
    events: tuple[Event, ...]


@dataclass(frozen=True, slots=True)
class Resync:
    ack: int  # the ack to resume from


@dataclass(frozen=True, slots=True)
class Resume:
    ack: int  # the ack to resume from (the knobs were reset)


@dataclass(frozen=True, slots=True)
class Replaced:
    pass


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str  # "evicted" | "deleted" | "expired" | "shutdown"


PollResult = Batch | Resync | Resume | Replaced | Closed


class BadKnob(ValueError):
    """A query knob out of its range."""


@dataclass(slots=True)
class _Knobs:
    timeout: float = TIMEOUT_MIN_S
    low: float = 15.0
    medium: float = 5.0
    priority: str | None = None


@dataclass(eq=False, slots=True)
class _Poll:
    waiter: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EventChannel:
    """Ordered, exactly-once event delivery to one application through long polls."""

    def __init__(
        self,
        key: str,
        *,
        idle_s: float,
        on_idle: Callable[[], None],
        time_scale: float = 1.0,
        resume_after_s: float | None = None,
    ) -> None:
        self.key = key
        self.ack = 1
        self._pending: list[Event] = []
        self._last: Batch | None = None
        self._knobs = _Knobs()
        self._parked: _Poll | None = None
        self._closed: str | None = None
        self._scale = time_scale
        self._idle_s = idle_s
        self._on_idle = on_idle
        self._loop = asyncio.get_running_loop()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._resume_after_s = resume_after_s
        self._last_seen = self._loop.time()
        self._arm_idle()

    # -- producer side -------------------------------------------------------------------------------
    def push(self, event: Event) -> None:
        """Queue ``event``; wake the parked poll so it can decide whether to return now."""
        if self._closed is not None:
            return
        event.t = self._loop.time()
        self._pending.append(event)
        self._wake()

    def close(self, reason: str) -> None:
        """End the channel: a parked poll returns ``Closed(reason)``; later polls too."""
        if self._closed is None:
            self._closed = reason
        self._cancel_idle()
        self._wake()

    @property
    def closed(self) -> str | None:
        return self._closed

    @property
    def parked(self) -> bool:
        return self._parked is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- consumer side -------------------------------------------------------------------------------
    def set_knobs(
        self, timeout: str | None, low: str | None, medium: str | None, priority: str | None
    ) -> None:
        """Remember the poll's knobs (seconds); ``BadKnob`` when ``timeout`` is outside 180..1800."""
        knobs = self._knobs
        try:
            if timeout is not None:
                value = float(timeout)
                if not TIMEOUT_MIN_S <= value <= TIMEOUT_MAX_S:
                    raise BadKnob(f"timeout must be between {TIMEOUT_MIN_S:g} and {TIMEOUT_MAX_S:g} seconds")
                knobs.timeout = value
            if low is not None:
                knobs.low = _non_negative(low, "low")
            if medium is not None:
                knobs.medium = _non_negative(medium, "medium")
        except ValueError as exc:
            raise BadKnob(str(exc)) from None
        if priority is not None:
            knobs.priority = priority

    async def poll(self, ack: int | None, key: str | None) -> PollResult:
        """Answer one GET of the events resource (see the module rules)."""
        if self._closed is not None:
            return Closed(self._closed)
        if key != self.key or ack is None:
            return Resync(self.ack)
        if ack == self.ack - 1 and self._last is not None and self._parked is None:
            return self._last
        if ack != self.ack:
            return Resync(self.ack)
        gap = self._loop.time() - self._last_seen
        if self._resume_after_s is not None and self._parked is None and gap > self._resume_after_s:
            self._knobs = _Knobs()
            self._last_seen = self._loop.time()
            return Resume(self.ack)
        previous = self._parked
        me = _Poll()
        self._parked = me
        self._cancel_idle()
        if previous is not None and not previous.waiter.done():
            previous.waiter.set_result(None)
        loop = self._loop
        deadline = loop.time() + self._knobs.timeout * self._scale
        try:
            while True:
                if self._closed is not None:
                    return Closed(self._closed)
                if self._parked is not me:
                    return Replaced()
                wake_at = min(deadline, self._release_at())
                if loop.time() >= wake_at:
                    break
                try:
                    async with asyncio.timeout_at(wake_at):
                        await me.waiter
                except TimeoutError:
                    pass
                if me.waiter.done():
                    me.waiter = loop.create_future()
        finally:
            if self._parked is me:
                self._parked = None
                self._last_seen = loop.time()
                if self._closed is None:
                    self._arm_idle()
        batch = Batch(ack=self.ack, events=tuple(self._pending))
        self._pending = []
        self._last = batch
        self.ack += 1
        return batch

    # -- internals -----------------------------------------------------------------------------------
    def _release_at(self) -> float:
        if not self._pending:
            return float("inf")
        delays = (0.0, self._knobs.medium * self._scale, self._knobs.low * self._scale)
        # Pending events are in time order, so the earliest due one is among the first of each priority;
        # the list is short (one join's worth of events), so a plain min is fine.
        return min(event.t + delays[event.priority] for event in self._pending)

    def _wake(self) -> None:
        poll = self._parked
        if poll is not None and not poll.waiter.done():
            poll.waiter.set_result(None)

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self._idle_timer = self._loop.call_later(self._idle_s, self._idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if self._parked is None and self._closed is None:
            self._on_idle()


def _non_negative(text: str, name: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise ValueError(f"{name} must be a finite, non-negative number of seconds")
    return value
