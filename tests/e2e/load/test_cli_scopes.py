"""``--run-id``: the store keeps each run's guests apart per target; ``rejoin`` and ``sessions`` scope too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anonjoin._cli import main

from support.simulator import ThreadedSim

pytestmark = pytest.mark.usefixtures("no_target_env")


@pytest.fixture
def two_sims() -> Iterator[tuple[ThreadedSim, ThreadedSim]]:
    one = ThreadedSim()
    try:
        two = ThreadedSim()
        try:
            yield one, two
        finally:
            two.close()
    finally:
        one.close()


def _load(db: str, report: Path, flags: list[str], *more: str) -> dict[str, Any]:
    argv = ["load", "--guests", "3", "--hold", "0", "--progress", "off", "--no-html", "--store", db]
    assert main([*argv, "--report", str(report), *flags, *more]) == 0
    settings: dict[str, Any] = json.loads(report.read_text())["settings"]
    return settings


def _ids(db: str, capsys: pytest.CaptureFixture[str], run_id: str, discover_url: str) -> list[str]:
    capsys.readouterr()
    assert main(["sessions", "--store", db, "--json", "--run-id", run_id]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run_id"] for r in rows} <= {run_id}
    return [r["application_session_id"] for r in rows if r["target"].startswith(discover_url + " ")]


def test_runs_and_targets_do_not_share_ids_and_a_run_id_resumes(
    two_sims: tuple[ThreadedSim, ThreadedSim], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = two_sims
    db = str(tmp_path / "s.db")
    report = tmp_path / "r.json"
    assert _load(db, report, a.flags(), "--run-id", "r1")["run_id"] == "r1"
    assert "run id r1" in capsys.readouterr().err
    _load(db, report, b.flags(), "--run-id", "r1")
    on_a, on_b = _ids(db, capsys, "r1", a.info.discover_url), _ids(db, capsys, "r1", b.info.discover_url)
    assert len(on_a) == len(on_b) == 3 and not set(on_a) & set(on_b)  # two targets: different ids

    _load(db, report, a.flags(), "--run-id", "r1")  # resumed: the same guests, the same ids
    assert _ids(db, capsys, "r1", a.info.discover_url) == on_a
    assert sum(a.snapshot()["applications"]["created_by_asi"][asi] for asi in on_a) == 6

    fresh = [_load(db, report, a.flags())["run_id"] for _ in range(2)]  # no --run-id: a new run each time
    assert fresh[0] != fresh[1] and "r1" not in fresh
    assert f"run id {fresh[1]}" in capsys.readouterr().err
    firsts = [_ids(db, capsys, run, a.info.discover_url) for run in fresh]
    assert not set(firsts[0]) & set(firsts[1]) and not (set(firsts[0]) | set(firsts[1])) & set(on_a)

    assert main(["sessions", "--store", db]) == 0
    table = capsys.readouterr().out
    assert "run" in table and "target" in table and fresh[0] in table and "r1" in table
    assert "12 session(s)" in table

    # guest-0002 is in three runs against a: rejoin must be told which, in one line naming them.
    assert main(["rejoin", "--guest", "guest-0002", "--store", db, *a.flags()]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--run-id" in err
    assert "3 runs" in err and all(run in err for run in ("r1", *fresh))
    rejoin = ["rejoin", "--guest", "guest-0002", "--store", db]
    assert main([*rejoin, "--run-id", "r1", "--json", *b.flags()]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["outcome"], out["run_id"]) == ("joined", "r1")
    assert out["application_session_id"] == _ids(db, capsys, "r1", b.info.discover_url)[1]
    assert main(["rejoin", "--guest", "guest-0002", "--run-id", "nope", "--store", db, *a.flags()]) == 2
    assert "no session for guest 'guest-0002' of run nope" in capsys.readouterr().err


def test_concurrent_runs_without_a_run_id_share_no_id(
    two_sims: tuple[ThreadedSim, ThreadedSim], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two ``anonjoin load`` processes at once, one target, one SQLite store, no --run-id."""
    sim = two_sims[0]
    db = str(tmp_path / "s.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANONJOIN_")}
    argv = [sys.executable, "-m", "anonjoin", "load", "--guests", "20", "--hold", "0.5", "--progress", "off",
            "--no-html", "--store", db, *sim.flags()]  # fmt: skip
    procs = [
        subprocess.Popen(
            [*argv, "--report", f"r{n}.json"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], errs
    runs = [json.loads((tmp_path / f"r{n}.json").read_text())["settings"]["run_id"] for n in range(2)]
    assert runs[0] != runs[1]
    ids = [_ids(db, capsys, run, sim.info.discover_url) for run in runs]
    assert len(ids[0]) == len(ids[1]) == 20 and not set(ids[0]) & set(ids[1])
    created = sim.snapshot()["applications"]["created_by_asi"]
    assert all(created[asi] == 1 for asi in ids[0] + ids[1])


def test_a_bad_run_id_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["load", "--run-id", "no spaces", "--store", ":memory:"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--run-id" in err and "letters, digits" in err
