"""Sharded runs in operation: the parent's merged live metrics (``ShardStates``, ``on_state``), the leases
the parent holds for a sharded run, and ``run_load(workers=N)`` for embedders (with its refusals)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anonjoin import ClientSecretCredential, ConfigurationError, Hooks, LoadPlan, Metrics, run_load
from anonjoin._cli.common import simulator_settings
from anonjoin._load.prometheus import MetricsCollector
from anonjoin._load.sharded import LEASE_HELD, InProcessEngine, ShardStates, run_sharded
from anonjoin._load.store import MemorySessionStore, SqliteSessionStore
from anonjoin.simulator import Simulator

from support.prometheus import scraped, value


def _plan(sim: Simulator, guests: int, *, hold_s: float = 0.0) -> LoadPlan:
    info = sim.info
    return LoadPlan(
        guests=guests, meeting_urls=(info.meeting_url,), origin=info.origin, concurrency=8, hold_s=hold_s
    )


def _credential(sim: Simulator) -> ClientSecretCredential:
    info = sim.info
    return ClientSecretCredential(
        authority=info.authority,
        client_id=info.client_id,
        client_secret=info.client_secret,
        scope=info.scope,
        ca_file=info.ca_file,
    )


# -- ShardStates -------------------------------------------------------------------------------------


def _state(joins: int, guests: int) -> dict[str, object]:
    m = Metrics(guests=guests)
    m.start()
    for n in range(joins):
        m.guest_arrived()
        m.guest_started(0.0)
        m.guest_joined(f"g{n}", 0.01 * (n + 1), 0.0)
    return m.to_state()


def test_shard_states_merge_the_latest_state_of_each_shard_once_per_new_state() -> None:
    states = ShardStates(2)
    assert states.metrics() is None  # nothing yet: the collector reports no samples
    states.update(0, _state(3, 10))
    first = states.metrics()
    assert first is not None and first.first_joins == 3
    assert states.metrics() is first  # no new state: the same merge (a scrape merges at most once)
    states.update(1, _state(4, 10))
    states.update(0, _state(5, 10))  # shard 0's newer state replaces its older one
    merged = states.metrics()
    assert merged is not None and merged is not first
    assert (merged.first_joins, merged.guests, merged.join.count) == (9, 20, 9)
    samples = scraped(MetricsCollector(states.metrics))
    assert value(samples, "anonjoin_joins_total") == 9
    assert value(samples, "anonjoin_guests_planned") == 20
    assert value(samples, "anonjoin_join_seconds_count") == 9


async def test_the_in_process_engine_reports_states_and_the_live_view_ends_on_the_merge(
    sim: Simulator,
) -> None:
    states = ShardStates(2)
    seen: list[int] = []

    def on_state(k: int, state: dict[str, object]) -> None:
        states.update(k, state)
        seen.append(k)

    merged = await run_sharded(
        _plan(sim, 20, hold_s=0.5),
        InProcessEngine(progress_interval_s=0.05, state_interval_s=0.1),
        target=simulator_settings(sim.info, display_name="g"),
        store=MemorySessionStore(),
        shards=2,
        on_state=on_state,
        start_slack_s=0.1,
    )
    assert len(seen) > 2 and set(seen) == {0, 1}  # live states, then each result's final one
    live = states.metrics()
    assert live is not None
    assert live.first_joins == merged.metrics.first_joins == 20
    assert live.join.count == merged.metrics.join.count == 20
    assert dict(live.outcomes) == dict(merged.metrics.outcomes)


# -- leases held by the parent -------------------------------------------------------------------------


async def test_a_sharded_run_holds_every_lease_and_refuses_a_guest_another_instance_holds(
    sim: Simulator, tmp_path: Path
) -> None:
    path = tmp_path / "s.db"
    store = SqliteSessionStore(path)
    other = SqliteSessionStore(path)  # another instance on the same file
    plan = _plan(sim, 12, hold_s=0.0)
    held = await other.take(plan.guest_id(3), 30.0)
    try:
        merged = await run_sharded(
            plan,
            InProcessEngine(progress_interval_s=0.05),
            target=simulator_settings(sim.info, display_name="g"),
            store=store,
            shards=2,
            lease_s=30.0,
            start_slack_s=0.1,
        )
        by_id = {g.guest_id: g for g in merged.guests}
        assert (by_id[plan.guest_id(3)].outcome, by_id[plan.guest_id(3)].reason) == ("failed", LEASE_HELD)
        assert [by_id[plan.guest_id(n)].outcome for n in range(1, 13) if n != 3] == ["joined"] * 11
        assert merged.metrics.failed_by_reason == {LEASE_HELD: 1}
        assert merged.metrics.store_writes_fenced == merged.metrics.store_writes_lost == 0
        # the application of the refused guest was never made: no request for it
        assert len(sim.snapshot()["applications"]["created_by_asi"]) == 11
        records = {r.guest_id: r for r in await store.list()}
        assert records[plan.guest_id(1)].last_outcome == "joined"
        # every lease of the run is released at its end: another instance takes them at once
        lease = await other.take(plan.guest_id(1), 30.0)
        await lease.release()
    finally:
        await held.release()
        await other.aclose()
        await store.aclose()


async def test_a_lease_lost_to_another_instance_is_a_fenced_write(sim: Simulator, tmp_path: Path) -> None:
    """The parent's fence keeps a guest another instance took over from being overwritten."""
    path = tmp_path / "s.db"
    store = SqliteSessionStore(path)
    other = SqliteSessionStore(path)
    plan = _plan(sim, 6, hold_s=0.0)
    states = ShardStates(2)
    taken: list[object] = []

    def on_state(k: int, state: dict[str, object]) -> None:
        states.update(k, state)

    class Engine(InProcessEngine):
        async def run(self, jobs, on_progress, on_state=None):  # type: ignore[no-untyped-def]
            # while the run goes: the lease of guest 2 lapses and another instance claims it
            import contextlib
            import sqlite3

            with contextlib.closing(sqlite3.connect(path)) as db, db:
                db.execute("UPDATE leases SET expires_at = 0 WHERE guest_id = ?", (plan.guest_id(2),))
            taken.append(await other.take(plan.guest_id(2), 30.0))
            return await super().run(jobs, on_progress, on_state)

    try:
        merged = await run_sharded(
            plan,
            Engine(progress_interval_s=0.05),
            target=simulator_settings(sim.info, display_name="g"),
            store=store,
            shards=2,
            lease_s=30.0,
            on_state=on_state,
            start_slack_s=0.1,
        )
        assert merged.metrics.store_writes_fenced == 1
        assert any("1 refused by the lease fence" in w for w in merged.warnings)
        records = {r.guest_id: r for r in await store.list()}
        assert records[plan.guest_id(2)].last_outcome is None  # the new holder's to write
        assert records[plan.guest_id(1)].last_outcome == "joined"
    finally:
        for lease in taken:
            await lease.release()  # type: ignore[attr-defined]
        await other.aclose()
        await store.aclose()


