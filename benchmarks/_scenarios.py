"""The scenarios of issue 5, each a function returning plain JSON-able dicts.

1. overhead  : raw baseline vs anonjoin's runner ("anonjoin"), anonjoin's Client under the raw client's
               driver ("client": the client's cost without the runner's) and Locust; same simulator,
               same guests, same concurrency, repeats interleaved.
2. held      : guests joined and held with polls parked: client and simulator RSS per guest.
3. growth    : CPU ms per join at growing numbers of live guests (the largest point is the held run).
4. capacity  : requests/s of the join mix the simulator sustains on one core.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks._harness import (
    BenchmarkError,
    SimulatorProcess,
    Worker,
    count_delta,
    median,
    ratio,
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    guests: int  # per overhead run
    concurrency: int
    repeats: int
    growth: tuple[int, ...]  # the largest is also the held-guests run
    capacity_guests: int
    capacity_concurrency: int
    # (client, guests or 0 for the held size, TLS connector "stock" or "lean"): held runs not used for the
    # targets, e.g. the raw client with anonjoin's LeanTLSConnector (what any aiohttp client costs per held
    # connection without asyncio's per-connection TLS read buffer).
    held_references: tuple[tuple[str, int, str], ...] = (("raw", 0, "lean"),)
    growth_baseline: bool = True  # also hold the raw client at each growth size
    warmup: int = 1
    worker_timeout_s: float = 60.0  # a worker run's time limit: this plus the next per guest
    worker_timeout_per_guest_s: float = 0.05


FULL = Sizes(
    guests=1000,
    concurrency=200,
    repeats=3,
    growth=(100, 1000, 10_000),
    capacity_guests=3000,
    capacity_concurrency=400,
)
QUICK = Sizes(
    guests=300,
    concurrency=50,
    repeats=2,
    growth=(20, 100, 200),
    capacity_guests=600,
    capacity_concurrency=100,
)
SMOKE = Sizes(
    guests=4,
    concurrency=2,
    repeats=1,
    growth=(3,),
    growth_baseline=False,
    capacity_guests=6,
    capacity_concurrency=3,
    worker_timeout_s=60.0,
)


def locust_available() -> bool:
    """Whether Locust is installed, without importing it here (its import monkey-patches the process)."""
    return importlib.util.find_spec("locust") is not None


def anonjoin_client_available() -> bool:
    return hasattr(importlib.import_module("anonjoin"), "Client")


def anonjoin_runner_available() -> bool:
    try:
        return hasattr(importlib.import_module("anonjoin._load.runner"), "run_load")
    except ImportError:
        return False


@dataclass
class Env:
    """What every scenario needs: the simulator command, the cores, a log line printer."""

    sim_cpu: int | None
    client_cpu: int | None
    log: Log
    seed: int = 1
    sim_command: Sequence[str] | None = None
    extra_spec: dict[str, Any] = field(default_factory=dict)  # experiment knobs passed to every worker

    sim_pools: int = 1  # --pools N of the simulator
    sim_pin: Sequence[int] = ()  # --pin of the simulator (front door, then pools), instead of sim_cpu
    reuse_simulator: bool = False  # smoke runs: one simulator for every scenario (saves start-ups)
    failures: list[dict[str, Any]] = field(default_factory=list)  # runs that did not complete, in full
    _shared: SimulatorProcess | None = None

    @contextlib.contextmanager
    def simulator(self) -> Iterator[SimulatorProcess]:
        """A fresh simulator for one measurement (or the shared one when ``reuse_simulator``)."""
        if self.reuse_simulator and self._shared is not None:
            yield self._shared
            return
        sim = SimulatorProcess(
            seed=self.seed, cpu=self.sim_cpu, command=self.sim_command, pools=self.sim_pools, pin=self.sim_pin
        )
        sim.start()
        if self.reuse_simulator:
            self._shared = sim
            yield sim
            return
        try:
            yield sim
        finally:
            sim.stop()

    def close(self) -> None:
        if self._shared is not None:
            self._shared.stop()
            self._shared = None


def run_client(env: Env, sim: SimulatorProcess, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One worker run against ``sim``, with the simulator's counters read around the measured section."""
    spec = {**env.extra_spec, **spec, "info": sim.info}
    worker = Worker(spec, cpu=env.client_cpu, timeout_s=timeout_s)
    worker.start()
    try:
        event = worker.next_event()
        if event.get("event") != "armed":
            raise BenchmarkError(f"worker {spec['client']}: expected 'armed', got {event}")
        req0, cpu0, rss0 = sim.request_counts(), sim.cpu_seconds(), sim.rss_bytes()
        worker.send("go")
        event = worker.next_event()
        held: dict[str, Any] = {}
        if event.get("event") == "ready":
            held = {
                "sim_rss_base": rss0,
                "sim_rss_held": sim.rss_bytes(),
                "sim_cpu_join_s": sim.cpu_seconds() - cpu0,
                "sim_requests_by_route": count_delta(sim.request_counts(), req0),
            }
            worker.send("leave")
            event = worker.next_event()
        if event.get("event") != "result":
            raise BenchmarkError(f"worker {spec['client']}: expected a result, got {event}")
        result = dict(event)
        result.pop("event", None)
        result["sim_cpu_s"] = held.pop("sim_cpu_join_s", None) or (sim.cpu_seconds() - cpu0)
        by_route = held.pop("sim_requests_by_route", None) or count_delta(sim.request_counts(), req0)
        result["sim_requests_by_route"] = by_route
        result["sim_requests"] = sum(by_route.values())
        result.update(held)
        return derive(result)
    finally:
        worker.close()


