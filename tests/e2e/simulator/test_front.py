"""The HTTP front (``_app.py``): route matching, the low-level server's handler and what it stamps."""

from __future__ import annotations

import gc
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping

import aiohttp
import pytest

from anonjoin.simulator import FaultProfile, FaultRule, Simulator, _app, _cli
from anonjoin.simulator._app import ROUTES, Route, first_match

from support.walk import Walk

PATHS = (
    "/contoso.com/v2.0/.well-known/openid-configuration",
    "/Contoso.com/discovery/v2.0/keys",
    "/8a6f1d3e-1c2b-4e5f-9a7b-0c1d2e3f4a5b/oauth2/v2.0/token",
    "/ucwa/v2.0/.well-known/openid-configuration",  # a tenant called "ucwa": still the AAD route
    "/platformservice/v2.0/.well-known/openid-configuration",
    "/platformservice/discover",
    "/platformService/discover",
    "/platformservice/v1/applications",
    "/platformservice/v1/applications/abc",
    "/platformservice/v1/applications/abc/anonApplicationTokens",
    "/platformservice/v1/applications/abc/adhocmeetings",
    "/ucwa/psanon/v1/applications",
    "/UCWA/psanon/v1/applications/1abc",
    "/ucwa/psanon/v1/applications/1abc/communication/onlineMeetingInvitations",
    "/ucwa/psanon/v1/applications/1abc/events",
    "/ucwa/psanon/v1/applications/1abc/me/makeMeAvailable",
    "/ucwa/psanon/v1/applications/1abc/communication/conversations/2/participants",
    "/_private/v2.0/.well-known/openid-configuration",
    "/",
    "",
    "/nowhere",
    "//platformservice/discover",
)


def _full_scan(method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    """What ``_match`` must answer: the first route of ROUTES that matches, scanning all of them."""
    return first_match(ROUTES, method, path)


@pytest.mark.parametrize("path", PATHS)
def test_matching_by_first_segment_agrees_with_a_full_scan(path: str) -> None:
    for method in ("GET", "POST", "DELETE", "PUT"):
        assert _app._match(method, path) == _full_scan(method, path), (method, path)


def test_correlation_ids_are_version_4_uuids() -> None:
    ids = {_app._correlation_id() for _ in range(2000)}
    assert len(ids) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


V4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def _traced(headers: Mapping[str, str], listener: str, *, fault: bool = False) -> bool:
    """The tracing headers of protocol.md §2, as the front stamps them (a fault brings its own id)."""
    correlation = headers.get("X-MS-Correlation-Id", "")
    if fault:  # the fault's own id, reproducible from the seed: any UUID
        assert str(uuid.UUID(correlation)) == correlation
    elif re.fullmatch(V4, correlation) is None:
        return False
    return (
        headers.get("X-MS-Server-Fqdn") == f"{listener}.sim.anonjoin.invalid"
        and headers.get("client-request-id") == "req-7"
    )


TRACE = {"client-request-id": "req-7"}


async def test_expect_100_continue_is_answered(sim: Simulator, walk: Walk) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": sim.info.client_id,
        "client_secret": sim.info.client_secret,
        "scope": sim.info.scope,
    }
    limit = aiohttp.ClientTimeout(total=10)
    async with walk.session.post(
        sim.info.token_endpoint, data=form, expect100=True, headers=TRACE, timeout=limit
    ) as r:
        assert r.status == 200 and "access_token" in await r.json()
        assert _traced(r.headers, "main")
    async with walk.session.post(sim.info.token_endpoint, data=form, headers={**TRACE, "Expect": "x"}) as r:
        assert r.status == 417
        assert _traced(r.headers, "main")


async def test_a_close_fault_carries_the_listeners_fqdn(sim: Simulator, walk: Walk) -> None:
    sim.set_faults(FaultProfile(rules=(FaultRule(route="anon_discover", kind="close", rate=1.0),)))
    guest = await walk.guest("asi-close")
    discover = guest.token_reply.href("_links", "discover")
    async with walk.session.get(discover, headers={**TRACE, "Origin": sim.info.origin}) as r:
        assert r.status == 200
        assert _traced(r.headers, "main", fault=True)
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_an_oversized_chunked_form_is_413_and_traced(sim: Simulator, walk: Walk) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"grant_type=client_credentials&pad="
        for _ in range(20):
            yield b"x" * 8192

    async with walk.session.post(
        sim.info.token_endpoint,
        data=chunks(),
        headers={**TRACE, "Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 413
        assert _traced(r.headers, "main")


async def test_a_failure_outside_the_routes_is_a_clean_500(
    sim: Simulator, walk: Walk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injector bug")

    monkeypatch.setattr(sim.core.injector, "apply", broken)
    r = await walk.call("GET", sim.info.pool_url + "/ucwa/psanon/v1/applications/nope/events", headers=TRACE)
    assert r.status == 500 and r.body["code"] == "ServiceFailure"
    assert "injector bug" not in r.text and "Traceback" not in r.text
    assert _traced(r.headers, "pool")
    assert "injector bug" in caplog.text


async def test_a_client_gone_before_the_answer_is_no_simulator_failure(
    sim: Simulator, walk: Walk, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """chaos: a ``close`` fault on a poll the client had already cancelled could not prepare its answer
    (``Cannot write to closing transport``) and was logged as a simulator failure."""

    async def gone(*args: object, **kwargs: object) -> None:
        raise ConnectionResetError("Cannot write to closing transport")

    monkeypatch.setattr(sim.core.injector, "apply", gone)
    with caplog.at_level(logging.DEBUG, logger="anonjoin.simulator"):
        await walk.call("GET", sim.info.pool_url + "/ucwa/psanon/v1/applications/nope/events", headers=TRACE)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "the client went away" in caplog.text


def test_the_cli_tunes_its_own_garbage_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(gc, "collect", lambda: calls.append("collect"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    monkeypatch.setattr(gc, "set_threshold", lambda *t: calls.append(t))
    _cli._tune_gc()
    assert calls == ["collect", "freeze", _cli.GC_THRESHOLD]
    assert _cli.GC_THRESHOLD[0] > gc.get_threshold()[0]
