"""The HTML load report: one self-contained file, plots as inline SVG drawn here. No script, no network.

:func:`render_html` reads only the JSON report (see :mod:`anonjoin._load.report`), so an HTML file can be made
again from a saved JSON one. Every string from the report is escaped; nothing secret is in the report.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from anonjoin._load.report import joins_per_s_text

__all__ = ["render_html"]

# A colour-blind-safe palette (Okabe-Ito).
BLUE = "#0072B2"
ORANGE = "#E69F00"
GREEN = "#009E73"
RED = "#D55E00"
PURPLE = "#CC79A7"
SKY = "#56B4E9"
GREY = "#6b7280"
INK = "#1f2937"
GRID = "#e5e7eb"

W = 960  # the width of every plot (viewBox units; plots scale to the page)
PAD_L, PAD_R, PAD_T, PAD_B = 70, 20, 16, 42


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt_ms(ms: float | None) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "-"
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


_BARS = (("p50_ms", SKY), ("p90_ms", BLUE), ("p95_ms", GREEN), ("p99_ms", PURPLE))
"""The percentiles drawn per row of the percentile plot, and their colours."""


def _latency(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """``report["latency"][name]`` (``{}`` when absent)."""
    return (report.get("latency") or {}).get(name) or {}


def _fmt_num(value: float) -> str:
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.2g}"


# -- scales and axes ----------------------------------------------------------------------------------------


def _nice_step(span: float, ticks: int) -> float:
    raw = span / max(ticks, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag  # pragma: no cover


class _Linear:
    def __init__(self, lo: float, hi: float, a: float, b: float, ticks: int = 5) -> None:
        if hi <= lo:
            hi = lo + 1
        step = _nice_step(hi - lo, ticks)
        self.lo = math.floor(lo / step) * step
        self.hi = math.ceil(hi / step) * step
        self.step = step
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        n = round((self.hi - self.lo) / self.step)
        return [self.lo + i * self.step for i in range(n + 1)]


class _Log:
    def __init__(self, lo: float, hi: float, a: float, b: float) -> None:
        lo = max(lo, 1e-3)
        hi = max(hi, lo * 10)
        self.lo = 10 ** math.floor(math.log10(lo))
        self.hi = 10 ** math.ceil(math.log10(hi))
        self.a, self.b = a, b

    def __call__(self, v: float) -> float:
        v = max(v, self.lo)
        t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        return self.a + t * (self.b - self.a)

    def ticks(self) -> list[float]:
        out = []
        v = self.lo
        while v <= self.hi * 1.0001:
            out.append(v)
            v *= 10
        return out


def _svg(height: int, body: list[str], label: str) -> str:
    return (
        f'<svg class="plot" viewBox="0 0 {W} {height}" role="img" aria-label="{_e(label)}" '
        f'xmlns="http://www.w3.org/2000/svg" font-family="system-ui, sans-serif" font-size="12">'
        + "".join(body)
        + "</svg>"
    )


def _y_axis(scale: _Linear | _Log, fmt: Any, x0: int, x1: int, title: str) -> list[str]:
    out = []
    for t in scale.ticks():
        y = scale(t)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{GREY}">{_e(fmt(t))}</text>')
    mid = (scale.a + scale.b) / 2
    out.append(
        f'<text transform="translate(14 {mid:.0f}) rotate(-90)" text-anchor="middle" fill="{INK}">'
        f"{_e(title)}</text>"
    )
    return out


def _x_axis(scale: _Linear | _Log, fmt: Any, y0: float, y1: float, title: str) -> list[str]:
    out = []
    for t in scale.ticks():
        x = scale(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y0}" y2="{y1}" stroke="{GRID}"/>')
        out.append(
            f'<text x="{x:.1f}" y="{y1 + 16:.0f}" text-anchor="middle" fill="{GREY}">{_e(fmt(t))}</text>'
        )
    out.append(
        f'<text x="{(scale.a + scale.b) / 2:.0f}" y="{y1 + 34:.0f}" text-anchor="middle" fill="{INK}">'
        f"{_e(title)}</text>"
    )
    return out


def _legend(items: Sequence[tuple[str, str, str]], x: float, y: float) -> list[str]:
    """Items are (colour, label, kind) with kind in dot / line / dash / box."""
    out = []
    for colour, label, kind in items:
        if kind == "dot":
            out.append(f'<circle cx="{x + 6}" cy="{y - 4}" r="4" fill="{colour}" fill-opacity="0.6"/>')
        elif kind == "box":
            out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{colour}"/>')
        else:
            dash = ' stroke-dasharray="5 3"' if kind == "dash" else ""
            out.append(
                f'<line x1="{x}" x2="{x + 16}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
                f'stroke-width="2.5"{dash}/>'
            )
        out.append(f'<text x="{x + 22}" y="{y}" fill="{INK}">{_e(label)}</text>')
        x += 30 + 7.2 * len(label)
    return out


def _polyline(
    points: Sequence[tuple[float, float]], colour: str, dash: bool = False, width: float = 2
) -> str:
    if not points:
        return ""
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    dash_attr = ' stroke-dasharray="5 3"' if dash else ""
    return (
        f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="{width}" '
        f'stroke-linejoin="round"{dash_attr}/>'
    )


def _empty(height: int, text: str) -> str:
    return _svg(
        height,
        [
            f'<rect x="0" y="0" width="{W}" height="{height}" fill="#f9fafb"/>',
            f'<text x="{W / 2}" y="{height / 2}" text-anchor="middle" fill="{GREY}">{_e(text)}</text>',
        ],
        text,
    )


# -- the plots ----------------------------------------------------------------------------------------------


def _latency_over_time(report: Mapping[str, Any]) -> str:
    samples = [(float(p["t_s"]), float(p["join_ms"])) for p in report.get("join_samples") or ()]
    per_second: list[Mapping[str, Any]] = report.get("throughput") or []
    if not samples:
        return _empty(120, "no guest joined: no join latency to plot")
    h = 340
    duration = max(float(report.get("duration_s") or 0), max(t for t, _ in samples), 1.0)
    values = [ms for _, ms in samples] + [b["join_max_ms"] for b in per_second if b.get("join_max_ms")]
    lo, hi = min(values), max(values)
    median = sorted(ms for _, ms in samples)[len(samples) // 2]
    use_log = hi > 20 * max(median, 0.001) and lo > 0
    y: _Linear | _Log = (
        _Log(lo, hi, h - PAD_B, PAD_T + 18) if use_log else _Linear(0, hi * 1.05, h - PAD_B, PAD_T + 18)
    )
    x = _Linear(0, duration, PAD_L, W - PAD_R, ticks=10)
    body = _y_axis(y, _fmt_ms, PAD_L, W - PAD_R, "join latency" + (" (log scale)" if use_log else ""))
    body += _x_axis(x, lambda t: f"{t:g}s", PAD_T + 18, h - PAD_B, "time since the start of the run")
    body.append(f'<g fill="{BLUE}" fill-opacity="0.45">')
    body += [f'<circle cx="{x(t):.1f}" cy="{y(ms):.1f}" r="2.6"/>' for t, ms in samples]
    body.append("</g>")
    mean_pts = [
        (x(b["t_s"] + 0.5), y(b["join_mean_ms"])) for b in per_second if b.get("join_mean_ms") is not None
    ]
    max_pts = [
        (x(b["t_s"] + 0.5), y(b["join_max_ms"])) for b in per_second if b.get("join_max_ms") is not None
    ]
    body.append(_polyline(max_pts, RED, dash=True, width=1.5))
    body.append(_polyline(mean_pts, ORANGE, width=2.5))
    p99 = _latency(report, "join").get("p99_ms")
    legend = [
        (BLUE, "a guest's join", "dot"),
        (ORANGE, "mean per second", "line"),
        (RED, "max per second", "dash"),
    ]
    if p99 is not None:
        yy = y(p99)
        body.append(
            f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="{PURPLE}" '
            'stroke-width="1.5" stroke-dasharray="2 3"/>'
        )
        legend.append((PURPLE, f"p99 {_fmt_ms(p99)}", "dash"))
    body += _legend(legend, PAD_L + 4, PAD_T + 6)
    return _svg(h, body, "join latency over time")


def _throughput(report: Mapping[str, Any]) -> str:
    per_second: list[Mapping[str, Any]] = report.get("throughput") or []
    if not per_second:
        return _empty(120, "no activity recorded")
    h = 280
    top = max(max(b["joins"] + b["failures"], b["rejoins"], b["retries"]) for b in per_second)
    x = _Linear(0, len(per_second), PAD_L, W - PAD_R, ticks=10)
    y = _Linear(0, max(top, 1) * 1.1, h - PAD_B, PAD_T + 18)
    body = _y_axis(y, _fmt_num, PAD_L, W - PAD_R, "per second")
    body += _x_axis(x, lambda t: f"{t:g}s", PAD_T + 18, h - PAD_B, "time since the start of the run")
    bw = max((x(1) - x(0)) * 0.8, 0.8)
    for b in per_second:
        left = x(b["t_s"]) + (x(1) - x(0) - bw) / 2
        base = y(0)
        if b["joins"]:
            top_y = y(b["joins"])
            body.append(
                f'<rect x="{left:.1f}" y="{top_y:.1f}" width="{bw:.1f}" '
                f'height="{base - top_y:.1f}" fill="{BLUE}"/>'
            )
            base = top_y
        if b["failures"]:
            top_y = y(b["joins"] + b["failures"])
            body.append(
                f'<rect x="{left:.1f}" y="{top_y:.1f}" width="{bw:.1f}" '
                f'height="{base - top_y:.1f}" fill="{RED}"/>'
            )
    body.append(_polyline([(x(b["t_s"] + 0.5), y(b["retries"])) for b in per_second], ORANGE, width=1.8))
    if any(b["rejoins"] for b in per_second):
        body.append(_polyline([(x(b["t_s"] + 0.5), y(b["rejoins"])) for b in per_second], GREEN, width=1.8))
    body += _legend(
        [
            (BLUE, "joins", "box"),
            (RED, "failed joins", "box"),
            (ORANGE, "retries", "line"),
            (GREEN, "rejoins", "line"),
        ],
        PAD_L + 4,
        PAD_T + 6,
    )
    return _svg(h, body, "throughput over time")


def _percentiles(report: Mapping[str, Any]) -> str:
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for key, label in (
        ("join", "join (arrival → joined)"),
        ("lobby", "lobby wait"),
        ("queue", "queue (arrival → first request)"),
        ("rejoin", "rejoin"),
    ):
        summary = _latency(report, key)
        if summary.get("count"):
            rows.append((label, summary))
    for step, summary in (report.get("steps") or {}).items():
        if summary.get("count"):
            rows.append((f"step {step}", summary))
    if not rows:
        return _empty(120, "no latencies recorded")
    label_w = 230
    row_h = 34
    h = PAD_T + 26 + row_h * len(rows) + PAD_B
    values = [s[k] for _, s in rows for k, _ in _BARS if s.get(k)]
    x = _Log(min(values), max(values), label_w, W - PAD_R - 170)
    body: list[str] = []
    body += _x_axis(x, _fmt_ms, PAD_T + 24, h - PAD_B, "latency (log scale)")
    for i, (label, s) in enumerate(rows):
        top = PAD_T + 28 + i * row_h
        body.append(
            f'<text x="{label_w - 8}" y="{top + row_h / 2 + 1:.0f}" text-anchor="end" fill="{INK}">'
            f"{_e(label)}</text>"
        )
        bar_h = (row_h - 8) / len(_BARS)
        for j, (key, colour) in enumerate(_BARS):
            v = s.get(key)
            if not v:
                continue
            y0 = top + j * bar_h
            body.append(
                f'<rect x="{label_w}" y="{y0:.1f}" width="{max(x(v) - label_w, 1):.1f}" '
                f'height="{bar_h - 1:.1f}" '
                f'fill="{colour}"><title>{_e(label)} {key[:-3]} {_e(_fmt_ms(v))}</title></rect>'
            )
        p99 = s.get("p99_ms")
        if p99:
            body.append(
                f'<text x="{x(p99) + 6:.1f}" y="{top + row_h / 2 + 4:.0f}" fill="{GREY}" font-size="11">'
                f"p99 {_e(_fmt_ms(p99))} · n={_e(s.get('count'))}</text>"
            )
    body += _legend([(c, key[:-3], "box") for key, c in _BARS], label_w, PAD_T + 8)
    return _svg(h, body, "latency percentiles per step")


def _bars(items: Sequence[tuple[str, int, str]], total: int, label: str) -> str:
    if not items:
        return _empty(80, f"no {label}")
    items = [(name if len(name) <= 70 else name[:69] + "…", v, c) for name, v, c in items]
    label_w = int(min(max(7.0 * max(len(name) for name, _, _ in items) + 16, 120), 520))
    row_h = 26
    h = PAD_T + row_h * len(items) + 12
    top_v = max(v for _, v, _ in items)
    x = _Linear(0, top_v, label_w, W - PAD_R - 120)
    body: list[str] = []
    for i, (name, v, colour) in enumerate(items):
        y0 = PAD_T + i * row_h
        wid = max(x(v) - label_w, 1.5)
        body.append(
            f'<text x="{label_w - 8}" y="{y0 + row_h / 2 + 4:.0f}" text-anchor="end" fill="{INK}">'
            f"{_e(name)}</text>"
        )
        body.append(
            f'<rect x="{label_w}" y="{y0 + 3}" width="{wid:.1f}" height="{row_h - 6}" '
            f'fill="{colour}" rx="2"/>'
        )
        share = f" ({100 * v / total:.1f}%)" if total else ""
        body.append(
            f'<text x="{label_w + wid + 6:.1f}" y="{y0 + row_h / 2 + 4:.0f}" fill="{GREY}">'
            f"{v:,}{_e(share)}</text>"
        )
    return _svg(h, body, label)


def _outcomes(report: Mapping[str, Any]) -> str:
    total = int(report.get("guests") or 0)
    items: list[tuple[str, int, str]] = [("joined", int(report.get("joined") or 0), GREEN)]
    for key, label, colour in (
        ("failures_by_reason", "failed", RED),
        ("ended_by_reason", "meeting ended", PURPLE),
        ("cancelled_by_reason", "cancelled", GREY),
    ):
        for reason, n in (report.get(key) or {}).items():
            items.append((f"{label}: {reason}", int(n), colour))
    return _bars(items, total, "outcomes")


def _retries(report: Mapping[str, Any]) -> str:
    items = [(str(k), int(v), ORANGE) for k, v in (report.get("retries_by_reason") or {}).items()][:15]
    total = sum(v for _, v, _ in items)
    return _bars(items, total, "retries")


# -- the page -----------------------------------------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#1f2937;background:#f3f4f6}
main{max-width:1040px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px}
.sub{color:#6b7280;margin:0 0 16px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.card{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
.card .v{font-size:22px;font-weight:600}
.card .k{color:#6b7280;font-size:13px}
.ok .v{color:#047857}.bad .v{color:#b91c1c}
section{background:#fff;border-radius:8px;padding:12px 16px;margin-top:12px;
box-shadow:0 1px 2px rgba(0,0,0,.06)}
section h2{margin:4px 0 8px}
svg.plot{width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e5e7eb;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:10px 14px;border-radius:8px;margin:12px 0;font-weight:600}
.banner.bad{background:#fee2e2;color:#991b1b}.banner.ok{background:#d1fae5;color:#065f46}
.banner.warn{background:#fef3c7;color:#92400e}
code{font-size:13px}
"""


