"""Performing one guest's requests: each :class:`~anonjoin._core.conversation.Send` and
:class:`~anonjoin._core.conversation.Mint` its conversation asks for, through the Client's step runner
(retries, this guest's Retry-After hold-offs, deadlines), HTTP client and service application. It decides
nothing: the conversation builds every request and reads every answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any

from anonjoin._async import tasks
from anonjoin._async.http import Response
from anonjoin._async.retry import Attempt
from anonjoin._core import constants as C
from anonjoin._core.conversation import Conversation, LeaveSteps, Mint, Send
from anonjoin._core.models import ApplicationBody, GuestGrant
from anonjoin._exceptions import AnonJoinError, ServiceError

if TYPE_CHECKING:
    from anonjoin._async.guest import GuestContext


class GuestRequests:
    """The requests of one guest (``conv``), performed with what the guests of one Client share (``ctx``).
    Each method returns the step runner's coroutine itself (no coroutine of its own: one await level less on
    every resume)."""

    __slots__ = ("_asi", "_c", "_ctx", "_guest_id", "_holdoff", "_origin")

    def __init__(self, ctx: GuestContext, conv: Conversation) -> None:
        self._ctx = ctx
        self._c = conv
        self._guest_id = conv.spec.guest_id
        self._asi = conv.spec.application_session_id
        self._origin = conv.spec.origin
        self._holdoff: dict[str, float] = {}  # step -> no request before (this guest's Retry-After)

    def send(
        self,
        act: Send,
        *,
        poll: bool = False,
        timeout_s: float | None = None,
        quiet: Callable[[], bool] | None = None,
    ) -> Coroutine[Any, Any, Response]:
        """``act`` until it succeeds or the failure table says stop, by its deadline (else the guest's); the
        headers are built once, the attempt is a partial."""
        attempt = partial(
            self._ctx.http.request, act.step, act.method, act.url,
            headers=act.headers, body=act.body, poll=poll, quiet=quiet,
        )  # fmt: skip
        return self._ctx.runner.run(
            act.step,
            attempt,
            guest_id=self._guest_id,
            stats=self._c.stats,
            holdoff=self._holdoff,
            deadline_at=self._c.deadline_at if act.deadline_at is None else act.deadline_at,
            timeout_s=timeout_s,
        )

    def mint(self, meeting_url: str | None, deadline_at: float) -> Coroutine[Any, Any, GuestGrant]:
        """A psat for this guest (for ``meeting_url``, or for its identity alone when None)."""
        return self._ctx.service.mint_grant(
            meeting_url=meeting_url,
            allowed_origins=self._origin,
            application_session_id=self._asi,
            guest_id=self._guest_id,
            stats=self._c.stats,
            holdoff=self._holdoff,
            deadline_at=deadline_at,
        )

    async def create(self, act: Send) -> tuple[ApplicationBody, Response]:
        """The POST that creates the application, its answer read by the conversation (which also learns
        when it failed, and whether it may have made one all the same)."""
        try:
            r = await self.send(act)
        except BaseException as exc:
            self._c.create_failed(exc)
            raise
        return self._c.on_created(r), r

    def delete(self, act: Send) -> Coroutine[Any, Any, None]:
        """DELETE until the application is gone (a 404/410 says it already is), bounded: no attempt starts
        after the deadline and each is clipped to the time left."""
        headers, conv = act.headers, self._c

        async def attempt(att: Attempt) -> None:
            try:
                await self._ctx.http.request("delete_application", "DELETE", act.url, att, headers=headers)
            except ServiceError as exc:
                if not conv.delete_done(exc):
                    raise

        return self._ctx.runner.run(
            "delete_application",
            attempt,
            guest_id=self._guest_id,
            deadline_at=act.deadline_at,
            attempts=max(self._ctx.retry.attempts, C.DELETE_ATTEMPTS),
            holdoff=self._holdoff,
        )

    async def leave(self, steps: LeaveSteps) -> None:
        """Perform the conversation's requests of leaving, feeding each answer (or error) back."""
        await tasks.drive(steps, self._leave_step, AnonJoinError)

    def _leave_step(self, act: Mint | Send) -> Awaitable[object]:
        if isinstance(act, Mint):
            return self.mint(act.meeting_url, act.deadline_at)
        if act.step == "delete_application":
            return self.delete(act)
        return self.send(act)
