"""The service application's side of the conversation, sans I/O: discovery, psats, meetings.

:func:`discovery` is a generator the driver runs: it yields the three GETs of discovery (discover ->
applications -> capabilities, each a :class:`~anonjoin._core.conversation.Send` the driver sends with its
AAD bearer, retried as :func:`~anonjoin._core.protocol.classify` says) and returns the :class:`Capabilities`.
:func:`token_body`, :func:`grant_from` and :func:`meeting_from` are the psat POST's body and the answers
read; :func:`stale_link` is the failure table's word on a 404 of those POSTs (refetch the capabilities
once, then send again).
"""

from __future__ import annotations

import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from yarl import URL

from anonjoin._core.conversation import ResponseLike, Send
from anonjoin._core.events import Step
from anonjoin._core.models import (
    AdhocMeeting,
    ApplicationBody,
    GuestGrant,
    MeetingBody,
    TokenBody,
    _Resource,
    conference_id_from,
    embedded_links,
    embedded_resource,
    find_href,
    parse_body,
    psat_claims,
    require_link,
    resolve,
)
from anonjoin._core.protocol import Action, classify
from anonjoin._exceptions import ProtocolError

__all__ = ["Capabilities", "discovery", "grant_from", "meeting_from", "stale_link", "token_body"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What discover/applications/capabilities said; shared by every guest of the Client."""

    application_url: URL
    anon_tokens_url: URL | None
    adhoc_meetings_url: URL | None
    fetched_at: float


def _read(r: ResponseLike, step: Step) -> _Resource:
    return parse_body(_Resource, r.body, step=step, status=r.status, correlation_id=r.correlation_id)


def discovery(discover_url: URL, endpoint_id: str, now: float) -> Generator[Send, object, Capabilities]:
    """discover -> applications (for ``endpoint_id``) -> capabilities; each answer is sent back in."""
    r = cast(ResponseLike, (yield Send("discover", "GET", discover_url, {})))
    apps = require_link(_read(r, "discover").links, r.url, "applications", "myApplications", step="discover",
                        status=r.status)  # fmt: skip
    r = cast(ResponseLike, (yield Send("applications", "GET", apps.update_query(endpointId=endpoint_id), {})))
    app_url = require_link(
        _read(r, "applications").links, r.url, "application", step="applications", status=r.status
    )
    r = cast(ResponseLike, (yield Send("capabilities", "GET", app_url, {})))
    c = parse_body(
        ApplicationBody, r.body, step="capabilities", status=r.status, correlation_id=r.correlation_id
    )
    tokens = find_href(c.links, "anonApplicationTokens")
    adhoc = find_href(c.links, "adhocMeetings")
    if adhoc is None:
        res = embedded_resource(c.embedded, "adhocMeetings")
        adhoc = find_href(embedded_links(res), "self") if res is not None else None
    return Capabilities(
        application_url=r.url,
        anon_tokens_url=resolve(r.url, tokens, step="capabilities") if tokens else None,
        adhoc_meetings_url=resolve(r.url, adhoc, step="capabilities") if adhoc else None,
        fetched_at=now,
    )


def token_body(
    meeting_url: str | None, allowed_origins: str | Sequence[str], application_session_id: str
) -> bytes:
    """The psat POST's body; without ``meeting_url``: a psat for the guest's identity only (not a meeting)."""
    origins = allowed_origins if isinstance(allowed_origins, str) else ";".join(allowed_origins)
    body = {"applicationSessionId": application_session_id, "allowedOrigins": origins}
    if meeting_url is not None:
        body["meetingUrl"] = meeting_url
    return json.dumps(body, separators=(",", ":")).encode()


def stale_link(step: Step, error: BaseException, *, refetched: bool) -> bool:
    """A POST of the service application failed: whether its capabilities link was stale (refetch them)."""
    return classify(step, error, refetched=refetched).action is Action.REFETCH


def grant_from(
    r: ResponseLike,
    *,
    application_session_id: str,
    meeting_url: str | None,
    now: float,
    server_now: float | None,
) -> GuestGrant:
    """The psat POST's answer. ``now``: the client's epoch time; ``server_now``: the service's (its ``Date``
    header) when it gave one, so that the psat's lifetime does not count clock skew."""
    t = parse_body(TokenBody, r.body, step="anon_tokens", status=r.status, correlation_id=r.correlation_id)
    discover = require_link(t.links, r.url, "discover", step="anon_tokens", status=r.status)
    confid = psat_claims(t.token).get("confid")
    lifetime = None
    if t.expiry_time is not None:
        lifetime = t.expiry_time.timestamp() - (now if server_now is None else server_now)
    return GuestGrant(
        token=t.token,
        expires_at=t.expiry_time or datetime.fromtimestamp(now, UTC),
        lifetime_s=lifetime,
        received_at=now,
        discover_url=str(discover),
        application_session_id=application_session_id,
        meeting_url=meeting_url or "",
        conference_id=confid if isinstance(confid, str) else None,
    )


def meeting_from(r: ResponseLike) -> AdhocMeeting:
    """The adhocMeetings POST's answer."""
    m = parse_body(
        MeetingBody, r.body, step="adhoc_meetings", status=r.status, correlation_id=r.correlation_id
    )
    if not m.join_url:
        raise ProtocolError("meeting without joinUrl", step="adhoc_meetings", status=r.status)
    resolve(r.url, m.join_url, step="adhoc_meetings")
    return AdhocMeeting(
        join_url=m.join_url,
        conference_id=m.conference_id or conference_id_from(m.join_url),
        online_meeting_uri=m.online_meeting_uri,
        online_meeting_id=m.online_meeting_id,
        organizer_uri=m.organizer_uri,
        expiration_time=m.expiration_time,
        subject=m.subject,
        access_level=m.access_level,
    )
