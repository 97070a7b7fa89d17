"""``python -m benchmarks.embedded [--repeats 3] [--guests 300,2000]``: the README main job, in-process vs
its own processes.

Runs ``anonjoin load`` (its defaults, no target: the embedded simulator) with
``ANONJOIN_EMBEDDED_SIMULATOR=in-process`` (the simulator in the client's event loop, as before issue 14)
and ``=processes`` (the simulator in its own process, the default on a machine with more than one core),
alternating the two, ``--repeats`` times for each guest count. Each run's figures come from its JSON
report: wall time (the whole command, start-up and the hold included), the join phase, joins/s and the p50
join latency, and the CPU seconds of the client and its simulator together (``RUSAGE_CHILDREN``: the
simulator process is the client's child, reaped by it). Prints the median of each and the ratios
in-process / processes (>1: the processes are better), each the median over the repeats of the ratio of a
pair of runs made back to back (the machine's load drifts between pairs much more than within one).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODES = ("in-process", "processes")
RUN_TIMEOUT_S = 600.0


def _p50_join_ms(report: dict[str, Any]) -> float:
    """The p50 join latency of a load report (schema 2: ``latency.join.p50_ms``; schema 1 before it)."""
    if "latency" in report:
        return float(report["latency"]["join"]["p50_ms"])
    return float(report["latency"]["join"]["p50_ms"])


def run_once(mode: str, guests: int, workdir: Path) -> dict[str, float]:
    report = workdir / f"report-{mode}-{guests}.json"
    env = {**os.environ, "ANONJOIN_EMBEDDED_SIMULATOR": mode}
    cmd = [sys.executable, "-m", "anonjoin", "load", "--guests", str(guests), "--store", ":memory:"]
    cmd += ["--progress", "off", "--report", str(report), "--html", str(workdir / "report.html")]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=workdir, check=True, timeout=RUN_TIMEOUT_S, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    data: dict[str, Any] = json.loads(report.read_text())
    if data["joined"] != guests:
        raise SystemExit(f"benchmarks.embedded: {mode}: {data['joined']} of {guests} guests joined")
    return {
        "wall_s": wall,
        "join_phase_s": float(data["join_phase_s"]),
        "joins_per_s": float(data["joins_per_s"]),
        "p50_ms": _p50_join_ms(data),
        "cpu_ms_per_guest": cpu * 1000 / guests,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.embedded", description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="runs of each mode per guest count (default 3)")
    p.add_argument("--guests", default="300,2000", help="guest counts, comma-separated (default 300,2000)")
    p.add_argument("--out", default="", help="write the runs and medians as JSON here")
    ns = p.parse_args(argv)
    counts = [int(n) for n in ns.guests.split(",") if n.strip()]
    print(f"cores usable: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f}")
    out: dict[str, Any] = {"repeats": ns.repeats, "loadavg_start": os.getloadavg()[0], "runs": {}}
    with tempfile.TemporaryDirectory(prefix="anonjoin-bench-") as tmp:
        for guests in counts:
            runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for i in range(ns.repeats):
                order = MODES if i % 2 == 0 else MODES[::-1]  # alternate which mode goes first
                for mode in order:
                    r = run_once(mode, guests, Path(tmp))
                    runs[mode].append(r)
                    print(
                        f"{guests} guests, {mode:10}: wall {r['wall_s']:.2f} s, join phase "
                        f"{r['join_phase_s']:.2f} s, {r['joins_per_s']:.1f} joins/s, "
                        f"p50 {r['p50_ms']:.0f} ms, CPU {r['cpu_ms_per_guest']:.1f} ms/guest",
                        flush=True,
                    )
            medians = {
                mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()
            }
            pairs = list(zip(runs["in-process"], runs["processes"], strict=True))
            paired = {k: statistics.median(b[k] / a[k] for b, a in pairs) for k in runs["processes"][0]}
            print(f"{guests} guests, medians of {ns.repeats}:")
            print("| embedded simulator | wall s | join phase s | joins/s | p50 join ms | CPU ms/guest |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for mode in MODES:
                m = medians[mode]
                print(
                    f"| {mode} | {m['wall_s']:.2f} | {m['join_phase_s']:.2f} | {m['joins_per_s']:.1f} "
                    f"| {m['p50_ms']:.0f} | {m['cpu_ms_per_guest']:.1f} |"
                )
            print(
                f"paired ratios in-process / processes (median of {ns.repeats}): join phase "
                f"{paired['join_phase_s']:.2f}, p50 {paired['p50_ms']:.2f}, wall {paired['wall_s']:.2f}, "
                f"CPU per guest {paired['cpu_ms_per_guest']:.2f}"
            )
            out["runs"][str(guests)] = {"runs": runs, "medians": medians, "paired_ratios": paired}
    out["loadavg_end"] = os.getloadavg()[0]
    if ns.out:
        Path(ns.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
