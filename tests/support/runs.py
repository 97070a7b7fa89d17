"""``python -m anonjoin`` as a bounded subprocess whose stderr a test reads line by line (``running``), and
what such tests share: a held run's flags, the report, a process's exit awaited on its pidfd."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BOUND_S = 240.0
"""The most any one subprocess of these tests may take (the machine is shared: generous)."""


class Run:
    """A subprocess of ``python -m anonjoin``, killed after :data:`BOUND_S`, with its stderr read."""

    def __init__(self, cwd: Path, argv: list[str], *, new_session: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anonjoin", *argv],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,  # its own process group, as a terminal's job
        )
        self.seen: list[str] = []
        self.workers: list[int] = []
        self._watchdog = threading.Timer(BOUND_S, self.proc.kill)
        self._watchdog.start()

    def wait_for(self, wanted: str) -> str:
        """Read stderr until a line contains ``wanted`` (the watchdog bounds this)."""
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.seen.append(line)
            found = re.search(r"anonjoin\.workers\.started pids=([0-9,]+)", line)
            if found:
                self.workers = [int(p) for p in found.group(1).split(",")]
            if wanted in line:
                return line
        pytest.fail(f"never saw {wanted!r}: " + "".join(self.seen)[-3000:])

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=BOUND_S)
        finally:
            self.close()
        return self.proc.returncode, out, "".join(self.seen) + err

    def close(self) -> None:
        self._watchdog.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        for pid in self.workers:  # nothing of a test outlives it, even when the engine failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(cwd: Path, argv: list[str], *, new_session: bool = False) -> Iterator[Run]:
    run = Run(cwd, argv, new_session=new_session)
    try:
        yield run
    finally:
        run.close()


def exited(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` exits within ``within_s`` (waits on its pidfd: no polling, no sleep)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], within_s)
        return bool(readable)
    finally:
        os.close(fd)


def report_of(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


HELD = ["--rate", "40", "--hold", "60", "--progress", "plain", "--progress-interval", "0.2", "--no-html"]
