"""Load-test metrics, fed by the client's hooks and by the runner. Cheap per event: this is the hot path.

What is measured (all latencies kept in HDR histograms, microsecond resolution, 3 significant digits):

- ``steps``: each step's latency per successful attempt (``StepEvent`` with ``outcome == "ok"``); failed
  attempts are counted in ``step_errors``, retried ones in ``retries`` by (step, reason). The ``events``
  step is the join's own event polls (connecting, lobby); a poll that ends while its guest is in the
  meeting is the parked one, kept as ``events.parked`` (:data:`PARKED_POLL`): its latency is how long the
  server held the poll, not a service delay.
- ``join``: arrival -> joined for a guest's first join, *without* the time spent in the lobby. Arrival is
  the moment the schedule let the guest arrive, so time spent queueing for a concurrency slot counts (an
  open model: a slow service cannot hide its latency by slowing the arrivals down).
- ``lobby``: the lobby wait of guests that had one; ``queue``: arrival -> the guest's first request;
  ``rejoin``: how long each rejoin took (from the client's ``JoinResult``).
- Counters: arrivals, final outcomes (joined / failed by reason / ended / cancelled), drops, rejoins,
  retries by reason, live gauges (joined now, in the lobby now, joins in flight).
- Throughput over time: per-second buckets (joins, failures, rejoins, retries, latency sum and max) and a
  bounded, seeded sample of (time, join latency) points for the report's scatter plot.

Nothing here awaits or logs; every method is O(1) amortised.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from hdrh.histogram import HdrHistogram

from anonjoin._core.events import GuestEvent, Hooks, StepEvent

__all__ = [
    "PARKED_POLL",
    "PERCENTILES",
    "PHASES",
    "FinalOutcome",
    "LatencyHistogram",
    "Metrics",
    "Phase",
    "Progress",
    "SecondBucket",
    "earliest_phase",
]

FinalOutcome = Literal["joined", "failed", "ended", "cancelled"]
Phase = Literal["starting", "arriving", "holding", "leaving", "done"]
"""Where a run is: ``starting`` (setup: token, discovery, meetings), ``arriving`` (guests arriving or joins
in flight), ``holding`` (every guest arrived and settled, the joined ones are held), ``leaving`` (the first
held guest has left, or the run was stopped), ``done`` (the run's clock has stopped)."""
PHASES: tuple[Phase, ...] = ("starting", "arriving", "holding", "leaving", "done")


def earliest_phase(phases: Iterable[Phase]) -> Phase:
    """The least advanced of ``phases`` (the phase of a run made of shards); ``starting`` for none."""
    return min(phases, key=PHASES.index, default="starting")


_LOWEST_US = 1
_HIGHEST_US = 3_600_000_000  # one hour
_SIGNIFICANT = 3
SCATTER_SAMPLES = 4000
"""At most this many (time, join latency) points are kept for the report's scatter plot."""
PERCENTILES: tuple[float, ...] = (50, 90, 95, 99)
"""The percentiles of every latency summary in the report."""
PARKED_POLL = "events.parked"
"""The step name under which a held guest's event polls are kept (apart from the join's own ``events``
polls): a poll that ends while its guest is in the meeting was parked there, and its time is how long
the server held it, not a service delay."""


class LatencyHistogram:
    """An HDR histogram of durations. Records seconds; answers milliseconds.

    The mean is exact, from a running sum kept beside the histogram (of the recorded, clamped values):
    ``HdrHistogram.get_mean_value`` walks every bucket, some 50 ms a histogram even with one value.
    """

    __slots__ = ("_h", "_sum_us", "count")

    def __init__(self) -> None:
        self._h = HdrHistogram(_LOWEST_US, _HIGHEST_US, _SIGNIFICANT)
        self.count = 0
        self._sum_us = 0

    def record(self, seconds: float) -> None:
        us = int(seconds * 1_000_000)
        if us < _LOWEST_US:
            us = _LOWEST_US
        elif us > _HIGHEST_US:
            us = _HIGHEST_US
        self._h.record_value(us)
        self.count += 1
        self._sum_us += us

    def percentile_ms(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100) in ms, or ``None`` when nothing was recorded."""
        if not self.count:
            return None
        if q >= 100:
            return float(self._h.get_max_value()) / 1000.0
        return float(self._h.get_value_at_percentile(q)) / 1000.0

    def max_ms(self) -> float | None:
        return float(self._h.get_max_value()) / 1000.0 if self.count else None

    def mean_ms(self) -> float | None:
        return self._sum_us / self.count / 1000.0 if self.count else None

    def encode(self) -> dict[str, Any]:
        """JSON-ready data that :meth:`add_encoded` adds back exactly (hdrh's own encoding)."""
        return {"hdr": self._h.encode().decode("ascii") if self.count else None, "sum_us": self._sum_us}

    def add_encoded(self, data: Mapping[str, Any]) -> None:
        """Add a histogram of :meth:`encode` into this one: every count at every index adds exactly."""
        blob = data.get("hdr")
        if blob:
            before = self._h.get_total_count()
            self._h.decode_and_add(str(blob).encode("ascii"))
            self.count += self._h.get_total_count() - before
        self._sum_us += int(data.get("sum_us", 0))

    def equals(self, other: LatencyHistogram) -> bool:
        """Same counts at every index (and the same running sum)."""
        return self.count == other.count and self._sum_us == other._sum_us and bool(self._h.equals(other._h))

    @property
    def sum_s(self) -> float:
        """The exact sum of the recorded (clamped) values, in seconds."""
        return self._sum_us / 1_000_000

    def cumulative_counts(self, bounds_s: Sequence[float]) -> list[int]:
        """How many values are at most each of ``bounds_s`` (seconds, ascending): Prometheus buckets.

        One pass over the counts up to the highest value recorded. A value within the histogram's
        resolution (3 significant digits) of a bound counts as at most it.
        """
        if not self.count:
            return [0] * len(bounds_s)
        h = self._h
        counts = h.counts
        top = min(h.get_counts_array_index(h.get_max_value()), h.counts_len - 1)
        out: list[int] = []
        running = start = 0
        for bound in bounds_s:
            us = min(max(int(bound * 1_000_000), _LOWEST_US), _HIGHEST_US)
            end = min(h.get_counts_array_index(us), top) + 1
            if end > start:
                running += sum(counts[start:end])
                start = end
            out.append(running)
        return out

    def summary(self, percentiles: Iterable[float] = PERCENTILES) -> dict[str, float | int | None]:
        """``{count, p50_ms, p90_ms, p95_ms, p99_ms, max_ms, mean_ms}`` (``None`` for no data)."""
        out: dict[str, float | int | None] = {"count": self.count}
        qs = list(percentiles)
        # one walk of the buckets for all of them (get_value_at_percentile walks once per percentile)
        values = self._h.get_percentile_to_value_dict([q for q in qs if q < 100]) if self.count else {}
        for q in qs:
            if q >= 100 or not self.count:
                out[f"p{q:g}_ms"] = _round(self.percentile_ms(q))
            else:
                out[f"p{q:g}_ms"] = _round(float(values[q]) / 1000.0)
        out["max_ms"] = _round(self.max_ms())
        out["mean_ms"] = _round(self.mean_ms())
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclasses.dataclass(slots=True)
class SecondBucket:
    """What happened in one second of the run (second ``n`` covers [n, n+1) s after the start)."""

    joins: int = 0
    failures: int = 0
    rejoins: int = 0
    retries: int = 0
    drops: int = 0
    join_ms_sum: float = 0.0
    join_ms_max: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A cheap snapshot of the live counters, for progress displays."""

    elapsed_s: float
    guests: int
    arrived: int
    in_flight: int
    joined: int
    join_failures: int
    """First joins that did not succeed (the guest's final outcome may be failed or ended)."""
    joined_now: int
    in_lobby: int
    failed: int
    ended: int
    cancelled: int
    retries: int
    rejoins: int
    drops: int
    joins_per_s: float
    """First joins per second over the last few complete seconds (0 once joins have stopped)."""
    phase: Phase = "arriving"


class Metrics:
    """Everything a load run measures. Feed it with :meth:`hooks` plus the runner's ``guest_*`` calls."""

    def __init__(
        self,
        *,
        guests: int = 0,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        scatter_samples: int = SCATTER_SAMPLES,
    ) -> None:
        self._clock = clock
        self.t0 = clock()
        self.t_end: float | None = None
        self.guests = guests
        self.steps: dict[str, LatencyHistogram] = {}
        self.step_errors: Counter[str] = Counter()
        self.retries: Counter[tuple[str, str]] = Counter()
        self.join = LatencyHistogram()
        self.lobby = LatencyHistogram()
        self.queue = LatencyHistogram()
        self.rejoin = LatencyHistogram()
        self.arrived = 0
        self.in_flight = 0
        self.outcomes: Counter[str] = Counter()
        self.failures_by_reason: Counter[str] = Counter()
        """Final outcomes ``failed`` and ``ended``, by reason."""
        self.failed_by_reason: Counter[str] = Counter()
        """Final outcomes ``failed`` only, by reason (the report's ``failures_by_reason``)."""
        self.rejoins = 0
        self.rejoin_attempts = 0
        self.drops = 0
        self.drops_by_reason: Counter[str] = Counter()
        self.first_joins = 0
        self.join_failures = 0
        self.last_join_s = 0.0
        """Seconds from the start to the latest first join (the end of the join phase)."""
        self.leave_errors = 0
        self.store_writes_late = 0
        """Outcome records the session store wrote only after retrying (it was unreachable for a while)."""
        self.store_writes_lost = 0
        """Outcome records the session store could not write at all (the report still has them)."""
        self.store_writes_fenced = 0
        """Outcome records refused by a lease fence (another instance took the guest)."""
        self._joined_now: set[str] = set()
        self._in_lobby: set[str] = set()
        self._joined_now_added = 0  # from merged shard states (their guests are not in the sets)
        self._in_lobby_added = 0
        self.seconds: list[SecondBucket] = []
        self.scatter: list[tuple[float, float]] = []
        self._scatter_cap = scatter_samples
        self._scatter_seen = 0
        self._rng = random.Random(seed)
        self.guest_listener: Callable[[GuestEvent], None] | None = None
        """Called after each guest event is counted (the runner uses it to wait for a rejoin to settle)."""
        self.started = False
        """Whether :meth:`start` was called (the arrivals have begun)."""
        self.stopping = False
        """Set when the run is asked to stop early (arrivals stop, held guests leave now)."""

    # -- hooks (called by the client on the event loop) ------------------------------------------------------

    def hooks(self, chain: Hooks | None = None) -> Hooks:
        """Hooks that feed these metrics, then call ``chain``'s hooks (if any).

        The metrics read only the ``"end"`` step events: step starts are asked for only if ``chain`` has an
        ``on_step`` that wants them.
        """
        if chain is None or (chain.on_step is None and chain.on_guest is None):
            return Hooks(on_step=self.on_step, on_guest=self.on_guest, step_starts=False)
        if chain.on_step is None:
            user_guest_only = chain.on_guest

            def on_guest_only(ev: GuestEvent) -> None:
                self.on_guest(ev)
                if user_guest_only is not None:
                    user_guest_only(ev)

            return Hooks(on_step=self.on_step, on_guest=on_guest_only, step_starts=False)
        user_step, user_guest = chain.on_step, chain.on_guest

        def on_step(ev: StepEvent) -> None:
            self.on_step(ev)
            if user_step is not None:
                user_step(ev)

        def on_guest(ev: GuestEvent) -> None:
            self.on_guest(ev)
            if user_guest is not None:
                user_guest(ev)

        return Hooks(on_step=on_step, on_guest=on_guest, step_starts=chain.step_starts)

    def on_step(self, ev: StepEvent) -> None:
        if ev.phase != "end":
            return
        outcome = ev.outcome
        step: str = ev.step
        if step == "events" and ev.guest_id in self._joined_now:
            step = PARKED_POLL
        if outcome == "ok":
            hist = self.steps.get(step)
            if hist is None:
                hist = self.steps[step] = LatencyHistogram()
            if ev.duration_s is not None:
                hist.record(ev.duration_s)
        elif outcome == "retry":
            self.retries[(step, ev.retry_reason or "unknown")] += 1
            self._bucket().retries += 1
        else:
            self.step_errors[step] += 1

    def on_guest(self, ev: GuestEvent) -> None:
        kind = ev.kind
        gid = ev.guest_id
        if kind == "lobby":
            self._in_lobby.add(gid)
        elif kind == "joined" or kind == "rejoined":
            self._in_lobby.discard(gid)
            self._joined_now.add(gid)
            if kind == "rejoined":
                self.rejoins += 1
                self._bucket().rejoins += 1
        elif kind == "dropped":
            self._joined_now.discard(gid)
            self._in_lobby.discard(gid)
            self.drops += 1
            self.drops_by_reason[ev.reason or "unknown"] += 1
            self._bucket().drops += 1
        elif kind == "rejoining":
            self.rejoin_attempts += 1
            self._joined_now.discard(gid)
        else:  # failed, ended, left
            self._joined_now.discard(gid)
            self._in_lobby.discard(gid)
        if self.guest_listener is not None:
            self.guest_listener(ev)

    # -- the runner's calls ----------------------------------------------------------------------------------

    def guest_arrived(self) -> None:
        self.arrived += 1

    def guest_started(self, queued_s: float) -> None:
        """A guest got its concurrency slot ``queued_s`` after it arrived."""
        self.in_flight += 1
        self.queue.record(queued_s)

    def guest_joined(self, guest_id: str, latency_s: float, lobby_s: float) -> None:
        """A guest's first join: ``latency_s`` is arrival -> joined, lobby included (it is taken out here)."""
        self.in_flight -= 1
        self.first_joins += 1
        self._in_lobby.discard(guest_id)
        self._joined_now.add(guest_id)
        net = max(latency_s - lobby_s, 0.0)
        self.join.record(net)
        if lobby_s > 0:
            self.lobby.record(lobby_s)
        ms = net * 1000.0
        now = self._clock() - self.t0
        self.last_join_s = now
        bucket = self._bucket()
        bucket.joins += 1
        bucket.join_ms_sum += ms
        if ms > bucket.join_ms_max:
            bucket.join_ms_max = ms
        # Reservoir sampling (algorithm R) keeps a uniform, bounded, seeded sample for the scatter plot.
        self._scatter_seen += 1
        if len(self.scatter) < self._scatter_cap:
            self.scatter.append((now, ms))
        else:
            j = self._rng.randrange(self._scatter_seen)
            if j < self._scatter_cap:
                self.scatter[j] = (now, ms)

    def guest_join_failed(self, guest_id: str, *, cancelled: bool = False) -> None:
        """A guest's first join did not succeed (its final outcome follows through :meth:`guest_final`)."""
        self.in_flight -= 1
        self._in_lobby.discard(guest_id)
        if not cancelled:
            self.join_failures += 1
            self._bucket().failures += 1

    def rejoin_took(self, seconds: float) -> None:
        self.rejoin.record(seconds)

    def guest_final(self, guest_id: str, outcome: FinalOutcome, reason: str | None = None) -> None:
        """How a guest ended the run. Called exactly once per guest."""
        self.outcomes[outcome] += 1
        if outcome in ("failed", "ended"):
            self.failures_by_reason[reason or "unknown"] += 1
            if outcome == "failed":
                self.failed_by_reason[reason or "unknown"] += 1
        self._in_lobby.discard(guest_id)
        if outcome != "joined":
            self._joined_now.discard(guest_id)

    def start(self, t0: float | None = None) -> None:
        """Start the run's clock now (or at ``t0``): time buckets count from here. Setup before it (the
        AAD token, discovery, meetings) keeps its step timings but not its place on the time line."""
        self.t0 = self._clock() if t0 is None else t0
        self.seconds.clear()
        self.started = True

    def finish(self) -> None:
        """Stop the clock (the run's duration ends here)."""
        if self.t_end is None:
            self.t_end = self._clock()

    # -- reading ---------------------------------------------------------------------------------------------

    def _bucket(self) -> SecondBucket:
        second = int(self._clock() - self.t0)
        seconds = self.seconds
        while len(seconds) <= second:
            seconds.append(SecondBucket())
        return seconds[second]

    @property
    def duration_s(self) -> float:
        end = self.t_end if self.t_end is not None else self._clock()
        return max(end - self.t0, 0.0)

    @property
    def retries_by_reason(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (_step, reason), n in self.retries.items():
            out[reason] += n
        return out

    @property
    def retries_by_step(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for (step, _reason), n in self.retries.items():
            out[step] += n
        return out

    def target(self, name: str) -> LatencyHistogram | None:
        """The histogram called ``name``: ``join``, ``lobby``, ``queue``, ``rejoin`` or a step name."""
        fixed = {"join": self.join, "lobby": self.lobby, "queue": self.queue, "rejoin": self.rejoin}
        if name in fixed:
            return fixed[name]
        return self.steps.get(name)

    def join_rate(self, window_s: float = 5.0) -> float:
        """First joins per second over the last ``window_s`` complete seconds (fewer at the start).

        Seconds with no event have no bucket and count as 0, so the rate falls to 0 once joins stop. In
        the first second, the joins so far over one second (a few quick joins are not a huge rate).
        """
        elapsed = self.duration_s
        now_second = int(elapsed)
        if now_second < 1:
            return self.first_joins / 1.0 if elapsed > 0 else 0.0
        lo = max(0, now_second - max(int(window_s), 1))
        joins = sum(b.joins for b in self.seconds[lo:now_second])
        return joins / (now_second - lo)

    def phase(self) -> Phase:
        """Where the run is (see :data:`Phase`)."""
        if self.t_end is not None:
            return "done"
        if self.stopping:
            return "leaving"
        if not self.started:
            return "starting"
        if self.arrived < self.guests or self.in_flight > 0:
            return "arriving"
        if not self.outcomes["joined"] and sum(self.outcomes.values()) < self.guests:
            return "holding"  # no held guest has left yet
        return "leaving"

    def progress(self, window_s: float = 5.0) -> Progress:
        return Progress(
            elapsed_s=self.duration_s,
            guests=self.guests,
            arrived=self.arrived,
            in_flight=self.in_flight,
            joined=self.first_joins,
            join_failures=self.join_failures,
            joined_now=self.joined_now,
            in_lobby=self.in_lobby,
            failed=self.outcomes["failed"],
            ended=self.outcomes["ended"],
            cancelled=self.outcomes["cancelled"],
            retries=sum(self.retries.values()),
            rejoins=self.rejoins,
            drops=self.drops,
            joins_per_s=self.join_rate(window_s),
            phase=self.phase(),
        )

    @property
    def joined_now(self) -> int:
        return len(self._joined_now) + self._joined_now_added

    @property
    def in_lobby(self) -> int:
        return len(self._in_lobby) + self._in_lobby_added

    # -- shard states: what one shard measured, added up exactly -----------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything measured, as JSON-ready data: :meth:`add_state` adds it into another ``Metrics``.

        Histograms travel in hdrh's own encoding (exact); times are seconds since :meth:`start` (for a
        shard, since the run's common ``start_at``), so the per-second buckets of shards line up.
        """
        return {
            "version": STATE_VERSION,
            "counters": {name: getattr(self, name) for name in _STATE_COUNTERS},
            "duration_s": self.duration_s,
            "last_join_s": self.last_join_s,
            "joined_now": self.joined_now,
            "in_lobby": self.in_lobby,
            "step_errors": dict(self.step_errors),
            "outcomes": dict(self.outcomes),
            "failures_by_reason": dict(self.failures_by_reason),
            "failed_by_reason": dict(self.failed_by_reason),
            "drops_by_reason": dict(self.drops_by_reason),
            "retries": [[step, reason, n] for (step, reason), n in sorted(self.retries.items())],
            "histograms": {name: self.target_or_new(name).encode() for name in _FIXED_HISTOGRAMS},
            "steps": {name: hist.encode() for name, hist in sorted(self.steps.items())},
            "seconds": [dataclasses.astuple(b) for b in self.seconds],
            "scatter": [list(p) for p in self.scatter],
            "scatter_seen": self._scatter_seen,
        }

    def add_state(self, state: Mapping[str, Any]) -> None:
        """Add one shard's :meth:`to_state` into these metrics: counts, histograms and buckets add exactly.

        The duration is the longest of the shards' (they share one start). The scatter sample stays a
        bounded sample: each shard keeps a share of it in proportion to the joins it sampled from.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"metrics state version {state.get('version')!r}, expected {STATE_VERSION}")
        for name, value in state["counters"].items():
            if name in _STATE_COUNTERS:
                setattr(self, name, getattr(self, name) + int(value))
        self._joined_now_added += int(state["joined_now"])
        self._in_lobby_added += int(state["in_lobby"])
        self.last_join_s = max(self.last_join_s, float(state["last_join_s"]))
        end = self.t0 + max(self.duration_s, float(state["duration_s"]))
        self.t_end = end if self.t_end is None or end > self.t_end else self.t_end
        self.step_errors.update(state["step_errors"])
        self.outcomes.update(state["outcomes"])
        self.failures_by_reason.update(state["failures_by_reason"])
        self.failed_by_reason.update(state.get("failed_by_reason", {}))
        self.drops_by_reason.update(state["drops_by_reason"])
        for step, reason, n in state["retries"]:
            self.retries[(step, reason)] += int(n)
        for name, data in state["histograms"].items():
            if name in _FIXED_HISTOGRAMS:
                self.target_or_new(name).add_encoded(data)
        for name, data in state["steps"].items():
            self.target_or_new(name).add_encoded(data)
        seconds = self.seconds
        for i, row in enumerate(state["seconds"]):
            while len(seconds) <= i:
                seconds.append(SecondBucket())
            b = seconds[i]
            joins, failures, rejoins, retries, drops, ms_sum, ms_max = row
            b.joins += joins
            b.failures += failures
            b.rejoins += rejoins
            b.retries += retries
            b.drops += drops
            b.join_ms_sum += ms_sum
            b.join_ms_max = max(b.join_ms_max, ms_max)
        self._merge_scatter([(float(t), float(ms)) for t, ms in state["scatter"]], int(state["scatter_seen"]))

    def _merge_scatter(self, points: Sequence[tuple[float, float]], seen: int) -> None:
        total = self._scatter_seen + seen
        pooled = self.scatter + list(points)
        if len(pooled) > self._scatter_cap and total:
            # Each side keeps points in proportion to the joins it sampled from (seeded: reproducible).
            mine = round(self._scatter_cap * self._scatter_seen / total)
            mine = min(mine, len(self.scatter))
            theirs = min(self._scatter_cap - mine, len(points))
            mine = min(self._scatter_cap - theirs, len(self.scatter))
            pooled = self._rng.sample(self.scatter, mine) + self._rng.sample(list(points), theirs)
        self.scatter = pooled
        self._scatter_seen = total

    def target_or_new(self, name: str) -> LatencyHistogram:
        """The histogram called ``name`` (see :meth:`target`), made empty if it is a step not yet seen."""
        hist = self.target(name)
        if hist is None:
            hist = self.steps[name] = LatencyHistogram()
        return hist

    @classmethod
    def merged(cls, states: Iterable[Mapping[str, Any]], *, seed: int = 0) -> Metrics:
        """One ``Metrics`` holding the sum of ``states`` (shards' :meth:`to_state`), finished."""
        m = cls(seed=seed)
        m.t_end = m.t0
        for state in states:
            m.add_state(state)
        return m


STATE_VERSION = 1
_STATE_COUNTERS = (
    "guests",
    "arrived",
    "in_flight",
    "first_joins",
    "join_failures",
    "rejoins",
    "rejoin_attempts",
    "drops",
    "leave_errors",
    "store_writes_late",
    "store_writes_lost",
    "store_writes_fenced",
)
_FIXED_HISTOGRAMS = ("join", "lobby", "queue", "rejoin")


def percentile_ms(hist: LatencyHistogram | None, q: float) -> float:
    """``hist``'s q-th percentile in ms; NaN when there is no data (every comparison with NaN is false)."""
    if hist is None:
        return math.nan
    value = hist.percentile_ms(q)
    return math.nan if value is None else value
