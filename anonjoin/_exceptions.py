"""The one exception tree of anonjoin.

Every error anonjoin raises derives from :class:`AnonJoinError`. Foreign exceptions (aiohttp, msal,
pydantic, ssl) are translated at the boundary with ``raise ... from`` and never leak::

    AnonJoinError
    ├── ConfigurationError        bad input from the caller (a flag, a URL, a settings file)
    ├── TransportError            the network failed; no usable HTTP response
    │   ├── RequestNotSentError   connect refused, DNS, TLS handshake: the request never left; safe to retry
    │   └── MaybeSentError        read timeout, reset after sending: retry only a step that is safe to repeat
    ├── ServiceError              the service answered with an error status (status, code, subcode, ...)
    ├── AuthError                 Azure AD refused or failed to issue a token
    ├── ProtocolError             a response anonjoin cannot use: bad JSON, missing link, too large,
    │   │                         an href that is not http(s), an input the state machine has no row for
    │   └── InsecureTarget        a token would go over http or to a host outside the service (final)
    ├── CapabilityNotAvailable    the tenant lacks a consented capability (anonApplicationTokens, ...)
    ├── JoinFailed                a guest ended without joining; ``reason`` says why (final)
    └── StoreError                the session store file is corrupt, locked or unwritable
        ├── LeaseHeld             another instance holds the guest's lease (claim refused)
        └── LeaseLost             the lease lapsed or was taken over: the write was refused (fenced)

No message, ``repr`` or attribute of these exceptions carries a secret: URLs are kept without their query
(a discover link carries the psat token in its query) and response bodies are clipped and scrubbed.
"""

from __future__ import annotations

import re

__all__ = [
    "AnonJoinError",
    "AuthError",
    "CapabilityNotAvailable",
    "ConfigurationError",
    "InsecureTarget",
    "JoinFailed",
    "LeaseHeld",
    "LeaseLost",
    "MaybeSentError",
    "ProtocolError",
    "RequestNotSentError",
    "ServiceError",
    "StoreError",
    "TransportError",
    "clip_body",
    "redact",
    "redact_url",
]

BODY_CLIP = 300

# Anything that looks like a bearer token, a psat token, a JWT or a secret-bearing query parameter.
_SECRET_PATTERNS = (
    re.compile(r"psat(?:=|%3[dD]|%253[dD])[A-Za-z0-9._%\-]+"),
    re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-%]+"),
    re.compile(
        r"(?i)((?:client_secret|access_token|token|secret|assertion)[\"']?\s*[=:]\s*[\"']?)[^\"'&\s,}]+"
    ),
)


def redact(text: str) -> str:
    """Replace every token- or secret-shaped substring of ``text`` with ``[redacted]``."""
    for pattern in _SECRET_PATTERNS:
        if pattern.groups:
            text = pattern.sub(lambda m: m.group(1) + "[redacted]", text)
        else:
            text = pattern.sub("[redacted]", text)
    return text


def redact_url(url: object) -> str:
    """A URL fit for a message: scheme, host and path, never the query (which can carry a psat token)."""
    text = str(url)
    cut = min((i for i in (text.find("?"), text.find("#")) if i >= 0), default=len(text))
    return redact(text[:cut])


def clip_body(body: bytes | str | None, limit: int = BODY_CLIP) -> str:
    """A short, scrubbed excerpt of a response body for an error message."""
    if body is None:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = redact(text)
    if len(text) > limit:
        return text[:limit] + f"... [{len(text) - limit} more chars]"
    return text


class AnonJoinError(Exception):
    """The root of every error anonjoin raises."""


class ConfigurationError(AnonJoinError, ValueError):
    """The caller's input is unusable: a bad flag, URL, settings value or file."""


class TransportError(AnonJoinError):
    """The network failed before a usable HTTP response arrived."""

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        url: object = None,
        final: bool = False,
        cause: str | None = None,
    ) -> None:
        self.step = step
        self.url = redact_url(url) if url is not None else None
        #: True when no retry can help (an untrusted TLS certificate, say).
        self.final = final
        #: What failed and what to do, in a few words, when the connection could not be made for a known
        #: reason (``connection refused by host:port: ...``); None otherwise. Stable per target.
        self.cause = cause
        where = f" [{step}]" if step else ""
        target = f" {self.url}" if self.url else ""
        super().__init__(f"{redact(message)}{where}{target}")


