"""The guest's protocol logic: states, transitions and the failure->action table. No I/O.

Rules of this module (like h11's ``_state.py``):

1. Everything that changes a guest's state lives here, as data: :data:`TRANSITIONS` maps
   ``(GuestState, Input)`` to the next state. Nothing else assigns a state.
2. A pair missing from the table is a :class:`ProtocolError`; the guest ends ``FAILED`` with that reason
   (a guest already in a terminal state keeps it). There is no silent fall-through.
3. What to do after a failure is decided in one place, :func:`classify` (protocol.md §6): retry the step,
   refresh the AAD token and retry once, re-mint the psat (same applicationSessionId) and redo the guest
   steps, recreate the application, refetch a stale capabilities link, stop the poller, final, "ended"
   (final, not a failure), or "done" (a DELETE whose application is already gone). What the caller knows
   of the situation is an argument (the service answered before, the token was refreshed, the link was
   refetched, the meeting was live), not a rule of its own elsewhere. Leaving follows the same table: a
   DELETE answered 401 gets a new psat for the same applicationSessionId and is sent again;
   :func:`leave_without_meeting` says when that psat is minted without the meeting (the meeting is gone).
4. Which step the driver performs in a state is :data:`STEP_FOR_STATE`; which steps may be repeated after a
   maybe-sent failure is :data:`SAFE_TO_REPEAT`. The two guest POSTs that are not safe
   (:data:`RECREATE_AFTER_MAYBE_SENT`) are never repeated in place: the application is recreated instead,
   which is safe because a new application for the same applicationSessionId evicts the old one.
5. What a batch of channel events means for the join is decided by :func:`signal_of` and
   :func:`settle`, pure functions of parsed data.

The conversation (:mod:`anonjoin._core.conversation`) feeds the machine and holds the rest of a guest's
decisions; the drivers (``anonjoin._async.guest`` with asyncio, ``anonjoin.locust`` with Locust) perform them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from anonjoin._core import constants as C
from anonjoin._core.events import ChannelEvent, Step
from anonjoin._exceptions import (
    AuthError,
    CapabilityNotAvailable,
    InsecureTarget,
    JoinFailed,
    MaybeSentError,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    TransportError,
)


class GuestState(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is a C slot, no Python call

    NEW = "new"
    MINTING = "minting"  # POST anonApplicationTokens (first join)
    DISCOVERING = "discovering"  # GET the discover link
    CREATING = "creating"  # POST anonApplications
    INVITING = "inviting"  # POST onlineMeetingInvitations
    CONNECTING = "connecting"  # polling events until the invitation completes
    LOBBY = "lobby"  # polling events, waiting to be admitted
    JOINED = "joined"  # poll parked (keep-alive)
    REJOINING = "rejoining"  # POST anonApplicationTokens again, same applicationSessionId
    LEAVING = "leaving"  # DELETE the application
    LEFT = "left"
    ENDED = "ended"
    FAILED = "failed"


class Input(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is a C slot, no Python call

    JOIN = "join"  # the caller asked to join
    GRANTED = "granted"  # a psat token arrived
    DISCOVERED = "discovered"  # the anonymous discover answered with anonApplications
    CREATED = "created"  # the psanon application exists
    INVITED = "invited"  # the invitation was accepted (201 + Location)
    PROGRESS = "progress"  # invitation started / conversation progress / heartbeat
    IN_LOBBY = "in_lobby"  # the conversation says InLobby
    SUCCEEDED = "succeeded"  # invitation completed Success
    DECLINED = "declined"  # invitation completed Failure (Denied, Timeout, ...) or a final error
    LOBBY_TIMEOUT = "lobby_timeout"  # waited in the lobby longer than allowed
    DROPPED = "dropped"  # a drop signal (§4.8) and the policy allows a rejoin
    APP_GONE = "app_gone"  # 404 ApplicationNotFound / 410: recreate with the current psat
    EXPIRING = "expiring"  # psat near expiry, or rejected (401): mint a new one
    RETRY_REJOIN = "retry_rejoin"  # a step ran out of retries: start over from a new psat after backoff
    REPLACED = "replaced"  # 409 PGetReplaced: another poller took over
    ENDED = "ended"  # the meeting ended
    LEAVE = "leave"  # the caller asked to leave
    DELETED = "deleted"  # the application was deleted (or was already gone)
    FAIL = "fail"  # a final error


TERMINAL: Final = frozenset({GuestState.LEFT, GuestState.ENDED, GuestState.FAILED})
_LIVE: Final = tuple(s for s in GuestState if s not in TERMINAL and s is not GuestState.LEAVING)
_JOINING: Final = (GuestState.DISCOVERING, GuestState.CREATING, GuestState.INVITING)
_WAITING: Final = (GuestState.CONNECTING, GuestState.LOBBY)
_HAS_APP: Final = (GuestState.INVITING, GuestState.CONNECTING, GuestState.LOBBY, GuestState.JOINED)

S, I = GuestState, Input  # noqa: E741 - short names keep the table readable

TRANSITIONS: Final[Mapping[tuple[GuestState, Input], GuestState]] = {
    (S.NEW, I.JOIN): S.MINTING,
    (S.MINTING, I.GRANTED): S.DISCOVERING,
    (S.REJOINING, I.GRANTED): S.DISCOVERING,
    (S.DISCOVERING, I.DISCOVERED): S.CREATING,
    (S.CREATING, I.CREATED): S.INVITING,
    (S.INVITING, I.INVITED): S.CONNECTING,
    (S.CONNECTING, I.PROGRESS): S.CONNECTING,
    (S.CONNECTING, I.IN_LOBBY): S.LOBBY,
    (S.LOBBY, I.PROGRESS): S.LOBBY,
    (S.LOBBY, I.IN_LOBBY): S.LOBBY,
    (S.LOBBY, I.LOBBY_TIMEOUT): S.FAILED,
    (S.JOINED, I.PROGRESS): S.JOINED,
    (S.JOINED, I.IN_LOBBY): S.JOINED,  # a late conversation update; harmless
    **{(w, I.SUCCEEDED): S.JOINED for w in _WAITING},
    **{(w, I.DECLINED): S.FAILED for w in (*_WAITING, *_JOINING, S.MINTING, S.REJOINING)},
    # A drop while waiting: the invitation's completion decides (dropped signals are settled away first).
    (S.JOINED, I.DROPPED): S.REJOINING,
    **{(w, I.DROPPED): S.REJOINING for w in _WAITING},
    (S.JOINED, I.EXPIRING): S.REJOINING,
    **{(s, I.EXPIRING): S.REJOINING for s in (*_JOINING, *_WAITING)},
    **{(s, I.APP_GONE): S.CREATING for s in (S.CREATING, *_HAS_APP)},
    **{(s, I.RETRY_REJOIN): S.REJOINING for s in (S.MINTING, S.REJOINING, *_JOINING, *_WAITING)},
    **{(s, I.REPLACED): S.LEFT for s in (*_WAITING, S.JOINED)},
    **{(s, I.ENDED): S.ENDED for s in _LIVE if s is not S.NEW},
    **{(s, I.LEAVE): S.LEAVING for s in _LIVE},
    (S.LEAVING, I.DELETED): S.LEFT,
    (S.LEAVING, I.LEAVE): S.LEAVING,
    **{(s, I.FAIL): S.FAILED for s in (*_LIVE, S.LEAVING)},
}
"""Every transition of a guest. A pair not listed is a protocol error."""

STEP_FOR_STATE: Final[Mapping[GuestState, Step]] = {
    S.MINTING: "anon_tokens",
    S.REJOINING: "anon_tokens",
    S.DISCOVERING: "anon_discover",
    S.CREATING: "anon_applications",
    S.INVITING: "invitations",
    S.CONNECTING: "events",
    S.LOBBY: "events",
    S.JOINED: "events",
    S.LEAVING: "delete_application",
}
"""The step the driver performs in each non-terminal state."""


class GuestMachine:
    """A guest's state, changed only through :meth:`handle` and :data:`TRANSITIONS`."""

    __slots__ = ("reason", "state")

    def __init__(self) -> None:
        self.state = GuestState.NEW
        self.reason: str | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def handle(self, event: Input, reason: str | None = None) -> GuestState:
        """Apply ``event``; a missing pair raises ProtocolError and fails the guest (unless terminal)."""
        try:
            new = TRANSITIONS[(self.state, event)]
        except KeyError:
            old = self.state
            if old not in TERMINAL:
                self.state = GuestState.FAILED
                self.reason = "ProtocolError"
            raise ProtocolError(f"no transition for input {event.value!r} in state {old.value!r}") from None
        self.state = new
        if new in TERMINAL or reason is not None:
            self.reason = reason
        return new


