"""The load report: a JSON document, its HTML rendering, and the ``--fail-if`` condition language.

The JSON keys (``REPORT_SCHEMA``). Every number with a unit says it in its key: ``_ms`` milliseconds,
``_s`` seconds, ``_per_s`` per second; the other numbers are counts (or ``success_rate``, a ratio)::

    schema, anonjoin_version, started_at, finished_at, interrupted
    guests, arrived, joined, failed, ended, cancelled
    success_rate                     joined / (joined + failed): ended and cancelled guests excluded
    failures_by_reason, ended_by_reason, cancelled_by_reason {reason: n}
    retries_by_reason {reason: n}    retries_by_step {step: n}
    meetings {conference id: {guests, joined, failed, ended, cancelled}}
    rejoins, rejoin_attempts, drops, drops_by_reason {reason: n}, leave_errors
    store_writes {late, lost, fenced}                            outcome writes retried / not made / fenced
    duration_s, join_phase_s, joins_per_s
    latency {join, lobby, queue, rejoin}: {count, p50_ms, p90_ms, p95_ms, p99_ms, max_ms, mean_ms}
                                     join: arrival -> joined, lobby excluded; lobby: the lobby wait;
                                     queue: arrival -> the first request; rejoin: each rejoin
    steps {step: {count, p50_ms, p90_ms, p95_ms, p99_ms, max_ms, mean_ms, errors, retries}}
                                     events: the join's own event polls; events.parked: the poll parked
                                     while a guest is in the meeting (how long the server held it)
    throughput [{t_s, joins, failures, rejoins, retries, drops, join_mean_ms, join_max_ms}]   per second
    join_samples [{t_s, join_ms}]                                a bounded sample for the scatter plot
    guest_outcomes [{guest_id, application_session_id, outcome, reason, rejoins, meeting,
                     arrived_at_s, joined_at_s, join_ms, lobby_ms}]   times from the start of the run
    settings {...}                                               the run's settings, secrets removed
    fail_if {expression, breached, detail, clauses [{expression, breached, detail, values}]} | null
    warnings [text]                                              problems that did not stop the run
    service_check {ok, ...} | null                               the embedded simulator's own record

``--fail-if`` takes a small expression, parsed here without ``eval``::

    expr    := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | "(" expr ")" | cmp
    cmp     := value ("<" | "<=" | ">" | ">=" | "==" | "!=") value
    value   := NUMBER [ "ms" | "s" | "%" ] | METRIC | FUNC "(" TARGET ")"
    METRIC  := success_rate | joined | failed | ended | cancelled | guests | rejoins | drops | retries
             | joins_per_s | duration_s
    FUNC    := pNN | pNN.N | max | mean            (a latency, in ms)
    TARGET  := join | lobby | queue | rejoin | a step name (anon_tokens, invitations, events.parked, ...)

A latency or ``duration_s`` compares only with a number that carries a time unit (``2s``, ``150ms``); a
count or rate only with a plain number; ``success_rate`` with a plain ratio or a percentage (``99%``).
A percentile of a target with no samples is "no data" and no comparison with it is true.

The clauses of an expression are its top-level ``or`` operands (``a or b or c``: three clauses; an
expression without a top-level ``or`` is one clause): the run breaches the expression when it breaches one
of them. The report evaluates each (``fail_if.clauses``), for a JUnit file with one test case per clause.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from anonjoin._core.events import Step
from anonjoin._exceptions import ConfigurationError, redact
from anonjoin._load.metrics import PARKED_POLL, LatencyHistogram, Metrics, percentile_ms
from anonjoin._version import __version__

__all__ = [
    "REPORT_SCHEMA",
    "Condition",
    "GuestRecord",
    "build_report",
    "parse_fail_if",
    "write_json",
]

REPORT_SCHEMA = "anonjoin.load-report/2"
STEP_NAMES: tuple[str, ...] = get_args(getattr(Step, "__value__", Step))
TARGETS: tuple[str, ...] = ("join", "lobby", "queue", "rejoin", *STEP_NAMES, PARKED_POLL)
_SECRET_KEYS = re.compile(r"(?i)secret|token|password|private_key|assertion|credential")


@dataclasses.dataclass(frozen=True, slots=True)
class GuestRecord:
    """How one guest ended the run (one per guest, in arrival order)."""

    guest_id: str
    application_session_id: str
    outcome: Literal["joined", "failed", "ended", "cancelled"]
    reason: str | None = None
    rejoins: int = 0
    meeting: str | None = None
    """The meeting's conference id (the last path segment of its join URL)."""
    arrived_at_s: float | None = None
    """When the guest arrived, seconds from the start of the run (None: it never arrived)."""
    joined_at_s: float | None = None
    """When its first join completed, seconds from the start of the run (None: it never joined)."""
    join_ms: float | None = None
    """Its first join's latency, arrival -> joined without the lobby wait (as ``latency.join``)."""
    lobby_ms: float | None = None
    """Its first join's lobby wait (0 without a lobby; None: it never joined)."""


