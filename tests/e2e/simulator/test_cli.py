"""``anonjoin simulate`` as a subprocess: one JSON line when ready, exit 0 on SIGTERM, exit 2 on bad input."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest

from anonjoin._cli import main

KEYS = {"discover_url", "authority", "tenant", "client_id", "client_secret", "endpoint_id", "meeting_url",
        "origin", "ca_file", "admin_url", "pool_url", "scope", "admin_token"}  # fmt: skip


async def _start(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", "simulate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_simulate_prints_one_json_line_serves_and_exits_on_sigterm(tmp_path: Path) -> None:
    proc = await _start("--seed", "7", "--psat-ttl", "60", "--lobby", "admit", "--date-format", "dotnet")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        info = json.loads(line)
        assert set(info) >= KEYS
        assert info["discover_url"].startswith("https://127.0.0.1:")
        ctx = ssl.create_default_context(cafile=info["ca_file"])
        connector = aiohttp.TCPConnector(ssl=ctx)
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(info["admin_url"] + "/state", headers={"X-Admin-Token": info["admin_token"]}) as r,
        ):
            state = await r.json()
        meeting = next(iter(state["meetings"].values()))
        assert meeting["meeting_url"] == info["meeting_url"] and meeting["lobby_mode"] == "admit"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert await proc.stdout.read() == b""  # nothing after the one line
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    "args",
    [("--lobby", "sometimes"), ("--faults", "/nonexistent/profile.json"), ("--faults", "hurricane"),
     ("--psat-ttl", "-5"), ("--port", "99999"), ("--token-status", "204"),
     ("--redirect", "applications,nowhere"), ("--tls-read-buffer-kb", "2"), ("--pools", "0"),
     ("--pools", "many"), ("--pin", "0,x"), ("--pin", "4096")],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["simulate", *args])
    except SystemExit as exc:  # argparse's own usage error
        code = int(str(exc.code))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert "Traceback" not in err
    assert "error" in err.strip().splitlines()[-1]


def test_an_invalid_fault_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "faults.json"
    bad.write_text('{"rules": [{"kind": "429", "rate": 2}]}')
    assert main(["simulate", "--faults", str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


async def test_a_missing_fault_file_exits_2_from_the_real_command() -> None:
    proc = await _start("--faults", "/nonexistent/profile.json")
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and stdout == b""
    assert stderr.decode().strip().count("\n") == 0 and "cannot read fault profile" in stderr.decode()


def test_event_rel_prefix_flag() -> None:
    from anonjoin._cli import build_parser
    from anonjoin.simulator._cli import config_from_args

    ns = build_parser().parse_args(["simulate", "--event-rel-prefix", "ms:rtc:saas:"])
    assert config_from_args(ns).event_rel_prefix == "ms:rtc:saas:"
    assert config_from_args(build_parser().parse_args(["simulate"])).event_rel_prefix == ""