# ---------------------------------------------------------------------------------------------------
# The failure -> action table (protocol.md §6)


class Action(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is a C slot, no Python call

    RETRY = "retry"  # repeat the same step (backoff, at least Retry-After)
    REFRESH_AUTH = "refresh_auth"  # fresh AAD token bypassing the cache, then repeat once
    REMINT = "remint"  # new psat with the same applicationSessionId, redo the guest steps
    RECREATE = "recreate"  # recreate the guest application (new psat if near expiry), rejoin
    REJOIN = "rejoin"  # a drop: rejoin with the same applicationSessionId if the policy allows
    REFETCH = "refetch"  # a stale capabilities link (404 on the SA's POST): refetch them once, send again
    STOP_POLLER = "stop_poller"  # 409 PGetReplaced: another poller took over
    DONE = "done"  # what the step wanted is already so: the application to DELETE is gone (404/410)
    ENDED = "ended"  # the meeting is over: final, not a failure
    FINAL = "final"  # give up for this guest (or this call)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str


SA_STEPS: Final[frozenset[Step]] = frozenset(
    {"aad_token", "discover", "applications", "capabilities", "anon_tokens", "adhoc_meetings"}
)
SAFE_TO_REPEAT: Final[frozenset[Step]] = frozenset(
    {
        "discover",
        "applications",
        "capabilities",
        "anon_tokens",  # keyed by applicationSessionId: a repeat yields the same kind of grant
        "anon_discover",
        "events",  # the same ack: the newer poll replaces the older one
        "delete_application",
    }
)
"""Steps that may be repeated after a MaybeSentError (GETs, the token POST, DELETE)."""
RECREATE_AFTER_MAYBE_SENT: Final[frozenset[Step]] = frozenset({"anon_applications", "invitations"})
"""Guest POSTs that are not repeated after a MaybeSentError; the application is recreated instead."""

RETRY_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504})
THROTTLE_STATUSES: Final = frozenset({429, 503})
DROP_SUBCODES: Final = frozenset({"Ejected", "Removed", "TemporarilyUnavailable", "Disconnected"})
FINAL_500_CODES: Final = frozenset({"CallbackChannelError"})
NOT_FOUND: Final = "DestinationNotFound"
"""The service's word for a meeting it does not know: one that never existed, or one that has ended."""
NOT_STALE: Final[Mapping[Step, frozenset[str]]] = {
    "anon_tokens": frozenset({"ApplicationNotFound", NOT_FOUND}),  # about the request, not the link
    "adhoc_meetings": frozenset(),
}
"""The service application's POSTs whose 404 may mean a stale capabilities link, and the 404 subcodes that
say something about the request instead (refetching would not help)."""


