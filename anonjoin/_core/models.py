"""Wire models (private, tolerant) and the public result types.

Every wire model derives from :class:`_Wire`: unknown fields are kept, never an error, so a new server
field never breaks an old client. Variants accepted everywhere (protocol.md §2): link relations with the
``service:`` or ``ms:rtc:saas:`` prefix or none; ``myApplications`` beside ``applications``; dates as
ISO-8601, ``/Date(ms)/`` or ``\\/Date(ms)\\/``; PascalCase keys in the token and error bodies. Hrefs are
resolved against the URL of the response that carried them and must be http(s).

Parsing is a hot path in load tests: bodies go straight from bytes through ``model_validate_json``
(pydantic-core's parser, validators built once at import), regexes are compiled once.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field
from yarl import URL

from anonjoin._exceptions import AnonJoinError, ProtocolError, redact_url

# ---------------------------------------------------------------------------------------------------
# Dates


_NET_DATE = re.compile(r"^\\?/Date\((-?\d+)(?:[+-]\d{4})?\)\\?/$")


def _from_epoch(seconds: float) -> datetime:
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError("date out of range") from exc


def parse_date(value: object) -> datetime:
    """ISO-8601, ``/Date(ms)/`` (optionally with escaped slashes or an offset), or epoch seconds/ms."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _from_epoch(value / 1000.0 if abs(value) > 1e11 else float(value))
    if isinstance(value, str):
        text = value.strip()
        m = _NET_DATE.match(text)
        if m:
            return _from_epoch(int(m.group(1)) / 1000.0)
        try:
            parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ValueError(f"not a date: {str(value)[:60]!r}")


WireDate = Annotated[datetime, BeforeValidator(parse_date)]


def _lenient_date(value: object) -> datetime | None:
    try:
        return None if value is None else parse_date(value)
    except ValueError:
        return None


LenientDate = Annotated[datetime | None, BeforeValidator(_lenient_date)]
"""A date the client bounds itself when it is missing or unusable (a psat's ``expiryTime``, issue 11)."""


# ---------------------------------------------------------------------------------------------------
# The private base and the wire models


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True, str_strip_whitespace=False)


class _Link(_Wire):
    href: str


class _Resource(_Wire):
    links: dict[str, _Link] = Field(default_factory=dict, alias="_links")
    embedded: dict[str, Any] = Field(default_factory=dict, alias="_embedded")
    rel: str | None = None


class DiscoverBody(_Resource):
    conference_id: str | None = Field(
        default=None, validation_alias=AliasChoices("conferenceId", "ConferenceId")
    )


class TokenBody(_Resource):
    token: str = Field(validation_alias=AliasChoices("token", "Token"))
    expiry_time: LenientDate = Field(default=None, validation_alias=AliasChoices("expiryTime", "ExpiryTime"))


class ApplicationBody(_Resource):
    id: str | None = None
    expires: WireDate | None = None


class _Reason(_Wire):
    code: str | None = Field(default=None, validation_alias=AliasChoices("code", "Code"))
    subcode: str | None = Field(default=None, validation_alias=AliasChoices("subcode", "Subcode", "subCode"))
    message: str | None = Field(default=None, validation_alias=AliasChoices("message", "Message"))


class _EventLink(_Wire):
    rel: str
    href: str | None = None


class _Event(_Wire):
    link: _EventLink
    type: str
    status: str | None = None
    reason: _Reason | None = None
    embedded: dict[str, Any] = Field(default_factory=dict, alias="_embedded")
    in_: dict[str, Any] | None = Field(default=None, alias="in")


class _Sender(_Wire):
    rel: str
    href: str | None = None
    events: list[_Event] = Field(default_factory=list)


class EventsBody(_Resource):
    sender: list[_Sender] = Field(default_factory=list)


class MeetingBody(_Resource):
    online_meeting_id: str | None = Field(default=None, alias="onlineMeetingId")
    online_meeting_uri: str | None = Field(default=None, alias="onlineMeetingUri")
    organizer_uri: str | None = Field(default=None, alias="organizerUri")
    conference_id: str | None = Field(default=None, alias="conferenceId")
    join_url: str | None = Field(default=None, alias="joinUrl")
    expiration_time: WireDate | None = Field(default=None, alias="expirationTime")
    access_level: str | None = Field(default=None, alias="accessLevel")
    subject: str | None = None


class ErrorBody(_Wire):
    code: str | None = Field(default=None, validation_alias=AliasChoices("code", "Code"))
    subcode: str | None = Field(default=None, validation_alias=AliasChoices("subcode", "Subcode", "subCode"))
    message: str | None = Field(default=None, validation_alias=AliasChoices("message", "Message"))


M = TypeVar("M", bound=BaseModel)


def parse_body(
    model: type[M], body: bytes, *, step: str, status: int | None = None, correlation_id: str | None = None
) -> M:
    """Validate ``body`` as ``model``; any failure is a ProtocolError naming the step (never a crash)."""
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as exc:
        kinds = sorted({e["type"] for e in exc.errors(include_url=False, include_input=False)})
        locs = sorted({".".join(str(p) for p in e["loc"]) for e in exc.errors(include_url=False)})[:3]
        raise ProtocolError(
            f"malformed response ({', '.join(kinds)} at {', '.join(locs) or 'body'})",
            step=step,
            status=status,
            body=body,
            correlation_id=correlation_id,
        ) from None
    except (ValueError, TypeError, OverflowError, OSError) as exc:  # a validator that failed oddly
        raise ProtocolError(
            f"malformed response ({type(exc).__name__})",
            step=step,
            status=status,
            body=body,
            correlation_id=correlation_id,
        ) from None


