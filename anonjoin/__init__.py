"""anonjoin: join anonymous guests into online meetings end to end.

The public names are re-exported here; everything else lives in private modules.
"""

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
from anonjoin._version import __version__

__all__ = [
    "AnonJoinError",
    "AuthError",
    "CapabilityNotAvailable",
    "ConfigurationError",
    "JoinFailed",
    "MaybeSentError",
    "ProtocolError",
    "RequestNotSentError",
    "ServiceError",
    "StoreError",
    "TransportError",
    "__version__",
]
