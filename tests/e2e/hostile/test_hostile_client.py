"""Issue 11, the client side: a hostile or broken server never makes the client leak a token or spin.

One test per class of misbehaviour, against :mod:`support.hostile` on real loopback sockets. Each
ends in bounded time with a typed error (or, for idle polls, a bounded number of requests), asserted on
request counts and on an injected clock, never on wall time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from yarl import URL

from anonjoin import Clock, InsecureTarget, JoinFailed, RejoinPolicy, RetryPolicy, ServiceError
from anonjoin._async.client import Client
from anonjoin._async.http import HttpClient, make_ssl_context
from anonjoin._async.retry import Attempt
from anonjoin._core import constants as C
from anonjoin.simulator import Simulator

from support.hostile import CA_FILE, Credential, Hostile, Misbehaviour, hostile, iso

MEETING = "https://meet.contoso.com/org/HOSTILE1"
ORIGIN = "https://app.contoso.com"
RETRY = RetryPolicy(attempts=4, wait_initial=0.01, wait_max=0.05, jitter=0.0, step_deadline_s=10,
                    guest_deadline_s=20, request_timeout_s=5)  # fmt: skip
REJOIN = RejoinPolicy(attempts=2, wait_initial=0.01, wait_max=0.05, jitter=0.0, min_psat_lifetime_s=1.0)


class VirtualClock(Clock):
    """Monotonic and epoch time that sleeps advance at once (no real waiting); ``slept`` is their sum.
    ``frozen``: only sleeps move it (real time does not count: a loaded machine cannot make a request
    look slow)."""

    def __init__(self, *, frozen: bool = False) -> None:
        super().__init__()
        self.slept = 0.0
        self.sleeps: list[float] = []
        self.past = asyncio.Event()  # set once ``slept`` reaches ``mark``
        self.mark = float("inf")
        mono0, wall0 = time.monotonic(), time.time()

        def monotonic() -> float:
            return (mono0 if frozen else time.monotonic()) + self.slept

        def now() -> float:
            return (wall0 if frozen else time.time()) + self.slept

        async def sleep(s: float) -> None:
            self.sleeps.append(s)
            self.slept += max(0.0, s)
            if self.slept >= self.mark:
                self.past.set()
            await asyncio.sleep(0)

        self.monotonic = monotonic
        self.time = now
        self.sleep = sleep


@asynccontextmanager
async def client_for(h: Hostile, **kw: Any) -> AsyncIterator[Client]:
    kw.setdefault("retry", RETRY)
    kw.setdefault("rejoin", REJOIN)
    kw.setdefault("clock", VirtualClock())
    client = Client(
        discover_url=h.discover_url,
        endpoint_id="sip:app@contoso.com",
        credential=Credential(),
        ca_file=CA_FILE,
        **kw,
    )
    try:
        yield client
    finally:
        await client.aclose()


async def join(client: Client) -> Any:
    return await client.join(meeting_url=MEETING, origin=ORIGIN, display_name="Mallory's guest")


# --- 1. tokens only over https, only to the service's hosts ---------------------------------------------

TOKEN_CASES = {
    "redirect_http": "anon_tokens",  # 307 of the token POST (AAD bearer) to http
    "redirect_foreign": "anon_tokens",  # 307 of it to a host the service never named (localhost)
    "href_http": "anon_tokens",  # capabilities name an http anonApplicationTokens (AAD bearer)
    "href_http_guest": "anon_applications",  # anonymous discover names an http anonApplications (psat)
}


@pytest.mark.parametrize("verify_tls", [True, False])
@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
async def test_a_token_never_goes_over_http_or_off_the_service(case: str, verify_tls: bool) -> None:
    async with hostile(Misbehaviour(token=case)) as h, client_for(h, verify_tls=verify_tls) as client:  # type: ignore[arg-type]
        with pytest.raises(InsecureTarget) as info:
            await join(client)
        assert info.value.step == TOKEN_CASES[case]
        assert h.cleartext_with_token() == []
        assert [s for s in h.seen if s.scheme != "https"] == []  # nothing at all went to the http port
        assert [s for s in h.seen if s.host.startswith("localhost")] == []
        step = TOKEN_CASES[case]
        # final: tried once, not retried, not started over
        assert h.count[step] == (1 if case.startswith("redirect") else 0)
        assert "psat=" not in str(info.value) and "Bearer" not in str(info.value)


async def test_a_request_carrying_authorization_is_never_sent_on_http() -> None:
    """At the one boundary every request goes through, whatever the caller passes."""
    async with hostile() as h:
        http = HttpClient(
            ssl_context=make_ssl_context(None, verify_tls=False),
            max_connections=4,
            user_agent="t",
            connect_timeout_s=5,
        )
        http.trust(URL(h.http))  # even a trusted host: never over http
        try:
            for auth in ("Authorization", "authorization"):
                with pytest.raises(InsecureTarget):
                    await http.request(
                        "anon_tokens",
                        "POST",
                        URL(f"{h.http}/platformservice/v1/applications/1/anonApplicationTokens"),
                        Attempt(1, 5.0, False),
                        headers={auth: "Bearer secret-aad-token"},
                        body=b"{}",
                    )
            r = await http.request(
                "discover", "GET", URL(f"{h.http}/platformservice/discover"), Attempt(1, 5, False)
            )
            assert r.status == 200  # without a token, http is the caller's business
        finally:
            await http.aclose()
        assert h.cleartext_with_token() == []
        assert h.count["anon_tokens"] == 0 and h.count["discover"] == 1


async def test_the_307_to_an_https_pool_host_named_by_the_service_still_works() -> None:
    async with hostile() as h, client_for(h) as client:
        g = await join(client)
        await g.leave()
        assert h.cleartext_with_token() == []


# --- 2. sane expiry -----------------------------------------------------------------------------------

PAST = iso(time.time() - 3600)
EXPIRIES: dict[str, Any] = {
    "past": PAST,
    "bare-number": 12345,
    "missing": None,
    "unparsable": "next tuesday",
    "near": "NEAR",  # under the floor (replaced per test: 0.3 s from now)
}


@pytest.mark.parametrize("case", sorted(EXPIRIES))
async def test_bad_expiry_fails_after_the_recovery_budget_without_spinning(case: str) -> None:
    expiry = EXPIRIES[case]
    if expiry == "NEAR":
        expiry = iso(time.time() + 0.3)
    clock = VirtualClock()
    async with hostile(Misbehaviour(expiry=expiry)) as h, client_for(h, clock=clock) as client:
        g = await join(client)  # the first psat is used: a guest gets in
        outcome = await asyncio.wait_for(g.wait_closed(), 30)
        assert outcome.kind == "failed" and outcome.reason == "BadExpiry"
        assert isinstance(outcome.error, JoinFailed) and outcome.error.reason == "BadExpiry"
        # the first psat plus one per recovery the budget allows, plus the one that exhausted it
        # (and at most LEAVE_REMINTS more: psats for the DELETE, the guest's own having run out)
        assert REJOIN.attempts + 2 <= h.count["anon_tokens"] <= REJOIN.attempts + 2 + C.LEAVE_REMINTS
        # and never faster than the floor: the mints were spread over at least that much (virtual) time
        mint_waits = [s for s in clock.sleeps if 0 < s <= C.REMINT_FLOOR_S]
        assert len(mint_waits) >= 1
        assert h.cleartext_with_token() == []


async def test_clock_skew_alone_does_not_renew() -> None:
    """The server's clock two hours behind ours: its hour-long psat is not taken as expired."""
    clock = VirtualClock()
    bad = Misbehaviour(date_offset_s=-7200)
    async with hostile(bad) as h, client_for(h, rejoin=RejoinPolicy(), clock=clock) as client:
        g = await join(client)
        assert h.count["anon_tokens"] == 1
        due = g._c.rejoin_due
        assert due is not None and due - clock.monotonic() > 3000
        await g.leave()