# -- the JSON report ----------------------------------------------------------------------


def _counter(c: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if v}


def clean_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` fit for a report: secret-named keys dropped, URLs and strings scrubbed of tokens."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if _SECRET_KEYS.search(key):
            continue
        if isinstance(value, Mapping):
            out[key] = clean_settings(value)
        elif isinstance(value, str):
            out[key] = redact(value)
        elif value is None or isinstance(value, bool | int | float):
            out[key] = value
        elif isinstance(value, Sequence):
            out[key] = [redact(str(v)) if not isinstance(v, int | float) else v for v in value]
        else:
            out[key] = redact(str(value))
    return out


def build_report(
    metrics: Metrics,
    guests: Sequence[GuestRecord],
    settings: Mapping[str, Any],
    *,
    started_at: float,
    interrupted: bool = False,
    fail_if: Condition | None = None,
    warnings: Sequence[str] = (),
    service_check: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A load run's report as a JSON-ready dict (the keys: see this module's docstring, ``REPORT_SCHEMA``).

    ``metrics`` and ``guests`` are a :class:`~anonjoin.LoadResult`'s; ``settings`` the run's settings to
    record (secret-named keys are dropped, tokens scrubbed from strings); ``started_at`` the run's
    wall-clock start (Unix seconds, ``LoadResult.started_at``). ``fail_if``: a parsed ``--fail-if``
    condition, evaluated into ``report["fail_if"]`` (each clause too). Stops ``metrics``' clock.
    :func:`anonjoin.write_report` builds and writes it in one call.
    """
    metrics.finish()
    counts = {"joined": 0, "failed": 0, "ended": 0, "cancelled": 0}
    for g in guests:
        counts[g.outcome] += 1
    total = len(guests)
    # Guests whose meeting ended and guests cut off by an interruption are neither successes nor
    # failures of the client (protocol.md §6: "Ended: final, not a failure of the client").
    settled = counts["joined"] + counts["failed"]
    seconds = metrics.seconds
    join_phase = metrics.last_join_s if metrics.first_joins else metrics.duration_s
    steps: dict[str, dict[str, Any]] = {}
    retries_by_step = metrics.retries_by_step
    for name in sorted(set(metrics.steps) | set(metrics.step_errors) | set(retries_by_step)):
        hist = metrics.steps.get(name)
        row: dict[str, Any] = (hist or LatencyHistogram()).summary()
        row["errors"] = metrics.step_errors.get(name, 0)
        row["retries"] = retries_by_step.get(name, 0)
        steps[name] = row
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "anonjoin_version": __version__,
        "started_at": _iso(started_at),
        "finished_at": _iso(started_at + metrics.duration_s),
        "interrupted": interrupted,
        "guests": total,
        "arrived": metrics.arrived,
        "joined": counts["joined"],
        "failed": counts["failed"],
        "ended": counts["ended"],
        "cancelled": counts["cancelled"],
        "success_rate": round(counts["joined"] / settled, 6) if settled else 0.0,
        "failures_by_reason": _reasons(guests, "failed"),
        "ended_by_reason": _reasons(guests, "ended"),
        "cancelled_by_reason": _reasons(guests, "cancelled"),
        "meetings": _meetings(guests),
        "retries_by_reason": _counter(metrics.retries_by_reason),
        "retries_by_step": _counter(retries_by_step),
        "rejoins": metrics.rejoins,
        "rejoin_attempts": metrics.rejoin_attempts,
        "drops": metrics.drops,
        "drops_by_reason": _counter(metrics.drops_by_reason),
        "leave_errors": metrics.leave_errors,
        "store_writes": {
            "late": metrics.store_writes_late,
            "lost": metrics.store_writes_lost,
            "fenced": metrics.store_writes_fenced,
        },
        "duration_s": round(metrics.duration_s, 3),
        "join_phase_s": round(join_phase, 3),
        "joins_per_s": round(metrics.first_joins / join_phase, 3) if join_phase > 0 else 0.0,
        "latency": {
            "join": metrics.join.summary(),
            "lobby": metrics.lobby.summary(),
            "queue": metrics.queue.summary(),
            "rejoin": metrics.rejoin.summary(),
        },
        "steps": steps,
        "throughput": [
            {
                "t_s": i,
                "joins": b.joins,
                "failures": b.failures,
                "rejoins": b.rejoins,
                "retries": b.retries,
                "drops": b.drops,
                "join_mean_ms": round(b.join_ms_sum / b.joins, 3) if b.joins else None,
                "join_max_ms": round(b.join_ms_max, 3) if b.joins else None,
            }
            for i, b in enumerate(seconds)
        ],
        "join_samples": [{"t_s": round(t, 3), "join_ms": round(ms, 3)} for t, ms in sorted(metrics.scatter)],
        "guest_outcomes": [dataclasses.asdict(g) for g in guests],
        "settings": clean_settings(settings),
        "fail_if": None,
        "warnings": [redact(w) for w in warnings],
        "service_check": dict(service_check) if service_check is not None else None,
    }
    if fail_if is not None:
        source = MetricsSource(metrics, report)
        breached = fail_if.evaluate(source)
        report["fail_if"] = {
            "expression": fail_if.text,
            "breached": breached,
            "detail": fail_if.explain(source),
            "clauses": fail_if.clauses(source),
        }
    return report


def _reason(g: GuestRecord) -> str:
    return g.reason or "unknown"


def _reasons(guests: Sequence[GuestRecord], outcome: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in guests:
        if g.outcome == outcome:
            key = _reason(g)
            out[key] = out.get(key, 0) + 1
    return _counter(out)


def _meetings(guests: Sequence[GuestRecord]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for g in guests:
        row = out.setdefault(
            g.meeting or "?", {"guests": 0, "joined": 0, "failed": 0, "ended": 0, "cancelled": 0}
        )
        row["guests"] += 1
        row[g.outcome] += 1
    return out


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_json(path: str | os.PathLike[str], report: Mapping[str, Any]) -> Path:
    """Write ``report`` atomically (a temporary file in the same directory, then a rename)."""
    return write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` atomically: a temporary file beside ``path`` (made with the umask), then a rename."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "x", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise ConfigurationError(f"cannot write the report {target}: {exc.strerror or exc}") from exc
    return target


