"""The simulator's HTTP front: one route table, one dispatcher, and the place faults are injected.

Rules:
- Every protocol route has a stable name (``ROUTES``); paths and query names match case-insensitively.
- Each listener is an aiohttp low-level ``web.Server`` whose one handler (``Front``) calls ``dispatch``:
  no router, no middleware, no signals on the hot path.
- ``dispatch`` is the only entry point for protocol requests. In order: match the route (404/405),
  resolve the guest's ``asi`` when it can be known cheaply, ask the fault injector (one call per request),
  answer 307 to the pool listener for ``redirect_routes`` arriving on the main listener, run the route,
  then count the request by route and status and append it to the guest's timeline.
- A route signals an error by raising ``BadRequest`` (an error body) or ``Reply`` (a ready response);
  anything else that escapes becomes 500 ``ServiceFailure``, never a traceback on the wire.
- ``/_admin`` is a separate prefix handled by ``_admin.py`` and never counted or faulted.
- Every response carries ``X-MS-Correlation-Id``, ``X-MS-Server-Fqdn`` and echoes ``client-request-id``
  (``Front`` stamps them on the way out; a fault that sends its response itself gets them from the injector).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import HttpProcessingError

from anonjoin.simulator import _aad, _admin, _tap, _ucwa
from anonjoin.simulator._core import MAIN_FQDN, MAX_ASI_CHARS, POOL_FQDN, Call, Core
from anonjoin.simulator._wire import BadRequest, Reply, error_response

__all__ = ["ROUTES", "Front", "Route", "dispatch", "make_server"]

log = logging.getLogger("anonjoin.simulator")
_ids = random.Random()  # correlation ids: unique enough, cheap, and apart from the seeded stream

Handler = Callable[[Core, Call], Awaitable[web.StreamResponse]]

_APP = r"/ucwa/psanon/v1/applications/(?P<gid>[^/]+)"
_TAP = r"/platformservice/v1/applications"


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler

    @property
    def head(self) -> str | None:
        """The fixed first path segment (lower case), or ``None`` when it is a parameter (the tenant)."""
        first = self.pattern.pattern.split("/", 2)[1]
        return None if first.startswith("(") else first.lower()


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

# The routes a path can match, by its first segment: the routes with that fixed first segment and the
# tenant routes, in ROUTES order (so the first match is the same as scanning all of ROUTES).
_ANY_HEAD: tuple[Route, ...] = tuple(r for r in ROUTES if r.head is None)
_BY_HEAD: dict[str, tuple[Route, ...]] = {
    head: tuple(r for r in ROUTES if r.head in (head, None)) for head in {r.head for r in ROUTES} if head
}


def _match(method: str, path: str) -> tuple[Route | None, dict[str, str], list[str]]:
    head = path.split("/", 2)[1].lower() if path.startswith("/") else ""
    return first_match(_BY_HEAD.get(head, _ANY_HEAD), method, path)


def first_match(
    routes: Iterable[Route], method: str, path: str
) -> tuple[Route | None, dict[str, str], list[str]]:
    """The first of ``routes`` matching ``method`` and ``path`` with its parameters, else the methods
    allowed on ``path`` (for a 405)."""
    allowed: list[str] = []
    for route in routes:
        m = route.pattern.fullmatch(path)
        if m is None:
            continue
        if route.method == method:
            return route, {k: v for k, v in m.groupdict().items() if v is not None}, []
        allowed.append(route.method)
    return None, {}, allowed


def _resolve_asi(core: Core, route: str, request: web.BaseRequest, params: dict[str, str]) -> str | None:
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


async def _peek_asi(request: web.BaseRequest) -> str | None:
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


async def dispatch(core: Core, listener: str, request: web.BaseRequest) -> web.StreamResponse:
    """Answer one request that arrived on ``listener`` (``"main"`` or ``"pool"``)."""
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
    if call.asi is not None and len(call.asi) > MAX_ASI_CHARS:
        call.asi = None  # never a key of the bookkeeping
    fault = (
        None
        if too_large
        else await core.injector.apply(name, request, call.asi, server_fqdn=server_fqdn(listener))
    )
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
    app = gid.lower() if gid is not None else None
    core.record(name, response.status, call.asi, response, app, injected=fault is not None)
    if fault is None and call.asi is not None and call.asi not in core.guests:
        core.injector.forget(name, call.asi)  # a failed request of an unknown guest leaves nothing behind
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


def server_fqdn(listener: str) -> str:
    """The ``X-MS-Server-Fqdn`` of a listener."""
    return POOL_FQDN if listener == "pool" else MAIN_FQDN


def _correlation_id() -> str:
    # a version-4 UUID from the module's PRNG; not uuid4(): its os.urandom call per response showed up in
    # load profiles. The same text as str(uuid.UUID(int=n, version=4)), without the object.
    n = (_ids.getrandbits(128) & ~(0xF000 << 64) & ~(0xC000 << 48)) | (0x4000 << 64) | (0x8000 << 48)
    h = f"{n:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _stamp(request: web.BaseRequest, response: web.StreamResponse, fqdn: str) -> None:
    """The tracing headers of protocol.md §2, on a response that has not been sent yet."""
    headers = response.headers
    if "X-MS-Correlation-Id" not in headers:
        headers["X-MS-Correlation-Id"] = _correlation_id()
    if "X-MS-Server-Fqdn" not in headers:
        headers["X-MS-Server-Fqdn"] = fqdn
    client_request_id = request.headers.get("client-request-id")
    if client_request_id and "client-request-id" not in headers:
        headers["client-request-id"] = client_request_id[:100]


async def _expect(request: web.BaseRequest) -> web.StreamResponse | None:
    """``Expect: 100-continue`` as aiohttp's router answers it; any other expectation: 417."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get("Expect", "").lower() != "100-continue":
        return web.Response(status=417, text=f"Unknown Expect: {request.headers.get('Expect', '')}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim response is not part of the response's size
    await request.writer.drain()
    return None


class Front:
    """The one handler of a listener's low-level server: dispatch, then stamp the tracing headers."""

    def __init__(self, core: Core, listener: str) -> None:
        self.core = core
        self.listener = listener
        self.fqdn = server_fqdn(listener)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        response: web.StreamResponse | None
        try:
            response = await _expect(request) if "Expect" in request.headers else None
            if response is None:
                response = await dispatch(self.core, self.listener, request)
        except web.HTTPException as exc:  # aiohttp sends it (returning one is deprecated): stamp it first
            _stamp(request, exc, self.fqdn)
            raise
        except ConnectionResetError:
            # The client went away before the answer (a close fault on a poll it cancelled): nothing can
            # reach it, and it is no failure of the simulator. aiohttp drops the answer quietly.
            log.debug("simulator request %s %s: the client went away", request.method, request.path)
            response = error_response(500, "ClientGone", "The client closed the connection.")
        except Exception:  # a bug outside the routes: a clean 500 on the wire, the traceback in the log
            log.exception("simulator request %s %s failed", request.method, request.path)
            response = error_response(
                500, "InternalServerError", "The service failed to process the request."
            )
        if not response.prepared:
            _stamp(request, response, self.fqdn)
        return response


class _QuietClientErrors(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger, minus the tracebacks of requests it could not parse.

    aiohttp answers a request line or header it cannot parse (too long, bad method, bad framing) with a 4xx
    itself and logs "Error handling request" with a traceback at ERROR. That is the client's fault, not the
    simulator's: it is one DEBUG line here, without the traceback or the exception's text (which may quote
    the request). Anything else aiohttp logs passes through unchanged.
    """

    def _client_error(self, kwargs: dict[str, Any]) -> str | None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            del kwargs["exc_info"]
            return type(exc).__name__
        return None

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        name = self._client_error(kwargs)
        if name is None:
            self.logger.exception(msg, *args, **kwargs)
        else:
            self.logger.debug(f"{msg} (%s)", *args, name, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        name = self._client_error(kwargs)
        self.logger.debug(msg if name is None else f"{msg} (%s)", *args, *((name,) if name else ()), **kwargs)


_SERVER_LOG = _QuietClientErrors(logging.getLogger("aiohttp.server"), {})


def make_server(core: Core, listener: str, **kwargs: Any) -> web.Server:
    """The low-level aiohttp server of one listener (``kwargs`` go to ``web.Server``; parse errors of
    hostile requests are answered by aiohttp and logged at DEBUG only, see ``_QuietClientErrors``)."""
    loop = asyncio.get_running_loop()
    max_body = core.config.max_body_bytes

    def request_factory(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, loop, client_max_size=max_body)

    kwargs.setdefault("logger", _SERVER_LOG)
    return web.Server(Front(core, listener), request_factory=request_factory, **kwargs)
