"""A guest cancelled at any step leaves no task, connection or application behind."""

from __future__ import annotations

import asyncio

import pytest

from anonjoin import GuestState, JoinFailed

from support.fake import ORIGIN, FakeService, fake_client
from support.tasks import our_tasks

MEETING = "https://meet.contoso.com/org/ABC123"
STEPS = [
    "discover", "applications", "capabilities", "anon_tokens", "anon_discover", "anon_applications",
    "invitations", "events",
]  # fmt: skip


def _acquired(client: object) -> int:
    http = client._http  # type: ignore[attr-defined]
    n = 0
    for s in (http._session,):
        if s is not None:
            n += len(s.connector._acquired)
    return n


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("how", ["cancel-join", "leave"])
async def test_cancel_at_each_step(step: str, how: str) -> None:
    fake = FakeService()
    fake.block(step)
    async with fake_client(fake) as (client, _):
        g = client.guest(meeting_url=MEETING, origin=ORIGIN, display_name="Ada")
        task = asyncio.create_task(g.join())
        await asyncio.wait_for(fake.reached[step].wait(), 5)
        if step == "anon_applications":
            # The create is in flight and its answer comes after the cancel: the guest must still learn
            # which application it made, and delete it.
            fake.blocks[step].set()
        if how == "cancel-join":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await g.leave()
            with pytest.raises(JoinFailed):
                await task
        assert g.state is GuestState.LEFT
        assert our_tasks() == []
        assert _acquired(client) == 0
        assert fake.live_apps() == []  # checked before the blocked handler is released
        created = fake.count("anon_applications") and fake.apps
        if created:
            assert fake.count("delete_application") == 1
        assert bool(created) == (step in ("anon_applications", "invitations", "events"))
        out = await g.wait_closed()
        assert out.kind == "left"
    assert our_tasks() == []


async def test_cancel_while_joined_and_client_close() -> None:
    fake = FakeService()
    async with fake_client(fake) as (client, _):
        gs = [await client.join(meeting_url=MEETING, origin=ORIGIN, display_name=f"G{i}") for i in range(3)]
        assert len(fake.live_apps()) == 3
    assert fake.live_apps() == []
    assert all(g.state is GuestState.LEFT for g in gs)
    assert our_tasks() == []
