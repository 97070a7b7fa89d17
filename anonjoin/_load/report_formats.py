"""The report in the formats CI systems read: CSV (like Locust's ``--csv``) and JUnit XML.

Everything here reads only the JSON report dict (see :mod:`anonjoin._load.report`), so a saved report, or one
merged from several shards, can be written again in these formats. Every file is written atomically.

- ``write_csv(report, prefix)``: ``PREFIX_stats.csv``, one row per latency (``join``, ``lobby``,
  ``queue``, ``rejoin``) and per step: ``kind, name, count, errors, retries, p50_ms, p90_ms, p95_ms,
  p99_ms, max_ms, mean_ms`` (an empty cell where there is no data); and ``PREFIX_history.csv``, one row per
  second of the run: ``t_s, joins, failures, rejoins, retries, drops, join_mean_ms, join_max_ms,
  joins_total, failures_total``.
- ``write_junit(report, path)``: a ``fail_if`` suite with one test case per ``--fail-if`` clause (failed
  when the run breached it; its values either way), and a ``failures`` suite with one failed test case
  per failure reason (with its count; one passing case when no guest failed).
- ``write_report(result, json=..., html=..., csv=..., junit=...)``: a run's (or a report's) files.
"""

from __future__ import annotations

import csv
import io
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anonjoin._exceptions import ConfigurationError
from anonjoin._load import report as _report
from anonjoin._load.report import REPORT_SCHEMA, Condition, build_report, parse_fail_if
from anonjoin._version import __version__

if TYPE_CHECKING:
    from anonjoin._load.runner import LoadResult

__all__ = ["write_csv", "write_files", "write_junit", "write_report"]

StrPath = str | os.PathLike[str]

