"""The simulator's configuration and the information it publishes once started.

``SimulatorConfig`` holds every knob, each with the documented behaviour as its default, so one field
switches one variant of protocol.md §2 on. ``SimulatorInfo`` is what a client needs to talk to a running
simulator (the JSON line of ``anonjoin simulate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from anonjoin.simulator._faults import FaultProfile

__all__ = ["DateFormat", "LobbyMode", "RelPrefix", "SimulatorConfig", "SimulatorInfo"]

LobbyMode = Literal["none", "admit", "deny"]
RelPrefix = Literal["service:", "ms:rtc:saas:", "alternate"]
EventRelPrefix = Literal["", "service:", "ms:rtc:saas:"]
DateFormat = Literal["iso", "dotnet", "dotnet_escaped", "dotnet_literal"]
DiscoverQuery = Literal["anonymousContext", "anonymousMeetingJoinContext", "discoverContext"]

DOCS_AUDIENCE = "https://api.skypeforbusiness.com"
SDK_AUDIENCE = "https://noammeetings.resources.lync.com"
PSAT_TTL_S = 8 * 3600.0
IDLE_EXPIRY_S = 15 * 60.0


class SimulatorConfig(BaseModel):
    """Everything a simulator can be told. The defaults are the documented behaviour."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    # where to listen (ports 0 = ephemeral)
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    pool_port: int = Field(default=0, ge=0, le=65535)

    # faults and reproducibility
    seed: int = 0
    faults: str | FaultProfile = "none"
    """A named profile (none, flaky, throttled, chaos), a JSON file path, or a ``FaultProfile``."""

    # identities
    tenant: str = "contoso.com"
    tenant_id: str = "8a6f1d3e-1c2b-4e5f-9a7b-0c1d2e3f4a5b"
    client_id: str = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
    client_secret: str = "sim-secret-not-for-production"
    endpoint_id: str = "sip:anonjoin-app@contoso.com"
    unprovisioned_endpoint_id: str = "sip:not-provisioned@contoso.com"
    audiences: tuple[str, ...] = (DOCS_AUDIENCE, SDK_AUDIENCE)
    origin: str = "https://app.contoso.com"
    allow_http_origins: bool = False
    """The docs require HTTPS origins; ``True`` also accepts ``http://`` ones."""

    # lifetimes (seconds)
    aad_ttl_s: float = Field(default=3600.0, gt=0)
    psat_ttl_s: float | None = Field(default=None, gt=0)
    """psat lifetime; ``None``: the fault profile's ``psat_ttl_s``, else 8 hours."""
    idle_expiry_s: float | None = Field(default=None, gt=0)
    """Window with no parked poll after which an application expires (410); ``None``: profile, else 15 min."""
    event_time_scale: float = Field(default=1.0, gt=0)
    """Multiplies the event channel's time knobs (timeout, low, medium): tests use e.g. 0.001."""
    event_resume_after_s: float | None = Field(default=None, gt=0)
    """A poll arriving this long after the previous one ended gets a ``resume`` link (``None``: never)."""
    clock: Callable[[], float] = time.time
    """Wall clock for token issue/expiry checks and the admin timelines (injectable for tests)."""

    # meetings
    lobby: LobbyMode = "none"
    lobby_delay_s: float = Field(default=0.5, ge=0)
    max_participants: int | None = Field(default=None, ge=1)

    # variants (protocol.md §2)
    rel_prefix: RelPrefix = "service:"
    """``service:`` (docs), ``ms:rtc:saas:`` (wire; also per request with ``X-Ms-Namespace: internal``),
    or ``alternate`` (switches on every response, as users saw)."""
    event_rel_prefix: EventRelPrefix = ""
    """Prefix of the event channel's relations (each event's link rel and ``_embedded`` key, and the
    sender rel): bare by default, as in the UCWA docs; ``ms:rtc:saas:`` as some deployments sent them."""
    date_format: DateFormat = "iso"
    """iso ``2016-06-27T01:42:13.094Z``; dotnet ``/Date(ms)/``; dotnet_escaped: the JSON text carries
    ``\\/Date(ms)\\/`` (.NET's serializer); dotnet_literal: the string value itself has the backslashes."""
    discover_query: DiscoverQuery = "anonymousContext"
    token_status: Literal[200, 201] = 200
    adhoc_status: Literal[200, 201] = 201
    redirect_routes: frozenset[str] = frozenset()
    """Routes answered with 307 to the pool listener when they arrive on the main listener."""
    ucwa_on_pool: bool = True
    """UCWA (psanon) lives on the pool listener (``ucwaext``), so hosts change between responses."""
    mixed_case_hrefs: bool = False
    """Hrefs spelled ``platformService`` / ``endpointid`` (the server matches case-insensitively anyway)."""
    absolute_hrefs: bool = False
    """Every href absolute; by default same-host hrefs are relative, as in Microsoft's samples."""
    my_applications_link: bool = False
    """Discover also carries ``myApplications`` beside ``applications``."""
    drop_capabilities: frozenset[str] = frozenset()
    """Capabilities the tenant admin did not consent to (e.g. ``anonApplicationTokens``)."""
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)

    # tests only
    record_issued_tokens: bool = False
    """Test hook: keep every AAD access token and psat token the simulator issues in
    ``Simulator.issued_tokens`` (so a test can search its output for them). Off by default: nothing kept."""


class SimulatorInfo(BaseModel):
    """How to reach a running simulator (the JSON line of ``anonjoin simulate``)."""

    model_config = ConfigDict(frozen=True)

    discover_url: str
    authority: str
    tenant: str
    tenant_id: str
    client_id: str
    client_secret: str
    endpoint_id: str
    meeting_url: str
    conference_id: str
    origin: str
    ca_file: str
    admin_url: str
    pool_url: str
    scope: str
    token_endpoint: str
    client_key_file: str
    """PEM of an RSA private key whose certificate the application also accepts (certificate credential)."""
    client_cert_thumbprint: str
    admin_token: str = Field(repr=False)
    """The credential of the admin view: send it as ``X-Admin-Token`` (401 without it, 403 if wrong)."""
    pool_urls: tuple[str, ...] = ()
    """Every UCWA pool's base URL (one per pool process with ``--pools N``; ``pool_url`` is the first)."""
    pids: tuple[int, ...] = ()
    """The processes of a simulator that runs on its own: the PID of ``anonjoin simulate`` (the front door)
    first, then its pools'. An in-process ``Simulator`` lists only the pool processes it started."""
