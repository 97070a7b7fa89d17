"""The load runner against the simulator on real loopback TLS sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from anonjoin import StoreError
from anonjoin._async.client import Client
from anonjoin._core.events import GuestEvent, Hooks
from anonjoin._load.metrics import Metrics
from anonjoin._load.report import build_report
from anonjoin._load.runner import ConstantRate, LoadPlan, LoadResult, LoadRunner, pool_size, run_load
from anonjoin._load.store import MemorySessionStore, Outcome, SqliteSessionStore
from anonjoin.simulator import Simulator, SimulatorConfig

from support.faults import QUICK_CHAOS
from support.policies import FAST_REJOIN, FAST_RETRY
from support.simulator import sim_credential

# The chaos profile's per-request rules with its schedule compressed to a few seconds.


async def _load(sim: Simulator, plan: LoadPlan, **kw: Any) -> LoadResult:
    info = sim.info
    credential = sim_credential(sim)
    try:
        return await run_load(
            plan,
            discover_url=info.discover_url,
            endpoint_id=info.endpoint_id,
            credential=credential,
            ca_file=info.ca_file,
            retry=kw.pop("retry", FAST_RETRY),
            rejoin=kw.pop("rejoin", FAST_REJOIN),
            **kw,
        )
    finally:
        await credential.aclose()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(seed=1)) as running:
        yield running


def _asis(snapshot: dict[str, Any]) -> dict[str, int]:
    created: dict[str, int] = snapshot["applications"]["created_by_asi"]
    return created


async def test_a_hundred_guests_all_join_and_leave(sim: Simulator) -> None:
    plan = LoadPlan(guests=100, meeting_urls=[sim.info.meeting_url], origin=sim.info.origin, concurrency=25)
    result = await _load(sim, plan, store=MemorySessionStore(), meetings=2)
    assert not result.interrupted
    assert [g.outcome for g in result.guests] == ["joined"] * 100
    assert len({g.application_session_id for g in result.guests}) == 100
    assert len({g.meeting for g in result.guests}) == 2
    snap = sim.snapshot()
    assert _asis(snap) == {g.application_session_id: 1 for g in result.guests}
    assert snap["applications"]["live"] == 0  # everyone left
    report = build_report(result.metrics, result.guests, {}, started_at=result.started_at)
    assert (report["joined"], report["failed"], report["success_rate"]) == (100, 0, 1.0)
    assert report["steps"]["anon_tokens"]["count"] == 100
    assert report["latency"]["join"]["p50_ms"] > 0
    assert report["joins_per_s"] > 0


async def test_chaos_every_guest_accounted_for_with_one_id_each() -> None:
    async with Simulator(SimulatorConfig(seed=7, faults=QUICK_CHAOS)) as sim:
        plan = LoadPlan(
            guests=60, meeting_urls=[sim.info.meeting_url], origin=sim.info.origin, concurrency=20, hold_s=2.5
        )
        result = await _load(sim, plan, meetings=3)
        snap = sim.snapshot()
    records = result.guests
    assert len(records) == 60 and len({r.guest_id for r in records}) == 60
    ours = {r.application_session_id for r in records}
    created = _asis(snap)
    # The service saw exactly our ids: no rejoin ever minted a new applicationSessionId ...
    assert set(created) <= ours
    rejoined = [r for r in records if r.rejoins]
    assert rejoined, "the schedule drops guests and expires tokens: some must have rejoined"
    for r in rejoined:
        # ... and every rejoin of a guest made a new application for its one id.
        assert created[r.application_session_id] >= r.rejoins + 1
    for meeting in snap["meetings"].values():
        assert len(meeting["roster"]) == len(set(meeting["roster"]))
    # Known client gaps (see /work/notes/LOAD_FINDINGS.md): a POST anonApplications cut off by a "close"
    # fault can leave an application the client never heard of, and a guest whose meeting ended does not
    # always delete its application. At most that many may be left live; no other guest may leak.
    excused = sum(
        1
        for r in records
        if r.reason in ("MaybeSentError at anon_applications", "Ended") or r.outcome == "ended"
    )
    assert snap["applications"]["live"] <= excused
    by_outcome = {
        o: [r for r in records if r.outcome == o] for o in ("joined", "failed", "ended", "cancelled")
    }
    assert not by_outcome["cancelled"]
    for r in by_outcome["failed"] + by_outcome["ended"]:
        assert r.reason, r
    ended_meetings = {r.meeting for r in by_outcome["ended"]}
    assert len(ended_meetings) <= 1  # only the default meeting ends
    others = [r for r in records if r.meeting not in ended_meetings]
    joined = [r for r in others if r.outcome == "joined"]
    # The client still gives up a guest whose POST was cut off mid-response (MaybeSentError on a step it
    # deems unsafe to repeat): see /work/notes/LOAD_FINDINGS.md. Everything else must have joined.
    maybe_sent_failures = [r for r in others if (r.reason or "").startswith("MaybeSentError")]
    assert len(joined) + len(maybe_sent_failures) >= 0.95 * len(others), [
        (r.guest_id, r.reason) for r in by_outcome["failed"]
    ]
    report = build_report(result.metrics, records, {}, started_at=result.started_at)
    assert report["joined"] + report["failed"] + report["ended"] + report["cancelled"] == 60
    assert sum(report["retries_by_reason"].values()) > 0


async def test_cancel_mid_run_accounts_for_everyone(sim: Simulator) -> None:
    joined = asyncio.Event()
    count = 0

    def on_guest(ev: GuestEvent) -> None:
        nonlocal count
        if ev.kind == "joined":
            count += 1
            if count >= 10:
                joined.set()

    plan = LoadPlan(
        guests=200,
        meeting_urls=[sim.info.meeting_url],
        origin=sim.info.origin,
        concurrency=10,
        schedule=ConstantRate(40),
        hold_s=60,
    )
    metrics = Metrics(guests=plan.guests)
    credential = sim_credential(sim)
    async with Client(
        discover_url=sim.info.discover_url,
        endpoint_id=sim.info.endpoint_id,
        credential=credential,
        ca_file=sim.info.ca_file,
        retry=FAST_RETRY,
        max_connections=pool_size(plan.concurrency),
        hooks=metrics.hooks(Hooks(on_guest=on_guest)),
    ) as client:
        runner = LoadRunner(client, plan, metrics=metrics)
        task = asyncio.create_task(runner.run())
        async with asyncio.timeout(30):
            await joined.wait()
        runner.cancel()
        async with asyncio.timeout(30):
            result = await task
    await credential.aclose()
    assert result.interrupted
    outcomes = [r.outcome for r in result.guests]
    assert len(outcomes) == 200
    assert outcomes.count("joined") >= 10
    assert set(outcomes) <= {"joined", "cancelled"}
    assert "cancelled" in outcomes
    snap = sim.snapshot()
    assert snap["applications"]["live"] == 0  # the joined guests left, the cut-off ones were cleaned up
    assert all(not m["roster"] for m in snap["meetings"].values())


async def test_a_restart_reuses_each_guests_id(sim: Simulator, tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    plan = LoadPlan(guests=8, meeting_urls=[sim.info.meeting_url], origin=sim.info.origin, concurrency=4)
    first_store = SqliteSessionStore(path)
    first = await _load(sim, plan, store=first_store)
    await first_store.aclose()
    second_store = SqliteSessionStore(path)
    second = await _load(sim, plan, store=second_store)
    records = {r.guest_id: r for r in await second_store.list()}
    await second_store.aclose()
    assert [g.application_session_id for g in first.guests] == [
        g.application_session_id for g in second.guests
    ]
    assert all(g.outcome == "joined" for g in second.guests)
    assert _asis(sim.snapshot()) == {g.application_session_id: 2 for g in first.guests}
    assert records["guest-0001"].last_outcome == "joined"


async def test_lobby_time_is_kept_apart_from_join_latency() -> None:
    async with Simulator(SimulatorConfig(seed=3, lobby="admit", lobby_delay_s=0.4)) as sim:
        plan = LoadPlan(
            guests=10, meeting_urls=[sim.info.meeting_url], origin=sim.info.origin, concurrency=10
        )
        result = await _load(sim, plan)
    report = build_report(result.metrics, result.guests, {}, started_at=result.started_at)
    assert report["joined"] == 10
    assert report["latency"]["lobby"]["count"] == 10
    assert report["latency"]["lobby"]["p50_ms"] >= 350


async def test_a_guest_that_cannot_join_is_failed_with_its_reason() -> None:
    async with Simulator(SimulatorConfig(seed=4, lobby="deny", lobby_delay_s=0.05)) as sim:
        plan = LoadPlan(guests=4, meeting_urls=[sim.info.meeting_url], origin=sim.info.origin, concurrency=4)
        result = await _load(sim, plan)
    assert [(g.outcome, g.reason) for g in result.guests] == [("failed", "Denied")] * 4
    report = build_report(result.metrics, result.guests, {}, started_at=result.started_at)
    assert report["failures_by_reason"] == {"Denied": 4}
    assert report["success_rate"] == 0.0


class _FailingStore(MemorySessionStore):
    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        raise StoreError("session store x.db: record outcomes: the file is locked by another process")


async def test_a_store_failure_at_the_end_keeps_the_results(sim: Simulator) -> None:
    plan = LoadPlan(guests=3, meeting_urls=[sim.info.meeting_url], origin=sim.info.origin)
    result = await _load(sim, plan, store=_FailingStore())
    assert [g.outcome for g in result.guests] == ["joined"] * 3
    assert result.warnings and "locked" in result.warnings[0]
    report = build_report(result.metrics, result.guests, {}, started_at=0.0, warnings=result.warnings)
    assert report["warnings"] == result.warnings
