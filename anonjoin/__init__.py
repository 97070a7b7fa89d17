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
    from anonjoin._async.auth import AccessToken, CertificateCredential, ClientSecretCredential, Credential
    from anonjoin._async.client import Client
    from anonjoin._async.guest import Guest
    from anonjoin._async.retry import Clock, RejoinPolicy, RetryPolicy
    from anonjoin._async.settings import TargetSettings
    from anonjoin._core.events import ChannelEvent, Event, GuestEvent, Hooks, Step, StepEvent
    from anonjoin._core.models import AdhocMeeting, GuestGrant, GuestOutcome, JoinResult
    from anonjoin._core.protocol import GuestState
    from anonjoin._load.metrics import Metrics
    from anonjoin._load.prometheus import MetricsCollector, serve_metrics
    from anonjoin._load.ray import RayEngine
    from anonjoin._load.report import GuestRecord, build_report
    from anonjoin._load.report_formats import write_report
    from anonjoin._load.runner import (
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
    from anonjoin._load.sharded import (
        InProcessEngine,
        ShardEngine,
        ShardJob,
        ShardProgress,
        ShardStates,
        run_shard_job,
        run_sharded,
    )
    from anonjoin._load.shards import MergedRun, ShardResult, merge_results, read_shard_result
    from anonjoin._load.store import (
        Lease,
        MemorySessionStore,
        SessionRecord,
        SessionScope,
        SessionStore,
        SqliteSessionStore,
    )
    from anonjoin._load.store_redis import RedisSessionStore
    from anonjoin._load.workers import ProcessEngine


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
    "ShardStates",
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
    "AccessToken": "anonjoin._async.auth",
    "AdhocMeeting": "anonjoin._core.models",
    "ArrivalSchedule": "anonjoin._load.runner",
    "CertificateCredential": "anonjoin._async.auth",
    "ChannelEvent": "anonjoin._core.events",
    "Client": "anonjoin._async.client",
    "ClientSecretCredential": "anonjoin._async.auth",
    "Clock": "anonjoin._async.retry",
    "ConstantRate": "anonjoin._load.runner",
    "Credential": "anonjoin._async.auth",
    "Event": "anonjoin._core.events",
    "Guest": "anonjoin._async.guest",
    "GuestEvent": "anonjoin._core.events",
    "GuestGrant": "anonjoin._core.models",
    "GuestOutcome": "anonjoin._core.models",
    "GuestRecord": "anonjoin._load.report",
    "GuestState": "anonjoin._core.protocol",
    "Hooks": "anonjoin._core.events",
    "InProcessEngine": "anonjoin._load.sharded",
    "JoinResult": "anonjoin._core.models",
    "Lease": "anonjoin._load.store",
    "LinearRamp": "anonjoin._load.runner",
    "LoadPlan": "anonjoin._load.runner",
    "LoadResult": "anonjoin._load.runner",
    "LoadRunner": "anonjoin._load.runner",
    "MemorySessionStore": "anonjoin._load.store",
    "MergedRun": "anonjoin._load.shards",
    "Metrics": "anonjoin._load.metrics",
    "MetricsCollector": "anonjoin._load.prometheus",
    "ProcessEngine": "anonjoin._load.workers",
    "RateFunction": "anonjoin._load.runner",
    "RayEngine": "anonjoin._load.ray",
    "RedisSessionStore": "anonjoin._load.store_redis",
    "RejoinPolicy": "anonjoin._async.retry",
    "RetryPolicy": "anonjoin._async.retry",
    "SessionRecord": "anonjoin._load.store",
    "SessionScope": "anonjoin._load.store",
    "SessionStore": "anonjoin._load.store",
    "Shard": "anonjoin._load.runner",
    "ShardEngine": "anonjoin._load.sharded",
    "ShardJob": "anonjoin._load.sharded",
    "ShardProgress": "anonjoin._load.sharded",
    "ShardStates": "anonjoin._load.sharded",
    "ShardResult": "anonjoin._load.shards",
    "SqliteSessionStore": "anonjoin._load.store",
    "Step": "anonjoin._core.events",
    "StepEvent": "anonjoin._core.events",
    "Steps": "anonjoin._load.runner",
    "TargetSettings": "anonjoin._async.settings",
    "build_report": "anonjoin._load.report",
    "run_load": "anonjoin._load.runner",
    "serve_metrics": "anonjoin._load.prometheus",
    "write_report": "anonjoin._load.report_formats",
    "merge_results": "anonjoin._load.shards",
    "read_shard_result": "anonjoin._load.shards",
    "run_shard_job": "anonjoin._load.sharded",
    "run_sharded": "anonjoin._load.sharded",
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
