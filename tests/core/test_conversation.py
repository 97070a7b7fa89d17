"""The guest conversation driven with no sockets and an explicit clock (milliseconds): the restart, expiry,
lobby, drop and leave rules, each in a few simulated milliseconds or seconds of no real time."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from yarl import URL

from anonjoin._core import constants as C
from anonjoin._core.conversation import (
    Conversation,
    DeleteApp,
    Emit,
    GuestSpec,
    Joined,
    Mint,
    Poll,
    Publish,
    Send,
)
from anonjoin._core.models import GuestGrant
from anonjoin._core.policy import RejoinPolicy
from anonjoin._core.protocol import GuestState
from anonjoin._exceptions import JoinFailed, MaybeSentError, ProtocolError, ServiceError

BASE = URL("https://pool.contoso.com/ucwa/psanon/v1/applications/a1")
CONF = "sip:org@contoso.com;gruu;opaque=app:conf:focus:id:ABC"
SPEC = GuestSpec(
    guest_id="g1",
    application_session_id="asi-1",
    meeting_url="https://meet.contoso.com/org/ABC",
    origin="https://app.contoso.com",
    display_name="Ada",
    lobby_timeout_s=30.0,
    culture="en-US",
    user_agent="anonjoin-test",
)
REJOIN = RejoinPolicy(attempts=3, wait_initial=0.5, wait_max=4.0, jitter=0.0, min_psat_lifetime_s=60.0)


class Clock:
    """The conversation's time, moved by hand in milliseconds."""

    def __init__(self) -> None:
        self.ms = 0

    @property
    def s(self) -> float:
        return self.ms / 1000.0

    def advance(self, ms: int) -> float:
        self.ms += ms
        return self.s


@dataclass
class Resp:
    status: int = 200
    url: URL = BASE
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    correlation_id: str | None = None


def body(d: dict[str, Any]) -> bytes:
    return json.dumps(d).encode()


def grant(lifetime_s: float | None = 3600.0, token: str = "psat=one") -> GuestGrant:
    return GuestGrant(
        token=token,
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
        discover_url="https://pool.contoso.com/ucwa/psanon/v1/discover?psat%3done",
        application_session_id=SPEC.application_session_id,
        meeting_url=SPEC.meeting_url,
        conference_id=CONF,
        lifetime_s=lifetime_s,
    )


DISCOVER = Resp(body=body({"_links": {"anonApplications": {"href": "/ucwa/psanon/v1/applications"}}}))
APP = Resp(
    status=201,
    body=body(
        {
            "_links": {
                "self": {"href": "/ucwa/psanon/v1/applications/a1"},
                "events": {"href": "/a1/events?ack=1"},
            },
            "_embedded": {"communication": {"_links": {"joinOnlineMeeting": {"href": "/a1/invite"}}}},
        }
    ),
)
INVITED = Resp(status=201, headers={"Location": "/a1/invitations/1"})


def ev(rel: str, type_: str, **kw: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"link": {"rel": rel, "href": f"/x/{rel}"}, "type": type_}
    if "state" in kw:
        e["_embedded"] = {rel: {"state": kw["state"]}}
    if "subcode" in kw:
        e["reason"] = {"code": "Gone", "subcode": kw["subcode"]}
    if "status" in kw:
        e["status"] = kw["status"]
    return e


def events(*evs: dict[str, Any], nxt: str | None = "/a1/events?ack=2") -> Resp:
    links = {"next": {"href": nxt}} if nxt else {}
    return Resp(body=body({"_links": links, "sender": [{"rel": "communication", "events": list(evs)}]}))


SUCCESS = ev("onlineMeetingInvitation", "completed", status="Success")


def conversation(rejoin: RejoinPolicy = REJOIN, deadline_s: float = 60.0) -> Conversation:
    return Conversation(
        SPEC, guest_deadline_s=deadline_s, leave_deadline_s=10.0, rejoin=rejoin, rng=random.Random(1)
    )


def send(c: Conversation, clock: Clock, resp: Resp) -> Send:
    act = c.next_action(clock.s)
    assert isinstance(act, Send), act
    c.on_response(act, resp)
    return act


def poll(c: Conversation, clock: Clock, resp: Resp, took_ms: int = 20) -> list[Any]:
    act = c.next_action(clock.s)
    assert isinstance(act, Poll), act
    b, _url, _wait, _special = c.poll_answered(resp, took_ms / 1000.0)
    return c.on_poll(b, clock.advance(took_ms), wall=1e9)


