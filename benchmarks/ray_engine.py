"""The Ray engine against the in-process engine: the same 200-guest plan in 2 shards on one simulator.

``python -m benchmarks.ray_engine [--guests 200] [--rounds 3]`` starts a two-node Ray cluster on this
machine (``ray.cluster_utils.Cluster``, one CPU per node, loopback), and a simulator in this process; then
runs the plan ``--rounds`` times with each engine, alternating, and prints the medians: guests/s over the
run (from the common start to the last guest done), the wall time of ``run_sharded`` (with the engine's
start: for Ray, attaching and placing the actors), ``ray.init``'s attach time, and the cluster's idle RSS.
The cluster is shut down at the end. A measurement, not a test: the machine may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

from anonjoin._cli.common import simulator_settings
from anonjoin._load.ray import RayEngine
from anonjoin._load.runner import LoadPlan
from anonjoin._load.sharded import InProcessEngine, ShardEngine, run_sharded
from anonjoin._load.store import MemorySessionStore
from anonjoin.simulator import Simulator, SimulatorConfig


def _rss_mb(pids: list[int]) -> float:
    import psutil  # type: ignore[import-untyped]

    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _cluster_pids() -> list[int]:
    """Every process of the cluster: children of this process (the nodes' daemons and their workers)."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


_ATTACH = """
import json, os, sys, time, logging
import psutil
t = time.perf_counter(); import ray; imported = time.perf_counter() - t
t = time.perf_counter(); ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
attach = time.perf_counter() - t
rss = psutil.Process().memory_info().rss / 2**20
ray.shutdown()
print(json.dumps({"import_s": imported, "attach_s": attach, "driver_rss_mb": rss}))
"""


def _fresh_attach(address: str) -> dict[str, float]:
    """``import ray`` and ``ray.init(address=...)`` in a new process (as the CLI pays them)."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _ATTACH, address], capture_output=True, text=True, timeout=120, check=True
    )
    out: dict[str, float] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


async def _one(sim: Simulator, engine: ShardEngine, guests: int, hold_s: float) -> dict[str, float]:
    info = sim.info
    plan = LoadPlan(
        guests=guests, meeting_urls=(info.meeting_url,), origin=info.origin, concurrency=20, hold_s=hold_s
    )
    t = time.perf_counter()
    merged = await run_sharded(
        plan,
        engine,
        target=simulator_settings(info, display_name="g"),
        store=MemorySessionStore(),
        shards=2,
        start_slack_s=0.2,
    )
    wall = time.perf_counter() - t
    joined = sum(1 for g in merged.guests if g.outcome == "joined")
    assert joined == guests and not merged.missing, (joined, merged.missing)
    return {"guests_per_s": guests / merged.metrics.duration_s, "wall_s": wall}


async def _main(guests: int, rounds: int, hold_s: float) -> dict[str, Any]:
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    from ray.cluster_utils import Cluster

    t = time.perf_counter()
    node: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster: Any = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=60)
        start_s = time.perf_counter() - t
        idle_rss = _rss_mb(_cluster_pids())
        runs: dict[str, list[dict[str, float]]] = {"in_process": [], "ray": []}
        fresh: list[dict[str, float]] = []
        async with Simulator(SimulatorConfig()) as sim:
            for _ in range(rounds):
                runs["in_process"].append(await _one(sim, InProcessEngine(), guests, hold_s))
                engine = RayEngine(cluster.address, shards=2)
                fresh.append(_fresh_attach(cluster.address))
                runs["ray"].append(await _one(sim, engine, guests, hold_s))
    finally:
        cluster.shutdown()

    def med(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 3)

    return {
        "guests": guests,
        "shards": 2,
        "rounds": rounds,
        "hold_s": hold_s,
        "cluster_start_s": round(start_s, 2),
        "cluster_idle_rss_mb": round(idle_rss),
        "fresh_driver": {  # medians of a new process's import ray, ray.init(address) and its RSS then
            key: round(statistics.median(f[key] for f in fresh), 3)
            for key in ("import_s", "attach_s", "driver_rss_mb")
        },
        "in_process": {
            "guests_per_s": med("in_process", "guests_per_s"),
            "wall_s": med("in_process", "wall_s"),
        },
        "ray": {"guests_per_s": med("ray", "guests_per_s"), "wall_s": med("ray", "wall_s")},
        "ray_over_in_process": round(med("ray", "guests_per_s") / med("in_process", "guests_per_s"), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hold", type=float, default=0.5)
    ns = parser.parse_args()
    print(json.dumps(asyncio.run(_main(ns.guests, ns.rounds, ns.hold)), indent=2))


if __name__ == "__main__":
    main()
