"""TLS connections without asyncio's 256 KiB read buffer each: :class:`LeanTLSConnector`.

Why: asyncio's TLS transport (``asyncio.sslproto.SSLProtocol``, Python 3.11+) gives every connection its own
receive buffer of ``SSLProtocol.max_size`` bytes (256 KiB), allocated and zero-filled as the connection is
made. A held guest keeps one connection (its parked event poll), so that buffer alone was about two thirds
of the client's memory per held guest. The buffer only carries bytes from the socket to OpenSSL: the
transport fills it (``recv_into``) and hands it over (``buffer_updated`` copies it into the connection's
``ssl.MemoryBIO``) in one synchronous callback, so on a selector event loop every connection of a connector
can share one buffer, and a held connection costs no read buffer at all.

The shared buffer is small (:data:`RECV_BUFFER_BYTES`, one TLS record) on purpose: OpenSSL's memory BIO
never gives back what it grew to, and it grows to the largest read fed to it, so with 256 KiB reads a
connection that once received a 200 KB body keeps about 165 KB more for the rest of its life (16 KiB reads:
about 20 KB). The decoded peer certificate asyncio keeps per connection (``get_extra_info("peercert")``,
about 2 KB) is decoded again when asked for instead.

Rules of this module:

* Nothing global changes: asyncio's classes are subclassed, never patched, and only connections made by a
  :class:`LeanTLSConnector` use the subclass.
* TLS itself is asyncio's and OpenSSL's, unchanged: the same ``SSLContext`` (certificate and hostname
  verification, SNI from ``server_hostname``), the same handshake and shutdown timeouts, the same errors
  (a certificate refused is still ``aiohttp.ClientConnectorCertificateError``, another TLS error still
  ``aiohttp.ClientConnectorSSLError``, a refused connection ``aiohttp.ClientConnectorError``), and the
  connect timeout (``ClientTimeout.sock_connect``) still covers connect and handshake together.
* It relies on private asyncio details (``SSLProtocol._ssl_buffer``/``_ssl_buffer_view``, read by
  ``get_buffer``/``buffer_updated``) and on aiohttp's ``TCPConnector._wrap_create_connection`` hook, so it
  checks for them and falls back to aiohttp's stock path when any is missing, when the loop is not a stdlib
  selector loop (uvloop, Windows' proactor), or for a connection that is not TLS.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import asyncio.sslproto
import inspect
import ssl
from collections.abc import Callable
from typing import Any, Final

import aiohttp
from aiohttp.client_proto import ResponseHandler

__all__ = ["READ_CHUNK_BYTES", "RECV_BUFFER_BYTES", "LeanTLSConnector", "lean_tls_supported"]

RECV_BUFFER_BYTES: Final = 16 * 1024
"""The receive buffer a connector's TLS connections share: the most read from a socket at once, and so the
most each connection's ``MemoryBIO`` grows to (plus a partial record). Bodies here are a few KB."""
READ_CHUNK_BYTES: Final = 16 * 1024
"""Plaintext asked of OpenSSL per read (``SSLProtocol.max_size``): one TLS record holds at most 16 KiB, so
larger asks return no more, they only allocate a larger ``bytes`` to shrink afterwards."""

_SSLProtocol = asyncio.sslproto.SSLProtocol


def lean_tls_supported() -> bool:
    """Whether this Python's asyncio and this aiohttp have what :class:`LeanTLSConnector` builds on."""
    if not isinstance(getattr(_SSLProtocol, "max_size", None), int):
        return False
    if not callable(getattr(_SSLProtocol, "get_buffer", None)):
        return False
    try:
        params = inspect.signature(_SSLProtocol.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover - a C implementation without a signature
        return False
    if not {"ssl_handshake_timeout", "ssl_shutdown_timeout", "call_connection_made"} <= params.keys():
        return False
    hook = getattr(aiohttp.TCPConnector, "_wrap_create_connection", None)
    return hook is not None and inspect.iscoroutinefunction(hook)


class _SharedBufferSSLProtocol(_SSLProtocol):
    """asyncio's TLS protocol, reading the socket into the connector's shared buffer."""

    max_size = READ_CHUNK_BYTES

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app_protocol: asyncio.BaseProtocol,
        sslcontext: ssl.SSLContext,
        waiter: asyncio.Future[Any],
        server_hostname: str | None,
        recv_buffer: bytearray,
        recv_view: memoryview,
        ssl_shutdown_timeout: float | None,
    ) -> None:
        super().__init__(
            loop,
            app_protocol,
            sslcontext,
            waiter,
            server_side=False,
            server_hostname=server_hostname,
            ssl_shutdown_timeout=ssl_shutdown_timeout,
        )
        # get_buffer() hands out _ssl_buffer_view (as long as it is at least max_size long) and
        # buffer_updated() copies from it: both read these two attributes, set once per connection in
        # __init__ (a READ_CHUNK_BYTES buffer here, freed at once).
        if hasattr(self, "_ssl_buffer_view"):
            self._ssl_buffer = recv_buffer
            self._ssl_buffer_view = recv_view

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        super()._on_handshake_complete(handshake_exc)
        if self._extra.get("ssl_object") is not None:
            self._extra.pop("peercert", None)  # decoded again on demand, see _get_extra_info

    def _get_extra_info(self, name: str, default: Any | None = None) -> Any:
        if name == "peercert" and name not in self._extra:
            sslobj = self._extra.get("ssl_object")
            if isinstance(sslobj, ssl.SSLObject):
                try:
                    return sslobj.getpeercert()
                except ValueError:  # pragma: no cover - asked for after the connection was torn down
                    return default
        return super()._get_extra_info(name, default)


