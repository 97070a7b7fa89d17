"""Whole joins against the simulator over TLS with real msal (issue 3's tests).

Every check of what happened is made in the simulator's admin snapshot, not only in the client's belief.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from anonjoin import (
    CapabilityNotAvailable,
    ChannelEvent,
    Client,
    GuestEvent,
    GuestState,
    Hooks,
    JoinFailed,
    MaybeSentError,
    RejoinPolicy,
    RetryPolicy,
    ServiceError,
    StepEvent,
)
from anonjoin._async.auth import ClientSecretCredential
from anonjoin.simulator import FaultProfile, FaultRule, Simulator

from support.policies import CLIENT_REJOIN, CLIENT_RETRY
from support.simulator import client_for, live_apps
from support.tasks import our_tasks

SimFactory = Callable[..., Simulator]


def roster(sim: Simulator, conf: str | None = None) -> list[str]:
    meetings = sim.snapshot()["meetings"]
    m = meetings[conf or sim.info.conference_id]
    return list(m["roster"])


def requests(sim: Simulator, route: str) -> dict[str, int]:
    return dict(sim.snapshot()["requests"].get(route, {}))


async def _wait_kind(it: AsyncIterator[Any], kind: str, within: float = 10.0) -> list[str]:
    seen: list[str] = []
    async with asyncio.timeout(within):
        async for e in it:
            if isinstance(e, GuestEvent):
                seen.append(e.kind)
                if e.kind == kind:
                    return seen
    raise AssertionError(f"events ended before {kind!r}: {seen}")


async def test_happy_path(sim: Simulator) -> None:
    steps: list[StepEvent] = []
    async with client_for(sim, hooks=Hooks(on_step=steps.append)) as client:
        g = client.guest(
            meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada Lovelace"
        )
        result = await g.join()
        assert g.state is GuestState.JOINED and result.conference_id
        assert roster(sim) == [g.application_session_id]
        assert live_apps(sim) == 1
        await g.leave()
        assert roster(sim) == [] and live_apps(sim) == 0
    assert {s.step for s in steps if s.phase == "end"} >= {
        "discover", "applications", "capabilities", "anon_tokens", "anon_discover", "anon_applications",
        "invitations", "events", "delete_application",
    }  # fmt: skip
    # leaving with a poll parked: the DELETE releases the poll, and that is not reported as an error
    assert [s for s in steps if s.phase == "end" and s.outcome != "ok"] == []
    assert our_tasks() == []


VARIANTS: dict[str, dict[str, Any]] = {
    "wire-prefix": {"rel_prefix": "ms:rtc:saas:"},
    "alternating-prefix": {"rel_prefix": "alternate"},
    "wire-prefix-events": {"event_rel_prefix": "ms:rtc:saas:"},
    "docs-prefix-events": {"event_rel_prefix": "service:"},
    "dotnet-date": {"date_format": "dotnet"},
    "dotnet-escaped-date": {"date_format": "dotnet_escaped"},
    "dotnet-literal-date": {"date_format": "dotnet_literal"},
    "meeting-join-context": {"discover_query": "anonymousMeetingJoinContext"},
    "discover-context": {"discover_query": "discoverContext"},
    "token-201": {"token_status": 201},
    "ucwa-same-host": {"ucwa_on_pool": False},
    "mixed-case": {"mixed_case_hrefs": True},
    "absolute-hrefs": {"absolute_hrefs": True},
    "my-applications": {"my_applications_link": True},
    "redirects": {"redirect_routes": frozenset({"discover", "applications", "anon_tokens", "anon_discover"})},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_variants(sim_factory: SimFactory, variant: str) -> None:
    async with sim_factory(**VARIANTS[variant]) as sim, client_for(sim) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        assert roster(sim) == [g.application_session_id]
        await g.leave()
        assert live_apps(sim) == 0


# (fault kind, route, what the table says)
FAULTS = [
    ("429", "anon_tokens", "retry"),
    ("503", "anon_applications", "retry"),
    ("500", "invitations", "retry"),
    ("504", "anon_discover", "retry"),
    ("429", "discover", "retry"),
    ("close", "anon_discover", "retry"),
    ("close", "capabilities", "retry"),
    ("close", "invitations", "recreate"),
    ("close", "anon_applications", "recreate"),
    ("close", "invitations", "final"),
    ("latency", "capabilities", "retry"),
    ("invalid_token", "applications", "refresh"),
]


@pytest.mark.parametrize(("kind", "route", "action"), FAULTS, ids=[f"{k}-{r}" for k, r, _ in FAULTS])
async def test_fault_classes(sim_factory: SimFactory, kind: str, route: str, action: str) -> None:
    rule = FaultRule(route=route, kind=kind, rate=1.0, retry_after=0.3, latency_s=1.0)
    async with sim_factory(faults=FaultProfile(rules=(rule,))) as sim:

        def on_step(ev: StepEvent) -> None:  # the first failure switches the faults off: the retry succeeds
            if ev.phase == "end" and ev.outcome != "ok":
                sim.set_faults("none")

        retry = (
            CLIENT_RETRY
            if kind != "latency"
            else RetryPolicy(**{**_fields(CLIENT_RETRY), "request_timeout_s": 0.4})
        )
        rejoin = RejoinPolicy(enabled=False) if action == "final" else CLIENT_REJOIN
        async with client_for(sim, hooks=Hooks(on_step=on_step), retry=retry, rejoin=rejoin) as client:
            g = client.guest(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
            if action == "final":
                with pytest.raises(MaybeSentError):
                    await g.join()
                assert live_apps(sim) == 0 and roster(sim) == []
            else:
                await g.join()
                assert roster(sim) == [g.application_session_id]
            snap = sim.snapshot()
            assert snap["faults_injected"][route][kind] == 1
            seen = snap["requests"][route]
            ok = sum(n for s, n in seen.items() if s.startswith("2"))
            cut = 1 if kind == "close" else 0  # a connection closed mid-response was counted as sent 200
            assert ok - cut == (0 if action == "final" else 1)
            if action == "recreate":  # not repeated in place: a new application replaced the maybe-sent one
                assert snap["requests"]["anon_applications"].get("201", 0) == (
                    2 if route == "invitations" else 1
                )
                assert snap["applications"]["live"] == 1
            if action == "refresh":
                assert snap["requests"]["aad_token"].get("200", 0) == 2
            if kind in ("429", "503") and route not in ("discover",):
                timeline = snap["guests"][g.application_session_id]
                hits = [e for e in timeline if e["route"] == route]
                assert hits[0]["retry_after"] == pytest.approx(0.3)
                assert hits[1]["t"] - hits[0]["t"] >= 0.3 - 0.01  # not sent before the Retry-After
            await g.leave()
            assert live_apps(sim) == 0


def _fields(p: RetryPolicy) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}


async def test_short_psat_during_hold_rejoins_same_asi(sim_factory: SimFactory) -> None:
    async with sim_factory(psat_ttl_s=2.0) as sim, client_for(sim) as client:
        g = client.guest(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        it = g.events()
        await g.join()
        seen = await _wait_kind(it, "rejoined")
        assert seen == ["joined", "rejoining", "rejoined"]
        snap = sim.snapshot()
        assert snap["applications"]["created_by_asi"] == {g.application_session_id: 2}
        assert roster(sim) == [g.application_session_id]  # once, never twice
        assert snap["applications"]["live"] == 1
        assert g.rejoins == 1
        await g.leave()
        assert live_apps(sim) == 0


@pytest.mark.parametrize("how", ["drop", "eject"])
async def test_drop_rejoins(sim: Simulator, how: str) -> None:
    async with client_for(sim) as client:
        g = client.guest(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        it = g.events()
        await g.join()
        asi = g.application_session_id
        assert (sim.drop_guest if how == "drop" else sim.eject_guest)(asi)
        seen = await _wait_kind(it, "rejoined")
        assert seen == ["joined", "dropped", "rejoining", "rejoined"]
        assert roster(sim) == [asi]
        assert sim.snapshot()["applications"]["created_by_asi"][asi] == 2
        await g.leave()


async def test_meeting_end_is_final_not_an_error(sim: Simulator) -> None:
    async with client_for(sim) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        sim.end_meeting(sim.info.conference_id)
        out = await asyncio.wait_for(g.wait_closed(), 10)
        assert out.kind == "ended" and out.reason == "Ended" and out.error is None
        assert live_apps(sim) == 0
        with pytest.raises(JoinFailed) as info:  # later joins: the meeting is gone
            await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Bo")
        assert info.value.reason in ("DestinationNotFound", "Ended")


async def test_lobby_admit_and_deny(sim_factory: SimFactory) -> None:
    async with sim_factory(lobby="admit", lobby_delay_s=0.2) as sim, client_for(sim) as client:
        g = client.guest(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        it = g.events()
        r = await g.join()
        assert r.lobby_s >= 0.1
        await g.leave()
        kinds = [e.kind async for e in it if isinstance(e, GuestEvent)]
        assert kinds == ["lobby", "joined", "left"]
        deny = sim.create_meeting(lobby="deny", lobby_delay_s=0.1)
        g = client.guest(meeting_url=deny["meeting_url"], origin=sim.info.origin, display_name="Eve")
        with pytest.raises(JoinFailed) as info:
            await g.join()
        assert info.value.reason == "Denied"
        assert roster(sim, deny["conference_id"]) == []
        assert live_apps(sim) == 0
        slow = sim.create_meeting(lobby="admit", lobby_delay_s=30)
        with pytest.raises(JoinFailed) as info:
            await client.join(meeting_url=slow["meeting_url"], origin=sim.info.origin, display_name="Zed",
                              lobby_timeout_s=0.3)  # fmt: skip
        assert info.value.reason == "LobbyTimeout"
        assert live_apps(sim) == 0


async def test_lobby_through_prefixed_event_relations(sim_factory: SimFactory) -> None:
    # the lobby state arrives in an ``_embedded`` keyed ``ms:rtc:saas:conversation`` from a sender
    # ``ms:rtc:saas:communication``; the invitation completes as ``ms:rtc:saas:onlineMeetingInvitation``
    async with (
        sim_factory(event_rel_prefix="ms:rtc:saas:", lobby="admit", lobby_delay_s=0.2) as sim,
        client_for(sim) as client,
    ):
        g = client.guest(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        it = g.events()
        await g.join()
        await g.leave()
        seen = [e async for e in it]
        assert [e.kind for e in seen if isinstance(e, GuestEvent)] == ["lobby", "joined", "left"]
        channel = [e for e in seen if isinstance(e, ChannelEvent)]
        assert {e.sender for e in channel} <= {"communication", "conversation"}
        done = [e for e in channel if e.rel == "onlineMeetingInvitation" and e.type == "completed"]
        assert len(done) == 1 and "onlineMeetingInvitation" in done[0].embedded
        assert any(e.rel == "conversation" and e.state == "InLobby" for e in channel)
        assert live_apps(sim) == 0


async def test_application_not_found_is_final_without_retries(sim: Simulator) -> None:
    async with client_for(sim, endpoint_id="sip:not-provisioned@contoso.com") as client:
        with pytest.raises(ServiceError) as info:
            await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
    assert info.value.status == 403 and info.value.subcode == "ApplicationNotFound"
    assert info.value.correlation_id
    assert requests(sim, "applications") == {"403": 1}
    assert requests(sim, "anon_tokens") == {}


async def test_missing_capability_is_final_without_sending(sim_factory: SimFactory) -> None:
    async with (
        sim_factory(drop_capabilities=frozenset({"anonApplicationTokens"})) as sim,
        client_for(sim) as c,
    ):
        with pytest.raises(CapabilityNotAvailable):
            await c.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        assert requests(sim, "capabilities") == {"200": 1}
        assert requests(sim, "anon_tokens") == {}


CANCEL_AT = ["discover", "capabilities", "anon_tokens", "anon_discover", "anon_applications", "invitations"]


@pytest.mark.parametrize("step", CANCEL_AT)
async def test_cancel_at_each_step_leaves_nothing(sim: Simulator, step: str) -> None:
    holder: dict[str, asyncio.Task[Any]] = {}

    def on_step(ev: StepEvent) -> None:
        if ev.step == step and ev.phase == "end" and "t" in holder:
            holder["t"].cancel()

    async with client_for(sim, hooks=Hooks(on_step=on_step)) as client:
        g = client.guest(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        holder["t"] = asyncio.create_task(g.join())
        with pytest.raises(asyncio.CancelledError):
            await holder["t"]
        assert g.state is GuestState.LEFT
        assert our_tasks() == []
        http = client._http
        for s in (http._session,):
            if s is not None:
                assert s.connector is not None
                assert len(s.connector._acquired) == 0
        assert live_apps(sim) == 0 and roster(sim) == []


async def test_logs_at_debug_hold_no_secret(sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tokens: list[str] = []
    async with client_for(sim) as client:
        g = client.guest(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        it = g.events()
        await g.join()
        sim.drop_guest(g.application_session_id)
        await _wait_kind(it, "rejoined")
        grant = await client.mint_grant(meeting_url=sim.info.meeting_url, allowed_origins=[sim.info.origin],
                                        application_session_id=g.application_session_id)  # fmt: skip
        tokens.append(grant.token)
        tokens.append((await client._service._cred.token()).value)
        await g.leave()
    records = [r for r in caplog.records if not r.name.startswith("anonjoin.simulator")]
    text = "\n".join(f"{r.name} {r.getMessage()} {r.__dict__!r}" for r in records)
    assert "anonjoin.guest.rejoined" in text and "anonjoin.step.end" in text
    secrets = [sim.info.client_secret, *tokens, *(t.split(".")[-1] for t in tokens)]
    for s in secrets:
        assert s not in text
    assert not re.search(r"eyJ[A-Za-z0-9_-]{20,}\.", text)


async def test_many_guests_throttled_respect_retry_after(sim_factory: SimFactory) -> None:
    rule = FaultRule(route="anon_applications", kind="429", rate=0.3, retry_after=0.2)
    retry = RetryPolicy(**{**_fields(CLIENT_RETRY), "attempts": 10})  # 0.3 ** 10: never out of attempts
    async with (
        sim_factory(faults=FaultProfile(rules=(rule,)), seed=7) as sim,
        client_for(sim, retry=retry) as client,
    ):
        guests = await asyncio.gather(
            *(client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name=f"G{i}")
              for i in range(12))
        )  # fmt: skip
        snap = sim.snapshot()
        assert sorted(roster(sim)) == sorted(g.application_session_id for g in guests)
        assert snap["faults_injected"]["anon_applications"]["429"] >= 1
        for g in guests:
            timeline = snap["guests"][g.application_session_id]
            for a, b in itertools.pairwise(timeline):
                if a["retry_after"]:
                    assert b["t"] - a["t"] >= a["retry_after"] - 0.01
        assert len({g.application_session_id for g in guests}) == 12


async def test_tls_is_verified_by_default_and_an_untrusted_certificate_is_final(sim: Simulator) -> None:
    from anonjoin import RequestNotSentError

    i = sim.info
    steps: list[StepEvent] = []
    cred = ClientSecretCredential(authority=i.authority, client_id=i.client_id, client_secret=i.client_secret,
                                  scope=i.scope, ca_file=i.ca_file)  # fmt: skip
    try:
        async with Client(discover_url=i.discover_url, endpoint_id=i.endpoint_id, credential=cred,
                          retry=CLIENT_RETRY, hooks=Hooks(on_step=steps.append)) as client:  # fmt: skip
            with pytest.raises(RequestNotSentError) as info:
                await client.join(meeting_url=i.meeting_url, origin=i.origin, display_name="Ada")
        assert "certificate" in str(info.value)
        assert [s.attempt for s in steps if s.phase == "end"] == [1]  # not retried
    finally:
        await cred.aclose()


async def test_verify_tls_off_warns(sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="anonjoin")
    async with client_for(sim, verify_tls=False) as client:
        g = await client.join(meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada")
        await g.leave()
    assert any("anonjoin.tls.insecure" in r.getMessage() for r in caplog.records)
