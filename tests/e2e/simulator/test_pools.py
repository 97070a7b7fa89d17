"""``anonjoin simulate --pools 2`` as real processes: the protocol walk, variants, faults, admin, no orphans.

Each test starts the simulator through ``SimulatorProcess`` (a front door and two pool processes) and
drives it with the raw walker, as the in-process tests do.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import pytest

from anonjoin.simulator import FaultProfile, FaultRule, SimulatorProcess
from anonjoin.simulator._pools import merge_snapshots, pool_seed

from support.walk import JOIN_EVENTS, Walk, kinds, ssl_context

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs Linux pidfds")

EXIT_WITHIN_S = 15.0

Pools = Callable[..., AbstractAsyncContextManager[tuple[SimulatorProcess, Walk]]]


@asynccontextmanager
async def _pools(*args: str, pools: int = 2, setup: bool = True, **kw: Any) -> AsyncIterator[Any]:
    async with SimulatorProcess(pools=pools, args=args, **kw) as sim:
        connector = aiohttp.TCPConnector(ssl=ssl_context(sim.info), limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            walk = Walk(sim.info, session)
            if setup:
                await walk.sa_setup()
            yield sim, walk


@pytest.fixture
def pools() -> Pools:
    return _pools


def _wait_gone(pid: int, within: float = EXIT_WITHIN_S) -> bool:
    """True once process ``pid`` has ended (False if it is still running after ``within`` seconds)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], within)[0])
    finally:
        os.close(fd)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def test_the_whole_walk_across_the_front_door_and_a_pool(pools: Pools) -> None:
    async with pools() as (sim, walk):
        info = sim.info
        assert len(info.pids) == 3 and len(info.pool_urls) == 2 and info.pool_url == info.pool_urls[0]
        asi = "5a1c7b1e-0000-4000-8000-0000000000p1"
        guest = await walk.guest(asi)
        claims = jwt.decode(guest.psat.removeprefix("psat="), options={"verify_signature": False})
        assert claims["ucwaext"] == info.pool_urls[0] + "/ucwa/psanon/v1"  # the default meeting: pool 0
        assert _origin(guest.token_reply.href("_links", "discover")) == info.pool_urls[0]
        app = await guest.create_app("Ada")
        assert _origin(app.url) == info.pool_urls[0]
        assert (await guest.invite()).status == 201
        events = await guest.events_until("onlineMeetingInvitation", "completed")
        assert kinds(events) == JOIN_EVENTS and events[-1]["status"] == "Success"

        snap = await sim.snapshot()
        assert snap["meetings"][info.conference_id]["roster"] == [asi]
        assert snap["requests"]["anon_tokens"] == {"200": 1}  # the front door's
        assert snap["requests"]["anon_applications"] == {"201": 1}  # the pool's
        routes = [r["route"] for r in snap["guests"][asi]]
        assert routes[:3] == ["anon_tokens", "anon_discover", "anon_applications"]
        assert [(p["role"], p["pid"]) for p in snap["processes"]] == [
            ("front", info.pids[0]),
            ("pool", info.pids[1]),
            ("pool", info.pids[2]),
        ]
        assert (await guest.delete()).status == 204
        assert (await sim.snapshot())["applications"]["live"] == 0


async def test_meetings_spread_over_the_pools_and_end_through_the_front_door(pools: Pools) -> None:
    async with pools() as (sim, walk):
        info = sim.info
        status, meeting = await sim.admin("POST", "/meetings", {"subject": "second"})
        assert status == 201
        guest = await walk.guest("asi-second", meeting["meeting_url"])
        assert _origin(guest.token_reply.href("_links", "discover")) == info.pool_urls[1]
        await guest.create_app()
        assert (await guest.invite()).status == 201
        await guest.events_until("onlineMeetingInvitation", "completed")

        # adhocMeetings (the service application's own) go round robin too: the next one is pool 0's
        assert walk.capabilities is not None
        adhoc_url = walk.capabilities.href("_embedded", "adhocMeetings", "_links", "self")
        adhoc = await walk.call("POST", adhoc_url, json={"subject": "adhoc"}, headers=walk.sa_headers())
        assert adhoc.status == 201
        other = await walk.join("asi-adhoc", adhoc.body["joinUrl"])
        assert other.app is not None and _origin(other.app.url) == info.pool_urls[0]

        snap = await sim.snapshot()
        assert snap["meetings"][meeting["conference_id"]]["roster"] == ["asi-second"]
        status, _ = await sim.admin("POST", f"/meetings/{meeting['conference_id']}/end")
        assert status == 200
        ended = await guest.events_until("conversation", "deleted")
        assert ("conversation", "updated") in kinds(ended)
        again = await walk.mint("asi-late", meeting["meeting_url"])
        assert again.status == 404 and again.body["subcode"] == "DestinationNotFound"
        assert (await sim.admin("POST", "/meetings/NOSUCHID/end"))[0] == 404


async def test_admin_actions_reach_the_owning_pool_and_need_the_token(pools: Pools) -> None:
    async with pools() as (sim, walk):
        info = sim.info
        r = await walk.session.get(info.admin_url + "/state")
        assert r.status == 401
        r.release()
        guest = await walk.join("asi-drop")
        await guest.events_until("onlineMeetingInvitation", "completed")
        assert (await sim.admin("POST", "/guests/asi-drop/drop"))[0] == 200
        left = await guest.events_until("conversation", "deleted")
        assert ("localParticipant", "deleted") in kinds(left)
        assert (await sim.admin("POST", "/guests/nobody/eject"))[0] == 404


