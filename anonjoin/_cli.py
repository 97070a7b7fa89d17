"""The ``anonjoin`` command line: one parser, one sub-command a module.

Each sub-command module offers ``register(subparsers)``, which adds its parser and sets ``run`` (a function
of the parsed namespace returning the exit code). Errors anonjoin knows become one line on stderr; a bad
flag is one line (what is wrong, then ``see: anonjoin CMD --help``) and exit 2; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from anonjoin._cli_common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, OneLineParser
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
    return parser


def _registrations() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    found: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = []
    # Each module is optional while the package grows; a missing one simply has no sub-command.
    for name in ("anonjoin.simulator._cli", "anonjoin._cli_join", "anonjoin._cli_load"):
        try:
            module = __import__(name, fromlist=["register"])
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
