"""The Azure AD credentials' own checks, with no network: secrets kept out of reprs, bad arguments refused
as configuration errors, instance discovery only for Microsoft hosts. (Tokens from the simulator's AAD over
TLS: tests/e2e/client/test_auth.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from anonjoin import ConfigurationError
from anonjoin._async.auth import (
    AccessToken,
    CertificateCredential,
    ClientSecretCredential,
    is_microsoft_authority,
)

SCOPE = "https://api.skypeforbusiness.com/.default"


def test_access_token_hides_its_value() -> None:
    token = AccessToken(value="eyJsecret.value.sig", expires_at=123.0)
    assert "eyJsecret" not in repr(token)
    assert "eyJsecret" not in str(token)
    assert "123.0" in repr(token)


def test_credential_repr_hides_secret() -> None:
    cred = ClientSecretCredential(
        authority="https://login.microsoftonline.com/contoso.com",
        client_id="app",
        client_secret="hunter2-secret",
        scope=SCOPE,
    )
    try:
        assert "hunter2" not in repr(cred) and "hunter2" not in str(cred)
        assert "hunter2" not in repr(vars(cred))
    finally:
        asyncio.run(cred.aclose())


def test_instance_discovery_only_for_microsoft_hosts() -> None:
    assert is_microsoft_authority("https://login.microsoftonline.com/contoso.com")
    assert not is_microsoft_authority("https://127.0.0.1:8443/contoso.com")
    assert not is_microsoft_authority("https://login.microsoftonline.com.evil.example/x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"authority": "http://127.0.0.1/contoso"}, "https"),
        ({"authority": "https://127.0.0.1/"}, "tenant"),
        ({"client_id": ""}, "client_id"),
        ({"client_secret": ""}, "client_secret"),
        ({"refresh_margin_s": -1.0}, "refresh_margin_s"),
    ],
)
def test_bad_arguments_are_configuration_errors(kwargs: dict[str, Any], match: str) -> None:
    options: dict[str, Any] = {
        "authority": "https://127.0.0.1/contoso",
        "client_id": "app",
        "client_secret": "s",
        "scope": SCOPE,
    }
    options.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        ClientSecretCredential(**options)


def test_certificate_credential_validates_its_inputs() -> None:
    with pytest.raises(ConfigurationError, match="PEM"):
        CertificateCredential(
            authority="https://127.0.0.1/contoso",
            client_id="app",
            private_key_pem="not a key",
            thumbprint="AB" * 20,
            scope=SCOPE,
        )
    with pytest.raises(ConfigurationError, match="thumbprint"):
        CertificateCredential(
            authority="https://127.0.0.1/contoso",
            client_id="app",
            private_key_pem="-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----",
            thumbprint="xyz",
            scope=SCOPE,
        )
