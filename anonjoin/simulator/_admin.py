"""The admin view, under ``/_admin`` only (never mixed with protocol routes, never faulted or counted).

Routes: ``GET /_admin/state`` (the snapshot), ``POST /_admin/meetings`` (``{"lobby", "lobby_delay_s",
"subject"}`` -> meeting info), ``POST /_admin/meetings/{conference_id}/end``,
``POST /_admin/guests/{asi}/drop|eject|admit``, ``GET|PUT /_admin/faults`` (a ``FaultProfile`` as JSON, or
``{"name": "<profile>"}`` for a named one). Unknown ids answer 404; bad bodies 400.

With pool processes (``anonjoin simulate --pools N``) the front door answers for the whole simulator
(``_pools.FrontDoor.admin``: the state merged over every process, actions sent to every pool). Each pool
also takes ``POST /_admin/_internal/sync`` (``{"pool_urls": [...], "meetings": [Meeting.spec(), ...]}``)
from its front door.

Every route needs the simulator's admin token (``SimulatorInfo.admin_token``) in ``X-Admin-Token``:
without it 401, a wrong one 403 (compared in constant time). The token is never logged or echoed.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from pydantic import ValidationError

from anonjoin._exceptions import ConfigurationError
from anonjoin.simulator._core import Core
from anonjoin.simulator._faults import PROFILES, FaultProfile
from anonjoin.simulator._meetings import Meeting

__all__ = ["ADMIN_TOKEN_HEADER", "handle", "local"]

ADMIN_TOKEN_HEADER = "X-Admin-Token"

_MEETING_END = re.compile(r"/_admin/meetings/(?P<cid>[^/]+)/end")
_GUEST = re.compile(r"/_admin/guests/(?P<asi>[^/]+)/(?P<action>drop|eject|admit)")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.BaseRequest) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


def _denied(core: Core, request: web.BaseRequest) -> web.Response | None:
    """401 without the admin token, 403 with a wrong one, None with the right one."""
    given = request.headers.get(ADMIN_TOKEN_HEADER)
    if given is None:
        return _error(401, f"the admin view needs the {ADMIN_TOKEN_HEADER} header")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), core.admin_token.encode()):
        return _error(403, "wrong admin token")
    return None


async def handle(core: Core, request: web.BaseRequest) -> web.StreamResponse:
    denied = _denied(core, request)
    if denied is not None:
        return denied
    if core.cluster is not None:
        return await core.cluster.admin(request, local)
    return await local(core, request)


async def local(core: Core, request: web.BaseRequest) -> web.StreamResponse:
    """The admin view of this process alone (the token already checked)."""
    path, method = request.path.rstrip("/"), request.method
    try:
        if path in ("/_admin", "/_admin/state") and method == "GET":
            return web.json_response(core.snapshot())
        if path == "/_admin/meetings" and method == "POST":
            body = await _body(request)
            lobby = body.get("lobby", "none")
            if lobby not in ("none", "admit", "deny"):
                raise ValueError("lobby must be none, admit or deny")
            meeting = core.state.create_meeting(
                subject=str(body.get("subject", "anonjoin simulated meeting")),
                lobby=lobby,
                lobby_delay_s=float(body.get("lobby_delay_s", core.config.lobby_delay_s)),
            )
            return web.json_response(meeting.info(), status=201)
        if path == "/_admin/faults":
            if method == "GET":
                return web.json_response(core.profile.model_dump(mode="json"))
            if method == "PUT":
                body = await _body(request)
                profile = _profile(body)
                core.injector.set_profile(profile)
                return web.json_response(profile.model_dump(mode="json"))
        m = _MEETING_END.fullmatch(path)
        if m and method == "POST":
            if not core.state.end_meeting(unquote(m["cid"])):
                return _error(404, "no such meeting")
            return web.json_response({"ended": m["cid"]})
        m = _GUEST.fullmatch(path)
        if m and method == "POST":
            asi, action = unquote(m["asi"]), m["action"]
            done = {"drop": core.state.drop, "eject": core.state.eject, "admit": core.state.admit}[action](
                asi
            )
            if not done:
                return _error(404, f"guest {asi!r} is not in a meeting")
            return web.json_response({action: asi})
        if path == "/_admin/_internal/sync" and method == "POST":
            body = await _body(request)
            urls = body.get("pool_urls")
            if urls is not None:
                if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                    raise ValueError("pool_urls must be a list of URLs")
                core.pool_urls = tuple(urls)
            for spec in body.get("meetings", ()):
                core.state.add_meeting(Meeting(**spec))
            return web.json_response({"meetings": len(core.state.meetings)})
    except (ValueError, TypeError, RecursionError, ValidationError, ConfigurationError) as exc:
        return _error(400, " ".join(str(exc).split())[:300])
    return _error(404, "no such admin route")


def _profile(body: dict[str, Any]) -> FaultProfile:
    if set(body) == {"name"}:
        if body["name"] not in PROFILES:
            raise ValueError(f"unknown fault profile {body['name']!r}")
        return PROFILES[body["name"]]
    return FaultProfile.model_validate(body)
