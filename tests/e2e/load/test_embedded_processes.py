"""``anonjoin load`` with no target runs the simulator in its own processes, and never leaves one behind.

Each test starts ``anonjoin load`` as a real process (``ANONJOIN_EMBEDDED_SIMULATOR=processes``, so the
out-of-process path runs on any machine), waits until its simulator serves (the line naming the target),
finds the simulator's processes (the client's descendants, from ``/proc``), ends the client one way or
another and waits (pidfds, bounded) for every simulator process to exit.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from anonjoin._cli import load as cli_load
from anonjoin._cli import main
from anonjoin._cli.load import EMBEDDED_ENV, _embedded_pools
from anonjoin._exceptions import ConfigurationError
from anonjoin.simulator._pools import descendants

pytestmark = [
    pytest.mark.usefixtures("no_target_env"),
    pytest.mark.skipif(not Path("/proc/self/task").is_dir() or not hasattr(os, "pidfd_open"), reason="Linux"),
]

READY_WITHIN_S = 60.0
EXIT_WITHIN_S = 20.0


def _wait_gone(pid: int, within: float = EXIT_WITHIN_S) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], within)[0])
    finally:
        os.close(fd)


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, within: float) -> bytes:
    """The client's stderr up to the first line containing ``marker`` (fails after ``within`` s)."""
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), b""
    deadline = time.monotonic() + within
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no {marker!r} line: {seen[-500:]!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"the client ended early: {seen[-500:]!r}"
        seen += chunk
    return seen


@pytest.fixture
def client(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, EMBEDDED_ENV: "processes"}
    cmd = [sys.executable, "-m", "anonjoin", "load", "--guests", "20", "--hold", "120"]
    cmd += ["--store", ":memory:", "--progress", "off", "--report", str(tmp_path / "r.json")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        assert proc.stderr is not None
        proc.stderr.close()


def _simulator_pids(proc: subprocess.Popen[bytes]) -> list[int]:
    _read_until(proc, b"of embedded simulator", READY_WITHIN_S)
    pids = descendants([proc.pid])
    assert pids, "the client started no simulator process"
    cmdlines = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in pids]
    assert all(b"simulate" in line for line in cmdlines), cmdlines
    return pids


def test_sigkill_of_the_client_leaves_no_simulator_process(client: subprocess.Popen[bytes]) -> None:
    pids = _simulator_pids(client)
    client.kill()
    client.wait(30)
    for pid in pids:
        assert _wait_gone(pid), f"simulator process {pid} outlived the killed client"


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stopped_client_stops_its_simulator(
    client: subprocess.Popen[bytes], sig: signal.Signals, code: int
) -> None:
    pids = _simulator_pids(client)
    client.send_signal(sig)
    assert client.wait(EXIT_WITHIN_S + 30) == code
    for pid in pids:
        assert _wait_gone(pid), f"simulator process {pid} outlived the client"


def test_the_embedded_mode_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMBEDDED_ENV, "in-process")
    assert _embedded_pools() == 0
    monkeypatch.setenv(EMBEDDED_ENV, "processes")
    assert _embedded_pools() >= 1
    monkeypatch.setenv(EMBEDDED_ENV, "sideways")
    with pytest.raises(ConfigurationError, match=EMBEDDED_ENV):
        _embedded_pools()


def test_a_load_against_pool_processes_passes_the_service_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_load, "_embedded_pools", lambda: 2)  # a front door and two pools
    code = main(["load", "--guests", "60", "--hold", "0", "--store", ":memory:", "--progress", "off"])
    report = json.loads(Path("anonjoin-report.json").read_text())
    assert code == 0 and report["joined"] == 60
    check = report["service_check"]
    assert check["ok"] is True and check["application_session_ids_seen"] == 60
