"""Races for real: many connections (Redis) or many threads with their own connection (SQLite) at once."""

from __future__ import annotations

import asyncio
import threading
import uuid
from pathlib import Path

from anonjoin import LeaseHeld
from anonjoin._load.store import SqliteSessionStore
from anonjoin._load.store_redis import RedisSessionStore

from support.redis_server import RedisServer

N = 8
MEETING = "https://meet.example.test/org/ABC123"


async def test_eight_redis_connections_holding_at_once(redis_server: RedisServer) -> None:
    prefix = f"race{uuid.uuid4().hex[:8]}:"
    stores = [RedisSessionStore(redis_server.url, prefix) for _ in range(N)]
    holders = 0
    release = asyncio.Event()

    async def hold(store: RedisSessionStore) -> bool:
        nonlocal holders
        try:
            async with store.claim("guest-1", 30):
                holders += 1
                await asyncio.wait_for(release.wait(), 10)
                return True
        except LeaseHeld:
            return False

    try:
        for s in stores:
            await s.ping()
        tasks = [asyncio.create_task(hold(s)) for s in stores]
        async with asyncio.timeout(10):  # the 7 refusals come back while the one holder holds
            while sum(t.done() for t in tasks) < N - 1:
                await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)
        assert holders == 1
        release.set()
        results = await asyncio.gather(*tasks)
        assert results.count(True) == 1
    finally:
        for s in stores:
            await s.aclose()


async def test_eight_redis_connections_create_one_guest_one_id(redis_server: RedisServer) -> None:
    prefix = f"race{uuid.uuid4().hex[:8]}:"
    stores = [RedisSessionStore(redis_server.url, prefix) for _ in range(N)]
    try:
        for s in stores:
            await s.ping()
        records = await asyncio.gather(
            *(s.get_or_create("guest-1", meeting_url=MEETING, origin="o", display_name="g") for s in stores)
        )
        assert len({r.application_session_id for r in records}) == 1
    finally:
        for s in stores:
            await s.aclose()


def test_eight_sqlite_threads_claim_one_guest_one_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteSessionStore(path).close()
    barrier = threading.Barrier(N)
    got: list[bool] = []
    held = threading.Event()
    lock = threading.Lock()

    async def one() -> None:
        store = SqliteSessionStore(path, busy_timeout_s=10)
        try:
            barrier.wait(timeout=10)
            try:
                async with store.claim("guest-1", 30):
                    with lock:
                        got.append(True)
                    # hold until every other thread has been refused
                    await asyncio.get_running_loop().run_in_executor(None, held.wait, 10)
            except LeaseHeld:
                with lock:
                    got.append(False)
                    if got.count(False) == N - 1:
                        held.set()
        finally:
            await store.aclose()

    threads = [threading.Thread(target=asyncio.run, args=(one(),)) for _ in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert got.count(True) == 1 and got.count(False) == N - 1