# -- --fail-if ---------------------------------------------------------------------------

MIN_RATE_PHASE_S = 1.0
"""A join phase shorter than this has no meaningful rate (one guest over 12 ms is not "79.2 joins/s")."""


def joins_per_s_text(report: Mapping[str, Any]) -> str:
    """``joins_per_s`` for people: ``"12.3"``, or ``"n/a"`` when the join phase was too short to rate."""
    if float(report.get("join_phase_s") or 0.0) < MIN_RATE_PHASE_S:
        return "n/a"
    return f"{float(report.get('joins_per_s') or 0.0):.1f}"


def plural(n: int, word: str) -> str:
    """``1 guest``, ``2 guests``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


Dim = Literal["ratio", "count", "rate", "time"]

_METRICS: dict[str, Dim] = {
    "success_rate": "ratio",
    "joined": "count",
    "failed": "count",
    "ended": "count",
    "cancelled": "count",
    "guests": "count",
    "rejoins": "count",
    "drops": "count",
    "retries": "count",
    "joins_per_s": "rate",
    "duration_s": "time",
}
_FUNC = re.compile(r"^(?:p(\d{1,2}(?:\.\d+)?|100)|max|mean)$")
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>(?:\d+(?:\.\d*)?|\.\d+))(?P<unit>ms|s|%)?(?![A-Za-z0-9_])
      | (?P<op><=|>=|==|!=|<|>)
      | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<paren>[()])
    )""",
    re.VERBOSE,
)


