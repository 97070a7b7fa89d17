"""A joined guest stays joined with its poll parked for longer than any step's deadline."""

from __future__ import annotations

import asyncio

from anonjoin import GuestState, RetryPolicy
from anonjoin.simulator import Simulator

from support.simulator import client_for


async def test_parked_poll_outlives_the_step_deadline(sim: Simulator) -> None:
    # The server holds a poll for up to 180 s; the step deadline here is far shorter. The poll must not be
    # cut at the step deadline (which used to fail every guest held longer than it).
    short = RetryPolicy(attempts=3, wait_initial=0.01, wait_max=0.05, jitter=0.0, step_deadline_s=0.3,
                        guest_deadline_s=20, request_timeout_s=0.3, connect_timeout_s=0.2)  # fmt: skip
    async with client_for(sim, retry=short) as client:
        guest = await client.join(
            meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada"
        )
        closed = asyncio.ensure_future(guest.wait_closed())
        done, _ = await asyncio.wait({closed}, timeout=1.5)  # five step deadlines
        assert not done, closed.result()
        assert guest.state is GuestState.JOINED
        events = sim.snapshot()["requests"]["events"]
        assert set(events) <= {"200"}, events  # no poll was abandoned and re-sent
        assert sim.snapshot()["meetings"][sim.info.conference_id]["roster"] == [guest.application_session_id]
        await guest.leave()
        await closed
    assert sim.snapshot()["applications"]["live"] == 0
