"""The admin view (HTTP and in-process), request counts, fault injection through the dispatcher and the
per-guest timelines a client test uses to check that Retry-After was honoured."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from anonjoin.simulator import FaultProfile, FaultRule, Simulator

from support.walk import Walk


async def test_state_snapshot_over_http_equals_the_in_process_one(sim: Simulator, walk: Walk) -> None:
    guest = await walk.join()
    await guest.events_until("onlineMeetingInvitation", "completed")
    r = await walk.call("GET", sim.info.admin_url + "/state")
    assert r.status == 200
    snap = sim.snapshot()
    assert r.body == json.loads(json.dumps(snap))
    assert {"requests", "faults_injected", "meetings", "applications", "guests"} <= set(snap)
    assert snap["requests"]["anon_tokens"] == {"200": 1}
    assert snap["requests"]["aad_token"] == {"200": 1}
    assert snap["requests"]["invitations"] == {"201": 1}
    meeting = snap["meetings"][sim.info.conference_id]
    assert meeting["meeting_url"] == sim.info.meeting_url and meeting["roster"] == [guest.asi]
    assert meeting["ended"] is False
    assert snap["applications"]["live"] == 1 and snap["applications"]["created"] == 1
    routes = [entry["route"] for entry in snap["guests"][guest.asi]]
    assert routes[:4] == ["anon_tokens", "anon_discover", "anon_applications", "invitations"]
    assert all(set(e) == {"route", "t", "status", "retry_after", "app"} for e in snap["guests"][guest.asi])
    assert "admin" not in snap["requests"] and "_admin" not in json.dumps(snap["requests"])


async def test_admin_actions_over_http(sim: Simulator, walk: Walk) -> None:
    admin = sim.info.admin_url
    created = await walk.call("POST", admin + "/meetings", json={"lobby": "deny", "lobby_delay_s": 0.01})
    assert created.status == 201
    denied = await walk.join(meeting_url=created.body["meeting_url"])
    events = await denied.events_until("onlineMeetingInvitation", "completed")
    assert events[-1]["reason"]["subcode"] == "Denied"
    assert (await walk.call("POST", admin + "/meetings", json={"lobby": "maybe"})).status == 400

    a, b = await walk.join(), await walk.join()
    for g in (a, b):
        await g.events_until("onlineMeetingInvitation", "completed")
    assert (await walk.call("POST", f"{admin}/guests/{quote(a.asi)}/eject")).status == 200
    assert (await a.events_until("conversation", "deleted"))[0]["reason"]["subcode"] == "Ejected"
    assert (await walk.call("POST", f"{admin}/guests/{quote(b.asi)}/drop")).status == 200
    assert (await walk.call("POST", f"{admin}/guests/nobody/drop")).status == 404
    c = await walk.join()
    await c.events_until("onlineMeetingInvitation", "completed")
    assert (await walk.call("POST", f"{admin}/meetings/{sim.info.conference_id}/end")).status == 200
    assert (await c.events_until("conversation", "deleted"))[0]["reason"]["subcode"] == "Ended"
    assert (await walk.call("POST", f"{admin}/meetings/NOPE/end")).status == 404
    assert (await walk.call("GET", f"{admin}/nothing")).status == 404


async def test_admin_faults_get_and_put(sim: Simulator, walk: Walk) -> None:
    url = sim.info.admin_url + "/faults"
    assert (await walk.call("GET", url)).body["name"] == "none"
    named = await walk.call("PUT", url, json={"name": "throttled"})
    assert named.status == 200 and sim.core.profile.name == "throttled"
    custom = {"name": "mine", "rules": [{"route": "events", "kind": "503", "rate": 0.5}]}
    assert (await walk.call("PUT", url, json=custom)).status == 200
    assert (await walk.call("GET", url)).body["rules"][0]["kind"] == "503"
    assert (await walk.call("PUT", url, json={"rules": [{"kind": "418", "rate": 1}]})).status == 400
    assert (await walk.call("PUT", url, data=b"{")).status == 400


async def test_faults_are_injected_counted_and_timed_per_guest(sim: Simulator, walk: Walk) -> None:
    guest = await walk.join()
    sim.set_faults(FaultProfile(rules=(FaultRule(route="events", kind="429", rate=1.0, retry_after=2.0),)))
    r = await guest.poll()
    assert r.status == 429 and r.headers["Retry-After"] == "2"
    assert r.body["code"] == "TooManyRequests"
    assert r.headers["X-MS-Correlation-Id"]
    snap = sim.snapshot()
    assert snap["faults_injected"] == {"events": {"429": 1}}
    assert snap["requests"]["events"] == {"429": 1}
    last = snap["guests"][guest.asi][-1]
    assert last["route"] == "events" and last["status"] == 429 and last["retry_after"] == 2.0
    sim.set_faults("none")
    assert (await guest.poll()).status == 200


async def test_invalid_token_bursts_and_closed_connections(sim: Simulator, walk: Walk) -> None:
    sim.set_faults(FaultProfile(rules=(FaultRule(route="@sa", kind="invalid_token", rate=1.0),)))
    r = await walk.call("GET", sim.info.discover_url, headers=walk.sa_headers())
    assert r.status == 403 and r.body["subcode"] == "InvalidToken" and "InvalidToken" in r.headers["Warning"]
    sim.set_faults(FaultProfile(rules=(FaultRule(route="anon_tokens", kind="close", rate=1.0),)))
    with pytest.raises(aiohttp.ClientPayloadError):
        await walk.mint("asi-close")
    assert sim.snapshot()["faults_injected"]["anon_tokens"] == {"close": 1}
    assert sim.snapshot()["guests"]["asi-close"][-1]["route"] == "anon_tokens"


async def test_http_date_retry_after_is_recorded_in_seconds(sim_factory: Any, open_walk: Any) -> None:
    rule = FaultRule(
        route="anon_tokens", kind="503", rate=1.0, retry_after=30.0, retry_after_form="http-date"
    )
    async with sim_factory(faults=FaultProfile(rules=(rule,))) as sim, open_walk(sim) as walk:
        r = await walk.mint("asi-date")
        assert r.status == 503 and r.headers["Retry-After"].endswith("GMT")
        entry = sim.snapshot()["guests"]["asi-date"][-1]
        assert 28 <= entry["retry_after"] <= 31


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/state"), ("GET", ""), ("PUT", "/faults"), ("POST", "/meetings"), ("POST", "/guests/a/drop")],
)
async def test_admin_view_needs_its_token(sim: Simulator, walk: Walk, method: str, path: str) -> None:
    url = sim.info.admin_url + path
    before = sim.snapshot()
    # Walk.call adds the token to admin URLs: these go through its raw session, without it or with a wrong one
    async with walk.session.request(method, url, json={"name": "chaos"}) as r:
        assert r.status == 401, await r.text()
        assert "X-Admin-Token" in (await r.json())["error"]
    wrong = sim.info.admin_token[:-1] + ("A" if sim.info.admin_token[-1] != "A" else "B")
    headers = {"X-Admin-Token": wrong}
    async with walk.session.request(method, url, json={"name": "chaos"}, headers=headers) as r:
        assert r.status == 403
        text = await r.text()
        assert wrong not in text and sim.info.admin_token not in text
    after = sim.snapshot()
    assert after["faults"] == before["faults"] and after["meetings"].keys() == before["meetings"].keys()
    assert (await walk.call("GET", sim.info.admin_url + "/state")).status == 200  # with the token: served


async def test_admin_token_is_fresh_per_simulator_and_out_of_reprs(sim: Simulator) -> None:
    async with Simulator() as other:
        assert other.info.admin_token != sim.info.admin_token
        assert len(other.info.admin_token) >= 32
        assert other.info.admin_token not in repr(other.info)
