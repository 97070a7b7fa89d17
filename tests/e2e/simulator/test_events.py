"""The event channel: ack/next, replay, resync, PGetReplaced, timeouts and knobs, priorities, idle expiry."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from anonjoin.simulator import FaultProfile, Simulator
from anonjoin.simulator._events import Batch, Closed, Event, EventChannel, Priority, Resync

from support.walk import Walk

FAST = 0.001  # event_time_scale: the 180 s minimum timeout becomes 0.18 s


def _ack(href: str) -> int:
    return int(parse_qs(urlsplit(href).query)["ack"][0])


async def test_timeout_gives_an_empty_batch_with_self_and_next(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(event_time_scale=FAST) as sim, open_walk(sim) as walk:
        guest = await walk.guest("asi-empty")
        await guest.create_app()
        first = await guest.poll()
        assert first.status == 200
        assert set(first.body) == {"_links"} and set(first.body["_links"]) == {"self", "next"}
        assert _ack(first.body["_links"]["next"]["href"]) == 2


async def test_a_retried_poll_gets_the_same_batch_then_next_continues(sim: Simulator, walk: Walk) -> None:
    guest = await walk.join()
    first_url = guest.next_events
    first = await guest.poll()
    again = await guest.poll(first_url)
    assert again.status == 200 and again.body == first.body
    assert first.body["sender"][-1]["events"][-1]["type"] == "completed"
    assert _ack(guest.next_events) == 2
    assert sim.drop_guest(guest.asi)
    events = await guest.events_until("conversation", "deleted")
    assert [e["type"] for e in events] == ["updated", "deleted", "deleted"]


async def test_a_bad_ack_or_key_gets_resync(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(event_time_scale=FAST) as sim, open_walk(sim) as walk:
        guest = await walk.guest("asi-resync")
        await guest.create_app()
        url = guest.next_events
        for bad in (
            url.replace("ack=1", "ack=7"),
            url.replace("key=", "key=x"),
            url.replace("ack=1", "ack=z"),
        ):
            r = await guest.poll(bad)
            assert r.status == 200 and "next" not in r.body["_links"], bad
            resync = r.href("_links", "resync")
            assert _ack(resync) == 1
        followed = await guest.poll(resync)
        assert followed.status == 200 and "next" in followed.body["_links"]


async def test_a_second_poll_with_the_same_ack_replaces_the_first(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(event_time_scale=FAST) as sim, open_walk(sim) as walk:
        guest = await walk.guest("asi-pget")
        await guest.create_app()
        url = guest.next_events
        # Whichever arrives second replaces the other: one 409 PGetReplaced, one ordinary answer.
        replies = await asyncio.gather(guest.poll(url), guest.poll(url))
        assert sorted(r.status for r in replies) == [200, 409]
        replaced = next(r for r in replies if r.status == 409)
        assert replaced.body == {
            "code": "Conflict",
            "subcode": "PGetReplaced",
            "message": "Another poll with the same ack replaced this one.",
        }


async def test_timeout_knob_is_checked_and_remembered(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(event_time_scale=0.0002) as sim, open_walk(sim) as walk:  # 1800 s -> 0.36 s
        guest = await walk.guest("asi-knob")
        await guest.create_app()
        for bad in ("179", "1801", "soon"):
            r = await guest.poll(timeout=bad)
            assert r.status == 400 and r.body["subcode"] == "ParameterValidationFailure"
        for params in ({"timeout": "1800"}, {}):  # the second poll reuses the remembered knob
            started = time.perf_counter()
            assert (await guest.poll(**params)).status == 200
            assert time.perf_counter() - started >= 0.35
        started = time.perf_counter()
        assert (await guest.poll(timeout="180")).status == 200
        assert time.perf_counter() - started < 0.3


async def test_deleting_releases_a_parked_poll_with_404(walk: Walk) -> None:
    guest = await walk.join()
    await guest.events_until("onlineMeetingInvitation", "completed")
    parked = asyncio.ensure_future(guest.poll())
    assert (await guest.delete()).status == 204
    r = await asyncio.wait_for(parked, 5)
    assert r.status == 404 and r.body["subcode"] == "ApplicationNotFound"


async def test_idle_application_expires_with_410(sim_factory: Any, open_walk: Any) -> None:
    # A poll parked for 0.5 s keeps an application alive past its 0.2 s idle window; then, with no poll
    # parked, it expires.
    profile = FaultProfile(idle_expiry_s=0.2)
    async with sim_factory(event_time_scale=0.5 / 180, faults=profile) as sim, open_walk(sim) as walk:
        expired = asyncio.Event()
        state = sim.core.state
        original = state._expire

        def spy(gid: str) -> None:
            original(gid)
            expired.set()

        state._expire = spy
        guest = await walk.join()
        await guest.events_until("onlineMeetingInvitation", "completed")
        assert (await guest.poll()).status == 200  # parked 0.5 s, longer than the idle window
        assert not expired.is_set()
        await asyncio.wait_for(expired.wait(), 5)
        r = await guest.poll()
        assert r.status == 410 and r.body["subcode"] == "InactiveApplicationExpired"
        assert sim.snapshot()["meetings"][sim.info.conference_id]["roster"] == []
        assert sim.snapshot()["applications"]["gone"] == {"expired": 1}


# -- the channel alone -------------------------------------------------------------------------------
def _event(priority: Priority) -> Event:
    return Event("communication", "/c", {"link": {"rel": "x", "href": "/x"}, "type": "added"}, priority)


async def test_a_high_priority_event_releases_the_poll_at_once() -> None:
    channel = EventChannel("k", idle_s=60, on_idle=lambda: None, time_scale=0.01)  # timeout 1.8 s, low 0.15 s
    channel.set_knobs(None, "100", "100", None)  # low and medium: 1 s
    poll = asyncio.ensure_future(channel.poll(1, "k"))
    channel.push(_event(Priority.LOW))
    started = time.perf_counter()
    channel.push(_event(Priority.HIGH))
    result = await asyncio.wait_for(poll, 5)
    assert time.perf_counter() - started < 0.5
    assert isinstance(result, Batch) and len(result.events) == 2
    channel.close("deleted")


async def test_medium_events_are_aggregated_for_the_medium_delay() -> None:
    channel = EventChannel("k", idle_s=60, on_idle=lambda: None, time_scale=0.01)
    channel.set_knobs(None, None, "10", None)  # medium: 0.1 s
    started = time.perf_counter()
    poll = asyncio.ensure_future(channel.poll(1, "k"))
    channel.push(_event(Priority.MEDIUM))
    result = await asyncio.wait_for(poll, 5)
    elapsed = time.perf_counter() - started
    assert isinstance(result, Batch) and len(result.events) == 1
    assert 0.09 <= elapsed < 1.5
    channel.close("deleted")


async def test_closed_and_bad_polls() -> None:
    channel = EventChannel("k", idle_s=60, on_idle=lambda: None)
    assert await channel.poll(None, "k") == Resync(1)
    assert await channel.poll(1, "other") == Resync(1)
    channel.close("expired")
    assert await channel.poll(1, "k") == Closed("expired")


async def test_ten_thousand_parked_polls() -> None:
    channels = [EventChannel(str(i), idle_s=600, on_idle=lambda: None) for i in range(10_000)]
    polls = [asyncio.ensure_future(c.poll(1, c.key)) for c in channels]
    await asyncio.sleep(0)  # one loop turn: every poll runs up to its wait
    assert all(c.parked for c in channels)
    started = time.perf_counter()
    channels[1234].push(_event(Priority.HIGH))
    result = await asyncio.wait_for(polls[1234], 5)
    assert isinstance(result, Batch) and len(result.events) == 1
    assert time.perf_counter() - started < 0.5  # one wake-up, no scan
    assert sum(p.done() for p in polls) == 1
    for c in channels:
        c.close("shutdown")
    results = await asyncio.wait_for(asyncio.gather(*polls), 10)
    assert sum(isinstance(r, Closed) for r in results) == 9_999


async def test_the_idle_window_comes_from_the_config_then_the_profile_then_15_minutes(
    sim_factory: Any,
) -> None:
    async with sim_factory() as sim:
        assert sim.core.idle_s() == 900
    async with sim_factory(faults=FaultProfile(idle_expiry_s=5)) as sim:
        assert sim.core.idle_s() == 5
    async with sim_factory(faults=FaultProfile(idle_expiry_s=5), idle_expiry_s=7) as sim:
        assert sim.core.idle_s() == 7


async def test_a_poll_after_a_long_gap_gets_resume_and_knobs_are_reset(
    sim_factory: Any, open_walk: Any
) -> None:
    async with sim_factory(event_time_scale=FAST, event_resume_after_s=0.3) as sim, open_walk(sim) as walk:
        guest = await walk.guest("asi-resume")
        await guest.create_app()
        app = sim.core.state.app_for_asi("asi-resume")
        assert app is not None
        app.channel._last_seen -= 10  # as if the last poll ended 10 s ago
        r = await guest.poll(timeout="1800")
        assert r.status == 200 and set(r.body["_links"]) == {"self", "resume"}
        assert app.channel._knobs.timeout == 180  # reset
        followed = await guest.poll(r.href("_links", "resume"))
        assert followed.status == 200 and "next" in followed.body["_links"]
