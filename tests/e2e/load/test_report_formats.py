"""The CSV and JUnit XML reports (``--csv``, ``--junit``), written from the JSON report dict only and read
back here; and ``write_report``."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

import anonjoin
from anonjoin._cli import main
from anonjoin._core.events import StepEvent
from anonjoin._exceptions import ConfigurationError
from anonjoin._load.metrics import Metrics
from anonjoin._load.report import GuestRecord, build_report, parse_fail_if
from anonjoin._load.report_formats import junit_xml, write_csv, write_files, write_junit, write_report
from anonjoin.simulator import Simulator


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _report(fail_if: str | None = None, reason: str = "Denied") -> dict[str, Any]:
    """A run of 10 guests over 3 seconds: 8 joined, 2 failed with ``reason``."""
    clock = FakeClock()
    m = Metrics(guests=10, clock=clock)
    m.start()
    records = []
    for i in range(10):
        clock.now = 100.0 + i * 0.3
        gid = f"g{i}"
        m.guest_arrived()
        m.guest_started(0.0)
        m.on_step(StepEvent(gid, "anon_tokens", "end", 1, 200, None, 0.01 * (i + 1), "ok"))
        if i in (3, 6):
            m.on_step(StepEvent(gid, "invitations", "end", 1, 403, None, 0.02, "error"))
            m.guest_join_failed(gid)
            m.guest_final(gid, "failed", reason)
            records.append(GuestRecord(gid, f"a{i}", "failed", reason))
            continue
        m.on_step(StepEvent(gid, "invitations", "end", 1, 503, "status 503", 0.02, "retry"))
        m.on_step(StepEvent(gid, "invitations", "end", 2, 200, None, 0.05, "ok"))
        m.guest_joined(gid, 0.1 * (i + 1), 0.0)
        records.append(GuestRecord(gid, f"a{i}", "joined"))
    clock.now = 103.0
    for r in records:
        if r.outcome == "joined":
            m.guest_final(r.guest_id, "joined")
    condition = parse_fail_if(fail_if) if fail_if else None
    report = build_report(m, records, {"guests": 10}, started_at=1_700_000_000.0, fail_if=condition)
    back: dict[str, Any] = json.loads(json.dumps(report))  # as read back from the JSON file
    return back


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_csv_stats_and_history_read_back(tmp_path: Path) -> None:
    report = _report()
    stats_path, history_path = write_csv(report, tmp_path / "out" / "run1")
    assert (stats_path.name, history_path.name) == ("run1_stats.csv", "run1_history.csv")
    stats = {(r["kind"], r["name"]): r for r in _rows(stats_path)}
    assert list(_rows(stats_path)[0]) == [
        "kind", "name", "count", "errors", "retries",
        "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms",
    ]  # fmt: skip
    assert set(stats) == {
        ("latency", "join"), ("latency", "lobby"), ("latency", "queue"), ("latency", "rejoin"),
        ("step", "anon_tokens"), ("step", "invitations"),
    }  # fmt: skip
    inv = stats[("step", "invitations")]
    assert (inv["count"], inv["errors"], inv["retries"]) == ("8", "2", "8")
    for key in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"):
        assert float(inv[key]) == report["steps"]["invitations"][key]
    join = stats[("latency", "join")]
    assert join["count"] == "8" and float(join["p95_ms"]) == report["latency"]["join"]["p95_ms"]
    assert join["errors"] == ""  # not a step: no error count
    lobby = stats[("latency", "lobby")]
    assert lobby["count"] == "0" and lobby["p50_ms"] == "" and lobby["max_ms"] == ""  # no data: empty
    history = _rows(history_path)
    assert [int(r["t_s"]) for r in history] == list(range(len(report["throughput"])))
    assert sum(int(r["joins"]) for r in history) == 8
    assert int(history[-1]["joins_total"]) == 8 and int(history[-1]["failures_total"]) == 2
    assert int(history[0]["retries"]) >= 1
    first = report["throughput"][0]
    assert float(history[0]["join_mean_ms"]) == first["join_mean_ms"]


def test_csv_refuses_a_prefix_without_a_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="give a file name prefix"):
        write_csv(_report(), tmp_path / "..")


def _junit(report: dict[str, Any], tmp_path: Path) -> ET.Element:
    path = write_junit(report, tmp_path / "junit.xml")
    return ET.parse(path).getroot()


def test_junit_one_case_per_clause_and_per_failure_reason(tmp_path: Path) -> None:
    reason = 'Denied <b>&"\x01</b>'  # markup and a control character XML cannot hold
    report = _report("failed > 1 or p99(join) > 10s or (joined < 5 and failed > 0)", reason)
    root = _junit(report, tmp_path)
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures")) == ("4", "2")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"anonjoin load.fail_if", "anonjoin load.failures"}
    cases = suites["anonjoin load.fail_if"].findall("testcase")
    assert [c.get("name") for c in cases] == [
        "--fail-if failed > 1",
        "--fail-if p99(join) > 10s",
        "--fail-if joined < 5 and failed > 0",
    ]
    assert suites["anonjoin load.fail_if"].get("failures") == "1"
    breached = cases[0].find("failure")
    assert breached is not None and breached.get("message") == "breached: failed=2 > 1"
    assert cases[1].find("failure") is None
    held = cases[1].find("system-out")
    assert held is not None and held.text is not None and held.text.startswith("not breached: p99(join)=")
    assert cases[2].find("failure") is None
    (reason_case,) = suites["anonjoin load.failures"].findall("testcase")
    assert reason_case.get("name") == 'failed: Denied <b>&"\ufffd</b>'
    failure = reason_case.find("failure")
    assert failure is not None and failure.get("message") == '2 guests failed: Denied <b>&"\ufffd</b>'
    assert float(root.get("time") or 0) == report["duration_s"]


def test_junit_without_thresholds_or_failures(tmp_path: Path) -> None:
    report = _report()
    report["failures_by_reason"] = {}
    root = _junit(report, tmp_path)
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "anonjoin load.failures"
    (case,) = suite.findall("testcase")
    assert case.get("name") == "no guest failed" and case.find("failure") is None
    assert (root.get("tests"), root.get("failures")) == ("1", "0")


def test_junit_from_a_report_without_clauses(tmp_path: Path) -> None:
    report = _report("failed > 1")
    del report["fail_if"]["clauses"]  # an older or hand-made report: the whole expression is one case
    root = _junit(report, tmp_path)
    case = root.find("testsuite/testcase")
    assert case is not None and case.get("name") == "--fail-if failed > 1"
    assert case.find("failure") is not None


def test_the_writes_are_atomic(tmp_path: Path) -> None:
    target = tmp_path / "j.xml"
    target.write_text("old")
    write_junit(_report(), target)
    assert target.read_text().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.xml"]  # no temporary file left
    (tmp_path / "d_stats.csv").mkdir()  # cannot be replaced by a file
    with pytest.raises(ConfigurationError, match="cannot write the report"):
        write_csv(_report(), tmp_path / "d")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert junit_xml(_report()) == target.read_text()


def test_write_report_from_a_result_and_from_a_report(tmp_path: Path) -> None:
    report = _report("failed > 0")
    written = write_files(
        report,
        json=tmp_path / "r.json",
        html=tmp_path / "r.html",
        csv=tmp_path / "r",
        junit=tmp_path / "j.xml",
    )
    assert [p.name for p in written] == ["r.json", "r.html", "r_stats.csv", "r_history.csv", "j.xml"]
    again = write_report(json.loads((tmp_path / "r.json").read_text()), junit=tmp_path / "again.xml")
    assert again == report
    assert (tmp_path / "again.xml").read_text() == (tmp_path / "j.xml").read_text()
    with pytest.raises(ConfigurationError, match="apply to a LoadResult"):
        write_report(report, fail_if="failed > 0")
    old = {**report, "schema": "anonjoin.load-report/1"}
    with pytest.raises(
        ConfigurationError, match=r"schema is 'anonjoin.load-report/1'.* writes anonjoin.load-"
    ):
        write_report(old, json=tmp_path / "old.json")
    assert not (tmp_path / "old.json").exists()


@pytest.mark.usefixtures("no_target_env")
def test_load_writes_csv_and_junit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["load", "--guests", "6", "--hold", "0", "--progress", "off", "--store", ":memory:", "--no-html",
         "--csv", "ci/run", "--junit", "ci/junit.xml", "--fail-if", "failed > 0 or joined < 1000"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 99, out.err
    assert "ci/run_stats.csv" in out.out and "ci/junit.xml" in out.out
    stats = {r["name"]: r for r in _rows(tmp_path / "ci" / "run_stats.csv")}
    assert stats["join"]["count"] == "6" and float(stats["anon_tokens"]["p95_ms"]) > 0
    assert sum(int(r["joins"]) for r in _rows(tmp_path / "ci" / "run_history.csv")) == 6
    root = ET.parse(tmp_path / "ci" / "junit.xml").getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"--fail-if failed > 0", "--fail-if joined < 1000", "no guest failed"}
    assert cases["--fail-if failed > 0"].find("failure") is None
    assert cases["--fail-if joined < 1000"].find("failure") is not None


@pytest.mark.usefixtures("no_target_env")
def test_load_checks_the_csv_and_junit_paths_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    assert main(["load", "--guests", "2", "--progress", "off", "--junit", "file/j.xml"]) == 2
    assert "cannot write the report file/j.xml" in capsys.readouterr().err
    assert main(["load", "--guests", "2", "--progress", "off", "--csv", "file/run"]) == 2
    assert "file is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "anonjoin-report.json").exists()  # refused before the run


async def test_write_report_from_a_load_result(sim: Simulator, tmp_path: Path) -> None:
    info = sim.info
    plan = anonjoin.LoadPlan(guests=4, meeting_urls=[info.meeting_url], origin=info.origin, hold_s=0.0)
    async with anonjoin.ClientSecretCredential(
        authority=info.authority,
        client_id=info.client_id,
        client_secret=info.client_secret,
        scope=info.scope,
        ca_file=info.ca_file,
    ) as credential:
        result = await anonjoin.run_load(
            plan,
            discover_url=info.discover_url,
            endpoint_id=info.endpoint_id,
            credential=credential,
            ca_file=info.ca_file,
            store=anonjoin.MemorySessionStore(),
        )
    assert all(isinstance(g, anonjoin.GuestRecord) for g in result.guests)
    report = anonjoin.write_report(
        result,
        json=tmp_path / "r.json",
        html=tmp_path / "r.html",
        csv=tmp_path / "r",
        junit=tmp_path / "r.xml",
        settings={"guests": 4, "client_secret": info.client_secret},
        fail_if="failed > 0 or p99(join) > 1ms",
    )
    assert report["joined"] == 4 and report["fail_if"]["breached"] is True
    assert json.loads((tmp_path / "r.json").read_text()) == report
    files = ("r.json", "r.html", "r_stats.csv", "r_history.csv", "r.xml")
    assert info.client_secret not in "".join((tmp_path / name).read_text() for name in files)
    assert {r["name"] for r in _rows(tmp_path / "r_stats.csv")} >= {"join", "anon_tokens", "invitations"}
    failures = ET.parse(tmp_path / "r.xml").getroot().findall("testsuite/testcase/failure")
    assert len(failures) == 1 and failures[0].get("message", "").startswith("breached: p99(join)=")
    assert (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    with pytest.raises(ConfigurationError, match="--fail-if"):
        anonjoin.write_report(result, fail_if="nonsense > 1")
