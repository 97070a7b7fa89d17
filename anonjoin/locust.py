"""Anonymous guests as Locust users: anonjoin's protocol over Locust's own HTTP client (``anonjoin[locust]``).

A locustfile::

    from anonjoin.locust import AnonJoinUser

    class Guest(AnonJoinUser):
        hold_s = 60.0  # stay joined this long, then leave (the user then stops)

and the target from the environment, as for the CLI: ``ANONJOIN_DISCOVER_URL``, ``ANONJOIN_ENDPOINT_ID``,
``ANONJOIN_AUTHORITY``, ``ANONJOIN_CLIENT_ID``, ``ANONJOIN_CLIENT_SECRET``, ``ANONJOIN_MEETING_URL``,
``ANONJOIN_ORIGIN``, optionally ``ANONJOIN_SCOPE``, ``ANONJOIN_CA_FILE`` (or set them as class attributes).
Then ``locust -f locustfile.py --headless -u 100 -r 10 -t 5m`` (any Locust mode, master/worker included).

Each user is one guest running the same sans-IO conversation as :class:`anonjoin.Guest`
(:mod:`anonjoin._core.conversation`): mint, discover, create, invite, wait in the lobby, hold with a parked
poll, rejoin after a drop or ahead of the psat's expiry (same applicationSessionId), honour Retry-After,
and leave (DELETE). Every request is one Locust request event named by its protocol step (``anon_tokens``,
``anon_discover``, ``anon_applications``, ``invitations``, ``events``, ``delete_application``, and the
service application's ``aad_token``, ``discover``, ``applications``, ``capabilities``); each join is one
more, ``join`` (request type ``GUEST``), timed from the first request to the guest being in the meeting.

Importing this module imports Locust, which monkey-patches the standard library with gevent: import it only
in a locustfile, never next to anonjoin's asyncio client.
"""

from __future__ import annotations

# isort: off
import locust  # first: gevent's monkey-patching

# isort: on

import email.utils
import importlib
import logging
import os
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from yarl import URL

from anonjoin._core import constants as C
from anonjoin._core.conversation import (
    Conversation,
    DeleteApp,
    Effect,
    Emit,
    GuestSpec,
    Joined,
    LeaveSteps,
    Mint,
    Poll,
    Send,
)
from anonjoin._core.events import Step
from anonjoin._core.models import (
    GuestGrant,
)
from anonjoin._core.policy import RejoinPolicy, RetryPolicy
from anonjoin._core.protocol import STEP_FOR_STATE, Action, GuestState, classify
from anonjoin._core.service import Capabilities, discovery, grant_from, stale_link, token_body
from anonjoin._core.trust import TrustedHosts
from anonjoin._core.wire import service_error
from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    CapabilityNotAvailable,
    ConfigurationError,
    InsecureTarget,
    MaybeSentError,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
)
from anonjoin._version import __version__

__all__ = ["AnonJoinUser"]

log = logging.getLogger("anonjoin.locust")

# gevent comes with Locust; looked up at run time so the type check needs neither installed.
gevent: Any = importlib.import_module("gevent")
_glock: Any = importlib.import_module("gevent.lock")
FastHttpUser: Any = locust.FastHttpUser
StopUser: Any = importlib.import_module("locust.exception").StopUser

_ENV = ("discover_url", "endpoint_id", "authority", "client_id", "client_secret", "meeting_url", "origin")
_STEP_TIMEOUT_S = C.POLL_TIMEOUT_S + C.POLL_TIMEOUT_MARGIN_S


@dataclass(frozen=True, slots=True)
class _Response:
    """An answer as the conversation reads it (``ResponseLike``)."""

    status: int
    url: URL
    headers: Mapping[str, str]
    body: bytes
    correlation_id: str | None = None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


