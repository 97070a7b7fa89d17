"""``anonjoin load --workers N``, ``--shard K/S --start-at T`` and ``anonjoin merge``, as real processes.

Every subprocess is bounded (a watchdog kills it) and every worker process it started is killed at the
end of the test if it is still there; waits are on the event expected (a progress line, a log line, a
process's exit through its pidfd), never on a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from anonjoin._cli import build_parser, main
from anonjoin._exceptions import ConfigurationError

from support.runs import HELD, Run, exited, report_of, running
from support.simulator import ThreadedSim, threaded_sim

__all__ = ["threaded_sim"]  # a fixture, used by name
pytestmark = pytest.mark.usefixtures("no_target_env")  # no ANONJOIN_* target; cwd is tmp_path

# -- anonjoin load --workers -----------------------------------------------------------------------


def test_two_workers_against_the_embedded_simulator_join_every_guest_once(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    argv = ["load", "--workers", "2", "--guests", "300", "--hold", "0.2", "--progress", "plain",
            "--progress-interval", "1", "--store", str(store), "--report", "r.json",
            "--html", "r.html"]  # fmt: skip
    with running(tmp_path, argv) as run:
        code, out, err = run.finish()
    assert code == 0, err[-3000:]
    assert "in 2 worker processes" in err and "Traceback" not in err
    report = report_of(tmp_path / "r.json")
    assert (report["guests"], report["joined"], report["failed"], report["cancelled"]) == (300, 300, 0, 0)
    assert report["settings"]["workers"] == 2 and report["settings"]["shards"] == 2
    assert report["shards"] == {"count": 2, "missing": [], "reason": None}
    assert report["latency"]["join"]["count"] == 300
    check = report["service_check"]
    assert check["ok"] is True, check
    assert check["application_session_ids_seen"] == 300 and check["max_applications_per_guest"] == 1
    outcomes = report["guest_outcomes"]
    assert [g["guest_id"] for g in outcomes] == [f"guest-{n:04d}" for n in range(1, 301)]
    assert len({g["application_session_id"] for g in outcomes}) == 300
    assert "300/300 joined" in (tmp_path / "r.html").read_text()
    assert "300 guests: 300 joined" in out
    # The ids and outcomes are the parent's store's (the workers never open it).
    assert main(["sessions", "--store", str(store), "--json"]) == 0


def test_sessions_of_a_workers_run_are_in_the_parents_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "s.db"
    argv = ["load", "--workers", "2", "--guests", "20", "--hold", "0", "--progress", "off",
            "--store", str(store), "--no-html"]  # fmt: skip
    with running(tmp_path, argv) as run:
        code, _out, err = run.finish()
    assert code == 0, err[-3000:]
    report = report_of(tmp_path / "anonjoin-report.json")
    assert main(["sessions", "--store", str(store), "--json"]) == 0
    sessions = json.loads(capsys.readouterr().out)
    assert {s["guest_id"]: s["application_session_id"] for s in sessions} == {
        g["guest_id"]: g["application_session_id"] for g in report["guest_outcomes"]
    }
    assert {s["last_outcome"] for s in sessions} == {"joined"}


def test_sigterm_stops_every_worker_guests_leave_and_every_guest_is_accounted(tmp_path: Path) -> None:
    with running(tmp_path, ["load", "--workers", "2", "--guests", "40", "--store", ":memory:", *HELD]) as run:
        run.wait_for("arrived 40/40  joined 40  ")
        run.proc.send_signal(signal.SIGTERM)
        code, out, err = run.finish()
    assert code == 143, err[-3000:]
    assert "SIGTERM: stopping" in err and "Traceback" not in err
    report = report_of(tmp_path / "anonjoin-report.json")
    assert report["interrupted"] is True
    assert report["guests"] == 40 and report["joined"] == 40
    assert len({g["guest_id"] for g in report["guest_outcomes"]}) == 40
    assert report["service_check"]["live_applications_at_end"] == 0  # every guest left
    assert report["service_check"]["ok"] is True
    assert "40 guests: 40 joined" in out


def test_ctrl_c_at_the_terminal_reaches_every_process_and_loses_no_shard(tmp_path: Path) -> None:
    """A terminal's Ctrl-C is a SIGINT to the whole process group: parent and workers alike."""
    argv = ["load", "--workers", "2", "--guests", "20", "--store", ":memory:", *HELD]
    with running(tmp_path, argv, new_session=True) as run:
        run.wait_for("arrived 20/20  joined 20  ")
        os.killpg(run.proc.pid, signal.SIGINT)
        code, _out, err = run.finish()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    report = report_of(tmp_path / "anonjoin-report.json")
    assert report["shards"]["missing"] == [] and report["joined"] == 20
    assert report["service_check"]["live_applications_at_end"] == 0


