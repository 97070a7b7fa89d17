"""``anonjoin join``: join one guest to a meeting of any deployment, or of the embedded simulator.

With no target at all (no target flag, no ``ANONJOIN_*`` target variable, no target in the config file) it
starts the embedded simulator and joins its default meeting. Otherwise the target comes from flags over
the environment over ``--config FILE`` (see :mod:`anonjoin._async.settings`); the client secret from
``--client-secret``, ``ANONJOIN_CLIENT_SECRET`` or the config file.

It prints each step as the client's hooks report it (or, with ``--json``, exactly one JSON object at the
end), holds the guest in the meeting for ``--hold`` seconds, leaves, and exits 0 when the guest joined and
stayed for the whole hold; 1 with a one-line reason when it did not; 2 for a bad flag or setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from anonjoin._cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    REQUIRED_FOR_TARGET,
    STOP_SIGNALS,
    add_target_arguments,
    error_line,
    exit_code_for_signal,
    is_target,
    non_negative_float,
    one_line_warnings,
    positive_float,
    positive_int,
    settings_from_args,
    simulator_settings,
    stderr_log_handler,
    stop_signals_deferred,
)
from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    ConfigurationError,
    JoinFailed,
    redact,
    redact_url,
)

if TYPE_CHECKING:  # loaded when the command runs, not for --help
    from anonjoin._async.auth import ClientSecretCredential
    from anonjoin._async.settings import TargetSettings

__all__ = ["register", "run"]

_REQUIRED_FOR_JOIN = (*REQUIRED_FOR_TARGET, "meeting_url", "origin")


EXAMPLES = """\
examples:
  anonjoin join
      one guest joins the embedded simulator and leaves; each step is printed
  ANONJOIN_CLIENT_SECRET=... anonjoin join --config contoso.toml --hold 30
      one guest joins a deployment's meeting, stays 30 s, leaves
  anonjoin join --config contoso.toml --json
      exactly one JSON object, for a script
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "join",
        help="join one guest to a meeting (the embedded simulator when no target is given)",
        description=(
            "Join one anonymous guest end to end and report each step. With no target flags, "
            "environment or config file target, the embedded simulator is started and joined. "
            "Settings: flags override ANONJOIN_* environment variables, which override --config FILE."
        ),
        epilog=EXAMPLES,
    )
    add_target_arguments(parser)
    parser.add_argument(
        "--hold",
        metavar="SECONDS",
        type=non_negative_float,
        default=0.0,
        help="stay in the meeting this long before leaving (default 0)",
    )
    parser.add_argument(
        "--lobby-timeout",
        metavar="SECONDS",
        type=positive_float,
        default=None,
        help="give up waiting in the lobby after this long",
    )
    parser.add_argument(
        "--attempts",
        metavar="N",
        type=positive_int,
        default=None,
        help="attempts per step, the first included (default: the client's RetryPolicy)",
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object (nothing else)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log to stderr (secrets redacted)")
    parser.set_defaults(run=run)


# ---- the report -------------------------------------------------------------------------------------


@dataclass
class _Report:
    """What happened, gathered from the hooks; printed as lines as it happens, or once as JSON."""

    out: TextIO
    as_json: bool
    target: str = ""
    outcome: str = "error"
    reason: str | None = None
    guest_id: str | None = None
    application_session_id: str | None = None
    conference_id: str | None = None
    join_ms: float | None = None
    held_s: float | None = None
    rejoins: int = 0
    steps_ms: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    leaving: bool = False
    started: float = field(default_factory=time.monotonic)

    def line(self, text: str) -> None:
        if not self.as_json:
            print(text, file=self.out, flush=True)

    def on_step(self, event: Any) -> None:
        if event.phase != "end" or (self.leaving and event.step == "events"):
            return  # the parked poll ends with a 404 once the guest has left: not news
        step = str(event.step)
        if event.duration_s is not None:
            self.steps_ms[step] = self.steps_ms.get(step, 0.0) + event.duration_s * 1000.0
        self.attempts[step] = self.attempts.get(step, 0) + 1
        status = "-" if event.status is None else str(event.status)
        duration = "" if event.duration_s is None else f"{event.duration_s * 1000.0:9.1f} ms"
        tail = ""
        if event.outcome == "retry":
            self.retries += 1
            tail = f"  retry ({event.retry_reason})" if event.retry_reason else "  retry"
        elif event.outcome == "error":
            tail = "  error" + (f" ({event.retry_reason})" if event.retry_reason else "")
        attempt = f" #{event.attempt}" if event.attempt and event.attempt > 1 else ""
        self.line(f"  {step + attempt:<22} {status:>4} {duration}{tail}")

    def on_guest(self, event: Any) -> None:
        kind = str(event.kind)
        if kind == "rejoined":
            self.rejoins += 1
        if kind in {"joined", "left"}:
            return  # printed by the main flow with more detail
        reason = f" ({event.reason})" if event.reason else ""
        self.line(f"  guest {kind}{reason}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "target": self.target,
            "guest_id": self.guest_id,
            "application_session_id": self.application_session_id,
            "conference_id": self.conference_id,
            "join_ms": None if self.join_ms is None else round(self.join_ms, 1),
            "steps_ms": {k: round(v, 1) for k, v in self.steps_ms.items()},
            "attempts": dict(self.attempts),
            "retries": self.retries,
            "rejoins": self.rejoins,
            "held_s": None if self.held_s is None else round(self.held_s, 3),
            "total_ms": round((time.monotonic() - self.started) * 1000.0, 1),
        }

    def finish(self) -> None:
        if self.as_json:
            print(json.dumps(self.as_dict(), sort_keys=True), file=self.out, flush=True)


# ---- running ----------------------------------------------------------------------------------------


def run(ns: argparse.Namespace) -> int:
    """The ``join`` sub-command. Every failure is one line (or the JSON object), never a traceback."""
    report = _Report(out=sys.stdout, as_json=bool(ns.json))
    log = logging.getLogger("anonjoin")
    level = log.level
    # Without -v nothing is logged: the outcome is the one line below (and Python's last-resort handler
    # would otherwise print warnings such as anonjoin.auth.failed a second time).
    handler = _log_to_stderr(ns.log_format) if ns.verbose else logging.NullHandler()
    if not ns.verbose:
        log.addHandler(handler)
    signals: list[str] = []
    with stop_signals_deferred("join", signals) as reinstall:  # a late Ctrl-C cannot lose the report
        code = _run_guarded(ns, report, signals, reinstall)
        log.removeHandler(handler)
        log.setLevel(level)
        report.finish()
    return code


def _run_guarded(
    ns: argparse.Namespace, report: _Report, signals: list[str], reinstall: Callable[[], None]
) -> int:
    try:
        with warnings.catch_warnings():
            _one_line_warnings()
            code = asyncio.run(_main_until_signalled(ns, report, signals, reinstall))
    except KeyboardInterrupt:
        report.outcome, report.reason = "interrupted", "interrupted"
        _error_line("interrupted: the guest left")
        code = EXIT_INTERRUPTED
    except ConfigurationError as exc:
        report.outcome, report.reason = "error", f"ConfigurationError: {exc}"
        _error_line(f"error: {exc}")
        code = EXIT_USAGE
    except AnonJoinError as exc:
        report.outcome, report.reason = "failed", f"{type(exc).__name__}: {exc}"
        _error_line(report.reason)
        code = EXIT_FAILED
    except Exception as exc:  # a bug: still one line, with the type, never a traceback
        logging.getLogger("anonjoin.cli").debug("anonjoin.cli.crash", exc_info=True)
        report.outcome = "error"
        report.reason = f"internal error: {type(exc).__name__}: {redact(str(exc))[:200]}"
        _error_line(report.reason)
        code = EXIT_FAILED
    return code


def _one_line_warnings() -> None:
    one_line_warnings("join")


def _error_line(text: str) -> None:
    error_line("join", text)


def _log_to_stderr(log_format: str) -> logging.Handler:
    handler = stderr_log_handler(log_format)
    handler.setLevel(logging.DEBUG)
    log = logging.getLogger("anonjoin")
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.DEBUG:
        log.setLevel(logging.DEBUG)
    return handler


async def _main_until_signalled(
    ns: argparse.Namespace, report: _Report, signals: list[str], reinstall: Callable[[], None]
) -> int:
    """Ctrl-C, SIGTERM and SIGHUP cancel the join: the guest leaves and the report is still printed; the exit
    code is 128 + the first signal (130, 143, 129). A further signal cancels again (the leave is bounded)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()

    def on_signal(signame: str) -> None:
        signals.append(signame)
        if task is not None:
            task.cancel()

    installed: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    if signals and task is not None:  # a signal before the loop ran
        task.cancel()
    try:
        return await _main(ns, report)
    except asyncio.CancelledError:
        if not signals:
            raise
        what = "interrupted" if signals[0] == "SIGINT" else f"terminated ({signals[0]})"
        report.outcome, report.reason = "interrupted", what
        _error_line(f"{what}: the guest left")
        return exit_code_for_signal(signals[0])
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        reinstall()


async def _main(ns: argparse.Namespace, report: _Report) -> int:
    settings = settings_from_args(ns)
    if not is_target(settings):
        async with _embedded_simulator(settings, report) as simulated:
            return await _join(ns, simulated, report)
    settings.require(*_REQUIRED_FOR_JOIN)
    report.target = redact_url(settings.discover_url)
    report.line(f"anonjoin join: target {report.target}")
    return await _join(ns, settings, report)


@contextlib.asynccontextmanager
async def _embedded_simulator(settings: TargetSettings, report: _Report) -> AsyncIterator[TargetSettings]:
    from anonjoin.simulator import Simulator, SimulatorConfig

    async with Simulator(SimulatorConfig()) as sim:
        info = sim.info
        report.target = "embedded simulator"
        report.line(f"anonjoin join: no target given: started the embedded simulator at {info.discover_url}")
        yield simulator_settings(info, display_name=settings.display_name)


async def _join(ns: argparse.Namespace, settings: TargetSettings, report: _Report) -> int:
    from anonjoin._async.client import Client
    from anonjoin._async.retry import RetryPolicy
    from anonjoin._core.events import Hooks

    assert settings.discover_url and settings.endpoint_id and settings.meeting_url and settings.origin
    credential = settings.credential()
    try:
        await _first_token(credential, report)
        async with Client(
            discover_url=settings.discover_url,
            endpoint_id=settings.endpoint_id,
            credential=credential,
            ca_file=settings.ca_file,
            verify_tls=settings.verify_tls(),
            hooks=Hooks(on_step=report.on_step, on_guest=report.on_guest),
            retry=RetryPolicy(attempts=ns.attempts) if ns.attempts else None,
        ) as client:
            guest = client.guest(
                meeting_url=settings.meeting_url,
                origin=settings.origin,
                display_name=settings.display_name,
                lobby_timeout_s=ns.lobby_timeout,
            )
            report.guest_id = guest.guest_id
            report.application_session_id = guest.application_session_id
            started = time.monotonic()
            try:
                result = await guest.join()
            except JoinFailed as exc:
                report.outcome, report.reason = "failed", exc.reason
                report.join_ms = (time.monotonic() - started) * 1000.0
                report.line(f"not joined: {exc}")
                _error_line(f"not joined: {exc}")
                return EXIT_FAILED
            except AnonJoinError as exc:
                report.outcome, report.reason = "failed", f"{type(exc).__name__}: {exc}"
                report.join_ms = (time.monotonic() - started) * 1000.0
                report.line(f"not joined: {report.reason}")
                _error_line(f"not joined: {report.reason}")
                return EXIT_FAILED
            report.join_ms = result.duration_s * 1000.0
            report.conference_id = result.conference_id
            report.outcome = "joined"
            report.line(
                f"joined: guest {guest.guest_id} (application session {guest.application_session_id}) "
                f"conference {result.conference_id} in {report.join_ms:.0f} ms"
            )
            code = await _hold(ns.hold, guest, report)
            report.leaving = True
            await guest.leave()
            if code == EXIT_OK:
                report.line(f"left after holding {report.held_s or 0.0:.1f} s ({report.rejoins} rejoins)")
            return code
    finally:
        await credential.aclose()


async def _first_token(credential: ClientSecretCredential, report: _Report) -> None:
    """Azure AD first, as a step of its own: its timing is reported and a refusal fails fast."""
    started = time.monotonic()
    try:
        await credential.token()
    except AuthError as exc:
        report.on_step(_AadStep(duration_s=time.monotonic() - started, outcome="error", status=None))
        report.outcome, report.reason = "failed", f"AuthError: {exc}"
        raise
    report.on_step(_AadStep(duration_s=time.monotonic() - started, outcome="ok", status=200))


@dataclass(frozen=True)
class _AadStep:
    """The shape of a StepEvent's end, for the Azure AD step the CLI times itself."""

    duration_s: float
    outcome: str
    status: int | None
    step: str = "aad_token"
    phase: str = "end"
    attempt: int = 1
    retry_reason: str | None = None


async def _hold(seconds: float, guest: Any, report: _Report) -> int:
    """Stay joined for ``seconds``; the guest closing early (ended, failed) is a failure of the hold."""
    if seconds <= 0:
        report.held_s = 0.0
        return EXIT_OK
    report.line(f"holding for {seconds:g} s ...")
    started = time.monotonic()
    try:
        outcome = await asyncio.wait_for(guest.wait_closed(), timeout=seconds)
    except TimeoutError:
        report.held_s = time.monotonic() - started
        return EXIT_OK
    report.held_s = time.monotonic() - started
    report.outcome = str(outcome.kind)
    report.reason = outcome.reason or str(outcome.kind)
    message = f"guest {outcome.kind} after {report.held_s:.1f} s of the {seconds:g} s hold"
    if outcome.reason:
        message += f": {outcome.reason}"
    report.line(message)
    _error_line(message)
    return EXIT_FAILED
