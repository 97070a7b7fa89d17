"""The ``anonjoin`` command line: one parser, one sub-command a module.

Each sub-command module offers ``register(subparsers)``, which adds its parser and sets ``run`` (a function
of the parsed namespace returning the exit code). Errors anonjoin knows become one line on stderr; a bad
flag is one line (what is wrong, then ``see: anonjoin CMD --help``) and exit 2; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

from anonjoin._cli.common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OneLineParser,
    add_log_format_argument,
    stderr_log_handler,
)
from anonjoin._exceptions import AnonJoinError, ConfigurationError
from anonjoin._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="anonjoin",
        description="Join anonymous guests into online meetings, one or thousands at once.",
    )
    parser.add_argument("--version", action="version", version=f"anonjoin {__version__}")
    # Sub-command parsers are OneLineParsers too (argparse makes them of the parent's class).
    sub: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineParser
    )
    sub.required = True
    for register in _registrations():
        register(sub)
    for command in sub.choices.values():
        add_log_format_argument(command)
    return parser


def _registrations() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    found: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []
    # Each module is optional while the package grows; a missing one simply has no sub-command.
    for name in (
        "anonjoin.simulator._cli",
        "anonjoin._cli.join",
        "anonjoin._cli.load",
        "anonjoin._cli.doctor",
        "anonjoin._cli.merge",
    ):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        found.append(module.register)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = ns.run
    try:
        with _quiet_libraries(bool(getattr(ns, "verbose", False))), _warnings_as(ns):
            return run(ns)
    except ConfigurationError as exc:
        print(f"anonjoin {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AnonJoinError as exc:
        print(f"anonjoin {ns.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"anonjoin {ns.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


_LIBRARY_LOGGERS = ("msal", "urllib3", "requests")
"""Loggers of libraries anonjoin calls that log failures themselves, some with a traceback (msal logs an
HTML answer from Azure AD with ``logger.exception``). anonjoin reports the same failure as one typed line."""


@contextlib.contextmanager
def _quiet_libraries(verbose: bool) -> Iterator[None]:
    """Without ``-v``, records of :data:`_LIBRARY_LOGGERS` go nowhere (Python's last-resort handler would
    print them, tracebacks included, on stderr); with ``-v`` they propagate as usual."""
    if verbose:
        yield
        return
    handler = logging.NullHandler()
    saved = []
    for name in _LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        saved.append((lib, lib.propagate))
        lib.addHandler(handler)
        lib.propagate = False
    try:
        yield
    finally:
        for lib, propagate in saved:
            lib.removeHandler(handler)
            lib.propagate = propagate


@contextlib.contextmanager
def _warnings_as(ns: argparse.Namespace) -> Iterator[None]:
    """``--log-format json`` for a command without ``-v``: its warnings are JSON lines too (not Python's
    last-resort text). Commands with ``-v`` set up their own handler in the format asked for."""
    if ns.log_format != "json" or hasattr(ns, "verbose"):
        yield
        return
    handler = stderr_log_handler("json")
    handler.setLevel(logging.WARNING)
    log = logging.getLogger("anonjoin")
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