def to_connecting(c: Conversation, clock: Clock, lifetime_s: float | None = 3600.0) -> None:
    act = c.next_action(clock.s)
    assert isinstance(act, Mint) and act.meeting_url == SPEC.meeting_url
    c.on_granted(grant(lifetime_s), clock.advance(5))
    send(c, clock, DISCOVER)
    send(c, clock, APP)
    send(c, clock, INVITED)
    assert c.state is GuestState.CONNECTING


def joined(rejoin: RejoinPolicy = REJOIN, lifetime_s: float | None = 3600.0) -> tuple[Conversation, Clock]:
    c, clock = conversation(rejoin), Clock()
    c.start(clock.s)
    to_connecting(c, clock, lifetime_s)
    poll(c, clock, events(SUCCESS))
    assert c.state is GuestState.JOINED
    return c, clock


def se(status: int, subcode: str | None = None, step: str = "events") -> ServiceError:
    return ServiceError(step=step, status=status, subcode=subcode)


# --- the way in --------------------------------------------------------------------------------------------


def test_a_join_asks_for_each_request_with_its_body_and_headers() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    mint = c.next_action(clock.s)
    assert mint == Mint(SPEC.meeting_url, 0.0, 60.0)
    c.on_granted(grant(), clock.advance(12))
    discover = send(c, clock, DISCOVER)
    assert (discover.step, discover.method) == ("anon_discover", "GET")
    assert str(discover.url) == grant().discover_url  # opaque: not re-quoted
    assert dict(discover.headers) == {"Origin": SPEC.origin}  # no psat in a header: it is in the URL
    create = send(c, clock, APP)
    assert create.headers["Authorization"] == "Bearer psat=one"
    assert json.loads(create.body or b"") == {
        "anonymousDisplayName": "Ada", "culture": "en-US", "userAgent": "anonjoin-test",
    }  # fmt: skip
    assert c.app_url == BASE and not c.app_unknown
    invite = send(c, clock, INVITED)
    sent = json.loads(invite.body or b"")
    assert sent["onlineMeetingUri"] == CONF and len(sent["operationId"]) == 32
    assert invite.url == BASE.join(URL("/a1/invite"))
    effects = poll(c, clock, events(SUCCESS), took_ms=30)
    assert [type(e) for e in effects] == [Publish, Emit, Joined]
    assert effects[1] == Emit("joined")
    result = c.result
    assert result is not None and result.duration_s == pytest.approx(0.042)  # 12 ms + 30 ms of clock
    assert c.conference_id == CONF


def test_an_invitation_without_location_is_a_protocol_error() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    c.on_granted(grant(), clock.s)
    send(c, clock, DISCOVER)
    send(c, clock, APP)
    with pytest.raises(ProtocolError):
        send(c, clock, Resp(status=201))


def test_a_create_whose_answer_is_unreadable_is_named_by_its_location() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    c.on_granted(grant(), clock.s)
    send(c, clock, DISCOVER)
    act = c.next_action(clock.s)
    assert isinstance(act, Send) and c.app_unknown
    with pytest.raises(ProtocolError):
        c.on_response(act, Resp(status=201, body=b"not json", headers={"Location": "/a1"}))
    assert c.app_url == BASE.join(URL("/a1")) and not c.app_unknown


@pytest.mark.parametrize(
    ("error", "unknown"), [(se(503, step="anon_applications"), False), (MaybeSentError("cut"), True)]
)
def test_a_create_that_failed_may_or_may_not_have_made_one(error: Exception, unknown: bool) -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    c.on_granted(grant(), clock.s)
    send(c, clock, DISCOVER)
    c.next_action(clock.s)
    c.create_failed(error)
    assert c.app_unknown is unknown  # a 503 made none; a cut answer may have


# --- the recovery ladder: restarts keep or renew the deadline, and have a budget ------------------------


def test_a_step_out_of_retries_starts_over_after_a_growing_backoff_within_the_budget() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    waits = []
    for _ in range(REJOIN.attempts):
        c.on_granted(grant(), clock.advance(10))
        rec = c.on_failure("anon_discover", se(503, step="anon_discover"), clock.advance(10))
        assert rec.restart and c.state is GuestState.REJOINING
        waits.append(None if rec.wait_until is None else round(rec.wait_until - clock.s, 3))
        if rec.wait_until is not None:
            clock.ms = round(rec.wait_until * 1000)
        act = c.next_action(clock.s)
        assert isinstance(act, Mint) and act.deadline_at == 60.0  # a first join keeps its deadline
    assert waits == [None, 0.5, 1.0]  # the first at once, then RejoinPolicy's backoff
    c.on_granted(grant(), clock.advance(10))
    rec = c.on_failure("anon_discover", se(503, step="anon_discover"), clock.advance(10))
    assert c.state is GuestState.FAILED and not rec.restart  # the budget is spent
    assert isinstance(c.error, JoinFailed) and c.error.reason == "HTTP503"


