"""``anonjoin doctor``: a preflight of a target, one line per check (see :mod:`anonjoin._async.doctor`).

The target comes as for ``anonjoin join``: flags over ``ANONJOIN_*`` over ``--config FILE``; with no target
at all the embedded simulator is started and checked (every check passes). Exit 0 when every check passed,
1 when one failed, 2 for bad input; ``--json`` prints exactly one JSON object.

The meeting URL is read as given (flag, environment, config file) and judged by its own check, so a SIP
conference id fails that check with its explanation instead of the settings' generic "must be a URL".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, TextIO

from anonjoin._cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    REQUIRED_FOR_TARGET,
    add_target_arguments,
    cli_logging,
    error_line,
    is_target,
    one_line_warnings,
    positive_float,
    settings_from_args,
    simulator_settings,
)
from anonjoin._exceptions import ConfigurationError, redact, redact_url

if TYPE_CHECKING:  # loaded when the command runs, not for --help
    from anonjoin._async.doctor import CheckResult, DoctorReport
    from anonjoin._async.settings import TargetSettings

__all__ = ["register", "run"]

DEFAULT_TIMEOUT_S = 10.0  # anonjoin._async.doctor.DEFAULT_TIMEOUT_S (not imported: --help stays light)
_MEETING_PLACEHOLDER = "https://meeting.placeholder.invalid/"
"""Stands in for the meeting URL while the other settings are validated; the real one is judged apart."""

EXAMPLES = """\
exit codes: 0 every check passed; 1 a check failed; 2 bad input

examples:
  anonjoin doctor
      check the embedded simulator (no target given): every check passes
  ANONJOIN_CLIENT_SECRET=... anonjoin doctor --config contoso.toml --join
      check a deployment, then join and leave one guest
  anonjoin doctor --config contoso.toml --json | jq '.checks[] | select(.status == "fail")'
      the failed checks, for a script
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check a target's configuration step by step (the embedded simulator when no target is given)",
        description=(
            "Preflight a target, in order: the discover URL over https with a trusted certificate; an Azure "
            "AD token for the scope; the endpoint id is an application of the tenant; anonApplicationTokens "
            "(the 'Guest user join services' permission) is consented; every origin is https; the meeting "
            "URL is an HTTP join URL; a psat can be minted and the anonymous discover answers for the "
            "origin; with --join, one guest joins and leaves. One line per check, with what to fix. "
            "Settings: flags override ANONJOIN_* environment variables, which override --config FILE."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_target_arguments(parser)
    parser.add_argument("--join", action="store_true", help="also join one guest and leave")
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        help=f"time limit of each check (default {DEFAULT_TIMEOUT_S:g}; the join gets three times it)",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object (nothing else)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr (secrets redacted)")
    parser.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    """The ``doctor`` sub-command: exit 0 all checks passed, 1 one failed, 2 bad input."""
    out = sys.stdout
    with cli_logging(bool(ns.verbose), ns.log_format), warnings.catch_warnings():
        _one_line_warnings()
        try:
            report = asyncio.run(_main(ns, out))
        except ConfigurationError as exc:
            if ns.json:
                print(
                    json.dumps({"ok": False, "error": redact(str(exc)), "checks": []}), file=out, flush=True
                )
            _error_line(f"error: {exc}")
            return EXIT_USAGE
    if ns.json:
        print(json.dumps(report.as_dict(), ensure_ascii=False), file=out, flush=True)
    else:
        print(f"anonjoin doctor: {report.summary()}", file=out, flush=True)
    return EXIT_OK if report.ok else EXIT_FAILED


async def _main(ns: argparse.Namespace, out: TextIO) -> DoctorReport:
    meeting = _given_meeting_url(ns)
    settings = settings_from_args(ns, meeting_url=_MEETING_PLACEHOLDER if meeting is not None else None)
    if not is_target(settings):
        from anonjoin.simulator import Simulator, SimulatorConfig

        async with Simulator(SimulatorConfig()) as sim:
            simulated = simulator_settings(sim.info, display_name=settings.display_name)
            assert simulated.meeting_url is not None
            return await _doctor(ns, simulated, simulated.meeting_url, "the embedded simulator", out)
    settings.require(*REQUIRED_FOR_TARGET, *(() if meeting is not None else ("meeting_url",)), "origin")
    assert meeting is not None
    return await _doctor(ns, settings, meeting, redact_url(settings.discover_url), out)


async def _doctor(
    ns: argparse.Namespace, settings: TargetSettings, meeting_url: str, label: str, out: TextIO
) -> DoctorReport:
    from anonjoin._async.doctor import run_doctor

    assert settings.discover_url and settings.endpoint_id and settings.origin
    if not ns.json:
        print(f"anonjoin doctor: checking {label}", file=out, flush=True)

    def show(result: CheckResult) -> None:
        if not ns.json:
            print(result.line(), file=out, flush=True)

    credential = settings.credential(timeout_s=ns.timeout)
    try:
        return await run_doctor(
            discover_url=settings.discover_url,
            endpoint_id=settings.endpoint_id,
            credential=credential,
            meeting_url=meeting_url,
            origins=settings.origin,
            ca_file=settings.ca_file,
            verify_tls=settings.verify_tls(),
            scope=settings.scope,
            join=bool(ns.join),
            display_name=settings.display_name,
            timeout_s=ns.timeout,
            on_check=show,
        )
    finally:
        await credential.aclose()


def _given_meeting_url(ns: argparse.Namespace) -> str | None:
    """The meeting URL as given, unvalidated, with the settings' precedence: flag, environment, file."""
    candidates: list[Any] = [ns.meeting_url]
    candidates += [v for k, v in os.environ.items() if k.upper() == "ANONJOIN_MEETING_URL"]
    if ns.config is not None:
        from anonjoin._async.settings import load_config_file

        candidates.append(load_config_file(ns.config).get("meeting_url"))
    for value in candidates:
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigurationError("invalid setting meeting_url: must be a string")
        if value.strip():
            return value.strip()
    return None


def _one_line_warnings() -> None:
    one_line_warnings("doctor")


def _error_line(text: str) -> None:
    error_line("doctor", text)