def test_a_killed_worker_is_a_lost_range_and_the_rest_merge(tmp_path: Path) -> None:
    argv = ["load", "--workers", "2", "--guests", "40", "--store", ":memory:", "-v", *HELD]
    with running(tmp_path, argv) as run:
        run.wait_for("anonjoin.workers.started")
        first, second = run.workers
        run.wait_for("arrived 40/40  joined 40  ")
        os.kill(first, signal.SIGKILL)  # shard 0's worker: guests 1, 3, 5, ...
        run.wait_for("anonjoin.workers.lost shard=0")
        assert not exited(second, 0)  # the other worker still runs
        run.proc.send_signal(signal.SIGTERM)
        code, out, err = run.finish()
        assert exited(second, 30)
    assert code == 143, err[-3000:]
    report = report_of(tmp_path / "anonjoin-report.json")
    assert report["shards"] == {"count": 2, "missing": [0], "reason": "worker lost"}
    assert report["guests"] == 40 and report["joined"] == 20 and report["cancelled"] == 20
    assert report["cancelled_by_reason"] == {"worker lost": 20}
    lost = [g for g in report["guest_outcomes"] if g["outcome"] == "cancelled"]
    assert [g["guest_id"] for g in lost] == [f"guest-{n:04d}" for n in range(1, 41, 2)]
    assert all(g["application_session_id"] for g in lost)  # the ids the parent gave them
    assert any("shard 0/2 (worker lost)" in w for w in report["warnings"])
    # The lost worker's guests never left: the simulator's own record says so.
    assert report["service_check"]["live_applications_at_end"] == 20
    assert report["service_check"]["unknown_application_session_ids"] == 0
    assert "warning: no result from shard 0/2 (worker lost)" in out


def test_a_lost_worker_fails_the_run_that_ends_on_its_own(tmp_path: Path) -> None:
    argv = ["load", "--workers", "2", "--guests", "20", "--rate", "40", "--hold", "5", "--progress",
            "plain", "--progress-interval", "0.2", "--store", ":memory:", "--no-html", "-v"]  # fmt: skip
    with running(tmp_path, argv) as run:
        run.wait_for("anonjoin.workers.started")
        run.wait_for("arrived 20/20  joined 20  ")  # every guest holds for 5 s: shard 1 is still running
        os.kill(run.workers[1], signal.SIGKILL)
        code, _out, err = run.finish()
    assert code == 1, err[-3000:]
    assert "shard 1/2 lost (worker lost)" in err
    report = report_of(tmp_path / "anonjoin-report.json")
    assert report["interrupted"] is False
    assert (report["joined"], report["cancelled"]) == (10, 10)
    assert report["shards"]["missing"] == [1]


def test_no_worker_outlives_a_killed_parent(tmp_path: Path) -> None:
    argv = ["load", "--workers", "2", "--guests", "10", "--store", ":memory:", "-v", *HELD]
    with running(tmp_path, argv) as run:
        run.wait_for("anonjoin.workers.started")
        run.wait_for("arrived 10/10  joined 10  ")
        run.proc.kill()
        run.proc.communicate(timeout=30)
        from anonjoin._load.workers import ORPHAN_LEAVE_S

        for pid in run.workers:
            assert exited(pid, ORPHAN_LEAVE_S + 30), f"worker {pid} outlived its parent"


