"""Every sub-command's ``--help``: a description, two or three examples at the end, every default shown;
errors stay one line."""

from __future__ import annotations

import argparse

import pytest

from anonjoin._cli import build_parser, main
from anonjoin._cli.common import Default, HelpFormatter


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


COMMANDS = sorted(_commands())


def test_the_commands_are_all_here() -> None:
    assert set(COMMANDS) >= {"simulate", "join", "load", "rejoin", "sessions", "doctor"}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_examples(command: str) -> None:
    parser = _commands()[command]
    assert parser.description, f"{command} has no description"
    text = parser.format_help()
    assert "\nexamples:\n" in text
    tail = text.split("\nexamples:\n", 1)[1].splitlines()
    runs = [line for line in tail if line.startswith(("  anonjoin ", "  ANONJOIN_"))]
    assert 2 <= len(runs) <= 3, tail
    assert all(f"anonjoin {command}" in line for line in runs)
    assert all(line.startswith("  ") for line in tail if line), "the examples are the end of the help"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command: str) -> None:
    parser = _commands()[command]
    formatter = parser._get_formatter()
    assert isinstance(formatter, HelpFormatter)
    for action in parser._actions:
        default = action.default.value if isinstance(action.default, Default) else action.default
        if not action.option_strings or default in (None, False, "", argparse.SUPPRESS):
            continue
        shown = formatter._expand_help(action)
        assert "default" in shown, f"{command} {action.option_strings[0]}: {shown!r}"
        if isinstance(default, int | float | str) and not isinstance(default, bool):
            value = f"{default:g}" if isinstance(default, float) else str(default)
            assert value in shown, f"{command} {action.option_strings[0]}: {value!r} not in {shown!r}"


def test_a_default_is_added_where_the_help_does_not_say_it() -> None:
    text = _commands()["load"].format_help()
    assert "progress display (default: auto)" in " ".join(text.split())
    assert "(default 300)" in text  # said by the help itself: not twice
    assert text.count("default 300") == 1


def test_a_bad_flag_is_still_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sessions", "--limit", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "see: anonjoin sessions --help" in err and "usage:" not in err
