"""Where to join: the target deployment, from flags, the environment and a config file.

Precedence, highest first: explicit values (the CLI's flags), environment variables with the prefix
``ANONJOIN_`` (``ANONJOIN_CLIENT_SECRET``, ``ANONJOIN_DISCOVER_URL``, ...), then an optional config file
(TOML or JSON, chosen by its suffix; keys are the field names, ``-`` or ``_``; tables are ignored so the
same file can hold other sections). The same file can hold the run settings of ``anonjoin load``
(:data:`RUN_FIELDS`: ``guests``, ``concurrency``, ``ramp``, ``fail_if``, ...; :func:`load_run_config`), which
the CLI resolves with the same precedence; a key that is neither is an error naming it and the file.
Every problem is one :class:`anonjoin.ConfigurationError` whose message
names the field and never echoes the value (it could be the secret).

``insecure=True`` turns TLS verification off. It is never the default and it always warns
(:class:`InsecureTLSWarning` and a log record ``anonjoin.settings.insecure``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from anonjoin._async.auth import ClientSecretCredential
from anonjoin._core.constants import RUN_FIELDS
from anonjoin._exceptions import ConfigurationError, redact_url

__all__ = [
    "DEFAULT_SCOPE",
    "ENV_PREFIX",
    "RUN_FIELDS",
    "InsecureTLSWarning",
    "TargetSettings",
    "load_config_file",
    "load_run_config",
]

logger = logging.getLogger("anonjoin.settings")

ENV_PREFIX = "ANONJOIN_"
DEFAULT_SCOPE = "https://api.skypeforbusiness.com/.default"
DEFAULT_DISPLAY_NAME = "anonjoin guest"
TARGET_FIELDS = (
    "discover_url",
    "authority",
    "tenant",
    "client_id",
    "client_secret",
    "endpoint_id",
    "meeting_url",
    "origin",
)
"""The fields that name a deployment (as opposed to defaults such as ``scope`` or ``display_name``)."""


class InsecureTLSWarning(UserWarning):
    """TLS certificate verification was switched off."""


# The config file's contents for the settings being built (a context variable: thread- and task-safe).
_FILE_DATA: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "_FILE_DATA", default=None
)


class _FileSource(PydanticBaseSettingsSource):
    """The lowest-precedence source: the config file's values."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        data = _FILE_DATA.get() or {}
        return data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_DATA.get() or {})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON (any other suffix) config file into target field values (its run
    settings, :data:`RUN_FIELDS`, are :func:`load_run_config`'s)."""
    return _read_config(path)[0]


def load_run_config(path: str | Path) -> dict[str, Any]:
    """The run settings (:data:`RUN_FIELDS`) of a config file, as the file gives them (not yet checked)."""
    return _read_config(path)[1]


def _read_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {str(file)!r}: {exc.strerror or exc}") from exc
    try:
        if file.suffix.lower() == ".toml":
            data: Any = tomllib.loads(raw.decode("utf-8"))
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        kind = "TOML" if file.suffix.lower() == ".toml" else "JSON"
        # The parser's message can quote a line of the file (which may hold the secret): say where only.
        where = ""
        if isinstance(exc, json.JSONDecodeError):
            where = f" (line {exc.lineno})"
        raise ConfigurationError(f"config file {str(file)!r} is not valid {kind}{where}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {str(file)!r} must hold a table/object of settings")
    values: dict[str, Any] = {}
    run: dict[str, Any] = {}
    known = set(TargetSettings.model_fields)
    for key, value in data.items():
        if isinstance(value, dict):
            continue  # another tool's section
        name = str(key).replace("-", "_").lower()
        if name in RUN_FIELDS:
            run[name] = value
        elif name in known:
            values[name] = value
        else:
            raise ConfigurationError(f"config file {str(file)!r}: unknown setting {key!r}")
    return values, run


class TargetSettings(BaseSettings):
    """A target deployment of the protocol and the service application's credentials."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        hide_input_in_errors=True,
        validate_default=True,
        case_sensitive=False,
    )

    discover_url: str | None = None
    authority: str | None = None
    tenant: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    endpoint_id: str | None = None
    meeting_url: str | None = None
    origin: str | None = None
    ca_file: str | None = None
    scope: str = DEFAULT_SCOPE
    display_name: str = DEFAULT_DISPLAY_NAME
    insecure: bool = False

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise _configuration_error(exc) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    # -- building -------------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        *,
        config_file: str | Path | None = None,
        use_env: bool = True,
        **values: Any,
    ) -> TargetSettings:
        """Build settings: ``values`` (``None`` means "not given") over the environment over the file."""
        given = {k: v for k, v in values.items() if v is not None}
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise ConfigurationError(f"unknown setting {unknown[0]!r}")
        file_values = load_config_file(config_file) if config_file is not None else {}
        token = _FILE_DATA.set(file_values)
        try:
            if use_env:
                return cls(**given)
            return cls._without_env(given)
        except ValidationError as exc:
            raise _configuration_error(exc) from None
        finally:
            _FILE_DATA.reset(token)

    @classmethod
    def _without_env(cls, given: dict[str, Any]) -> TargetSettings:
        merged = dict(_FILE_DATA.get() or {})
        merged.update(given)
        return cls.model_validate(merged)

    # -- validation -----------------------------------------------------------------------------------

    @field_validator(
        "discover_url",
        "authority",
        "tenant",
        "client_id",
        "endpoint_id",
        "meeting_url",
        "origin",
        "ca_file",
        "scope",
        "display_name",
        mode="before",
    )
    @classmethod
    def _strip(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("discover_url", "meeting_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url(value, schemes=("https", "http"))
        return value

    @field_validator("authority")
    @classmethod
    def _https_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url(value, schemes=("https",))
        return value.rstrip("/") if value else value

    @field_validator("origin")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url(value, schemes=("https", "http"))
            parts = urlsplit(value)
            if parts.path not in ("", "/") or parts.query or parts.fragment:
                raise ValueError("must be an origin: scheme://host[:port], without a path")
            return f"{parts.scheme}://{parts.netloc}"
        return value

    @field_validator("endpoint_id")
    @classmethod
    def _sip_uri(cls, value: str | None) -> str | None:
        if value is not None and (not value.lower().startswith("sip:") or "@" not in value):
            raise ValueError("must be the application endpoint's SIP URI, like sip:app@contoso.com")
        return value

    @field_validator("ca_file")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError("is not a readable file")
        return value

    @field_validator("scope")
    @classmethod
    def _scope(cls, value: str | None) -> str:
        return value or DEFAULT_SCOPE

    @field_validator("display_name")
    @classmethod
    def _display_name(cls, value: str | None) -> str:
        value = value or DEFAULT_DISPLAY_NAME
        if len(value) > 250:
            raise ValueError("must be at most 250 characters")
        return value

    @field_validator("client_secret", mode="before")
    @classmethod
    def _secret(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _warn_insecure(self) -> TargetSettings:
        if self.insecure:
            message = "TLS certificate verification is OFF (insecure=True): use only against a test target"
            warnings.warn(message, InsecureTLSWarning, stacklevel=2)
            logger.warning(
                "anonjoin.settings.insecure: %s", message, extra={"event": "anonjoin.settings.insecure"}
            )
        return self

    # -- using ----------------------------------------------------------------------------------------

    def given_target_fields(self) -> list[str]:
        """The deployment-naming fields that have a value."""
        return [name for name in TARGET_FIELDS if getattr(self, name) is not None]

    def require(self, *names: str) -> None:
        """Raise one ConfigurationError listing every one of ``names`` that has no value."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise ConfigurationError(
                f"missing setting(s): {flags} (or {ENV_PREFIX}{missing[0].upper()}, or the config file)"
            )

    def resolved_tenant(self) -> str | None:
        """The tenant: as given, else the domain of the endpoint's SIP URI (protocol.md §3)."""
        if self.tenant:
            return self.tenant
        if self.endpoint_id and "@" in self.endpoint_id:
            return self.endpoint_id.rsplit("@", 1)[1].split(";", 1)[0] or None
        return None

    def resolved_authority(self) -> str:
        """The authority URL with its tenant path (``{authority}/{tenant}`` when it has no path)."""
        self.require("authority")
        assert self.authority is not None
        parts = urlsplit(self.authority)
        if parts.path.strip("/"):
            return self.authority
        tenant = self.resolved_tenant()
        if not tenant:
            raise ConfigurationError("authority has no tenant path: give --tenant (or an endpoint id)")
        return f"{self.authority}/{tenant}"

    def verify_tls(self) -> bool:
        return not self.insecure

    def credential(self, **options: Any) -> ClientSecretCredential:
        """A client-secret credential for this target (``options`` go to ClientSecretCredential)."""
        self.require("authority", "client_id", "client_secret")
        assert self.client_id is not None and self.client_secret is not None
        return ClientSecretCredential(
            authority=self.resolved_authority(),
            client_id=self.client_id,
            client_secret=self.client_secret,
            scope=self.scope,
            ca_file=self.ca_file,
            verify_tls=self.verify_tls(),
            **options,
        )

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict fit to print: the secret masked, URLs without their query."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                out[name] = "**********"
            elif isinstance(value, str) and name.endswith(("_url", "authority", "origin")):
                out[name] = redact_url(value)
            else:
                out[name] = value
        return out


def _check_url(value: str, *, schemes: Sequence[str]) -> None:
    parts = urlsplit(value)
    if parts.scheme.lower() not in schemes or not parts.hostname:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ValueError(f"must be an absolute {wanted} URL")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None


def _configuration_error(exc: ValidationError) -> ConfigurationError:
    """One line naming the field; never the input (hide_input_in_errors, and we only use loc + msg)."""
    errors = exc.errors(include_input=False, include_url=False)
    first = errors[0]
    field = ".".join(str(part) for part in first["loc"]) or "settings"
    message = str(first["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return ConfigurationError(f"invalid setting {field}: {message}{more}")
