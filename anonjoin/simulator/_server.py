"""``Simulator``: the in-process simulator as an async context manager.

Rules: it listens on two loopback TLS listeners (main and pool) on ephemeral ports unless told otherwise,
writes its CA (and the client certificate's key) into a private temporary directory, and on exit releases
every parked poll, stops both listeners and removes the directory. With ``pools=N`` (N > 1) it is the front
door of a simulator of N + 1 processes (``_pools``): only the main listener here, and N pool processes it
starts and stops. ``pool=PoolRole(...)`` is the other side: one pool process (``anonjoin simulate --role
pool``, started by a front door). Starting costs no key generation after
the first simulator of the process (keys and certificates are cached in ``_tls``/``_tokens``).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from anonjoin.simulator._app import make_server
from anonjoin.simulator._config import LobbyMode, SimulatorConfig, SimulatorInfo
from anonjoin.simulator._core import Core, IssuedTokens
from anonjoin.simulator._faults import FaultProfile
from anonjoin.simulator._pools import FrontDoor, Material
from anonjoin.simulator._tls import client_identity, server_ssl_context, write_ca
from anonjoin.simulator._tokens import aad_key, psat_key

__all__ = ["PoolRole", "Simulator"]

SHUTDOWN_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class PoolRole:
    """This process is pool ``index`` of the front door at ``main_url``, which shared ``material``."""

    index: int
    main_url: str
    material: Material


class Simulator:
    """A running simulator: ``async with Simulator(SimulatorConfig(...)) as sim: sim.info ...``."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        pools: int = 1,
        cpus: Sequence[int] = (),
        pool: PoolRole | None = None,
        **overrides: Any,
    ) -> None:
        base = config or SimulatorConfig()
        self.config = SimulatorConfig.model_validate(base.model_dump() | overrides) if overrides else base
        if pools < 1:
            raise ValueError("pools must be at least 1")
        self._pools = pools
        self._cpus = tuple(cpus)
        self._pool = pool
        self._front: FrontDoor | None = None
        self._core: Core | None = None
        self._info: SimulatorInfo | None = None
        self._runners: list[web.ServerRunner] = []
        self._dir: Path | None = None
        self._end_timer: asyncio.TimerHandle | None = None
        self._ending: asyncio.Future[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> SimulatorInfo:
        config = self.config
        faults = config.faults
        profile = faults if isinstance(faults, FaultProfile) else FaultProfile.load(faults)
        role = self._pool
        if role is not None:
            role.material.install()
        aad_key(), psat_key(), client_identity()  # made once per process
        core = self._core = Core(config, profile, meetings=role.material.meetings() if role else ())
        if role is not None:
            core.admin_token = role.material.admin_token()
        host = "127.0.0.1" if config.host in ("", "0.0.0.0", "::") else config.host
        ports: list[int] = []
        listeners = [("main", config.port), ("pool", config.pool_port)]
        if role is not None:
            listeners = listeners[1:]
        elif self._pools > 1:
            listeners = listeners[:1]
        try:
            for listener, port in listeners:
                runner = web.ServerRunner(
                    make_server(core, listener, handler_cancellation=True, access_log=None),
                    shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                )
                await runner.setup()
                self._runners.append(runner)
                site = web.TCPSite(runner, config.host or "127.0.0.1", port, ssl_context=server_ssl_context())
                await site.start()
                ports.append(runner.addresses[0][1])
            urls = [f"https://{host}:{port}" for port in ports]
            core.main_base, core.pool_base = (role.main_url, urls[0]) if role else (urls[0], urls[-1])
            self._dir = Path(tempfile.mkdtemp(prefix="anonjoin-sim-"))
            if role is None and self._pools > 1:
                material = Material(self._dir)
                material.write(config, core)
                self._front = core.cluster = FrontDoor(core, material, self._pools, cpus=self._cpus)
                await self._front.start()
                core.pool_base = self._front.urls[0]
        except BaseException:
            await self.aclose()
            raise
        ca_file = write_ca(self._dir)
        key_file = self._dir / "client-key.pem"
        key_file.write_bytes(client_identity().private_key_pem)
        meeting = core.default_meeting
        if profile.end_meeting_after_s is not None and role is None:
            self._end_timer = asyncio.get_running_loop().call_later(
                profile.end_meeting_after_s, self._end_default_meeting
            )
        main = core.main_base
        self._info = SimulatorInfo(
            discover_url=f"{main}/platformservice/discover",
            authority=f"{main}/{config.tenant}",
            tenant=config.tenant,
            tenant_id=config.tenant_id,
            client_id=config.client_id,
            client_secret=config.client_secret,
            endpoint_id=config.endpoint_id,
            meeting_url=meeting.meeting_url,
            conference_id=meeting.conference_id,
            origin=config.origin,
            ca_file=str(ca_file),
            admin_url=f"{main}/_admin",
            pool_url=core.pool_base,
            scope=f"{config.audiences[0]}/.default",
            token_endpoint=f"{main}/{config.tenant}/oauth2/v2.0/token",
            client_key_file=str(key_file),
            client_cert_thumbprint=client_identity().thumbprint,
            admin_token=core.admin_token,
            pool_urls=self._front.urls if self._front else (core.pool_base,),
            pids=self._front.pids if self._front else (),
        )
        return self._info

    def _end_default_meeting(self) -> None:
        core = self.core
        cid = core.default_meeting.conference_id
        core.state.end_meeting(cid)
        if self._front is not None:
            self._ending = asyncio.ensure_future(self._front.end_meeting(cid))

    async def aclose(self) -> None:
        if self._end_timer is not None:
            self._end_timer.cancel()
        if self._ending is not None:
            await asyncio.gather(self._ending, return_exceptions=True)
        if self._front is not None:
            await self._front.aclose()
            self._front = None
        if self._core is not None:
            self._core.state.shutdown()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def wait_lost(self) -> None:
        """Return when a pool process exited under this front door (never without pool processes)."""
        if self._front is None:
            await asyncio.Event().wait()
        else:
            await self._front.lost.wait()

    # -- inspection and actions ----------------------------------------------------------------------
    @property
    def info(self) -> SimulatorInfo:
        if self._info is None:
            raise RuntimeError("the simulator is not started")
        return self._info

    @property
    def core(self) -> Core:
        """The simulator's internals (tests and the admin view)."""
        if self._core is None:
            raise RuntimeError("the simulator is not started")
        return self._core

    @property
    def issued_tokens(self) -> IssuedTokens:
        """Test hook: every AAD and psat token issued so far (needs ``record_issued_tokens=True``)."""
        issued = self.core.issued
        if issued is None:
            raise RuntimeError("start the simulator with SimulatorConfig(record_issued_tokens=True)")
        return issued

    def snapshot(self) -> dict[str, Any]:
        """The same JSON as ``GET {admin_url}/state``."""
        return self.core.snapshot()

    def create_meeting(
        self, lobby: LobbyMode = "none", lobby_delay_s: float | None = None, subject: str = "anonjoin meeting"
    ) -> dict[str, Any]:
        """A new meeting; returns its info (``meeting_url``, ``conference_id``, ``conference_uri``, ...)."""
        delay = self.config.lobby_delay_s if lobby_delay_s is None else lobby_delay_s
        return self.core.state.create_meeting(subject=subject, lobby=lobby, lobby_delay_s=delay).info()

    def drop_guest(self, asi: str) -> bool:
        """Disconnect a guest (conversation ``Disconnected``/``deleted``); False if it is not in a meeting."""
        return self.core.state.drop(asi)

    def eject_guest(self, asi: str) -> bool:
        """Eject a guest (reason ``Ejected``); False if it is not in a meeting."""
        return self.core.state.eject(asi)

    def admit_guest(self, asi: str) -> bool:
        """Admit a guest waiting in a lobby now."""
        return self.core.state.admit(asi)

    def end_meeting(self, conference_id: str) -> bool:
        """End a meeting: every guest gets ``Ended``; later joins get 404 ``DestinationNotFound``."""
        return self.core.state.end_meeting(conference_id)

    def set_faults(self, profile: FaultProfile | str) -> None:
        """Swap the fault profile (a ``FaultProfile``, a named profile or a JSON file path)."""
        self.core.injector.set_profile(
            profile if isinstance(profile, FaultProfile) else FaultProfile.load(profile)
        )