class MetricSource:
    """What a condition reads: named metrics and latency percentiles (ms)."""

    def metric(self, name: str) -> float:
        raise NotImplementedError

    def latency(self, func: str, target: str) -> float:
        raise NotImplementedError


class MetricsSource(MetricSource):
    """Reads a finished run: counts from the report dict, latencies from the live histograms."""

    def __init__(self, metrics: Metrics, report: Mapping[str, Any]) -> None:
        self._m = metrics
        self._r = report

    def metric(self, name: str) -> float:
        if name == "retries":
            return float(sum(self._m.retries.values()))
        if name == "duration_s":
            return float(self._r["duration_s"]) * 1000.0  # time metrics compare in ms
        return float(self._r[name])

    def latency(self, func: str, target: str) -> float:
        hist = self._m.target(target)
        if func == "max":
            return percentile_ms(hist, 100)
        if func == "mean":
            value = hist.mean_ms() if hist is not None else None
            return math.nan if value is None else value
        return percentile_ms(hist, float(func[1:]))


@dataclasses.dataclass(frozen=True, slots=True)
class _Num:
    value: float
    dim: Dim | None  # None: a plain number (count, rate or ratio)
    text: str

    def eval(self, src: MetricSource) -> float:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class _Metric:
    name: str
    dim: Dim

    @property
    def text(self) -> str:
        return self.name

    def eval(self, src: MetricSource) -> float:
        return src.metric(self.name)


@dataclasses.dataclass(frozen=True, slots=True)
class _Latency:
    func: str
    target: str
    dim: Dim = "time"

    @property
    def text(self) -> str:
        return f"{self.func}({self.target})"

    def eval(self, src: MetricSource) -> float:
        return src.latency(self.func, self.target)


_Value = _Num | _Metric | _Latency

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b and not (math.isnan(a) or math.isnan(b)),
}


