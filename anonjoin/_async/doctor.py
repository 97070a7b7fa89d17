"""Preflight checks of a target, in order (``anonjoin doctor``; usable as a library: :func:`run_doctor`).

Each check says what it saw and, when it fails, what to fix. A check that needs an earlier one which did not
pass is skipped. Every check is bounded by its own timeout and runs with a fast retry policy (two attempts,
sub-second waits): a preflight answers in seconds, it does not sit out a retry ladder.

1. ``discover``: the discover URL answers over https with a trusted certificate (a GET without a token:
   any HTTP answer, 401 included, proves the host, the port and the certificate).
2. ``aad_token``: Azure AD issues a token for the scope (secret or certificate); ``invalid_client``,
   an unknown client id and a missing consent are named as such.
3. ``endpoint``: discover -> applications -> application with the token: the endpoint id is an application
   of the tenant (a 403 ``ApplicationNotFound`` is explained).
4. ``capabilities``: the application's capabilities include ``anonApplicationTokens`` (the "Guest user
   join services" permission, consented by a tenant admin).
5. ``origins``: every origin the guests present is https.
6. ``meeting_url``: the meeting URL is an HTTP join URL, not a SIP conference id.
7. ``psat``: a psat can be minted for the meeting and the origins, and the anonymous discover it links to
   answers for each origin.
8. ``join`` (only when asked): one guest joins and leaves.

The client's own steps do the work (:class:`ServiceApp`, :class:`HttpClient`, :class:`StepRunner`,
:class:`Client`); nothing here speaks HTTP by itself. No secret, token or psat reaches a result: details
are built from anonjoin's own (redacted) error messages and pass through ``redact`` once more.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from yarl import URL

from anonjoin._async.http import HttpClient, make_ssl_context
from anonjoin._async.retry import Attempt, Clock, RejoinPolicy, RetryPolicy, StepRunner
from anonjoin._async.service import Capabilities, CredentialLike, ServiceApp
from anonjoin._core import constants as C
from anonjoin._core.events import Observer
from anonjoin._core.models import DiscoverBody, GuestGrant, parse_body, require_link
from anonjoin._exceptions import (
    AnonJoinError,
    AuthError,
    CapabilityNotAvailable,
    ConfigurationError,
    InsecureTarget,
    JoinFailed,
    ProtocolError,
    RequestNotSentError,
    ServiceError,
    TransportError,
    redact,
    redact_url,
)

__all__ = ["CHECKS", "CheckResult", "CheckStatus", "DoctorReport", "doctor_retry_policy", "run_doctor"]

CheckStatus = Literal["pass", "fail", "skip"]

DEFAULT_TIMEOUT_S = 10.0
JOIN_TIMEOUT_FACTOR = 3.0
"""The join check runs a whole join and a leave: it gets this many times the per-check timeout."""

CHECKS: dict[str, str] = {
    "discover": "discover URL",
    "aad_token": "Azure AD token",
    "endpoint": "application endpoint",
    "capabilities": "capabilities",
    "origins": "origins",
    "meeting_url": "meeting URL",
    "psat": "psat and anonymous discover",
    "join": "join and leave",
}
"""Every check's name (stable, for scripts) and its label (for people), in the order they run."""

