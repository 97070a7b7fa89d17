"""The service application's side, sans I/O: discovery as a generator fed answers, the psat POST's body
and answer (its lifetime against the service's clock), and the stale-link rule."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from yarl import URL

from anonjoin._core.conversation import Send
from anonjoin._core.service import Capabilities, discovery, grant_from, stale_link, token_body
from anonjoin._exceptions import ProtocolError, ServiceError

HOST = URL("https://sa.contoso.com")


@dataclass
class Resp:
    body: bytes
    url: URL = HOST
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    correlation_id: str | None = None


def answer(url: str, d: dict[str, Any]) -> Resp:
    return Resp(json.dumps(d).encode(), HOST.join(URL(url)))


def test_discovery_asks_three_gets_and_returns_the_capabilities() -> None:
    steps = discovery(HOST.join(URL("/platformservice/discover")), "sip:app@contoso.com", 12.5)
    first = next(steps)
    assert (first.step, first.method, first.url.path) == ("discover", "GET", "/platformservice/discover")
    apps = steps.send(
        answer("/platformservice/discover", {"_links": {"service:applications": {"href": "/apps"}}})
    )
    assert isinstance(apps, Send) and apps.step == "applications"
    assert apps.url.query["endpointId"] == "sip:app@contoso.com"
    caps = steps.send(answer("/apps", {"_links": {"application": {"href": "/apps/1"}}}))
    assert caps.step == "capabilities" and caps.url.path == "/apps/1"
    links = {"anonApplicationTokens": {"href": "/apps/1/tokens"}, "adhocMeetings": {"href": "/apps/1/m"}}
    with pytest.raises(StopIteration) as done:
        steps.send(answer("/apps/1", {"_links": links}))
    got = done.value.value
    assert isinstance(got, Capabilities) and got.fetched_at == 12.5
    assert got.anon_tokens_url == HOST.join(URL("/apps/1/tokens"))
    assert got.adhoc_meetings_url == HOST.join(URL("/apps/1/m"))


def test_discovery_without_a_link_is_a_protocol_error_naming_the_step() -> None:
    steps = discovery(HOST, "sip:app@contoso.com", 0.0)
    next(steps)
    with pytest.raises(ProtocolError) as info:
        steps.send(answer("/", {"_links": {}}))
    assert info.value.step == "discover"


def test_the_token_body_leaves_the_meeting_out_for_an_identity_psat() -> None:
    assert json.loads(token_body("https://m/1", ["https://a", "https://b"], "asi")) == {
        "applicationSessionId": "asi", "allowedOrigins": "https://a;https://b", "meetingUrl": "https://m/1",
    }  # fmt: skip
    assert "meetingUrl" not in json.loads(token_body(None, "https://a", "asi"))


def test_a_grants_lifetime_is_measured_against_the_services_clock() -> None:
    r = answer(
        "/t",
        {"token": "psat=x", "expiryTime": "2030-01-01T01:00:00Z", "_links": {"discover": {"href": "/d"}}},
    )
    server_now = 1893456000.0  # 2030-01-01T00:00:00Z
    g = grant_from(
        r, application_session_id="asi", meeting_url=None, now=server_now + 7200, server_now=server_now
    )
    assert g.lifetime_s == pytest.approx(3600.0)  # the client's clock two hours ahead does not count
    assert g.meeting_url == "" and g.discover_url == str(HOST.join(URL("/d")))


@pytest.mark.parametrize(
    ("subcode", "refetched", "stale"),
    [(None, False, True), (None, True, False), ("DestinationNotFound", False, False)],
)
def test_a_404_on_the_token_post_means_a_stale_link_once(
    subcode: str | None, refetched: bool, stale: bool
) -> None:
    error = ServiceError(step="anon_tokens", status=404, subcode=subcode)
    assert stale_link("anon_tokens", error, refetched=refetched) is stale