def test_past_the_deadline_a_transport_failure_is_a_join_timeout() -> None:
    c, clock = conversation(deadline_s=1.0), Clock()
    c.start(clock.s)
    c.on_granted(grant(), clock.advance(10))
    clock.advance(1000)
    c.on_failure("anon_discover", MaybeSentError("cut", step="anon_discover"), clock.s)
    assert c.state is GuestState.FAILED
    assert isinstance(c.error, JoinFailed) and c.error.reason == "JoinTimeout"


def test_a_gone_application_is_recreated_with_the_psat_in_hand() -> None:
    c, clock = joined()
    rec = c.on_failure("events", se(404, "ApplicationNotFound"), clock.advance(100))
    assert c.state is GuestState.CREATING and rec.effects == (Emit("rejoining", "ApplicationNotFound"),)
    assert c.events_url is None and c.app_url == BASE  # still the one to delete until a new one replaces it
    act = c.next_action(clock.s)
    assert isinstance(act, Send) and act.step == "anon_applications"


def test_a_meeting_no_longer_found_after_the_guest_was_in_it_has_ended() -> None:
    c, clock = joined()
    c.on_failure("events", se(404, "ApplicationNotFound"), clock.s)
    c.on_failure("anon_applications", se(404, "DestinationNotFound", step="anon_applications"), clock.s)
    assert (c.state, c.m.reason, c.settle_error()) == (GuestState.ENDED, "Ended", None)


def test_a_meeting_not_found_on_the_first_join_fails() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    c.on_failure("anon_tokens", se(404, "DestinationNotFound", step="anon_tokens"), clock.s)
    assert c.state is GuestState.FAILED
    assert isinstance(c.error, JoinFailed) and c.error.reason == "DestinationNotFound"


def test_another_poller_taking_over_leaves_without_deleting() -> None:
    c, clock = joined()
    c.on_failure("events", se(409, "PGetReplaced"), clock.s)
    assert c.state is GuestState.LEFT and c.replaced


# --- timers: expiry, lobby, deadline ---------------------------------------------------------------------


def test_the_psat_is_renewed_ahead_of_expiry_and_the_old_application_deleted() -> None:
    c, _clock = joined(lifetime_s=400.0)
    due, what = c.next_timer()
    assert what == "expiry" and due == pytest.approx(0.005 + 400.0 - 100.0)  # a quarter of its life ahead
    assert c.grant is not None and due is not None and c.psat_valid(c.grant, due)
    effects = c.on_timer("expiry", due or 0.0)
    assert effects == [DeleteApp(BASE, (due or 0.0) + 10.0), Emit("rejoining", "TokenExpiring")]
    assert c.state is GuestState.REJOINING and c.recoveries == 0  # routine: not a recovery
    act = c.next_action((due or 0.0) + 0.001)
    assert isinstance(act, Mint)
    assert act.deadline_at == pytest.approx((due or 0.0) + 60.0)  # a joined guest's rejoin: a new deadline


def test_an_expiry_before_the_guest_is_in_keeps_the_deadline() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    to_connecting(c, clock, lifetime_s=60.0)
    due, what = c.next_timer()
    assert what == "expiry" and due == pytest.approx(0.005 + 45.0)  # before the join's deadline
    c.on_timer("expiry", due or 0.0)
    assert c.state is GuestState.REJOINING
    assert c.deadline_at == 60.0  # kept: such restarts are bounded by the attempt they interrupt


def test_psats_are_never_minted_closer_together_than_the_floor() -> None:
    c, _clock = joined(lifetime_s=400.0)
    due, _ = c.next_timer()
    c.on_timer("expiry", due or 0.0)
    first = c.last_mint_at
    act = c.next_action(due or 0.0)
    assert isinstance(act, Mint) and first == 0.0
    assert act.not_before == pytest.approx(due or 0.0)  # long after the first mint
    c.on_granted(grant(400.0), act.not_before)
    c.on_failure("anon_discover", se(503, step="anon_discover"), act.not_before + 0.01)
    again = c.next_action(act.not_before + 0.02)
    assert isinstance(again, Mint) and again.not_before == pytest.approx(act.not_before + C.REMINT_FLOOR_S)


