"""A simulator of several processes: one front door and N UCWA pool processes (``--pools N``).

Rules:
- The front door (Azure AD, the Trusted Application API, the psat mint, the admin view) is the process
  the user started. It writes everything its pools must share into its private directory (``Material``:
  the configuration, the token keys, the server certificate, the admin token, the meetings known so far)
  and starts each pool as ``python -m anonjoin simulate --role pool ...``. A pool prints one JSON line
  (``{"pool_url", "pid"}``) when it listens.
- Every meeting has an owning pool (round robin in creation order; the default meeting is pool 0's). The
  front door tells every pool about every meeting before it answers the request that created it (``POST
  /_admin/_internal/sync``), so any process can check a meeting URL; only the owner ever sees its guests,
  because the psat's discover link and ``ucwaext`` point there.
- Each pool's faults are seeded with ``pool_seed(seed, index)``: a run is reproducible pool by pool.
- No orphans: a pool exits when its front door goes away in any way (its stdin, a pipe from the front
  door, reaches EOF; on Linux ``PR_SET_PDEATHSIG`` too, see ``lifeline``); the front door stops its pools
  on exit (EOF, SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``).
- The admin view is the front door's: the state merged over every process (``merge_snapshots``),
  actions sent to every pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import hashlib
import itertools
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from anonjoin.simulator._config import SimulatorConfig
from anonjoin.simulator._core import Core
from anonjoin.simulator._faults import FaultProfile
from anonjoin.simulator._meetings import Meeting
from anonjoin.simulator._tls import ca_pem, server_identity_pems
from anonjoin.simulator._tokens import key_pems

__all__ = [
    "FrontDoor",
    "Material",
    "lifeline",
    "merge_snapshots",
    "pin_to",
    "pool_seed",
]

log = logging.getLogger("anonjoin.simulator")

START_TIMEOUT_S = 60.0
"""A pool that has not printed its line by then failed to start."""
STOP_TIMEOUT_S = 5.0
"""A pool still running this long after EOF and SIGTERM gets SIGKILL."""
CONTROL_TIMEOUT_S = 10.0
"""Bound of one request from the front door to a pool."""
_PR_SET_PDEATHSIG = 1
ADMIN_HEADER = "X-Admin-Token"


def pool_seed(seed: int, index: int) -> int:
    """The seed of pool ``index`` of a simulator seeded ``seed`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"anonjoin-pool/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def pin_to(cpu: int) -> None:
    """Run this process on ``cpu`` only."""
    os.sched_setaffinity(0, {cpu})


# -- the material a front door shares with its pools --------------------------------------------------
@dataclass(frozen=True)
class Material:
    """The files of a front door's private directory that its pools read (mode 0600, in a 0700 dir)."""

    directory: Path

    def write(self, config: SimulatorConfig, core: Core) -> None:
        dump = config.model_dump(mode="json", exclude={"clock"})
        self._put("config.json", json.dumps(dump).encode())
        for name, pem in key_pems().items():
            self._put(f"{name}-key.pem", pem)
        chain, key = server_identity_pems()
        self._put("server-chain.pem", chain)
        self._put("server-key.pem", key)
        self._put("admin-token", core.admin_token.encode())
        self._put("meetings.json", json.dumps([m.spec() for m in core.state.meetings.values()]).encode())

    def _put(self, name: str, data: bytes) -> None:
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def config(self, index: int) -> SimulatorConfig:
        """The configuration of pool ``index`` (the front door's, with the pool's own seed)."""
        values = json.loads((self.directory / "config.json").read_bytes())
        faults = values["faults"]
        values["faults"] = faults if isinstance(faults, str) else FaultProfile.model_validate(faults)
        values["seed"] = pool_seed(int(values["seed"]), index)
        values["port"] = 0
        return SimulatorConfig.model_validate(values)

    def install(self) -> None:
        """Use the front door's token keys and server certificate in this process."""
        from anonjoin.simulator._tls import install_server_identity
        from anonjoin.simulator._tokens import install_keys

        d = self.directory
        install_keys({name: (d / f"{name}-key.pem").read_bytes() for name in ("aad", "psat")})
        install_server_identity(d / "server-chain.pem", d / "server-key.pem")

    def admin_token(self) -> str:
        return (self.directory / "admin-token").read_text()

    def meetings(self) -> list[Meeting]:
        return [Meeting(**spec) for spec in json.loads((self.directory / "meetings.json").read_bytes())]


# -- lifeline -----------------------------------------------------------------------------------------
def lifeline(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """End this process (``stop``) when its parent goes away: stdin (a pipe from the parent) reaching EOF,
    and on Linux the parent's death signal (SIGTERM, which the caller handles as a stop)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    fd = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            stop()

    loop.add_reader(fd, readable)


# -- the merged admin state ---------------------------------------------------------------------------
def _add_counts(into: dict[str, dict[str, int]], part: Mapping[str, Mapping[str, int]]) -> None:
    for key, counts in part.items():
        target = into.setdefault(key, {})
        for status, n in counts.items():
            target[status] = target.get(status, 0) + n


def merge_snapshots(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One admin state from the states of every process (the first one is the front door's)."""
    requests: dict[str, dict[str, int]] = {}
    injected: dict[str, dict[str, int]] = {}
    meetings: dict[str, dict[str, Any]] = {}
    created_by_asi: collections.Counter[str] = collections.Counter()
    gone: collections.Counter[str] = collections.Counter()
    guests: dict[str, list[dict[str, Any]]] = {}
    live = created = 0
    for part in parts:
        _add_counts(requests, part["requests"])
        _add_counts(injected, part["faults_injected"])
        for cid, info in part["meetings"].items():
            known = meetings.get(cid)
            if known is None:
                meetings[cid] = dict(info)
                continue
            for key in ("roster", "lobby"):
                known[key] = list(dict.fromkeys([*known[key], *info[key]]))
            known["ended"] = known["ended"] or info["ended"]
        apps = part["applications"]
        live += apps["live"]
        created += apps["created"]
        created_by_asi.update(apps["created_by_asi"])
        gone.update(apps["gone"])
        for asi, timeline in part["guests"].items():
            guests.setdefault(asi, []).extend(timeline)
    for timeline in guests.values():
        timeline.sort(key=lambda entry: entry["t"])
    return {
        "requests": requests,
        "faults_injected": injected,
        "faults": parts[0]["faults"],
        "meetings": meetings,
        "applications": {
            "live": live,
            "created": created,
            "created_by_asi": dict(created_by_asi),
            "gone": dict(gone),
        },
        "guests": guests,
    }


# -- the front door ---------------------------------------------------------------------------------
@dataclass
class _Pool:
    index: int
    process: asyncio.subprocess.Process
    url: str = ""
    pid: int = 0


LocalAdmin = Callable[[Core, web.BaseRequest], Awaitable[web.StreamResponse]]


class FrontDoor:
    """The pools of a front door: starts and stops them, tells them about meetings, merges their state."""

    def __init__(self, core: Core, material: Material, pools: int, *, cpus: Sequence[int] = ()) -> None:
        self.core = core
        self.material = material
        self.count = pools
        self.cpus = tuple(cpus)
        self.pools: list[_Pool] = []
        self._owners = itertools.count(1)  # the default meeting is pool 0's
        self._session: aiohttp.ClientSession | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self.lost = asyncio.Event()
        """Set when a pool exits while the front door runs (the simulator is broken: stop it)."""

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(p.url for p in self.pools)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self.pools)

    async def start(self) -> None:
        try:
            for index in range(self.count):
                self.pools.append(_Pool(index, await self._spawn(index)))
            async with asyncio.timeout(START_TIMEOUT_S):
                for pool in self.pools:
                    line = await pool.process.stdout.readline() if pool.process.stdout else b""
                    if not line:
                        raise RuntimeError(f"pool {pool.index} of the simulator did not start")
                    ready = json.loads(line)
                    pool.url, pool.pid = str(ready["pool_url"]), int(ready["pid"])
        except TimeoutError:
            await self.aclose()
            raise RuntimeError("the simulator's pools did not start in time") from None
        except BaseException:
            await self.aclose()
            raise
        ctx = ssl.create_default_context(cadata=ca_pem().decode())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=0),
            timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S),
            headers={ADMIN_HEADER: self.core.admin_token},
        )
        self.core.pool_urls = self.urls
        await self._each("POST", "/_admin/_internal/sync", {"pool_urls": list(self.urls)})
        self._watchers = [asyncio.create_task(self._watch(pool)) for pool in self.pools]

    async def _watch(self, pool: _Pool) -> None:
        code = await pool.process.wait()
        log.error("simulator pool %d (pid %d) exited with status %s: stopping", pool.index, pool.pid, code)
        self.lost.set()

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        args = [
            sys.executable,
            "-m",
            "anonjoin",
            "simulate",
            "--role",
            "pool",
            "--pool-index",
            str(index),
            "--material",
            str(self.material.directory),
            "--main-url",
            self.core.main_base,
            "--exit-with-stdin",
            "--host",
            self.core.config.host,
            "--pool-port",
            str(self.core.config.pool_port + index if self.core.config.pool_port else 0),
        ]
        if self.cpus:
            args += ["--pin", str(self.cpus[(index + 1) % len(self.cpus)])]
        return await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )

    async def aclose(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        for pool in self.pools:  # EOF on the lifeline, then SIGTERM: both ask for a clean stop
            if pool.process.stdin is not None:
                pool.process.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                pool.process.send_signal(signal.SIGTERM)
        for pool in self.pools:
            try:
                await asyncio.wait_for(pool.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    pool.process.kill()
                await pool.process.wait()
        self.pools.clear()

    # -- talking to the pools ----------------------------------------------------------------------
    async def _one(self, pool: _Pool, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        assert self._session is not None
        async with self._session.request(method, pool.url + path, json=body) as r:
            return r.status, await r.json(content_type=None)

    async def _each(self, method: str, path: str, body: Any = None) -> list[tuple[int, Any]]:
        return list(await asyncio.gather(*(self._one(p, method, path, body) for p in self.pools)))

    async def new_meeting(self, meeting: Meeting) -> None:
        meeting.owner = next(self._owners) % self.count
        await self._each("POST", "/_admin/_internal/sync", {"meetings": [meeting.spec()]})

    async def end_meeting(self, cid: str) -> None:
        """End meeting ``cid`` in every pool (the front door's own copy is the caller's)."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self._each("POST", f"/_admin/meetings/{cid}/end")

    async def snapshot(self) -> dict[str, Any]:
        remote = await self._each("GET", "/_admin/state")
        merged = merge_snapshots([self.core.snapshot(), *(body for _, body in remote)])
        merged["processes"] = [
            {"role": "front", "pid": os.getpid(), "url": self.core.main_base},
            *({"role": "pool", "index": p.index, "pid": p.pid, "url": p.url} for p in self.pools),
        ]
        return merged

    async def admin(self, request: web.BaseRequest, local: LocalAdmin) -> web.StreamResponse:
        path, method = request.path.rstrip("/"), request.method
        if path in ("/_admin", "/_admin/state") and method == "GET":
            return web.json_response(await self.snapshot())
        if path.startswith("/_admin/guests/") and method == "POST":  # the owning pool acts
            answers = await self._each(method, path)
            done = [body for status, body in answers if status == 200]
            if done:
                return web.json_response(done[0])
            return web.json_response(answers[0][1], status=answers[0][0])
        answer = await local(self.core, request)
        if answer.status >= 300 or method == "GET":
            return answer
        if path == "/_admin/meetings":
            assert isinstance(answer, web.Response) and answer.body is not None
            cid = json.loads(bytes(answer.body))["conference_id"]  # type: ignore[arg-type]
            await self.new_meeting(self.core.state.meetings[cid])
        elif path.startswith("/_admin/meetings/") or path == "/_admin/faults":
            body = await request.read()
            await self._each(method, path, json.loads(body) if body else None)
        return answer


def descendants(pids: Iterable[int]) -> list[int]:
    """Every running descendant of ``pids`` (Linux ``/proc``; empty elsewhere)."""
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split():
                    found.append(int(child))
                    todo.append(int(child))
    return found
