"""The public face: :class:`Client` (one service application, many guests)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from anonjoin._async.guest import Guest, GuestContext
from anonjoin._async.http import HttpClient, make_ssl_context
from anonjoin._async.retry import Clock, RejoinPolicy, RetryPolicy, StepRunner
from anonjoin._async.service import CredentialLike, ServiceApp
from anonjoin._core import constants as C
from anonjoin._core.events import Hooks, Observer, log_event
from anonjoin._core.models import AdhocMeeting, GuestGrant
from anonjoin._exceptions import ConfigurationError

log = logging.getLogger("anonjoin.client")


class Client:
    """Joins anonymous guests for one service application (discover URL + endpoint id + credential).

    Use it as an async context manager, or call :meth:`aclose`. The credential is the caller's: the client
    never closes it.
    """

    def __init__(
        self,
        *,
        discover_url: str,
        endpoint_id: str,
        credential: CredentialLike,
        ca_file: str | None = None,
        verify_tls: bool = True,
        retry: RetryPolicy | None = None,
        rejoin: RejoinPolicy | None = None,
        max_connections: int = C.MAX_CONNECTIONS,
        hooks: Hooks | None = None,
        user_agent: str = C.USER_AGENT,
        culture: str = C.CULTURE,
        lobby_timeout_s: float = C.LOBBY_TIMEOUT_S,
        clock: Clock | None = None,
    ) -> None:
        if not user_agent or len(user_agent) > 100:
            raise ConfigurationError("user_agent must be 1..100 characters")
        if not culture or len(culture) > 100:
            raise ConfigurationError("culture must be 1..100 characters")
        if lobby_timeout_s <= 0:
            raise ConfigurationError("lobby_timeout_s must be positive")
        self.retry = retry or RetryPolicy()
        self.rejoin = rejoin or RejoinPolicy()
        self.lobby_timeout_s = lobby_timeout_s
        self._clock = clock or Clock()
        self._observer = Observer(hooks)
        self._http = HttpClient(
            ssl_context=make_ssl_context(ca_file, verify_tls),
            max_connections=max_connections,
            user_agent=user_agent,
            connect_timeout_s=self.retry.connect_timeout_s,
        )
        self._runner = StepRunner(self.retry, self._clock, self._observer)
        self._service = ServiceApp(
            http=self._http,
            runner=self._runner,
            credential=credential,
            discover_url=discover_url,
            endpoint_id=endpoint_id,
            clock=self._clock,
        )
        self._guests: set[Guest] = set()
        self._ctx = GuestContext(
            http=self._http,
            runner=self._runner,
            service=self._service,
            observer=self._observer,
            clock=self._clock,
            retry=self.retry,
            rejoin=self.rejoin,
            user_agent=user_agent,
            culture=culture,
            on_close=self._guests.discard,
        )
        self._closed = False

    def __repr__(self) -> str:
        return f"<anonjoin.Client live_guests={len(self._guests)} closed={self._closed}>"

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def live_guests(self) -> int:
        return len(self._guests)

    async def aclose(self) -> None:
        """Leave every live guest (best effort, concurrently) and close the connection pools."""
        if self._closed:
            return
        self._closed = True
        guests = list(self._guests)
        if guests:
            await asyncio.gather(*(g.leave() for g in guests), return_exceptions=True)
        await self._service.aclose()
        await self._http.aclose()
        log_event(log, logging.DEBUG, "anonjoin.client.closed", guests=len(guests))

    def guest(
        self,
        *,
        meeting_url: str,
        origin: str,
        display_name: str,
        guest_id: str | None = None,
        application_session_id: str | None = None,
        lobby_timeout_s: float | None = None,
    ) -> Guest:
        """A guest for ``meeting_url`` (no I/O yet); ``await guest.join()`` joins it."""
        if self._closed:
            raise ConfigurationError("the client is closed")
        if not display_name or len(display_name) > 250:
            raise ConfigurationError("display_name must be 1..250 characters")
        if not origin.startswith(("https://", "http://")):
            raise ConfigurationError(f"origin must be an http(s) origin, got {origin!r}")
        if not meeting_url.startswith(("https://", "http://")):
            raise ConfigurationError("meeting_url must be the meeting's HTTP join URL")
        g = Guest(
            self._ctx,
            meeting_url=meeting_url,
            origin=origin.rstrip("/"),
            display_name=display_name,
            guest_id=guest_id or uuid.uuid4().hex[:12],
            application_session_id=application_session_id or str(uuid.uuid4()),
            lobby_timeout_s=self.lobby_timeout_s if lobby_timeout_s is None else lobby_timeout_s,
        )
        self._guests.add(g)
        return g

    async def join(
        self,
        *,
        meeting_url: str,
        origin: str,
        display_name: str,
        guest_id: str | None = None,
        application_session_id: str | None = None,
        lobby_timeout_s: float | None = None,
    ) -> Guest:
        """``guest(...)`` then ``await guest.join()``; returns the joined guest (raises if it cannot join)."""
        g = self.guest(
            meeting_url=meeting_url,
            origin=origin,
            display_name=display_name,
            guest_id=guest_id,
            application_session_id=application_session_id,
            lobby_timeout_s=lobby_timeout_s,
        )
        await g.join()
        return g

    async def mint_grant(
        self, *, meeting_url: str, allowed_origins: str | Sequence[str], application_session_id: str
    ) -> GuestGrant:
        """POST anonApplicationTokens: a psat token and discover link for one guest of one meeting."""
        return await self._service.mint_grant(
            meeting_url=meeting_url,
            allowed_origins=allowed_origins,
            application_session_id=application_session_id,
        )

    async def create_meeting(
        self,
        *,
        subject: str,
        access_level: str = "Everyone",
        description: str | None = None,
        leaders: Sequence[str] = (),
        automatic_leader_assignment: str | None = None,
        lobby_bypass_for_phone_users: bool | None = None,
        entry_exit_announcement: str | None = None,
        phone_user_admission: str | None = None,
    ) -> AdhocMeeting:
        """POST adhocMeetings: schedule a meeting and return its join URL and conference id."""
        body: dict[str, Any] = {"subject": subject, "accessLevel": access_level}
        if description is not None:
            body["description"] = description
        if leaders:
            body["leaders"] = list(leaders)
        if automatic_leader_assignment is not None:
            body["automaticLeaderAssignment"] = automatic_leader_assignment
        if lobby_bypass_for_phone_users is not None:
            body["lobbyBypassForPhoneUsers"] = lobby_bypass_for_phone_users
        if entry_exit_announcement is not None:
            body["entryExitAnnouncement"] = entry_exit_announcement
        if phone_user_admission is not None:
            body["phoneUserAdmission"] = phone_user_admission
        return await self._service.create_meeting(body)
