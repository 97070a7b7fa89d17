"""A hostile (or broken) Trusted Application API + psanon server on loopback, for the client's issue 11.

It serves one happy join (discover -> applications -> capabilities -> anonApplicationTokens -> anonymous
discover -> anonApplications -> invitation -> events: the invitation completes on the first poll) over
TLS signed by the test CA (the simulator's, ``anonjoin.simulator._tls``), and the same routes over plain
http on a second loopback port, so a client that sends a token in cleartext is seen doing it. One
misbehaviour at a time is switched on through :class:`Misbehaviour`. Every request is recorded
(:class:`Seen`: method, scheme, host, path, whether it carried ``Authorization``).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web
from aiohttp.test_utils import TestServer

from anonjoin.simulator._tls import ca_pem, server_ssl_context

CONF = "sip:org@contoso.com;gruu;opaque=app:conf:focus:id:HOSTILE1"
AAD_TOKEN = "eyJhbGciOiJub25lIn0.eyJhcHBpZCI6Imhvc3RpbGUifQ.aadhostilesig"

_CA_DIR = tempfile.TemporaryDirectory(prefix="anonjoin-hostile-ca-")
CA_FILE = os.path.join(_CA_DIR.name, "ca.pem")
with open(CA_FILE, "wb") as _f:
    _f.write(ca_pem())


@dataclass(frozen=True)
class _Token:
    value: str = field(repr=False)


class Credential:
    """An Azure AD credential that hands out one fixed bearer token (the hostile server checks none)."""

    async def token(self) -> _Token:
        return _Token(AAD_TOKEN)

    async def refresh(self, rejected: Any) -> _Token:
        return _Token(AAD_TOKEN)

    async def aclose(self) -> None:
        return None


_UNSET: Any = object()

Token = Literal["none", "redirect_http", "redirect_foreign", "href_http", "href_http_guest"]
Poll = Literal["normal", "empty", "heartbeat", "resync"]


@dataclass
class Misbehaviour:
    token: Token = "none"
    """none; a 307 of the token POST to http; a 307 of it to a host not of the service (localhost); the
    capabilities' anonApplicationTokens href over http (AAD token); anonApplications href over http (psat)."""
    expiry: Any = _UNSET
    """The grant's ``expiryTime`` as sent (unset: an hour from now; ``None``: left out)."""
    date_offset_s: float = 0.0
    """The server's clock (its ``Date`` header and default expiry) this far from the client's."""
    poll: Poll = "normal"
    """After the join: polls parked (normal), or answered at once empty / heartbeat / only resync."""
    drip: str | None = None
    """A route whose answer never ends: headers, then a byte every ``drip_every_s``."""
    drip_every_s: float = 0.2
    status: dict[str, int] = field(default_factory=dict)
    """route -> an error status it always answers (503, ...)."""


@dataclass(frozen=True)
class Seen:
    route: str
    method: str
    scheme: str
    host: str
    path: str
    auth: bool


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _psat(asi: str) -> str:
    def b64(d: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).decode().rstrip("=")

    claims = {"asi": asi, "exp": int(time.time() + 3600), "confid": CONF}
    return "psat=" + b64({"alg": "RS256"}) + "." + b64(claims) + ".aG9zdGlsZXNpZw"