@dataclasses.dataclass(frozen=True, slots=True)
class _Cmp:
    left: _Value
    op: str
    right: _Value

    def eval(self, src: MetricSource) -> bool:
        return _OPS[self.op](self.left.eval(src), self.right.eval(src))

    def explain(self, src: MetricSource, out: list[str]) -> None:
        if self.eval(src):
            out.append(f"{_show(self.left, src)} {self.op} {_show(self.right, src)}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Bool:
    op: Literal["and", "or", "not"]
    args: tuple[_Node, ...]

    def eval(self, src: MetricSource) -> bool:
        if self.op == "not":
            return not self.args[0].eval(src)
        if self.op == "and":
            return all(a.eval(src) for a in self.args)
        return any(a.eval(src) for a in self.args)

    def explain(self, src: MetricSource, out: list[str]) -> None:
        if self.op == "not":
            if self.eval(src):
                out.append(f"not ({'; '.join(_collect(self.args[0], src)) or 'condition'})")
            return
        for a in self.args:
            a.explain(src, out)


_Node = _Cmp | _Bool


def _collect(node: _Node, src: MetricSource) -> list[str]:
    out: list[str] = []
    node.explain(src, out)
    return out


def _text(node: _Node, *, top: bool = False) -> str:
    """``node`` written back as an expression (normalised spacing, parentheses where needed)."""
    if isinstance(node, _Cmp):
        return f"{node.left.text} {node.op} {node.right.text}"
    if node.op == "not":
        inner = node.args[0]
        return f"not {_text(inner)}" if isinstance(inner, _Cmp) else f"not ({_text(inner, top=True)})"
    text = f" {node.op} ".join(_text(a) for a in node.args)
    return text if top else f"({text})"


def _values(node: _Node, src: MetricSource) -> list[str]:
    """Every comparison in ``node``, with the values it compared."""
    if isinstance(node, _Cmp):
        return [f"{_show(node.left, src)} {node.op} {_show(node.right, src)}"]
    return [v for a in node.args for v in _values(a, src)]


def _show(value: _Value, src: MetricSource) -> str:
    if isinstance(value, _Num):
        return value.text
    v = value.eval(src)
    if math.isnan(v):
        return f"{value.text}=no data"
    if value.dim == "time":
        return f"{value.text}={v:.1f}ms" if v < 10_000 else f"{value.text}={v / 1000:.2f}s"
    if value.dim == "ratio":
        return f"{value.text}={v:.4f}"
    return f"{value.text}={v:g}"


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """A parsed ``--fail-if`` expression. :meth:`evaluate` is True when the run breaches it."""

    text: str
    root: _Node

    def evaluate(self, source: MetricSource) -> bool:
        return self.root.eval(source)

    def explain(self, source: MetricSource) -> str:
        """The comparisons that hold, with their values (empty when not breached)."""
        if not self.evaluate(source):
            return ""
        return "; ".join(_collect(self.root, source))

    def clauses(self, source: MetricSource) -> list[dict[str, Any]]:
        """Each clause (a top-level ``or`` operand) evaluated: ``{expression, breached, detail, values}``.

        ``detail`` is what :meth:`explain` says of the clause (empty when it holds); ``values`` every
        comparison in it with the run's values (``p95(join)=120.0ms > 2s``), breached or not.
        """
        root = self.root
        parts: tuple[_Node, ...] = root.args if isinstance(root, _Bool) and root.op == "or" else (root,)
        out: list[dict[str, Any]] = []
        for node in parts:
            breached = node.eval(source)
            out.append(
                {
                    "expression": _text(node, top=True),
                    "breached": breached,
                    "detail": "; ".join(_collect(node, source)) if breached else "",
                    "values": "; ".join(_values(node, source)),
                }
            )
        return out


def parse_fail_if(text: str, *, targets: Collection[str] = TARGETS) -> Condition:
    """Parse ``text`` (see the module docstring). A bad expression raises ``ConfigurationError``."""
    tokens = _tokenize(text)
    parser = _Parser(text, tokens, targets)
    root = parser.expr()
    if parser.pos != len(tokens):
        parser.fail(f"unexpected {tokens[parser.pos][1]!r}")
    return Condition(text=text.strip(), root=root)


def _tokenize(text: str) -> list[tuple[str, str, str | None]]:
    if not text.strip():
        raise ConfigurationError("--fail-if: the expression is empty")
    out: list[tuple[str, str, str | None]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            bad = text[pos:].lstrip()[:12]
            raise ConfigurationError(f"--fail-if: cannot read {bad!r} in {text.strip()!r}")
        pos = m.end()
        if m.group("num") is not None:
            out.append(("num", m.group("num"), m.group("unit")))
        elif m.group("op") is not None:
            out.append(("op", m.group("op"), None))
        elif m.group("name") is not None:
            name = m.group("name")
            out.append(("kw" if name.lower() in ("and", "or", "not") else "name", name, None))
        else:
            out.append(("paren", m.group("paren"), None))
    return out


class _Parser:
    def __init__(
        self, text: str, tokens: list[tuple[str, str, str | None]], targets: Collection[str]
    ) -> None:
        self.text = text.strip()
        self.tokens = tokens
        self.targets = targets
        self.pos = 0

    def fail(self, problem: str) -> None:
        raise ConfigurationError(f"--fail-if: {problem} in {self.text!r}")

    def peek(self) -> tuple[str, str, str | None] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str, str | None]:
        tok = self.peek()
        if tok is None:
            self.fail("the expression ends too soon")
            raise AssertionError  # pragma: no cover
        self.pos += 1
        return tok

    def is_kw(self, word: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "kw" and tok[1].lower() == word

    def expr(self) -> _Node:
        args = [self.conj()]
        while self.is_kw("or"):
            self.pos += 1
            args.append(self.conj())
        return args[0] if len(args) == 1 else _Bool("or", tuple(args))

    def conj(self) -> _Node:
        args = [self.neg()]
        while self.is_kw("and"):
            self.pos += 1
            args.append(self.neg())
        return args[0] if len(args) == 1 else _Bool("and", tuple(args))

    def neg(self) -> _Node:
        if self.is_kw("not"):
            self.pos += 1
            return _Bool("not", (self.neg(),))
        tok = self.peek()
        if tok is not None and tok == ("paren", "(", None):
            self.pos += 1
            inner = self.expr()
            if self.peek() != ("paren", ")", None):
                self.fail("a '(' is never closed")
            self.pos += 1
            return inner
        return self.cmp()

    def cmp(self) -> _Cmp:
        left = self.value()
        tok = self.peek()
        if tok is None or tok[0] != "op":
            self.fail(f"expected a comparison (<, <=, >, >=, ==, !=) after {left.text!r}")
            raise AssertionError  # pragma: no cover
        self.pos += 1
        right = self.value()
        self.check_dims(left, right)
        return _Cmp(left, tok[1], right)

    def value(self) -> _Value:
        kind, word, unit = self.take()
        if kind == "num":
            number = float(word)
            if unit == "s":
                return _Num(number * 1000.0, "time", word + unit)
            if unit == "ms":
                return _Num(number, "time", word + unit)
            if unit == "%":
                return _Num(number / 100.0, "ratio", word + unit)
            return _Num(number, None, word)
        if kind != "name":
            self.fail(f"expected a metric or a number, found {word!r}")
        low = word.lower()
        if low in _METRICS:
            return _Metric(low, _METRICS[low])
        if _FUNC.match(low):
            if self.peek() != ("paren", "(", None):
                self.fail(f"{word} needs a target in parentheses, e.g. {word}(join)")
            self.pos += 1
            target_tok = self.take()
            target = target_tok[1].lower()
            if target_tok[0] != "name" or target not in self.targets:
                self.fail(f"unknown latency {target_tok[1]!r} (known: {', '.join(self.targets)})")
            if self.peek() != ("paren", ")", None):
                self.fail(f"{word}({target} is never closed")
            self.pos += 1
            q = low[1:] if low.startswith("p") else None
            if q is not None and float(q) > 100:
                self.fail(f"percentile {q} is above 100")
            return _Latency(low, target)
        if re.match(r"^p\d", low):
            self.fail(f"bad percentile {word!r} (write p50, p95, p99, p99.9 ...)")
        self.fail(
            f"unknown metric {word!r} (known: {', '.join(sorted(_METRICS))}, "
            "pNN(join|lobby|queue|rejoin|<step>), max(...), mean(...))"
        )
        raise AssertionError  # pragma: no cover

    def check_dims(self, left: _Value, right: _Value) -> None:
        a, b = left.dim, right.dim
        if a == b:
            return
        plain = {None, "count", "rate"}
        if a in plain and b in plain:
            return
        named = left if not isinstance(left, _Num) else right
        other = right if named is left else left
        if named.dim == "time":
            if isinstance(other, _Num) and other.dim is None:
                self.fail(
                    f"{named.text} is a time: give {other.text!r} a unit ({other.text}ms or {other.text}s)"
                )
            self.fail(f"{named.text} is a time and cannot compare with {other.text!r}")
        if named.dim == "ratio":
            if isinstance(other, _Num) and other.dim is None:
                if not 0.0 <= other.value <= 1.0:
                    self.fail(
                        f"{named.text} is a ratio from 0 to 1: write {other.value / 100:g} or {other.text}%, "
                        f"not {other.text!r}"
                    )
                return
            self.fail(
                f"{named.text} is a ratio (0..1 or a percentage) and cannot compare with {other.text!r}"
            )
        self.fail(f"{named.text} cannot compare with {other.text!r}")
