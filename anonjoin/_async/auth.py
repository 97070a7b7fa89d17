"""Azure AD client credentials for the service application, through msal.

One :class:`Credential` serves every guest of a service application:

- msal is synchronous and does network I/O in its constructor (OpenID discovery), so the
  ``ConfidentialClientApplication`` is built, and every token acquired, in one dedicated worker thread.
- **Single flight**: however many callers ask at once, at most one token request is in flight; the others
  await its result (``asyncio.shield``: a cancelled caller never cancels the fetch for the rest).
- **Refresh ahead**: a token within ``refresh_margin_s`` of its expiry (or past half its life, when it
  lives shorter than twice the margin) is replaced before it is handed out.
  If that early refresh fails while the old token is still valid, the old token is returned (and the
  failure logged), so an Azure AD hiccup near the end of a token's life does not fail guests.
- **Forced refresh**: after a 401 or a 403 ``InvalidToken`` the caller passes the rejected token to
  :meth:`Credential.refresh`. Unless another caller already replaced it, the access token is removed from
  msal's token cache (msal has no ``force_refresh`` for client credentials) together with msal's throttle
  cache, so the next token comes from the server.
- msal's error dict (``error``, ``error_description``, ``correlation_id``) and the exceptions of msal
  (it raises on a 5xx) and requests (connection errors) become one :class:`anonjoin.AuthError`;
  ``retryable`` is set for 5xx, 429 and connection failures.
- TLS: msal gets ``http_client=`` a ``requests.Session`` with ``trust_env = False`` (so
  ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` cannot override the CA) and ``verify = ca_file or True``; and
  ``instance_discovery=False`` for an authority that is not a Microsoft host (otherwise msal first asks
  ``login.microsoftonline.com`` about it).

msal's throttle cache: msal replays a recent 5xx/429 (for its ``Retry-After``, 5 s when none is given) and
a 400 (60 s) for the same request without calling the server. :meth:`Credential.token` keeps that
behaviour (it protects Azure AD from retry storms: the replayed error is again an ``AuthError``, with the
same ``retryable``); :meth:`Credential.refresh` clears it.

Neither the client secret, nor the private key, nor a token value appears in any ``repr``, ``str``, log
line or exception message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol, Self, runtime_checkable
from urllib.parse import urlsplit

import msal
import requests
from msal.exceptions import MsalServiceError
from pydantic import SecretStr

from anonjoin._exceptions import AuthError, ConfigurationError, redact, redact_url

__all__ = [
    "DEFAULT_AUTH_TIMEOUT_S",
    "DEFAULT_REFRESH_MARGIN_S",
    "AccessToken",
    "CertificateCredential",
    "ClientSecretCredential",
    "Credential",
    "is_microsoft_authority",
]

logger = logging.getLogger("anonjoin.auth")

DEFAULT_REFRESH_MARGIN_S = 300.0
"""Replace a token this long before it expires (msal itself treats < 5 minutes left as expired)."""
DEFAULT_AUTH_TIMEOUT_S = 30.0
"""Connect and read timeout of each request to Azure AD."""
MIN_FALLBACK_VALIDITY_S = 30.0
"""An early refresh that fails falls back to the old token only if it is valid this much longer."""
FAILED_REFRESH_PAUSE_S = 10.0
"""After a failed early refresh, the old token is handed out this long (at most) before the next try."""

# Hosts of Microsoft's public and national clouds (msal's list): instance discovery applies to these only.
_MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.de",
        "login-us.microsoftonline.com",
        "login.microsoftonline.us",
        "login.usgovcloudapi.net",
        "login.sovcloud-identity.fr",
        "login.sovcloud-identity.de",
        "login.sovcloud-identity.sg",
    }
)

# Azure AD error codes that mean "try again later" rather than "your request is wrong".
_RETRYABLE_AAD_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
_HTTP_STATUS_IN_MSAL_ERROR = re.compile(r"HTTP Error: (\d{3})")
_AAD_ERROR_CODE = re.compile(r'"error"\s*:\s*"([A-Za-z_]{1,60})"')


@dataclass(frozen=True, slots=True)
class AccessToken:
    """An Azure AD access token. ``value`` never appears in ``repr``/``str``.

    ``expires_at`` is on the credential's clock (``time.time`` unless a test injected another).
    """

    value: str = field(repr=False)
    expires_at: float

    def expires_in(self, now: float) -> float:
        return self.expires_at - now


@runtime_checkable
class Credential(Protocol):
    """What the client needs from a credential."""

    async def token(self) -> AccessToken:
        """A valid token: cached, single flight, refreshed ahead of expiry."""
        ...

    async def refresh(self, rejected: AccessToken) -> AccessToken:
        """A token newer than ``rejected``, bypassing msal's cache unless someone already refreshed."""
        ...

    async def aclose(self) -> None:
        """Release the worker thread and the HTTP session."""
        ...


