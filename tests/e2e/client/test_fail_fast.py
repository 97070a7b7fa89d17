"""Fail fast (issue 16): a target that refuses connections, does not resolve, or does not speak TLS on its
port ends ``anonjoin join`` and ``anonjoin load`` at its first discover (the Client's preflight), with the
cause and the fix on stderr and in the report, exit 1. Real processes, real loopback ports.

The subprocess timeout is the bound (generous: retries would take far longer); nothing here is timed.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from anonjoin import RequestNotSentError
from anonjoin._core.protocol import Action, classify
from anonjoin.simulator import Simulator

BOUND_S = 15.0
"""Each run must end within this (6 rounds of 6 retried discovers took 54 s)."""

CAUSES = {
    "refused": "connection refused by 127.0.0.1:",
    "dns": "cannot resolve 'anonjoin-no-such-host.invalid'",
    "no_tls": "does that port speak TLS (https)?",
}


def _closed_port() -> int:
    """A loopback port that was bound and closed: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
async def plain_http_port() -> AsyncIterator[int]:
    """A loopback server that speaks plain HTTP (no TLS): it answers anything with a 400."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(4096)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _discover_url(case: str, plain_port: int) -> str:
    host = {
        "refused": f"127.0.0.1:{_closed_port()}",
        "dns": "anonjoin-no-such-host.invalid",
        "no_tls": f"127.0.0.1:{plain_port}",
    }[case]
    return f"https://{host}/platformservice/discover"


def _flags(sim: Simulator, discover_url: str) -> list[str]:
    i = sim.info
    return [
        "--discover-url", discover_url, "--authority", i.authority, "--client-id", i.client_id,
        "--endpoint-id", i.endpoint_id, "--meeting-url", i.meeting_url, "--origin", i.origin,
        "--ca-file", i.ca_file, "--scope", i.scope,
    ]  # fmt: skip


async def _run(args: list[str], cwd: Path, sim: Simulator) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
    env["ANONJOIN_CLIENT_SECRET"] = sim.info.client_secret
    env["XDG_STATE_HOME"] = str(cwd / "state")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=cwd,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BOUND_S)
    finally:  # over the bound: the test fails, and nothing is left running
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("case", sorted(CAUSES))
async def test_join_fails_fast_with_the_cause(
    case: str, sim: Simulator, plain_http_port: int, tmp_path: Path
) -> None:
    url = _discover_url(case, plain_http_port)
    code, out, err = await _run(["join", *_flags(sim, url), "--json"], tmp_path, sim)
    assert code == 1, err
    assert "Traceback" not in err
    assert CAUSES[case] in err
    report = json.loads(out)
    assert report["outcome"] == "failed"
    assert CAUSES[case] in report["reason"]
    assert len(err.strip().splitlines()) == 1, err
    assert report["attempts"]["discover"] == 1  # the preflight is not retried
    assert report["retries"] == 0


@pytest.mark.parametrize("case", sorted(CAUSES))
async def test_load_fails_fast_and_the_report_says_why(
    case: str, sim: Simulator, plain_http_port: int, tmp_path: Path
) -> None:
    url = _discover_url(case, plain_http_port)
    args = ["load", *_flags(sim, url), "--guests", "5", "--hold", "0", "--progress", "off",
            "--store", ":memory:", "--report", "r.json", "--no-html"]  # fmt: skip
    code, out, err = await _run(args, tmp_path, sim)
    assert code == 1, err
    assert "Traceback" not in err
    assert CAUSES[case] in out  # the summary's failure line
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed"] == 5
    ((reason, count),) = report["failures_by_reason"].items()
    assert count == 5 and reason.startswith("RequestNotSentError at discover: ")
    assert CAUSES[case] in reason
    assert report["retries_by_reason"] == {}  # nothing was retried


async def test_http_url_for_a_tls_port_says_use_https(sim: Simulator, tmp_path: Path) -> None:
    url = sim.info.discover_url.replace("https://", "http://", 1)
    code, _out, err = await _run(["join", *_flags(sim, url)], tmp_path, sim)
    assert code == 1, err
    assert f"use {sim.info.discover_url}" in err
    assert "Traceback" not in err


def test_the_preflight_rule_is_the_failure_table() -> None:
    refused = RequestNotSentError("refused", step="discover", cause="connection refused by h:1")
    unknown = RequestNotSentError("connect timeout", step="discover")
    assert classify("discover", refused, answered=False).action is Action.FINAL
    assert classify("discover", refused).action is Action.RETRY  # it answered before: retried
    assert classify("discover", unknown, answered=False).action is Action.RETRY  # cause unknown
