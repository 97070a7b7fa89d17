"""Leaving leaves nothing live (issue 6), checked in the simulator's own record.

Each test forces one way an application used to be left behind (traced in the chaos suite): a DELETE with an
expired psat (401), a leave while a rejoin's create is in flight, a create that may or may not have
happened, a meeting that ends while the guest rejoins, a psat that expired in a meeting that ended. The
simulator's clock is moved forward to expire a psat at once; faults and admin actions set up the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import Callable

import pytest

from anonjoin import ConfigurationError, GuestState, Hooks, StepEvent
from anonjoin.simulator import Simulator
from anonjoin.simulator._tokens import LEEWAY_S

from support.policies import CLIENT_REJOIN, CLIENT_RETRY
from support.simulator import client_for, live_apps, rule, timeline
from support.tasks import our_tasks

SimFactory = Callable[..., Simulator]
PSAT_TTL_S = 60.0
PAST_EXPIRY_S = PSAT_TTL_S + LEEWAY_S + 5.0
# No rejoin in the middle of a test: the psat timer is far away, and a rejoin after a failure waits long.
SLOW_REJOIN = dataclasses.replace(CLIENT_REJOIN, wait_initial=30.0, wait_max=30.0)


class SimClock:
    """The simulator's wall clock, which a test moves forward (the client keeps the real one)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Steps:
    """Step events as they happen, and a way to wait for one."""

    def __init__(self) -> None:
        self.seen: list[StepEvent] = []
        self._waiters: list[tuple[Callable[[StepEvent], bool], asyncio.Event]] = []
        self.on_end: Callable[[StepEvent], None] | None = None

    def __call__(self, ev: StepEvent) -> None:
        self.seen.append(ev)
        if ev.phase == "end" and self.on_end is not None:
            self.on_end(ev)
        for match, event in self._waiters:
            if match(ev):
                event.set()

    def when(self, match: Callable[[StepEvent], bool]) -> asyncio.Event:
        event = asyncio.Event()
        self._waiters.append((match, event))
        return event


def after_join(sim: Simulator, asi: str) -> list[tuple[str, int]]:
    """The guest's requests after its (first) invitation was accepted, polls left out."""
    t = timeline(sim, asi)
    start = next(i for i, (route, _) in enumerate(t) if route == "invitations")
    return [e for e in t[start + 1 :] if e[0] != "events"]


def created(sim: Simulator, asi: str) -> int:
    return int(sim.snapshot()["applications"]["created_by_asi"].get(asi, 0))


async def wait(event: asyncio.Event, what: str, within: float = 10.0) -> None:
    try:
        await asyncio.wait_for(event.wait(), within)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_delete_with_an_expired_psat_mints_a_fresh_one_and_deletes(sim_factory: SimFactory) -> None:
    """guest-0024: the DELETE got 401 (psat expired) and the client gave up. Now a 401 on the DELETE gets a
    new psat for the same applicationSessionId and the DELETE again, through 503s with Retry-After."""
    clock = SimClock()
    steps = Steps()
    async with (
        sim_factory(psat_ttl_s=PSAT_TTL_S, clock=clock) as sim,
        client_for(sim, hooks=Hooks(on_step=steps)) as client,
    ):
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        asi = g.application_session_id
        sim.set_faults(rule("delete_application", "503", retry_after=0.05))

        def faults_off(ev: StepEvent) -> None:  # more 503s than RetryPolicy.attempts, then none
            if (
                ev.step == "delete_application"
                and ev.status == 503
                and ev.attempt == CLIENT_RETRY.attempts + 1
            ):
                sim.set_faults("none")

        steps.on_end = faults_off
        clock.offset = PAST_EXPIRY_S  # the guest's psat has expired (the client does not know it yet)
        await g.leave()
        assert g.state is GuestState.LEFT
        assert after_join(sim, asi) == [
            *[("delete_application", 503)] * (CLIENT_RETRY.attempts + 1),
            ("delete_application", 401),
            ("anon_tokens", 200),
            ("delete_application", 204),
        ]
        assert live_apps(sim) == 0
        snap = sim.snapshot()
        hits = [e for e in snap["guests"][asi] if e["route"] == "delete_application"]
        for a, b in itertools.pairwise(hits):  # never before the Retry-After it was given
            if a["retry_after"]:
                assert b["t"] - a["t"] >= a["retry_after"] - 0.01
    assert our_tasks() == []


