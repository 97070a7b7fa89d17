"""What only the Redis store does: TTLs, SCAN listing, write retries (late / lost), clear errors."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from anonjoin import StoreError
from anonjoin._load.store import NewSession, Outcome
from anonjoin._load.store_redis import RedisSessionStore, safe_store_url

from support.redis_server import RedisServer, free_port, start_redis

MEETING = "https://meet.example.test/org/ABC123"


def _prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}:"


async def test_a_finished_guest_expires_and_a_returning_one_does_not(redis_server: RedisServer) -> None:
    prefix = _prefix()
    store = RedisSessionStore(redis_server.url, prefix, finished_ttl_s=60)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        rec = await store.get_or_create("g1", meeting_url=MEETING, origin="o", display_name="d")
        keys = (f"{prefix}s:g1", f"{prefix}asi:{rec.application_session_id}")
        assert [await raw.pttl(k) for k in keys] == [-1, -1]
        await store.record_outcome("g1", "joined")
        assert all(0 < t <= 60_000 for t in [await raw.pttl(k) for k in keys])
        await store.get_or_create("g1", meeting_url=MEETING, origin="o", display_name="d")
        assert [await raw.pttl(k) for k in keys] == [-1, -1]
        default = RedisSessionStore(redis_server.url, prefix)
        await default.record_outcome("g1", "joined")
        assert 6 * 86400_000 < await raw.pttl(keys[0]) <= 7 * 86400_000
        await default.aclose()
    finally:
        await store.aclose()
        await raw.aclose()


async def test_listing_scans_every_guest_of_its_prefix_only(redis_server: RedisServer) -> None:
    store = RedisSessionStore(redis_server.url, _prefix())
    neighbour = RedisSessionStore(redis_server.url, _prefix())
    try:
        await store.get_or_create_many([NewSession(f"g{i:04}", MEETING, "o", "d") for i in range(2500)])
        await neighbour.get_or_create("other", meeting_url=MEETING, origin="o", display_name="d")
        listed = await store.list()
        assert [r.guest_id for r in listed] == [f"g{i:04}" for i in range(2500)]
    finally:
        await store.aclose()
        await neighbour.aclose()


async def test_a_write_while_redis_restarts_is_late_not_lost(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    restarted: list[RedisServer] = []

    async def sleep(_s: float) -> None:  # the backoff's wait: Redis comes back meanwhile
        if not restarted:
            restarted.append(start_redis(tmp_path, port=server.port))

    store = RedisSessionStore(server.url, _prefix(), sleep=sleep)
    try:
        await store.ping()
        server.kill()
        rec = await store.get_or_create("g1", meeting_url=MEETING, origin="o", display_name="d")
        assert rec.guest_id == "g1" and len(restarted) == 1
        assert (store.writes_late, store.writes_lost) == (1, 0)
    finally:
        await store.aclose()
        for s in restarted:
            s.kill()


async def test_writes_to_a_dead_redis_are_bounded_and_counted(own_redis: RedisServer) -> None:
    waits: list[float] = []

    async def sleep(s: float) -> None:
        waits.append(s)

    store = RedisSessionStore(own_redis.url, _prefix(), write_retry_s=0.5, sleep=sleep)
    try:
        await store.get_or_create_many([NewSession(f"g{i}", MEETING, "o", "d") for i in range(3)])
        own_redis.kill()
        with pytest.raises(StoreError, match="unreachable") as info:
            await store.record_outcomes([Outcome(f"g{i}", "joined") for i in range(3)])
        assert len(str(info.value).splitlines()) == 1
        assert store.writes_lost == 3
        assert waits and waits[0] == 0.05 and max(waits) <= 2.0  # a floor and a cap
        assert waits == sorted(waits)  # backing off
        with pytest.raises(StoreError, match="unreachable"):  # reads fail at once
            await store.get("g1")
    finally:
        await store.aclose()


async def test_clear_errors_and_no_credentials_anywhere() -> None:
    url = f"redis://user:hunter2@127.0.0.1:{free_port()}/0"
    store = RedisSessionStore(url)
    assert "hunter2" not in repr(store) and "user" not in repr(store)
    with pytest.raises(StoreError) as info:
        await store.ping()
    assert "hunter2" not in str(info.value) and "unreachable" in str(info.value)
    await store.aclose()
    with pytest.raises(StoreError, match="used after close"):
        await store.get("g")
    assert safe_store_url("rediss://:pw@[::1]:6380/2?ssl_cert_reqs=none") == "rediss://***@[::1]:6380/2"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://x"}, "not a redis"),
        ({"url": "redis://x", "prefix": ""}, "prefix"),
        ({"url": "redis://x", "finished_ttl_s": 0}, "finished_ttl_s"),
        ({"url": "redis://x:notaport/0"}, "bad URL"),
    ]
    for kwargs, match in bad:
        with pytest.raises(StoreError, match=match):
            RedisSessionStore(**kwargs)


async def test_renew_and_release_compare_and_act_on_the_token(own_redis: RedisServer) -> None:
    store = RedisSessionStore(own_redis.url)
    raw = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:
        lease = await store.take("g1", 30)
        lease.stop_renewing()  # drive the primitives by hand
        fence = lease.fence
        assert await store._renew("g1", fence, 30) == fence.epoch
        await raw.flushdb()  # Redis restarted without its data: nobody holds the guest, take it back
        again = await store._renew("g1", fence, 30)
        assert again is not None and await raw.get("anonjoin:lease:g1") == fence.token
        await raw.delete("anonjoin:lease:g1")
        other = await store.take("g1", 30)  # another instance claims it: ours is lost for good
        other.stop_renewing()
        assert await store._renew("g1", fence, 30) is None
        await store._release("g1", fence)  # not ours: left alone
        assert await raw.get("anonjoin:lease:g1") == other.fence.token
        assert 29_000 < await raw.pttl("anonjoin:lease:g1") <= 30_000
        await other.release()
        assert await raw.exists("anonjoin:lease:g1") == 0
    finally:
        await store.aclose()
        await raw.aclose()
