"""The service application (SA): discover -> applications -> capabilities (shared), grants, adhoc meetings.

The Client's first discover is its preflight: until the service has answered once, a connection that cannot
be made for a known reason (refused, DNS, a port without TLS) is final at once, with its cause, for every
caller of this Client (:func:`anonjoin._protocol.classify` with ``answered=False``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from yarl import URL

from anonjoin import _constants as C
from anonjoin._events import Step, log_event
from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    CapabilityNotAvailable,
    ConfigurationError,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    TransportError,
)
from anonjoin._http import HttpClient, Response, parse_http_date
from anonjoin._models import (
    AdhocMeeting,
    ApplicationBody,
    GuestGrant,
    MeetingBody,
    TokenBody,
    _Resource,
    conference_id_from,
    embedded_links,
    embedded_resource,
    find_href,
    parse_body,
    psat_claims,
    require_link,
    resolve,
)
from anonjoin._protocol import Action, classify
from anonjoin._retry import Attempt, Clock, StepRunner, StepStats

log = logging.getLogger("anonjoin.client")


class AccessTokenLike(Protocol):
    @property
    def value(self) -> str: ...


class CredentialLike(Protocol):
    """What the client needs from a credential (``anonjoin._auth.Credential`` fits)."""

    async def token(self) -> Any: ...
    async def refresh(self, rejected: Any) -> Any: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What discover/applications/capabilities said; shared by every guest of the Client."""

    application_url: URL
    anon_tokens_url: URL | None
    adhoc_meetings_url: URL | None
    fetched_at: float