def error_reason(error: BaseException) -> str:
    """A short stable word for an error: the subcode, the code, or the class name."""
    if isinstance(error, ServiceError):
        return error.subcode or error.code or f"HTTP{error.status}"
    if isinstance(error, JoinFailed):
        return error.reason
    if isinstance(error, CapabilityNotAvailable):
        return "CapabilityNotAvailable"
    return type(error).__name__


def invalid_token(error: BaseException) -> bool:
    """A 403 InvalidToken: the token was refused, yet this is known to hit valid tokens too, briefly
    (protocol.md §4.2). After one refresh it is retried like any transient failure."""
    return isinstance(error, ServiceError) and error.status == 403 and error.subcode == "InvalidToken"


def transient(decision: Decision, error: BaseException) -> bool:
    """Whether a failure that ran a step out of its attempts may pass if the join is started over later:
    one retried within the step (5xx, 429, timeouts, a cut connection), or a 403 InvalidToken."""
    return decision.action is Action.RETRY or invalid_token(error)


def classify(
    step: Step,
    error: BaseException,
    *,
    answered: bool = True,
    refreshed: bool = False,
    refetched: bool = False,
    meeting_ended: bool = False,
) -> Decision:
    """The one place that maps a failure of ``step`` to what the client does next (protocol.md §6).

    What the caller knows about the situation changes the answer:

    - ``answered``: the service has answered before. False on a Client's first discover (its preflight):
      a connection that could not be made for a known reason (refused, DNS, no TLS: the error's ``cause``)
      is final there, with that cause. Retries are for a service that answered before.
    - ``refreshed``: the AAD token was refreshed already for this step: a 401 again is final, a 403
      InvalidToken is retried like a transient failure (it hits valid tokens too, briefly, §4.2).
    - ``refetched``: the capabilities were refetched already for this request: a 404 is final.
    - ``meeting_ended``: the meeting is known to have been live (this guest was in it, or another guest
      saw it end): a ``DestinationNotFound`` means it ended, which is final but not a failure.
    """
    reason = error_reason(error)
    if isinstance(error, InsecureTarget):  # a token would go over http / off the service: never retried
        return Decision(Action.FINAL, reason)
    if isinstance(error, TransportError) and error.final:  # e.g. an untrusted TLS certificate
        return Decision(Action.FINAL, reason)
    if isinstance(error, RequestNotSentError):
        if not answered and error.cause is not None:
            return Decision(Action.FINAL, reason)  # the preflight: nothing answers there
        return Decision(Action.RETRY, reason)
    if isinstance(error, MaybeSentError):
        if step in SAFE_TO_REPEAT:
            return Decision(Action.RETRY, reason)
        if step in RECREATE_AFTER_MAYBE_SENT:
            # Not repeated in place: a new application for the same applicationSessionId evicts the one
            # that may exist (protocol.md §7), so recreating it and inviting again is safe.
            return Decision(Action.RECREATE, reason)
        return Decision(Action.FINAL, reason)
    if isinstance(error, ServiceError):
        status, sub = error.status, error.subcode
        if meeting_ended and sub == NOT_FOUND:
            return Decision(Action.ENDED, reason)
        if step == "delete_application" and status in (404, 410):
            return Decision(Action.DONE, reason)  # deleted, evicted or expired: nothing left to delete
        if step == "events" and status == 409 and sub == "PGetReplaced":
            return Decision(Action.STOP_POLLER, reason)
        if status in RETRY_STATUSES:
            if status == 500 and (sub in FINAL_500_CODES or error.code in FINAL_500_CODES):
                # CallbackChannelError: the application's channel is broken; a new one fixes it.
                return Decision(Action.RECREATE if step not in SA_STEPS else Action.RETRY, reason)
            return Decision(Action.RETRY, reason)
        if step in SA_STEPS:
            if status == 401 or invalid_token(error):
                if not refreshed:
                    return Decision(Action.REFRESH_AUTH, reason)
                return Decision(Action.RETRY if invalid_token(error) else Action.FINAL, reason)
            stale = NOT_STALE.get(step)
            if status == 404 and stale is not None and sub not in stale and not refetched:
                return Decision(Action.REFETCH, reason)
            return Decision(Action.FINAL, reason)  # 403 ApplicationNotFound, 400, ... are final
        # guest side
        if status == 401:
            return Decision(Action.REMINT, reason)
        if (status == 404 and sub == "ApplicationNotFound") or (
            status == 410 and step != "anon_applications"
        ):
            return Decision(Action.RECREATE, reason)
        if status == 410 and sub == "CannotRedirect":
            return Decision(Action.REMINT, reason)
        if sub == "Ended":
            return Decision(Action.ENDED, reason)
        return Decision(Action.FINAL, reason)  # DestinationNotFound, conference mismatch, 400, ...
    if isinstance(error, JoinFailed):
        if error.reason == "Ended" or (meeting_ended and error.reason == NOT_FOUND):
            return Decision(Action.ENDED, reason)
        if error.reason in DROP_SUBCODES:
            return Decision(Action.REJOIN, reason)
        return Decision(Action.FINAL, reason)
    if isinstance(error, AuthError):
        # the credential says whether Azure AD failed transiently (5xx, temporarily_unavailable, network)
        return Decision(Action.RETRY if error.retryable else Action.FINAL, reason)
    return Decision(Action.FINAL, reason)  # ProtocolError, CapabilityNotAvailable, anything else


