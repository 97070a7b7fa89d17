"""Each documented variant can be switched on, and a liberal client still walks the whole flow."""

from __future__ import annotations

import re
from typing import Any

import pytest

from anonjoin.simulator import Simulator

from support.walk import Walk

VARIANTS: list[dict[str, Any]] = [
    {"rel_prefix": "ms:rtc:saas:"},
    {"rel_prefix": "alternate"},
    {"date_format": "dotnet"},
    {"date_format": "dotnet_escaped"},
    {"discover_query": "anonymousMeetingJoinContext"},
    {"discover_query": "discoverContext"},
    {"token_status": 201},
    {"mixed_case_hrefs": True},
    {"absolute_hrefs": True},
    {"ucwa_on_pool": False},
    {"my_applications_link": True},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()))
async def test_the_whole_flow_works_under_each_variant(
    variant: dict[str, Any], sim_factory: Any, open_walk: Any
) -> None:
    async with sim_factory(**variant) as sim, open_walk(sim) as walk:
        guest = await walk.join()
        events = await guest.events_until("onlineMeetingInvitation", "completed")
        assert events[-1]["status"] == "Success"
        if "token_status" in variant:
            assert guest.token_reply.status == 201


async def test_relation_prefix_by_setting_and_by_header(
    sim: Simulator, walk: Walk, sim_factory: Any, open_walk: Any
) -> None:
    r = await walk.call("GET", sim.info.discover_url, headers=walk.sa_headers())
    assert set(r.body["_links"]) == {"self", "service:applications"} and r.body["rel"] == "service:discover"
    internal = await walk.call(
        "GET", sim.info.discover_url, headers={**walk.sa_headers(), "X-Ms-Namespace": "internal"}
    )
    assert set(internal.body["_links"]) == {"self", "ms:rtc:saas:applications"}
    async with sim_factory(rel_prefix="ms:rtc:saas:") as wire, open_walk(wire) as w2:
        assert w2.capabilities is not None
        assert "ms:rtc:saas:anonApplicationTokens" in w2.capabilities.body["_links"]
    async with sim_factory(rel_prefix="alternate") as alt, open_walk(alt, setup=False) as w3:
        token = await w3.get_aad_token()
        headers = {"Authorization": "Bearer " + token.body["access_token"]}
        rels = [(await w3.call("GET", alt.info.discover_url, headers=headers)).body["rel"] for _ in range(2)]
        assert sorted(rels) == ["ms:rtc:saas:discover", "service:discover"]