def is_microsoft_authority(authority: str) -> bool:
    """True when ``authority`` is on one of Microsoft's Azure AD hosts (msal's instance discovery applies)."""
    host = (urlsplit(authority).hostname or "").lower()
    return host in _MICROSOFT_AUTHORITY_HOSTS


class _AadSession(requests.Session):
    """The ``requests.Session`` msal uses: environment ignored, explicit CA, a default timeout.

    It also records the status of the last response it really received: msal hides it, and it tells a
    429 from a 400 and a real request from one msal answered out of its caches.
    """

    def __init__(self, *, verify: bool | str, timeout: float, proxies: Mapping[str, str] | None) -> None:
        super().__init__()
        self.trust_env = False  # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE / proxies from the environment
        self.verify = verify
        if proxies:
            self.proxies.update(proxies)
        self._default_timeout = timeout
        self.sent = 0
        self.last_status: int | None = None

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self._default_timeout)
        self.sent += 1
        response = super().request(method, url, *args, **kwargs)
        self.last_status = response.status_code
        return response


class _MsalCredential:
    """The shared machinery of :class:`ClientSecretCredential` and :class:`CertificateCredential`."""

    def __init__(
        self,
        *,
        authority: str,
        client_id: str,
        scope: str,
        ca_file: str | None,
        verify_tls: bool,
        refresh_margin_s: float,
        timeout_s: float,
        instance_discovery: bool | None,
        proxies: Mapping[str, str] | None,
        clock: Callable[[], float],
        secret_values: tuple[SecretStr, ...],
    ) -> None:
        parts = urlsplit(authority)
        if parts.scheme != "https" or not parts.hostname or parts.path.strip("/") == "":
            raise ConfigurationError(
                f"authority must be an https URL with a tenant path, "
                f"like https://login.microsoftonline.com/<tenant>; got {redact_url(authority)!r}"
            )
        if not client_id:
            raise ConfigurationError("client_id must not be empty")
        if not scope:
            raise ConfigurationError("scope must not be empty")
        if refresh_margin_s < 0:
            raise ConfigurationError("refresh_margin_s must be >= 0")
        if timeout_s <= 0:
            raise ConfigurationError("timeout_s must be > 0")
        self.authority = authority.rstrip("/")
        self.client_id = client_id
        self.scope = scope
        self.ca_file = ca_file
        self.verify_tls = verify_tls
        self.refresh_margin_s = refresh_margin_s
        self._clock = clock
        self._secret_values = tuple(s for s in secret_values if len(s.get_secret_value()) >= 4)
        if instance_discovery is None:
            instance_discovery = is_microsoft_authority(self.authority)
        self._instance_discovery = instance_discovery
        verify: bool | str = (ca_file or True) if verify_tls else False
        self._session = _AadSession(verify=verify, timeout=timeout_s, proxies=proxies)
        self._token_cache = msal.TokenCache()
        self._http_cache: MutableMapping[str, Any] = {}
        self._app: Any = None  # msal.ConfidentialClientApplication, built in the worker thread
        self._app_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="anonjoin-auth"
        )
        self._current: AccessToken | None = None
        self._refresh_at = 0.0  # when the current token becomes due for an early refresh
        self._inflight: asyncio.Task[AccessToken] | None = None
        self._closed = False
        self.requests_sent = 0
        """Requests this credential sent to Azure AD (OpenID discovery included); for tests and reports."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(authority={redact_url(self.authority)!r}, "
            f"client_id={self.client_id!r}, scope={self.scope!r})"
        )

    __str__ = __repr__

    # -- the public face ------------------------------------------------------------------------------

    async def token(self) -> AccessToken:
        current = self._current
        if current is not None and not self._closed and self._inflight is None and not self._due(current):
            return current
        return await self._single_flight(rejected=None)

    async def refresh(self, rejected: AccessToken) -> AccessToken:
        return await self._single_flight(rejected=rejected)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
        # Close the session on the worker thread, after any acquisition still running there.
        closing = self._executor.submit(self._session.close)
        self._executor.shutdown(wait=False)
        try:
            await asyncio.wrap_future(closing)
        except Exception:  # pragma: no cover - closing a session does not fail in practice
            logger.debug("anonjoin.auth.close_failed", exc_info=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- single flight --------------------------------------------------------------------------------

    def _due(self, token: AccessToken) -> bool:
        if token is self._current:
            return self._clock() >= self._refresh_at
        return self._clock() >= token.expires_at - self.refresh_margin_s

    async def _single_flight(self, rejected: AccessToken | None) -> AccessToken:
        if self._closed:
            raise AuthError("the credential is closed")
        for _ in range(3):
            task = self._inflight
            if task is None:
                current = self._current
                if (
                    current is not None
                    and not self._due(current)
                    and (rejected is None or current.value != rejected.value)
                ):
                    return current  # fresh, or someone already refreshed past `rejected`
                bypass = current is not None or rejected is not None
                task = asyncio.get_running_loop().create_task(
                    self._fetch(bypass=bypass, fallback=rejected is None)
                )
                self._inflight = task
                task.add_done_callback(self._fetch_done)
                started_here = True
            else:
                started_here = False
            try:
                token = await asyncio.shield(task)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if task.cancelled() and self._closed and (me is None or not me.cancelling()):
                    raise AuthError("the credential was closed while acquiring a token") from None
                raise
            # A fetch we joined may have been served from msal's cache: if it handed back the very token
            # that was rejected, go round once more with a fetch that bypasses the cache.
            if rejected is None or token.value != rejected.value or started_here:
                return token
        raise AuthError("Azure AD returned the rejected token again")  # pragma: no cover - defensive

    def _fetch_done(self, task: asyncio.Task[AccessToken]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # mark retrieved: a failure nobody awaited is not "never retrieved"

    async def _fetch(self, *, bypass: bool, fallback: bool) -> AccessToken:
        previous = self._current if fallback else None
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            result, sent = await loop.run_in_executor(self._executor, self._acquire_blocking, bypass)
        except AuthError as exc:
            now = self._clock()
            if previous is not None and previous.expires_in(now) > MIN_FALLBACK_VALIDITY_S:
                # Ask again a little later, not on every call: a load test would storm Azure AD (and the log).
                self._refresh_at = now + min(FAILED_REFRESH_PAUSE_S, previous.expires_in(now) / 4)
                logger.warning(
                    "anonjoin.auth.refresh_failed: keeping the current token (%.0f s left): %s",
                    previous.expires_in(self._clock()),
                    exc,
                    extra={"event": "anonjoin.auth.refresh_failed"},
                )
                return previous
            logger.warning(
                "anonjoin.auth.failed: %s",
                exc,
                extra={"event": "anonjoin.auth.failed", "correlation_id": exc.correlation_id},
            )
            raise
        except RuntimeError as exc:  # the executor was shut down under us
            raise AuthError("the credential is closed") from exc
        token = self._token_from_result(result)
        # Refresh `margin` before expiry, but never in the first half of a token's life: a token that
        # lives shorter than the margin would otherwise be "due" at once and every caller would fetch.
        now = self._clock()
        lifetime = max(token.expires_at - now, 0.0)
        self._refresh_at = now + max(lifetime - self.refresh_margin_s, lifetime / 2)
        self._current = token
        logger.debug(
            "anonjoin.auth.token: expires in %.0f s (%s, %.0f ms)",
            token.expires_in(self._clock()),
            "from Azure AD" if sent else "from msal's cache",
            (time.monotonic() - started) * 1000,
            extra={"event": "anonjoin.auth.token"},
        )
        return token

    def _token_from_result(self, result: Mapping[str, Any]) -> AccessToken:
        value = result.get("access_token")
        if not isinstance(value, str) or not value:
            raise AuthError("Azure AD answered without an access_token")
        try:
            expires_in = float(result.get("expires_in", 0))
        except (TypeError, ValueError) as exc:
            raise AuthError("Azure AD answered with an unreadable expires_in") from exc
        return AccessToken(value=value, expires_at=self._clock() + expires_in)

    # -- the worker thread ----------------------------------------------------------------------------

    def _client_credential(self) -> str | dict[str, str]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _build_app(self) -> Any:
        return msal.ConfidentialClientApplication(
            self.client_id,
            client_credential=self._client_credential(),
            authority=self.authority,
            token_cache=self._token_cache,
            http_client=self._session,
            http_cache=self._http_cache,
            instance_discovery=self._instance_discovery,
        )

    def _acquire_blocking(self, bypass: bool) -> tuple[dict[str, Any], bool]:
        """Runs on the worker thread: build the app if needed, drop caches if asked, acquire."""
        sent_before = self._session.sent
        try:
            with self._app_lock:
                if bypass:
                    self._drop_cached_tokens()
                if self._app is None:
                    self._app = self._build_app()
                result = self._app.acquire_token_for_client(scopes=[self.scope])
        except Exception as exc:
            raise self._translate_exception(exc) from exc
        finally:
            self.requests_sent += self._session.sent - sent_before
        if not isinstance(result, dict):
            raise AuthError("msal returned no result")
        if "error" in result:
            raise self._translate_error(result)
        if "access_token" not in result:
            raise self._translate_status(self._session.last_status)
        return result, self._session.sent > sent_before

    def _drop_cached_tokens(self) -> None:
        kind = msal.TokenCache.CredentialType.ACCESS_TOKEN
        cached = list(self._token_cache.search(kind, query={"client_id": self.client_id}))
        for entry in cached:
            self._token_cache.remove_at(entry)
        self._http_cache.clear()  # msal's throttle cache: a forced refresh asks the server

    # -- translating msal's and requests' failures ----------------------------------------------------

    def _scrub(self, text: str, limit: int = 300) -> str:
        for secret in self._secret_values:
            text = text.replace(secret.get_secret_value(), "[redacted]")
        text = redact(" ".join(text.split()))
        return text if len(text) <= limit else text[:limit] + "..."

    def _translate_error(self, result: Mapping[str, Any]) -> AuthError:
        error = str(result.get("error") or "unknown_error")
        description = str(result.get("error_description") or "")
        first_line = description.strip().splitlines()[0] if description.strip() else "token request refused"
        correlation_id = result.get("correlation_id")
        status = self._session.last_status
        retryable = error in _RETRYABLE_AAD_ERRORS or status == 429 or (status is not None and status >= 500)
        return AuthError(
            f"Azure AD refused the token request for client {self.client_id}: {self._scrub(first_line)}",
            error=self._scrub(error, 80),
            correlation_id=str(correlation_id) if correlation_id else None,
            retryable=retryable,
        )

    def _translate_status(self, status: int | None) -> AuthError:
        """A JSON answer without a token and without an OAuth error (a 429 from a gateway, say)."""
        where = redact_url(self.authority)
        if status is None or status < 400:
            return AuthError(
                f"Azure AD at {where} answered without an access_token", error="invalid_response"
            )
        return AuthError(
            f"Azure AD at {where} answered HTTP {status}",
            error=f"http_{status}",
            retryable=status == 429 or status >= 500,
        )

    def _translate_exception(self, exc: BaseException) -> AuthError:
        where = redact_url(self.authority)
        if isinstance(exc, requests.exceptions.SSLError):
            why = _ssl_reason(exc)  # the key words first: requests' own text buries them after the URL
            return AuthError(
                f"TLS failure talking to {where} (check --ca-file): {self._scrub(why or str(exc), 200)}",
                error="tls_error",
            )
        if isinstance(exc, requests.exceptions.Timeout):
            return AuthError(f"Azure AD at {where} timed out", error="timeout", retryable=True)
        if isinstance(exc, requests.exceptions.ConnectionError):
            return AuthError(
                f"cannot reach Azure AD at {where}: {self._scrub(_connection_reason(exc), 200)}",
                error="connection_error",
                retryable=True,
            )
        if isinstance(exc, MsalServiceError):
            match = _HTTP_STATUS_IN_MSAL_ERROR.search(str(exc))
            status = int(match.group(1)) if match else self._session.last_status
            return AuthError(
                f"Azure AD at {where} answered HTTP {status if status else '5xx'}",
                error=f"http_{status}" if status else "server_error",
                retryable=status is None or status >= 500 or status == 429,
            )
        if isinstance(exc, requests.exceptions.RequestException):
            return AuthError(
                f"request to Azure AD at {where} failed: {self._scrub(str(exc), 200)}",
                error="request_error",
                retryable=True,
            )
        if isinstance(exc, ValueError) and str(exc).startswith("Unable to get authority configuration"):
            # OpenID discovery answered 4xx (an unknown tenant, say); the AAD error code is in the context.
            status = self._session.last_status
            code = _AAD_ERROR_CODE.search(str(exc.__context__ or ""))
            return AuthError(
                f"Azure AD has no OpenID configuration for {where}"
                + (f" (HTTP {status})" if status else "")
                + ": check the authority and tenant",
                error=code.group(1) if code else (f"http_{status}" if status else "invalid_authority"),
            )
        if isinstance(exc, ValueError):
            # A response that is not JSON, or another answer msal could not use.
            status = self._session.last_status
            retryable = status is not None and (status >= 500 or status == 429)
            return AuthError(
                f"unusable answer from Azure AD at {where}: {self._scrub(str(exc), 200)}",
                error="invalid_response" if status in (None, 200) else f"http_{status}",
                retryable=retryable,
            )
        return AuthError(
            f"acquiring a token from {where} failed: {type(exc).__name__}: {self._scrub(str(exc), 200)}",
            error="unexpected_error",
        )


_ERRNO_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _connection_reason(exc: BaseException) -> str:
    """The short reason inside requests' long connection error ("Connection refused", ...)."""
    text = str(exc)
    match = _ERRNO_REASON.search(text)
    if match:
        return match.group(1).strip()
    if "Name or service not known" in text or "getaddrinfo failed" in text:
        return "name resolution failed"
    return text


