"""Prometheus metrics of a load run: a collector that reads a :class:`anonjoin.Metrics` on every scrape.

The metrics are hook-fed already (``Metrics.hooks()``); this module only reads them, so an embedder does::

    metrics = anonjoin.Metrics()
    registry.register(anonjoin.MetricsCollector(metrics))
    async with anonjoin.Client(..., hooks=metrics.hooks()) as client: ...

or passes ``metrics=`` to :func:`anonjoin.run_load`. The collector also takes a zero-argument callable that
returns the ``Metrics`` to read (a merged view built per scrape, say), or ``None`` while there is nothing.

What is exported (seconds for durations)::

    anonjoin_guests{state}                  arrived, in_flight, in_lobby, joined_now, failed, ended, cancelled
    anonjoin_guests_planned                 the guests the run will send
    anonjoin_joins_total                    first joins
    anonjoin_join_failures_total{reason}    guests whose final outcome is failed
    anonjoin_retries_total{step,reason}     retried attempts
    anonjoin_rejoins_total                  rejoins (after a drop or ahead of a psat's expiry)
    anonjoin_drops_total{reason}            joined guests the service dropped
    anonjoin_step_errors_total{step}        attempts that failed for good
    anonjoin_run_seconds                    how long the run has been going
    anonjoin_join_seconds                   histogram: arrival -> joined, lobby excluded
    anonjoin_lobby_seconds                  histogram: the lobby wait of guests that had one
    anonjoin_step_seconds{step}             histogram: each successful attempt of a step

Histogram buckets are cumulative counts of the HDR histograms at fixed bounds (:data:`BUCKETS_S`, 5 ms to
60 s), with their exact counts and sums. :func:`serve_metrics` serves a collector over HTTP on the running
event loop (aiohttp), so a scrape reads the metrics between the loop's own updates, never in the middle of
one. A scrape from another thread (prometheus-client's ``start_http_server``) works too: each counter is
read in one C-level copy, but the set of them is not a snapshot of one instant. prometheus-client is
imported with this module, which ``import anonjoin`` loads only on first use.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from anonjoin._exceptions import ConfigurationError, redact
from anonjoin._load.metrics import LatencyHistogram, Metrics

__all__ = ["BUCKETS_S", "GUEST_STATES", "MetricsCollector", "MetricsServer", "MetricsSource", "serve_metrics"]

BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""The upper bounds of the histogram buckets, in seconds (``+Inf`` is added)."""
GUEST_STATES = ("arrived", "in_flight", "in_lobby", "joined_now", "failed", "ended", "cancelled")
SHUTDOWN_TIMEOUT_S = 2.0
"""On exit, a scrape still being answered gets this long before its connection is closed."""
LABEL_LIMIT = 120
"""Label values (failure reasons) are cut to this many characters: a reason must not become a series."""

MetricsSource = Metrics | Callable[[], Metrics | None]


