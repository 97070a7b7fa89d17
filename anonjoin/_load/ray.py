"""Ray: a plan's shards as async actors of an existing Ray cluster (the ``anonjoin[ray]`` extra).

:class:`RayEngine` is a :class:`~anonjoin._load.sharded.ShardEngine`. It attaches to a cluster
(``ray.init(address=...)``, a cluster started with ``ray start --head`` …), checks that every node runs
this anonjoin, and starts one async actor per shard (one CPU each, spread over the nodes). Each actor runs
the unchanged asyncio runner on its own event loop (:func:`~anonjoin._load.sharded.run_shard_job`); the driver
polls the actors' live counters for the progress display (and their whole metrics state every
``state_interval_s``, for the parent's merged live metrics), cancels them all on :meth:`RayEngine.cancel`
(guests leave, the results still come back) and gathers their results for the parent's exact merge.

Actors never restart and their calls never retry (``max_restarts=0``, ``max_task_retries=0``): a shard
run again would be new guests joining under old ids. An actor that dies, whose node goes away or that
stops answering is a lost shard (``None`` from :meth:`RayEngine.run`: its guests are ``cancelled: actor
lost``). Every wait is bounded. Leaving the engine disconnects from the cluster (``ray.shutdown``), which
ends this run's actors and no more: a cluster the engine attached to keeps running.

Ray is imported here only, and only when an engine connects: ``import anonjoin`` never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any

from anonjoin._exceptions import AnonJoinError, ConfigurationError, redact
from anonjoin._load.metrics import Metrics
from anonjoin._load.metrics import Progress as Snapshot
from anonjoin._load.sharded import STATE_INTERVAL_S, ShardJob, StateCallback, run_shard_job
from anonjoin._load.shards import ShardResult
from anonjoin._version import __version__

if TYPE_CHECKING:
    from anonjoin._load.runner import LoadRunner

__all__ = ["ACTOR_LOST", "INSTALL_HINT", "RayEngine", "RayNode", "ShardActor"]

INSTALL_HINT = "pip install 'anonjoin[ray]'"
ACTOR_LOST = "actor lost"
SHARD_FAILED = "shard failed"

log = logging.getLogger("anonjoin.ray")


def import_ray() -> ModuleType:
    """The ``ray`` module, or a one-line :class:`~anonjoin.ConfigurationError` naming the extra."""
    try:
        import ray
    except ImportError:
        raise ConfigurationError(f"Ray is not installed: {INSTALL_HINT}") from None
    return ray


@dataclasses.dataclass(frozen=True)
class RayNode:
    """A node of the cluster as the engine saw it."""

    node_id: str
    address: str
    cpus: float
    anonjoin_version: str | None = None


def _node_version() -> tuple[str, str, str]:
    """Run on a node: the anonjoin it imports, the node's id and host (the version check's task)."""
    import ray

    import anonjoin

    return anonjoin.__version__, ray.get_runtime_context().get_node_id(), socket.gethostname()


class ShardActor:
    """One shard on a Ray worker: the unchanged runner on the actor's own event loop.

    Every method is ``async`` and in the default concurrency group, so they all run on that one loop:
    :meth:`progress` and :meth:`cancel` are answered while :meth:`run` is in progress.
    """

    def __init__(self) -> None:
        self._metrics: Metrics | None = None
        self._runner: LoadRunner | None = None
        self._cancelled = False

    async def ready(self) -> tuple[str, str, str]:
        """(anonjoin version, node id, host) of this actor: it is placed and can take a job."""
        return _node_version()

    async def run(self, job: ShardJob) -> ShardResult:
        self._metrics = Metrics(guests=job.plan.shard_guests)
        return await run_shard_job(job, metrics=self._metrics, on_runner=self._on_runner)

    def _on_runner(self, runner: LoadRunner) -> None:
        self._runner = runner
        if self._cancelled:
            runner.cancel()

    async def progress(self) -> Snapshot | None:
        """The shard's live counters (``None`` before its run starts)."""
        return None if self._metrics is None else self._metrics.progress()

    async def state(self) -> dict[str, Any] | None:
        """The shard's whole :meth:`~anonjoin.Metrics.to_state` (``None`` before its run starts)."""
        return None if self._metrics is None else self._metrics.to_state()

    async def cancel(self) -> None:
        """No more arrivals, joined guests leave; :meth:`run` still returns the shard's result."""
        self._cancelled = True
        if self._runner is not None:
            self._runner.cancel()


@dataclasses.dataclass
class _Shard:
    """The driver's view of one actor during :meth:`RayEngine.run`."""

    actor: Any
    node: str
    result: asyncio.Future[Any] | None = None
    poll: asyncio.Future[Any] | None = None
    state: asyncio.Future[Any] | None = None
    state_asked_at: float = 0.0
    answered_at: float = 0.0
    done: bool = False