def test_a_lobby_wait_is_bounded_by_the_lobby_timeout() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    to_connecting(c, clock)
    effects = poll(c, clock, events(ev("conversation", "updated", state="InLobby")))
    assert Emit("lobby") in effects and c.state is GuestState.LOBBY
    since = clock.s
    assert c.next_timer() == (since + 30.0, "lobby")  # the lobby timer, not the join deadline
    c.on_timer("lobby", since + 30.0)
    assert c.m.state is GuestState.FAILED and isinstance(c.error, JoinFailed)
    assert c.error.reason == "LobbyTimeout"


def test_admitted_from_the_lobby_counts_the_lobby_time() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    to_connecting(c, clock)
    poll(c, clock, events(ev("conversation", "updated", state="InLobby")))
    clock.advance(2500)
    poll(c, clock, events(SUCCESS), took_ms=10)
    assert c.result is not None and c.result.lobby_s == pytest.approx(2.51)


def test_an_invitation_that_never_completes_times_out_at_the_deadline() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    to_connecting(c, clock)
    assert c.next_timer() == (60.0, "deadline")
    c.on_timer("deadline", 60.0)
    assert c.state is GuestState.FAILED and c.m.reason == "JoinTimeout"


# --- drops -----------------------------------------------------------------------------------------------


def test_a_drop_rejoins_as_the_same_guest() -> None:
    c, clock = joined()
    effects = poll(c, clock, events(ev("conversation", "deleted", subcode="Removed")))
    assert [e for e in effects if isinstance(e, Emit)] == [
        Emit("dropped", "Removed"),
        Emit("rejoining", "Removed"),
    ]
    assert c.state is GuestState.REJOINING and c.recoveries == 1
    to_connecting(c, clock)
    poll(c, clock, events(SUCCESS))
    assert c.rejoins == 1 and c.recoveries == 0 and c.result is not None and c.result.rejoin


def test_a_drop_without_rejoins_fails_the_guest() -> None:
    c, clock = joined(RejoinPolicy(on_drop=False))
    poll(c, clock, events(ev("conversation", "deleted", subcode="Ejected")))
    assert c.state is GuestState.FAILED and isinstance(c.error, JoinFailed) and c.error.reason == "Ejected"


def test_a_drop_while_waiting_is_settled_by_the_invitation() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    to_connecting(c, clock)
    poll(c, clock, events(ev("conversation", "deleted", subcode="Removed")))
    assert c.state is GuestState.CONNECTING


def test_the_meeting_ending_is_final_not_a_failure() -> None:
    c, clock = joined()
    poll(c, clock, events(ev("conversation", "deleted", subcode="Ended")))
    assert c.state is GuestState.ENDED and c.settle_error() is None


# --- leaving: which psat -----------------------------------------------------------------------------------


def test_leaving_uses_the_guests_psat_while_valid_then_asks_for_a_new_one() -> None:
    c, clock = joined(lifetime_s=400.0)
    mine = c.grant
    assert mine is not None
    assert c.leave_psat(None, clock.s) is mine
    assert c.leave_psat(mine, clock.s) is None  # refused with a 401: mint a new one
    late = 0.005 + 400.0 - C.PSAT_SKEW_S
    assert c.leave_psat(None, late) is None  # expired, as bounded (skew margin included)
    fresh = grant(400.0, token="psat=leave")
    c.on_leave_grant(fresh, late)
    assert c.leave_psat(None, late + 1) is fresh and c.grant is mine  # never the guest's own


def test_a_psat_with_a_suspect_expiry_is_taken_to_live_at_least_the_floor() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    g = grant(lifetime_s=None)  # no usable expiryTime
    c.on_granted(g, clock.s)
    assert c.psat_valid(g, 59.0) and not c.psat_valid(g, 60.0)  # min_psat_lifetime_s


def test_psats_that_keep_coming_with_a_suspect_expiry_exhaust_the_budget() -> None:
    c, clock = conversation(), Clock()
    c.start(clock.s)
    with pytest.raises(JoinFailed) as info:
        for _ in range(REJOIN.attempts + 2):
            c.m.state = GuestState.MINTING
            c.on_granted(grant(lifetime_s=1.0), clock.advance(1000))
    assert info.value.reason == "BadExpiry"


def run_leave(c: Conversation, clock: Clock, answers: list[object], **kw: Any) -> list[Mint | Send]:
    """Drive :meth:`Conversation.leave_requests`: each request gets the next answer (an exception is
    thrown in); returns the requests it made."""
    steps = c.leave_requests(clock.s + 10.0, lambda: clock.s, **kw)
    made: list[Mint | Send] = []
    answer: object = None
    try:
        while True:
            act = steps.throw(answer) if isinstance(answer, BaseException) else steps.send(answer)
            made.append(act)
            answer = answers.pop(0)
            clock.advance(5)
    except StopIteration:
        pass
    assert not answers, answers
    return made


