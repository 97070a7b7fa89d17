"""The asyncio side of a worker: one driver loop, the same for every asyncio client.

Each client is an adapter with ``setup`` (shared, once), ``join`` (one guest, returns a handle once the
guest is joined with its poll parked) and ``leave``. The driver is identical for all of them: a semaphore of
``concurrency``, every guest started at once, join latency measured from the moment a guest gets its slot
(so queueing for the semaphore is not counted) to the moment its join returns. Without ``hold`` a guest
leaves inside its slot right after joining (the leave is part of the CPU per join, not of the latency).
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from anonjoin import Client, Guest, GuestEvent, Hooks
from anonjoin._async.auth import ClientSecretCredential
from anonjoin._exceptions import redact
from anonjoin._load.runner import LoadPlan, LoadResult, LoadRunner, run_load
from benchmarks._chain import Target
from benchmarks._harness import percentile, self_rss_bytes
from benchmarks._raw import RawClient, RawGuest

SETTLE_S = 1.0  # let the last parked polls reach the server before RSS is read
HOLD_S = 24 * 3600.0  # a held runner run holds until told to leave
MAX_TASK_DUMPS = 20  # SIGUSR2 prints at most this many task stacks


def pool_size(concurrency: int, held: int) -> int:
    """Connections for ``concurrency`` guests in flight plus ``held`` parked polls.

    A guest in its slot can hold two connections at once (its parked poll and its leave), so a pool of
    exactly ``concurrency`` could starve; both asyncio clients get the same ``2 * concurrency + held``.
    """
    return 2 * concurrency + held


class Adapter(Protocol):
    async def open(self) -> None: ...
    async def setup(self) -> None: ...
    async def join(self, name: str) -> Any: ...
    async def leave(self, handle: Any) -> None: ...
    async def close(self) -> None: ...


class RawAdapter:
    def __init__(self, target: Target, concurrency: int, held: int, *, lean_tls: bool = False) -> None:
        self.client = RawClient(target, pool_size(concurrency, held), lean_tls=lean_tls)

    async def open(self) -> None:
        await self.client.__aenter__()

    async def setup(self) -> None:
        await self.client.setup()

    async def join(self, name: str) -> RawGuest:
        return await self.client.join(name)

    async def leave(self, handle: RawGuest) -> None:
        await self.client.leave(handle)

    async def close(self) -> None:
        await self.client.__aexit__()


class AnonjoinAdapter:
    """anonjoin's public ``Client`` under this driver: ``client.join(...)`` then ``guest.leave()`` per guest.

    Beside the runner (the "anonjoin" client), this isolates the client's own cost from the runner's.
    """

    def __init__(self, info: dict[str, Any], concurrency: int, held: int) -> None:
        self.info = info
        self.credential = _credential(info)
        self.client = Client(
            discover_url=info["discover_url"],
            endpoint_id=info["endpoint_id"],
            credential=self.credential,
            ca_file=info["ca_file"],
            max_connections=pool_size(concurrency, held),
        )

    async def open(self) -> None:
        await self.client.__aenter__()

    async def setup(self) -> None:
        await self.credential.token()  # the AAD token, once, before the measured section

    async def join(self, name: str) -> Guest:
        return await self.client.join(
            meeting_url=self.info["meeting_url"], origin=self.info["origin"], display_name=name
        )

    async def leave(self, handle: Guest) -> None:
        await handle.leave()

    async def close(self) -> None:
        await self.client.aclose()
        await self.credential.aclose()


def _credential(info: dict[str, Any]) -> ClientSecretCredential:
    return ClientSecretCredential(
        authority=info["authority"],
        client_id=info["client_id"],
        client_secret=info["client_secret"],
        scope=info["scope"],
        ca_file=info["ca_file"],
    )


def make_adapter(spec: dict[str, Any]) -> Adapter:
    held = int(spec["guests"]) if spec.get("hold") else 0
    concurrency = int(spec["concurrency"])
    if spec["client"] == "raw":
        lean = spec.get("tls") == "lean"
        return RawAdapter(Target.from_info(spec["info"]), concurrency, held, lean_tls=lean)
    if spec["client"] == "client":
        return AnonjoinAdapter(spec["info"], concurrency, held)
    raise ValueError(f"unknown asyncio client {spec['client']!r}")


def _reason(exc: BaseException) -> str:
    return redact(f"{type(exc).__name__}: {exc}")[:120]


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _result(
    spec: dict[str, Any],
    joined: int,
    errors: dict[str, int],
    wall: float,
    cpu: float,
    lat_ms: dict[str, float],
) -> dict[str, Any]:
    guests = int(spec["guests"])
    return {
        "client": spec["client"],
        "guests": guests,
        "concurrency": int(spec["concurrency"]),
        "joined": joined,
        "failed": guests - joined,
        "errors": errors,
        "wall_s": wall,
        "cpu_s": cpu,
        "latency_ms": lat_ms,
    }


async def run_anonjoin_runner(
    spec: dict[str, Any], *, emit: Callable[..., None], wait_for: Callable[[str], None]
) -> dict[str, Any]:
    """anonjoin's load runner (``run_load``, as ``anonjoin load`` uses it), same guests and concurrency.

    The runner holds a slot from a guest's first request until it is joined, then (``hold_s=0``) the guest
    leaves outside the slot; its join latency (arrival = slot free -> joined) is read from its metrics.
    A held run keeps ``hold_s`` long and calls ``cancel()`` (every held guest leaves) when told to.
    """
    info = spec["info"]
    guests, concurrency = int(spec["guests"]), int(spec["concurrency"])
    hold = bool(spec.get("hold"))
    credential = _credential(info)

    async def load(p: LoadPlan, **kw: Any) -> LoadResult:
        return await run_load(
            p,
            discover_url=info["discover_url"],
            endpoint_id=info["endpoint_id"],
            credential=credential,
            ca_file=info["ca_file"],
            **kw,
        )

    def plan(n: int, hold_s: float) -> LoadPlan:
        return LoadPlan(
            guests=n,
            meeting_urls=[info["meeting_url"]],
            origin=info["origin"],
            concurrency=concurrency,
            hold_s=hold_s,
        )

    try:
        await credential.token()
        if int(spec.get("warmup", 1)):
            await load(plan(int(spec.get("warmup", 1)), 0.0))
        gc.collect()
        emit("armed")
        await asyncio.to_thread(wait_for, "go")

        rss_base = self_rss_bytes()
        settled = asyncio.Event()
        seen: set[str] = set()  # guests whose first join ended (joined, failed or ended), each once

        def on_guest(ev: GuestEvent) -> None:
            if ev.kind in ("joined", "failed", "ended") and ev.guest_id not in seen:
                seen.add(ev.guest_id)
                if len(seen) >= guests:
                    settled.set()

        runners: list[LoadRunner] = []
        profiler = cProfile.Profile() if spec.get("profile") else None
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        task = asyncio.create_task(
            load(
                plan(guests, HOLD_S if hold else 0.0),
                hooks=Hooks(on_guest=on_guest),
                on_runner=runners.append,
            )
        )
        if hold:
            waiter = asyncio.create_task(settled.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        else:
            await task
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(spec["profile"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        leave_s = None
        if hold:
            await asyncio.sleep(SETTLE_S)
            rss_held = self_rss_bytes()
            emit("ready", rss_base=rss_base, rss_held=rss_held, joined=len(seen))
            await asyncio.to_thread(wait_for, "leave")
            t1 = time.perf_counter()
            for r in runners:
                r.cancel()
            await task
            leave_s = time.perf_counter() - t1
        result = task.result()
        m = result.metrics
        lat = {
            "p50": m.join.percentile_ms(50) or float("nan"),
            "p99": m.join.percentile_ms(99) or float("nan"),
            "max": m.join.max_ms() or float("nan"),
        }
        out = _result(spec, int(m.first_joins), dict(m.failures_by_reason.most_common(10)), wall, cpu, lat)
        out["rss_base"] = rss_base
        if hold:
            out["rss_held"] = rss_held
            out["leave_s"] = leave_s
            # Guests that joined and then failed for good while held (a first-join failure is "failed").
            final_failures = sum(m.failures_by_reason.values())
            out["lost_held"] = max(0, final_failures - (guests - int(m.first_joins)))
        return out
    finally:
        await credential.aclose()


def dump_tasks() -> None:
    """SIGUSR2: print every asyncio task's stack to stderr (where is a stuck run waiting?)."""
    tasks = asyncio.all_tasks()
    print(f"--- {len(tasks)} asyncio tasks", file=sys.stderr)
    for task in list(tasks)[:MAX_TASK_DUMPS]:
        task.print_stack(limit=12, file=sys.stderr)
    sys.stderr.flush()


