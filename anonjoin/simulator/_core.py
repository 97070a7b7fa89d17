"""The shared state of one running simulator, and the per-request context handed to every route.

Rules: ``Core`` is the only object routes touch; it owns the configuration, the fault injector, the
meetings/applications state, the token verifiers and the request statistics. ``Call`` is one request.
Statistics are dicts keyed by route and ``asi`` (O(1) per request); per-guest timelines keep the last
``TIMELINE_CAP`` entries, as tuples (dicts only in the snapshot) to stay small with 10,000 guests.
"""

from __future__ import annotations

import collections
import email.utils
import itertools
import random
import secrets
import zlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from anonjoin.simulator._config import IDLE_EXPIRY_S, PSAT_TTL_S, SimulatorConfig
from anonjoin.simulator._faults import FaultInjector, FaultProfile
from anonjoin.simulator._meetings import Meeting, MeetingState
from anonjoin.simulator._tokens import InvalidTokenError, TokenVerifier, aad_key, psat_key, unverified_claims
from anonjoin.simulator._wire import Wire

__all__ = ["Call", "Core", "IssuedTokens"]

TIMELINE_CAP = 256
GUEST_TIMELINES_CAP = 20_000
"""At most this many per-guest timelines (the oldest goes first): the keys are client-chosen."""
MAX_ASI_CHARS = 256
"""A longer ``applicationSessionId`` is never a key of the simulator's bookkeeping (it is not tracked)."""
_NO_NEW_TIMELINE = frozenset((401, 403, 404))
"""Statuses that never create a timeline: the request proved nothing (no valid token, nothing found)."""

TimelineEntry = tuple[str, float, int, float | None, str | None]  # route, t, status, retry_after, app
MAIN_FQDN = "main.sim.anonjoin.invalid"
POOL_FQDN = "pool.sim.anonjoin.invalid"


@dataclass(slots=True)
class Call:
    """One request being answered."""

    request: web.BaseRequest
    route: str
    params: dict[str, str]
    listener: str  # "main" | "pool"
    wire: Wire
    asi: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class IssuedTokens:
    """Test hook (``SimulatorConfig.record_issued_tokens``): every token the simulator handed out."""

    aad: list[str] = field(default_factory=list)
    """AAD access tokens (the JWT as issued)."""
    psat: list[str] = field(default_factory=list)
    """psat tokens as issued (``psat=<JWT>``)."""


