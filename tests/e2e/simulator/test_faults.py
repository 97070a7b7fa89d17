"""The simulator's fault injector: decisions, reproducibility, profiles, and what a real client sees."""

from __future__ import annotations

import asyncio
import email.utils
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from pydantic import ValidationError

from anonjoin import ConfigurationError
from anonjoin.simulator import Simulator
from anonjoin.simulator._faults import (
    FAULT_DECISION,
    PROFILES,
    ROUTE_GROUPS,
    ROUTES,
    FaultDecision,
    FaultInjector,
    FaultProfile,
    FaultRule,
)

from support.walk import Walk

PROTOCOL_ROUTES = sorted(ROUTE_GROUPS["@protocol"])
NOW = 1_800_000_000.25  # an injected wall clock, mid-second


def profile(*rules: FaultRule, **fields: Any) -> FaultProfile:
    return FaultProfile(rules=rules, **fields)


def kinds(decisions: list[FaultDecision | None]) -> list[str | None]:
    return [d.kind if d else None for d in decisions]


# ---------------------------------------------------------------------------------------------- decisions


def test_none_profile_never_faults() -> None:
    injector = FaultInjector(FaultProfile.load("none"), seed=1)
    assert all(injector.decide(route, "g") is None for route in ROUTES for _ in range(200))
    assert injector.injected == {}


def test_rates_match_the_profile() -> None:
    injector = FaultInjector(
        profile(
            FaultRule(route="events", kind="429", rate=0.10),
            FaultRule(route="events", kind="500", rate=0.05),
        ),
        seed=7,
    )
    counts = Counter(kinds([injector.decide("events", None) for _ in range(10_000)]))
    assert 900 <= counts["429"] <= 1100
    assert 400 <= counts["500"] <= 600
    assert injector.injected == {"events": {"429": counts["429"], "500": counts["500"]}}
    # other routes are untouched by a route-specific rule
    assert all(injector.decide("discover", None) is None for _ in range(500))


def test_rate_one_and_zero() -> None:
    injector = FaultInjector(
        profile(FaultRule(route="discover", kind="504", rate=1.0), FaultRule(kind="500", rate=0.0)), seed=1
    )
    assert kinds([injector.decide("discover") for _ in range(50)]) == ["504"] * 50
    assert all(injector.decide("events") is None for _ in range(50))


def test_rules_match_routes_groups_and_star() -> None:
    rules = (
        FaultRule(route="@sa", kind="invalid_token", rate=1.0),
        FaultRule(route="@guest", kind="503", rate=1.0),
        FaultRule(route="@aad", kind="500", rate=1.0),
    )
    injector = FaultInjector(profile(*rules), seed=3)
    for route in ("discover", "applications", "capabilities", "anon_tokens", "adhoc_meetings"):
        assert kinds([injector.decide(route)]) == ["invalid_token"]
    for route in ("anon_discover", "anon_applications", "invitations", "events", "delete_application"):
        assert kinds([injector.decide(route, "g")]) == ["503"]
    for route in ("aad_openid", "aad_token"):
        assert kinds([injector.decide(route)]) == ["500"]
    star = FaultInjector(profile(FaultRule(kind="close", rate=1.0)), seed=3)
    # "*" also covers routes the simulator adds later
    assert kinds([star.decide(route) for route in [*ROUTES, "some_new_route"]]) == ["close"] * (
        len(ROUTES) + 1
    )


def test_first_matching_rule_wins_on_one_draw() -> None:
    rules = (FaultRule(route="events", kind="429", rate=0.5), FaultRule(kind="500", rate=0.5))
    injector = FaultInjector(profile(*rules), seed=11)
    counts = Counter(kinds([injector.decide("events", "g") for _ in range(4000)]))
    # the two rules together fault every request of "events", half each
    assert counts[None] == 0
    assert 1800 <= counts["429"] <= 2200


def test_decision_carries_the_rule_parameters() -> None:
    rules = (
        FaultRule(route="discover", kind="429", rate=1.0, retry_after=2.5, retry_after_form="http-date"),
        FaultRule(route="events", kind="latency", rate=1.0, latency_s=3.0),
        FaultRule(route="invitations", kind="503", rate=1.0, retry_after=None),
    )
    injector = FaultInjector(profile(*rules), seed=0)
    assert injector.decide("discover") == FaultDecision(
        route="discover", kind="429", rule_index=0, retry_after=2.5, retry_after_form="http-date"
    )
    latency = injector.decide("events", "g1")
    assert latency is not None
    assert (latency.kind, latency.latency_s, latency.status, latency.asi) == ("latency", 3.0, None, "g1")
    unavailable = injector.decide("invitations", "g1")
    assert unavailable is not None
    assert (unavailable.status, unavailable.retry_after) == (503, None)


