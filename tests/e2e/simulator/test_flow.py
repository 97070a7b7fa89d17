"""The whole flow of protocol.md §1 over real loopback TLS, with plain aiohttp requests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt

from anonjoin.simulator import Simulator, SimulatorConfig

from support.walk import JOIN_EVENTS, Walk, kinds


async def test_whole_flow_then_rejoin_with_the_same_session_id(sim: Simulator, walk: Walk) -> None:
    asi = "5a1c7b1e-0000-4000-8000-000000000001"
    guest = await walk.guest(asi)
    token = guest.token_reply
    assert token.status == 200
    assert token.body["token"].startswith("psat=")
    assert "psat%253D" in token.body["_links"]["service:discover"]["href"]

    discover = await guest.discover()
    assert discover.status == 200
    conference = discover.body["conferenceId"]
    assert conference.endswith(";gruu;opaque=app:conf:focus:id:" + sim.info.conference_id)

    app = await guest.create_app("Ada")
    assert app.body["_embedded"]["me"]["name"] == "Ada"
    assert app.body["_embedded"]["me"]["uri"].endswith("@anonymous.invalid")
    assert "ack=1" in app.body["_links"]["events"]["href"]

    invitation = await guest.invite()
    assert invitation.status == 201
    assert invitation.text == ""
    assert "/communication/onlineMeetingInvitations/" in invitation.headers["Location"]

    events = await guest.events_until("onlineMeetingInvitation", "completed")
    assert kinds(events) == JOIN_EVENTS
    assert events[0]["_embedded"]["onlineMeetingInvitation"]["state"] == "Connecting"
    assert events[-1]["status"] == "Success"
    assert events[-1]["_embedded"]["onlineMeetingInvitation"]["state"] == "Connected"
    assert {e["_embedded"]["onlineMeetingInvitation"]["operationId"] for e in (events[0], events[-1])} == {
        "op-" + asi[:8]
    }
    snap = sim.snapshot()
    assert snap["meetings"][sim.info.conference_id]["roster"] == [asi]

    # The old application parks a poll; the rejoin evicts it.
    # (whether it is already parked when the eviction happens or arrives after it: 404 either way)
    parked = asyncio.ensure_future(guest.poll())
    again = await walk.guest(asi)
    assert again.token_reply.status == 200
    await again.create_app("Ada")
    old_poll = await asyncio.wait_for(parked, 5)
    assert old_poll.status == 404
    assert old_poll.body["subcode"] == "ApplicationNotFound"
    assert (await guest.poll()).status == 404
    assert (await again.invite()).status == 201
    events = await again.events_until("onlineMeetingInvitation", "completed")
    assert events[-1]["status"] == "Success"
    snap = sim.snapshot()
    assert snap["meetings"][sim.info.conference_id]["roster"] == [asi]
    assert snap["applications"]["created_by_asi"][asi] == 2
    assert snap["applications"]["live"] == 1

    # Leaving.
    deleted = await again.delete()
    assert deleted.status == 204
    assert sim.snapshot()["meetings"][sim.info.conference_id]["roster"] == []
    assert (await again.poll()).status == 404


async def test_psat_claims_and_expiry_time(sim: Simulator, walk: Walk) -> None:
    guest = await walk.guest("asi-claims")
    raw = guest.psat.removeprefix("psat=")
    header = jwt.get_unverified_header(raw)
    assert header["alg"] == "RS256" and header["x5t"]
    claims = jwt.decode(raw, options={"verify_signature": False})
    assert {"nbf", "exp", "asi", "aeu", "ao", "ruu", "confid", "ucwaext"} <= set(claims)
    assert claims["asi"] == "asi-claims"
    assert claims["aeu"] == sim.info.endpoint_id
    assert claims["exp"] - claims["nbf"] == 8 * 3600
    assert claims["ucwaext"] == sim.info.pool_url + "/ucwa/psanon/v1"
    expiry = guest.token_reply.body["expiryTime"]
    assert expiry == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(claims["exp"])) + ".000Z"


async def test_starting_a_simulator_is_cheap(sim: Simulator) -> None:
    started = time.perf_counter()
    async with Simulator(SimulatorConfig(seed=2)) as other:
        assert other.info.discover_url != sim.info.discover_url
    assert time.perf_counter() - started < 0.25


def test_public_names() -> None:
    import anonjoin.simulator as pkg

    assert pkg.__all__ == sorted(pkg.__all__)
    for name in pkg.__all__:
        assert getattr(pkg, name).__module__.startswith("anonjoin.simulator._")


async def test_closing_the_simulator_releases_parked_polls(sim_factory: Any, open_walk: Any) -> None:
    async with sim_factory() as sim, open_walk(sim) as walk:
        guest = await walk.join()
        await guest.events_until("onlineMeetingInvitation", "completed")
        app = sim.core.state.app_for_asi(guest.asi)
        assert app is not None
        arrived = asyncio.Event()
        poll = app.channel.poll

        async def spy(ack: int | None, key: str | None) -> Any:
            arrived.set()
            return await poll(ack, key)

        app.channel.poll = spy
        parked = asyncio.ensure_future(guest.poll())
        await asyncio.wait_for(arrived.wait(), 5)
        started = time.perf_counter()
        await sim.aclose()
        reply = await asyncio.wait_for(parked, 5)
        assert reply.status == 503
        assert time.perf_counter() - started < 2
