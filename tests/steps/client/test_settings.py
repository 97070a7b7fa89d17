"""TargetSettings: flags over environment over config file; one-line errors that never echo the secret."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from anonjoin import ConfigurationError
from anonjoin._async.auth import ClientSecretCredential
from anonjoin._async.settings import (
    DEFAULT_SCOPE,
    RUN_FIELDS,
    InsecureTLSWarning,
    TargetSettings,
    load_config_file,
    load_run_config,
)

SECRET = "file-secret-0123456789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("ANONJOIN_"):
            monkeypatch.delenv(name)


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_safe() -> None:
    s = TargetSettings.load()
    assert s.insecure is False
    assert s.scope == DEFAULT_SCOPE
    assert s.client_secret is None
    assert s.given_target_fields() == []


def test_flags_override_env_override_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(
        tmp_path / "target.toml",
        f'client_id = "file-id"\nclient-secret = "{SECRET}"\ndisplay_name = "From File"\n'
        'tenant = "file.example"\n[load]\nguests = 10\n',
    )
    monkeypatch.setenv("ANONJOIN_CLIENT_ID", "env-id")
    monkeypatch.setenv("ANONJOIN_DISPLAY_NAME", "From Env")
    s = TargetSettings.load(config_file=config, display_name="From Flag", tenant=None)
    assert s.display_name == "From Flag"  # flag
    assert s.client_id == "env-id"  # env over file
    assert s.tenant == "file.example"  # file; a None flag means "not given"
    assert isinstance(s.client_secret, SecretStr)
    assert s.client_secret.get_secret_value() == SECRET
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert SECRET not in json.dumps(s.redacted())


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANONJOIN_CLIENT_SECRET", SECRET)
    s = TargetSettings.load()
    assert s.client_secret is not None and s.client_secret.get_secret_value() == SECRET


def test_json_config_file(tmp_path: Path) -> None:
    path = tmp_path / "target.json"
    path.write_text(json.dumps({"discover_url": "https://h/platformservice/discover", "insecure": False}))
    assert TargetSettings.load(config_file=path).discover_url == "https://h/platformservice/discover"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"authority": "http://login.example/contoso"}, "authority"),
        ({"discover_url": "ftp://h/discover"}, "discover_url"),
        ({"discover_url": "https://h:99999/x"}, "discover_url"),
        ({"endpoint_id": "app@fabrikam.com"}, "endpoint_id"),
        ({"origin": "https://contoso.com/page"}, "origin"),
        ({"ca_file": "/nonexistent/ca.pem"}, "ca_file"),
        ({"display_name": "x" * 251}, "display_name"),
    ],
)
def test_invalid_values_name_the_field(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        TargetSettings.load(**values)
    message = str(info.value)
    assert message.startswith(f"invalid setting {field}:")
    assert "\n" not in message
    for value in values.values():
        assert value not in message


def test_invalid_secret_type_never_echoes_it(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"client_secret": {"nested": SECRET}, "insecure": "maybe-" + SECRET}))
    with pytest.raises(ConfigurationError) as info:
        TargetSettings.load(config_file=path)
    assert SECRET not in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_file_is_an_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "t.toml", 'client_idd = "x"\n')
    with pytest.raises(ConfigurationError, match="unknown setting 'client_idd'"):
        TargetSettings.load(config_file=path)


def test_run_settings_share_the_file_with_the_target(tmp_path: Path) -> None:
    """``guests = 1000`` is a run setting (anonjoin load's), not an unknown one; the target ignores it."""
    path = write_toml(
        tmp_path / "t.toml", 'client_id = "app"\nguests = 1000\nfail-if = "p95(join)>2s"\nno_html = true\n'
    )
    assert load_config_file(path) == {"client_id": "app"}
    assert load_run_config(path) == {"guests": 1000, "fail_if": "p95(join)>2s", "no_html": True}
    assert TargetSettings.load(config_file=path).client_id == "app"
    assert set(RUN_FIELDS).isdisjoint(TargetSettings.model_fields)


def test_bad_file_is_one_line_without_content(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "t.toml", f'client_secret = "{SECRET}\n')
    with pytest.raises(ConfigurationError) as info:
        load_config_file(path)
    assert "not valid TOML" in str(info.value)
    assert SECRET not in str(info.value)
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        load_config_file(tmp_path / "missing.toml")
    json_path = tmp_path / "t.json"
    json_path.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="table/object"):
        load_config_file(json_path)


def test_origin_is_normalised() -> None:
    assert TargetSettings.load(origin="https://Contoso.com/").origin == "https://Contoso.com"


def test_insecure_warns_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="anonjoin.settings")
    with pytest.warns(InsecureTLSWarning, match="verification is OFF"):
        s = TargetSettings.load(insecure=True)
    assert s.verify_tls() is False
    assert "anonjoin.settings.insecure" in caplog.text


def test_insecure_from_env_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANONJOIN_INSECURE", "true")
    with pytest.warns(InsecureTLSWarning):
        assert TargetSettings.load().insecure


def test_secure_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TargetSettings.load(insecure=False).verify_tls()


def test_require_lists_missing_fields() -> None:
    s = TargetSettings.load(client_id="x")
    with pytest.raises(ConfigurationError, match="--authority, --client-secret"):
        s.require("authority", "client_id", "client_secret")


def test_authority_gets_tenant_from_endpoint_domain() -> None:
    s = TargetSettings.load(authority="https://login.example/", endpoint_id="sip:app@contoso.com")
    assert s.resolved_authority() == "https://login.example/contoso.com"
    s = TargetSettings.load(authority="https://login.example", tenant="fabrikam.com")
    assert s.resolved_authority() == "https://login.example/fabrikam.com"
    s = TargetSettings.load(authority="https://login.example/given")
    assert s.resolved_authority() == "https://login.example/given"
    with pytest.raises(ConfigurationError, match="tenant"):
        TargetSettings.load(authority="https://login.example").resolved_authority()


async def test_credential_from_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = TargetSettings.load(
        authority="https://127.0.0.1:8443/contoso.com",
        client_id="app",
        client_secret=SECRET,
        ca_file=str(ca),
    )
    cred = s.credential()
    try:
        assert isinstance(cred, ClientSecretCredential)
        assert cred.ca_file == str(ca) and cred.verify_tls and cred.scope == DEFAULT_SCOPE
        assert SECRET not in repr(cred)
    finally:
        await cred.aclose()
    with pytest.raises(ConfigurationError, match="--client-secret"):
        TargetSettings.load(authority="https://h/t", client_id="app").credential()


def test_unknown_keyword_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting 'nope'"):
        TargetSettings.load(nope="x")


def test_direct_construction_and_env_errors_are_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="invalid setting origin"):
        TargetSettings(origin="https://contoso.com/page")
    monkeypatch.setenv("ANONJOIN_DISCOVER_URL", "not a url")
    with pytest.raises(ConfigurationError, match="invalid setting discover_url"):
        TargetSettings.load()
