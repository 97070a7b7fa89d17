"""The load runner: many guests through one :class:`anonjoin.Client`, on a schedule, held, then left.

How a run goes:

1. Every guest gets its id (``{prefix}{n}``) and its applicationSessionId from the session store first, in
   one batch (a known guest keeps its id: protocol.md §7), and a meeting (round robin over ``meeting_urls``).
2. Arrivals: with no schedule, a guest arrives whenever a join slot is free (a closed model: as fast as
   ``concurrency`` allows). With a schedule (:class:`ConstantRate`, :class:`LinearRamp`, :class:`Steps`,
   :class:`RateFunction`), guests arrive on time and wait for a slot if all are busy (an open model: the
   wait counts in the join latency, so a slow service cannot hide behind slow arrivals).
3. A slot (a semaphore of ``concurrency``) is held from the guest's first request until it is joined or
   has failed; then the guest stays ``hold_s`` seconds with its poll parked (the client keeps it alive and
   rejoins it per its :class:`anonjoin.RejoinPolicy`; the runner only counts), then leaves.
4. :meth:`LoadRunner.cancel` (the CLI calls it on Ctrl-C / SIGTERM) stops arrivals, gives the joins in
   flight ``STOP_GRACE_S`` to finish and then cancels them (the client deletes what they created), makes
   every held guest leave now, and returns normally with ``interrupted=True``: guests that never arrived
   or were cut off mid-join are ``cancelled``.

Every guest ends in exactly one :class:`~anonjoin._load.report.GuestRecord`: ``joined`` (joined, and never
failed for good), ``failed`` with the client's final reason, ``ended`` (its meeting ended: not a failure of
the client), or ``cancelled``. The outcomes are written back to the store in one batch at the end.

With ``lease_s`` (the CLI sets it for a file or Redis store), each guest is claimed in the store
(:meth:`~anonjoin.SessionStore.claim`) before it joins and kept claimed until its outcome is written (fenced
by the lease): a guest another instance holds fails with ``LeaseHeld``; a guest whose lease is lost leaves
and fails with ``LeaseLost``. Outcome writes the store cannot make are counted (``metrics.store_writes_*``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from anonjoin._async.client import Client
from anonjoin._async.guest import Guest
from anonjoin._async.retry import RejoinPolicy, RetryPolicy
from anonjoin._async.service import CredentialLike
from anonjoin._core.events import GuestEvent, Hooks
from anonjoin._core.protocol import TERMINAL, GuestState, ended_not_failed
from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    ConfigurationError,
    JoinFailed,
    LeaseHeld,
    LeaseLost,
    ProtocolError,
    ServiceError,
    StoreError,
    TransportError,
)
from anonjoin._load.metrics import Metrics
from anonjoin._load.report import GuestRecord
from anonjoin._load.store import Lease, MemorySessionStore, NewSession, Outcome, SessionStore

__all__ = [
    "ArrivalSchedule",
    "ConstantRate",
    "LinearRamp",
    "LoadPlan",
    "LoadResult",
    "LoadRunner",
    "RateFunction",
    "Shard",
    "Steps",
    "check_against_service",
    "conference_of",
    "failure_reason",
    "guest_id_of",
    "parse_ramp",
    "pool_size",
    "prepare_plan_with",
    "run_load",
]

STORE_BATCH = 1000
LEAVE_SLACK_S = 10.0
ENDED_BEFORE_JOIN = "DestinationNotFound (meeting ended)"
STOP_GRACE_S = 5.0
"""After a stop, a join in flight gets this long to finish before it is cancelled; at the end of a hold, a
rejoin in flight gets this long to settle before the guest leaves."""
MAX_SCHEDULE_S = 7 * 24 * 3600.0


# -- arrival schedules -----------------------------------------------------------------------------


class ArrivalSchedule(Protocol):
    """When guests arrive: ``times(n)`` yields ``n`` non-decreasing offsets (seconds from the start)."""

    def times(self, n: int) -> Iterator[float]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ConstantRate:
    """``rate`` guests per second."""

    rate: float

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigurationError(f"the arrival rate must be a positive number, got {self.rate!r}")

    def times(self, n: int) -> Iterator[float]:
        return (i / self.rate for i in range(n))


@dataclasses.dataclass(frozen=True, slots=True)
class LinearRamp:
    """From ``start`` to ``end`` guests per second over ``over_s`` seconds, then ``end``."""

    start: float
    end: float
    over_s: float

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= 0 or self.over_s <= 0:
            raise ConfigurationError("a ramp needs start >= 0, end > 0 and a duration > 0")

    def times(self, n: int) -> Iterator[float]:
        a, b, t_end = self.start, self.end, self.over_s
        slope = (b - a) / t_end
        ramp_count = (a + b) / 2 * t_end  # guests that arrive during the ramp
        for i in range(n):
            if i < ramp_count:
                # Solve a*t + slope*t^2/2 = i for t in [0, t_end].
                if abs(slope) < 1e-12:
                    yield i / a
                else:
                    disc = a * a + 2 * slope * i
                    yield (-a + math.sqrt(max(disc, 0.0))) / slope
            else:
                yield t_end + (i - ramp_count) / b


@dataclasses.dataclass(frozen=True, slots=True)
class Steps:
    """Piecewise constant: ``[(rate, duration_s), ...]``; the last rate holds on after its duration."""

    steps: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigurationError("a step schedule needs at least one step")
        if any(r < 0 or d <= 0 for r, d in self.steps) or self.steps[-1][0] <= 0:
            raise ConfigurationError("step rates must be >= 0 (the last > 0) and durations > 0")

    def times(self, n: int) -> Iterator[float]:
        emitted = 0
        t0 = 0.0
        expected = 0.0  # arrivals the schedule owes by the start of the current step
        for k, (rate, dur) in enumerate(self.steps):
            last = k == len(self.steps) - 1
            while emitted < n and rate > 0:
                offset = max((emitted - expected) / rate, 0.0)
                if not last and offset >= dur:
                    break
                yield t0 + offset
                emitted += 1
            if emitted >= n:
                return
            expected += rate * dur
            t0 += dur


@dataclasses.dataclass(frozen=True, slots=True)
class RateFunction:
    """A user function of time: ``rate(t)`` guests per second at ``t`` seconds from the start."""

    rate: Callable[[float], float]
    resolution_s: float = 0.01

    def times(self, n: int) -> Iterator[float]:
        t = 0.0
        total = 0.0
        emitted = 0
        dt = self.resolution_s
        while emitted < n:
            if t > MAX_SCHEDULE_S:
                raise ConfigurationError("the arrival rate function gave too few guests in a week")
            r = self.rate(t)
            if not (r >= 0 and math.isfinite(r)):
                raise ConfigurationError(f"the arrival rate function returned {r!r} at t={t:g}s")
            nxt = total + r * dt
            while emitted < n and nxt > emitted - 1e-12 and r > 0:
                # Linear interpolation within the slice.
                yield t + max(emitted - total, 0.0) / r
                emitted += 1
            total = nxt
            t += dt


def parse_ramp(spec: str) -> ArrivalSchedule:
    """``A..B/T`` (linear from A to B guests/s over T seconds) or ``R1:T1,R2:T2,...,Rn`` (steps).

    Durations are seconds, or take an ``s``, ``m`` or ``h`` suffix. Examples: ``10..200/30s``;
    ``10..20/2m``; ``20:10s,50:10s,100``.
    """
    text = spec.strip().replace(" ", "")
    try:
        if ".." in text:
            rates, _, over = text.partition("/")
            lo, _, hi = rates.partition("..")
            if not over:
                raise ValueError("missing /DURATION")
            return LinearRamp(float(lo), float(hi), _seconds(over))
        parts = [p for p in text.split(",") if p]
        if not parts:
            raise ValueError("empty")
        steps: list[tuple[float, float]] = []
        for i, part in enumerate(parts):
            rate, _, dur = part.partition(":")
            if not dur:
                if i != len(parts) - 1:
                    raise ValueError(f"step {part!r} needs a duration (RATE:SECONDS)")
                steps.append((float(rate), 1.0))
            else:
                steps.append((float(rate), _seconds(dur)))
        return Steps(tuple(steps))
    except ConfigurationError as exc:
        raise ConfigurationError(f"--ramp {spec!r}: {exc}") from None
    except ValueError as exc:
        raise ConfigurationError(
            f"--ramp {spec!r}: {exc} "
            "(write A..B/SECONDS for a linear ramp, or RATE:SECONDS,...,RATE for steps)"
        ) from None


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(text: str) -> float:
    """``30``, ``30s``, ``2m``, ``1.5h`` in seconds; a bad or non-positive duration is a ``ValueError``."""
    unit = text[-1:].lower()
    scale = _DURATION_UNITS.get(unit)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1.0)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"duration {text!r} must be a number > 0, in seconds or with s, m or h")
    return value


# -- the plan and the result -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count``: the guests ``n`` (numbered from 1) with ``(n - 1) % count == index``.

    The shards of one plan are disjoint and together hold every guest; each guest keeps its global id,
    meeting and arrival time, so the shards of a plan run together are the plan run in one process.
    """

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigurationError(
                f"shard {self.index}/{self.count}: need a count >= 1 and 0 <= index < count"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/S`` (K from 0): ``0/4`` is the first of four shards."""
        k, sep, n = text.strip().partition("/")
        try:
            if not sep:
                raise ValueError
            index, count = int(k), int(n)
        except ValueError:
            raise ConfigurationError(
                f"--shard {text!r}: write K/S, the shard's index from 0 and the number of shards (0/2, 1/2)"
            ) from None
        if count < 1 or not 0 <= index < count:
            raise ConfigurationError(
                f"--shard {text!r}: need S >= 1 and 0 <= K < S (here 0/{n} to {count - 1}/{n})"
            )
        return cls(index, count)

    def owns(self, n: int) -> bool:
        return (n - 1) % self.count == self.index

    def numbers(self, guests: int) -> range:
        """The guest numbers (from 1) this shard owns, in order."""
        return range(self.index + 1, guests + 1, self.count)

    def concurrency(self, total: int) -> int:
        """This shard's part of ``total`` join slots: floor or ceil of total/count, summing to ``total``."""
        base, extra = divmod(total, self.count)
        return base + (1 if self.index < extra else 0)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """What to run. ``display_name`` may contain ``{n}`` (the guest's number, from 1)."""

    guests: int
    meeting_urls: Sequence[str]
    origin: str
    concurrency: int = 50
    schedule: ArrivalSchedule | None = None
    hold_s: float = 0.0
    display_name: str = "anonjoin guest {n}"
    guest_prefix: str = "guest-"
    lobby_timeout_s: float | None = None
    shard: Shard = Shard()
    """The slice of the plan this runner runs; ``guests`` and ``concurrency`` stay the whole plan's."""

    def __post_init__(self) -> None:
        if self.guests < 0:
            raise ConfigurationError("guests must be >= 0")
        if self.concurrency < 1:
            raise ConfigurationError("concurrency must be >= 1")
        if self.concurrency < self.shard.count:
            raise ConfigurationError(
                f"{self.shard.count} shards need a concurrency of at least {self.shard.count} "
                f"(one join slot each), got {self.concurrency}"
            )
        if not self.meeting_urls:
            raise ConfigurationError("at least one meeting URL is needed")
        if self.hold_s < 0 or not math.isfinite(self.hold_s):
            raise ConfigurationError("hold must be a finite number of seconds >= 0")

    def guest_id(self, n: int) -> str:
        return guest_id_of(self.guest_prefix, self.guests, n)

    def name(self, n: int) -> str:
        return self.display_name.replace("{n}", str(n))

    @property
    def shard_guests(self) -> int:
        """How many guests this plan's shard owns."""
        return len(self.shard.numbers(self.guests))

    @property
    def shard_concurrency(self) -> int:
        """This shard's join slots (the whole concurrency for an unsharded plan)."""
        return self.shard.concurrency(self.concurrency)


@dataclasses.dataclass
class LoadResult:
    """How a run ended: one record per guest (in guest order), the metrics, and whether it was cut short."""

    guests: list[GuestRecord]
    metrics: Metrics
    started_at: float
    interrupted: bool
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Problems that did not stop the run (the store could not record the outcomes, for example)."""


def guest_id_of(prefix: str, guests: int, n: int) -> str:
    """Guest ``n``'s id in a plan of ``guests`` guests: ``guest-0001`` (zero-padded to at least 4 digits)."""
    width = max(4, len(str(guests)))
    return f"{prefix}{n:0{width}d}"


def pool_size(concurrency: int) -> int:
    """Connections for a run: one per join in flight, plus room for leaves and rejoins."""
    return max(concurrency + max(concurrency // 4, 8), 16)


# -- the runner ------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Slot:
    guest_id: str
    asi: str
    meeting_url: str
    n: int
    record: GuestRecord | None = None
    lease: Lease | None = None
    arrived_at: float | None = None
    joined_at: float | None = None
    lobby_s: float = 0.0


class _JoinSlots:
    """``concurrency`` join slots: a semaphore whose waiters a stop releases (``acquire`` is then False).

    One future per waiting guest and nothing else: no task and no ``asyncio.wait`` per arrival, which in
    the closed model (every arrival waits for a slot) would be paid by every guest.
    """

    __slots__ = ("_free", "_stopped", "_waiters")

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: collections.deque[asyncio.Future[bool]] = collections.deque()
        self._stopped = False

    async def acquire(self) -> bool:
        """Take a slot (True), or False once stopped (also for a guest waiting when the stop comes)."""
        if self._stopped:
            return False
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # it was handed a slot while being cancelled: pass it on
            raise

    def release(self) -> None:
        """Give a slot back: to the first guest still waiting for one, else to the pool."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                return
        self._free += 1

    def stop(self) -> None:
        self._stopped = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(False)


class LoadRunner:
    """Runs ``plan`` through ``client``. Give the client ``hooks=metrics.hooks()`` for step metrics."""

    def __init__(
        self,
        client: Client,
        plan: LoadPlan,
        *,
        metrics: Metrics | None = None,
        store: SessionStore | None = None,
        lease_s: float | None = None,
        start_at: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.start_at = start_at
        """Wall-clock time (Unix seconds) of the first arrival: the common start of a sharded run."""
        self._wall = wall_clock
        self.plan = plan
        self.metrics = metrics if metrics is not None else Metrics(guests=plan.shard_guests)
        self.metrics.guests = plan.shard_guests
        self.store: SessionStore = store if store is not None else MemorySessionStore()
        self.lease_s = lease_s
        self._clock = clock
        self._stop: asyncio.Future[None] | None = None
        self._interrupted = False
        self._slots: list[_Slot] = []
        self._join_slots: _JoinSlots | None = None
        self._joining: set[asyncio.Task[Any]] = set()  # guests' tasks awaiting their first join
        self._cut: set[asyncio.Task[Any]] = set()  # of those, the ones a stop cancelled after the grace
        self._cut_timer: asyncio.TimerHandle | None = None
        self._settling: dict[str, asyncio.Future[None]] = {}
        self._ended_meetings: set[str] = set()
        self.metrics.guest_listener = self._on_guest_event

    def _on_guest_event(self, ev: GuestEvent) -> None:
        if ev.kind in ("joined", "rejoined", "failed", "ended", "left"):
            waiter = self._settling.pop(ev.guest_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def cancel(self) -> None:
        """Stop the run: no more arrivals, joins in flight cancelled, held guests leave now. Idempotent."""
        self._interrupted = True
        self.metrics.stopping = True
        if self._join_slots is not None:
            self._join_slots.stop()
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)
            # Joins in flight get STOP_GRACE_S to finish (a request may be creating the guest's application),
            # then they are cancelled, which makes the client delete what they created.
            self._cut_timer = asyncio.get_running_loop().call_later(STOP_GRACE_S, self._cut_joins)

    def _cut_joins(self) -> None:
        for task in list(self._joining):
            if not task.done():
                self._cut.add(task)
                task.cancel()

    @property
    def cancelled(self) -> bool:
        return self._interrupted

    async def run(self) -> LoadResult:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        if self._interrupted:
            self._stop.set_result(None)
        started_at = self.start_at if self.start_at is not None else time.time()
        plan = self.plan
        late_before: int = getattr(self.store, "writes_late", 0)
        self._slots = await self._assign()
        slots = self._join_slots = _JoinSlots(plan.shard_concurrency)
        if self._interrupted:
            slots.stop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            await self._arrivals(slots, tasks)
            while tasks:
                await asyncio.wait(set(tasks))
        finally:
            if self._cut_timer is not None:
                self._cut_timer.cancel()
            # Only reached early by our own cancellation (or a bug): leave no task behind.
            if tasks:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for slot in self._slots:  # no renewal outlives the run; the leases lapse on their own
                    if slot.lease is not None:
                        slot.lease.stop_renewing()
        for slot in self._slots:
            if slot.record is None:
                self._final(slot, "cancelled", "not started", 0)
        self._settle_ended_meetings()
        records = [s.record for s in self._slots if s.record is not None]
        self.metrics.finish()
        warnings: list[str] = []
        try:
            await self._save_outcomes(records)
        except StoreError as exc:
            # The ids were saved before the run; only the outcomes are missing. The report still has them.
            warnings.append(f"the session store did not record the outcomes: {exc}")
        finally:
            await self._release_leases()
        m = self.metrics
        m.store_writes_late += getattr(self.store, "writes_late", 0) - late_before
        if m.store_writes_late or m.store_writes_lost or m.store_writes_fenced:
            warnings.append(
                f"session store: {m.store_writes_late} writes late (retried until the store answered), "
                f"{m.store_writes_lost} lost, {m.store_writes_fenced} refused by the lease fence"
            )
        return LoadResult(records, self.metrics, started_at, self._interrupted, warnings)

    def _settle_ended_meetings(self) -> None:
        """A join refused with DestinationNotFound by a meeting that ended during the run is "ended" too.

        :meth:`_final` does this as it goes once a meeting is known to have ended; this pass catches the
        guests refused before any guest of that meeting reported ``Ended``.
        """
        ended = {s.meeting_url for s in self._slots if s.record is not None and s.record.outcome == "ended"}
        for slot in self._slots:
            rec = slot.record
            if (
                rec is not None
                and rec.outcome == "failed"
                and ended_not_failed(rec.reason, meeting_ended=slot.meeting_url in ended)
            ):
                slot.record = dataclasses.replace(rec, outcome="ended", reason=ENDED_BEFORE_JOIN)
                self.metrics.outcomes["failed"] -= 1
                self.metrics.outcomes["ended"] += 1

    async def _assign(self) -> list[_Slot]:
        plan = self.plan
        urls = list(plan.meeting_urls)
        numbers = plan.shard.numbers(plan.guests)
        slots: list[_Slot] = []
        for lo in range(0, len(numbers), STORE_BATCH):
            chunk = numbers[lo : lo + STORE_BATCH]
            batch = [
                NewSession(plan.guest_id(n), urls[(n - 1) % len(urls)], plan.origin, plan.name(n))
                for n in chunk
            ]
            for n, new, rec in zip(chunk, batch, await self.store.get_or_create_many(batch), strict=True):
                slots.append(_Slot(rec.guest_id, rec.application_session_id, new.meeting_url, n))
        return slots

    async def _save_outcomes(self, records: Sequence[GuestRecord]) -> None:
        fences = {s.guest_id: s.lease.fence for s in self._slots if s.lease is not None}
        outcomes = [
            Outcome(
                r.guest_id,
                r.outcome if r.reason is None else f"{r.outcome}: {r.reason}",
                r.rejoins,
                fences.get(r.guest_id),
            )
            for r in records
        ]
        m = self.metrics
        for lo in range(0, len(outcomes), STORE_BATCH):
            batch = outcomes[lo : lo + STORE_BATCH]
            try:
                try:
                    await self.store.record_outcomes(batch)
                except LeaseLost as exc:  # those guests are another instance's now: write the others
                    m.store_writes_fenced += len(exc.guest_ids)
                    refused = set(exc.guest_ids)
                    await self.store.record_outcomes([o for o in batch if o.guest_id not in refused])
            except StoreError:
                m.store_writes_lost += len(outcomes) - lo
                raise

    async def _release_leases(self) -> None:
        """Drop every lease. Once a release fails (the store is unreachable) the rest just lapse."""
        leases = [s.lease for s in self._slots if s.lease is not None]
        for lease in leases:
            lease.stop_renewing()
        for lease in leases:
            if not await lease.release():
                break

    # -- arrivals ----------------------------------------------------------------------------------

    async def _wait_stop(self, delay: float) -> bool:
        """Wait up to ``delay`` seconds for a stop; True if stopped."""
        assert self._stop is not None
        if self._stop.done():
            return True
        if delay <= 0:
            return False
        await asyncio.wait({self._stop}, timeout=delay)
        return self._stop.done()

    async def _arrivals(self, slots: _JoinSlots, tasks: set[asyncio.Task[None]]) -> None:
        plan = self.plan
        t0 = self._clock()
        if self.start_at is not None:
            # The shards of a run share one wall-clock start: map it onto this process's clock.
            t0 += self.start_at - self._wall()
            self.metrics.start(t0)
            if await self._wait_stop(t0 - self._clock()):
                return
        else:
            self.metrics.start(t0)
        times: Iterator[float] | None = None
        if plan.schedule:
            shard = plan.shard
            every = plan.schedule.times(plan.guests)  # the one global schedule; this shard takes its guests'
            times = (t for n, t in enumerate(every, 1) if shard.owns(n)) if shard.count > 1 else every
        for slot in self._slots:
            if times is None:
                if not await slots.acquire():
                    return
                arrived = self._clock()
                held = True
            else:
                due = t0 + next(times)
                if await self._wait_stop(due - self._clock()):
                    return
                arrived = self._clock()
                held = False
            self.metrics.guest_arrived()
            task = asyncio.create_task(
                self._guest(slot, slots, arrived, held), name=f"anonjoin-load-{slot.n}"
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    # -- one guest ---------------------------------------------------------------------------------

    async def _guest(self, slot: _Slot, slots: _JoinSlots, arrived: float, held: bool) -> None:
        m = self.metrics
        slot.arrived_at = arrived
        if not held and not await slots.acquire():
            self._final(slot, "cancelled", "not started", 0)
            return
        try:
            m.guest_started(self._clock() - arrived)
            if self.lease_s is not None and not await self._claim(slot):
                return
            try:
                guest = self.client.guest(
                    meeting_url=slot.meeting_url,
                    origin=self.plan.origin,
                    display_name=self.plan.name(slot.n),
                    guest_id=slot.guest_id,
                    application_session_id=slot.asi,
                    lobby_timeout_s=self.plan.lobby_timeout_s,
                )
            except ConfigurationError as exc:
                m.guest_join_failed(slot.guest_id)
                self._final(slot, "failed", f"ConfigurationError: {exc}", 0)
                return
            joined = await self._join(slot, guest, arrived)
        finally:
            slots.release()
        if joined:
            await self._hold(slot, guest)

    async def _claim(self, slot: _Slot) -> bool:
        """Claim the guest's lease (kept until its outcome is written); False (and the outcome) if refused."""
        assert self.lease_s is not None
        try:
            slot.lease = await self.store.take(slot.guest_id, self.lease_s)
        except StoreError as exc:
            self.metrics.guest_join_failed(slot.guest_id)
            reason = (
                "LeaseHeld: another instance holds the guest" if isinstance(exc, LeaseHeld) else "StoreError"
            )
            self._final(slot, "failed", reason, 0)
            return False
        return True

    async def _join(self, slot: _Slot, guest: Guest, arrived: float) -> bool:
        """The first join; True if joined. Records the outcome otherwise.

        Awaited in the guest's own task (no task or wait of its own): a stop reaches it through
        :meth:`_cut_joins`, which cancels it once the grace after the stop has run out.
        """
        m = self.metrics
        task = asyncio.current_task()
        assert task is not None
        self._joining.add(task)
        try:
            result = await guest.join()
        except asyncio.CancelledError:
            if task not in self._cut:
                raise
            self._cut.discard(task)
            task.uncancel()  # our own cut, not a cancellation of the run
            m.guest_join_failed(slot.guest_id, cancelled=True)
            self._final(slot, "cancelled", "interrupted while joining", guest.rejoins)
            await self._leave(guest)  # cancelling the join cleaned up; this only tidies a join that won
            return False
        except Exception as exc:
            m.guest_join_failed(slot.guest_id)
            outcome = guest.outcome
            if outcome is not None and outcome.kind == "ended":
                self._final(slot, "ended", outcome.reason or "Ended", guest.rejoins)
            else:
                self._final(
                    slot, "failed", failure_reason(exc, outcome.reason if outcome else None), guest.rejoins
                )
            if not isinstance(exc, AnonJoinError):  # pragma: no cover - a bug in the client; keep it visible
                raise
            await self._leave(guest)  # nothing to do for a closed guest; tidy if it is not
            return False
        finally:
            self._joining.discard(task)
        slot.joined_at, slot.lobby_s = self._clock(), result.lobby_s
        m.guest_joined(slot.guest_id, slot.joined_at - arrived, result.lobby_s)
        return True

    async def _hold(self, slot: _Slot, guest: Guest) -> None:
        assert self._stop is not None
        outcome = guest.outcome  # set once the guest has closed
        lost: asyncio.Future[Any] | None = None
        if outcome is None and self.plan.hold_s > 0 and not self._stop.done():
            closed = asyncio.ensure_future(guest.wait_closed())
            waits: set[asyncio.Future[Any]] = {closed, self._stop}
            if slot.lease is not None:
                lost = asyncio.ensure_future(slot.lease.lost.wait())
                waits.add(lost)
            await asyncio.wait(waits, timeout=self.plan.hold_s, return_when=asyncio.FIRST_COMPLETED)
            if closed.done():
                outcome = closed.result()
            else:
                closed.cancel()
                await asyncio.gather(closed, return_exceptions=True)
            if lost is not None and not lost.done():
                lost.cancel()
                await asyncio.gather(lost, return_exceptions=True)
        if outcome is None and slot.lease is not None and slot.lease.lost.is_set():
            # Another instance may hold the guest now: it must not stay joined twice.
            await self._leave(guest)
            self._final(slot, "failed", "LeaseLost: another instance took the guest", guest.rejoins)
            return
        if outcome is not None:
            if outcome.kind == "left":
                # Left on its own (another poll took over, for example): it was joined and nothing failed.
                self._final(slot, "joined", None, outcome.rejoins)
            elif outcome.kind == "ended":
                self._final(slot, "ended", outcome.reason or "Ended", outcome.rejoins)
            else:
                reason = failure_reason(outcome.error, outcome.reason) if outcome.error else outcome.reason
                self._final(slot, "failed", reason or "unknown", outcome.rejoins)
            return
        if guest.state is not GuestState.JOINED and guest.state not in TERMINAL:
            # Mid-rejoin: a request in flight may be creating the new application. Let the rejoin settle
            # (bounded) so that leaving deletes the application the service really holds.
            waiter = asyncio.get_running_loop().create_future()
            self._settling[slot.guest_id] = waiter
            await asyncio.wait({waiter}, timeout=STOP_GRACE_S)
            self._settling.pop(slot.guest_id, None)
        await self._leave(guest)
        final = guest.outcome
        if final is not None and final.kind == "failed":
            # It failed for good in the same instant the hold ended.
            self._final(slot, "failed", failure_reason(final.error, final.reason), final.rejoins)
        elif final is not None and final.kind == "ended":
            self._final(slot, "ended", final.reason or "Ended", final.rejoins)
        else:
            self._final(slot, "joined", None, guest.rejoins)

    async def _leave(self, guest: Guest) -> None:
        try:
            # the guest bounds its own leave; this only guards against a bug in that bound
            async with asyncio.timeout(self.client.retry.leave_deadline_s + LEAVE_SLACK_S):
                await guest.leave()
        except (AnonJoinError, TimeoutError):
            self.metrics.leave_errors += 1

    def _final(self, slot: _Slot, outcome: Any, reason: str | None, rejoins: int) -> None:
        if slot.record is not None:  # pragma: no cover - defensive: one outcome per guest
            return
        if outcome == "ended":
            self._ended_meetings.add(slot.meeting_url)
        elif outcome == "failed" and ended_not_failed(
            reason, meeting_ended=slot.meeting_url in self._ended_meetings
        ):
            outcome, reason = "ended", ENDED_BEFORE_JOIN
        slot.record = GuestRecord(
            slot.guest_id,
            slot.asi,
            outcome,
            reason,
            rejoins,
            conference_of(slot.meeting_url),
            **self._timings(slot),
        )
        self.metrics.guest_final(slot.guest_id, outcome, reason)

    def _timings(self, slot: _Slot) -> dict[str, float | None]:
        """The guest's arrival and join, seconds from the start of the run (and its join and lobby, ms)."""
        t0 = self.metrics.t0
        arrived, joined = slot.arrived_at, slot.joined_at
        out: dict[str, float | None] = {
            "arrived_at_s": None if arrived is None else round(arrived - t0, 3),
            "joined_at_s": None,
            "join_ms": None,
            "lobby_ms": None,
        }
        if arrived is not None and joined is not None:
            out["joined_at_s"] = round(joined - t0, 3)
            out["join_ms"] = round(max(joined - arrived - slot.lobby_s, 0.0) * 1000.0, 3)
            out["lobby_ms"] = round(slot.lobby_s * 1000.0, 3)
        return out


def check_against_service(records: Sequence[GuestRecord], snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """What the simulator's own record says about a run (its admin state, not the client's belief).

    ``ok`` is True when the service saw only the run's applicationSessionIds, never more applications for
    a guest than its joins and rejoins can explain (so every rejoin reused the guest's id), never a guest
    twice in a roster, and no live application at the end.
    """
    apps = snapshot.get("applications", {})
    created: Mapping[str, int] = apps.get("created_by_asi", {})
    ours = {r.application_session_id: r for r in records}
    unknown = sorted(asi for asi in created if asi not in ours)
    duplicates = 0
    for meeting in snapshot.get("meetings", {}).values():
        for key in ("roster", "lobby"):
            names = list(meeting.get(key, ()))
            duplicates += len(names) - len(set(names))
    rejoined = [r for r in records if r.rejoins]
    same_id = sum(1 for r in rejoined if created.get(r.application_session_id, 0) >= r.rejoins + 1)
    live = int(apps.get("live", 0))
    return {
        "ok": not unknown and not duplicates and live == 0 and same_id == len(rejoined),
        "application_session_ids_seen": len(created),
        "unknown_application_session_ids": len(unknown),
        "applications_created": int(apps.get("created", 0)),
        "max_applications_per_guest": max(created.values(), default=0),
        "rejoined_guests": len(rejoined),
        "rejoined_guests_with_the_same_id": same_id,
        "duplicate_roster_entries": duplicates,
        "live_applications_at_end": live,
        "faults_injected": snapshot.get("faults_injected", {}),
    }


def conference_of(meeting_url: str) -> str:
    """The conference id of a meeting join URL: its last path segment (protocol.md §5)."""
    path = meeting_url.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    return path.rsplit("/", 1)[-1] or meeting_url


def failure_reason(exc: BaseException | None, reason: str | None = None) -> str:
    """A short, stable reason for a guest that failed: groups well in the report."""
    if isinstance(exc, JoinFailed):
        return exc.reason
    if isinstance(exc, ServiceError):
        code = exc.subcode or exc.code or ""
        return f"{exc.step}: HTTP {exc.status}" + (f" {code}" if code else "")
    if isinstance(exc, ProtocolError):
        return f"ProtocolError at {exc.step}" if exc.step else "ProtocolError"
    if isinstance(exc, TransportError):
        where = f"{type(exc).__name__} at {exc.step}" if exc.step else type(exc).__name__
        return f"{where}: {exc.cause}" if exc.cause else where
    if isinstance(exc, AuthError):
        if exc.error:
            return f"AuthError: {exc.error}"
        text = str(exc).split(" (correlation-id=", 1)[0]
        return f"AuthError: {text[:80]}" if text else "AuthError"
    if reason:
        return reason
    return type(exc).__name__ if exc is not None else "unknown"


async def prepare_plan_with(
    client: Client,
    plan: LoadPlan,
    *,
    meetings: int,
    check_links: Callable[[Sequence[str]], None] | None,
) -> LoadPlan:
    """What a run does once before its guests: ``check_links`` judges the URLs the service application's
    discovery links to (it raises to stop the run), then the meetings ``plan.meeting_urls`` lacks, up to
    ``meetings``, are made through adhocMeetings. Returns the plan with every meeting's URL."""
    if check_links is not None:
        caps = await client._service.capabilities()
        links = (caps.application_url, caps.anon_tokens_url, caps.adhoc_meetings_url)
        check_links([str(u) for u in links if u is not None])
    urls = list(plan.meeting_urls)
    for i in range(len(urls), meetings):
        made = await client.create_meeting(subject=f"anonjoin load meeting {i + 1}")
        urls.append(made.join_url)
    return plan if urls == list(plan.meeting_urls) else dataclasses.replace(plan, meeting_urls=tuple(urls))


async def run_load(
    plan: LoadPlan,
    *,
    discover_url: str,
    endpoint_id: str,
    credential: CredentialLike,
    ca_file: str | None = None,
    verify_tls: bool = True,
    retry: RetryPolicy | None = None,
    rejoin: RejoinPolicy | None = None,
    hooks: Hooks | None = None,
    store: SessionStore | None = None,
    lease_s: float | None = None,
    metrics: Metrics | None = None,
    meetings: int = 0,
    on_runner: Callable[[LoadRunner], None] | None = None,
    check_links: Callable[[Sequence[str]], None] | None = None,
    start_at: float | None = None,
    workers: int = 1,
    ray: str | None = None,
    shards: int | None = None,
) -> LoadResult:
    """Run ``plan`` with one :class:`Client` for every guest, its pool sized to the concurrency.

    ``meetings``: spread the guests over this many meetings, creating the ones ``plan.meeting_urls`` lacks
    through adhocMeetings (the service application's own meetings). ``on_runner`` receives the runner
    before it starts (to wire :meth:`LoadRunner.cancel` to a signal). ``check_links`` receives the URLs the
    service application's discovery links to (applications, anonApplicationTokens, adhocMeetings) before
    any meeting is made or guest sent; it raises to stop the run. ``start_at``: the wall-clock time (Unix
    seconds) of the first arrival, shared by the shards of one run (``plan.shard``); they make no meetings
    (``meetings`` is for an unsharded plan, or for the one process that prepares the shards' plan).

    ``workers=N`` (N > 1) runs the plan in N shards, one worker process of this machine each;
    ``ray="ADDRESS"`` (with ``shards=S``, default the cluster's CPUs) as actors of a Ray cluster
    (:func:`~anonjoin.run_sharded`; the result's ``metrics`` are the shards' exact merge). The shards build
    their own client, so ``credential`` must be a :class:`~anonjoin.ClientSecretCredential`; ``hooks``,
    ``metrics``, ``on_runner`` and ``start_at`` are of one process and are refused with them
    (:class:`~anonjoin.ConfigurationError`). Cancelling the call stops the shards (their processes or
    actors are killed). ``workers=1`` and no ``ray`` is the one-process run.
    """
    if workers != 1 or ray is not None or shards is not None:
        from anonjoin._load import sharded

        sharded.check_sharded_options(
            workers=workers, hooks=hooks, metrics=metrics, on_runner=on_runner, start_at=start_at, plan=plan
        )
        target = sharded.target_of(
            discover_url=discover_url,
            endpoint_id=endpoint_id,
            credential=credential,
            ca_file=ca_file,
            verify_tls=verify_tls,
        )
        return await sharded.run_load_sharded(
            plan,
            target=target,
            workers=workers,
            ray=ray,
            shards=shards,
            retry=retry,
            rejoin=rejoin,
            store=store,
            lease_s=lease_s,
            meetings=meetings,
            check_links=check_links,
        )
    if plan.shard.count > 1 and meetings > len(plan.meeting_urls):
        raise ConfigurationError(
            "a shard does not create meetings: create them once and give every shard the same meeting URLs"
        )
    metrics = metrics if metrics is not None else Metrics(guests=plan.shard_guests)
    async with Client(
        discover_url=discover_url,
        endpoint_id=endpoint_id,
        credential=credential,
        ca_file=ca_file,
        verify_tls=verify_tls,
        retry=retry,
        rejoin=rejoin,
        max_connections=pool_size(plan.shard_concurrency),
        hooks=metrics.hooks(hooks),
    ) as client:
        plan = await prepare_plan_with(client, plan, meetings=meetings, check_links=check_links)
        runner = LoadRunner(client, plan, metrics=metrics, store=store, lease_s=lease_s, start_at=start_at)
        if on_runner is not None:
            on_runner(runner)
        return await runner.run()
