"""Live progress of a load run: a rich progress bar on a terminal, plain periodic lines otherwise.

The display reads :meth:`anonjoin._load.metrics.Metrics.progress` (a handful of counters) on a timer, so it
costs nothing per guest. ``mode="auto"`` picks the bar when the stream is a terminal and neither ``CI`` is
set to a true value nor ``TERM=dumb``; otherwise one line every ``interval_s`` (5 s by default).

Both show the run's phase (starting, arriving, holding, leaving, done) and its clock, which is the
metrics' clock: it runs until the run ends (through the hold and the leave), not until the last join. The
bar fills as guests' first joins settle; the counts beside it keep first joins (``joined``), guests in the
meeting now, and final outcomes (``failed``, ``ended``, ``cancelled``) apart, with drops, retries and
rejoins, and the join rate over the last few seconds (0 once joins have stopped).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Literal, Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column

from anonjoin._load.metrics import Metrics
from anonjoin._load.metrics import Progress as Snapshot

__all__ = ["ProgressDisplay", "ProgressMode", "bar_text", "clock_text", "format_line", "pick_mode"]


class ProgressSource(Protocol):
    """What the display reads: a :class:`Metrics`, or the summed view of a sharded run's workers."""

    guests: int

    def progress(self) -> Snapshot: ...


ProgressMode = Literal["auto", "bar", "plain", "off"]
BAR_REFRESH_S = 0.25
PLAIN_INTERVAL_S = 5.0


def pick_mode(stream: TextIO, mode: ProgressMode = "auto") -> Literal["bar", "plain", "off"]:
    """The concrete mode for ``stream``."""
    if mode != "auto":
        return mode
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        return "plain"
    if os.environ.get("TERM", "") == "dumb":
        return "plain"
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


def clock_text(seconds: float) -> str:
    """``h:mm:ss`` (``0:00:12``)."""
    whole = max(int(seconds), 0)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def format_line(p: Snapshot) -> str:
    """One plain progress line."""
    return (
        f"[{p.elapsed_s:7.1f}s] {p.phase:<8} arrived {p.arrived}/{p.guests}  joined {p.joined}  "
        f"in meeting {p.joined_now}  in lobby {p.in_lobby}  in flight {p.in_flight}  failed {p.failed}  "
        f"ended {p.ended}  cancelled {p.cancelled}  drops {p.drops}  retries {p.retries}  "
        f"rejoins {p.rejoins}  {p.joins_per_s:.1f} joins/s"
    )


def bar_text(p: Snapshot) -> str:
    """The counts beside the bar (rich markup; lobby, ended, cancelled and rejoins only when not 0)."""
    parts = [
        f"arrived {p.arrived}/{p.guests}",
        f"[green]joined {p.joined}[/]",
        f"in meeting {p.joined_now}",
        *([f"[cyan]in lobby {p.in_lobby}[/]"] if p.in_lobby else []),
        f"[red]failed {p.failed}[/]",
        *([f"ended {p.ended}"] if p.ended else []),
        *([f"cancelled {p.cancelled}"] if p.cancelled else []),
        f"drops {p.drops}",
        f"[yellow]retries {p.retries}[/]",
        *([f"rejoins {p.rejoins}"] if p.rejoins else []),
        f"{p.joins_per_s:.0f} joins/s",
    ]
    return " · ".join(parts)


class ProgressDisplay:
    """Shows a run's progress until :meth:`stop`. Use as ``async with ProgressDisplay(metrics):``."""

    def __init__(
        self,
        metrics: Metrics | ProgressSource,
        *,
        stream: TextIO | None = None,
        mode: ProgressMode = "auto",
        interval_s: float | None = None,
        console: Console | None = None,
    ) -> None:
        self._metrics = metrics
        self._stream = stream if stream is not None else sys.stderr
        self.mode = "bar" if console is not None and mode == "auto" else pick_mode(self._stream, mode)
        self._interval = interval_s if interval_s is not None else (
            BAR_REFRESH_S if self.mode == "bar" else PLAIN_INTERVAL_S
        )  # fmt: skip
        self._task: asyncio.Task[None] | None = None
        self._progress: Progress | None = None
        self._bar: TaskID | None = None
        if self.mode == "bar":
            self._progress = Progress(
                # the phase and the clock are never cut; on a narrow terminal the counts are
                TextColumn("[bold]anonjoin load", table_column=Column(no_wrap=True, width=13)),
                TextColumn("{task.fields[phase]}", table_column=Column(no_wrap=True, width=8)),
                BarColumn(bar_width=None, table_column=Column(width=16)),
                TextColumn(
                    "[progress.elapsed]{task.fields[clock]}", table_column=Column(no_wrap=True, width=8)
                ),
                TextColumn(
                    "{task.fields[text]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)
                ),
                console=console or Console(file=self._stream, stderr=self._stream is sys.stderr),
                auto_refresh=False,
                transient=False,
                expand=True,
            )

    async def __aenter__(self) -> ProgressDisplay:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start(self) -> None:
        if self.mode == "off" or self._task is not None:
            return
        if self._progress is not None:
            self._progress.start()
            self._bar = self._progress.add_task(
                "load",
                total=max(self._metrics.guests, 1),
                text="",
                phase=self._metrics.progress().phase,
                clock=clock_text(0),
            )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="anonjoin-progress")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.update()

    def update(self) -> None:
        """Draw the current state once (the timer calls this; tests may too)."""
        snap = self._metrics.progress()
        if self._progress is not None and self._bar is not None:
            done = snap.joined + snap.join_failures + snap.cancelled
            self._progress.update(
                self._bar,
                completed=done,
                total=max(snap.guests, 1),
                text=bar_text(snap),
                phase=snap.phase,
                clock=clock_text(snap.elapsed_s),
            )
            self._progress.refresh()
        elif self.mode == "plain":
            print(format_line(snap), file=self._stream, flush=True)

    async def stop(self) -> None:
        """Stop the timer and draw the final state (idempotent)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        self.update()
        if self._progress is not None:
            self._progress.stop()
