"""Shard results and their exact merge: one run's shards, run anywhere, give the one report.

A shard (``LoadPlan.shard``) runs its slice of the plan and returns a :class:`ShardResult`: the plan it
ran (a fingerprint, so shards of different plans never merge), its records, and its metrics as exact
state (counters, hdrh-encoded histograms, per-second buckets keyed by seconds since the run's common
``start_at``). :func:`merge_results` adds them up: counters add, histograms add index by index (hdrh's
``decode_and_add``: the merged percentiles are those of one process that saw every join), buckets add by
second, records interleave back into guest order.

What cannot merge is refused (:class:`~anonjoin.ConfigurationError`): results of different plans, shard
counts or start times, a shard given twice, a result of another schema. A shard that is missing (its
worker died, its file was not given) is not guessed at: its guests are counted ``cancelled`` with the
reason given (``worker lost``, ``shard missing``) and a warning names the range, so the merged report
still accounts for every guest of the plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from anonjoin._exceptions import ConfigurationError
from anonjoin._load.metrics import Metrics
from anonjoin._load.report import GuestRecord
from anonjoin._load.runner import (
    ConstantRate,
    LinearRamp,
    LoadPlan,
    LoadResult,
    RateFunction,
    Shard,
    Steps,
    conference_of,
    guest_id_of,
)
from anonjoin._version import __version__

__all__ = [
    "SHARD_SCHEMA",
    "MergedRun",
    "ShardResult",
    "merge_results",
    "plan_fingerprint",
    "read_shard_result",
]

SHARD_SCHEMA = "anonjoin.shard-result/1"
SHARD_MISSING = "shard missing"
WORKER_LOST = "worker lost"


def describe_schedule(plan: LoadPlan) -> Any:
    """The plan's arrival schedule as plain data (equal for equal schedules in any process)."""
    sched = plan.schedule
    if sched is None:
        return None
    if isinstance(sched, ConstantRate | LinearRamp | Steps):
        return {"type": type(sched).__name__, **json.loads(json.dumps(dataclasses.asdict(sched)))}
    if isinstance(sched, RateFunction):
        fn = sched.rate
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
        return {"type": "RateFunction", "function": name, "resolution_s": sched.resolution_s}
    return {"type": type(sched).__name__, "repr": repr(sched)}


def plan_fingerprint(plan: LoadPlan, start_at: float | None) -> dict[str, Any]:
    """What every shard of one run shares: the whole plan (not the shard) and the common start.

    Meeting URLs travel as conference ids and a digest (a join URL may carry a meeting's secret part).
    """
    urls = list(plan.meeting_urls)
    return {
        "guests": plan.guests,
        "concurrency": plan.concurrency,
        "schedule": describe_schedule(plan),
        "hold_s": plan.hold_s,
        "guest_prefix": plan.guest_prefix,
        "display_name": plan.display_name,
        "origin": plan.origin,
        "lobby_timeout_s": plan.lobby_timeout_s,
        "meetings": [conference_of(u) for u in urls],
        "meetings_digest": hashlib.sha256("\n".join(urls).encode()).hexdigest(),
        "shards": plan.shard.count,
        "start_at": start_at,
    }