# ------------------------------------------------------------------------------------- reproducibility


def test_same_seed_same_sequence_same_faults() -> None:
    chaos = FaultProfile.load("chaos")
    requests = [
        (route, f"g{i % 7}" if route in ROUTE_GROUPS["@guest"] else None)
        for i in range(400)
        for route in PROTOCOL_ROUTES
    ]
    one, two = FaultInjector(chaos, seed=42), FaultInjector(chaos, seed=42)
    assert [one.decide(r, a) for r, a in requests] == [two.decide(r, a) for r, a in requests]
    assert one.injected == two.injected
    other = FaultInjector(chaos, seed=43)
    assert kinds([other.decide(r, a) for r, a in requests]) != kinds(
        [FaultInjector(chaos, seed=42).decide(r, a) for r, a in requests]
    )


def _per_key(
    injector: FaultInjector, requests: list[tuple[str, str | None]]
) -> dict[tuple[str, str | None], list[str | None]]:
    out: dict[tuple[str, str | None], list[str | None]] = {}
    for route, asi in requests:
        decision = injector.decide(route, asi)
        out.setdefault((route, asi), []).append(decision.kind if decision else None)
    return out


def test_interleaving_across_routes_and_guests_does_not_change_faults() -> None:
    # Without invalid_token bursts (which span a route), each (route, asi) key has its own stream.
    rules = PROFILES["throttled"].rules + PROFILES["flaky"].rules[:1]
    prof = profile(*rules)
    keys = [(route, asi) for route in PROTOCOL_ROUTES for asi in (None, "a", "b", "c")]
    in_order = [key for key in keys for _ in range(60)]
    round_robin = [key for _ in range(60) for key in keys]
    reversed_robin = [key for _ in range(60) for key in reversed(keys)]
    expected = _per_key(FaultInjector(prof, seed=5), in_order)
    assert _per_key(FaultInjector(prof, seed=5), round_robin) == expected
    assert _per_key(FaultInjector(prof, seed=5), reversed_robin) == expected
    assert any(kind for stream in expected.values() for kind in stream)


def test_invalid_token_burst_spans_the_route() -> None:
    rule = FaultRule(route="applications", kind="invalid_token", rate=0.05, burst=3)
    injector = FaultInjector(profile(rule), seed=9)
    decisions = [injector.decide("applications", None) for _ in range(2000)]
    triggers = [i for i, d in enumerate(decisions) if d is not None and d.burst_index == 0]
    assert triggers
    for i in triggers:
        burst = decisions[i : i + 3]
        assert [d.burst_index if d else None for d in burst] == [0, 1, 2]
    assert injector.injected["applications"]["invalid_token"] == sum(d is not None for d in decisions)
    # a burst continues for whoever calls the route next, and leaves other routes alone
    injector = FaultInjector(profile(rule), seed=9)
    first = triggers[0]
    for _ in range(first):
        injector.decide("applications", None)
    assert kinds([injector.decide("applications", None)]) == ["invalid_token"]
    assert injector.decide("discover", None) is None
    assert kinds(
        [injector.decide("applications", "guest-x"), injector.decide("applications", "guest-y")]
    ) == [
        "invalid_token",
        "invalid_token",
    ]


def test_set_profile_swaps_at_run_time() -> None:
    injector = FaultInjector(FaultProfile.load("none"), seed=1)
    assert injector.decide("events", "g") is None
    injector.set_profile(profile(FaultRule(route="events", kind="500", rate=1.0)))
    assert kinds([injector.decide("events", "g")]) == ["500"]
    assert injector.profile.rules[0].kind == "500"
    injector.set_profile(FaultProfile.load("none"))
    assert injector.decide("events", "g") is None
    assert injector.injected == {"events": {"500": 1}}


def test_set_profile_ends_a_burst() -> None:
    rule = FaultRule(route="discover", kind="invalid_token", rate=1.0, burst=5)
    injector = FaultInjector(profile(rule), seed=1)
    assert kinds([injector.decide("discover")]) == ["invalid_token"]
    injector.set_profile(FaultProfile.load("none"))
    assert injector.decide("discover") is None


