"""Fixtures: ``redis_server`` (one real redis-server for the session) and ``own_redis`` (one per test).

Skipped with a reason only when ``redis-server`` is absent and ``CI`` is unset; under CI its absence fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.redis_server import RedisServer, start_redis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, for tests that kill it."""
    server = start_redis(tmp_path)
    yield server
    server.kill()
