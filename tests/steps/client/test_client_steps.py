"""Single steps and failure paths of the client against a scriptable loopback server (no simulator)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import pytest

from anonjoin import (
    CapabilityNotAvailable,
    ChannelEvent,
    GuestEvent,
    GuestState,
    Hooks,
    JoinFailed,
    MaybeSentError,
    ProtocolError,
    RejoinPolicy,
    ServiceError,
    StepEvent,
)

from support.fake import CONF, ORIGIN, Canned, FakeService, RecordingClock, fake_client
from support.policies import STEP_RETRY

MEETING = "https://meet.contoso.com/org/ABC123"


async def test_happy_join_events_and_leave() -> None:
    fake = FakeService()
    steps: list[StepEvent] = []
    guests: list[GuestEvent] = []
    async with fake_client(fake, hooks=Hooks(on_step=steps.append, on_guest=guests.append)) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        it = g.events()
        result = await g.join()
        assert g.state is GuestState.JOINED
        assert result.application_session_id == g.application_session_id
        assert result.conference_id == CONF
        assert set(result.steps) >= {
            "anon_tokens",
            "anon_discover",
            "anon_applications",
            "invitations",
            "events",
        }
        assert len(fake.live_apps()) == 1
        await g.leave()
        await g.leave()  # idempotent
        assert g.state.value == "left"
        assert fake.live_apps() == []
        got = [e async for e in it]
    kinds = [e.kind for e in got if isinstance(e, GuestEvent)]
    assert kinds == ["joined", "left"]
    rels = [(e.rel, e.type) for e in got if isinstance(e, ChannelEvent)]
    assert rels[0] == ("onlineMeetingInvitation", "started")
    assert ("onlineMeetingInvitation", "completed") in rels
    # client-request-id on every request, Origin and psat on guest requests
    for route, req, _ in fake.requests:
        assert req.headers.get("client-request-id"), route
        if route in ("anon_applications", "invitations", "events", "delete_application"):
            assert req.headers["Origin"] == ORIGIN
            assert req.headers["Authorization"].startswith("Bearer psat=")
        if route in ("discover", "applications", "capabilities", "anon_tokens"):
            assert req.headers["Authorization"].startswith("Bearer eyJ")
    assert {s.step for s in steps} >= {"discover", "applications", "capabilities", "anon_tokens", "events"}
    assert all(s.duration_s is not None for s in steps if s.phase == "end")
    assert [e.kind for e in guests] == ["joined", "left"]


async def test_retry_after_is_honoured_and_shared() -> None:
    fake = FakeService()
    clock = RecordingClock()
    fake.script("anon_tokens", Canned(429, {"code": "TooManyRequests"}, {"Retry-After": "2"}))
    async with fake_client(fake, clock=clock) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert g.result is not None and g.result.attempts["anon_tokens"] == 2
        assert clock.sleeps and max(clock.sleeps) >= 2.0
        # the throttle is shared: it was set to the Retry-After instant for everyone
        assert client._runner.throttle.until.get("anon_tokens", 0) > 0


async def test_retry_after_http_date_and_cap() -> None:
    fake = FakeService()
    clock = RecordingClock()
    fake.script("invitations", Canned(503, None, {"Retry-After": "Wed, 21 Oct 2099 07:28:00 GMT"}))
    policy = dataclasses.replace(STEP_RETRY, retry_after_cap_s=1.5)
    async with fake_client(fake, clock=clock, retry=policy) as (client, _):
        await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    assert max(clock.sleeps) == pytest.approx(client.retry.retry_after_cap_s)


async def test_html_error_page_is_a_service_error_and_retried() -> None:
    fake = FakeService()
    page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    fake.script("anon_discover", Canned(502, raw=page, headers={"Content-Type": "text/html"}))
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert g.result is not None and g.result.attempts["anon_discover"] == 2


async def test_maybe_sent_safe_step_retried_unsafe_step_recreates_or_is_final() -> None:
    fake = FakeService()
    fake.script("anon_discover", "CLOSE")
    async with fake_client(fake) as (client, _):
        await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    assert fake.count("anon_discover") == 2
    # an invitation that may have been sent is not repeated in place: a new application replaces it
    fake = FakeService()
    fake.script("invitations", "CLOSE")
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert fake.count("anon_applications") == 2 and fake.count("invitations") == 2
        assert [a.asi for a in fake.live_apps()] == [g.application_session_id]
    # without recoveries allowed it is final
    fake = FakeService()
    fake.script("invitations", "CLOSE")
    async with fake_client(fake, rejoin=RejoinPolicy(enabled=False)) as (client, _):
        with pytest.raises(MaybeSentError):
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert fake.count("invitations") == 1
        assert fake.live_apps() == []  # the failed guest cleaned up its application


async def test_application_not_found_on_applications_is_final_without_retries() -> None:
    fake = FakeService()
    fake.script("applications", Canned(403, {"code": "Forbidden", "subcode": "ApplicationNotFound"}))
    async with fake_client(fake) as (client, _):
        with pytest.raises(ServiceError) as info:
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    assert info.value.subcode == "ApplicationNotFound" and info.value.status == 403
    assert fake.count("applications") == 1
    assert fake.count("anon_tokens") == 0


async def test_missing_capability_is_final_before_sending() -> None:
    fake = FakeService()
    fake.capabilities_links = ["adhocMeetings"]
    async with fake_client(fake) as (client, _):
        with pytest.raises(CapabilityNotAvailable):
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        with pytest.raises(CapabilityNotAvailable):
            await client.mint_grant(meeting_url=MEETING, allowed_origins=[ORIGIN], application_session_id="a")
    assert fake.count("anon_tokens") == 0
    assert fake.count("capabilities") == 1  # fetched once, shared


async def test_sa_401_and_invalid_token_refresh_once() -> None:
    from support.fake import FakeCredential

    fake = FakeService()
    cred = FakeCredential()
    fake.script("discover", Canned(401, raw=b"<html>denied</html>"))
    fake.script("applications", Canned(403, None, {"Warning": '120 fqdn "InvalidToken"'}))
    async with fake_client(fake, credential=cred) as (client, _):
        await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    assert cred.refreshes == 2
    # a second InvalidToken after the refresh: backed off and retried (it is known to be brief)
    fake = FakeService()
    cred = FakeCredential()
    invalid = Canned(403, {"code": "Forbidden", "subcode": "InvalidToken"})
    fake.script("applications", invalid, invalid, invalid)
    async with fake_client(fake, credential=cred) as (client, _):
        await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    assert cred.refreshes == 1 and fake.count("applications") == 4
    fake = FakeService()
    cred = FakeCredential()
    fake.script("discover", Canned(401), Canned(401), Canned(401))
    async with fake_client(fake, credential=cred) as (client, _):
        with pytest.raises(ServiceError) as info:
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    assert info.value.status == 401 and cred.refreshes == 1 and fake.count("discover") == 2


async def test_307_is_followed_once_with_authorization_and_origin() -> None:
    fake = FakeService()

    async def to_elsewhere(req):  # type: ignore[no-untyped-def]
        from aiohttp import web

        return web.Response(status=307, headers={"Location": "/elsewhere/disc"})

    fake.script("anon_discover", to_elsewhere)
    async with fake_client(fake) as (client, _):
        with pytest.raises(ProtocolError):  # the echo body is not a discover document
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    red = [req for r, req, _ in fake.requests if r == "redirected"]
    assert len(red) == 1 and red[0].headers["Origin"] == ORIGIN
    fake = FakeService()

    async def sa_redirect(req):  # type: ignore[no-untyped-def]
        from aiohttp import web

        return web.Response(status=307, headers={"Location": "/elsewhere/x"})

    fake.script("discover", sa_redirect)
    async with fake_client(fake) as (client, _):
        with pytest.raises(ProtocolError):
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
    red = [req for r, req, _ in fake.requests if r == "redirected"]
    assert red[0].headers["Authorization"].startswith("Bearer ")


async def test_lobby_admit_and_deny_and_timeout() -> None:
    fake = FakeService()
    fake.lobby = "admit"
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        it = g.events()
        r = await g.join()
        assert r.lobby_s > 0
        await g.leave()
        kinds = [e.kind async for e in it if isinstance(e, GuestEvent)]
        assert kinds == ["lobby", "joined", "left"]
    fake = FakeService()
    fake.lobby = "deny"
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        with pytest.raises(JoinFailed) as info:
            await g.join()
        assert info.value.reason == "Denied"
        out = await g.wait_closed()
        assert out.kind == "failed" and out.reason == "Denied"
        assert fake.live_apps() == []
    fake = FakeService()
    fake.lobby = "admit"
    fake.lobby_delay = 30
    async with fake_client(fake) as (client, _):
        with pytest.raises(JoinFailed) as info:
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada", lobby_timeout_s=0.2)
        assert info.value.reason == "LobbyTimeout"
        assert fake.live_apps() == []


async def test_drop_rejoins_with_same_session_id() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        it = g.events()
        await g.join()
        first_app = fake.app_of(g.application_session_id).id
        fake.drop(g.application_session_id)
        kinds: list[str] = []
        async for e in it:
            if isinstance(e, GuestEvent):
                kinds.append(e.kind)
                if e.kind == "rejoined":
                    break
        assert kinds == ["joined", "dropped", "rejoining", "rejoined"]
        assert g.rejoins == 1
        assert fake.app_of(g.application_session_id).id != first_app
        assert len(fake.live_apps()) == 1
        asis = {a.asi for a in fake.apps.values()}
        assert asis == {g.application_session_id}
        await g.leave()


async def test_meeting_end_is_final_not_an_error() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        fake.end(g.application_session_id)
        out = await asyncio.wait_for(g.wait_closed(), 5)
        assert out.kind == "ended" and out.reason == "Ended" and out.error is None


async def test_psat_expiry_rejoins_same_asi() -> None:
    fake = FakeService()
    fake.psat_ttl = 1.2
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        it = g.events()
        await g.join()
        async for e in it:
            if isinstance(e, GuestEvent) and e.kind == "rejoined":
                break
        assert g.rejoins >= 1
        assert len({a.asi for a in fake.apps.values()}) == 1
        assert len(fake.live_apps()) == 1
        await g.leave()


async def test_app_not_found_on_poll_recreates_application() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        it = g.events()
        await g.join()
        minted = fake.count("anon_tokens")
        app = fake.app_of(g.application_session_id)
        app.gone = True
        app.queue.put_nowait({})
        async for e in it:
            if isinstance(e, GuestEvent) and e.kind == "rejoined":
                break
        assert fake.count("anon_applications") == 2
        assert fake.count("anon_tokens") == minted  # psat still fresh: not re-minted
        await g.leave()


async def test_pget_replaced_stops_the_poller() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        fake.script("events", Canned(409, {"code": "Conflict", "subcode": "PGetReplaced"}))
        fake.push(fake.app_of(g.application_session_id), {"link": {"rel": "participant"}, "type": "added"})
        out = await asyncio.wait_for(g.wait_closed(), 5)
        assert out.kind == "left" and out.reason == "PGetReplaced"


async def test_guest_401_remints_with_same_asi() -> None:
    fake = FakeService()
    fake.script("invitations", Canned(401, {"code": "Unauthorized"}))
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert fake.count("anon_tokens") == 2
        assert len(fake.live_apps()) == 1
        await g.leave()


async def test_destination_not_found_is_final_join_failed() -> None:
    fake = FakeService()
    fake.script("invitations", Canned(404, {"code": "NotFound", "subcode": "DestinationNotFound"}))
    async with fake_client(fake) as (client, _):
        with pytest.raises(JoinFailed) as info:
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert info.value.reason == "DestinationNotFound"
        assert isinstance(info.value.__cause__, ServiceError)
        assert info.value.__cause__.correlation_id is None or info.value.__cause__.correlation_id
        assert fake.count("invitations") == 1


async def test_create_meeting_and_mint_grant_hide_secrets() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        m = await client.create_meeting(subject="standup")
        assert m.join_url.endswith("/XYZ789") and m.conference_id == "XYZ789"
        grant = await client.mint_grant(
            meeting_url=m.join_url, allowed_origins=ORIGIN, application_session_id="a1"
        )
        assert grant.token.startswith("psat=")
        text = repr(grant) + str(grant)
        assert grant.token not in text and grant.token[5:] not in text and "psat%25" not in text


async def test_no_secret_in_debug_logs(caplog: pytest.LogCaptureFixture) -> None:
    from support.fake import AAD_TOKEN

    fake = FakeService()
    fake.script("invitations", Canned(503, {"code": "ServiceUnavailable", "message": "token=abc"}))
    caplog.set_level(logging.DEBUG)
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        it = g.events()
        await g.join()
        fake.drop(g.application_session_id)
        async for e in it:
            if isinstance(e, GuestEvent) and e.kind == "rejoined":
                break
        await g.leave()
    # everything the client logged (the fake server's own access log is not the client's)
    text = "\n".join(
        r.getMessage() + repr(r.__dict__) for r in caplog.records if r.name.startswith("anonjoin")
    )
    assert "anonjoin.step.retry" in text and "anonjoin.guest.joined" in text
    for secret in [AAD_TOKEN, *fake.tokens_minted]:
        assert secret not in text
        assert secret[5:] not in text
        for part in secret.split("."):
            assert part not in text or len(part) < 8


async def test_many_guests_share_capabilities_single_flight() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        guests = await asyncio.gather(
            *(client.join(meeting_url=MEETING, origin=ORIGIN, display_name=f"G{i}") for i in range(10))
        )
        assert fake.count("discover") == 1 and fake.count("capabilities") == 1
        assert len(fake.live_apps()) == 10
        assert client.live_guests == 10
    assert fake.live_apps() == []  # aclose left them all
    assert all(g.state is GuestState.LEFT for g in guests)


async def test_resync_and_resume_links_are_followed() -> None:
    fake = FakeService()

    async def resync(req):  # type: ignore[no-untyped-def]
        from aiohttp import web

        return web.json_response({"_links": {"resync": {"href": str(req.rel_url)}}})

    async def resume(req):  # type: ignore[no-untyped-def]
        from aiohttp import web

        return web.json_response({"_links": {"ms:rtc:saas:resume": {"href": str(req.rel_url)}}})

    fake.script("events", resync, resume)
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert fake.count("events") >= 3
        await g.leave()


async def test_inactive_application_expired_recreates() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        it = g.events()
        await g.join()
        fake.script("events", Canned(410, {"code": "Gone", "subcode": "InactiveApplicationExpired"}))
        fake.push(fake.app_of(g.application_session_id), {"link": {"rel": "participant"}, "type": "added"})
        async for e in it:
            if isinstance(e, GuestEvent) and e.kind == "rejoined":
                break
        assert fake.count("anon_applications") == 2
        assert len(fake.live_apps()) == 1
        await g.leave()


async def test_invitation_that_never_completes_hits_the_guest_deadline() -> None:
    from support.fake import ev

    fake = FakeService()
    fake.join_events = lambda app: [ev("onlineMeetingInvitation", "started")]
    policy = dataclasses.replace(STEP_RETRY, guest_deadline_s=0.5)
    async with fake_client(fake, retry=policy) as (client, _):
        with pytest.raises(JoinFailed) as info:
            await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert info.value.reason == "JoinTimeout"
        assert fake.live_apps() == []


async def test_concurrent_leaves_delete_once() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        await asyncio.gather(g.leave(), g.leave(), g.leave())
        assert g.state is GuestState.LEFT
        assert fake.count("delete_application") == 1 and fake.live_apps() == []
        with pytest.raises(JoinFailed):
            await g.join()


async def test_conference_id_from_the_psat_when_discover_has_none() -> None:
    fake = FakeService()
    fake.conference_in_discover = False
    async with fake_client(fake) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        assert g.conference_id == CONF
        await g.leave()
    invite = [json.loads(body) for route, _, body in fake.requests if route == "invitations"]
    assert invite[0]["onlineMeetingUri"] == CONF


async def test_hook_errors_never_break_a_join(caplog: pytest.LogCaptureFixture) -> None:
    def boom(_ev: object) -> None:
        raise RuntimeError("hook bug")

    fake = FakeService()
    async with fake_client(fake, hooks=Hooks(on_step=boom, on_guest=boom)) as (client, _):
        g = await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        await g.leave()
    assert any("anonjoin.hook.error" in r.getMessage() for r in caplog.records)
