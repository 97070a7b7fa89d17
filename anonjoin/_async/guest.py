"""One guest: the asyncio driver of :class:`anonjoin._core.conversation.Conversation`.

The conversation decides everything (the state, the recovery ladder, the timers, the bodies, what to delete
when leaving and with which psat); this module performs its answers with aiohttp, in one background task
per guest: it mints and sends what :meth:`~Conversation.next_action` asks, keeps a poll parked (the next
one issued before an answer is processed), sleeps until the instants the conversation returns, and cleans
up within the leave budget. The requests themselves are performed by :mod:`anonjoin._async.requests`, the
task mechanics (parked poll, shielded create, event fan-out, bounded waits) are :mod:`anonjoin._async.tasks`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any

from yarl import URL

from anonjoin._async import tasks
from anonjoin._async.http import HttpClient, Response
from anonjoin._async.requests import GuestRequests
from anonjoin._async.retry import Clock, RejoinPolicy, RetryPolicy, StepRunner
from anonjoin._core import constants as C
from anonjoin._core.conversation import (
    POLL_ATTEMPT_S,
    Conversation,
    DeleteApp,
    Effect,
    Emit,
    GuestSpec,
    Joined,
    Mint,
    Poll,
    Publish,
)
from anonjoin._core.events import Event, GuestEvent, GuestEventKind, Observer, Step, log_event
from anonjoin._core.models import ApplicationBody, GuestOutcome, JoinResult
from anonjoin._core.protocol import STEP_FOR_STATE, GuestState
from anonjoin._exceptions import AnonJoinError

if TYPE_CHECKING:
    from anonjoin._async.service import ServiceApp

log = logging.getLogger("anonjoin.guest")


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
        spec = GuestSpec(
            guest_id, application_session_id, meeting_url, origin, display_name, lobby_timeout_s,
            ctx.culture, ctx.user_agent,
        )  # fmt: skip
        self._c = Conversation(
            spec,
            guest_deadline_s=ctx.retry.guest_deadline_s,
            leave_deadline_s=ctx.retry.leave_deadline_s,
            rejoin=ctx.rejoin,
            rng=ctx.clock.rng,
        )
        self.outcome: GuestOutcome | None = None
        self._task: asyncio.Task[None] | None = None
        self._creating: tasks.Shielded[tuple[ApplicationBody, Response]] = tasks.Shielded()
        loop = asyncio.get_running_loop()
        self._joined: asyncio.Future[JoinResult] = loop.create_future()
        self._closed: asyncio.Future[GuestOutcome] = loop.create_future()
        self._leave_now: asyncio.Future[None] = loop.create_future()
        self._events: tasks.Broadcast[Event] = tasks.Broadcast()
        self._poll: tasks.Parked[Response] = tasks.Parked(ctx.clock.sleep)
        self._bg: set[asyncio.Task[None]] = set()
        self._rq = GuestRequests(ctx, self._c)

    def __repr__(self) -> str:
        return (
            f"<Guest {self.guest_id} asi={self.application_session_id} state={self.state.value}"
            f" rejoins={self.rejoins}>"
        )

    # --- public ---------------------------------------------------------------------------------------

    @property
    def state(self) -> GuestState:
        return self._c.state

    @property
    def rejoins(self) -> int:
        return self._c.rejoins

    @property
    def result(self) -> JoinResult | None:
        return self._c.result

    @property
    def conference_id(self) -> str | None:
        return self._c.conference_id

    async def join(self) -> JoinResult:
        """Join (or wait for the join already running); raises JoinFailed or a typed error if it cannot."""
        if self._closed.done() or (self._task is None and self.state is not GuestState.NEW):
            first = self._joined.exception() if self._joined.done() else None
            raise first or self._c.closed_error()  # a join that failed: the same error again
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"anonjoin-guest-{self.guest_id}")
        try:
            return await asyncio.shield(self._joined)
        except asyncio.CancelledError:
            if not self._joined.done():
                await tasks.cancel_and_reap(self._task)
            raise

    def events(self) -> AsyncIterator[Event]:
        """Channel and guest events in order, exactly once, from this call on (call it before join())."""
        return self._events.subscribe()

    async def wait_closed(self) -> GuestOutcome:
        """Wait until the guest has left, its meeting ended, or it failed for good."""
        return await asyncio.shield(self._closed)

    async def leave(self) -> None:
        """DELETE the application and stop the background task. Idempotent."""
        self._c.leave()
        task = self._task
        if task is None:
            if not self._c.terminal:
                self._c.left_unstarted()
                self._finish(None)
            return
        if not task.done() and (self._poll.waiting or self._leave_now.done() or self._c.terminal):
            # Graceful: the poll loop DELETEs while its poll is parked; the service releases the poll, so
            # its connection goes back to the pool instead of being torn down. A guest already ended or
            # failed is in its own (bounded) cleanup: cancelling it would leave its application live.
            if not self._leave_now.done():
                self._leave_now.set_result(None)
            if await tasks.wait_or_cancel(task, self._ctx.retry.leave_deadline_s + 2 * C.LEAVE_DRAIN_S):
                return
        await tasks.cancel_and_reap(task)

    async def __aenter__(self) -> Guest:
        await self.join()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.leave()

    # --- the background task -------------------------------------------------------------------------

    def _now(self) -> float:
        return self._ctx.clock.monotonic()

    async def _run(self) -> None:
        c = self._c
        try:
            await self._drive()
        except asyncio.CancelledError:
            cur = asyncio.current_task()
            if cur is not None:
                cur.uncancel()
            try:  # cancelled (leave() in a step, a cancelled join(), Client.aclose()): clean up all the same
                if not self._closed.done():
                    c.stop()
                    if not c.replaced:
                        await self._cleanup_app()
                    c.deleted()
            finally:  # cancelled again in the middle of the cleanup: still accounted for
                self._finish(c.settle_error())
        except Exception as exc:  # pragma: no cover - a bug; keep the guest accounted for
            log_event(
                log, logging.ERROR, "anonjoin.guest.bug", guest_id=self.guest_id, error=type(exc).__name__
            )
            c.internal_error(type(exc).__name__)
            await self._cleanup_app()
            self._finish(c.error)

    async def _sleep_until(self, at: float | None) -> None:
        if at is not None and (wait := at - self._now()) > 0:
            await self._ctx.clock.sleep(wait)

    async def _drive(self) -> None:
        c = self._c
        c.start(self._now())
        while not c.terminal:
            step: Step = STEP_FOR_STATE[c.state]
            try:
                act = c.next_action(self._now())
                if isinstance(act, Mint):
                    await self._sleep_until(act.not_before)
                    c.on_granted(await self._rq.mint(act.meeting_url, act.deadline_at), self._now())
                elif isinstance(act, Poll):
                    await self._poll_loop(act.url)
                elif act.step == "anon_applications":
                    # The POST runs in its own task, shielded: a leave or a cancel while it is in flight does
                    # not lose its answer, so the application it made is known (and deleted), not left live.
                    create = self._rq.create(act)
                    c.on_application(
                        *await self._creating.run(create, name=f"anonjoin-create-{self.guest_id}")
                    )
                else:
                    c.on_response(act, await self._rq.send(act))
            except AnonJoinError as exc:
                if c.terminal:  # the machine itself refused an input
                    c.error = exc
                    break
                rec = c.on_failure(step, exc, self._now())
                self._perform(rec.effects)
                await self._sleep_until(rec.wait_until)
        error = c.settle_error()
        if not c.replaced:
            await self._cleanup_app()
        self._finish(error)

    # --- performing the conversation's answers --------------------------------------------------------

    def _perform(self, effects: Iterable[Effect]) -> None:
        for e in effects:
            if isinstance(e, Emit):
                self._emit(e.kind, e.reason)
            elif isinstance(e, Publish):
                self._events.publish(e.event)
            elif isinstance(e, Joined):
                if not self._joined.done():
                    self._joined.set_result(e.result)
            elif isinstance(e, DeleteApp):
                steps = self._c.leave_requests(e.deadline_at, self._now, delete=e.url, mint=False)
                tasks.spawn(self._rq.leave(steps), name=f"anonjoin-delete-{self.guest_id}", into=self._bg)

    # --- the event channel -----------------------------------------------------------------------------

    def _park(self, url: URL, wait_s: float = 0.0) -> None:
        """The next poll, parked; ``wait_s`` (an idle channel) delays it, in its task, so a leave or a timer
        still interrupts the wait."""
        if wait_s > 0:
            log_event(log, logging.DEBUG, "anonjoin.poll.idle_wait", guest_id=self.guest_id, wait_s=wait_s)
        self._poll.park(partial(self._send_poll, url), wait_s, name=f"anonjoin-poll-{self.guest_id}")

    def _send_poll(self, url: URL) -> Coroutine[Any, Any, Response]:
        act = self._c.poll_request(url, now=self._now(), step_deadline_s=self._ctx.retry.step_deadline_s)
        # after our own DELETE, the poll's 404 is its expected end
        return self._rq.send(act, poll=True, timeout_s=POLL_ATTEMPT_S, quiet=self._leave_now.done)

    async def _poll_loop(self, url: URL) -> None:
        c = self._c
        c.poll_started()
        self._park(url)
        sent_at = self._now()
        try:
            while c.polling:
                due, what = c.next_timer()
                answered = await self._poll.wait(
                    self._leave_now, None if due is None else max(0.0, due - self._now())
                )
                if self._leave_now.done():
                    c.stop()
                    await self._cleanup_app()
                    await self._poll.drain(C.LEAVE_DRAIN_S)  # released by the DELETE: keep its connection
                    c.deleted()
                    return
                if not answered:
                    self._perform(c.on_timer(what, self._now()))
                    return
                resp = self._poll.take()
                body, nxt, wait, special = c.poll_answered(resp, self._now() - sent_at)
                if special is not None:
                    log_event(log, logging.INFO, f"anonjoin.poll.{special}", guest_id=self.guest_id)
                # the next poll goes out before processing (after the idle wait, if the channel is idle)
                self._park(nxt, wait)
                sent_at = self._now()
                self._perform(c.on_poll(body, self._now(), self._ctx.clock.time()))
                del body, resp  # not kept alive (nor traversed by the GC) while the next poll is parked
        finally:
            await self._poll.close()

    # --- leaving ---------------------------------------------------------------------------------------

    async def _cleanup_app(self) -> None:
        """Leave nothing live, within ``RetryPolicy.leave_deadline_s`` (issue 6; one budget per guest, which a
        cleanup cancelled and started again does not renew): the application this guest created last is
        deleted, including one whose create was in flight when the guest stopped, and one a create may have
        made without the guest learning its href (a new application evicts it and is deleted in its turn).
        DELETEs of replaced applications still running in the background are awaited first."""
        c = self._c
        deadline = c.cleanup_deadline(self._now())
        # a create in flight first: its answer says which application is the last
        await tasks.wait_until(self._creating.pending(), deadline, self._now)
        await tasks.wait_until(set(self._bg), deadline, self._now)
        await self._rq.leave(c.leave_requests(deadline, self._now))

    # --- the end --------------------------------------------------------------------------------------------

    def _finish(self, error: AnonJoinError | None) -> None:
        if self._closed.done():
            return
        self.outcome = outcome = self._c.outcome(error)
        if not self._joined.done():
            self._joined.set_exception(self._c.join_error(outcome))
            self._joined.exception()  # retrieved: join() may never be awaited
        self._emit(outcome.kind, outcome.reason)
        self._closed.set_result(outcome)
        self._events.close()
        self._ctx.on_close(self)

    def _emit(self, kind: GuestEventKind, reason: str | None) -> None:
        ev = GuestEvent(self.guest_id, kind, reason, self.application_session_id, self._ctx.clock.time())
        self._events.publish(ev)
        self._ctx.observer.guest(ev)
