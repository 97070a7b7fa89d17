"""A session store shared by several instances: Redis (``redis://``, ``rediss://`` with TLS).

Keys (``prefix`` default ``anonjoin:``):

- ``{prefix}s:{guest}``: a hash with the :class:`~anonjoin._load.store.SessionRecord` fields. The guest's
  applicationSessionId is written with ``HSETNX``: the first writer wins, so one guest never gets two ids,
  whichever instances create it at once. ``{prefix}asi:{id}`` maps an id back to its guest (an id given
  for a new guest that is already another guest's is a :class:`~anonjoin.StoreError`).
- ``{prefix}lease:{guest}``: the lease, ``SET NX PX`` with a random token; ``{prefix}epoch:{guest}``: the
  fencing epoch, ``INCR`` on each claim. Renew and release are compare-and-act Lua on the token; every
  fenced write is a Lua script that checks the lease token and epoch before it writes, so an instance whose
  lease lapsed cannot overwrite the new holder (:class:`~anonjoin.LeaseLost`).
- Scopes (:class:`~anonjoin._load.store.SessionScope`): a scoped guest's keys carry the scope as a hash tag,
  ``{prefix}s:{{run_id:digest}}:{guest}`` (the digest: 16 hex digits of the target's SHA-256), so every key
  of one scope hashes to one slot; the legacy scope's keys have no tag (the keys of a store written before
  scopes existed). The hash also holds ``run_id`` and ``target``. The ``asi:`` map is global (one
  applicationSessionId is never two guests', whatever their scope); its value is the scoped guest.
- A guest whose outcome is written (a finished guest) expires after ``finished_ttl_s`` (default 7 days);
  coming back (``get_or_create``) makes it permanent again.

Every batch is one Lua script: atomic, and one round trip. Writes that cannot reach Redis are retried with
backoff (``write_retry_s`` budget, floor ``RETRY_MIN_S``, cap ``RETRY_MAX_S``); :attr:`writes_late` and
:attr:`writes_lost` count records written after a retry and records given up on. Reads and claims are not
retried: they fail at once with a one-line :class:`~anonjoin.StoreError`. The URL's credentials never
appear in a message or a ``repr`` (:func:`safe_store_url`).

Multi-key scripts touch the global ``asi:`` keys besides their scope's: this store is for a single Redis
(or a primary with replicas), not Redis Cluster.

``redis`` (redis-py >= 5, the ``anonjoin[redis]`` extra) is imported only when this module is.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

try:
    import redis.asyncio as aioredis
    import redis.exceptions as redis_errors
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("the Redis session store needs redis-py: pip install 'anonjoin[redis]'") from exc

from anonjoin._exceptions import LeaseLost, StoreError
from anonjoin._load.store import (
    LEGACY_SCOPE,
    Fence,
    NewSession,
    Outcome,
    SessionRecord,
    SessionScope,
    _Records,
    _Singles,
)

__all__ = ["DEFAULT_FINISHED_TTL_S", "RedisSessionStore", "is_redis_url", "safe_store_url"]

DEFAULT_FINISHED_TTL_S = 7 * 24 * 3600.0
DEFAULT_WRITE_RETRY_S = 15.0
DEFAULT_SOCKET_TIMEOUT_S = 2.0
RETRY_MIN_S = 0.05
RETRY_MAX_S = 2.0
SCAN_COUNT = 1000
DEFAULT_MAX_CONNECTIONS = 32

_T = TypeVar("_T")

_FIELDS = (
    "guest_id",
    "asi",
    "meeting_url",
    "origin",
    "display_name",
    "created_at",
    "updated_at",
    "last_outcome",
    "rejoins",
    "run_id",
    "target",
)

# KEYS: session hashes. ARGV: prefix, now, scope tag, run_id, target, then per guest: guest_id, asi,
# meeting_url, origin, display_name.
_GET_OR_CREATE = """
local prefix, now, tag, run, target = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
for i = 1, #KEYS do
  local b = 5 + (i - 1) * 5
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local owner = redis.call('GET', prefix .. 'asi:' .. ARGV[b + 2])
    if owner and owner ~= tag .. ARGV[b + 1] then return redis.error_reply('ASI_TAKEN ' .. ARGV[b + 1]) end
  end
