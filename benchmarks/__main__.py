"""``python -m benchmarks [--quick] [--out FILE]``: every benchmark of issue 5 in one run.

Prints a table per scenario and the targets on stdout, writes every figure (and each repeat) to a JSON
file, and with ``--markdown FILE`` the section to paste into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import pstats
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks._harness import BenchmarkError, loadavg, machine_description, pin_plan, ratio
from benchmarks._scenarios import FULL, QUICK, SMOKE, Env, Sizes, capacity, growth, overhead

SCENARIOS = ("overhead", "growth", "capacity")

# Targets of issue 5.
CPU_VS_RAW_MAX = 1.25
RATE_VS_RAW_MIN = 0.9
RATE_VS_LOCUST_MIN = 1.15
RSS_PER_GUEST_MAX_KB = 50.0
GROWTH_SLOPE_MAX = 1.25  # "flat": the largest point costs at most this much more per join than the smallest
CAPACITY_MIN = 2.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (about a minute)")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the CI smoke test
    p.add_argument("--out", default="benchmark-results.json", help="JSON file (default: %(default)s)")
    p.add_argument("--markdown", metavar="FILE", help="also write the RESULTS.md section to FILE")
    p.add_argument("--only", action="append", choices=SCENARIOS, help="run only these scenarios")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--simulator-cmd",
        help="command that speaks `anonjoin simulate`'s contract (default: python -m anonjoin simulate)",
    )
    p.add_argument(
        "--profile",
        metavar="FILE",
        help="also run anonjoin once more under cProfile (not counted) and write the stats to FILE",
    )
    p.add_argument(
        "--growth",
        help="comma-separated growth sizes, overriding the mode's (the largest is the held-guests run)",
    )
    p.add_argument(
        "--client", default="anonjoin", choices=("anonjoin", "client", "raw"), help="client for growth/held"
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin simulator and clients to cores")
    p.add_argument(
        "--pools",
        type=int,
        default=1,
        help="run the simulator as a front door and N pool processes (`anonjoin simulate --pools N`); "
        "its CPU is summed over every process",
    )
    p.add_argument(
        "--sim-pin",
        default="",
        metavar="CPU,...",
        help="the simulator's --pin (front door, then each pool) instead of the simulator core",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.profile:
        ns.profile = os.path.abspath(ns.profile)  # the worker runs from the repository root
    sizes: Sizes = SMOKE if ns.smoke else QUICK if ns.quick else FULL
    if ns.growth:
        sizes = dataclasses.replace(sizes, growth=tuple(int(n) for n in ns.growth.split(",")))
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=160)
    sim_cpu, client_cpu = (None, None) if ns.no_pin else pin_plan()
    env = Env(
        sim_cpu=sim_cpu,
        client_cpu=client_cpu,
        log=lambda line: console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {line}"),
        seed=ns.seed,
        sim_command=shlex.split(ns.simulator_cmd) if ns.simulator_cmd else None,
        sim_pools=ns.pools,
        sim_pin=tuple(int(c) for c in ns.sim_pin.split(",") if c.strip()),
        reuse_simulator=ns.smoke,
    )
    which = ns.only or list(SCENARIOS)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "command": command.strip(),
        "mode": "smoke" if ns.smoke else "quick" if ns.quick else "full",
        "sizes": dataclasses.asdict(sizes),
        "experiment": env.extra_spec,
        "pinning": {"simulator_cpu": sim_cpu, "client_cpu": client_cpu, "simulator_pin": ns.sim_pin},
        "simulator_pools": ns.pools,
        "loadavg_start": loadavg(),
    }
    env.log(
        f"benchmarks ({report['mode']}) on {report['machine']}; load average {report['loadavg_start']:.2f}"
    )
    t0 = time.perf_counter()
    try:
        if "overhead" in which:
            report["overhead"] = overhead(env, sizes, profile=ns.profile)
        if "growth" in which:
            report["growth"] = growth(env, sizes, client=ns.client)
        if "capacity" in which:
            report["capacity"] = capacity(env, sizes)
    except BenchmarkError as exc:  # the simulator would not start, say: nothing to measure against
        console.print(f"[red]benchmarks: {exc}[/red]")
        return 1
    finally:
        env.close()
    report["failed_runs"] = env.failures
    report["duration_s"] = time.perf_counter() - t0
    report["loadavg_end"] = loadavg()
    report["targets"] = targets(report)
    render(console, report)
    with open(ns.out, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
    console.print(f"JSON written to {ns.out}")
    if ns.profile and os.path.exists(ns.profile):
        stats = pstats.Stats(ns.profile, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(25)
    if ns.markdown:
        with open(ns.markdown, "w") as f:
            f.write(markdown(report))
        console.print(f"RESULTS.md section written to {ns.markdown}")
    return 0


# ---------------------------------------------------------------- targets


def _target(name: str, value: float, op: str, limit: float, note: str = "") -> dict[str, Any]:
    if math.isnan(value):
        ok: bool | None = None
    else:
        ok = value <= limit if op == "<=" else value >= limit
    return {"name": name, "value": value, "op": op, "limit": limit, "ok": ok, "note": note}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    summary = report.get("overhead", {}).get("summary", {})
    aj = summary.get("anonjoin")
    if aj:
        out.append(_target("anonjoin CPU per join vs raw", aj["cpu_vs_raw"], "<=", CPU_VS_RAW_MAX))
        out.append(_target("anonjoin guests/s vs raw", aj["guests_per_s_vs_raw"], ">=", RATE_VS_RAW_MIN))
        if "guests_per_s_vs_locust" in aj:
            out.append(
                _target("anonjoin guests/s vs Locust", aj["guests_per_s_vs_locust"], ">=", RATE_VS_LOCUST_MIN)
            )
    g = report.get("growth")
    if g and g.get("held"):
        held = g["held"]
        out.append(
            _target(
                f"{g['client']} client RSS per held guest (KB, {held['guests']} guests)",
                held.get("client_rss_per_guest_kb", float("nan")),
                "<=",
                RSS_PER_GUEST_MAX_KB,
            )
        )
        out.append(
            _target(
                f"{g['client']} held guests failed to join or lost while held",
                float(held["failed"] + held.get("lost_held", 0)),
                "<=",
                0,
            )
        )
        raw_slope = g.get("raw_slope", float("nan"))
        out.append(
            _target(
                f"{g['client']} CPU per join, largest / smallest size"
                + ("" if math.isnan(raw_slope) else f" (raw client: {raw_slope:.2f})"),
                g["slope"],
                "<=",
                GROWTH_SLOPE_MAX,
                note="flat",
            )
        )
    cap = report.get("capacity")
    if cap and "req_per_sim_cpu_s" in cap and summary:
        client = "anonjoin" if "anonjoin" in summary else "raw"
        reached = summary[client]["req_per_s"]
        value = cap["req_per_sim_cpu_s"] / reached if reached else float("nan")
        out.append(
            _target(
                f"simulator capacity (req per CPU-s) vs {client}'s req/s in overhead",
                value,
                ">=",
                CAPACITY_MIN,
            )
        )
    return out


# ---------------------------------------------------------------- rendering


def _f(v: Any, digits: int = 1) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:,.{digits}f}"
    return str(v)


def _failed(run: dict[str, Any]) -> str:
    lost = int(run.get("lost_held", 0))
    return str(run["failed"]) + (f" (+{lost} lost while held)" if lost else "")


def _ref_label(ref: dict[str, Any]) -> str:
    if ref["client"] == "raw":
        return "raw " + (
            "with anonjoin's LeanTLSConnector" if ref.get("tls") == "lean" else "(aiohttp's connector)"
        )
    return str(ref["client"])


def render(console: Console, report: dict[str, Any]) -> None:
    if "overhead" in report:
        o = report["overhead"]
        t = Table(
            title=f"Client overhead: {o['guests']} guests, concurrency {o['concurrency']}, "
            f"median of {o['repeats']}"
        )
        for col in (
            "client",
            "guests/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/join",
            "req/guest",
            "sim CPU ms/join",
            "guests/s vs raw",
            "CPU vs raw",
            "vs Locust",
            "failed",
        ):
            t.add_column(col, justify="left" if col == "client" else "right")
        for name, s in o["summary"].items():
            t.add_row(
                name,
                _f(s["guests_per_s"]),
                _f(s["p50_ms"]),
                _f(s["p99_ms"]),
                _f(s["cpu_ms_per_join"], 2),
                _f(s["req_per_guest"], 2),
                _f(s["sim_cpu_ms_per_join"], 2),
                _f(s["guests_per_s_vs_raw"], 2),
                _f(s["cpu_vs_raw"], 2),
                _f(s.get("guests_per_s_vs_locust", float("nan")), 2),
                str(s["failed"]),
            )
        console.print(t)
        for name, why in o.get("skipped", {}).items():
            console.print(f"  {name} skipped: {why}")
    if "growth" in report:
        g = report["growth"]
        t = Table(title=f"Growth and held guests ({g['client']}; guests held with polls parked)")
        for col in (
            "guests",
            "CPU ms/join",
            "guests/s",
            "p99 ms",
            "CPU vs smallest",
            "raw CPU ms/join",
            "CPU vs raw",
            "client RSS KB/guest",
            "raw RSS KB/guest",
            "sim RSS KB/guest",
            "failed",
        ):
            t.add_column(col, justify="right")
        for p in g["points"]:
            t.add_row(
                str(p["guests"]),
                _f(p["cpu_ms_per_join"], 2),
                _f(p["guests_per_s"]),
                _f(p["p99_ms"]),
                _f(ratio(p["cpu_ms_per_join"], g["points"][0]["cpu_ms_per_join"]), 2),
                _f(p.get("raw_cpu_ms_per_join", float("nan")), 2),
                _f(p.get("cpu_vs_raw", float("nan")), 2),
                _f(p.get("client_rss_per_guest_kb", float("nan"))),
                _f(p.get("raw_client_rss_per_guest_kb", float("nan"))),
                _f(p.get("sim_rss_per_guest_kb", float("nan"))),
                _failed(p),
            )
        console.print(t)
        for ref in g.get("references", []):
            label = _ref_label(ref)
            console.print(
                f"  reference, {label}, {ref['guests']} held: "
                f"client {_f(ref['client_rss_per_guest_kb'])} KB/guest, "
                f"simulator {_f(ref['sim_rss_per_guest_kb'])} KB/guest, "
                f"CPU {_f(ref['cpu_ms_per_join'], 2)} ms/join"
            )
    if "req_per_sim_cpu_s" in report.get("capacity", {}):
        c = report["capacity"]
        console.print(
            f"Simulator capacity (one core): {_f(c['req_per_s'], 0)} req/s reached with the simulator core "
            f"{_f(c['sim_cpu_util'] * 100, 0)}% busy -> {_f(c['req_per_sim_cpu_s'], 0)} req per CPU-second "
            f"(limit: {c['saturated']})"
        )
    for failure in report.get("failed_runs", []):
        first = failure["error"].splitlines()[0][:200]
        console.print(f"[red]run lost[/red]: {failure['client']} with {failure['guests']} guests: {first}")
    t = Table(title="Targets (issue 5)")
    for col in ("target", "value", "limit", "result"):
        t.add_column(col)
    for tg in report["targets"]:
        result = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "n/a"}[tg["ok"]]
        t.add_row(tg["name"], _f(tg["value"], 2), f"{tg['op']} {tg['limit']}", result)
    console.print(t)
    console.print(
        f"took {report['duration_s']:.0f} s; load average {report['loadavg_start']:.2f} -> "
        f"{report['loadavg_end']:.2f}"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"## {report['date']} ({report['mode']})",
        "",
        f"- Machine: {report['machine']}; load average at start {report['loadavg_start']:.2f}",
        f"- Command: `{report['command']}` ({report['duration_s']:.0f} s)",
        f"- Pinning: simulator on cpu {report['pinning']['simulator_cpu']}, "
        f"clients on cpu {report['pinning']['client_cpu']}"
        + (
            f"; simulator `--pools {report['simulator_pools']}`"
            + (f" `--pin {report['pinning']['simulator_pin']}`" if report["pinning"]["simulator_pin"] else "")
            if report.get("simulator_pools", 1) > 1
            else ""
        ),
        "",
    ]
    if "overhead" in report:
        o = report["overhead"]
        lines += [
            f"Client overhead ({o['guests']} guests, concurrency {o['concurrency']}, "
            f"median of {o['repeats']}):",
            "",
            "| client | guests/s | p50 ms | p99 ms | CPU ms/join | req/guest | guests/s vs raw | CPU vs raw "
            "| guests/s vs Locust | failed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, s in o["summary"].items():
            lines.append(
                f"| {name} | {_f(s['guests_per_s'])} | {_f(s['p50_ms'])} | {_f(s['p99_ms'])} | "
                f"{_f(s['cpu_ms_per_join'], 2)} | {_f(s['req_per_guest'], 2)} | "
                f"{_f(s['guests_per_s_vs_raw'], 2)} | {_f(s['cpu_vs_raw'], 2)} | "
                f"{_f(s.get('guests_per_s_vs_locust', float('nan')), 2)} | {s['failed']} |"
            )
        lines.append("")
    if "growth" in report:
        g = report["growth"]
        lines += [
            f"Growth and held guests ({g['client']}):",
            "",
            "| guests held | CPU ms/join | raw CPU ms/join | CPU vs raw | guests/s | client RSS KB/guest "
            "| raw RSS KB/guest | simulator RSS KB/guest | failed |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in g["points"]:
            lines.append(
                f"| {p['guests']} | {_f(p['cpu_ms_per_join'], 2)} | "
                f"{_f(p.get('raw_cpu_ms_per_join', float('nan')), 2)} | "
                f"{_f(p.get('cpu_vs_raw', float('nan')), 2)} | {_f(p['guests_per_s'])} | "
                f"{_f(p.get('client_rss_per_guest_kb', float('nan')))} | "
                f"{_f(p.get('raw_client_rss_per_guest_kb', float('nan')))} | "
                f"{_f(p.get('sim_rss_per_guest_kb', float('nan')))} | {_failed(p)} |"
            )
        for ref in g.get("references", []):
            label = _ref_label(ref)
            lines.append(
                f"| {ref['guests']} ({label}, reference) | {_f(ref['cpu_ms_per_join'], 2)} | | | "
                f"{_f(ref['guests_per_s'])} | {_f(ref['client_rss_per_guest_kb'])} | | "
                f"{_f(ref['sim_rss_per_guest_kb'])} | {_failed(ref)} |"
            )
        lines.append("")
    if "req_per_sim_cpu_s" in report.get("capacity", {}):
        c = report["capacity"]
        lines += [
            f"Simulator capacity: {_f(c['req_per_s'], 0)} req/s reached, simulator core "
            f"{_f(c['sim_cpu_util'] * 100, 0)}% busy, {_f(c['req_per_sim_cpu_s'], 0)} req per CPU-second "
            f"(limit: {c['saturated']}).",
            "",
        ]
    lines += ["| target | value | limit | result |", "| --- | ---: | ---: | --- |"]
    for tg in report["targets"]:
        result = {True: "met", False: "**missed**", None: "n/a"}[tg["ok"]]
        lines.append(f"| {tg['name']} | {_f(tg['value'], 2)} | {tg['op']} {tg['limit']} | {result} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
