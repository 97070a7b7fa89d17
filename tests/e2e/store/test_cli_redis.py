"""The CLI over a Redis store: ``--store redis://``, credentials redacted, Redis down at start, and two
``anonjoin rejoin`` processes for one guest (one joins, the other is refused)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from anonjoin._cli import main
from anonjoin._load.store_redis import RedisSessionStore
from anonjoin.simulator import Simulator

from support.redis_server import RedisServer, free_port, start_redis

SECRET = "s3cret-pw-" + uuid.uuid4().hex[:6]


pytestmark = pytest.mark.usefixtures("no_target_env")


def _flags(sim: Simulator) -> list[str]:
    i = sim.info
    return [
        "--discover-url", i.discover_url, "--authority", i.authority, "--client-id", i.client_id,
        "--client-secret", i.client_secret, "--endpoint-id", i.endpoint_id,
        "--meeting-url", i.meeting_url, "--origin", i.origin, "--ca-file", i.ca_file, "--scope", i.scope,
    ]  # fmt: skip


def test_load_with_a_password_in_the_url_never_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = start_redis(tmp_path, "--requirepass", SECRET)
    try:
        url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
        code = main(
            ["load", "--guests", "5", "--hold", "0", "--progress", "off", "--store", url,
             "--report", "r.json", "--no-html", "-v"]
        )  # fmt: skip
        out, err = capsys.readouterr()
        assert code == 0, err
        report = (tmp_path / "r.json").read_text()
        assert SECRET not in out + err + report
        assert json.loads(report)["settings"]["store"] == f"redis://***@127.0.0.1:{server.port}/0"
        assert json.loads(report)["store_writes"] == {"late": 0, "lost": 0, "fenced": 0}
        os.environ["ANONJOIN_STORE"] = url  # the environment works the same
        try:
            assert main(["sessions", "--json"]) == 0
        finally:
            del os.environ["ANONJOIN_STORE"]
        rows = json.loads(capsys.readouterr().out)
        assert sorted(r["last_outcome"] for r in rows) == ["joined"] * 5
        bad = f"redis://:wrong@127.0.0.1:{server.port}/0"
        assert main(["sessions", "--store", bad]) == 1
        err = capsys.readouterr().err
        assert "authentication failed" in err and "wrong" not in err and len(err.strip().splitlines()) == 1
    finally:
        server.kill()


def test_redis_down_at_start_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["load", "--guests", "2", "--progress", "off", "--store", url]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "StoreError" in err and "unreachable" in err and url in err
    assert main(["rejoin", "--guest", "g", "--store", "rediss://127.0.0.1:1/0"]) == 1
    assert "unreachable" in capsys.readouterr().err


async def test_two_rejoins_of_one_guest_one_joins_the_other_is_refused(
    sim: Simulator, redis_server: RedisServer
) -> None:
    guest = f"guest-{uuid.uuid4().hex[:8]}"  # the CLI's default prefix, a guest of this test's own
    store = RedisSessionStore(redis_server.url)
    rec = await store.get_or_create(
        guest, meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="seven"
    )
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.config_set("notify-keyspace-events", "K$")
    pubsub = raw.pubsub()
    await pubsub.subscribe(f"__keyspace@0__:anonjoin:lease:{guest}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    argv = ["-m", "anonjoin", "rejoin", "--guest", guest, "--json", *_flags(sim)]
    env["ANONJOIN_STORE"] = redis_server.url
    try:
        first = await asyncio.create_subprocess_exec(
            sys.executable, *argv, "--hold", "60", env=env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):  # the first one has claimed the guest
            while (msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)) is None:
                assert first.returncode is None, "the first rejoin ended before claiming"
            assert msg["data"] == b"set"
        second = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out2, err2 = await asyncio.wait_for(second.communicate(), 60)
        first.send_signal(signal.SIGINT)  # Ctrl-C: the holder leaves and releases the guest
        _out1, err1 = await asyncio.wait_for(first.communicate(), 60)
        async with store.claim(guest, 5):  # released on the way out
            pass
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await raw.aclose()
        await store.aclose()
    assert second.returncode == 1, err2.decode()
    line = err2.decode().strip()
    assert len(line.splitlines()) == 1 and "held by another instance" in line and not out2
    assert first.returncode == 130, err1.decode()
    assert "interrupted" in err1.decode() and b"Traceback" not in err1
    assert sim.snapshot()["applications"]["created_by_asi"][rec.application_session_id] == 1
    assert sim.snapshot()["applications"]["live"] == 0
