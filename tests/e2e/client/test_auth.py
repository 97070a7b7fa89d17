"""The Azure AD credential (anonjoin._async.auth) against the simulator's AAD over TLS, with real msal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest

from anonjoin import AuthError
from anonjoin._async.auth import (
    AccessToken,
    CertificateCredential,
    ClientSecretCredential,
    Credential,
)
from anonjoin.simulator import FaultProfile, FaultRule, Simulator, SimulatorInfo

SCOPE = "https://api.skypeforbusiness.com/.default"


# ---- the simulator's Azure AD -------------------------------------------------------------------------


@dataclass
class Aad:
    sim: Simulator

    @property
    def info(self) -> SimulatorInfo:
        return self.sim.info

    def credential(self, **kw: Any) -> ClientSecretCredential:
        options: dict[str, Any] = {
            "authority": self.info.authority,
            "client_id": self.info.client_id,
            "client_secret": self.info.client_secret,
            "scope": self.info.scope,
            "ca_file": self.info.ca_file,
        }
        options.update(kw)
        return ClientSecretCredential(**options)

    def client_key(self) -> str:
        return Path(self.info.client_key_file).read_text(encoding="ascii")

    def token_requests(self) -> int:
        """Requests the simulator's token endpoint saw (any status), from its admin snapshot."""
        counts: dict[Any, int] = self.sim.snapshot()["requests"].get("aad_token", {})
        return sum(counts.values())

    def fail_token(self, kind: Literal["503", "500", "429"] | None) -> None:
        if kind is None:
            self.sim.set_faults("none")
        else:
            rule = FaultRule(route="aad_token", kind=kind, rate=1.0, retry_after=None)
            self.sim.set_faults(FaultProfile(name="aad-down", rules=(rule,)))


@pytest.fixture
def aad(sim: Simulator) -> Aad:
    return Aad(sim)


# ---- helpers -----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


C = TypeVar("C", bound=Credential)


@contextlib.asynccontextmanager
async def closing(cred: C) -> AsyncIterator[C]:
    try:
        yield cred
    finally:
        await cred.aclose()


# ---- tests -------------------------------------------------------------------------------------------


async def test_credential_satisfies_protocol(aad: Aad) -> None:
    async with closing(aad.credential()) as cred:
        assert isinstance(cred, Credential)


async def test_single_flight_fifty_callers_one_request(aad: Aad) -> None:
    async with closing(aad.credential()) as cred:
        tokens = await asyncio.gather(*(cred.token() for _ in range(50)))
        assert {t.value for t in tokens} == {tokens[0].value}
        assert aad.token_requests() == 1
        # Cached afterwards: no new request.
        again = await cred.token()
        assert again.value == tokens[0].value
        assert aad.token_requests() == 1


async def test_refresh_ahead_of_expiry(aad: Aad) -> None:
    clock = FakeClock()
    async with closing(aad.credential(clock=clock, refresh_margin_s=120.0)) as cred:
        first = await cred.token()
        assert first.expires_at == pytest.approx(clock.now + 3600, abs=5)
        clock.now = first.expires_at - 121.0  # just outside the margin: still the cached token
        assert (await cred.token()).value == first.value
        assert aad.token_requests() == 1
        clock.now = first.expires_at - 119.0  # inside the margin: replaced, msal's cache bypassed
        tokens = await asyncio.gather(*(cred.token() for _ in range(20)))
        assert {t.value for t in tokens} == {tokens[0].value} != {first.value}
        assert aad.token_requests() == 2


