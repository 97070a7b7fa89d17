"""Token signing and verification: RS256 only, clock-checked expiry, results cached by token string
(tokens the simulator issues go into that cache as they are signed)."""

from __future__ import annotations

import jwt
import pytest

from anonjoin.simulator import _tokens
from anonjoin.simulator._tokens import InvalidTokenError, TokenVerifier, psat_key


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count ``jwt.decode`` calls (one per cryptographic verification) from now on."""
    calls: list[int] = []
    decode = jwt.decode

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


def test_verification_is_cached_by_token_string(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    verifier = TokenVerifier(psat_key(), clock)
    token = psat_key().sign({"asi": "a", "nbf": clock.now, "exp": clock.now + 60}, x5t=True)
    calls = count_decodes(monkeypatch)
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
    # a refused token is not remembered: its text is the client's, and keeping it would let hostile
    # requests grow the cache (issue 11)
    assert len(calls) == 3 and verifier.cached == 1


def test_not_yet_valid_tokens_are_refused() -> None:
    clock = Clock()
    token = psat_key().sign({"asi": "a", "nbf": clock.now + 600, "exp": clock.now + 900})
    with pytest.raises(InvalidTokenError, match="not yet valid"):
        TokenVerifier(psat_key(), clock).verify(token)


def test_psat_header_carries_x5t_and_kid() -> None:
    header = jwt.get_unverified_header(psat_key().sign({"exp": 1}, x5t=True))
    assert header["alg"] == "RS256" and header["x5t"] == psat_key().x5t and header["kid"] == psat_key().kid


def test_issued_tokens_are_known_without_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    verifier = TokenVerifier(psat_key(), clock)
    token = verifier.issue({"asi": "a", "nbf": int(clock.now), "exp": int(clock.now) + 60}, x5t=True)
    # a real RS256 token of the key, with the x5t header, that anyone holding the public key can check
    claims = jwt.decode(
        token, psat_key().public, algorithms=["RS256"], options={"verify_exp": False, "verify_nbf": False}
    )
    assert claims["asi"] == "a" and jwt.get_unverified_header(token)["x5t"] == psat_key().x5t
    calls = count_decodes(monkeypatch)
    assert verifier.verify(token) == claims
    assert calls == []  # the simulator signed it: no RSA verification needed
    # ... but only that exact string: a tampered copy is verified in full, and refused
    head, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(InvalidTokenError, match="signature"):
        verifier.verify(f"{head}.{payload}.{flipped}")
    assert calls == [1]
    # and expiry and nbf are still checked on every use, against the injected clock
    clock.now += 120
    with pytest.raises(InvalidTokenError, match="expired"):
        verifier.verify(token)
    clock.now -= 600
    with pytest.raises(InvalidTokenError, match="not yet valid"):
        verifier.verify(token)


def test_issued_tokens_with_bad_time_claims_are_refused_like_any_other() -> None:
    verifier = TokenVerifier(psat_key(), Clock())
    for claims in ({"asi": "a", "exp": "tomorrow"}, {"asi": "a", "exp": 1, "nbf": None}, {"asi": "a"}):
        token = verifier.issue(claims)
        with pytest.raises(InvalidTokenError, match="signature or format"):
            verifier.verify(token)
        with pytest.raises(InvalidTokenError, match="signature or format"):
            TokenVerifier(psat_key(), Clock()).verify(token)  # same answer as a fresh verifier's


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tokens, "CACHE_CAP", 3)
    clock = Clock()
    verifier = TokenVerifier(psat_key(), clock)
    tokens = [verifier.issue({"asi": str(i), "exp": int(clock.now) + 60}) for i in range(5)]
    assert len(verifier._cache) <= 3
    for i, token in enumerate(tokens):  # every one still verifies (the evicted ones cryptographically)
        assert verifier.verify(token)["asi"] == str(i)
    assert len(verifier._cache) <= 3
