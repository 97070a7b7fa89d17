"""Token signing and verification: RS256 only, clock-checked expiry, results cached by token string."""

from __future__ import annotations

import jwt
import pytest

from anonjoin.simulator._tokens import InvalidTokenError, TokenVerifier, psat_key


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_verification_is_cached_by_token_string(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    verifier = TokenVerifier(psat_key(), clock)
    token = psat_key().sign({"asi": "a", "nbf": clock.now, "exp": clock.now + 60}, x5t=True)
    calls = []
    decode = jwt.decode

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting)
    for _ in range(100):
        assert verifier.verify(token)["asi"] == "a"
    assert len(calls) == 1
    # Expiry is still checked on every use, against the injected clock.
    clock.now += 120
    with pytest.raises(InvalidTokenError, match="expired"):
        verifier.verify(token)
    assert len(calls) == 1
    with pytest.raises(InvalidTokenError):
        verifier.verify("garbage")
    with pytest.raises(InvalidTokenError):
        verifier.verify("garbage")
    assert len(calls) == 2  # a bad token is remembered as bad


def test_not_yet_valid_tokens_are_refused() -> None:
    clock = Clock()
    token = psat_key().sign({"asi": "a", "nbf": clock.now + 600, "exp": clock.now + 900})
    with pytest.raises(InvalidTokenError, match="not yet valid"):
        TokenVerifier(psat_key(), clock).verify(token)


def test_psat_header_carries_x5t_and_kid() -> None:
    header = jwt.get_unverified_header(psat_key().sign({"exp": 1}, x5t=True))
    assert header["alg"] == "RS256" and header["x5t"] == psat_key().x5t and header["kid"] == psat_key().kid