class MetricsCollector(Collector):
    """Reads a :class:`~anonjoin.Metrics` on each scrape and yields the ``anonjoin_*`` metric families.

    ``source``: a ``Metrics``, or a zero-argument callable returning the ``Metrics`` to read (or ``None``:
    nothing to report yet). ``buckets``: the histograms' bucket bounds in seconds, ascending.
    """

    def __init__(self, source: MetricsSource, *, buckets: Sequence[float] = BUCKETS_S) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or any(b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ConfigurationError("buckets must be positive, ascending and distinct")
        self._read: Callable[[], Metrics | None] = (lambda: source) if isinstance(source, Metrics) else source
        self._bounds = bounds
        self._labels = [repr(b) for b in bounds]  # 0.005, 1.0: as prometheus-client writes them

    def __repr__(self) -> str:
        return f"<anonjoin.MetricsCollector buckets={len(self._bounds)}>"

    def collect(self) -> Iterable[Metric]:
        """The families with their samples (none when the source has nothing to report)."""
        return list(self._families(self._read()))

    def describe(self) -> Iterable[Metric]:
        """The families without samples: what a registry needs to spot duplicate names."""
        return list(self._families(None))

    def _families(self, m: Metrics | None) -> Iterator[Metric]:
        guests = GaugeMetricFamily("anonjoin_guests", "Guests of the run by state", labels=["state"])
        planned = GaugeMetricFamily("anonjoin_guests_planned", "Guests the run will send")
        joins = CounterMetricFamily("anonjoin_joins", "First joins of guests")
        failures = CounterMetricFamily(
            "anonjoin_join_failures", "Guests whose final outcome is failed, by reason", labels=["reason"]
        )
        retries = CounterMetricFamily(
            "anonjoin_retries", "Retried attempts by step and reason", labels=["step", "reason"]
        )
        rejoins = CounterMetricFamily("anonjoin_rejoins", "Rejoins (after a drop or ahead of expiry)")
        drops = CounterMetricFamily("anonjoin_drops", "Joined guests dropped, by reason", labels=["reason"])
        errors = CounterMetricFamily(
            "anonjoin_step_errors", "Attempts that failed for good, by step", labels=["step"]
        )
        run = GaugeMetricFamily("anonjoin_run_seconds", "Seconds since the run started")
        join = HistogramMetricFamily("anonjoin_join_seconds", "Arrival to joined, lobby excluded")
        lobby = HistogramMetricFamily("anonjoin_lobby_seconds", "Lobby wait of guests that had one")
        steps = HistogramMetricFamily(
            "anonjoin_step_seconds", "Latency of each successful attempt, by step", labels=["step"]
        )
        if m is not None:
            p = m.progress()
            for state, value in zip(
                GUEST_STATES,
                (p.arrived, p.in_flight, p.in_lobby, p.joined_now, p.failed, p.ended, p.cancelled),
                strict=True,
            ):
                guests.add_metric([state], value)
            planned.add_metric([], m.guests)
            joins.add_metric([], m.first_joins)
            for reason, n in sorted(m.failed_by_reason.items()):
                failures.add_metric([_label(reason)], n)
            for (step, reason), n in sorted(m.retries.items()):
                retries.add_metric([step, _label(reason)], n)
            rejoins.add_metric([], m.rejoins)
            for reason, n in sorted(m.drops_by_reason.items()):
                drops.add_metric([_label(reason)], n)
            for step, n in sorted(m.step_errors.items()):
                errors.add_metric([step], n)
            run.add_metric([], m.duration_s)
            self._histogram(join, [], m.join)
            self._histogram(lobby, [], m.lobby)
            for step, hist in sorted(m.steps.items()):
                self._histogram(steps, [step], hist)
        yield from (
            guests,
            planned,
            joins,
            failures,
            retries,
            rejoins,
            drops,
            errors,
            run,
            join,
            lobby,
            steps,
        )

    def _histogram(self, family: HistogramMetricFamily, labels: list[str], hist: LatencyHistogram) -> None:
        cumulative = hist.cumulative_counts(self._bounds)
        buckets: list[tuple[str, float]] = [
            (le, float(n)) for le, n in zip(self._labels, cumulative, strict=True)
        ]
        buckets.append(("+Inf", float(hist.count)))
        family.add_metric(labels, buckets, hist.sum_s)


def _label(text: str) -> str:
    text = redact(" ".join(text.split()))
    return text if len(text) <= LABEL_LIMIT else text[: LABEL_LIMIT - 3] + "..."


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """Where :func:`serve_metrics` listens."""

    host: str
    port: int
    path: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"


@contextlib.asynccontextmanager
async def serve_metrics(
    source: MetricsSource | Collector,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    path: str = "/metrics",
) -> AsyncIterator[MetricsServer]:
    """Serve Prometheus metrics on ``http://host:port/path`` while the block runs, on this event loop.

    ``source``: a ``Metrics``, a callable returning one, or any collector. ``port`` 0 picks a free port
    (see the yielded :class:`MetricsServer`). A port that cannot be bound (in use, not allowed) is a
    :class:`~anonjoin.ConfigurationError`, raised before the block runs. On exit the listener and every
    connection are closed.
    """
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"metrics port must be 0..65535, got {port}")
    if not path.startswith("/"):
        raise ConfigurationError(f"metrics path must start with '/', got {path!r}")
    registry = CollectorRegistry(auto_describe=False)
    if isinstance(source, Metrics) or not callable(getattr(source, "collect", None)):
        registry.register(MetricsCollector(cast(MetricsSource, source)))
    else:
        registry.register(cast(Collector, source))

    async def metrics(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get(path, metrics)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {why}") from None
        bound = int(runner.addresses[0][1]) if runner.addresses else port  # the real port for port 0
        yield MetricsServer(host=host, port=bound, path=path)
    finally:
        await runner.cleanup()
