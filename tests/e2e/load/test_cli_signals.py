"""``anonjoin load`` stopped by a signal while guests are held: guests leave, both reports are written, and
the exit code is 128 + the signal (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.simulator import ThreadedSim, threaded_sim

__all__ = ["threaded_sim"]  # a fixture, used by name
pytestmark = pytest.mark.usefixtures("no_target_env")  # no ANONJOIN_* target; cwd is tmp_path

GUESTS = 5


def _start(tmp_path: Path, flags: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    return subprocess.Popen(
        [sys.executable, "-m", "anonjoin", "load", *flags, "--guests", str(GUESTS), "--rate", "50",
         "--hold", "60", "--progress", "plain", "--progress-interval", "0.1", "--store", ":memory:"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(proc: subprocess.Popen[str], seen: list[str], wanted: str) -> None:
    """Read stderr until a line contains ``wanted`` (the subprocess's own timeouts bound this)."""
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if wanted in line:
            return
    pytest.fail(f"never saw {wanted!r}: " + "".join(seen)[-3000:])


def _finish(proc: subprocess.Popen[str], seen: list[str]) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out, "".join(seen) + err


def _reports(tmp_path: Path) -> dict[str, object]:
    report: dict[str, object] = json.loads((tmp_path / "anonjoin-report.json").read_text())
    html = (tmp_path / "anonjoin-report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "</html>" in html
    return report


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_while_holding_leaves_writes_both_reports_and_exits_128_plus_signal(
    tmp_path: Path, threaded_sim: ThreadedSim, sig: signal.Signals, code: int
) -> None:
    proc = _start(tmp_path, threaded_sim.flags())
    seen: list[str] = []
    try:
        _wait_for(proc, seen, f"holding  arrived {GUESTS}/{GUESTS}  joined {GUESTS}  ")
        assert threaded_sim.snapshot()["applications"]["live"] == GUESTS
        proc.send_signal(sig)
    finally:
        out, err = _finish(proc, seen)
    assert proc.returncode == code, err
    assert f"{GUESTS} guests:" in out  # the summary
    assert "Traceback" not in err
    assert f"{sig.name}: stopping" in err
    report = _reports(tmp_path)
    assert report["interrupted"] is True
    assert report["joined"] == GUESTS
    assert threaded_sim.snapshot()["applications"]["live"] == 0  # every guest left (DELETE)


def test_a_second_ctrl_c_still_writes_both_reports(tmp_path: Path, threaded_sim: ThreadedSim) -> None:
    proc = _start(tmp_path, threaded_sim.flags())
    seen: list[str] = []
    try:
        _wait_for(proc, seen, f"holding  arrived {GUESTS}/{GUESTS}  joined {GUESTS}  ")
        proc.send_signal(signal.SIGINT)
        _wait_for(proc, seen, "SIGINT: stopping")
        proc.send_signal(signal.SIGINT)
    finally:
        out, err = _finish(proc, seen)
    assert proc.returncode == 130, err
    assert f"{GUESTS} guests:" in out
    assert "Traceback" not in err
    report = _reports(tmp_path)
    assert report["interrupted"] is True
    assert report["joined"] == GUESTS


def test_ctrl_c_while_the_reports_are_written_does_not_lose_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The window a second Ctrl-C used to hit: the loop's handlers are gone, the reports not yet written."""
    from anonjoin._cli import main
    from anonjoin._load import report as _report

    real_write_json = _report.write_json

    def interrupted_write_json(path: Path, report: dict[str, object]) -> Path:
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread before this returns
        return real_write_json(path, report)

    monkeypatch.setattr(_report, "write_json", interrupted_write_json)
    code = main(["load", "--guests", "2", "--store", ":memory:", "--progress", "off"])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "SIGINT: already stopping; the report is written first" in err
    _reports(tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored afterwards