STATS_COLUMNS = (
    "kind", "name", "count", "errors", "retries",
    "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms",
)  # fmt: skip
HISTORY_COLUMNS = (
    "t_s", "joins", "failures", "rejoins", "retries", "drops", "join_mean_ms", "join_max_ms",
    "joins_total", "failures_total",
)  # fmt: skip
LATENCIES = ("join", "lobby", "queue", "rejoin")
JUNIT_SUITE = "anonjoin load"
_XML_BAD = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""Characters XML 1.0 cannot hold (control characters, lone surrogates): replaced, never written."""


# -- CSV -------------------------------------------------------------------------------------------


def _cell(value: object) -> object:
    return "" if value is None else value


def _csv_text(columns: tuple[str, ...], rows: list[Mapping[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return out.getvalue()


def csv_paths(prefix: StrPath) -> tuple[Path, Path]:
    """``(PREFIX_stats.csv, PREFIX_history.csv)``."""
    base = Path(prefix).expanduser()
    if not base.name or base.name in (".", ".."):
        raise ConfigurationError(f"--csv {prefix}: give a file name prefix, e.g. results/run1")
    return base.with_name(f"{base.name}_stats.csv"), base.with_name(f"{base.name}_history.csv")


def write_csv(report: Mapping[str, Any], prefix: StrPath) -> tuple[Path, Path]:
    """Write ``PREFIX_stats.csv`` and ``PREFIX_history.csv`` from ``report``; returns both paths."""
    stats_path, history_path = csv_paths(prefix)
    stats: list[Mapping[str, object]] = []
    latency: Mapping[str, Any] = report.get("latency") or {}
    for name in LATENCIES:
        summary = latency.get(name)
        if summary is not None:
            stats.append({"kind": "latency", "name": name, **summary})
    for name, row in (report.get("steps") or {}).items():
        stats.append({"kind": "step", "name": name, **row})
    history: list[Mapping[str, object]] = []
    joins_total = failures_total = 0
    for bucket in report.get("throughput") or ():
        joins_total += int(bucket.get("joins") or 0)
        failures_total += int(bucket.get("failures") or 0)
        history.append({**bucket, "joins_total": joins_total, "failures_total": failures_total})
    _report.write_text(stats_path, _csv_text(STATS_COLUMNS, stats))
    _report.write_text(history_path, _csv_text(HISTORY_COLUMNS, history))
    return stats_path, history_path


# -- JUnit XML -------------------------------------------------------------------------------------


def _x(value: object) -> str:
    """``value`` as text XML can hold (ElementTree escapes ``<&>"``; this removes what it cannot)."""
    return _XML_BAD.sub("\ufffd", str(value))


def _suite(parent: ET.Element, name: str, timestamp: str, duration: str) -> ET.Element:
    return ET.SubElement(parent, "testsuite", name=_x(name), timestamp=_x(timestamp), time=duration)


def _case(suite: ET.Element, name: str, duration: str) -> ET.Element:
    return ET.SubElement(suite, "testcase", classname=_x(suite.get("name", "")), name=_x(name), time=duration)


def _count(suite: ET.Element) -> tuple[int, int]:
    tests = len(suite.findall("testcase"))
    failures = len(suite.findall("testcase/failure"))
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")
    return tests, failures


def junit_xml(report: Mapping[str, Any]) -> str:
    """``report`` as a JUnit XML document (see the module docstring)."""
    duration = f"{float(report.get('duration_s') or 0.0):.3f}"
    timestamp = str(report.get("started_at") or "").removesuffix("Z")
    root = ET.Element("testsuites", name=JUNIT_SUITE, time=duration)
    fail_if = report.get("fail_if")
    if fail_if:
        suite = _suite(root, "anonjoin load.fail_if", timestamp, duration)
        clauses = fail_if.get("clauses") or [
            {
                "expression": fail_if.get("expression", ""),
                "breached": fail_if.get("breached", False),
                "detail": fail_if.get("detail", ""),
                "values": fail_if.get("detail", ""),
            }
        ]
        for clause in clauses:
            case = _case(suite, f"--fail-if {clause['expression']}", duration)
            values = str(clause.get("values") or "")
            if clause.get("breached"):
                failure = ET.SubElement(
                    case,
                    "failure",
                    type="threshold",
                    message=_x(f"breached: {clause.get('detail') or clause['expression']}"),
                )
                failure.text = _x(values)
            else:
                ET.SubElement(case, "system-out").text = _x(f"not breached: {values}")
    suite = _suite(root, "anonjoin load.failures", timestamp, duration)
    reasons: Mapping[str, int] = report.get("failures_by_reason") or {}
    for reason, n in reasons.items():
        case = _case(suite, f"failed: {reason}", duration)
        guests = "guest" if n == 1 else "guests"
        failure = ET.SubElement(case, "failure", type="failed", message=_x(f"{n} {guests} failed: {reason}"))
        failure.text = _x(f"{n} of {report.get('guests', 0)} guests failed with {reason}")
    if not reasons:
        _case(suite, "no guest failed", duration)
    tests = failures = 0
    for s in root.findall("testsuite"):
        t, f = _count(s)
        tests, failures = tests + t, failures + f
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", "0")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: Mapping[str, Any], path: StrPath) -> Path:
    """Write ``report`` as JUnit XML to ``path`` (atomically); returns the path."""
    return _report.write_text(Path(path).expanduser(), junit_xml(report))


# -- all of them -----------------------------------------------------------------------------------


def write_files(
    report: Mapping[str, Any],
    *,
    json: StrPath | None = None,
    html: StrPath | None = None,
    csv: StrPath | None = None,
    junit: StrPath | None = None,
) -> list[Path]:
    """Write ``report`` in each format given a path (``csv``: a prefix); returns the files written.

    ``report`` must be of this version's schema (``REPORT_SCHEMA``): another is refused with
    ``ConfigurationError``, before anything is written."""
    schema = report.get("schema")
    if schema != REPORT_SCHEMA:
        raise ConfigurationError(
            f"the report's schema is {schema!r}; this anonjoin {__version__} writes {REPORT_SCHEMA} reports "
            "(build it again from the run, or use the anonjoin version that made it)"
        )
    written: list[Path] = []
    if json is not None:
        written.append(_report.write_json(Path(json).expanduser(), report))
    if html is not None:
        from anonjoin._load.report_html import render_html

        written.append(_report.write_text(Path(html).expanduser(), render_html(report)))
    if csv is not None:
        written.extend(write_csv(report, csv))
    if junit is not None:
        written.append(write_junit(report, junit))
    return written


def write_report(
    result: LoadResult | Mapping[str, Any],
    *,
    json: StrPath | None = None,
    html: StrPath | None = None,
    csv: StrPath | None = None,
    junit: StrPath | None = None,
    settings: Mapping[str, Any] | None = None,
    fail_if: str | Condition | None = None,
) -> dict[str, Any]:
    """Write a load run's report files and return the report (the JSON document, as a dict).

    ``result`` is what :func:`anonjoin.run_load` returned (its report is built here, with ``settings``,
    secrets removed, and ``fail_if``, an expression as for ``anonjoin load --fail-if``), or a report dict
    already built (for example one read back from a JSON file, or merged from several shards) of this
    version's schema, which is written as it is. Each of ``json``, ``html``, ``junit`` is a file path,
    ``csv`` a prefix (``PREFIX_stats.csv``, ``PREFIX_history.csv``); the formats not given are not
    written. Files are written atomically. A bad ``fail_if``, a report of another schema or a path that
    cannot be written raises ``ConfigurationError``.
    """
    if isinstance(result, Mapping):
        if settings is not None or fail_if is not None:
            raise ConfigurationError("settings and fail_if apply to a LoadResult, not to a built report")
        report = dict(result)
    else:
        condition = parse_fail_if(fail_if) if isinstance(fail_if, str) else fail_if
        report = build_report(
            result.metrics,
            result.guests,
            settings or {},
            started_at=result.started_at,
            interrupted=result.interrupted,
            fail_if=condition,
            warnings=result.warnings,
        )
    write_files(report, json=json, html=html, csv=csv, junit=junit)
    return report