end
local out = {}
for i = 1, #KEYS do
  local b = 5 + (i - 1) * 5
  local key, gid, asi, m, o, d = KEYS[i], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4], ARGV[b + 5]
  if redis.call('HSETNX', key, 'asi', asi) == 1 then
    redis.call('HSET', key, 'guest_id', gid, 'meeting_url', m, 'origin', o, 'display_name', d,
               'created_at', now, 'updated_at', now, 'rejoins', 0)
    if tag ~= '' then redis.call('HSET', key, 'run_id', run, 'target', target) end
    redis.call('SET', prefix .. 'asi:' .. asi, tag .. gid)
  else
    local cur = redis.call('HMGET', key, 'meeting_url', 'origin', 'display_name', 'asi')
    if cur[1] ~= m or cur[2] ~= o or cur[3] ~= d then
      redis.call('HSET', key, 'meeting_url', m, 'origin', o, 'display_name', d, 'updated_at', now)
    end
    redis.call('PERSIST', key)
    redis.call('PERSIST', prefix .. 'asi:' .. cur[4])
  end
  out[i] = redis.call('HMGET', key, 'guest_id', 'asi', 'meeting_url', 'origin', 'display_name',
                      'created_at', 'updated_at', 'last_outcome', 'rejoins', 'run_id', 'target')
