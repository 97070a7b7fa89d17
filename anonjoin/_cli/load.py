"""``anonjoin load``, ``anonjoin rejoin`` and ``anonjoin sessions``: the many-guest side of the CLI.

``anonjoin load`` with no target (no target flag, no ``ANONJOIN_*`` target variable, no target in
``--config``) starts the embedded simulator (with ``--faults``; in its own process when more than one core
is usable, stopped at the end whatever ends the client) and loads it; with a target it loads that
deployment (more than 50 guests against a host that is not loopback needs ``--i-own-this-service``). It
shows live progress, writes ``anonjoin-report.json`` and ``anonjoin-report.html`` (or ``--report`` /
``--html``), and exits 0; 99 when ``--fail-if`` is breached (the run worked, a threshold did not: k6's
code); 1 when no guest joined or the run failed; 2 for a bad flag or setting;
130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP (128 + the signal; in each case arrivals stop, joined guests
leave and the report is still written).

``--workers N`` (``auto``: the usable cores) runs the plan in N worker processes, one shard each
(:mod:`anonjoin._load.workers`); the parent prepares, stores, shows the summed progress and merges.
``--shard K/S --start-at T --report FILE`` runs one shard against a target and writes its shard result for
``anonjoin merge`` (a Kubernetes Indexed Job, a CI matrix). ``--ray ADDRESS [--shards S]`` runs the shards
as actors of an existing Ray cluster (:mod:`anonjoin._load.ray`, the ``anonjoin[ray]`` extra; S defaults to
the cluster's CPUs), prepared, stored and merged here in the same way.

Every guest's applicationSessionId comes from the session store (``--store``; default
``$ANONJOIN_STORE`` or ``~/.local/state/anonjoin/sessions.db``; ``--store :memory:`` keeps nothing), so
``anonjoin rejoin --guest ID`` brings a guest back with the same id after a restart, and
``anonjoin sessions`` lists what the store holds. ``--store redis://host:6379/0`` (``rediss://`` for TLS)
shares one store between several instances; its credentials are never printed. With a file or Redis store,
``load`` and ``rejoin`` hold a lease per guest while they keep it (``rejoin`` is refused while another
instance holds the guest).

The store keeps each run's guests apart: a guest id is one guest per target (discover URL, endpoint id,
meeting) and run id. A ``load`` without ``--run-id`` gets a new run id (printed, and in the report's
settings); ``--run-id NAME`` resumes that run's guests with their applicationSessionIds. ``sessions`` lists
the run and target of each guest (``--run-id`` to filter); ``rejoin --guest ID`` needs ``--run-id`` when
several runs of the target given have that guest id.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from anonjoin._cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_THRESHOLDS,
    EXIT_USAGE,
    REQUIRED_FOR_TARGET,
    STOP_SIGNALS,
    add_target_arguments,
    cli_logging,
    exit_code_for_signal,
    is_target,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_run_settings,
    run_settings,
    settings_from_args,
    simulator_settings,
    stop_signals_deferred,
)
from anonjoin._core.constants import RUN_FIELDS
from anonjoin._exceptions import AnonJoinError, ConfigurationError, redact, redact_url

if TYPE_CHECKING:  # loaded when a command runs, not for --help
    from anonjoin._async.settings import TargetSettings
    from anonjoin._load.runner import LoadPlan
    from anonjoin._load.sharded import ShardEngine
    from anonjoin._load.store import SessionStore

__all__ = ["register", "run_load_command", "run_rejoin_command", "run_sessions_command"]

DEFAULT_GUESTS = 300
DEFAULT_CONCURRENCY = 50
DEFAULT_HOLD_S = 5.0
DEFAULT_SIM_MEETINGS = 4
DEFAULT_REPORT = "anonjoin-report.json"
DEFAULT_HTML = "anonjoin-report.html"
GUARD_GUESTS = 50
MEMORY_STORE = ":memory:"

log = logging.getLogger("anonjoin.cli")

LOAD_EXAMPLES = """\
exit codes: 0 ok; 1 the run failed (no guest joined, a service error); 2 bad input; 99 --fail-if breached;
130 Ctrl-C, 143 SIGTERM, 129 SIGHUP (guests leave, reports written)

run settings (--guests ... --run-id) can also be given as ANONJOIN_<NAME> (ANONJOIN_GUESTS=500) or in the
--config file (guests = 500, fail_if = "..."): flags override the environment, which overrides the file.

examples:
  anonjoin load --guests 2000 --workers auto --ramp 10..200/30s --faults flaky
      2,000 guests against the embedded simulator from one worker process per core, arrivals ramping
      from 10/s to 200/s, with faults
  anonjoin load --config contoso.toml --guests 50 --hold 60 --fail-if "p95(join)>2s"
      a deployment; exit 99 when the 95th percentile join takes more than 2 s
  anonjoin load --config contoso.toml --run-id nightly
      the guests of run nightly again, with the same applicationSessionIds
"""

REJOIN_EXAMPLES = """\
examples:
  anonjoin rejoin --guest guest-0002 --config contoso.toml
      guest-0002 again with its stored applicationSessionId, then leave
  anonjoin rejoin --guest guest-0002 --run-id nightly --hold 60 --config contoso.toml
      the guest-0002 of run nightly (when several runs have one), held 60 s
  anonjoin rejoin --guest guest-0002 --config contoso.toml --json
      one JSON object: the outcome and the applicationSessionId
"""

SESSIONS_EXAMPLES = """\
examples:
  anonjoin sessions
      every guest of the default store, as a table
  anonjoin sessions --run-id nightly --limit 20
      the 20 guests of run nightly updated last
  anonjoin sessions --store redis://localhost:6379/0 --json
      a shared Redis store, as one JSON array