async def test_leave_while_a_rejoin_creates_deletes_the_new_application(sim_factory: SimFactory) -> None:
    """guest-0178: the leave came while the rejoin's anonApplications POST was in flight; the new
    application was made and never deleted. Now the POST's answer is awaited and that application deleted."""
    steps = Steps()
    async with sim_factory() as sim, client_for(sim, hooks=Hooks(on_step=steps)) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        asi = g.application_session_id
        sim.set_faults(rule("anon_applications", "latency", latency_s=0.5))  # the create stays in flight
        creating = steps.when(lambda ev: ev.step == "anon_applications" and ev.phase == "start")
        assert sim.drop_guest(asi)
        await wait(creating, "the rejoin's create")
        await g.leave()
        assert g.state is GuestState.LEFT
        assert created(sim, asi) == 2
        assert live_apps(sim) == 0
        assert sim.snapshot()["requests"]["delete_application"] == {"204": 1}
    assert our_tasks() == []


async def test_leave_after_a_maybe_sent_create_evicts_and_deletes(sim_factory: SimFactory) -> None:
    """A rejoin's create whose connection closed mid-response (MaybeSentError): an application may exist
    that the guest cannot name. Leaving before the recreate creates one more (which evicts it) and deletes
    that one."""
    steps = Steps()
    async with (
        sim_factory() as sim,
        client_for(sim, hooks=Hooks(on_step=steps), rejoin=SLOW_REJOIN) as client,
    ):
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        asi = g.application_session_id
        sim.set_faults(rule("anon_applications", "close"))
        cut = steps.when(lambda ev: ev.step == "anon_applications" and ev.outcome == "error")
        assert sim.drop_guest(asi)
        await wait(cut, "the create cut mid-response")
        sim.set_faults("none")
        await g.leave()  # the guest waits before recreating: the leave comes first
        assert g.state is GuestState.LEFT
        # the join's, and one more that evicts whatever the cut create made (the simulator's "close" fault
        # cuts the connection before creating; a real service may have created it)
        assert created(sim, asi) == 2
        assert live_apps(sim) == 0
        assert sim.snapshot()["requests"]["delete_application"] == {"204": 1}
    assert our_tasks() == []


async def test_meeting_ends_during_a_rejoin_the_old_application_is_deleted(sim_factory: SimFactory) -> None:
    """LOAD_FINDINGS 7: dropped, the guest rejoins; the meeting ends meanwhile and the rejoin's token
    request gets 404. The guest ends "ended", and still deletes the application it had."""
    steps = Steps()
    async with sim_factory() as sim, client_for(sim, hooks=Hooks(on_step=steps)) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        asi = g.application_session_id
        sim.set_faults(rule("anon_tokens", "latency", latency_s=0.3))
        minting = steps.when(lambda ev: ev.step == "anon_tokens" and ev.phase == "start")
        assert sim.drop_guest(asi)
        await wait(minting, "the rejoin's token request")
        assert sim.end_meeting(sim.info.conference_id)
        out = await asyncio.wait_for(g.wait_closed(), 10)
        assert (out.kind, out.reason) == ("ended", "Ended")
        assert after_join(sim, asi)[-2:] == [("anon_tokens", 404), ("delete_application", 204)]
        assert live_apps(sim) == 0
    assert our_tasks() == []


