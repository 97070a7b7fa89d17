"""Shared fixtures: ``sim`` (a started simulator with the default configuration) and ``sim_factory``.

``async with sim_factory(lobby="deny", seed=3) as sim:`` starts a simulator with those ``SimulatorConfig``
overrides on ephemeral loopback TLS ports; it stops when the block ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
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
