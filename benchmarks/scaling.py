"""``python -m benchmarks.scaling [--guests N] [--repeats R] [--markdown FILE]``: ``--workers`` scaling.

The same plan (``anonjoin load --guests N --concurrency C --hold 0``) run with 1 and with 2 worker
processes against one ``anonjoin simulate`` process, repeats interleaved (1, 2, 1, 2, ...). For each
worker count: guests/s (first joins over the join phase, the report's ``joins_per_s``), the client's CPU
ms per join (parent and workers: ``RUSAGE_CHILDREN`` around the ``anonjoin load`` process, minus a
same-run baseline of a tiny plan with the same workers, which is what starting the processes costs), the
simulator's CPU ms per join and how busy it was (CPU seconds per second of join phase: 1.0 is one core
fully used, the point where it, not the client, is the limit) and how busy the whole machine was
(``/proc/stat``, every process's CPU, the other tenants' too: at the core count, CPU is the limit). The
scaling efficiency is ``guests/s(2) / (2 x guests/s(1))`` of the medians. Not a test: nothing here
passes or fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._harness import SimulatorProcess, loadavg, machine_description, median, ratio

BASELINE_GUESTS = 8
"""The tiny plan whose client CPU is the fixed cost of a run (interpreters, imports, the token)."""
RUN_TIMEOUT_S = 600.0
EFFICIENCY_TARGET = 0.85


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from ``/proc/stat`` (every process's)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _target_flags(info: dict[str, Any]) -> list[str]:
    flags = []
    for key in ("discover_url", "authority", "client_id", "client_secret", "endpoint_id", "meeting_url"):
        flags += [f"--{key.replace('_', '-')}", str(info[key])]
    return [*flags, "--origin", info["origin"], "--ca-file", info["ca_file"], "--scope", info["scope"]]


def load_once(
    sim: SimulatorProcess, workers: int, guests: int, concurrency: int, workdir: Path
) -> dict[str, Any]:
    """One ``anonjoin load`` process against ``sim``; its figures."""
    report_path = workdir / f"w{workers}-{guests}-{time.monotonic_ns()}.json"
    argv = [
        sys.executable, "-m", "anonjoin", "load", "--workers", str(workers), "--guests", str(guests),
        "--concurrency", str(concurrency), "--hold", "0", "--store", ":memory:", "--progress", "off",
        "--report", str(report_path), "--no-html", *_target_flags(sim.info),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    cpu0, sim0, t0 = _cpu_children(), sim.cpu_seconds(), time.perf_counter()
    busy0, _total0 = _machine_busy_s()
    proc = subprocess.run(
        argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    wall = time.perf_counter() - t0
    cpu, sim_cpu = _cpu_children() - cpu0, sim.cpu_seconds() - sim0
    machine_busy = (_machine_busy_s()[0] - busy0) / wall
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks.scaling: anonjoin load exited {proc.returncode}: {proc.stderr[-2000:]}")
    report = json.loads(report_path.read_text())
    report_path.unlink()
    return {
        "workers": workers,
        "guests": guests,
        "joined": report["joined"],
        "failed": report["failed"],
        "guests_per_s": report["joins_per_s"],
        "join_phase_s": report["join_phase_s"],
        "p50_ms": report["join_latency_ms"]["p50"],
        "p99_ms": report["join_latency_ms"]["p99"],
        "client_cpu_s": cpu,
        "sim_cpu_s": sim_cpu,
        "wall_s": wall,
        "machine_busy": machine_busy,
    }


def measure(
    sim: SimulatorProcess, counts: Sequence[int], guests: int, concurrency: int, repeats: int
) -> dict[str, Any]:
    """Every worker count ``repeats`` times (interleaved), each with its same-run baseline."""
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory(prefix="anonjoin-scaling-") as tmp:
        workdir = Path(tmp)
        load_once(sim, 1, BASELINE_GUESTS, concurrency, workdir)  # warm-up: caches, the simulator's
        for r in range(repeats):
            for w in counts:
                base = load_once(sim, w, BASELINE_GUESTS, concurrency, workdir)
                run = load_once(sim, w, guests, concurrency, workdir)
                joins = run["joined"] - base["joined"]
                run["client_cpu_ms_per_join"] = 1000 * (run["client_cpu_s"] - base["client_cpu_s"]) / joins
                run["fixed_client_cpu_s"] = base["client_cpu_s"]
                run["sim_cpu_ms_per_join"] = 1000 * run["sim_cpu_s"] / max(run["joined"], 1)
                run["sim_busy"] = run["sim_cpu_s"] / run["join_phase_s"] if run["join_phase_s"] else 0.0
                runs[w].append(run)
                print(
                    f"  repeat {r + 1}: {w} worker(s): {run['guests_per_s']:.1f} guests/s, "
                    f"{run['client_cpu_ms_per_join']:.2f} client CPU ms/join, "
                    f"simulator {run['sim_busy']:.2f} cores busy, machine {run['machine_busy']:.2f} of "
                    f"{os.cpu_count()} cores busy, {run['failed']} failed",
                    flush=True,
                )
    summary = {
        w: {
            key: median([run[key] for run in rs])
            for key in (
                "guests_per_s",
                "client_cpu_ms_per_join",
                "fixed_client_cpu_s",
                "sim_cpu_ms_per_join",
                "sim_busy",
                "machine_busy",
                "p50_ms",
                "p99_ms",
                "failed",
            )
        }
        for w, rs in runs.items()
    }
    out: dict[str, Any] = {"runs": runs, "summary": summary}
    if 1 in summary and 2 in summary:
        out["efficiency"] = ratio(summary[2]["guests_per_s"], 2 * summary[1]["guests_per_s"])
    return out


def markdown(result: dict[str, Any], ns: argparse.Namespace, when: str, load: float) -> str:
    lines = [
        f"## {when} (scaling: anonjoin load --workers 1 and 2)",
        "",
        f"Machine: {machine_description()}; load average {load:.2f} at the start.",
        f"Command: `python -m benchmarks.scaling --guests {ns.guests} --concurrency {ns.concurrency} "
        f"--repeats {ns.repeats}` (one `anonjoin simulate` process, `--hold 0`, medians of "
        f"{ns.repeats} interleaved repeats).",
        "",
        "| workers | guests/s | client CPU ms/join | fixed client CPU s | simulator CPU ms/join "
        "| simulator cores busy | machine cores busy | p50 ms | p99 ms | failed |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w, s in sorted(result["summary"].items()):
        lines.append(
            f"| {w} | {s['guests_per_s']:.1f} | {s['client_cpu_ms_per_join']:.2f} | "
            f"{s['fixed_client_cpu_s']:.2f} | {s['sim_cpu_ms_per_join']:.2f} | {s['sim_busy']:.2f} | "
            f"{s['machine_busy']:.2f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {s['failed']:.0f} |"
        )
    if "efficiency" in result:
        lines += ["", f"Scaling efficiency guests/s(2) / (2 x guests/s(1)): **{result['efficiency']:.2f}** "
                  f"(target >= {EFFICIENCY_TARGET} where the simulator is not the limit)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
    p.add_argument("--guests", type=int, default=1000, help="guests per run (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=100, help="joins in flight (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="repeats per worker count (default %(default)s)")
    p.add_argument("--workers", default="1,2", help="worker counts (default %(default)s)")
    p.add_argument("--out", help="also write every figure to this JSON file")
    p.add_argument("--markdown", metavar="FILE", help="also write the RESULTS.md section to FILE")
    ns = p.parse_args(argv)
    counts = [int(w) for w in ns.workers.split(",")]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = loadavg()
    print(f"benchmarks.scaling: {machine_description()}; load average {load:.2f}", flush=True)
    with SimulatorProcess(seed=1) as sim:
        result = measure(sim, counts, ns.guests, ns.concurrency, ns.repeats)
    text = markdown(result, ns, when, load)
    print(text, flush=True)
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2, default=str))
    if ns.markdown:
        Path(ns.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