async def test_meeting_ended_and_psat_expired_deletes_with_a_psat_without_meeting(
    sim_factory: SimFactory,
) -> None:
    """The meeting ended and the guest's psat expired before its DELETE: no psat can be minted for the
    meeting any more, so the DELETE gets one for the guest's identity alone (same applicationSessionId)."""
    clock = SimClock()
    async with sim_factory(psat_ttl_s=PSAT_TTL_S, clock=clock) as sim, client_for(sim) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        asi = g.application_session_id
        clock.offset = PAST_EXPIRY_S
        assert sim.end_meeting(sim.info.conference_id)
        out = await asyncio.wait_for(g.wait_closed(), 10)
        assert (out.kind, out.reason) == ("ended", "Ended")
        # (the guest learns of the end from its poll, or from a rejoin after its poll got 401)
        assert after_join(sim, asi)[-4:] == [
            ("delete_application", 401),
            ("anon_tokens", 404),  # the meeting is gone
            ("anon_tokens", 200),  # no meetingUrl: the guest's identity only
            ("delete_application", 204),
        ]
        assert live_apps(sim) == 0
    assert our_tasks() == []


async def test_leave_during_the_cleanup_of_an_ended_guest_lets_it_finish(sim_factory: SimFactory) -> None:
    """chaos guest-0109: the meeting ended, the guest was deleting its application (through 503s), and the
    load runner's leave() cancelled that cleanup: the application stayed live and the guest never closed.
    Now leave() waits for the (bounded) cleanup instead."""
    steps = Steps()
    async with sim_factory() as sim, client_for(sim, hooks=Hooks(on_step=steps)) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        asi = g.application_session_id
        sim.set_faults(rule("delete_application", "503", retry_after=0.2))
        retrying = steps.when(lambda ev: ev.step == "delete_application" and ev.outcome == "retry")

        def faults_off(ev: StepEvent) -> None:
            if ev.step == "delete_application" and ev.attempt == 2:
                sim.set_faults("none")

        steps.on_end = faults_off
        assert sim.end_meeting(sim.info.conference_id)
        await wait(retrying, "the ended guest's DELETE")
        await g.leave()
        out = await asyncio.wait_for(g.wait_closed(), 1)
        assert (out.kind, out.reason) == ("ended", "Ended")
        assert [s for r, s in after_join(sim, asi) if r == "delete_application"] == [503, 503, 204]
        assert live_apps(sim) == 0
    assert our_tasks() == []


async def test_leave_has_one_budget_which_a_cancel_does_not_renew(sim_factory: SimFactory) -> None:
    """Leaving is bounded by ``RetryPolicy.leave_deadline_s`` as a whole: when leave() itself is cancelled
    in the middle of the DELETEs (a caller's own timeout), the cleanup that the cancel starts shares the
    deadline of the first instead of getting a new one. The application stays live (given up) and the guest
    is closed."""
    budget = 2.0
    retry = dataclasses.replace(CLIENT_RETRY, leave_deadline_s=budget)
    steps = Steps()
    async with sim_factory() as sim, client_for(sim, retry=retry, hooks=Hooks(on_step=steps)) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        sim.set_faults(rule("delete_application", "503", retry_after=0.3))
        late = steps.when(
            lambda ev: ev.step == "delete_application" and ev.phase == "end" and ev.attempt == 5
        )
        started = time.monotonic()
        leaving = asyncio.create_task(g.leave())
        await wait(late, "the fifth DELETE", within=budget * 2)
        leaving.cancel()
        await asyncio.gather(leaving, return_exceptions=True)
        out = await asyncio.wait_for(g.wait_closed(), budget * 2)
        took = time.monotonic() - started
        assert out.kind == "left"
        # one budget (plus a request in flight at its end); a renewed one would run to about 1.5 s + 2 s
        assert took < budget + 0.8, took
        assert live_apps(sim) == 1
    assert our_tasks() == []


def test_leave_deadline_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="leave_deadline_s"):
        dataclasses.replace(CLIENT_RETRY, leave_deadline_s=0)