async def test_the_process_engine_runs_shards_for_an_embedder(tmp_path: Path) -> None:
    """``run_sharded`` with a :class:`ProcessEngine`: the library API behind ``--workers``."""
    from anonjoin import LoadPlan, MemorySessionStore, ProcessEngine, run_sharded
    from anonjoin._cli.common import simulator_settings
    from anonjoin._load.sharded import ShardProgress
    from anonjoin.simulator import Simulator, SimulatorConfig

    async with Simulator(SimulatorConfig(seed=4)) as sim:
        info = sim.info
        plan = LoadPlan(guests=12, meeting_urls=(info.meeting_url,), origin=info.origin, concurrency=4)
        live = ShardProgress(12, 2)
        store = MemorySessionStore()
        engine = ProcessEngine(2, progress_interval_s=0.1)
        merged = await run_sharded(
            plan,
            engine,
            target=simulator_settings(info, display_name="g"),
            store=store,
            shards=2,
            on_progress=live.update,
            start_slack_s=0.2,
        )
        assert len(engine.pids) == 2 and engine.errors == {}
        assert [g.outcome for g in merged.guests] == ["joined"] * 12
        assert merged.missing == [] and live.progress().joined == 12
        assert len(await store.list()) == 12
        assert sim.snapshot()["applications"]["live"] == 0
        for pid in engine.pids:
            assert exited(pid, 30)


# -- --shard K/S --start-at T, then anonjoin merge -------------------------------------------------


def test_two_shards_then_merge_count_as_two_workers(tmp_path: Path, threaded_sim: ThreadedSim) -> None:
    common = ["--guests", "60", "--concurrency", "10", "--rate", "30", "--hold", "0.2", "--progress", "off",
              *threaded_sim.flags()]  # fmt: skip
    with running(tmp_path, ["load", "--workers", "2", "--store", ":memory:", "--report", "w.json",
                            "--no-html", *common]) as run:  # fmt: skip
        code, _out, err = run.finish()
    assert code == 0, err[-3000:]
    workers = report_of(tmp_path / "w.json")

    start_at = f"{time.time() + 12:.3f}"  # both shards start before it (it bounds their start-up)
    shards = [
        Run(
            tmp_path,
            [
                "load",
                "--shard",
                f"{k}/2",
                "--start-at",
                start_at,
                "--store",
                f"s{k}.db",
                "--report",
                f"shard-{k}.json",
                *common,
            ],
        )
        for k in range(2)
    ]
    try:
        done = [s.finish() for s in shards]
    finally:
        for s in shards:
            s.close()
    for code, out, err in done:
        assert code == 0, err[-3000:]
        assert "shard result: shard-" in out
    for k in range(2):
        data = json.loads((tmp_path / f"shard-{k}.json").read_text())
        assert data["schema"] == "anonjoin.shard-result/1" and data["shard"] == {"index": k, "count": 2}
        assert abs(data["start_at"] - float(start_at)) < 1e-6
    assert not list(tmp_path.glob("*.html"))  # a shard writes no HTML

    argv = ["merge", "shard-0.json", "shard-1.json", "--report", "merged.json", "--html", "merged.html",
            "--fail-if", "joined < 60"]  # fmt: skip
    with running(tmp_path, argv) as run:
        code, out, err = run.finish()
    assert code == 0, err
    merged = report_of(tmp_path / "merged.json")
    keys = ("guests", "arrived", "joined", "failed", "ended", "cancelled")
    assert {k: merged[k] for k in keys} == {k: workers[k] for k in keys} == {
        "guests": 60, "arrived": 60, "joined": 60, "failed": 0, "ended": 0, "cancelled": 0,
    }  # fmt: skip
    assert merged["latency"]["join"]["count"] == workers["latency"]["join"]["count"] == 60
    assert [g["guest_id"] for g in merged["guest_outcomes"]] == [
        g["guest_id"] for g in workers["guest_outcomes"]
    ]
    assert merged["shards"] == {"count": 2, "missing": [], "reason": None}
    assert merged["fail_if"]["breached"] is False
    assert "60/60 joined" in (tmp_path / "merged.html").read_text()
    assert "60 guests: 60 joined" in out
    # Four runs of 60 guests against one simulator: each guest id thrice, each run with its own ids.
    assert threaded_sim.snapshot()["applications"]["live"] == 0

    _merge_refusals(tmp_path)


