"""``anonjoin doctor``: every check passes against the simulator, and each misconfiguration fails its own."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from anonjoin import AuthError, CertificateCredential, ClientSecretCredential
from anonjoin._async.doctor import CHECKS, DoctorReport, _auth_failure, run_doctor
from anonjoin._cli import main
from anonjoin.simulator import FaultProfile, FaultRule, Simulator

pytestmark = pytest.mark.usefixtures("no_target_env")

SEVEN = [name for name in CHECKS if name != "join"]


def flags(sim: Simulator, **overrides: str | None) -> list[str]:
    """The target flags of ``sim``; an override of ``None`` leaves that flag out."""
    info = sim.info
    values: dict[str, str | None] = {
        "discover-url": info.discover_url,
        "authority": info.authority,
        "client-id": info.client_id,
        "client-secret": info.client_secret,
        "endpoint-id": info.endpoint_id,
        "meeting-url": info.meeting_url,
        "origin": info.origin,
        "ca-file": info.ca_file,
        "scope": info.scope,
    }
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    out: list[str] = []
    for name, value in values.items():
        if value is not None:
            out += [f"--{name}", value]
    return out


async def doctor(argv: list[str]) -> int:
    """main() runs its own event loop: give it a thread, so the simulator keeps serving on ours."""
    return await asyncio.to_thread(main, ["doctor", *argv])


def one_json(out: str) -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    data: dict[str, Any] = json.loads(lines[0])
    return data


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    assert isinstance(found, dict)
    return found


# ---- it passes ---------------------------------------------------------------------------------------


def test_no_target_checks_the_embedded_simulator_and_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0] == "anonjoin doctor: checking the embedded simulator"
    assert len(lines) == 1 + 7 + 1, out.out
    assert all(line.startswith("\N{HEAVY CHECK MARK} ") for line in lines[1:-1]), out.out
    assert lines[-1] == "anonjoin doctor: all 7 checks passed"
    assert "HTTP 401 without a token" in lines[1]
    assert out.err == ""


def test_no_target_with_join_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--join", "--json"]) == 0
    report = one_json(capsys.readouterr().out)
    assert report["ok"] is True
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
    assert (report["passed"], report["failed"], report["skipped"]) == (8, 0, 0)
    assert "joined conference" in check(report, "join")["detail"]


async def test_a_target_passes_and_nothing_secret_is_printed(
    sim_factory: Callable[..., Simulator], capsys: pytest.CaptureFixture[str]
) -> None:
    async with sim_factory(record_issued_tokens=True) as sim:
        assert await doctor([*flags(sim), "--join"]) == 0, capsys.readouterr()
        out = capsys.readouterr()
        assert sim.snapshot()["applications"]["live"] == 0  # the --join guest left
    text = out.out + out.err
    assert f"anonjoin doctor: checking {sim.info.discover_url}" in text
    assert "all 8 checks passed" in text
    secrets = [sim.info.client_secret, *sim.issued_tokens.aad, *sim.issued_tokens.psat]
    assert len(secrets) >= 3
    for secret in secrets:
        assert secret not in text
        assert secret.removeprefix("psat=") not in text


async def test_a_certificate_credential_passes_through_the_library(sim: Simulator) -> None:
    info = sim.info
    key = await asyncio.to_thread(Path(info.client_key_file).read_text, encoding="ascii")
    credential = CertificateCredential(
        authority=info.authority,
        client_id=info.client_id,
        private_key_pem=key,
        thumbprint=info.client_cert_thumbprint,
        scope=info.scope,
        ca_file=info.ca_file,
    )
    seen: list[str] = []
    try:
        report = await run_doctor(
            discover_url=info.discover_url,
            endpoint_id=info.endpoint_id,
            credential=credential,
            meeting_url=info.meeting_url,
            origins=[info.origin],
            ca_file=info.ca_file,
            on_check=lambda result: seen.append(result.name),
        )
    finally:
        await credential.aclose()
    assert report.ok, [c.line() for c in report.checks]
    assert seen == SEVEN


# ---- each misconfiguration fails its own check -------------------------------------------------------

FAULTY: dict[str, tuple[dict[str, Any], dict[str, str | None], str, list[str], list[str]]] = {
    # name: (simulator config, flag overrides, failing check, words of its detail + fix, skipped checks)
    "wrong secret": (
        {},
        {"client-secret": "not-the-secret-123"},
        "aad_token",
        ["invalid_client", "AADSTS7000215", "check the client secret"],
        ["endpoint", "capabilities", "psat"],
    ),
    "unknown endpoint": (
        {},
        {"endpoint-id": "sip:somebody-else@contoso.com"},
        "endpoint",
        ["403 ApplicationNotFound", "sip:somebody-else@contoso.com is not an application", "--endpoint-id"],
        ["capabilities", "psat"],
    ),
    "missing consent": (
        {"drop_capabilities": frozenset({"anonApplicationTokens"})},
        {},
        "capabilities",
        ["lack anonApplicationTokens", '"Guest user join services" permission is not consented', "admin"],
        ["psat"],
    ),
    "http origin": (
        {},
        {"origin": "http://app.contoso.com"},
        "origins",
        ["http://app.contoso.com is not https", "--origin https://"],
        ["psat"],
    ),
    "sip meeting url": (
        {},
        {"meeting-url": "sip:organizer@contoso.com;gruu;opaque=app:conf:focus:id:41PJSO2K"},
        "meeting_url",
        ["is a SIP conference id, not the meeting's HTTP join URL", "give the join URL"],
        ["psat"],
    ),
    "unknown meeting": (
        {},
        {"meeting-url": "https://meet.sim.anonjoin.invalid/contoso/organizer/NOSUCHMEETING"},
        "psat",
        ["HTTP 404 DestinationNotFound", "knows no meeting", "check --meeting-url"],
        [],
    ),
    "untrusted certificate": (
        {},
        {"ca-file": None},
        "discover",
        ["is not trusted", "give --ca-file"],
        ["endpoint", "capabilities", "psat"],
    ),
    "slow service": (
        {"faults": FaultProfile(rules=(FaultRule(route="discover", kind="latency", rate=1, latency_s=2),))},
        {},
        "discover",
        ["read timeout", "check the discover URL"],
        ["endpoint", "capabilities", "psat"],
    ),
}


@pytest.mark.parametrize("case", list(FAULTY))
async def test_each_misconfiguration_fails_its_own_check(
    case: str, sim_factory: Callable[..., Simulator], capsys: pytest.CaptureFixture[str]
) -> None:
    config, overrides, failing, words, skipped = FAULTY[case]
    timeout = ["--timeout", "0.5"] if case == "slow service" else []
    async with sim_factory(**config) as sim:
        code = await doctor([*flags(sim, **overrides), *timeout, "--json"])
    out = capsys.readouterr()
    assert code == 1, out
    report = one_json(out.out)
    assert report["ok"] is False
    found = check(report, failing)
    assert found["status"] == "fail", report
    said = f"{found['detail']} fix: {found['fix']}"
    for word in words:
        assert word in said, said
    state = statuses(report)
    assert [n for n, s in state.items() if s == "skip"] == skipped, state
    # only the misconfigured check (and, without a CA, Azure AD's own TLS) fails; the rest pass
    also = {"aad_token"} if case == "untrusted certificate" else set()
    assert {n for n, s in state.items() if s == "fail"} == {failing, *also}, state
    assert "not-the-secret-123" not in out.out + out.err


async def test_text_lines_mark_the_failure_and_the_skipped(
    sim_factory: Callable[..., Simulator], capsys: pytest.CaptureFixture[str]
) -> None:
    async with sim_factory() as sim:
        assert await doctor(flags(sim, endpoint_id="sip:somebody-else@contoso.com")) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9, lines
    assert lines[3].startswith("\N{HEAVY BALLOT X} application endpoint: HTTP 403 ApplicationNotFound")
    assert "\N{EM DASH} fix: check --endpoint-id" in lines[3]
    assert lines[4] == "- capabilities: skipped: the application endpoint check did not pass"
    assert lines[-1] == "anonjoin doctor: 1 of 7 checks failed (2 skipped)"


async def test_unreachable_discover_fails_its_check(
    sim: Simulator, unused_tcp_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"https://127.0.0.1:{unused_tcp_port}/platformservice/discover"
    assert await doctor([*flags(sim, discover_url=url), "--json"]) == 1
    report = one_json(capsys.readouterr().out)
    assert check(report, "discover")["detail"].startswith(f"cannot reach 127.0.0.1:{unused_tcp_port}")
    assert statuses(report)["aad_token"] == "pass"


def test_consent_and_unknown_client_errors_of_azure_ad_are_named() -> None:
    consent = _auth_failure(
        AuthError(
            "AADSTS65001: The user or administrator has not consented to use the application.",
            error="invalid_grant",
        ),
        None,
    )
    assert consent.detail.startswith("consent missing") and "admin consent" in (consent.fix or "")
    unknown = _auth_failure(AuthError("AADSTS700016: not found", error="unauthorized_client"), None)
    assert unknown.detail.startswith("unknown client") and "--client-id" in (unknown.fix or "")


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--discover-url", "https://x.example/platformservice/discover"], "missing setting(s): --authority"),
        (["--timeout", "0"], "--timeout: must be a finite number > 0"),
        (["--origin", "https://app.example/path"], "invalid setting origin"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["doctor", *argv])
    except SystemExit as exc:  # argparse's own (a bad flag value)
        code = int(str(exc.code))
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err


def test_bad_input_with_json_prints_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--client-id", "x"]) == 2
    out = capsys.readouterr()
    report = one_json(out.out)
    assert report["ok"] is False and "missing setting(s)" in report["error"]


async def test_secret_from_the_environment_and_sip_meeting_from_a_config_file(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "target.json"
    sip = "sip:organizer@contoso.com;gruu;opaque=app:conf:focus:id:41PJSO2K"
    config.write_text(json.dumps({"meeting_url": sip}))
    monkeypatch.setenv("ANONJOIN_CLIENT_SECRET", sim.info.client_secret)
    argv = [*flags(sim, client_secret=None, meeting_url=None), "--config", str(config), "--json"]
    assert await doctor(argv) == 1
    report = one_json(capsys.readouterr().out)
    assert statuses(report)["aad_token"] == "pass"
    assert check(report, "meeting_url")["status"] == "fail"


def test_help_ends_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    text = capsys.readouterr().out
    tail = text[text.index("examples:") :].strip().splitlines()
    assert tail[0] == "examples:"
    assert sum(1 for t in tail if "anonjoin doctor" in t) == 3
    assert tail[-1].strip() == "the failed checks, for a script"


async def test_as_a_subprocess_exits_1_with_the_failure_on_stdout(sim: Simulator) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
    env["ANONJOIN_CLIENT_SECRET"] = "wrong-subprocess-secret-777"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "anonjoin", "doctor", *flags(sim, client_secret=None),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, err.decode()
    assert err == b""
    assert "\N{HEAVY BALLOT X} Azure AD token: invalid_client" in out.decode()
    assert b"wrong-subprocess-secret-777" not in out


async def library_doctor(sim: Simulator, **options: Any) -> DoctorReport:
    info = sim.info
    credential = ClientSecretCredential(
        authority=info.authority, client_id=info.client_id, client_secret=info.client_secret,
        scope=info.scope, ca_file=info.ca_file,
    )  # fmt: skip
    try:
        return await run_doctor(
            discover_url=info.discover_url, endpoint_id=info.endpoint_id, credential=credential,
            meeting_url=info.meeting_url, origins=info.origin, ca_file=info.ca_file, **options,
        )  # fmt: skip
    finally:
        await credential.aclose()


@pytest.mark.parametrize(
    "variant",
    [
        {"rel_prefix": "alternate", "event_rel_prefix": "ms:rtc:saas:"},
        {"redirect_routes": frozenset({"discover", "anon_discover"}), "discover_query": "discoverContext"},
        {"absolute_hrefs": True, "mixed_case_hrefs": True, "my_applications_link": True},
        {"lobby": "admit", "lobby_delay_s": 0.05},
    ],
)
async def test_the_documented_variants_pass(
    variant: dict[str, Any], sim_factory: Callable[..., Simulator]
) -> None:
    async with sim_factory(**variant) as sim:
        report = await library_doctor(sim, join=True, timeout_s=5)
    assert report.ok, [c.line() for c in report.checks]
    assert [c.name for c in report.checks] == list(CHECKS)


async def test_a_meeting_that_refuses_anonymous_guests_fails_the_join(
    sim_factory: Callable[..., Simulator],
) -> None:
    async with sim_factory(lobby="deny") as sim:
        report = await library_doctor(sim, join=True, timeout_s=5)
    assert [c.name for c in report.checks if not c.passed] == ["join"]
    join = report.checks[-1]
    assert join.detail.startswith("the guest did not join: Denied")
    assert join.fix is not None and "refused anonymous guests" in join.fix
    assert report.as_dict()["failed"] == 1
