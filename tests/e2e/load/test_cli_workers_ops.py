"""``anonjoin load --workers N`` in operation: ``--metrics-port`` serves the merged view of the shards, and
the parent holds every guest's lease (a guest another instance holds is refused; ``rejoin`` of a guest of a
held run is refused). Real processes, bounded as in test_cli_workers; waits are on progress lines."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from pathlib import Path

import pytest

from anonjoin._cli import main
from anonjoin._load.sharded import LEASE_HELD
from anonjoin._load.store import SessionScope, SqliteSessionStore, in_scope

from support.prometheus import Samples, by_label, parse, value
from support.runs import HELD, report_of, running
from support.simulator import ThreadedSim, threaded_sim

__all__ = ["threaded_sim"]  # a fixture, used by name
pytestmark = pytest.mark.usefixtures("no_target_env")

LINES = 600
"""At most this many progress lines (0.2 s apart) for the merged view to catch up (states: every 1 s)."""


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse(response.read().decode())


def test_metrics_port_serves_the_merged_view_of_the_workers(tmp_path: Path) -> None:
    guests = 20
    argv = ["load", "--workers", "2", "--guests", str(guests), "--store", ":memory:", "--metrics-port", "0",
            *HELD]  # fmt: skip
    with running(tmp_path, argv) as run:
        line = run.wait_for("Prometheus metrics at ")
        url = line.split("Prometheus metrics at ", 1)[1].strip()
        run.wait_for(f"arrived {guests}/{guests}  joined {guests}  ")
        for _ in range(LINES):  # each shard's state comes every second: wait for the one with every join
            during = scrape(url)
            if value(during, "anonjoin_joins_total") == guests:
                break
            run.wait_for("arrived ")
        else:
            pytest.fail(f"the merged view never showed {guests} joins")
        run.proc.send_signal(signal.SIGINT)
        code, _out, err = run.finish()
    assert code == 130, err[-3000:]
    assert value(during, "anonjoin_guests_planned") == guests
    assert value(during, "anonjoin_guests", state="joined_now") == guests
    report = report_of(tmp_path / "anonjoin-report.json")
    assert report["joined"] == value(during, "anonjoin_joins_total")
    assert report["failed"] == sum(by_label(during, "anonjoin_join_failures_total", "reason").values()) == 0
    assert report["latency"]["join"]["count"] == value(during, "anonjoin_join_seconds_count")
    for step in ("anon_discover", "anon_applications", "invitations"):  # join-only steps: final at the scrape
        assert report["steps"][step]["count"] == value(during, "anonjoin_step_seconds_count", step=step)


def _scoped(threaded_sim: ThreadedSim, db: Path, run_id: str) -> SqliteSessionStore:
    info = threaded_sim.info
    scope = SessionScope.for_target(
        discover_url=info.discover_url,
        endpoint_id=info.endpoint_id,
        meeting_url=info.meeting_url,
        run_id=run_id,
    )
    return in_scope(SqliteSessionStore(db), scope)  # type: ignore[return-value]


def test_a_guest_another_instance_holds_is_refused_by_a_workers_run(
    tmp_path: Path, threaded_sim: ThreadedSim
) -> None:
    db = tmp_path / "s.db"

    async def hold() -> tuple[SqliteSessionStore, object]:
        store = _scoped(threaded_sim, db, "held1")
        return store, await store.take("guest-0003", 120.0)

    loop = asyncio.new_event_loop()
    try:
        store, lease = loop.run_until_complete(hold())
        argv = ["load", "--workers", "2", "--guests", "10", "--hold", "0", "--progress", "off", "--no-html",
                "--store", str(db), "--run-id", "held1", *threaded_sim.flags()]  # fmt: skip
        with running(tmp_path, argv) as run:
            _code, _out, err = run.finish()
        loop.run_until_complete(lease.release())  # type: ignore[attr-defined]
        loop.run_until_complete(store.aclose())
    finally:
        loop.close()
    report = report_of(tmp_path / "anonjoin-report.json")
    assert (report["joined"], report["failed"]) == (9, 1), err[-3000:]
    refused = [g for g in report["guest_outcomes"] if g["outcome"] == "failed"]
    assert [(g["guest_id"], g["reason"]) for g in refused] == [("guest-0003", LEASE_HELD)]
    assert len(threaded_sim.snapshot()["applications"]["created_by_asi"]) == 9  # none for the held guest


def test_rejoin_of_a_guest_of_a_held_workers_run_is_refused(
    tmp_path: Path, threaded_sim: ThreadedSim, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "s.db")
    argv = ["load", "--workers", "2", "--guests", "10", "--store", db, "--run-id", "held2", *HELD,
            *threaded_sim.flags()]  # fmt: skip
    with running(tmp_path, argv) as run:
        run.wait_for("arrived 10/10  joined 10  ")
        code = main(["rejoin", "--guest", "guest-0002", "--store", db, "--run-id", "held2", "--json",
                     *threaded_sim.flags()])  # fmt: skip
        err = capsys.readouterr().err
        run.proc.send_signal(signal.SIGINT)
        run_code, _out, run_err = run.finish()
    assert code != 0 and "held by another instance" in err, err
    assert run_code == 130, run_err[-3000:]
    report = report_of(tmp_path / "anonjoin-report.json")
    assert report["joined"] == 10
    # the run released its leases at the end: the guest can be rejoined now
    assert main(["rejoin", "--guest", "guest-0002", "--store", db, "--run-id", "held2", "--json",
                 "--hold", "0", *threaded_sim.flags()]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["outcome"] == "joined"