def _card(key: str, value: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><div class="v">{_e(value)}</div><div class="k">{_e(key)}</div></div>'


def _steps_table(report: Mapping[str, Any]) -> str:
    head = (
        "<tr><th>step</th><th class=n>count</th><th class=n>p50</th><th class=n>p90</th><th class=n>p95</th>"
        "<th class=n>p99</th><th class=n>max</th><th class=n>mean</th><th class=n>errors</th>"
        "<th class=n>retries</th></tr>"
    )
    rows = []
    keys = ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms")
    for step, s in (report.get("steps") or {}).items():
        rows.append(
            f"<tr><td>{_e(step)}</td><td class=n>{_e(s.get('count', 0))}</td>"
            + "".join(f"<td class=n>{_e(_fmt_ms(s.get(k)))}</td>" for k in keys)
            + f"<td class=n>{_e(s.get('errors', 0))}</td><td class=n>{_e(s.get('retries', 0))}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _check_problems(check: Mapping[str, Any]) -> list[str]:
    problems = []
    if check.get("unknown_application_session_ids"):
        problems.append(
            f"{check['unknown_application_session_ids']} applicationSessionIds the run never used"
        )
    missing = int(check.get("rejoined_guests") or 0) - int(check.get("rejoined_guests_with_the_same_id") or 0)
    if missing:
        problems.append(f"{missing} rejoined guests without a new application for their id")
    if check.get("duplicate_roster_entries"):
        problems.append(f"{check['duplicate_roster_entries']} duplicate roster entries")
    if check.get("live_applications_at_end"):
        problems.append(f"{check['live_applications_at_end']} applications left live at the end")
    return problems or ["see the counts below"]


def _service_check(report: Mapping[str, Any]) -> str:
    check = report.get("service_check")
    if not check:
        return ""
    verdict = (
        '<div class="banner ok">Consistent: every rejoin kept its guest\'s applicationSessionId, no roster '
        "held a guest twice, no application was left live.</div>"
        if check.get("ok")
        else f'<div class="banner bad">Inconsistent: {_e("; ".join(_check_problems(check)))}.</div>'
    )
    rows = "".join(
        f"<tr><th>{_e(k.replace('_', ' '))}</th><td class=n>{_e(_value_text(v))}</td></tr>"
        for k, v in check.items()
        if k not in ("ok", "faults_injected")
    )
    faults = check.get("faults_injected") or {}
    fault_rows = "".join(
        f"<tr><th>{_e(route)}</th><td>{_e(', '.join(f'{kind} x{n}' for kind, n in kinds.items()))}</td></tr>"
        for route, kinds in faults.items()
    )
    fault_table = f"<h3>Faults injected by route</h3><table>{fault_rows}</table>" if fault_rows else ""
    return (
        "<section><h2>Checked against the simulator's own record</h2>"
        f"{verdict}<table>{rows}</table>{fault_table}</section>"
    )


def _value_text(value: object) -> str:
    """A JSON value for people: ``yes``/``no``, numbers as written, lists and objects spelled out (never a
    Python repr such as ``False``, ``None`` or ``['a', 'b']``)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_value_text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_value_text(v) for v in value) or "-"
    return str(value)


def _settings_table(settings: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_e(k)}</th><td><code>{_e(_value_text(v))}</code></td></tr>"
        for k, v in settings.items()
        if v is not None
    )
    return f"<table>{rows}</table>"


def render_html(report: Mapping[str, Any]) -> str:
    """The report as one HTML page (inline CSS and SVG only)."""
    guests = int(report.get("guests") or 0)
    joined = int(report.get("joined") or 0)
    failed = int(report.get("failed") or 0)
    ended = int(report.get("ended") or 0)
    rate = float(report.get("success_rate") or 0.0)
    join = _latency(report, "join")
    settings = report.get("settings") or {}
    target = settings.get("target") or "embedded simulator"
    cards = [
        _card("guests", f"{guests:,}"),
        _card("joined", f"{joined:,}", "ok" if joined == guests and guests else ""),
        _card("failed", f"{failed:,}", "bad" if failed else ""),
        *([_card("meeting ended", f"{ended:,}")] if ended else []),
        _card("success rate", f"{100 * rate:.2f}%", "ok" if rate >= 0.999 else "bad"),
        _card("joins / s", joins_per_s_text(report)),
        _card("join p50", _fmt_ms(join.get("p50_ms"))),
        _card("join p95", _fmt_ms(join.get("p95_ms"))),
        _card("join p99", _fmt_ms(join.get("p99_ms"))),
        _card("join max", _fmt_ms(join.get("max_ms"))),
        _card("drops", f"{int(report.get('drops') or 0):,}"),
        _card("rejoins", f"{int(report.get('rejoins') or 0):,}"),
        _card("retries", f"{sum((report.get('retries_by_reason') or {}).values()):,}"),
        _card("duration", f"{float(report.get('duration_s') or 0):.1f} s"),
    ]
    if report.get("cancelled"):
        cards.append(_card("cancelled", f"{int(report['cancelled']):,}", "bad"))
    banners = []
    if report.get("interrupted"):
        banners.append(
            '<div class="banner warn">The run was interrupted: arrivals stopped, joined guests left, '
            "guests not yet joined are counted as cancelled.</div>"
        )
    for warning in report.get("warnings") or ():
        banners.append(f'<div class="banner warn">{_e(warning)}</div>')
    fail_if = report.get("fail_if")
    if fail_if:
        if fail_if.get("breached"):
            banners.append(
                f'<div class="banner bad">--fail-if breached: <code>{_e(fail_if.get("expression"))}</code> '
                f"({_e(fail_if.get('detail'))})</div>"
            )
        else:
            banners.append(
                f'<div class="banner ok">--fail-if held: <code>{_e(fail_if.get("expression"))}</code> '
                "was not breached</div>"
            )
    started = report.get("started_at", "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>anonjoin load report: {joined:,}/{guests:,} joined</title>
<style>{_CSS}</style></head>
<body><main>
<h1>anonjoin load report</h1>
<p class="sub">{_e(started)} · target: {_e(target)} · anonjoin {_e(report.get("anonjoin_version", ""))}</p>
{"".join(banners)}
<div class="cards">{"".join(cards)}</div>
<section><h2>Join latency over time</h2>
<p class="sub">Each dot is one guest's first join, from its arrival to joined, lobby time excluded
(a sample of at most a few thousand guests).</p>
{_latency_over_time(report)}</section>
<section><h2>Throughput</h2>{_throughput(report)}</section>
<section><h2>Latency percentiles</h2>
<p class="sub">The <code>events</code> step is the join's own event polls (connecting, lobby);
<code>events.parked</code> is the poll parked while a guest is in the meeting: its time is how long the
server held it, not a service delay.</p>
{_percentiles(report)}
{_steps_table(report)}</section>
<section><h2>Outcomes</h2>{_outcomes(report)}</section>
<section><h2>Retries by reason</h2>{_retries(report)}</section>
{_service_check(report)}
<section><h2>Settings</h2>{_settings_table(settings)}</section>
</main></body></html>
"""
