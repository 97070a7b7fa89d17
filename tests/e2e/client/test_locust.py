"""``anonjoin.locust``: Locust users run the same sans-IO guest conversation over Locust's own HTTP client.

Locust runs headless in a subprocess (importing it monkey-patches the standard library with gevent, which
must not happen in this process) against a simulator on its own loop in a thread; the simulator's record
says whether every guest joined and left.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anonjoin.simulator import Simulator, SimulatorConfig

USERS = 20
LOCUSTFILE = """
from anonjoin.locust import AnonJoinUser


class Guest(AnonJoinUser):
    hold_s = 2.0
"""


class _ThreadedSim:
    """A simulator on its own event loop in a thread (the Locust subprocess is its only client)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-loop", daemon=True)
        self.thread.start()
        self.sim = Simulator(SimulatorConfig(seed=5))
        self.info = self._call(self.sim.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def snapshot(self) -> dict[str, Any]:
        async def snap() -> dict[str, Any]:
            return self.sim.snapshot()

        result: dict[str, Any] = self._call(snap())
        return result

    def close(self) -> None:
        self._call(self.sim.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def threaded_sim() -> Iterator[_ThreadedSim]:
    sim = _ThreadedSim()
    try:
        yield sim
    finally:
        sim.close()


def test_locust_users_join_hold_and_leave(tmp_path: Path, threaded_sim: _ThreadedSim) -> None:
    i = threaded_sim.info
    (tmp_path / "locustfile.py").write_text(LOCUSTFILE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
    target = {
        "DISCOVER_URL": i.discover_url, "ENDPOINT_ID": i.endpoint_id, "AUTHORITY": i.authority,
        "CLIENT_ID": i.client_id, "CLIENT_SECRET": i.client_secret, "MEETING_URL": i.meeting_url,
        "ORIGIN": i.origin, "CA_FILE": i.ca_file, "SCOPE": i.scope,
    }  # fmt: skip
    env.update({f"ANONJOIN_{k}": v for k, v in target.items()})
    args = [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "-u", str(USERS),
            "-r", str(USERS), "-t", "15s", "--stop-timeout", "10", "--only-summary", "--json",
            "--skip-log"]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = {s["name"]: s for s in json.loads(proc.stdout)}
    # one Locust entry per protocol step, and one "join" per guest
    assert stats["join"]["num_requests"] == USERS and stats["join"]["num_failures"] == 0
    for step in ("anon_tokens", "anon_discover", "anon_applications", "invitations", "delete_application"):
        assert stats[step]["num_requests"] >= USERS and stats[step]["num_failures"] == 0, (step, stats[step])
    assert stats["events"]["num_failures"] == 0
    assert stats["discover"]["num_requests"] == 1  # the service application's discovery, shared
    snap = threaded_sim.snapshot()
    assert snap["applications"]["created"] == USERS
    assert snap["applications"]["live"] == 0  # every guest left (DELETE)
    assert snap["applications"]["gone"] == {"deleted": USERS}
    assert "Traceback" not in proc.stderr
