"""Fault injection for the simulator: profiles, seeded decisions, and the responses they produce.

The rules of this module:

- A :class:`FaultProfile` is data (a frozen pydantic model that round-trips through JSON). It holds
  per-request *rules* (``route``, ``kind``, ``rate`` and the kind's parameters) and *schedule* fields that the
  server consumes itself (psat lifetime, guest drops and ejections, meeting end, idle expiry).
- :meth:`FaultInjector.decide` is the only place that decides whether a request is faulted. It does no I/O
  and reads neither the clock nor any ambient random state: each decision is a hash of
  ``(seed, route, asi, n)``, where ``n`` counts the requests seen so far with that ``(route, asi)`` key
  (``asi`` is ``None`` for the service application's requests, so that key is a per-route counter). The same
  sequence of requests therefore gets the same faults whatever the interleaving across routes and guests.
- The rules that match a route are tried in profile order against one uniform draw ``u``: the first rule
  whose cumulative rate exceeds ``u`` fires, so the rates of the rules matching one route add up to the
  fraction of its requests that are faulted (a profile whose rates add up to more than 1 is refused).
- An ``invalid_token`` rule with ``burst = N`` answers 403 ``InvalidToken`` to the request that triggered it
  and to the next ``N - 1`` requests to the same route, whoever sends them: the service "briefly" rejected
  every token (protocol.md §4.2). A burst overrides the draw but the counters still advance.
- :meth:`FaultInjector.apply` turns a decision into an aiohttp response (or a delay, or a connection closed
  mid-response). Time enters only there, through the injected ``clock`` (HTTP dates) and ``sleep``
  (latency), so tests never really wait.

Route names are those of ``ROUTES``; a rule may also name ``"*"`` (every route) or a group (``"@aad"``,
``"@sa"``, ``"@guest"``, ``"@protocol"``). The named profiles fault only ``@protocol`` routes: msal replays
a 429/5xx answer of the token endpoint from its own cache for the Retry-After it was given, or for 60 s
when that is missing or an HTTP date, which would stall a whole run. A profile file can still name
``aad_token`` explicitly.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Self

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from anonjoin._exceptions import ConfigurationError

__all__ = [
    "FAULT_DECISION",
    "FAULT_KINDS",
    "PROFILES",
    "ROUTES",
    "ROUTE_GROUPS",
    "FaultDecision",
    "FaultInjector",
    "FaultKind",
    "FaultProfile",
    "FaultRule",
    "GuestSchedule",
]

FaultKind = Literal["429", "503", "500", "504", "latency", "close", "invalid_token"]
FAULT_KINDS: tuple[FaultKind, ...] = ("429", "503", "500", "504", "latency", "close", "invalid_token")

# The stable names of the contract, then the ones the simulator added (GET of the application and of
# event resources, the anonymous-forbidden "me" actions, the AAD key set).
AAD_ROUTES = ("aad_openid", "aad_token", "aad_keys")
SA_ROUTES = ("discover", "applications", "capabilities", "anon_tokens", "adhoc_meetings")
GUEST_ROUTES = (
    "anon_discover",
    "anon_applications",
    "invitations",
    "events",
    "delete_application",
    "application",
    "ucwa_resource",
    "me_action",
)
ROUTES: tuple[str, ...] = AAD_ROUTES + SA_ROUTES + GUEST_ROUTES
ROUTE_GROUPS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "*": frozenset(ROUTES),
        "@aad": frozenset(AAD_ROUTES),
        "@sa": frozenset(SA_ROUTES),
        "@guest": frozenset(GUEST_ROUTES),
        "@protocol": frozenset(SA_ROUTES + GUEST_ROUTES),
    }
)

_RATE_SLACK = 1e-9
DEFAULT_FQDN = "sim.anonjoin.invalid"
COUNTER_KEYS_CAP = 100_000
"""At most this many ``(route, asi)`` request counters and per-guest join counters (the oldest goes first):
the ``asi`` is client-chosen. A run with fewer distinct guests than this is unaffected."""

# status, code, subcode, message of each error kind (protocol.md §6)
_ERRORS: Mapping[str, tuple[int, str, str, str]] = MappingProxyType(
    {
        "429": (429, "TooManyRequests", "Throttled", "Too many requests; retry after the given delay."),
        "503": (503, "ServiceUnavailable", "Overloaded", "The service is temporarily unavailable."),
        "500": (500, "ServiceFailure", "InternalServerError", "The service failed to process the request."),
        "504": (504, "Timeout", "GatewayTimeout", "The service timed out processing the request."),
        "invalid_token": (403, "Forbidden", "InvalidToken", "The OAuth token is invalid."),
    }
)


class FaultRule(BaseModel):
    """One per-request fault: on ``route``, a fraction ``rate`` of requests get ``kind``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    route: str = "*"
    kind: FaultKind
    rate: float = Field(ge=0.0, le=1.0)
    retry_after: float | None = Field(default=1.0, ge=0.0, le=3600.0)
    """429/503: seconds to ask the client to wait; ``None`` sends no ``Retry-After`` header."""
    retry_after_form: Literal["seconds", "http-date"] = "seconds"
    latency_s: float = Field(default=0.5, ge=0.0, le=600.0)
    """latency: the delay added before the request proceeds."""
    burst: int = Field(default=1, ge=1, le=1000)
    """invalid_token: how many consecutive requests to the route get the 403 once triggered."""

    @field_validator("route")
    @classmethod
    def _known_route(cls, value: str) -> str:
        if value not in ROUTE_GROUPS and value not in ROUTES:
            known = ", ".join([*ROUTE_GROUPS, *ROUTES])
            raise ValueError(f"unknown route {value!r} (known: {known})")
        return value

    def matches(self, route: str) -> bool:
        """Whether this rule applies to requests of ``route`` (any string; unknown routes match ``*``)."""
        if self.route == route or self.route == "*":
            return True
        group = ROUTE_GROUPS.get(self.route)
        return group is not None and route in group


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if lo < 0 or hi < lo:
        raise ValueError(f"expected a range [lo, hi] with 0 <= lo <= hi, got [{lo}, {hi}]")
    return value


