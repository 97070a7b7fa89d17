"""The Trusted Application API (protocol.md §4.1-§4.4, §5): the service application's side.

Rules:
- Every route needs ``Authorization: Bearer <AAD token>``. No bearer token at all: 401 with the two
  ``WWW-Authenticate`` headers (``Bearer ...`` and ``MsRtcOAuth ... grant_type=...``) and an HTML body.
  A token that fails verification (signature, algorithm, expiry, audience, tenant): 403 ``InvalidToken``
  with ``Warning`` and ``X-Ms-diagnostics``.
- ``endpointId`` (query, any case) is required on applications and below; an endpoint the token's
  tenant/app has not provisioned: 403 ``ApplicationNotFound``.
- Capabilities list one link per consented permission; ``drop_capabilities`` removes some.
- anonApplicationTokens validates ``applicationSessionId`` (1..256 chars), ``allowedOrigins`` (``;``-list of
  HTTPS origins, each cut to ``scheme://host[:port]``) and ``meetingUrl`` (the HTTP join URL of a known,
  running meeting: a SIP URI is 400, an unknown or ended meeting 404 ``DestinationNotFound``). The psat is
  an RS256 JWT with ``x5t`` and ``nbf exp asi aeu ao ruu`` (+ ``confid ucwaext`` for a meeting).
- adhocMeetings creates a meeting. Lobby by ``accessLevel``: ``Everyone`` uses the simulator's lobby
  setting, ``Invited``/``SameEnterprise`` hold anonymous guests in the lobby until admitted, ``Locked``/
  ``None`` deny them.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

from aiohttp import web
from multidict import CIMultiDict

from anonjoin.simulator._config import LobbyMode
from anonjoin.simulator._core import Call, Core
from anonjoin.simulator._meetings import Meeting
from anonjoin.simulator._tokens import InvalidTokenError
from anonjoin.simulator._wire import BadRequest, Reply, WireDate, json_ci, query_ci, read_json

__all__ = ["adhoc_meetings", "anon_tokens", "applications", "capabilities", "discover", "trusted_app_id"]

PS = "/platformservice"
CAPABILITIES = (
    "anonApplicationTokens",
    "adhocMeetings",
    "myOnlineMeetings",
    "joinOnlineMeeting",
    "startMessaging",
    "startAudioVideo",
)
ACCESS_LEVELS = ("Everyone", "Invited", "Locked", "SameEnterprise", "None")
UNAUTHORIZED_HTML = (
    "<html><head><title>401 - Unauthorized</title></head>"
    "<body><h1>401 - Unauthorized: Access is denied due to invalid credentials.</h1></body></html>"
)
ANON_QUERY_NAMES = ("anonymousContext", "anonymousMeetingJoinContext", "discoverContext")
_PSAT_QUOTED = quote(quote("psat=", safe=""), safe="")


@functools.lru_cache(maxsize=64)
def trusted_app_id(endpoint: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, endpoint.lower()))


# -- authentication ----------------------------------------------------------------------------------
def _fqdn(call: Call) -> str:
    return call.request.host.split(":")[0]


def _require_aad(core: Core, call: Call) -> dict[str, Any]:
    auth = call.request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        headers: CIMultiDict[str] = CIMultiDict()
        headers.add(
            "WWW-Authenticate",
            'Bearer trusted_issuers="00000001-0000-0000-c000-000000000000@*", '
            'client_id="00000004-0000-0ff1-ce00-000000000000", '
            'authorization_uri="https://login.windows.net/common/oauth2/authorize"',
        )
        headers.add(
            "WWW-Authenticate",
            f'MsRtcOAuth href="{call.wire.here}/WebTicket/oauthtoken",'
            'grant_type="urn:microsoft.rtc:windows,urn:microsoft.rtc:anonmeeting,password"',
        )
        raise Reply(
            web.Response(
                status=401,
                headers=headers,
                content_type="text/html",
                text=UNAUTHORIZED_HTML,
            )
        )
    try:
        claims = core.aad.verify(value.strip())
        if claims.get("aud") not in core.config.audiences or claims.get("tid") != core.config.tenant_id:
            raise InvalidTokenError("audience or tenant")
    except InvalidTokenError:
        fqdn = _fqdn(call)
        raise BadRequest(
            403,
            "InvalidToken",
            "The OAuth token is invalid.",
            {
                "Warning": f'120 {fqdn} "InvalidToken"',
                "X-Ms-diagnostics": f'28055;source="{fqdn}";reason="The OAuth token is invalid."',
            },
        ) from None
    return claims


def _require_endpoint(core: Core, call: Call, claims: dict[str, Any]) -> str:
    endpoint = query_ci(call.request, "endpointId")
    if not endpoint:
        raise BadRequest(400, "ParameterValidationFailure", "The endpointId query parameter is required.")
    if endpoint.lower() != core.config.endpoint_id.lower() or claims.get("appid") != core.config.client_id:
        raise BadRequest(
            403, "ApplicationNotFound", "The application endpoint is not provisioned for this tenant."
        )
    app_id = call.params.get("app")
    if app_id is not None and app_id.lower() != trusted_app_id(core.config.endpoint_id):
        raise BadRequest(403, "ApplicationNotFound", "No such application for this endpoint.")
    return core.config.endpoint_id


@functools.lru_cache(maxsize=64)
def _q(endpoint: str) -> str:
    return "?endpointId=" + quote(endpoint, safe="")


def _app_path(core: Core) -> str:
    return f"{PS}/v1/applications/{trusted_app_id(core.config.endpoint_id)}"


# -- routes ------------------------------------------------------------------------------------------
async def discover(core: Core, call: Call) -> web.StreamResponse:
    _require_aad(core, call)
    w = call.wire
    links: dict[str, Any] = {
        "self": w.link(f"{PS}/discover"),
        w.rel("applications"): w.abs_link(f"{PS}/v1/applications", w.main),
    }
    if core.config.my_applications_link:
        links[w.rel("myApplications")] = w.abs_link(f"{PS}/v1/applications", w.main)
    return w.json({"_links": links, "rel": w.rel("discover")})


async def applications(core: Core, call: Call) -> web.StreamResponse:
    claims = _require_aad(core, call)
    endpoint = _require_endpoint(core, call, claims)
    w = call.wire
    return w.json(
        {
            "_links": {
                "self": w.link(f"{PS}/v1/applications{_q(endpoint)}"),
                w.rel("application"): w.link(f"{_app_path(core)}{_q(endpoint)}"),
            },
            "rel": w.rel("applications"),
        }
    )


async def capabilities(core: Core, call: Call) -> web.StreamResponse:
    claims = _require_aad(core, call)
    endpoint = _require_endpoint(core, call, claims)
    w, q, base = call.wire, _q(endpoint), _app_path(core)
    allowed = [c for c in CAPABILITIES if c not in core.config.drop_capabilities]
    links: dict[str, Any] = {"self": w.link(base + q)}
    if "anonApplicationTokens" in allowed:
        links[w.rel("anonApplicationTokens")] = w.link(f"{base}/anonApplicationTokens{q}")
    comm_links: dict[str, Any] = {"self": w.link(f"{base}/communication{q}")}
    for name in ("joinOnlineMeeting", "startMessaging", "startAudioVideo"):
        if name in allowed:
            comm_links[w.rel(name)] = w.link(f"{base}/communication/{name[0].lower()}{name[1:]}s{q}")
    embedded: dict[str, Any] = {
        w.rel("communication"): {"_links": comm_links, "etag": "4294967295", "rel": w.rel("communication")},
    }
    if "adhocMeetings" in allowed:
        embedded[w.rel("adhocMeetings")] = {
            "_links": {"self": w.link(f"{base}/adhocMeetings{q}")},
            "rel": w.rel("adhocMeetings"),
        }
    if "myOnlineMeetings" in allowed:
        embedded["myOnlineMeetings"] = {
            "_links": {"self": w.link(f"{base}/myOnlineMeetings{q}")},
            "rel": "myOnlineMeetings",
        }
    return w.json({"_links": links, "_embedded": embedded, "rel": w.rel("application")})


def normalise_origins(text: str, allow_http: bool) -> list[str]:
    """``a;b`` -> ``["scheme://host[:port]", ...]``; ``BadRequest`` for anything that is not an origin."""
    origins: list[str] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            parts = urlsplit(part)
            port = parts.port
        except ValueError:
            port, parts = None, None
        schemes = ("https", "http") if allow_http else ("https",)
        if parts is None or parts.scheme.lower() not in schemes or not parts.hostname:
            raise BadRequest(
                400,
                "ParameterValidationFailure",
                f"allowedOrigins: {part[:80]!r} is not an {'/'.join(schemes)} origin",
            )
        origin = f"{parts.scheme.lower()}://{parts.hostname.lower()}" + (f":{port}" if port else "")
        if origin not in origins:
            origins.append(origin)
    if not origins:
        raise BadRequest(400, "ParameterValidationFailure", "allowedOrigins must name at least one origin")
    return origins


def _str_field(body: dict[str, Any], name: str, *, required: bool, limit: int) -> str | None:
    value = json_ci(body, name)
    if value is None:
        if required:
            raise BadRequest(400, "ParameterValidationFailure", f"{name} is required")
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRequest(400, "ParameterValidationFailure", f"{name} must be a non-empty string")
    if len(value) > limit:
        raise BadRequest(400, "ParameterValidationFailure", f"{name} must be at most {limit} characters")
    return value


async def anon_tokens(core: Core, call: Call) -> web.StreamResponse:
    claims = _require_aad(core, call)
    endpoint = _require_endpoint(core, call, claims)
    if "anonApplicationTokens" in core.config.drop_capabilities:
        raise BadRequest(
            403, "CapabilityNotAvailable", "anonApplicationTokens is not consented for this tenant"
        )
    body = await read_json(call.request, core.config.max_body_bytes)
    asi = _str_field(body, "applicationSessionId", required=True, limit=256)
    assert asi is not None
    call.asi = asi
    origins_text = _str_field(body, "allowedOrigins", required=True, limit=4096)
    assert origins_text is not None
    origins = normalise_origins(origins_text, core.config.allow_http_origins)
    meeting_url = _str_field(body, "meetingUrl", required=False, limit=2048)
    meeting: Meeting | None = None
    if meeting_url is not None:
        scheme = urlsplit(meeting_url.strip()).scheme.lower()
        if scheme not in ("http", "https"):
            raise BadRequest(
                400,
                "ParameterValidationFailure",
                "meetingUrl must be the meeting's HTTP join URL, not a SIP URI",
            )
        meeting = core.state.meeting_by_url(meeting_url)
        if meeting is None or meeting.ended:
            raise BadRequest(404, "DestinationNotFound", "No such meeting (or it has ended).")
    now = int(core.clock())
    exp = now + max(1, int(core.psat_ttl_s()))
    w = call.wire
    psat_claims: dict[str, Any] = {
        "iss": "psat.sim.anonjoin.invalid",
        "iat": now,
        "nbf": now,
        "exp": exp,
        "asi": asi,
        "aeu": endpoint,
        "ao": ";".join(origins),
        "ruu": f"sip:anonymous-service@{core.config.tenant}",
        "tid": core.config.tenant_id,
        "appid": claims.get("appid"),
    }
    guest_base = core.guest_base(meeting, asi)
    if meeting is not None:
        psat_claims["confid"] = meeting.conference_uri
        psat_claims["ucwaext"] = guest_base + "/ucwa/psanon/v1"
    jwt_text = core.psat.issue(psat_claims, x5t=True)
    token = "psat=" + jwt_text
    if core.issued is not None:
        core.issued.psat.append(token)
    # quote(quote(token, safe=""), safe=""), done by part: the JWT's base64url characters and dots are
    # all unreserved, so quoting it is a cheap no-op, unlike a per-character pass over ~800 characters
    context = _PSAT_QUOTED + quote(quote(jwt_text, safe=""), safe="")
    query = core.config.discover_query
    return w.json(
        {
            "token": token,
            "expiryTime": WireDate(exp),
            "_links": {
                "self": w.link(f"{_app_path(core)}/anonApplicationTokens{_q(endpoint)}"),
                w.rel("discover"): w.abs_link(
                    f"{PS}/discover?{query}={context}", guest_base if core.pool_urls else w.main
                ),
            },
            "rel": w.rel("anonApplicationToken"),
        },
        status=core.config.token_status,
    )


async def adhoc_meetings(core: Core, call: Call) -> web.StreamResponse:
    claims = _require_aad(core, call)
    endpoint = _require_endpoint(core, call, claims)
    if "adhocMeetings" in core.config.drop_capabilities:
        raise BadRequest(403, "CapabilityNotAvailable", "adhocMeetings is not consented for this tenant")
    body = await read_json(call.request, core.config.max_body_bytes)
    subject = _str_field(body, "subject", required=False, limit=250) or "Adhoc meeting"
    level = json_ci(body, "accessLevel")
    level = "Everyone" if level is None or level == "" else level
    if level not in ACCESS_LEVELS:
        raise BadRequest(
            400, "ParameterValidationFailure", f"accessLevel must be one of {', '.join(ACCESS_LEVELS)}"
        )
    description = _str_field(body, "description", required=False, limit=1024) or ""
    lobby: LobbyMode = {"Everyone": core.config.lobby, "Invited": "admit", "SameEnterprise": "admit"}.get(
        level, "deny"
    )
    meeting = core.state.create_meeting(
        subject=subject,
        lobby=lobby,
        lobby_delay_s=core.config.lobby_delay_s,
        access_level=level,
    )
    if core.cluster is not None:
        await core.cluster.new_meeting(meeting)
    w, base = call.wire, f"{_app_path(core)}/adhocMeetings"
    return w.json(
        {
            "accessLevel": level,
            "automaticLeaderAssignment": json_ci(body, "automaticLeaderAssignment") or "Disabled",
            "description": description,
            "entryExitAnnouncement": json_ci(body, "entryExitAnnouncement") or "Disabled",
            "expirationTime": WireDate(meeting.expires),
            "leaders": json_ci(body, "leaders") or [],
            "attendees": [],
            "lobbyBypassForPhoneUsers": json_ci(body, "lobbyBypassForPhoneUsers") or "Disabled",
            "phoneUserAdmission": json_ci(body, "phoneUserAdmission") or "Disabled",
            "onlineMeetingId": meeting.conference_id,
            "onlineMeetingUri": meeting.conference_uri,
            "organizerUri": meeting.organizer,
            "conferenceId": meeting.conference_id,
            "joinUrl": meeting.meeting_url,
            "subject": subject,
            "onlineMeetingRel": "myOnlineMeetings",
            "_links": {
                "self": w.link(f"{base}/{meeting.conference_id}{_q(endpoint)}"),
                w.rel("discover"): w.abs_link(
                    f"{PS}/discover?discoverContext=adhoc%253d{meeting.conference_id}", w.main
                ),
                w.rel("joinAdhocMeeting"): w.link(f"{base}/{meeting.conference_id}/join{_q(endpoint)}"),
            },
            "rel": w.rel("adhocMeeting"),
        },
        status=core.config.adhoc_status,
    )
