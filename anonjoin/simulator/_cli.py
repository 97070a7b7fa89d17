"""``anonjoin simulate``: run the simulator until SIGINT/SIGTERM.

When both listeners are up it prints ONE JSON line on stdout (``SimulatorInfo``) and flushes; it then
serves until a signal and exits 0. ``--pools N`` (N > 1) makes it the front door of N pool processes
(``_pools``; each started as ``anonjoin simulate --role pool``, the hidden flags); ``--pin CPU,...`` runs
the front door on the first CPU and each pool on the next ones (round robin); ``--exit-with-stdin`` stops it
when its stdin (a pipe from the process that started it) reaches EOF, or when that process dies. A bad
flag value or an unreadable fault file is one line on stderr and exit 2 (``ConfigurationError`` through
the main CLI).
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import gc
import signal
import sys
from typing import TYPE_CHECKING, Any

from anonjoin._exceptions import ConfigurationError

if TYPE_CHECKING:  # imported when the command runs, not when it is registered (``--help`` stays cheap)
    from anonjoin.simulator._config import SimulatorConfig
    from anonjoin.simulator._server import PoolRole

__all__ = ["register", "run"]

TLS_READ_BUFFER_KB = 32
GC_THRESHOLD = (10_000, 20, 20)
"""``gc.set_threshold`` of the ``anonjoin simulate`` process (Python's default is 700, 10, 10)."""


EXAMPLES = """\
examples:
  anonjoin simulate
      a simulator on ephemeral loopback ports; the JSON line says where to connect
  anonjoin simulate --faults flaky --seed 7 --lobby admit --lobby-delay 2
      random faults (seeded), and a lobby that admits after 2 s
  anonjoin simulate --pools 2 --pin 0,1 --psat-ttl 60
      a front door and two UCWA pool processes (pinned round robin to CPUs 0 and 1), psats that expire
      after a minute (to watch rejoins)
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run the local simulator (prints one JSON line when ready)",
        description="Run the local simulator (Azure AD, Trusted Application API, UCWA psanon) on loopback "
        "TLS until SIGINT/SIGTERM. When ready it prints one JSON line: discover_url, authority, tenant, "
        "client_id, client_secret, endpoint_id, meeting_url, origin, ca_file, admin_url, pool_url, scope, "
        "admin_token (send it as X-Admin-Token to admin_url), pool_urls and pids (with --pools N: the front "
        "door's PID, then each pool's).",
        epilog=EXAMPLES,
    )
    add = p.add_argument
    add("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    add(
        "--pools",
        type=int,
        default=1,
        metavar="N",
        help="UCWA pool processes behind one front door process (default 1: one process for everything)",
    )
    add(
        "--pin",
        default="",
        metavar="CPU,...",
        help="pin the processes to these CPUs: the front door to the first, pool i to the (i+1)-th "
        "(round robin)",
    )
    add(
        "--exit-with-stdin",
        action="store_true",
        help="exit when stdin reaches EOF or the parent process dies (for a process that starts it)",
    )
    add("--role", choices=("single", "pool"), default="single", help=argparse.SUPPRESS)
    add("--pool-index", type=int, default=0, help=argparse.SUPPRESS)
    add("--material", default="", help=argparse.SUPPRESS)
    add("--main-url", default="", help=argparse.SUPPRESS)
    add("--port", type=int, default=0, help="main listener port (default: ephemeral)")
    add("--pool-port", type=int, default=0, help="pool listener port (default: ephemeral)")
    add("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    add(
        "--faults",
        default="none",
        metavar="PROFILE|FILE",
        help="fault profile: none, flaky, throttled, chaos, or a JSON file (default none)",
    )
    add("--psat-ttl", type=float, metavar="S", help="psat lifetime in seconds (default: profile, else 8 h)")
    add("--aad-ttl", type=float, metavar="S", help="AAD token lifetime in seconds (default 3600)")
    add(
        "--idle-expiry",
        type=float,
        metavar="S",
        help="seconds without a parked poll before an application expires (default 900)",
    )
    add(
        "--lobby",
        choices=("none", "admit", "deny"),
        default="none",
        help="lobby of the meeting (default none)",
    )
    add(
        "--lobby-delay",
        type=float,
        metavar="S",
        help="seconds before the lobby admits or denies (default 0.5)",
    )
    add(
        "--rel-prefix",
        choices=("service:", "ms:rtc:saas:", "alternate"),
        default="service:",
        help="relation prefix of the Trusted Application API (default service:)",
    )
    add(
        "--event-rel-prefix",
        choices=("", "service:", "ms:rtc:saas:"),
        default="",
        help="prefix of the event channel's relations: link rels, _embedded keys, senders (default none)",
    )
    add(
        "--date-format",
        choices=("iso", "dotnet", "dotnet_escaped", "dotnet_literal"),
        default="iso",
        help="date form in bodies (default iso)",
    )
    add(
        "--discover-query",
        choices=("anonymousContext", "anonymousMeetingJoinContext", "discoverContext"),
        default="anonymousContext",
        help="query name of the discover link a token POST returns",
    )
    add(
        "--token-status",
        type=int,
        choices=(200, 201),
        default=200,
        help="status of a successful anonApplicationTokens POST (default 200)",
    )
    add("--redirect", default="", metavar="ROUTE,...", help="routes answered with 307 to the pool listener")
    add("--absolute-hrefs", action="store_true", help="make every href absolute")
    add("--mixed-case-hrefs", action="store_true", help="spell hrefs platformService/endpointid")
    add(
        "--tls-read-buffer-kb",
        type=int,
        default=TLS_READ_BUFFER_KB,
        metavar="KB",
        help=f"asyncio's per-connection TLS read buffer in this process (default {TLS_READ_BUFFER_KB}; "
        "0 keeps asyncio's 256): with 10,000 parked polls it dominates the simulator's memory",
    )
    p.set_defaults(run=run)


def config_from_args(ns: argparse.Namespace) -> SimulatorConfig:
    """The ``SimulatorConfig`` the flags ask for; ``ConfigurationError`` (exit 2) if it is invalid."""
    from pydantic import ValidationError

    from anonjoin.simulator._app import ROUTES
    from anonjoin.simulator._config import SimulatorConfig
    from anonjoin.simulator._faults import FaultProfile

    profile = FaultProfile.load(ns.faults)  # ConfigurationError for an unknown name or a bad file
    redirect = frozenset(r.strip() for r in ns.redirect.split(",") if r.strip())
    known = {route.name for route in ROUTES}
    if not redirect <= known:
        unknown = ", ".join(sorted(redirect - known))
        raise ConfigurationError(f"--redirect: unknown route {unknown} (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {
        "host": ns.host,
        "port": ns.port,
        "pool_port": ns.pool_port,
        "seed": ns.seed,
        "faults": profile,
        "lobby": ns.lobby,
        "rel_prefix": ns.rel_prefix,
        "event_rel_prefix": ns.event_rel_prefix,
        "date_format": ns.date_format,
        "discover_query": ns.discover_query,
        "token_status": ns.token_status,
        "absolute_hrefs": ns.absolute_hrefs,
        "mixed_case_hrefs": ns.mixed_case_hrefs,
        "redirect_routes": redirect,
    }
    for flag, field in (
        ("psat_ttl", "psat_ttl_s"),
        ("aad_ttl", "aad_ttl_s"),
        ("idle_expiry", "idle_expiry_s"),
        ("lobby_delay", "lobby_delay_s"),
    ):
        if getattr(ns, flag) is not None:
            values[field] = getattr(ns, flag)
    try:
        return SimulatorConfig(**values)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigurationError(f"--{where.removesuffix('_s').replace('_', '-')}: {first['msg']}") from None


def _cpus(text: str, *, check: bool = True) -> tuple[int, ...]:
    if not text.strip():
        return ()
    try:
        cpus = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigurationError(f"--pin: expected CPU numbers separated by commas, got {text!r}") from None
    import os

    allowed = os.sched_getaffinity(0)
    if check and not set(cpus) <= allowed:
        raise ConfigurationError(f"--pin: this process may use CPUs {sorted(allowed)} only")
    return cpus


def run(ns: argparse.Namespace) -> int:
    if ns.role == "pool":
        return _run_pool(ns)
    config = config_from_args(ns)
    if not 1 <= ns.pools <= 64:
        raise ConfigurationError("--pools: expected 1..64")
    cpus = _cpus(ns.pin)
    _set_tls_read_buffer(ns.tls_read_buffer_kb)
    if cpus:
        from anonjoin.simulator._pools import pin_to

        pin_to(cpus[0])
    try:
        return asyncio.run(_serve(config, ns, cpus))
    except OSError as exc:
        raise ConfigurationError(f"cannot listen: {exc.strerror or exc}") from None


def _run_pool(ns: argparse.Namespace) -> int:
    """One pool process of a front door (``--role pool``): its configuration comes from the front door."""
    from pathlib import Path

    from anonjoin.simulator._pools import Material, pin_to
    from anonjoin.simulator._server import PoolRole

    material = Material(Path(ns.material))
    config = material.config(ns.pool_index).model_copy(update={"host": ns.host, "pool_port": ns.pool_port})
    _set_tls_read_buffer(ns.tls_read_buffer_kb)
    cpus = _cpus(ns.pin, check=False)  # the front door checked them (and may run pinned to another)
    if cpus:
        pin_to(cpus[0])
    role = PoolRole(index=ns.pool_index, main_url=ns.main_url, material=material)
    try:
        return asyncio.run(_serve(config, ns, (), role))
    except OSError as exc:
        raise ConfigurationError(f"cannot listen: {exc.strerror or exc}") from None


def _set_tls_read_buffer(kb: int) -> None:
    """Shrink asyncio's TLS read buffer (``SSLProtocol.max_size``, 256 KiB per connection in 3.11/3.12).

    Only ``anonjoin simulate`` does this, in its own process: each parked poll holds one TLS connection, so
    10,000 parked polls hold 2.5 GB of these buffers at the default and 0.3 GB at 32 KiB (on top of about
    100 KB a connection for OpenSSL and aiohttp). TLS records are at most 16 KiB, so a smaller buffer only
    means more reads for large bodies.
    """
    if kb == 0:
        return
    if not 4 <= kb <= 1024:
        raise ConfigurationError("--tls-read-buffer-kb: expected 0 or 4..1024")
    asyncio.sslproto.SSLProtocol.max_size = kb * 1024


async def _serve(
    config: SimulatorConfig, ns: argparse.Namespace, cpus: tuple[int, ...], role: PoolRole | None = None
) -> int:
    import json
    import os

    from anonjoin.simulator._pools import lifeline
    from anonjoin.simulator._server import Simulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if ns.exit_with_stdin:
        lifeline(loop, stop.set)
    async with Simulator(config, pools=ns.pools if role is None else 1, cpus=cpus, pool=role) as sim:
        _tune_gc()
        if role is None:
            line = sim.info.model_copy(update={"pids": (os.getpid(), *sim.info.pids)}).model_dump_json()
        else:
            line = json.dumps({"pool_url": sim.info.pool_url, "pid": os.getpid()})
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        stopped, lost = asyncio.ensure_future(stop.wait()), asyncio.ensure_future(sim.wait_lost())
        await asyncio.wait((stopped, lost), return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stopped, lost):
            waiter.cancel()
        await asyncio.gather(stopped, lost, return_exceptions=True)
    return 1 if lost.done() and not lost.cancelled() else 0  # 1: a pool is gone (the log line says which)


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap in this process (it is the simulator's own).

    Under load the collector took about a tenth of the simulator's CPU: young collections every 700
    allocations, and full ones that walk every object of the process, including everything imported at
    start-up. ``gc.freeze()`` moves what exists once the simulator is up (modules, keys, certificates) out of
    the collector's sight for good, and a higher young threshold makes collections rarer (each one bigger).
    Garbage cycles are still collected; only later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
