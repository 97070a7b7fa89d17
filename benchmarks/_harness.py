"""Process plumbing of the benchmarks: the simulator in its own process, client workers, /proc readings.

Isolation, and why it is done this way
--------------------------------------
* The **simulator** runs as ``python -m anonjoin simulate`` in its own process, pinned to one core (the
  first of :func:`pin_plan`'s two). Its CPU time and RSS are read from ``/proc/<pid>/stat``
  (``utime + stime``, all threads) and ``/proc/<pid>/status`` (``VmRSS``): no dependency, no sampler.
* Each **client** run (raw, anonjoin's runner, anonjoin's Client, Locust) is a fresh worker process
  (``python -m benchmarks._worker``) pinned to the other core. The worker does its one-time setup
  (imports, the AAD token, discover/applications/capabilities, a warm-up guest), then reads
  ``resource.getrusage(RUSAGE_SELF)`` around the measured section only. ``RUSAGE_SELF`` counts every
  thread of the worker (msal's worker thread, the resolver's thread pool) and nothing else: not the
  harness (which renders tables and reads /proc), not the simulator, not another client's garbage. A
  fresh process also gives each client the same cold start (no heap or connection pool warmed by the
  previous scenario) and its own file-descriptor budget, and it is the only way to run Locust, whose
  gevent monkey-patching cannot share a process with asyncio.
* Figures are **medians of repeats**, and the repeats of the compared clients are interleaved (raw,
  anonjoin, Locust, raw, anonjoin, ...) so a drift of the shared machine hits all of them alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

STACK_DUMP_WAIT_S = 2.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

SIM_INFO_KEYS = (
    "discover_url",
    "authority",
    "tenant",
    "client_id",
    "client_secret",
    "endpoint_id",
    "meeting_url",
    "origin",
    "ca_file",
    "admin_url",
    "admin_token",
    "scope",
)


class BenchmarkError(RuntimeError):
    """A benchmark could not run (a process failed to start, a worker crashed, a chain failed)."""


def cpus_available() -> set[int]:
    return set(os.sched_getaffinity(0))


def pin_plan() -> tuple[int | None, int | None]:
    """Cores for (simulator, client): distinct cores when there are two, else no pinning."""
    cpus = sorted(cpus_available())
    if len(cpus) >= 2:
        return cpus[0], cpus[1]
    return None, None


# ---------------------------------------------------------------- /proc readings


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from ``/proc/<pid>/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of a process in bytes, from ``/proc/<pid>/status`` (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/statm") as f:  # pragma: no cover - kernel threads have no VmRSS
        return int(f.read().split()[1]) * _PAGE


def self_rss_bytes() -> int:
    return proc_rss_bytes(os.getpid())


def machine_description() -> str:
    model = "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f", {int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
                break
    uname = os.uname()
    return (
        f"{os.cpu_count()} cpu ({model}){mem}, {uname.sysname} {uname.release}, "
        f"Python {sys.version.split()[0]}"
    )


def loadavg() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending sequence; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def ratio(a: float, b: float) -> float:
    if b == 0 or a != a or b != b:
        return float("nan")
    return a / b


# ---------------------------------------------------------------- the simulator process


@dataclass
class SimulatorProcess:
    """``python -m anonjoin simulate`` in its own process: start, read its JSON line, SIGTERM at the end.

    ``command`` replaces the command (for a server that speaks the same CLI contract); the JSON line
    it prints must carry :data:`SIM_INFO_KEYS`.
    """

    seed: int = 1
    cpu: int | None = None
    command: Sequence[str] | None = None
    extra_args: Sequence[str] = ()
    pools: int = 1
    """``--pools N``: a front door and N pool processes; CPU and RSS are summed over all of them. ``cpu``
    is ignored then (the pools would inherit it): the processes run where ``pin`` says, else anywhere."""
    pin: Sequence[int] = ()
    """``--pin``: the CPUs of the front door and each pool (round robin), instead of ``cpu``."""
    start_timeout_s: float = 60.0
    info: dict[str, Any] = field(default_factory=dict)
    _proc: subprocess.Popen[str] | None = None
    _stderr: IO[str] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise BenchmarkError("simulator not started")
        return self._proc.pid

    def start(self) -> dict[str, Any]:
        base = list(self.command) if self.command else [sys.executable, "-m", "anonjoin", "simulate"]
        args = [*base, "--port", "0", "--seed", str(self.seed), "--faults", "none", *self.extra_args]
        if self.pools > 1:
            args += ["--pools", str(self.pools)]
        if self.pin:
            args += ["--pin", ",".join(str(cpu) for cpu in self.pin)]
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            args if self.pin or self.pools > 1 else pinned(args, self.cpu),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the harness only; it stops us
        )
        line = _readline_with_timeout(self._proc, self.start_timeout_s) or ""
        try:
            info = json.loads(line)
        except ValueError:
            info = None
        if not isinstance(info, dict) or any(k not in info for k in SIM_INFO_KEYS):
            tail = self.stderr_tail()
            self.stop()
            raise BenchmarkError(f"simulator did not print its JSON line; got {line[:200]!r}; stderr: {tail}")
        self.info = info
        # Keep draining stdout so a chatty simulator never blocks on a full pipe.
        threading.Thread(target=_drain, args=(self._proc.stdout,), daemon=True).start()
        return info

    @property
    def pids(self) -> list[int]:
        """Every process of the simulator (the front door, then its pools with ``--pools N``)."""
        return [int(pid) for pid in self.info.get("pids") or ()] or [self.pid]

    def cpu_seconds(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid in self.pids)

    def rss_bytes(self) -> int:
        return sum(proc_rss_bytes(pid) for pid in self.pids)

    def snapshot(self) -> dict[str, Any]:
        """``GET {admin_url}/state`` (the admin view: request counts by route and status, ...)."""
        ctx = ssl.create_default_context(cafile=self.info["ca_file"])
        request = urllib.request.Request(
            self.info["admin_url"] + "/state", headers={"X-Admin-Token": self.info["admin_token"]}
        )
        with urllib.request.urlopen(request, context=ctx, timeout=30) as resp:
            data: dict[str, Any] = json.loads(resp.read())
        return data

    def request_counts(self) -> dict[str, int]:
        """Protocol requests the simulator has answered so far, by ``route status`` (e.g. ``events 200``)."""
        requests = self.snapshot().get("requests", {})
        return {f"{route} {status}": int(n) for route, by in requests.items() for status, n in by.items()}

    def stderr_tail(self, n: int = 2000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-n:]

    def stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return proc.returncode

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def count_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """Requests answered between two :meth:`SimulatorProcess.request_counts` readings (zeros dropped)."""
    delta = {k: n - before.get(k, 0) for k, n in after.items()}
    return {k: n for k, n in sorted(delta.items()) if n}


def pinned(args: Sequence[str], cpu: int | None) -> list[str]:
    """Wrap a ``python -m ...`` command so the new process pins itself (and all its threads) to ``cpu``."""
    if cpu is None:
        return list(args)
    if len(args) >= 3 and args[0] == sys.executable and args[1] == "-m":
        return [sys.executable, "-m", "benchmarks._pinned", str(cpu), *args[2:]]
    return ["taskset", "-c", str(cpu), *args]


def _readline_with_timeout(proc: subprocess.Popen[str], timeout: float) -> str | None:
    """The next line of ``proc``'s stdout, or None when none came within ``timeout`` seconds."""
    assert proc.stdout is not None
    box: list[str] = []

    def read() -> None:
        try:
            box.append(proc.stdout.readline() if proc.stdout else "")
        except (OSError, ValueError):  # the pipe was closed under us: the process is being stopped
            box.append("")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0] if box else None


