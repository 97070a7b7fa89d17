"""UCWA psanon: anonymous discover, anonApplications and onlineMeetingInvitations rules."""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import quote

import jwt

from anonjoin.simulator import Simulator
from anonjoin.simulator._tokens import psat_key

from support.walk import Walk


async def test_discover_checks_the_origin_and_accepts_authorization(sim: Simulator, walk: Walk) -> None:
    guest = await walk.guest("asi-disc")
    url = guest.token_reply.href("_links", "discover")
    good = await walk.call("GET", url, headers={"Origin": sim.info.origin})
    assert good.status == 200
    assert (
        good.body["_links"]["anonApplications"]["href"] == sim.info.pool_url + "/ucwa/psanon/v1/applications"
    )
    with_auth = await walk.call(
        "GET", url, headers={"Origin": sim.info.origin, "Authorization": f"Bearer {guest.psat}"}
    )
    assert with_auth.status == 200
    for origin in ("https://evil.example", None):
        r = await walk.call("GET", url, headers={"Origin": origin} if origin else {})
        assert r.status == 403 and r.body["code"] == "Forbidden"


async def test_discover_decodes_one_or_two_levels_and_all_query_names(sim: Simulator, walk: Walk) -> None:
    guest = await walk.guest("asi-enc")
    base = sim.info.discover_url
    for name in ("anonymousContext", "anonymousMeetingJoinContext", "discoverContext", "ANONYMOUSCONTEXT"):
        for value in (quote(quote(guest.psat, safe=""), safe=""), quote(guest.psat, safe="")):
            r = await walk.call("GET", f"{base}?{name}={value}", headers={"Origin": sim.info.origin})
            assert r.status == 200, (name, value[:12], r.text)
            assert r.body["conferenceId"].endswith(sim.info.conference_id)


def _psat(sim: Simulator, **changes: Any) -> str:
    now = int(sim.core.clock())
    claims = {"nbf": now, "exp": now + 3600, "asi": "forged", "ao": sim.info.origin, **changes}
    return "psat=" + psat_key().sign(claims, x5t=True)


async def test_anon_applications_verifies_the_psat(sim: Simulator, walk: Walk) -> None:
    guest = await walk.guest("asi-auth")
    d = await guest.discover()
    url = d.href("_links", "anonApplications")
    body = {"culture": "en-US", "userAgent": "tests"}
    now = int(sim.core.clock())
    unsigned = jwt.encode(
        {"asi": "x", "exp": now + 60, "ao": sim.info.origin},
        key=None,  # type: ignore[arg-type]
        algorithm="none",
    )
    hs256 = jwt.encode(
        {"asi": "x", "exp": now + 60, "ao": sim.info.origin}, secrets.token_hex(32), algorithm="HS256"
    )
    tampered = guest.psat[:-4] + ("AAAA" if not guest.psat.endswith("AAAA") else "BBBB")
    for token in (
        "",
        "psat=garbage",
        "psat=" + unsigned,
        "psat=" + hs256,
        tampered,
        _psat(sim, exp=now - 60),
    ):
        r = await walk.call(
            "POST",
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}".strip(), "Origin": sim.info.origin},
        )
        assert r.status == 401, token[:20]
        assert r.headers["WWW-Authenticate"].startswith("MsRtcOAuth")
    bare = await walk.call(
        "POST",
        url,
        json=body,
        headers={"Authorization": f"Bearer {guest.psat[5:]}", "Origin": sim.info.origin},
    )
    assert bare.status == 201  # the psat= prefix is optional


async def test_anon_applications_checks_origin_and_fields(sim: Simulator, walk: Walk) -> None:
    guest = await walk.guest("asi-fields")
    d = await guest.discover()
    url = d.href("_links", "anonApplications")
    headers = guest.headers()
    evil = await walk.call(
        "POST",
        url,
        json={"culture": "en-US", "userAgent": "t"},
        headers={**headers, "Origin": "https://evil.example"},
    )
    assert evil.status == 403
    for body in (
        {"userAgent": "t"},
        {"culture": "en-US"},
        {"culture": "x" * 101, "userAgent": "t"},
        {"culture": "en-US", "userAgent": "u" * 101},
        {"culture": 5, "userAgent": "t"},
    ):
        r = await walk.call("POST", url, json=body, headers=headers)
        assert r.status == 400 and r.body["subcode"] == "ParameterValidationFailure", body
    pascal = await walk.call(
        "POST",
        url,
        json={"AnonymousDisplayName": "Bo", "Culture": "en-US", "UserAgent": "t" * 100},
        headers=headers,
    )
    assert pascal.status == 201 and pascal.body["_embedded"]["me"]["name"] == "Bo"
    assert (
        await walk.call(
            "POST", url, data=b"{not json", headers={**headers, "Content-Type": "application/json"}
        )
    ).status == 400
    assert (await walk.call("POST", url, json=[1, 2], headers=headers)).status == 400