"""


# -- flags -----------------------------------------------------------------------------------------


def _store_flag(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--store",
        metavar="PATH|URL",
        help=(
            "session store: a file (SQLite), or redis://host:6379/0 (rediss:// for TLS) shared by several "
            "instances; default $ANONJOIN_STORE or ~/.local/state/anonjoin/sessions.db; "
            f"{MEMORY_STORE} keeps nothing"
        ),
    )


def _run_id(text: str) -> str:
    from anonjoin._load.store import check_run_id

    try:
        return check_run_id(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_id_flag(parser: argparse._ActionsContainer, help_text: str) -> None:
    parser.add_argument("--run-id", type=_run_id, metavar="NAME", help=help_text)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    load = subparsers.add_parser(
        "load",
        help="join many guests at once and report (the embedded simulator when no target is given)",
        description=(
            "Load-test guest joins: many guests with bounded concurrency and an arrival schedule, held "
            "joined, then left; live progress; a JSON and an HTML report. With no target, the embedded "
            "simulator is started (with --faults) and loaded."
        ),
        epilog=LOAD_EXAMPLES,
    )
    run = load.add_argument_group("the run")
    run.add_argument("--guests", type=positive_int, default=DEFAULT_GUESTS, help="guests (default 300)")
    run.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        help="joins in flight at most (default 50); the connection pool is sized to it",
    )
    sched = run.add_mutually_exclusive_group()
    sched.add_argument(
        "--rate", type=positive_float, metavar="R", help="arrivals per second (default: as fast as allowed)"
    )
    sched.add_argument(
        "--ramp",
        metavar="SPEC",
        help="arrival ramp: A..B/SECONDS (linear, e.g. 10..200/30s) or RATE:SECONDS,...,RATE (steps)",
    )
    run.add_argument(
        "--hold",
        type=non_negative_float,
        default=DEFAULT_HOLD_S,
        metavar="S",
        help="seconds each guest stays joined before it leaves (default 5)",
    )
    run.add_argument(
        "--meetings",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"spread guests over N meetings, creating N-1 (default {DEFAULT_SIM_MEETINGS} on the "
        "simulator, 1 on a target)",
    )
    run.add_argument("--display-name", metavar="NAME", help="guest display name; {n} is the guest's number")
    run.add_argument(
        "--guest-prefix", default="guest-", metavar="P", help="guest ids are P0001... (default guest-)"
    )
    run.add_argument(
        "--lobby-timeout", type=positive_float, default=None, metavar="S", help="lobby wait limit"
    )
    _run_id_flag(
        run,
        "reuse the guests (applicationSessionIds) of that earlier run against the same target; default: a "
        "new run id of this run's own, printed and in the report's settings",
    )
    run.add_argument(
        "--shared-throttle",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after a 429/503 every guest waits out the Retry-After (default: on for a target, off for the "
        "embedded simulator, whose throttling is random per request rather than a load signal)",
    )
    run.add_argument(
        "--i-own-this-service",
        action="store_true",
        help=f"allow more than {GUARD_GUESTS} guests against a target that is not on loopback",
    )
    _sharding_flags(load)
    _ray_flags(load)
    sim = load.add_argument_group("embedded simulator")
    sim.add_argument(
        "--faults",
        default="none",
        metavar="PROFILE|FILE",
        help="fault profile: none, flaky, throttled, chaos, or a JSON file (default none)",
    )
    sim.add_argument("--seed", type=int, default=0, help="seed of the simulator's random choices (default 0)")
    out = load.add_argument_group("output")
    out.add_argument(
        "--report", default=DEFAULT_REPORT, metavar="PATH", help="JSON report (default %(default)s)"
    )
    out.add_argument("--html", default=DEFAULT_HTML, metavar="PATH", help="HTML report (default %(default)s)")
    out.add_argument("--no-html", action="store_true", help="do not write the HTML report")
    out.add_argument(
        "--csv",
        metavar="PREFIX",
        help="also write PREFIX_stats.csv (latency per step) and PREFIX_history.csv (per second), "
        "as Locust's --csv",
    )
    out.add_argument(
        "--junit",
        metavar="PATH",
        help="also write JUnit XML: a test case per --fail-if clause and one per failure reason",
    )
    out.add_argument(
        "--fail-if",
        metavar="EXPR",
        help='exit 99 when this holds, e.g. "success_rate<99%% or p95(join)>2s" (a rate is 0..1 or N%%)',
    )
    out.add_argument(
        "--progress", choices=("auto", "bar", "plain", "off"), default="auto", help="progress display"
    )
    out.add_argument(
        "--progress-interval",
        type=positive_float,
        default=None,
        metavar="S",
        help="seconds between progress updates (default 0.25 for the bar, 5 for plain lines)",
    )
    out.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics during the run (0: a free port); with "
        "--workers/--ray, the merged view of every shard (each reports its metrics every second)",
    )
    out.add_argument("--metrics-host", metavar="HOST", help="address of --metrics-port (default 127.0.0.1)")
    out.add_argument("-v", "--verbose", action="store_true", help="log to stderr (secrets redacted)")
    _store_flag(out)
    add_target_arguments(load, display_name=False)
    run_settings(load, RUN_FIELDS)  # also from ANONJOIN_<NAME> or the --config file
    load.set_defaults(run=run_load_command)

    rejoin = subparsers.add_parser(
        "rejoin",
        help="bring a guest back by its guest id, with its stored applicationSessionId",
        description=(
            "Rejoin one guest of the session store (for example after a restart) with the same "
            "applicationSessionId, hold it, then leave. The target comes from the flags, the ANONJOIN_* "
            "environment or --config; the meeting and origin from the store unless given. A guest id is "
            "one guest per run and target: when several runs of the target have it, --run-id says which."
        ),
        epilog=REJOIN_EXAMPLES,
    )
    rejoin.add_argument("--guest", required=True, metavar="ID", help="the guest id (see anonjoin sessions)")
    _run_id_flag(rejoin, "the run the guest belongs to, when several runs have that guest id")
    rejoin.add_argument("--hold", type=non_negative_float, default=0.0, metavar="S", help="stay this long")
    rejoin.add_argument("--json", action="store_true", help="print one JSON object")
    _store_flag(rejoin)
    add_target_arguments(rejoin, display_name=False)
    run_settings(rejoin, ("store", "run_id"))
    rejoin.set_defaults(run=run_rejoin_command)

    sessions = subparsers.add_parser(
        "sessions",
        help="list the session store",
        description=(
            "List the guests the session store holds, oldest first: the run id and target (discover URL "
            "and endpoint id) each belongs to, its guest id, applicationSessionId, meeting, last outcome, "
            "rejoin count and last update. Guests of a store from before run ids are in run (legacy). The "
            "store is --store, else $ANONJOIN_STORE, else ~/.local/state/anonjoin/sessions.db; a missing "
            "file lists nothing and is not created."
        ),
        epilog=SESSIONS_EXAMPLES,
    )
    sessions.add_argument("--json", action="store_true", help="print JSON (one array)")
    sessions.add_argument("--limit", type=positive_int, default=None, metavar="N", help="the newest N only")
    _run_id_flag(sessions, "only the guests of this run")
    _store_flag(sessions)
    sessions.set_defaults(run=run_sessions_command)


# -- shared helpers --------------------------------------------------------------------------------


def _error_line(command: str, text: str) -> None:
    print(f"anonjoin {command}: {' '.join(redact(text).split())}", file=sys.stderr, flush=True)


def _guarded(command: str, body: Callable[[], int]) -> int:
    """Run ``body``; every error is one line on stderr, never a traceback."""
    try:
        return body()
    except ConfigurationError as exc:
        _error_line(command, f"error: {exc}")
        return EXIT_USAGE
    except AnonJoinError as exc:
        _error_line(command, f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _error_line(command, "interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: still one line, with the type
        log.debug("anonjoin.cli.crash", exc_info=True)
        _error_line(command, f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
        return EXIT_FAILED


def _store_text(path: str | None) -> str | None:
    return path or os.environ.get("ANONJOIN_STORE") or None


def store_label(path: str | None) -> str:
    """Where the store is, fit for a report or a message (a Redis URL loses its credentials)."""
    text = _store_text(path)
    if text and text.lower().startswith(("redis://", "rediss://", "unix://")):
        from anonjoin._load.store_redis import safe_store_url

        return safe_store_url(text)
    from anonjoin._load.store import default_store_path

    return text or str(default_store_path())


def open_store(path: str | None, *, create: bool = True) -> SessionStore:
    """The store at ``path`` (default: :func:`default_store_path`): a file, ``:memory:`` or a Redis URL.

    ``create=False``: a missing file reads as an empty store and is not created (``sessions`` and
    ``rejoin`` only read before they write)."""
    from anonjoin._load.store import MemorySessionStore, SqliteSessionStore, default_store_path

    if path == MEMORY_STORE:
        return MemorySessionStore()
    text = _store_text(path)
    if text and text.lower().startswith(("redis://", "rediss://", "unix://")):
        from anonjoin._load.store_redis import RedisSessionStore

        return RedisSessionStore(text)
    file = Path(path).expanduser() if path else default_store_path()
    if not create and not file.exists():
        return MemorySessionStore()
    return SqliteSessionStore(file)


async def open_store_ready(path: str | None, *, create: bool = True) -> SessionStore:
    """:func:`open_store`, and for Redis a first round trip: a server that is down fails here, in one line."""
    store = open_store(path, create=create)
    ping = getattr(store, "ping", None)
    if ping is not None:
        try:
            await ping()
        except BaseException:
            await store.aclose()
            raise
    return store


def lease_for(store: SessionStore) -> float | None:
    """A store others can see (a file, Redis) gets a lease per guest; a memory store needs none."""
    from anonjoin._load.store import DEFAULT_LEASE_S, MemorySessionStore

    return None if isinstance(store, MemorySessionStore) else DEFAULT_LEASE_S


def check_store_path(path: str | None) -> None:
    """A ``--store`` given must be writable now, not at the end of a run: its directory must exist (a typo
    should not create one) and an existing database must accept a write. ``ConfigurationError`` (exit 2)."""
    if path is None or path == MEMORY_STORE or "://" in path:
        return  # the default store's directory is made on first use; a URL names another kind of store
    file = Path(path).expanduser()
    if not file.parent.is_dir():
        raise ConfigurationError(
            f"--store {path}: the directory {file.parent} does not exist (create it first)"
        )
    if file.is_dir():
        raise ConfigurationError(f"--store {path}: is a directory, not a database file")
    if not file.exists():
        if not os.access(file.parent, os.W_OK):
            raise ConfigurationError(f"--store {path}: cannot create a file in {file.parent} (read-only)")
        return
    try:
        db = sqlite3.connect(file, timeout=1.0, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or directory
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ConfigurationError(f"--store {path}: cannot write to it: {exc}") from None


def is_loopback_url(url: str | None) -> bool:
    """Whether ``url``'s host is loopback: ``localhost`` or a loopback IP literal (names are not resolved)."""
    if not url:
        return False
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _judge_hosts(guests: int, urls: Iterable[str | None]) -> None:
    """Refuse (ConfigurationError) when one of ``urls`` is not on loopback: the guard of ``anonjoin load``."""
    for url in urls:
        if url is not None and not is_loopback_url(url):
            raise ConfigurationError(
                f"refusing to send {guests} guests to {redact_url(url)}, which is not on loopback: "
                f"more than {GUARD_GUESTS} guests need --i-own-this-service"
            )