class _Http:
    """One step's requests over a user's FastHttpSession: the token rule, one 307 followed, the step's
    retries as :func:`anonjoin._core.protocol.classify` and the :class:`RetryPolicy` say (Retry-After
    honoured), and typed errors. Each request is one Locust request event named by its step."""

    def __init__(self, session: Any, trusted: TrustedHosts, policy: RetryPolicy) -> None:
        self.session = session
        self.trusted = trusted
        self.policy = policy
        self.rng = random.Random()

    def once(
        self, step: Step, method: str, url: URL, headers: Mapping[str, str], body: bytes | None = None,
        expected: Callable[[ServiceError], bool] | None = None,
    ) -> _Response:  # fmt: skip
        token = any(k.lower() == "authorization" for k in headers)
        target = url
        for hop in range(2):
            if token and not self.trusted.trusted(target):
                raise InsecureTarget("refusing to send a token off the service's https hosts", step=step)
            hdrs = {"client-request-id": str(uuid.uuid4()), "Accept": "application/json", **headers}
            if body is not None:
                hdrs["Content-Type"] = "application/json"
            with self.session.request(
                method, str(target), name=step, headers=hdrs, data=body, catch_response=True,
                allow_redirects=False,
            ) as resp:  # fmt: skip
                status = int(resp.status_code or 0)
                if status == 0:
                    error = getattr(resp, "error", None)
                    resp.failure(error or "no response")
                    if isinstance(
                        error, ConnectionRefusedError | socket.gaierror | ssl.SSLError
                    ):  # never sent
                        raise RequestNotSentError(f"{type(error).__name__}: {error}", step=step, url=target)
                    raise MaybeSentError(f"{type(error).__name__}: {error}", step=step, url=target)
                rh = {k: v for k, v in (resp.headers or {}).items()}
                data = resp.content or b""
                if status in (307, 308) and hop == 0 and rh.get("Location"):
                    resp.success()
                    new = target.join(URL(rh["Location"]))
                    if not token and self.trusted.trusted(target) and new.scheme == "https":
                        self.trusted.trust(new)
                    target = new
                    continue
                if 200 <= status < 300:
                    resp.success()
                    self.trusted.learn(target, data)
                    return _Response(status, target, rh, data, rh.get("X-MS-Correlation-Id"))
                err = service_error(
                    step, status, rh, data, target, hdrs["client-request-id"], rh.get("X-MS-Correlation-Id"),
                    _retry_after(rh.get("Retry-After")),
                )  # fmt: skip
                if expected is not None and expected(err):  # e.g. a DELETE of an application gone already
                    resp.success()
                    return _Response(status, target, rh, data, rh.get("X-MS-Correlation-Id"))
                resp.failure(f"{status} {err.subcode or err.code or ''}".strip())
                raise err
        raise ProtocolError("more than one redirect", step=step, status=307)

    def run(
        self,
        step: Step,
        attempt: Callable[[bool], _Response],
        *,
        deadline_at: float | None = None,
        attempts: int | None = None,
    ) -> _Response:
        """``attempt(refresh_auth)`` until it succeeds, the failure is not retried, or a bound is hit."""
        cap = attempts or self.policy.attempts
        deadline = time.monotonic() + self.policy.step_deadline_s
        if deadline_at is not None:
            deadline = min(deadline, deadline_at)
        refresh, refreshed = False, False
        for number in range(1, cap + 1):
            try:
                return attempt(refresh)
            except AnonJoinError as exc:
                d = classify(step, exc, refreshed=refreshed)
                refresh = d.action is Action.REFRESH_AUTH
                refreshed = refreshed or refresh
                if number >= cap or d.action not in (Action.RETRY, Action.REFRESH_AUTH):
                    raise
                wait = 0.0 if refresh else self.policy.backoff(number, self.rng)
                if isinstance(exc, ServiceError) and exc.retry_after is not None:
                    wait = max(wait, min(exc.retry_after, self.policy.retry_after_cap_s))
                if time.monotonic() + wait >= deadline:
                    raise
                gevent.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


