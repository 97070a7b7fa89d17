"""Metrics, the JSON and HTML reports, --fail-if, and the progress display (no network)."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import pytest
from rich.console import Console

from anonjoin import ConfigurationError
from anonjoin._core.events import GuestEvent, Hooks, StepEvent
from anonjoin._load.metrics import Metrics
from anonjoin._load.progress import ProgressDisplay, format_line, pick_mode
from anonjoin._load.report import GuestRecord, MetricSource, build_report, parse_fail_if, write_json
from anonjoin._load.report_html import render_html


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _end(step: str, seconds: float, outcome: str = "ok", reason: str | None = None) -> StepEvent:
    return StepEvent(
        guest_id="g", step=step, phase="end", attempt=1, status=200, retry_reason=reason,  # type: ignore[arg-type]
        duration_s=seconds, outcome=outcome,  # type: ignore[arg-type]
    )  # fmt: skip


def _run(n: int = 100) -> tuple[Metrics, list[GuestRecord]]:
    clock = FakeClock()
    m = Metrics(guests=n, clock=clock, seed=3)
    records: list[GuestRecord] = []
    for i in range(n):
        clock.now = 1000.0 + i * 0.05
        gid = f"g{i}"
        m.guest_arrived()
        m.guest_started(0.001)
        m.on_step(StepEvent(gid, "anon_tokens", "start", 1))
        m.on_step(_end("anon_tokens", 0.010 + i * 0.0001))
        if i % 10 == 0:
            m.on_step(_end("invitations", 0.5, "retry", "status 503"))
        m.on_step(_end("invitations", 0.020))
        if i == 7:
            m.guest_join_failed(gid)
            m.guest_final(gid, "failed", "Denied")
            records.append(GuestRecord(gid, f"asi-{i}", "failed", "Denied"))
            continue
        if i == 8:
            m.on_guest(GuestEvent(gid, "lobby", None, f"asi-{i}", 0.0))
            assert m.in_lobby == 1
        m.guest_joined(gid, 0.100 + (2.0 if i == 8 else 0.0), 2.0 if i == 8 else 0.0)
        if i == 9:
            m.on_guest(GuestEvent(gid, "dropped", "Ejected", f"asi-{i}", 0.0))
            m.on_guest(GuestEvent(gid, "rejoining", None, f"asi-{i}", 0.0))
            m.on_guest(GuestEvent(gid, "rejoined", None, f"asi-{i}", 0.0))
            m.rejoin_took(0.3)
        records.append(GuestRecord(gid, f"asi-{i}", "joined", rejoins=1 if i == 9 else 0))
    clock.now += 1.0
    for r in records:
        if r.outcome == "joined":
            m.guest_final(r.guest_id, "joined")
    return m, records


def test_metrics_count_and_measure() -> None:
    m, _ = _run()
    assert m.first_joins == 99
    assert m.steps["anon_tokens"].count == 100
    assert m.retries[("invitations", "status 503")] == 10
    assert m.rejoins == 1 and m.drops == 1 and m.drops_by_reason["Ejected"] == 1
    assert m.in_lobby == 0
    assert m.joined_now == 99
    assert m.lobby.count == 1
    # lobby time is kept apart: guest 8 waited 2 s in the lobby but its join latency is 100 ms
    assert (m.join.max_ms() or 0) < 101
    p = m.progress()
    assert (p.joined, p.failed, p.retries, p.rejoins) == (99, 1, 10, 1)
    assert p.joins_per_s > 0
    assert "arrived 100/100  joined 99  in meeting 99" in format_line(p)


def test_hooks_chain_to_the_callers_hooks() -> None:
    m = Metrics()
    seen: list[object] = []
    hooks = m.hooks(Hooks(on_step=seen.append, on_guest=seen.append))
    assert hooks.on_step is not None and hooks.on_guest is not None
    hooks.on_step(_end("discover", 0.01))
    hooks.on_guest(GuestEvent("g", "lobby", None, "asi", 0.0))
    assert len(seen) == 2 and m.steps["discover"].count == 1 and m.in_lobby == 1
    plain = m.hooks()
    assert plain.on_step == m.on_step


def test_the_json_report_has_the_promised_keys(tmp_path: Path) -> None:
    m, records = _run()
    settings = {"guests": 100, "client_secret": "s3cr3t", "target": "https://x/?psat=abc.def.ghi"}
    report = build_report(m, records, settings, started_at=1_700_000_000.0)
    for key in (
        "guests", "joined", "failed", "success_rate", "failures_by_reason", "retries_by_reason", "rejoins",
        "duration_s", "joins_per_s", "latency", "steps", "settings",
    ):  # fmt: skip
        assert key in report, key
    assert (report["guests"], report["joined"], report["failed"]) == (100, 99, 1)
    assert report["success_rate"] == 0.99
    assert report["failures_by_reason"] == {"Denied": 1}
    assert report["retries_by_reason"] == {"status 503": 10}
    assert set(report["latency"]["join"]) >= {"p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"}
    assert 99 <= report["latency"]["join"]["p50_ms"] <= 101
    assert set(report["steps"]["anon_tokens"]) >= {"count", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms"}
    assert report["steps"]["invitations"]["retries"] == 10
    assert "client_secret" not in report["settings"]
    assert "abc" not in json.dumps(report["settings"])
    assert len(report["guest_outcomes"]) == 100
    assert report["joins_per_s"] > 0
    path = write_json(tmp_path / "out" / "r.json", report)
    assert json.loads(path.read_text())["joined"] == 99


def test_the_html_report_is_self_contained(tmp_path: Path) -> None:
    m, records = _run()
    report = build_report(
        m, records, {"guests": 100}, started_at=1_700_000_000.0, fail_if=parse_fail_if("success_rate < 0.995")
    )
    page = render_html(report)
    assert page.startswith("<!doctype html>")
    assert page.count("<svg") >= 5
    assert "<script" not in page
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", page)  # no network resources
    assert "--fail-if breached" in page
    assert "Denied" in page
    empty = render_html(build_report(Metrics(), [], {}, started_at=0.0))
    assert "no guest joined" in empty


def test_html_escapes_what_it_shows() -> None:
    m, records = _run(10)
    records[0] = GuestRecord("g0", "a", "failed", "<script>alert(1)</script>")
    report = build_report(m, records, {"display_name": "<b>x</b>"}, started_at=0.0)
    page = render_html(report)
    assert "<script>" not in page and "<b>x</b>" not in page


class Source(MetricSource):
    def __init__(self, **values: float) -> None:
        self.values = values

    def metric(self, name: str) -> float:
        return self.values[name]

    def latency(self, func: str, target: str) -> float:
        return self.values.get(f"{func}({target})", math.nan)


@pytest.mark.parametrize(
    ("expr", "breached"),
    [
        ("success_rate<0.99 or p95(join)>2s", True),
        ("success_rate < 0.99", False),
        ("success_rate < 99.9%", True),
        ("p95(join) > 2s", True),
        ("p95(join) > 2500ms", False),
        ("p95(join) >= 2.1s and failed > 0", True),
        ("p95(join) >= 2.1s and failed > 50", False),
        ("not (joined == 990)", False),
        ("(failed > 100 or rejoins >= 3) and joins_per_s < 50.5", True),
        ("p99(anon_tokens) > 1ms", False),  # no data: never true
        ("max(join) != 1s", False),
        ("failed > joined", False),
        ("duration_s > 10s", True),
    ],
)
def test_fail_if_evaluates(expr: str, breached: bool) -> None:
    src = Source(
        success_rate=0.995, joined=990, failed=10, rejoins=3, joins_per_s=50.0, duration_s=12_000.0,
        **{"p95(join)": 2100.0, "max(join)": 1000.0},
    )  # fmt: skip
    cond = parse_fail_if(expr)
    assert cond.evaluate(src) is breached
    assert bool(cond.explain(src)) is breached


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("", "empty"),
        ("success_rate <", "ends too soon"),
        ("p95(join) > 2000", "give '2000' a unit"),
        ("joined > 2s", "cannot compare"),
        ("success_rate < 2s", "ratio"),
        ("success_rate < 99", "a ratio from 0 to 1: write 0.99 or 99%, not '99'"),
        ("1.5 > success_rate", "a ratio from 0 to 1"),
        ("p95(nope) > 1s", "unknown latency 'nope'"),
        ("latency > 1s", "unknown metric 'latency'"),
        ("p95 > 1s", "needs a target"),
        ("p95(join > 1s", "never closed"),
        ("(joined > 1", "never closed"),
        ("joined > 1 joined", "unexpected 'joined'"),
        ("joined => 1", "cannot read"),
        ("__import__('os') > 1", "cannot read"),
        ("p200(join) > 1s", "bad percentile"),
        ("joined 5", "expected a comparison"),
    ],
)
def test_fail_if_rejects_bad_expressions(expr: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(problem)) as info:
        parse_fail_if(expr)
    assert str(info.value).startswith("--fail-if:")


def test_fail_if_against_a_run() -> None:
    m, records = _run()
    report = build_report(
        m, records, {}, started_at=0.0, fail_if=parse_fail_if("p99(join) > 1s or failed > 0")
    )
    assert report["fail_if"]["breached"] is True
    assert "failed=1 > 0" in report["fail_if"]["detail"]
    ok = build_report(m, records, {}, started_at=0.0, fail_if=parse_fail_if("p50(invitations) > 1s"))
    assert ok["fail_if"] == {
        "expression": "p50(invitations) > 1s",
        "breached": False,
        "detail": "",
        "clauses": [
            {
                "expression": "p50(invitations) > 1s",
                "breached": False,
                "detail": "",
                "values": "p50(invitations)=20.0ms > 1s",
            }
        ],
    }


def test_progress_mode_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert pick_mode(io.StringIO()) == "plain"
    assert pick_mode(Tty()) == "bar"
    monkeypatch.setenv("CI", "true")
    assert pick_mode(Tty()) == "plain"
    assert pick_mode(Tty(), "off") == "off"


async def test_plain_progress_prints_lines() -> None:
    m, _ = _run(10)
    out = io.StringIO()
    display = ProgressDisplay(m, stream=out, mode="plain", interval_s=3600)
    async with display:
        display.update()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the explicit update and the final one
    assert "arrived 10/10  joined 9" in lines[-1]


async def test_bar_progress_renders() -> None:
    m, _ = _run(10)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    async with ProgressDisplay(m, console=console, interval_s=3600) as display:
        assert display.mode == "bar"
    text = out.getvalue()
    assert "joined 9 · in meeting 9" in text and "anonjoin load" in text


def test_check_against_the_services_record() -> None:
    from anonjoin._load.runner import check_against_service

    records = [GuestRecord("g1", "a1", "joined", rejoins=2), GuestRecord("g2", "a2", "failed", "Denied")]
    snapshot = {
        "applications": {"live": 0, "created": 4, "created_by_asi": {"a1": 3, "a2": 1}},
        "meetings": {"M": {"roster": [], "lobby": []}},
        "faults_injected": {"invitations": {"503": 2}},
    }
    ok = check_against_service(records, snapshot)
    assert ok["ok"] is True and ok["rejoined_guests_with_the_same_id"] == 1
    snapshot["applications"]["created_by_asi"] = {"a1": 1, "a2": 1, "stranger": 1}  # type: ignore[index]
    snapshot["meetings"] = {"M": {"roster": ["a2", "a2"], "lobby": []}}
    bad = check_against_service(records, snapshot)
    assert bad["ok"] is False
    assert bad["unknown_application_session_ids"] == 1
    assert bad["duplicate_roster_entries"] == 1
    assert bad["rejoined_guests_with_the_same_id"] == 0  # a1 rejoined twice but the service saw one app
    page = render_html(build_report(Metrics(), records, {}, started_at=0.0, service_check=bad))
    assert "Inconsistent: 1 applicationSessionIds the run never used; 1 rejoined guests" in page


def test_the_mean_is_exact_and_does_not_walk_the_histogram(monkeypatch: pytest.MonkeyPatch) -> None:
    from hdrh.histogram import HdrHistogram

    from anonjoin._load.metrics import LatencyHistogram

    def walk(self: HdrHistogram) -> float:
        raise AssertionError("get_mean_value walks every bucket: some 50 ms a histogram")

    monkeypatch.setattr(HdrHistogram, "get_mean_value", walk)
    h = LatencyHistogram()
    assert h.mean_ms() is None and h.summary()["mean_ms"] is None
    for seconds in (0.001, 0.002, 0.004, 0.0000001):  # the last one clamps to 1 us
        h.record(seconds)
    assert h.mean_ms() == pytest.approx((1000 + 2000 + 4000 + 1) / 4 / 1000)
    assert h.summary()["mean_ms"] == 1.75
    m, records = _run()
    report = build_report(m, records, {}, started_at=1.0)
    assert report["latency"]["join"]["mean_ms"] == 100.0  # every join took 100 ms (less its lobby): exactly