async def test_event_relations_prefixed_on_the_wire(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(event_rel_prefix="ms:rtc:saas:") as sim, open_walk(sim) as walk:
        guest = await walk.join()
        events = await guest.events_until("ms:rtc:saas:onlineMeetingInvitation", "completed")
        assert events and all(e["link"]["rel"].startswith("ms:rtc:saas:") for e in events)
        assert all(k.startswith("ms:rtc:saas:") for e in events for k in e.get("_embedded", {}))
        assert "ms:rtc:saas:onlineMeetingInvitation" in events[-1]["_embedded"]


@pytest.mark.parametrize(
    ("form", "pattern"),
    [
        ("iso", r'"expiryTime": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"'),
        ("dotnet", r'"expiryTime": "/Date\(\d{13}\)/"'),
        ("dotnet_escaped", r'"expiryTime": "\\/Date\(\d{13}\)\\/"'),
        ("dotnet_literal", r'"expiryTime": "\\\\/Date\(\d{13}\)\\\\/"'),
    ],
)
async def test_date_forms(form: str, pattern: str, sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(date_format=form) as sim, open_walk(sim) as walk:
        r = await walk.mint("asi-date")
        assert re.search(pattern, r.text), r.text[:300]


async def test_discover_query_name(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(discover_query="anonymousMeetingJoinContext") as sim, open_walk(sim) as walk:
        r = await walk.mint("asi-q")
        assert "?anonymousMeetingJoinContext=psat%253D" in r.body["_links"]["service:discover"]["href"]


async def test_307_to_the_pool_listener(sim_factory: Any, open_walk: Any) -> None:
    routes = frozenset({"applications", "anon_tokens"})
    async with sim_factory(redirect_routes=routes) as sim, open_walk(sim, setup=False) as walk:
        token = await walk.get_aad_token()
        walk.aad_token = token.body["access_token"]
        url = (
            sim.info.discover_url.replace("/discover", "/v1/applications")
            + "?endpointId="
            + sim.info.endpoint_id
        )
        r = await walk.call("GET", url, headers=walk.sa_headers(), allow_redirects=False)
        assert r.status == 307
        location = r.headers["Location"]
        assert location.startswith(sim.info.pool_url) and location.endswith(
            "?endpointId=" + sim.info.endpoint_id
        )
        followed = await walk.call("GET", location, headers=walk.sa_headers(), allow_redirects=False)
        assert followed.status == 200
        walk.capabilities = await walk.call(
            "GET", followed.href("_links", "application"), headers=walk.sa_headers()
        )
        post_url = walk.capabilities.href("_links", "anonApplicationTokens")
        body = {
            "applicationSessionId": "asi-307",
            "allowedOrigins": sim.info.origin,
            "meetingUrl": sim.info.meeting_url,
        }
        if not post_url.startswith(sim.info.pool_url):
            first = await walk.call(
                "POST", post_url, json=body, headers=walk.sa_headers(), allow_redirects=False
            )
            assert first.status == 307
            post_url = first.headers["Location"]
        minted = await walk.call(
            "POST", post_url, json=body, headers=walk.sa_headers(), allow_redirects=False
        )
        assert minted.status == 200 and minted.body["token"].startswith("psat=")
        assert sim.snapshot()["requests"]["applications"] == {"307": 1, "200": 1}


async def test_paths_and_query_names_match_case_insensitively(sim: Simulator, walk: Walk) -> None:
    main = sim.info.admin_url.removesuffix("/_admin")
    r = await walk.call("GET", main + "/PlatformService/DISCOVER", headers=walk.sa_headers())
    assert r.status == 200
    apps = await walk.call(
        "GET",
        main + "/platformService/v1/Applications?ENDPOINTID=" + sim.info.endpoint_id,
        headers=walk.sa_headers(),
    )
    assert apps.status == 200
    guest = await walk.guest("asi-case")
    d = await guest.discover()
    url = d.href("_links", "anonApplications").replace("/ucwa/psanon/", "/UCWA/PSANON/")
    created = await walk.call(
        "POST", url, json={"culture": "en-US", "userAgent": "t"}, headers=guest.headers()
    )
    assert created.status == 201


async def test_mixed_case_and_absolute_hrefs(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(mixed_case_hrefs=True, absolute_hrefs=True) as sim, open_walk(sim) as walk:
        caps = walk.capabilities
        assert caps is not None
        href = caps.body["_links"]["service:anonApplicationTokens"]["href"]
        assert href.startswith("https://127.0.0.1:") and "/platformService/" in href and "endpointid=" in href
        guest = await walk.join()
        assert guest.app is not None
        assert guest.app.body["_links"]["events"]["href"].startswith(sim.info.pool_url)
        events = await guest.events_until("onlineMeetingInvitation", "completed")
        assert events[-1]["link"]["href"].startswith(sim.info.pool_url)
    async with sim_factory() as sim, open_walk(sim) as walk:
        assert walk.capabilities is not None
        assert walk.capabilities.body["_links"]["self"]["href"].startswith("/platformservice/")


async def test_my_applications_link(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory(my_applications_link=True) as sim, open_walk(sim, setup=False) as walk:
        walk.aad_token = (await walk.get_aad_token()).body["access_token"]
        r = await walk.call("GET", sim.info.discover_url, headers=walk.sa_headers())
        assert {"service:applications", "service:myApplications"} <= set(r.body["_links"])


async def test_307_on_guest_posts_keeps_method_body_and_headers(sim_factory: Any, open_walk: Any) -> None:
    routes = frozenset({"anon_applications", "invitations"})
    async with sim_factory(redirect_routes=routes, ucwa_on_pool=False) as sim, open_walk(sim) as walk:
        guest = await walk.guest("asi-307-guest")
        d = await guest.discover()
        url = d.href("_links", "anonApplications")
        assert not url.startswith(sim.info.pool_url)
        body = {"culture": "en-US", "userAgent": "t"}
        first = await walk.call("POST", url, json=body, headers=guest.headers(), allow_redirects=False)
        assert first.status == 307 and first.headers["Location"].startswith(sim.info.pool_url)
        created = await walk.call("POST", first.headers["Location"], json=body, headers=guest.headers())
        assert created.status == 201
        assert sim.snapshot()["requests"]["anon_applications"] == {"307": 1, "201": 1}
