"""anonjoin: join anonymous guests into online meetings end to end.

The public names are re-exported here; everything else lives in private modules.
"""

import logging as _logging

from anonjoin._auth import AccessToken, CertificateCredential, ClientSecretCredential, Credential
from anonjoin._client import Client
from anonjoin._events import ChannelEvent, Event, GuestEvent, Hooks, Step, StepEvent
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
from anonjoin._guest import Guest
from anonjoin._metrics import Metrics
from anonjoin._models import AdhocMeeting, GuestGrant, GuestOutcome, JoinResult
from anonjoin._protocol import GuestState
from anonjoin._retry import Clock, RejoinPolicy, RetryPolicy
from anonjoin._runner import (
    ArrivalSchedule,
    ConstantRate,
    LinearRamp,
    LoadPlan,
    LoadResult,
    LoadRunner,
    RateFunction,
    Steps,
    run_load,
)
from anonjoin._settings import TargetSettings
from anonjoin._store import Lease, MemorySessionStore, SessionRecord, SessionStore, SqliteSessionStore
from anonjoin._version import __version__

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
    "GuestState",
    "Hooks",
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
    "Metrics",
    "ProtocolError",
    "RateFunction",
    "RedisSessionStore",
    "RejoinPolicy",
    "RequestNotSentError",
    "RetryPolicy",
    "ServiceError",
    "SessionRecord",
    "SessionStore",
    "SqliteSessionStore",
    "Step",
    "StepEvent",
    "Steps",
    "StoreError",
    "TargetSettings",
    "TransportError",
    "__version__",
    "run_load",
]


def __getattr__(name: str) -> object:
    # RedisSessionStore needs redis-py (the ``redis`` extra): imported on first use, not on import.
    if name == "RedisSessionStore":
        from anonjoin._store_redis import RedisSessionStore

        return RedisSessionStore
    raise AttributeError(f"module 'anonjoin' has no attribute {name!r}")
