"""UCWA psanon: the anonymous guest's side (protocol.md §4.5-§4.8).

Rules:
- Anonymous discover takes the psat from the query (``anonymousContext``, ``anonymousMeetingJoinContext``
  or ``discoverContext``, any case; one or two levels of URL encoding); ``Authorization`` is optional.
  The ``Origin`` must be one of the token's ``ao``. ``conferenceId`` is at the top level (our rule).
- Every other guest route needs ``Authorization: Bearer psat=<JWT>`` (``psat=`` optional); a token that
  fails verification (signature, RS256 only, expiry, not yet valid, another tenant ``tid`` or endpoint
  ``aeu``, no ``asi``) is 401. An ``Origin`` outside ``ao`` is 403 (required
  on discover and anonApplications, checked when present elsewhere).
- anonApplications requires ``culture`` and ``userAgent`` (at most 100 characters); keys in any case.
- Requests to an application that was evicted or deleted: 404 ``ApplicationNotFound``; expired: 410
  ``InactiveApplicationExpired``; a psat of another guest: 403.
- onlineMeetingInvitations: field limits -> 400 ``ParameterValidationFailure``; a conference other than
  the token's -> 403; a meeting that does not exist (or ended) -> 404 ``DestinationNotFound``; then 201
  with ``Location`` and an empty body.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from aiohttp import web

from anonjoin.simulator._core import Call, Core
from anonjoin.simulator._events import BadKnob, Batch, Closed, Event, Replaced, Resume, Resync
from anonjoin.simulator._meetings import UCWA_ROOT, Application, UcwaError
from anonjoin.simulator._tap import ANON_QUERY_NAMES, PS
from anonjoin.simulator._tokens import InvalidTokenError
from anonjoin.simulator._wire import BadRequest, Reply, WireDate, error_response, json_ci, query_ci, read_json

__all__ = [
    "anon_applications",
    "anon_context",
    "anon_discover",
    "application",
    "delete_application",
    "events",
    "invitations",
    "me_action",
    "resource",
]

IMPORTANCE = ("Normal", "Urgent", "Emergency")


# -- tokens and origins ------------------------------------------------------------------------------
def anon_context(request: web.BaseRequest) -> str | None:
    """The psat token (``psat=`` stripped) carried by a discover link's query, or ``None``."""
    for name in ANON_QUERY_NAMES:
        value = query_ci(request, name)
        if value is None:
            continue
        for _ in range(2):
            if value.lower().startswith("psat="):
                return value[5:]
            if value.startswith("eyJ"):
                return value
            value = unquote(value)
    return None


def _unauthorized(call: Call, message: str) -> Reply:
    headers = {
        "WWW-Authenticate": f'MsRtcOAuth href="{call.wire.main}/WebTicket/oauthtoken",'
        'grant_type="urn:microsoft.rtc:anonmeeting"'
    }
    return Reply(error_response(401, "InvalidToken", message, headers))


def _verify(core: Core, call: Call, token: str | None) -> dict[str, Any]:
    if not token:
        raise _unauthorized(call, "A psat bearer token is required.")
    try:
        claims = core.psat.verify(token)
    except InvalidTokenError as exc:
        raise _unauthorized(call, f"The psat token is invalid ({exc}).") from None
    config = core.config
    if (
        claims.get("tid") != config.tenant_id
        or str(claims.get("aeu", "")).lower() != config.endpoint_id.lower()
    ):
        raise _unauthorized(call, "The psat token was issued for another tenant or application endpoint.")
    if not isinstance(claims.get("asi"), str) or not claims["asi"]:
        raise _unauthorized(call, "The psat token has no applicationSessionId.")
    return claims


def bearer_psat(request: web.BaseRequest) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    value = value.strip()
    return value[5:] if value.lower().startswith("psat=") else value or None


def _check_origin(call: Call, claims: dict[str, Any], *, required: bool) -> None:
    origin = call.request.headers.get("Origin")
    if origin is None and not required:
        return
    allowed = str(claims.get("ao", "")).lower().split(";")
    if origin is None or origin.strip().rstrip("/").lower() not in allowed:
        raise BadRequest(403, "OriginNotAllowed", "The Origin is not one of the token's allowed origins.")


