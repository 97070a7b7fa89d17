"""Live progress of a load run: a rich progress bar on a terminal, plain periodic lines otherwise.

The display reads :meth:`anonjoin._metrics.Metrics.progress` (a handful of counters) on a timer, so it
costs nothing per guest. ``mode="auto"`` picks the bar when the stream is a terminal and neither ``CI`` is
set to a true value nor ``TERM=dumb``; otherwise one line every ``interval_s`` (5 s by default).
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Literal, Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from anonjoin._metrics import Metrics
from anonjoin._metrics import Progress as Snapshot

__all__ = ["ProgressDisplay", "ProgressMode", "format_line", "pick_mode"]


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


def format_line(p: Snapshot) -> str:
    """One plain progress line."""
    return (
        f"[{p.elapsed_s:7.1f}s] joined {p.joined}/{p.guests} (now {p.joined_now})  in lobby {p.in_lobby}  "
        f"in flight {p.in_flight}  failed {p.failed}  ended {p.ended}  cancelled {p.cancelled}  "
        f"retries {p.retries}  "
        f"rejoins {p.rejoins}  {p.joins_per_s:.1f} joins/s"
    )


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
                TextColumn("[bold]anonjoin load"),
                BarColumn(bar_width=None),
                TextColumn("{task.fields[text]}"),
                TimeElapsedColumn(),
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
            self._bar = self._progress.add_task("load", total=max(self._metrics.guests, 1), text="")
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
            parts = [
                f"[green]{snap.joined}[/]/{snap.guests} joined",
                f"{snap.joined_now} in meeting",
                f"[cyan]{snap.in_lobby}[/] in lobby",
                f"[red]{snap.failed}[/] failed",
                *([f"{snap.ended} ended"] if snap.ended else []),
                *([f"{snap.cancelled} cancelled"] if snap.cancelled else []),
                f"[yellow]{snap.retries}[/] retries",
                f"{snap.rejoins} rejoins",
                f"{snap.joins_per_s:.0f} joins/s",
            ]
            text = " · ".join(parts)
            self._progress.update(self._bar, completed=done, total=max(snap.guests, 1), text=text)
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
