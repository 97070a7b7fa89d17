"""``python -m benchmarks.startup``: what the CLI costs before and after the work (issue 15, part 6).

Prints, as medians of ``--repeats`` (default 5) runs measured in this one invocation:

* the CPU (user + system) of ``python -c pass``, the interpreter's own start: the baseline;
* the CPU of ``anonjoin join --help`` (a fresh process each run; ``resource.getrusage(RUSAGE_CHILDREN)``
  around it counts that process and nothing else), and its ratio to the baseline;
* the CPU of building the report of a 300-guest run (``build_report`` plus ``render_html``), in this
  process with everything imported beforehand, over metrics fed a fresh synthetic run each time (each
  guest goes through every step of the join, a tenth with a retry, as the runner's hooks would say).

Targets: <= 0.4 s for ``join --help`` and <= 0.15 s for the report. Not part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

HELP_TARGET_S = 0.4
REPORT_TARGET_S = 0.15
GUESTS = 300
STEPS = (
    "aad_token",
    "discover",
    "applications",
    "capabilities",
    "anon_tokens",
    "anon_discover",
    "anon_applications",
    "invitations",
    "events",
    "delete_application",
)


def child_cpu_s(argv: Sequence[str]) -> float:
    """User + system CPU seconds of one run of ``argv`` (a child process, waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=_env(), timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def synthetic_run(guests: int = GUESTS) -> tuple[Any, list[Any]]:
    """Metrics and guest records as a run of ``guests`` guests leaves them (deterministic)."""
    from anonjoin._core.events import StepEvent
    from anonjoin._load.metrics import Metrics
    from anonjoin._load.report import GuestRecord

    now = [1000.0]
    metrics = Metrics(guests=guests, clock=lambda: now[0], seed=1)
    records: list[GuestRecord] = []
    for i in range(guests):
        now[0] = 1000.0 + i * 0.02
        gid = f"g{i}"
        metrics.guest_arrived()
        metrics.guest_started(0.001 * (i % 7))
        for k, step in enumerate(STEPS):
            if step in ("aad_token", "discover", "applications", "capabilities") and i:
                continue  # shared by the guests: once per run
            metrics.on_step(StepEvent(gid, step, "start", 1))  # type: ignore[arg-type]
            if i % 10 == 3 and step == "anon_applications":
                metrics.on_step(
                    StepEvent(gid, step, "end", 1, 503, "status 503", 0.004, "retry")  # type: ignore[arg-type]
                )
            seconds = 0.002 + 0.0003 * k + 0.00001 * (i % 50)
            metrics.on_step(StepEvent(gid, step, "end", 1, 200, None, seconds, "ok"))  # type: ignore[arg-type]
        metrics.guest_joined(gid, 0.03 + 0.0001 * i, 0.0)
        records.append(GuestRecord(gid, f"asi-{i}", "joined"))
    now[0] += 1.0
    for r in records:
        metrics.guest_final(r.guest_id, "joined")
    return metrics, records


def report_cpu_s() -> float:
    """CPU seconds of building the JSON and HTML reports of a fresh synthetic 300-guest run."""
    from anonjoin._load.report import build_report
    from anonjoin._load.report_html import render_html

    metrics, records = synthetic_run()
    start = time.process_time()
    report = build_report(metrics, records, {"guests": GUESTS}, started_at=1.0e9)
    render_html(report)
    return time.process_time() - start


def median_of(repeats: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    runs = [measure() for _ in range(repeats)]
    return statistics.median(runs), runs


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="runs per figure (the median is printed)")
    ns = p.parse_args(argv)
    if ns.repeats < 1:
        p.error("--repeats must be >= 1")
    py = sys.executable
    baseline, base_runs = median_of(ns.repeats, lambda: child_cpu_s([py, "-c", "pass"]))
    helped, help_runs = median_of(ns.repeats, lambda: child_cpu_s([py, "-m", "anonjoin", "join", "--help"]))
    report, report_runs = median_of(ns.repeats, report_cpu_s)
    rows = [
        ("python -c pass (baseline)", baseline, base_runs, None),
        ("anonjoin join --help", helped, help_runs, HELP_TARGET_S),
        (f"report of a {GUESTS}-guest run", report, report_runs, REPORT_TARGET_S),
    ]
    print(f"CPU seconds (user + system), median of {ns.repeats}")
    for label, value, runs, target in rows:
        verdict = (
            "" if target is None else f"  target <= {target:g} s: {'ok' if value <= target else 'MISSED'}"
        )
        each = " ".join(f"{r:.3f}" for r in runs)
        print(f"  {label:<30} {value:7.3f} s   (runs: {each}){verdict}")
    ratio = helped / baseline if baseline > 0 else float("inf")
    print(f"  join --help / baseline         {ratio:7.2f} x")
    return 0 if helped <= HELP_TARGET_S and report <= REPORT_TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
