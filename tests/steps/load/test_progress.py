"""The live display: the phase, a clock that runs to the end of the run, drops, a join rate that falls to 0,
and joined / failed / ended kept apart. An injected clock drives the metrics; nothing sleeps."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from anonjoin._core.events import GuestEvent
from anonjoin._load.metrics import Metrics, earliest_phase
from anonjoin._load.progress import ProgressDisplay, bar_text, clock_text, format_line


class FakeClock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def _metrics(guests: int) -> tuple[Metrics, FakeClock]:
    clock = FakeClock()
    m = Metrics(guests=guests, clock=clock)
    return m, clock


def _arrive_and_join(m: Metrics, gid: str) -> None:
    m.guest_arrived()
    m.guest_started(0.0)
    m.guest_joined(gid, 0.05, 0.0)


def test_the_phase_follows_the_run() -> None:
    m, _ = _metrics(2)
    assert m.progress().phase == "starting"  # the token, discovery, meetings: before the arrivals
    m.start()
    assert m.progress().phase == "arriving"
    _arrive_and_join(m, "g1")
    m.guest_arrived()
    m.guest_started(0.0)
    assert m.progress().phase == "arriving"  # one join still in flight
    m.guest_joined("g2", 0.05, 0.0)
    assert m.progress().phase == "holding"
    m.on_guest(GuestEvent("g2", "ended", "Ended", "asi", 0.0))
    m.guest_final("g2", "ended", "Ended")
    assert m.progress().phase == "holding"  # a meeting that ends is not the leave
    m.guest_final("g1", "joined")  # the first held guest has left
    assert m.progress().phase == "leaving"
    m.finish()
    assert m.progress().phase == "done"


def test_a_stopped_run_is_leaving() -> None:
    m, _ = _metrics(10)
    m.start()
    _arrive_and_join(m, "g1")
    assert m.progress().phase == "arriving"
    m.stopping = True  # LoadRunner.cancel sets it
    assert m.progress().phase == "leaving"


def test_the_clock_runs_through_the_hold_and_the_leave() -> None:
    m, clock = _metrics(3)
    m.start()
    for i in range(3):
        clock.now += 1.0
        _arrive_and_join(m, f"g{i}")
    assert m.last_join_s == 3.0
    clock.now += 39.9  # holding: no event at all for 39.9 s
    p = m.progress()
    assert p.phase == "holding"
    assert p.elapsed_s == pytest.approx(42.9)
    assert clock_text(p.elapsed_s) == "0:00:42"
    m.finish()
    clock.now += 100.0
    assert m.progress().elapsed_s == pytest.approx(42.9)  # stopped at the end of the run, not before


def test_the_join_rate_is_over_the_last_seconds_and_falls_to_zero() -> None:
    m, clock = _metrics(100)
    m.start()
    assert m.progress().joins_per_s == 0.0
    clock.now += 0.5
    _arrive_and_join(m, "first")
    assert m.progress().joins_per_s == 1.0  # in the first second: the joins so far over one second
    for second in range(5):
        for k in range(10):
            clock.now = 500.0 + second + 0.05 * (k + 1)
            _arrive_and_join(m, f"g{second}-{k}")
    clock.now = 505.0
    assert m.progress().joins_per_s == 51 / 5  # seconds 0..4, 10 joins each and the first one
    clock.now = 507.5
    assert m.progress().joins_per_s == 30 / 5  # seconds 2..6: 2 to 4 had joins, 5 and 6 none
    clock.now = 510.0
    assert m.progress().joins_per_s == 0.0  # joins have stopped: no stale rate
    m2, clock2 = _metrics(5)
    m2.start()
    clock2.now += 0.2
    _arrive_and_join(m2, "a")
    clock2.now += 2.0
    assert m2.progress().joins_per_s == 0.5  # the run is 2 s old: over those 2 seconds


def test_ended_guests_are_not_shown_as_joined() -> None:
    m, _ = _metrics(4)
    m.start()
    for i in range(4):
        _arrive_and_join(m, f"g{i}")
    m.on_guest(GuestEvent("g0", "dropped", "Ejected", "asi", 0.0))
    m.on_guest(GuestEvent("g3", "ended", "Ended", "asi", 0.0))
    m.guest_final("g3", "ended", "Ended")
    p = m.progress()
    text = bar_text(p)
    assert "joined 4" in text and "in meeting 2" in text and "ended 1" in text and "drops 1" in text
    assert "4/4 joined" not in text
    line = format_line(p)
    assert "holding" in line
    for part in ("arrived 4/4", "joined 4", "in meeting 2", "failed 0", "ended 1", "drops 1", "0.0 joins/s"):
        assert part in line, part


async def test_the_bar_shows_the_phase_and_a_running_clock() -> None:
    m, clock = _metrics(2)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200, color_system=None)
    async with ProgressDisplay(m, console=console, interval_s=3600) as display:
        assert display.mode == "bar"
        m.start()
        clock.now += 12.0
        _arrive_and_join(m, "g1")
        _arrive_and_join(m, "g2")
        display.update()
        assert "holding" in out.getvalue() and "0:00:12" in out.getvalue()
        clock.now += 30.9
        m.guest_final("g1", "joined")
        display.update()
        assert "leaving" in out.getvalue() and "0:00:42" in out.getvalue()
        m.guest_final("g2", "joined")
        clock.now += 1.0
        m.finish()
    text = out.getvalue()
    tail = text[text.rindex("anonjoin load") :]
    assert "done" in tail and "0:00:43" in tail and "joined 2" in tail and "0 joins/s" in tail


async def test_plain_lines_show_the_phase_and_the_clock() -> None:
    m, clock = _metrics(1)
    out = io.StringIO()
    async with ProgressDisplay(m, stream=out, mode="plain", interval_s=3600) as display:
        m.start()
        _arrive_and_join(m, "g1")
        clock.now += 20.0
        display.update()
        m.guest_final("g1", "joined")
        m.finish()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[   20.0s] holding ")
    assert lines[1].startswith("[   20.0s] done ")


def test_the_phase_of_shards_is_the_least_advanced_one() -> None:
    from anonjoin._load.sharded import ShardProgress

    assert earliest_phase([]) == "starting"
    assert earliest_phase(["done", "holding", "leaving"]) == "holding"
    live = ShardProgress(4, 2, clock=FakeClock())
    first, second = _metrics(2), _metrics(2)
    for m, _ in (first, second):
        m.start()
        _arrive_and_join(m, "g1")
        _arrive_and_join(m, "g2")
    first[0].on_guest(GuestEvent("g1", "left", None, "asi", 0.0))
    first[0].guest_final("g1", "joined")
    live.update(0, first[0].progress())
    live.update(1, second[0].progress())
    p = live.progress()
    assert (p.phase, p.joined, p.joined_now) == ("holding", 4, 3)  # one shard leaving, one still holding
    second[0].guest_final("g1", "joined")
    live.update(1, second[0].progress())
    assert live.progress().phase == "leaving"


async def test_a_narrow_terminal_cuts_the_counts_not_the_phase_or_the_clock() -> None:
    m, clock = _metrics(500)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=60, color_system=None)
    async with ProgressDisplay(m, console=console, interval_s=3600):
        m.start()
        for i in range(300):
            _arrive_and_join(m, f"g{i}")
        clock.now += 3723.0
    last = [
        line for line in re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue()).splitlines() if line.strip()
    ]
    tail = last[-1]
    assert "arriving" in tail and "1:02:03" in tail and "…" in tail
