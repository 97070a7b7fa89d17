"""The SessionStore contract, the same for memory, SQLite and Redis (a real redis-server): ids, outcomes,
listing, and leases with their fence."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from anonjoin import LeaseHeld, LeaseLost, StoreError
from anonjoin._load.store import (
    LEGACY_SCOPE,
    MemorySessionStore,
    NewSession,
    Outcome,
    SessionScope,
    SessionStore,
    SqliteSessionStore,
)
from anonjoin._load.store_redis import RedisSessionStore

from support.redis_server import RedisServer

MEETING = "https://meet.example.test/org/ABC123"
ORIGIN = "https://app.example.test"
WAIT_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A store, a second handle on the same data (another instance), and how to make a lease lapse."""

    store: SessionStore
    other: SessionStore
    lapse: Callable[[str], object]


SCOPE = SessionScope.for_target(
    discover_url="https://sip.example.test/discover", endpoint_id="sip:app@example.test",
    meeting_url=MEETING, run_id="contract-run",
)  # fmt: skip


@pytest.fixture(params=["memory", "sqlite", "redis", "memory-scoped", "sqlite-scoped", "redis-scoped"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Every backend in the legacy scope and in a run's scope: the contract holds per scoped guest."""
    clock = Clock()
    kind, _, scoped = str(request.param).partition("-")
    scope = SCOPE if scoped else LEGACY_SCOPE
    if kind == "memory":
        mem = MemorySessionStore(clock=clock, scope=scope)

        def lapse_mem(guest_id: str) -> None:
            key = (scope.target, scope.run_id, guest_id)
            token, _expires = mem._leases[key]
            mem._leases[key] = (token, clock.now)  # expires now

        made = Backend(mem, mem, lapse_mem)
    elif kind == "sqlite":

        def lapse_file(guest_id: str) -> None:
            with contextlib.closing(sqlite3.connect(tmp_path / "s.db", isolation_level=None)) as db:
                db.execute(
                    "UPDATE leases SET expires_at = ? WHERE guest_id = ? AND run_id = ? AND target = ?",
                    (clock.now, guest_id, scope.run_id, scope.target),
                )

        made = Backend(
            SqliteSessionStore(tmp_path / "s.db", clock=clock, scope=scope),
            SqliteSessionStore(tmp_path / "s.db", clock=clock).scoped(scope),
            lapse_file,
        )
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"t{uuid.uuid4().hex[:8]}:"
        raw = aioredis.Redis.from_url(server.url)
        store = RedisSessionStore(server.url, prefix, scope=scope)

        async def lapse(guest_id: str) -> None:
            await raw.delete(store._key("lease", guest_id))  # what an expiry does

        made = Backend(store, RedisSessionStore(server.url, prefix).scoped(scope), lapse)
    yield made
    await made.store.aclose()
    await made.other.aclose()
    if kind == "redis":
        await raw.aclose()


async def _lapse(b: Backend, guest_id: str) -> None:
    result = b.lapse(guest_id)
    if asyncio.iscoroutine(result):
        await result


async def test_one_id_per_guest_for_life_and_updates(backend: Backend) -> None:
    store = backend.store
    assert isinstance(store, SessionStore)
    assert await store.get("g1") is None
    first = await store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="A")
    again = await backend.other.get_or_create(
        "g1", meeting_url=MEETING + "X", origin=ORIGIN, display_name="B"
    )
    assert again.application_session_id == first.application_session_id
    assert (again.meeting_url, again.display_name) == (MEETING + "X", "B")
    assert await store.get("g1") == again
    given = await store.get_or_create(
        "g2", meeting_url=MEETING, origin=ORIGIN, display_name="C", application_session_id="asi-2"
    )
    assert given.application_session_id == "asi-2"
    with pytest.raises(StoreError, match=r"(?i)application_?session_?id"):
        await store.get_or_create(
            "g3", meeting_url=MEETING, origin=ORIGIN, display_name="D", application_session_id="asi-2"
        )
    assert await store.get("g3") is None


async def test_batches_outcomes_and_listing(backend: Backend) -> None:
    store = backend.store
    made = await store.get_or_create_many(
        [NewSession(f"g{i:02}", MEETING, ORIGIN, f"G{i}") for i in range(30)]
    )
    assert len({r.application_session_id for r in made}) == 30
    await store.record_outcomes([Outcome(f"g{i:02}", "joined", rejoins=i % 3) for i in range(30)])
    listed = await store.list()
    assert [r.guest_id for r in listed] == [f"g{i:02}" for i in range(30)]
    assert [(r.last_outcome, r.rejoins) for r in listed] == [("joined", i % 3) for i in range(30)]
    with pytest.raises(StoreError, match="no session for guest 'nope'"):
        await store.record_outcomes([Outcome("g00", "failed"), Outcome("nope", "failed")])
    assert (await store.get("g00")) == listed[0]  # all or none


async def test_a_claim_excludes_others_until_released(backend: Backend) -> None:
    async with backend.store.claim("g1", 30) as lease:
        assert lease.epoch >= 1
        with pytest.raises(LeaseHeld, match="held by another instance"):
            async with backend.other.claim("g1", 30):
                pytest.fail("two holders")
        assert "token" not in repr(lease) and lease.fence.token not in repr(lease.fence)
    async with backend.other.claim("g1", 30) as second:
        assert second.epoch == lease.epoch + 1


async def test_a_lapsed_holder_is_fenced_off_and_learns_it_lost(backend: Backend) -> None:
    await backend.store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="A")
    async with backend.store.claim("g1", 0.3) as old:
        await old.record_outcome("joined")  # a live lease writes
        await _lapse(backend, "g1")  # paused past its lease
        async with backend.other.claim("g1", 30) as new:
            assert new.epoch == old.epoch + 1
            with pytest.raises(LeaseLost, match="'g1'"):
                await old.record_outcome("failed: stale")
            await new.record_outcome("joined", rejoins=1)
            await asyncio.wait_for(old.lost.wait(), WAIT_S)  # its renewal found the new holder
    record = await backend.store.get("g1")
    assert record is not None and (record.last_outcome, record.rejoins) == ("joined", 1)