@dataclass
class _Target:
    settings: TargetSettings
    label: str
    embedded: bool
    snapshot: Callable[[], Awaitable[dict[str, Any]]] | None = None
    """The embedded simulator's admin state (for the service check), or None for a target."""


EMBEDDED_ENV = "ANONJOIN_EMBEDDED_SIMULATOR"
"""Where the embedded simulator runs: ``auto`` (its own processes when this process may use more than one
core, else the client's loop), ``in-process`` or ``processes``."""


def _embedded_pools() -> int:
    """The embedded simulator's pool processes; 0: in the client's own loop (one core, or asked to)."""
    mode = os.environ.get(EMBEDDED_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "in-process", "processes"):
        raise ConfigurationError(f"{EMBEDDED_ENV}: expected auto, in-process or processes, got {mode!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if mode == "in-process" or (mode == "auto" and cores < 2):
        return 0
    return 1 if cores < 4 else min(cores // 2, 8)  # the client keeps about half the cores


@contextlib.asynccontextmanager
async def _target(ns: argparse.Namespace, settings: TargetSettings) -> AsyncIterator[_Target]:
    if is_target(settings):
        if ns.faults != "none":
            raise ConfigurationError("--faults applies to the embedded simulator only (no target given)")
        settings.require(*REQUIRED_FOR_TARGET, "meeting_url", "origin")
        yield _Target(settings, redact_url(settings.discover_url), embedded=False)
        return
    from anonjoin.simulator import FaultProfile, Simulator, SimulatorConfig, SimulatorProcess

    profile = FaultProfile.load(ns.faults)  # ConfigurationError for an unknown name or a bad file
    label = f"embedded simulator (faults {profile.name}, seed {ns.seed})"
    pools = _embedded_pools()
    if pools:  # its own process(es), stopped by PID at the end; they die with this process in any case
        async with SimulatorProcess(pools=pools, seed=ns.seed, faults=ns.faults) as process:
            log.debug("anonjoin.cli.simulator: processes %s", " ".join(str(pid) for pid in process.pids))
            simulated = simulator_settings(process.info, display_name=settings.display_name)
            yield _Target(simulated, label, embedded=True, snapshot=process.snapshot)
        return
    async with Simulator(SimulatorConfig(seed=ns.seed, faults=profile)) as sim:

        async def snapshot() -> dict[str, Any]:
            return sim.snapshot()

        simulated = simulator_settings(sim.info, display_name=settings.display_name)
        yield _Target(simulated, label, embedded=True, snapshot=snapshot)


# -- anonjoin load ---------------------------------------------------------------------------------


def run_load_command(ns: argparse.Namespace) -> int:
    with cli_logging(bool(ns.verbose), ns.log_format):
        return _guarded("load", lambda: _load_sync(resolve_run_settings(ns)))


def _load_sync(ns: argparse.Namespace) -> int:
    from anonjoin._load.report_formats import csv_paths, write_files

    condition, schedule = _plan_inputs(ns)
    workers = _check_sharding(ns, condition)
    _check_ray_flags(ns, workers)
    check_store_path(ns.store)
    html = None if ns.no_html else ns.html
    csv_files = csv_paths(ns.csv) if ns.csv else ()
    # Check the report paths first: a typo should not cost a whole run.
    for path in (ns.report, html, *csv_files, ns.junit):
        if path:
            parent = Path(path).expanduser().absolute().parent
            while not parent.exists() and parent != parent.parent:
                parent = parent.parent  # missing directories are made when the report is written
            if not parent.is_dir():
                raise ConfigurationError(f"cannot write the report {path}: {parent} is not a directory")
    signals: list[str] = []
    with stop_signals_deferred("load", signals) as reinstall:
        if ns.shard is not None:  # one shard of a run: its shard result, merged later by anonjoin merge
            return _load_one_shard(ns, schedule, signals, reinstall)
        if workers > 1 or ns.ray is not None:
            report = asyncio.run(_load_workers(ns, workers, condition, schedule, signals, reinstall))
        else:
            report = asyncio.run(_load(ns, condition, schedule, signals, reinstall))
        files = write_files(report, json=ns.report, html=html, csv=ns.csv, junit=ns.junit)
        _print_summary(report, [str(f) for f in files])
    if report["interrupted"] or signals:
        return exit_code_for_signal(signals[0]) if signals else EXIT_INTERRUPTED
    if report["fail_if"] and report["fail_if"]["breached"]:
        _error_line("load", f"--fail-if breached: {report['fail_if']['detail']}")
        return EXIT_THRESHOLDS
    if report["guests"] and not report["joined"]:
        _error_line("load", "no guest joined")
        return EXIT_FAILED
    if report.get("shards", {}).get("missing"):
        lost = ", ".join(f"{k}/{report['shards']['count']}" for k in report["shards"]["missing"])
        _error_line(
            "load", f"shard {lost} lost ({report['shards']['reason']}): its guests are counted cancelled"
        )
        return EXIT_FAILED
    return EXIT_OK


def _plan_inputs(ns: argparse.Namespace) -> tuple[Any, Any]:
    from anonjoin._load.report import parse_fail_if
    from anonjoin._load.runner import ConstantRate, parse_ramp

    condition = parse_fail_if(ns.fail_if) if ns.fail_if is not None else None
    schedule = ConstantRate(ns.rate) if ns.rate else parse_ramp(ns.ramp) if ns.ramp else None
    return condition, schedule


async def _load(
    ns: argparse.Namespace, condition: Any, schedule: Any, signals: list[str], reinstall: Callable[[], None]
) -> dict[str, Any]:
    """``signals`` receives the names of the signals that stopped the run, first one first; ``reinstall``
    puts back the handlers of :func:`stop_signals_deferred` once the loop's own are removed."""
    from anonjoin._load.metrics import Metrics
    from anonjoin._load.report import build_report, plural
    from anonjoin._load.runner import LoadRunner, check_against_service

    display = ns.display_name or "anonjoin guest {n}"
    settings = settings_from_args(ns, display_name=display.replace("{n}", "1"))
    guarded = is_target(settings) and ns.guests > GUARD_GUESTS and not ns.i_own_this_service
    if guarded:  # the hosts requests go to, not the meeting URL's (no request goes there)
        _judge_hosts(ns.guests, (settings.discover_url, settings.authority))
    store = await open_store_ready(ns.store)
    runners: list[LoadRunner] = []

    def stop() -> None:
        for runner in runners:
            runner.cancel()

    def on_runner(runner: LoadRunner) -> None:
        runners.append(runner)
        if signals:
            runner.cancel()

    try:
        with _stops_on_signals(signals, stop):
            async with _target(ns, settings) as target:
                t = target.settings
                assert t.discover_url and t.endpoint_id and t.meeting_url and t.origin
                store, run_id = _scoped(store, t, ns.run_id)
                plan, meetings, shared_throttle, run_settings = _run_inputs(
                    ns, target, schedule, display, run_id
                )
                print(
                    f"anonjoin load: {plural(ns.guests, 'guest')}, {ns.concurrency} in flight at most, "
                    f"over {meetings} meeting(s) of {target.label}; run id {run_id} (--run-id to resume it)",
                    file=sys.stderr,
                    flush=True,
                )
                metrics = Metrics(guests=ns.guests, seed=ns.seed)
                result = await _run_plan(
                    ns, t, plan, store, metrics, shared_throttle, guarded, on_runner, meetings=meetings
                )
                service_check = (
                    check_against_service(result.guests, await target.snapshot())
                    if target.snapshot is not None
                    else None
                )
    finally:
        reinstall()
        await store.aclose()

    return build_report(
        result.metrics,
        result.guests,
        run_settings,
        started_at=result.started_at,
        interrupted=result.interrupted or bool(signals),
        fail_if=condition,
        warnings=result.warnings,
        service_check=service_check,
    )


async def _run_plan(
    ns: argparse.Namespace,
    t: TargetSettings,
    plan: LoadPlan,
    store: SessionStore,
    metrics: Any,
    shared_throttle: bool,
    guarded: bool,
    on_runner: Callable[[Any], None],
    *,
    meetings: int = 0,
    start_at: float | None = None,
) -> Any:
    """One process's run of ``plan`` (the whole plan, or one shard of it) against ``t``: the live display
    and ``--metrics-port`` around :func:`~anonjoin._load.runner.run_load`; the credential closed after."""
    from anonjoin._async.retry import RetryPolicy
    from anonjoin._load.progress import ProgressDisplay
    from anonjoin._load.runner import run_load

    assert t.discover_url and t.endpoint_id
    credential = t.credential()
    try:
        async with (
            _metrics_endpoint(ns, metrics),
            ProgressDisplay(metrics, mode=ns.progress, interval_s=ns.progress_interval),
        ):
            return await run_load(
                plan,
                discover_url=t.discover_url,
                endpoint_id=t.endpoint_id,
                credential=credential,
                ca_file=t.ca_file,
                verify_tls=t.verify_tls(),
                store=store,
                lease_s=lease_for(store),
                metrics=metrics,
                meetings=meetings,
                retry=RetryPolicy(shared_throttle=shared_throttle),
                on_runner=on_runner,
                check_links=partial(_judge_hosts, ns.guests) if guarded else None,
                start_at=start_at,
            )
    finally:
        await credential.aclose()


def _port(text: str) -> int:
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0..65535: {text!r}")
    return value


@contextlib.asynccontextmanager
async def _metrics_endpoint(ns: argparse.Namespace, metrics: Any) -> AsyncIterator[None]:
    """--metrics-port: Prometheus metrics while the run lasts (a port in use: ConfigurationError, exit 2)."""
    if ns.metrics_port is None:
        if ns.metrics_host is not None:
            raise ConfigurationError("--metrics-host needs --metrics-port")
        yield
        return
    from anonjoin._load.prometheus import serve_metrics

    async with serve_metrics(metrics, host=ns.metrics_host or "127.0.0.1", port=ns.metrics_port) as server:
        print(f"anonjoin load: Prometheus metrics at {server.url}", file=sys.stderr, flush=True)
        yield


def _scoped(store: SessionStore, t: TargetSettings, run_id: str | None) -> tuple[SessionStore, str]:
    """``store`` seen through this run's scope (the target and the run id; a fresh run id if none)."""
    from anonjoin._load.store import SessionScope, in_scope, new_run_id

    assert t.discover_url and t.endpoint_id and t.meeting_url
    run_id = run_id or new_run_id()
    scope = SessionScope.for_target(
        discover_url=t.discover_url, endpoint_id=t.endpoint_id, meeting_url=t.meeting_url, run_id=run_id
    )
    return in_scope(store, scope), run_id  # a view: closing it closes the store


def _run_inputs(
    ns: argparse.Namespace, target: _Target, schedule: Any, display: str, run_id: str
) -> tuple[LoadPlan, int, bool, dict[str, Any]]:
    """The plan of ``anonjoin load``, its meeting count, the shared throttle and the report's settings."""
    from anonjoin._load.runner import LoadPlan, pool_size

    t = target.settings
    assert t.meeting_url and t.origin
    meetings = ns.meetings or (DEFAULT_SIM_MEETINGS if target.embedded else 1)
    shared_throttle = (not target.embedded) if ns.shared_throttle is None else ns.shared_throttle
    plan = LoadPlan(
        guests=ns.guests,
        meeting_urls=(t.meeting_url,),
        origin=t.origin,
        concurrency=ns.concurrency,
        schedule=schedule,
        hold_s=ns.hold,
        display_name=display,
        guest_prefix=ns.guest_prefix,
        lobby_timeout_s=ns.lobby_timeout,
    )
    run_settings: dict[str, Any] = {
        "target": target.label,
        "guests": ns.guests,
        "concurrency": ns.concurrency,
        "connection_pool": pool_size(ns.concurrency),
        "schedule": _describe_schedule(ns),
        "hold_s": ns.hold,
        "meetings": meetings,
        "shared_throttle": shared_throttle,
        "faults": ns.faults if target.embedded else None,
        "seed": ns.seed if target.embedded else None,
        "origin": t.origin,
        "display_name": display,
        "guest_prefix": ns.guest_prefix,
        "lobby_timeout_s": ns.lobby_timeout,
        "store": store_label(ns.store),
        "run_id": run_id,
        "fail_if": ns.fail_if,
        "endpoint_id": t.endpoint_id,
    }
    return plan, meetings, shared_throttle, run_settings


def _describe_schedule(ns: argparse.Namespace) -> str:
    if ns.rate:
        return f"constant {ns.rate:g} guests/s"
    if ns.ramp:
        return f"ramp {ns.ramp}"
    return "as fast as the concurrency allows"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _print_summary(report: dict[str, Any], written: Sequence[str]) -> None:
    from anonjoin._load.report import joins_per_s_text, plural

    j = report["latency"]["join"]
    lines = [
        f"anonjoin load: {plural(report['guests'], 'guest')}: {report['joined']} joined, "
        f"{report['failed']} failed, {report['ended']} ended, {report['cancelled']} cancelled "
        f"(success {100 * report['success_rate']:.2f}%) in {report['duration_s']:.1f} s",
        f"  {joins_per_s_text(report)} joins/s   join latency p50 {_ms(j['p50_ms'])}  "
        f"p90 {_ms(j['p90_ms'])}  p95 {_ms(j['p95_ms'])}  p99 {_ms(j['p99_ms'])}  max {_ms(j['max_ms'])}",
        f"  rejoins {report['rejoins']}   drops {report['drops']}   "
        f"retries {sum(report['retries_by_reason'].values())}",
    ]
    for key, label in (("failures_by_reason", "failed"), ("ended_by_reason", "ended")):
        if report[key]:
            lines.append(f"  {label}: " + ", ".join(f"{k} x{v}" for k, v in list(report[key].items())[:8]))
    check = report.get("service_check")
    if check is not None:
        lines.append(
            f"  simulator's record: {'ok' if check['ok'] else 'NOT OK'}: "
            f"{check['application_session_ids_seen']} applicationSessionIds, "
            f"{check['unknown_application_session_ids']} unknown, "
            f"{check['rejoined_guests_with_the_same_id']}/{check['rejoined_guests']} rejoined guests "
            "kept their id, "
            f"{check['duplicate_roster_entries']} duplicate roster entries, "
            f"{check['live_applications_at_end']} live applications left"
        )
    lines.extend(f"  warning: {w}" for w in report.get("warnings", ()))
    lines.append("  report: " + ", ".join(written))
    print("\n".join(lines), flush=True)


# -- anonjoin load --workers N and --shard K/S: sharded runs ---------------------------------------

START_AT_TOLERANCE_S = 2.0
"""How far in the past ``--start-at`` may be (a shard that starts later would burst its late arrivals)."""


def _workers_count(text: str) -> int:
    """``--workers``: a count, or ``auto`` (the cores this process may use)."""
    if text.strip().lower() == "auto":
        from anonjoin._load.workers import usable_cores

        return usable_cores()
    return positive_int(text)


def _sharding_flags(load: argparse.ArgumentParser) -> None:
    group = load.add_argument_group("sharded runs")
    group.add_argument(
        "--workers",
        type=_workers_count,
        default=1,
        metavar="N|auto",
        help="run the plan in N worker processes of this machine, one shard each (auto: the usable cores; "
        "default 1: one process)",
    )
    group.add_argument(
        "--shard",
        metavar="K/S",
        help="run only shard K (from 0) of S of the plan and write its shard result to --report, for "
        "anonjoin merge (needs a target and --start-at)",
    )
    group.add_argument(
        "--start-at",
        metavar="T",
        help="the common start of every shard: Unix seconds or an ISO-8601 time (UTC unless it says)",
    )


def parse_start_at(text: str, *, now: float | None = None) -> float:
    """``--start-at``: Unix seconds or ISO-8601; refused (``ConfigurationError``) when already past."""
    import datetime as dt
    import math

    try:
        value = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.strip())
        except ValueError:
            raise ConfigurationError(
                f"--start-at {text!r}: give Unix seconds (1767225600) or an ISO-8601 time "
                "(2026-01-01T00:00:00Z)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        value = when.timestamp()
    if not math.isfinite(value):
        raise ConfigurationError(f"--start-at {text!r}: not a time")
    now = time.time() if now is None else now
    if value < now - START_AT_TOLERANCE_S:
        raise ConfigurationError(
            f"--start-at {text!r} is {now - value:.1f} s in the past: every shard must start before it "
            "(give a time a little ahead, e.g. $(( $(date +%s) + 30 )))"
        )
    return value


def _check_sharding(ns: argparse.Namespace, condition: Any) -> int:
    """The sharding flags' rules (``ConfigurationError``: exit 2); the worker count to run with."""
    from anonjoin._load.runner import Shard

    if ns.shard is None:
        if ns.start_at is not None:
            raise ConfigurationError("--start-at applies to --shard K/S only")
        if ns.workers > 1 and ns.concurrency < ns.workers:
            raise ConfigurationError(
                f"--workers {ns.workers} needs --concurrency of at least {ns.workers} (one join slot each)"
            )
        return int(ns.workers)
    ns.shard_of = Shard.parse(ns.shard)
    if ns.workers > 1:
        raise ConfigurationError("--shard runs one shard in this process: it takes no --workers")
    if ns.start_at is None:
        raise ConfigurationError(
            "--shard needs --start-at T, the same for every shard (their arrivals follow one schedule)"
        )
    if ns.meetings is not None and ns.meetings > 1:
        raise ConfigurationError(
            "a shard does not create meetings (every shard must join the same ones): give the meeting with "
            "--meeting-url, or run without --shard"
        )
    if condition is not None:
        raise ConfigurationError("--fail-if applies to the merged result: give it to anonjoin merge")
    if ns.concurrency < ns.shard_of.count:
        raise ConfigurationError(
            f"{ns.shard_of.count} shards need --concurrency of at least {ns.shard_of.count} "
            "(the whole run's; each shard takes its part)"
        )
    ns.start_at_s = parse_start_at(ns.start_at)
    return 1


@contextlib.contextmanager
def _stops_on_signals(signals: list[str], stop: Callable[[], None]) -> Iterator[None]:
    """While the run's loop runs: a stop signal is recorded in ``signals``, announced, and calls ``stop``."""
    loop = asyncio.get_running_loop()
    seen = len(signals)

    def on_signal(signame: str) -> None:
        nonlocal seen
        seen += 1
        signals.append(signame)
        if seen == 1:
            print(
                f"\nanonjoin load: {signame}: stopping: no more arrivals, joined guests are leaving; "
                "the report will be written",
                file=sys.stderr,
                flush=True,
            )
        else:
            print("anonjoin load: still stopping (leaving is bounded)", file=sys.stderr, flush=True)
        stop()

    installed: list[signal.Signals] = []
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
    if signals:  # a signal came before the loop's handlers: stop at once
        stop()
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _load_workers(
    ns: argparse.Namespace,
    workers: int,
    condition: Any,
    schedule: Any,
    signals: list[str],
    reinstall: Callable[[], None],
) -> dict[str, Any]:
    """``anonjoin load --workers N``: the plan in N shards, one worker process each
    (:mod:`anonjoin._load.workers`), prepared, stored and merged here; the embedded simulator, if any, runs
    here and serves them all."""
    from anonjoin._async.retry import RetryPolicy
    from anonjoin._load.progress import ProgressDisplay
    from anonjoin._load.report import build_report, plural
    from anonjoin._load.runner import check_against_service
    from anonjoin._load.sharded import ShardProgress, ShardStates, run_sharded

    display = ns.display_name or "anonjoin guest {n}"
    settings = settings_from_args(ns, display_name=display.replace("{n}", "1"))
    guarded = is_target(settings) and ns.guests > GUARD_GUESTS and not ns.i_own_this_service
    if guarded:
        _judge_hosts(ns.guests, (settings.discover_url, settings.authority))
    store = await open_store_ready(ns.store)
    try:
        engine, shards, where, engine_settings = _engine_for(ns, workers, embedded=not is_target(settings))
    except BaseException:
        await store.aclose()
        raise
    try:
        with _stops_on_signals(signals, engine.cancel):
            async with _target(ns, settings) as target:
                store, run_id = _scoped(store, target.settings, ns.run_id)
                plan, meetings, shared_throttle, run_settings = _run_inputs(
                    ns, target, schedule, display, run_id
                )
                run_settings.update(engine_settings)
                print(
                    f"anonjoin load: {plural(ns.guests, 'guest')}, {ns.concurrency} in flight at most, "
                    f"over {meetings} meeting(s) of {target.label}, {where}; "
                    f"run id {run_id} (--run-id to resume it)",
                    file=sys.stderr,
                    flush=True,
                )
                live = ShardProgress(ns.guests, shards)
                states = ShardStates(shards)  # --metrics-port: the merged view of the shards' metrics
                async with (
                    _metrics_endpoint(ns, states.metrics),
                    ProgressDisplay(live, mode=ns.progress, interval_s=ns.progress_interval),
                ):
                    merged = await run_sharded(
                        plan,
                        engine,
                        target=target.settings,
                        store=store,
                        shards=shards,
                        retry=RetryPolicy(shared_throttle=shared_throttle),
                        meetings=meetings,
                        check_links=partial(_judge_hosts, ns.guests) if guarded else None,
                        settings=run_settings,
                        on_progress=live.update,
                        on_state=states.update if ns.metrics_port is not None else None,
                        lease_s=lease_for(store),
                    )
                service_check = (
                    check_against_service(merged.guests, await target.snapshot())
                    if target.snapshot is not None
                    else None
                )
    finally:
        reinstall()
        with contextlib.suppress(Exception):
            getattr(engine, "disconnect", lambda: None)()  # a Ray connection made for the shard count
        await store.aclose()
    report = build_report(
        merged.metrics,
        merged.guests,
        merged.settings,
        started_at=merged.started_at,
        interrupted=merged.interrupted or bool(signals),
        fail_if=condition,
        warnings=merged.warnings,
        service_check=service_check,
    )
    report["shards"] = _shards_section(merged, engine.lost_reason)
    return report


def _ray_flags(load: argparse.ArgumentParser) -> None:
    group = load.add_argument_group("many machines: Ray (pip install 'anonjoin[ray]')")
    group.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the shards as actors of an existing Ray cluster (ray start --head ...): auto, HOST:PORT or "
        "ray://HOST:PORT; every node needs this anonjoin",
    )
    group.add_argument(
        "--shards",
        type=positive_int,
        metavar="S",
        help="with --ray: S shards, one actor (one CPU) each (default: the cluster's CPUs, at most the "
        "guests and the concurrency)",
    )


def _check_ray_flags(ns: argparse.Namespace, workers: int) -> None:
    """``--ray``/``--shards`` against the other ways to shard (``ConfigurationError``: exit 2)."""
    if ns.ray is None:
        if ns.shards is not None:
            raise ConfigurationError("--shards applies to --ray (for processes of this machine: --workers N)")
        return
    if workers > 1:
        raise ConfigurationError("--ray and --workers are two ways to run the shards: give one")
    if ns.shard is not None:
        raise ConfigurationError("--shard runs one shard in this process: it takes no --ray")


def _engine_for(
    ns: argparse.Namespace, workers: int, *, embedded: bool
) -> tuple[ShardEngine, int, str, dict[str, Any]]:
    """The engine of a sharded run: worker processes (``--workers N``) or Ray actors (``--ray``).

    Returns the engine, its shard count, a few words for the start line, and what the report's settings
    say about it. With ``--ray`` this attaches to the cluster (for its CPU count): ``ConfigurationError``
    for bad flags or a cluster that cannot take the run, before any request to the target.
    """
    if ns.ray is None:
        from anonjoin._load.workers import ProcessEngine

        return ProcessEngine(workers), workers, f"in {workers} worker processes", {"workers": workers}
    from anonjoin._load.ray import RayEngine

    engine = RayEngine(ns.ray, shards=ns.shards, verbose=bool(ns.verbose))
    try:
        engine.connect()
        cpus = engine.cluster_cpus
        if cpus < 1:
            raise ConfigurationError(f"the Ray cluster at {redact(ns.ray)} has no CPU for an actor")
        shards = ns.shards if ns.shards is not None else min(cpus, ns.guests, ns.concurrency)
        if shards > cpus:
            raise ConfigurationError(
                f"--shards {shards} needs {shards} CPUs of the Ray cluster (one actor each); it has {cpus}"
            )
        if ns.concurrency < shards:
            raise ConfigurationError(
                f"--shards {shards} needs --concurrency of at least {shards} (one join slot each)"
            )
        elsewhere = engine.nodes_elsewhere() if embedded else []
        if elsewhere:
            raise ConfigurationError(
                f"the embedded simulator listens on this machine's loopback, which the Ray node "
                f"{elsewhere[0].address} cannot reach: give a target (--discover-url ...)"
            )
    except BaseException:
        engine.disconnect()
        raise
    engine.shards = shards
    nodes = len(engine.nodes)
    where = f"in {shards} Ray actors over {nodes} node(s) of {redact(ns.ray)}"
    return engine, shards, where, {"ray": redact(ns.ray), "ray_nodes": nodes}


def _shards_section(merged: Any, reason: str) -> dict[str, Any]:
    """The report's ``shards``: how many the run had and which gave no result (their guests: cancelled)."""
    return {
        "count": merged.shards,
        "missing": list(merged.missing),
        "reason": reason if merged.missing else None,
    }


def _load_one_shard(
    ns: argparse.Namespace, schedule: Any, signals: list[str], reinstall: Callable[[], None]
) -> int:
    """``anonjoin load --shard K/S --start-at T``: this shard's result (JSON) to ``--report``; no HTML."""
    from anonjoin._load.report import plural, write_json

    result = asyncio.run(_run_one_shard(ns, schedule, signals, reinstall))
    path = write_json(Path(ns.report).expanduser(), result.to_json())
    counts = {"joined": 0, "failed": 0, "ended": 0, "cancelled": 0}
    for g in result.guests:
        counts[g.outcome] = counts.get(g.outcome, 0) + 1
    print(
        f"anonjoin load: shard {result.shard}: {plural(len(result.guests), 'guest')}: "
        + ", ".join(f"{v} {k}" for k, v in counts.items())
        + f"\n  shard result: {path} (merge the shards with anonjoin merge)",
        flush=True,
    )
    if result.interrupted or signals:
        return exit_code_for_signal(signals[0]) if signals else EXIT_INTERRUPTED
    if result.guests and not counts["joined"]:
        _error_line("load", "no guest of this shard joined")
        return EXIT_FAILED
    return EXIT_OK


async def _run_one_shard(
    ns: argparse.Namespace, schedule: Any, signals: list[str], reinstall: Callable[[], None]
) -> Any:
    import dataclasses

    from anonjoin._load.metrics import Metrics
    from anonjoin._load.runner import LoadRunner
    from anonjoin._load.shards import ShardResult

    display = ns.display_name or "anonjoin guest {n}"
    settings = settings_from_args(ns, display_name=display.replace("{n}", "1"))
    if not is_target(settings):
        raise ConfigurationError(
            "--shard needs a target (the shards of a run share one service, so no embedded simulator): "
            "give --discover-url and the other target flags, the ANONJOIN_* environment or --config "
            "(anonjoin simulate runs a simulator they can share)"
        )
    guarded = ns.guests > GUARD_GUESTS and not ns.i_own_this_service
    if guarded:
        _judge_hosts(ns.guests, (settings.discover_url, settings.authority))
    store = await open_store_ready(ns.store)
    runners: list[LoadRunner] = []

    def stop() -> None:
        for runner in runners:
            runner.cancel()

    def on_runner(runner: LoadRunner) -> None:
        runners.append(runner)
        if signals:
            runner.cancel()

    try:
        with _stops_on_signals(signals, stop):
            async with _target(ns, settings) as target:
                t = target.settings
                assert t.discover_url and t.endpoint_id
                # The shards of one run share a run id: the one given, else one named by their common start.
                run_id = ns.run_id or f"shards-{int(ns.start_at_s)}"
                store, run_id = _scoped(store, t, run_id)
                plan, _meetings, shared_throttle, run_settings = _run_inputs(
                    ns, target, schedule, display, run_id
                )
                plan = dataclasses.replace(plan, shard=ns.shard_of)
                print(
                    f"anonjoin load: shard {plan.shard} ({plural_guests(plan.shard_guests)} of {ns.guests}), "
                    f"{plan.shard_concurrency} in flight at most, of {target.label}, starting at "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(ns.start_at_s))}",
                    file=sys.stderr,
                    flush=True,
                )
                metrics = Metrics(guests=plan.shard_guests, seed=ns.seed)
                result = await _run_plan(
                    ns, t, plan, store, metrics, shared_throttle, guarded, on_runner, start_at=ns.start_at_s
                )
    finally:
        reinstall()
        await store.aclose()
    run_settings["shard"] = str(plan.shard)
    return ShardResult.of(result, plan, start_at=ns.start_at_s, settings=run_settings)


