"""Observability as API: typed hook events, and stdlib logging with stable dotted event names.

Hooks are called synchronously on the event loop; an exception raised by a hook is logged
(``anonjoin.hook.error``) and never propagates into the join. Log records use the logger ``anonjoin``
(children ``anonjoin.client``, ``anonjoin.http``, ``anonjoin.guest``); every message starts with its event
name and the record carries ``event`` (and ``guest_id``, ``step``, ``client_request_id``,
``correlation_id`` where known) in ``extra``. Nothing secret is ever passed to either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from typing_extensions import TypeAliasType

Step = TypeAliasType(
    "Step",
    Literal[
        "aad_token",
        "discover",
        "applications",
        "capabilities",
        "anon_tokens",
        "adhoc_meetings",
        "anon_discover",
        "anon_applications",
        "invitations",
        "events",
        "delete_application",
    ],
)
"""Step names: the same words as the simulator's route names."""

StepPhase: TypeAlias = Literal["start", "end"]
StepOutcome: TypeAlias = Literal["ok", "retry", "error"]
GuestEventKind: TypeAlias = Literal[
    "joined", "lobby", "dropped", "rejoining", "rejoined", "failed", "ended", "left"
]

logger = logging.getLogger("anonjoin")


@dataclass(frozen=True, slots=True)
class StepEvent:
    """One step attempt starting or ending. ``guest_id`` is None for steps shared by all guests."""

    guest_id: str | None
    step: Step
    phase: StepPhase
    attempt: int
    status: int | None = None
    retry_reason: str | None = None
    duration_s: float | None = None
    outcome: StepOutcome | None = None
    client_request_id: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class GuestEvent:
    """A change in a guest's life: joined, lobby, dropped, rejoining, rejoined, failed, ended, left."""

    guest_id: str
    kind: GuestEventKind
    reason: str | None
    application_session_id: str
    at: float


@dataclass(frozen=True, slots=True)
class ChannelEvent:
    """One UCWA event from a guest's event channel, in delivery order."""

    guest_id: str
    sender: str
    rel: str
    href: str | None
    type: str
    status: str | None = None
    reason_code: str | None = None
    reason_subcode: str | None = None
    state: str | None = None
    embedded: Mapping[str, Any] = field(default_factory=dict, repr=False)


Event = TypeAliasType("Event", ChannelEvent | GuestEvent)
"""What :meth:`anonjoin.Guest.events` yields."""


@dataclass(frozen=True, slots=True)
class Hooks:
    """Callbacks for step timings and guest life events (used by the CLI report and benchmarks)."""

    on_step: Callable[[StepEvent], None] | None = None
    on_guest: Callable[[GuestEvent], None] | None = None
    step_starts: bool = True
    """Whether ``on_step`` also gets each attempt's ``"start"`` event (False: only the ``"end"`` events,
    which carry the timing; one event less per request for a hook that ignores starts)."""


def log_event(log: logging.Logger, level: int, event: str, message: str = "", **extra: Any) -> None:
    """Log ``event`` (a stable dotted name) with ``extra`` fields; cheap when the level is off."""
    if log.isEnabledFor(level):
        extra["event"] = event
        tail = " ".join(f"{k}={v}" for k, v in extra.items() if v is not None and k != "event")
        text = f"{event} {message} {tail}".rstrip() if message else f"{event} {tail}".rstrip()
        log.log(level, "%s", text, extra=extra)


class Observer:
    """Calls the hooks safely and logs step/guest events with their dotted names."""

    __slots__ = ("_glog", "_log", "_on_guest", "_on_step", "_step_starts")

    def __init__(self, hooks: Hooks | None) -> None:
        self._on_step = hooks.on_step if hooks else None
        self._on_guest = hooks.on_guest if hooks else None
        self._step_starts = self._on_step is not None and (hooks is None or hooks.step_starts)
        self._log = logging.getLogger("anonjoin.client")
        self._glog = logging.getLogger("anonjoin.guest")

    def wants_steps(self) -> bool:
        """Whether step end events go anywhere (a hook, or DEBUG logging): skip building them otherwise."""
        return self._on_step is not None or self._log.isEnabledFor(logging.DEBUG)

    def wants_step_starts(self) -> bool:
        """Whether step start events go anywhere (a hook that wants them, or DEBUG logging)."""
        return self._step_starts or self._log.isEnabledFor(logging.DEBUG)

    def step(self, ev: StepEvent) -> None:
        if ev.phase == "start":
            if self._log.isEnabledFor(logging.DEBUG):
                log_event(
                    self._log,
                    logging.DEBUG,
                    "anonjoin.step.start",
                    step=ev.step,
                    guest_id=ev.guest_id,
                    attempt=ev.attempt,
                    client_request_id=ev.client_request_id,
                )
            if not self._step_starts:
                return
        else:
            name = "anonjoin.step.retry" if ev.outcome == "retry" else "anonjoin.step.end"
            level = logging.INFO if ev.outcome == "retry" else logging.DEBUG
            if self._log.isEnabledFor(level):
                log_event(
                    self._log,
                    level,
                    name,
                    step=ev.step,
                    guest_id=ev.guest_id,
                    attempt=ev.attempt,
                    status=ev.status,
                    outcome=ev.outcome,
                    retry_reason=ev.retry_reason,
                    duration_s=None if ev.duration_s is None else round(ev.duration_s, 4),
                    client_request_id=ev.client_request_id,
                    correlation_id=ev.correlation_id,
                )
        if self._on_step is not None:
            try:
                self._on_step(ev)
            except Exception as exc:
                log_event(
                    self._log,
                    logging.WARNING,
                    "anonjoin.hook.error",
                    hook="on_step",
                    error=type(exc).__name__,
                )

    def guest(self, ev: GuestEvent) -> None:
        level = logging.WARNING if ev.kind == "failed" else logging.INFO
        if self._glog.isEnabledFor(level):
            log_event(
                self._glog,
                level,
                f"anonjoin.guest.{ev.kind}",
                guest_id=ev.guest_id,
                reason=ev.reason,
                application_session_id=ev.application_session_id,
            )
        if self._on_guest is not None:
            try:
                self._on_guest(ev)
            except Exception as exc:
                log_event(
                    self._glog,
                    logging.WARNING,
                    "anonjoin.hook.error",
                    hook="on_guest",
                    error=type(exc).__name__,
                )
