"""What the chaos suite watches while a run goes on, and the checks it makes against the simulator's record.

The simulator's own record is the authority: its admin snapshot (applications, per-guest timelines,
meetings, injected faults), its live meeting state (sampled during the run), the admissions it made (counted
by wrapping the injector's ``guest_schedule``, which the simulator calls once per guest it seats) and the
psat tokens it issued. The client's hooks are used only where the simulator cannot know (attempt numbers,
when a join started on the client's side).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt

from anonjoin._async.retry import RejoinPolicy, RetryPolicy
from anonjoin._core import constants as C
from anonjoin._core.events import GuestEvent, StepEvent
from anonjoin._load.report import GuestRecord
from anonjoin.simulator import Simulator
from anonjoin.simulator._core import TIMELINE_CAP
from anonjoin.simulator._faults import GuestSchedule

__all__ = ["RunObserver", "open_sockets", "unfinished_tasks"]

RETRY_AFTER_TOLERANCE_S = 0.05
"""The simulator stamps a response's time before the client reads it: the client's next request can only
come later, so this covers float rounding and the HTTP-date form's whole seconds, nothing more."""
CLOCK_TOLERANCE_S = 0.01
"""Between the simulator's time of a response and the client's reading of it (the same clock)."""
DEADLINE_GRACE_S = 3.0
"""The last attempt of a step may start just before the guest's deadline (clipped to the time left);
this covers that attempt and a loaded event loop."""
APPLICATION_ROUTES = (
    "events",
    "invitations",
    "delete_application",
    "application",
    "ucwa_resource",
    "me_action",
)
"""Routes addressed to one psanon application (its URL names it)."""
# subcode of the simulator's error answers -> HTTP status (protocol.md §6 and the fault kinds)
STATUS_OF_REASON: Mapping[str, int] = {
    "Throttled": 429,
    "Overloaded": 503,
    "InternalServerError": 500,
    "GatewayTimeout": 504,
    "InvalidToken": 403,
    "DestinationNotFound": 404,
}