class LeanTLSConnector(aiohttp.TCPConnector):
    """An ``aiohttp.TCPConnector`` whose TLS connections share one receive buffer (see the module doc).

    Takes the arguments of ``aiohttp.TCPConnector``. ``lean`` is False when the running Python or aiohttp
    lacks what it builds on: it then behaves exactly as ``aiohttp.TCPConnector``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lean = lean_tls_supported()
        self._recv_buffer: bytearray | None = None
        self._recv_view: memoryview | None = None

    def _shared_buffer(self) -> tuple[bytearray, memoryview]:
        if self._recv_buffer is None or self._recv_view is None:
            self._recv_buffer = bytearray(RECV_BUFFER_BYTES)
            self._recv_view = memoryview(self._recv_buffer)
        return self._recv_buffer, self._recv_view

    async def _wrap_create_connection(
        self,
        *args: Any,
        addr_infos: Any,
        req: Any,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's hook, its signature
        client_error: type[Exception] = aiohttp.ClientConnectorError,
        **kwargs: Any,
    ) -> tuple[asyncio.Transport, ResponseHandler]:
        sslcontext = kwargs.get("ssl")
        loop = self._loop
        if (
            not self.lean
            or not isinstance(sslcontext, ssl.SSLContext)
            or not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
            or len(args) != 1
        ):
            return await super()._wrap_create_connection(
                *args, addr_infos=addr_infos, req=req, timeout=timeout, client_error=client_error, **kwargs
            )
        factory: Callable[[], ResponseHandler] = args[0]
        server_hostname: str | None = kwargs.pop("server_hostname", None)
        del kwargs["ssl"]
        buffer, view = self._shared_buffer()
        waiter: asyncio.Future[None] = loop.create_future()
        holder: list[ResponseHandler] = []

        def make_protocol() -> _SharedBufferSSLProtocol:
            app = factory()
            holder.append(app)
            return _SharedBufferSSLProtocol(
                loop,
                app,
                sslcontext,
                waiter,
                server_hostname,
                buffer,
                view,
                self._shutdown_timeout(),
            )

        # One budget for connect and handshake, as aiohttp's own path has (a timeout of the whole raises
        # TimeoutError, which aiohttp turns into ConnectionTimeoutError as before).
        deadline = None if timeout.sock_connect is None else loop.time() + timeout.sock_connect
        async with asyncio.timeout_at(deadline):
            # The plain TCP connection (happy eyeballs, aiohttp's translation of OSError) with the TLS
            # protocol on top, exactly what loop.create_connection(ssl=...) builds; the handshake starts
            # as the connection is made.
            transport, _ = await super()._wrap_create_connection(
                make_protocol,
                addr_infos=addr_infos,
                req=req,
                timeout=timeout,
                client_error=client_error,
                **kwargs,
            )
            try:
                await waiter
            except BaseException as exc:
                transport.close()
                if isinstance(exc, ssl.CertificateError):
                    raise aiohttp.ClientConnectorCertificateError(req.connection_key, exc) from exc
                if isinstance(exc, ssl.SSLError):
                    raise aiohttp.ClientConnectorSSLError(req.connection_key, exc) from exc
                if isinstance(exc, OSError) and not (exc.errno is None and isinstance(exc, TimeoutError)):
                    raise client_error(req.connection_key, exc) from exc
                raise
        app = holder[0]
        if app.transport is None:  # closed between the handshake and now
            raise client_error(
                req.connection_key, ConnectionResetError("connection lost after TLS handshake")
            )
        return app.transport, app

    def _shutdown_timeout(self) -> float | None:
        """aiohttp's (deprecated) ``ssl_shutdown_timeout``, passed on as its own path does."""
        value = getattr(self, "_ssl_shutdown_timeout", None)
        return float(value) if isinstance(value, (int, float)) and value > 0 else None