def plural_guests(n: int) -> str:
    from anonjoin._load.report import plural

    return plural(n, "guest")


# -- anonjoin rejoin -------------------------------------------------------------------------------


def run_rejoin_command(ns: argparse.Namespace) -> int:
    return _guarded("rejoin", lambda: asyncio.run(_rejoin(resolve_run_settings(ns))))


def _describe_target(target: str) -> str:
    """A scope's target fit to print: the discover URL (redacted) and the endpoint id; ``-`` for none."""
    parts = target.split(" ")
    if len(parts) < 2:
        return "-"
    return f"{redact_url(parts[0])} {parts[1]}"


def _describe_run(run_id: str) -> str:
    return run_id or "(legacy)"


def _no_session(guest: str, run_id: str | None) -> ConfigurationError:
    where = f" of run {run_id}" if run_id else ""
    return ConfigurationError(
        f"no session for guest {guest!r}{where} in the store (anonjoin sessions lists the guests)"
    )


def _pick_session(guest: str, found: Sequence[Any], settings: TargetSettings) -> Any:
    """The one record ``rejoin --guest`` means among ``found`` (of ``--run-id`` if given): the one of the
    target given (a legacy record, made before runs had ids, fits any). Several: a one-line error."""
    if len(found) == 1:
        return found[0]
    prefix = f"{settings.discover_url} {settings.endpoint_id} "

    def fits(r: Any) -> bool:
        if not r.target:
            return True
        if not r.target.startswith(prefix):
            return False
        return settings.meeting_url is None or r.target[len(prefix) :] == settings.meeting_url

    fitting = [r for r in found if fits(r)]
    if len(fitting) == 1:
        return fitting[0]
    listed = "; ".join(f"{_describe_run(r.run_id)} ({_describe_target(r.target)})" for r in fitting or found)
    raise ConfigurationError(
        f"guest {guest!r} is in {len(fitting or found)} runs: {listed}; give --run-id to say which"
    )


