"""``SimulatorProcess``: the simulator in its own process(es), started and stopped by PID.

``async with SimulatorProcess(pools=2, seed=1) as sim: sim.info ...; await sim.snapshot()`` runs
``python -m anonjoin simulate --exit-with-stdin ...`` as a child, reads its JSON line (``SimulatorInfo``)
and on exit stops it: EOF on its stdin and SIGTERM, then SIGKILL for whatever is left after
``STOP_TIMEOUT_S`` (the front door and each pool, by PID). ``start_sync``/``stop_sync`` do the same without
an event loop.

Rules:
- No orphans: the child's stdin is a pipe from this process, so it ends when this process ends in any way
  (SIGKILL included): EOF on the pipe, and on Linux the parent-death signal (``_pools.lifeline``). Its
  pools end with it the same way. Linux sends that signal when the *thread* that started the child ends:
  start it from a thread that outlives it (the event loop's thread, or the main thread).
- The child runs in its own session: a Ctrl-C at the terminal reaches the client only, which then stops
  the simulator when it is done with it (guests leaving need it).
- Its stderr is this process's (a simulator that cannot start says why in one line there).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from anonjoin._exceptions import ConfigurationError
from anonjoin.simulator._config import SimulatorInfo
from anonjoin.simulator._faults import FaultProfile

__all__ = ["SimulatorProcess"]

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
ADMIN_TIMEOUT_S = 30.0


class SimulatorProcess:
    """The simulator as child process(es): ``pools`` UCWA pool processes (1: one process for everything),
    ``pin`` CPUs for the front door and the pools (round robin), ``args``: more ``anonjoin simulate``
    flags."""

    def __init__(
        self,
        *,
        pools: int = 1,
        seed: int = 0,
        faults: str | FaultProfile = "none",
        pin: Sequence[int] = (),
        args: Sequence[str] = (),
        python: str | None = None,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if pools < 1:
            raise ConfigurationError("pools must be at least 1")
        self.pools = pools
        self.seed = seed
        self.faults = faults
        self.pin = tuple(pin)
        self.args = tuple(args)
        self.python = python or sys.executable
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._info: SimulatorInfo | None = None
        self._profile_dir: tempfile.TemporaryDirectory[str] | None = None
        self._session: Any = None  # aiohttp.ClientSession for the admin view, made on first use

    # -- lifecycle -----------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The command line of the child."""
        faults = self.faults
        if isinstance(faults, FaultProfile):
            if self._profile_dir is None:
                self._profile_dir = tempfile.TemporaryDirectory(prefix="anonjoin-faults-")
            path = Path(self._profile_dir.name) / "faults.json"
            path.write_text(faults.model_dump_json())
            faults = str(path)
        cmd = [self.python, "-m", "anonjoin", "simulate", "--exit-with-stdin"]
        cmd += ["--pools", str(self.pools), "--seed", str(self.seed), "--faults", faults]
        if self.pin:
            cmd += ["--pin", ",".join(str(cpu) for cpu in self.pin)]
        return [*cmd, *self.args]

    def _spawn(self) -> None:
        if self._process is not None:
            raise RuntimeError("the simulator process is already started")
        self._process = subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
        )

    def _wait_ready(self) -> SimulatorInfo:
        process = self._process
        assert process is not None and process.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        line = b""
        fd = process.stdout.fileno()
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise RuntimeError(f"the simulator did not start within {self.start_timeout_s:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                code = process.wait()
                raise RuntimeError(f"the simulator exited (status {code}) before it was ready")
            line += chunk
        return SimulatorInfo.model_validate_json(line)

    def start_sync(self) -> SimulatorInfo:
        """Start the child and wait until it serves (blocking)."""
        self._spawn()
        try:
            self._info = self._wait_ready()
        except BaseException:
            self.stop_sync()
            raise
        return self._info

    async def start(self) -> SimulatorInfo:
        """Start the child and wait until it serves."""
        self._spawn()  # in the loop's thread: the parent-death signal follows this thread
        try:
            self._info = await asyncio.to_thread(self._wait_ready)
        except BaseException:
            self.stop_sync()
            raise
        return self._info

    def stop_sync(self) -> None:
        """Stop the child and its pools (EOF and SIGTERM, SIGKILL after ``STOP_TIMEOUT_S``), by PID."""
        process, self._process = self._process, None
        pools = self._info.pids[1:] if self._info is not None else ()
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
        for pid in pools:  # gone with their front door, unless it was killed: then by PID
            _end_pid(pid, STOP_TIMEOUT_S)
        if self._profile_dir is not None:
            self._profile_dir.cleanup()
            self._profile_dir = None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await asyncio.to_thread(self.stop_sync)

    async def __aenter__(self) -> SimulatorProcess:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __enter__(self) -> SimulatorProcess:
        self.start_sync()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_sync()

    # -- inspection ----------------------------------------------------------------------------------
    @property
    def info(self) -> SimulatorInfo:
        if self._info is None:
            raise RuntimeError("the simulator process is not started")
        return self._info

    @property
    def pids(self) -> tuple[int, ...]:
        """The simulator's processes: the front door (the child), then its pools."""
        return self.info.pids

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """``method`` ``{admin_url}{path}`` with the admin token; the status and the JSON body."""
        import aiohttp

        info = self.info
        if self._session is None:
            ctx = ssl.create_default_context(cafile=info.ca_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S),
                headers={"X-Admin-Token": info.admin_token},
            )
        async with self._session.request(method, info.admin_url + path, json=body) as r:
            return r.status, await r.json(content_type=None)

    async def snapshot(self) -> dict[str, Any]:
        """The admin state of the whole simulator (every process), as ``Simulator.snapshot()``."""
        status, body = await self.admin("GET", "/state")
        if status != 200 or not isinstance(body, dict):
            raise RuntimeError(f"the simulator's admin view answered {status}")
        return body


def _end_pid(pid: int, timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for process ``pid`` (not a child) to end, then SIGKILL it."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return  # gone already (or no pidfd here: the lifeline ends it)
    try:
        if not select.select([fd], [], [], timeout_s)[0]:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)