class RunObserver:
    """Hooks for the client plus samplers of the simulator's live state; collects problems as it goes."""

    def __init__(self, sim: Simulator, retry: RetryPolicy, rejoin: RejoinPolicy) -> None:
        self.sim = sim
        self.retry = retry
        self.rejoin = rejoin
        self.events: dict[str, list[GuestEvent]] = defaultdict(list)
        self.retries: Counter[str] = Counter()
        self.max_attempt: dict[str, int] = {}
        self.over_bound: list[str] = []
        self.admissions: Counter[str] = Counter()
        self.seated_ever: set[str] = set()
        self.roster_problems: list[str] = []
        self.samples = 0
        self.max_seated = 0
        # (guest id, step) -> when the client read a 429/503 (the simulator's clock: both use time.time)
        self.throttled_read: dict[tuple[str, str], list[float]] = defaultdict(list)

    # -- the simulator's admissions ------------------------------------------------------------------
    def count_admissions(
        self, schedule: Callable[[str], GuestSchedule | None]
    ) -> Callable[[str], GuestSchedule | None]:
        """Wraps ``FaultInjector.guest_schedule``, which the simulator calls once for every guest it seats."""

        def counting(asi: str) -> GuestSchedule | None:
            self.admissions[asi] += 1
            return schedule(asi)

        return counting

    # -- client hooks ----------------------------------------------------------------------------------
    def attempt_bound(self, step: str) -> int:
        if step == "delete_application":
            return max(self.retry.attempts, C.DELETE_ATTEMPTS)
        return self.retry.attempts

    def on_step(self, ev: StepEvent) -> None:
        if ev.phase != "end":
            return
        if ev.attempt > self.attempt_bound(ev.step):
            self.over_bound.append(f"{ev.guest_id} {ev.step} attempt {ev.attempt}")
        if ev.attempt > self.max_attempt.get(ev.step, 0):
            self.max_attempt[ev.step] = ev.attempt
        if ev.outcome == "retry":
            self.retries[ev.guest_id or "(service application)"] += 1
        if ev.status in (429, 503) and ev.guest_id is not None:
            self.throttled_read[(ev.guest_id, ev.step)].append(time.time())

    def on_guest(self, ev: GuestEvent) -> None:
        self.events[ev.guest_id].append(ev)
        if ev.kind in ("joined", "rejoined"):
            self._check_one(ev.application_session_id)

    # -- the rosters, during the run -------------------------------------------------------------------
    def _check_one(self, asi: str) -> None:
        """Cheap, at every (re)join: the guest sits in at most one roster or lobby of all meetings."""
        places = [
            cid for cid, m in self.sim.core.state.meetings.items() if asi in m.roster or asi in m.lobby_queue
        ]
        if len(places) > 1:
            self.roster_problems.append(f"guest {asi} seated in {places}")

    def check_rosters(self) -> None:
        """Everything: nobody twice (by applicationSessionId across meetings, by display name within one),
        and each seat held by the live application of that guest."""
        state = self.sim.core.state
        where: dict[str, str] = {}
        seated = 0
        for cid, meeting in state.meetings.items():
            names: Counter[str] = Counter()
            for kind, table in (("roster", meeting.roster), ("lobby", meeting.lobby_queue)):
                for asi, gid in table.items():
                    seated += 1
                    self.seated_ever.add(asi)
                    if asi in where:
                        self.roster_problems.append(f"guest {asi} in {where[asi]} and in {cid}/{kind}")
                    where[asi] = f"{cid}/{kind}"
                    app = state.apps.get(gid)
                    if app is None or app.asi != asi:
                        self.roster_problems.append(f"{cid}/{kind}: seat of {asi} held by a dead application")
                        continue
                    names[app.display_name] += 1
            for name, n in names.items():
                if n > 1:
                    self.roster_problems.append(f"{cid}: {name!r} seated {n} times")
        self.samples += 1
        self.max_seated = max(self.max_seated, seated)

    async def sample_until(self, stop: asyncio.Event, every_s: float) -> None:
        """Check every roster every ``every_s`` seconds until ``stop`` is set (and once more then)."""
        while not stop.is_set():
            self.check_rosters()
            try:
                async with asyncio.timeout(every_s):
                    await stop.wait()
            except TimeoutError:
                pass
        self.check_rosters()

    # -- checks after the run --------------------------------------------------------------------------
    def retry_after_violations(self, snapshot: Mapping[str, Any]) -> tuple[int, list[str], int]:
        """Per guest, route and application: the request after a 429/503 with ``Retry-After: r`` came at
        least ``r`` after it, when the client read that answer. A request cancelled in flight (a leave that
        cancels a rejoin's mint) may have been answered by the simulator without the client ever reading
        the answer: that Retry-After was never given to the client, so a request sooner is no violation.

        The routes under one psanon application are keyed by that application (the timeline's ``app``):
        a guest that rejoins talks to a new application, whose first requests the old one's Retry-After
        does not bind. Returns (pairs checked, violations, throttled requests whose route the guest only
        used again for another application).
        """
        checked = 0
        other_application = 0
        bad: list[str] = []
        guest_of = {ev.application_session_id: gid for gid, evs in self.events.items() for ev in evs[:1]}
        for asi, timeline in snapshot["guests"].items():
            gid = guest_of.get(asi, "")
            pending: dict[tuple[str, str | None], Mapping[str, Any]] = {}
            for entry in timeline:
                route, app = entry["route"], entry.get("app")
                prev = pending.pop((route, app), None)
                if prev is not None:
                    checked += 1
                    early = prev["t"] + prev["retry_after"] - entry["t"]
                    read = any(
                        prev["t"] - CLOCK_TOLERANCE_S <= t <= entry["t"] + CLOCK_TOLERANCE_S
                        for t in self.throttled_read.get((gid, route), ())
                    )
                    if early > RETRY_AFTER_TOLERANCE_S and read:
                        bad.append(
                            f"{asi} {route} (application {app}): {entry['status']} {early:.3f}s before the "
                            f"Retry-After ({prev['retry_after']:.3f}s) of its {prev['status']}"
                        )
                elif app is not None:
                    # the same route to another application after a throttled request to an older one
                    stale = [k for k in pending if k[0] == route and k[1] != app]
                    other_application += len(stale)
                    for k in stale:
                        del pending[k]
                if entry["status"] in (429, 503) and entry["retry_after"] is not None:
                    pending[(route, app)] = entry
        return checked, bad, other_application

    def _recovery_wait_s(self, k: int) -> float:
        """The longest backoff before the ``k``-th consecutive recovery (none before the first)."""
        pol = self.rejoin
        return 0.0 if k <= 1 else min(pol.wait_max, pol.wait_initial * 2 ** (k - 2)) + pol.jitter

    def deadline_violations(
        self, records: Sequence[GuestRecord], snapshot: Mapping[str, Any]
    ) -> tuple[int, list[str], float]:
        """First joins, each attempt of it within the guest deadline.

        An attempt runs from the guest's first request the simulator saw (or from the client's
        ``rejoining`` event that started a recovery: a recreated application after a maybe-sent POST, a
        new psat) to the next ``rejoining``, to ``joined``, or to its last request before it failed.
        A recovery may first wait its backoff. Returns (attempts checked, violations, longest seconds).
        """
        checked = 0
        longest = 0.0
        bad: list[str] = []
        for rec in records:
            timeline = snapshot["guests"].get(rec.application_session_id, [])
            if not timeline or len(timeline) >= TIMELINE_CAP:  # the start may have been cut off
                continue
            events = self.events.get(rec.guest_id, [])
            end = next((e for e in events if e.kind in ("joined", "failed", "ended")), None)
            if end is None or end.kind == "ended":
                continue
            if end.kind == "joined":
                stop = end.at
            else:
                stop = max(
                    (e["t"] for e in timeline if e["route"] != "delete_application" and e["t"] <= end.at),
                    default=timeline[0]["t"],
                )
            marks = [timeline[0]["t"]] + [e.at for e in events if e.kind == "rejoining" and e.at < end.at]
            marks.append(max(stop, marks[-1]))
            for k, (a, b) in enumerate(itertools.pairwise(marks)):
                limit = self.retry.guest_deadline_s + DEADLINE_GRACE_S + self._recovery_wait_s(k)
                checked += 1
                longest = max(longest, b - a)
                if b - a > limit:
                    bad.append(
                        f"{rec.guest_id}: attempt {k + 1} of its first join ({end.kind}) took {b - a:.1f}s "
                        f"(limit {limit:g}s)"
                    )
        return checked, bad, longest

    def rejoin_spans(self) -> list[tuple[str, float]]:
        """(guest id, seconds) from each ``rejoining`` to the guest's next rejoined/failed/ended/left."""
        spans: list[tuple[str, float]] = []
        for guest_id, events in self.events.items():
            since: float | None = None
            for ev in events:
                if ev.kind == "rejoining" and since is None:
                    since = ev.at
                elif ev.kind in ("rejoined", "failed", "ended", "left") and since is not None:
                    spans.append((guest_id, ev.at - since))
                    since = None
        return spans

    def rejoin_bound_s(self) -> float:
        """The longest a rejoin may take: every consecutive recovery the policy allows, each within the
        guest deadline plus the longest rejoin backoff."""
        pol = self.rejoin
        return (pol.attempts + 1) * (
            self.retry.guest_deadline_s + pol.wait_max + pol.jitter
        ) + DEADLINE_GRACE_S

    def failure_classification(
        self, records: Sequence[GuestRecord], snapshot: Mapping[str, Any]
    ) -> list[str]:
        """Each outcome agrees with what the simulator did to that guest."""
        meetings = snapshot["meetings"]
        bad: list[str] = []
        for rec in records:
            asi = rec.application_session_id
            meeting = meetings.get(rec.meeting or "", {})
            if self.admissions[asi] < rec.rejoins + (1 if rec.outcome == "joined" else 0):
                bad.append(
                    f"{rec.guest_id}: {rec.outcome} with {rec.rejoins} rejoins, "
                    f"but the simulator seated it {self.admissions[asi]} times"
                )
            if rec.outcome == "ended" and not meeting.get("ended"):
                bad.append(f"{rec.guest_id}: ended ({rec.reason}) but meeting {rec.meeting} did not end")
            if rec.outcome in ("failed", "ended") and not rec.reason:
                bad.append(f"{rec.guest_id}: {rec.outcome} without a reason")
            if rec.outcome == "failed" and rec.reason is not None and rec.reason in STATUS_OF_REASON:
                end = next((e for e in self.events.get(rec.guest_id, ()) if e.kind == "failed"), None)
                timeline = [
                    e
                    for e in snapshot["guests"].get(asi, [])
                    if e["route"] != "delete_application" and (end is None or e["t"] <= end.at)
                ]
                want = STATUS_OF_REASON[rec.reason]
                if not timeline or timeline[-1]["status"] != want:
                    last = timeline[-1] if timeline else None
                    bad.append(f"{rec.guest_id}: failed {rec.reason} (HTTP {want}), simulator's last: {last}")
        return bad


def psat_session_ids(tokens: Iterable[str]) -> Counter[str]:
    """How many psat tokens the simulator issued per applicationSessionId (``asi`` claim)."""
    out: Counter[str] = Counter()
    for token in tokens:
        claims = jwt.decode(token.removeprefix("psat="), options={"verify_signature": False})
        out[str(claims.get("asi"))] += 1
    return out


def open_sockets(ports: set[int], *, remote_only: bool = False) -> list[str]:
    """This process's TCP sockets from or to ``ports`` (Linux ``/proc``; listeners included unless
    ``remote_only``)."""
    inodes: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found: list[str] = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if inode not in inodes:
                continue
            lport = int(local.rsplit(":", 1)[1], 16)
            rport = int(remote.rsplit(":", 1)[1], 16)
            if rport in ports or (not remote_only and lport in ports):
                found.append(f"local port {lport} -> remote port {rport} (tcp state {state})")
    return found


def unfinished_tasks() -> list[str]:
    """Every task of the running loop that is not done, except the caller's own."""
    me = asyncio.current_task()
    return sorted(t.get_name() for t in asyncio.all_tasks() if t is not me and not t.done())
