"""A small scriptable protocol server for single-step and bad-input tests of the client (loopback HTTP).

The default behaviour is one happy join. ``script(route, *responses)`` makes the next requests of a
route answer with canned responses (a status/headers/body triple, a callable, or ``CLOSE`` to drop the
connection mid-response); ``block(route)`` holds a route until released (for cancellation tests).
Route names match the simulator's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from anonjoin._async.client import Client
from anonjoin._async.retry import Clock
from anonjoin.simulator._tls import ca_pem, server_ssl_context

from .policies import STEP_REJOIN, STEP_RETRY

CLOSE = "CLOSE"
ENDPOINT = "sip:app@contoso.com"
ORIGIN = "https://contoso.com"
CONF = "sip:org@contoso.com;gruu;opaque=app:conf:focus:id:ABC123"
AAD_TOKEN = "eyJhbGciOiJub25lIn0.eyJhcHBpZCI6ImFhZCJ9.aadsecretsig"


def make_psat(asi: str, ttl: float, confid: str | None = CONF) -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    claims: dict[str, Any] = {"asi": asi, "exp": int(time.time() + ttl), "nbf": int(time.time())}
    if confid:
        claims["confid"] = confid
    return "psat=" + b64({"alg": "RS256", "x5t": "x"}) + "." + b64(claims) + ".c2lnbmF0dXJlc2VjcmV0"


@dataclass
class Canned:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Reply = Canned | str | Handler


@dataclass
class App:
    id: str
    asi: str
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    ack: int = 1
    gone: bool = False
    live: bool = True


class FakeService:
    def __init__(self) -> None:
        self.scripts: dict[str, list[Reply]] = defaultdict(list)
        self.requests: list[tuple[str, web.Request, bytes]] = []
        self.blocks: dict[str, asyncio.Event] = {}
        self.reached: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.apps: dict[str, App] = {}
        self.psat_ttl = 3600.0
        self.lobby: str | None = None  # None | "admit" | "deny"
        self.lobby_delay = 0.05
        self.prefix = "service:"
        self.conference_in_discover = True
        self.capabilities_links = ["anonApplicationTokens", "adhocMeetings"]
        self.tokens_minted: list[str] = []
        self.poll_park_s = 30.0
        self.base = ""
        self.join_events: Callable[[App], list[dict[str, Any]]] | None = None

    # --- helpers for tests ---------------------------------------------------------------------------
    def script(self, route: str, *replies: Reply) -> None:
        self.scripts[route].extend(replies)

    def block(self, route: str) -> asyncio.Event:
        ev = asyncio.Event()
        self.blocks[route] = ev
        return ev

    def count(self, route: str) -> int:
        return sum(1 for r, _, _ in self.requests if r == route)

    def live_apps(self) -> list[App]:
        return [a for a in self.apps.values() if a.live and not a.gone]

    def push(self, app: App, *events: dict[str, Any]) -> None:
        app.queue.put_nowait({"rel": "communication", "href": "/c", "events": list(events)})

    def app_of(self, asi: str) -> App:
        return next(a for a in self.apps.values() if a.asi == asi and not a.gone)

    def drop(self, asi: str) -> None:
        app = self.app_of(asi)
        self.push(
            app,
            ev("conversation", "updated", state="Disconnected"),
            ev("conversation", "deleted", reason={"code": "Gone", "subcode": "Removed"}),
        )

    def end(self, asi: str) -> None:
        self.push(
            self.app_of(asi), ev("conversation", "deleted", reason={"code": "Gone", "subcode": "Ended"})
        )

    # --- server --------------------------------------------------------------------------------------
    def application(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        r = app.router
        r.add_get("/platformservice/discover", self._wrap("discover", self.discover))
        r.add_get("/platformservice/v1/applications", self._wrap("applications", self.applications))
        r.add_get("/platformservice/v1/applications/1", self._wrap("capabilities", self.capabilities))
        r.add_post(
            "/platformservice/v1/applications/1/anonApplicationTokens", self._wrap("anon_tokens", self.tokens)
        )
        r.add_post(
            "/platformservice/v1/applications/1/adhocMeetings", self._wrap("adhoc_meetings", self.adhoc)
        )
        r.add_get("/ucwa/discover", self._wrap("anon_discover", self.anon_discover))
        r.add_post("/ucwa/psanon/v1/applications", self._wrap("anon_applications", self.create))
        r.add_post(
            "/ucwa/psanon/v1/applications/{id}/communication/onlineMeetingInvitations",
            self._wrap("invitations", self.invite),
        )
        r.add_get("/ucwa/psanon/v1/applications/{id}/events", self._wrap("events", self.events))
        r.add_delete("/ucwa/psanon/v1/applications/{id}", self._wrap("delete_application", self.delete))
        r.add_get("/elsewhere/{tail:.*}", self._wrap("redirected", self.redirected))
        r.add_post("/elsewhere/{tail:.*}", self._wrap("redirected", self.redirected))
        return app

    def _wrap(self, route: str, handler: Handler) -> Handler:
        async def wrapped(req: web.Request) -> web.StreamResponse:
            body = await req.read()
            self.requests.append((route, req, body))
            self.reached[route].set()
            block = self.blocks.get(route)
            if block is not None:
                await block.wait()
            if self.scripts.get(route):
                reply = self.scripts[route].pop(0)
                if reply == CLOSE:
                    assert req.transport is not None
                    req.transport.close()
                    raise ConnectionResetError("closed on purpose")
                if isinstance(reply, Canned):
                    if reply.raw is not None:
                        return web.Response(status=reply.status, body=reply.raw, headers=reply.headers)
                    if reply.body is None:
                        return web.Response(status=reply.status, headers=reply.headers)
                    return web.json_response(reply.body, status=reply.status, headers=reply.headers)
                assert callable(reply)
                return await reply(req)
            return await handler(req)

        return wrapped

    def rel(self, name: str) -> str:
        return self.prefix + name

    async def discover(self, req: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "_links": {
                    "self": {"href": "/platformservice/discover"},
                    self.rel("applications"): {"href": f"{self.base}/platformservice/v1/applications"},
                }
            }
        )

    async def applications(self, req: web.Request) -> web.StreamResponse:
        assert req.query.get("endpointId") == ENDPOINT
        return web.json_response(
            {"_links": {self.rel("application"): {"href": "/platformservice/v1/applications/1?endpointId=x"}}}
        )

    async def capabilities(self, req: web.Request) -> web.StreamResponse:
        links: dict[str, Any] = {"self": {"href": "/platformservice/v1/applications/1"}}
        for name in self.capabilities_links:
            links[self.rel(name)] = {"href": f"/platformservice/v1/applications/1/{name}?endpointId=x"}
        return web.json_response({"_links": links, "_embedded": {self.rel("communication"): {"etag": "1"}}})

    async def tokens(self, req: web.Request) -> web.StreamResponse:
        body = await req.json()
        asi = body["applicationSessionId"]
        tok = make_psat(asi, self.psat_ttl, None if self.conference_in_discover else CONF)
        self.tokens_minted.append(tok)
        ctx = "psat%253d" + tok[5:]
        return web.json_response(
            {
                "token": tok,
                "expiryTime": f"/Date({int((time.time() + self.psat_ttl) * 1000)})/",
                "_links": {
                    self.rel("discover"): {"href": f"/ucwa/discover?anonymousContext={ctx}&asi={asi}"}
                },
            },
            status=201,
        )

    async def adhoc(self, req: web.Request) -> web.StreamResponse:
        body = await req.json()
        return web.json_response(
            {
                "subject": body["subject"],
                "joinUrl": "https://meet.contoso.com/org/XYZ789",
                "onlineMeetingUri": "sip:org;gruu;opaque=app:conf:focus:id:XYZ789",
                "expirationTime": "2030-01-01T00:00:00Z",
                "accessLevel": body.get("accessLevel"),
            },
            status=201,
        )

    async def anon_discover(self, req: web.Request) -> web.StreamResponse:
        assert req.headers.get("Origin") == ORIGIN
        assert "psat%253d" in req.raw_path or "psat%3d" in req.raw_path.lower(), req.raw_path
        out: dict[str, Any] = {"_links": {"anonApplications": {"href": "/ucwa/psanon/v1/applications"}}}
        if self.conference_in_discover:
            out["conferenceId"] = CONF
        return web.json_response(out)

    def _check_psat(self, req: web.Request) -> str | None:
        auth = req.headers.get("Authorization", "")
        if not auth.startswith("Bearer psat=") or auth[7:] not in self.tokens_minted:
            return None
        return auth[7:]

    async def create(self, req: web.Request) -> web.StreamResponse:
        if self._check_psat(req) is None:
            return web.json_response({"code": "Unauthorized"}, status=401)
        tok = req.headers["Authorization"][7:]
        asi = json.loads(base64.urlsafe_b64decode(tok[5:].split(".")[1] + "==="))["asi"]
        for old in self.apps.values():
            if old.asi == asi:
                old.gone = True
                old.queue.put_nowait({})  # wake a parked poll
        app = App(uuid.uuid4().hex[:8], asi)
        self.apps[app.id] = app
        base = f"/ucwa/psanon/v1/applications/{app.id}"
        return web.json_response(
            {
                "id": app.id,
                "culture": "en-us",
                "expires": "\\/Date(1893456000000)\\/",
                "_links": {"self": {"href": base}, "events": {"href": f"{base}/events?ack=1&key=k"}},
                "_embedded": {
                    "me": {"uri": "sip:1@anonymous.invalid"},
                    "communication": {
                        "_links": {
                            "joinOnlineMeeting": {"href": f"{base}/communication/onlineMeetingInvitations"}
                        }
                    },
                },
            },
            status=201,
        )

    def _app(self, req: web.Request) -> App | web.Response:
        app = self.apps.get(req.match_info["id"])
        if app is None or app.gone or not app.live:
            return web.json_response({"code": "NotFound", "subcode": "ApplicationNotFound"}, status=404)
        if self._check_psat(req) is None:
            return web.json_response({"code": "Unauthorized"}, status=401)
        return app

    async def invite(self, req: web.Request) -> web.StreamResponse:
        app = self._app(req)
        if isinstance(app, web.Response):
            return app
        body = await req.json()
        assert body["onlineMeetingUri"] == CONF
        if self.join_events is not None:
            self.push(app, *self.join_events(app))
        else:
            self.push(app, ev("onlineMeetingInvitation", "started"))
            if self.lobby:
                self.push(app, ev("conversation", "updated", state="InLobby"))

                async def later() -> None:
                    await asyncio.sleep(self.lobby_delay)
                    if self.lobby == "admit":
                        self.push(app, ev("conversation", "updated", state="Conferenced"), completed(True))
                    else:
                        self.push(app, completed(False, "Denied"))

                asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(later()))
            else:
                self.push(app, ev("conversation", "updated", state="Conferenced"), completed(True))
        return web.Response(status=201, headers={"Location": f"{req.path}/inv1"})

    async def events(self, req: web.Request) -> web.StreamResponse:
        app = self._app(req)
        if isinstance(app, web.Response):
            return app
        ack = int(req.query.get("ack", "0"))
        if ack != app.ack:
            return web.json_response({"_links": {"resync": {"href": f"{req.path}?ack={app.ack}&key=k"}}})
        try:
            sender = await asyncio.wait_for(app.queue.get(), self.poll_park_s)
        except TimeoutError:
            sender = {}
        if app.gone:
            return web.json_response({"code": "NotFound", "subcode": "ApplicationNotFound"}, status=404)
        app.ack += 1
        body: dict[str, Any] = {
            "_links": {
                "self": {"href": str(req.rel_url)},
                "next": {"href": f"{req.path}?ack={app.ack}&key=k"},
            }
        }
        body["sender"] = [sender] if sender else []
        return web.json_response(body)

    async def delete(self, req: web.Request) -> web.StreamResponse:
        app = self._app(req)
        if isinstance(app, web.Response):
            return app
        app.live = False
        app.queue.put_nowait({})
        return web.Response(status=204)

    async def redirected(self, req: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"auth": req.headers.get("Authorization"), "origin": req.headers.get("Origin")}
        )


def ev(rel: str, type_: str, *, state: str | None = None, reason: dict[str, str] | None = None,
       status: str | None = None) -> dict[str, Any]:  # fmt: skip
    e: dict[str, Any] = {"link": {"rel": rel, "href": f"/x/{rel}"}, "type": type_}
    if state is not None:
        e["_embedded"] = {rel: {"state": state}}
    if reason is not None:
        e["reason"] = reason
    if status is not None:
        e["status"] = status
    return e


def completed(ok: bool, subcode: str | None = None) -> dict[str, Any]:
    if ok:
        return ev("onlineMeetingInvitation", "completed", status="Success")
    return ev("onlineMeetingInvitation", "completed", status="Failure",
              reason={"code": "Forbidden", "subcode": subcode or "Denied"})  # fmt: skip


class FakeToken:
    def __init__(self, value: str) -> None:
        self.value = value
        self.expires_at = time.time() + 3600

    def __repr__(self) -> str:
        return "FakeToken(value=[redacted])"


class FakeCredential:
    """Implements the Credential protocol of anonjoin._async.auth without AAD."""

    def __init__(self) -> None:
        self.tokens = 0
        self.refreshes = 0
        self.closed = False

    async def token(self) -> FakeToken:
        self.tokens += 1
        return FakeToken(AAD_TOKEN)

    async def refresh(self, rejected: Any) -> FakeToken:
        self.refreshes += 1
        return FakeToken(AAD_TOKEN + "r")

    async def aclose(self) -> None:
        self.closed = True


class RecordingClock(Clock):
    """Real monotonic time, but sleeps are recorded and shortened (tests never really wait)."""

    def __init__(self, scale: float = 0.0) -> None:
        super().__init__()
        self.sleeps: list[float] = []
        self.scale = scale

        async def sleep(s: float) -> None:
            self.sleeps.append(s)
            await asyncio.sleep(s * self.scale)

        self.sleep = sleep


_CA_DIR = tempfile.TemporaryDirectory(prefix="anonjoin-fake-ca-")
CA_FILE = os.path.join(_CA_DIR.name, "ca.pem")
with open(CA_FILE, "wb") as _f:
    _f.write(ca_pem())
"""The test CA (the simulator's) that signs the fake's certificate: tokens go over https only."""


@asynccontextmanager
async def fake_client(fake: FakeService, **kw: Any) -> AsyncIterator[tuple[Client, TestServer]]:
    server = TestServer(fake.application(), host="127.0.0.1")
    await server.start_server(ssl=server_ssl_context())
    fake.base = str(server.make_url("")).rstrip("/")
    kw.setdefault("ca_file", CA_FILE)
    kw.setdefault("retry", STEP_RETRY)
    kw.setdefault("rejoin", STEP_REJOIN)
    kw.setdefault("clock", RecordingClock())
    client = Client(
        discover_url=f"{fake.base}/platformservice/discover",
        endpoint_id=ENDPOINT,
        credential=kw.pop("credential", None) or FakeCredential(),
        **kw,
    )
    try:
        yield client, server
    finally:
        await client.aclose()
        for b in fake.blocks.values():
            b.set()
        await server.close()
