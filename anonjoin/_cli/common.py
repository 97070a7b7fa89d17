"""What the sub-commands share: exit codes, argument types, the target flags and how they become settings."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from anonjoin._exceptions import ConfigurationError, redact

if TYPE_CHECKING:  # the settings (pydantic-settings, msal) load when a command runs, not for --help
    from anonjoin._async.settings import TargetSettings
    from anonjoin.simulator import SimulatorInfo

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_THRESHOLDS = 99  # --fail-if breached (k6's code for crossed thresholds): the run itself worked
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_HANGUP = 129

# The signals that stop a run cleanly (guests leave, reports are written); the exit code is 128 + the first.
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


def exit_code_for_signal(signame: str) -> int:
    """Exit code for a run stopped by ``signame``: 128 + the signal (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    return {"SIGINT": EXIT_INTERRUPTED, "SIGTERM": EXIT_TERMINATED, "SIGHUP": EXIT_HANGUP}.get(
        signame, EXIT_INTERRUPTED
    )


@contextlib.contextmanager
def stop_signals_deferred(command: str, signals: list[str]) -> Iterator[Callable[[], None]]:
    """While the event loop's own handlers are not installed (before the run, during ``asyncio.run``'s
    teardown, while the reports are written), a stop signal is appended to ``signals`` and announced,
    never raised: a second Ctrl-C cannot lose the reports. Yields the function that re-installs these
    handlers (``loop.remove_signal_handler`` resets SIGINT to raising ``KeyboardInterrupt``)."""

    def record(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        signals.append(name)
        print(f"anonjoin {command}: {name}: already stopping; the report is written first", file=sys.stderr)

    previous: dict[signal.Signals, Any] = {}

    def install() -> None:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(ValueError):  # not the main thread: nothing to defer
                before = signal.signal(sig, record)
                previous.setdefault(sig, before)

    install()
    try:
        yield install
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


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


def _number(text: str, kind: type[int] | type[float], rule: str, ok: Callable[[float], bool]) -> Any:
    """One rule, one message: whatever is wrong with ``text`` (not a number, too small, not finite), the
    error states the rule."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}: {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value: float = _number(text, float, "a finite number >= 0", lambda v: v >= 0)
    return value


def positive_float(text: str) -> float:
    value: float = _number(text, float, "a finite number > 0", lambda v: v > 0)
    return value


def non_negative_int(text: str) -> int:
    value: int = _number(text, int, "a whole number >= 0", lambda v: v >= 0)
    return value


def positive_int(text: str) -> int:
    value: int = _number(text, int, "a whole number >= 1", lambda v: v >= 1)
    return value


class HelpFormatter(argparse.HelpFormatter):
    """Every command's help: descriptions wrapped to the terminal; a paragraph whose lines after the first
    are indented (``examples:``, then the commands) kept as written; every default shown (an option whose
    help does not say its default gets ``(default: X)``)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        blocks = []
        for block in text.strip("\n").split("\n\n"):
            lines = block.splitlines()
            if len(lines) > 1 and all(line.startswith(" ") for line in lines[1:]):
                blocks.append("\n".join(indent + line for line in lines))
            else:
                blocks.append(super()._fill_text(block, width, indent))
        return "\n\n".join(blocks)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default.value if isinstance(action.default, Default) else action.default
        if (
            not action.option_strings
            or default is None
            or default is False
            or default == ""
            or default == argparse.SUPPRESS
            or any(said in text for said in ("(default", "default:", "; default"))
        ):
            return text
        return text + " (default: %(default)s)"


_PLAIN_FORMATTERS = (argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter)


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (what is wrong, then where the help is), not the
    usage block first; exit 2. Its help is :class:`HelpFormatter`'s (examples kept, defaults shown)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("formatter_class", argparse.HelpFormatter) in _PLAIN_FORMATTERS:
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {' '.join(message.split())}; see: {self.prog} --help\n")


class Default:
    """A run flag's default that also says "not given on the command line" (see :func:`run_settings`):
    such a setting then comes from ``ANONJOIN_<NAME>``, else the ``--config`` file, else this value. Its
    ``str`` is the value's, so ``%(default)s`` in a help text reads as usual."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return f"Default({self.value!r})"


EXCLUSIVE_RUN_SETTINGS = (("rate", "ramp"),)
"""Settings that are one choice (a schedule): given at one level, the other's lower levels are ignored."""

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def run_settings(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Make the flags of ``parser`` named ``names`` (their ``dest``) run settings that a flag, the
    environment (``ANONJOIN_<NAME>``) or the ``--config`` file can give, in that order; read them back with
    :func:`resolve_run_settings`."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in names:
            action.default = Default(action.default)
            actions[action.dest] = action
    missing = sorted(set(names) - set(actions))
    if missing:
        raise ValueError(f"{parser.prog}: no flag for run setting(s) {missing}")
    parser.set_defaults(run_setting_actions=actions)


def resolve_run_settings(ns: argparse.Namespace) -> argparse.Namespace:
    """Replace every run setting of ``ns`` that no flag gave (a :class:`Default`) by ``ANONJOIN_<NAME>``,
    else the ``--config`` file's value, else the default. A bad value is a ``ConfigurationError`` naming the
    setting and where it came from (exit 2). Returns ``ns``."""
    actions: dict[str, argparse.Action] = getattr(ns, "run_setting_actions", None) or {}
    pending = {dest for dest in actions if isinstance(getattr(ns, dest), Default)}
    if not pending:
        return ns
    config = getattr(ns, "config", None)
    from anonjoin._async.settings import ENV_PREFIX, load_run_config

    in_file = {k: v for k, v in (load_run_config(config) if config else {}).items() if k in actions}
    in_env = {
        dest: os.environ[ENV_PREFIX + dest.upper()]
        for dest in actions
        if os.environ.get(ENV_PREFIX + dest.upper()) is not None
    }
    for group in EXCLUSIVE_RUN_SETTINGS:
        members = [d for d in group if d in actions]
        given = [d for d in members if d not in pending]
        for level, where in (
            (in_env, f"the {ENV_PREFIX}* environment"),
            (in_file, f"config file {config!r}"),
        ):
            if given:  # a higher level chose: this level's choice is not used
                for d in members:
                    level.pop(d, None)
                continue
            chosen = [d for d in members if d in level]
            if len(chosen) > 1:
                raise ConfigurationError(f"{where}: {' and '.join(chosen)} are exclusive; give one")
            given = chosen
    for dest in sorted(pending):
        action = actions[dest]
        default: Default = getattr(ns, dest)
        if dest in in_env:
            name = ENV_PREFIX + dest.upper()
            value = _env_value(action, in_env[dest], f"invalid setting {name}")
        elif dest in in_file:
            value = _file_value(action, in_file[dest], f"config file {config!r}: invalid setting {dest}")
        else:
            value = default.value
        setattr(ns, dest, value)
    return ns


def _env_value(action: argparse.Action, text: str, where: str) -> Any:
    if action.nargs == 0:  # a switch: --no-html, --shared-throttle/--no-shared-throttle
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigurationError(f"{where}: must be true or false (1/0, yes/no, on/off)")
    return _converted(action, text, where)


def _file_value(action: argparse.Action, value: Any, where: str) -> Any:
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise ConfigurationError(f"{where}: must be true or false, not {_kind(value)}")
        return value
    expected = _expected_kind(action)
    if expected is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigurationError(f"{where}: must be a whole number, not {_kind(value)}")
    if expected is float and not (isinstance(value, int | float) and not isinstance(value, bool)):
        raise ConfigurationError(f"{where}: must be a number, not {_kind(value)}")
    if expected is str and not isinstance(value, str):
        raise ConfigurationError(f"{where}: must be a string, not {_kind(value)}")
    return _converted(action, str(value), where)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {int: "a whole number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _expected_kind(action: argparse.Action) -> type:
    """What a flag's type makes of a value: int, float or str (probed on "1")."""
    if action.type is None:
        return str
    try:
        probe = action.type("1")  # type: ignore[operator]
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return str
    return type(probe) if type(probe) in (int, float) else str


def _converted(action: argparse.Action, text: str, where: str) -> Any:
    value: Any = text
    if action.type is not None:
        try:
            value = action.type(text)  # type: ignore[operator]
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}: {' '.join(str(exc).split()) or 'invalid value'}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise ConfigurationError(f"{where}: must be one of {choices}")
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
    from anonjoin._async.settings import TargetSettings

    return TargetSettings.load(config_file=ns.config, **given)


def is_target(settings: TargetSettings) -> bool:
    """Whether the settings name a deployment (else the embedded simulator is used)."""
    return any(name not in NOT_A_TARGET for name in settings.given_target_fields())


def simulator_settings(info: SimulatorInfo, *, display_name: str | None) -> TargetSettings:
    """The TargetSettings that point at a running simulator (the environment is not read)."""
    from anonjoin._async.settings import TargetSettings

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


def error_line(command: str, text: str) -> None:
    """One line on stderr: ``anonjoin COMMAND: text`` (secrets redacted, white space folded)."""
    print(f"anonjoin {command}: {' '.join(redact(text).split())}", file=sys.stderr, flush=True)


def one_line_warnings(command: str) -> None:
    """Inside ``catch_warnings``: the insecure-TLS warning once, as one line; urllib3's per-request
    ``InsecureRequestWarning`` (msal's requests to Azure AD) silenced, since that one line says it all."""
    import warnings

    from anonjoin._async.settings import InsecureTLSWarning

    warnings.simplefilter("default", InsecureTLSWarning)
    warnings.filterwarnings("ignore", message="Unverified HTTPS request")  # urllib3's, without importing it

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        error_line(command, f"warning: {message}")

    warnings.showwarning = show


@contextlib.contextmanager
def cli_logging(verbose: bool, log_format: str = "text") -> Iterator[None]:
    """-v: every anonjoin log record to stderr (secrets are redacted at the source). Otherwise none: no log
    line over the command's own output (its report or check lines say what they would). Undone on exit."""
    root = logging.getLogger("anonjoin")
    handler = stderr_log_handler(log_format) if verbose else logging.NullHandler()
    level = root.level
    root.addHandler(handler)
    if verbose:
        root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
