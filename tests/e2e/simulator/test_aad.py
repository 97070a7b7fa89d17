"""Azure AD: msal for real (secret and certificate), AAD-style errors, token claims and lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import msal
import requests

from anonjoin.simulator import Simulator, SimulatorInfo
from anonjoin.simulator._config import DOCS_AUDIENCE, SDK_AUDIENCE

from support.walk import Walk


def _session(info: SimulatorInfo) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify otherwise
    session.verify = info.ca_file
    return session


def _acquire(info: SimulatorInfo, credential: Any, scope: str | None = None) -> dict[str, Any]:
    with _session(info) as http:
        app = msal.ConfidentialClientApplication(
            info.client_id,
            client_credential=credential,
            authority=info.authority,
            http_client=http,
            instance_discovery=False,
        )
        result: dict[str, Any] = app.acquire_token_for_client(scopes=[scope or info.scope])
        return result


async def _in_thread(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    return await asyncio.to_thread(fn, *args)


async def test_msal_gets_a_token_with_the_client_secret(sim: Simulator) -> None:
    info = sim.info
    result = await _in_thread(_acquire, info, info.client_secret)
    assert "access_token" in result, result.get("error_description")
    assert result["token_type"] == "Bearer"
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == DOCS_AUDIENCE
    assert claims["tid"] == info.tenant_id
    assert claims["appid"] == info.client_id
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["nbf"] <= claims["iat"]
    assert jwt.get_unverified_header(result["access_token"])["alg"] == "RS256"


async def test_msal_gets_a_token_with_a_certificate(sim: Simulator) -> None:
    info = sim.info
    key = Path(info.client_key_file).read_text()  # noqa: ASYNC240 - a tiny local file
    credential = {"private_key": key, "thumbprint": info.client_cert_thumbprint}
    result = await _in_thread(_acquire, info, credential, f"{SDK_AUDIENCE}/.default")
    assert "access_token" in result, result.get("error_description")
    claims = jwt.decode(result["access_token"], options={"verify_signature": False})
    assert claims["aud"] == SDK_AUDIENCE


async def test_a_wrong_secret_gets_the_aad_error(sim: Simulator) -> None:
    result = await _in_thread(_acquire, sim.info, "wrong-secret")
    assert result["error"] == "invalid_client"
    assert "AADSTS7000215" in result["error_description"]
    assert result["error_codes"] == [7000215]
    assert result["correlation_id"]


async def test_a_certificate_the_app_does_not_have_is_refused(sim: Simulator) -> None:
    import trustme

    other = trustme.CA().issue_cert("other.invalid", key_type=trustme.KeyType.RSA)
    credential = {"private_key": other.private_key_pem.bytes().decode(), "thumbprint": "00" * 20}
    result = await _in_thread(_acquire, sim.info, credential)
    assert result["error"] == "invalid_client"
    assert result["error_codes"] == [700027]


async def test_raw_token_endpoint_errors(sim: Simulator, open_walk: Any) -> None:
    async with open_walk(sim, setup=False) as walk:
        w: Walk = walk
        url = sim.info.token_endpoint
        base = {
            "grant_type": "client_credentials",
            "client_id": sim.info.client_id,
            "client_secret": sim.info.client_secret,
            "scope": sim.info.scope,
        }
        unknown = await w.call("POST", url, data={**base, "client_id": "nobody"})
        assert unknown.status == 400 and unknown.body["error"] == "unauthorized_client"
        assert unknown.body["error_codes"] == [700016]
        scope = await w.call("POST", url, data={**base, "scope": "https://example.com/.default"})
        assert scope.status == 400 and scope.body["error"] == "invalid_scope"
        grant = await w.call("POST", url, data={**base, "grant_type": "password"})
        assert grant.status == 400 and grant.body["error"] == "unsupported_grant_type"
        tenant = await w.call("POST", url.replace("contoso.com", "fabrikam.com"), data=base)
        assert tenant.status == 400 and tenant.body["error"] == "invalid_tenant"
        by_id = await w.call("POST", url.replace("contoso.com", sim.info.tenant_id), data=base)
        assert by_id.status == 200
        openid = await w.call("GET", f"{sim.info.authority}/v2.0/.well-known/openid-configuration")
        assert openid.body["token_endpoint"] == url
        keys = await w.call("GET", openid.body["jwks_uri"])
        assert keys.body["keys"][0]["kty"] == "RSA"


async def test_the_aad_token_lifetime_is_configurable(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(aad_ttl_s=600) as sim, open_walk(sim, setup=False) as walk:
        token = await walk.get_aad_token()
        assert token.body["expires_in"] == 600
        claims = jwt.decode(token.body["access_token"], options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 600