# -- run_load(workers=N) -------------------------------------------------------------------------------


async def test_run_load_with_two_workers_merges_the_shards(sim: Simulator) -> None:
    credential = _credential(sim)
    store = MemorySessionStore()
    try:
        result = await run_load(
            _plan(sim, 30, hold_s=0.0),
            discover_url=sim.info.discover_url,
            endpoint_id=sim.info.endpoint_id,
            credential=credential,
            ca_file=sim.info.ca_file,
            store=store,
            workers=2,
        )
    finally:
        await credential.aclose()
    assert [g.outcome for g in result.guests] == ["joined"] * 30
    assert [g.guest_id for g in result.guests] == [f"guest-{n:04d}" for n in range(1, 31)]
    assert result.metrics.first_joins == 30 and result.metrics.join.count == 30
    assert result.interrupted is False and result.warnings == []
    assert result.started_at > 0
    ids = {r.guest_id: r.application_session_id for r in await store.list()}
    assert {g.guest_id: g.application_session_id for g in result.guests} == ids
    assert len(sim.snapshot()["applications"]["created_by_asi"]) == 30


async def test_run_load_refuses_what_cannot_reach_another_process(sim: Simulator) -> None:
    credential = _credential(sim)
    plan = _plan(sim, 4)
    common = {
        "discover_url": sim.info.discover_url,
        "endpoint_id": sim.info.endpoint_id,
        "credential": credential,
        "ca_file": sim.info.ca_file,
    }
    try:
        for extra, message in (
            ({"hooks": Hooks()}, "takes no hooks"),
            ({"metrics": Metrics()}, "takes no metrics"),
            ({"on_runner": lambda _r: None}, "takes no on_runner"),
            ({"start_at": 1.0}, "takes no start_at"),
            ({"workers": 0}, "workers must be a whole number >= 1"),
            ({"shards": 2}, "shards= applies to ray="),
            ({"workers": 2, "ray": "auto"}, "two ways to run the shards"),
            ({"ca_file": None}, "the same ca_file"),
            ({"verify_tls": False}, "the same verify_tls"),
        ):
            kwargs = {**common, "workers": 2, **extra}
            with pytest.raises(ConfigurationError, match=message):
                await run_load(plan, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="needs a ClientSecretCredential") as info:
            await run_load(plan, **{**common, "credential": object()}, workers=2)  # type: ignore[arg-type]
        assert sim.info.client_secret not in str(info.value)
    finally:
        await credential.aclose()
    assert sim.snapshot()["applications"]["created_by_asi"] == {}  # refused before any request
