"""The load runner over a shared Redis store: a lease per guest, fenced outcomes, Redis lost mid-run."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from anonjoin import ClientSecretCredential, GuestEvent, Hooks, LeaseHeld
from anonjoin._load.runner import LoadPlan, LoadResult, LoadRunner, run_load
from anonjoin._load.store_redis import RedisSessionStore
from anonjoin.simulator import Simulator, SimulatorConfig

from support.redis_server import RedisServer

WAIT_S = 30.0


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(seed=1)) as running:
        yield running


class Run:
    """A run in a task, with an event once ``n`` guests have joined and the runner at hand."""

    def __init__(self, sim: Simulator, plan: LoadPlan, store: RedisSessionStore, lease_s: float) -> None:
        self.joined = asyncio.Event()  # all but one joined
        self.all_joined = asyncio.Event()
        self.left: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self.count = 0
        self.runner: LoadRunner | None = None
        info = sim.info
        self.credential = ClientSecretCredential(
            authority=info.authority,
            client_id=info.client_id,
            client_secret=info.client_secret,
            scope=info.scope,
            ca_file=info.ca_file,
        )

        def on_guest(ev: GuestEvent) -> None:
            if ev.kind == "joined":
                self.count += 1
                if self.count >= plan.guests - 1:
                    self.joined.set()
                if self.count >= plan.guests:
                    self.all_joined.set()
            elif ev.kind == "left":
                self.left[ev.guest_id].set()

        def on_runner(r: LoadRunner) -> None:
            self.runner = r

        self.task: asyncio.Task[LoadResult] = asyncio.create_task(
            run_load(
                plan,
                discover_url=info.discover_url,
                endpoint_id=info.endpoint_id,
                credential=self.credential,
                ca_file=info.ca_file,
                hooks=Hooks(on_guest=on_guest),
                store=store,
                lease_s=lease_s,
                on_runner=on_runner,
            )
        )

    async def finish(self) -> LoadResult:
        assert self.runner is not None
        self.runner.cancel()
        try:
            async with asyncio.timeout(WAIT_S):
                return await self.task
        finally:
            await self.credential.aclose()


def _plan(sim: Simulator, guests: int, prefix: str) -> LoadPlan:
    return LoadPlan(
        guests=guests,
        meeting_urls=[sim.info.meeting_url],
        origin=sim.info.origin,
        concurrency=guests,
        hold_s=120,
        guest_prefix=prefix,
    )


async def test_a_guest_held_elsewhere_is_refused_and_a_lost_lease_leaves(
    sim: Simulator, redis_server: RedisServer
) -> None:
    prefix = f"run{uuid.uuid4().hex[:6]}:"
    store, other = RedisSessionStore(redis_server.url, prefix), RedisSessionStore(redis_server.url, prefix)
    raw = aioredis.Redis.from_url(redis_server.url)
    plan = _plan(sim, 6, "g-")
    try:
        async with other.claim(plan.guest_id(6), 60):  # another instance holds guest 6 for the whole run
            run = Run(sim, plan, store, lease_s=3.0)
            async with asyncio.timeout(WAIT_S):
                await run.joined.wait()
            assert run.runner is not None
            g = plan.guest_id
            slot1 = next(s for s in run.runner._slots if s.guest_id == g(1))
            assert slot1.lease is not None
            # guest 1's lease lapses and another instance takes it: guest 1 must leave
            await raw.delete(f"{prefix}lease:{g(1)}")
            async with other.claim(g(1), 60):
                async with asyncio.timeout(WAIT_S):
                    await slot1.lease.lost.wait()
                    await run.left[g(1)].wait()
                result = await run.finish()
                records = await store.list()
        by_id = {g.guest_id: g for g in result.guests}
        assert by_id[g(6)].outcome == "failed" and (by_id[g(6)].reason or "").startswith("LeaseHeld")
        assert by_id[g(1)].outcome == "failed" and (by_id[g(1)].reason or "").startswith("LeaseLost")
        assert [by_id[g(n)].outcome for n in range(2, 6)] == ["joined"] * 4, result.guests
        # the outcomes of the guests it held were written under their leases; g-1's new holder kept its own
        stored = {r.guest_id: r.last_outcome for r in records}
        assert [stored[g(n)] for n in range(2, 6)] == ["joined"] * 4
        assert result.metrics.store_writes_fenced == 1
        assert sim.snapshot()["applications"]["live"] == 0
        for n in range(1, 7):  # every lease released
            async with store.claim(g(n), 5):
                pass
    finally:
        await store.aclose()
        await other.aclose()
        await raw.aclose()


async def test_redis_killed_mid_run_guests_stay_and_every_guest_is_accounted_for(
    sim: Simulator, own_redis: RedisServer
) -> None:
    store = RedisSessionStore(own_redis.url, write_retry_s=0.3)
    plan = _plan(sim, 5, "k-")
    run = Run(sim, plan, store, lease_s=0.3)
    async with asyncio.timeout(WAIT_S):
        await run.all_joined.wait()
    own_redis.kill()
    assert run.runner is not None
    leases = [s.lease for s in run.runner._slots if s.lease is not None]
    assert len(leases) == plan.guests
    # Three lease lives with Redis gone: every renewal fails, and no lease counts as lost (nobody can
    # take a guest from a store nobody can reach), so the guests stay joined.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(lease.lost.wait() for lease in leases)), 0.9)
    assert all(lease.renew_errors >= 2 and not lease.lost.is_set() for lease in leases)
    roster: list[Any] = next(iter(sim.snapshot()["meetings"].values()))["roster"]
    assert len(roster) == plan.guests
    result = await run.finish()
    await store.aclose()
    assert [g.outcome for g in result.guests] == ["joined"] * plan.guests
    assert result.metrics.store_writes_lost == plan.guests
    assert any("did not record the outcomes" in w for w in result.warnings)
    assert any(f"{plan.guests} lost" in w for w in result.warnings)
    assert sim.snapshot()["applications"]["live"] == 0


def test_lease_held_is_a_store_error() -> None:
    from anonjoin import StoreError

    assert issubclass(LeaseHeld, StoreError)
