"""Scopes: a guest id is one guest per (target, run id), in memory, SQLite and Redis; an old SQLite file is
migrated with its rows in the legacy scope."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from anonjoin import ConfigurationError, LeaseHeld, LeaseLost, StoreError
from anonjoin._load.store import (
    LEGACY_SCOPE,
    SCHEMA_VERSION,
    MemorySessionStore,
    NewSession,
    Outcome,
    SessionScope,
    SqliteSessionStore,
    new_run_id,
)
from anonjoin._load.store_redis import RedisSessionStore

from support.redis_server import RedisServer

Scoped = MemorySessionStore | SqliteSessionStore | RedisSessionStore

MEETING = "https://meet.example.test/org/ABC123"
ORIGIN = "https://app.example.test"
DISCOVER_A = "https://a.example.test/discover"
DISCOVER_B = "https://b.example.test/discover"
ENDPOINT = "sip:app@example.test"


def _scope(discover: str, run_id: str) -> SessionScope:
    return SessionScope.for_target(
        discover_url=discover, endpoint_id=ENDPOINT, meeting_url=MEETING, run_id=run_id
    )


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def opener(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[SessionScope], Scoped]]:
    """Opens another handle on one store (the same dict, file or Redis prefix) in a scope."""
    made: list[Scoped] = []
    if request.param == "memory":
        base = MemorySessionStore()

        def open_memory(scope: SessionScope) -> Scoped:
            return base.scoped(scope)

        yield open_memory
        return
    prefix = f"sc{uuid.uuid4().hex[:8]}:"

    def open_store(scope: SessionScope) -> Scoped:
        store: Scoped
        if request.param == "sqlite":
            store = SqliteSessionStore(tmp_path / "s.db", scope=scope)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisSessionStore(server.url, prefix, scope=scope)
        made.append(store)
        return store

    yield open_store
    for store in made:
        await store.aclose()


async def _ids(store: Scoped, n: int = 3) -> list[str]:
    batch = [NewSession(f"guest-{i:04d}", MEETING, ORIGIN, f"G{i}") for i in range(1, n + 1)]
    return [r.application_session_id for r in await store.get_or_create_many(batch)]


async def test_two_targets_get_different_ids_and_one_run_id_resumes_them(
    opener: Callable[[SessionScope], Scoped],
) -> None:
    on_a, on_b = opener(_scope(DISCOVER_A, "r1")), opener(_scope(DISCOVER_B, "r1"))
    ids_a, ids_b = await _ids(on_a), await _ids(on_b)
    assert not set(ids_a) & set(ids_b)
    resumed = opener(_scope(DISCOVER_A, "r1"))  # a later run with --run-id r1 against target A
    assert await _ids(resumed) == ids_a
    rec = await resumed.get("guest-0001")
    assert rec is not None and (rec.guest_id, rec.run_id) == ("guest-0001", "r1")
    assert rec.target == f"{DISCOVER_A} {ENDPOINT} {MEETING}"
    # Every scope sees its own records only; list_all and find look across them.
    assert [r.application_session_id for r in await on_b.list()] == ids_b
    everything = await on_a.list_all()
    assert sorted(r.application_session_id for r in everything) == sorted(ids_a + ids_b)
    assert {r.run_id for r in await on_a.list_all(run_id="r1")} == {"r1"}
    assert await on_a.list_all(run_id="nope") == []
    found = await on_a.find("guest-0002")
    assert sorted(r.application_session_id for r in found) == sorted([ids_a[1], ids_b[1]])
    assert await on_a.find("guest-0002", run_id="other") == []
    legacy = opener(LEGACY_SCOPE)
    assert await legacy.get("guest-0001") is None and await legacy.list() == []


async def test_runs_without_a_run_id_never_share_ids(opener: Callable[[SessionScope], Scoped]) -> None:
    """Two concurrent runs against one target, each with its generated run id."""
    runs = [opener(_scope(DISCOVER_A, new_run_id())) for _ in range(2)]
    assert runs[0].scope.run_id != runs[1].scope.run_id
    first, second = await asyncio.gather(*(_ids(r, 50) for r in runs))
    assert len(set(first) | set(second)) == 100


async def test_leases_and_fences_are_per_scope(opener: Callable[[SessionScope], Scoped]) -> None:
    one, two = opener(_scope(DISCOVER_A, "r1")), opener(_scope(DISCOVER_A, "r2"))
    one_again = opener(_scope(DISCOVER_A, "r1"))
    for store in (one, two):
        await store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="d")
    async with one.claim("g1", 30) as lease:
        with pytest.raises(LeaseHeld):
            await one_again.take("g1", 30)
        async with two.claim("g1", 30) as other:  # the same guest id of another run: its own lease
            assert other.epoch == 1
            with pytest.raises(LeaseLost):  # a fence of run r2 does not fit r1's guest
                await one.record_outcomes([Outcome("g1", "joined", fence=other.fence)])
            await other.record_outcome("joined")
        await lease.record_outcome("failed: x")
    r1, r2 = await one.get("g1"), await two.get("g1")
    assert r1 is not None and r2 is not None
    assert (r1.last_outcome, r2.last_outcome) == ("failed: x", "joined")


async def test_a_view_and_its_store_close_together(opener: Callable[[SessionScope], Scoped]) -> None:
    base = opener(LEGACY_SCOPE)
    view = base.scoped(_scope(DISCOVER_A, "r1"))
    await view.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="d")
    await view.aclose()
    await base.aclose()  # idempotent across the two
    if isinstance(base, MemorySessionStore):
        return  # nothing to close
    for handle in (base, view):
        with pytest.raises(StoreError, match="used after close"):
            await handle.get("g1")


def test_a_bad_run_id_is_one_clear_error() -> None:
    for bad in ("", "-x", "a b", "x" * 65, "a{b}", "a:b"):
        with pytest.raises(ConfigurationError, match="run id"):
            SessionScope.for_target(
                discover_url=DISCOVER_A, endpoint_id=ENDPOINT, meeting_url=MEETING, run_id=bad
            )


async def test_redis_keys_carry_the_scope_as_a_hash_tag(redis_server: RedisServer) -> None:
    prefix = f"sc{uuid.uuid4().hex[:8]}:"
    scope = _scope(DISCOVER_A, "r1")
    store = RedisSessionStore(redis_server.url, prefix, scope=scope)
    legacy = RedisSessionStore(redis_server.url, prefix)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="d")
        await legacy.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="d")
        async with store.claim("g1", 30):
            keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await raw.keys(f"{prefix}*"))
        tagged = [k for k in keys if "{" in k]
        assert {k.split(":", 2)[1] for k in tagged} == {"s", "lease", "epoch"}
        tags = {k[k.index("{") : k.index("}") + 1] for k in tagged}
        assert len(tags) == 1 and tags.pop().startswith("{r1:")  # one hash tag: one slot per scope
        assert f"{prefix}s:g1" in keys  # the legacy scope keeps the keys of a store from before scopes
        (session,) = (k for k in tagged if k.split(":")[1] == "s")
        assert await raw.hmget(session, ["guest_id", "run_id"]) == [b"g1", b"r1"]
    finally:
        await raw.aclose()
        await store.aclose()
        await legacy.aclose()


_V1 = """
CREATE TABLE sessions (
    guest_id TEXT PRIMARY KEY NOT NULL,
    application_session_id TEXT NOT NULL UNIQUE,
    meeting_url TEXT NOT NULL,
    origin TEXT NOT NULL,
    display_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_outcome TEXT,
    rejoins INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE leases (guest_id TEXT PRIMARY KEY NOT NULL, token TEXT, expires_at REAL NOT NULL,
                     epoch INTEGER NOT NULL);
INSERT INTO sessions VALUES ('guest-0001', 'asi-old-1', 'https://m/1', 'https://o', 'G1', 1.0, 2.0,
                             'joined', 2);
INSERT INTO sessions VALUES ('guest-0002', 'asi-old-2', 'https://m/1', 'https://o', 'G2', 1.5, 2.0, NULL, 0);
INSERT INTO leases VALUES ('guest-0002', 'tok', 9e18, 7);
PRAGMA user_version = 1;
"""


async def test_an_old_schema_file_is_migrated_into_the_legacy_scope(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(_V1)
    store = SqliteSessionStore(path)
    try:
        old = await store.get("guest-0001")
        assert old is not None
        assert (old.application_session_id, old.last_outcome, old.rejoins) == ("asi-old-1", "joined", 2)
        assert (old.run_id, old.target) == ("", "")
        assert [r.guest_id for r in await store.list_all()] == ["guest-0001", "guest-0002"]
        with pytest.raises(LeaseHeld):  # the old file's live lease is still held (epoch 7, kept)
            await store.take("guest-0002", 30)
        scoped = store.scoped(_scope(DISCOVER_A, "r1"))
        assert await scoped.get("guest-0001") is None
        made = await scoped.get_or_create("guest-0001", meeting_url=MEETING, origin=ORIGIN, display_name="N")
        assert made.application_session_id != "asi-old-1"
        async with scoped.claim("guest-0002", 30) as lease:  # another scope: not the old lease
            assert lease.epoch == 1
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("SELECT count(*) FROM sessions").fetchone()[0] == 3
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert tables == {"sessions", "leases"}
    again = SqliteSessionStore(path)  # opening a migrated file again changes nothing
    try:
        assert len(await again.list_all()) == 3
        rec = await again.get("guest-0002")
        assert rec is not None and rec.application_session_id == "asi-old-2"
    finally:
        await again.aclose()
