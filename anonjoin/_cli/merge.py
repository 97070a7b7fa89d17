"""``anonjoin merge``: the shard results of one run (``anonjoin load --shard K/S``) into its one report.

The merge is exact (:func:`~anonjoin._load.shards.merge_results`: counters add, histograms add index by index,
records interleave back into guest order), so the JSON and HTML reports are those ``anonjoin load`` writes
for the whole plan run in one process; ``--fail-if`` runs on the merged result. Exit codes as ``load``:
0 ok; 1 when a shard was interrupted; 99 ``--fail-if`` breached; 1 when no guest joined or a shard is
missing (its guests are counted ``cancelled: shard missing``); 2 for bad input (a file that is not a shard
result, shards of different runs, a shard given twice).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from anonjoin._cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_THRESHOLDS,
    EXIT_USAGE,
    positive_int,
)
from anonjoin._exceptions import ConfigurationError, redact

__all__ = ["register", "run_merge_command"]

DEFAULT_REPORT = "anonjoin-report.json"
DEFAULT_HTML = "anonjoin-report.html"


MERGE_EXAMPLES = """\
exit codes: 0 ok; 1 no guest joined, a shard missing or interrupted; 2 bad input; 99 --fail-if breached

examples:
  anonjoin merge shard-*.json
      the report of a run from its shards' results (anonjoin-report.json and .html)
  anonjoin merge results/shard-*.json --shards 4 --report merged.json --fail-if "p95(join)>2s"
      four shards expected (a missing one is reported, its guests cancelled); exit 99 when breached
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    merge = subparsers.add_parser(
        "merge",
        help="merge the shard results of one run (anonjoin load --shard K/S) into its report",
        description=(
            "Merge the shard results of one run (written by anonjoin load --shard K/S --start-at T "
            "--report FILE) exactly into the JSON and HTML reports anonjoin load writes. A missing shard's "
            "guests are counted as cancelled; shards of different runs, or a shard given twice, are refused."
        ),
        epilog=MERGE_EXAMPLES,
    )
    merge.add_argument("results", nargs="+", metavar="SHARD.json", help="the shard results")
    merge.add_argument(
        "--shards",
        type=positive_int,
        default=None,
        metavar="S",
        help="how many shards the run had (default: as the results say)",
    )
    merge.add_argument(
        "--report", default=DEFAULT_REPORT, metavar="PATH", help="JSON report (default %(default)s)"
    )
    merge.add_argument(
        "--html", default=DEFAULT_HTML, metavar="PATH", help="HTML report (default %(default)s)"
    )
    merge.add_argument("--no-html", action="store_true", help="do not write the HTML report")
    merge.add_argument(
        "--fail-if",
        metavar="EXPR",
        help='exit 99 when this holds on the merged result, e.g. "success_rate<99%% or p95(join)>2s"',
    )
    merge.set_defaults(run=run_merge_command)


def _error(text: str) -> None:
    print(f"anonjoin merge: {' '.join(redact(text).split())}", file=sys.stderr, flush=True)


def run_merge_command(ns: argparse.Namespace) -> int:
    try:
        return _merge(ns)
    except ConfigurationError as exc:
        _error(f"error: {exc}")
        return EXIT_USAGE


def merged_report(paths: list[str], *, shards: int | None, fail_if: str | None) -> dict[str, Any]:
    """The report of the shard results at ``paths`` (``ConfigurationError`` for what cannot merge)."""
    from anonjoin._load.report import build_report, parse_fail_if
    from anonjoin._load.shards import SHARD_MISSING, merge_results, read_shard_result

    condition = parse_fail_if(fail_if) if fail_if is not None else None
    results = [read_shard_result(p) for p in paths]
    merged = merge_results(results, shards=shards, missing_reason=SHARD_MISSING, sources=paths)
    report = build_report(
        merged.metrics,
        merged.guests,
        merged.settings,
        started_at=merged.started_at,
        interrupted=merged.interrupted,
        fail_if=condition,
        warnings=merged.warnings,
    )
    report["shards"] = {
        "count": merged.shards,
        "missing": list(merged.missing),
        "reason": SHARD_MISSING if merged.missing else None,
    }
    return report


def _merge(ns: argparse.Namespace) -> int:
    from anonjoin._cli.load import _print_summary
    from anonjoin._load.report import write_json, write_text
    from anonjoin._load.report_html import render_html

    report = merged_report(list(ns.results), shards=ns.shards, fail_if=ns.fail_if)
    written = [str(write_json(Path(ns.report).expanduser(), report))]
    if not ns.no_html:
        written.append(str(write_text(Path(ns.html).expanduser(), render_html(report))))
    _print_summary(report, written)
    if report["interrupted"]:
        _error("a shard was interrupted: the run was cut short")
        return EXIT_FAILED
    if report["fail_if"] and report["fail_if"]["breached"]:
        _error(f"--fail-if breached: {report['fail_if']['detail']}")
        return EXIT_THRESHOLDS
    if report["guests"] and not report["joined"]:
        _error("no guest joined")
        return EXIT_FAILED
    missing = report["shards"]["missing"]
    if missing:
        shown = ", ".join(f"{k}/{report['shards']['count']}" for k in missing)
        _error(f"shard {shown} missing: its guests are counted cancelled")
        return EXIT_FAILED
    return EXIT_OK
