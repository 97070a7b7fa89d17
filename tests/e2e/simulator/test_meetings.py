"""Meetings: lobby admit/deny, meeting end, eject, drop, capacity, and the fault profile's schedules."""

from __future__ import annotations

import asyncio
from typing import Any

from anonjoin.simulator import FaultProfile, Simulator

from support.walk import Walk, kinds

LEAVE = [("conversation", "updated"), ("localParticipant", "deleted"), ("conversation", "deleted")]


async def test_lobby_admits_after_the_delay(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(lobby="admit", lobby_delay_s=0.05) as sim, open_walk(sim) as walk:
        guest = await walk.join()
        meeting = sim.snapshot()["meetings"][sim.info.conference_id]
        assert meeting["lobby"] == [guest.asi] and meeting["roster"] == []
        events = await guest.events_until("onlineMeetingInvitation", "completed")
        assert kinds(events)[:2] == [("onlineMeetingInvitation", "started"), ("conversation", "added")]
        assert events[1]["_embedded"]["conversation"]["state"] == "InLobby"
        assert events[0]["_embedded"]["onlineMeetingInvitation"]["state"] == "Connecting"
        assert events[-1]["status"] == "Success"
        meeting = sim.snapshot()["meetings"][sim.info.conference_id]
        assert meeting["lobby"] == [] and meeting["roster"] == [guest.asi]


async def test_lobby_denial_is_failure_denied(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(lobby="deny", lobby_delay_s=0.01) as sim, open_walk(sim) as walk:
        guest = await walk.join()
        events = await guest.events_until("conversation", "deleted")
        completed = next(e for e in events if e["type"] == "completed")
        assert completed["status"] == "Failure"
        assert completed["reason"]["subcode"] == "Denied"
        assert sim.snapshot()["meetings"][sim.info.conference_id]["roster"] == []


async def _joined(walk: Walk) -> Any:
    guest = await walk.join()
    await guest.events_until("onlineMeetingInvitation", "completed")
    return guest


async def test_meeting_end_reaches_every_guest(sim: Simulator, walk: Walk) -> None:
    guests = [await _joined(walk) for _ in range(3)]
    assert sim.end_meeting(sim.info.conference_id)
    for guest in guests:
        events = await guest.events_until("conversation", "deleted")
        assert kinds(events) == LEAVE
        assert events[0]["_embedded"]["conversation"]["state"] == "Disconnected"
        assert events[0]["reason"]["subcode"] == "Ended"
    meeting = sim.snapshot()["meetings"][sim.info.conference_id]
    assert meeting["ended"] and meeting["roster"] == []
    assert not sim.end_meeting("NOSUCHID")


async def test_eject_and_drop(sim: Simulator, walk: Walk) -> None:
    ejected, dropped = await _joined(walk), await _joined(walk)
    assert sim.eject_guest(ejected.asi)
    events = await ejected.events_until("conversation", "deleted")
    assert kinds(events) == LEAVE and events[0]["reason"]["subcode"] == "Ejected"
    assert sim.drop_guest(dropped.asi)
    events = await dropped.events_until("conversation", "deleted")
    assert kinds(events) == LEAVE and "reason" not in events[0]
    assert events[0]["_embedded"]["conversation"]["state"] == "Disconnected"
    assert sim.snapshot()["meetings"][sim.info.conference_id]["roster"] == []
    assert not sim.drop_guest(dropped.asi)  # not in a meeting any more
    # The application is still alive: the same guest can join again.
    again = await walk.join(asi=dropped.asi)
    assert (await again.events_until("onlineMeetingInvitation", "completed"))[-1]["status"] == "Success"


async def test_a_full_meeting_fails_with_too_many_participants(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(max_participants=1) as sim, open_walk(sim) as walk:
        await _joined(walk)
        second = await walk.join()
        events = await second.events_until("onlineMeetingInvitation", "completed")
        assert events[-1]["status"] == "Failure"
        assert events[-1]["reason"]["subcode"] == "TooManyParticipants"


async def test_profile_schedules_drops_and_ejections(sim_factory: Any, open_walk: Any) -> None:
    dropping = FaultProfile(drop_rate=1.0, drop_after_s=(0.01, 0.02))
    async with sim_factory(faults=dropping) as sim, open_walk(sim) as walk:
        guest = await _joined(walk)
        events = await guest.events_until("conversation", "deleted")
        assert kinds(events) == LEAVE and "reason" not in events[0]
    ejecting = FaultProfile(eject_rate=1.0, eject_after_s=(0.01, 0.02))
    async with sim_factory(faults=ejecting) as sim, open_walk(sim) as walk:
        guest = await _joined(walk)
        events = await guest.events_until("conversation", "deleted")
        assert events[0]["reason"]["subcode"] == "Ejected"


async def test_profile_ends_the_default_meeting(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(faults=FaultProfile(end_meeting_after_s=0.2)) as sim, open_walk(sim) as walk:
        guest = await walk.join()
        events = await guest.events_until("conversation", "deleted")
        assert any(e.get("reason", {}).get("subcode") == "Ended" for e in events)
        assert sim.snapshot()["meetings"][sim.info.conference_id]["ended"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_psat_ttl_from_the_profile_and_expiry(sim_factory: Any, open_walk: Any) -> None:
    clock = FakeClock()
    async with sim_factory(faults=FaultProfile(psat_ttl_s=30), clock=clock) as sim, open_walk(sim) as walk:
        guest = await walk.guest("asi-ttl")
        import jwt

        claims = jwt.decode(guest.psat[5:], options={"verify_signature": False})
        assert claims["exp"] - claims["nbf"] == 30
        await guest.create_app()
        clock.now += 60
        r = await guest.poll()
        assert r.status == 401
        # A fresh psat with the same applicationSessionId works again (and evicts the old application).
        fresh = await walk.join(asi="asi-ttl")
        events = await fresh.events_until("onlineMeetingInvitation", "completed")
        assert events[-1]["status"] == "Success"


async def test_many_guests_join_concurrently(sim: Simulator, walk: Walk) -> None:
    guests = await asyncio.gather(*(walk.join() for _ in range(20)))
    await asyncio.gather(*(g.events_until("onlineMeetingInvitation", "completed") for g in guests))
    roster = sim.snapshot()["meetings"][sim.info.conference_id]["roster"]
    assert sorted(roster) == sorted(g.asi for g in guests)
