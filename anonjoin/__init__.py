"""anonjoin: join anonymous guests into online meetings end to end.

The public names are re-exported here; everything else lives in private modules. They are imported
on first use (PEP 562), so that ``import anonjoin`` (and the CLI's ``--help``) does not pay for aiohttp,
msal and the load runner until they are needed.
"""

import importlib as _importlib
import logging as _logging
from typing import TYPE_CHECKING, Any

from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    CapabilityNotAvailable,
    ConfigurationError,
    InsecureTarget,
    JoinFailed,
    LeaseHeld,
    LeaseLost,
    MaybeSentError,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    StoreError,
    TransportError,
)
from anonjoin._version import __version__

if TYPE_CHECKING:
    from anonjoin._auth import AccessToken, CertificateCredential, ClientSecretCredential, Credential
    from anonjoin._client import Client
    from anonjoin._events import ChannelEvent, Event, GuestEvent, Hooks, Step, StepEvent
    from anonjoin._guest import Guest
    from anonjoin._metrics import Metrics
    from anonjoin._models import AdhocMeeting, GuestGrant, GuestOutcome, JoinResult
    from anonjoin._prometheus import MetricsCollector, serve_metrics
    from anonjoin._protocol import GuestState
    from anonjoin._ray import RayEngine
    from anonjoin._report import GuestRecord, build_report
    from anonjoin._report_formats import write_report
    from anonjoin._retry import Clock, RejoinPolicy, RetryPolicy
    from anonjoin._runner import (
        ArrivalSchedule,
        ConstantRate,
        LinearRamp,
        LoadPlan,
        LoadResult,
        LoadRunner,
        RateFunction,
        Shard,
        Steps,
        run_load,
    )
    from anonjoin._settings import TargetSettings
    from anonjoin._sharded import (
        InProcessEngine,
        ShardEngine,
        ShardJob,
        ShardProgress,
        run_shard_job,
        run_sharded,
    )
    from anonjoin._shards import MergedRun, ShardResult, merge_results, read_shard_result
    from anonjoin._store import (
        Lease,
        MemorySessionStore,
        SessionRecord,
        SessionScope,
        SessionStore,
        SqliteSessionStore,
    )
    from anonjoin._store_redis import RedisSessionStore
    from anonjoin._workers import ProcessEngine


# A library stays silent unless the application configures logging.
_logging.getLogger("anonjoin").addHandler(_logging.NullHandler())

__all__ = [
    "AccessToken",
    "AdhocMeeting",
    "AnonJoinError",
    "ArrivalSchedule",
    "AuthError",
    "CapabilityNotAvailable",
    "CertificateCredential",
    "ChannelEvent",
    "Client",
    "ClientSecretCredential",
    "Clock",
    "ConfigurationError",
    "ConstantRate",
    "Credential",
    "Event",
    "Guest",
    "GuestEvent",
    "GuestGrant",
    "GuestOutcome",
    "GuestRecord",
    "GuestState",
    "Hooks",
    "InProcessEngine",
    "InsecureTarget",
    "JoinFailed",
    "JoinResult",
    "Lease",
    "LeaseHeld",
    "LeaseLost",
    "LinearRamp",
    "LoadPlan",
    "LoadResult",
    "LoadRunner",
    "MaybeSentError",
    "MemorySessionStore",
    "MergedRun",
    "Metrics",
    "MetricsCollector",
    "ProcessEngine",
    "ProtocolError",
    "RateFunction",
    "RayEngine",
    "RedisSessionStore",
    "RejoinPolicy",
    "RequestNotSentError",
    "RetryPolicy",
    "ServiceError",
    "SessionRecord",
    "SessionScope",
    "SessionStore",
    "Shard",
    "ShardEngine",
    "ShardJob",
    "ShardProgress",
    "ShardResult",
    "SqliteSessionStore",
    "Step",
    "StepEvent",
    "Steps",
    "StoreError",
    "TargetSettings",
    "TransportError",
    "__version__",
    "build_report",
    "merge_results",
    "read_shard_result",
    "run_load",
    "run_shard_job",
    "run_sharded",
    "serve_metrics",
    "write_report",
]

# name -> the private module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "AccessToken": "anonjoin._auth",
    "AdhocMeeting": "anonjoin._models",
    "ArrivalSchedule": "anonjoin._runner",
    "CertificateCredential": "anonjoin._auth",
    "ChannelEvent": "anonjoin._events",
    "Client": "anonjoin._client",
    "ClientSecretCredential": "anonjoin._auth",
    "Clock": "anonjoin._retry",
    "ConstantRate": "anonjoin._runner",
    "Credential": "anonjoin._auth",
    "Event": "anonjoin._events",
    "Guest": "anonjoin._guest",
    "GuestEvent": "anonjoin._events",
    "GuestGrant": "anonjoin._models",
    "GuestOutcome": "anonjoin._models",
    "GuestRecord": "anonjoin._report",
    "GuestState": "anonjoin._protocol",
    "Hooks": "anonjoin._events",
    "InProcessEngine": "anonjoin._sharded",
    "JoinResult": "anonjoin._models",
    "Lease": "anonjoin._store",
    "LinearRamp": "anonjoin._runner",
    "LoadPlan": "anonjoin._runner",
    "LoadResult": "anonjoin._runner",
    "LoadRunner": "anonjoin._runner",
    "MemorySessionStore": "anonjoin._store",
    "MergedRun": "anonjoin._shards",
    "Metrics": "anonjoin._metrics",
    "MetricsCollector": "anonjoin._prometheus",
    "ProcessEngine": "anonjoin._workers",
    "RateFunction": "anonjoin._runner",
    "RayEngine": "anonjoin._ray",
    "RedisSessionStore": "anonjoin._store_redis",
    "RejoinPolicy": "anonjoin._retry",
    "RetryPolicy": "anonjoin._retry",
    "SessionRecord": "anonjoin._store",
    "SessionScope": "anonjoin._store",
    "SessionStore": "anonjoin._store",
    "Shard": "anonjoin._runner",
    "ShardEngine": "anonjoin._sharded",
    "ShardJob": "anonjoin._sharded",
    "ShardProgress": "anonjoin._sharded",
    "ShardResult": "anonjoin._shards",
    "SqliteSessionStore": "anonjoin._store",
    "Step": "anonjoin._events",
    "StepEvent": "anonjoin._events",
    "Steps": "anonjoin._runner",
    "TargetSettings": "anonjoin._settings",
    "build_report": "anonjoin._report",
    "run_load": "anonjoin._runner",
    "serve_metrics": "anonjoin._prometheus",
    "write_report": "anonjoin._report_formats",
    "merge_results": "anonjoin._shards",
    "read_shard_result": "anonjoin._shards",
    "run_shard_job": "anonjoin._sharded",
    "run_sharded": "anonjoin._sharded",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'anonjoin' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
