"""Prometheus metrics: the collector over a Metrics, serve_metrics during a run, load --metrics-port."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from anonjoin import (
    ClientSecretCredential,
    ConfigurationError,
    LoadPlan,
    LoadRunner,
    Metrics,
    MetricsCollector,
    RejoinPolicy,
    RetryPolicy,
    StepEvent,
    run_load,
    serve_metrics,
)
from anonjoin._cli import main
from anonjoin._load.prometheus import BUCKETS_S
from anonjoin._load.report import build_report
from anonjoin.simulator import FaultProfile, FaultRule, Simulator

from support.processes import clean_env
from support.prometheus import Samples, by_label, parse, scraped, value


def step_end(step: str, outcome: str, duration_s: float = 0.01, reason: str | None = None) -> StepEvent:
    return StepEvent(
        guest_id="g", step=step, phase="end", attempt=1, outcome=outcome,  # type: ignore[arg-type]
        duration_s=duration_s, retry_reason=reason,
    )  # fmt: skip


# ---- the collector ---------------------------------------------------------------------------------


def test_the_collector_exports_counters_gauges_and_exact_histograms() -> None:
    m = Metrics(guests=6)
    for _ in range(5):
        m.guest_arrived()
        m.guest_started(0.0)
    for gid, seconds in (("g1", 0.003), ("g2", 0.3), ("g3", 1.5), ("g4", 90.0)):
        m.guest_joined(gid, seconds, 0.0)
    m.guest_join_failed("g5")
    m.guest_final("g5", "failed", "invitations: HTTP 503 ServiceFailure")
    m.guest_final("g4", "ended", "Ended")  # ended is not a join failure
    m.on_step(step_end("invitations", "retry", reason="503"))
    m.on_step(step_end("invitations", "retry", reason="503"))
    m.on_step(step_end("anon_tokens", "retry", reason="429"))
    m.on_step(step_end("anon_tokens", "ok", duration_s=0.02))
    m.on_step(step_end("invitations", "error"))
    s = scraped(MetricsCollector(m))

    assert value(s, "anonjoin_joins_total") == 4
    assert value(s, "anonjoin_guests_planned") == 6
    assert by_label(s, "anonjoin_guests", "state") == {
        "arrived": 5, "in_flight": 0, "in_lobby": 0, "joined_now": 3, "failed": 1, "ended": 1, "cancelled": 0,
    }  # fmt: skip
    assert by_label(s, "anonjoin_join_failures_total", "reason") == {
        "invitations: HTTP 503 ServiceFailure": 1
    }
    assert value(s, "anonjoin_retries_total", step="invitations", reason="503") == 2
    assert value(s, "anonjoin_retries_total", step="anon_tokens", reason="429") == 1
    assert value(s, "anonjoin_step_errors_total", step="invitations") == 1
    assert value(s, "anonjoin_rejoins_total") == 0
    # cumulative buckets at fixed bounds; the count and the sum exact (90 s is only in +Inf)
    buckets = by_label(s, "anonjoin_join_seconds_bucket", "le")
    assert list(buckets) == [*(repr(b) for b in BUCKETS_S), "+Inf"]
    assert [buckets[k] for k in ("0.005", "0.25", "0.5", "1.0", "2.5", "60.0", "+Inf")] == [
        1,
        1,
        2,
        2,
        3,
        3,
        4,
    ]
    assert value(s, "anonjoin_join_seconds_count") == 4
    assert value(s, "anonjoin_join_seconds_sum") == pytest.approx(0.003 + 0.3 + 1.5 + 90.0, abs=1e-9)
    assert value(s, "anonjoin_step_seconds_count", step="anon_tokens") == 1
    assert value(s, "anonjoin_step_seconds_bucket", step="anon_tokens", le="0.025") == 1
    assert value(s, "anonjoin_step_seconds_bucket", step="anon_tokens", le="0.01") == 0


def test_a_callable_source_is_read_on_every_scrape() -> None:
    current: list[Metrics | None] = [None]
    collector = MetricsCollector(lambda: current[0])
    assert [k for k in scraped(collector) if k[0] == "anonjoin_joins_total"] == []  # nothing yet
    for joins in (1, 3):
        m = Metrics(guests=3)
        for n in range(joins):
            m.guest_started(0.0)
            m.guest_joined(f"g{n}", 0.1, 0.0)
        current[0] = m
        assert value(scraped(collector), "anonjoin_joins_total") == joins


def test_describe_names_the_families_so_a_registry_refuses_duplicates() -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MetricsCollector(Metrics()))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(MetricsCollector(lambda: None))


@pytest.mark.parametrize("buckets", [(), (1.0, 0.5), (0.0, 1.0), (1.0, 1.0)])
def test_bad_buckets_are_refused(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ConfigurationError, match="buckets"):
        MetricsCollector(Metrics(), buckets=buckets)


def test_a_long_reason_becomes_a_clipped_label() -> None:
    m = Metrics(guests=1)
    m.guest_final("g", "failed", "x" * 500)
    (reason,) = by_label(scraped(MetricsCollector(m)), "anonjoin_join_failures_total", "reason")
    assert len(reason) == 120 and reason.endswith("...")


# ---- serve_metrics during a run ----------------------------------------------------------------------


class Watched(Metrics):
    """Metrics that say when every guest has settled its first join (joined or failed)."""

    def __init__(self, guests: int) -> None:
        super().__init__(guests=guests)
        self.settled = asyncio.Event()

    def _check(self) -> None:
        if self.first_joins + self.join_failures >= self.guests:
            self.settled.set()

    def guest_joined(self, guest_id: str, latency_s: float, lobby_s: float) -> None:
        super().guest_joined(guest_id, latency_s, lobby_s)
        self._check()

    def guest_join_failed(self, guest_id: str, *, cancelled: bool = False) -> None:
        super().guest_join_failed(guest_id, cancelled=cancelled)
        self._check()


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(await resp.text())


async def test_scrapes_during_and_at_the_end_of_a_run_match_the_report(
    sim_factory: Callable[..., Simulator],
) -> None:
    guests = 30
    faults = FaultProfile(rules=(FaultRule(route="invitations", kind="503", rate=0.4, retry_after=None),))
    policy = RetryPolicy(attempts=2, wait_initial=0.01, wait_max=0.02, jitter=0.0)
    runners: list[LoadRunner] = []
    async with sim_factory(faults=faults, seed=5) as sim, aiohttp.ClientSession() as session:
        info = sim.info
        metrics = Watched(guests)
        credential = ClientSecretCredential(
            authority=info.authority, client_id=info.client_id, client_secret=info.client_secret,
            scope=info.scope, ca_file=info.ca_file,
        )  # fmt: skip
        plan = LoadPlan(guests=guests, meeting_urls=(info.meeting_url,), origin=info.origin, hold_s=60)
        async with serve_metrics(metrics) as server:
            run = asyncio.create_task(
                run_load(
                    plan, discover_url=info.discover_url, endpoint_id=info.endpoint_id,
                    credential=credential, ca_file=info.ca_file, retry=policy,
                    rejoin=RejoinPolicy(enabled=False), metrics=metrics, on_runner=runners.append,
                )
            )  # fmt: skip
            try:
                async with asyncio.timeout(60):
                    await metrics.settled.wait()
                during = await scrape(session, server.url)
                (runner,) = runners
                runner.cancel()  # the held guests leave
                async with asyncio.timeout(60):
                    result = await run
                after = await scrape(session, server.url)
            finally:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                await credential.aclose()
        with pytest.raises(OSError):  # the listener is gone with the block
            await asyncio.open_connection(server.host, server.port)

    # during the run: every guest settled, the joined ones still in the meeting
    joins, failures = (
        value(during, "anonjoin_joins_total"),
        by_label(during, "anonjoin_join_failures_total", "reason"),
    )
    assert joins + sum(failures.values()) == guests
    assert 0 < joins < guests  # the profile fails some guests (seeded)
    assert value(during, "anonjoin_guests", state="joined_now") == joins

    report = build_report(result.metrics, result.guests, {}, started_at=result.started_at)
    assert value(after, "anonjoin_joins_total") == report["joined"] == joins
    assert (
        by_label(after, "anonjoin_join_failures_total", "reason") == report["failures_by_reason"] == failures
    )
    for state in ("failed", "ended", "cancelled"):
        assert value(after, "anonjoin_guests", state=state) == report[state]
    retries = {k: v for k, v in after.items() if k[0] == "anonjoin_retries_total"}
    assert sum(retries.values()) == sum(report["retries_by_reason"].values()) > 0
    assert by_label(after, "anonjoin_retries_total", "step") == report["retries_by_step"]
    assert by_label(after, "anonjoin_retries_total", "reason") == report["retries_by_reason"]
    assert value(after, "anonjoin_rejoins_total") == report["rejoins"]
    join_ms = report["latency"]["join"]
    assert value(after, "anonjoin_join_seconds_count") == join_ms["count"] == joins
    assert value(after, "anonjoin_join_seconds_sum") * 1000 / joins == pytest.approx(
        join_ms["mean_ms"], abs=1e-3
    )
    assert value(after, "anonjoin_join_seconds_bucket", le="+Inf") == joins
    counts = by_label(after, "anonjoin_step_seconds_count", "step")
    assert counts == {step: row["count"] for step, row in report["steps"].items() if row["count"]}
    assert by_label(after, "anonjoin_step_errors_total", "step") == {
        step: row["errors"] for step, row in report["steps"].items() if row["errors"]
    }


async def test_a_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(
            ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}: the port is in use"
        ):
            async with serve_metrics(Metrics(), port=port):
                pytest.fail("served on a port in use")


# ---- anonjoin load --metrics-port ---------------------------------------------------------------------


@pytest.mark.usefixtures("no_target_env")
async def test_load_serves_metrics_during_the_run_and_they_match_the_report(tmp_path: Path) -> None:
    guests = 20
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", "load", "--guests", str(guests), "--concurrency", str(guests),
        "--hold", "60", "--progress", "plain", "--progress-interval", "0.1", "--store", ":memory:",
        "--no-html", "--metrics-port", "0",
        cwd=tmp_path, env=clean_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    url = None
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as session:
            while True:  # the endpoint's line, then progress until every guest is in the meeting
                line = (await proc.stderr.readline()).decode()
                if not line:
                    pytest.fail("the run ended early: " + "".join(seen))
                seen.append(line)
                if "Prometheus metrics at " in line:
                    url = line.split("Prometheus metrics at ", 1)[1].strip()
                if url and f"arrived {guests}/{guests}  joined {guests}  in meeting {guests} " in line:
                    break
            during = await scrape(session, url)
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, "".join(seen) + err.decode()
    assert value(during, "anonjoin_joins_total") == guests
    assert value(during, "anonjoin_guests", state="joined_now") == guests
    report = json.loads((tmp_path / "anonjoin-report.json").read_text())
    assert report["joined"] == value(during, "anonjoin_joins_total")
    assert report["failed"] == sum(by_label(during, "anonjoin_join_failures_total", "reason").values()) == 0
    assert report["latency"]["join"]["count"] == value(during, "anonjoin_join_seconds_count")
    for step in ("anon_discover", "anon_applications", "invitations"):  # join-only steps: final at the scrape
        assert report["steps"][step]["count"] == value(during, "anonjoin_step_seconds_count", step=step)
    assert (
        sum(report["retries_by_reason"].values())
        == 0
        == sum(v for k, v in during.items() if k[0] == "anonjoin_retries_total")
    )
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    with pytest.raises(OSError):  # nothing is left listening
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.usefixtures("no_target_env")
def test_load_with_a_metrics_port_in_use_exits_2_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            ["load", "--guests", "2", "--progress", "off", "--store", ":memory:", "--metrics-port", str(port)]
        )
    err = capsys.readouterr().err
    assert code == 2
    error = err.strip().splitlines()[-1]  # the one line of the error, after the plan's
    assert error == f"anonjoin load: error: cannot serve metrics on 127.0.0.1:{port}: the port is in use"
    assert "Traceback" not in err
    assert not (tmp_path / "anonjoin-report.json").exists()


@pytest.mark.usefixtures("no_target_env")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metrics-port", "70000"], "--metrics-port: must be a port number 0..65535"),
        (["--metrics-port", "x"], "--metrics-port: must be a whole number >= 0"),
        (["--metrics-host", "0.0.0.0"], "--metrics-host needs --metrics-port"),
    ],
)
def test_bad_metrics_flags_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main(["load", "--guests", "1", "--progress", "off", "--store", ":memory:", *argv])
    except SystemExit as exc:
        code = int(str(exc.code))
    assert code == 2
    assert message in capsys.readouterr().err
