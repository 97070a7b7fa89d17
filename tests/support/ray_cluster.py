"""A real two-node Ray cluster on this machine for the Ray tests (each module makes its own fixture of
:func:`two_node_cluster`: one cluster per module).

Head and one worker node, one CPU each, on loopback. Without Ray installed a module that calls
:func:`require_ray` skips, except in CI (``CI`` set), where ``.ci/run`` installs the extra and its absence
is a failure.

(``tests/e2e/ray`` has no ``__init__.py`` and no ``conftest.py``: a package ``ray`` there would shadow
Ray itself.)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import pytest

HAVE_RAY = importlib.util.find_spec("ray") is not None
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def require_ray() -> None:
    """Skip the calling module when Ray is missing (outside CI); in CI, fail."""
    if HAVE_RAY:
        return
    if os.environ.get("CI"):
        raise RuntimeError("Ray is not installed in CI: .ci/run installs the extra ('.[dev,ray]')")
    pytest.skip("Ray is not installed (pip install 'anonjoin[ray]')", allow_module_level=True)


@dataclasses.dataclass
class RayCluster:
    cluster: Any
    """``ray.cluster_utils.Cluster``."""
    worker: Any
    """The worker node (``ray._private.node.Node``): the one a test may remove."""

    @property
    def address(self) -> str:
        return str(self.cluster.address)


def two_node_cluster() -> Iterator[RayCluster]:
    """Start the cluster, yield it, shut every process of it down."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    from ray.cluster_utils import Cluster

    node: dict[str, Any] = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster: Any = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        worker = cluster.add_node(**node)
        cluster.wait_for_nodes(timeout=60)
        yield RayCluster(cluster, worker)
    finally:
        cluster.shutdown()  # every process of every node this fixture started
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
