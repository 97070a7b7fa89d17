"""The JSON report's schema (version 2): a unit on every number, labelled samples, per-guest timings, p95
in every step, the parked poll apart from the join's own polls, and the HTML settings without reprs."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import pytest

from anonjoin._async.auth import ClientSecretCredential
from anonjoin._core.events import GuestEvent, StepEvent
from anonjoin._load.metrics import PARKED_POLL, Metrics
from anonjoin._load.report import REPORT_SCHEMA, GuestRecord, build_report, parse_fail_if
from anonjoin._load.report_html import render_html
from anonjoin._load.runner import LoadPlan, LoadResult, run_load
from anonjoin._load.store import MemorySessionStore
from anonjoin.simulator import Simulator

COUNTS = {
    "guests", "arrived", "joined", "failed", "ended", "cancelled", "rejoins", "rejoin_attempts", "drops",
    "leave_errors", "count", "errors", "retries", "joins", "failures", "late", "lost", "fenced",
}  # fmt: skip
RATIOS = {"success_rate"}
FREE_MAPS = {"settings", "service_check", "failures_by_reason", "ended_by_reason", "cancelled_by_reason",
             "retries_by_reason", "retries_by_step", "drops_by_reason", "meetings"}  # fmt: skip
"""Maps whose keys are names (reasons, steps, meetings) or the run's own settings: their counts are not
the report's fields."""


async def run_on(sim: Simulator, plan: LoadPlan) -> LoadResult:
    """``plan`` against ``sim`` (its credential closed after)."""
    info = sim.info
    credential = ClientSecretCredential(
        authority=info.authority,
        client_id=info.client_id,
        client_secret=info.client_secret,
        scope=info.scope,
        ca_file=info.ca_file,
    )
    async with credential:
        return await run_load(
            plan,
            discover_url=info.discover_url,
            endpoint_id=info.endpoint_id,
            credential=credential,
            ca_file=info.ca_file,
            store=MemorySessionStore(),
        )