def _drain(stream: IO[str] | None) -> None:
    if stream is None:
        return
    with contextlib.suppress(ValueError, OSError):
        for _ in stream:
            pass


# ---------------------------------------------------------------- client workers


@dataclass
class Worker:
    """One client run in its own process: ``python -m benchmarks._worker`` with a JSON spec.

    The worker writes JSON lines on stdout: ``{"event": "ready", ...}`` when a held run has all its guests
    joined (the harness answers with a line on the worker's stdin to let it leave), and
    ``{"event": "result", ...}`` last.
    """

    spec: dict[str, Any]
    cpu: int | None = None
    timeout_s: float = 600.0
    _proc: subprocess.Popen[str] | None = None
    _stderr: IO[str] | None = None
    _deadline: float = 0.0

    def start(self) -> None:
        self._stderr = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        env = dict(os.environ)
        env.setdefault("PYTHONHASHSEED", "0")
        self._proc = subprocess.Popen(
            pinned([sys.executable, "-m", "benchmarks._worker", json.dumps(self.spec)], self.cpu),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=_project_root(),
            env=env,
            start_new_session=True,
        )
        self._deadline = time.monotonic() + self.timeout_s

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def next_event(self) -> dict[str, Any]:
        """The worker's next JSON line (other lines on stdout are ignored)."""
        assert self._proc is not None
        while True:
            left = self._deadline - time.monotonic()
            line = _readline_with_timeout(self._proc, left) if left > 0 else None
            if line is None:
                stacks = self.dump_stacks()
                self.close()
                raise BenchmarkError(f"worker {self.spec.get('client')} timed out; its stacks:\n{stacks}")
            if not line:
                code = self._proc.wait()
                tail = self.stderr_tail()
                self.close()
                raise BenchmarkError(f"worker {self.spec.get('client')} exited {code}: {tail}")
            if line.startswith("{"):
                try:
                    event: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "error":
                    self.close()
                    raise BenchmarkError(f"worker {self.spec.get('client')}: {event.get('error')}")
                return event

    def dump_stacks(self) -> str:
        """Ask a stuck worker for its thread stacks (SIGUSR1) and asyncio tasks (SIGUSR2); return them."""
        if self._proc is None or self._proc.poll() is not None:
            return self.stderr_tail()
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            with contextlib.suppress(OSError):
                self._proc.send_signal(sig)
        time.sleep(STACK_DUMP_WAIT_S)
        return self.stderr_tail(6000)

    def send(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()

    def stderr_tail(self, n: int = 3000) -> str:
        if self._stderr is None:
            return ""
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()[-n:]

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def run_worker(spec: dict[str, Any], *, cpu: int | None, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run one worker to its result (no hold handshake)."""
    worker = Worker(spec, cpu=cpu, timeout_s=timeout_s)
    worker.start()
    try:
        while True:
            event = worker.next_event()
            if event.get("event") == "result":
                return event
            if event.get("event") == "ready":
                worker.send("leave")
    finally:
        worker.close()


@contextlib.contextmanager
def simulator(
    *, seed: int, cpu: int | None, command: Sequence[str] | None = None
) -> Iterator[SimulatorProcess]:
    sim = SimulatorProcess(seed=seed, cpu=cpu, command=command)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
