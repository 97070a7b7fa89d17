"""``anonjoin load``'s run settings from the ``--config`` file and ``ANONJOIN_*``: flags over the environment
over the file over the defaults, as for the target; a wrong type or an unknown key is one line, exit 2."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from anonjoin._cli import build_parser, main
from anonjoin._cli.common import Default, resolve_run_settings
from anonjoin._core.constants import RUN_FIELDS

pytestmark = pytest.mark.usefixtures("no_target_env")


def _toml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _resolved(*argv: str) -> argparse.Namespace:
    return resolve_run_settings(build_parser().parse_args(["load", *argv]))


def test_every_run_setting_is_a_load_flag_and_nothing_is_left_unresolved() -> None:
    ns = _resolved()
    assert set(RUN_FIELDS) <= set(vars(ns))
    assert not [k for k, v in vars(ns).items() if isinstance(v, Default)]
    assert (ns.guests, ns.concurrency, ns.hold, ns.report, ns.no_html) == (
        300,
        50,
        5.0,
        "anonjoin-report.json",
        False,
    )


def test_flags_over_environment_over_file_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _toml(
        tmp_path / "run.toml",
        'guests = 40\nconcurrency = 7\nhold = 1.5\nramp = "1..5/2m"\nfail-if = "p95(join)>2s"\n'
        'no_html = true\nprogress = "plain"\nrun_id = "nightly"\n',
    )
    ns = _resolved("--config", cfg)
    assert (ns.guests, ns.concurrency, ns.hold, ns.ramp, ns.rate) == (40, 7, 1.5, "1..5/2m", None)
    assert (ns.fail_if, ns.no_html, ns.progress, ns.run_id) == ("p95(join)>2s", True, "plain", "nightly")
    monkeypatch.setenv("ANONJOIN_GUESTS", "30")
    monkeypatch.setenv("ANONJOIN_NO_HTML", "no")
    monkeypatch.setenv("ANONJOIN_RATE", "3")  # the environment's schedule wins over the file's ramp
    ns = _resolved("--config", cfg)
    assert (ns.guests, ns.no_html, ns.rate, ns.ramp, ns.concurrency) == (30, False, 3.0, None, 7)
    ns = _resolved("--config", cfg, "--guests", "20", "--ramp", "2..4/10s")  # flags win over both
    assert (ns.guests, ns.rate, ns.ramp) == (20, None, "2..4/10s")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('guests = "many"\n', "invalid setting guests: must be a whole number, not a string"),
        ("guests = true\n", "invalid setting guests: must be a whole number, not true/false"),
        ("concurrency = 0\n", "invalid setting concurrency: must be a whole number >= 1"),
        ("hold = -1\n", "invalid setting hold: must be a finite number >= 0"),
        ('no_html = "yes"\n', "invalid setting no_html: must be true or false, not a string"),
        ('progress = "fancy"\n', "invalid setting progress: must be one of auto, bar, plain, off"),
        ("report = 3\n", "invalid setting report: must be a string, not a whole number"),
        ('rate = 2\nramp = "1..2/3"\n', "rate and ramp are exclusive"),
        ("guestz = 3\n", "unknown setting 'guestz'"),
    ],
)
def test_a_bad_file_value_is_one_line_naming_the_key_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    cfg = _toml(tmp_path / "bad.toml", text)
    assert main(["load", "--config", cfg, "--store", ":memory:"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err and cfg in err and "Traceback" not in err


def test_a_bad_environment_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ANONJOIN_GUESTS", "lots")
    assert main(["load", "--store", ":memory:"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "invalid setting ANONJOIN_GUESTS: must be a whole number >= 1" in err
    )


def test_a_run_from_the_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _toml(
        tmp_path / "run.toml",
        'guests = 4\nconcurrency = 2\nhold = 0\nreport = "from-config.json"\nno_html = true\n'
        'progress = "off"\nstore = ":memory:"\nmeetings = 1\n',
    )
    assert main(["load", "--config", cfg]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "from-config.json").read_text())
    assert (report["guests"], report["joined"]) == (4, 4)
    assert (report["settings"]["concurrency"], report["settings"]["meetings"]) == (2, 1)
    assert report["settings"]["store"] == ":memory:"
    assert not (tmp_path / "anonjoin-report.html").exists()
