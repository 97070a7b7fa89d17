"""The simulator's HTTP front: one route table, one dispatcher, and the place faults are injected.

Rules:
- Every protocol route has a stable name (``ROUTES``); paths and query names match case-insensitively.
- ``dispatch`` is the only entry point for protocol requests. In order: match the route (404/405),
  resolve the guest's ``asi`` when it can be known cheaply, ask the fault injector (one call per request),
  answer 307 to the pool listener for ``redirect_routes`` arriving on the main listener, run the route,
  then count the request by route and status and append it to the guest's timeline.
- A route signals an error by raising ``BadRequest`` (an error body) or ``Reply`` (a ready response);
  anything else that escapes becomes 500 ``ServiceFailure``, never a traceback on the wire.
- ``/_admin`` is a separate prefix handled by ``_admin.py`` and never counted or faulted.
- Every response carries ``X-MS-Correlation-Id``, ``X-MS-Server-Fqdn`` and echoes ``client-request-id``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from anonjoin.simulator import _aad, _admin, _tap, _ucwa
from anonjoin.simulator._core import MAIN_FQDN, POOL_FQDN, Call, Core
from anonjoin.simulator._wire import BadRequest, Reply, error_response

__all__ = ["CORE", "LISTENER", "ROUTES", "Route", "make_app"]

log = logging.getLogger("anonjoin.simulator")
_ids = random.Random()  # correlation ids: unique enough, cheap, and apart from the seeded stream

Handler = Callable[[Core, Call], Awaitable[web.StreamResponse]]
CORE = web.AppKey("anonjoin_sim_core", Core)
LISTENER = web.AppKey("anonjoin_sim_listener", str)

_APP = r"/ucwa/psanon/v1/applications/(?P<gid>[^/]+)"
_TAP = r"/platformservice/v1/applications"


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler


def _r(method: str, pattern: str, name: str, handler: Handler) -> Route:
    return Route(method, re.compile(pattern, re.IGNORECASE), name, handler)


ROUTES: tuple[Route, ...] = (
    _r("GET", r"/(?P<tenant>[^/_][^/]*)/v2\.0/\.well-known/openid-configuration", "aad_openid", _aad.openid),
    _r("GET", r"/(?P<tenant>[^/_][^/]*)/discovery/v2\.0/keys", "aad_keys", _aad.keys),
    _r("POST", r"/(?P<tenant>[^/_][^/]*)/oauth2/v2\.0/token", "aad_token", _aad.token),
    _r("GET", r"/platformservice/discover", "discover", _tap.discover),
    _r("GET", _TAP, "applications", _tap.applications),
    _r("GET", _TAP + r"/(?P<app>[^/]+)", "capabilities", _tap.capabilities),
    _r("POST", _TAP + r"/(?P<app>[^/]+)/anonApplicationTokens", "anon_tokens", _tap.anon_tokens),
    _r("POST", _TAP + r"/(?P<app>[^/]+)/adhocMeetings", "adhoc_meetings", _tap.adhoc_meetings),
    _r("POST", r"/ucwa/psanon/v1/applications", "anon_applications", _ucwa.anon_applications),
    _r("GET", _APP, "application", _ucwa.application),
    _r("DELETE", _APP, "delete_application", _ucwa.delete_application),
    _r("POST", _APP + r"/communication/onlineMeetingInvitations", "invitations", _ucwa.invitations),
    _r("GET", _APP + r"/events", "events", _ucwa.events),
    _r("POST", _APP + r"/me/(?:makeMeAvailable|reportMyActivity)", "me_action", _ucwa.me_action),
    _r("GET", _APP + r"/(?P<rest>.+)", "ucwa_resource", _ucwa.resource),
)


def _match(method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    allowed: list[str] = []
    for route in ROUTES:
        m = route.pattern.fullmatch(path)
        if m is None:
            continue
        if route.method == method:
            return route, {k: v for k, v in m.groupdict().items() if v is not None}, []
        allowed.append(route.method)
    return None, {}, allowed


def _resolve_asi(core: Core, route: str, request: web.Request, params: dict[str, str]) -> str | None:
    """The guest a request belongs to, when that is cheap to know before running the route."""
    if route == "anon_discover":
        return core.psat_asi(_ucwa.anon_context(request))
    if route == "anon_applications":
        return core.psat_asi(_ucwa.bearer_psat(request))
    gid = params.get("gid")
    if gid is not None:
        app = core.state.apps.get(gid.lower())
        return app.asi if app is not None else core.psat_asi(_ucwa.bearer_psat(request))
    return None


class _TooLarge(Exception):
    pass


async def _peek_asi(request: web.Request) -> str | None:
    """The ``applicationSessionId`` of a token POST's body (for fault decisions and timelines)."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise _TooLarge from exc
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(body, dict):
        for key, value in body.items():
            if key.lower() == "applicationsessionid" and isinstance(value, str):
                return value
    return None


