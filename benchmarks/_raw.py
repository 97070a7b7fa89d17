"""The raw baseline: a bare aiohttp client sending exactly the HTTP requests of a join, with no more logic.

What it sends (protocol.md §4), against any server speaking the chain (it doubles as a check that the
simulator serves it):

* once, before the measured section: the AAD token (OpenID configuration + client-credentials POST), GET
  discover, GET applications?endpointId, GET the application (capabilities);
* per guest: POST anonApplicationTokens, GET the anonymous discover link, POST anonApplications, POST
  onlineMeetingInvitations, then GET events following ``next`` until the invitation completes; like
  anonjoin it issues the next poll at once (so the poll stays parked while the guest is held) and leaves
  with DELETE on the application's ``self`` href.

The least possible logic: ``json.loads``, dict lookups, ``urljoin`` for relative hrefs. No retries, no
models, no validation beyond "the invitation completed with Success". One ``aiohttp.ClientSession`` with a
connection pool sized from the concurrency (see ``_drive.pool_size``), TLS verified against the simulator's
CA. With ``lean_tls`` its connector is anonjoin's ``LeanTLSConnector`` instead of aiohttp's (a reference: what
a bare aiohttp client costs per held connection once asyncio's per-connection TLS read buffer is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from anonjoin._async.tls import LeanTLSConnector
from benchmarks._chain import JSON, ChainError, Target, link

POLL_RELEASE_S = 5.0


@dataclass
class RawGuest:
    self_url: str
    next_url: str
    psat: str
    poll: asyncio.Task[None] | None = None
    leaving: bool = False


@dataclass
class RawClient:
    target: Target
    pool: int  # connections (the driver sizes it from the concurrency and the held guests)
    session: aiohttp.ClientSession | None = None
    aad_auth: str = ""
    tokens_url: str = ""
    poll_errors: dict[str, int] = field(default_factory=dict)
    lean_tls: bool = False  # anonjoin's LeanTLSConnector instead of aiohttp's TCPConnector

    async def __aenter__(self) -> RawClient:
        ctx = ssl.create_default_context(cafile=self.target.ca_file)
        connector_class = LeanTLSConnector if self.lean_tls else aiohttp.TCPConnector
        connector = connector_class(limit=self.pool, ssl=ctx)
        self.session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def _json(
        self, method: str, url: str, headers: dict[str, str], body: Any = None
    ) -> tuple[JSON, str]:
        assert self.session is not None
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers = {**headers, "Content-Type": "application/json"}
        async with self.session.request(method, url, data=data, headers=headers) as resp:
            raw = await resp.read()
            if resp.status >= 300:
                raise ChainError(f"{method} {url.split('?')[0]} -> {resp.status}")
            return (json.loads(raw) if raw else {}), str(resp.url)

    async def setup(self) -> None:
        """Shared by all guests: AAD token, discover, applications, capabilities -> anonApplicationTokens."""
        assert self.session is not None
        t = self.target
        config, _ = await self._json("GET", f"{t.authority}/v2.0/.well-known/openid-configuration", {})
        form = {
            "grant_type": "client_credentials",
            "client_id": t.client_id,
            "client_secret": t.client_secret,
            "scope": t.scope,
        }
        async with self.session.post(config["token_endpoint"], data=form) as resp:
            token = json.loads(await resp.read())
            if resp.status != 200:
                raise ChainError(f"AAD token -> {resp.status}")
        self.aad_auth = f"Bearer {token['access_token']}"
        auth = {"Authorization": self.aad_auth}
        body, url = await self._json("GET", t.discover_url, auth)
        apps_url = link(body, "applications", url)
        sep = "&" if "?" in apps_url else "?"
        body, url = await self._json("GET", f"{apps_url}{sep}endpointId={t.endpoint_id}", auth)
        body, url = await self._json("GET", link(body, "application", url), auth)
        self.tokens_url = link(body, "anonApplicationTokens", url)

    async def join(self, name: str) -> RawGuest:
        """One guest's join chain; returns once the invitation completed with the next poll parked."""
        t = self.target
        asi = str(uuid.uuid4())
        body, url = await self._json(
            "POST",
            self.tokens_url,
            {"Authorization": self.aad_auth},
            {"applicationSessionId": asi, "allowedOrigins": t.origin, "meetingUrl": t.meeting_url},
        )
        psat = body["token"]
        origin = {"Origin": t.origin}
        body, url = await self._json("GET", link(body, "discover", url), origin)
        conference_id = body.get("conferenceId")
        guest_headers = {"Origin": t.origin, "Authorization": f"Bearer {psat}"}
        body, url = await self._json(
            "POST",
            link(body, "anonApplications", url),
            guest_headers,
            {"anonymousDisplayName": name, "culture": "en-us", "userAgent": "raw-baseline/1"},
        )
        self_url = link(body, "self", url)
        events_url = link(body, "events", url)
        invite_url = link(body["_embedded"]["communication"], "joinOnlineMeeting", url)
        await self._json(
            "POST",
            invite_url,
            guest_headers,
            {
                "anonymousDisplayName": name,
                "importance": "Normal",
                "onlineMeetingUri": conference_id,
                "operationId": asi[:32],
                "subject": "benchmark",
            },
        )
        while True:
            body, url = await self._json("GET", events_url, guest_headers)
            events_url = link(body, "next", url)
            for sender in body.get("sender", ()):
                for event in sender.get("events", ()):
                    if event["link"]["rel"] == "onlineMeetingInvitation" and event["type"] == "completed":
                        if event.get("status") != "Success":
                            raise ChainError(f"invitation completed with {event.get('status')}")
                        guest = RawGuest(self_url, events_url, psat)
                        guest.poll = asyncio.create_task(self._park(guest, guest_headers))
                        return guest

    async def _park(self, guest: RawGuest, headers: dict[str, str]) -> None:
        """Keep the guest's poll parked (re-issue it when the server releases it) until cancelled.

        A poll that fails while the guest is held (not leaving) is counted in ``poll_errors``: the raw
        client does not recover, it only makes the loss visible next to anonjoin's figures.
        """
        try:
            while True:  # like anonjoin: the next poll goes out at once, even if a leave follows
                body, url = await self._json("GET", guest.next_url, headers)
                if guest.leaving:
                    return
                guest.next_url = link(body, "next", url)
        except (ChainError, aiohttp.ClientError, TimeoutError) as exc:
            if not guest.leaving:
                key = f"held poll {type(exc).__name__}"
                self.poll_errors[key] = self.poll_errors.get(key, 0) + 1

    async def leave(self, guest: RawGuest) -> None:
        assert self.session is not None
        headers = {"Origin": self.target.origin, "Authorization": f"Bearer {guest.psat}"}
        guest.leaving = True  # a poll the DELETE releases is not re-issued
        async with self.session.delete(guest.self_url, headers=headers) as resp:
            await resp.read()
        if guest.poll is not None:
            # The DELETE releases the parked poll (404): wait for that answer rather than abort the request,
            # which would close its connection.
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(guest.poll, POLL_RELEASE_S)