def try_client(env: Env, sim: SimulatorProcess, spec: dict[str, Any], sizes: Sizes) -> dict[str, Any] | None:
    """:func:`run_client` with a time limit scaled to the guests; a failed run is logged, not fatal."""
    timeout = sizes.worker_timeout_s + int(spec["guests"]) * sizes.worker_timeout_per_guest_s
    try:
        return run_client(env, sim, spec, timeout)
    except BenchmarkError as exc:
        text = str(exc)
        env.failures.append({"client": spec["client"], "guests": spec["guests"], "error": text})
        env.log(f"[red]{spec['client']} run with {spec['guests']} guests failed[/red]: {text[:400]}")
        return None


def derive(r: dict[str, Any]) -> dict[str, Any]:
    joined = max(int(r["joined"]), 1)
    wall = max(float(r["wall_s"]), 1e-9)
    r["guests_per_s"] = r["joined"] / wall
    r["cpu_ms_per_join"] = r["cpu_s"] * 1000 / joined
    r["p50_ms"] = r["latency_ms"]["p50"]
    r["p99_ms"] = r["latency_ms"]["p99"]
    r["req_per_guest"] = r["sim_requests"] / max(int(r["guests"]), 1)
    r["req_per_s"] = r["sim_requests"] / wall
    r["sim_cpu_ms_per_join"] = r["sim_cpu_s"] * 1000 / joined
    r["cpu_util"] = r["cpu_s"] / wall
    r["sim_cpu_util"] = r["sim_cpu_s"] / wall
    if "rss_held" in r:
        r["client_rss_per_guest_kb"] = (r["rss_held"] - r["rss_base"]) / joined / 1024
    if "sim_rss_held" in r:
        r["sim_rss_per_guest_kb"] = (r["sim_rss_held"] - r["sim_rss_base"]) / joined / 1024
    return r


