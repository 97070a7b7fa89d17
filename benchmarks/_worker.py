"""One client run in its own process: ``python -m benchmarks._worker '<json spec>'``.

Spec keys: ``client`` ("raw", "anonjoin", "runner" or "locust"), ``info`` (the simulator's JSON line),
``guests``, ``concurrency``, ``hold`` (keep every guest joined with its poll parked until told to leave),
``warmup`` (guests joined and left before the measured section).

Protocol on stdout, one JSON object a line, answered through stdin:

1. ``{"event": "armed"}`` after the one-time setup (imports, AAD token, shared discovery, warm-up guests);
   the harness reads the simulator's counters and answers ``go``.
2. held runs only: ``{"event": "ready", ...}`` once every guest is joined with its poll parked, with the
   worker's RSS; the harness reads the simulator's RSS and answers ``leave``.
3. ``{"event": "result", ...}`` last: wall time, CPU time (``RUSAGE_SELF`` deltas of the measured section:
   every thread of this process, nothing else), join latencies, failures.

A failure before the result is ``{"event": "error", "error": "..."}`` and exit status 1.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from typing import Any


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    spec: dict[str, Any] = json.loads(argv[0])
    # A stuck worker can be asked where it is: SIGUSR1 dumps every thread's stack to stderr (and the
    # asyncio driver answers SIGUSR2 with its tasks' stacks); the harness does both before a timeout kill.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        if spec["client"] == "locust":
            # Locust monkey-patches the standard library with gevent at import time: import it first.
            from benchmarks import _locust

            result = _locust.run(spec, emit=emit, wait_for=_wait_for)
        else:
            import asyncio

            from benchmarks import _drive

            result = asyncio.run(_drive.run(spec, emit=emit, wait_for=_wait_for))
    except Exception as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}"[:2000])
        return 1
    emit("result", **result)
    return 0


def _wait_for(word: str) -> None:
    """Block until the harness writes ``word`` on stdin (EOF counts as the word: the harness is gone)."""
    for line in sys.stdin:
        if line.strip() == word:
            return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