# --- 3. a floor on polling ----------------------------------------------------------------------------


@pytest.mark.parametrize("poll", ["empty", "heartbeat", "resync"])
async def test_an_idle_channel_answering_at_once_is_not_polled_in_a_loop(poll: str) -> None:
    clock = VirtualClock(frozen=True)  # an answer "at once" stays at once however loaded the machine is
    clock.mark = 120.0  # two minutes of (virtual) holding
    async with hostile(Misbehaviour(poll=poll)) as h, client_for(h, clock=clock) as client:  # type: ignore[arg-type]
        g = await join(client)
        await asyncio.wait_for(clock.past.wait(), 30)
        polls = h.count["events"]
        # backoff doubles from POLL_IDLE_WAIT_INITIAL_S to POLL_IDLE_WAIT_MAX_S, then holds there
        ramp = 6  # 0.1 .. 3.2 s, then 5 s
        assert polls <= 1 + ramp + 120 / C.POLL_IDLE_WAIT_MAX_S + 2, polls
        assert max(clock.sleeps) == C.POLL_IDLE_WAIT_MAX_S
        await g.leave()


# --- 4. every deadline is a deadline --------------------------------------------------------------------


async def test_a_response_that_never_ends_is_cut_at_the_guest_deadline() -> None:
    retry = dataclasses.replace(
        RETRY, guest_deadline_s=2.0, step_deadline_s=1.5, request_timeout_s=1.0, connect_timeout_s=5.0
    )
    clock = Clock()  # real time: what is cut here is aiohttp's timer
    async with (
        hostile(Misbehaviour(drip="anon_tokens")) as h,
        client_for(h, retry=retry, clock=clock) as client,
    ):
        t0 = clock.monotonic()
        with pytest.raises(JoinFailed) as info:
            await join(client)
        took = clock.monotonic() - t0
        assert info.value.reason == "JoinTimeout"
        # cut at the guest deadline: not the deadline plus a connect timeout (5 s) nor plus a request timeout
        assert took < retry.guest_deadline_s + 1.0, took
        assert h.count["anon_tokens"] <= retry.attempts


