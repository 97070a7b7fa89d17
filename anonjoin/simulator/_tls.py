"""TLS for the simulator: one trustme CA per process, a server certificate for 127.0.0.1 and localhost.

Rules: the CA, the server certificate, the server ``SSLContext`` and the client certificate used for
certificate credentials are made once per process (module-level caches), so starting a simulator costs a
file write, not a key generation. Each simulator writes the CA PEM into its own temporary directory
(``SimulatorInfo.ca_file``).
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = [
    "ClientIdentity",
    "ca_pem",
    "client_identity",
    "install_server_identity",
    "server_identity_pems",
    "server_ssl_context",
    "write_ca",
]

SERVER_NAMES = ("127.0.0.1", "localhost")


@functools.cache
def _ca() -> trustme.CA:
    return trustme.CA(organization_name="anonjoin simulator")


@functools.cache
def _server_cert() -> trustme.LeafCert:
    return _ca().issue_cert(*SERVER_NAMES)


def ca_pem() -> bytes:
    """The PEM of the process-wide simulator CA."""
    data: bytes = _ca().cert_pem.bytes()
    return data


_CONTEXTS: list[ssl.SSLContext] = []


def server_ssl_context() -> ssl.SSLContext:
    """The server-side TLS context (shared by every simulator of the process)."""
    if not _CONTEXTS:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        _server_cert().configure_cert(ctx)
        _CONTEXTS.append(ctx)
    return _CONTEXTS[0]


def server_identity_pems() -> tuple[bytes, bytes]:
    """The server certificate chain and its private key, as PEM (for a front door's pool processes)."""
    leaf = _server_cert()
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    return chain, leaf.private_key_pem.bytes()


def install_server_identity(chain_file: Path, key_file: Path) -> None:
    """Serve with this certificate (``server_identity_pems`` of the front door, written to files): every
    process of one simulator presents a certificate of the same CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(chain_file, key_file)
    _CONTEXTS[:] = [ctx]


def write_ca(directory: Path) -> Path:
    """Write the CA PEM to ``directory/ca.pem`` and return the path."""
    path = directory / "ca.pem"
    path.write_bytes(ca_pem())
    return path


@dataclass(frozen=True)
class ClientIdentity:
    """A certificate credential for the simulated application: RSA key, certificate, SHA-1 thumbprint."""

    private_key_pem: bytes
    cert_pem: bytes
    thumbprint: str  # hex SHA-1 of the certificate's DER, as msal's ``thumbprint`` wants it
    thumbprint_sha256: str  # hex SHA-256 (msal's ``x5t#S256`` when given the public certificate)


@functools.cache
def client_identity() -> ClientIdentity:
    """The client certificate an application can use instead of its secret (RS256 ``client_assertion``)."""
    leaf = _ca().issue_cert("anonjoin-client.invalid", key_type=trustme.KeyType.RSA)
    cert_pem: bytes = leaf.cert_chain_pems[0].bytes()
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return ClientIdentity(
        private_key_pem=leaf.private_key_pem.bytes(),
        cert_pem=cert_pem,
        thumbprint=hashlib.sha1(der).hexdigest().upper(),
        thumbprint_sha256=hashlib.sha256(der).hexdigest().upper(),
    )