def _future(ray: ModuleType, ref: Any) -> asyncio.Future[Any]:
    """An asyncio future of an ObjectRef; its exception counts as retrieved if nobody awaits it."""
    fut = asyncio.wrap_future(ref.future())
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``HOST:PORT`` (or ``ray://HOST:PORT``) address must accept a TCP connection within ``timeout_s``:
    a one-line :class:`~anonjoin.ConfigurationError` now instead of Ray's minutes of retries."""
    text = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = text.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return  # auto, local: Ray finds (or refuses) the cluster of this machine itself, at once
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"cannot attach to the Ray cluster at {redact(address)}: {exc.strerror or exc} "
            "(start one with: ray start --head)"
        ) from None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return redact(text[:limit])


class RayEngine:
    """Run a plan's shards as async actors of a Ray cluster (see the module's docstring).

    ``address``: what ``ray.init`` attaches to (``auto``: the cluster of this machine, ``HOST:6379``, or
    ``ray://HOST:10001``). ``shards``: how many actors (one CPU each); default: the cluster's CPUs.
    ``verbose``: Ray's own logging and the workers' output on stderr (quiet otherwise).
    ``expected_version``: the anonjoin every node must run (default: this one).

    Bounds: ``start_timeout_s`` for the version check and the actors to be placed; ``lost_after_s``
    without an answer to a progress poll and an actor is lost (it is killed, never left running);
    ``cancel_grace_s`` after :meth:`cancel` for the results to come back.
    """

    lost_reason: str

    def __init__(
        self,
        address: str = "auto",
        *,
        shards: int | None = None,
        verbose: bool = False,
        progress_interval_s: float = 0.25,
        state_interval_s: float = STATE_INTERVAL_S,
        start_timeout_s: float = 120.0,
        lost_after_s: float = 30.0,
        cancel_grace_s: float = 120.0,
        expected_version: str = __version__,
    ) -> None:
        if shards is not None and shards < 1:
            raise ConfigurationError(f"shards must be >= 1, got {shards}")
        if not address.strip():
            raise ConfigurationError("the Ray address is empty (give auto, HOST:PORT or ray://HOST:PORT)")
        self.address = address.strip()
        self.shards = shards
        self.verbose = verbose
        self.expected_version = expected_version
        self.lost_reason = ACTOR_LOST
        self.nodes: list[RayNode] = []
        """The cluster's live nodes (after :meth:`connect`), with their anonjoin (after entering)."""
        self.placement: list[str] = []
        """The node id of each shard's actor (after entering)."""
        self.failures: dict[int, str] = {}
        """Why each lost shard was lost (one line each)."""
        self._interval = progress_interval_s
        self._state_interval = state_interval_s
        self._start_timeout = start_timeout_s
        self._lost_after = lost_after_s
        self._cancel_grace = cancel_grace_s
        self._ray: ModuleType | None = None
        self._owns_connection = False
        self._actors: list[Any] = []
        self._cancelled = False

    def __repr__(self) -> str:
        return f"RayEngine(address={redact(self.address)!r}, shards={self.shards})"

    # -- the cluster ----------------------------------------------------------------------------------

    def connect(self) -> list[RayNode]:
        """Attach to the cluster (once; a process already connected keeps its connection) and list its
        live nodes. Blocking (Ray's own call); :class:`~anonjoin.ConfigurationError` when it cannot."""
        if self._ray is not None:
            return self.nodes
        ray = import_ray()
        if not ray.is_initialized():
            _check_reachable(self.address)  # Ray itself retries an unreachable address for minutes
            os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
            try:
                ray.init(
                    address=self.address,
                    logging_level=logging.INFO if self.verbose else logging.ERROR,
                    log_to_driver=self.verbose,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigurationError(
                    f"cannot attach to the Ray cluster at {redact(self.address)}: {_one_line(exc)} "
                    "(start one with: ray start --head)"
                ) from None
            self._owns_connection = True
        self._ray = ray
        self.nodes = [
            RayNode(
                str(n["NodeID"]), str(n.get("NodeManagerAddress", "?")), float(n["Resources"].get("CPU", 0))
            )
            for n in ray.nodes()
            if n.get("Alive")
        ]
        return self.nodes

    @property
    def cluster_cpus(self) -> int:
        """The CPUs of the cluster's live nodes (after :meth:`connect`)."""
        return int(sum(n.cpus for n in self.nodes))

    def nodes_elsewhere(self) -> list[RayNode]:
        """The live nodes that are not this machine (by address): they cannot reach a loopback server."""
        ray = self._ray
        if ray is None:
            return []
        here = {"127.0.0.1", "localhost", ray.util.get_node_ip_address()}
        return [n for n in self.nodes if n.address not in here]

    def disconnect(self) -> None:
        """Leave the cluster if this engine attached to it (its actors end; the cluster does not)."""
        ray, self._ray = self._ray, None
        if ray is not None and self._owns_connection:
            self._owns_connection = False
            ray.shutdown()

    async def __aenter__(self) -> RayEngine:
        try:
            self.connect()
            await self._start()
        except BaseException:
            self._kill_actors()
            self.disconnect()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._kill_actors()
        self.disconnect()

    async def _start(self) -> None:
        """Check every node's anonjoin, then place the actors; both bounded by ``start_timeout_s``."""
        ray = self._ray
        assert ray is not None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        shards = self.shards if self.shards is not None else max(self.cluster_cpus, 1)
        self.shards = shards
        if shards > self.cluster_cpus:
            raise ConfigurationError(
                f"{shards} shards need {shards} CPUs of the Ray cluster (one actor each); it has "
                f"{self.cluster_cpus} on {len(self.nodes)} node(s)"
            )
        check = ray.remote(num_cpus=0, max_retries=0)(_node_version)
        probes = [
            _future(
                ray,
                check.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
                ).remote(),
            )
            for node in self.nodes
        ]
        # The actors are placed while the nodes answer (their processes start meanwhile); no job is sent
        # to them before every node has passed the check.
        actor_class = ray.remote(ShardActor).options(
            num_cpus=1, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD"
        )
        self._actors = [actor_class.remote() for _ in range(shards)]
        placing = [_future(ray, a.ready.remote()) for a in self._actors]
        seen = await self._bounded(probes, "the version check of the Ray nodes")
        checked: list[RayNode] = []
        for node, got in zip(self.nodes, seen, strict=True):
            if isinstance(got, BaseException):
                raise ConfigurationError(
                    f"the Ray node {node.address} ({node.node_id[:8]}) cannot run anonjoin: {_one_line(got)} "
                    f"(install anonjoin {self.expected_version} on every node: {INSTALL_HINT})"
                )
            checked.append(dataclasses.replace(node, anonjoin_version=got[0]))
        self.nodes = checked
        self._check_versions(checked)
        ready = await self._bounded(placing, "the actors")
        for k, got in enumerate(ready):
            if isinstance(got, BaseException):
                raise AnonJoinError(f"the Ray actor of shard {k}/{shards} did not start: {_one_line(got)}")
        where = {n.node_id: n.address for n in self.nodes}
        self._check_versions(  # each actor's own import too
            [RayNode(node, where.get(node, host), 1, version) for version, node, host in ready]
        )
        self.placement = [node for _version, node, _host in ready]
        log.info("anonjoin.ray.ready", extra={"shards": shards, "nodes": len(set(self.placement))})

    def _check_versions(self, nodes: Sequence[RayNode]) -> None:
        for node in nodes:
            if node.anonjoin_version != self.expected_version:
                raise ConfigurationError(
                    f"the Ray node {node.address} ({node.node_id[:8]}) runs anonjoin "
                    f"{node.anonjoin_version}, this driver {self.expected_version}: install the same "
                    "anonjoin on every node"
                )

    async def _bounded(self, futures: Sequence[asyncio.Future[Any]], what: str) -> list[Any]:
        """Each future's value or exception; an :class:`~anonjoin.AnonJoinError` after the start bound."""
        if not futures:
            return []
        _done, pending = await asyncio.wait(futures, timeout=self._start_timeout)
        if pending:
            raise AnonJoinError(
                f"{what} took longer than {self._start_timeout:.0f} s (is the cluster busy or short of CPUs?)"
            )
        return [f.exception() if f.exception() is not None else f.result() for f in futures]

    def _kill_actors(self) -> None:
        ray, actors, self._actors = self._ray, self._actors, []
        if ray is None:
            return
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    # -- the run --------------------------------------------------------------------------------------

    async def run(
        self,
        jobs: Sequence[ShardJob],
        on_progress: Callable[[int, Snapshot], None],
        on_state: StateCallback | None = None,
    ) -> list[ShardResult | None]:
        """Run one job per actor (in shard order); ``None`` for a shard whose actor was lost."""
        ray = self._ray
        if ray is None:
            raise AnonJoinError("the Ray engine runs inside 'async with engine:'")
        if len(jobs) != len(self._actors):
            raise ConfigurationError(f"{len(jobs)} jobs for {len(self._actors)} Ray actors: give shards=")
        now = time.monotonic()
        shards = [
            _Shard(actor, node, _future(ray, actor.run.remote(job)), answered_at=now)
            for actor, node, job in zip(self._actors, self.placement, jobs, strict=True)
        ]
        if self._cancelled:  # cancelled while the actors were being placed
            self.cancel()
        out: list[ShardResult | None] = [None] * len(shards)
        cancel_deadline: float | None = None
        while not all(s.done for s in shards):
            running = [s.result for s in shards if not s.done and s.result is not None]
            await asyncio.wait(running, timeout=self._interval)
            now = time.monotonic()
            if self._cancelled and cancel_deadline is None:
                cancel_deadline = now + self._cancel_grace
            for k, s in enumerate(shards):
                if s.done:
                    continue
                assert s.result is not None
                if s.result.done():
                    s.done = True
                    out[k] = self._collect(ray, k, s.result)
                    if out[k] is None:  # an unavailable actor may still be running: it must not go on
                        with contextlib.suppress(Exception):
                            ray.kill(s.actor, no_restart=True)
                    continue
                self._poll(ray, k, s, now, on_progress)
                if on_state is not None:
                    self._poll_state(ray, k, s, now, on_state)
                if now - s.answered_at > self._lost_after:
                    self._lose(ray, k, s, f"no answer for {self._lost_after:.0f} s")
                elif cancel_deadline is not None and now > cancel_deadline:
                    self._lose(ray, k, s, f"no result {self._cancel_grace:.0f} s after the cancel")
        self._set_reason()
        return out

    def _poll(
        self, ray: ModuleType, k: int, s: _Shard, now: float, on_progress: Callable[[int, Snapshot], None]
    ) -> None:
        """Read the last progress answer (if any) and ask again; one poll in flight per actor."""
        if s.poll is not None and s.poll.done():
            exc = s.poll.exception()
            if exc is None:
                snap = s.poll.result()
                s.answered_at = now
                if snap is not None:
                    on_progress(k, snap)
            s.poll = None
        if s.poll is None:
            try:
                s.poll = _future(ray, s.actor.progress.remote())
            except Exception as exc:  # the handle of a dead actor may refuse at once
                log.debug("anonjoin.ray.poll_refused", extra={"shard": k, "error": _one_line(exc)})

    def _poll_state(self, ray: ModuleType, k: int, s: _Shard, now: float, on_state: StateCallback) -> None:
        """Read the last state answer (if any); ask again every ``state_interval_s``, one in flight."""
        if s.state is not None and s.state.done():
            if s.state.exception() is None and s.state.result() is not None:
                on_state(k, s.state.result())
            s.state = None
        if s.state is None and now - s.state_asked_at >= self._state_interval:
            s.state_asked_at = now
            try:
                s.state = _future(ray, s.actor.state.remote())
            except Exception as exc:  # the handle of a dead actor may refuse at once
                log.debug("anonjoin.ray.state_refused", extra={"shard": k, "error": _one_line(exc)})

    def _collect(self, ray: ModuleType, k: int, fut: asyncio.Future[Any]) -> ShardResult | None:
        exc = fut.exception()
        if exc is None:
            result: ShardResult = fut.result()
            return result
        if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.NodeDiedError):
            self.failures[k] = f"{ACTOR_LOST}: {_one_line(exc, 120)}"
        elif isinstance(exc, ray.exceptions.RayTaskError):
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            self.failures[k] = f"{SHARD_FAILED}: {type(cause).__name__}: {_one_line(cause, 160)}"
        else:
            self.failures[k] = f"{ACTOR_LOST}: {type(exc).__name__}: {_one_line(exc, 120)}"
        log.warning("anonjoin.ray.shard_lost", extra={"shard": k, "reason": self.failures[k]})
        return None

    def _lose(self, ray: ModuleType, k: int, s: _Shard, why: str) -> None:
        """Give up on a shard that stopped answering: kill its actor (no half-alive shard joins on)."""
        s.done = True
        self.failures[k] = f"{ACTOR_LOST}: {why}"
        log.warning("anonjoin.ray.shard_lost", extra={"shard": k, "reason": self.failures[k]})
        with contextlib.suppress(Exception):
            ray.kill(s.actor, no_restart=True)

    def _set_reason(self) -> None:
        kinds = {reason.split(":", 1)[0] for reason in self.failures.values()}
        self.lost_reason = SHARD_FAILED if kinds == {SHARD_FAILED} else ACTOR_LOST
        if len(kinds) > 1:
            self.lost_reason = f"{ACTOR_LOST} or {SHARD_FAILED}"

    def cancel(self) -> None:
        """Every actor stops its shard: no more arrivals, joined guests leave, the results come back."""
        self._cancelled = True
        for actor in self._actors:
            with contextlib.suppress(Exception):
                actor.cancel.remote()