end
return out
"""

# KEYS: session hashes. ARGV: prefix, now, ttl_ms, scope tag, then per guest: guest_id, outcome, rejoins,
# token, epoch (token '' for a write without a lease). Checks everything first: all or none.
_RECORD_OUTCOMES = """
local prefix, now, ttl, tag = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lost = {}
for i = 1, #KEYS do
  local b = 4 + (i - 1) * 5
  local gid, token = ARGV[b + 1], ARGV[b + 4]
  if redis.call('EXISTS', KEYS[i]) == 0 then return redis.error_reply('NO_SESSION ' .. gid) end
  if token ~= '' then
    if redis.call('GET', prefix .. 'lease:' .. tag .. gid) ~= token
       or redis.call('GET', prefix .. 'epoch:' .. tag .. gid) ~= ARGV[b + 5] then
      lost[#lost + 1] = gid
    end
  end
end
if #lost > 0 then return lost end
for i = 1, #KEYS do
  local b = 4 + (i - 1) * 5
  redis.call('HSET', KEYS[i], 'last_outcome', ARGV[b + 2], 'updated_at', now)
  redis.call('HINCRBY', KEYS[i], 'rejoins', ARGV[b + 3])
  redis.call('PEXPIRE', KEYS[i], ttl)
  local asi = redis.call('HGET', KEYS[i], 'asi')
  if asi then redis.call('PEXPIRE', prefix .. 'asi:' .. asi, ttl) end
end
return {}
"""

# KEYS: lease, epoch. ARGV: token, lease_ms.
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return redis.call('INCR', KEYS[2]) end
return false
"""

# KEYS: lease, epoch. ARGV: token, epoch, lease_ms. Ours while nobody claimed since (the epoch is still
# ours); an epoch gone with the lease (Redis restarted without its data) is taken back with a new epoch.
_RENEW = """
local held, epoch = redis.call('GET', KEYS[1]), redis.call('GET', KEYS[2])
if epoch == ARGV[2] and (held == ARGV[1] or not held) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return tonumber(epoch)
end
if not epoch and not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return redis.call('INCR', KEYS[2])
end
return false
"""

# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def is_redis_url(text: str | None) -> bool:
    return bool(text) and str(text).lower().startswith(("redis://", "rediss://", "unix://"))


def safe_store_url(url: str) -> str:
    """``url`` fit for a message or a report: no user, no password, no query."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "redis://(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = ("***@" if parts.username or parts.password else "") + host + (f":{port}" if port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _escape_glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisSessionStore(_Singles):
    """A :class:`~anonjoin.SessionStore` in Redis, shared by every instance that uses the same URL and prefix.

    Nothing is sent on construction; :meth:`ping` checks the server (the CLI calls it before a run).
    """

    def __init__(
        self,
        url: str,
        prefix: str = "anonjoin:",
        *,
        finished_ttl_s: float = DEFAULT_FINISHED_TTL_S,
        write_retry_s: float = DEFAULT_WRITE_RETRY_S,
        socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        scope: SessionScope = LEGACY_SCOPE,
        **redis_kwargs: Any,
    ) -> None:
        self.url = safe_store_url(url)
        self.scope = scope
        if not is_redis_url(url):
            raise StoreError(f"session store {self.url}: not a redis://, rediss:// or unix:// URL")
        if not prefix:
            raise StoreError("session store: the Redis key prefix must not be empty")
        if not finished_ttl_s > 0:
            raise StoreError(f"session store: finished_ttl_s must be positive, not {finished_ttl_s!r}")
        if not write_retry_s >= 0:
            raise StoreError(f"session store: write_retry_s must be >= 0, not {write_retry_s!r}")
        self.prefix = prefix
        self.finished_ttl_s = float(finished_ttl_s)
        self.write_retry_s = float(write_retry_s)
        self.writes_late = 0
        """Records written only after one or more retries (Redis was unreachable for a while)."""
        self.writes_lost = 0
        """Records given up on after ``write_retry_s`` (never silent: the runner reports them)."""
        self._clock = clock
        self._sleep = sleep
        self._shut = [False]
        try:
            # A bounded pool: thousands of leases renewing share max_connections, waiting for a free one.
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=socket_timeout_s,
                decode_responses=True,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=Retry(NoBackoff(), 0),
                **redis_kwargs,
            )
            self._redis = aioredis.Redis.from_pool(pool)
        except (ValueError, redis_errors.RedisError) as exc:
            raise StoreError(f"session store {self.url}: bad URL: {type(exc).__name__}") from exc
        self._scripts = {
            name: self._redis.register_script(body)
            for name, body in (
                ("get_or_create", _GET_OR_CREATE),
                ("record", _RECORD_OUTCOMES),
                ("acquire", _ACQUIRE),
                ("renew", _RENEW),
                ("release", _RELEASE),
            )
        }

    # -- plumbing ------------------------------------------------------------------------------------------

    @property
    def _tag(self) -> str:
        """The scope's part of a key: empty for the legacy scope, else a hash tag (one slot per scope)."""
        scope = self.scope
        if scope.legacy:
            return ""
        digest = hashlib.sha256(scope.target.encode("utf-8")).hexdigest()[:16]
        return f"{{{scope.run_id}:{digest}}}:"

    def _key(self, kind: str, guest_id: str) -> str:
        return f"{self.prefix}{kind}:{self._tag}{guest_id}"

    def _error(self, exc: BaseException, doing: str) -> StoreError:
        if isinstance(exc, redis_errors.AuthenticationError | redis_errors.AuthorizationError):
            why = "authentication failed (check the credentials in the URL)"
        elif isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
            why = "Redis is unreachable (is redis-server running at that address?)"
        else:
            why = f"{type(exc).__name__}: {str(exc)[:120]}"
        return StoreError(f"session store {self.url}: {doing}: {why}")

    async def _once(self, doing: str, fn: Callable[[], Awaitable[_T]]) -> _T:
        if self._closed:
            raise StoreError(f"session store {self.url}: used after close")
        try:
            return await fn()
        except redis_errors.RedisError as exc:
            raise self._error(exc, doing) from exc
        except OSError as exc:
            raise self._error(exc, doing) from exc

    async def _retried(self, doing: str, count: int, fn: Callable[[], Awaitable[_T]]) -> _T:
        """``fn``, retried while Redis is unreachable (floor RETRY_MIN_S, cap RETRY_MAX_S, write_retry_s)."""
        deadline = time.monotonic() + self.write_retry_s
        delay = RETRY_MIN_S
        tries = 0
        while True:
            try:
                result = await self._once(doing, fn)
            except StoreError as exc:
                cause = exc.__cause__
                unreachable = isinstance(
                    cause, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError
                ) and not isinstance(cause, redis_errors.AuthenticationError)
                if not unreachable or self._closed or time.monotonic() + delay > deadline:
                    self.writes_lost += count
                    raise
                tries += 1
                await self._sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if tries:
                self.writes_late += count
            return result

    async def ping(self) -> None:
        """Check that Redis answers (a clear one-line :class:`StoreError` if not)."""
        await self._once("cannot connect", self._redis.ping)

    @staticmethod
    def _record(values: Sequence[Any]) -> SessionRecord:
        gid, asi, meeting_url, origin, display, created, updated, outcome, rejoins, run_id, target = values
        return SessionRecord(
            guest_id=str(gid),
            application_session_id=str(asi),
            meeting_url=str(meeting_url),
            origin=str(origin),
            display_name=str(display),
            created_at=float(created),
            updated_at=float(updated),
            last_outcome=None if outcome is None else str(outcome),
            rejoins=int(rejoins or 0),
            run_id=str(run_id or ""),
            target=str(target or ""),
        )

    # -- the SessionStore protocol ---------------------------------------------------------------------------

    async def get(self, guest_id: str) -> SessionRecord | None:
        async def read() -> list[Any]:
            return await self._redis.hmget(self._key("s", guest_id), list(_FIELDS))

        values = await self._once("read", read)
        return None if values[1] is None else self._record(values)

    async def get_or_create_many(self, sessions: Sequence[NewSession]) -> list[SessionRecord]:
        if not sessions:
            return []
        keys = [self._key("s", s.guest_id) for s in sessions]
        args: list[Any] = [self.prefix, repr(self._clock()), self._tag, self.scope.run_id, self.scope.target]
        for s in sessions:
            args += [s.guest_id, s.application_session_id or str(uuid.uuid4()), s.meeting_url]
            args += [s.origin, s.display_name]

        async def run() -> list[list[Any]]:
            return await self._scripts["get_or_create"](keys=keys, args=args)  # type: ignore[no-any-return]

        try:
            rows = await self._retried("save sessions", len(sessions), run)
        except StoreError as exc:
            text = str(exc.__cause__ or "")
            if "ASI_TAKEN" in text:
                gid = text.split("ASI_TAKEN", 1)[1].strip()
                raise StoreError(
                    f"session store: applicationSessionId of guest {gid!r} is already another guest's"
                ) from None
            raise
        return [self._record(r) for r in rows]

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        keys = [self._key("s", o.guest_id) for o in outcomes]
        args: list[Any] = [self.prefix, repr(self._clock()), int(self.finished_ttl_s * 1000), self._tag]
        for o in outcomes:
            fence = o.fence
            args += [o.guest_id, o.outcome, int(o.rejoins)]
            args += ["", ""] if fence is None else [fence.token, str(fence.epoch)]

        async def run() -> list[Any]:
            return await self._scripts["record"](keys=keys, args=args)  # type: ignore[no-any-return]

        try:
            lost = await self._retried("record outcomes", len(outcomes), run)
        except StoreError as exc:
            text = str(exc.__cause__ or "")
            if "NO_SESSION" in text:
                gid = text.split("NO_SESSION", 1)[1].strip()
                raise StoreError(f"session store {self.url}: no session for guest {gid!r}") from None
            raise
        if lost:
            raise LeaseLost([str(g) for g in lost])

    async def list(self) -> list[SessionRecord]:
        scope = self.scope
        return await self._scan("list sessions", _escape_glob(self._tag) + "*", lambda r: r.scope == scope)

    async def list_all(self, run_id: str | None = None) -> _Records:
        return await self._scan("list sessions", "*", lambda r: run_id is None or r.run_id == run_id)

    async def find(self, guest_id: str, run_id: str | None = None) -> _Records:
        return await self._scan(
            "find a guest",
            "*" + _escape_glob(guest_id),
            lambda r: r.guest_id == guest_id and (run_id is None or r.run_id == run_id),
        )

    async def _scan(self, doing: str, match: str, keep: Callable[[SessionRecord], bool]) -> _Records:
        async def read() -> _Records:
            keys = [
                k
                async for k in self._redis.scan_iter(
                    match=_escape_glob(self.prefix) + "s:" + match, count=SCAN_COUNT
                )
            ]
            out: list[SessionRecord] = []
            for lo in range(0, len(keys), SCAN_COUNT):
                pipe = self._redis.pipeline(transaction=False)
                for k in keys[lo : lo + SCAN_COUNT]:
                    pipe.hmget(k, list(_FIELDS))
                for values in await pipe.execute():
                    if values[1] is not None:  # expired between SCAN and HMGET
                        record = self._record(values)
                        if keep(record):
                            out.append(record)
            return sorted(out, key=lambda r: (r.created_at, r.guest_id, r.run_id, r.target))

        return await self._once(doing, read)

    # -- leases ------------------------------------------------------------------------------------------

    async def _acquire(self, guest_id: str, token: str, lease_s: float) -> int | None:
        keys = [self._key("lease", guest_id), self._key("epoch", guest_id)]

        async def run() -> Any:
            return await self._scripts["acquire"](keys=keys, args=[token, max(1, round(lease_s * 1000))])

        epoch = await self._once("claim a lease", run)
        return None if epoch is None else int(epoch)

    async def _renew(self, guest_id: str, fence: Fence, lease_s: float) -> int | None:
        keys = [self._key("lease", guest_id), self._key("epoch", guest_id)]
        args: list[str | int] = [fence.token, str(fence.epoch), max(1, round(lease_s * 1000))]

        async def run() -> Any:
            return await self._scripts["renew"](keys=keys, args=args)

        epoch = await self._once("renew a lease", run)
        return None if epoch is None else int(epoch)

    async def _release(self, guest_id: str, fence: Fence) -> None:
        async def run() -> Any:
            return await self._scripts["release"](keys=[self._key("lease", guest_id)], args=[fence.token])

        await self._once("release a lease", run)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._redis.aclose()

    def __repr__(self) -> str:
        scope = "" if self.scope.legacy else f", run_id={self.scope.run_id!r}"
        return f"RedisSessionStore({self.url!r}, prefix={self.prefix!r}{scope})"