def test_guest_schedule_is_reproducible_and_in_range() -> None:
    prof = profile(drop_rate=0.3, drop_after_s=(2.0, 4.0), eject_rate=0.2, eject_after_s=(10.0, 11.0))
    one, two = FaultInjector(prof, seed=2), FaultInjector(prof, seed=2)
    guests = [f"asi-{i}" for i in range(2000)]
    first = [one.guest_schedule(asi) for asi in guests]
    assert [two.guest_schedule(asi) for asi in reversed(guests)][::-1] == first
    actions = Counter(s.action if s else None for s in first)
    assert 500 <= actions["drop"] <= 700
    assert 320 <= actions["eject"] <= 480
    for s in first:
        if s is not None:
            lo, hi = (2.0, 4.0) if s.action == "drop" else (10.0, 11.0)
            assert lo <= s.after_s <= hi
    # a rejoin (second join of the same asi) gets a fresh draw, not the same drop again
    again = [one.guest_schedule(asi) for asi in guests]
    assert again != first
    assert FaultInjector(FaultProfile.load("none"), seed=2).guest_schedule("asi-1") is None


def test_chaos_profile_shape() -> None:
    chaos = FaultProfile.load("chaos")
    assert chaos.psat_ttl_s == 20.0
    assert chaos.drop_rate + chaos.eject_rate == pytest.approx(0.05)
    assert chaos.end_meeting_after_s is not None
    injector = FaultInjector(chaos, seed=1)
    n = 4000
    for route in PROTOCOL_ROUTES:
        faulted = Counter(kinds([injector.decide(route, None) for _ in range(n)]))
        share = (n - faulted[None]) / n
        assert 0.17 <= share <= 0.26, (route, share)
        assert faulted["close"] > 0
        assert faulted["429"] > 0
        assert (faulted["invalid_token"] > 0) == (route in ROUTE_GROUPS["@sa"])
    for route in ROUTE_GROUPS["@aad"]:
        assert all(injector.decide(route) is None for _ in range(500))
    forms = {r.retry_after_form for r in chaos.rules if r.kind in ("429", "503")}
    assert forms == {"seconds", "http-date"}


# ------------------------------------------------------------------------------------------ profiles


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_named_profiles_round_trip_through_json(name: str, tmp_path: Path) -> None:
    prof = FaultProfile.load(name)
    assert prof.name == name
    text = prof.model_dump_json()
    assert FaultProfile.model_validate_json(text) == prof
    path = tmp_path / f"{name}.json"
    path.write_text(text, encoding="utf-8")
    assert FaultProfile.load(str(path)) == prof


def test_profile_file_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"rules": [{"route": "events", "kind": "504", "rate": 0.5}], "psat_ttl_s": 3}))
    prof = FaultProfile.load(str(path))
    assert prof.rules == (FaultRule(route="events", kind="504", rate=0.5),)
    assert prof.psat_ttl_s == 3.0
    assert prof.idle_expiry_s is None


def test_profiles_are_frozen() -> None:
    prof = FaultProfile.load("flaky")
    with pytest.raises(ValidationError):
        prof.drop_rate = 0.5  # type: ignore[misc]
    with pytest.raises(ValidationError):
        prof.rules[0].rate = 1.0  # type: ignore[misc]


def _load_error(spec: str) -> str:
    with pytest.raises(ConfigurationError) as info:
        FaultProfile.load(spec)
    message = str(info.value)
    assert "\n" not in message
    assert len(message) < 600
    return message


