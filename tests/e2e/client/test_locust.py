"""``anonjoin.locust``: Locust users run the same sans-IO guest conversation over Locust's own HTTP client.

Locust runs headless in a subprocess (importing it monkey-patches the standard library with gevent, which
must not happen in this process) against a simulator on its own loop in a thread; the simulator's record
says whether every guest joined and left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.simulator import ThreadedSim

USERS = 20
LOCUSTFILE = """
from anonjoin.locust import AnonJoinUser


class Guest(AnonJoinUser):
    hold_s = 2.0
"""


@pytest.fixture
def threaded_sim() -> Iterator[ThreadedSim]:
    sim = ThreadedSim(seed=5)
    try:
        yield sim
    finally:
        sim.close()


def test_locust_users_join_hold_and_leave(tmp_path: Path, threaded_sim: ThreadedSim) -> None:
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