class FaultProfile(BaseModel):
    """Per-request fault rules plus the schedule fields the simulator applies itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    rules: tuple[FaultRule, ...] = ()
    psat_ttl_s: float | None = Field(default=None, gt=0.0)
    """Lifetime of minted psat tokens (``None``: the simulator's default, 8 hours)."""
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Fraction of joins after which the guest is dropped (``Disconnected``) ..."""
    drop_after_s: tuple[float, float] = (5.0, 30.0)
    """... this many seconds (uniform in the range) after it joined."""
    eject_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    """Fraction of joins after which the guest is ejected (``Ejected``) ..."""
    eject_after_s: tuple[float, float] = (5.0, 30.0)
    """... this many seconds (uniform in the range) after it joined."""
    end_meeting_after_s: float | None = Field(default=None, ge=0.0)
    """The default meeting ends this many seconds after the simulator started (``None``: never)."""
    idle_expiry_s: float | None = Field(default=None, gt=0.0)
    """Idle window before 410 ``InactiveApplicationExpired`` (``None``: the simulator's default)."""

    @field_validator("drop_after_s", "eject_after_s")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _check_range(value)

    @model_validator(mode="after")
    def _rates_fit(self) -> Self:
        if self.drop_rate + self.eject_rate > 1.0 + _RATE_SLACK:
            raise ValueError("drop_rate + eject_rate must not exceed 1")
        for route in ROUTES:
            total = sum(rule.rate for rule in self.rules if rule.matches(route))
            if total > 1.0 + _RATE_SLACK:
                raise ValueError(f"the rates of the rules matching route {route!r} add up to {total:g} > 1")
        return self

    @classmethod
    def load(cls, spec: str) -> FaultProfile:
        """A named profile (``none``, ``flaky``, ``throttled``, ``chaos``) or a JSON file's profile.

        Raises :class:`~anonjoin.ConfigurationError` with a one-line message for an unknown name or an
        unreadable or invalid file.
        """
        named = PROFILES.get(spec)
        if named is not None:
            return named
        path = Path(spec)
        looks_like_path = path.suffix.lower() == ".json" or "/" in spec or "\\" in spec or path.exists()
        if not looks_like_path:
            known = ", ".join(sorted(PROFILES))
            raise ConfigurationError(f"unknown fault profile {spec!r} (known: {known}; or a JSON file path)")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ConfigurationError(f"cannot read fault profile file {spec!r}: {reason}") from exc
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ConfigurationError(f"invalid fault profile file {spec!r}: {_one_line(exc)}") from exc


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = " ".join(str(first["msg"]).split())
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}"


def _protocol_rules(*rules: tuple[FaultKind, float, dict[str, object]]) -> tuple[FaultRule, ...]:
    return tuple(
        FaultRule.model_validate({"route": "@protocol", "kind": kind, "rate": rate, **params})
        for kind, rate, params in rules
    )


PROFILES: Mapping[str, FaultProfile] = MappingProxyType(
    {
        "none": FaultProfile(name="none"),
        "flaky": FaultProfile(
            name="flaky",
            rules=_protocol_rules(
                ("500", 0.02, {}),
                ("503", 0.02, {"retry_after": 1.0}),
                ("close", 0.01, {}),
            ),
        ),
        "throttled": FaultProfile(
            name="throttled",
            rules=_protocol_rules(
                ("429", 0.08, {"retry_after": 1.0}),
                ("429", 0.04, {"retry_after": 2.0, "retry_after_form": "http-date"}),
                ("503", 0.04, {"retry_after": 1.0}),
                ("503", 0.02, {"retry_after": 2.0, "retry_after_form": "http-date"}),
            ),
        ),
        "chaos": FaultProfile(
            name="chaos",
            rules=(
                *_protocol_rules(
                    ("429", 0.04, {"retry_after": 1.0}),
                    ("429", 0.02, {"retry_after": 2.0, "retry_after_form": "http-date"}),
                    ("503", 0.03, {"retry_after": 1.0}),
                    ("503", 0.01, {"retry_after": 2.0, "retry_after_form": "http-date"}),
                    ("500", 0.03, {}),
                    ("504", 0.02, {}),
                    ("close", 0.03, {}),
                    ("latency", 0.02, {"latency_s": 0.5}),
                ),
                FaultRule(route="@sa", kind="invalid_token", rate=0.02, burst=2),
            ),
            psat_ttl_s=20.0,
            drop_rate=0.04,
            drop_after_s=(5.0, 30.0),
            eject_rate=0.01,
            eject_after_s=(5.0, 30.0),
            end_meeting_after_s=30.0,
        ),
    }
)


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What :meth:`FaultInjector.decide` chose for one request."""

    route: str
    kind: FaultKind
    rule_index: int
    """Index of the rule in the profile's ``rules``."""
    asi: str | None = None
    n: int = 0
    """How many requests with this ``(route, asi)`` the injector had seen before this one."""
    retry_after: float | None = None
    """429/503: the least the response asks the client to wait, in seconds, in either form."""
    retry_after_form: Literal["seconds", "http-date"] = "seconds"
    latency_s: float = 0.0
    burst_index: int = 0
    """invalid_token: 0 for the request that triggered the burst, 1.. for the ones that followed."""

    @property
    def status(self) -> int | None:
        """The HTTP status of the fault's response (``None`` for latency and close)."""
        error = _ERRORS.get(self.kind)
        return error[0] if error else None


@dataclass(frozen=True, slots=True)
class GuestSchedule:
    """A scheduled drop or ejection of a guest, ``after_s`` seconds after it joined."""

    action: Literal["drop", "eject"]
    after_s: float


FAULT_DECISION = web.ResponseKey("anonjoin_fault_decision", FaultDecision)
"""Key under which :meth:`FaultInjector.apply` stores its decision on the response it returns."""


def _uniform(seed: int, *parts: object) -> float:
    """A number in [0, 1) that depends only on ``seed`` and ``parts``."""
    text = "\x1f".join([str(seed), *(repr(part) for part in parts)])
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2.0**53


def _correlation_id(seed: int, decision: FaultDecision) -> str:
    text = f"{seed}\x1fcid\x1f{decision.route}\x1f{decision.asi!r}\x1f{decision.n}"
    return str(
        uuid.UUID(bytes=hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    )


def _format_seconds(value: float) -> str:
    """Delta-seconds, to the millisecond, rounded up (never less than asked); integral values as integers."""
    return f"{math.ceil(value * 1000) / 1000:.3f}".rstrip("0").rstrip(".")


class FaultInjector:
    """Decides, reproducibly from ``seed``, which requests are faulted, and produces the faults.

    ``clock`` (wall-clock seconds, for HTTP-date ``Retry-After``) and ``sleep`` (for latency) are injected
    so tests control time. ``fqdn`` names the server in ``Warning``, ``X-Ms-diagnostics`` and
    ``X-MS-Server-Fqdn``; by default the request's host (and the server stamps ``X-MS-Server-Fqdn``).
    """

    def __init__(
        self,
        profile: FaultProfile,
        seed: int,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        fqdn: str | None = None,
    ) -> None:
        self._seed = seed
        self._clock = clock
        self._sleep = sleep
        self._fqdn = fqdn
        self._profile = profile
        self._by_route: dict[str, tuple[tuple[float, int, FaultRule], ...]] = {}
        self._counters: dict[tuple[str, str | None], int] = {}
        self._bursts: dict[str, tuple[int, int, int]] = {}
        self._joins: dict[str, int] = {}
        self._injected: dict[str, dict[str, int]] = {}

    @property
    def profile(self) -> FaultProfile:
        return self._profile

    @property
    def seed(self) -> int:
        return self._seed

    def set_profile(self, profile: FaultProfile) -> None:
        """Swap the profile at run time. Counters carry on; a burst in progress ends."""
        self._profile = profile
        self._by_route.clear()
        self._bursts.clear()

    @property
    def injected(self) -> dict[str, dict[str, int]]:
        """A copy of the counts of injected faults: ``{route: {kind: n}}``."""
        return {route: dict(kinds) for route, kinds in self._injected.items()}

    def _rules_for(self, route: str) -> tuple[tuple[float, int, FaultRule], ...]:
        cached = self._by_route.get(route)
        if cached is None:
            cumulative = 0.0
            entries: list[tuple[float, int, FaultRule]] = []
            for index, rule in enumerate(self._profile.rules):
                if rule.rate > 0.0 and rule.matches(route):
                    cumulative += rule.rate
                    entries.append((cumulative, index, rule))
            cached = self._by_route[route] = tuple(entries)
        return cached

    def decide(self, route: str, asi: str | None = None) -> FaultDecision | None:
        """Whether the next request of ``route`` (from guest ``asi``, if known) is faulted, and how.

        Pure apart from the injector's counters: no I/O, no clock, no ambient randomness. Every call counts
        as one request and, when it returns a decision, as one injected fault.
        """
        key = (route, asi)
        counters = self._counters
        n = counters.get(key, 0)
        if n == 0 and len(counters) >= COUNTER_KEYS_CAP:  # client-chosen keys: drop the oldest
            del counters[next(iter(counters))]
        counters[key] = n + 1

        burst = self._bursts.get(route)
        if burst is not None:
            rule_index, position, length = burst
            if position + 1 < length:
                self._bursts[route] = (rule_index, position + 1, length)
            else:
                del self._bursts[route]
            return self._count(
                FaultDecision(
                    route=route,
                    kind="invalid_token",
                    rule_index=rule_index,
                    asi=asi,
                    n=n,
                    burst_index=position,
                )
            )

        rules = self._rules_for(route)
        if not rules:
            return None
        draw = _uniform(self._seed, route, asi, n)
        for cumulative, index, rule in rules:
            if draw < cumulative:
                return self._count(self._make(route, asi, n, index, rule))
        return None

    @property
    def tracked_keys(self) -> int:
        """How many request and join counters the injector holds (each bounded by ``COUNTER_KEYS_CAP``)."""
        return len(self._counters) + len(self._joins)

    def forget(self, route: str, asi: str) -> None:
        """Undo the count of the one request of ``asi`` on ``route`` seen so far (it failed on its own, so it
        leaves no state behind); counters of guests seen more than once stay."""
        key = (route, asi)
        if self._counters.get(key) == 1:
            del self._counters[key]

    def _make(self, route: str, asi: str | None, n: int, index: int, rule: FaultRule) -> FaultDecision:
        if rule.kind == "invalid_token" and rule.burst > 1:
            # (rule, burst_index of the next request, burst length)
            self._bursts[route] = (index, 1, rule.burst)
        return FaultDecision(
            route=route,
            kind=rule.kind,
            rule_index=index,
            asi=asi,
            n=n,
            retry_after=rule.retry_after if rule.kind in ("429", "503") else None,
            retry_after_form=rule.retry_after_form,
            latency_s=rule.latency_s if rule.kind == "latency" else 0.0,
        )

    def _count(self, decision: FaultDecision) -> FaultDecision:
        kinds = self._injected.setdefault(decision.route, {})
        kinds[decision.kind] = kinds.get(decision.kind, 0) + 1
        return decision

    def guest_schedule(self, asi: str) -> GuestSchedule | None:
        """Whether the guest ``asi``, joining now, is to be dropped or ejected later, and when.

        Reproducible per guest: the k-th join of ``asi`` always gets the same answer for one seed and
        profile, however the joins of different guests interleave.
        """
        profile = self._profile
        if profile.drop_rate <= 0.0 and profile.eject_rate <= 0.0:
            return None
        joins = self._joins
        k = joins.get(asi, 0)
        if k == 0 and len(joins) >= COUNTER_KEYS_CAP:
            del joins[next(iter(joins))]
        joins[asi] = k + 1
        draw = _uniform(self._seed, "guest_schedule", asi, k)
        if draw < profile.drop_rate:
            action: Literal["drop", "eject"] = "drop"
            lo, hi = profile.drop_after_s
        elif draw < profile.drop_rate + profile.eject_rate:
            action = "eject"
            lo, hi = profile.eject_after_s
        else:
            return None
        return GuestSchedule(action=action, after_s=lo + (hi - lo) * _uniform(self._seed, "after", asi, k))

    async def apply(
        self, route: str, request: web.BaseRequest, asi: str | None, *, server_fqdn: str | None = None
    ) -> web.StreamResponse | None:
        """Decide on this request and carry the fault out.

        Returns ``None`` to let the request proceed (no fault, or after an added latency), else the
        response to return from the handler: an error response, or (``close``) a response that was
        prepared, got part of its body, and whose connection was then closed. The decision is stored on
        the returned response under :data:`FAULT_DECISION`. ``server_fqdn``: the ``X-MS-Server-Fqdn`` of
        the server answering, for the ``close`` response that is sent before the server could stamp it.
        """
        decision = self.decide(route, asi)
        if decision is None:
            return None
        return await self.render(decision, request, server_fqdn=server_fqdn)

    async def render(
        self, decision: FaultDecision, request: web.BaseRequest, *, server_fqdn: str | None = None
    ) -> web.StreamResponse | None:
        """Carry out ``decision`` for ``request`` (see :meth:`apply`)."""
        if decision.kind == "latency":
            await self._sleep(decision.latency_s)
            return None
        fqdn = self._fqdn or request.url.host or DEFAULT_FQDN
        headers = {"X-MS-Correlation-Id": _correlation_id(self._seed, decision)}
        stamp = self._fqdn or server_fqdn
        if stamp:
            # else the server stamps its own on the way out (too late for ``close``: pass ``server_fqdn``)
            headers["X-MS-Server-Fqdn"] = stamp
        client_request_id = request.headers.get("client-request-id")
        if client_request_id:
            headers["client-request-id"] = client_request_id[:100]
        if decision.kind == "close":
            return await self._close_mid_response(decision, request, headers)
        status, code, subcode, message = _ERRORS[decision.kind]
        if decision.kind == "invalid_token":
            headers["Warning"] = f'120 {fqdn} "InvalidToken"'
            headers["X-Ms-diagnostics"] = f'28055;source="{fqdn}";reason="The OAuth token is invalid."'
        elif decision.retry_after is not None:
            if decision.retry_after_form == "http-date":
                when = math.ceil(self._clock() + decision.retry_after)
                headers["Retry-After"] = email.utils.formatdate(when, usegmt=True)
            else:
                headers["Retry-After"] = _format_seconds(decision.retry_after)
        response = web.json_response(
            {"code": code, "subcode": subcode, "message": message}, status=status, headers=headers
        )
        response[FAULT_DECISION] = decision
        return response

    async def _close_mid_response(
        self, decision: FaultDecision, request: web.BaseRequest, headers: dict[str, str]
    ) -> web.StreamResponse:
        body = json.dumps(
            {"_links": {"self": {"href": request.path}}, "padding": "x" * 512}, separators=(",", ":")
        ).encode()
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "application/json"
        response.content_length = len(body)
        response[FAULT_DECISION] = decision
        await response.prepare(request)
        await response.write(body[: len(body) // 3])
        transport = request.transport
        if transport is not None:
            # close() flushes what was written, then ends the connection: the client has the status line
            # and part of the body, and then an incomplete payload.
            transport.close()
        return response