def ended_not_failed(reason: str | None, *, meeting_ended: bool) -> bool:
    """Whether a guest that failed with ``reason`` (a report's reason word) really met its meeting's end:
    the same rule as :func:`classify`'s ``meeting_ended``, for a failure known only by its reason."""
    return meeting_ended and reason is not None and reason.startswith(NOT_FOUND)


# ---------------------------------------------------------------------------------------------------
# Hostile or broken answers bounded (issue 11): the psat's expiry, idle polls


@dataclass(frozen=True, slots=True)
class ExpiryPlan:
    """How long a psat is taken to live, and whether the service's word on it was suspect."""

    lifetime_s: float
    suspect: bool


def plan_expiry(stated_s: float | None, min_lifetime_s: float) -> ExpiryPlan:
    """Bound a psat's lifetime before use. ``stated_s``: its ``expiryTime`` minus the service's own now
    (its ``Date`` header, so clock skew does not shorten it), None when missing or unparsable.

    A lifetime under ``min_lifetime_s`` (or none) is suspect: the psat is renewed no sooner than
    :data:`~anonjoin._core.constants.REMINT_FLOOR_S` after minting (an unknown one: after ``min_lifetime_s``),
    and the driver counts each such renewal against the recovery budget (:func:`bad_expiry`).
    """
    if stated_s is None or stated_s != stated_s:  # missing, unparsable, NaN
        return ExpiryPlan(max(min_lifetime_s, C.REMINT_FLOOR_S), True)
    return ExpiryPlan(max(stated_s, C.REMINT_FLOOR_S), stated_s < min_lifetime_s)


