"""Secrets (issue 6 §4): no client secret, AAD access token or psat token in anything anonjoin writes.

A full load with faults (so the error paths run too: 429/503/500, connections closed mid-response, 403
``InvalidToken`` bursts, and 401s on both sides after the simulator's clock jumps past every token's
expiry) runs with the whole logging tree at DEBUG; then everything written is searched for the actual
token values the simulator issued (``SimulatorConfig(record_issued_tokens=True)``): the log records, the
JSON and HTML reports, the hooks' events, the reprs and strs of the client objects, and the exceptions
raised (with their whole cause chain). ``anonjoin load`` and ``anonjoin join`` run as subprocesses with
``-v`` and their stdout and stderr are searched too. Last, TLS: verified by default; off only through an
explicit flag, which warns.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from anonjoin import AuthError, JoinFailed, RequestNotSentError, ServiceError
from anonjoin._async.client import Client
from anonjoin._async.settings import InsecureTLSWarning, TargetSettings
from anonjoin._core.events import GuestEvent, Hooks, StepEvent
from anonjoin._load.report import build_report, write_json, write_text
from anonjoin._load.report_html import render_html
from anonjoin._load.runner import LoadPlan, check_against_service, run_load
from anonjoin.simulator import FaultProfile, FaultRule, Simulator, SimulatorConfig

from support.policies import FAST_REJOIN, FAST_RETRY
from support.processes import clean_env
from support.simulator import sim_credential

SECRET = "Tq9~client-secret-for-the-leak-test-4f1d7a"
WRONG_SECRET = "Wx3~a-wrong-secret-that-must-not-leak-either-88c2"
CLOCK_JUMP_S = 9 * 3600.0  # past every AAD token (1 h) and psat token (8 h) issued before the jump

FAULTS = FaultProfile(
    name="secrets",
    rules=(
        FaultRule(route="@protocol", kind="429", rate=0.03, retry_after=0.05),
        FaultRule(route="@protocol", kind="503", rate=0.02, retry_after=0.05),
        FaultRule(route="@protocol", kind="500", rate=0.02),
        FaultRule(route="@protocol", kind="close", rate=0.02),
        FaultRule(route="@sa", kind="invalid_token", rate=0.03, burst=2),
    ),
    drop_rate=0.1,
    drop_after_s=(0.2, 1.0),
)
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}")
TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]{16,}")
SUBPROCESS_TIMEOUT_S = 90.0


# -- the search ------------------------------------------------------------------------------------


def jwt_pieces(tokens: Iterable[str]) -> set[str]:
    """The parts of each JWT that identify it: the whole token, its claims and its signature segments.

    (The header segment is the same for every token of one key, so it proves nothing.)"""
    pieces: set[str] = set()
    for token in tokens:
        jwt = token.removeprefix("psat=")
        _header, claims, signature = jwt.split(".")
        pieces.update((jwt, claims, signature))
    return pieces


def leaks(texts: dict[str, str], secrets: Sequence[str], tokens: Iterable[str]) -> list[str]:
    """Where a secret or a piece of a token occurs (``name: what``), or any JWT-shaped string."""
    prefixes = {piece[:16] for piece in jwt_pieces(tokens)}  # catches clipped pieces too
    found: list[str] = []
    for name, text in texts.items():
        for secret in secrets:
            if secret in text:
                found.append(f"{name}: the secret {secret[:6]}...")
        for run in TOKEN_CHARS.findall(text):
            if run[:16] in prefixes:
                found.append(f"{name}: a piece of an issued token ({run[:12]}...)")
        found += [f"{name}: a JWT-shaped string ({m[:16]}...)" for m in JWT_SHAPE.findall(text)]
    return found


class _Everything(logging.Handler):
    """Keeps every record as text: the formatted message, its args, every extra attribute, the traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.out = io.StringIO()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        try:
            message = record.getMessage()
        except Exception as exc:  # a bad format string still has its parts searched
            message = f"{record.msg!r} % {record.args!r} ({exc})"
        extras = {k: v for k, v in vars(record).items() if k not in ("msg", "args", "exc_info")}
        self.out.write(f"{record.name} {record.levelname} {message} {extras!r}\n")
        if record.exc_info:
            self.out.write("".join(traceback.format_exception(*record.exc_info)))