async def test_faults_set_through_the_front_door_apply_in_the_pools(pools: Pools) -> None:
    async with pools() as (sim, walk):
        profile = FaultProfile(rules=(FaultRule(route="anon_applications", kind="503", rate=1.0),))
        status, _ = await sim.admin("PUT", "/faults", profile.model_dump(mode="json"))
        assert status == 200
        guest = await walk.guest("asi-faulted")
        discover = await guest.discover()
        url = discover.href("_links", "anonApplications")
        r = await walk.call("POST", url, json={"culture": "en-US", "userAgent": "t"}, headers=guest.headers())
        assert r.status == 503
        assert (await sim.snapshot())["faults_injected"] == {"anon_applications": {"503": 1}}
        assert (await sim.admin("PUT", "/faults", {"name": "none"}))[0] == 200
        await guest.create_app()


async def test_a_named_profile_and_variants_run_in_every_process(pools: Pools) -> None:
    async with pools("--rel-prefix", "ms:rtc:saas:", "--date-format", "dotnet", faults="flaky", seed=3) as (
        sim,
        walk,
    ):
        assert walk.capabilities is not None
        assert "ms:rtc:saas:anonApplicationTokens" in walk.capabilities.body["_links"]
        assert (await sim.snapshot())["faults"] == "flaky"
        status, faults = await sim.admin("GET", "/faults")
        assert status == 200 and faults["name"] == "flaky"


async def test_307_to_the_pool_then_the_walk(pools: Pools) -> None:
    async with pools("--redirect", "applications,anon_tokens", setup=False) as (sim, walk):
        info = sim.info
        walk.aad_token = (await walk.get_aad_token()).body["access_token"]
        url = info.discover_url.replace("/discover", "/v1/applications") + "?endpointId=" + info.endpoint_id
        r = await walk.call("GET", url, headers=walk.sa_headers(), allow_redirects=False)
        assert r.status == 307 and r.headers["Location"].startswith(info.pool_url)
        followed = await walk.call("GET", r.headers["Location"], headers=walk.sa_headers())
        assert followed.status == 200
        walk.capabilities = await walk.call(
            "GET", followed.href("_links", "application"), headers=walk.sa_headers()
        )
        guest = await walk.join("asi-307")  # the mint follows its 307 to pool 0, which mints as well
        await guest.events_until("onlineMeetingInvitation", "completed")
        snap = await sim.snapshot()
        assert snap["requests"]["applications"] == {"307": 1, "200": 1}
        assert snap["meetings"][info.conference_id]["roster"] == ["asi-307"]


async def test_pinned_processes_run_on_their_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    async with SimulatorProcess(pools=2, pin=cpus) as sim:
        for i, pid in enumerate(sim.pids):
            assert os.sched_getaffinity(pid) == {cpus[i % len(cpus)]}


async def test_killing_the_front_door_takes_its_pools_down() -> None:
    sim = SimulatorProcess(pools=2)
    await sim.start()
    try:
        front, *pools_ = sim.pids
        os.kill(front, signal.SIGKILL)
        for pid in pools_:
            assert await asyncio.to_thread(_wait_gone, pid), f"pool process {pid} outlived its front door"
    finally:
        await sim.aclose()


async def test_a_lost_pool_stops_the_front_door() -> None:
    sim = SimulatorProcess(pools=2)
    await sim.start()
    try:
        front, pool, other = sim.pids
        os.kill(pool, signal.SIGKILL)
        assert await asyncio.to_thread(_wait_gone, front), "the front door kept running without a pool"
        assert await asyncio.to_thread(_wait_gone, other)
    finally:
        await sim.aclose()


async def test_stopping_leaves_no_process_behind() -> None:
    sim = SimulatorProcess(pools=2)
    await sim.start()
    pids = sim.pids
    await sim.aclose()
    for pid in pids:
        assert _wait_gone(pid, 0.0)


def test_the_sync_launcher_starts_and_stops_by_pid() -> None:
    with SimulatorProcess() as sim:  # one process for everything (--pools 1)
        (pid,) = sim.pids
        assert sim.info.pool_urls == (sim.info.pool_url,)
        assert b"simulate" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert _wait_gone(pid, 0.0)


def test_each_pool_has_its_own_stable_seed() -> None:
    seeds = {pool_seed(7, i) for i in range(4)}
    assert len(seeds) == 4
    assert pool_seed(7, 1) == pool_seed(7, 1) != pool_seed(8, 1)


def test_merged_snapshots_add_up() -> None:
    def part(roster: list[str], status: str, t: float) -> dict[str, Any]:
        return {
            "requests": {"events": {status: 1}},
            "faults_injected": {},
            "faults": "none",
            "meetings": {"M": {"conference_id": "M", "roster": roster, "lobby": [], "ended": False}},
            "applications": {"live": len(roster), "created": 1, "created_by_asi": {"a": 1}, "gone": {}},
            "guests": {"a": [{"route": "events", "t": t, "status": 200, "retry_after": None, "app": None}]},
        }

    merged = merge_snapshots([part([], "200", 2.0), part(["a"], "200", 1.0)])
    assert merged["requests"] == {"events": {"200": 2}}
    assert merged["meetings"]["M"]["roster"] == ["a"]
    assert merged["applications"]["created_by_asi"] == {"a": 2}
    assert [e["t"] for e in merged["guests"]["a"]] == [1.0, 2.0]
