"""The benchmarks at tiny sizes, so the code cannot rot (issue 5). Not a measurement: nothing is timed.

Runs the real command (``python -m benchmarks --smoke``) in a subprocess from the repository root: the
simulator in its own process, each client in its own worker process, the JSON report. Locust is used when
it is installed and skipped with a note when it is not; this test needs neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.processes import ROOT

TIMEOUT_S = 120  # a bound for a hung run; the smoke run itself takes a few seconds


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out), "--markdown", str(md), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "COLUMNS": "160"},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(out.read_text())
    assert md.read_text().startswith("## ")
    return proc, report


def test_smoke_run_serves_the_chain_and_reports(tmp_path: Path) -> None:
    proc, report = _run(tmp_path)
    assert report["mode"] == "smoke"

    summary = report["overhead"]["summary"]
    raw = summary["raw"]
    # The raw client doubles as a check that the simulator serves the whole chain.
    assert raw["failed"] == 0, raw["errors"]
    assert raw["guests_per_s"] > 0 and raw["cpu_ms_per_join"] > 0
    # tokens, anonymous discover, application, invitation, >= 1 event poll, the parked poll, leave
    assert raw["req_per_guest"] >= 7
    for name, figures in summary.items():
        assert figures["failed"] == 0, (name, figures["errors"])
    if "anonjoin" in summary:
        assert summary["anonjoin"]["cpu_vs_raw"] > 0
    skipped = report["overhead"]["skipped"]
    assert ("locust" in summary) != ("locust" in skipped)

    held = report["growth"]["held"]
    assert held["failed"] == 0 and held["joined"] == held["guests"]
    assert held["client_rss_per_guest_kb"] == held["client_rss_per_guest_kb"]  # a number, not NaN

    assert report["capacity"]["req_per_sim_cpu_s"] > 0
    names = [t["name"] for t in report["targets"]]
    assert any("capacity" in n for n in names)
    assert "Targets" in proc.stdout
