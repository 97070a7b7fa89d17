"""``python -m benchmarks.store`` at a tiny size, so it cannot rot. Not a measurement."""

from __future__ import annotations

import shutil
import subprocess
import sys

from support.processes import ROOT


def test_the_store_benchmark_runs(redis_server: object) -> None:  # the fixture skips/fails like the others
    assert shutil.which("redis-server")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.store", "--ops", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[2:]]
    assert {(r[0], r[1]) for r in rows} >= {("redis", "claim+release"), ("memory", "get-or-create")}
    assert len(rows) == 9


def test_bad_ops_is_one_line() -> None:
    argv = [sys.executable, "-m", "benchmarks.store", "--ops", "1"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "--ops must be at least 10" in proc.stderr
