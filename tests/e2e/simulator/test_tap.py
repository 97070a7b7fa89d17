"""Trusted Application API: authentication rules, endpoints, capabilities, token minting, adhoc meetings."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import jwt

from anonjoin.simulator import Simulator
from anonjoin.simulator._tokens import aad_key

from support.walk import Walk


def _apps_url(sim: Simulator) -> str:
    return (
        sim.info.discover_url.replace("/discover", "/v1/applications") + "?endpointId=" + sim.info.endpoint_id
    )


async def test_no_token_gets_401_with_both_www_authenticate_headers(sim: Simulator, walk: Walk) -> None:
    for url in (_apps_url(sim), sim.info.discover_url):
        r = await walk.call("GET", url)
        assert r.status == 401
        challenges = r.headers.getall("WWW-Authenticate")
        assert len(challenges) == 2
        assert (
            challenges[0].startswith("Bearer ")
            and 'client_id="00000004-0000-0ff1-ce00-000000000000"' in (challenges[0])
        )
        assert challenges[1].startswith("MsRtcOAuth ") and "urn:microsoft.rtc:anonmeeting" in challenges[1]


def _forged(sim: Simulator, **changes: Any) -> str:
    now = int(sim.core.clock())
    claims = {
        "aud": sim.config.audiences[0],
        "tid": sim.info.tenant_id,
        "appid": sim.info.client_id,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        **changes,
    }
    return aad_key().sign(claims)


async def test_bad_tokens_get_403_invalid_token_with_diagnostics(sim: Simulator, walk: Walk) -> None:
    import secrets

    from cryptography.hazmat.primitives.asymmetric import rsa

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(sim.core.clock())
    bad_tokens = [
        "not-a-jwt",
        _forged(sim, exp=now - 3600),  # expired
        _forged(sim, aud="https://example.com"),  # wrong audience
        _forged(sim, tid="00000000-0000-0000-0000-000000000000"),  # another tenant
        jwt.encode(
            {"aud": sim.config.audiences[0], "tid": sim.info.tenant_id, "exp": now + 60},
            stranger,
            algorithm="RS256",
        ),  # not our key
        jwt.encode(
            {"aud": sim.config.audiences[0], "tid": sim.info.tenant_id, "exp": now + 60},
            secrets.token_hex(32),
            algorithm="HS256",
        ),  # wrong algorithm
    ]
    for token in bad_tokens:
        r = await walk.call("GET", _apps_url(sim), headers={"Authorization": f"Bearer {token}"})
        assert r.status == 403, token
        assert r.body == {
            "code": "Forbidden",
            "subcode": "InvalidToken",
            "message": "The OAuth token is invalid.",
        }
        assert r.headers["Warning"] == '120 127.0.0.1 "InvalidToken"'
        assert r.headers["X-Ms-diagnostics"].startswith("28055;source=")


async def test_endpoint_rules(sim: Simulator, walk: Walk) -> None:
    url = _apps_url(sim)
    other = await walk.call(
        "GET",
        url.replace(sim.info.endpoint_id, sim.config.unprovisioned_endpoint_id),
        headers=walk.sa_headers(),
    )
    assert other.status == 403 and other.body["subcode"] == "ApplicationNotFound"
    missing = await walk.call("GET", url.split("?")[0], headers=walk.sa_headers())
    assert missing.status == 400 and missing.body["subcode"] == "ParameterValidationFailure"
    foreign_app = _forged(sim, appid="99999999-0000-0000-0000-000000000000")
    r = await walk.call("GET", url, headers={"Authorization": f"Bearer {foreign_app}"})
    assert r.status == 403 and r.body["subcode"] == "ApplicationNotFound"


async def test_capabilities_list_links_per_consented_permission(
    sim: Simulator, walk: Walk, sim_factory: Any, open_walk: Any
) -> None:
    caps = walk.capabilities
    assert caps is not None
    assert "service:anonApplicationTokens" in caps.body["_links"]
    communication = caps.body["_embedded"]["service:communication"]
    assert communication["etag"] == "4294967295"
    assert {"service:joinOnlineMeeting", "service:startMessaging", "service:startAudioVideo"} <= set(
        communication["_links"]
    )
    assert "service:adhocMeetings" in caps.body["_embedded"]
    assert "myOnlineMeetings" in caps.body["_embedded"]
    limited_sim = sim_factory(drop_capabilities=frozenset({"anonApplicationTokens"}))
    async with limited_sim as limited, open_walk(limited) as w2:
        assert w2.capabilities is not None
        assert "service:anonApplicationTokens" not in w2.capabilities.body["_links"]
        path = urlsplit(caps.href("_links", "anonApplicationTokens"))
        href = limited.info.admin_url.removesuffix("/_admin") + path.path + "?" + path.query
        r = await w2.call(
            "POST",
            href,
            json={"applicationSessionId": "a", "allowedOrigins": "https://a.b"},
            headers=w2.sa_headers(),
        )
        assert r.status == 403


async def test_token_body_validation(sim: Simulator, walk: Walk) -> None:
    sip = await walk.mint("asi-1", meeting_url="sip:organizer@contoso.com;gruu;opaque=app:conf:focus:id:X")
    assert sip.status == 400 and sip.body["subcode"] == "ParameterValidationFailure"
    assert "SIP" in sip.body["message"]
    unknown = await walk.mint("asi-1", meeting_url="https://meet.sim.anonjoin.invalid/contoso/organizer/NOPE")
    assert unknown.status == 404 and unknown.body["subcode"] == "DestinationNotFound"
    http_origin = await walk.mint("asi-1", origins="http://contoso.com")
    assert http_origin.status == 400
    assert (await walk.mint("asi-1", origins=" ; ")).status == 400
    assert (await walk.mint("", origins="https://a.com")).status == 400
    no_asi = await walk.call(
        "POST",
        walk.capabilities.href("_links", "anonApplicationTokens"),  # type: ignore[union-attr]
        json={"allowedOrigins": "https://a.com"},
        headers=walk.sa_headers(),
    )
    assert no_asi.status == 400 and "applicationSessionId" in no_asi.body["message"]
    chat = await walk.mint("asi-chat", meeting_url="")
    assert chat.status == 200
    claims = jwt.decode(chat.body["token"][5:], options={"verify_signature": False})
    assert "confid" not in claims


async def test_origins_are_normalised(sim: Simulator, walk: Walk) -> None:
    r = await walk.mint(
        "asi-o", origins="https://Contoso.com/some/path?x=1;https://litware.com:8443/; https://contoso.com"
    )
    assert r.status == 200
    claims = jwt.decode(r.body["token"][5:], options={"verify_signature": False})
    assert claims["ao"] == "https://contoso.com;https://litware.com:8443"


async def test_discover_link_carries_the_token_encoded_twice(sim: Simulator, walk: Walk) -> None:
    r = await walk.mint("asi-d")
    href = r.body["_links"]["service:discover"]["href"]
    assert href.startswith(sim.info.discover_url + "?anonymousContext=psat%253D")
    assert unquote(unquote(href.split("=", 1)[1])) == r.body["token"]


async def test_adhoc_meeting_then_join_it(sim: Simulator, walk: Walk) -> None:
    assert walk.capabilities is not None
    url = walk.capabilities.href("_embedded", "adhocMeetings", "_links", "self")
    r = await walk.call(
        "POST", url, json={"subject": "Standup", "accessLevel": "Everyone"}, headers=walk.sa_headers()
    )
    assert r.status == 201
    body = r.body
    assert body["joinUrl"].endswith("/" + body["conferenceId"])
    assert body["onlineMeetingUri"].endswith("app:conf:focus:id:" + body["conferenceId"])
    assert body["expirationTime"].endswith("Z")
    assert {"self", "service:discover", "service:joinAdhocMeeting"} <= set(body["_links"])
    guest = await walk.join(meeting_url=body["joinUrl"])
    events = await guest.events_until("onlineMeetingInvitation", "completed")
    assert events[-1]["status"] == "Success"
    assert sim.snapshot()["meetings"][body["conferenceId"]]["roster"] == [guest.asi]
    bad = await walk.call("POST", url, json={"accessLevel": "Everybody"}, headers=walk.sa_headers())
    assert bad.status == 400


async def test_adhoc_locked_meeting_denies_anonymous_guests(walk: Walk) -> None:
    assert walk.capabilities is not None
    url = walk.capabilities.href("_embedded", "adhocMeetings", "_links", "self")
    r = await walk.call("POST", url, json={"accessLevel": "Locked"}, headers=walk.sa_headers())
    guest = await walk.join(meeting_url=r.body["joinUrl"])
    events = await guest.events_until("onlineMeetingInvitation", "completed")
    assert events[-1]["status"] == "Failure" and events[-1]["reason"]["subcode"] == "Denied"
