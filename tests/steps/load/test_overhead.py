"""The runner's cheap paths (issue 5): join slots without a task per arrival, step starts only when wanted."""

from __future__ import annotations

import asyncio

from anonjoin._core.events import Hooks, Observer, StepEvent
from anonjoin._load.metrics import Metrics
from anonjoin._load.runner import _JoinSlots


async def test_join_slots_hand_over_in_order_and_a_stop_releases_the_waiters() -> None:
    slots = _JoinSlots(1)
    assert await slots.acquire()
    first = asyncio.ensure_future(slots.acquire())
    second = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not first.done() and not second.done()
    slots.release()  # handed to the first waiter, not to the pool
    assert await first
    assert not second.done()
    slots.stop()
    assert await second is False
    assert await slots.acquire() is False  # stopped: no more slots, even a free one


async def test_a_cancelled_waiter_passes_on_a_slot_it_was_handed() -> None:
    slots = _JoinSlots(1)
    assert await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    other = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed to ``waiter``...
    waiter.cancel()  # ...which is cancelled before it resumes: the slot goes on to ``other``
    await asyncio.gather(waiter, return_exceptions=True)
    assert await other


def test_metrics_hooks_do_not_ask_for_step_starts_unless_a_chained_hook_does() -> None:
    m = Metrics()
    assert m.hooks().step_starts is False
    assert m.hooks(Hooks(on_guest=lambda ev: None)).step_starts is False
    seen: list[StepEvent] = []
    assert m.hooks(Hooks(on_step=seen.append)).step_starts is True
    assert m.hooks(Hooks(on_step=seen.append, step_starts=False)).step_starts is False


def test_an_observer_passes_step_starts_only_to_a_hook_that_wants_them() -> None:
    seen: list[StepEvent] = []
    start = StepEvent("g", "events", "start", 1)
    end = StepEvent("g", "events", "end", 1, outcome="ok", duration_s=0.1)
    quiet = Observer(Hooks(on_step=seen.append, step_starts=False))
    assert quiet.wants_steps() and not quiet.wants_step_starts()
    quiet.step(start)
    quiet.step(end)
    assert seen == [end]
    seen.clear()
    chatty = Observer(Hooks(on_step=seen.append))
    assert chatty.wants_step_starts()
    chatty.step(start)
    chatty.step(end)
    assert seen == [start, end]