DELETED = Resp(status=204)


def test_leaving_deletes_with_the_guests_psat() -> None:
    c, clock = joined()
    (delete,) = run_leave(c, clock, [DELETED])
    assert isinstance(delete, Send) and (delete.step, delete.method, delete.url) == (
        "delete_application",
        "DELETE",
        BASE,
    )
    assert delete.headers["Authorization"] == "Bearer psat=one"
    assert c.app_url is None


def test_an_expired_psat_is_minted_again_and_without_the_meeting_once_it_is_gone() -> None:
    c, clock = joined(lifetime_s=400.0)
    clock.ms = 400_000  # the guest's psat has run out
    gone = se(404, "DestinationNotFound", step="anon_tokens")
    made = run_leave(c, clock, [gone, grant(400.0, token="psat=leave"), DELETED])
    assert [type(m) for m in made] == [Mint, Mint, Send]
    assert isinstance(made[0], Mint) and made[0].meeting_url == SPEC.meeting_url
    assert isinstance(made[1], Mint) and made[1].meeting_url is None  # the guest's identity alone
    assert isinstance(made[2], Send) and made[2].headers["Authorization"] == "Bearer psat=leave"
    assert c.grant is not None and c.grant.token == "psat=one"  # never the guest's own


def test_a_delete_refused_with_401_is_sent_again_with_a_fresh_psat() -> None:
    c, clock = joined()
    made = run_leave(c, clock, [se(401, step="delete_application"), grant(token="psat=two"), DELETED])
    assert [type(m) for m in made] == [Send, Mint, Send]
    assert isinstance(made[2], Send) and made[2].headers["Authorization"] == "Bearer psat=two"
    assert c.app_url is None


def test_a_delete_refused_otherwise_is_given_up_within_the_budget() -> None:
    c, clock = joined()
    made = run_leave(c, clock, [se(403, step="delete_application")])
    assert len(made) == 1 and c.app_url == BASE  # not deleted, and not retried here


def test_an_application_made_unnamed_is_evicted_then_its_successor_deleted() -> None:
    c, clock = joined()
    c.create_request()  # a create in flight whose answer never came
    assert c.app_unknown
    made = run_leave(c, clock, [APP, DELETED])
    assert [m.step for m in made if isinstance(m, Send)] == ["anon_applications", "delete_application"]
    assert not c.app_unknown and c.app_url is None


def test_a_background_delete_never_mints() -> None:
    c, clock = joined(lifetime_s=400.0)
    clock.ms = 400_000
    assert run_leave(c, clock, [], delete=BASE, mint=False) == []


def test_the_leave_budget_is_set_once() -> None:
    c, _clock = joined()
    assert c.cleanup_deadline(5.0) == 15.0
    assert c.cleanup_deadline(9.0) == 15.0  # a cleanup started again does not renew it


def test_no_recovery_once_the_caller_leaves() -> None:
    c, clock = joined()
    c.leave()
    c.on_failure("events", se(404, "ApplicationNotFound"), clock.s)
    assert c.state is GuestState.FAILED


def test_a_join_waiting_when_the_guest_closes_raises_its_error_or_how_it_ended() -> None:
    c, _ = joined()
    c.stop()
    c.deleted()
    left = c.outcome(None)
    err = Conversation.join_error(left)
    assert left.kind == "left" and isinstance(err, JoinFailed) and err.reason == (left.reason or "Left")
    failed = JoinFailed("LobbyTimeout", "not admitted")
    assert Conversation.join_error(c.outcome(failed)) is failed


def test_a_join_asked_of_a_closed_guest_is_named_by_its_reason_else_its_state() -> None:
    c = conversation()
    c.leave()
    c.left_unstarted()
    err = c.closed_error()
    assert isinstance(err, JoinFailed) and err.reason == (c.m.reason or c.state.value)
    assert c.state is GuestState.LEFT


def test_an_event_poll_is_bounded_by_two_attempts_and_one_step_not_the_guest_deadline() -> None:
    c, clock = joined()
    url = BASE / "events"
    assert c.poll_request(url).deadline_at is None
    bounded = c.poll_request(url, now=clock.advance(5), step_deadline_s=20.0)
    assert bounded.step == "events" and bounded.method == "GET"
    assert bounded.deadline_at == pytest.approx(
        clock.s + 2 * (C.POLL_TIMEOUT_S + C.POLL_TIMEOUT_MARGIN_S) + 20.0
    )
