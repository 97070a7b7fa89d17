"""Shared fixtures: ``sim`` (a started simulator with the default configuration) and ``sim_factory``.

``async with sim_factory(lobby="deny", seed=3) as sim:`` starts a simulator with those ``SimulatorConfig``
overrides on ephemeral loopback TLS ports; it stops when the block ends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from anonjoin.simulator import Simulator, SimulatorConfig


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig()) as running:
        yield running


@pytest.fixture
def sim_factory() -> Callable[..., Simulator]:
    def make(**overrides: Any) -> Simulator:
        return Simulator(SimulatorConfig(**overrides))

    return make


@pytest.fixture
def no_target_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A CLI test's environment: no ``ANONJOIN_*`` setting leaks in from the machine, and the default
    session store and report files land in the test's own directory."""
    for name in list(os.environ):
        if name.upper().startswith("ANONJOIN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