def _numbers(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, key) of every number in ``value`` outside :data:`FREE_MAPS`."""
    if isinstance(value, dict):
        for k, v in value.items():
            if path == "" and k in FREE_MAPS:
                continue
            if isinstance(v, int | float) and not isinstance(v, bool):
                yield f"{path}.{k}", k
            else:
                yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")


def _unitless(report: dict[str, Any]) -> list[str]:
    return [
        p
        for p, k in _numbers(report)
        if k not in COUNTS and k not in RATIOS and not k.endswith(("_ms", "_s", "_per_s"))
    ]


async def test_a_real_runs_report_has_units_timings_and_the_parked_poll_apart(sim: Simulator) -> None:
    plan = LoadPlan(
        guests=6, meeting_urls=[sim.info.meeting_url], origin=sim.info.origin, concurrency=3, hold_s=0.3
    )
    result = await run_on(sim, plan)
    report = json.loads(json.dumps(build_report(result.metrics, result.guests, {}, started_at=0.0)))
    assert report["schema"] == REPORT_SCHEMA == "anonjoin.load-report/2"
    assert report["joined"] == 6
    assert _unitless(report) == []
    # every step has its p95
    for name, row in report["steps"].items():
        assert {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"} <= set(row), name
    # the held guests' polls are apart: each guest parks one poll for its hold, released by the leave
    parked, joining = report["steps"][PARKED_POLL], report["steps"]["events"]
    assert parked["count"] == 6
    assert parked["p50_ms"] >= 250  # held about as long as the hold (0.3 s)
    assert joining["count"] >= 6 and joining["max_ms"] < parked["p50_ms"]
    # labelled samples and per-second history
    assert report["join_samples"] and all(set(s) == {"t_s", "join_ms"} for s in report["join_samples"])
    assert report["throughput"][0]["t_s"] == 0
    # per-guest timings, from the start of the run
    for g in report["guest_outcomes"]:
        assert 0 <= g["arrived_at_s"] <= g["joined_at_s"] <= report["duration_s"]
        assert g["join_ms"] > 0 and g["lobby_ms"] == 0
        assert g["join_ms"] <= (g["joined_at_s"] - g["arrived_at_s"]) * 1000 + 1
    assert report["latency"]["join"]["max_ms"] >= max(g["join_ms"] for g in report["guest_outcomes"]) - 1


def test_the_poll_of_a_guest_in_the_meeting_is_the_parked_one() -> None:
    m = Metrics()

    def poll(gid: str, seconds: float, outcome: str = "ok") -> None:
        m.on_step(StepEvent(gid, "events", "end", 1, 200, None, seconds, outcome))  # type: ignore[arg-type]

    poll("a", 0.05)  # connecting: the join's own poll
    m.on_guest(GuestEvent("a", "joined", None, "asi", 0.0))
    poll("a", 30.0)  # held in the meeting
    poll("b", 0.02)  # another guest, still joining
    m.on_guest(GuestEvent("a", "dropped", "Ejected", "asi", 0.0))
    poll("a", 0.03, "retry")  # the rejoin's polls are join polls again
    assert m.steps["events"].count == 2 and m.steps[PARKED_POLL].count == 1
    assert (m.steps[PARKED_POLL].max_ms() or 0) >= 29_000
    assert m.retries[("events", "unknown")] == 1
    m.on_guest(GuestEvent("a", "rejoined", None, "asi", 0.0))
    poll("a", 1.0, "error")
    assert m.step_errors == {PARKED_POLL: 1}
    report = build_report(m, [], {}, started_at=0.0, fail_if=parse_fail_if("p50(events.parked) > 10s"))
    assert report["fail_if"]["breached"] is True
    assert report["steps"][PARKED_POLL]["errors"] == 1


def test_units_on_a_synthetic_report_and_labelled_records() -> None:
    m = Metrics(guests=2)
    m.start()
    m.guest_arrived()
    m.guest_started(0.0)
    m.guest_joined("g1", 0.2, 0.05)
    records = [
        GuestRecord("g1", "a1", "joined", None, 0, "M", arrived_at_s=0.0, joined_at_s=0.2, join_ms=150.0,
                    lobby_ms=50.0),
        GuestRecord("g2", "a2", "cancelled", "not started"),
    ]  # fmt: skip
    report = build_report(m, records, {"hold_s": 5.0}, started_at=0.0)
    assert _unitless(report) == []
    assert report["guest_outcomes"][0]["join_ms"] == 150.0
    assert report["guest_outcomes"][1]["arrived_at_s"] is None
    assert report["latency"]["lobby"]["count"] == 1
    assert report["steps"] == {}


def test_the_html_settings_have_no_python_reprs() -> None:
    settings = {
        "shared_throttle": False,
        "verify": True,
        "faults": None,
        "hold_s": 5.0,
        "ports": [1, 2],
        "nested": {"a": None, "b": True},
        "fail_if": "p95(join) > 2s",
    }
    page = render_html(build_report(Metrics(), [], settings, started_at=0.0))
    table = page[page.index("<h2>Settings</h2>") :]
    for repr_text in ("False", "True", "None", "[1, 2]", "{'a'"):
        assert repr_text not in table, repr_text
    assert "<th>shared_throttle</th><td><code>no</code>" in table
    assert "<th>verify</th><td><code>yes</code>" in table
    assert "<code>1, 2</code>" in table and "<code>a -, b yes</code>" in table
    assert "<code>p95(join) &gt; 2s</code>" in table
    assert "<th>faults</th>" not in table  # unset settings are left out


def test_a_summary_walks_once_and_agrees_with_each_percentile(monkeypatch: pytest.MonkeyPatch) -> None:
    from hdrh.histogram import HdrHistogram

    from anonjoin._load.metrics import LatencyHistogram

    rng = random.Random(7)
    for n in (1, 2, 9, 2000):
        h = LatencyHistogram()
        for _ in range(n):
            h.record(rng.expovariate(8.0))
        expected = {f"p{q:g}_ms": round(h.percentile_ms(q) or 0.0, 3) for q in (50, 90, 95, 99, 99.9, 100)}
        with monkeypatch.context() as patch:
            patch.setattr(HdrHistogram, "get_value_at_percentile", None)  # a walk per percentile: not used
            summary = h.summary((50, 90, 95, 99, 99.9, 100))
        assert {k: summary[k] for k in expected} == expected
        assert summary["count"] == n
