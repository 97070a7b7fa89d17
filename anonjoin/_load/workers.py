"""Worker processes on this machine: the shard engine of ``anonjoin load --workers N``.

Each worker is a process of the ``spawn`` start method (a fresh interpreter: nothing of the parent's event
loop, sockets or simulator is inherited, and importing this module starts nothing). The parent and a worker
talk over one pipe each:

- worker → parent: ``("ready", pid)`` once it can take a job; ``("progress", snapshot)`` every
  ``progress_interval_s``; ``("state", Metrics.to_state())`` every ``state_interval_s`` (the parent's merged
  live metrics); ``("result", ShardResult)`` at the end, or ``("error", text)``.
- parent → worker: ``("job", ShardJob, states)`` (``states``: whether the parent wants the states at all);
  ``("cancel",)`` (no more arrivals, joined guests leave, the result still comes back); ``("stop",)`` before
  a job (exit at once).

The pipe is also how each side notices the other's death. A worker that dies (``kill -9``, a crash) closes
its end: the parent sees the end of the pipe and reports the worker's shard lost (``worker lost``). A
parent that dies (even by ``SIGKILL``) closes its end: each worker sees it, stops its arrivals, lets its
joined guests leave (for :data:`ORPHAN_LEAVE_S` at most), and exits; no worker outlives the parent. A
worker stops on ``SIGINT``, ``SIGTERM`` and ``SIGHUP`` the way the parent asks it to (a Ctrl-C reaches
the whole process group).

The parent's event loop only dispatches the pipes' messages (``loop.add_reader``): it stays free for the
embedded simulator and the progress display.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from anonjoin._exceptions import AnonJoinError, ConfigurationError, redact
from anonjoin._load.metrics import Progress as Snapshot
from anonjoin._load.sharded import STATE_INTERVAL_S, ShardJob, StateCallback
from anonjoin._load.shards import WORKER_LOST, ShardResult

__all__ = ["ProcessEngine", "usable_cores"]

log = logging.getLogger("anonjoin.workers")

START_TIMEOUT_S = 120.0
"""How long a worker may take to start (a fresh interpreter importing aiohttp on a busy machine)."""
STOP_TIMEOUT_S = 90.0
"""After a cancel, how long the workers have to let their guests leave and send their results."""
EXIT_TIMEOUT_S = 10.0
"""How long a worker that is done may take to exit before it is terminated, then killed."""
ORPHAN_LEAVE_S = 15.0
"""How long a worker whose parent died has to let its guests leave before it exits regardless (the
embedded simulator died with the parent: its leaves cannot succeed, and no worker outlives the parent)."""
ORPHAN_EXIT_CODE = 70


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container's cpuset limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class _Worker:
    def __init__(self, index: int, process: Any, conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.pid: int | None = process.pid
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.result: asyncio.Future[ShardResult | None] = asyncio.get_running_loop().create_future()
        self.open = True
        self.error: str | None = None


class ProcessEngine:
    """Runs each shard in a worker process of this machine (see the module's docstring).

    Give it to :func:`~anonjoin._load.sharded.run_sharded` (``run_sharded(plan, ProcessEngine(2), ...)``),
    which enters it: ``async with engine:`` starts the workers and returns once each can take a job;
    :meth:`run` gives them their jobs and waits for their results; leaving stops what is left (a worker
    that does not exit in time is terminated, then killed). One engine runs one set of jobs, once.
    """

    lost_reason = WORKER_LOST

    def __init__(
        self,
        workers: int,
        *,
        progress_interval_s: float = 0.25,
        state_interval_s: float = STATE_INTERVAL_S,
        start_timeout_s: float = START_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        if workers < 1:
            raise ConfigurationError(f"workers must be >= 1, got {workers}")
        if progress_interval_s <= 0:
            raise ConfigurationError("the progress interval must be > 0 seconds")
        if state_interval_s <= 0:
            raise ConfigurationError("the state interval must be > 0 seconds")
        self.workers = workers
        self._interval = progress_interval_s
        self._state_interval = state_interval_s
        self._start_timeout = start_timeout_s
        self._stop_timeout = stop_timeout_s
        self._workers: list[_Worker] = []
        self._cancelled = False
        self._cancel_event: asyncio.Event | None = None
        self._on_progress: Callable[[int, Snapshot], None] | None = None
        self._on_state: StateCallback | None = None
        self._used = False
        self._shut = False

    @property
    def pids(self) -> list[int]:
        """The workers' process ids (once started)."""
        return [w.pid for w in self._workers if w.pid is not None]

    @property
    def errors(self) -> dict[int, str]:
        """Shard index -> why its worker gave no result (a crash's one line, or ``worker lost``)."""
        return {w.index: w.error for w in self._workers if w.error is not None}

    async def __aenter__(self) -> ProcessEngine:
        if self._workers:
            raise RuntimeError("a ProcessEngine starts its workers once (run_sharded enters it itself)")
        loop = asyncio.get_running_loop()
        self._cancel_event = asyncio.Event()
        if self._cancelled:
            self._cancel_event.set()
        ctx = multiprocessing.get_context("spawn")
        try:
            for k in range(self.workers):
                parent_end, child_end = ctx.Pipe(duplex=True)
                process = ctx.Process(
                    target=worker_main,
                    args=(child_end, self._interval, self._state_interval),
                    name=f"anonjoin-worker-{k}",
                    daemon=True,
                )
                with _stop_signals_ignored():
                    process.start()
                child_end.close()  # the worker holds the only other end: its death is our end of file
                worker = _Worker(k, process, parent_end)
                self._workers.append(worker)
                loop.add_reader(parent_end.fileno(), self._readable, worker)
            ready = [w.ready for w in self._workers]
            done, pending = await asyncio.wait(ready, timeout=self._start_timeout)
            if pending:
                raise AnonJoinError(
                    f"{len(pending)} of {self.workers} worker process(es) did not start within "
                    f"{self._start_timeout:g} s"
                )
            for fut in done:
                fut.result()
        except BaseException:
            await self._shutdown(graceful=False)
            raise
        log.info("anonjoin.workers.started pids=%s", ",".join(map(str, self.pids)))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown(graceful=exc is None)

    # -- messages ----------------------------------------------------------------------------------

    def _readable(self, worker: _Worker) -> None:
        try:
            while worker.open and worker.conn.poll():
                self._dispatch(worker, worker.conn.recv())
        except (EOFError, OSError):
            self._gone(worker)

    def _dispatch(self, worker: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            worker.pid = int(msg[1])
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif kind == "progress":
            if self._on_progress is not None:
                self._on_progress(worker.index, msg[1])
        elif kind == "state":
            if self._on_state is not None:
                self._on_state(worker.index, msg[1])
        elif kind == "result":
            if not worker.result.done():
                worker.result.set_result(msg[1])
        elif kind == "error":
            worker.error = str(msg[1])
            log.warning("anonjoin.workers.failed shard=%d: %s", worker.index, worker.error)
            if not worker.result.done():
                worker.result.set_result(None)

    def _gone(self, worker: _Worker) -> None:
        """The worker's end of the pipe closed: it exited (or was killed)."""
        if not worker.open:
            return
        worker.open = False
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        if not worker.ready.done():
            worker.ready.set_exception(AnonJoinError(f"worker process {worker.index} exited while starting"))
        if not worker.result.done():
            worker.error = worker.error or WORKER_LOST
            log.warning("anonjoin.workers.lost shard=%d pid=%s", worker.index, worker.pid)
            worker.result.set_result(None)

    def _send(self, worker: _Worker, msg: tuple[Any, ...]) -> None:
        if not worker.open:
            return
        try:
            worker.conn.send(msg)
        except (OSError, ValueError):
            self._gone(worker)

    # -- the run -----------------------------------------------------------------------------------

    async def run(
        self,
        jobs: Sequence[ShardJob],
        on_progress: Callable[[int, Snapshot], None],
        on_state: StateCallback | None = None,
    ) -> list[ShardResult | None]:
        """Give job k to worker k and wait for every result (``None`` for a worker lost)."""
        if not self._workers:
            raise RuntimeError("use the engine as `async with ProcessEngine(n) as engine:`")
        if self._used:
            raise RuntimeError("a ProcessEngine runs one set of jobs")
        if len(jobs) > len(self._workers):
            raise ConfigurationError(f"{len(jobs)} jobs for {len(self._workers)} worker process(es)")
        self._used = True
        self._on_progress = on_progress
        self._on_state = on_state
        busy = self._workers[: len(jobs)]
        for worker, job in zip(busy, jobs, strict=True):
            self._send(worker, ("job", job, on_state is not None))
            if self._cancelled:
                self._send(worker, ("cancel",))
        for worker in self._workers[len(jobs) :]:
            self._send(worker, ("stop",))
        results = [w.result for w in busy]
        assert self._cancel_event is not None
        cancelled = asyncio.ensure_future(self._cancel_event.wait())
        try:
            pending: set[asyncio.Future[Any]] = set(results)
            while pending and not self._cancel_event.is_set():
                _done, pending = await asyncio.wait(
                    pending | {cancelled}, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(cancelled)
            if pending:  # cancelled: the guests leave, bounded
                _done, pending = await asyncio.wait(pending, timeout=self._stop_timeout)
                for worker in busy:
                    if not worker.result.done():
                        log.warning("anonjoin.workers.stop_timeout shard=%d: killed", worker.index)
                        worker.error = f"{WORKER_LOST} (did not stop within {self._stop_timeout:g} s)"
                        worker.result.set_result(None)
                        with contextlib.suppress(OSError, ValueError):
                            worker.process.kill()
        finally:
            cancelled.cancel()
            await asyncio.gather(cancelled, return_exceptions=True)
        return [w.result.result() for w in busy]

    def cancel(self) -> None:
        """Every worker stops: no more arrivals, joined guests leave, the results still come back."""
        self._cancelled = True
        if self._cancel_event is not None:
            self._cancel_event.set()
        for worker in self._workers:
            self._send(worker, ("cancel",))

    async def _shutdown(self, *, graceful: bool) -> None:
        if self._shut:
            return
        self._shut = True
        loop = asyncio.get_running_loop()
        for worker in self._workers:
            if not worker.ready.done():
                worker.ready.cancel()
            if not graceful:
                with contextlib.suppress(OSError, ValueError):
                    worker.process.kill()
            else:
                self._send(worker, ("stop",))  # a worker still waiting for a job exits
        for worker in self._workers:
            await _exited(loop, worker.process, EXIT_TIMEOUT_S)
            if worker.process.exitcode is None:
                worker.process.terminate()
                if not await _exited(loop, worker.process, EXIT_TIMEOUT_S):
                    worker.process.kill()
                    await _exited(loop, worker.process, EXIT_TIMEOUT_S)
            if worker.open:
                worker.open = False
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(worker.conn.fileno())
            worker.conn.close()
            if not worker.result.done():
                worker.result.set_result(None)
            worker.process.join(timeout=1.0)
            with contextlib.suppress(ValueError):
                worker.process.close()


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """Start a worker with the stop signals ignored (an ignored signal stays ignored across exec): a
    Ctrl-C at the terminal reaches the whole process group, and a worker still importing must not die of
    it (it would be a lost shard). The worker's event loop handles them once it runs. Main thread only."""
    saved: list[tuple[signal.Signals, Any]] = []
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            saved.append((sig, signal.signal(sig, signal.SIG_IGN)))
    except ValueError:  # not the main thread: signals are not ours to change
        pass
    try:
        yield
    finally:
        for sig, before in saved:
            signal.signal(sig, before)


async def _exited(loop: asyncio.AbstractEventLoop, process: Any, within_s: float) -> bool:
    """Wait (without blocking the loop) for ``process`` to exit; True if it did within ``within_s``."""
    if process.exitcode is not None:
        return True
    done = loop.create_future()
    fd = process.sentinel

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait({done}, timeout=within_s)
    finally:
        loop.remove_reader(fd)
    process.join(timeout=0)
    return process.exitcode is not None


# -- the worker's side -----------------------------------------------------------------------------


def worker_main(
    conn: Connection, progress_interval_s: float, state_interval_s: float = STATE_INTERVAL_S
) -> None:
    """A worker process's entry (spawn): take one job, run it in a fresh event loop, send the result."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # until the loop handles them
        signal.signal(sig, signal.SIG_IGN)
    try:
        conn.send(("ready", os.getpid()))
        msg = conn.recv()
    except (EOFError, OSError):
        return  # the parent is gone before the run
    if msg[0] != "job":
        return
    try:
        states = state_interval_s if len(msg) > 2 and msg[2] else None
        asyncio.run(_run_job(conn, msg[1], progress_interval_s, states))
    except BaseException as exc:  # one line to the parent, never a traceback on the shared stderr
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", redact(f"{type(exc).__name__}: {exc}")[:300]))
    finally:
        conn.close()


async def _run_job(
    conn: Connection, job: ShardJob, interval_s: float, state_interval_s: float | None
) -> None:
    from anonjoin._load.metrics import Metrics
    from anonjoin._load.runner import LoadRunner
    from anonjoin._load.sharded import run_shard_job

    loop = asyncio.get_running_loop()
    metrics = Metrics(guests=job.plan.shard_guests)
    runners: list[LoadRunner] = []
    state = {"stopping": False, "parent": True}

    def stop() -> None:
        state["stopping"] = True
        for runner in runners:
            runner.cancel()

    def on_runner(runner: LoadRunner) -> None:
        runners.append(runner)
        if state["stopping"]:
            runner.cancel()

    def parent_gone() -> None:
        if state["parent"]:
            state["parent"] = False
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(conn.fileno())
            stop()  # the parent died: leave, then exit (nobody to send a result to)
            loop.call_later(ORPHAN_LEAVE_S, os._exit, ORPHAN_EXIT_CODE)

    def readable() -> None:
        try:
            while state["parent"] and conn.poll():
                if conn.recv()[0] in ("cancel", "stop"):
                    stop()
        except (EOFError, OSError):
            parent_gone()

    def send(msg: tuple[Any, ...]) -> None:
        if state["parent"]:
            try:
                conn.send(msg)
            except (OSError, ValueError):
                parent_gone()

    loop.add_reader(conn.fileno(), readable)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop)

    async def report_progress() -> None:
        last_state = loop.time()
        while True:
            await asyncio.sleep(interval_s)
            send(("progress", metrics.progress()))
            if state_interval_s is not None and loop.time() - last_state >= state_interval_s:
                last_state = loop.time()
                send(("state", metrics.to_state()))

    ticker = asyncio.ensure_future(report_progress())
    try:
        result = await run_shard_job(job, metrics=metrics, on_runner=on_runner)
    finally:
        ticker.cancel()
        await asyncio.gather(ticker, return_exceptions=True)
        if state["parent"]:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(conn.fileno())
    send(("progress", metrics.progress()))
    send(("result", result))
