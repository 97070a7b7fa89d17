"""What the sub-commands share: exit codes, argument types, the target flags and how they become settings."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from anonjoin._exceptions import redact

if TYPE_CHECKING:  # the settings (pydantic-settings, msal) load when a command runs, not for --help
    from anonjoin._settings import TargetSettings
    from anonjoin.simulator import SimulatorInfo

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# The settings that name a deployment; given none of them, a sub-command uses the embedded simulator.
# The secret alone does not name one.
NOT_A_TARGET = frozenset({"client_secret"})
REQUIRED_FOR_TARGET = ("discover_url", "authority", "client_id", "client_secret", "endpoint_id")


LOG_FORMATS = ("text", "json")
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# What every LogRecord carries; the rest of its attributes are the ``extra`` fields of log_event.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def add_log_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines on stderr as text (default) or one JSON object a line",
    )


class JsonLogFormatter(logging.Formatter):
    """One JSON object a record: time (ISO-8601 UTC), level, logger, event, message and the extra fields.

    The fields are redacted at the source (log_event); strings are passed through ``redact`` once more, and
    an exception is its type and redacted message only (no traceback: frames can hold secrets).
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "event": getattr(record, "event", None),
            "message": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in out and value is not None:
                out[key] = _json_value(value)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            out["error"] = f"{type(exc).__name__}: {redact(str(exc))[:200]}"
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if value is True or value is False or isinstance(value, int | float):
        return value
    return redact(str(value))


def stderr_log_handler(log_format: str) -> logging.Handler:
    """A stderr handler writing ``log_format`` (``text`` or ``json``) lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT))
    return handler


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def add_target_arguments(parser: argparse.ArgumentParser, *, display_name: bool = True) -> None:
    """The target and credential flags of every sub-command that talks to a deployment.

    Read them back with :func:`settings_from_args` (flags over ``ANONJOIN_*`` over ``--config FILE``).
    """
    target = parser.add_argument_group("target (none: the embedded simulator)")
    target.add_argument("--discover-url", metavar="URL", help="the Trusted Application API discover URL")
    target.add_argument("--authority", metavar="URL", help="Azure AD authority, https://host/<tenant>")
    target.add_argument(
        "--tenant", help="tenant, when --authority has no tenant path (default: the domain of --endpoint-id)"
    )
    target.add_argument("--client-id", metavar="ID", help="the service application's Azure AD app id")
    target.add_argument(
        "--client-secret",
        metavar="SECRET",
        help="the app's client secret (prefer ANONJOIN_CLIENT_SECRET: flags show up in process lists)",
    )
    target.add_argument("--endpoint-id", metavar="SIP_URI", help="application endpoint, sip:app@domain")
    target.add_argument("--meeting-url", metavar="URL", help="the meeting's HTTP join URL")
    target.add_argument("--origin", metavar="ORIGIN", help="the origin the guests present, https://host")
    target.add_argument("--scope", help="Azure AD scope (default https://api.skypeforbusiness.com/.default)")
    if display_name:
        target.add_argument("--display-name", metavar="NAME", help="the guest's display name")
    target.add_argument("--ca-file", metavar="PEM", help="CA bundle to trust for the target (and Azure AD)")
    target.add_argument(
        "--insecure", action="store_true", default=None, help="do not verify TLS certificates (test only)"
    )
    target.add_argument("--config", metavar="FILE", help="TOML or JSON file with the settings above")


def settings_from_args(ns: argparse.Namespace, **overrides: Any) -> TargetSettings:
    """The TargetSettings for the flags of :func:`add_target_arguments` (absent flags are ``None``)."""
    given: dict[str, Any] = {
        "discover_url": ns.discover_url,
        "authority": ns.authority,
        "tenant": ns.tenant,
        "client_id": ns.client_id,
        "client_secret": ns.client_secret,
        "endpoint_id": ns.endpoint_id,
        "meeting_url": ns.meeting_url,
        "origin": ns.origin,
        "scope": ns.scope,
        "display_name": getattr(ns, "display_name", None),
        "ca_file": ns.ca_file,
        "insecure": ns.insecure,
    }
    given.update(overrides)
    from anonjoin._settings import TargetSettings

    return TargetSettings.load(config_file=ns.config, **given)


def is_target(settings: TargetSettings) -> bool:
    """Whether the settings name a deployment (else the embedded simulator is used)."""
    return any(name not in NOT_A_TARGET for name in settings.given_target_fields())


def simulator_settings(info: SimulatorInfo, *, display_name: str | None) -> TargetSettings:
    """The TargetSettings that point at a running simulator (the environment is not read)."""
    from anonjoin._settings import TargetSettings

    return TargetSettings.load(
        use_env=False,
        discover_url=info.discover_url,
        authority=info.authority,
        tenant=info.tenant,
        client_id=info.client_id,
        client_secret=info.client_secret,
        endpoint_id=info.endpoint_id,
        meeting_url=info.meeting_url,
        origin=info.origin,
        scope=info.scope,
        ca_file=info.ca_file,
        display_name=display_name,
    )