def _application(core: Core, call: Call) -> tuple[Application, dict[str, Any]]:
    gid = call.params["gid"].lower()
    app = core.state.apps.get(gid)
    if app is None:
        call.asi = call.asi or core.psat_asi(bearer_psat(call.request))
        if core.state.gone.get(gid) == "expired":
            raise BadRequest(410, "InactiveApplicationExpired", "The application expired while inactive.")
        raise BadRequest(404, "ApplicationNotFound", "No such application.")
    call.asi = app.asi
    claims = _verify(core, call, bearer_psat(call.request))
    if claims.get("asi") != app.asi:
        raise BadRequest(403, "Forbidden", "The token belongs to another application session.")
    _check_origin(call, claims, required=False)
    return app, claims


# -- routes ------------------------------------------------------------------------------------------
async def anon_discover(core: Core, call: Call) -> web.StreamResponse:
    claims = _verify(core, call, anon_context(call.request))
    call.asi = claims.get("asi")
    _check_origin(call, claims, required=True)
    w = call.wire
    body: dict[str, Any] = {
        "_links": {
            "self": w.link(f"{PS}/discover"),
            "anonApplications": w.link(f"{UCWA_ROOT}", core.ucwa_base),
        },
        "rel": w.rel("discover"),
    }
    if claims.get("confid"):
        body["conferenceId"] = claims["confid"]
    return w.json(body)


def _app_body(core: Core, call: Call, app: Application) -> dict[str, Any]:
    w, base, ucwa = call.wire, app.base, core.ucwa_base
    comm: dict[str, Any] = {
        "self": w.link(f"{base}/communication", ucwa),
        "startMessaging": w.link(f"{base}/communication/messagingInvitations", ucwa),
        "conversations": w.link(f"{base}/communication/conversations", ucwa),
    }
    if app.claims.get("confid"):
        comm["joinOnlineMeeting"] = w.link(f"{base}/communication/onlineMeetingInvitations", ucwa)
    return {
        "id": app.gid,
        "culture": app.culture,
        "userAgent": app.user_agent,
        "type": "Application",
        "expires": WireDate(core.clock() + core.idle_s()),
        "etag": str(app.channel.ack),
        "_links": {
            "self": w.link(base, ucwa),
            "policies": w.link(f"{base}/policies", ucwa),
            "batch": w.link(f"{base}/batch", ucwa),
            "events": w.link(f"{base}/events?ack={app.channel.ack}&key={app.channel.key}", ucwa),
        },
        "_embedded": {
            "me": {
                "uri": app.me_uri,
                "name": app.display_name,
                "_links": {"self": w.link(f"{base}/me", ucwa)},
                "rel": "me",
            },
            "communication": {"_links": comm, "etag": "4294967295", "rel": "communication"},
        },
        "rel": "application",
    }


def _text(body: dict[str, Any], name: str, limit: int, *, required: bool, default: str = "") -> str:
    value = json_ci(body, name)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise BadRequest(400, "ParameterValidationFailure", f"{name} is required")
        return default
    if not isinstance(value, str):
        raise BadRequest(400, "ParameterValidationFailure", f"{name} must be a string")
    if len(value) > limit:
        raise BadRequest(400, "ParameterValidationFailure", f"{name} must be at most {limit} characters")
    return value


async def anon_applications(core: Core, call: Call) -> web.StreamResponse:
    claims = _verify(core, call, bearer_psat(call.request))
    asi = str(claims.get("asi", ""))
    call.asi = asi
    _check_origin(call, claims, required=True)
    body = await read_json(call.request, core.config.max_body_bytes)
    culture = _text(body, "culture", 100, required=True)
    user_agent = _text(body, "userAgent", 100, required=True)
    name = _text(body, "anonymousDisplayName", 250, required=False, default="Guest")
    app = core.state.new_application(
        asi=asi, claims=claims, display_name=name, culture=culture, user_agent=user_agent
    )
    w = call.wire
    return w.json(
        _app_body(core, call, app), status=201, headers={"Location": w.href(app.base, core.ucwa_base)}
    )


async def application(core: Core, call: Call) -> web.StreamResponse:
    app, _ = _application(core, call)
    return call.wire.json(_app_body(core, call, app))


async def delete_application(core: Core, call: Call) -> web.StreamResponse:
    app, _ = _application(core, call)
    core.state.delete_application(app)
    return web.Response(status=204)