@contextmanager
def capture_all_logs() -> Iterator[_Everything]:
    """DEBUG on the root logger and the ``anonjoin`` tree (whose children propagate), one handler at root."""
    handler = _Everything()
    root, ours = logging.getLogger(), logging.getLogger("anonjoin")
    levels = (root.level, ours.level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    ours.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        ours.setLevel(levels[1])


def files_in(directory: Path) -> dict[str, str]:
    """Every file written into ``directory`` (reports, stores), by name."""
    return {
        p.name: p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def describe(exc: BaseException) -> str:
    """Everything an exception shows: str, repr, and the formatted traceback with its cause chain."""
    return f"{exc}\n{exc!r}\n" + "".join(traceback.format_exception(exc))


# -- the full load ---------------------------------------------------------------------------------


@pytest.fixture
async def leak_sim() -> AsyncIterator[tuple[Simulator, list[float]]]:
    skew = [0.0]
    config = SimulatorConfig(
        seed=29,
        faults=FAULTS,
        client_secret=SECRET,
        record_issued_tokens=True,
        clock=lambda: time.time() + skew[0],
    )
    async with Simulator(config) as sim:
        yield sim, skew


async def test_a_load_with_faults_writes_no_secret_or_token(
    leak_sim: tuple[Simulator, list[float]], tmp_path: Path
) -> None:
    sim, skew = leak_sim
    info = sim.info
    texts: dict[str, str] = {}
    steps: list[StepEvent] = []
    guest_events: list[GuestEvent] = []
    joined = 0

    def on_guest(ev: GuestEvent) -> None:
        nonlocal joined
        guest_events.append(ev)
        if ev.kind == "joined":
            joined += 1
            if joined == 12:
                skew[0] = CLOCK_JUMP_S  # every token issued so far is now expired: 401s on both sides

    with capture_all_logs() as logs:
        # 1. the load
        plan = LoadPlan(
            guests=40, meeting_urls=[info.meeting_url], origin=info.origin, concurrency=8, hold_s=1.5
        )
        credential = sim_credential(sim, secret=SECRET)
        try:
            result = await run_load(
                plan,
                discover_url=info.discover_url,
                endpoint_id=info.endpoint_id,
                credential=credential,
                ca_file=info.ca_file,
                retry=FAST_RETRY,
                rejoin=FAST_REJOIN,
                hooks=Hooks(on_step=steps.append, on_guest=on_guest),
                meetings=2,
            )
            texts["credential repr/str"] = f"{credential!r} {credential}"
            token = await credential.token()
            texts["access token repr/str"] = f"{token!r} {token}"

            # 2. the client objects, one guest by hand, and the errors of each kind
            async with Client(
                discover_url=info.discover_url,
                endpoint_id=info.endpoint_id,
                credential=credential,
                ca_file=info.ca_file,
                retry=FAST_RETRY,
                rejoin=FAST_REJOIN,
            ) as client:
                grant = await client.mint_grant(
                    meeting_url=info.meeting_url,
                    allowed_origins=info.origin,
                    application_session_id=str(uuid.UUID(int=7, version=4)),
                )
                guest = client.guest(meeting_url=info.meeting_url, origin=info.origin, display_name="Ada")
                events = guest.events()
                joined_result = await guest.join()
                texts["client objects"] = " ".join(
                    repr(x) + " " + str(x) for x in (client, grant, guest, joined_result, guest.state)
                )
                await guest.leave()
                channel = [repr(e) async for e in events]
                texts["guest events"] = "\n".join(channel)
                texts["guest outcome"] = f"{guest.outcome!r}"
                denied = sim.create_meeting(lobby="deny", lobby_delay_s=0.05)
                with pytest.raises(JoinFailed) as refused:
                    await client.join(
                        meeting_url=denied["meeting_url"], origin=info.origin, display_name="Bo"
                    )
                texts["JoinFailed"] = describe(refused.value)
            async with Client(
                discover_url=info.discover_url,
                endpoint_id=sim.config.unprovisioned_endpoint_id,
                credential=credential,
                ca_file=info.ca_file,
                retry=FAST_RETRY,
            ) as unprovisioned:
                with pytest.raises(ServiceError) as not_found:
                    await unprovisioned.join(
                        meeting_url=info.meeting_url, origin=info.origin, display_name="Cy"
                    )
                texts["ServiceError"] = describe(not_found.value)
        finally:
            await credential.aclose()
        wrong = sim_credential(sim, secret=WRONG_SECRET)
        try:
            with pytest.raises(AuthError) as auth:
                await wrong.token()
            texts["AuthError"] = describe(auth.value)
            texts["wrong credential"] = f"{wrong!r} {wrong}"
        finally:
            await wrong.aclose()
        settings = TargetSettings.load(
            use_env=False,
            discover_url=info.discover_url,
            authority=info.authority,
            client_id=info.client_id,
            client_secret=SECRET,
            endpoint_id=info.endpoint_id,
        )
        texts["settings"] = f"{settings!r} {settings} {settings.model_dump()!r} {settings.model_dump_json()}"

        # 3. the reports as the CLI writes them
        report = build_report(
            result.metrics,
            result.guests,
            {"target": info.discover_url, "client_secret": SECRET, "endpoint_id": info.endpoint_id},
            started_at=result.started_at,
            service_check=check_against_service(result.guests, sim.snapshot()),
        )
        write_json(tmp_path / "report.json", report)
        write_text(tmp_path / "report.html", render_html(report))
        texts["results"] = repr(result.guests)
        texts["step events"] = "\n".join(map(repr, steps))
        texts["guest events (hooks)"] = "\n".join(map(repr, guest_events))
        texts["records of failed guests"] = "\n".join(repr(r) for r in result.guests if r.outcome != "joined")
    texts["logs"] = logs.out.getvalue()
    texts |= files_in(tmp_path)

    # The run went through the error paths ...
    snap = sim.snapshot()
    statuses = {route: set(by) for route, by in snap["requests"].items()}
    sa_routes = ("discover", "applications", "capabilities", "anon_tokens")
    guest_routes = ("anon_discover", "anon_applications", "invitations", "events", "delete_application")
    assert any("401" in statuses.get(r, ()) for r in guest_routes), statuses  # psat expired
    # 403 InvalidToken on the service application's side: the fault bursts, and more after the jump
    # (an expired AAD token gets 403 InvalidToken, protocol.md §4.2)
    sa_403 = sum(snap["requests"].get(r, {}).get("403", 0) for r in sa_routes)
    injected = sum(snap["faults_injected"].get(r, {}).get("invalid_token", 0) for r in sa_routes)
    assert sa_403 > injected > 0, (sa_403, injected)
    assert {"429", "503", "500", "close"} <= {k for kinds in snap["faults_injected"].values() for k in kinds}
    assert sum(1 for r in result.guests if r.outcome == "joined") >= 30, result.guests
    assert logs.count > 1000 and "anonjoin.step.retry" in texts["logs"]
    issued = sim.issued_tokens
    assert len(issued.aad) >= 2 and len(issued.psat) >= 40  # refreshed after the jump; one per guest at least
    # ... and nothing it wrote holds a secret or a token.
    assert not leaks(texts, [SECRET, WRONG_SECRET], [*issued.aad, *issued.psat])
    # (the search itself finds what it should)
    assert leaks({"x": f"log {issued.psat[-1]}"}, [SECRET], issued.psat)
    assert leaks({"x": f"Bearer {issued.aad[0].split('.', 1)[1]}"}, [SECRET], issued.aad)


# -- the CLI as a subprocess -----------------------------------------------------------------------


async def _anonjoin(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "anonjoin",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SUBPROCESS_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.communicate()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode() + "\n" + err.decode()


def _target_flags(sim: Simulator, *, ca: bool = True, meeting: bool = True) -> list[str]:
    i = sim.info
    flags = [
        "--discover-url", i.discover_url, "--authority", i.authority, "--client-id", i.client_id,
        "--endpoint-id", i.endpoint_id, "--origin", i.origin,
    ]  # fmt: skip
    if meeting:
        flags += ["--meeting-url", i.meeting_url]
    if ca:
        flags += ["--ca-file", i.ca_file]
    return flags


async def test_the_cli_with_v_prints_no_secret_or_token(
    leak_sim: tuple[Simulator, list[float]], tmp_path: Path
) -> None:
    sim, _skew = leak_sim
    env = clean_env() | {"ANONJOIN_CLIENT_SECRET": SECRET}
    load_args = [
        "load", "-v", "--guests", "16", "--concurrency", "8", "--hold", "1", "--store", ":memory:",
        "--report", str(tmp_path / "load.json"), "--html", str(tmp_path / "load.html"), *_target_flags(sim),
    ]  # fmt: skip
    code, load_out = await _anonjoin(*load_args, env=env, cwd=tmp_path)
    assert code == 0, load_out[-3000:]
    # the secret given as a flag (the worst case: a user who did not read the help) is not echoed either
    join_args = ["join", "-v", "--client-secret", SECRET, "--hold", "0.5", *_target_flags(sim)]
    code, join_out = await _anonjoin(*join_args, env=clean_env(), cwd=tmp_path)
    assert code == 0, join_out[-3000:]
    code, json_out = await _anonjoin(*join_args, "--json", env=clean_env(), cwd=tmp_path)
    assert code == 0, json_out[-3000:]
    texts = {"load": load_out, "join": join_out, "join --json": json_out}
    texts |= files_in(tmp_path)
    assert "DEBUG" in load_out and "anonjoin.step" in load_out  # -v really logged
    issued = sim.issued_tokens
    assert len(issued.psat) >= 18
    assert not leaks(texts, [SECRET], [*issued.aad, *issued.psat])


async def test_the_embedded_simulator_run_prints_no_secret_or_token(tmp_path: Path) -> None:
    """``anonjoin load`` with no target: the embedded simulator's secret and tokens stay inside."""
    args = ["load", "-v", "--faults", "chaos", "--guests", "12", "--concurrency", "6", "--hold", "1"]
    code, out = await _anonjoin(*args, "--store", ":memory:", env=clean_env(), cwd=tmp_path)
    assert code == 0, out[-3000:]
    code, join_out = await _anonjoin("join", "-v", env=clean_env(), cwd=tmp_path)
    assert code == 0, join_out[-3000:]
    texts = {"load": out, "join": join_out} | files_in(tmp_path)
    assert {"anonjoin-report.json", "anonjoin-report.html"} <= set(texts)
    assert not leaks(texts, [SimulatorConfig().client_secret], [])


# -- TLS -------------------------------------------------------------------------------------------


async def test_tls_is_verified_by_default(leak_sim: tuple[Simulator, list[float]]) -> None:
    sim, _skew = leak_sim
    info = sim.info
    no_ca = sim_credential(sim, secret=SECRET, trust_ca=False)  # no CA file: its CA is not trusted
    try:
        with pytest.raises(AuthError) as auth:
            await no_ca.token()
        assert "certificate" in str(auth.value).lower() or "tls" in str(auth.value).lower(), auth.value
    finally:
        await no_ca.aclose()
    credential = sim_credential(sim, secret=SECRET)
    try:
        async with Client(
            discover_url=info.discover_url, endpoint_id=info.endpoint_id, credential=credential
        ) as client:
            with pytest.raises(RequestNotSentError) as tls:
                await client.join(meeting_url=info.meeting_url, origin=info.origin, display_name="Ada")
        assert "certificate" in str(tls.value)
    finally:
        await credential.aclose()


async def test_turning_tls_off_takes_the_explicit_flag_and_warns(
    leak_sim: tuple[Simulator, list[float]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sim, _skew = leak_sim
    info = sim.info
    with pytest.warns(InsecureTLSWarning, match="verification is OFF"):
        settings = TargetSettings.load(use_env=False, discover_url=info.discover_url, insecure=True)
    assert settings.verify_tls() is False
    assert TargetSettings.load(use_env=False, discover_url=info.discover_url).verify_tls() is True
    caplog.set_level(logging.WARNING, logger="anonjoin")
    credential = sim_credential(sim, secret=SECRET, trust_ca=False, verify_tls=False)
    try:
        async with Client(
            discover_url=info.discover_url,
            endpoint_id=info.endpoint_id,
            credential=credential,
            verify_tls=False,
        ) as client:
            # the credential's own requests (msal, urllib3) warn for every unverified request
            with pytest.warns(Warning, match="Unverified HTTPS request"):
                guest = await client.join(
                    meeting_url=info.meeting_url, origin=info.origin, display_name="Ada"
                )
            await guest.leave()
    finally:
        await credential.aclose()
    assert any("anonjoin.tls.insecure" in r.getMessage() for r in caplog.records)
    # `anonjoin load` against a target without its CA: a TLS error, unless --insecure, which warns
    env = clean_env() | {"ANONJOIN_CLIENT_SECRET": SECRET}
    base = ["load", "--guests", "2", "--hold", "0", "--store", ":memory:", "--no-html"]
    code, out = await _anonjoin(
        *base, "--report", str(tmp_path / "a.json"), *_target_flags(sim, ca=False), env=env, cwd=tmp_path
    )
    assert code == 1, out[-2000:]
    assert "certificate" in out.lower() or "tls" in out.lower(), out[-2000:]
    code, out = await _anonjoin(
        *base,
        "--report",
        str(tmp_path / "b.json"),
        "--insecure",
        *_target_flags(sim, ca=False),
        env=env,
        cwd=tmp_path,
    )
    assert code == 0, out[-2000:]
    assert "verification is OFF" in out, out[-2000:]