def parse_error_body(body: bytes) -> ErrorBody | None:
    """The error object of an error response, or None when the body is not one (an HTML page, say)."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        return ErrorBody.model_validate_json(body)
    except pydantic.ValidationError:
        return None


# ---------------------------------------------------------------------------------------------------
# Links


_PREFIXES = ("service:", "ms:rtc:saas:", "")


def rel_name(rel: str) -> str:
    """A relation name without its ``service:`` / ``ms:rtc:saas:`` prefix (the form the client matches on)."""
    for prefix in _PREFIXES[:-1]:
        if rel.startswith(prefix):
            return rel[len(prefix) :]
    return rel


def find_href(links: Mapping[str, _Link], *names: str) -> str | None:
    """The href of the first relation found among ``names`` in any prefix form (or None)."""
    for name in names:
        for prefix in _PREFIXES:
            link = links.get(prefix + name)
            if link is not None:
                return link.href
    return None


def resolve(base: URL, href: str, *, step: str) -> URL:
    """``href`` resolved against the URL that returned it; only http(s) results are accepted."""
    try:
        target = base.join(URL(href))
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"unusable href {redact_url(href)!r}", step=step) from exc
    if target.scheme not in ("http", "https") or not target.host:
        raise ProtocolError(f"refusing a non-http(s) href {redact_url(href)[:80]!r}", step=step)
    return target


def require_link(
    links: Mapping[str, _Link], base: URL, *names: str, step: str, status: int | None = None
) -> URL:
    href = find_href(links, *names)
    if href is None:
        raise ProtocolError(f"missing link {names[0]!r}", step=step, status=status)
    return resolve(base, href, step=step)


def embedded_resource(embedded: Mapping[str, Any], *names: str) -> Mapping[str, Any] | None:
    for name in names:
        for prefix in _PREFIXES:
            value = embedded.get(prefix + name)
            if isinstance(value, dict):
                return value
    return None


def embedded_links(resource: Mapping[str, Any] | None) -> dict[str, _Link]:
    """The ``_links`` of an embedded resource (kept as plain data by the outer model), validated."""
    if not resource:
        return {}
    raw = resource.get("_links")
    if not isinstance(raw, dict):
        return {}
    out: dict[str, _Link] = {}
    for k, v in raw.items():
        if isinstance(v, dict) and isinstance(v.get("href"), str):
            out[k] = _Link(href=v["href"])
    return out


# ---------------------------------------------------------------------------------------------------
# psat claims (decoded without verifying: the client only reads `confid` and `exp`)


def psat_claims(token: str) -> dict[str, Any]:
    raw = token[5:] if token[:5].lower() == "psat=" else token
    parts = raw.split(".")
    if len(parts) < 2:
        return {}
    seg = parts[1]
    try:
        data = json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def conference_id_from(meeting_url: str) -> str | None:
    """The conference id is the last path segment of a join URL (protocol.md §5)."""
    try:
        segs = [s for s in URL(meeting_url).path.split("/") if s]
    except (ValueError, TypeError):
        return None
    return segs[-1] if segs else None


# ---------------------------------------------------------------------------------------------------
# Public result types


@dataclass(frozen=True, slots=True)
class GuestGrant:
    """What the service application hands a guest: a psat token and a discover link (both secret)."""

    token: str = field(repr=False)
    expires_at: datetime
    discover_url: str = field(repr=False)
    application_session_id: str
    meeting_url: str
    conference_id: str | None = None
    lifetime_s: float | None = None
    """``expiryTime`` minus the service's own now when it answered (None: missing or unparsable)."""
    received_at: float | None = None
    """The client's epoch time when the grant arrived."""

    @property
    def expiry_epoch(self) -> float:
        return self.expires_at.timestamp()

    def __repr__(self) -> str:
        return (
            f"GuestGrant(application_session_id={self.application_session_id!r}, "
            f"expires_at={self.expires_at.isoformat()!r}, discover_url={redact_url(self.discover_url)!r}, "
            f"meeting_url={self.meeting_url!r}, token=[redacted])"
        )

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class AdhocMeeting:
    join_url: str
    conference_id: str | None
    online_meeting_uri: str | None = None
    online_meeting_id: str | None = None
    organizer_uri: str | None = None
    expiration_time: datetime | None = None
    subject: str | None = None
    access_level: str | None = None


@dataclass(frozen=True, slots=True)
class JoinResult:
    guest_id: str
    application_session_id: str
    conference_id: str | None
    joined_at: float
    duration_s: float
    lobby_s: float
    steps: Mapping[str, float]
    attempts: Mapping[str, int]
    rejoin: bool


@dataclass(frozen=True, slots=True)
class GuestOutcome:
    guest_id: str
    application_session_id: str
    kind: Literal["left", "ended", "failed"]
    reason: str | None
    rejoins: int
    joined: bool
    error: AnonJoinError | None = None