async def test_failed_early_refresh_keeps_the_valid_token(aad: Aad, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    async with closing(aad.credential(clock=clock, refresh_margin_s=300.0)) as cred:
        first = await cred.token()
        clock.now = first.expires_at - 200.0
        aad.fail_token("503")
        assert (await cred.token()).value == first.value  # still valid for 200 s: kept
        clock.now += 5.0
        assert (await cred.token()).value == first.value  # and not retried on every call
        failures = [r for r in caplog.records if r.getMessage().startswith("anonjoin.auth.refresh_failed")]
        assert len(failures) == 1
        assert aad.token_requests() == 2
        clock.now = first.expires_at - 10.0
        with pytest.raises(AuthError) as info:  # too close to expiry to keep
            await cred.token()
        assert info.value.retryable


async def test_forced_refresh_bypasses_msal_cache(aad: Aad) -> None:
    async with closing(aad.credential()) as cred:
        first = await cred.token()
        assert aad.token_requests() == 1
        refreshed = await asyncio.gather(*(cred.refresh(first) for _ in range(30)))
        assert aad.token_requests() == 2  # one server request for all 30
        assert {t.value for t in refreshed} == {refreshed[0].value}
        assert refreshed[0].value != first.value
        # Someone already refreshed past `first`: the newer token, no request.
        late = await cred.refresh(first)
        assert late.value == refreshed[0].value
        assert aad.token_requests() == 2
        # The new token rejected too: another request.
        newest = await cred.refresh(late)
        assert newest.value not in {first.value, late.value}
        assert aad.token_requests() == 3
        assert (await cred.token()).value == newest.value


async def test_cancelled_caller_does_not_cancel_the_shared_fetch(aad: Aad) -> None:
    async with closing(aad.credential()) as cred:
        first = asyncio.ensure_future(cred.token())
        second = asyncio.ensure_future(cred.token())
        await asyncio.sleep(0)  # both are waiting on the one fetch
        first.cancel()
        token = await asyncio.wait_for(second, 10)
        assert token.value
        assert aad.token_requests() == 1


async def test_wrong_secret_is_auth_error_without_the_secret(
    aad: Aad, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "wrong-secret-XYZ-987654"
    async with closing(aad.credential(client_secret=secret)) as cred:
        with pytest.raises(AuthError) as info:
            await cred.token()
        assert secret not in repr(cred) and secret not in str(cred)
    err = info.value
    assert err.error == "invalid_client"
    assert not err.retryable
    assert "AADSTS7000215" in str(err)
    assert err.correlation_id and err.correlation_id in str(err)
    assert "\n" not in str(err)
    for text in (str(err), repr(err), caplog.text, str(err.__cause__ or "")):
        assert secret not in text
        assert aad.info.client_secret not in text


async def test_unreachable_authority_is_retryable_auth_error(unused_tcp_port: int) -> None:
    cred = ClientSecretCredential(
        authority=f"https://127.0.0.1:{unused_tcp_port}/contoso.com",
        client_id="app-id",
        client_secret="some-secret-value",
        scope=SCOPE,
        timeout_s=5,
    )
    async with closing(cred):
        with pytest.raises(AuthError) as info:
            await cred.token()
    assert info.value.retryable
    assert info.value.error == "connection_error"
    assert "some-secret-value" not in str(info.value)


async def test_server_error_is_retryable_and_refresh_asks_again(aad: Aad) -> None:
    async with closing(aad.credential()) as cred:
        aad.fail_token("503")
        with pytest.raises(AuthError) as info:
            await cred.token()
        assert info.value.retryable
        assert aad.token_requests() == 1
        aad.fail_token(None)
        # msal replays the recent 503 from its throttle cache without calling the server ...
        with pytest.raises(AuthError) as replay:
            await cred.token()
        assert replay.value.retryable
        assert aad.token_requests() == 1
        # ... and a forced refresh clears that cache: the server is asked again.
        token = await cred.refresh(AccessToken(value="rejected", expires_at=0.0))
        assert token.value
        assert aad.token_requests() == 2


async def test_requests_ca_bundle_does_not_override_ca_file(
    aad: Aad, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", system)
    monkeypatch.setenv("CURL_CA_BUNDLE", system)
    async with closing(aad.credential()) as cred:
        assert (await cred.token()).value


async def test_without_the_ca_file_tls_fails_not_retryable(aad: Aad, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    async with closing(aad.credential(ca_file=None)) as cred:
        with pytest.raises(AuthError) as info:
            await cred.token()
    assert info.value.error == "tls_error"
    assert not info.value.retryable


async def test_insecure_skips_verification(aad: Aad) -> None:
    async with closing(aad.credential(ca_file=None, verify_tls=False)) as cred:
        with pytest.warns(Warning, match="Unverified HTTPS request"):
            assert (await cred.token()).value


async def test_aclose_releases_the_worker_thread(aad: Aad) -> None:
    cred = aad.credential()
    await cred.token()
    workers = list(cred._executor._threads)  # this credential's worker, not another test's
    assert workers
    await cred.aclose()
    for thread in workers:
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()
        assert thread.name.startswith("anonjoin-auth")
    with pytest.raises(AuthError, match="closed"):
        await cred.token()
    await cred.aclose()  # idempotent


@pytest.mark.parametrize("kind", ["429", "500", "503"])
async def test_throttled_or_failing_token_endpoint_is_retryable(
    aad: Aad, kind: Literal["503", "500", "429"]
) -> None:
    aad.fail_token(kind)
    async with closing(aad.credential()) as cred:
        with pytest.raises(AuthError) as info:
            await cred.token()
    assert info.value.retryable, str(info.value)
    assert kind in str(info.value)


async def test_certificate_credential_gets_a_token(aad: Aad) -> None:
    key = aad.client_key()
    cred = CertificateCredential(
        authority=aad.info.authority,
        client_id=aad.info.client_id,
        private_key_pem=key,
        thumbprint=aad.info.client_cert_thumbprint,
        scope=aad.info.scope,
        ca_file=aad.info.ca_file,
    )
    async with closing(cred):
        token = await cred.token()
        assert token.value
        assert "PRIVATE" not in repr(cred) and "PRIVATE" not in repr(vars(cred))
    assert aad.token_requests() == 1


async def test_wrong_certificate_is_auth_error(aad: Aad) -> None:
    key = aad.client_key()
    cred = CertificateCredential(
        authority=aad.info.authority,
        client_id=aad.info.client_id,
        private_key_pem=key,
        thumbprint="00" * 20,
        scope=aad.info.scope,
        ca_file=aad.info.ca_file,
    )
    async with closing(cred):
        with pytest.raises(AuthError) as info:
            await cred.token()
    assert info.value.error == "invalid_client"
    assert "thumbprint" in str(info.value)


async def test_token_shorter_than_the_margin_is_refreshed_at_half_life(
    sim_factory: Callable[..., Simulator],
) -> None:
    async with sim_factory(aad_ttl_s=60.0) as sim:
        aad = Aad(sim)
        clock = FakeClock()
        async with closing(aad.credential(clock=clock, refresh_margin_s=300.0)) as cred:
            first = await cred.token()
            assert first.expires_at == pytest.approx(clock.now + 60, abs=2)
            await asyncio.gather(*(cred.token() for _ in range(10)))
            assert aad.token_requests() == 1  # not "due" at once although 60 s < the 300 s margin
            clock.now += 29.0
            assert (await cred.token()).value == first.value
            clock.now += 2.0  # past half its life
            assert (await cred.token()).value != first.value
            assert aad.token_requests() == 2


async def test_unknown_tenant_is_final_auth_error(aad: Aad) -> None:
    authority = aad.info.authority.rsplit("/", 1)[0] + "/no-such-tenant.example"
    async with closing(aad.credential(authority=authority)) as cred:
        with pytest.raises(AuthError) as info:
            await cred.token()
    assert not info.value.retryable
    assert info.value.error == "invalid_tenant"
    assert "no-such-tenant.example" in str(info.value) and "HTTP 400" in str(info.value)
    assert aad.info.client_secret not in str(info.value)


async def test_aclose_during_a_fetch_fails_waiters_with_auth_error(aad: Aad) -> None:
    rule = FaultRule(route="aad_token", kind="latency", rate=1.0, latency_s=0.3)
    aad.sim.set_faults(FaultProfile(name="slow-aad", rules=(rule,)))
    cred = aad.credential()
    waiters = [asyncio.ensure_future(cred.token()) for _ in range(3)]
    await asyncio.sleep(0)  # the shared fetch has started on the worker thread
    await cred.aclose()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    for result in results:
        assert isinstance(result, AuthError), repr(result)
        assert "closed" in str(result)
