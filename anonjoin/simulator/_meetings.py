"""Meetings, psanon applications and the join state machine (protocol.md §4.7, §4.8, §7).

Rules:
- Everything is a dict keyed by id: meetings by conference id and by join URL, applications by id and by
  ``asi``. No request scans all guests; only ending a meeting walks that meeting's roster.
- A meeting's roster and lobby are keyed by ``asi``: a guest is never listed twice.
- ``new_application`` for an ``asi`` that already has a live application evicts the old one: its channel
  closes (a parked poll answers 404 ``ApplicationNotFound``), it leaves roster and lobby, and its id is
  remembered so its next request also gets 404. Expired applications are remembered too (410).
- A join emits, in order: invitation ``started`` (``Connecting``), conversation ``added``
  (``Conferencing``, or ``InLobby`` when the meeting has a lobby), then on admission localParticipant /
  participant / onlineMeeting ``added``, conversation ``updated`` (``Conferenced``) and invitation
  ``completed`` ``Success`` (``Connected``). A lobby denial completes with ``Failure``/``Denied``.
- Leaving a meeting (drop, eject, meeting end) emits conversation ``updated`` ``Disconnected`` (with the
  reason, if any), localParticipant ``deleted`` and conversation ``deleted``; a guest not yet admitted gets
  invitation ``completed`` ``Failure`` with the reason instead.
- Timers (lobby delay, scheduled drops/ejections, idle expiry) are loop timers; every callback re-checks
  that its application is still the live one before acting.
"""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from anonjoin.simulator._config import LobbyMode
from anonjoin.simulator._events import Event, EventChannel, Priority

__all__ = ["Application", "Meeting", "MeetingState", "UcwaError"]

UCWA_ROOT = "/ucwa/psanon/v1/applications"
MEETING_HOST = "https://meet.sim.anonjoin.invalid"
MEETING_TTL_S = 8 * 3600.0

JoinState = Literal["idle", "connecting", "lobby", "joined", "left"]