class Hostile:
    def __init__(self, bad: Misbehaviour | None = None) -> None:
        self.bad = bad or Misbehaviour()
        self.seen: list[Seen] = []
        self.https = ""  # https://127.0.0.1:port
        self.http = ""  # http://127.0.0.1:port (same routes, cleartext)
        self.port = 0
        self._apps: dict[str, int] = {}  # app id -> polls answered
        self._parked: list[asyncio.Event] = []
        self.count: Counter[str] = Counter()

    @property
    def discover_url(self) -> str:
        return f"{self.https}/platformservice/discover"

    def cleartext_with_token(self) -> list[Seen]:
        return [s for s in self.seen if s.auth and s.scheme != "https"]

    # --- the app --------------------------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application()
        r = app.router
        routes = [
            ("GET", "/platformservice/discover", "discover", self.discover),
            ("GET", "/platformservice/v1/applications", "applications", self.applications),
            ("GET", "/platformservice/v1/applications/1", "capabilities", self.capabilities),
            ("POST", "/platformservice/v1/applications/1/anonApplicationTokens", "anon_tokens", self.tokens),
            ("GET", "/ucwa/psanon/v1/discover", "anon_discover", self.anon_discover),
            ("POST", "/ucwa/psanon/v1/applications", "anon_applications", self.create),
            ("POST", "/ucwa/psanon/v1/applications/{id}/invitations", "invitations", self.invite),
            ("GET", "/ucwa/psanon/v1/applications/{id}/events", "events", self.events),
            ("DELETE", "/ucwa/psanon/v1/applications/{id}", "delete_application", self.delete),
        ]
        for method, path, name, handler in routes:
            r.add_route(method, path, self._wrap(name, handler))
        return app

    def _wrap(self, name: str, handler: Any) -> Any:
        async def wrapped(req: web.Request) -> web.StreamResponse:
            self.seen.append(
                Seen(name, req.method, req.scheme, req.host, req.path, "Authorization" in req.headers)
            )
            self.count[name] += 1
            status = self.bad.status.get(name)
            if status is not None:
                return web.json_response({"code": "ServiceFailure"}, status=status)
            if self.bad.drip == name:
                return await self._drip(req)
            resp: web.StreamResponse = await handler(req)
            if self.bad.date_offset_s:
                resp.headers["Date"] = email.utils.formatdate(
                    time.time() + self.bad.date_offset_s, usegmt=True
                )
            return resp

        return wrapped

    async def _drip(self, req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(req)
        await resp.write(b"{")
        while True:  # never ends; the client must cut it
            await asyncio.sleep(self.bad.drip_every_s)
            await resp.write(b" ")

    async def discover(self, req: web.Request) -> web.StreamResponse:
        return web.json_response({"_links": {"applications": {"href": "/platformservice/v1/applications"}}})

    async def applications(self, req: web.Request) -> web.StreamResponse:
        return web.json_response({"_links": {"application": {"href": "/platformservice/v1/applications/1"}}})

    async def capabilities(self, req: web.Request) -> web.StreamResponse:
        tokens = "/platformservice/v1/applications/1/anonApplicationTokens"
        if self.bad.token == "href_http":
            tokens = f"{self.http}{tokens}"
        return web.json_response(
            {"_links": {"self": {"href": "/x"}, "anonApplicationTokens": {"href": tokens}}}
        )

    async def tokens(self, req: web.Request) -> web.StreamResponse:
        body = await req.json()
        asi = body["applicationSessionId"]
        if req.scheme == "https" and self.bad.token == "redirect_http":
            return web.Response(status=307, headers={"Location": f"{self.http}{req.path}"})
        if req.host.startswith("127.0.0.1") and self.bad.token == "redirect_foreign":
            return web.Response(status=307, headers={"Location": f"https://localhost:{self.port}{req.path}"})
        out: dict[str, Any] = {
            "token": _psat(asi),
            "_links": {"discover": {"href": "/ucwa/psanon/v1/discover"}},
        }
        if self.bad.expiry is _UNSET:
            out["expiryTime"] = iso(time.time() + self.bad.date_offset_s + 3600)
        elif self.bad.expiry is not None:
            out["expiryTime"] = self.bad.expiry
        return web.json_response(out)

    async def anon_discover(self, req: web.Request) -> web.StreamResponse:
        apps = "/ucwa/psanon/v1/applications"
        if self.bad.token == "href_http_guest":
            apps = f"{self.http}{apps}"
        return web.json_response({"_links": {"anonApplications": {"href": apps}}, "conferenceId": CONF})

    async def create(self, req: web.Request) -> web.StreamResponse:
        app_id = uuid.uuid4().hex[:10]
        self._apps[app_id] = 0
        base = f"/ucwa/psanon/v1/applications/{app_id}"
        return web.json_response(
            {
                "_links": {"self": {"href": base}, "events": {"href": f"{base}/events?ack=1"}},
                "_embedded": {
                    "communication": {"_links": {"joinOnlineMeeting": {"href": f"{base}/invitations"}}}
                },
            },
            status=201,
        )

    async def invite(self, req: web.Request) -> web.StreamResponse:
        return web.Response(status=201, headers={"Location": f"{req.path}/inv1"})

    async def events(self, req: web.Request) -> web.StreamResponse:
        app_id = req.match_info["id"]
        if app_id not in self._apps:
            return web.json_response({"code": "NotFound", "subcode": "ApplicationNotFound"}, status=404)
        n = self._apps[app_id] = self._apps[app_id] + 1
        nxt = {"next": {"href": f"{req.path}?ack={n + 1}"}}
        if n == 1:
            done = {
                "link": {"rel": "onlineMeetingInvitation", "href": f"{req.path}/inv1"},
                "type": "completed",
                "status": "Success",
            }
            return web.json_response({"_links": nxt, "sender": [{"rel": "communication", "events": [done]}]})
        if self.bad.poll == "empty":
            return web.json_response({"_links": nxt})
        if self.bad.poll == "heartbeat":
            return web.json_response({"_links": nxt, "sender": []})
        if self.bad.poll == "resync":
            return web.json_response(
                {"_links": {"resync": {"href": f"{req.path}?ack={n + 1}"}}, "sender": []}
            )
        released = asyncio.Event()  # parked until the application is deleted (or the server stops)
        self._parked.append(released)
        await released.wait()
        return web.json_response({"code": "NotFound", "subcode": "ApplicationNotFound"}, status=404)

    async def delete(self, req: web.Request) -> web.StreamResponse:
        self._apps.pop(req.match_info["id"], None)
        self._release()
        return web.Response(status=204)

    def _release(self) -> None:
        for e in self._parked:
            e.set()
        self._parked.clear()


@asynccontextmanager
async def hostile(bad: Misbehaviour | None = None) -> AsyncIterator[Hostile]:
    """The hostile server on two loopback ports (https and http) for the duration of the block."""
    h = Hostile(bad)
    app = h.application()
    tls = TestServer(app, host="127.0.0.1")
    plain = TestServer(h.application(), host="127.0.0.1")
    await tls.start_server(ssl=server_ssl_context())
    await plain.start_server()
    h.https = str(tls.make_url("")).rstrip("/")
    h.http = str(plain.make_url("")).rstrip("/")
    assert tls.port is not None
    h.port = tls.port
    try:
        yield h
    finally:
        h._release()
        await tls.close()
        await plain.close()