class ClientSecretCredential(_MsalCredential):
    """Client credentials with a client secret (``client_secret`` accepts a ``str`` or ``SecretStr``)."""

    def __init__(
        self,
        *,
        authority: str,
        client_id: str,
        client_secret: str | SecretStr,
        scope: str,
        ca_file: str | None = None,
        verify_tls: bool = True,
        refresh_margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        timeout_s: float = DEFAULT_AUTH_TIMEOUT_S,
        instance_discovery: bool | None = None,
        proxies: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        secret = client_secret if isinstance(client_secret, SecretStr) else SecretStr(client_secret)
        if not secret.get_secret_value():
            raise ConfigurationError("client_secret must not be empty")
        self._client_secret = secret
        super().__init__(
            authority=authority,
            client_id=client_id,
            scope=scope,
            ca_file=ca_file,
            verify_tls=verify_tls,
            refresh_margin_s=refresh_margin_s,
            timeout_s=timeout_s,
            instance_discovery=instance_discovery,
            proxies=proxies,
            clock=clock,
            secret_values=(secret,),
        )

    def _client_credential(self) -> str:
        return self._client_secret.get_secret_value()


class CertificateCredential(_MsalCredential):
    """Client credentials with a certificate: a PEM private key and the certificate's SHA-1 thumbprint.

    ``public_certificate`` (PEM), when given, is sent as ``x5c`` (subject name / issuer authentication).
    """

    def __init__(
        self,
        *,
        authority: str,
        client_id: str,
        private_key_pem: str | SecretStr,
        thumbprint: str,
        scope: str,
        public_certificate: str | None = None,
        ca_file: str | None = None,
        verify_tls: bool = True,
        refresh_margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        timeout_s: float = DEFAULT_AUTH_TIMEOUT_S,
        instance_discovery: bool | None = None,
        proxies: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        key = private_key_pem if isinstance(private_key_pem, SecretStr) else SecretStr(private_key_pem)
        if "PRIVATE KEY" not in key.get_secret_value():
            raise ConfigurationError("private_key_pem must be a PEM private key")
        digits = thumbprint.replace(":", "").strip()
        if not re.fullmatch(r"[0-9A-Fa-f]{40}", digits):
            raise ConfigurationError("thumbprint must be the certificate's SHA-1 thumbprint (40 hex digits)")
        self._private_key = key
        self.thumbprint = digits.upper()
        self._public_certificate = public_certificate
        super().__init__(
            authority=authority,
            client_id=client_id,
            scope=scope,
            ca_file=ca_file,
            verify_tls=verify_tls,
            refresh_margin_s=refresh_margin_s,
            timeout_s=timeout_s,
            instance_discovery=instance_discovery,
            proxies=proxies,
            clock=clock,
            secret_values=(key,),
        )

    def _client_credential(self) -> dict[str, str]:
        credential = {"private_key": self._private_key.get_secret_value(), "thumbprint": self.thumbprint}
        if self._public_certificate:
            credential["public_certificate"] = self._public_certificate
        return credential


def _ssl_reason(exc: BaseException) -> str | None:
    """The ``ssl`` error inside requests' wrapping (``SSLError(MaxRetryError(... SSLError(...))))``), as its
    own short text, e.g. ``certificate verify failed: self-signed certificate in certificate chain``."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo and len(seen) < 16:  # bounded: a chain is a few links deep
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {e.verify_message}" if e.verify_message else str(e)
        if isinstance(e, ssl.SSLError) and e.reason:
            return f"TLS error {e.reason} (is it https on this port?)"
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None), *e.args])
    return None