async def _rejoin(ns: argparse.Namespace) -> int:
    from anonjoin._async.client import Client
    from anonjoin._load.store import DEFAULT_LEASE_S, find_sessions, in_scope

    base = await open_store_ready(ns.store, create=False)
    try:
        found = await find_sessions(base, ns.guest, ns.run_id)
        if not found:
            raise _no_session(ns.guest, ns.run_id)
        settings = settings_from_args(ns, display_name=found[0].display_name)
        if not is_target(settings):
            raise ConfigurationError(
                "rejoin needs the target the guest joined: give --discover-url and the other target flags, "
                "the ANONJOIN_* environment or --config"
            )
        settings.require(*REQUIRED_FOR_TARGET)
        assert settings.discover_url and settings.endpoint_id
        record = _pick_session(ns.guest, found, settings)
        store = in_scope(base, record.scope)  # the guest's run and target: its lease, its record
        meeting_url = settings.meeting_url or record.meeting_url
        origin = settings.origin or record.origin
        out: dict[str, Any] = {
            "guest_id": record.guest_id,
            "run_id": record.run_id or None,
            "application_session_id": record.application_session_id,
            "meeting": redact_url(meeting_url),
            "outcome": "failed",
            "reason": None,
        }
        async with store.claim(record.guest_id, DEFAULT_LEASE_S) as lease:
            credential = settings.credential()
            try:
                async with Client(
                    discover_url=settings.discover_url,
                    endpoint_id=settings.endpoint_id,
                    credential=credential,
                    ca_file=settings.ca_file,
                    verify_tls=settings.verify_tls(),
                ) as client:
                    guest = client.guest(
                        meeting_url=meeting_url,
                        origin=origin,
                        display_name=record.display_name,
                        guest_id=record.guest_id,
                        application_session_id=record.application_session_id,
                    )
                    started = time.monotonic()
                    try:
                        result = await guest.join()
                    except AnonJoinError as exc:
                        from anonjoin._load.runner import failure_reason

                        out["reason"] = failure_reason(exc, guest.outcome.reason if guest.outcome else None)
                        await store.get_or_create(
                            record.guest_id,
                            meeting_url=meeting_url,
                            origin=origin,
                            display_name=record.display_name,
                        )
                        await lease.record_outcome(f"failed: {out['reason']}")
                        _emit_rejoin(ns, out, time.monotonic() - started)
                        return EXIT_FAILED
                    out["outcome"] = "joined"
                    out["join_ms"] = round(result.duration_s * 1000, 1)
                    code = EXIT_OK
                    if ns.hold > 0:
                        closing = asyncio.ensure_future(guest.wait_closed())
                        losing = asyncio.ensure_future(lease.lost.wait())
                        await asyncio.wait(
                            {closing, losing}, timeout=ns.hold, return_when=asyncio.FIRST_COMPLETED
                        )
                        for fut in (closing, losing):
                            fut.cancel()
                        await asyncio.gather(closing, losing, return_exceptions=True)
                        if closing.done() and not closing.cancelled():
                            closed = closing.result()
                            out["outcome"] = closed.kind
                            out["reason"] = closed.reason
                            code = EXIT_FAILED
                        elif lease.lost.is_set():  # another instance took the guest: leave at once
                            out["outcome"] = "failed"
                            out["reason"] = "LeaseLost: another instance took the guest"
                            code = EXIT_FAILED
                    await guest.leave()
                    out["rejoins_during_hold"] = guest.rejoins
            finally:
                await credential.aclose()
            if not lease.lost.is_set():  # else the guest is the new holder's to record
                await store.get_or_create(
                    record.guest_id, meeting_url=meeting_url, origin=origin, display_name=record.display_name
                )
                await lease.record_outcome(
                    "joined" if out["outcome"] == "joined" else f"{out['outcome']}: {out['reason']}",
                    rejoins=1,
                )
            _emit_rejoin(ns, out, None)
        return code
    finally:
        await base.aclose()