_NEEDS: dict[str, tuple[str, ...]] = {
    "discover": (),
    "aad_token": (),
    "endpoint": ("discover", "aad_token"),
    "capabilities": ("endpoint",),
    "origins": (),
    "meeting_url": (),
    "psat": ("capabilities", "origins", "meeting_url"),
    "join": ("psat",),
}


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One check: ``status`` pass, fail or skip; ``detail`` what was seen; ``fix`` what to do (failures)."""

    name: str
    label: str
    status: CheckStatus
    detail: str
    fix: str | None = None
    duration_ms: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def line(self) -> str:
        """The check as one line: a mark, the label, what was seen, and what to fix."""
        mark = {"pass": "\N{HEAVY CHECK MARK}", "fail": "\N{HEAVY BALLOT X}", "skip": "-"}[self.status]
        text = f"{mark} {self.label}: {self.detail}"
        if self.fix:
            text += f" \N{EM DASH} fix: {self.fix}"
        return " ".join(text.split())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "status": self.status,
            "detail": self.detail,
            "fix": self.fix,
            "duration_ms": None if self.duration_ms is None else round(self.duration_ms, 1),
        }


@dataclass(frozen=True, slots=True)
class DoctorReport:
    """Every check that ran, in order; ``ok`` when all of them passed."""

    target: str
    checks: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def count(self, status: CheckStatus) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def summary(self) -> str:
        n = len(self.checks)
        if self.ok:
            return f"all {n} checks passed"
        return f"{self.count('fail')} of {n} checks failed ({self.count('skip')} skipped)"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "target": self.target,
            "passed": self.count("pass"),
            "failed": self.count("fail"),
            "skipped": self.count("skip"),
            "checks": [c.as_dict() for c in self.checks],
        }


class _Failed(Exception):
    """A check failed: what was seen, and what to fix."""

    def __init__(self, detail: str, fix: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def doctor_retry_policy(timeout_s: float = DEFAULT_TIMEOUT_S) -> RetryPolicy:
    """The checks' fast policy: two attempts, short waits, each request and step within ``timeout_s``."""
    if timeout_s <= 0:
        raise ConfigurationError("the doctor's timeout must be positive")
    return RetryPolicy(
        attempts=2,
        step_deadline_s=timeout_s,
        guest_deadline_s=timeout_s * JOIN_TIMEOUT_FACTOR,
        wait_initial=0.1,
        wait_max=0.5,
        jitter=0.1,
        retry_after_cap_s=1.0,
        request_timeout_s=timeout_s,
        connect_timeout_s=min(timeout_s, 5.0),
        leave_deadline_s=timeout_s,
    )


async def run_doctor(
    *,
    discover_url: str,
    endpoint_id: str,
    credential: CredentialLike,
    meeting_url: str,
    origins: str | Sequence[str],
    ca_file: str | None = None,
    verify_tls: bool = True,
    scope: str | None = None,
    join: bool = False,
    display_name: str = "anonjoin doctor",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_check: Callable[[CheckResult], None] | None = None,
) -> DoctorReport:
    """Run the checks against one target, in order; ``on_check`` receives each result as it is known.

    ``meeting_url`` is taken as given (a SIP conference id fails its check rather than raising);
    ``origins`` is one origin or several (a ``;``-list, as ``allowedOrigins`` takes them). ``scope`` is only
    named in the messages. The credential is the caller's: it is not closed here.
    """
    origin_list = _origin_list(origins)
    doctor = _Doctor(
        discover_url=discover_url,
        endpoint_id=endpoint_id,
        credential=credential,
        meeting_url=meeting_url.strip(),
        origins=origin_list,
        ca_file=ca_file,
        verify_tls=verify_tls,
        scope=scope,
        display_name=display_name,
        timeout_s=timeout_s,
    )
    try:
        return await doctor.run(join=join, on_check=on_check)
    finally:
        await doctor.aclose()


def _origin_list(origins: str | Sequence[str]) -> tuple[str, ...]:
    parts = origins.split(";") if isinstance(origins, str) else list(origins)
    out = tuple(p.strip().rstrip("/") for p in parts if p and p.strip())
    if not out:
        raise ConfigurationError("at least one origin is needed (--origin)")
    return out


