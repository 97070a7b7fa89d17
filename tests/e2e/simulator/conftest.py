"""Fixtures of the simulator tests: ``walk`` (a raw protocol walker on the default ``sim``, SA set up)
and ``open_walk`` (the same for any simulator)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiohttp
import pytest

from anonjoin.simulator import Simulator

from support.walk import Walk, ssl_context


@asynccontextmanager
async def _open_walk(sim: Simulator, *, setup: bool = True) -> AsyncIterator[Walk]:
    connector = aiohttp.TCPConnector(ssl=ssl_context(sim.info), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        walk = Walk(sim.info, session)
        if setup:
            await walk.sa_setup()
        yield walk


@pytest.fixture
def open_walk() -> Callable[..., AbstractAsyncContextManager[Walk]]:
    return _open_walk


@pytest.fixture
async def walk(sim: Simulator) -> AsyncIterator[Walk]:
    async with _open_walk(sim) as w:
        yield w