class ServiceApp:
    def __init__(
        self,
        *,
        http: HttpClient,
        runner: StepRunner,
        credential: CredentialLike,
        discover_url: str,
        endpoint_id: str,
        clock: Clock,
    ) -> None:
        try:
            url = URL(discover_url)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"bad discover_url {discover_url!r}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError("discover_url must be an absolute http(s) URL")
        if not endpoint_id:
            raise ConfigurationError("endpoint_id is required (sip:...)")
        self._http = http
        http.trust(url)  # the service's own host: where the AAD token may go (over https only)
        self._runner = runner
        self._cred = credential
        self._discover_url = url
        self._endpoint_id = endpoint_id
        self._clock = clock
        self._caps: Capabilities | None = None
        self._inflight: asyncio.Future[Capabilities] | None = None
        self._fetch_task: asyncio.Task[Capabilities] | None = None
        self._waiters = 0
        self._token: Any = None
        self._answered = False  # the service has answered an SA request (retries are for such a service)
        self._unreachable: TransportError | None = None  # the preflight's failure, if it failed

    # --- AAD ---------------------------------------------------------------------------------------

    async def _auth(self, attempt: Attempt) -> dict[str, str]:
        try:
            if attempt.refresh_auth and self._token is not None:
                log_event(log, logging.INFO, "anonjoin.auth.refresh")
                try:
                    tok = await self._cred.refresh(self._token)
                except AuthError as exc:
                    if exc.retryable:
                        raise
                    # e.g. Azure AD handed back the same token: it is still valid, and a 403 InvalidToken
                    # is known to be brief, so go on with it (the retry policy bounds what follows)
                    log_event(log, logging.INFO, "anonjoin.auth.refresh_failed", error=exc.error)
                    tok = await self._cred.token()
            else:
                tok = await self._cred.token()
        except AnonJoinError:
            raise
        except Exception as exc:  # a credential outside anonjoin: never leak its error type
            raise AuthError(f"credential failed: {type(exc).__name__}") from exc
        self._token = tok
        return {"Authorization": f"Bearer {tok.value}"}

    def _sa(
        self,
        step: Step,
        method: str,
        url: URL,
        *,
        guest_id: str | None = None,
        body: Any = None,
        stats: StepStats | None = None,
        deadline_at: float | None = None,
        holdoff: dict[str, float] | None = None,
    ) -> Coroutine[Any, Any, Response]:
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()

        async def attempt(att: Attempt) -> Response:
            headers = await self._auth(att)
            try:
                r = await self._http.request(step, method, url, att, headers=headers, body=data)
            except ServiceError:
                self._answered = True
                raise
            self._answered = True
            return r

        return self._runner.run(
            step,
            attempt,
            guest_id=guest_id,
            stats=stats,
            deadline_at=deadline_at,
            holdoff=holdoff,
            preflight=not self._answered,
        )

    # --- capabilities (single flight, shared) --------------------------------------------------------

    def invalidate(self) -> None:
        self._caps = None

    async def capabilities(self, *, deadline_at: float | None = None) -> Capabilities:
        caps = self._caps
        if caps is not None and self._clock.monotonic() - caps.fetched_at < C.CAPABILITIES_TTL_S:
            return caps
        if self._unreachable is not None:  # the preflight failed: every caller gets its cause at once
            raise self._unreachable.with_traceback(None)
        if self._inflight is None or self._inflight.done():
            fut: asyncio.Future[Capabilities] = asyncio.get_running_loop().create_future()
            self._inflight = fut
            task = asyncio.ensure_future(self._fetch(deadline_at))
            self._fetch_task = task

            def done(t: asyncio.Task[Capabilities]) -> None:
                if fut.done():
                    return
                if t.cancelled():
                    fut.cancel()
                elif (e := t.exception()) is not None:
                    fut.set_exception(e)
                else:
                    fut.set_result(t.result())

            task.add_done_callback(done)
            fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)
        inflight = self._inflight
        self._waiters += 1
        try:
            if deadline_at is not None and not inflight.done():
                # a fetch another guest started runs to its own deadline; this caller waits only to its own
                left = deadline_at - self._clock.monotonic()
                finished, _ = await asyncio.wait({inflight}, timeout=max(0.0, left))
                if not finished:
                    raise RequestNotSentError(
                        "the shared discover did not complete within this guest's deadline",
                        step="discover",
                        url=self._discover_url,
                    )
            return await asyncio.shield(inflight)
        except asyncio.CancelledError:
            # the last waiter gone: stop the shared fetch instead of leaving it (and a connection) behind
            if self._waiters == 1 and self._fetch_task is not None and not self._fetch_task.done():
                self._fetch_task.cancel()
                await asyncio.gather(self._fetch_task, return_exceptions=True)
            raise
        finally:
            self._waiters -= 1

    async def _fetch(self, deadline_at: float | None) -> Capabilities:
        preflight = not self._answered
        try:
            r = await self._sa("discover", "GET", self._discover_url, deadline_at=deadline_at)
        except TransportError as exc:
            # The first discover of this Client is its preflight: a service that never answered and cannot
            # be connected to for a known reason (refused, DNS, no TLS) is not retried, by this caller nor
            # any later one (a new Client tries again).
            if preflight and classify("discover", exc, answered=False).action is Action.FINAL:
                exc.final = True
                self._unreachable = exc
                log_event(log, logging.WARNING, "anonjoin.preflight.failed", cause=exc.cause)
            raise
        d = parse_body(_Resource, r.body, step="discover", status=r.status, correlation_id=r.correlation_id)
        apps = require_link(
            d.links, r.url, "applications", "myApplications", step="discover", status=r.status
        )
        apps = apps.update_query(endpointId=self._endpoint_id)
        r = await self._sa("applications", "GET", apps, deadline_at=deadline_at)
        a = parse_body(
            _Resource, r.body, step="applications", status=r.status, correlation_id=r.correlation_id
        )
        app_url = require_link(a.links, r.url, "application", step="applications", status=r.status)
        r = await self._sa("capabilities", "GET", app_url, deadline_at=deadline_at)
        c = parse_body(
            ApplicationBody, r.body, step="capabilities", status=r.status, correlation_id=r.correlation_id
        )
        tokens = find_href(c.links, "anonApplicationTokens")
        adhoc = find_href(c.links, "adhocMeetings")
        if adhoc is None:
            res = embedded_resource(c.embedded, "adhocMeetings")
            adhoc = find_href(embedded_links(res), "self") if res is not None else None
        caps = Capabilities(
            application_url=r.url,
            anon_tokens_url=resolve(r.url, tokens, step="capabilities") if tokens else None,
            adhoc_meetings_url=resolve(r.url, adhoc, step="capabilities") if adhoc else None,
            fetched_at=self._clock.monotonic(),
        )
        self._caps = caps
        log_event(
            log,
            logging.DEBUG,
            "anonjoin.capabilities.fetched",
            anon_tokens=caps.anon_tokens_url is not None,
            adhoc=caps.adhoc_meetings_url is not None,
        )
        return caps

    async def aclose(self) -> None:
        task = self._fetch_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- grants and meetings ----------------------------------------------------------------------

    async def mint_grant(
        self,
        *,
        meeting_url: str | None,
        allowed_origins: str | Sequence[str],
        application_session_id: str,
        guest_id: str | None = None,
        stats: StepStats | None = None,
        deadline_at: float | None = None,
        holdoff: dict[str, float] | None = None,
    ) -> GuestGrant:
        origins = allowed_origins if isinstance(allowed_origins, str) else ";".join(allowed_origins)
        body = {"applicationSessionId": application_session_id, "allowedOrigins": origins}
        if meeting_url is not None:  # left out: a psat for the guest's identity only (not a meeting)
            body["meetingUrl"] = meeting_url
        for refetch in (False, True):
            caps = await self.capabilities(deadline_at=deadline_at)
            if caps.anon_tokens_url is None:
                raise CapabilityNotAvailable("anonApplicationTokens")
            try:
                r = await self._sa(
                    "anon_tokens",
                    "POST",
                    caps.anon_tokens_url,
                    guest_id=guest_id,
                    body=body,
                    stats=stats,
                    deadline_at=deadline_at,
                    holdoff=holdoff,
                )
            except ServiceError as exc:
                if classify("anon_tokens", exc, refetched=refetch).action is Action.REFETCH:
                    self.invalidate()  # a stale link: refetch capabilities once
                    continue
                raise
            t = parse_body(
                TokenBody, r.body, step="anon_tokens", status=r.status, correlation_id=r.correlation_id
            )
            discover = require_link(t.links, r.url, "discover", step="anon_tokens", status=r.status)
            claims = psat_claims(t.token)
            confid = claims.get("confid")
            now = self._clock.time()
            lifetime = None
            if t.expiry_time is not None:
                # against the service's clock (its Date header) where it gives one: skew does not count
                server_now = parse_http_date(r.headers.get("Date"))
                lifetime = t.expiry_time.timestamp() - (now if server_now is None else server_now)
            return GuestGrant(
                token=t.token,
                expires_at=t.expiry_time or datetime.fromtimestamp(now, UTC),
                lifetime_s=lifetime,
                received_at=now,
                discover_url=str(discover),
                application_session_id=application_session_id,
                meeting_url=meeting_url or "",
                conference_id=confid if isinstance(confid, str) else None,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def create_meeting(self, body: dict[str, Any]) -> AdhocMeeting:
        for refetch in (False, True):
            caps = await self.capabilities()
            if caps.adhoc_meetings_url is None:
                raise CapabilityNotAvailable("adhocMeetings")
            url = caps.adhoc_meetings_url
            if "endpointId" not in url.query and "endpointid" not in url.query:
                url = url.update_query(endpointId=self._endpoint_id)
            try:
                r = await self._sa("adhoc_meetings", "POST", url, body=body)
            except ServiceError as exc:
                if classify("adhoc_meetings", exc, refetched=refetch).action is Action.REFETCH:
                    self.invalidate()
                    continue
                raise
            m = parse_body(
                MeetingBody, r.body, step="adhoc_meetings", status=r.status, correlation_id=r.correlation_id
            )
            if not m.join_url:
                raise ProtocolError("meeting without joinUrl", step="adhoc_meetings", status=r.status)
            resolve(r.url, m.join_url, step="adhoc_meetings")
            return AdhocMeeting(
                join_url=m.join_url,
                conference_id=m.conference_id or conference_id_from(m.join_url),
                online_meeting_uri=m.online_meeting_uri,
                online_meeting_id=m.online_meeting_id,
                organizer_uri=m.organizer_uri,
                expiration_time=m.expiration_time,
                subject=m.subject,
                access_level=m.access_level,
            )
        raise AssertionError("unreachable")  # pragma: no cover
