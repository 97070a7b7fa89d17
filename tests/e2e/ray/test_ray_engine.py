"""RayEngine on a real two-node cluster: a run in two actors merged, a version mismatch refused before any
guest, and a node removed mid-run reported as a lost shard (the rest merged, no hang).

The node-loss test is last: it takes the worker node away from the module's cluster.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest

from anonjoin import AnonJoinError, ConfigurationError
from anonjoin._cli.common import simulator_settings
from anonjoin._load.metrics import Progress as Snapshot
from anonjoin._load.ray import RayEngine
from anonjoin._load.runner import ConstantRate, LoadPlan
from anonjoin._load.sharded import ShardProgress, run_sharded
from anonjoin._load.store import MemorySessionStore
from anonjoin.simulator import Simulator

from support.policies import FAST_REJOIN, FAST_RETRY
from support.ray_cluster import RayCluster, require_ray, two_node_cluster

require_ray()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    yield from two_node_cluster()


def _plan(sim: Simulator, guests: int, **kw: object) -> LoadPlan:
    info = sim.info
    return LoadPlan(guests=guests, meeting_urls=(info.meeting_url,), origin=info.origin, concurrency=20, **kw)  # type: ignore[arg-type]


async def test_200_guests_in_two_actors_on_two_nodes_merge_into_the_whole_run(
    ray_cluster: RayCluster, sim: Simulator
) -> None:
    engine = RayEngine(ray_cluster.address, shards=2, progress_interval_s=0.05)
    live = ShardProgress(200, 2)
    store = MemorySessionStore()
    merged = await run_sharded(
        _plan(sim, 200, hold_s=0.2),
        engine,
        target=simulator_settings(sim.info, display_name="g"),
        store=store,
        shards=2,
        retry=FAST_RETRY,
        rejoin=FAST_REJOIN,
        meetings=2,
        on_progress=live.update,
        start_slack_s=0.2,
    )
    assert merged.missing == []
    assert [g.outcome for g in merged.guests] == ["joined"] * 200
    assert len({g.guest_id for g in merged.guests}) == 200
    assert merged.metrics.first_joins == 200 and merged.metrics.join.count == 200
    assert live.progress().joined == 200  # the driver polled both actors' counters
    # one actor per node (SPREAD, one CPU each), both nodes checked for their anonjoin
    assert sorted(engine.placement) == sorted(n.node_id for n in engine.nodes)
    assert ray_cluster.worker.node_id in engine.placement
    assert {n.anonjoin_version for n in engine.nodes} == {engine.expected_version}
    ids = {r.guest_id: r.application_session_id for r in await store.list()}
    assert {g.guest_id: g.application_session_id for g in merged.guests} == ids
    snapshot = sim.snapshot()
    assert snapshot["applications"]["live"] == 0
    assert len(snapshot["applications"]["created_by_asi"]) == 200
    import ray

    assert not ray.is_initialized()  # disconnected at the end; the cluster itself is the fixture's


async def test_actors_report_their_metrics_state_and_run_load_takes_ray(
    ray_cluster: RayCluster, sim: Simulator
) -> None:
    """The driver polls each actor's whole metrics state (the merged live view of --metrics-port), and
    ``run_load(ray=..., shards=2)`` is the same run for an embedder."""
    from anonjoin import ClientSecretCredential, run_load
    from anonjoin._load.sharded import ShardStates

    states = ShardStates(2)
    live: list[int] = []

    def on_state(k: int, state: dict[str, object]) -> None:
        states.update(k, state)
        merged_now = states.metrics()
        assert merged_now is not None
        live.append(merged_now.first_joins)

    engine = RayEngine(ray_cluster.address, shards=2, progress_interval_s=0.05, state_interval_s=0.1)
    merged = await run_sharded(
        _plan(sim, 30, hold_s=2.0),
        engine,
        target=simulator_settings(sim.info, display_name="g"),
        store=MemorySessionStore(),
        shards=2,
        retry=FAST_RETRY,
        on_state=on_state,
        start_slack_s=0.2,
    )
    assert merged.metrics.first_joins == 30
    assert 30 in live[:-2]  # a polled state (not only the two final ones) showed every join
    final = states.metrics()
    assert final is not None and final.join.count == merged.metrics.join.count == 30

    info = sim.info
    credential = ClientSecretCredential(
        authority=info.authority,
        client_id=info.client_id,
        client_secret=info.client_secret,
        scope=info.scope,
        ca_file=info.ca_file,
    )
    try:
        result = await run_load(
            _plan(sim, 20),
            discover_url=info.discover_url,
            endpoint_id=info.endpoint_id,
            credential=credential,
            ca_file=info.ca_file,
            retry=FAST_RETRY,
            ray=ray_cluster.address,
            shards=2,
        )
    finally:
        await credential.aclose()
    assert [g.outcome for g in result.guests] == ["joined"] * 20
    assert result.metrics.first_joins == 20 and result.interrupted is False
    import ray

    assert not ray.is_initialized()


async def test_a_node_with_another_anonjoin_is_refused_before_any_guest(
    ray_cluster: RayCluster, sim: Simulator
) -> None:
    engine = RayEngine(ray_cluster.address, shards=2, expected_version="0.0.0-not-this-one")
    with pytest.raises(ConfigurationError, match=r"runs anonjoin .*, this driver 0\.0\.0-not-this-one"):
        await run_sharded(
            _plan(sim, 10),
            engine,
            target=simulator_settings(sim.info, display_name="g"),
            store=MemorySessionStore(),
            shards=2,
            retry=FAST_RETRY,
        )
    assert engine.placement == []  # no job was sent (the actors placed meanwhile were killed)
    assert sim.snapshot()["applications"]["created_by_asi"] == {}


async def test_more_shards_than_cluster_cpus_is_a_one_line_error(ray_cluster: RayCluster) -> None:
    engine = RayEngine(ray_cluster.address, shards=3)
    with pytest.raises(ConfigurationError, match=r"3 shards need 3 CPUs of the Ray cluster .* has 2 on 2"):
        async with engine:
            pass


def test_an_unreachable_address_is_a_one_line_error_at_once() -> None:
    with pytest.raises(ConfigurationError, match=r"cannot attach to the Ray cluster at 127\.0\.0\.1:1"):
        RayEngine("127.0.0.1:1").connect()


async def test_an_actor_that_stops_answering_is_lost_and_killed_not_waited_for(
    ray_cluster: RayCluster, sim: Simulator
) -> None:
    # lost_after_s=0: no progress answer can come soon enough, so every shard is given up at the first tick
    engine = RayEngine(ray_cluster.address, shards=2, progress_interval_s=0.05, lost_after_s=0.0)
    with pytest.raises(AnonJoinError, match=r"no shard of the run came back \(actor lost\)"):
        await asyncio.wait_for(
            run_sharded(
                _plan(sim, 50, hold_s=30.0),
                engine,
                target=simulator_settings(sim.info, display_name="g"),
                store=MemorySessionStore(),
                shards=2,
                retry=FAST_RETRY,
                start_slack_s=0.2,
            ),
            timeout=30,
        )
    assert sorted(engine.failures) == [0, 1]
    assert all(r == "actor lost: no answer for 0 s" for r in engine.failures.values())


async def test_a_node_removed_mid_run_is_a_lost_shard_and_the_rest_merge(
    ray_cluster: RayCluster, sim: Simulator
) -> None:
    engine = RayEngine(ray_cluster.address, shards=2, progress_interval_s=0.05)
    joined: dict[int, int] = {}
    both_joining = asyncio.Event()

    def on_progress(k: int, snap: Snapshot) -> None:
        joined[k] = snap.joined
        if len(joined) == 2 and min(joined.values()) > 0:
            both_joining.set()

    async def remove_worker_node() -> None:
        await asyncio.wait_for(both_joining.wait(), timeout=30)
        await asyncio.to_thread(ray_cluster.cluster.remove_node, ray_cluster.worker)

    # 200 guests over ~3 s, each held 2 s: the node goes while both shards are mid-run
    plan = _plan(sim, 200, hold_s=2.0, schedule=ConstantRate(60))
    remover = asyncio.ensure_future(remove_worker_node())
    merged = await asyncio.wait_for(
        run_sharded(
            plan,
            engine,
            target=simulator_settings(sim.info, display_name="g"),
            store=MemorySessionStore(),
            shards=2,
            retry=FAST_RETRY,
            rejoin=FAST_REJOIN,
            on_progress=on_progress,
            start_slack_s=0.2,
        ),
        timeout=60,
    )
    await remover
    lost = engine.placement.index(ray_cluster.worker.node_id)
    kept = 1 - lost
    assert merged.missing == [lost]
    assert engine.lost_reason == "actor lost"
    assert engine.failures[lost].startswith("actor lost")
    by_shard = {k: [g for n, g in enumerate(merged.guests, 1) if (n - 1) % 2 == k] for k in (0, 1)}
    assert len(merged.guests) == 200
    assert {(g.outcome, g.reason) for g in by_shard[lost]} == {("cancelled", "actor lost")}
    assert {g.outcome for g in by_shard[kept]} == {"joined"}
    assert merged.metrics.outcomes["cancelled"] == 100 and merged.metrics.first_joins == 100
    assert any("no result from shard" in w and "actor lost" in w for w in merged.warnings)
    report_guests = [dataclasses.asdict(g) for g in merged.guests]
    assert all(g["guest_id"] for g in report_guests)
