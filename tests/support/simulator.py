"""Helpers around a running simulator: a credential and a ``Client`` for it, a simulator on its own event
loop in a thread (for CLI tests that ``asyncio.run`` in the test's thread), and snapshot readers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from anonjoin import Client
from anonjoin._async.auth import ClientSecretCredential
from anonjoin.simulator import FaultProfile, FaultRule, Simulator, SimulatorConfig

from .policies import CLIENT_REJOIN, CLIENT_RETRY


def sim_credential(
    sim: Simulator, *, secret: str | None = None, trust_ca: bool = True, **kw: Any
) -> ClientSecretCredential:
    """A credential for ``sim``'s AAD: its client secret (or ``secret``), its CA file unless ``trust_ca``
    is false (then nothing is said about TLS but what ``kw`` says)."""
    i = sim.info
    if trust_ca:
        kw.setdefault("ca_file", i.ca_file)
    client_secret = i.client_secret if secret is None else secret
    return ClientSecretCredential(
        authority=i.authority, client_id=i.client_id, client_secret=client_secret, scope=i.scope, **kw
    )


@asynccontextmanager
async def client_for(sim: Simulator, **kw: Any) -> AsyncIterator[Client]:
    """A ``Client`` for ``sim`` with the fast client policies (``kw`` overrides them); its credential is
    closed after."""
    i = sim.info
    cred = sim_credential(sim)
    kw.setdefault("retry", CLIENT_RETRY)
    kw.setdefault("rejoin", CLIENT_REJOIN)
    kw.setdefault("endpoint_id", i.endpoint_id)
    try:
        async with Client(discover_url=i.discover_url, credential=cred, ca_file=i.ca_file, **kw) as client:
            yield client
    finally:
        await cred.aclose()


def live_apps(sim: Simulator) -> int:
    return int(sim.snapshot()["applications"]["live"])


def timeline(sim: Simulator, asi: str) -> list[tuple[str, int]]:
    """A guest's requests as the simulator saw them: (route, status) in order."""
    return [(e["route"], e["status"]) for e in sim.snapshot()["guests"][asi]]


def rule(route: str, kind: str, **kw: Any) -> FaultProfile:
    """A fault profile of one rule that always fires."""
    return FaultProfile(rules=(FaultRule(route=route, kind=kind, rate=1.0, **kw),))


class ThreadedSim:
    """A simulator on its own event loop in a thread, so the CLI can ``asyncio.run`` in this one."""

    def __init__(self, seed: int = 2) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-loop", daemon=True)
        self.thread.start()
        self.sim = Simulator(SimulatorConfig(seed=seed))
        self.info = self._call(self.sim.start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def snapshot(self) -> dict[str, Any]:
        async def snap() -> dict[str, Any]:
            return self.sim.snapshot()

        result: dict[str, Any] = self._call(snap())
        return result

    def flags(self) -> list[str]:
        i = self.info
        return [
            "--discover-url", i.discover_url, "--authority", i.authority, "--client-id", i.client_id,
            "--client-secret", i.client_secret, "--endpoint-id", i.endpoint_id,
            "--meeting-url", i.meeting_url, "--origin", i.origin, "--ca-file", i.ca_file, "--scope", i.scope,
        ]  # fmt: skip

    def close(self) -> None:
        self._call(self.sim.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def threaded_sim() -> Iterator[ThreadedSim]:
    sim = ThreadedSim()
    try:
        yield sim
    finally:
        sim.close()
