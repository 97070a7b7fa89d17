"""Hostile requests (issue 11): each gets its 4xx with nothing above DEBUG logged and no traceback, and
none leaves state behind (every structure keyed by client-chosen values stays bounded)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from typing import Any

import pytest

from anonjoin.simulator import Simulator
from anonjoin.simulator import _core as core_module

from support.walk import Walk, ssl_context

ROUNDS = 250
"""Rounds of the mix below: 8 hostile requests each, 2,000 in all."""


def _forged_psat(i: int) -> str:
    """A well-formed JWT with a fresh ``asi`` and a signature that is not the simulator's."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"asi": f"hostile-{i:05d}-" + "x" * 100, "exp": 4_000_000_000}
    header = b64(b'{"alg":"RS256","typ":"JWT"}')
    return f"psat={header}.{b64(json.dumps(claims).encode())}.{b64(b'sig')}"


async def _raw(port: int, ctx: ssl.SSLContext, data: bytes) -> int:
    """Send ``data`` on a new TLS connection; the status of the answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split(b" ")[1])
    finally:
        writer.close()
        await writer.wait_closed()


def _unparseable(i: int) -> list[tuple[bytes, int]]:
    """Requests aiohttp itself refuses (it answers and closes the connection)."""
    return [
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n", 400),
        (b"FO\x01O / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /%d HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n" % i, 400),
    ]


async def test_hostile_requests_get_4xx_quietly_and_leave_nothing_behind(
    sim: Simulator, walk: Walk, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(sim.info.admin_url.split(":")[2].split("/")[0])
    ctx = ssl_context(sim.info)
    main = sim.info.admin_url.removesuffix("/_admin")
    tokens_url = walk.capabilities.href("_links", "anonApplicationTokens") if walk.capabilities else ""
    huge = b"{" + b" " * (sim.config.max_body_bytes + 1) + b"}"
    before = sim.core.bookkeeping_sizes()
    statuses: dict[str, dict[int, int]] = {}

    def count(kind: str, status: int) -> None:
        statuses.setdefault(kind, {}).setdefault(status, 0)
        statuses[kind][status] += 1

    with caplog.at_level(logging.DEBUG):
        for i in range(ROUNDS):
            psat = {"Authorization": f"Bearer {_forged_psat(i)}"}
            asi_body = {"applicationSessionId": f"hostile-{i:05d}", "allowedOrigins": sim.info.origin}
            calls: list[tuple[str, str, str, dict[str, Any]]] = [
                ("forged_psat", "POST", main + "/ucwa/psanon/v1/applications", {"headers": psat, "json": {}}),
                ("forged_gid", "GET", main + f"/ucwa/psanon/v1/applications/g{i}/events", {"headers": psat}),
                ("bad_aad", "POST", tokens_url, {"headers": {"Authorization": "Bearer x"}, "json": asi_body}),
                ("bad_json", "POST", tokens_url, {"headers": walk.sa_headers(), "data": b"{not json"}),
                ("huge_body", "POST", tokens_url, {"headers": walk.sa_headers(), "data": huge}),
                ("bad_admin", "GET", sim.info.admin_url + "/state", {"headers": {"X-Admin-Token": str(i)}}),
            ]
            for kind, method, url, kw in calls:
                count(kind, (await walk.call(method, url, **kw)).status)
            for data, _ in _unparseable(i)[i % 2 :: 2]:  # two of the four per round
                count("unparseable", await _raw(port, ctx, data))

    assert statuses == {
        "forged_psat": {401: ROUNDS},
        "forged_gid": {404: ROUNDS},
        "bad_aad": {403: ROUNDS},
        "bad_json": {400: ROUNDS},
        "huge_body": {413: ROUNDS},
        "bad_admin": {403: ROUNDS},
        "unparseable": {400: 2 * ROUNDS},
    }
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    assert sim.info.admin_token not in caplog.text
    after = sim.core.bookkeeping_sizes()
    grown = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    # what may grow, by a few entries whatever N is: the (route, status) counts and the injector's counter
    # of guestless requests per route (keyed by route only)
    assert set(grown) <= {"routes", "fault_counters"} and max(grown.values(), default=0) <= 8, grown
    assert sim.snapshot()["guests"] == {}


def test_guest_timelines_are_capped_oldest_first(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core_module, "GUEST_TIMELINES_CAP", 3)
    core = sim.core
    for i in range(10):
        core.record("anon_tokens", 503, f"g{i}", None)
    assert list(core.guests) == ["g7", "g8", "g9"]
    core.record("anon_tokens", 401, "new", None)  # a refused request of an unknown guest: nothing kept
    core.record("anon_tokens", 200, "x" * (core_module.MAX_ASI_CHARS + 1), None)  # too long to track
    assert list(core.guests) == ["g7", "g8", "g9"]
    core.record("anon_tokens", 401, "g8", None)  # a known guest's failures are still on its timeline
    assert [entry[2] for entry in core.guests["g8"]] == [503, 401]
