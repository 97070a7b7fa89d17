"""A first join whose step runs out of retries on transient failures starts over (issue 6).

At the chaos profile's ~20% faulted requests, about one step in 10^4 meets more failures in a row than
``RetryPolicy.attempts``; the guest then starts over from a fresh psat (same applicationSessionId) after a
backoff, bounded by the rejoin policy and by its first join's deadline, instead of failing for good.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from anonjoin import GuestEvent, Hooks, JoinFailed, RejoinPolicy, StepEvent
from anonjoin.simulator import Simulator

from support.policies import CLIENT_REJOIN, CLIENT_RETRY
from support.simulator import client_for, live_apps, rule, timeline
from support.tasks import our_tasks

SimFactory = Callable[..., Simulator]


async def test_a_step_out_of_retries_starts_the_first_join_over(sim_factory: SimFactory) -> None:
    async with sim_factory() as sim:
        sim.set_faults(rule("anon_discover", "503", retry_after=0.01))

        def faults_off(ev: StepEvent) -> None:  # every attempt of the step fails, then the service recovers
            if ev.step == "anon_discover" and ev.phase == "end" and ev.attempt == CLIENT_RETRY.attempts:
                sim.set_faults("none")

        async with client_for(sim, hooks=Hooks(on_step=faults_off)) as client:
            g = await client.join(
                meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada"
            )
            asi = g.application_session_id
            assert g.rejoins == 0  # a first join that started over is not a rejoin
            assert timeline(sim, asi)[: CLIENT_RETRY.attempts + 3] == [
                ("anon_tokens", 200),
                *[("anon_discover", 503)] * CLIENT_RETRY.attempts,
                ("anon_tokens", 200),  # started over: a fresh psat for the same applicationSessionId
                ("anon_discover", 200),
            ]
            await g.leave()
            assert live_apps(sim) == 0
    assert our_tasks() == []


@pytest.mark.parametrize(
    "rejoin",
    [RejoinPolicy(enabled=False), dataclasses.replace(CLIENT_REJOIN, attempts=2)],
    ids=["rejoin-off", "two-restarts"],
)
async def test_a_step_failing_on_and_on_fails_the_join_after_bounded_restarts(
    sim_factory: SimFactory, rejoin: RejoinPolicy
) -> None:
    async with sim_factory() as sim:
        sim.set_faults(rule("anon_discover", "503", retry_after=0.01))
        async with client_for(sim, rejoin=rejoin) as client:
            with pytest.raises(JoinFailed) as info:
                await client.join(
                    meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada"
                )
            assert info.value.reason == "Overloaded"  # the 503s' subcode
        requests = sim.snapshot()["requests"]
        runs = 1 + (rejoin.attempts if rejoin.enabled else 0)
        assert requests["anon_tokens"] == {"200": runs}
        assert requests["anon_discover"] == {"503": runs * CLIENT_RETRY.attempts}
    assert our_tasks() == []


async def test_psat_renewals_before_the_guest_is_in_are_not_failures(sim_factory: SimFactory) -> None:
    """A chain slower than the psat's life (a loaded machine, a short-lived psat) renews the psat before
    the guest is in, more times than the rejoin policy has attempts. Those renewals are routine, not
    failures: the guest joins once the chain is fast enough, within its first join's deadline."""
    renewals: list[GuestEvent] = []
    async with sim_factory(psat_ttl_s=2.0) as sim:  # renewed 1.5 s after each mint (CLIENT_REJOIN's margin)
        sim.set_faults(rule("invitations", "latency", latency_s=1.6))

        def on_guest(ev: GuestEvent) -> None:
            if ev.kind == "rejoining":
                renewals.append(ev)
                if len(renewals) == CLIENT_REJOIN.attempts + 1:
                    sim.set_faults("none")

        async with client_for(sim, hooks=Hooks(on_guest=on_guest)) as client:
            g = await client.join(
                meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada"
            )
            assert [ev.reason for ev in renewals] == ["TokenExpiring"] * (CLIENT_REJOIN.attempts + 1)
            assert g.rejoins == 0
            await g.leave()
            assert live_apps(sim) == 0
    assert our_tasks() == []


async def test_psat_renewals_before_the_guest_is_in_stop_at_its_deadline(sim_factory: SimFactory) -> None:
    retry = dataclasses.replace(CLIENT_RETRY, guest_deadline_s=6.0)
    async with sim_factory(psat_ttl_s=2.0) as sim:
        sim.set_faults(rule("invitations", "latency", latency_s=1.6))  # never fast enough
        async with client_for(sim, retry=retry) as client:
            with pytest.raises(JoinFailed):
                await client.join(
                    meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada"
                )
        assert live_apps(sim) == 0
    assert our_tasks() == []


async def test_invalid_token_on_every_attempt_of_the_mint_starts_over(sim_factory: SimFactory) -> None:
    """A 403 InvalidToken is retried even after a refresh (protocol.md §4.2); out of attempts, it starts
    the join over like any transient failure."""
    async with sim_factory() as sim:
        sim.set_faults(rule("anon_tokens", "invalid_token"))

        def faults_off(ev: StepEvent) -> None:
            if ev.step == "anon_tokens" and ev.phase == "end" and ev.attempt == CLIENT_RETRY.attempts:
                sim.set_faults("none")

        async with client_for(sim, hooks=Hooks(on_step=faults_off)) as client:
            g = await client.join(
                meeting_url=sim.info.meeting_url, origin=sim.info.origin, display_name="Ada"
            )
            assert timeline(sim, g.application_session_id)[: CLIENT_RETRY.attempts + 2] == [
                *[("anon_tokens", 403)] * CLIENT_RETRY.attempts,
                ("anon_tokens", 200),
                ("anon_discover", 200),
            ]
            await g.leave()
    assert our_tasks() == []
