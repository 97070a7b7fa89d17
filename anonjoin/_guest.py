"""One guest: the aiohttp driver of the sans-IO machine in ``anonjoin._protocol``.

A guest's whole life runs in one background task: mint -> discover -> create -> invite -> poll until the
invitation completes -> keep a poll parked (always issuing the next poll before processing a response) ->
rejoin with the same applicationSessionId when the psat nears expiry or the guest is dropped -> leave.
Every state change goes through :class:`GuestMachine`; every failure through :func:`classify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, get_args

from yarl import URL

from anonjoin import _constants as C
from anonjoin._events import ChannelEvent, Event, GuestEvent, GuestEventKind, Observer, Step, log_event
from anonjoin._exceptions import (
    AnonJoinError,
    JoinFailed,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    TransportError,
    redact_url,
)
from anonjoin._http import HttpClient, Response, request_id
from anonjoin._models import (
    ApplicationBody,
    DiscoverBody,
    EventsBody,
    GuestGrant,
    GuestOutcome,
    JoinResult,
    embedded_links,
    embedded_resource,
    find_href,
    parse_body,
    rel_name,
    require_link,
    resolve,
)
from anonjoin._protocol import (
    SIGNAL_INPUT,
    STEP_FOR_STATE,
    TRANSITIONS,
    Action,
    Decision,
    GuestMachine,
    GuestState,
    Input,
    Signal,
    bad_expiry,
    classify,
    leave_without_meeting,
    plan_expiry,
    poll_wait,
    settle,
    signal_of,
    transient,
)
from anonjoin._retry import Attempt, Clock, RejoinPolicy, RetryPolicy, StepRunner, StepStats

if TYPE_CHECKING:
    from anonjoin._service import ServiceApp

log = logging.getLogger("anonjoin.guest")

SHARED_STEPS = frozenset({"aad_token", "discover", "applications", "capabilities"})
"""Steps shared by every guest of a Client: their errors are raised as they are, not as JoinFailed."""
_STEPS: frozenset[str] = frozenset(get_args(Step.__value__))
_POLLING = frozenset({GuestState.CONNECTING, GuestState.LOBBY, GuestState.JOINED})
_NOT_JOINED_YET = frozenset({GuestState.CONNECTING, GuestState.LOBBY})


@dataclass(slots=True)
class GuestContext:
    """What all guests of one Client share."""

    http: HttpClient
    runner: StepRunner
    service: ServiceApp
    observer: Observer
    clock: Clock
    retry: RetryPolicy
    rejoin: RejoinPolicy
    user_agent: str
    culture: str
    on_close: Callable[[Guest], None]


class _EventIterator:
    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[Event | None]) -> None:
        self._queue = queue

    def __aiter__(self) -> _EventIterator:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # stay ended for later calls
            raise StopAsyncIteration
        return item


class Guest:
    """One anonymous guest. Create it with :meth:`anonjoin.Client.guest`."""

    def __init__(
        self,
        ctx: GuestContext,
        *,
        meeting_url: str,
        origin: str,
        display_name: str,
        guest_id: str,
        application_session_id: str,
        lobby_timeout_s: float,
    ) -> None:
        self._ctx = ctx
        self.guest_id = guest_id
        self.application_session_id = application_session_id
        self.meeting_url = meeting_url
        self.origin = origin
        self.display_name = display_name
        self.lobby_timeout_s = lobby_timeout_s
        self.rejoins = 0
        self.result: JoinResult | None = None
        self.conference_id: str | None = None
        self.outcome: GuestOutcome | None = None
        self._m = GuestMachine()
        self._grant: GuestGrant | None = None
        self._rejoin_due: float | None = None  # monotonic instant to rejoin ahead of psat expiry
        self._anon_apps_url: URL | None = None
        # The application to delete when leaving: the newest this guest created and does not know deleted
        # (a new one for the same applicationSessionId evicts the old one, protocol.md §7, so there is at
        # most one). ``_app_unknown``: a create may have made a newer one whose href the guest never learnt.
        self._app_url: URL | None = None
        self._app_unknown = False
        self._creating: asyncio.Task[tuple[ApplicationBody, Response]] | None = None
        self._leave_grant: GuestGrant | None = None  # a psat minted for leaving (the guest's had expired)
        self._leave_deadline_at: float | None = None  # set by the first cleanup; later ones share it
        self._events_url: URL | None = None
        self._join_url: URL | None = None
        self._task: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self._joined: asyncio.Future[JoinResult] = loop.create_future()
        self._closed: asyncio.Future[GuestOutcome] = loop.create_future()
        self._subs: list[asyncio.Queue[Event | None]] = []
        self._ever_joined = False
        self._recoveries = 0  # consecutive rejoins/recoveries since the last successful join
        self._stats = StepStats()
        self._join_started = 0.0
        self._deadline_at = 0.0
        self._lobby_since: float | None = None
        self._lobby_total = 0.0
        self._error: AnonJoinError | None = None
        self._leave_requested = False
        self._leave_now: asyncio.Future[None] = loop.create_future()
        self._in_poll_wait = False
        self._bg: set[asyncio.Task[None]] = set()
        self._holdoff: dict[str, float] = {}  # step -> no request before (this guest's Retry-After)
        self._last_mint_at: float | None = None  # monotonic instant of this guest's last psat request
        self._suspect_grants = 0  # psats in a row granted with a suspect expiry (issue 11)
        self._grant_until = 0.0  # monotonic instant the guest's psat is taken to expire (bounded)

    def __repr__(self) -> str:
        return (
            f"<Guest {self.guest_id} asi={self.application_session_id} state={self.state.value}"
            f" rejoins={self.rejoins}>"
        )

    # --- public ---------------------------------------------------------------------------------------

    @property
    def state(self) -> GuestState:
        return self._m.state

    async def join(self) -> JoinResult:
        """Join (or wait for the join already running); raises JoinFailed or a typed error if it cannot."""
        if self._closed.done() or (self._task is None and self._m.state is not GuestState.NEW):
            first = self._joined.exception() if self._joined.done() else None
            if first is not None:
                raise first  # the join failed: the same error again
            raise JoinFailed(self._m.reason or self._m.state.value, "this guest is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"anonjoin-guest-{self.guest_id}")
        try:
            return await asyncio.shield(self._joined)
        except asyncio.CancelledError:
            if not self._joined.done():
                await self._cancel_task()
            raise

    def events(self) -> AsyncIterator[Event]:
        """Channel and guest events in order, exactly once, from this call on (call it before join())."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        if self._closed.done():
            queue.put_nowait(None)
        else:
            self._subs.append(queue)
        return _EventIterator(queue)

    async def wait_closed(self) -> GuestOutcome:
        """Wait until the guest has left, its meeting ended, or it failed for good."""
        return await asyncio.shield(self._closed)

    async def leave(self) -> None:
        """DELETE the application and stop the background task. Idempotent."""
        self._leave_requested = True
        if self._task is None:
            if not self._m.terminal:
                self._m.handle(Input.LEAVE)
                self._m.handle(Input.DELETED)
                self._finish(None)
            return
        task = self._task
        if not task.done() and (self._in_poll_wait or self._leave_now.done() or self._m.terminal):
            # Graceful: the poll loop DELETEs while its poll is parked; the service releases the poll, so
            # its connection goes back to the pool instead of being torn down. A guest already ended or
            # failed is in its own (bounded) cleanup: cancelling it would leave its application live.
            if not self._leave_now.done():
                self._leave_now.set_result(None)
            try:
                budget = self._ctx.retry.leave_deadline_s + 2 * C.LEAVE_DRAIN_S
                done, _ = await asyncio.wait({task}, timeout=budget)
            except asyncio.CancelledError:
                await self._cancel_task()
                raise
            if done:
                return
        await self._cancel_task()

    async def __aenter__(self) -> Guest:
        await self.join()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.leave()

    # --- the background task -------------------------------------------------------------------------

    async def _cancel_task(self) -> None:
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            await self._drive()
        except asyncio.CancelledError:
            cur = asyncio.current_task()
            if cur is not None:
                cur.uncancel()
            try:
                await self._on_cancelled()
            finally:  # cancelled again in the middle of the cleanup: still accounted for
                self._finish(self._error if self._m.state is GuestState.FAILED else None)
        except Exception as exc:  # pragma: no cover - a bug; keep the guest accounted for
            log_event(
                log, logging.ERROR, "anonjoin.guest.bug", guest_id=self.guest_id, error=type(exc).__name__
            )
            if not self._m.terminal:
                self._m.handle(Input.FAIL, "InternalError")
            self._error = ProtocolError(f"internal error: {type(exc).__name__}")
            await self._cleanup_app()
            self._finish(self._error)

    async def _on_cancelled(self) -> None:
        """Cancelled (leave() in a step, a cancelled join(), Client.aclose()): clean up all the same, also
        when the cancel came in the middle of the cleanup that ends a guest that ended or failed."""
        m = self._m
        if self._closed.done():
            return
        if not m.terminal:
            m.handle(Input.LEAVE)
        if not (m.state is GuestState.LEFT and m.reason == "PGetReplaced"):
            await self._cleanup_app()
        if m.state is GuestState.LEAVING:
            m.handle(Input.DELETED)

    def _now(self) -> float:
        return self._ctx.clock.monotonic()

    def _start_join(self, *, keep_deadline: bool = False) -> None:
        """A new attempt at joining (a first join, a rejoin, a recovery). It gets a new deadline unless
        ``keep_deadline``: a restart that is not a failure (a psat renewed before the guest got in) stays
        within the deadline of the attempt it interrupts."""
        self._stats = StepStats()
        self._join_started = self._now()
        if not keep_deadline:
            self._deadline_at = self._join_started + self._ctx.retry.guest_deadline_s
        self._lobby_total = 0.0
        self._lobby_since = None

    async def _drive(self) -> None:
        m = self._m
        m.handle(Input.JOIN)
        self._start_join()
        while not m.terminal:
            state = m.state
            step = STEP_FOR_STATE[state]
            try:
                if state in (GuestState.MINTING, GuestState.REJOINING):
                    await self._mint()
                    m.handle(Input.GRANTED)
                elif state is GuestState.DISCOVERING:
                    await self._discover()
                    m.handle(Input.DISCOVERED)
                elif state is GuestState.CREATING:
                    await self._create()
                    m.handle(Input.CREATED)
                elif state is GuestState.INVITING:
                    await self._invite()
                    m.handle(Input.INVITED)
                else:
                    await self._poll_loop()
            except AnonJoinError as exc:
                if m.terminal:  # the machine itself refused an input
                    self._error = exc
                    break
                await self._on_failure(step, exc)
        await self._settle_terminal()

    # --- failures --------------------------------------------------------------------------------------

    def _can_recover(self) -> bool:
        pol = self._ctx.rejoin
        return pol.enabled and self._recoveries < pol.attempts and not self._leave_requested

    async def _on_failure(self, step: Step, exc: AnonJoinError) -> None:
        m = self._m
        own = getattr(exc, "step", None)  # the step that really failed (minting runs discover & co.)
        if isinstance(own, str) and own in _STEPS:
            step = own  # type: ignore[assignment]
        # the failure reaches the guest after the service application refetched its capabilities; a meeting
        # this guest was in and no longer found has ended (while the guest was rejoining)
        d: Decision = classify(step, exc, refetched=True, meeting_ended=self._ever_joined)
        reason = d.reason
        log_event(
            log,
            logging.INFO,
            "anonjoin.guest.failure",
            guest_id=self.guest_id,
            step=step,
            action=d.action.value,
            reason=reason,
            error=type(exc).__name__,
        )
        if d.action is Action.ENDED:
            m.handle(Input.ENDED, "Ended")
            return
        if d.action is Action.STOP_POLLER and (m.state, Input.REPLACED) in TRANSITIONS:
            log_event(log, logging.INFO, "anonjoin.poll.replaced", guest_id=self.guest_id)
            m.handle(Input.REPLACED, "PGetReplaced")
            return
        if d.action in (Action.REMINT, Action.RECREATE, Action.REJOIN) and self._can_recover():
            self._recoveries += 1
            if (
                d.action is Action.RECREATE
                and self._grant_fresh()
                and (m.state, Input.APP_GONE) in TRANSITIONS
            ):
                self._emit("rejoining", reason)
                self._events_url = None  # the application stays the one to delete until a new one replaces it
                m.handle(Input.APP_GONE, reason)
                await self._rejoin_wait()
                self._start_join()
                return
            if (m.state, Input.EXPIRING) in TRANSITIONS:
                self._emit("rejoining", reason)
                m.handle(Input.EXPIRING, reason)
                await self._rejoin_wait()
                self._start_join()
                return
        if (
            transient(d, exc)
            and step not in SHARED_STEPS  # already tried for every guest, to its cap (issue 11)
            and self._can_recover()
            and (m.state, Input.RETRY_REJOIN) in TRANSITIONS
            and (self._ever_joined or self._now() < self._deadline_at)
        ):
            # A step ran out of retries on transient failures (5xx, 429, timeouts): start over from a fresh
            # psat after a backoff, bounded by the rejoin policy. At ~20% faulted requests one step in
            # ~10^4 exhausts its attempts, which would otherwise fail a guest for good. A rejoin gets a new
            # deadline; a first join keeps its own, so join() still ends within guest_deadline_s.
            self._recoveries += 1
            log_event(
                log, logging.INFO, "anonjoin.guest.restart", guest_id=self.guest_id, step=step, reason=reason
            )
            m.handle(Input.RETRY_REJOIN, reason)
            await self._rejoin_wait()
            self._start_join(keep_deadline=not self._ever_joined)
            return
        self._error = self._final_error(step, exc, reason)
        m.handle(Input.FAIL, reason)

    def _final_error(self, step: Step, exc: AnonJoinError, reason: str) -> AnonJoinError:
        if isinstance(exc, TransportError) and not self._ever_joined and self._now() >= self._deadline_at:
            # the attempt was cut at the guest's deadline (issue 11): the join timed out
            err = JoinFailed("JoinTimeout", f"{step}: cut at the guest deadline ({reason})", cause_step=step)
            err.__cause__ = exc
            return err
        if isinstance(exc, ServiceError) and step not in SHARED_STEPS:
            err = JoinFailed(reason, str(exc), cause_step=step)
            err.__cause__ = exc
            return err
        return exc

    async def _rejoin_wait(self) -> None:
        if self._recoveries <= 1:
            return
        wait = self._ctx.rejoin.backoff(self._recoveries - 1, self._ctx.clock.rng)
        log_event(
            log, logging.DEBUG, "anonjoin.guest.rejoin_wait", guest_id=self.guest_id, wait_s=round(wait, 3)
        )
        await self._ctx.clock.sleep(wait)

    def _grant_fresh(self) -> bool:
        return self._grant is not None and (self._rejoin_due is None or self._now() < self._rejoin_due)

    # --- steps ---------------------------------------------------------------------------------------------

    def _guest_headers(self, *, auth: bool = True, grant: GuestGrant | None = None) -> dict[str, str]:
        h = {"Origin": self.origin}
        grant = grant or self._grant
        if auth and grant is not None:
            h["Authorization"] = f"Bearer {grant.token}"
        return h

    def _guest_request(
        self,
        step: Step,
        method: str,
        url: URL,
        *,
        body: object = None,
        auth: bool = True,
        poll: bool = False,
        timeout_s: float | None = None,
        deadline_at: float | None = None,
        quiet: Callable[[], bool] | None = None,
        grant: GuestGrant | None = None,
    ) -> Coroutine[Any, Any, Response]:
        """The step as a coroutine (not a coroutine of its own: one await level less on every resume)."""
        data = None if body is None else json.dumps(body, separators=(",", ":")).encode()
        # the psat does not change within a step: the headers are built once, the attempt is a partial
        attempt = partial(
            self._ctx.http.request,
            step,
            method,
            url,
            headers=self._guest_headers(auth=auth, grant=grant),
            body=data,
            poll=poll,
            quiet=quiet,
        )
        return self._ctx.runner.run(
            step,
            attempt,
            guest_id=self.guest_id,
            stats=self._stats,
            holdoff=self._holdoff,
            deadline_at=self._deadline_at if deadline_at is None else deadline_at,
            timeout_s=timeout_s,
        )

    async def _mint(self) -> None:
        clock = self._ctx.clock
        if self._last_mint_at is not None:  # never psats closer together than the floor (issue 11)
            wait = self._last_mint_at + C.REMINT_FLOOR_S - self._now()
            if wait > 0:
                await clock.sleep(min(wait, max(0.0, self._deadline_at - self._now())))
        self._last_mint_at = self._now()
        grant = await self._ctx.service.mint_grant(
            meeting_url=self.meeting_url,
            allowed_origins=self.origin,
            application_session_id=self.application_session_id,
            guest_id=self.guest_id,
            stats=self._stats,
            holdoff=self._holdoff,
            deadline_at=self._deadline_at,
        )
        pol = self._ctx.rejoin
        plan = plan_expiry(grant.lifetime_s, pol.min_psat_lifetime_s)
        renews = pol.enabled and pol.on_expiry
        self._suspect_grants = self._suspect_grants + 1 if plan.suspect and renews else 0
        if bad_expiry(self._suspect_grants, pol.attempts):
            raise JoinFailed(
                "BadExpiry",
                f"{self._suspect_grants} psats in a row with under {pol.min_psat_lifetime_s:g} s to live",
                cause_step="anon_tokens",
            )
        self._grant = grant
        self._grant_until = self._now() + plan.lifetime_s
        if renews:
            self._rejoin_due = self._grant_until - pol.margin_for(plan.lifetime_s)
        else:
            self._rejoin_due = None
        if grant.conference_id:
            self.conference_id = grant.conference_id

    async def _discover(self) -> None:
        assert self._grant is not None
        url = URL(self._grant.discover_url, encoded=True)  # opaque: never rebuilt or re-quoted
        r = await self._guest_request("anon_discover", "GET", url, auth=False)
        d = parse_body(
            DiscoverBody, r.body, step="anon_discover", status=r.status, correlation_id=r.correlation_id
        )
        self._anon_apps_url = require_link(
            d.links, r.url, "anonApplications", step="anon_discover", status=r.status
        )
        conf = d.conference_id or self._grant.conference_id
        if not conf:
            raise ProtocolError(
                "no conference id (neither in discover nor in the token)",
                step="anon_discover",
                status=r.status,
            )
        self.conference_id = conf

    async def _create(self) -> None:
        # The POST runs in its own task, shielded: a leave or a cancel while it is in flight does not lose
        # its answer, so the application it made is known (and deleted) instead of left live.
        task = asyncio.create_task(self._post_application(), name=f"anonjoin-create-{self.guest_id}")
        self._creating = task
        a, r = await asyncio.shield(task)
        self._creating = None  # answered: its result is not kept for the guest's lifetime
        self._events_url = require_link(a.links, r.url, "events", step="anon_applications", status=r.status)
        comm = embedded_resource(a.embedded, "communication")
        href = find_href(embedded_links(comm), "joinOnlineMeeting")
        if href is None:
            raise ProtocolError(
                "missing link 'joinOnlineMeeting' (is the token for a meeting?)",
                step="anon_applications",
                status=r.status,
            )
        self._join_url = resolve(r.url, href, step="anon_applications")

    async def _post_application(
        self, deadline_at: float | None = None, grant: GuestGrant | None = None
    ) -> tuple[ApplicationBody, Response]:
        """POST anonApplications; the new application becomes the one to delete (the service evicts this
        guest's previous one). Until its answer is read, ``_app_unknown`` says one may exist unnamed."""
        if self._anon_apps_url is None:
            raise ProtocolError("no anonApplications link", step="anon_applications")
        body = {
            "anonymousDisplayName": self.display_name,
            "culture": self._ctx.culture,
            "userAgent": self._ctx.user_agent,
        }
        unknown, self._app_unknown = self._app_unknown, True
        try:
            r = await self._guest_request(
                "anon_applications",
                "POST",
                self._anon_apps_url,
                body=body,
                deadline_at=deadline_at,
                grant=grant,
            )
        except (ServiceError, RequestNotSentError):
            self._app_unknown = unknown  # answered without creating one, or never sent
            raise
        try:
            a = parse_body(
                ApplicationBody,
                r.body,
                step="anon_applications",
                status=r.status,
                correlation_id=r.correlation_id,
            )
            self._app_url = require_link(a.links, r.url, "self", step="anon_applications", status=r.status)
        except ProtocolError:
            loc = r.headers.get("Location")  # created all the same: name it by its Location if there is one
            if loc:
                with contextlib.suppress(ProtocolError):
                    self._app_url = resolve(r.url, loc, step="anon_applications")
                    self._app_unknown = False
            raise
        self._app_unknown = False
        return a, r

    async def _invite(self) -> None:
        if self._join_url is None or not self.conference_id:
            raise ProtocolError("nothing to invite to", step="invitations")
        body = {
            "anonymousDisplayName": self.display_name,
            "importance": C.INVITATION_IMPORTANCE,
            "onlineMeetingUri": self.conference_id,
            "operationId": request_id().replace("-", ""),
        }
        r = await self._guest_request("invitations", "POST", self._join_url, body=body)
        loc = r.headers.get("Location")
        if not loc:
            raise ProtocolError(
                "invitation answered without Location",
                step="invitations",
                status=r.status,
                body=r.body,
                correlation_id=r.correlation_id,
            )
        resolve(r.url, loc, step="invitations")

    # --- the event channel -----------------------------------------------------------------------------

    def _start_poll(self, url: URL, wait_s: float = 0.0) -> asyncio.Task[Response]:
        """The next poll as a task; ``wait_s`` (an idle channel, :func:`poll_wait`) delays it, in the task, so
        a leave or a timer still interrupts the wait."""
        if wait_s > 0:
            return asyncio.create_task(self._poll_later(url, wait_s), name=f"anonjoin-poll-{self.guest_id}")
        return asyncio.create_task(self._poll(url), name=f"anonjoin-poll-{self.guest_id}")

    async def _poll_later(self, url: URL, wait_s: float) -> Response:
        log_event(log, logging.DEBUG, "anonjoin.poll.idle_wait", guest_id=self.guest_id, wait_s=wait_s)
        await self._ctx.clock.sleep(wait_s)
        return await self._poll(url)

    def _poll(self, url: URL) -> Coroutine[Any, Any, Response]:
        poll_timeout = C.POLL_TIMEOUT_S + C.POLL_TIMEOUT_MARGIN_S
        deadline = self._now() + poll_timeout * 2 + self._ctx.retry.step_deadline_s
        return self._guest_request(
            "events",
            "GET",
            url,
            poll=True,
            timeout_s=poll_timeout,
            deadline_at=deadline,
            quiet=self._leave_now.done,  # after our own DELETE, the poll's 404 is its expected end
        )

    def _timer(self) -> tuple[float | None, str]:
        """The next instant a timer is due while polling, and what it means."""
        st = self._m.state
        candidates: list[tuple[float, str]] = []
        if self._rejoin_due is not None:
            candidates.append((self._rejoin_due, "expiry"))
        if st is GuestState.LOBBY and self._lobby_since is not None:
            candidates.append((self._lobby_since + self.lobby_timeout_s, "lobby"))
        elif st is GuestState.CONNECTING:
            candidates.append((self._deadline_at, "deadline"))
        if not candidates:
            return None, ""
        return min(candidates)

    async def _poll_loop(self) -> None:
        if self._events_url is None:
            raise ProtocolError("no events link", step="events")
        pending = self._start_poll(self._events_url)
        sent_at = self._now()
        idle_wait = 0.0  # the wait before the next poll while the channel answers idle at once (issue 11)
        try:
            while self._m.state in _POLLING:
                due, what = self._timer()
                timeout = None if due is None else max(0.0, due - self._now())
                self._in_poll_wait = True
                try:
                    waiters: set[asyncio.Future[Any]] = {pending, self._leave_now}
                    done, _ = await asyncio.wait(
                        waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    self._in_poll_wait = False
                if self._leave_now.done():
                    self._m.handle(Input.LEAVE)
                    await self._cleanup_app()
                    if not pending.done():  # released by the DELETE: let it finish, keep its connection
                        await asyncio.wait({pending}, timeout=C.LEAVE_DRAIN_S)
                    self._m.handle(Input.DELETED)
                    return
                if not done:
                    self._on_timer(what)
                    return
                resp = pending.result()
                body = parse_body(
                    EventsBody,
                    resp.body,
                    step="events",
                    status=resp.status,
                    correlation_id=resp.correlation_id,
                )
                nxt = find_href(body.links, "next")
                idle = nxt is None or not any(sender.events for sender in body.sender)
                took = self._now() - sent_at - idle_wait
                idle_wait = poll_wait(idle_wait, took, idle)
                if nxt is None:
                    for special in ("resync", "resume"):
                        nxt = find_href(body.links, special)
                        if nxt is not None:
                            log_event(log, logging.INFO, f"anonjoin.poll.{special}", guest_id=self.guest_id)
                            break
                if nxt is None:
                    raise ProtocolError(
                        "event response without next/resync/resume",
                        step="events",
                        status=resp.status,
                        body=resp.body,
                    )
                self._events_url = resolve(resp.url, nxt, step="events")
                # the next poll goes out before processing (after the idle wait, if the channel is idle)
                pending = self._start_poll(self._events_url, idle_wait)
                sent_at = self._now()
                self._process(body, resp.url)
                # not kept alive (nor traversed by the GC) while the next poll is parked: the answer, and the
                # finished poll task in ``done`` that holds it
                del body, resp, done
        finally:
            if not pending.done():
                pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

    def _on_timer(self, what: str) -> None:
        m = self._m
        if what == "expiry":
            if self._ctx.rejoin.enabled and not self._leave_requested:
                # Routine, not a failure: not one of the rejoin policy's attempts. A guest not in yet (its
                # chain slower than the psat's life, as on a loaded machine with a short-lived psat) keeps
                # the deadline of the attempt it interrupts, which bounds such restarts.
                waiting = m.state is not GuestState.JOINED
                self._delete_in_background()
                self._emit("rejoining", "TokenExpiring")
                m.handle(Input.EXPIRING, "TokenExpiring")
                self._start_join(keep_deadline=waiting)
                return
            self._rejoin_due = None
            return
        if what == "lobby":
            self._error = JoinFailed("LobbyTimeout", f"not admitted within {self.lobby_timeout_s:g} s")
            m.handle(Input.LOBBY_TIMEOUT, "LobbyTimeout")
            return
        self._error = JoinFailed("JoinTimeout", "the invitation did not complete within the guest deadline")
        m.handle(Input.FAIL, "JoinTimeout")

    def _process(self, body: EventsBody, base: URL) -> None:
        outcomes = []
        for sender in body.sender:
            sender_rel = rel_name(sender.rel)
            for e in sender.events:
                rel = rel_name(e.link.rel)
                embedded = {rel_name(k): v for k, v in e.embedded.items()} if e.embedded else e.embedded
                emb = embedded.get(rel)
                state = emb.get("state") if isinstance(emb, dict) else None
                if state is None and isinstance(e.in_, dict):
                    s2 = e.in_.get("state")
                    state = s2 if isinstance(s2, str) else None
                ce = ChannelEvent(
                    guest_id=self.guest_id,
                    sender=sender_rel,
                    rel=rel,
                    href=e.link.href,
                    type=e.type,
                    status=e.status,
                    reason_code=e.reason.code if e.reason else None,
                    reason_subcode=e.reason.subcode if e.reason else None,
                    state=state if isinstance(state, str) else None,
                    embedded=embedded,
                )
                self._publish(ce)
                outcomes.append(signal_of(ce))
        m = self._m
        for o in settle(m.state, outcomes):
            before = m.state
            if o.signal is Signal.DROPPED:
                self._emit("dropped", o.reason)
                if self._ctx.rejoin.on_drop and self._can_recover():
                    self._recoveries += 1
                    m.handle(Input.DROPPED, o.reason)
                    self._emit("rejoining", o.reason)
                    self._start_join()  # the new application evicts this one (deleted if the rejoin stops)
                else:
                    self._error = JoinFailed(o.reason or "Dropped", "dropped from the meeting")
                    m.handle(Input.FAIL, o.reason or "Dropped")
                return
            if o.signal is Signal.DECLINED:
                self._error = JoinFailed(o.reason or "Failure", "the invitation failed")
            m.handle(SIGNAL_INPUT[o.signal], o.reason)
            if m.state is GuestState.LOBBY and before is not GuestState.LOBBY:
                self._lobby_since = self._now()
                self._emit("lobby", None)
            if m.state is GuestState.JOINED and before in _NOT_JOINED_YET:
                self._on_joined(before)
            if m.state not in _POLLING:
                return

    def _on_joined(self, before: GuestState) -> None:
        now = self._now()
        if before is GuestState.LOBBY and self._lobby_since is not None:
            self._lobby_total += now - self._lobby_since
        self._lobby_since = None
        rejoin = self._ever_joined
        self.result = JoinResult(
            guest_id=self.guest_id,
            application_session_id=self.application_session_id,
            conference_id=self.conference_id,
            joined_at=self._ctx.clock.time(),
            duration_s=now - self._join_started,
            lobby_s=self._lobby_total,
            steps=dict(self._stats.seconds),
            attempts=dict(self._stats.attempts),
            rejoin=rejoin,
        )
        self._ever_joined = True
        self._recoveries = 0
        if rejoin:
            self.rejoins += 1
            self._emit("rejoined", None)
        else:
            self._emit("joined", None)
        if not self._joined.done():
            self._joined.set_result(self.result)

    # --- the end --------------------------------------------------------------------------------------------

    async def _settle_terminal(self) -> None:
        m = self._m
        if m.state is GuestState.FAILED and self._error is None:
            self._error = JoinFailed(m.reason or "Failed")
        if m.state is not GuestState.LEFT or m.reason != "PGetReplaced":
            await self._cleanup_app()
        self._finish(self._error if m.state is GuestState.FAILED else None)

    async def _cleanup_app(self) -> None:
        """Leave nothing live, within ``RetryPolicy.leave_deadline_s`` (issue 6; one budget per guest, which a
        cleanup cancelled and started again does not renew): the application this guest created last is
        deleted, including one whose create was in flight when the guest stopped, and one a create may have
        made without the guest learning its href (a new application evicts it and is deleted in its turn).
        DELETEs of replaced applications still running in the background are awaited first."""
        if self._leave_deadline_at is None:
            self._leave_deadline_at = self._now() + self._ctx.retry.leave_deadline_s
        deadline = self._leave_deadline_at
        creating = self._creating
        if creating is not None and not creating.done():
            await self._wait_until({creating}, deadline)  # its answer says which application is the last
        if self._bg:
            await self._wait_until(set(self._bg), deadline)
        if self._app_unknown:
            await self._evict(deadline)
        url = self._app_url
        if url is not None:
            await self._delete_app(url, deadline)

    async def _wait_until(self, tasks: set[asyncio.Task[Any]], deadline: float) -> None:
        """Wait for ``tasks`` until ``deadline``; those still running then are cancelled and reaped."""
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - self._now()))
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for t in done:  # a create's failure was its driver's to see; once that was cancelled, it is ours
            if not t.cancelled():
                t.exception()

    def _delete_in_background(self) -> None:
        """Before an expiry rejoin: DELETE the current application while its psat is still valid (if the
        rejoin cannot complete, e.g. the meeting ended, leaving would need a psat minted without the
        meeting). It stays the application to delete until the DELETE succeeds or a new one replaces it.
        With the psat already expired nothing is sent: the rejoin's new application evicts it."""
        url, grant = self._app_url, self._grant
        if url is None or grant is None or not self._psat_valid(grant):
            return
        coro = self._delete_app(url, self._now() + self._ctx.retry.leave_deadline_s, mint=False)
        task = asyncio.create_task(coro, name=f"anonjoin-delete-{self.guest_id}")
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _psat_valid(self, grant: GuestGrant) -> bool:
        """Whether ``grant`` still has life in it, as bounded by :func:`plan_expiry` (skew-free)."""
        if grant.received_at is None:
            until = grant.expiry_epoch
        else:
            until = (
                grant.received_at
                + plan_expiry(grant.lifetime_s, self._ctx.rejoin.min_psat_lifetime_s).lifetime_s
            )
        return until - self._ctx.clock.time() > C.PSAT_SKEW_S

    async def _delete_app(self, url: URL, deadline_at: float, *, mint: bool = True) -> None:
        """DELETE one application until it is gone (a 404/410 says it already is), by ``deadline_at``.
        ``mint=False`` (in the background, while a rejoin mints its own psat): never mint one."""
        op = partial(self._delete_with, url, deadline_at)
        done = await self._with_leave_psat("delete_application", op, deadline_at, mint=mint)
        if done and self._app_url == url:
            self._app_url = None

    async def _delete_with(self, url: URL, deadline_at: float, grant: GuestGrant) -> None:
        headers = {"Origin": self.origin, "Authorization": f"Bearer {grant.token}"}

        async def attempt(att: Attempt) -> None:
            try:
                await self._ctx.http.request("delete_application", "DELETE", url, att, headers=headers)
            except ServiceError as exc:
                if classify("delete_application", exc).action is not Action.DONE:
                    raise

        # bounded: no attempt starts after the deadline and each is clipped to the time left
        await self._ctx.runner.run(
            "delete_application",
            attempt,
            guest_id=self.guest_id,
            deadline_at=deadline_at,
            attempts=max(self._ctx.retry.attempts, C.DELETE_ATTEMPTS),
            holdoff=self._holdoff,
        )

    async def _evict(self, deadline_at: float) -> None:
        """A create may have made an application this guest cannot name: create another one for the same
        applicationSessionId, which evicts it (protocol.md §7); the caller deletes that one."""
        op = partial(self._post_application, deadline_at)
        for _ in range(C.EVICT_ATTEMPTS):
            if not self._app_unknown or self._anon_apps_url is None or self._now() >= deadline_at:
                return
            if await self._with_leave_psat("anon_applications", op, deadline_at):
                return

    async def _with_leave_psat(
        self,
        step: Step,
        op: Callable[[GuestGrant], Awaitable[object]],
        deadline_at: float,
        *,
        mint: bool = True,
    ) -> bool:
        """Run a request of leaving with a valid psat; after a 401, once more with a fresh one (bounded).
        True when it succeeded; a failure :func:`classify` does not answer with REMINT is the end of it."""
        rejected: GuestGrant | None = None
        for _ in range(C.LEAVE_REMINTS + 1):
            try:
                grant = await self._leave_psat(rejected, deadline_at, mint=mint)
            except AnonJoinError as exc:
                self._leave_failed("anon_tokens", exc)
                return False
            if grant is None:
                return False  # no valid psat in hand, and not ours to mint one
            try:
                await op(grant)
            except AnonJoinError as exc:
                if classify(step, exc).action is not Action.REMINT:
                    self._leave_failed(step, exc)
                    return False
                rejected = grant
            else:
                return True
        return False

    async def _leave_psat(
        self, rejected: GuestGrant | None, deadline_at: float, *, mint: bool = True
    ) -> GuestGrant | None:
        """A psat for leaving: the guest's own (or one minted for leaving) while valid and not ``rejected``
        by a 401; else a new one for the same applicationSessionId, for the meeting or, when the meeting is
        gone, for the guest's identity alone (:func:`leave_without_meeting`)."""
        for g in (self._grant, self._leave_grant):
            if g is not None and g is not rejected and self._psat_valid(g):
                return g
        if not mint:
            return None
        new = partial(
            self._ctx.service.mint_grant,
            allowed_origins=self.origin,
            application_session_id=self.application_session_id,
            guest_id=self.guest_id,
            holdoff=self._holdoff,
            deadline_at=deadline_at,
        )
        try:
            grant = await new(meeting_url=self.meeting_url)
        except AnonJoinError as exc:
            if not leave_without_meeting(exc):
                raise
            grant = await new(meeting_url=None)
        self._leave_grant = grant  # never the guest's own: a rejoin in progress keeps using the one it minted
        return grant

    def _leave_failed(self, step: Step, exc: AnonJoinError) -> None:
        log_event(
            log,
            logging.INFO,
            "anonjoin.guest.leave_failed",
            guest_id=self.guest_id,
            step=step,
            error=type(exc).__name__,
            url=redact_url(self._app_url) if self._app_url is not None else None,
        )

    def _finish(self, error: AnonJoinError | None) -> None:
        if self._closed.done():
            return
        st = self._m.state
        kind: Literal["left", "ended", "failed"] = (
            "ended" if st is GuestState.ENDED else "failed" if st is GuestState.FAILED else "left"
        )
        reason = self._m.reason
        self.outcome = GuestOutcome(
            guest_id=self.guest_id,
            application_session_id=self.application_session_id,
            kind=kind,
            reason=reason,
            rejoins=self.rejoins,
            joined=self._ever_joined,
            error=error,
        )
        if not self._joined.done():
            if error is not None:
                self._joined.set_exception(error)
            else:
                self._joined.set_exception(JoinFailed(reason or kind.capitalize(), f"the guest {kind}"))
            self._joined.exception()  # retrieved: join() may never be awaited
        self._emit(kind, reason)
        self._closed.set_result(self.outcome)
        for q in self._subs:
            q.put_nowait(None)
        self._subs.clear()
        self._ctx.on_close(self)

    def _emit(self, kind: GuestEventKind, reason: str | None) -> None:
        ev = GuestEvent(self.guest_id, kind, reason, self.application_session_id, self._ctx.clock.time())
        self._publish(ev)
        self._ctx.observer.guest(ev)

    def _publish(self, ev: Event) -> None:
        for q in self._subs:
            q.put_nowait(ev)