async def invitations(core: Core, call: Call) -> web.StreamResponse:
    app, claims = _application(core, call)
    body = await read_json(call.request, core.config.max_body_bytes)
    uri = _text(body, "onlineMeetingUri", 1024, required=True)
    operation_id = _text(body, "operationId", 50, required=True)
    subject = _text(body, "subject", 250, required=False)
    _text(body, "anonymousDisplayName", 250, required=False)
    importance = _text(body, "importance", 20, required=False, default="Normal")
    canonical = next((i for i in IMPORTANCE if i.lower() == importance.lower()), None)
    if canonical is None:
        raise BadRequest(
            400, "ParameterValidationFailure", f"importance must be one of {', '.join(IMPORTANCE)}"
        )
    meeting = core.state.meeting_by_uri(uri)
    confid = claims.get("confid")
    if (confid and str(confid).lower() != uri.lower()) or (not confid and meeting is not None):
        raise BadRequest(403, "Forbidden", "The conference does not match the token.")
    if meeting is None or meeting.ended:
        raise BadRequest(404, "DestinationNotFound", "No such meeting (or it has ended).")
    try:
        path = core.state.invite(
            app, meeting, operation_id=operation_id, importance=canonical, subject=subject
        )
    except UcwaError as exc:
        raise BadRequest(exc.status, exc.subcode, exc.message) from None
    return web.Response(status=201, headers={"Location": call.wire.href(path, core.ucwa_base)})


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


async def events(core: Core, call: Call) -> web.StreamResponse:
    app, _ = _application(core, call)
    request, channel, w = call.request, app.channel, call.wire
    try:
        channel.set_knobs(
            query_ci(request, "timeout"),
            query_ci(request, "low"),
            query_ci(request, "medium"),
            query_ci(request, "priority"),
        )
    except BadKnob as exc:
        raise BadRequest(400, "ParameterValidationFailure", str(exc)) from None
    result = await channel.poll(_int(query_ci(request, "ack")), query_ci(request, "key"))
    base = f"{app.base}/events?key={channel.key}&ack="
    if isinstance(result, Replaced):
        raise BadRequest(409, "PGetReplaced", "Another poll with the same ack replaced this one.")
    if isinstance(result, Closed):
        if result.reason == "expired":
            raise BadRequest(410, "InactiveApplicationExpired", "The application expired while inactive.")
        if result.reason == "shutdown":
            raise BadRequest(503, "ServiceUnavailable", "The service is shutting down.")
        raise BadRequest(404, "ApplicationNotFound", "The application is gone.")
    if isinstance(result, Resume):
        link = w.link(base + str(result.ack), core.ucwa_base)
        return w.json({"_links": {"self": link, "resume": link}})
    if isinstance(result, Resync):
        return w.json(
            {
                "_links": {
                    "self": w.link(base + str(result.ack), core.ucwa_base),
                    "resync": w.link(base + str(result.ack), core.ucwa_base),
                }
            }
        )
    assert isinstance(result, Batch)
    body: dict[str, Any] = {
        "_links": {
            "self": w.link(base + str(result.ack), core.ucwa_base),
            "next": w.link(base + str(result.ack + 1), core.ucwa_base),
        }
    }
    if result.events:
        body["sender"] = _senders(result.events, core.config.event_rel_prefix)
    return w.json(body)


def _senders(events: tuple[Event, ...], prefix: str = "") -> list[dict[str, Any]]:
    senders: list[dict[str, Any]] = []
    for event in events:
        if not senders or senders[-1]["href"] != event.sender_href:
            senders.append({"rel": prefix + event.sender_rel, "href": event.sender_href, "events": []})
        senders[-1]["events"].append(_prefixed(event.body, prefix) if prefix else event.body)
    return senders


def _prefixed(body: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The event with its link rel and ``_embedded`` keys in ``prefix`` form (the stored one untouched)."""
    out = dict(body)
    link = body.get("link")
    if isinstance(link, dict) and isinstance(link.get("rel"), str):
        out["link"] = {**link, "rel": prefix + link["rel"]}
    embedded = body.get("_embedded")
    if isinstance(embedded, dict):
        out["_embedded"] = {prefix + k: v for k, v in embedded.items()}
    return out


async def me_action(core: Core, call: Call) -> web.StreamResponse:
    _application(core, call)
    raise BadRequest(403, "AnonymousNotAllowed", "Anonymous users cannot do this.")


async def resource(core: Core, call: Call) -> web.StreamResponse:
    app, _ = _application(core, call)
    found = app.resources.get(call.request.path.lower())
    if found is None:
        raise BadRequest(404, "NotFound", "No such resource.")
    return call.wire.json(found)
