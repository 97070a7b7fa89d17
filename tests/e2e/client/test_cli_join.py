"""``anonjoin join`` in-process: the embedded simulator, a simulator as the target, every way to fail."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from anonjoin._cli import build_parser, main
from anonjoin._cli import join as _cli_join
from anonjoin.simulator import Simulator

JSON_KEYS = {
    "outcome",
    "reason",
    "target",
    "guest_id",
    "application_session_id",
    "conference_id",
    "join_ms",
    "steps_ms",
    "attempts",
    "retries",
    "rejoins",
    "held_s",
    "total_ms",
}
JOIN_STEPS = {
    "aad_token",
    "discover",
    "applications",
    "capabilities",
    "anon_tokens",
    "anon_discover",
    "anon_applications",
    "invitations",
    "events",
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("ANONJOIN_"):
            monkeypatch.delenv(name)


def target_flags(sim: Simulator, *, secret: bool = True, **overrides: str) -> list[str]:
    info = sim.info
    values = {
        "discover-url": info.discover_url,
        "authority": info.authority,
        "client-id": info.client_id,
        "endpoint-id": info.endpoint_id,
        "meeting-url": info.meeting_url,
        "origin": info.origin,
        "ca-file": info.ca_file,
        "display-name": "CLI Guest",
    }
    if secret:
        values["client-secret"] = info.client_secret
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    flags: list[str] = []
    for name, value in values.items():
        flags += [f"--{name}", value]
    return flags


async def run_cli(argv: list[str]) -> int:
    """main() runs its own event loop: give it a thread, so the simulator keeps serving on ours."""
    return await asyncio.to_thread(main, ["join", *argv])


def one_json(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    data = json.loads(lines[0])
    assert isinstance(data, dict)
    assert set(data) == JSON_KEYS
    return data


class GuestWatch:
    """The guest events the CLI's report receives (in the CLI's thread), as awaitable facts on ours."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.kinds: list[str] = []
        self._changed = asyncio.Event()

    def record(self, event: Any) -> None:
        self._loop.call_soon_threadsafe(self._add, str(event.kind))

    def _add(self, kind: str) -> None:
        self.kinds.append(kind)
        self._changed.set()

    async def wait_for(self, kind: str) -> None:
        async with asyncio.timeout(20):
            while kind not in self.kinds:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def guest_watch(monkeypatch: pytest.MonkeyPatch) -> GuestWatch:
    watch = GuestWatch(asyncio.get_running_loop())
    original = _cli_join._Report.on_guest

    def on_guest(self: _cli_join._Report, event: Any) -> None:
        original(self, event)
        watch.record(event)

    monkeypatch.setattr(_cli_join._Report, "on_guest", on_guest)
    return watch


# ---- the embedded simulator ------------------------------------------------------------------------


def test_no_target_joins_the_embedded_simulator_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["join", "--json"]) == 0
    captured = capsys.readouterr()
    data = one_json(captured.out)
    assert data["outcome"] == "joined"
    assert data["reason"] is None
    assert data["target"] == "embedded simulator"
    assert data["rejoins"] == 0
    assert data["application_session_id"] and data["guest_id"]
    assert set(data["steps_ms"]) >= JOIN_STEPS
    assert all(isinstance(v, float) and v >= 0 for v in data["steps_ms"].values())
    assert data["join_ms"] > 0
    assert "Traceback" not in captured.err


def test_no_target_text_output_lists_each_step(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["join", "--display-name", "Text Guest"]) == 0
    out = capsys.readouterr().out
    assert "embedded simulator" in out
    for step in JOIN_STEPS:
        assert f"  {step} " in out, step
    assert "joined: guest " in out
    assert "left after holding" in out


# ---- a target given by flags, environment or config file -------------------------------------------


