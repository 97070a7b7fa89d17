"""One guest's conversation with the service, sans I/O (h11-style).

The conversation is fed what happened and answers with what to do; it never waits and never sends:

- :meth:`Conversation.next_action` says what the guest does in its state: :class:`Mint` a psat (not before
  an instant), :class:`Send` a request (step, method, URL, headers, body), or :class:`Poll` the event
  channel until a signal or a timer.
- What came back goes to :meth:`~Conversation.on_granted`, :meth:`~Conversation.on_response` (a parsed or
  parseable answer), :meth:`~Conversation.on_poll` (an event batch), :meth:`~Conversation.on_failure` (a
  step that failed for good: the recovery ladder answers with a :class:`Recovery`), and
  :meth:`~Conversation.on_timer` (the instant :meth:`~Conversation.next_timer` gave has come).
- Effects are returned as data: :class:`Emit` a guest event, :class:`Publish` a channel event,
  :class:`Joined`, :class:`DeleteApp` (a DELETE in the background before an expiry rejoin).

It holds every decision of a guest: the state machine (:data:`anonjoin._core.protocol.TRANSITIONS`), the
recovery ladder and its budget (the rejoin policy's attempts), when a restart keeps its deadline, the
expiry / lobby / deadline timers (as instants it returns), drop handling, which application to delete when
leaving and with which psat, and the request bodies. Time is one convention: monotonic seconds, passed in
as ``now``; wall time appears only as a label on a :class:`~anonjoin.JoinResult`.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol, cast, get_args

from yarl import URL

from anonjoin._core import constants as C
from anonjoin._core.events import ChannelEvent, GuestEventKind, Step, log_event
from anonjoin._core.models import (
    ApplicationBody,
    DiscoverBody,
    EventsBody,
    GuestGrant,
    GuestOutcome,
    JoinResult,
    embedded_links,
    embedded_resource,
    find_href,
    parse_body,
    rel_name,
    require_link,
    resolve,
)
from anonjoin._core.policy import RejoinPolicy, StepStats
from anonjoin._core.protocol import (
    SIGNAL_INPUT,
    TRANSITIONS,
    Action,
    Decision,
    GuestMachine,
    GuestState,
    Input,
    Signal,
    bad_expiry,
    classify,
    leave_without_meeting,
    plan_expiry,
    poll_wait,
    settle,
    signal_of,
    transient,
)
from anonjoin._exceptions import (
    AnonJoinError,
    JoinFailed,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    TransportError,
    redact_url,
)

__all__ = [
    "Conversation",
    "DeleteApp",
    "Effect",
    "Emit",
    "GuestSpec",
    "Joined",
    "LeaveSteps",
    "Mint",
    "Poll",
    "Publish",
    "Recovery",
    "Send",
]

log = logging.getLogger("anonjoin.guest")

SHARED_STEPS: frozenset[str] = frozenset({"aad_token", "discover", "applications", "capabilities"})
"""Steps shared by every guest of a Client: their errors are raised as they are, not as JoinFailed, and a
step that ran out of retries there is not started over (it was already tried for every guest)."""
POLL_ATTEMPT_S = C.POLL_TIMEOUT_S + C.POLL_TIMEOUT_MARGIN_S
"""The time one event poll may take: the server's hold plus a margin."""
_POLLING = frozenset({GuestState.CONNECTING, GuestState.LOBBY, GuestState.JOINED})
_NOT_JOINED_YET = frozenset({GuestState.CONNECTING, GuestState.LOBBY})
_MINTING = frozenset({GuestState.MINTING, GuestState.REJOINING})
_STEPS: frozenset[str] = frozenset(get_args(Step.__value__))


