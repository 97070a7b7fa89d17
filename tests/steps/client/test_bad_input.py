"""Issue 6 §2: malformed responses give a typed error for that guest, never a crash or an unbounded read."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web

from anonjoin import AnonJoinError, GuestState, JoinFailed, ProtocolError

from support.fake import ORIGIN, Canned, FakeService, completed, ev, fake_client

MEETING = "https://meet.contoso.com/org/ABC123"
HUGE = 2 * 1024 * 1024


async def _join_error(fake: FakeService) -> AnonJoinError:
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        with pytest.raises(AnonJoinError) as info:
            await g.join()
        assert g.state is GuestState.FAILED
        assert fake.live_apps() == []
        out = await g.wait_closed()
        assert out.kind == "failed" and out.error is info.value
        return info.value


async def _chunked_huge(req: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    resp.enable_chunked_encoding()
    await resp.prepare(req)
    chunk = b" " * 65536
    try:
        for _ in range(HUGE // len(chunk) + 2):
            await resp.write(chunk)
    except (ConnectionResetError, RuntimeError):
        pass
    return resp


def _redirect(location: str) -> Any:
    async def handler(req: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": location})

    return handler


CASES: dict[str, tuple[str, Any, str]] = {
    # name: (route, reply, expected step on the error)
    "invalid-json-sa": ("discover", Canned(200, raw=b"{not json"), "discover"),
    "invalid-json-guest": ("anon_applications", Canned(201, raw=b"<html>oops</html>"), "anon_applications"),
    "wrong-types": ("anon_tokens", Canned(201, {"token": 5, "expiryTime": [], "_links": {}}), "anon_tokens"),
    "missing-link-discover": ("anon_discover", Canned(200, {"_links": {}}), "anon_discover"),
    "missing-events-link": (
        "anon_applications",
        Canned(201, {"_links": {"self": {"href": "/ucwa/psanon/v1/applications/zz"}}}),
        "anon_applications",
    ),
    "file-href": (
        "anon_tokens",
        Canned(
            201,
            {
                "token": "psat=a.b.c",
                "expiryTime": "2030-01-01T00:00:00Z",
                "_links": {"service:discover": {"href": "file:///etc/passwd"}},
            },
        ),
        "anon_tokens",
    ),
    "javascript-href": (
        "anon_discover",
        Canned(200, {"conferenceId": "c", "_links": {"anonApplications": {"href": "javascript:alert(1)"}}}),
        "anon_discover",
    ),
    "redirect-off-http": ("anon_discover", _redirect("file:///etc/passwd"), "anon_discover"),
    "two-redirects": ("anon_discover", _redirect("/ucwa/discover?again=1"), "anon_discover"),
    "huge-content-length": ("anon_discover", Canned(200, raw=b"{" + b" " * HUGE + b"}"), "anon_discover"),
    "huge-chunked": ("anon_discover", _chunked_huge, "anon_discover"),
    "no-location": ("invitations", Canned(201), "invitations"),
    "huge-error-page": ("invitations", Canned(400, raw=b"<html>" + b"x" * HUGE), "invitations"),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_malformed_response_is_a_typed_error(name: str) -> None:
    route, reply, step = CASES[name]
    fake = FakeService()
    if name == "two-redirects":
        fake.script(route, reply, reply)
    else:
        fake.script(route, reply)
    err = await _join_error(fake)
    assert isinstance(err, ProtocolError), repr(err)
    assert err.step == step
    assert len(str(err)) < 1000  # clipped


async def test_html_error_page_on_guest_step_is_a_typed_failure() -> None:
    fake = FakeService()
    fake.script("invitations", Canned(400, raw=b"<html><body>Bad Request</body></html>"))
    err = await _join_error(fake)
    assert isinstance(err, JoinFailed) and err.reason == "BadRequest"


@pytest.mark.parametrize(
    "batch",
    [
        [completed(True), completed(True)],  # duplicated completion
        [completed(True), ev("conversation", "updated", state="InLobby"), completed(False, "Denied")],
    ],
    ids=["duplicated", "out-of-order"],
)
async def test_events_out_of_order_or_duplicated(batch: list[dict[str, Any]]) -> None:
    fake = FakeService()
    fake.join_events = lambda app: batch
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        try:
            await g.join()  # the first completion may count as joined before the bad one arrives
        except AnonJoinError:
            pass
        out = await asyncio.wait_for(g.wait_closed(), 5)
        assert out.kind == "failed" and isinstance(out.error, ProtocolError)
        assert fake.live_apps() == []


async def test_events_without_next_link() -> None:
    fake = FakeService()
    fake.script("events", Canned(200, {"_links": {}, "sender": []}))
    err = await _join_error(fake)
    assert isinstance(err, ProtocolError) and err.step == "events"


async def test_other_guests_carry_on() -> None:
    fake = FakeService()
    fake.script("anon_applications", Canned(201, raw=b"garbage"))
    async with fake_client(fake) as (client, _):
        guests = [client.guest(meeting_url=MEETING, origin=ORIGIN, display_name=f"G{i}") for i in range(4)]
        results = await asyncio.gather(*(g.join() for g in guests), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], ProtocolError)
        assert sum(g.state is GuestState.JOINED for g in guests) == 3