async def test_join_target_with_secret_from_env_and_hold(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ANONJOIN_CLIENT_SECRET", sim.info.client_secret)
    assert await run_cli([*target_flags(sim, secret=False), "--json", "--hold", "0.2"]) == 0
    data = one_json(capsys.readouterr().out)
    assert data["outcome"] == "joined"
    assert data["held_s"] >= 0.2
    assert data["target"] == sim.info.discover_url
    snap = sim.snapshot()
    asi = data["application_session_id"]
    assert snap["applications"]["created_by_asi"][asi] == 1
    assert snap["applications"]["live"] == 0  # left
    assert asi not in snap["meetings"][sim.info.conference_id]["roster"]


async def test_join_target_from_config_file(
    sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = sim.info
    config = tmp_path / "target.toml"
    config.write_text(
        "\n".join(
            f'{key} = "{value}"'
            for key, value in {
                "discover_url": info.discover_url,
                "authority": info.authority,
                "client_id": info.client_id,
                "client_secret": info.client_secret,
                "endpoint_id": info.endpoint_id,
                "meeting_url": info.meeting_url,
                "origin": info.origin,
                "ca_file": info.ca_file,
            }.items()
        )
    )
    assert await run_cli(["--config", str(config), "--json"]) == 0
    assert one_json(capsys.readouterr().out)["outcome"] == "joined"


async def test_no_secret_or_token_in_any_output(
    sim: Simulator, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert await run_cli([*target_flags(sim), "-v"]) == 0
    captured = capsys.readouterr()
    assert "anonjoin.step" in captured.err  # the verbose log really went to stderr
    for text in (captured.out, captured.err, caplog.text):
        assert sim.info.client_secret not in text
        assert "eyJ" not in text  # no JWT: AAD access token or psat
        assert "psat=" not in text
    leftover = [h for h in logging.getLogger("anonjoin").handlers if not isinstance(h, logging.NullHandler)]
    assert not leftover  # -v cleaned up after itself


async def test_drop_during_hold_rejoins_then_meeting_end_fails_the_hold(
    sim: Simulator, guest_watch: GuestWatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conference = sim.info.conference_id
    cli = asyncio.ensure_future(run_cli([*target_flags(sim), "--json", "--hold", "60"]))
    await guest_watch.wait_for("joined")
    (asi,) = sim.snapshot()["meetings"][conference]["roster"]
    assert sim.drop_guest(asi)
    await guest_watch.wait_for("rejoined")
    assert sim.snapshot()["applications"]["created_by_asi"][asi] == 2
    assert sim.end_meeting(conference)
    assert await asyncio.wait_for(cli, 30) == 1
    captured = capsys.readouterr()
    data = one_json(captured.out)
    assert data["application_session_id"] == asi
    assert data["rejoins"] == 1
    assert data["outcome"] == "ended"
    assert data["reason"] == "Ended"
    assert "Ended" in captured.err and len(captured.err.strip().splitlines()) == 1


async def test_lobby_denied_is_a_one_line_failure(sim: Simulator, capsys: pytest.CaptureFixture[str]) -> None:
    meeting = sim.create_meeting(lobby="deny", lobby_delay_s=0.0)
    code = await run_cli([*target_flags(sim, meeting_url=meeting["meeting_url"]), "--json"])
    assert code == 1
    captured = capsys.readouterr()
    data = one_json(captured.out)
    assert data["outcome"] == "failed"
    assert data["reason"] == "Denied"
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err


async def test_wrong_secret_is_one_line_without_the_secret(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "wrong-secret-value-123456"
    code = await run_cli([*target_flags(sim, client_secret=wrong)])
    assert code == 1
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1, captured.err
    assert "AuthError" in err_lines[0] and "invalid_client" in err_lines[0]
    for text in (captured.out, captured.err):
        assert wrong not in text
        assert "Traceback" not in text


# ---- bad input -------------------------------------------------------------------------------------


async def test_unreachable_target_is_one_line(
    unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    base = f"https://127.0.0.1:{unused_tcp_port}"
    argv = [
        "--discover-url", f"{base}/platformservice/discover",
        "--authority", f"{base}/contoso.com",
        "--client-id", "app",
        "--client-secret", "unreachable-secret-987",
        "--endpoint-id", "sip:app@contoso.com",
        "--meeting-url", "https://meet.example/contoso/org/ABC",
        "--origin", "https://app.contoso.com",
        "--json",
    ]  # fmt: skip
    assert await run_cli(argv) == 1
    captured = capsys.readouterr()
    data = one_json(captured.out)
    assert data["outcome"] == "failed"
    assert "AuthError" in data["reason"] and "cannot reach" in data["reason"]
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err
    assert "unreachable-secret-987" not in captured.out + captured.err


async def test_unreachable_discover_url_is_one_line(
    sim: Simulator, unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = target_flags(sim, discover_url=f"https://127.0.0.1:{unused_tcp_port}/platformservice/discover")
    assert await run_cli([*flags, "--attempts", "1"]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1, captured.err
    assert "Traceback" not in captured.err
    assert "discover" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hold", "abc"], "--hold: must be a finite number >= 0: 'abc'; see: anonjoin join --help"),
        (["--hold", "-1"], "--hold: must be a finite number >= 0: '-1'"),
        (["--attempts", "0"], "--attempts: must be a whole number >= 1: '0'"),
        (["--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["join", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err  # no usage block first
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--discover-url", "ftp://x/discover"], "invalid setting discover_url"),
        (["--discover-url", "https://h/platformservice/discover"], "missing setting(s): --authority"),
        (["--origin", "https://h/path"], "invalid setting origin"),
        (["--config", "/nonexistent/anonjoin.toml"], "cannot read config file"),
        (["--ca-file", "/nonexistent/ca.pem", "--client-id", "x"], "invalid setting ca_file"),
    ],
)
def test_bad_settings_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["join", "--client-secret", "bad-settings-secret", *argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("anonjoin join: error: ")
    assert message in lines[0]
    assert "bad-settings-secret" not in captured.err + captured.out
    assert captured.out == ""


def test_bad_settings_with_json_still_print_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["join", "--json", "--discover-url", "ftp://x"]) == 2
    data = one_json(capsys.readouterr().out)
    assert data["outcome"] == "error"
    assert "discover_url" in data["reason"]


async def test_insecure_joins_without_ca_file_and_warns_once(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [f for f in target_flags(sim) if f not in ("--ca-file", sim.info.ca_file)]
    assert await run_cli([*flags, "--insecure", "--json"]) == 0
    captured = capsys.readouterr()
    assert one_json(captured.out)["outcome"] == "joined"
    warning_lines = [line for line in captured.err.splitlines() if "warning:" in line]
    assert len(warning_lines) == 1, captured.err
    assert "verification is OFF" in warning_lines[0]


async def test_without_ca_file_tls_fails_cleanly(sim: Simulator, capsys: pytest.CaptureFixture[str]) -> None:
    flags = [f for f in target_flags(sim) if f not in ("--ca-file", sim.info.ca_file)]
    assert await run_cli(flags) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "tls_error" in err


async def test_as_a_subprocess() -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", "join", "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert one_json(out.decode())["outcome"] == "joined"
    assert b"Traceback" not in err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
async def test_signal_during_hold_leaves_and_reports(sim: Simulator, sig: signal.Signals, code: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", "join", *target_flags(sim), "--hold", "60",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while not (line := (await proc.stdout.readline()).decode()).startswith("holding"):
                if not line:
                    _, err = await proc.communicate()
                    pytest.fail(f"the CLI ended before holding: {err.decode()[-2000:]}")
            (asi,) = sim.snapshot()["meetings"][sim.info.conference_id]["roster"]
            proc.send_signal(sig)
            _out, err = await proc.communicate()
    finally:  # a CLI that hangs fails this test; left running, it would hang the simulator's teardown
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == code, err.decode()
    assert b"Traceback" not in err
    assert len(err.decode().strip().splitlines()) == 1, err.decode()
    snap = sim.snapshot()
    assert asi not in snap["meetings"][sim.info.conference_id]["roster"]
    assert snap["applications"]["live"] == 0  # the guest left (DELETE) on the way out


async def test_unreachable_as_a_subprocess_prints_exactly_one_line(unused_tcp_port: int) -> None:
    base = f"https://127.0.0.1:{unused_tcp_port}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
    env["ANONJOIN_CLIENT_SECRET"] = "subprocess-secret-555"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", "join",
        "--discover-url", f"{base}/platformservice/discover", "--authority", f"{base}/contoso.com",
        "--client-id", "app", "--endpoint-id", "sip:app@contoso.com",
        "--meeting-url", "https://meet.example/contoso/org/ABC", "--origin", "https://app.contoso.com",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, err.decode()  # no duplicate from logging's last-resort handler
    assert lines[0].startswith("anonjoin join: AuthError: connection_error")
    assert b"subprocess-secret-555" not in out + err


async def test_authority_without_tenant_uses_the_endpoint_domain(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    host_only = sim.info.authority.rsplit("/", 1)[0]
    assert await run_cli([*target_flags(sim, authority=host_only), "--json"]) == 0
    assert one_json(capsys.readouterr().out)["outcome"] == "joined"


async def test_json_log_format_every_stderr_line_is_an_object_without_secrets(
    sim_factory: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    async with sim_factory(record_issued_tokens=True) as sim:
        assert await run_cli([*target_flags(sim), "-v", "--log-format", "json"]) == 0
        issued = [*sim.issued_tokens.aad, *sim.issued_tokens.psat]
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines()]  # every line: one JSON object
    assert len(records) > 10 and all(isinstance(r, dict) for r in records)
    for r in records:
        assert r["time"].endswith("Z") and datetime.fromisoformat(r["time"][:-1]).year >= 2020
        assert r["level"] in ("DEBUG", "INFO", "WARNING", "ERROR") and r["logger"].startswith("anonjoin")
    events = {r["event"] for r in records}
    assert {"anonjoin.step.end", "anonjoin.guest.joined", "anonjoin.guest.left"} <= events
    ends = [r for r in records if r["event"] == "anonjoin.step.end"]
    assert all(
        {"step", "guest_id", "client_request_id"} <= set(r) for r in ends if r["step"] == "invitations"
    )
    assert any("correlation_id" in r for r in ends)
    assert issued and sim.info.client_secret
    for secret in (sim.info.client_secret, *issued, *(t.split(".", 1)[1] for t in issued)):
        assert secret not in err
    assert "eyJ" not in err and "psat=" not in err


def test_json_log_format_redacts_what_a_record_carries() -> None:
    from anonjoin._cli.common import JsonLogFormatter

    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    try:
        raise ValueError(f"Bearer {token}")
    except ValueError:
        record = logging.LogRecord("anonjoin.x", logging.ERROR, "p", 1, "got %s", (token,), sys.exc_info())
    record.step = "discover"
    record.header = f"Authorization: Bearer {token}"
    line = JsonLogFormatter().format(record)
    data = json.loads(line)
    assert data["step"] == "discover" and data["error"].startswith("ValueError")
    assert "eyJ" not in line and "c2lnbmF0dXJl" not in line and "Traceback" not in line


@pytest.mark.parametrize(
    "command", [["simulate"], ["join"], ["load"], ["rejoin", "--guest", "g1"], ["sessions"]]
)
def test_log_format_is_on_every_command(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert build_parser().parse_args(command).log_format == "text"
    assert build_parser().parse_args([*command, "--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--log-format", "xml"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_json_log_format_for_a_command_without_v_turns_its_warnings_into_objects(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from anonjoin._cli import load as _cli_load
    from anonjoin._core.events import log_event

    def warns(ns: Any) -> int:
        log = logging.getLogger("anonjoin.store")
        log_event(log, logging.DEBUG, "anonjoin.store.quiet")  # below WARNING: not written
        log_event(log, logging.WARNING, "anonjoin.store.odd", guest_id="g1", path="/x")
        return 0

    monkeypatch.setattr(_cli_load, "run_sessions_command", warns)
    assert main(["sessions", "--log-format", "json"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert (
        record["event"] == "anonjoin.store.odd"
        and record["guest_id"] == "g1"
        and record["level"] == "WARNING"
    )
    leftover = [h for h in logging.getLogger("anonjoin").handlers if not isinstance(h, logging.NullHandler)]
    assert not leftover
