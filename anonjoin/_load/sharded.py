"""A run in shards: one parent prepares the plan once, engines run its shards, the parent merges.

The parent (:func:`run_sharded`) does what must happen once: the target checks, the meetings, every
guest's applicationSessionId from the session store (the store stays in the parent: a SQLite file is one
machine's, and one writer keeps it simple), then hands each shard a :class:`ShardJob` — picklable, with
everything a process on another machine needs (the target, the CA's bytes, the policies, the shard's
guests and their ids). An engine (:class:`ShardEngine`: worker processes, Ray actors) runs the jobs at one
wall-clock ``start_at`` with :func:`run_shard_job` and gives back each shard's
:class:`~anonjoin._load.shards.ShardResult`, or ``None`` for a shard it lost. The parent merges them exactly
(:func:`~anonjoin._load.shards.merge_results`; a lost shard's guests are ``cancelled`` with the engine's
reason) and writes every guest's outcome to the store.

Live metrics: besides the progress snapshots, each shard reports its whole
:meth:`~anonjoin.Metrics.to_state` every :data:`STATE_INTERVAL_S` (``on_state``); :class:`ShardStates`
keeps the latest of each and merges them (exactly, once per new state) for a Prometheus scrape of the
parent. One ``to_state()`` of a shard of 10,000 joined guests takes ~2 ms and ~100 KB pickled (median of
30 on the project's 2-core machine): once a second, it costs a shard ~0.2 % of a core.

Leases (``lease_s``, the CLI's for a file or Redis store): the parent takes every guest's lease before the
shards start and holds it (renewed by the lease itself) until the guest's outcome is written, fenced, at
the end; a guest another instance holds is refused as the one-process runner refuses it (``failed:
LeaseHeld: another instance holds the guest``) and its shard sends no request for it. The parent does not
watch its leases during the run: a lease another instance takes over lets that guest join on in its shard,
but its outcome write is refused by the fence (``metrics.store_writes_fenced``).

A shard never re-runs: a re-run would be new guests joining under old ids. What an engine loses it
reports.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from anonjoin._async.retry import RejoinPolicy, RetryPolicy
from anonjoin._async.settings import TargetSettings
from anonjoin._exceptions import AnonJoinError, ConfigurationError, LeaseHeld, LeaseLost, StoreError
from anonjoin._load.metrics import Metrics, earliest_phase
from anonjoin._load.metrics import Progress as Snapshot
from anonjoin._load.runner import (
    STORE_BATCH,
    LoadPlan,
    LoadResult,
    LoadRunner,
    Shard,
    pool_size,
    prepare_plan_with,
    run_load,
)
from anonjoin._load.shards import MergedRun, ShardResult, merge_results
from anonjoin._load.store import Fence, Lease, MemorySessionStore, NewSession, Outcome, SessionStore

__all__ = [
    "LEASE_HELD",
    "START_SLACK_S",
    "STATE_INTERVAL_S",
    "InProcessEngine",
    "ShardEngine",
    "ShardJob",
    "ShardProgress",
    "ShardStates",
    "assign_sessions",
    "check_sharded_options",
    "prepare_plan",
    "run_load_sharded",
    "run_shard_job",
    "run_sharded",
    "save_outcomes",
    "take_leases",
    "target_of",
]

START_SLACK_S = 1.0
"""Seconds between the moment every shard is ready and the common ``start_at``."""
STATE_INTERVAL_S = 1.0
"""How often a shard reports its whole metrics state (``on_state``): ~2 ms for 10,000 guests."""
LEASE_HELD = "LeaseHeld: another instance holds the guest"
"""The reason of a guest whose lease another instance holds (the one-process runner's too)."""
LEASE_BATCH = 100
"""Leases taken concurrently by the parent (one store round trip each: Redis overlaps them)."""
StateCallback = Callable[[int, dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class ShardJob:
    """What one shard needs to run anywhere (it pickles: the engine may ship it to another machine)."""

    plan: LoadPlan
    """The whole plan with this job's ``shard`` (its meetings already made)."""
    start_at: float
    """The common start (Unix seconds); set by the parent once every shard is ready."""
    target: TargetSettings
    ca_pem: bytes | None
    """The CA file's content (a worker on another machine does not have the parent's file)."""
    retry: RetryPolicy
    rejoin: RejoinPolicy | None
    sessions: tuple[tuple[str, str], ...]
    """(guest id, applicationSessionId) of the shard's guests, from the parent's store."""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The run's settings as the report shows them (cleaned of secrets)."""
    refused: tuple[tuple[str, str], ...] = ()
    """(guest id, reason) of the shard's guests whose lease the parent could not take (:data:`LEASE_HELD`,
    or ``StoreError``): the shard fails them with that reason, without a request."""

    def __repr__(self) -> str:  # the target holds the client secret: never in a repr
        return f"ShardJob(shard={self.plan.shard}, guests={len(self.sessions)}, start_at={self.start_at:.3f})"


async def run_shard_job(
    job: ShardJob,
    *,
    metrics: Metrics | None = None,
    on_runner: Callable[[LoadRunner], None] | None = None,
) -> ShardResult:
    """Run one shard in the current event loop and return its result (what engines call).

    ``metrics``: the shard's live metrics (an engine reads ``metrics.progress()`` for the parent's display).
    ``on_runner``: receives the runner before it starts (``runner.cancel()`` stops the shard: its guests
    leave and the result still comes back, ``interrupted``).
    """
    plan = job.plan
    target = job.target
    assert target.discover_url and target.endpoint_id
    store = _RefusingStore(job.refused) if job.refused else MemorySessionStore()
    owned = plan.shard.numbers(plan.guests)
    ids = dict(job.sessions)
    urls = list(plan.meeting_urls)
    await store.get_or_create_many(
        [
            NewSession(
                plan.guest_id(n),
                urls[(n - 1) % len(urls)],
                plan.origin,
                plan.name(n),
                ids.get(plan.guest_id(n)),
            )
            for n in owned
        ]
    )
    metrics = metrics if metrics is not None else Metrics(guests=plan.shard_guests)
    refused = bool(job.refused)
    with tempfile.TemporaryDirectory(prefix="anonjoin-shard-") as tmp:
        ca_file = _local_ca(target.ca_file, job.ca_pem, Path(tmp))
        settings = target.model_copy(update={"ca_file": ca_file})
        credential = settings.credential()
        try:
            result = await run_load(
                plan,
                discover_url=target.discover_url,
                endpoint_id=target.endpoint_id,
                credential=credential,
                ca_file=ca_file,
                verify_tls=settings.verify_tls(),
                retry=job.retry,
                rejoin=job.rejoin,
                store=store,
                lease_s=_SHARD_LEASE_S if refused else None,
                metrics=metrics,
                on_runner=on_runner,
                start_at=job.start_at,
            )
        finally:
            await credential.aclose()
    return ShardResult.of(
        result, plan, start_at=job.start_at, settings={**job.settings, "shard": str(plan.shard)}
    )


_SHARD_LEASE_S = 3600.0
"""The lease of a shard's own (memory) store: a placeholder, the parent holds the real ones."""


class _RefusingStore(MemorySessionStore):
    """A shard's store when the parent could not lease some of its guests: those are refused
    (:class:`LeaseHeld`, before any request), the others get a placeholder lease that never renews (the
    parent's store holds, renews and fences the real ones)."""

    def __init__(self, refused: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self._refused = dict(refused)

    async def take(self, guest_id: str, lease_s: float = _SHARD_LEASE_S) -> Lease:
        why = self._refused.get(guest_id)
        if why == LEASE_HELD:
            raise LeaseHeld(guest_id)
        if why is not None:
            raise StoreError(f"the parent's session store could not take the lease of {guest_id!r}")
        return Lease(self, guest_id, Fence("shard", 0), lease_s)  # not started: no renewal task

    async def _release(self, guest_id: str, fence: Fence) -> None:
        return None

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        await super().record_outcomes([o._replace(fence=None) for o in outcomes])


def _local_ca(ca_file: str | None, ca_pem: bytes | None, tmp: Path) -> str | None:
    """The CA file to use here: the parent's if this machine has it, else its bytes written to ``tmp``."""
    if ca_pem is None or (ca_file is not None and Path(ca_file).is_file()):
        return ca_file
    path = tmp / "ca.pem"
    path.write_bytes(ca_pem)
    return str(path)


def _read_ca(ca_file: str | None) -> bytes | None:
    return Path(ca_file).read_bytes() if ca_file and os.path.isfile(ca_file) else None


class ShardEngine(Protocol):
    """Runs a plan's shards somewhere: worker processes on this machine, actors of a Ray cluster.

    Used as ``async with engine: ...``; entering starts the workers and returns once each can take a job
    (so the parent sets ``start_at`` after the slow part); leaving stops whatever is left.
    """

    lost_reason: str
    """The reason a lost shard's guests get (``worker lost``)."""

    async def __aenter__(self) -> ShardEngine: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def run(
        self,
        jobs: Sequence[ShardJob],
        on_progress: Callable[[int, Snapshot], None],
        on_state: StateCallback | None = None,
    ) -> list[ShardResult | None]:
        """Run every job (one per shard, in shard order); ``None`` for a shard that was lost.
        ``on_progress(shard_index, snapshot)`` as the shards report their live counters;
        ``on_state(shard_index, state)`` with a shard's whole :meth:`~anonjoin.Metrics.to_state`, about
        every :data:`STATE_INTERVAL_S` (for the parent's merged live metrics)."""
        ...

    def cancel(self) -> None:
        """Stop every shard: no more arrivals, joined guests leave, the results still come back."""
        ...


class InProcessEngine:
    """Every shard as a task of this event loop: the engine with no processes (for tests and embedders
    who want the shard algebra without a second core)."""

    lost_reason = "shard failed"

    def __init__(
        self, *, progress_interval_s: float = 0.25, state_interval_s: float = STATE_INTERVAL_S
    ) -> None:
        self._runners: list[LoadRunner] = []
        self._cancelled = False
        self._interval = progress_interval_s
        self._state_interval = state_interval_s

    async def __aenter__(self) -> InProcessEngine:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def _on_runner(self, runner: LoadRunner) -> None:
        self._runners.append(runner)
        if self._cancelled:
            runner.cancel()

    async def run(
        self,
        jobs: Sequence[ShardJob],
        on_progress: Callable[[int, Snapshot], None],
        on_state: StateCallback | None = None,
    ) -> list[ShardResult | None]:
        import asyncio

        metrics = [Metrics(guests=job.plan.shard_guests) for job in jobs]
        tasks = [
            asyncio.ensure_future(run_shard_job(job, metrics=m, on_runner=self._on_runner))
            for job, m in zip(jobs, metrics, strict=True)
        ]
        pending = set(tasks)
        last_state = time.monotonic()
        while pending:
            _done, pending = await asyncio.wait(pending, timeout=self._interval)
            states = on_state is not None and time.monotonic() - last_state >= self._state_interval
            if states:
                last_state = time.monotonic()
            for k, m in enumerate(metrics):
                on_progress(k, m.progress())
                if states and on_state is not None:
                    on_state(k, m.to_state())
        out: list[ShardResult | None] = []
        for task in tasks:
            exc = task.exception()
            out.append(None if exc is not None else task.result())
        return out

    def cancel(self) -> None:
        self._cancelled = True
        for runner in self._runners:
            runner.cancel()


class ShardProgress:
    """The parent's live view of all shards: the latest snapshot of each, added up.

    Has the ``guests`` and :meth:`progress` a progress display reads from a ``Metrics``.
    """

    def __init__(self, guests: int, shards: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.guests = guests
        self._latest: list[Snapshot | None] = [None] * shards
        self._clock = clock
        self._t0 = clock()

    def update(self, shard: int, snapshot: Snapshot) -> None:
        self._latest[shard] = snapshot

    def progress(self, window_s: float = 5.0) -> Snapshot:
        snaps = [s for s in self._latest if s is not None]
        total: dict[str, Any] = {}
        for field in dataclasses.fields(Snapshot):
            name = field.name
            if name == "elapsed_s":  # since the parent began (never backwards while shards start)
                total[name] = max([self._clock() - self._t0, *(s.elapsed_s for s in snaps)])
            elif name == "guests":
                total[name] = self.guests
            elif name == "phase":
                total[name] = earliest_phase(s.phase for s in snaps)
            else:
                total[name] = sum(getattr(s, name) for s in snaps)
        return Snapshot(**total)


class ShardStates:
    """The parent's merged live metrics: the latest :meth:`~anonjoin.Metrics.to_state` of each shard.

    :meth:`update` is an engine's ``on_state``; :meth:`metrics` is a
    :class:`~anonjoin.MetricsCollector` source: the exact merge of the latest states (``None`` before the
    first), built again only when a state arrived since the last call (a scrape merges at most once).
    """

    def __init__(self, shards: int) -> None:
        self._latest: list[dict[str, Any] | None] = [None] * shards
        self._merged: Metrics | None = None
        self._stale = False
        self.updates = 0
        """How many states arrived (all shards)."""

    def update(self, shard: int, state: dict[str, Any]) -> None:
        self._latest[shard] = state
        self._stale = True
        self.updates += 1

    def metrics(self) -> Metrics | None:
        if self._stale:
            self._merged = Metrics.merged(s for s in self._latest if s is not None)
            self._stale = False
        return self._merged


async def prepare_plan(
    plan: LoadPlan,
    *,
    target: TargetSettings,
    retry: RetryPolicy | None,
    meetings: int,
    check_links: Callable[[Sequence[str]], None] | None,
) -> LoadPlan:
    """What happens once, before sharding: the service's links judged, the missing meetings made."""
    from anonjoin._async.client import Client

    assert target.discover_url and target.endpoint_id
    credential = target.credential()
    try:
        async with Client(
            discover_url=target.discover_url,
            endpoint_id=target.endpoint_id,
            credential=credential,
            ca_file=target.ca_file,
            verify_tls=target.verify_tls(),
            retry=retry,
            max_connections=pool_size(1),
        ) as client:
            return await prepare_plan_with(client, plan, meetings=meetings, check_links=check_links)
    finally:
        await credential.aclose()


async def assign_sessions(plan: LoadPlan, store: SessionStore) -> dict[str, str]:
    """Every guest's applicationSessionId from ``store`` (made for a new guest, kept for a known one)."""
    urls = list(plan.meeting_urls)
    out: dict[str, str] = {}
    for lo in range(0, plan.guests, STORE_BATCH):
        batch = [
            NewSession(plan.guest_id(n), urls[(n - 1) % len(urls)], plan.origin, plan.name(n))
            for n in range(lo + 1, min(lo + STORE_BATCH, plan.guests) + 1)
        ]
        for rec in await store.get_or_create_many(batch):
            out[rec.guest_id] = rec.application_session_id
    return out


async def take_leases(
    store: SessionStore, guest_ids: Sequence[str], lease_s: float
) -> tuple[dict[str, Lease], dict[str, str]]:
    """Take every guest's lease (:data:`LEASE_BATCH` at a time): the leases, and the refused guests with
    their reason (:data:`LEASE_HELD`, or ``StoreError`` for a store that could not answer)."""
    import asyncio

    leases: dict[str, Lease] = {}
    refused: dict[str, str] = {}
    for lo in range(0, len(guest_ids), LEASE_BATCH):
        batch = guest_ids[lo : lo + LEASE_BATCH]
        got = await asyncio.gather(*(store.take(g, lease_s) for g in batch), return_exceptions=True)
        for gid, lease in zip(batch, got, strict=True):
            if isinstance(lease, Lease):
                leases[gid] = lease
            elif isinstance(lease, LeaseHeld):
                refused[gid] = LEASE_HELD
            elif isinstance(lease, StoreError):
                refused[gid] = "StoreError"
            else:  # a bug, or a cancel: nothing taken stays held past it
                await release_leases(leases.values())
                raise lease
    return leases, refused


async def release_leases(leases: Iterable[Lease]) -> None:
    """Drop every lease. Once a release fails (the store is unreachable) the rest just lapse."""
    held = list(leases)
    for lease in held:
        lease.stop_renewing()
    for lease in held:
        if not await lease.release():
            break


async def save_outcomes(
    store: SessionStore, merged: MergedRun, fences: Mapping[str, Fence] | None = None
) -> None:
    """Write every guest's outcome into ``store`` (a lost shard's guests too: they are ``cancelled``),
    fenced by the parent's lease of the guest when ``fences`` has one (a refused write is counted in
    ``metrics.store_writes_fenced``, a write the store cannot make in ``store_writes_lost``).

    A store that fails is a warning of the merged run, as in a one-process run: the report has them.
    """
    fences = fences or {}
    outcomes = [
        Outcome(
            g.guest_id,
            g.outcome if g.reason is None else f"{g.outcome}: {g.reason}",
            g.rejoins,
            fences.get(g.guest_id),
        )
        for g in merged.guests
        if g.application_session_id
    ]
    m = merged.metrics
    lo = 0
    try:
        for lo in range(0, len(outcomes), STORE_BATCH):
            batch = outcomes[lo : lo + STORE_BATCH]
            try:
                await store.record_outcomes(batch)
            except LeaseLost as exc:  # those guests are another instance's now: write the others
                m.store_writes_fenced += len(exc.guest_ids)
                refused = set(exc.guest_ids)
                await store.record_outcomes([o for o in batch if o.guest_id not in refused])
    except StoreError as exc:
        m.store_writes_lost += len(outcomes) - lo
        merged.warnings.append(f"the session store did not record the outcomes: {exc}")
    if m.store_writes_lost or m.store_writes_fenced:
        merged.warnings.append(
            f"session store: {m.store_writes_lost} writes lost, "
            f"{m.store_writes_fenced} refused by the lease fence"
        )


async def run_sharded(
    plan: LoadPlan,
    engine: ShardEngine,
    *,
    target: TargetSettings,
    store: SessionStore,
    shards: int,
    retry: RetryPolicy | None = None,
    rejoin: RejoinPolicy | None = None,
    meetings: int = 0,
    check_links: Callable[[Sequence[str]], None] | None = None,
    settings: dict[str, Any] | None = None,
    on_progress: Callable[[int, Snapshot], None] | None = None,
    on_state: StateCallback | None = None,
    lease_s: float | None = None,
    start_slack_s: float = START_SLACK_S,
) -> MergedRun:
    """Run ``plan`` in ``shards`` shards on ``engine`` and merge them (see the module's docstring).

    ``on_progress``/``on_state``: each shard's live snapshot / whole metrics state as it reports them
    (:class:`ShardProgress`, :class:`ShardStates`); ``on_state`` also gets each result's final state.
    ``lease_s``: hold every guest's lease in ``store`` for the run (see the module's docstring).
    """
    if shards < 1:
        raise ConfigurationError(f"shards must be >= 1, got {shards}")
    if plan.concurrency < shards:
        raise ConfigurationError(
            f"{shards} shards need a concurrency of at least {shards} (one join slot each), "
            f"got {plan.concurrency}"
        )
    plan = await prepare_plan(plan, target=target, retry=retry, meetings=meetings, check_links=check_links)
    ids = await assign_sessions(plan, store)
    ca_pem = _read_ca(target.ca_file)
    retry = retry if retry is not None else RetryPolicy()
    leases: dict[str, Lease] = {}
    refused: dict[str, str] = {}
    if lease_s is not None:
        leases, refused = await take_leases(
            store, [plan.guest_id(n) for n in range(1, plan.guests + 1)], lease_s
        )
    try:
        async with engine:
            start_at = time.time() + start_slack_s
            jobs = []
            for k in range(shards):
                part = dataclasses.replace(plan, shard=Shard(k, shards))
                numbers = part.shard.numbers(plan.guests)
                owned = tuple((plan.guest_id(n), ids[plan.guest_id(n)]) for n in numbers)
                held = tuple((gid, refused[gid]) for gid, _asi in owned if gid in refused)
                jobs.append(
                    ShardJob(part, start_at, target, ca_pem, retry, rejoin, owned, dict(settings or {}), held)
                )
            results = await engine.run(jobs, on_progress or (lambda _k, _s: None), on_state)
        if on_state is not None:  # the live view ends on the shards' final states
            for k, r in enumerate(results):
                if r is not None:
                    on_state(k, r.metrics)
        got = [r for r in results if r is not None]
        if not got:
            raise AnonJoinError(f"no shard of the run came back ({engine.lost_reason})")
        merged = merge_results(got, shards=shards, missing_reason=engine.lost_reason)
        for i, rec in enumerate(merged.guests):  # a lost shard's guests keep the ids the parent gave them
            if not rec.application_session_id and rec.guest_id in ids:
                merged.guests[i] = dataclasses.replace(rec, application_session_id=ids[rec.guest_id])
        await save_outcomes(store, merged, {g: lease.fence for g, lease in leases.items()})
    finally:
        await release_leases(leases.values())
    return merged


def check_sharded_options(
    *,
    workers: int,
    hooks: object,
    metrics: object,
    on_runner: object,
    start_at: float | None,
    plan: LoadPlan,
) -> None:
    """What :func:`~anonjoin.run_load` refuses with ``workers=``/``ray=``: what lives in one process."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigurationError(f"workers must be a whole number >= 1, got {workers!r}")
    refused = [
        name
        for name, value in (
            ("hooks", hooks),
            ("metrics", metrics),
            ("on_runner", on_runner),
            ("start_at", start_at),
        )
        if value is not None
    ]
    if refused:
        raise ConfigurationError(
            f"run_load with workers= or ray= takes no {', '.join(refused)}: the shards run in other "
            "processes, where a callback or a live Metrics of this one cannot reach (read the merged "
            "LoadResult.metrics at the end; for live metrics: run_sharded(..., on_state=...))"
        )
    if plan.shard.count > 1:
        raise ConfigurationError(
            "run_load with workers= or ray= shards the whole plan: give a plan without shard"
        )


def target_of(
    *,
    discover_url: str,
    endpoint_id: str,
    credential: object,
    ca_file: str | None,
    verify_tls: bool,
) -> TargetSettings:
    """The picklable target a shard in another process needs, from :func:`~anonjoin.run_load`'s arguments.

    Only a :class:`~anonjoin.ClientSecretCredential` can travel (a shard builds its own from the client id
    and secret); any other credential is a :class:`~anonjoin.ConfigurationError`.
    """
    from anonjoin._async.auth import ClientSecretCredential

    if not isinstance(credential, ClientSecretCredential):
        raise ConfigurationError(
            f"run_load with workers= or ray= needs a ClientSecretCredential (each shard process builds its "
            f"own from the client id and secret), not a {type(credential).__name__}: run it without "
            "workers/ray, or give a ClientSecretCredential"
        )
    if credential.ca_file is not None and credential.ca_file != ca_file:
        raise ConfigurationError(
            "run_load with workers= or ray= uses one CA file for the service and Azure AD: give the "
            "credential the same ca_file as run_load (or none)"
        )
    if credential.verify_tls != verify_tls:
        raise ConfigurationError(
            "run_load with workers= or ray= verifies TLS the same way for the service and Azure AD: give "
            "the credential the same verify_tls as run_load"
        )
    return TargetSettings.load(
        use_env=False,
        discover_url=discover_url,
        endpoint_id=endpoint_id,
        authority=credential.authority,
        client_id=credential.client_id,
        client_secret=credential._client_secret,
        scope=credential.scope,
        ca_file=ca_file,
        insecure=not verify_tls,
    )


async def run_load_sharded(
    plan: LoadPlan,
    *,
    target: TargetSettings,
    workers: int,
    ray: str | None,
    shards: int | None,
    retry: RetryPolicy | None,
    rejoin: RejoinPolicy | None,
    store: SessionStore | None,
    lease_s: float | None,
    meetings: int,
    check_links: Callable[[Sequence[str]], None] | None,
) -> LoadResult:
    """:func:`~anonjoin.run_load` with ``workers=N`` (N worker processes) or ``ray=ADDRESS`` (Ray actors):
    the plan in shards through :func:`run_sharded`, merged into one :class:`~anonjoin.LoadResult`."""
    from anonjoin._exceptions import redact

    engine: ShardEngine
    settings: dict[str, Any]
    if ray is not None:
        from anonjoin._load.ray import RayEngine

        if workers > 1:
            raise ConfigurationError("ray= and workers= are two ways to run the shards: give one")
        ray_engine = RayEngine(ray, shards=shards)
        ray_engine.connect()
        count = (
            shards
            if shards is not None
            else max(1, min(ray_engine.cluster_cpus, plan.guests, plan.concurrency))
        )
        ray_engine.shards = count
        engine, settings = ray_engine, {"ray": redact(ray)}
    else:
        from anonjoin._load.workers import ProcessEngine

        if shards is not None:
            raise ConfigurationError("shards= applies to ray= (worker processes: one shard each, workers=N)")
        engine, count, settings = ProcessEngine(workers), workers, {"workers": workers}
    try:
        merged = await run_sharded(
            plan,
            engine,
            target=target,
            store=store if store is not None else MemorySessionStore(),
            shards=count,
            retry=retry,
            rejoin=rejoin,
            meetings=meetings,
            check_links=check_links,
            settings=settings,
            lease_s=lease_s,
        )
    finally:
        getattr(engine, "disconnect", lambda: None)()
    return LoadResult(merged.guests, merged.metrics, merged.started_at, merged.interrupted, merged.warnings)