def bad_expiry(suspect_grants: int, budget: int) -> bool:
    """Whether ``suspect_grants`` suspect psats in a row (no sane one between) exhaust the recovery budget:
    the first is used; each renewal after it is a recovery the psat's expiry forced."""
    return suspect_grants - 1 > budget


def poll_wait(previous_s: float, took_s: float, idle: bool) -> float:
    """The wait before the next event poll: an idle answer (nothing in it, or only ``resync``) that came
    faster than :data:`~anonjoin._core.constants.POLL_FLOOR_S` doubles it (capped); any other answer
    resets it."""
    if not idle or took_s >= C.POLL_FLOOR_S:
        return 0.0
    if previous_s <= 0:
        return C.POLL_IDLE_WAIT_INITIAL_S
    return min(C.POLL_IDLE_WAIT_MAX_S, previous_s * 2)


MEETING_GONE: Final = frozenset({NOT_FOUND, "Ended"})
"""Reasons that say the guest's meeting no longer exists (a psat for it can no longer be minted)."""


def leave_without_meeting(error: BaseException) -> bool:
    """Leaving needs a fresh psat (the one in hand expired) but minting one for the meeting failed: whether
    to mint one without ``meetingUrl`` instead. A DELETE needs only the guest's identity, which is its
    applicationSessionId (protocol.md §7), so when the meeting is gone a psat without a meeting still lets
    the guest delete its application rather than leave it live until the service expires it."""
    final = classify("anon_tokens", error, refetched=True).action is Action.FINAL
    return final and error_reason(error) in MEETING_GONE


