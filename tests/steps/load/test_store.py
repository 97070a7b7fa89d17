"""The session store: the same applicationSessionId for a guest for life, across restarts; clear errors."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from anonjoin import StoreError
from anonjoin._load.store import (
    MemorySessionStore,
    NewSession,
    Outcome,
    SessionStore,
    SqliteSessionStore,
    default_store_path,
)

MEETING = "https://meet.example.test/org/ABC123"
ORIGIN = "https://app.example.test"


@pytest.fixture(params=["memory", "sqlite", "sqlite-threaded"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    made: SessionStore
    if request.param == "memory":
        made = MemorySessionStore()
    else:
        made = SqliteSessionStore(tmp_path / "s.db", threaded=request.param == "sqlite-threaded")
    yield made
    await made.aclose()


async def test_get_or_create_returns_the_same_id_for_a_known_guest(store: SessionStore) -> None:
    assert isinstance(store, SessionStore)
    assert await store.get("g1") is None
    first = await store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="Guest 1")
    again = await store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="Guest 1")
    other = await store.get_or_create("g2", meeting_url=MEETING, origin=ORIGIN, display_name="Guest 2")
    assert first.application_session_id == again.application_session_id
    assert other.application_session_id != first.application_session_id
    assert await store.get("g1") == first
    assert [r.guest_id for r in await store.list()] == ["g1", "g2"]


async def test_a_given_id_is_kept_and_a_new_meeting_updates_the_record(store: SessionStore) -> None:
    made = await store.get_or_create(
        "g1", meeting_url=MEETING, origin=ORIGIN, display_name="A", application_session_id="asi-1"
    )
    assert made.application_session_id == "asi-1"
    moved = await store.get_or_create("g1", meeting_url=MEETING + "X", origin=ORIGIN, display_name="B")
    assert moved.application_session_id == "asi-1"
    assert (moved.meeting_url, moved.display_name) == (MEETING + "X", "B")
    assert await store.get("g1") == moved


async def test_batch_create_and_outcomes(store: SessionStore) -> None:
    specs = [NewSession(f"g{i}", MEETING, ORIGIN, f"Guest {i}") for i in range(50)]
    made = await store.get_or_create_many(specs)
    assert [r.guest_id for r in made] == [s.guest_id for s in specs]
    assert len({r.application_session_id for r in made}) == 50
    again = await store.get_or_create_many(specs)
    assert [r.application_session_id for r in again] == [r.application_session_id for r in made]
    await store.record_outcomes([Outcome(f"g{i}", "joined", rejoins=i % 3) for i in range(50)])
    record = await store.record_outcome("g4", "failed:Denied", rejoins=2)
    assert (record.last_outcome, record.rejoins) == ("failed:Denied", 3)
    assert record.application_session_id == made[4].application_session_id
    listed = {r.guest_id: r for r in await store.list()}
    assert listed["g5"].rejoins == 2
    assert listed["g5"].last_outcome == "joined"


async def test_outcome_for_an_unknown_guest_is_an_error_and_changes_nothing(store: SessionStore) -> None:
    await store.get_or_create("g1", meeting_url=MEETING, origin=ORIGIN, display_name="A")
    with pytest.raises(StoreError, match="nope"):
        await store.record_outcomes([Outcome("g1", "joined", 1), Outcome("nope", "joined")])
    record = await store.get("g1")
    assert record is not None
    assert (record.last_outcome, record.rejoins) == (None, 0)  # all or nothing


async def test_an_id_cannot_belong_to_two_guests(store: SessionStore) -> None:
    await store.get_or_create(
        "g1", meeting_url=MEETING, origin=ORIGIN, display_name="A", application_session_id="x"
    )
    with pytest.raises(StoreError):
        await store.get_or_create(
            "g2", meeting_url=MEETING, origin=ORIGIN, display_name="B", application_session_id="x"
        )
    assert await store.get("g2") is None


async def test_restart_reuses_the_id(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "sessions.db"
    first = SqliteSessionStore(path)
    made = await first.get_or_create("guest-7", meeting_url=MEETING, origin=ORIGIN, display_name="Seven")
    await first.record_outcome("guest-7", "joined", rejoins=1)
    await first.aclose()
    await first.aclose()  # idempotent

    second = SqliteSessionStore(path)
    try:
        again = await second.get_or_create(
            "guest-7", meeting_url=MEETING, origin=ORIGIN, display_name="Seven"
        )
        assert again.application_session_id == made.application_session_id
        assert (again.last_outcome, again.rejoins) == ("joined", 1)
        assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        second.close()


async def test_a_closed_store_refuses(tmp_path: Path) -> None:
    s = SqliteSessionStore(tmp_path / "s.db")
    s.close()
    with pytest.raises(StoreError, match="after close"):
        await s.list()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"this is not a database at all, just some text" * 200, "corrupt or not an anonjoin session store"),
        (b"SQLite format 3\x00" + b"\xff" * 4000, "corrupt or not an anonjoin session store"),
    ],
)
def test_a_corrupt_file_is_a_clear_error_and_is_left_alone(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(content)
    with pytest.raises(StoreError) as info:
        SqliteSessionStore(path)
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message
    assert path.read_bytes() == content  # never silently replaced


def test_a_damaged_store_midway_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    made = SqliteSessionStore(path)
    made.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\x00" * (4096 - 100)  # wipe the schema page after the header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"corrupt|damaged|not an anonjoin"):
        SqliteSessionStore(path)


def test_another_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE things (x)")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="not an anonjoin session store"):
        SqliteSessionStore(path)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SqliteSessionStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        SqliteSessionStore(path)


async def test_a_locked_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SqliteSessionStore(path, busy_timeout_s=0.05)
    await store.get_or_create("known", meeting_url=MEETING, origin=ORIGIN, display_name="K")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError) as info:
            await store.get_or_create("new", meeting_url=MEETING, origin=ORIGIN, display_name="N")
        assert "locked by another process" in str(info.value)
        # Reads of known guests still work under WAL while a writer holds the lock.
        known = await store.get("known")
        assert known is not None
    finally:
        other.execute("ROLLBACK")
        other.close()
    made = await store.get_or_create("new", meeting_url=MEETING, origin=ORIGIN, display_name="N")
    assert made.guest_id == "new"
    await store.aclose()


def test_an_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create its directory"):
        SqliteSessionStore(blocker / "sub" / "s.db")


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ANONJOIN_STORE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_store_path() == tmp_path / "anonjoin" / "sessions.db"
    monkeypatch.setenv("ANONJOIN_STORE", str(tmp_path / "x.db"))
    assert default_store_path() == tmp_path / "x.db"


async def test_two_stores_on_one_file_agree(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a, b = SqliteSessionStore(path), SqliteSessionStore(path)
    first = await a.get_or_create("g", meeting_url=MEETING, origin=ORIGIN, display_name="G")
    second = await b.get_or_create("g", meeting_url=MEETING, origin=ORIGIN, display_name="G")
    assert first.application_session_id == second.application_session_id
    await a.aclose()
    await b.aclose()
