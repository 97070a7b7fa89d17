"""Shards of one plan: the algebra (hypothesis), the exact merge, and shards run against the simulator."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anonjoin import ConfigurationError
from anonjoin._async.auth import ClientSecretCredential
from anonjoin._load.metrics import LatencyHistogram, Metrics
from anonjoin._load.report import GuestRecord, build_report
from anonjoin._load.runner import (
    ArrivalSchedule,
    ConstantRate,
    LinearRamp,
    LoadPlan,
    LoadResult,
    Shard,
    Steps,
    run_load,
)
from anonjoin._load.shards import ShardResult, merge_results
from anonjoin.simulator import Simulator

from support.policies import FAST_REJOIN, FAST_RETRY

schedules = st.one_of(
    st.none(),
    st.builds(ConstantRate, st.floats(0.5, 500)),
    st.builds(LinearRamp, st.floats(0, 50), st.floats(0.5, 200), st.floats(0.5, 30)),
    st.builds(
        Steps,
        st.lists(st.tuples(st.floats(0, 100), st.floats(0.1, 10)), min_size=1, max_size=4).map(
            lambda steps: (*steps[:-1], (max(steps[-1][0], 1.0), steps[-1][1]))
        ),
    ),
)


def _plan(guests: int, shard: Shard | None = None, **kw: Any) -> LoadPlan:
    return LoadPlan(
        guests=guests,
        meeting_urls=("https://m/a", "https://m/b"),
        origin="https://o",
        shard=shard or Shard(),
        **kw,
    )


# -- the algebra -----------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    guests=st.integers(0, 400), count=st.integers(1, 9), concurrency=st.integers(1, 200), schedule=schedules
)
def test_the_shards_of_a_plan_are_the_plan(
    guests: int, count: int, concurrency: int, schedule: ArrivalSchedule | None
) -> None:
    concurrency = max(concurrency, count)
    whole = _plan(guests, concurrency=concurrency, schedule=schedule)
    owned: list[int] = []
    slots = 0
    for k in range(count):
        part = dataclasses.replace(whole, shard=Shard(k, count))
        numbers = list(part.shard.numbers(guests))
        assert all(part.shard.owns(n) for n in numbers)
        assert len(numbers) == part.shard_guests
        owned += numbers
        c = part.shard_concurrency
        assert concurrency // count <= c <= -(-concurrency // count)
        slots += c
    assert sorted(owned) == list(range(1, guests + 1))  # disjoint and complete
    assert slots == concurrency
    if schedule is not None:
        # Each shard takes its guests' times from the one global schedule: their union is the schedule.
        every = list(schedule.times(guests))
        union = sorted(
            t
            for k in range(count)
            for n, t in enumerate(schedule.times(guests), 1)
            if Shard(k, count).owns(n)
        )
        assert union == sorted(every)
    ids = {whole.guest_id(n) for n in owned}
    assert len(ids) == guests


def test_shard_text_and_bounds() -> None:
    assert Shard.parse("1/4") == Shard(1, 4)
    assert str(Shard(2, 3)) == "2/3"
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ConfigurationError):
            Shard.parse(bad)
    with pytest.raises(ConfigurationError, match="concurrency of at least 4"):
        _plan(10, Shard(0, 4), concurrency=3)


# -- exact merges ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0.000001, 3000.0), min_size=0, max_size=300),
    parts=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_histograms_of_a_partition_merge_to_the_whole(values: list[float], parts: int, seed: int) -> None:
    rng = random.Random(seed)
    whole = LatencyHistogram()
    pieces = [LatencyHistogram() for _ in range(parts)]
    for v in values:
        whole.record(v)
        pieces[rng.randrange(parts)].record(v)
    merged = LatencyHistogram()
    for p in pieces:
        merged.add_encoded(json.loads(json.dumps(p.encode())))
    assert merged.equals(whole)
    assert merged.count == whole.count
    for q in (50, 90, 99, 100):
        assert merged.percentile_ms(q) == whole.percentile_ms(q)
    assert merged.mean_ms() == whole.mean_ms()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _feed(m: Metrics, clock: _Clock, events: list[tuple[float, str, float]]) -> None:
    m.start(clock.now)
    for at, kind, latency in events:
        clock.now = 100.0 + at
        gid = f"g{at}{kind}{latency}"
        m.guest_arrived()
        m.guest_started(0.001)
        if kind == "join":
            m.guest_joined(gid, latency, 0.0)
            m.guest_final(gid, "joined")
        else:
            m.guest_join_failed(gid)
            m.guest_final(gid, "failed", kind)


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.floats(0, 30), st.sampled_from(["join", "join", "HTTP 503", "Timeout"]), st.floats(0.001, 5)
        ),
        max_size=120,
    ),
    parts=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_metrics_states_add_up_to_one_process(
    events: list[tuple[float, str, float]], parts: int, seed: int
) -> None:
    rng = random.Random(seed)
    events = sorted(events)
    whole_clock = _Clock()
    whole = Metrics(clock=whole_clock)
    _feed(whole, whole_clock, events)
    split: list[list[tuple[float, str, float]]] = [[] for _ in range(parts)]
    for ev in events:
        split[rng.randrange(parts)].append(ev)
    states = []
    for part in split:
        clock = _Clock()
        m = Metrics(clock=clock)
        _feed(m, clock, part)
        clock.now = 100.0 + 31
        m.finish()
        states.append(json.loads(json.dumps(m.to_state())))
    merged = Metrics.merged(states)
    assert merged.join.equals(whole.join)
    assert merged.queue.equals(whole.queue)
    assert merged.outcomes == whole.outcomes
    assert merged.failures_by_reason == whole.failures_by_reason
    assert merged.first_joins == whole.first_joins and merged.join_failures == whole.join_failures
    assert [b.joins for b in merged.seconds] == [b.joins for b in whole.seconds]
    assert [b.failures for b in merged.seconds] == [b.failures for b in whole.seconds]
    assert [b.join_ms_max for b in merged.seconds] == [b.join_ms_max for b in whole.seconds]
    assert merged.duration_s == pytest.approx(31.0)
    assert len(merged.scatter) == len(whole.scatter)


def _result(shard: Shard, guests: int, outcome: str = "joined") -> ShardResult:
    plan = _plan(guests, shard, concurrency=4)
    m = Metrics(guests=plan.shard_guests)
    m.start()
    records = []
    for n in shard.numbers(guests):
        gid = plan.guest_id(n)
        m.guest_arrived()
        m.guest_started(0.0)
        m.guest_joined(gid, 0.01 * n, 0.0)
        m.guest_final(gid, "joined")
        records.append(GuestRecord(gid, f"asi-{n}", "joined", None, 0, "a" if n % 2 else "b"))
    m.finish()
    result = LoadResult(records, m, started_at=1000.0, interrupted=False)
    return ShardResult.from_json(
        json.loads(json.dumps(ShardResult.of(result, plan, start_at=1000.0).to_json()))
    )


def test_merge_interleaves_guests_and_refuses_what_is_not_one_run() -> None:
    parts = [_result(Shard(k, 3), 10) for k in range(3)]
    merged = merge_results(list(reversed(parts)))
    assert [g.guest_id for g in merged.guests] == [f"guest-{n:04d}" for n in range(1, 11)]
    assert merged.metrics.first_joins == 10 and not merged.missing and not merged.warnings
    report = build_report(merged.metrics, merged.guests, merged.settings, started_at=merged.started_at)
    assert report["joined"] == 10 and report["latency"]["join"]["count"] == 10

    with pytest.raises(ConfigurationError, match="given twice"):
        merge_results([parts[0], parts[0], parts[1]])
    other = _result(Shard(1, 3), 12)
    with pytest.raises(ConfigurationError, match="another plan"):
        merge_results([parts[0], other])
    with pytest.raises(ConfigurationError, match="but the run has 3 shards"):
        merge_results([parts[0], _result(Shard(1, 2), 10)])
    with pytest.raises(ConfigurationError, match="not an anonjoin shard result"):
        ShardResult.from_json({"schema": "anonjoin.load-report/1"})
    with pytest.raises(ConfigurationError, match="nothing to merge"):
        merge_results([])


def test_a_missing_shard_is_a_lost_range_accounted_as_cancelled() -> None:
    parts = [_result(Shard(k, 3), 10) for k in (0, 2)]
    merged = merge_results(parts, missing_reason="worker lost")
    assert merged.missing == [1]
    assert len(merged.guests) == 10
    lost = [g for g in merged.guests if g.outcome == "cancelled"]
    assert [g.guest_id for g in lost] == ["guest-0002", "guest-0005", "guest-0008"]
    assert {g.reason for g in lost} == {"worker lost"}
    report = build_report(
        merged.metrics, merged.guests, merged.settings, started_at=merged.started_at, warnings=merged.warnings
    )
    assert report["cancelled"] == 3 and report["joined"] == 7
    assert report["cancelled_by_reason"] == {"worker lost": 3}
    assert any("1/3" in w for w in report["warnings"])


# -- shards run for real, against one simulator ------------------------------------------------------


async def _run(sim: Simulator, plan: LoadPlan, start_at: float | None) -> LoadResult:
    info = sim.info
    async with ClientSecretCredential(
        authority=info.authority,
        client_id=info.client_id,
        client_secret=info.client_secret,
        scope=info.scope,
        ca_file=info.ca_file,
    ) as credential:
        return await run_load(
            plan,
            discover_url=info.discover_url,
            endpoint_id=info.endpoint_id,
            credential=credential,
            ca_file=info.ca_file,
            retry=FAST_RETRY,
            rejoin=FAST_REJOIN,
            start_at=start_at,
        )


async def test_two_shards_on_one_simulator_merge_into_the_whole_run(sim: Simulator) -> None:
    info = sim.info
    plan = LoadPlan(
        guests=41,
        meeting_urls=(info.meeting_url,),
        origin=info.origin,
        concurrency=9,
        schedule=ConstantRate(400),
    )
    start_at = time.time() + 0.3
    parts = await asyncio.gather(
        *(_run(sim, dataclasses.replace(plan, shard=Shard(k, 2)), start_at) for k in range(2))
    )
    assert [len(p.guests) for p in parts] == [21, 20]
    results = [
        ShardResult.of(r, dataclasses.replace(plan, shard=Shard(k, 2)), start_at=start_at)
        for k, r in enumerate(parts)
    ]
    merged = merge_results([ShardResult.from_json(json.loads(json.dumps(r.to_json()))) for r in results])
    assert [g.guest_id for g in merged.guests] == [plan.guest_id(n) for n in range(1, 42)]
    assert len({g.application_session_id for g in merged.guests}) == 41
    report = build_report(merged.metrics, merged.guests, merged.settings, started_at=merged.started_at)
    assert report["joined"] == 41 and report["arrived"] == 41
    assert report["latency"]["join"]["count"] == 41
    assert sum(b["joins"] for b in report["throughput"]) == 41
    assert report["started_at"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(start_at)))
    snapshot = sim.snapshot()
    assert snapshot["applications"]["live"] == 0
    assert len(snapshot["applications"]["created_by_asi"]) == 41


async def test_run_sharded_prepares_once_assigns_ids_in_the_parent_and_merges(sim: Simulator) -> None:
    from anonjoin._cli.common import simulator_settings
    from anonjoin._load.sharded import InProcessEngine, ShardProgress, run_sharded
    from anonjoin._load.store import MemorySessionStore

    info = sim.info
    target = simulator_settings(info, display_name="g")
    plan = LoadPlan(guests=30, meeting_urls=(info.meeting_url,), origin=info.origin, concurrency=6)
    store = MemorySessionStore()
    live = ShardProgress(30, 3)
    merged = await run_sharded(
        plan,
        InProcessEngine(progress_interval_s=0.05),
        target=target,
        store=store,
        shards=3,
        retry=FAST_RETRY,
        rejoin=FAST_REJOIN,
        meetings=3,
        on_progress=live.update,
        start_slack_s=0.1,
    )
    assert [g.outcome for g in merged.guests] == ["joined"] * 30
    assert len({g.meeting for g in merged.guests}) == 3  # the meetings were made once, in the parent
    records = {r.guest_id: r for r in await store.list()}
    assert {g.guest_id: g.application_session_id for g in merged.guests} == {
        gid: r.application_session_id for gid, r in records.items()
    }
    assert {r.last_outcome for r in records.values()} == {"joined"}
    assert live.progress().joined == 30
    assert sim.snapshot()["applications"]["live"] == 0