@dataclasses.dataclass
class ShardResult:
    """One shard's run, ready to travel (:meth:`to_json`) and to merge (:func:`merge_results`)."""

    plan: dict[str, Any]
    shard: Shard
    start_at: float
    """The run's common start (Unix seconds); the shard's buckets count from it."""
    interrupted: bool
    guests: list[GuestRecord]
    metrics: dict[str, Any]
    """:meth:`Metrics.to_state` of the shard."""
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The run's settings as the report shows them (already cleaned of secrets)."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    anonjoin_version: str = __version__

    @classmethod
    def of(
        cls,
        result: LoadResult,
        plan: LoadPlan,
        *,
        start_at: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ShardResult:
        """The shard result of ``result``, the run of ``plan`` (its shard) started at ``start_at``."""
        start = result.started_at if start_at is None else start_at
        return cls(
            plan=plan_fingerprint(plan, start_at),
            shard=plan.shard,
            start_at=start,
            interrupted=result.interrupted,
            guests=list(result.guests),
            metrics=result.metrics.to_state(),
            settings=dict(settings or {}),
            warnings=list(result.warnings),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SHARD_SCHEMA,
            "anonjoin_version": self.anonjoin_version,
            "plan": self.plan,
            "shard": {"index": self.shard.index, "count": self.shard.count},
            "start_at": self.start_at,
            "interrupted": self.interrupted,
            "warnings": list(self.warnings),
            "settings": self.settings,
            "guests": [dataclasses.asdict(g) for g in self.guests],
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "the shard result") -> ShardResult:
        if not isinstance(data, Mapping) or data.get("schema") != SHARD_SCHEMA:
            found = data.get("schema") if isinstance(data, Mapping) else type(data).__name__
            raise ConfigurationError(
                f"{source} is not an anonjoin shard result (schema {found!r}, expected {SHARD_SCHEMA!r}; "
                "write one with anonjoin load --shard K/S --report FILE)"
            )
        try:
            fields = {f.name for f in dataclasses.fields(GuestRecord)}
            guests = [GuestRecord(**{k: v for k, v in g.items() if k in fields}) for g in data["guests"]]
            shard = Shard(int(data["shard"]["index"]), int(data["shard"]["count"]))
            return cls(
                plan=dict(data["plan"]),
                shard=shard,
                start_at=float(data["start_at"]),
                interrupted=bool(data["interrupted"]),
                guests=guests,
                metrics=dict(data["metrics"]),
                settings=dict(data.get("settings") or {}),
                warnings=[str(w) for w in data.get("warnings", ())],
                anonjoin_version=str(data.get("anonjoin_version", "?")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{source}: a damaged shard result ({type(exc).__name__}: {exc})"
            ) from None


def read_shard_result(path: str | Path) -> ShardResult:
    """Read a shard result file (``anonjoin load --shard K/S --report FILE``)."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read {p}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigurationError(f"{p} is not JSON: {exc}") from None
    return ShardResult.from_json(data, source=str(p))


@dataclasses.dataclass
class MergedRun:
    """The merge of a run's shard results: what :func:`~anonjoin._load.report.build_report` needs."""

    guests: list[GuestRecord]
    metrics: Metrics
    started_at: float
    interrupted: bool
    settings: dict[str, Any]
    warnings: list[str]
    shards: int
    missing: list[int]
    """Indexes of the shards that gave no result (their guests are ``cancelled``)."""


def merge_results(
    results: Sequence[ShardResult],
    *,
    shards: int | None = None,
    missing_reason: str = SHARD_MISSING,
    sources: Sequence[str] | None = None,
) -> MergedRun:
    """Merge the shard results of one run exactly. ``shards``: how many the run had (default: as the
    results say). ``missing_reason``: the reason given to the guests of a shard without a result.

    Raises :class:`~anonjoin.ConfigurationError` for results that are not of one run, or a shard twice.
    """
    names = list(sources) if sources is not None else [f"shard result {i + 1}" for i in range(len(results))]
    if not results:
        raise ConfigurationError("nothing to merge: no shard result was given")
    first = results[0]
    count = shards if shards is not None else first.shard.count
    seen: dict[int, str] = {}
    for result, name in zip(results, names, strict=True):
        if result.shard.count != count:
            raise ConfigurationError(
                f"{name} is shard {result.shard} of {result.shard.count}, but the run has {count} shards"
            )
        if result.plan != first.plan:
            diff = sorted(
                k for k in result.plan.keys() | first.plan.keys() if result.plan.get(k) != first.plan.get(k)
            )
            raise ConfigurationError(
                f"{name} ran another plan than {names[0]} (they differ in {', '.join(diff)}): "
                "only the shards of one run merge"
            )
        if result.shard.index in seen:
            raise ConfigurationError(
                f"shard {result.shard} is given twice ({seen[result.shard.index]}, {name})"
            )
        seen[result.shard.index] = name
    plan = first.plan
    guests = int(plan["guests"])
    missing = [k for k in range(count) if k not in seen]
    metrics = Metrics.merged(r.metrics for r in sorted(results, key=lambda r: r.shard.index))
    by_id = {g.guest_id: g for r in results for g in r.guests}
    meetings: list[str] = list(plan.get("meetings") or ["?"])
    records: list[GuestRecord] = []
    lost = 0
    for n in range(1, guests + 1):
        gid = guest_id_of(str(plan["guest_prefix"]), guests, n)
        rec = by_id.get(gid)
        if rec is None and (n - 1) % count in missing:
            rec = GuestRecord(gid, "", "cancelled", missing_reason, 0, meetings[(n - 1) % len(meetings)])
            lost += 1
        if rec is not None:
            records.append(rec)
    warnings = [w for r in results for w in r.warnings]
    if missing:
        metrics.guests += lost
        metrics.outcomes["cancelled"] += lost
        shown = ", ".join(f"{k}/{count}" for k in missing)
        warnings.append(
            f"no result from shard {shown} ({missing_reason}): its {lost} guest(s) are counted as cancelled"
        )
    versions = sorted({r.anonjoin_version for r in results})
    if len(versions) > 1:
        warnings.append(f"the shards ran different anonjoin versions: {', '.join(versions)}")
    settings = dict(first.settings)
    settings.pop("shard", None)
    settings["shards"] = count
    start = first.start_at
    if not math.isfinite(start):  # pragma: no cover - from_json gives a float; keep reports JSON-clean
        start = 0.0
    return MergedRun(
        guests=records,
        metrics=metrics,
        started_at=start,
        interrupted=any(r.interrupted for r in results),
        settings=settings,
        warnings=warnings,
        shards=count,
        missing=missing,
    )