FIGURES = (
    "guests_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_ms_per_join",
    "req_per_guest",
    "req_per_s",
    "sim_cpu_ms_per_join",
    "cpu_util",
    "sim_cpu_util",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each figure over the repeats, plus the totals of failures."""
    out: dict[str, Any] = {k: median([float(r[k]) for r in runs if k in r]) for k in FIGURES}
    out["repeats"] = len(runs)
    out["failed"] = sum(int(r["failed"]) for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + int(v)
    out["errors"] = errors
    return out


def paired_ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float:
    """Median over the repeats both completed of ``run[key] / base_run[key]``."""
    by_repeat = {b["repeat"]: b for b in base}
    return median([ratio(r[key], by_repeat[r["repeat"]][key]) for r in runs if r["repeat"] in by_repeat])


# ---------------------------------------------------------------- 1. overhead (and the Locust peer)


def overhead(env: Env, sizes: Sizes, profile: str | None = None) -> dict[str, Any]:
    clients = ["raw"]
    skipped: dict[str, str] = {}
    if anonjoin_runner_available():
        clients.append("anonjoin")
    else:
        skipped["anonjoin"] = "anonjoin._load.runner.run_load is not importable"
    if anonjoin_client_available():
        clients.append("client")
    else:
        skipped["client"] = "anonjoin.Client is not importable"
    if locust_available():
        clients.append("locust")
    else:
        skipped["locust"] = "Locust is not installed (pip install 'anonjoin[bench]')"
    for name, why in skipped.items():
        env.log(f"overhead: {name} skipped: {why}")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in clients}
    lost: dict[str, int] = {}  # runs that failed to complete, by client
    with env.simulator() as sim:
        for rep in range(sizes.repeats):
            for client in clients:  # interleaved: a drift of the machine hits every client alike
                spec = {
                    "client": client,
                    "guests": sizes.guests,
                    "concurrency": sizes.concurrency,
                    "warmup": sizes.warmup,
                }
                r = try_client(env, sim, spec, sizes)
                if r is None:
                    lost[client] = lost.get(client, 0) + 1
                    continue
                r["repeat"] = rep
                runs[client].append(r)
                env.log(
                    f"overhead {rep + 1}/{sizes.repeats} {client:8s} {r['guests_per_s']:8.1f} guests/s  "
                    f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                    f"cpu {r['cpu_ms_per_join']:6.2f} ms/join  req/guest {r['req_per_guest']:.2f}  "
                    f"failed {r['failed']}"
                )
        if profile and "anonjoin" in clients:
            spec = {
                "client": "anonjoin",
                "guests": sizes.guests,
                "concurrency": sizes.concurrency,
                "warmup": sizes.warmup,
                "profile": profile,
            }
            try_client(env, sim, spec, sizes)
            env.log(f"overhead: profile of one extra anonjoin run (not counted) written to {profile}")
    summary = {c: summarize(rs) for c, rs in runs.items()}
    for c, s in summary.items():
        # Ratios pair each run with the baseline's run of the same repeat (they ran back to back), then
        # take the median: steadier than a ratio of medians when the shared machine drifts.
        s["guests_per_s_vs_raw"] = paired_ratio(runs[c], runs["raw"], "guests_per_s")
        s["cpu_vs_raw"] = paired_ratio(runs[c], runs["raw"], "cpu_ms_per_join")
        if "locust" in summary:
            s["guests_per_s_vs_locust"] = paired_ratio(runs[c], runs["locust"], "guests_per_s")
    return {
        "guests": sizes.guests,
        "concurrency": sizes.concurrency,
        "repeats": sizes.repeats,
        "summary": summary,
        "runs": runs,
        "skipped": skipped,
        "lost_runs": lost,
    }


# ---------------------------------------------------------------- 2+3. growth, whose largest point is held


def growth(env: Env, sizes: Sizes, client: str = "anonjoin") -> dict[str, Any]:
    """Join N guests and hold them (polls parked) for each N; a fresh simulator per point.

    The cost per join is the worker's CPU from the first join to the last, divided by the joins; with every
    guest kept live, any per-guest work that grows with the number of live guests shows as a slope.
    The largest point doubles as the held-guests run: RSS per guest of the client and of the simulator.
    """
    if client == "anonjoin" and not anonjoin_runner_available():
        env.log("growth/held: anonjoin's runner is not importable; measuring the raw client instead")
        client = "raw"
    points = [p for n in sizes.growth if (p := held_run(env, sizes, client, n)) is not None]
    # The raw client at the same sizes: what holding more TLS connections costs any client (kernel,
    # epoll, memory), so a slope of anonjoin's own shows as a slope of the ratio.
    baseline: dict[int, dict[str, Any]] = {}
    if client != "raw" and sizes.growth_baseline:
        for n in sizes.growth:
            if (b := held_run(env, sizes, "raw", n)) is not None:
                baseline[n] = b
    for p in points:
        b = baseline.get(int(p["guests"]))
        p["raw_cpu_ms_per_join"] = b["cpu_ms_per_join"] if b else float("nan")
        p["raw_client_rss_per_guest_kb"] = (
            b.get("client_rss_per_guest_kb", float("nan")) if b else float("nan")
        )
        p["cpu_vs_raw"] = ratio(p["cpu_ms_per_join"], p["raw_cpu_ms_per_join"])
    # References, not used for the targets: the raw client with anonjoin's LeanTLSConnector shows what a
    # bare aiohttp client costs per held guest once asyncio's 256 KiB per-connection TLS read buffer is
    # gone, so the gap between it and anonjoin is anonjoin's own.
    largest = max(sizes.growth) if sizes.growth else 0
    references = [
        p
        for ref_client, n, tls in sizes.held_references
        if (p := held_run(env, sizes, ref_client, n or largest, tls)) is not None
    ]
    cpu = [p["cpu_ms_per_join"] for p in points]
    raw_cpu = [b["cpu_ms_per_join"] for b in baseline.values()]
    return {
        "client": client,
        "points": points,
        "baseline": list(baseline.values()),
        "cpu_ms_per_join": {str(p["guests"]): p["cpu_ms_per_join"] for p in points},
        "slope": ratio(cpu[-1], cpu[0]) if cpu else float("nan"),
        "raw_slope": ratio(raw_cpu[-1], raw_cpu[0]) if len(raw_cpu) == len(cpu) and cpu else float("nan"),
        "held": points[-1] if points else {},
        "references": references,
    }


def held_run(env: Env, sizes: Sizes, client: str, n: int, tls: str = "stock") -> dict[str, Any] | None:
    """Join ``n`` guests with ``client`` and hold them (polls parked) against a fresh simulator.

    ``tls``: the raw client's connector, aiohttp's ("stock") or anonjoin's ``LeanTLSConnector`` ("lean").
    anonjoin always uses its own (``LeanTLSConnector``, its default), so ``tls`` does not change it.
    """
    fit = guests_that_fit(n)
    if fit < n:
        env.log(
            f"held: {n} guests need about {n * HELD_BYTES_PER_GUEST >> 20} MiB (client and simulator) "
            f"and only {mem_available() >> 20} MiB are available: holding {fit} instead"
        )
        n = fit
    spec: dict[str, Any] = {
        "client": client,
        "guests": n,
        "concurrency": sizes.concurrency,
        "hold": True,
        "warmup": sizes.warmup,
    }
    if tls != "stock":
        spec["tls"] = tls
    with env.simulator() as sim:
        r = try_client(env, sim, spec, sizes)
    if r is None:
        return None
    r["tls"] = tls if client == "raw" else "lean"
    label = client + (" (LeanTLSConnector)" if client == "raw" and tls == "lean" else "")
    env.log(
        f"held {label} {n:6d} guests: cpu {r['cpu_ms_per_join']:6.2f} ms/join  "
        f"{r['guests_per_s']:7.1f} guests/s  "
        f"client rss {r.get('client_rss_per_guest_kb', 0):6.1f} KB/guest  "
        f"sim rss {r.get('sim_rss_per_guest_kb', 0):6.1f} KB/guest  failed {r['failed']}"
    )
    return r


# Client + simulator per held guest, the worst case measured: the raw client on aiohttp's stock connector
# (about 370 KB: asyncio's 256 KiB TLS read buffer per connection) plus the simulator (about 120 KB).
HELD_BYTES_PER_GUEST = 600_000


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0  # pragma: no cover


def guests_that_fit(n: int) -> int:
    """``n``, or fewer when holding ``n`` guests would use more than 80% of the available memory."""
    room = int(mem_available() * 0.8) // HELD_BYTES_PER_GUEST
    return max(1, min(n, room))


# ---------------------------------------------------------------- 4. simulator capacity


def capacity(env: Env, sizes: Sizes) -> dict[str, Any]:
    """The raw client (the cheapest generator) drives the join mix at high concurrency from the other core.

    Reported: the rate reached, the simulator's CPU utilisation of its core while doing it, and requests
    per simulator CPU-second, which is the rate it sustains on one fully used core. When the simulator's
    core is not saturated the generator was the limit and the rate reached is a lower bound.
    """
    with env.simulator() as sim:
        spec = {
            "client": "raw",
            "guests": sizes.capacity_guests,
            "concurrency": sizes.capacity_concurrency,
            "warmup": sizes.warmup,
        }
        got = try_client(env, sim, spec, sizes)
    if got is None:
        return {"error": "the capacity run failed"}
    r = got
    per_cpu_s = ratio(r["sim_requests"], r["sim_cpu_s"])
    out = {
        "guests": sizes.capacity_guests,
        "concurrency": sizes.capacity_concurrency,
        "req_per_s": r["req_per_s"],
        "sim_cpu_util": r["sim_cpu_util"],
        "generator_cpu_util": r["cpu_util"],
        "req_per_sim_cpu_s": per_cpu_s,
        "saturated": "simulator" if r["sim_cpu_util"] >= 0.9 else "generator",
        "run": r,
    }
    env.log(
        f"capacity: {r['req_per_s']:.0f} req/s reached; simulator core {r['sim_cpu_util'] * 100:.0f}% busy, "
        f"generator {r['cpu_util'] * 100:.0f}%; {per_cpu_s:.0f} req per simulator CPU-second"
    )
    return out
