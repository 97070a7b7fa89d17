"""Wire conventions shared by every route (protocol.md §2 and §6).

Rules:
- Error bodies are ``{"code", "subcode", "message"}`` with ``code`` taken from the status (``CODES``).
- Dates inside response bodies are ``WireDate`` values; ``Wire.dumps`` renders them in the configured form.
- Relation names go through ``Wire.rel`` (``service:`` / ``ms:rtc:saas:`` prefix), hrefs through
  ``Wire.href`` (relative when the target is on the listener that answers, unless absolute hrefs are on).
- Requests bodies: at most ``max_body_bytes`` (413), JSON objects only (400 otherwise, never a 500).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from aiohttp import web

from anonjoin.simulator._config import DateFormat

__all__ = [
    "CODES",
    "BadRequest",
    "Reply",
    "Wire",
    "WireDate",
    "error_response",
    "json_ci",
    "query_ci",
    "read_json",
]

CODES: Mapping[int, str] = MappingProxyType(
    {
        400: "BadRequest",
        401: "Unauthorized",
        403: "Forbidden",
        404: "NotFound",
        405: "MethodNotAllowed",
        408: "ClientTimeout",
        409: "Conflict",
        410: "Gone",
        412: "PreConditionFailed",
        413: "EntityTooLarge",
        415: "UnsupportedMediaType",
        429: "TooManyRequests",
        500: "ServiceFailure",
        503: "ServiceUnavailable",
        504: "Timeout",
    }
)
"""An error body's ``code`` for each status (protocol.md §6). The simulator's own table: it imports no
client module (the client keeps its copy in ``anonjoin._core.constants``; a test checks that the two
agree)."""

JSON_TYPE = "application/json"


class BadRequest(Exception):
    """A request the route refuses: becomes an error response with this status and subcode."""

    def __init__(self, status: int, subcode: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.subcode = subcode
        self.message = message
        self.headers = dict(headers or {})


class Reply(Exception):
    """Answer the request with ``response`` now (an early exit from deep inside a route)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


def error_response(
    status: int, subcode: str | None, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The service's error body for ``status`` (protocol.md §6)."""
    body: dict[str, Any] = {"code": CODES.get(status, "ServiceFailure"), "message": message}
    if subcode:
        body["subcode"] = subcode
    return web.Response(
        text=json.dumps(body), status=status, content_type=JSON_TYPE, charset="utf-8", headers=headers
    )


@dataclass(frozen=True, slots=True)
class WireDate:
    """A timestamp (epoch seconds) to be rendered in the configured date form."""

    ts: float


def format_date(ts: float, form: DateFormat) -> str:
    if form == "iso":
        when = dt.datetime.fromtimestamp(ts, dt.UTC)
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    ms = round(ts * 1000)
    if form == "dotnet_literal":
        return f"\\/Date({ms})\\/"
    return f"/Date({ms})/"


@functools.cache
def _encoder(form: DateFormat) -> json.JSONEncoder:
    """One JSON encoder per date form, made once (``json.dumps`` with ``default`` builds one per call).

    Bodies are trees built per response, so the circular-reference check is off.
    """

    def default(value: object) -> object:
        if isinstance(value, WireDate):
            return format_date(value.ts, form)
        raise TypeError(type(value).__name__)

    return json.JSONEncoder(default=default, check_circular=False)


@dataclass(frozen=True, slots=True)
class Wire:
    """How one response is written: relation prefix, date form, hosts and href style."""

    prefix: str
    date_format: DateFormat
    here: str  # "https://127.0.0.1:P" of the listener answering
    main: str
    pool: str
    absolute: bool
    mixed_case: bool

    def rel(self, name: str) -> str:
        """A Trusted Application API relation name with this response's prefix."""
        return self.prefix + name

    def href(self, path: str, base: str | None = None) -> str:
        """``path`` on ``base`` (default: this listener): relative when on this listener, else absolute."""
        base = base or self.here
        if self.mixed_case:
            path = path.replace("/platformservice/", "/platformService/").replace(
                "endpointId=", "endpointid="
            )
        if base == self.here and not self.absolute:
            return path
        return base + path

    def link(self, path: str, base: str | None = None) -> dict[str, str]:
        return {"href": self.href(path, base)}

    def abs_link(self, path: str, base: str) -> dict[str, str]:
        """A link that is always absolute (the samples show these on another host)."""
        if self.mixed_case:
            path = path.replace("/platformservice/", "/platformService/").replace(
                "endpointId=", "endpointid="
            )
        return {"href": base + path}

    def dumps(self, body: Any) -> str:
        form = self.date_format
        text = _encoder(form).encode(body)
        if form == "dotnet_escaped":
            text = text.replace('"/Date(', '"\\/Date(').replace(')/"', ')\\/"')
        return text

    def json(self, body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(
            text=self.dumps(body), status=status, content_type=JSON_TYPE, charset="utf-8", headers=headers
        )


def query_ci(request: web.BaseRequest, name: str) -> str | None:
    """The value of query parameter ``name``, matched case-insensitively (first occurrence)."""
    value = request.query.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in request.query.items():
        if key.lower() == lowered:
            return val
    return None


def json_ci(body: Mapping[str, Any], name: str) -> Any:
    """``body[name]`` with the key matched case-insensitively (one client sent PascalCase keys)."""
    if name in body:
        return body[name]
    lowered = name.lower()
    for key, val in body.items():
        if key.lower() == lowered:
            return val
    return None


async def read_json(request: web.BaseRequest, limit: int) -> dict[str, Any]:
    """The request body as a JSON object; ``BadRequest`` (400/413/415) otherwise."""
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, "EntityTooLarge", f"the request body exceeds {limit} bytes")
    ctype = request.content_type
    if (
        request.body_exists
        and ctype not in (JSON_TYPE, "application/octet-stream", "text/plain")
        and (not ctype.endswith("+json"))
    ):
        raise BadRequest(415, "UnsupportedMediaType", f"expected {JSON_TYPE}, got {ctype}")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BadRequest(413, "EntityTooLarge", f"the request body exceeds {limit} bytes") from exc
    if len(raw) > limit:
        raise BadRequest(413, "EntityTooLarge", f"the request body exceeds {limit} bytes")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8/JSON, >4300-digit ints, deep nesting
        raise BadRequest(400, "MalformedJson", "the request body is not valid JSON") from exc
    if not isinstance(body, dict):
        raise BadRequest(400, "MalformedJson", "the request body must be a JSON object")
    return body
