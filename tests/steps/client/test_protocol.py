"""The sans-IO core: every (state, input) pair, the failure->action table, event signals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anonjoin import (
    AuthError,
    CapabilityNotAvailable,
    JoinFailed,
    MaybeSentError,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
)
from anonjoin._core.events import ChannelEvent
from anonjoin._core.protocol import (
    SAFE_TO_REPEAT,
    STEP_FOR_STATE,
    TERMINAL,
    TRANSITIONS,
    Action,
    GuestMachine,
    GuestState,
    Input,
    Outcome,
    Signal,
    classify,
    ended_not_failed,
    leave_without_meeting,
    settle,
    signal_of,
)

ALL_PAIRS = [(s, i) for s in GuestState for i in Input]


@pytest.mark.parametrize(("state", "inp"), ALL_PAIRS, ids=[f"{s.value}-{i.value}" for s, i in ALL_PAIRS])
def test_every_pair_has_a_target_or_fails_the_guest(state: GuestState, inp: Input) -> None:
    m = GuestMachine()
    m.state = state
    if (state, inp) in TRANSITIONS:
        assert m.handle(inp) is TRANSITIONS[(state, inp)]
    else:
        with pytest.raises(ProtocolError):
            m.handle(inp)
        assert m.state is (state if state in TERMINAL else GuestState.FAILED)
        if state not in TERMINAL:
            assert m.reason == "ProtocolError"


@settings(deadline=None)
@given(st.lists(st.sampled_from(list(Input)), max_size=40))
def test_any_input_sequence_keeps_the_machine_consistent(inputs: list[Input]) -> None:
    m = GuestMachine()
    for inp in inputs:
        before = m.state
        try:
            after = m.handle(inp)
        except ProtocolError:
            assert (before, inp) not in TRANSITIONS
            assert m.state in TERMINAL
        else:
            assert after is TRANSITIONS[(before, inp)]
        if before in TERMINAL:
            assert m.state is before  # terminal states never change


def test_table_shape() -> None:
    # terminal states have no way out; every non-terminal state can fail and (but LEAVING) leave
    for (s, _i), _t in TRANSITIONS.items():
        assert s not in TERMINAL
    for s in GuestState:
        if s in TERMINAL:
            continue
        assert (s, Input.FAIL) in TRANSITIONS
        if s is not GuestState.LEAVING:
            assert (s, Input.LEAVE) in TRANSITIONS
        assert s is GuestState.NEW or s in STEP_FOR_STATE
    # every state is reachable from NEW
    seen = {GuestState.NEW}
    frontier = [GuestState.NEW]
    while frontier:
        s = frontier.pop()
        for (a, _i), t in TRANSITIONS.items():
            if a is s and t not in seen:
                seen.add(t)
                frontier.append(t)
    assert seen == set(GuestState)


def _se(
    status: int, subcode: str | None = None, code: str | None = None, step: str = "invitations"
) -> ServiceError:
    return ServiceError(step=step, status=status, code=code, subcode=subcode)


@pytest.mark.parametrize(
    ("step", "error", "action"),
    [
        ("anon_applications", RequestNotSentError("refused"), Action.RETRY),
        ("invitations", MaybeSentError("timeout"), Action.RECREATE),
        ("anon_applications", MaybeSentError("timeout"), Action.RECREATE),
        ("adhoc_meetings", MaybeSentError("timeout"), Action.FINAL),
        ("anon_tokens", MaybeSentError("timeout"), Action.RETRY),
        ("events", MaybeSentError("timeout"), Action.RETRY),
        ("discover", MaybeSentError("reset"), Action.RETRY),
        ("invitations", _se(429), Action.RETRY),
        ("invitations", _se(503), Action.RETRY),
        ("invitations", _se(500, code="ServiceFailure"), Action.RETRY),
        ("invitations", _se(502), Action.RETRY),
        ("invitations", _se(504), Action.RETRY),
        ("invitations", _se(408), Action.RETRY),
        ("applications", _se(401, step="applications"), Action.REFRESH_AUTH),
        ("applications", _se(403, "InvalidToken", step="applications"), Action.REFRESH_AUTH),
        ("anon_tokens", _se(401, step="anon_tokens"), Action.REFRESH_AUTH),
        ("anon_applications", _se(401), Action.REMINT),
        ("events", _se(401), Action.REMINT),
        ("applications", _se(403, "ApplicationNotFound", step="applications"), Action.FINAL),
        ("events", _se(404, "ApplicationNotFound"), Action.RECREATE),
        ("events", _se(410, "InactiveApplicationExpired"), Action.RECREATE),
        ("invitations", _se(404, "ApplicationNotFound"), Action.RECREATE),
        ("invitations", _se(404, "DestinationNotFound"), Action.FINAL),
        ("invitations", _se(403), Action.FINAL),
        ("events", _se(409, "PGetReplaced"), Action.STOP_POLLER),
        ("events", JoinFailed("Ejected"), Action.REJOIN),
        ("events", JoinFailed("Ended"), Action.ENDED),
        ("events", JoinFailed("Denied"), Action.FINAL),
        ("events", ProtocolError("bad"), Action.FINAL),
        ("anon_tokens", CapabilityNotAvailable("anonApplicationTokens"), Action.FINAL),
        ("discover", AuthError("no"), Action.FINAL),
        ("discover", AuthError("aad 503", retryable=True), Action.RETRY),
        # leaving: an application already gone is what the DELETE wanted; an expired psat is re-minted
        ("delete_application", _se(404, "ApplicationNotFound"), Action.DONE),
        ("delete_application", _se(404), Action.DONE),
        ("delete_application", _se(410, "InactiveApplicationExpired"), Action.DONE),
        ("delete_application", _se(401), Action.REMINT),
        ("delete_application", _se(429), Action.RETRY),
        ("delete_application", _se(503), Action.RETRY),
        ("delete_application", _se(500, code="ServiceFailure"), Action.RETRY),
        ("delete_application", MaybeSentError("reset"), Action.RETRY),
        ("delete_application", _se(403), Action.FINAL),
    ],
)
def test_failure_action_table(step: str, error: Exception, action: Action) -> None:
    assert classify(step, error).action is action  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "without"),
    [
        (_se(404, "DestinationNotFound", step="anon_tokens"), True),
        (_se(404, "Ended", step="anon_tokens"), True),
        (_se(403, "Forbidden", step="anon_tokens"), False),
        (_se(503, step="anon_tokens"), False),
        (MaybeSentError("reset"), False),
        (CapabilityNotAvailable("anonApplicationTokens"), False),
    ],
)
def test_leave_mints_without_the_meeting_only_when_it_is_gone(error: Exception, without: bool) -> None:
    assert leave_without_meeting(error) is without


def test_safe_steps() -> None:
    assert "invitations" not in SAFE_TO_REPEAT and "anon_applications" not in SAFE_TO_REPEAT
    assert {"discover", "applications", "capabilities", "anon_tokens", "events"} <= SAFE_TO_REPEAT


def _ce(rel: str, type_: str, *, status: str | None = None, sub: str | None = None, state: str | None = None):  # type: ignore[no-untyped-def]
    return ChannelEvent(
        "g", "communication", rel, None, type_, status=status, reason_subcode=sub, state=state
    )


def test_signals() -> None:
    assert signal_of(_ce("onlineMeetingInvitation", "completed", status="Success")).signal is Signal.SUCCEEDED
    o = signal_of(_ce("onlineMeetingInvitation", "completed", status="Failure", sub="Denied"))
    assert o == Outcome(Signal.DECLINED, "Denied")
    assert signal_of(_ce("conversation", "updated", state="InLobby")).signal is Signal.IN_LOBBY
    assert signal_of(_ce("conversation", "updated", state="Disconnected")).signal is Signal.DROPPED
    assert signal_of(_ce("localParticipant", "deleted")).signal is Signal.DROPPED
    assert signal_of(_ce("conversation", "deleted", sub="Ended")).signal is Signal.ENDED
    assert signal_of(_ce("participant", "added")).signal is Signal.PROGRESS


def test_settle() -> None:
    drop, end = Outcome(Signal.DROPPED, "Removed"), Outcome(Signal.ENDED, "Ended")
    ok = Outcome(Signal.SUCCEEDED)
    assert settle(GuestState.JOINED, [drop, end]) == [end]
    assert settle(GuestState.CONNECTING, [drop, Outcome(Signal.DECLINED, "Denied")]) == [
        Outcome(Signal.DECLINED, "Denied")
    ]
    assert settle(GuestState.CONNECTING, [ok, drop]) == [ok, drop]
    assert settle(GuestState.JOINED, [Outcome(Signal.PROGRESS)]) == []


RELS = ["onlineMeetingInvitation", "conversation", "localParticipant", "participant", "onlineMeeting", "x"]
TYPES = ["started", "updated", "completed", "added", "deleted"]
STATES = [None, "InLobby", "Conferencing", "Conferenced", "Connected", "Disconnected"]
SUBCODES = [None, "Denied", "Ejected", "Removed", "Ended", "TemporarilyUnavailable", "Timeout", "Other"]


@st.composite
def channel_events(draw: st.DrawFn) -> ChannelEvent:
    return ChannelEvent(
        "g",
        "communication",
        draw(st.sampled_from(RELS)),
        None,
        draw(st.sampled_from(TYPES)),
        status=draw(st.sampled_from([None, "Success", "Failure"])),
        reason_subcode=draw(st.sampled_from(SUBCODES)),
        state=draw(st.sampled_from(STATES)),
    )


@settings(deadline=None, max_examples=300)
@given(st.lists(st.lists(channel_events(), max_size=6), max_size=6))
def test_any_event_batches_end_in_a_defined_state_or_a_protocol_error(
    batches: list[list[ChannelEvent]],
) -> None:
    from anonjoin._core.protocol import SIGNAL_INPUT

    m = GuestMachine()
    m.state = GuestState.CONNECTING
    for batch in batches:
        for o in settle(m.state, [signal_of(e) for e in batch]):
            try:
                m.handle(SIGNAL_INPUT[o.signal], o.reason)
            except ProtocolError:
                assert m.state is GuestState.FAILED
                return
            if m.state not in (GuestState.CONNECTING, GuestState.LOBBY, GuestState.JOINED):
                assert m.state in (GuestState.FAILED, GuestState.ENDED, GuestState.REJOINING)
                return
    assert m.state in (GuestState.CONNECTING, GuestState.LOBBY, GuestState.JOINED)


@pytest.mark.parametrize(
    ("step", "error", "situation", "action"),
    [
        # after one AAD refresh: a 401 is final, a 403 InvalidToken is retried like a transient failure
        ("applications", _se(401, step="applications"), {"refreshed": True}, Action.FINAL),
        ("applications", _se(403, "InvalidToken", step="applications"), {"refreshed": True}, Action.RETRY),
        # a 404 on the SA's POSTs: a stale capabilities link is refetched once, unless the subcode is
        # about the request itself
        ("anon_tokens", _se(404, step="anon_tokens"), {}, Action.REFETCH),
        ("anon_tokens", _se(404, step="anon_tokens"), {"refetched": True}, Action.FINAL),
        ("anon_tokens", _se(404, "DestinationNotFound", step="anon_tokens"), {}, Action.FINAL),
        ("anon_tokens", _se(404, "ApplicationNotFound", step="anon_tokens"), {}, Action.FINAL),
        ("adhoc_meetings", _se(404, "ApplicationNotFound", step="adhoc_meetings"), {}, Action.REFETCH),
        ("adhoc_meetings", _se(404, step="adhoc_meetings"), {"refetched": True}, Action.FINAL),
        # a meeting the guest was in and no longer found has ended (final, not a failure)
        (
            "anon_tokens",
            _se(404, "DestinationNotFound", step="anon_tokens"),
            {"meeting_ended": True},
            Action.ENDED,
        ),
        ("invitations", _se(404, "DestinationNotFound"), {"meeting_ended": True}, Action.ENDED),
        ("invitations", _se(404, "DestinationNotFound"), {}, Action.FINAL),
        # the preflight: a known connect failure on a service that never answered is final
        (
            "discover",
            RequestNotSentError("x", cause="connection refused by h:1"),
            {"answered": False},
            Action.FINAL,
        ),
        ("discover", RequestNotSentError("x", cause="connection refused by h:1"), {}, Action.RETRY),
        ("discover", RequestNotSentError("connect timeout"), {"answered": False}, Action.RETRY),
    ],
)
def test_failure_action_table_in_context(
    step: str, error: Exception, situation: dict[str, bool], action: Action
) -> None:
    assert classify(step, error, **situation).action is action  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reason", "meeting_ended", "ended"),
    [
        ("DestinationNotFound", True, True),
        ("DestinationNotFound", False, False),
        ("Denied", True, False),
        (None, True, False),
    ],
)
def test_a_refused_join_of_an_ended_meeting_is_ended(
    reason: str | None, meeting_ended: bool, ended: bool
) -> None:
    assert ended_not_failed(reason, meeting_ended=meeting_ended) is ended
