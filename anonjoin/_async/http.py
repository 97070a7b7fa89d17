"""The one request helper: the only code that touches aiohttp.

Every request carries a fresh ``client-request-id``; one ``307`` is followed with the same method, body,
``Authorization`` and ``Origin`` (to an http(s) URL only); bodies are read bounded (``MAX_BODY_BYTES``);
any 2xx is success; an error status becomes :class:`ServiceError` (status, code, subcode, correlation id,
``Retry-After`` in seconds, a clipped body); aiohttp/ssl/OS errors become :class:`RequestNotSentError`
(nothing left the client) or :class:`MaybeSentError` (it may have been processed), with ``raise ... from``.

The token rule (issue 11), enforced in :meth:`HttpClient.request`, the one place requests are sent, for
every hop: a request carrying ``Authorization`` (the AAD bearer or the psat) goes only over https and only
to a host of the service. The trusted hosts (names, any port) are: the discover URL's host
(:meth:`HttpClient.trust`); a host named by an absolute https ``href`` in a 2xx answer received over https
from a trusted host; a host a trusted host redirected to with a 307 over https (https to https) on a request
without a token (the pool redirect of discover and the anonymous discover). A redirect of a request that
carries a token must stay among the trusted hosts. Anything else is :class:`InsecureTarget`, raised before
the request leaves (final: :func:`anonjoin._core.protocol.classify` never retries it).
``verify_tls=False`` does not lift the rule.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from anonjoin._async.retry import Attempt
from anonjoin._async.tls import LeanTLSConnector
from anonjoin._core import constants as C
from anonjoin._core.events import Step, log_event
from anonjoin._core.trust import TrustedHosts
from anonjoin._core.wire import service_error
from anonjoin._exceptions import (
    ConfigurationError,
    InsecureTarget,
    MaybeSentError,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    redact_url,
)

log = logging.getLogger("anonjoin.http")

_CORRELATION = ("X-MS-Correlation-Id", "X-Ms-Correlation-Id", "ms-cv", "x-ms-request-id")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    url: URL
    headers: CIMultiDictProxy[str]
    body: bytes
    client_request_id: str
    correlation_id: str | None


_ids = random.Random()
_getrandbits = _ids.getrandbits


def request_id() -> str:
    """A GUID-shaped ``client-request-id`` (correlation only, not a secret: no need for uuid4's urandom)."""
    h = f"{_getrandbits(128) | (1 << 127):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:32]}"


def make_ssl_context(ca_file: str | None, verify_tls: bool) -> ssl.SSLContext:
    """TLS verified by default: the given CA file, else the system's default trust store."""
    if not verify_tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log_event(log, logging.WARNING, "anonjoin.tls.insecure", "TLS verification is OFF (verify_tls=False)")
        return ctx
    try:
        return ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load CA file {ca_file!r}: {exc}") from exc


def parse_http_date(value: str | None) -> float | None:
    """An HTTP date (a ``Date`` header, a ``Retry-After`` date) as epoch seconds, or None."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:  # pragma: no cover - older Pythons
        return None
    return when.timestamp()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (never negative)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = parse_http_date(value)
    if when is None:
        return None
    return max(0.0, when - (time.time() if now is None else now))


class HttpClient:
    """One connection pool. Ordinary requests take one of ``max_connections`` slots; parked event polls
    do not count (each held guest keeps one poll parked, so a cap there would starve the joins), but they
    share the pool, so a connection freed by a poll serves the next request.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        max_connections: int,
        user_agent: str,
        connect_timeout_s: float,
        max_body: int = C.MAX_BODY_BYTES,
    ) -> None:
        if max_connections < 1:
            raise ConfigurationError("max_connections must be at least 1")
        self._ssl = ssl_context
        self._slots = asyncio.Semaphore(max_connections)
        self._user_agent = user_agent
        self._connect_timeout = connect_timeout_s
        self.max_body = max_body
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._closed = False
        self._trusted = TrustedHosts()

    def trust(self, url: URL) -> None:
        """Make ``url``'s host one a token may be sent to (over https only): the discover URL's host."""
        self._trusted.trust(url)

    def trusted(self, url: URL) -> bool:
        """Whether a request carrying a token may go to ``url`` (https, and a host of the service)."""
        return self._trusted.trusted(url)

    def session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._session is None:
            connector = LeanTLSConnector(limit=0, ssl=self._ssl)  # one TLS read buffer for all
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,
                headers={"User-Agent": self._user_agent, "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            )
        return self._session

    def _timeout(self, seconds: float, cut: bool = False) -> aiohttp.ClientTimeout:
        if cut:  # a deadline within the attempt: everything, connecting included, ends by it
            return aiohttp.ClientTimeout(total=seconds, sock_connect=min(seconds, self._connect_timeout))
        t = self._timeouts.get(seconds)
        if t is None:
            # One timer per request (``total``); a ``sock_read`` timer would be re-armed on every chunk read.
            t = aiohttp.ClientTimeout(
                total=seconds + self._connect_timeout, sock_connect=self._connect_timeout
            )
            if len(self._timeouts) < 64:
                self._timeouts[seconds] = t
        return t

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
        self._session = None

    async def request(
        self,
        step: Step,
        method: str,
        url: URL,
        attempt: Attempt,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        poll: bool = False,
        quiet: Callable[[], bool] | None = None,
    ) -> Response:
        """Send one request (following one 307) and return a 2xx response, or raise a typed error.

        ``quiet``: when it returns True as an error status arrives, the response is returned instead of
        raised (a poll released by our own DELETE: an expected end, not a failure to report).
        """
        crid = request_id()
        attempt.client_request_id = crid
        hdrs = {"client-request-id": crid}
        if headers:
            hdrs.update(headers)
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        slots = None if poll else self._slots
        if slots is not None:
            await slots.acquire()
        try:
            session = self.session()
            timeout = self._timeout(attempt.timeout_s, attempt.cut)
            target = url
            debug = log.isEnabledFor(logging.DEBUG)
            token = "Authorization" in hdrs or any(k.lower() == "authorization" for k in hdrs)
            for hop in range(2):
                if token and not self.trusted(target):
                    raise _insecure(step, target, hop)
                if debug:
                    log_event(
                        log,
                        logging.DEBUG,
                        "anonjoin.http.request",
                        method=method,
                        url=redact_url(target),
                        step=step,
                        client_request_id=crid,
                    )
                try:
                    async with session.request(
                        method, target, headers=hdrs, data=body, allow_redirects=False, timeout=timeout
                    ) as resp:
                        status = resp.status
                        corr = _correlation(resp.headers)
                        attempt.status, attempt.correlation_id = status, corr
                        if 300 <= status < 400 and status not in (304,):
                            if status not in (307, 308) or hop > 0:
                                raise ProtocolError(
                                    "unexpected redirect" if hop == 0 else "more than one redirect",
                                    step=step,
                                    status=status,
                                    correlation_id=corr,
                                )
                            location = resp.headers.get("Location")
                            if not location:
                                raise ProtocolError(
                                    "307 without Location", step=step, status=status, correlation_id=corr
                                )
                            new = _redirect_target(target, location, step)
                            if not token and self.trusted(target) and new.scheme == "https":
                                self.trust(new)  # the service's pool, named over https by a trusted host
                            target = new
                            log_event(
                                log,
                                logging.DEBUG,
                                "anonjoin.http.redirect",
                                step=step,
                                url=redact_url(target),
                                client_request_id=crid,
                            )
                            continue
                        data = await self._read(resp, step, corr)
                        if 200 <= status < 300:
                            self._trusted.learn(target, data)
                            return Response(status, resp.url, resp.headers, data, crid, corr)
                        if quiet is not None and quiet():
                            return Response(status, resp.url, resp.headers, data, crid, corr)
                        raise _service_error(step, status, resp.headers, data, target, crid, corr)
                except (ServiceError, ProtocolError):
                    raise
                except aiohttp.ClientConnectorCertificateError as exc:  # retrying will not fix it
                    cert = exc.certificate_error
                    detail = getattr(cert, "verify_message", None) or cert  # lead with what to do, then why
                    raise RequestNotSentError(
                        "TLS certificate not trusted (check --ca-file: it must hold the CA that signed "
                        f"the server's certificate): {detail}",
                        step=step,
                        url=target,
                        final=True,
                        cause=f"TLS certificate of {_authority(target)} not trusted: check --ca-file",
                    ) from exc
                except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake
                    cause = _connect_cause(exc, target)
                    detail = f"{type(exc).__name__}: {exc.os_error or exc}"
                    raise RequestNotSentError(
                        f"{cause} ({detail})" if cause else detail, step=step, url=target, cause=cause
                    ) from exc
                except aiohttp.ConnectionTimeoutError as exc:
                    raise RequestNotSentError("connect timeout", step=step, url=target) from exc
                except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
                    raise MaybeSentError("read timeout", step=step, url=target) from exc
                except (
                    aiohttp.ServerDisconnectedError,
                    aiohttp.ClientPayloadError,
                    aiohttp.ClientOSError,
                ) as exc:
                    reason = f"{type(exc).__name__}: connection lost"
                    raise MaybeSentError(reason, step=step, url=target) from exc
                except aiohttp.InvalidURL as exc:
                    raise ProtocolError(f"invalid URL {redact_url(target)!r}", step=step) from exc
                except aiohttp.ClientResponseError as exc:
                    raise MaybeSentError(
                        f"bad response: {exc.status} {exc.message}", step=step, url=target
                    ) from exc
                except aiohttp.ClientError as exc:
                    raise MaybeSentError(f"{type(exc).__name__}", step=step, url=target) from exc
                except ssl.SSLError as exc:
                    cause = _tls_cause(target)
                    raise RequestNotSentError(
                        f"{cause} (TLS: {exc.reason})", step=step, url=target, cause=cause
                    ) from exc
            raise ProtocolError("more than one redirect", step=step, status=307)
        finally:
            if slots is not None:
                slots.release()

    async def _read(self, resp: aiohttp.ClientResponse, step: Step, corr: str | None) -> bytes:
        limit = self.max_body
        length = resp.content_length
        if length is not None and length <= limit:
            return await resp.read()  # exactly Content-Length bytes
        if length is not None:
            raise ProtocolError(
                f"response body of {length} bytes exceeds {limit}",
                step=step,
                status=resp.status,
                correlation_id=corr,
            )
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await resp.content.read(65536)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise ProtocolError(
                    f"response body exceeds {limit} bytes", step=step, status=resp.status, correlation_id=corr
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _correlation(headers: Mapping[str, str]) -> str | None:
    for name in _CORRELATION:
        v = headers.get(name)
        if v:
            return v[:100]
    return None


def _authority(url: URL) -> str:
    return f"{url.host}:{url.port}" if url.port is not None else str(url.host)


def _tls_cause(url: URL) -> str:
    return (
        f"TLS handshake with {_authority(url)} failed: does that port speak TLS (https)? "
        "check the URL's scheme and port, and --ca-file"
    )


def _connect_cause(exc: aiohttp.ClientConnectorError, url: URL) -> str | None:
    """What failed and what to do, for a connection that could not be made for a known reason."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {url.host!r}: check the URL's host name"
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return _tls_cause(url)
    if isinstance(exc.os_error, ConnectionRefusedError):
        return f"connection refused by {_authority(url)}: is the service running there? check the URL's port"
    return None


def _redirect_target(current: URL, location: str, step: Step) -> URL:
    try:
        target = current.join(URL(location))
    except (ValueError, TypeError) as exc:
        raise ProtocolError("unusable redirect Location", step=step, status=307) from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise ProtocolError(
            f"refusing a redirect off http(s) to {redact_url(location)[:60]!r}", step=step, status=307
        )
    return target


def _insecure(step: Step, target: URL, hop: int) -> InsecureTarget:
    what = "a redirect" if hop else "a request"
    if target.scheme != "https":
        why = f"refusing to send a token over {target.scheme or 'a non-https URL'}"
        if target.scheme == "http" and not hop:
            why += f": use {redact_url(target.with_scheme('https'))}"
    else:
        why = f"refusing to send a token to {target.host!r}, not a host of the service"
    return InsecureTarget(f"{why} ({what})", step=step, status=307 if hop else None)


def _service_error(
    step: Step, status: int, headers: Mapping[str, str], body: bytes, url: URL, crid: str, corr: str | None
) -> ServiceError:
    retry_after = parse_retry_after(headers.get("Retry-After"))
    return service_error(step, status, headers, body, url, crid, corr, retry_after)
