"""anonjoin: join anonymous guests into online meetings end to end.

The public names are re-exported here; everything else lives in private modules.
"""

from anonjoin._client import Client
from anonjoin._events import ChannelEvent, Event, GuestEvent, Hooks, Step, StepEvent
from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    CapabilityNotAvailable,
    ConfigurationError,
    JoinFailed,
    MaybeSentError,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    StoreError,
    TransportError,
)
from anonjoin._guest import Guest
from anonjoin._models import AdhocMeeting, GuestGrant, GuestOutcome, JoinResult
from anonjoin._protocol import GuestState
from anonjoin._retry import Clock, RejoinPolicy, RetryPolicy
from anonjoin._version import __version__

__all__ = [
    "AdhocMeeting",
    "AnonJoinError",
    "AuthError",
    "CapabilityNotAvailable",
    "ChannelEvent",
    "Client",
    "Clock",
    "ConfigurationError",
    "Event",
    "Guest",
    "GuestEvent",
    "GuestGrant",
    "GuestOutcome",
    "GuestState",
    "Hooks",
    "JoinFailed",
    "JoinResult",
    "MaybeSentError",
    "ProtocolError",
    "RejoinPolicy",
    "RequestNotSentError",
    "RetryPolicy",
    "ServiceError",
    "Step",
    "StepEvent",
    "StoreError",
    "TransportError",
    "__version__",
]
