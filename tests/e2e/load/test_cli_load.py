"""``anonjoin load``, ``rejoin`` and ``sessions`` end to end (the embedded simulator, or one in a thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from anonjoin._cli import main
from anonjoin._exceptions import ConfigurationError
from anonjoin.simulator import Simulator

from support.faults import QUICK_CHAOS
from support.simulator import ThreadedSim, threaded_sim

__all__ = ["threaded_sim"]  # a fixture, used by name

pytestmark = pytest.mark.usefixtures("no_target_env")


def test_load_against_the_embedded_simulator_writes_both_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["load", "--guests", "100", "--concurrency", "25", "--hold", "0.2", "--progress", "plain",
         "--store", str(tmp_path / "s.db"), "--report", "out/r.json", "--html", "out/r.html"]
    )  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    assert (report["guests"], report["joined"], report["failed"]) == (100, 100, 0)
    assert report["settings"]["target"].startswith("embedded simulator")
    assert report["settings"]["meetings"] == 4
    assert len(report["meetings"]) == 4
    assert "client_secret" not in json.dumps(report)
    assert report["service_check"]["ok"] is True
    assert report["service_check"]["application_session_ids_seen"] == 100
    html = (tmp_path / "out" / "r.html").read_text()
    assert "<svg" in html and "100/100 joined" in html
    assert "100 guests: 100 joined" in out.out
    assert "Traceback" not in out.err
    assert main(["sessions", "--store", str(tmp_path / "s.db"), "--json"]) == 0
    sessions = json.loads(capsys.readouterr().out)
    assert len(sessions) == 100 and {s["last_outcome"] for s in sessions} == {"joined"}


def test_default_report_files_in_the_cwd(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", "--guests", "3", "--hold", "0", "--progress", "off"]) == 0
    assert (tmp_path / "anonjoin-report.json").is_file() and (tmp_path / "anonjoin-report.html").is_file()
    assert (tmp_path / "state" / "anonjoin" / "sessions.db").is_file()  # the default store


def test_fail_if_breach_exits_99(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["load", "--guests", "5", "--hold", "0", "--progress", "off", "--store", ":memory:",
         "--fail-if", "joined < 1000 or p99(join) > 10s", "--no-html"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 99
    assert "--fail-if breached: joined=5 < 1000" in err
    report = json.loads((tmp_path / "anonjoin-report.json").read_text())
    assert report["fail_if"]["breached"] is True
    assert not (tmp_path / "anonjoin-report.html").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fail-if", "p95(join) > 2000"], "give '2000' a unit"),
        (["--fail-if", ""], "--fail-if: the expression is empty"),
        (["--fail-if", "success_rate < 99"], "write 0.99 or 99%"),
        (["--ramp", "fast"], "--ramp 'fast'"),
        (["--faults", "nope"], "unknown fault profile"),
        (["--report", "/dev/null/sub/r.json"], "is not a directory"),
        (
            ["--discover-url", "https://load.example.com/platformservice/discover", "--guests", "51"],
            "refusing",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = [
        "--authority", "https://login.example.com/contoso.com", "--client-id", "x",
        "--client-secret", "s3cret", "--endpoint-id", "sip:app@contoso.com", "--meeting-url", "https://meet.example.com/x/ABC",
        "--origin", "https://app.example.com",
    ] if "--discover-url" in argv else []  # fmt: skip
    code = main(["load", "--progress", "off", "--store", ":memory:", *argv, *target])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "s3cret" not in err


def test_rate_and_ramp_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["load", "--rate", "5", "--ramp", "1..2/3"])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_rejoin_after_a_restart_reuses_the_id(
    threaded_sim: ThreadedSim, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "s.db")
    flags = threaded_sim.flags()
    assert main(["load", "--guests", "3", "--hold", "0", "--progress", "off", "--store", db, *flags]) == 0
    capsys.readouterr()
    assert main(["rejoin", "--guest", "guest-0002", "--store", db, "--json", *flags]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["outcome"] == "joined"
    asi = out["application_session_id"]
    assert threaded_sim.snapshot()["applications"]["created_by_asi"][asi] == 2
    assert main(["sessions", "--store", db]) == 0
    table = capsys.readouterr().out
    assert "guest-0001" in table and asi in table
    assert main(["sessions", "--store", db, "--json"]) == 0
    rows = {r["guest_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["guest-0002"]["rejoins"] == 1 and rows["guest-0002"]["application_session_id"] == asi
    assert threaded_sim.snapshot()["applications"]["live"] == 0


def test_rejoin_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "s.db")
    assert main(["rejoin", "--guest", "nobody", "--store", db]) == 2
    assert "no session for guest 'nobody'" in capsys.readouterr().err
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    assert main(["sessions", "--store", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "StoreError" in err and "corrupt" in err and len(err.strip().splitlines()) == 1


def test_ctrl_c_mid_run_writes_the_report(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "anonjoin", "load", "--guests", "300", "--rate", "40", "--concurrency", "10",
         "--hold", "60", "--progress", "plain", "--progress-interval", "0.2", "--store", ":memory:"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("[") and int(line.split("  joined ")[1].split()[0]) >= 5:
                break
        else:
            pytest.fail("no progress: " + "".join(seen))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    err = "".join(seen) + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "stopping" in err
    report = json.loads((tmp_path / "anonjoin-report.json").read_text())
    assert report["interrupted"] is True
    assert report["joined"] >= 5
    assert report["joined"] + report["cancelled"] == report["guests"] == 300
    assert len(report["guest_outcomes"]) == 300
    assert (tmp_path / "anonjoin-report.html").is_file()
    assert "300 guests:" in out


def test_load_with_a_fault_file_accounts_for_every_guest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(QUICK_CHAOS.model_dump_json())
    code = main(
        ["load", "--guests", "40", "--concurrency", "20", "--hold", "1.5", "--faults", str(faults),
         "--meetings", "3", "--progress", "off", "--store", ":memory:", "--no-html"]
    )  # fmt: skip
    capsys.readouterr()
    assert code == 0
    report = json.loads((tmp_path / "anonjoin-report.json").read_text())
    assert report["settings"]["faults"] == str(faults)
    assert report["joined"] + report["failed"] + report["ended"] + report["cancelled"] == 40
    assert len({g["guest_id"] for g in report["guest_outcomes"]}) == 40
    assert all(g["reason"] for g in report["guest_outcomes"] if g["outcome"] != "joined")
    assert sum(report["retries_by_reason"].values()) > 0
    check = report["service_check"]
    assert check["unknown_application_session_ids"] == 0
    assert check["duplicate_roster_entries"] == 0
    assert check["rejoined_guests"] > 0
    assert check["rejoined_guests_with_the_same_id"] == check["rejoined_guests"]
    assert check["faults_injected"]


def test_no_secret_in_anything_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["load", "--guests", "5", "--hold", "0", "--progress", "plain", "--store", ":memory:", "-v"])
    out = capsys.readouterr()
    assert code == 0
    written = out.out + out.err
    written += (tmp_path / "anonjoin-report.json").read_text() + (
        tmp_path / "anonjoin-report.html"
    ).read_text()
    assert "anonjoin.step.end" in out.err  # DEBUG logging was on
    for needle in ("sim-secret-not-for-production", "psat=", "psat%3d", "psat%253d", "eyJ"):
        assert needle not in written, needle


def test_reading_commands_do_not_create_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope" / "s.db"
    assert main(["sessions", "--store", str(missing)]) == 0
    assert "0 session(s)" in capsys.readouterr().out
    assert main(["rejoin", "--guest", "g", "--store", str(missing)]) == 2
    assert not missing.exists() and not missing.parent.exists()


def _sim_flags(info: dict[str, Any]) -> list[str]:
    return [
        "--discover-url", info["discover_url"], "--authority", info["authority"],
        "--client-id", info["client_id"], "--client-secret", info["client_secret"],
        "--endpoint-id", info["endpoint_id"],
        "--meeting-url", info["meeting_url"], "--origin", info["origin"], "--ca-file", info["ca_file"],
        "--scope", info["scope"],
    ]  # fmt: skip


@pytest.fixture
def simulate_process() -> Iterator[dict[str, Any]]:
    """``anonjoin simulate`` as a subprocess on 127.0.0.1: its JSON line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "anonjoin", "simulate", "--seed", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the simulator prints its line when it serves (or exits)
        assert line, "anonjoin simulate exited without its JSON line"
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def test_guard_judges_the_hosts_contacted_not_the_meeting_url(
    simulate_process: dict[str, Any], tmp_path: Path
) -> None:
    info = simulate_process
    assert ".invalid/" in info["meeting_url"]  # a host no request goes to
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    run = subprocess.run(
        [sys.executable, "-m", "anonjoin", "load", "--guests", "60", "--concurrency", "20",
         "--progress", "off", "--store", ":memory:", "--no-html", "--report", str(tmp_path / "r.json"),
         *_sim_flags(info)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "refusing" not in run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["guests"] == report["joined"] == 60


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--authority", "https://login.example.com/contoso.com"),
     ("--discover-url", "https://load.example.com/platformservice/discover")],
)  # fmt: skip
def test_guard_refuses_a_remote_authority_or_discover_before_any_request(
    threaded_sim: ThreadedSim, flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = threaded_sim.flags()
    flags[flags.index(flag) + 1] = value
    code = main(["load", "--guests", "51", "--progress", "off", "--store", ":memory:", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "refusing" in err and str(urlsplit(value).hostname) in err
    assert threaded_sim.snapshot()["requests"] == {}  # nothing sent, not even for a token


async def test_guard_sees_the_links_of_the_service_before_any_guest(sim: Simulator) -> None:
    from anonjoin._async.auth import ClientSecretCredential
    from anonjoin._load.runner import LoadPlan, run_load

    seen: list[str] = []

    def refuse(urls: Sequence[str]) -> None:
        seen.extend(urls)
        raise ConfigurationError("refused")

    i = sim.info
    credential = ClientSecretCredential(
        authority=i.authority,
        client_id=i.client_id,
        client_secret=i.client_secret,
        scope=i.scope,
        ca_file=i.ca_file,
    )
    plan = LoadPlan(guests=60, meeting_urls=(i.meeting_url,), origin=i.origin, concurrency=5)
    try:
        with pytest.raises(ConfigurationError):
            await run_load(plan, discover_url=i.discover_url, endpoint_id=i.endpoint_id,
                           credential=credential, ca_file=i.ca_file, meetings=3,
                           check_links=refuse)  # fmt: skip
    finally:
        await credential.aclose()
    assert any("/applications" in u for u in seen) and any("anonApplicationTokens" in u for u in seen)
    state = sim.snapshot()
    assert state["applications"]["created"] == 0 and len(state["meetings"]) == 1
