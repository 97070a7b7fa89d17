"""``python -m benchmarks.scaling`` at a tiny size, so the code cannot rot (issue 12). Nothing is timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.processes import ROOT

TIMEOUT_S = 240  # a bound for a hung run; the tiny run takes well under a minute


def test_scaling_smoke_runs_one_and_two_workers(tmp_path: Path) -> None:
    out, md = tmp_path / "scaling.json", tmp_path / "scaling.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaling", "--guests", "12", "--concurrency", "4", "--repeats",
         "1", "--out", str(out), "--markdown", str(md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"1", "2"}
    for figures in result["summary"].values():
        assert figures["failed"] == 0 and figures["guests_per_s"] > 0
    assert result["efficiency"] > 0
    assert md.read_text().startswith("## ") and "Scaling efficiency" in md.read_text()