class RequestNotSentError(TransportError):
    """The request never reached the server (refused, DNS, TLS handshake): always safe to retry."""


class MaybeSentError(TransportError):
    """The request may have been processed (timeout or reset after sending): retry only idempotent steps."""


class ServiceError(AnonJoinError):
    """The service answered with an error status."""

    def __init__(
        self,
        *,
        step: str,
        status: int,
        code: str | None = None,
        subcode: str | None = None,
        message: str | None = None,
        correlation_id: str | None = None,
        client_request_id: str | None = None,
        retry_after: float | None = None,
        body: bytes | str | None = None,
        url: object = None,
        warning: str | None = None,
    ) -> None:
        self.step = step
        self.status = status
        self.code = code
        self.subcode = subcode
        self.service_message = redact(message) if message else None
        self.correlation_id = correlation_id
        self.client_request_id = client_request_id
        self.retry_after = retry_after
        self.body = clip_body(body)
        self.url = redact_url(url) if url is not None else None
        self.warning = redact(warning) if warning else None
        parts = [f"{step}: HTTP {status}"]
        if code:
            parts.append(code + (f"/{subcode}" if subcode else ""))
        if self.service_message:
            parts.append(repr(self.service_message[:200]))
        if correlation_id:
            parts.append(f"correlation-id={correlation_id}")
        super().__init__(" ".join(parts))


class AuthError(AnonJoinError):
    """Azure AD did not issue a token (wrong secret, unknown client, unreachable authority, 5xx)."""

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        correlation_id: str | None = None,
        retryable: bool = False,
    ) -> None:
        self.error = error
        self.correlation_id = correlation_id
        self.retryable = retryable
        text = redact(message)
        if error:
            text = f"{error}: {text}"
        if correlation_id:
            text += f" (correlation-id={correlation_id})"
        super().__init__(text)


class ProtocolError(AnonJoinError):
    """A response (or an input to the state machine) that anonjoin cannot use. Final for the guest."""

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        status: int | None = None,
        body: bytes | str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        self.step = step
        self.status = status
        self.body = clip_body(body)
        self.correlation_id = correlation_id
        parts = [redact(message)]
        if step:
            parts.insert(0, f"{step}:")
        if status is not None:
            parts.append(f"(HTTP {status})")
        if self.body:
            parts.append(f"body: {self.body!r}")
        if correlation_id:
            parts.append(f"correlation-id={correlation_id}")
        super().__init__(" ".join(parts))


class InsecureTarget(ProtocolError):
    """A request carrying a token (AAD bearer or psat) would go over http, or to a host outside the
    service's trusted set (see ``anonjoin._async.http``): refused before anything is sent. Final, never
    retried."""


class CapabilityNotAvailable(AnonJoinError):
    """The application's capabilities lack a link the operation needs: final, nothing was sent."""

    def __init__(self, capability: str) -> None:
        self.capability = capability
        super().__init__(
            f"capability {capability!r} is not available to this application "
            "(the tenant admin has not consented to it)"
        )


class JoinFailed(AnonJoinError):
    """A guest ended without joining. ``reason`` is a short stable word (``Denied``, ``Ended``, ...)."""

    def __init__(self, reason: str, message: str = "", *, cause_step: str | None = None) -> None:
        self.reason = reason
        self.cause_step = cause_step
        super().__init__(f"{reason}: {redact(message)}" if message else reason)


class StoreError(AnonJoinError):
    """The session store cannot be read or written (corrupt, locked, unwritable)."""


class LeaseHeld(StoreError):
    """A claim was refused: another instance holds the guest's lease."""

    def __init__(self, guest_id: str) -> None:
        self.guest_id = guest_id
        super().__init__(
            f"guest {guest_id!r} is held by another instance (its lease is live); try again later"
        )


class LeaseLost(StoreError):
    """A write under a lease was refused by the fence: the lease lapsed or a newer holder took the guest."""

    def __init__(self, guest_ids: list[str] | tuple[str, ...]) -> None:
        self.guest_ids = tuple(guest_ids)
        shown = ", ".join(repr(g) for g in self.guest_ids[:5]) + (" ..." if len(self.guest_ids) > 5 else "")
        super().__init__(f"lease lost for guest {shown}: another instance may hold it now; write refused")