async def test_invitation_rules(sim: Simulator, walk: Walk) -> None:
    guest = await walk.guest("asi-inv")
    await guest.create_app()
    for field, value in (
        ("operationId", "o" * 51),
        ("subject", "s" * 251),
        ("anonymousDisplayName", "n" * 251),
        ("importance", "Whenever"),
        ("operationId", None),
        ("onlineMeetingUri", None),
    ):
        r = await guest.invite(**{field: value})
        assert r.status == 400 and r.body["subcode"] == "ParameterValidationFailure", field
    other = sim.create_meeting()
    mismatch = await guest.invite(onlineMeetingUri=other["conference_uri"])
    assert mismatch.status == 403
    unknown = await guest.invite(onlineMeetingUri="sip:x@contoso.com;gruu;opaque=app:conf:focus:id:NOPE1234")
    assert unknown.status == 403  # not the token's conference
    ok = await guest.invite(importance="urgent")
    assert ok.status == 201
    again = await guest.invite()
    assert again.status == 409 and again.body["subcode"] == "AlreadyExists"


async def test_invitation_to_an_ended_meeting_is_destination_not_found(sim: Simulator, walk: Walk) -> None:
    guest = await walk.guest("asi-end")
    await guest.create_app()
    assert sim.end_meeting(sim.info.conference_id)
    r = await guest.invite()
    assert r.status == 404 and r.body["subcode"] == "DestinationNotFound"
    late = await walk.mint("asi-late")
    assert late.status == 404 and late.body["subcode"] == "DestinationNotFound"


async def test_chat_token_cannot_join_a_meeting(sim: Simulator, walk: Walk) -> None:
    r = await walk.mint("asi-chat", meeting_url="")
    token = r.body["token"]
    discover = await walk.call("GET", r.href("_links", "discover"), headers={"Origin": sim.info.origin})
    assert "conferenceId" not in discover.body
    app = await walk.call(
        "POST",
        discover.href("_links", "anonApplications"),
        json={"culture": "en-US", "userAgent": "t"},
        headers={"Authorization": f"Bearer {token}", "Origin": sim.info.origin},
    )
    assert "joinOnlineMeeting" not in app.body["_embedded"]["communication"]["_links"]
    url = app.href("_links", "self") + "/communication/onlineMeetingInvitations"
    headers = {"Authorization": f"Bearer {token}", "Origin": sim.info.origin}
    body = {
        "onlineMeetingUri": "sip:x@contoso.com;gruu;opaque=app:conf:focus:id:NOPE1234",
        "operationId": "1",
    }
    assert (await walk.call("POST", url, json=body, headers=headers)).status == 404
    body["onlineMeetingUri"] = sim.create_meeting()["conference_uri"]
    assert (await walk.call("POST", url, json=body, headers=headers)).status == 403


async def test_application_routes_need_the_guests_own_psat(sim: Simulator, walk: Walk) -> None:
    a = await walk.guest("asi-a")
    await a.create_app()
    b = await walk.guest("asi-b")
    assert a.app is not None
    url = a.app.href("_links", "self")
    assert (await walk.call("GET", url, headers={"Origin": sim.info.origin})).status == 401
    assert (await walk.call("GET", url, headers=b.headers())).status == 403
    assert (
        await walk.call("GET", url, headers={**a.headers(), "Origin": "https://evil.example"})
    ).status == 403
    got = await walk.call("GET", url, headers=a.headers())
    assert got.status == 200 and got.body["id"] == a.app.body["id"]
    me = await walk.call("POST", url + "/me/makeMeAvailable", json={}, headers=a.headers())
    assert me.status == 403 and me.body["subcode"] == "AnonymousNotAllowed"
    nothing = await walk.call("GET", url.rsplit("/", 1)[0] + "/999999", headers=a.headers())
    assert nothing.status == 404 and nothing.body["subcode"] == "ApplicationNotFound"


async def test_event_resources_can_be_fetched(walk: Walk) -> None:
    guest = await walk.join()
    events = await guest.events_until("onlineMeetingInvitation", "completed")
    assert guest.app is not None
    href = events[-1]["link"]["href"]
    r = await walk.call(
        "GET", guest.app.href("_links", "self").split("/ucwa/")[0] + href, headers=guest.headers()
    )
    assert r.status == 200 and r.body["state"] == "Connected"