class _Doctor:
    def __init__(
        self,
        *,
        discover_url: str,
        endpoint_id: str,
        credential: CredentialLike,
        meeting_url: str,
        origins: tuple[str, ...],
        ca_file: str | None,
        verify_tls: bool,
        scope: str | None,
        display_name: str,
        timeout_s: float,
    ) -> None:
        self.policy = doctor_retry_policy(timeout_s)
        self.timeout_s = timeout_s
        self.discover_url = discover_url
        self.endpoint_id = endpoint_id
        self.credential = credential
        self.meeting_url = meeting_url
        self.origins = origins
        self.ca_file = ca_file
        self.verify_tls = verify_tls
        self.scope = scope
        self.display_name = display_name
        self.clock = Clock()
        self.http = HttpClient(
            ssl_context=make_ssl_context(ca_file, verify_tls),
            max_connections=4,
            user_agent=C.USER_AGENT,
            connect_timeout_s=self.policy.connect_timeout_s,
        )
        self.runner = StepRunner(self.policy, self.clock, Observer(None))
        self.service = ServiceApp(
            http=self.http,
            runner=self.runner,
            credential=credential,
            discover_url=discover_url,
            endpoint_id=endpoint_id,
            clock=self.clock,
        )
        self.caps: Capabilities | None = None

    async def aclose(self) -> None:
        await self.service.aclose()
        await self.http.aclose()

    async def run(self, *, join: bool, on_check: Callable[[CheckResult], None] | None) -> DoctorReport:
        checks: dict[str, Callable[[], Awaitable[str]]] = {
            "discover": self.check_discover,
            "aad_token": self.check_aad_token,
            "endpoint": self.check_endpoint,
            "capabilities": self.check_capabilities,
            "origins": self.check_origins,
            "meeting_url": self.check_meeting_url,
            "psat": self.check_psat,
        }
        if join:
            checks["join"] = self.check_join
        results: dict[str, CheckResult] = {}
        for name, check in checks.items():
            result = await self._one(name, check, results)
            results[name] = result
            if on_check is not None:
                on_check(result)
        return DoctorReport(target=redact_url(self.discover_url), checks=tuple(results.values()))

    async def _one(
        self, name: str, check: Callable[[], Awaitable[str]], done: dict[str, CheckResult]
    ) -> CheckResult:
        label = CHECKS[name]
        blocked = [CHECKS[n] for n in _NEEDS[name] if n in done and not done[n].passed]
        if blocked:
            return CheckResult(
                name, label, "skip", f"skipped: the {' and '.join(blocked)} check did not pass"
            )
        limit = self.timeout_s * (JOIN_TIMEOUT_FACTOR if name == "join" else 1.0)
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                detail = await check()
        except _Failed as exc:
            ms = (time.monotonic() - started) * 1000.0
            return CheckResult(name, label, "fail", redact(exc.detail), _clean(exc.fix), ms)
        except TimeoutError:
            ms = (time.monotonic() - started) * 1000.0
            return CheckResult(
                name,
                label,
                "fail",
                f"no answer within {limit:g} s",
                "check that the host is reachable from here (proxy, firewall), or give a longer --timeout",
                ms,
            )
        except AnonJoinError as exc:  # not foreseen by the check: still one typed line
            ms = (time.monotonic() - started) * 1000.0
            return CheckResult(name, label, "fail", f"{type(exc).__name__}: {redact(str(exc))}", None, ms)
        ms = (time.monotonic() - started) * 1000.0
        return CheckResult(name, label, "pass", redact(detail), None, ms)

    # -- 1. discover over https --------------------------------------------------------------------------

    async def check_discover(self) -> str:
        url = URL(self.discover_url)
        shown = redact_url(url)
        if url.scheme != "https":
            raise _Failed(
                f"{shown} is {url.scheme}://: the Trusted Application API is served over https only",
                "use the https:// discover URL (https://<host>/platformservice/discover)",
            )

        async def attempt(att: Attempt) -> int:
            r = await self.http.request("discover", "GET", url, att)  # no token: the answer is enough
            return r.status

        try:
            status = await self.runner.run("discover", attempt, guest_id=None, attempts=1)
        except ServiceError as exc:
            if exc.status in (401, 403):
                status = exc.status
            elif exc.status == 404:
                raise _Failed(
                    f"{shown} answered HTTP 404",
                    "check the path: the discover URL ends in /platformservice/discover",
                ) from None
            else:
                raise _Failed(
                    f"{shown} answered HTTP {exc.status}" + (f" {exc.code}" if exc.code else ""),
                    "the service is unwell or this is not its discover URL; try again, or check the URL",
                ) from None
        except RequestNotSentError as exc:
            if exc.final:
                raise _Failed(
                    f"the certificate of {url.host} is not trusted: {exc}",
                    "give --ca-file with the CA that signed the service's certificate",
                ) from None
            raise _Failed(
                f"cannot reach {url.host}:{url.port}: {exc}",
                "check the host name, the port and the network path (DNS, proxy, firewall)",
            ) from None
        except TransportError as exc:
            raise _Failed(f"no usable answer from {url.host}: {exc}", "check the discover URL") from None
        except ProtocolError as exc:
            raise _Failed(f"unusable answer: {exc}", "check the discover URL") from None
        verified = "a trusted certificate" if self.verify_tls else "a certificate NOT verified (--insecure)"
        how = " without a token, as expected" if status in (401, 403) else ""
        return f"{shown} answers over https with {verified} (HTTP {status}{how})"

    # -- 2. Azure AD -------------------------------------------------------------------------------------

    async def check_aad_token(self) -> str:
        scope = f" for {self.scope}" if self.scope else ""
        try:
            await self.credential.token()
        except AuthError as exc:
            raise _auth_failure(exc, self.scope) from None
        except AnonJoinError as exc:
            raise _Failed(f"{type(exc).__name__}: {exc}", "check --authority and --client-id") from None
        except Exception as exc:  # a credential outside anonjoin: its type only (its text may hold a secret)
            raise _Failed(f"the credential failed: {type(exc).__name__}") from None
        return f"Azure AD issued a token{scope}"

    # -- 3. the endpoint is an application of the tenant -------------------------------------------------

    async def check_endpoint(self) -> str:
        try:
            self.caps = await self.service.capabilities()
        except ServiceError as exc:
            raise self._service_failure(exc) from None
        except InsecureTarget as exc:
            raise _Failed(
                f"{exc}", "the service linked to a host outside it or to http: check the discover URL"
            ) from None
        except (TransportError, ProtocolError) as exc:
            raise _Failed(f"{exc}", "check the discover URL and that the service is healthy") from None
        return f"{self.endpoint_id} is an application of the tenant ({redact_url(self.caps.application_url)})"

    def _service_failure(self, exc: ServiceError) -> _Failed:
        if exc.subcode == "ApplicationNotFound" or exc.code == "ApplicationNotFound":
            return _Failed(
                f"HTTP {exc.status} ApplicationNotFound at {exc.step}: {self.endpoint_id} is not an "
                "application endpoint of this tenant for this client id",
                "check --endpoint-id: the SIP URI of the trusted application endpoint registered for this "
                "app id (New-CsOnlineApplicationEndpoint), in the tenant of --authority",
            )
        if exc.subcode == "InvalidToken" or exc.status == 401:
            return _Failed(
                f"the service refused the Azure AD token ({exc})",
                "check --scope (the service's audience, ending in /.default) and that --authority names the "
                "tenant the application lives in",
            )
        if exc.status == 403:
            return _Failed(f"{exc}", "the application is not allowed here: check its registration")
        return _Failed(f"{exc}", "the service answered an error: try again, or check the discover URL")

    # -- 4. anonApplicationTokens ------------------------------------------------------------------------

    async def check_capabilities(self) -> str:
        assert self.caps is not None
        if self.caps.anon_tokens_url is None:
            raise _Failed(
                "the application's capabilities lack anonApplicationTokens: the \"Guest user join "
                'services" permission is not consented',
                'a tenant admin grants admin consent to the app\'s "Guest user join services" permission '
                "(Skype for Business Online) in Azure AD",
            )
        adhoc = ", adhocMeetings" if self.caps.adhoc_meetings_url is not None else ""
        return f'anonApplicationTokens{adhoc} present ("Guest user join services" consented)'

    # -- 5. https origins --------------------------------------------------------------------------------

    async def check_origins(self) -> str:
        bad = [o for o in self.origins if urlsplit(o).scheme.lower() != "https" or not urlsplit(o).hostname]
        if bad:
            shown = ", ".join(redact_url(o) for o in bad)
            raise _Failed(
                f"{shown} {'is' if len(bad) == 1 else 'are'} not https: the service takes https origins only",
                "serve the web app over https and give its https:// origin (--origin https://host[:port])",
            )
        return f"{', '.join(self.origins)} {'is' if len(self.origins) == 1 else 'are all'} https"

    # -- 6. an HTTP join URL -----------------------------------------------------------------------------

    async def check_meeting_url(self) -> str:
        text = self.meeting_url
        parts = urlsplit(text)
        lowered = text.lower()
        if lowered.startswith("sip:") or "app:conf:" in lowered or parts.scheme.lower() == "conf":
            raise _Failed(
                f"{redact_url(text)[:120]!r} is a SIP conference id, not the meeting's HTTP join URL",
                "give the join URL of the invitation (https://meet.<domain>/<user>/<ID>)",
            )
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise _Failed(
                f"{redact_url(text)[:120]!r} is not an HTTP join URL",
                "give the join URL of the invitation (https://meet.<domain>/<user>/<ID>)",
            )
        return f"{redact_url(text)} is an HTTP join URL"

    # -- 7. a psat and the anonymous discover ------------------------------------------------------------

    async def check_psat(self) -> str:
        try:
            grant = await self.service.mint_grant(
                meeting_url=self.meeting_url,
                allowed_origins=self.origins,
                application_session_id=str(uuid.uuid4()),
            )
        except ServiceError as exc:
            raise self._mint_failure(exc) from None
        except CapabilityNotAvailable as exc:
            raise _Failed(f"{exc}", 'consent the "Guest user join services" permission') from None
        except (TransportError, ProtocolError) as exc:
            raise _Failed(f"{exc}", "check that the service is healthy") from None
        answered: list[str] = []
        conference: str | None = None
        for origin in self.origins:
            conference = await self._anon_discover(grant, origin)
            answered.append(origin)
        life = f" (valid {grant.lifetime_s / 60:.0f} min)" if grant.lifetime_s is not None else ""
        conf = f" (conference {conference})" if conference else ""
        return f"a psat was minted{life}; the anonymous discover answered for {', '.join(answered)}{conf}"

    def _mint_failure(self, exc: ServiceError) -> _Failed:
        if exc.status == 404 and (exc.subcode == "DestinationNotFound" or exc.code == "NotFound"):
            return _Failed(
                f"HTTP 404 {exc.subcode or exc.code}: the service knows no meeting at "
                f"{redact_url(self.meeting_url)} (or it has ended)",
                "check --meeting-url: the join URL of a scheduled meeting that has not expired",
            )
        if exc.status == 403 and "CapabilityNotAvailable" in (exc.subcode, exc.code):
            return _Failed(f"{exc}", 'consent the "Guest user join services" permission')
        if exc.status == 400:
            return _Failed(
                f"the service refused the token request: {exc}",
                "check --meeting-url (an HTTP join URL) and --origin (https origins)",
            )
        return self._service_failure(exc)

    async def _anon_discover(self, grant: GuestGrant, origin: str) -> str | None:
        url = URL(grant.discover_url, encoded=True)  # opaque: it carries the psat, never rebuilt

        async def attempt(att: Attempt) -> Any:
            return await self.http.request("anon_discover", "GET", url, att, headers={"Origin": origin})

        try:
            r = await self.runner.run("anon_discover", attempt, guest_id=None)
            d = parse_body(
                DiscoverBody, r.body, step="anon_discover", status=r.status, correlation_id=r.correlation_id
            )
            require_link(d.links, r.url, "anonApplications", step="anon_discover", status=r.status)
        except ServiceError as exc:
            raise _Failed(
                f"the anonymous discover at {redact_url(url)} refused origin {origin}: {exc}",
                "the psat's origins must include the page's origin exactly (scheme, host and port)",
            ) from None
        except RequestNotSentError as exc:
            fix = "give --ca-file with the CA of the guests' host" if exc.final else "check the network path"
            raise _Failed(f"the anonymous discover at {redact_url(url)} failed: {exc}", fix) from None
        except (TransportError, ProtocolError) as exc:
            raise _Failed(
                f"the anonymous discover at {redact_url(url)} gave no usable answer: {exc}",
                "check that the service is healthy",
            ) from None
        return d.conference_id or grant.conference_id

    # -- 8. one guest joins and leaves -------------------------------------------------------------------

    async def check_join(self) -> str:
        from anonjoin._async.client import Client  # the whole client, only when --join asks for it

        async with Client(
            discover_url=self.discover_url,
            endpoint_id=self.endpoint_id,
            credential=self.credential,
            ca_file=self.ca_file,
            verify_tls=self.verify_tls,
            retry=self.policy,
            rejoin=RejoinPolicy(enabled=False),
            max_connections=4,
            lobby_timeout_s=self.timeout_s,
        ) as client:
            guest = client.guest(
                meeting_url=self.meeting_url, origin=self.origins[0], display_name=self.display_name
            )
            try:
                result = await guest.join()
            except JoinFailed as exc:
                raise _Failed(
                    f"the guest did not join: {exc}", _JOIN_FIXES.get(exc.reason, _JOIN_FIX)
                ) from None
            except AnonJoinError as exc:
                raise _Failed(
                    f"the guest did not join: {type(exc).__name__}: {exc}",
                    "run anonjoin join -v for every step",
                ) from None
            await guest.leave()
        return (
            f"a guest joined conference {result.conference_id} in {result.duration_s * 1000:.0f} ms and left"
        )


