"""Bad input to ``anonjoin load``: one line saying what is wrong (one rule, one message), exit 2."""

from __future__ import annotations

import pytest

from anonjoin._cli import main


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
