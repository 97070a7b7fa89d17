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

A shard never re-runs: a re-run would be new guests joining under old ids. What an engine loses it
reports.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from anonjoin._async.retry import RejoinPolicy, RetryPolicy
from anonjoin._async.settings import TargetSettings
from anonjoin._exceptions import AnonJoinError, ConfigurationError, StoreError
from anonjoin._load.metrics import Metrics, earliest_phase
from anonjoin._load.metrics import Progress as Snapshot
from anonjoin._load.runner import STORE_BATCH, LoadPlan, LoadRunner, Shard, pool_size, run_load
from anonjoin._load.shards import MergedRun, ShardResult, merge_results
from anonjoin._load.store import MemorySessionStore, NewSession, Outcome, SessionStore

__all__ = [
    "START_SLACK_S",
    "InProcessEngine",
    "ShardEngine",
    "ShardJob",
    "ShardProgress",
    "assign_sessions",
    "prepare_plan",
    "run_shard_job",
    "run_sharded",
    "save_outcomes",
]

START_SLACK_S = 1.0
"""Seconds between the moment every shard is ready and the common ``start_at``."""


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
    store = MemorySessionStore()
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
                metrics=metrics,
                on_runner=on_runner,
                start_at=job.start_at,
            )
        finally:
            await credential.aclose()
    return ShardResult.of(
        result, plan, start_at=job.start_at, settings={**job.settings, "shard": str(plan.shard)}
    )


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
        self, jobs: Sequence[ShardJob], on_progress: Callable[[int, Snapshot], None]
    ) -> list[ShardResult | None]:
        """Run every job (one per shard, in shard order); ``None`` for a shard that was lost.
        ``on_progress(shard_index, snapshot)`` as the shards report their live counters."""
        ...

    def cancel(self) -> None:
        """Stop every shard: no more arrivals, joined guests leave, the results still come back."""
        ...


class InProcessEngine:
    """Every shard as a task of this event loop: the engine with no processes (for tests and embedders
    who want the shard algebra without a second core)."""

    lost_reason = "shard failed"

    def __init__(self, *, progress_interval_s: float = 0.25) -> None:
        self._runners: list[LoadRunner] = []
        self._cancelled = False
        self._interval = progress_interval_s

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
        self, jobs: Sequence[ShardJob], on_progress: Callable[[int, Snapshot], None]
    ) -> list[ShardResult | None]:
        import asyncio

        metrics = [Metrics(guests=job.plan.shard_guests) for job in jobs]
        tasks = [
            asyncio.ensure_future(run_shard_job(job, metrics=m, on_runner=self._on_runner))
            for job, m in zip(jobs, metrics, strict=True)
        ]
        pending = set(tasks)
        while pending:
            _done, pending = await asyncio.wait(pending, timeout=self._interval)
            for k, m in enumerate(metrics):
                on_progress(k, m.progress())
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
            if check_links is not None:
                caps = await client._service.capabilities()
                links = (caps.application_url, caps.anon_tokens_url, caps.adhoc_meetings_url)
                check_links([str(u) for u in links if u is not None])
            urls = list(plan.meeting_urls)
            for i in range(len(urls), meetings):
                made = await client.create_meeting(subject=f"anonjoin load meeting {i + 1}")
                urls.append(made.join_url)
    finally:
        await credential.aclose()
    return dataclasses.replace(plan, meeting_urls=tuple(urls))


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


async def save_outcomes(store: SessionStore, merged: MergedRun) -> None:
    """Write every guest's outcome into ``store`` (a lost shard's guests too: they are ``cancelled``).

    A store that fails is a warning of the merged run, as in a one-process run: the report has them.
    """
    outcomes = [
        Outcome(g.guest_id, g.outcome if g.reason is None else f"{g.outcome}: {g.reason}", g.rejoins, None)
        for g in merged.guests
        if g.application_session_id
    ]
    try:
        for lo in range(0, len(outcomes), STORE_BATCH):
            await store.record_outcomes(outcomes[lo : lo + STORE_BATCH])
    except StoreError as exc:
        merged.metrics.store_writes_lost += len(outcomes)
        merged.warnings.append(f"the session store did not record the outcomes: {exc}")


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
    start_slack_s: float = START_SLACK_S,
) -> MergedRun:
    """Run ``plan`` in ``shards`` shards on ``engine`` and merge them (see the module's docstring)."""
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
    async with engine:
        start_at = time.time() + start_slack_s
        jobs = []
        for k in range(shards):
            part = dataclasses.replace(plan, shard=Shard(k, shards))
            owned = tuple((plan.guest_id(n), ids[plan.guest_id(n)]) for n in part.shard.numbers(plan.guests))
            jobs.append(ShardJob(part, start_at, target, ca_pem, retry, rejoin, owned, dict(settings or {})))
        results = await engine.run(jobs, on_progress or (lambda _k, _s: None))
    got = [r for r in results if r is not None]
    if not got:
        raise AnonJoinError(f"no shard of the run came back ({engine.lost_reason})")
    merged = merge_results(got, shards=shards, missing_reason=engine.lost_reason)
    for i, rec in enumerate(merged.guests):  # a lost shard's guests keep the ids the parent gave them
        if not rec.application_session_id and rec.guest_id in ids:
            merged.guests[i] = dataclasses.replace(rec, application_session_id=ids[rec.guest_id])
    await save_outcomes(store, merged)
    return merged
