"""Wire conventions: error bodies by status, tracing headers, body limits, bad JSON, unknown routes."""

from __future__ import annotations

from typing import Any

import pytest

from anonjoin.simulator import Simulator
from anonjoin.simulator._wire import CODES

from support.walk import Walk


def test_status_codes_follow_the_protocol_table() -> None:
    assert dict(CODES) == {
        400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
        408: "ClientTimeout", 409: "Conflict", 410: "Gone", 412: "PreConditionFailed", 413: "EntityTooLarge",
        415: "UnsupportedMediaType", 429: "TooManyRequests", 500: "ServiceFailure", 503: "ServiceUnavailable",
        504: "Timeout",
    }  # fmt: skip


async def test_every_response_carries_the_tracing_headers(sim: Simulator, walk: Walk) -> None:
    for url, headers in (
        (sim.info.discover_url, walk.sa_headers()),
        (sim.info.discover_url, {}),
        (sim.info.pool_url + "/nowhere", {}),
    ):
        r = await walk.call("GET", url, headers={**headers, "client-request-id": "req-42"})
        assert r.headers["client-request-id"] == "req-42"
        assert len(r.headers["X-MS-Correlation-Id"]) == 36
        assert r.headers["X-MS-Server-Fqdn"].endswith(".sim.anonjoin.invalid")
    first = await walk.call("GET", sim.info.discover_url)
    second = await walk.call("GET", sim.info.discover_url)
    assert first.headers["X-MS-Correlation-Id"] != second.headers["X-MS-Correlation-Id"]


async def test_unknown_route_and_wrong_method(sim: Simulator, walk: Walk) -> None:
    missing = await walk.call("GET", sim.info.pool_url + "/no/such/thing")
    assert missing.status == 404 and missing.body["code"] == "NotFound"
    wrong = await walk.call("PUT", sim.info.discover_url)
    assert wrong.status == 405 and wrong.body["code"] == "MethodNotAllowed"
    assert wrong.headers["Allow"] == "GET"


async def test_bodies_are_capped_and_must_be_json_objects(sim: Simulator, walk: Walk) -> None:
    assert walk.capabilities is not None
    url = walk.capabilities.href("_links", "anonApplicationTokens")
    big = {"applicationSessionId": "a", "allowedOrigins": "https://a.com", "pad": "x" * 70_000}
    r = await walk.call("POST", url, json=big, headers=walk.sa_headers())
    assert r.status == 413 and r.body["code"] == "EntityTooLarge"
    for data, ctype, status in (
        (b"{oops", "application/json", 400),
        (b"[1]", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b"<x/>", "application/xml", 415),
    ):
        r = await walk.call("POST", url, data=data, headers={**walk.sa_headers(), "Content-Type": ctype})
        assert r.status == status, (data, r.text)
        assert r.body["code"] == CODES[status]
    guest = await walk.guest("asi-big")
    d = await guest.discover()
    big_app = {"culture": "en-US", "userAgent": "t", "pad": "x" * 70_000}
    r = await walk.call("POST", d.href("_links", "anonApplications"), json=big_app, headers=guest.headers())
    assert r.status == 413


async def test_a_route_that_fails_answers_500_service_failure(
    sim: Simulator, walk: Walk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(**_: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(sim.core.state, "create_meeting", boom)
    assert walk.capabilities is not None
    url = walk.capabilities.href("_embedded", "adhocMeetings", "_links", "self")
    r = await walk.call("POST", url, json={}, headers=walk.sa_headers())
    assert r.status == 500 and r.body["code"] == "ServiceFailure"
    assert "bug" not in r.text
    assert "simulator route adhoc_meetings failed" in caplog.text
