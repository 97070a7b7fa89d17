"""Small asyncio mechanics the guest driver is built of; none of them knows about guests or the protocol.

* :class:`Broadcast`: fan-out of items to subscribers, each an async iterator.
* :class:`Shielded`: one call in flight in its own task, awaited shielded, so a cancel does not lose it.
* :class:`Parked`: one long-poll kept parked, raced against a stop signal and a deadline.
* :func:`spawn`, :func:`cancel_and_reap`, :func:`wait_until`, :func:`wait_or_cancel`: task lifetimes.
* :func:`drive`: perform the actions a sans-I/O generator yields, feeding each answer (or error) back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
A = TypeVar("A")


class Broadcast(Generic[T]):
    """Items to every subscriber in order, exactly once, from its :meth:`subscribe` on; after
    :meth:`close` every subscription (also one made later) ends."""

    __slots__ = ("_closed", "_queues")

    def __init__(self) -> None:
        self._queues: list[asyncio.Queue[T | None]] = []
        self._closed = False

    def subscribe(self) -> AsyncIterator[T]:
        queue: asyncio.Queue[T | None] = asyncio.Queue()
        if self._closed:
            queue.put_nowait(None)
        else:
            self._queues.append(queue)
        return _Subscription(queue)

    def publish(self, item: T) -> None:
        for q in self._queues:
            q.put_nowait(item)

    def close(self) -> None:
        self._closed = True
        for q in self._queues:
            q.put_nowait(None)
        self._queues.clear()


class _Subscription(Generic[T]):
    __slots__ = ("_queue",)

    def __init__(self, queue: asyncio.Queue[T | None]) -> None:
        self._queue = queue

    def __aiter__(self) -> _Subscription[T]:
        return self

    async def __anext__(self) -> T:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # stay ended for later calls
            raise StopAsyncIteration
        return item


class Shielded(Generic[T]):
    """Runs one call at a time in its own task and awaits it shielded: cancelling the caller does not cancel
    the call, so its answer is not lost; :meth:`pending` is the call still in flight then (for a cleanup to
    wait for). Once answered, the task is dropped (its result is not kept)."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: asyncio.Task[T] | None = None

    async def run(self, coro: Coroutine[Any, Any, T], *, name: str) -> T:
        self._task = task = asyncio.create_task(coro, name=name)
        result = await asyncio.shield(task)
        self._task = None
        return result

    def pending(self) -> set[asyncio.Task[Any]]:
        task = self._task
        return {task} if task is not None and not task.done() else set()


class Parked(Generic[T]):
    """One long-poll kept in flight in its own task: :meth:`park` issues the next one (after ``wait_s`` in
    the task, so an idle wait is interrupted like the poll itself), :meth:`wait` races it against ``stop``
    and a deadline, :meth:`take` is its answer, :meth:`close` cancels and reaps the one still parked.
    ``waiting`` is True while a :meth:`wait` is in progress."""

    __slots__ = ("_sleep", "_task", "waiting")

    def __init__(self, sleep: Callable[[float], Awaitable[None]]) -> None:
        self._task: asyncio.Task[T] | None = None
        self._sleep = sleep
        self.waiting = False

    def park(self, poll: Callable[[], Coroutine[Any, Any, T]], wait_s: float, *, name: str) -> None:
        coro = self._later(poll, wait_s) if wait_s > 0 else poll()
        self._task = asyncio.create_task(coro, name=name)

    async def _later(self, poll: Callable[[], Coroutine[Any, Any, T]], wait_s: float) -> T:
        await self._sleep(wait_s)
        return await poll()

    async def wait(self, stop: asyncio.Future[None], until_s: float | None) -> bool:
        """Whether the poll answered first; False if ``stop`` is set or ``until_s`` seconds passed."""
        task = self._task
        assert task is not None
        self.waiting = True
        waiters: set[asyncio.Future[Any]] = {task, stop}
        try:
            await asyncio.wait(waiters, timeout=until_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting = False
        return task.done() and not stop.done()

    def take(self) -> T:
        """The answered poll's result (or its error); the task is not kept while the next one is parked."""
        task, self._task = self._task, None
        assert task is not None
        return task.result()

    async def drain(self, within_s: float) -> None:
        """Let the parked poll finish (released by the server) for up to ``within_s``."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=within_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def spawn(coro: Coroutine[Any, Any, None], *, name: str, into: set[asyncio.Task[None]]) -> None:
    """Run ``coro`` in the background, referenced from ``into`` until it is done."""
    task = asyncio.create_task(coro, name=name)
    into.add(task)
    task.add_done_callback(into.discard)


async def cancel_and_reap(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if running) and wait until it has ended."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def wait_or_cancel(task: asyncio.Task[Any], within_s: float) -> bool:
    """Wait up to ``within_s`` for ``task``; True if it ended. Cancelled meanwhile: ``task`` is cancelled
    and reaped too, then the cancel goes on."""
    try:
        done, _ = await asyncio.wait({task}, timeout=within_s)
    except asyncio.CancelledError:
        await cancel_and_reap(task)
        raise
    return bool(done)


async def wait_until(tasks: Collection[asyncio.Task[Any]], deadline: float, now: Callable[[], float]) -> None:
    """Wait for ``tasks`` until ``deadline``; those still running then are cancelled and reaped, and the
    failures of the finished ones are retrieved (theirs was the awaiter's to see, who is gone)."""
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - now()))
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if not t.cancelled():
            t.exception()


async def drive(
    steps: Generator[A, object, None],
    perform: Callable[[A], Awaitable[object]],
    errors: type[BaseException] | tuple[type[BaseException], ...],
) -> None:
    """Perform each action ``steps`` yields, sending back its result or throwing in its error (one of
    ``errors``; others propagate); the generator is closed however this ends."""
    result: object = None
    error: BaseException | None = None
    try:
        while True:
            try:
                act = steps.send(result) if error is None else steps.throw(error)
            except StopIteration:
                return
            result, error = None, None
            try:
                result = await perform(act)
            except errors as exc:
                error = exc
    finally:
        steps.close()