async def run(
    spec: dict[str, Any], *, emit: Callable[..., None], wait_for: Callable[[str], None]
) -> dict[str, Any]:
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, dump_tasks)
    if spec["client"] == "anonjoin":
        return await run_anonjoin_runner(spec, emit=emit, wait_for=wait_for)
    guests, concurrency = int(spec["guests"]), int(spec["concurrency"])
    hold = bool(spec.get("hold"))
    adapter = make_adapter(spec)
    await adapter.open()
    try:
        await adapter.setup()
        for i in range(int(spec.get("warmup", 1))):
            await adapter.leave(await adapter.join(f"warmup-{i}"))
        gc.collect()
        emit("armed")
        await asyncio.to_thread(wait_for, "go")

        rss_base = self_rss_bytes()
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        handles: list[Any] = []
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                try:
                    handle = await adapter.join(f"guest-{i}")
                except Exception as exc:
                    errors[_reason(exc)] += 1
                    return
                latencies.append(time.perf_counter() - t)
                if hold:
                    handles.append(handle)
                    return
                try:
                    await adapter.leave(handle)
                except Exception as exc:
                    errors["leave " + _reason(exc)] += 1

        profiler = cProfile.Profile() if spec.get("profile") else None
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        await asyncio.gather(*(one(i) for i in range(guests)))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(spec["profile"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        latencies.sort()
        lat_ms = {
            "p50": percentile(latencies, 50) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": (latencies[-1] if latencies else float("nan")) * 1000,
        }
        result = _result(spec, len(latencies), dict(errors.most_common(10)), wall, cpu, lat_ms)
        result["rss_base"] = rss_base
        if hold:
            await asyncio.sleep(SETTLE_S)
            result["rss_held"] = self_rss_bytes()
            emit("ready", rss_base=rss_base, rss_held=result["rss_held"], joined=len(handles))
            await asyncio.to_thread(wait_for, "leave")
            t1 = time.perf_counter()
            leave_sem = asyncio.Semaphore(concurrency)

            async def bye(handle: Any) -> None:
                async with leave_sem:
                    try:
                        await adapter.leave(handle)
                    except Exception as exc:
                        errors["leave " + _reason(exc)] += 1

            if isinstance(adapter, RawAdapter):  # held polls the raw client lost (it does not recover)
                errors.update(adapter.client.poll_errors)
                result["lost_held"] = sum(adapter.client.poll_errors.values())
            await asyncio.gather(*(bye(h) for h in handles))
            result["leave_s"] = time.perf_counter() - t1
            result["errors"] = dict(errors.most_common(10))
        return result
    finally:
        await adapter.close()