class Cluster(Protocol):
    """The front door of a simulator with pool processes (``_pools.FrontDoor``), as ``Core`` sees it."""

    async def new_meeting(self, meeting: Meeting) -> None:
        """Give ``meeting`` an owning pool and make every pool know it."""

    async def admin(
        self,
        request: web.BaseRequest,
        local: Callable[[Core, web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Answer an admin request for the whole simulator (``local``: the front door's own answer)."""


class Core:
    """Everything one simulator knows."""

    def __init__(
        self, config: SimulatorConfig, profile: FaultProfile, *, meetings: Iterable[Meeting] = ()
    ) -> None:
        self.config = config
        self.clock = config.clock
        self.injector = FaultInjector(profile, config.seed, clock=config.clock)
        self.aad = TokenVerifier(aad_key(), config.clock)
        self.psat = TokenVerifier(psat_key(), config.clock)
        self.rng = random.Random(config.seed)
        self.main_base = ""
        self.pool_base = ""
        self.pool_urls: tuple[str, ...] = ()
        """With pool processes (``--pools N``): every pool's base URL, by pool index; else empty."""
        self.cluster: Cluster | None = None
        """With pool processes, in the front door: the pools (admin view, new meetings)."""
        self.requests: dict[str, dict[str, int]] = {}
        self.guests: dict[str, collections.deque[TimelineEntry]] = {}
        self.admin_token = secrets.token_urlsafe(32)
        """The credential of the admin view (``X-Admin-Token``); never logged."""
        self.issued: IssuedTokens | None = IssuedTokens() if config.record_issued_tokens else None
        self._alternate = itertools.count()
        self._wires: dict[tuple[str, str, str, str], Wire] = {}
        self.state = MeetingState(
            rng=self.rng,
            clock=config.clock,
            tenant=config.tenant,
            idle_s=self.idle_s,
            time_scale=config.event_time_scale,
            resume_after_s=config.event_resume_after_s,
            max_participants=config.max_participants,
            schedule=self._guest_schedule,
            ucwa_href=self.ucwa_href,
        )
        known = [self.state.add_meeting(m) for m in meetings]
        self.default_meeting: Meeting = (
            known[0]
            if known
            else self.state.create_meeting(lobby=config.lobby, lobby_delay_s=config.lobby_delay_s)
        )

    # -- derived settings ----------------------------------------------------------------------------
    @property
    def profile(self) -> FaultProfile:
        return self.injector.profile

    def psat_ttl_s(self) -> float:
        return self.config.psat_ttl_s or self.profile.psat_ttl_s or PSAT_TTL_S

    def idle_s(self) -> float:
        return self.config.idle_expiry_s or self.profile.idle_expiry_s or IDLE_EXPIRY_S

    @property
    def ucwa_base(self) -> str:
        return self.pool_base if self.config.ucwa_on_pool else self.main_base

    def guest_base(self, meeting: Meeting | None, asi: str) -> str:
        """Where a guest's UCWA lives: the pool owning its meeting (by ``asi`` without one) when the
        simulator has pool processes, else ``ucwa_base``."""
        pools = self.pool_urls
        if not pools:
            return self.ucwa_base
        index = meeting.owner if meeting is not None else zlib.crc32(asi.encode()) % len(pools)
        return pools[index % len(pools)]

    def ucwa_href(self, path: str) -> str:
        """An href inside UCWA bodies (events, embedded resources): relative unless absolute hrefs are on."""
        return self.ucwa_base + path if self.config.absolute_hrefs else path

    def _guest_schedule(self, asi: str) -> tuple[Any, float] | None:
        scheduled = self.injector.guest_schedule(asi)
        return None if scheduled is None else (scheduled.action, scheduled.after_s)

    def wire(self, request: web.BaseRequest, listener: str) -> Wire:
        prefix = self.config.rel_prefix
        namespace = request.headers.get("X-Ms-Namespace")
        if namespace is not None and namespace.lower() == "internal":
            prefix = "ms:rtc:saas:"
        elif prefix == "alternate":
            prefix = "service:" if next(self._alternate) % 2 == 0 else "ms:rtc:saas:"
        key = (prefix, listener, self.main_base, self.pool_base)
        wire = self._wires.get(key)
        if wire is None:  # a handful per simulator (Wire is immutable, so one serves every request)
            wire = self._wires[key] = Wire(
                prefix=prefix,
                date_format=self.config.date_format,
                here=self.pool_base if listener == "pool" else self.main_base,
                main=self.main_base,
                pool=self.pool_base,
                absolute=self.config.absolute_hrefs,
                mixed_case=self.config.mixed_case_hrefs,
            )
        return wire

    # -- tokens --------------------------------------------------------------------------------------
    def psat_asi(self, token: str | None) -> str | None:
        """The ``asi`` of a psat token, verified or not (bookkeeping only)."""
        if not token:
            return None
        try:
            claims = self.psat.verify(token)
        except InvalidTokenError:
            claims = unverified_claims(token) or {}
        asi = claims.get("asi")
        return asi if isinstance(asi, str) and len(asi) <= MAX_ASI_CHARS else None

    # -- statistics ----------------------------------------------------------------------------------
    def record(
        self,
        route: str,
        status: int,
        asi: str | None,
        response: web.StreamResponse | None,
        app: str | None = None,
        *,
        injected: bool = False,
    ) -> None:
        """Count a request; for a known guest, append it to its timeline (``app``: the psanon application
        the request addressed, for the routes under one application).

        A request that failed with 401/403/404 never creates a timeline for an ``asi`` not seen before (its
        ``asi`` is whatever the client claimed), unless the simulator itself chose that answer (``injected``:
        a fault, such as an InvalidToken burst on a guest's first mint, is part of that guest's story). There
        are at most ``GUEST_TIMELINES_CAP`` timelines."""
        by_status = self.requests.setdefault(route, {})
        key = str(status)
        by_status[key] = by_status.get(key, 0) + 1
        if asi is None or len(asi) > MAX_ASI_CHARS:
            return
        guests = self.guests
        timeline = guests.get(asi)
        if timeline is None:
            if status in _NO_NEW_TIMELINE and not injected:
                return
            if len(guests) >= GUEST_TIMELINES_CAP:
                del guests[next(iter(guests))]
            timeline = guests[asi] = collections.deque(maxlen=TIMELINE_CAP)
        now = self.clock()
        timeline.append((route, now, status, _retry_after(response, now), app))

    def bookkeeping_sizes(self) -> dict[str, int]:
        """Entries of every structure a request can add to (tests and measurements of what is retained)."""
        state, injector = self.state, self.injector
        return {
            "guests": len(self.guests),
            "timeline_entries": sum(len(t) for t in self.guests.values()),
            "routes": sum(len(by) for by in self.requests.values()),
            "fault_counters": injector.tracked_keys,
            "aad_cache": self.aad.cached,
            "psat_cache": self.psat.cached,
            "apps": len(state.apps),
            "gone": len(state.gone),
            "created_by_asi": len(state.created_by_asi),
            "meetings": len(state.meetings),
        }

    def snapshot(self) -> dict[str, Any]:
        """The admin view (``GET /_admin/state``)."""
        state = self.state
        return {
            "requests": {route: dict(statuses) for route, statuses in self.requests.items()},
            "faults_injected": self.injector.injected,
            "faults": self.profile.name,
            "meetings": {cid: m.info() for cid, m in state.meetings.items()},
            "applications": {
                "live": len(state.apps),
                "created": state.created,
                "created_by_asi": dict(state.created_by_asi),
                "gone": dict(collections.Counter(state.gone.values())),
            },
            "guests": {
                asi: [
                    {"route": r, "t": t, "status": s, "retry_after": ra, "app": app}
                    for r, t, s, ra, app in timeline
                ]
                for asi, timeline in self.guests.items()
            },
        }


def _retry_after(response: web.StreamResponse | None, now: float) -> float | None:
    if response is None:
        return None
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
