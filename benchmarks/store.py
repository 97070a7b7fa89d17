"""``python -m benchmarks.store [--ops N] [--url redis://...]``: the cost of one session-store operation.

Times get-or-create (a new guest), an outcome write and claim+release, one operation at a time (the
latency a guest pays; the runner batches get-or-create and outcomes), for the memory store (the same-run
baseline), SQLite and a local Redis. Without ``--url`` it starts ``redis-server`` on a free loopback port
(no persistence) and stops it by PID. Prints ops/s, µs/op and the ratio to the memory store.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from anonjoin._load.store import MemorySessionStore, SessionStore, SqliteSessionStore

MEETING = "https://meet.example.test/org/BENCH"
START_TIMEOUT_S = 10.0


@contextmanager
def local_redis() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("benchmarks.store: redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("benchmarks.store: redis-server did not start") from None
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=START_TIMEOUT_S)


async def _time(n: int, op: Callable[[int], Awaitable[object]]) -> float:
    """Seconds per operation over ``n`` operations (after ``n // 10`` to warm up)."""
    for i in range(n // 10):
        await op(-1 - i)
    t0 = time.perf_counter()
    for i in range(n):
        await op(i)
    return (time.perf_counter() - t0) / n


async def measure(store: SessionStore, n: int) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]

    def gid(i: int) -> str:
        return f"b{run}-{i}"

    async def create(i: int) -> object:
        return await store.get_or_create(gid(i), meeting_url=MEETING, origin="o", display_name="g")

    async def outcome(i: int) -> object:
        return await store.record_outcome(gid(i), "joined")

    async def claim(i: int) -> object:
        async with store.claim(gid(i), 30):
            return None

    return {
        "get-or-create": await _time(n, create),
        "outcome write": await _time(n, outcome),
        "claim+release": await _time(n, claim),
    }


async def main_async(ops: int, url: str) -> None:
    from anonjoin._load.store_redis import RedisSessionStore

    with tempfile.TemporaryDirectory() as tmp:
        stores: list[tuple[str, SessionStore]] = [
            ("memory", MemorySessionStore()),
            ("sqlite", SqliteSessionStore(Path(tmp) / "s.db")),
            ("redis", RedisSessionStore(url, prefix=f"bench{uuid.uuid4().hex[:6]}:")),
        ]
        results: dict[str, dict[str, float]] = {}
        for name, store in stores:
            try:
                results[name] = await measure(store, ops)
            finally:
                await store.aclose()
    base = results["memory"]
    print(f"session store, one operation at a time, {ops} ops each (python {sys.version.split()[0]})")
    print(f"{'store':<8} {'operation':<15} {'ops/s':>10} {'µs/op':>9} {'x memory':>9}")
    for name, row in results.items():
        for op, s in row.items():
            print(f"{name:<8} {op:<15} {1 / s:>10.0f} {s * 1e6:>9.1f} {s / base[op]:>9.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store", description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="operations per measurement (default 2000)")
    parser.add_argument("--url", help="a Redis to measure (default: start a local redis-server)")
    ns = parser.parse_args(argv)
    if ns.ops < 10:
        parser.error("--ops must be at least 10")
    if ns.url:
        asyncio.run(main_async(ns.ops, ns.url))
        return
    with local_redis() as url:
        asyncio.run(main_async(ns.ops, url))


if __name__ == "__main__":
    main()