async def test_a_shared_step_keeps_its_attempt_cap() -> None:
    """discover failing for every guest: tried ``attempts`` times for all of them, not once more per guest
    or per restart."""
    async with hostile(Misbehaviour(status={"discover": 503})) as h, client_for(h) as client:
        results = await asyncio.gather(*(join(client) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, ServiceError) and r.step == "discover" for r in results), results
        assert h.count["discover"] == RETRY.attempts
        assert h.count["anon_tokens"] == 0


# --- the CLI ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["redirect_http", "href_http", "redirect_foreign"])
async def test_cli_join_refuses_to_leak_a_token(sim: Simulator, case: str) -> None:
    """``anonjoin join`` as a subprocess, its Azure AD the simulator's, its service the hostile server."""
    async with hostile(Misbehaviour(token=case)) as h:  # type: ignore[arg-type]
        info = sim.info
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANONJOIN_")}
        env["ANONJOIN_CLIENT_SECRET"] = info.client_secret
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "anonjoin", "join",
            "--discover-url", h.discover_url, "--authority", info.authority, "--client-id", info.client_id,
            "--endpoint-id", info.endpoint_id, "--meeting-url", info.meeting_url, "--origin", info.origin,
            "--ca-file", info.ca_file,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1, err.decode()
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, err.decode()
        assert "InsecureTarget" in lines[0] and "anon_tokens" in lines[0]
        assert b"Traceback" not in err
        assert info.client_secret.encode() not in out + err
        assert h.cleartext_with_token() == []


# --- the core rules, without sockets --------------------------------------------------------------------


def test_insecure_target_is_final_in_the_one_table() -> None:
    from anonjoin._core.protocol import Action, classify

    for step in ("anon_tokens", "anon_applications", "events", "discover", "delete_application"):
        d = classify(step, InsecureTarget("refusing", step=step))
        assert d.action is Action.FINAL and d.reason == "InsecureTarget"


def test_plan_expiry_bounds_every_bad_expiry() -> None:
    from anonjoin._core.protocol import bad_expiry, plan_expiry

    for stated in (None, float("nan"), -3600.0, -1e9, 0.0, 0.3, 59.0):
        plan = plan_expiry(stated, 60.0)
        assert plan.suspect and plan.lifetime_s >= C.REMINT_FLOOR_S
    assert plan_expiry(None, 60.0).lifetime_s == 60.0
    sane = plan_expiry(3600.0, 60.0)
    assert not sane.suspect and sane.lifetime_s == 3600.0
    assert [bad_expiry(n, 2) for n in range(6)] == [False, False, False, False, True, True]


def test_poll_wait_backs_off_idle_answers_and_resets_on_events() -> None:
    from anonjoin._core.protocol import poll_wait

    w, waits = 0.0, []
    for _ in range(10):
        w = poll_wait(w, 0.001, idle=True)
        waits.append(w)
    assert waits[0] == C.POLL_IDLE_WAIT_INITIAL_S and waits[-1] == C.POLL_IDLE_WAIT_MAX_S
    assert waits == sorted(waits)
    assert poll_wait(w, 0.001, idle=False) == 0.0  # a real event
    assert poll_wait(w, C.POLL_FLOOR_S, idle=True) == 0.0  # the service held the poll
