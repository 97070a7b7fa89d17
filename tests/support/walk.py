"""A raw protocol walker for the simulator tests: plain aiohttp requests, no anonjoin client code.

It follows links exactly as protocol.md says a client must (relations with either prefix, hrefs resolved
against the URL of the response that carried them) so the tests exercise the server, not a client.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import aiohttp
from multidict import CIMultiDictProxy

from anonjoin.simulator import SimulatorInfo

JSON = dict[str, Any]


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any
    text: str
    url: str

    def href(self, *path: str) -> str:
        """Resolve the href found under ``path`` (relation names matched ignoring the prefix)."""
        node: Any = self.body
        for key in path:
            node = find(node, key)
        return urljoin(self.url, str(node["href"] if isinstance(node, dict) else node))


def find(node: Any, key: str) -> Any:
    """``node[key]``, where a relation key may carry a ``service:`` or ``ms:rtc:saas:`` prefix."""
    if key in node:
        return node[key]
    for name, value in node.items():
        if name.rsplit(":", 1)[-1] == key:
            return value
    raise KeyError(key)


def ssl_context(info: SimulatorInfo) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=info.ca_file)


@dataclass
class Walk:
    """One service application plus helpers to drive guests."""

    info: SimulatorInfo
    session: aiohttp.ClientSession
    aad_token: str = ""
    capabilities: Reply | None = None
    origin: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    async def call(self, method: str, url: str, *, allow_redirects: bool = True, **kw: Any) -> Reply:
        headers = {**self.headers, **kw.pop("headers", {})}
        if url.startswith(self.info.admin_url):  # the admin view needs its credential
            headers.setdefault("X-Admin-Token", self.info.admin_token)
        async with self.session.request(
            method, url, headers=headers, allow_redirects=allow_redirects, **kw
        ) as r:
            text = await r.text()
            try:
                body = json.loads(text) if text else None
            except ValueError:
                body = None
            return Reply(r.status, r.headers, body, text, str(r.url))

    # -- service application -------------------------------------------------------------------------
    async def get_aad_token(self, secret: str | None = None) -> Reply:
        token_url = f"{self.info.authority}/oauth2/v2.0/token"
        form = {
            "grant_type": "client_credentials",
            "client_id": self.info.client_id,
            "client_secret": secret or self.info.client_secret,
            "scope": self.info.scope,
        }
        return await self.call("POST", token_url, data=form)

    def sa_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.aad_token}"}

    async def sa_setup(self) -> Reply:
        """AAD token -> discover -> applications -> capabilities (kept in ``self.capabilities``)."""
        token = await self.get_aad_token()
        assert token.status == 200, token.text
        self.aad_token = token.body["access_token"]
        discover = await self.call("GET", self.info.discover_url, headers=self.sa_headers())
        assert discover.status == 200, discover.text
        apps_url = discover.href("_links", "applications") + "?endpointId=" + self.info.endpoint_id
        apps = await self.call("GET", apps_url, headers=self.sa_headers())
        assert apps.status == 200, apps.text
        caps = await self.call("GET", apps.href("_links", "application"), headers=self.sa_headers())
        assert caps.status == 200, caps.text
        self.capabilities = caps
        return caps

    async def mint(
        self, asi: str, meeting_url: str | None = None, origins: str | None = None, **extra: Any
    ) -> Reply:
        assert self.capabilities is not None
        body: JSON = {"applicationSessionId": asi, "allowedOrigins": origins or self.info.origin, **extra}
        if meeting_url != "":  # "" mints a token for a one-to-one chat (no meetingUrl)
            body["meetingUrl"] = meeting_url or self.info.meeting_url
        return await self.call(
            "POST",
            self.capabilities.href("_links", "anonApplicationTokens"),
            json=body,
            headers=self.sa_headers(),
        )

    # -- guest ---------------------------------------------------------------------------------------
    async def join(
        self, asi: str | None = None, meeting_url: str | None = None, name: str = "Guest One"
    ) -> Guest:
        """Mint, discover, create the application and post the invitation (events are not read)."""
        guest = await self.guest(asi or str(uuid.uuid4()), meeting_url)
        await guest.create_app(name)
        r = await guest.invite()
        assert r.status == 201, r.text
        return guest

    async def guest(self, asi: str, meeting_url: str | None = None) -> Guest:
        token = await self.mint(asi, meeting_url)
        assert token.status in (200, 201), token.text
        return Guest(self, asi, token)


@dataclass
class Guest:
    walk: Walk
    asi: str
    token_reply: Reply
    origin: str = ""
    app: Reply | None = None
    conference_id: str | None = None
    next_events: str = ""

    @property
    def psat(self) -> str:
        token: str = self.token_reply.body["token"]
        return token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.psat}", "Origin": self.origin or self.walk.info.origin}

    async def discover(self) -> Reply:
        url = self.token_reply.href("_links", "discover")
        r = await self.walk.call("GET", url, headers={"Origin": self.origin or self.walk.info.origin})
        if r.status == 200:
            self.conference_id = r.body.get("conferenceId")
        return r

    async def create_app(self, name: str = "Guest One", **body: Any) -> Reply:
        d = await self.discover()
        assert d.status == 200, d.text
        payload = {"anonymousDisplayName": name, "culture": "en-US", "userAgent": "anonjoin-tests/1", **body}
        r = await self.walk.call(
            "POST", d.href("_links", "anonApplications"), json=payload, headers=self.headers()
        )
        assert r.status == 201, r.text
        self.app = r
        self.next_events = r.href("_links", "events")
        return r

    async def invite(self, **overrides: Any) -> Reply:
        assert self.app is not None
        payload = {
            "anonymousDisplayName": "Guest One",
            "importance": "Normal",
            "onlineMeetingUri": self.conference_id,
            "operationId": "op-" + self.asi[:8],
            "subject": "tests",
            **overrides,
        }
        url = self.app.href("_embedded", "communication", "_links", "joinOnlineMeeting")
        return await self.walk.call("POST", url, json=payload, headers=self.headers())

    async def poll(self, url: str | None = None, **params: Any) -> Reply:
        r = await self.walk.call("GET", url or self.next_events, headers=self.headers(), params=params)
        if r.status == 200 and "next" in r.body["_links"]:
            self.next_events = r.href("_links", "next")
        return r

    async def events_until(self, rel: str, kind: str, within: float = 5.0) -> list[JSON]:
        """Poll (following ``next``) until an event ``rel``/``kind`` arrives; all events seen, in order."""
        seen: list[JSON] = []
        async with asyncio.timeout(within):
            while True:
                r = await self.poll()
                assert r.status == 200, r.text
                for sender in r.body.get("sender", []):
                    for event in sender["events"]:
                        seen.append(event)
                        if event["link"]["rel"] == rel and event["type"] == kind:
                            return seen

    async def delete(self) -> Reply:
        assert self.app is not None
        return await self.walk.call("DELETE", self.app.href("_links", "self"), headers=self.headers())


def kinds(events: list[JSON]) -> list[tuple[str, str]]:
    return [(e["link"]["rel"], e["type"]) for e in events]


# The events a guest's join brings, in order (protocol.md §1).
JOIN_EVENTS = [
    ("onlineMeetingInvitation", "started"),
    ("conversation", "added"),
    ("localParticipant", "added"),
    ("participant", "added"),
    ("onlineMeeting", "added"),
    ("conversation", "updated"),
    ("onlineMeetingInvitation", "completed"),
]