class ResponseLike(Protocol):
    """What the conversation reads of an answer (``anonjoin._async.http.Response`` fits)."""

    @property
    def status(self) -> int: ...
    @property
    def url(self) -> URL: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def correlation_id(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class GuestSpec:
    """Who the guest is and what it joins."""

    guest_id: str
    application_session_id: str
    meeting_url: str
    origin: str
    display_name: str
    lobby_timeout_s: float
    culture: str
    user_agent: str


# --- what the conversation asks the driver to do ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mint:
    """Get a psat for the guest from the service application, sent no sooner than ``not_before``."""

    meeting_url: str | None
    not_before: float
    deadline_at: float


@dataclass(frozen=True, slots=True)
class Send:
    """Send one request of ``step`` (the driver's step runner retries it as the failure table says)."""

    step: Step
    method: str
    url: URL
    headers: Mapping[str, str]
    body: bytes | None = None
    deadline_at: float | None = None


@dataclass(frozen=True, slots=True)
class Poll:
    """Keep the event channel polled (the next poll issued before an answer is processed) until the state
    leaves polling, a timer is due (:meth:`Conversation.next_timer`) or the caller leaves."""

    url: URL


NextAction = Mint | Send | Poll


@dataclass(frozen=True, slots=True)
class Emit:
    kind: GuestEventKind
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    event: ChannelEvent


@dataclass(frozen=True, slots=True)
class Joined:
    result: JoinResult


@dataclass(frozen=True, slots=True)
class DeleteApp:
    """DELETE ``url`` in the background with a psat in hand (never minting one), by ``deadline_at``."""

    url: URL
    deadline_at: float


Effect = Emit | Publish | Joined | DeleteApp

LeaveSteps = Generator[Mint | Send, object, None]
"""The requests of leaving (:meth:`Conversation.leave_requests`): the driver performs each yielded
:class:`Mint` or :class:`Send` and sends back the grant or the response, or throws the step's error in."""


@dataclass(frozen=True, slots=True)
class Recovery:
    """The recovery ladder's answer to a failure: the effects, and the instant to go on from (a backoff);
    the conversation's state says where it goes on (a terminal state: it does not)."""

    decision: Decision
    effects: tuple[Effect, ...] = ()
    wait_until: float | None = None
    restart: bool = False
    """Started over from a fresh psat after a step ran out of retries (not a rejoin the caller sees)."""


def operation_id(rng: random.Random) -> str:
    """A GUID's 32 hex digits (version 4 shape) for an invitation's ``operationId``."""
    h = f"{rng.getrandbits(128) | (1 << 127):032x}"
    return f"{h[:12]}4{h[13:]}"


def _json(body: object) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class Conversation:
    """One guest's protocol state and decisions. Every method takes ``now`` (monotonic seconds) where time
    matters, and none waits."""

    def __init__(
        self,
        spec: GuestSpec,
        *,
        guest_deadline_s: float,
        leave_deadline_s: float,
        rejoin: RejoinPolicy,
        rng: random.Random,
    ) -> None:
        self.spec = spec
        self.m = GuestMachine()
        self.guest_deadline_s = guest_deadline_s
        self.leave_deadline_s = leave_deadline_s
        self.rejoin = rejoin
        self.rng = rng
        self.rejoins = 0
        self.conference_id: str | None = None
        self.result: JoinResult | None = None
        self.error: AnonJoinError | None = None
        self.stats = StepStats()
        self.ever_joined = False
        self.recoveries = 0  # consecutive rejoins/recoveries since the last successful join
        self.leave_requested = False
        # the psat: the guest's own (renewed ahead of expiry) and one minted only for leaving
        self.grant: GuestGrant | None = None
        self.grant_until = 0.0  # the instant the guest's psat is taken to expire (bounded, skew-free)
        self.rejoin_due: float | None = None  # the instant to rejoin ahead of that
        self.leave_grant: GuestGrant | None = None
        self.leave_grant_until = 0.0
        self.suspect_grants = 0  # psats in a row granted with a suspect expiry (issue 11)
        self.last_mint_at: float | None = None
        # links learnt on the way in
        self.anon_apps_url: URL | None = None
        self.events_url: URL | None = None
        self.join_url: URL | None = None
        # The application to delete when leaving: the newest this guest created and does not know deleted
        # (a new one for the same applicationSessionId evicts the old one, protocol.md §7, so there is at
        # most one). ``app_unknown``: a create may have made a newer one whose href the guest never learnt.
        self.app_url: URL | None = None
        self.app_unknown = False
        self._unknown_before = False
        # the attempt at joining in progress
        self.join_started = 0.0
        self.deadline_at = 0.0
        self.lobby_since: float | None = None
        self.lobby_total = 0.0
        self.idle_wait = 0.0  # the wait before the next poll while the channel answers idle at once
        self.leave_deadline_at: float | None = None  # set by the first cleanup; later ones share it

    # --- state --------------------------------------------------------------------------------------

    @property
    def state(self) -> GuestState:
        return self.m.state

    @property
    def terminal(self) -> bool:
        return self.m.terminal

    @property
    def polling(self) -> bool:
        return self.m.state in _POLLING

    def _start_join(self, now: float, *, keep_deadline: bool = False) -> None:
        """A new attempt at joining (a first join, a rejoin, a recovery). It gets a new deadline unless
        ``keep_deadline``: a restart that is not a failure (a psat renewed before the guest got in) stays
        within the deadline of the attempt it interrupts."""
        self.stats = StepStats()
        self.join_started = now
        if not keep_deadline:
            self.deadline_at = now + self.guest_deadline_s
        self.lobby_total = 0.0
        self.lobby_since = None

    def start(self, now: float) -> None:
        """The caller asked to join."""
        self.m.handle(Input.JOIN)
        self._start_join(now)

    def leave(self) -> None:
        """The caller asked to leave: no recovery starts from now on."""
        self.leave_requested = True

    def left_unstarted(self) -> None:
        """Leave before the join ever started: nothing was created, nothing to delete."""
        self.leave_requested = True
        if not self.m.terminal:
            self.m.handle(Input.LEAVE)
            self.m.handle(Input.DELETED)

    def stop(self) -> None:
        """The driver stops (a leave while a step is in flight, a cancel): the guest is leaving."""
        if not self.m.terminal:
            self.m.handle(Input.LEAVE)

    def deleted(self) -> None:
        """The cleanup is over (the application deleted, or given up on within the leave budget)."""
        if self.m.state is GuestState.LEAVING:
            self.m.handle(Input.DELETED)

    def internal_error(self, name: str) -> None:
        if not self.m.terminal:
            self.m.handle(Input.FAIL, "InternalError")
        self.error = ProtocolError(f"internal error: {name}")

    @property
    def replaced(self) -> bool:
        """Another poller took over: the application is its to delete, not this guest's."""
        return self.m.state is GuestState.LEFT and self.m.reason == "PGetReplaced"

    # --- requests -----------------------------------------------------------------------------------

    def headers(self, *, auth: bool = True, grant: GuestGrant | None = None) -> dict[str, str]:
        h = {"Origin": self.spec.origin}
        grant = grant or self.grant
        if auth and grant is not None:
            h["Authorization"] = f"Bearer {grant.token}"
        return h

    def application_body(self) -> bytes:
        s = self.spec
        return _json(
            {"anonymousDisplayName": s.display_name, "culture": s.culture, "userAgent": s.user_agent}
        )

    def invitation_body(self) -> bytes:
        return _json(
            {
                "anonymousDisplayName": self.spec.display_name,
                "importance": C.INVITATION_IMPORTANCE,
                "onlineMeetingUri": self.conference_id,
                "operationId": operation_id(self.rng),
            }
        )

    def next_action(self, now: float) -> NextAction:
        """What the guest does in its state (not terminal, not leaving)."""
        st = self.m.state
        if st in _MINTING:
            not_before = now
            if self.last_mint_at is not None:  # never psats closer together than the floor (issue 11)
                not_before = max(now, min(self.last_mint_at + C.REMINT_FLOOR_S, self.deadline_at))
            self.last_mint_at = not_before
            return Mint(self.spec.meeting_url, not_before, self.deadline_at)
        if st is GuestState.DISCOVERING:
            assert self.grant is not None
            url = URL(self.grant.discover_url, encoded=True)  # opaque: never rebuilt or re-quoted
            return Send("anon_discover", "GET", url, self.headers(auth=False))
        if st is GuestState.CREATING:
            return self.create_request()
        if st is GuestState.INVITING:
            if self.join_url is None or not self.conference_id:
                raise ProtocolError("nothing to invite to", step="invitations")
            return Send("invitations", "POST", self.join_url, self.headers(), self.invitation_body())
        if st in _POLLING:
            if self.events_url is None:
                raise ProtocolError("no events link", step="events")
            return Poll(self.events_url)
        raise ProtocolError(f"nothing to do in state {st.value!r}")  # pragma: no cover - a driver's bug

    def create_request(self, *, deadline_at: float | None = None, grant: GuestGrant | None = None) -> Send:
        """POST anonApplications. Until its answer is read (:meth:`on_created`, :meth:`create_failed`),
        ``app_unknown`` says an application may exist that the guest cannot name."""
        if self.anon_apps_url is None:
            raise ProtocolError("no anonApplications link", step="anon_applications")
        self._unknown_before, self.app_unknown = self.app_unknown, True
        return Send(
            "anon_applications",
            "POST",
            self.anon_apps_url,
            self.headers(grant=grant),
            self.application_body(),
            deadline_at,
        )

    # --- answers ------------------------------------------------------------------------------------

    def on_granted(self, grant: GuestGrant, now: float) -> None:
        """A psat for the guest (while minting or rejoining); its expiry bounded (issue 11)."""
        pol = self.rejoin
        plan = plan_expiry(grant.lifetime_s, pol.min_psat_lifetime_s)
        renews = pol.enabled and pol.on_expiry
        self.suspect_grants = self.suspect_grants + 1 if plan.suspect and renews else 0
        if bad_expiry(self.suspect_grants, pol.attempts):
            raise JoinFailed(
                "BadExpiry",
                f"{self.suspect_grants} psats in a row with under {pol.min_psat_lifetime_s:g} s to live",
                cause_step="anon_tokens",
            )
        self.grant = grant
        self.grant_until = now + plan.lifetime_s
        self.rejoin_due = self.grant_until - pol.margin_for(plan.lifetime_s) if renews else None
        if grant.conference_id:
            self.conference_id = grant.conference_id
        self.m.handle(Input.GRANTED)

    def on_response(self, send: Send, r: ResponseLike) -> None:
        """The answer to :meth:`next_action`'s request (a 2xx); a body the guest cannot use is a
        ProtocolError naming the step."""
        step = send.step
        if step == "anon_discover":
            d = parse_body(DiscoverBody, r.body, step=step, status=r.status, correlation_id=r.correlation_id)
            self.anon_apps_url = require_link(d.links, r.url, "anonApplications", step=step, status=r.status)
            conf = d.conference_id or (self.grant.conference_id if self.grant else None)
            if not conf:
                raise ProtocolError(
                    "no conference id (neither in discover nor in the token)", step=step, status=r.status
                )
            self.conference_id = conf
            self.m.handle(Input.DISCOVERED)
        elif step == "anon_applications":
            self.on_application(self.on_created(r), r)
        elif step == "invitations":
            loc = r.headers.get("Location")
            if not loc:
                raise ProtocolError(
                    "invitation answered without Location",
                    step=step,
                    status=r.status,
                    body=r.body,
                    correlation_id=r.correlation_id,
                )
            resolve(r.url, loc, step=step)
            self.m.handle(Input.INVITED)
        else:  # pragma: no cover - a driver's bug
            raise ProtocolError(f"unexpected answer to {step}", step=step)

    def on_created(self, r: ResponseLike) -> ApplicationBody:
        """An application was created: it is the one to delete now (the service evicted the previous)."""
        step: Step = "anon_applications"
        try:
            a = parse_body(
                ApplicationBody, r.body, step=step, status=r.status, correlation_id=r.correlation_id
            )
            self.app_url = require_link(a.links, r.url, "self", step=step, status=r.status)
        except ProtocolError:
            loc = r.headers.get("Location")  # created all the same: name it by its Location if there is one
            if loc:
                try:
                    self.app_url = resolve(r.url, loc, step=step)
                    self.app_unknown = False
                except ProtocolError:
                    pass
            raise
        self.app_unknown = False
        return a

    def on_application(self, a: ApplicationBody, r: ResponseLike) -> None:
        """The created application's links (:meth:`on_created` has read its answer): on to the invitation."""
        step: Step = "anon_applications"
        self.events_url = require_link(a.links, r.url, "events", step=step, status=r.status)
        href = find_href(embedded_links(embedded_resource(a.embedded, "communication")), "joinOnlineMeeting")
        if href is None:
            raise ProtocolError(
                "missing link 'joinOnlineMeeting' (is the token for a meeting?)", step=step, status=r.status
            )
        self.join_url = resolve(r.url, href, step=step)
        self.m.handle(Input.CREATED)

    def create_failed(self, exc: BaseException) -> None:
        """The create did not answer 2xx: answered without creating one, or never sent, it made none."""
        if isinstance(exc, ServiceError | RequestNotSentError):
            self.app_unknown = self._unknown_before

    # --- the recovery ladder ------------------------------------------------------------------------

    def _can_recover(self) -> bool:
        pol = self.rejoin
        return pol.enabled and self.recoveries < pol.attempts and not self.leave_requested

    def _backoff_until(self, now: float) -> float | None:
        if self.recoveries <= 1:
            return None
        return now + self.rejoin.backoff(self.recoveries - 1, self.rng)

    def _can(self, inp: Input) -> bool:
        return (self.m.state, inp) in TRANSITIONS

    def on_failure(self, step: Step, exc: AnonJoinError, now: float) -> Recovery:
        """A step failed for good (its retries, if any, spent): what the guest does next. The error's own
        step, when it names one, is the one that really failed (minting runs discover and co.)."""
        own = getattr(exc, "step", None)
        if isinstance(own, str) and own in _STEPS:
            step = own  # type: ignore[assignment]
        rec = self._ladder(step, exc, now)
        d, gid = rec.decision, self.spec.guest_id
        log_event(
            log, logging.INFO, "anonjoin.guest.failure", guest_id=gid, step=step, action=d.action.value,
            reason=d.reason, error=type(exc).__name__,
        )  # fmt: skip
        if self.replaced:
            log_event(log, logging.INFO, "anonjoin.poll.replaced", guest_id=gid)
        if rec.restart:
            log_event(log, logging.INFO, "anonjoin.guest.restart", guest_id=gid, step=step, reason=d.reason)
        return rec

    def _ladder(self, step: Step, exc: AnonJoinError, now: float) -> Recovery:
        m = self.m
        # the failure reaches the guest after the service application refetched its capabilities; a meeting
        # this guest was in and no longer found has ended (while the guest was rejoining)
        d = classify(step, exc, refetched=True, meeting_ended=self.ever_joined)
        reason = d.reason
        if d.action is Action.ENDED:
            m.handle(Input.ENDED, "Ended")
            return Recovery(d)
        if d.action is Action.STOP_POLLER and self._can(Input.REPLACED):
            m.handle(Input.REPLACED, "PGetReplaced")
            return Recovery(d)
        if d.action in (Action.REMINT, Action.RECREATE, Action.REJOIN) and self._can_recover():
            self.recoveries += 1
            if d.action is Action.RECREATE and self._grant_fresh(now) and self._can(Input.APP_GONE):
                self.events_url = None  # the application stays the one to delete until a new one replaces it
                m.handle(Input.APP_GONE, reason)
            elif self._can(Input.EXPIRING):
                m.handle(Input.EXPIRING, reason)
            else:
                return self._fail(step, exc, d, now)
            wait = self._backoff_until(now)
            self._start_join(now if wait is None else wait)
            return Recovery(d, (Emit("rejoining", reason),), wait)
        if (
            transient(d, exc)
            and step not in SHARED_STEPS  # already tried for every guest, to its cap (issue 11)
            and self._can_recover()
            and self._can(Input.RETRY_REJOIN)
            and (self.ever_joined or now < self.deadline_at)
        ):
            # A step ran out of retries on transient failures (5xx, 429, timeouts): start over from a fresh
            # psat after a backoff, bounded by the rejoin policy. At ~20% faulted requests one step in
            # ~10^4 exhausts its attempts, which would otherwise fail a guest for good. A rejoin gets a new
            # deadline; a first join keeps its own, so join() still ends within guest_deadline_s.
            self.recoveries += 1
            m.handle(Input.RETRY_REJOIN, reason)
            wait = self._backoff_until(now)
            self._start_join(now if wait is None else wait, keep_deadline=not self.ever_joined)
            return Recovery(d, (), wait, restart=True)
        return self._fail(step, exc, d, now)

    def _fail(self, step: Step, exc: AnonJoinError, d: Decision, now: float) -> Recovery:
        self.error = self._final_error(step, exc, d.reason, now)
        self.m.handle(Input.FAIL, d.reason)
        return Recovery(d)

    def _final_error(self, step: Step, exc: AnonJoinError, reason: str, now: float) -> AnonJoinError:
        if isinstance(exc, TransportError) and not self.ever_joined and now >= self.deadline_at:
            # the attempt was cut at the guest's deadline (issue 11): the join timed out
            err = JoinFailed("JoinTimeout", f"{step}: cut at the guest deadline ({reason})", cause_step=step)
            err.__cause__ = exc
            return err
        if isinstance(exc, ServiceError) and step not in SHARED_STEPS:
            err = JoinFailed(reason, str(exc), cause_step=step)
            err.__cause__ = exc
            return err
        return exc

    def _grant_fresh(self, now: float) -> bool:
        return self.grant is not None and (self.rejoin_due is None or now < self.rejoin_due)

    # --- the event channel --------------------------------------------------------------------------

    def next_timer(self) -> tuple[float | None, str]:
        """The next instant a timer is due while polling, and what it means (for :meth:`on_timer`)."""
        st = self.m.state
        candidates: list[tuple[float, str]] = []
        if self.rejoin_due is not None:
            candidates.append((self.rejoin_due, "expiry"))
        if st is GuestState.LOBBY and self.lobby_since is not None:
            candidates.append((self.lobby_since + self.spec.lobby_timeout_s, "lobby"))
        elif st is GuestState.CONNECTING:
            candidates.append((self.deadline_at, "deadline"))
        if not candidates:
            return None, ""
        return min(candidates)

    def on_timer(self, what: str, now: float) -> list[Effect]:
        """The timer :meth:`next_timer` named is due."""
        m = self.m
        if what == "expiry":
            if self.rejoin.enabled and not self.leave_requested:
                # Routine, not a failure: not one of the rejoin policy's attempts. A guest not in yet (its
                # chain slower than the psat's life, as on a loaded machine with a short-lived psat) keeps
                # the deadline of the attempt it interrupts, which bounds such restarts.
                waiting = m.state is not GuestState.JOINED
                effects: list[Effect] = []
                delete = self._delete_before_rejoin(now)
                if delete is not None:
                    effects.append(delete)
                effects.append(Emit("rejoining", "TokenExpiring"))
                m.handle(Input.EXPIRING, "TokenExpiring")
                self._start_join(now, keep_deadline=waiting)
                return effects
            self.rejoin_due = None
            return []
        if what == "lobby":
            self.error = JoinFailed("LobbyTimeout", f"not admitted within {self.spec.lobby_timeout_s:g} s")
            m.handle(Input.LOBBY_TIMEOUT, "LobbyTimeout")
            return []
        self.error = JoinFailed("JoinTimeout", "the invitation did not complete within the guest deadline")
        m.handle(Input.FAIL, "JoinTimeout")
        return []

    def _delete_before_rejoin(self, now: float) -> DeleteApp | None:
        """Before an expiry rejoin: DELETE the current application while its psat is still valid (if the
        rejoin cannot complete, e.g. the meeting ended, leaving would need a psat minted without the
        meeting). It stays the application to delete until the DELETE succeeds or a new one replaces it.
        With the psat already expired nothing is sent: the rejoin's new application evicts it."""
        url, grant = self.app_url, self.grant
        if url is None or grant is None or not self.psat_valid(grant, now):
            return None
        return DeleteApp(url, now + self.leave_deadline_s)

    def poll_started(self) -> None:
        self.idle_wait = 0.0

    def poll_request(
        self, url: URL, *, now: float | None = None, step_deadline_s: float | None = None
    ) -> Send:
        """An event poll; with ``now`` and ``step_deadline_s``, bounded: the server holds a poll up to
        ``POLL_TIMEOUT_S``, so its retries end by two attempts of :data:`POLL_ATTEMPT_S` plus one step's
        deadline (not the guest's: a joined guest polls for as long as it stays)."""
        deadline = None
        if now is not None and step_deadline_s is not None:
            deadline = now + POLL_ATTEMPT_S * 2 + step_deadline_s
        return Send("events", "GET", url, self.headers(), None, deadline)

    def poll_answered(self, r: ResponseLike, took_s: float) -> tuple[EventsBody, URL, float, str | None]:
        """An event poll's answer: its batch, the next poll's URL, the wait before sending it (an idle
        channel, :func:`~anonjoin._core.protocol.poll_wait`) and the special link followed (resync/resume)."""
        body = parse_body(EventsBody, r.body, step="events", status=r.status, correlation_id=r.correlation_id)
        nxt = find_href(body.links, "next")
        idle = nxt is None or not any(sender.events for sender in body.sender)
        self.idle_wait = poll_wait(self.idle_wait, took_s - self.idle_wait, idle)
        special = None
        if nxt is None:
            for special in ("resync", "resume"):
                nxt = find_href(body.links, special)
                if nxt is not None:
                    break
        if nxt is None:
            raise ProtocolError(
                "event response without next/resync/resume", step="events", status=r.status, body=r.body
            )
        self.events_url = resolve(r.url, nxt, step="events")
        return body, self.events_url, self.idle_wait, special

    def on_poll(self, body: EventsBody, now: float, wall: float) -> list[Effect]:
        """An event batch: each channel event published, then what the batch means for the join."""
        effects: list[Effect] = []
        outcomes = []
        gid = self.spec.guest_id
        for sender in body.sender:
            sender_rel = rel_name(sender.rel)
            for e in sender.events:
                rel = rel_name(e.link.rel)
                embedded = {rel_name(k): v for k, v in e.embedded.items()} if e.embedded else e.embedded
                emb = embedded.get(rel)
                state = emb.get("state") if isinstance(emb, dict) else None
                if state is None and isinstance(e.in_, dict):
                    s2 = e.in_.get("state")
                    state = s2 if isinstance(s2, str) else None
                ce = ChannelEvent(
                    guest_id=gid,
                    sender=sender_rel,
                    rel=rel,
                    href=e.link.href,
                    type=e.type,
                    status=e.status,
                    reason_code=e.reason.code if e.reason else None,
                    reason_subcode=e.reason.subcode if e.reason else None,
                    state=state if isinstance(state, str) else None,
                    embedded=embedded,
                )
                effects.append(Publish(ce))
                outcomes.append(signal_of(ce))
        m = self.m
        for o in settle(m.state, outcomes):
            before = m.state
            if o.signal is Signal.DROPPED:
                effects.append(Emit("dropped", o.reason))
                if self.rejoin.on_drop and self._can_recover():
                    self.recoveries += 1
                    m.handle(Input.DROPPED, o.reason)
                    effects.append(Emit("rejoining", o.reason))
                    self._start_join(now)  # the new application evicts this one (deleted if the rejoin stops)
                else:
                    self.error = JoinFailed(o.reason or "Dropped", "dropped from the meeting")
                    m.handle(Input.FAIL, o.reason or "Dropped")
                return effects
            if o.signal is Signal.DECLINED:
                self.error = JoinFailed(o.reason or "Failure", "the invitation failed")
            m.handle(SIGNAL_INPUT[o.signal], o.reason)
            if m.state is GuestState.LOBBY and before is not GuestState.LOBBY:
                self.lobby_since = now
                effects.append(Emit("lobby"))
            if m.state is GuestState.JOINED and before in _NOT_JOINED_YET:
                effects.extend(self._on_joined(before, now, wall))
            if m.state not in _POLLING:
                return effects
        return effects

    def _on_joined(self, before: GuestState, now: float, wall: float) -> list[Effect]:
        if before is GuestState.LOBBY and self.lobby_since is not None:
            self.lobby_total += now - self.lobby_since
        self.lobby_since = None
        rejoin = self.ever_joined
        self.result = JoinResult(
            guest_id=self.spec.guest_id,
            application_session_id=self.spec.application_session_id,
            conference_id=self.conference_id,
            joined_at=wall,
            duration_s=now - self.join_started,
            lobby_s=self.lobby_total,
            steps=dict(self.stats.seconds),
            attempts=dict(self.stats.attempts),
            rejoin=rejoin,
        )
        self.ever_joined = True
        self.recoveries = 0
        if rejoin:
            self.rejoins += 1
        return [Emit("rejoined" if rejoin else "joined"), Joined(self.result)]

    # --- leaving ------------------------------------------------------------------------------------

    def cleanup_deadline(self, now: float) -> float:
        """The one leave budget of this guest (a cleanup cancelled and started again does not renew it)."""
        if self.leave_deadline_at is None:
            self.leave_deadline_at = now + self.leave_deadline_s
        return self.leave_deadline_at

    def psat_valid(self, grant: GuestGrant, now: float) -> bool:
        """Whether ``grant`` (the guest's or its leave psat) still has life in it, as bounded by
        :func:`~anonjoin._core.protocol.plan_expiry` from the instant it arrived."""
        if grant is self.grant:
            until = self.grant_until
        elif grant is self.leave_grant:
            until = self.leave_grant_until
        else:
            return False
        return until - now > C.PSAT_SKEW_S

    def leave_psat(self, rejected: GuestGrant | None, now: float) -> GuestGrant | None:
        """A psat for leaving: the guest's own (or one minted for leaving) while valid and not ``rejected``
        by a 401; None: mint one (:meth:`leave_mint`)."""
        for g in (self.grant, self.leave_grant):
            if g is not None and g is not rejected and self.psat_valid(g, now):
                return g
        return None

    def on_leave_grant(self, grant: GuestGrant, now: float) -> None:
        """A psat minted for leaving; never the guest's own (a rejoin in progress keeps the one it minted)."""
        self.leave_grant = grant
        self.leave_grant_until = (
            now + plan_expiry(grant.lifetime_s, self.rejoin.min_psat_lifetime_s).lifetime_s
        )

    @staticmethod
    def delete_done(exc: BaseException) -> bool:
        """A DELETE answered with an error that says the application is gone already (404/410)."""
        return classify("delete_application", exc).action is Action.DONE

    def leave_requests(
        self, deadline_at: float, now: Callable[[], float], *, delete: URL | None = None, mint: bool = True
    ) -> LeaveSteps:
        """Leave nothing live, by ``deadline_at``: an application a create may have made without the guest
        learning its href is evicted (another create for the same applicationSessionId, protocol.md §7),
        then the application to delete is DELETEd (a 404/410 says it is gone already). ``delete``: only that
        application (in the background, before an expiry rejoin). Each request goes with a valid psat: the
        guest's own, or one minted for leaving, for the meeting or, when the meeting is gone, for the
        guest's identity alone; a 401 gets a fresh one (bounded). ``mint=False``: never mint one (with no
        valid psat in hand nothing is sent)."""
        if delete is None:
            for _ in range(C.EVICT_ATTEMPTS):
                if not self.app_unknown or self.anon_apps_url is None or now() >= deadline_at:
                    break
                evict = self._with_leave_psat("anon_applications", self._evict, deadline_at, now, mint)
                if (yield from evict):
                    break
        url = self.app_url if delete is None else delete
        if url is None:
            return
        delete_it = partial(self._delete, url)
        deleted = yield from self._with_leave_psat("delete_application", delete_it, deadline_at, now, mint)
        if deleted and self.app_url == url:
            self.app_url = None

    def _evict(self, grant: GuestGrant, deadline_at: float) -> Generator[Send, object, None]:
        try:
            r = yield self.create_request(deadline_at=deadline_at, grant=grant)
        except AnonJoinError as exc:
            self.create_failed(exc)
            raise
        self.on_created(cast(ResponseLike, r))

    def _delete(self, url: URL, grant: GuestGrant, deadline_at: float) -> Generator[Send, object, None]:
        yield Send("delete_application", "DELETE", url, self.headers(grant=grant), None, deadline_at)

    def _with_leave_psat(
        self,
        step: Step,
        op: Callable[[GuestGrant, float], Generator[Send, object, None]],
        deadline_at: float,
        now: Callable[[], float],
        mint: bool,
    ) -> Generator[Mint | Send, object, bool]:
        """Run a request of leaving with a valid psat; after a 401, once more with a fresh one (bounded).
        True when it succeeded; a failure :func:`classify` does not answer with REMINT is the end of it."""
        rejected: GuestGrant | None = None
        for _ in range(C.LEAVE_REMINTS + 1):
            grant = self.leave_psat(rejected, now())
            if grant is None:
                if not mint:
                    return False  # no valid psat in hand, and not ours to mint one
                try:
                    try:
                        got = yield Mint(self.spec.meeting_url, now(), deadline_at)
                    except AnonJoinError as exc:
                        if not leave_without_meeting(exc):
                            raise
                        got = yield Mint(None, now(), deadline_at)
                except AnonJoinError as exc:
                    self._leave_failed("anon_tokens", exc)
                    return False
                grant = cast(GuestGrant, got)
                self.on_leave_grant(grant, now())
            try:
                yield from op(grant, deadline_at)
            except AnonJoinError as exc:
                if classify(step, exc).action is not Action.REMINT:
                    self._leave_failed(step, exc)
                    return False
                rejected = grant
            else:
                return True
        return False

    def _leave_failed(self, step: Step, exc: AnonJoinError) -> None:
        url = self.app_url
        log_event(
            log,
            logging.INFO,
            "anonjoin.guest.leave_failed",
            guest_id=self.spec.guest_id,
            step=step,
            error=type(exc).__name__,
            url=redact_url(url) if url is not None else None,
        )

    # --- the end ------------------------------------------------------------------------------------

    def settle_error(self) -> AnonJoinError | None:
        """The error the guest ends with (None unless it failed)."""
        if self.m.state is GuestState.FAILED:
            if self.error is None:
                self.error = JoinFailed(self.m.reason or "Failed")
            return self.error
        return None

    def closed_error(self) -> AnonJoinError:
        """What a join() asked of a guest that is closed (or was left before it started) raises, when no
        join failed before it: a JoinFailed named by the reason it ended with, else by its state."""
        return JoinFailed(self.m.reason or self.m.state.value, "this guest is closed")

    @staticmethod
    def join_error(outcome: GuestOutcome) -> AnonJoinError:
        """What a join() still waiting when the guest closes raises: the guest's error, else (it left or its
        meeting ended before it was in) a JoinFailed named by the reason, else by how it ended."""
        if outcome.error is not None:
            return outcome.error
        return JoinFailed(outcome.reason or outcome.kind.capitalize(), f"the guest {outcome.kind}")

    def outcome(self, error: AnonJoinError | None) -> GuestOutcome:
        st = self.m.state
        kind: Literal["left", "ended", "failed"] = (
            "ended" if st is GuestState.ENDED else "failed" if st is GuestState.FAILED else "left"
        )
        return GuestOutcome(
            guest_id=self.spec.guest_id,
            application_session_id=self.spec.application_session_id,
            kind=kind,
            reason=self.m.reason,
            rejoins=self.rejoins,
            joined=self.ever_joined,
            error=error,
        )
