"""Signed tokens: the AAD access tokens and the psat tokens, both RS256 JWTs.

Rules:
- One RSA key per role (AAD, psat) per process, made on first use and cached at module level.
- psat tokens carry an ``x5t`` header (the SHA-1 thumbprint of the signing key, base64url).
- Verification checks the signature with RS256 only (``none``, HS256 and every other algorithm are
  refused), then ``exp``/``nbf`` against the simulator's injectable clock with a small leeway.
- Verification results are cached by token string (``TokenVerifier``), so a guest that polls 1,000 times
  costs one RSA verification (a refused token is not cached: its text is the client's); the cache is a
  plain dict that is cleared when it grows past its cap.
  ``exp``/``nbf`` are checked against the clock on every use, cached or not.
- A token the simulator mints through ``TokenVerifier.issue`` goes into that cache as it is signed: its
  claims are known, so the guest's first request costs no RSA verification either. Only that exact string
  is cached; any other string (a tampered copy included) is verified in full.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "InvalidTokenError",
    "SigningKey",
    "TokenVerifier",
    "aad_key",
    "install_keys",
    "key_pems",
    "psat_key",
]

LEEWAY_S = 5.0
CACHE_CAP = 200_000


class InvalidTokenError(Exception):
    """The token is malformed, badly signed, of the wrong algorithm, expired or not yet valid."""


@dataclass(frozen=True)
class SigningKey:
    """An RSA key pair with its key id (``kid``) and thumbprint (``x5t``)."""

    private: rsa.RSAPrivateKey
    public: rsa.RSAPublicKey
    kid: str
    x5t: str

    def sign(self, claims: Mapping[str, Any], *, x5t: bool = False) -> str:
        headers: dict[str, Any] = {"kid": self.kid}
        if x5t:
            headers["x5t"] = self.x5t
        return jwt.encode(dict(claims), self.private, algorithm="RS256", headers=headers)

    def jwk(self) -> dict[str, Any]:
        """The public key as a JWK (for the OpenID ``jwks_uri``)."""
        numbers = self.public.public_numbers()

        def b64(n: int) -> str:
            raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "x5t": self.x5t,
            "n": b64(numbers.n),
            "e": b64(numbers.e),
        }


def _make_key(name: str) -> SigningKey:
    return _key_of(name, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _key_of(name: str, private: rsa.RSAPrivateKey) -> SigningKey:
    public = private.public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashlib.sha1(der).digest()
    x5t = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    return SigningKey(private=private, public=public, kid=f"{name}-{x5t[:8]}", x5t=x5t)


_KEYS: dict[str, SigningKey] = {}


def _key(name: str) -> SigningKey:
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _make_key(name)
    return key


def aad_key() -> SigningKey:
    """The process-wide key that signs AAD access tokens."""
    return _key("aad")


def psat_key() -> SigningKey:
    """The process-wide key that signs psat tokens."""
    return _key("psat")


def key_pems() -> dict[str, bytes]:
    """The process-wide private keys as PEM, by role (a front door hands them to its pool processes)."""
    return {
        name: key().private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        for name, key in (("aad", aad_key), ("psat", psat_key))
    }


def install_keys(pems: Mapping[str, bytes]) -> None:
    """Use these keys (``key_pems`` of another process) as this process's keys: a pool process verifies
    the tokens its front door signed."""
    for name, pem in pems.items():
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError(f"the {name} key is not an RSA key")
        _KEYS[name] = _key_of(name, private)


class TokenVerifier:
    """Verify RS256 JWTs of one key, caching the decoded claims by token string."""

    def __init__(self, key: SigningKey, clock: Callable[[], float]) -> None:
        self._key = key
        self._clock = clock
        self._cache: dict[str, dict[str, Any] | None] = {}

    def issue(self, claims: Mapping[str, Any], *, x5t: bool = False) -> str:
        """Sign ``claims`` with this verifier's key and cache them: the token needs no verification later."""
        token = self._key.sign(claims, x5t=x5t)
        # the claims exactly as decoding the token would give them back (a JSON round trip)
        self._remember(token, _checked(json.loads(json.dumps(dict(claims)))))
        return token

    @property
    def cached(self) -> int:
        """Tokens in the verification cache (at most ``CACHE_CAP``)."""
        return len(self._cache)

    def _remember(self, token: str, claims: dict[str, Any] | None) -> None:
        if len(self._cache) >= CACHE_CAP:
            self._cache.clear()
        self._cache[token] = claims

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims; ``InvalidTokenError`` when it is bad, expired or not yet valid."""
        if token in self._cache:
            claims = self._cache[token]
        else:
            claims = self._decode(token)
            if claims is not None:  # a refused token (client-chosen text) is not kept
                self._remember(token, claims)
        if claims is None:
            raise InvalidTokenError("signature or format")
        now = self._clock()
        if float(claims["exp"]) + LEEWAY_S < now:
            raise InvalidTokenError("expired")
        if float(claims.get("nbf", 0)) - LEEWAY_S > now:
            raise InvalidTokenError("not yet valid")
        return claims

    def _decode(self, token: str) -> dict[str, Any] | None:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key.public,
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iat": False,
                    "require": ["exp"],
                },
            )
        except (jwt.PyJWTError, ValueError):
            return None
        return _checked(claims)


def _checked(claims: dict[str, Any]) -> dict[str, Any] | None:
    """``claims`` when ``exp`` (required) and ``nbf`` (optional) are numbers, else ``None`` (refused)."""
    if not isinstance(claims.get("exp"), int | float) or not isinstance(claims.get("nbf", 0), int | float):
        return None
    return claims


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT without checking anything (for routing and bookkeeping only)."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError):
        return None
    return claims