def _emit_rejoin(ns: argparse.Namespace, out: dict[str, Any], took: float | None) -> None:
    if ns.json:
        print(json.dumps(out, sort_keys=True), flush=True)
        return
    if out["outcome"] == "joined":
        print(
            f"rejoined guest {out['guest_id']} (applicationSessionId {out['application_session_id']}) "
            f"in {out.get('join_ms', 0):.0f} ms, then left",
            flush=True,
        )
    else:
        _error_line("rejoin", f"guest {out['guest_id']} not rejoined: {out['reason']}")


# -- anonjoin sessions -----------------------------------------------------------------------------


def run_sessions_command(ns: argparse.Namespace) -> int:
    return _guarded("sessions", lambda: asyncio.run(_sessions(ns)))


async def _sessions(ns: argparse.Namespace) -> int:
    from anonjoin._load.store import list_sessions

    store = await open_store_ready(ns.store, create=False)
    try:
        records = await list_sessions(store, ns.run_id)
    finally:
        await store.aclose()
    if ns.limit is not None:
        records = sorted(records, key=lambda r: r.updated_at)[-ns.limit :]
    if ns.json:
        print(json.dumps([r.to_json() for r in records], indent=2), flush=True)
        return EXIT_OK
    from rich.console import Console
    from rich.table import Table

    columns = (
        "run",
        "target",
        "guest",
        "applicationSessionId",
        "meeting",
        "last outcome",
        "rejoins",
        "updated (UTC)",
    )
    rows = [
        (
            _describe_run(r.run_id),
            _describe_target(r.target),
            r.guest_id,
            r.application_session_id,
            redact_url(r.meeting_url),
            r.last_outcome or "-",
            str(r.rejoins),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.updated_at)),
        )
        for r in records
    ]
    table = Table(title=f"{len(records)} session(s)", title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if column == "rejoins" else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(soft_wrap=False)
    if not console.is_terminal:
        # A pipe or a file: as wide as the rows need, never wrapped or cut.
        widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]
        console = Console(soft_wrap=False, width=sum(widths) + 3 * len(widths) + 1)
    console.print(table)
    return EXIT_OK