def test_unknown_name_is_a_one_line_configuration_error() -> None:
    message = _load_error("chaoss")
    assert "chaoss" in message
    assert "chaos, flaky, none, throttled" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "invalid fault profile file"),
        ("[]", "invalid fault profile file"),
        ('{"rules": [{"kind": "429", "rate": 2}]}', "rules.0.rate"),
        ('{"rules": [{"kind": "418", "rate": 0.1}]}', "rules.0.kind"),
        ('{"rules": [{"route": "discvoer", "kind": "500", "rate": 0.1}]}', "unknown route 'discvoer'"),
        ('{"rules": [{"kind": "500", "rate": 0.7}, {"route": "events", "kind": "429", "rate": 0.4}]}', "> 1"),
        ('{"drop_after_s": [5, 1]}', "drop_after_s"),
        ('{"drop_rate": 0.6, "eject_rate": 0.6}', "drop_rate + eject_rate"),
        ('{"psat_ttl": 5}', "psat_ttl"),
        ('{"psat_ttl_s": 0}', "psat_ttl_s"),
        ('{"rules": [{"kind": "invalid_token", "rate": 0.1, "burst": 0}]}', "burst"),
    ],
)
def test_invalid_file_is_a_one_line_configuration_error(content: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    message = _load_error(str(path))
    assert str(path) in message
    assert expected in message


def test_unreadable_files(tmp_path: Path) -> None:
    assert "cannot read" in _load_error(str(tmp_path / "missing.json"))
    assert "cannot read" in _load_error(str(tmp_path))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "cannot read" in _load_error(str(binary))


# ------------------------------------------------------------------- a real client on a loopback server


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.calls.append(delay)


WIRE_RULES = (
    FaultRule(route="discover", kind="429", rate=1.0, retry_after=2.0),
    FaultRule(route="applications", kind="429", rate=1.0, retry_after=1.5, retry_after_form="http-date"),
    FaultRule(route="capabilities", kind="invalid_token", rate=1.0, burst=2),
    FaultRule(route="events", kind="close", rate=1.0),
    FaultRule(route="anon_discover", kind="latency", rate=1.0, latency_s=7.0),
    FaultRule(route="invitations", kind="500", rate=1.0),
    FaultRule(route="adhoc_meetings", kind="504", rate=1.0),
    FaultRule(route="anon_tokens", kind="503", rate=1.0, retry_after=0.25),
    FaultRule(route="anon_applications", kind="503", rate=1.0, retry_after=None),
)


class Wire:
    def __init__(
        self,
        server: TestServer,
        session: aiohttp.ClientSession,
        injector: FaultInjector,
        sleep: FakeSleep,
        client_ssl: ssl.SSLContext | None,
        seen: list[web.StreamResponse],
    ) -> None:
        self.server = server
        self.session = session
        self.injector = injector
        self.sleep = sleep
        self.client_ssl = client_ssl
        self.seen = seen

    def get(self, route: str) -> Any:
        return self.session.get(
            self.server.make_url(f"/{route}"),
            ssl=self.client_ssl if self.client_ssl is not None else True,
            headers={"client-request-id": "req-1"},
        )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(params=["http", "https"])
async def wire(request: pytest.FixtureRequest, ca: trustme.CA) -> AsyncIterator[Wire]:
    sleep = FakeSleep()
    injector = FaultInjector(
        profile(*WIRE_RULES), seed=1, clock=lambda: NOW, sleep=sleep, fqdn="pool.sim.test"
    )
    seen: list[web.StreamResponse] = []

    async def handler(req: web.Request) -> web.StreamResponse:
        route = req.match_info["route"]
        fault = await injector.apply(route, req, req.query.get("asi"))
        if fault is not None:
            seen.append(fault)
            return fault
        return web.json_response({"ok": route})

    app = web.Application()
    app.router.add_get("/{route}", handler)
    server_ssl: ssl.SSLContext | None = None
    client_ssl: ssl.SSLContext | None = None
    if request.param == "https":
        server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
    server = TestServer(app, host="127.0.0.1", scheme=request.param)
    await server.start_server(ssl=server_ssl)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Wire(server, session, injector, sleep, client_ssl, seen)
    finally:
        await server.close()


async def test_wire_429_retry_after_seconds(wire: Wire) -> None:
    async with wire.get("discover") as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
        assert resp.headers["client-request-id"] == "req-1"
        assert resp.headers["X-MS-Server-Fqdn"] == "pool.sim.test"
        assert resp.headers["X-MS-Correlation-Id"]
        body = await resp.json()
    assert body["code"] == "TooManyRequests"
    assert set(body) == {"code", "subcode", "message"}
    assert wire.seen[-1][FAULT_DECISION].retry_after == 2.0


async def test_wire_429_retry_after_http_date(wire: Wire) -> None:
    async with wire.get("applications") as resp:
        assert resp.status == 429
        header = resp.headers["Retry-After"]
        await resp.read()
    when = email.utils.parsedate_to_datetime(header).timestamp()
    # whole seconds, never earlier than asked: ceil(NOW + 1.5)
    assert when == 1_800_000_002.0
    assert when - NOW >= 1.5
    assert header.endswith(" GMT")


async def test_wire_503_with_and_without_retry_after(wire: Wire) -> None:
    async with wire.get("anon_tokens") as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "0.25"
        assert (await resp.json())["code"] == "ServiceUnavailable"
    async with wire.get("anon_applications") as resp:
        assert resp.status == 503
        assert "Retry-After" not in resp.headers


async def test_wire_500_and_504(wire: Wire) -> None:
    async with wire.get("invitations") as resp:
        assert resp.status == 500
        assert (await resp.json())["code"] == "ServiceFailure"
    async with wire.get("adhoc_meetings") as resp:
        assert resp.status == 504
        assert (await resp.json())["code"] == "Timeout"


async def test_wire_403_invalid_token_burst(wire: Wire) -> None:
    for _ in range(2):
        async with wire.get("capabilities") as resp:
            assert resp.status == 403
            assert resp.headers["Warning"] == '120 pool.sim.test "InvalidToken"'
            assert resp.headers["X-Ms-diagnostics"] == (
                '28055;source="pool.sim.test";reason="The OAuth token is invalid."'
            )
            body = await resp.json()
        assert (body["code"], body["subcode"]) == ("Forbidden", "InvalidToken")
    assert wire.injector.injected["capabilities"] == {"invalid_token": 2}


async def test_wire_close_mid_response(wire: Wire) -> None:
    for _ in range(2):  # the client's pool recovers: the second request gets a fresh connection
        async with wire.get("events") as resp:
            assert resp.status == 200
            assert resp.content_length is not None
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    assert wire.injector.injected["events"] == {"close": 2}


async def test_wire_latency_uses_the_injected_sleep(wire: Wire) -> None:
    async with wire.get("anon_discover") as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": "anon_discover"}
    assert wire.sleep.calls == [7.0]
    # unfaulted routes proceed untouched
    async with wire.get("delete_application") as resp:
        assert resp.status == 200
    assert wire.injector.injected == {"anon_discover": {"latency": 1}}


async def test_wire_concurrent_requests_stay_reproducible(wire: Wire) -> None:
    chaos = FaultProfile.load("chaos")
    wire.injector.set_profile(chaos)

    async def one(route: str, asi: str) -> tuple[str, str, int | str]:
        try:
            async with wire.session.get(
                wire.server.make_url(f"/{route}").with_query(asi=asi),
                ssl=wire.client_ssl if wire.client_ssl is not None else True,
            ) as resp:
                await resp.read()
                return route, asi, resp.status
        except aiohttp.ClientPayloadError:
            return route, asi, "closed"

    calls = [(route, f"g{i}") for i in range(20) for route in ("anon_discover", "invitations", "events")]
    results = await asyncio.wait_for(asyncio.gather(*(one(r, a) for r, a in calls)), timeout=30)
    # the same requests, decided one by one without a network, get the same outcomes
    reference = FaultInjector(chaos, seed=1)
    expected: list[tuple[str, str, int | str]] = []
    for route, asi in calls:
        d = reference.decide(route, asi)
        status: int | str = (
            200 if d is None or d.kind == "latency" else ("closed" if d.kind == "close" else d.status or 0)
        )
        expected.append((route, asi, status))
    assert sorted(results) == sorted(expected)


# ------------------------------------------------------------------------- through the real simulator

SIM_RULES = FaultProfile(
    name="seeded",
    rules=(
        FaultRule(route="discover", kind="429", rate=0.2, retry_after=1.0),
        FaultRule(route="discover", kind="503", rate=0.1, retry_after=2.0, retry_after_form="http-date"),
        FaultRule(route="discover", kind="500", rate=0.1),
        FaultRule(route="discover", kind="close", rate=0.1),
    ),
)


async def _discover_outcomes(
    sim_factory: Callable[..., Simulator],
    open_walk: Callable[..., AbstractAsyncContextManager[Walk]],
    seed: int,
) -> tuple[list[int | str], dict[str, dict[str, int]]]:
    outcomes: list[int | str] = []
    async with sim_factory(seed=seed, faults=SIM_RULES) as sim, open_walk(sim, setup=False) as walk:
        token = await walk.get_aad_token()
        assert token.status == 200, token.text
        walk.aad_token = token.body["access_token"]
        for _ in range(60):
            try:
                reply = await walk.call("GET", walk.info.discover_url, headers=walk.sa_headers())
                outcomes.append(reply.status)
            except aiohttp.ClientPayloadError:
                outcomes.append("closed")
        snapshot = sim.snapshot()
    assert snapshot["faults_injected"] == {
        "discover": dict(Counter(str(o) if o != "closed" else "close" for o in outcomes if o != 200))
    }
    return outcomes, snapshot["faults_injected"]


async def test_the_simulator_faults_reproducibly_from_its_seed(
    sim_factory: Callable[..., Simulator], open_walk: Callable[..., AbstractAsyncContextManager[Walk]]
) -> None:
    first, injected = await _discover_outcomes(sim_factory, open_walk, seed=5)
    again, _ = await _discover_outcomes(sim_factory, open_walk, seed=5)
    other, _ = await _discover_outcomes(sim_factory, open_walk, seed=6)
    assert first == again
    assert first != other
    assert set(first) == {200, 429, 503, 500, "closed"}
    assert 15 <= sum(injected["discover"].values()) <= 45
