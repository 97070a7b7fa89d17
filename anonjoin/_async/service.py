"""The service application (SA): discover -> applications -> capabilities (shared), grants, adhoc meetings.

The Client's first discover is its preflight: until the service has answered once, a connection that cannot
be made for a known reason (refused, DNS, a port without TLS) is final at once, with its cause, for every
caller of this Client (:func:`anonjoin._core.protocol.classify` with ``answered=False``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from yarl import URL

from anonjoin._async.http import HttpClient, Response, parse_http_date
from anonjoin._async.retry import Attempt, Clock, StepRunner, StepStats
from anonjoin._core import constants as C
from anonjoin._core.events import Step, log_event
from anonjoin._core.models import (
    AdhocMeeting,
    GuestGrant,
)
from anonjoin._core.protocol import Action, classify
from anonjoin._core.service import (
    Capabilities,
    discovery,
    grant_from,
    meeting_from,
    stale_link,
    token_body,
)
from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    CapabilityNotAvailable,
    ConfigurationError,
    RequestNotSentError,
    ServiceError,
    TransportError,
)

__all__ = ["AccessTokenLike", "Capabilities", "CredentialLike", "ServiceApp"]

log = logging.getLogger("anonjoin.client")


class AccessTokenLike(Protocol):
    @property
    def value(self) -> str: ...


class CredentialLike(Protocol):
    """What the client needs from a credential (``anonjoin._async.auth.Credential`` fits)."""

    async def token(self) -> Any: ...
    async def refresh(self, rejected: Any) -> Any: ...
    async def aclose(self) -> None: ...


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
        body: bytes | None = None,
        stats: StepStats | None = None,
        deadline_at: float | None = None,
        holdoff: dict[str, float] | None = None,
    ) -> Coroutine[Any, Any, Response]:
        data = body

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
        steps = discovery(self._discover_url, self._endpoint_id, self._clock.monotonic())
        answer: Response | None = None
        try:
            while True:
                act = steps.send(answer)
                answer = await self._sa(act.step, act.method, act.url, deadline_at=deadline_at)
        except StopIteration as done:
            caps: Capabilities = done.value
        except TransportError as exc:
            # The first discover of this Client is its preflight: a service that never answered and cannot
            # be connected to for a known reason (refused, DNS, no TLS) is not retried, by this caller nor
            # any later one (a new Client tries again).
            if preflight and classify("discover", exc, answered=False).action is Action.FINAL:
                exc.final = True
                self._unreachable = exc
                log_event(log, logging.WARNING, "anonjoin.preflight.failed", cause=exc.cause)
            raise
        finally:
            steps.close()
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
        body = token_body(meeting_url, allowed_origins, application_session_id)
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
                if stale_link("anon_tokens", exc, refetched=refetch):
                    self.invalidate()  # a stale link: refetch capabilities once
                    continue
                raise
            return grant_from(
                r,
                application_session_id=application_session_id,
                meeting_url=meeting_url,
                now=self._clock.time(),
                server_now=parse_http_date(r.headers.get("Date")),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def create_meeting(self, body: dict[str, Any]) -> AdhocMeeting:
        data = json.dumps(body, separators=(",", ":")).encode()
        for refetch in (False, True):
            caps = await self.capabilities()
            if caps.adhoc_meetings_url is None:
                raise CapabilityNotAvailable("adhocMeetings")
            url = caps.adhoc_meetings_url
            if "endpointId" not in url.query and "endpointid" not in url.query:
                url = url.update_query(endpointId=self._endpoint_id)
            try:
                r = await self._sa("adhoc_meetings", "POST", url, body=data)
            except ServiceError as exc:
                if stale_link("adhoc_meetings", exc, refetched=refetch):
                    self.invalidate()
                    continue
                raise
            return meeting_from(r)
        raise AssertionError("unreachable")  # pragma: no cover
