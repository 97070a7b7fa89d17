"""anonjoin's TLS connector (``anonjoin._async.tls.LeanTLSConnector``) over real TLS on loopback.

Its connections share one receive buffer instead of asyncio's 256 KiB each; everything else about TLS must
stay as aiohttp's own connector has it: verification, hostname checks (SNI), the typed errors, the connect
timeout covering the handshake. Each behaviour is checked on both connectors, so a difference shows.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from anonjoin import Client, RequestNotSentError
from anonjoin._async.auth import ClientSecretCredential
from anonjoin._async.tls import RECV_BUFFER_BYTES, LeanTLSConnector, lean_tls_supported
from anonjoin.simulator import Simulator
from anonjoin.simulator._tls import server_ssl_context, write_ca

CONNECTORS: list[type[aiohttp.TCPConnector]] = [aiohttp.TCPConnector, LeanTLSConnector]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    return str(write_ca(tmp_path))


@asynccontextmanager
async def tls_server(handler: Handler, *, tls: bool = True) -> AsyncIterator[str]:
    """An aiohttp server on an ephemeral loopback port with the simulator's certificate; yields its URL."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl_context() if tls else None)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def slow_body(release: asyncio.Event, barrier: asyncio.Barrier | None = None) -> Handler:
    """Answers "ok" in two writes with ``release`` between them: until then the client holds the connection
    (aiohttp lets go of a connection as soon as the whole body is in). With ``barrier``, every request is
    in before any answer, so each has a connection of its own."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if barrier is not None:
            await barrier.wait()
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"o")
        await release.wait()
        await resp.write(b"k")
        await resp.write_eof()
        return resp

    return handler


def ssl_protocol(resp: aiohttp.ClientResponse) -> Any:
    """The asyncio TLS protocol under a response's connection (a private attribute of asyncio's transport)."""
    assert resp.connection is not None and resp.connection.transport is not None
    assert resp.connection.transport.get_extra_info("ssl_object") is not None  # really TLS
    return resp.connection.transport._ssl_protocol  # type: ignore[attr-defined]


def test_supported_on_this_python() -> None:
    assert lean_tls_supported()


async def test_connections_share_the_connectors_read_buffer(ca_file: str) -> None:
    n = 6
    release = asyncio.Event()
    ctx = ssl.create_default_context(cafile=ca_file)
    async with tls_server(slow_body(release, asyncio.Barrier(n))) as base:
        connector = LeanTLSConnector(limit=0, ssl=ctx)
        async with aiohttp.ClientSession(connector=connector) as session:
            assert connector.lean
            protocols: list[Any] = []

            async def one(i: int) -> str:
                async with session.get(f"{base}/{i}") as resp:
                    protocols.append(ssl_protocol(resp))
                    if len(protocols) == n:
                        release.set()
                    return await resp.text()

            texts = await asyncio.gather(*(one(i) for i in range(n)))
    assert texts == ["ok"] * n
    assert len({id(p) for p in protocols}) == n  # n distinct TLS connections
    buffers = {id(p._ssl_buffer) for p in protocols}
    assert len(buffers) == 1  # ... reading into one buffer
    assert all(len(p._ssl_buffer) == RECV_BUFFER_BYTES for p in protocols)
    assert all(p.max_size == 16 * 1024 for p in protocols)


async def test_large_bodies_on_many_connections_at_once_arrive_intact(ca_file: str) -> None:
    """Bodies far larger than the shared buffer, interleaved on concurrent connections, each arrive whole."""
    n, size = 4, 300_000

    async def big(request: web.Request) -> web.Response:
        i = int(request.match_info["tail"])
        return web.Response(body=bytes((i + k) % 251 for k in range(size)))

    ctx = ssl.create_default_context(cafile=ca_file)
    async with tls_server(big) as base, aiohttp.ClientSession(connector=LeanTLSConnector(ssl=ctx)) as s:

        async def one(i: int) -> bytes:
            async with s.get(f"{base}/{i}") as resp:
                return await resp.read()

        bodies = await asyncio.gather(*(one(i) for i in range(n)))
    for i, body in enumerate(bodies):
        assert body == bytes((i + k) % 251 for k in range(size))


async def test_the_stock_connector_gives_each_connection_its_own_buffer(ca_file: str) -> None:
    """The control of the test above: what it would see without LeanTLSConnector."""
    n = 3
    release = asyncio.Event()
    ctx = ssl.create_default_context(cafile=ca_file)
    async with (
        tls_server(slow_body(release, asyncio.Barrier(n))) as base,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=ctx)) as session,
    ):
        protocols: list[Any] = []

        async def one(i: int) -> None:
            async with session.get(f"{base}/{i}") as resp:
                protocols.append(ssl_protocol(resp))
                if len(protocols) == n:
                    release.set()
                await resp.read()

        await asyncio.gather(*(one(i) for i in range(n)))
    assert len({id(p._ssl_buffer) for p in protocols}) == n
    assert all(len(p._ssl_buffer) == 256 * 1024 for p in protocols)


@pytest.mark.parametrize("connector_class", CONNECTORS)
async def test_the_peer_certificate_is_still_there_to_ask_for(
    connector_class: type[aiohttp.TCPConnector], ca_file: str
) -> None:
    release = asyncio.Event()
    ctx = ssl.create_default_context(cafile=ca_file)
    async with (
        tls_server(slow_body(release)) as base,
        aiohttp.ClientSession(connector=connector_class(ssl=ctx)) as session,
        session.get(base) as resp,
    ):
        assert resp.connection is not None and resp.connection.transport is not None
        cert = resp.connection.transport.get_extra_info("peercert")
        release.set()
        await resp.read()
    assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]


@pytest.mark.parametrize("connector_class", CONNECTORS)
async def test_an_untrusted_certificate_is_refused_with_the_same_error(
    connector_class: type[aiohttp.TCPConnector],
) -> None:
    ctx = ssl.create_default_context()  # the system's trust store: the simulator's CA is not in it
    async with tls_server(ok) as base, aiohttp.ClientSession(connector=connector_class(ssl=ctx)) as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
            await session.get(base)
    assert isinstance(info.value.certificate_error, ssl.SSLCertVerificationError)
    assert info.value.host == "127.0.0.1"


@pytest.mark.parametrize("connector_class", CONNECTORS)
async def test_the_hostname_is_still_checked(
    connector_class: type[aiohttp.TCPConnector], ca_file: str
) -> None:
    """server_hostname (SNI and the name checked) reaches OpenSSL: a name the certificate lacks is refused."""
    ctx = ssl.create_default_context(cafile=ca_file)
    async with tls_server(ok) as base, aiohttp.ClientSession(connector=connector_class(ssl=ctx)) as session:
        async with session.get(base, server_hostname="localhost") as resp:  # in the certificate
            assert await resp.text() == "ok"
        with pytest.raises(aiohttp.ClientConnectorCertificateError) as info:
            await session.get(
                base, server_hostname="not-in-the-cert.invalid", headers={"Connection": "close"}
            )
    assert "not-in-the-cert.invalid" in str(info.value.certificate_error)


@pytest.mark.parametrize("connector_class", CONNECTORS)
async def test_a_server_that_never_answers_the_handshake_is_a_connect_timeout(
    connector_class: type[aiohttp.TCPConnector], ca_file: str
) -> None:
    """The connect timeout covers the handshake, as on aiohttp's own path."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept the TCP connection, never speak TLS

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ctx = ssl.create_default_context(cafile=ca_file)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=0.3)
    try:
        async with aiohttp.ClientSession(connector=connector_class(ssl=ctx), timeout=timeout) as session:
            with pytest.raises(aiohttp.ConnectionTimeoutError):
                await session.get(f"https://127.0.0.1:{port}/")
        assert accepted  # the TCP connection was made: it is the handshake that timed out
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("connector_class", CONNECTORS)
async def test_a_refused_connection_is_a_connector_error(
    connector_class: type[aiohttp.TCPConnector], ca_file: str
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = ssl.create_default_context(cafile=ca_file)
    async with aiohttp.ClientSession(connector=connector_class(ssl=ctx)) as session:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await session.get(f"https://127.0.0.1:{port}/")
    assert not isinstance(info.value, aiohttp.ClientSSLError)


async def test_plain_http_takes_aiohttps_path() -> None:
    release = asyncio.Event()
    async with (
        tls_server(slow_body(release), tls=False) as base,
        aiohttp.ClientSession(connector=LeanTLSConnector()) as s,
        s.get(base) as resp,
    ):
        assert resp.connection is not None and resp.connection.transport is not None
        assert resp.connection.transport.get_extra_info("ssl_object") is None
        release.set()
        assert await resp.text() == "ok"


async def test_without_the_asyncio_details_it_is_aiohttps_connector(
    monkeypatch: pytest.MonkeyPatch, ca_file: str
) -> None:
    monkeypatch.setattr("anonjoin._async.tls.lean_tls_supported", lambda: False)
    ctx = ssl.create_default_context(cafile=ca_file)
    connector = LeanTLSConnector(ssl=ctx)
    assert not connector.lean
    release = asyncio.Event()
    async with (
        tls_server(slow_body(release)) as base,
        aiohttp.ClientSession(connector=connector) as session,
        session.get(base) as resp,
    ):
        assert len(ssl_protocol(resp)._ssl_buffer) == 256 * 1024  # asyncio's own, per connection
        release.set()
        assert await resp.text() == "ok"


# ---------------------------------------------------------------- anonjoin's Client


@asynccontextmanager
async def client_for(sim: Simulator, **kw: Any) -> AsyncIterator[Client]:
    i = sim.info
    cred = ClientSecretCredential(authority=i.authority, client_id=i.client_id, client_secret=i.client_secret,
                                  scope=i.scope, ca_file=i.ca_file)  # fmt: skip
    try:
        async with Client(discover_url=i.discover_url, endpoint_id=i.endpoint_id, credential=cred, **kw) as c:
            yield c
    finally:
        await cred.aclose()


async def test_a_guest_joins_and_holds_its_poll_on_shared_buffer_connections(sim: Simulator) -> None:
    async with client_for(sim, ca_file=sim.info.ca_file) as client:
        guests = await asyncio.gather(
            *(
                client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name=f"G{i}")
                for i in range(3)
            )
        )
        connector = client._http.session().connector
        assert isinstance(connector, LeanTLSConnector) and connector.lean
        # every open connection of the client (the parked polls among them) reads into the one buffer
        protocols = [
            proto.transport._ssl_protocol  # type: ignore[union-attr]
            for conns in connector._conns.values()
            for proto, _ in conns
        ] + [proto.transport._ssl_protocol for proto in connector._acquired]  # type: ignore[union-attr]
        assert len(protocols) >= 3  # at least the three parked polls
        assert {id(p._ssl_buffer) for p in protocols} == {id(connector._recv_buffer)}
        await asyncio.gather(*(g.leave() for g in guests))


async def test_an_untrusted_certificate_still_fails_the_join_for_good(sim: Simulator) -> None:
    """Without the simulator's CA: the same final, typed error as before, caused by aiohttp's."""
    async with client_for(sim) as client:
        with pytest.raises(RequestNotSentError) as info:
            await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
    assert "certificate" in str(info.value)
    assert isinstance(info.value.__cause__, aiohttp.ClientConnectorCertificateError)