class UcwaError(Exception):
    """A guest request the state refuses: ``status``/``subcode``/``message`` become the error body."""

    def __init__(self, status: int, subcode: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.subcode = subcode
        self.message = message


@dataclass(eq=False)
class Meeting:
    conference_id: str
    conference_uri: str
    meeting_url: str
    organizer: str
    subject: str
    access_level: str
    lobby: LobbyMode
    lobby_delay_s: float
    created: float
    expires: float
    roster: dict[str, str] = field(default_factory=dict)  # asi -> application id
    lobby_queue: dict[str, str] = field(default_factory=dict)  # asi -> application id
    ended: bool = False
    owner: int = 0
    """The pool process that holds this meeting's roster, lobby and applications (``--pools N``)."""

    def spec(self) -> dict[str, Any]:
        """What another process needs to know this meeting (``MeetingState.add_meeting``)."""
        return {
            "conference_id": self.conference_id,
            "conference_uri": self.conference_uri,
            "meeting_url": self.meeting_url,
            "organizer": self.organizer,
            "subject": self.subject,
            "access_level": self.access_level,
            "lobby": self.lobby,
            "lobby_delay_s": self.lobby_delay_s,
            "created": self.created,
            "expires": self.expires,
            "owner": self.owner,
        }

    def info(self) -> dict[str, Any]:
        return {
            "conference_id": self.conference_id,
            "conference_uri": self.conference_uri,
            "meeting_url": self.meeting_url,
            "subject": self.subject,
            "lobby_mode": self.lobby,
            "roster": list(self.roster),
            "lobby": list(self.lobby_queue),
            "ended": self.ended,
        }


@dataclass(eq=False)
class Application:
    gid: str
    asi: str
    claims: dict[str, Any]
    display_name: str
    culture: str
    user_agent: str
    me_uri: str
    channel: EventChannel
    created: float
    state: JoinState = "idle"
    meeting: Meeting | None = None
    invitation_id: str | None = None
    operation_id: str | None = None
    conversation_id: str | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"{UCWA_ROOT}/{self.gid}"

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()


Schedule = Callable[[str], tuple[Literal["drop", "eject"], float] | None]


class MeetingState:
    """All meetings and applications of one simulator."""

    def __init__(
        self,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        tenant: str,
        idle_s: Callable[[], float],
        time_scale: float,
        resume_after_s: float | None,
        max_participants: int | None,
        schedule: Schedule,
        ucwa_href: Callable[[str], str],
    ) -> None:
        self._rng = rng
        self._clock = clock
        self._tenant = tenant
        self._idle_s = idle_s
        self._scale = time_scale
        self._resume_after_s = resume_after_s
        self._max = max_participants
        self._schedule = schedule
        self._ucwa_href = ucwa_href
        self.meetings: dict[str, Meeting] = {}
        self._by_url: dict[str, Meeting] = {}
        self.apps: dict[str, Application] = {}
        self.gone: dict[str, str] = {}  # application id -> "evicted" | "deleted" | "expired"
        self._by_asi: dict[str, str] = {}
        self.created = 0
        self.created_by_asi: dict[str, int] = {}
        self._next_id = 0

    # -- meetings ------------------------------------------------------------------------------------
    def create_meeting(
        self,
        *,
        subject: str = "anonjoin simulated meeting",
        lobby: LobbyMode = "none",
        lobby_delay_s: float = 0.5,
        organizer: str = "organizer",
        access_level: str = "Everyone",
    ) -> Meeting:
        cid = "".join(self._rng.choices(string.ascii_uppercase + string.digits, k=8))
        while cid in self.meetings:
            cid = "".join(self._rng.choices(string.ascii_uppercase + string.digits, k=8))
        domain = self._tenant
        now = self._clock()
        meeting = Meeting(
            conference_id=cid,
            conference_uri=f"sip:{organizer}@{domain};gruu;opaque=app:conf:focus:id:{cid}",
            meeting_url=f"{MEETING_HOST}/{domain.split('.')[0]}/{organizer}/{cid}",
            organizer=f"sip:{organizer}@{domain}",
            subject=subject,
            access_level=access_level,
            lobby=lobby,
            lobby_delay_s=lobby_delay_s,
            created=now,
            expires=now + MEETING_TTL_S,
        )
        return self.add_meeting(meeting)

    def add_meeting(self, meeting: Meeting) -> Meeting:
        """Know ``meeting`` (a new one, or one another process of the simulator created); the one already
        known under its conference id wins."""
        known = self.meetings.get(meeting.conference_id)
        if known is not None:
            return known
        self.meetings[meeting.conference_id] = meeting
        self._by_url[_norm_url(meeting.meeting_url)] = meeting
        return meeting

    def meeting_by_url(self, url: str) -> Meeting | None:
        return self._by_url.get(_norm_url(url))

    def meeting_by_uri(self, uri: str) -> Meeting | None:
        marker = "app:conf:focus:id:"
        at = uri.lower().rfind(marker)
        if at < 0:
            return None
        meeting = self.meetings.get(uri[at + len(marker) :].split(";")[0].upper())
        if meeting is None or meeting.conference_uri.lower() != uri.lower():
            return None
        return meeting

    def end_meeting(self, cid: str) -> bool:
        meeting = self.meetings.get(cid) or self.meetings.get(cid.upper())
        if meeting is None:
            return False
        meeting.ended = True
        for gid in [*meeting.roster.values(), *meeting.lobby_queue.values()]:
            app = self.apps.get(gid)
            if app is not None:
                self._leave(app, "Ended", "The meeting has ended.")
        return True

    # -- applications --------------------------------------------------------------------------------
    def new_application(
        self, *, asi: str, claims: dict[str, Any], display_name: str, culture: str, user_agent: str
    ) -> Application:
        old = self._by_asi.get(asi)
        if old is not None and old in self.apps:
            self._remove(self.apps[old], "evicted")
        self._next_id += 1
        gid = f"{self._next_id}{self._rng.getrandbits(40):010x}"
        key = f"{self._rng.getrandbits(64):016x}"
        app = Application(
            gid=gid,
            asi=asi,
            claims=claims,
            display_name=display_name,
            culture=culture,
            user_agent=user_agent,
            me_uri=f"sip:{self._rng.randrange(10**9, 10**10)}@anonymous.invalid",
            channel=EventChannel(
                key,
                idle_s=self._idle_s(),
                on_idle=lambda: self._expire(gid),
                time_scale=self._scale,
                resume_after_s=self._resume_after_s,
            ),
            created=self._clock(),
        )
        self.apps[gid] = app
        self._by_asi[asi] = gid
        self.created += 1
        self.created_by_asi[asi] = self.created_by_asi.get(asi, 0) + 1
        return app

    def app_for_asi(self, asi: str) -> Application | None:
        gid = self._by_asi.get(asi)
        return self.apps.get(gid) if gid is not None else None

    def delete_application(self, app: Application) -> None:
        self._remove(app, "deleted")

    def _expire(self, gid: str) -> None:
        app = self.apps.get(gid)
        if app is not None:
            self._remove(app, "expired")

    def _remove(self, app: Application, reason: str) -> None:
        app.cancel_timers()
        self._unseat(app)
        app.state = "left"
        app.channel.close(reason)
        self.apps.pop(app.gid, None)
        self.gone[app.gid] = reason
        if self._by_asi.get(app.asi) == app.gid:
            del self._by_asi[app.asi]

    def shutdown(self) -> None:
        for app in list(self.apps.values()):
            app.cancel_timers()
            app.channel.close("shutdown")

    # -- joining -------------------------------------------------------------------------------------
    def invite(
        self, app: Application, meeting: Meeting, *, operation_id: str, importance: str, subject: str
    ) -> str:
        """Start joining ``app`` to ``meeting``; returns the invitation's path. Outcome comes as events."""
        if app.state in ("connecting", "lobby", "joined"):
            raise UcwaError(409, "AlreadyExists", "an invitation is already in progress for this application")
        self._next_id += 1
        app.invitation_id = f"{self._next_id}{self._rng.getrandbits(24):06x}"
        app.conversation_id = f"{self._next_id}{self._rng.getrandbits(24):06x}"
        app.operation_id = operation_id
        app.meeting = meeting
        app.state = "connecting"
        self._emit_invitation(app, "started", state="Connecting", importance=importance, subject=subject)
        if self._max is not None and len(meeting.roster) >= self._max:
            self._fail(app, "TooManyParticipants", "The meeting is full.", joined_conversation=False)
            return self._invitation_path(app)
        if meeting.lobby == "none":
            self._emit_conversation(app, "added", "Conferencing")
            self._admit(app)
        else:
            app.state = "lobby"
            meeting.lobby_queue[app.asi] = app.gid
            self._emit_conversation(app, "added", "InLobby")
            action = self._admit if meeting.lobby == "admit" else self._deny
            loop = asyncio.get_running_loop()
            app.timers.append(loop.call_later(meeting.lobby_delay_s, self._if_live, app.gid, "lobby", action))
        return self._invitation_path(app)

    def admit(self, asi: str) -> bool:
        """Admit a guest waiting in the lobby now (admin action)."""
        app = self.app_for_asi(asi)
        if app is None or app.state != "lobby":
            return False
        self._admit(app)
        return True

    def drop(self, asi: str) -> bool:
        app = self.app_for_asi(asi)
        if app is None or app.state not in ("connecting", "lobby", "joined"):
            return False
        self._disconnect(app)
        return True

    def eject(self, asi: str) -> bool:
        app = self.app_for_asi(asi)
        if app is None or app.state not in ("connecting", "lobby", "joined"):
            return False
        self._eject_now(app)
        return True

    def _if_live(self, gid: str, state: JoinState, action: Callable[[Application], None]) -> None:
        app = self.apps.get(gid)
        if app is not None and app.state == state:
            action(app)

    def _admit(self, app: Application) -> None:
        meeting = app.meeting
        assert meeting is not None
        meeting.lobby_queue.pop(app.asi, None)
        if meeting.ended:
            self._fail(app, "Ended", "The meeting has ended.", joined_conversation=True)
            return
        meeting.roster[app.asi] = app.gid
        app.state = "joined"
        conv = self._conversation_path(app)
        me = {
            "name": app.display_name,
            "uri": app.me_uri,
            "anonymous": True,
            "_links": {"self": {"href": self._ucwa_href(conv + "/localParticipant")}},
        }
        self._emit_in_conversation(app, "localParticipant", "/localParticipant", "added", me, Priority.MEDIUM)
        participant_path = "/participants/" + app.me_uri
        participant = {**me, "_links": {"self": {"href": self._ucwa_href(conv + participant_path)}}}
        in_link = {"in": {"rel": "participants", "href": self._ucwa_href(conv + "/participants")}}
        self._emit_in_conversation(
            app, "participant", participant_path, "added", participant, Priority.LOW, extra=in_link
        )
        online = {
            "onlineMeetingUri": meeting.conference_uri,
            "subject": meeting.subject,
            "organizerUri": meeting.organizer,
            "accessLevel": meeting.access_level,
            "_links": {"self": {"href": self._ucwa_href(conv + "/onlineMeeting")}},
        }
        self._emit_in_conversation(app, "onlineMeeting", "/onlineMeeting", "added", online, Priority.MEDIUM)
        self._emit_conversation(app, "updated", "Conferenced")
        self._emit_invitation(app, "completed", state="Connected", status="Success")
        scheduled = self._schedule(app.asi)
        if scheduled is not None:
            action, after_s = scheduled
            gid, loop = app.gid, asyncio.get_running_loop()
            leave = self._eject_now if action == "eject" else self._disconnect
            app.timers.append(loop.call_later(after_s, self._if_live, gid, "joined", leave))

    def _disconnect(self, app: Application) -> None:
        self._leave(app, None, "The guest was disconnected.")

    def _eject_now(self, app: Application) -> None:
        self._leave(app, "Ejected", "The guest was removed from the meeting by a leader.")

    def _deny(self, app: Application) -> None:
        self._fail(app, "Denied", "A leader denied entry to the meeting.", joined_conversation=True)

    def _fail(self, app: Application, subcode: str, message: str, *, joined_conversation: bool) -> None:
        if app.meeting is not None:
            app.meeting.lobby_queue.pop(app.asi, None)
        reason = {
            "code": "Forbidden" if subcode in ("Denied", "Ejected") else "Gone",
            "subcode": subcode,
            "message": message,
        }
        self._emit_invitation(app, "completed", state="Disconnected", status="Failure", reason=reason)
        if joined_conversation:
            self._emit_conversation(app, "deleted", "Disconnected", reason=reason)
        app.state = "left"
        app.cancel_timers()

    def _leave(self, app: Application, subcode: str | None, message: str) -> None:
        if app.state in ("connecting", "lobby"):
            self._fail(app, subcode or "TemporarilyUnavailable", message, joined_conversation=True)
            return
        if app.state != "joined":
            return
        self._unseat(app)
        reason = None
        if subcode is not None:
            reason = {
                "code": "Forbidden" if subcode == "Ejected" else "Gone",
                "subcode": subcode,
                "message": message,
            }
        self._emit_conversation(app, "updated", "Disconnected", reason=reason)
        self._emit_in_conversation(
            app, "localParticipant", "/localParticipant", "deleted", None, Priority.HIGH,
            extra={"reason": reason} if reason else None,
        )  # fmt: skip
        self._emit_conversation(app, "deleted", "Disconnected", reason=reason)
        app.state = "left"
        app.cancel_timers()

    def _unseat(self, app: Application) -> None:
        meeting = app.meeting
        if meeting is None:
            return
        if meeting.roster.get(app.asi) == app.gid:
            del meeting.roster[app.asi]
        if meeting.lobby_queue.get(app.asi) == app.gid:
            del meeting.lobby_queue[app.asi]

    # -- events --------------------------------------------------------------------------------------
    def _invitation_path(self, app: Application) -> str:
        return f"{app.base}/communication/onlineMeetingInvitations/{app.invitation_id}"

    def _conversation_path(self, app: Application) -> str:
        return f"{app.base}/communication/conversations/{app.conversation_id}"

    def _emit_invitation(
        self,
        app: Application,
        kind: str,
        *,
        state: str,
        status: str | None = None,
        reason: dict[str, str] | None = None,
        importance: str = "Normal",
        subject: str = "",
    ) -> None:
        meeting = app.meeting
        assert meeting is not None
        path = self._invitation_path(app)
        previous = app.resources.get(path.lower(), {})
        resource = {
            "state": state,
            "direction": "Outgoing",
            "importance": previous.get("importance", importance),
            "subject": previous.get("subject", subject),
            "operationId": app.operation_id,
            "onlineMeetingUri": meeting.conference_uri,
            "threadId": app.conversation_id,
            "_links": {
                "self": {"href": self._ucwa_href(path)},
                "conversation": {"href": self._ucwa_href(self._conversation_path(app))},
            },
            "rel": "onlineMeetingInvitation",
        }
        if reason is not None:
            resource["reason"] = reason
        extra: dict[str, Any] = {}
        if status is not None:
            extra["status"] = status
        if reason is not None:
            extra["reason"] = reason
        self._emit(
            app, "communication", "onlineMeetingInvitation", path, kind, resource, Priority.HIGH, extra
        )

    def _emit_conversation(
        self, app: Application, kind: str, state: str, reason: dict[str, str] | None = None
    ) -> None:
        meeting = app.meeting
        assert meeting is not None
        path = self._conversation_path(app)
        resource: dict[str, Any] = {
            "state": state,
            "subject": meeting.subject,
            "threadId": app.conversation_id,
            "importance": "Normal",
            "_links": {
                "self": {"href": self._ucwa_href(path)},
                "localParticipant": {"href": self._ucwa_href(path + "/localParticipant")},
                "onlineMeeting": {"href": self._ucwa_href(path + "/onlineMeeting")},
                "participants": {"href": self._ucwa_href(path + "/participants")},
            },
            "rel": "conversation",
        }
        priority = Priority.MEDIUM if kind == "added" and state != "InLobby" else Priority.HIGH
        extra = {"reason": reason} if reason else None
        embedded = None if kind == "deleted" else resource
        self._emit(app, "communication", "conversation", path, kind, embedded, priority, extra)

    def _emit_in_conversation(
        self,
        app: Application,
        rel: str,
        suffix: str,
        kind: str,
        resource: dict[str, Any] | None,
        priority: Priority,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """An event about a resource of the conversation (participants, onlineMeeting)."""
        path = self._conversation_path(app) + suffix
        self._emit(app, "conversation", rel, path, kind, resource, priority, extra)

    def _emit(
        self,
        app: Application,
        sender: str,
        rel: str,
        path: str,
        kind: str,
        resource: dict[str, Any] | None,
        priority: Priority,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Queue one event on ``app``'s channel; the sender is ``communication`` or ``conversation``.

        The embedded resource is also kept so that a GET of the event's href returns it.
        """
        sender_path = f"{app.base}/communication"
        if sender == "conversation":
            sender_path = self._conversation_path(app)
        body: dict[str, Any] = {"link": {"rel": rel, "href": self._ucwa_href(path)}, "type": kind}
        if resource is not None:
            body["_embedded"] = {rel: resource}
            app.resources[path.lower()] = resource
        elif kind == "deleted":
            app.resources.pop(path.lower(), None)
        if extra:
            body.update(extra)
        app.channel.push(Event(sender, self._ucwa_href(sender_path), body, priority))


def _norm_url(url: str) -> str:
    text = url.strip().split("#")[0].split("?")[0].rstrip("/")
    return text.lower()