async def dispatch(request: web.Request) -> web.StreamResponse:
    core = request.app[CORE]
    listener = request.app[LISTENER]
    path = request.path
    if path == "/_admin" or path.startswith("/_admin/"):
        return await _admin.handle(core, request)
    route, params, allowed = _match(request.method, path)
    if route is None:
        name = "unknown"
        if allowed:
            response: web.StreamResponse = error_response(
                405, None, "Method not allowed.", {"Allow": ", ".join(sorted(set(allowed)))}
            )
        else:
            response = error_response(404, None, "No such resource.")
        core.record(name, response.status, None, response)
        return response
    name = route.name
    handler = route.handler
    if name == "discover" and _ucwa.anon_context(request) is not None:
        name, handler = "anon_discover", _ucwa.anon_discover
    call = Call(
        request=request, route=name, params=params, listener=listener, wire=core.wire(request, listener)
    )
    too_large = request.content_length is not None and request.content_length > core.config.max_body_bytes
    if name == "anon_tokens" and not too_large:
        try:
            call.asi = await _peek_asi(request)
        except _TooLarge:
            too_large = True
    else:
        call.asi = _resolve_asi(core, name, request, params)
    fault = None if too_large else await core.injector.apply(name, request, call.asi)
    if too_large:
        response = error_response(
            413, "EntityTooLarge", f"The request body exceeds {core.config.max_body_bytes} bytes."
        )
    elif fault is not None:
        response = fault
    elif name in core.config.redirect_routes and listener == "main":
        location = core.pool_base + request.path_qs
        response = web.Response(status=307, headers={"Location": location})
    else:
        response = await _run(core, call, handler)
    gid = params.get("gid")
    core.record(name, response.status, call.asi, response, gid.lower() if gid is not None else None)
    return response


async def _run(core: Core, call: Call, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(core, call)
    except BadRequest as exc:
        return error_response(exc.status, exc.subcode, exc.message, exc.headers)
    except Reply as exc:
        return exc.response
    except web.HTTPException:
        raise
    except Exception:  # a bug in the simulator: a clean 500 on the wire, the traceback in the log
        log.exception("simulator route %s failed", call.route)
        return error_response(500, "InternalServerError", "The service failed to process the request.")


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the tracing headers of protocol.md §2 on every response."""
    headers = response.headers
    if "X-MS-Correlation-Id" not in headers:
        # not uuid4(): its os.urandom call per response showed up in load profiles
        headers["X-MS-Correlation-Id"] = str(uuid.UUID(int=_ids.getrandbits(128), version=4))
    listener = request.app[LISTENER]
    headers.setdefault("X-MS-Server-Fqdn", POOL_FQDN if listener == "pool" else MAIN_FQDN)
    client_request_id = request.headers.get("client-request-id")
    if client_request_id and "client-request-id" not in headers:
        headers["client-request-id"] = client_request_id[:100]


def make_app(core: Core, listener: str) -> web.Application:
    app = web.Application(client_max_size=core.config.max_body_bytes)
    app[CORE] = core
    app[LISTENER] = listener
    app.router.add_route("*", "/{tail:.*}", dispatch)
    app.on_response_prepare.append(_stamp)
    return app