async def test_a_fenced_batch_is_all_or_none(backend: Backend) -> None:
    await backend.store.get_or_create_many([NewSession(g, MEETING, ORIGIN, g) for g in ("a", "b")])
    async with backend.store.claim("a", 30) as la, backend.store.claim("b", 30) as lb:
        await _lapse(backend, "b")
        async with backend.other.claim("b", 30):
            with pytest.raises(LeaseLost) as info:
                await backend.store.record_outcomes(
                    [Outcome("a", "joined", 0, la.fence), Outcome("b", "x", 0, lb.fence)]
                )
            assert info.value.guest_ids == ("b",)
    a = await backend.store.get("a")
    assert a is not None and a.last_outcome is None


async def test_the_lease_is_renewed(backend: Backend) -> None:
    async with backend.store.claim("g1", 0.15) as lease:
        for _ in range(200):  # bounded: renewals come every 50 ms
            if lease.renewals >= 2:
                break
            await asyncio.sleep(0.05)
        assert lease.renewals >= 2 and not lease.lost.is_set()
        with pytest.raises(LeaseHeld):
            async with backend.other.claim("g1", 30):
                pass


async def test_bad_lease_lengths_are_refused(backend: Backend) -> None:
    for bad in (0, -1, float("nan"), 1e9):
        with pytest.raises(StoreError, match="lease_s must be between"):
            async with backend.store.claim("g1", bad):
                pass


def test_import_anonjoin_does_not_import_redis() -> None:
    import subprocess
    import sys

    code = (
        "import sys, anonjoin; assert 'redis' not in sys.modules; print(anonjoin.RedisSessionStore.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "RedisSessionStore"


async def test_take_and_release_outside_a_block(backend: Backend) -> None:
    await backend.store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="A")
    lease = await backend.store.take("g1", 30)
    with pytest.raises(LeaseHeld):
        await backend.other.take("g1", 30)
    assert await lease.release() and await lease.release()  # idempotent
    again = await backend.other.take("g1", 30)
    assert again.epoch == lease.epoch + 1
    with pytest.raises(LeaseLost):
        await lease.record_outcome("stale")  # a released lease writes nothing
    await again.release()