_JOIN_FIX = "see the reason; anonjoin join -v shows every step"
_JOIN_FIXES = {
    "Denied": "the meeting refused anonymous guests: let anonymous people join it (its access level and "
    "lobby policy), or admit the guest from the lobby",
    "LobbyTimeout": "nobody admitted the guest from the lobby: admit it, or give a longer --timeout",
    "JoinTimeout": "the join did not complete in time: give a longer --timeout, or see anonjoin join -v",
}


def _auth_failure(exc: AuthError, scope: str | None) -> _Failed:
    error = (exc.error or "").lower()
    text = str(exc)
    if "AADSTS65001" in text or "consent" in text.lower() or error == "consent_required":
        return _Failed(
            f"consent missing: {text}",
            "a tenant admin grants admin consent to the application (Azure AD > Enterprise applications)",
        )
    if error == "invalid_client":
        return _Failed(
            f"invalid_client: Azure AD refused the client credential: {text}",
            "check the client secret (its value, not its id, and not expired; ANONJOIN_CLIENT_SECRET) or "
            "the certificate registered for the app",
        )
    if error == "unauthorized_client" or "AADSTS700016" in text:
        return _Failed(
            f"unknown client: {text}",
            "check --client-id (the app's Application (client) ID) and that --authority names its tenant",
        )
    if error == "invalid_scope" or "AADSTS500011" in text:
        return _Failed(
            f"invalid scope: {text}",
            f"check --scope (now {scope or 'the default'}): the service's resource id with /.default",
        )
    if error == "invalid_tenant" or "OpenID configuration" in text:
        return _Failed(f"unknown tenant or authority: {text}", "check --authority and --tenant")
    if error == "tls_error":
        return _Failed(f"{text}", "give --ca-file with the CA that signed Azure AD's certificate")
    if error in ("connection_error", "timeout"):
        return _Failed(f"{text}", "check --authority and the network path to it (DNS, proxy, firewall)")
    return _Failed(f"{text}", "check --authority, --client-id and the client secret")


def _clean(text: str | None) -> str | None:
    return None if text is None else redact(text)