class _ServiceApp:
    """The service application, shared by the users of one process: the AAD token (client credentials) and
    discover -> applications -> capabilities, fetched once (one user at a time), then psats for guests."""

    def __init__(self, user: Any) -> None:
        self.user_cls = type(user)
        self.lock = _glock.RLock()
        self.aad: str | None = None
        self.aad_until = 0.0
        self.tokens_url: URL | None = None
        self.trusted = TrustedHosts()
        self.discover_url = URL(user.discover_url)
        self.trusted.trust(self.discover_url)

    def _token(self, http: _Http, refresh: bool) -> str:
        with self.lock:
            if self.aad is not None and not refresh and time.monotonic() < self.aad_until:
                return self.aad
            u = self.user_cls
            authority = str(u.authority).rstrip("/")
            form = urlencode(
                {
                    "grant_type": "client_credentials", "client_id": u.client_id,
                    "client_secret": u.client_secret, "scope": u.scope,
                }
            ).encode()  # fmt: skip
            with http.session.request(
                "GET", f"{authority}/v2.0/.well-known/openid-configuration", name="aad_openid",
                catch_response=True,
            ) as resp:  # fmt: skip
                if resp.status_code != 200:
                    resp.failure(f"{resp.status_code}")
                    raise AuthError(
                        f"Azure AD openid-configuration answered {resp.status_code}", retryable=True
                    )
                endpoint = resp.json()["token_endpoint"]
            with http.session.request(
                "POST", endpoint, name="aad_token", data=form, catch_response=True,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as resp:  # fmt: skip
                if resp.status_code != 200:
                    resp.failure(f"{resp.status_code}")
                    raise AuthError(
                        f"Azure AD answered {resp.status_code}", retryable=resp.status_code >= 500
                    )
                got = resp.json()
            self.aad = f"Bearer {got['access_token']}"
            self.aad_until = time.monotonic() + max(60.0, float(got.get("expires_in", 3600)) - 300.0)
            return self.aad

    def _sa(self, http: _Http, step: Step, method: str, url: URL, body: bytes | None = None) -> _Response:
        def attempt(refresh: bool) -> _Response:
            return http.once(step, method, url, {"Authorization": self._token(http, refresh)}, body)

        return http.run(step, attempt)

    def _capabilities(self, http: _Http, refetch: bool) -> URL:
        with self.lock:
            if self.tokens_url is not None and not refetch:
                return self.tokens_url
            steps = discovery(self.discover_url, self.user_cls.endpoint_id, time.monotonic())
            answer: _Response | None = None
            try:
                while True:
                    act = steps.send(answer)
                    answer = self._sa(http, act.step, act.method, act.url)
            except StopIteration as done:
                caps: Capabilities = done.value
            finally:
                steps.close()
            if caps.anon_tokens_url is None:
                raise CapabilityNotAvailable("anonApplicationTokens")
            self.tokens_url = caps.anon_tokens_url
            return self.tokens_url

    def mint(self, http: _Http, spec: GuestSpec, meeting_url: str | None) -> GuestGrant:
        body = token_body(meeting_url, spec.origin, spec.application_session_id)
        for refetch in (False, True):
            url = self._capabilities(http, refetch)
            try:
                r = self._sa(http, "anon_tokens", "POST", url, body)
            except ServiceError as exc:
                if stale_link("anon_tokens", exc, refetched=refetch):
                    continue
                raise
            server_now = None
            if r.headers.get("Date"):
                try:
                    server_now = email.utils.parsedate_to_datetime(r.headers["Date"]).timestamp()
                except (TypeError, ValueError, IndexError):
                    server_now = None
            return grant_from(
                r,
                application_session_id=spec.application_session_id,
                meeting_url=meeting_url,
                now=time.time(),
                server_now=server_now,
            )
        raise AssertionError("unreachable")  # pragma: no cover


_SERVICES: dict[tuple[str, str, str], _ServiceApp] = {}


def _guest_task(user: AnonJoinUser) -> None:
    user.guest()


class AnonJoinUser(FastHttpUser):  # type: ignore[misc]
    """One anonymous guest per Locust user: join, hold ``hold_s``, leave, stop. Subclass it in a locustfile;
    the target comes from ``ANONJOIN_*`` environment variables or class attributes of the same names."""

    abstract = True
    discover_url: str = ""
    endpoint_id: str = ""
    authority: str = ""
    client_id: str = ""
    client_secret: str = ""
    meeting_url: str = ""
    origin: str = ""
    scope: str = "https://api.skypeforbusiness.com/.default"
    ca_file: str | None = None
    display_name: str = "anonjoin locust guest"
    hold_s: float = 30.0
    lobby_timeout_s: float = C.LOBBY_TIMEOUT_S
    retry: RetryPolicy = RetryPolicy()
    rejoin: RejoinPolicy = RejoinPolicy()
    network_timeout = _STEP_TIMEOUT_S
    connection_timeout = C.CONNECT_TIMEOUT_S
    insecure = False
    host = "https://localhost"  # every request is an absolute URL: Locust's host is not used

    def __init__(self, environment: Any) -> None:
        cls = type(self)
        for name in (*_ENV, "scope", "ca_file"):  # a class attribute wins; the environment fills the rest
            value = os.environ.get(f"ANONJOIN_{name.upper()}")
            if value and (not getattr(cls, name, None) or name == "scope"):
                setattr(cls, name, value)
        missing = [n for n in _ENV if not getattr(cls, n)]
        if missing:
            raise ConfigurationError(
                "anonjoin.locust: set " + ", ".join(f"ANONJOIN_{n.upper()}" for n in missing)
            )
        if cls.ca_file and cls.ssl_context_factory is None:
            context = ssl.create_default_context(cafile=cls.ca_file)
            cls.ssl_context_factory = staticmethod(lambda *_a, **_k: context)
        super().__init__(environment)
        key = (cls.discover_url, cls.endpoint_id, cls.client_id)
        self._sa = _SERVICES.get(key) or _SERVICES.setdefault(key, _ServiceApp(self))
        self._http = _Http(self.client, self._sa.trusted, cls.retry)
        gid = uuid.uuid4().hex[:12]
        self._spec = GuestSpec(
            gid, str(uuid.uuid4()), cls.meeting_url, cls.origin.rstrip("/"), cls.display_name,
            cls.lobby_timeout_s, "en-US", f"anonjoin-locust/{__version__}",
        )  # fmt: skip
        self._c = Conversation(
            self._spec,
            guest_deadline_s=cls.retry.guest_deadline_s,
            leave_deadline_s=cls.retry.leave_deadline_s,
            rejoin=cls.rejoin,
            rng=random.Random(),
        )
        self._parked: Any = None
        self._left = False
        self._join_started = 0.0
        self._hold_until: float | None = None
        self._bg: list[Any] = []

    # --- Locust's entry points ------------------------------------------------------------------------

    tasks = [_guest_task]

    def guest(self) -> None:
        """The guest's whole life: join, hold, leave; then the user stops."""
        c = self._c
        self._join_started = time.perf_counter()
        c.start(time.monotonic())
        self._drive()
        if c.state is not GuestState.LEFT and c.result is None:
            err = c.settle_error()
            self._report_join(err or ProtocolError(f"not joined: {c.state.value}"))
        self._leave()
        raise StopUser()

    def on_stop(self) -> None:
        self._leave()  # stopped mid-hold (the run's time is up): leave all the same

    # --- the driver -----------------------------------------------------------------------------------

    def _report_join(self, error: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="GUEST", name="join", response_length=0, exception=error, context={},
            response_time=(time.perf_counter() - self._join_started) * 1000,
        )  # fmt: skip

    def _send(self, act: Send, expected: Callable[[ServiceError], bool] | None = None) -> _Response:
        def attempt(_refresh: bool) -> _Response:
            return self._http.once(act.step, act.method, act.url, act.headers, act.body, expected)

        deadline = act.deadline_at if act.deadline_at is not None else self._c.deadline_at
        return self._http.run(act.step, attempt, deadline_at=deadline)

    def _mint(self, meeting_url: str | None) -> GuestGrant:
        return self._sa.mint(self._http, self._spec, meeting_url)

    def _sleep_until(self, at: float | None) -> None:
        if at is not None and (wait := at - time.monotonic()) > 0:
            gevent.sleep(wait)

    def _drive(self) -> None:
        c = self._c
        while not c.terminal:
            step: Step = STEP_FOR_STATE[c.state]
            try:
                act = c.next_action(time.monotonic())
                if isinstance(act, Mint):
                    self._sleep_until(act.not_before)
                    c.on_granted(self._mint(act.meeting_url), time.monotonic())
                elif isinstance(act, Poll):
                    if self._poll_loop(act.url):
                        return  # the hold is over: leave
                elif act.step == "anon_applications":
                    try:
                        r = self._send(act)
                    except BaseException as exc:
                        c.create_failed(exc)
                        raise
                    c.on_application(c.on_created(r), r)
                else:
                    c.on_response(act, self._send(act))
            except AnonJoinError as exc:
                if c.terminal:
                    c.error = exc
                    break
                rec = c.on_failure(step, exc, time.monotonic())
                self._perform(rec.effects)
                self._sleep_until(rec.wait_until)

    def _perform(self, effects: Iterable[Effect]) -> None:
        for e in effects:
            if isinstance(e, Joined):
                if not e.result.rejoin:
                    self._report_join(None)
                    self._hold_until = time.monotonic() + type(self).hold_s
            elif isinstance(e, DeleteApp):
                steps = self._c.leave_requests(e.deadline_at, time.monotonic, delete=e.url, mint=False)
                self._bg.append(gevent.spawn(self._leave_requests, steps))
            elif isinstance(e, Emit) and e.kind in ("dropped", "rejoining"):
                log.info("anonjoin.locust.%s guest_id=%s reason=%s", e.kind, self._spec.guest_id, e.reason)

    def _poll(self, url: URL, wait_s: float) -> _Response:
        if wait_s > 0:
            gevent.sleep(wait_s)
        # after our own DELETE, the poll's 404 is its expected end
        return self._send(self._c.poll_request(url), expected=lambda _e: self._left)

    def _poll_loop(self, url: URL) -> bool:
        """Poll until the state leaves polling (False) or the hold is over (True, the poll left parked)."""
        c = self._c
        c.poll_started()
        pending = gevent.spawn(self._poll, url, 0.0)
        sent_at = time.monotonic()
        try:
            while c.polling:
                due, what = c.next_timer()
                ends = [t for t in (due, self._hold_until) if t is not None]
                pending.join(timeout=max(0.0, min(ends) - time.monotonic()) if ends else None)
                if not pending.ready():
                    if self._hold_until is not None and time.monotonic() >= self._hold_until:
                        self._parked, pending = pending, None
                        return True
                    self._perform(c.on_timer(what, time.monotonic()))
                    return False
                resp = pending.get()  # the poll's own failure is raised here
                body, nxt, wait, _special = c.poll_answered(resp, time.monotonic() - sent_at)
                pending = gevent.spawn(self._poll, nxt, wait)
                sent_at = time.monotonic()
                self._perform(c.on_poll(body, time.monotonic(), time.time()))
        finally:
            if pending is not None and not pending.ready():
                pending.kill(block=True)
        return False

    # --- leaving --------------------------------------------------------------------------------------

    def _leave(self) -> None:
        if self._left:
            return
        self._left = True
        c = self._c
        c.leave()
        if c.state is GuestState.NEW:
            c.left_unstarted()
            return
        c.stop()
        if not c.replaced:
            deadline = c.cleanup_deadline(time.monotonic())
            gevent.joinall(self._bg, timeout=max(0.0, deadline - time.monotonic()))
            self._leave_requests(c.leave_requests(deadline, time.monotonic))
        c.deleted()
        if self._parked is not None:  # released by the DELETE (a 404 it expects)
            self._parked.join(timeout=C.LEAVE_DRAIN_S)
            if not self._parked.ready():
                self._parked.kill(block=False)

    def _leave_requests(self, steps: LeaveSteps) -> None:
        """Perform the conversation's requests of leaving, feeding each answer (or error) back."""
        result: object = None
        error: AnonJoinError | None = None
        try:
            while True:
                try:
                    act = steps.send(result) if error is None else steps.throw(error)
                except StopIteration:
                    return
                result, error = None, None
                try:
                    if isinstance(act, Mint):
                        result = self._mint(act.meeting_url)
                    elif act.step == "delete_application":
                        self._delete(act)
                    else:
                        result = self._send(act)
                except AnonJoinError as exc:
                    error = exc
        finally:
            steps.close()

    def _delete(self, act: Send) -> None:
        def attempt(_refresh: bool) -> _Response:
            return self._http.once(act.step, act.method, act.url, act.headers, None, self._c.delete_done)

        attempts = max(type(self).retry.attempts, C.DELETE_ATTEMPTS)
        self._http.run(act.step, attempt, deadline_at=act.deadline_at, attempts=attempts)