# ---------------------------------------------------------------------------------------------------
# Channel events -> join signals


class Signal(enum.Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing is a C slot, no Python call

    PROGRESS = "progress"
    IN_LOBBY = "in_lobby"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    DROPPED = "dropped"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Outcome:
    signal: Signal
    reason: str | None = None


def _state_of(embedded: Mapping[str, Any], rel: str) -> str | None:
    res = embedded.get(rel)
    if isinstance(res, dict):
        state = res.get("state")
        if isinstance(state, str):
            return state
    return None


def signal_of(ev: ChannelEvent) -> Outcome:
    """What one channel event means for the join (most events are plain progress)."""
    rel, kind, sub = ev.rel, ev.type, ev.reason_subcode
    if sub == "Ended":
        return Outcome(Signal.ENDED, "Ended")
    if rel == "onlineMeetingInvitation" and kind == "completed":
        if (ev.status or "").lower() == "success":
            return Outcome(Signal.SUCCEEDED)
        return Outcome(Signal.DECLINED, sub or ev.reason_code or "Failure")
    if sub in DROP_SUBCODES:
        return Outcome(Signal.DROPPED, sub)
    if rel == "conversation":
        if kind == "deleted":
            return Outcome(Signal.DROPPED, sub or "ConversationDeleted")
        if ev.state == "InLobby":
            return Outcome(Signal.IN_LOBBY)
        if ev.state == "Disconnected":
            return Outcome(Signal.DROPPED, sub or "Disconnected")
    if rel == "localParticipant" and kind == "deleted":
        return Outcome(Signal.DROPPED, sub or "Removed")
    if rel == "onlineMeeting" and kind == "deleted":
        return Outcome(Signal.ENDED, "Ended")
    return Outcome(Signal.PROGRESS)


def settle(state: GuestState, outcomes: Iterable[Outcome]) -> list[Outcome]:
    """The signals of one batch reduced to those that matter, in order.

    ``Ended`` anywhere in a batch wins (a meeting that ends also disconnects everyone). While waiting for
    the invitation, drop signals are left out: the invitation's completion says what happened. After a
    success in the same batch, a later drop still counts (joined, then dropped).
    """
    items = list(outcomes)
    for o in items:
        if o.signal is Signal.ENDED:
            return [o]
    out: list[Outcome] = []
    joined = state is GuestState.JOINED
    for o in items:
        if o.signal is Signal.PROGRESS:
            continue
        if o.signal is Signal.DROPPED and not joined:
            continue
        if o.signal is Signal.SUCCEEDED:
            joined = True
        out.append(o)
        if o.signal in (Signal.DECLINED, Signal.DROPPED):
            break
    return out


SIGNAL_INPUT: Final[Mapping[Signal, Input]] = {
    Signal.PROGRESS: Input.PROGRESS,
    Signal.IN_LOBBY: Input.IN_LOBBY,
    Signal.SUCCEEDED: Input.SUCCEEDED,
    Signal.DECLINED: Input.DECLINED,
    Signal.DROPPED: Input.DROPPED,
    Signal.ENDED: Input.ENDED,
}
