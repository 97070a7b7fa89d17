"""Bad input to ``anonjoin load``: one line saying what is wrong (one rule, one message), exit 2."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from anonjoin._cli import main
from anonjoin._load.report import MIN_RATE_PHASE_S, joins_per_s_text

pytestmark = pytest.mark.usefixtures("no_target_env")  # no ANONJOIN_* target; cwd is tmp_path


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--concurrency", "0"], "argument --concurrency: must be a whole number >= 1: '0'"),
        (["--concurrency", "-1"], "argument --concurrency: must be a whole number >= 1: '-1'"),
        (["--concurrency", "x"], "argument --concurrency: must be a whole number >= 1: 'x'"),
        (["--rate", "0"], "argument --rate: must be a finite number > 0: '0'"),
        (["--rate", "-3"], "argument --rate: must be a finite number > 0: '-3'"),
        (["--rate", "inf"], "argument --rate: must be a finite number > 0: 'inf'"),
        (["--guests", "0"], "argument --guests: must be a whole number >= 1: '0'"),
        (["--hold", "-1"], "argument --hold: must be a finite number >= 0: '-1'"),
    ],
)
def test_a_bad_number_is_one_line_stating_the_rule(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["load", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"anonjoin load: error: {line}; see: anonjoin load --help\n"


def test_no_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("; see: anonjoin --help\n")
    assert len(err.splitlines()) == 1


def test_a_one_guest_run_says_guest_and_gives_no_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["load", "--guests", "1", "--store", ":memory:", "--progress", "off"]) == 0
    captured = capsys.readouterr()
    assert "anonjoin load: 1 guest, " in captured.err
    assert "anonjoin load: 1 guest: 1 joined" in captured.out
    assert "  n/a joins/s " in captured.out  # one join over a few ms has no rate
    report = json.loads((tmp_path / "anonjoin-report.json").read_text())
    assert report["join_phase_s"] < MIN_RATE_PHASE_S
    assert joins_per_s_text(report) == "n/a"
    assert joins_per_s_text({"join_phase_s": 2.0, "joins_per_s": 41.04}) == "41.0"
    assert "n/a" in (tmp_path / "anonjoin-report.html").read_text()


def test_store_in_a_missing_directory_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nonexistent" / "dir"
    assert main(["load", "--guests", "1", "--store", str(missing / "s.db"), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert f"the directory {missing} does not exist" in err
    assert len(err.strip().splitlines()) == 1, err
    assert not missing.parent.exists()  # not created
    assert not (tmp_path / "anonjoin-report.json").exists()  # refused before the run


def test_store_that_cannot_be_written_is_refused_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")  # another process writing: this run could never store a session
        assert main(["load", "--guests", "1", "--store", str(path), "--progress", "off"]) == 2
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert f"--store {path}: cannot write to it: database is locked" in err
    assert not (tmp_path / "anonjoin-report.json").exists()
    assert main(["load", "--guests", "1", "--store", str(tmp_path), "--progress", "off"]) == 2
    assert "is a directory" in capsys.readouterr().err