def _merge_refusals(tmp_path: Path) -> None:
    def merge(*argv: str) -> tuple[int, str]:
        with running(tmp_path, ["merge", *argv, "--no-html"]) as run:
            code, _out, err = run.finish()
        assert "Traceback" not in err
        return code, err

    code, err = merge("shard-0.json", "shard-0.json", "--report", "x.json")
    assert code == 2 and "given twice" in err
    code, err = merge("shard-0.json", "shard-1.json", "--shards", "3", "--report", "x.json")
    assert code == 2 and "the run has 3 shards" in err
    code, err = merge("shard-0.json", "--report", "one.json")
    assert code == 1 and "shard 1/2 missing" in err
    one = report_of(tmp_path / "one.json")
    assert one["guests"] == 60 and one["joined"] == 30 and one["cancelled_by_reason"] == {"shard missing": 30}
    code, err = merge("shard-0.json", "shard-1.json", "--fail-if", "joined < 61", "--report", "x.json")
    assert code == 99 and "--fail-if breached" in err
    (tmp_path / "bad.json").write_text('{"schema": "something else"}')
    code, err = merge("bad.json", "--report", "x.json")
    assert code == 2 and "is not an anonjoin shard result" in err


# -- flags -----------------------------------------------------------------------------------------

TARGET = ["--discover-url", "https://127.0.0.1:1/platformservice/discover",
          "--authority", "https://127.0.0.1:1/t", "--client-id", "x", "--client-secret", "s3cret",
          "--endpoint-id", "sip:app@contoso.com", "--meeting-url", "https://127.0.0.1:1/x/ABC",
          "--origin", "https://app.example.com"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shard", "0/2", *TARGET], "--shard needs --start-at T"),
        (["--shard", "2/2", "--start-at", "+", *TARGET], "0 <= K < S (here 0/2 to 1/2)"),
        (["--shard", "zero", *TARGET], "write K/S"),
        (["--shard", "0/2", "--start-at", "1", *TARGET], "in the past"),
        (["--shard", "0/2", "--start-at", "tomorrow", *TARGET], "give Unix seconds"),
        (["--shard", "0/2", "--start-at", "+", "--meetings", "3", *TARGET], "does not create meetings"),
        (["--shard", "0/2", "--start-at", "+", "--fail-if", "joined < 1", *TARGET], "anonjoin merge"),
        (["--shard", "0/2", "--start-at", "+", "--workers", "2", *TARGET], "takes no --workers"),
        (["--shard", "0/2", "--start-at", "+"], "--shard needs a target"),
        (["--start-at", "+"], "applies to --shard K/S only"),
        (["--workers", "3", "--concurrency", "2"], "at least 3"),
    ],
)
def test_bad_sharding_flags_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    future = str(int(time.time()) + 600)
    argv = [future if a == "+" else a for a in argv]
    code = main(["load", "--progress", "off", "--store", ":memory:", "--no-html", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "s3cret" not in err and "Traceback" not in err


def test_start_at_takes_unix_seconds_and_iso_8601() -> None:
    from anonjoin._cli.load import parse_start_at

    now = 1_800_000_000.0
    assert parse_start_at("1800000030", now=now) == 1_800_000_030.0
    assert parse_start_at("2027-01-15T08:00:30Z", now=now) == 1_800_000_030.0
    assert parse_start_at("2027-01-15T08:00:30", now=now) == 1_800_000_030.0  # UTC unless it says
    assert parse_start_at("2027-01-15T09:00:30+01:00", now=now) == 1_800_000_030.0
    assert parse_start_at("1799999999", now=now) == 1_799_999_999.0  # within the tolerance
    with pytest.raises(ConfigurationError, match="in the past"):
        parse_start_at("1799999990", now=now)
    with pytest.raises(ConfigurationError, match="not a time"):
        parse_start_at("nan", now=now)


def test_workers_auto_is_the_usable_cores() -> None:
    ns = build_parser().parse_args(["load", "--workers", "auto"])
    assert ns.workers == len(os.sched_getaffinity(0))
    assert build_parser().parse_args(["load"]).workers == 1
