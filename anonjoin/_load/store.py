"""The session store: guest id -> applicationSessionId (and what a rejoin needs).

protocol.md §7: a guest keeps one applicationSessionId for life, and a rejoin mints a new psat with that same
id. The store is what makes "for life" survive a process restart (``anonjoin rejoin --guest ID``) and what
several processes of one deployment share.

Two implementations of :class:`SessionStore`:

- :class:`MemorySessionStore`: a dict; for tests and embedded runs that need no durability.
- :class:`SqliteSessionStore`: one SQLite file (stdlib ``sqlite3``), the CLI's default. WAL journal, every
  write one ``BEGIN IMMEDIATE`` transaction (atomic: a crash leaves the old row or the new one, never half),
  ``PRAGMA user_version`` as the schema version. A corrupt file, a file that is not a database, a database
  from a newer anonjoin, a locked file or an unwritable directory raise :class:`anonjoin.StoreError` with one
  clear line; nothing is ever dropped or recreated silently.

Leases (:meth:`SessionStore.claim`): one holder per guest at a time. A claim takes the guest's lease for
``lease_s`` seconds with a random token and a fencing *epoch* (one more on every claim); a task renews it at
a third of its life. A write that carries the lease's :class:`Fence` (``Outcome(..., fence=lease.fence)``,
:meth:`Lease.record_outcome`) is refused with :class:`anonjoin.LeaseLost` unless the lease is still live
and still that epoch, so an instance whose lease lapsed cannot overwrite the new holder. A renewal that
finds a newer epoch (another instance claimed the guest since) sets :attr:`Lease.lost`, and the holder
must let the guest go; a lapsed lease that nobody claimed is simply taken back. A renewal that cannot reach
the store keeps retrying (floor ``RENEW_RETRY_MIN_S``, doubling to a third of the lease) until the lease is
released: nobody can claim the guest in a store that nobody can reach. The
memory and SQLite stores give the same semantics within one machine (SQLite: a ``leases`` row with token,
expiry and epoch, in one transaction); :class:`anonjoin.RedisSessionStore` across machines.

Scopes (:class:`SessionScope`): a guest id is unique within a target (discover URL, endpoint id, meeting)
and a run id, not across them, so separate runs, or runs against separate targets, never share an
applicationSessionId or a lease. A store is built in one scope (default :data:`LEGACY_SCOPE`, where an
old store's rows are) and :meth:`scoped` gives a view in another; every method of the protocol works in the
store's scope, and :meth:`list_all` / :meth:`find` look across scopes (``anonjoin sessions``, ``rejoin``).
Leases and fences keep their meaning per scoped guest. SQLite schema version 2 keys the rows by (target,
run id, guest id); a version-1 file is migrated on open (one transaction), its rows in the legacy scope.

The SQLite calls run inline on the event loop: they are short, and a worker thread costs more than it
saves. Measured on the project's machine (2 shared cores, WAL, ``synchronous=NORMAL``): one new guest
~170 µs, a known guest ~30 µs, one outcome ~60 µs inline, against ~260/160/320 µs through a worker thread;
in batches (:meth:`SessionStore.get_or_create_many`, :meth:`SessionStore.record_outcomes`, one transaction
each) 2,000 new guests take ~95 ms and 2,000 outcomes ~10 ms. The load runner uses the batch forms. A lock
held by another process waits at most ``busy_timeout_s`` (default 2 s) and then becomes a ``StoreError``;
``SqliteSessionStore(path, threaded=True)`` moves the calls to one dedicated worker thread for callers who
share the file with slow writers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar, runtime_checkable

from anonjoin._exceptions import ConfigurationError, LeaseHeld, LeaseLost, StoreError

__all__ = [
    "DEFAULT_LEASE_S",
    "LEGACY_SCOPE",
    "SCHEMA_VERSION",
    "Fence",
    "Lease",
    "MemorySessionStore",
    "NewSession",
    "Outcome",
    "SessionRecord",
    "SessionScope",
    "SessionStore",
    "SqliteSessionStore",
    "default_store_path",
    "new_run_id",
    "target_key",
]

SCHEMA_VERSION = 2
"""2: sessions and leases keyed by (target, run id, guest id); a version-1 file is migrated on open, its
rows going to the legacy scope (run id and target empty)."""
DEFAULT_BUSY_TIMEOUT_S = 2.0
DEFAULT_LEASE_S = 30.0
MIN_LEASE_S = 0.05
MAX_LEASE_S = 24 * 3600.0
RENEW_RETRY_MIN_S = 0.05
"""A renewal that cannot reach the store is retried after this floor, doubling up to a third of the lease."""

log = logging.getLogger("anonjoin.store")

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True)
class SessionRecord:
    """What the store keeps for one guest. Times are Unix seconds."""

    guest_id: str
    application_session_id: str
    meeting_url: str
    origin: str
    display_name: str
    created_at: float
    updated_at: float
    last_outcome: str | None = None
    rejoins: int = 0
    run_id: str = ""
    """The run the guest belongs to (:class:`SessionScope`); empty for the legacy scope."""
    target: str = ""
    """The target (:func:`target_key`) the guest joined; empty for the legacy scope."""

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @property
    def scope(self) -> SessionScope:
        return SessionScope(self.run_id, self.target)


_Records = list[SessionRecord]  # for the classes, whose own ``list`` method hides the builtin

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a valid run id (1-64 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit)."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ConfigurationError(
            f"run id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return run_id


def new_run_id() -> str:
    """A fresh run id: the UTC time and a random part (``20261202-194500-3fa2c1``), unique per run."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def target_key(discover_url: str, endpoint_id: str, meeting_url: str) -> str:
    """The target part of a :class:`SessionScope`: the discover URL, the endpoint id and the meeting URL
    (one space between them: none of the three holds one)."""
    return f"{discover_url} {endpoint_id} {meeting_url}"


@dataclasses.dataclass(frozen=True, slots=True)
class SessionScope:
    """Where a store's guest ids live: a target (:func:`target_key`) and a run id.

    ``guest-0001`` of one run against one target is not ``guest-0001`` of another run or another target:
    each (target, run id) has its own applicationSessionIds and its own leases; the guest id stays the
    visible id. A store built without a scope uses :data:`LEGACY_SCOPE` (both empty), where the records of
    a store written before scopes existed are, so an embedder that never names a scope sees no change.
    :meth:`SessionStore.scoped` gives a view of the same store in another scope.
    """

    run_id: str = ""
    target: str = ""

    def __post_init__(self) -> None:
        if self.run_id:
            check_run_id(self.run_id)
        if not isinstance(self.target, str) or "\n" in self.target:
            raise ConfigurationError("a session scope's target must be one line of text")

    @classmethod
    def for_target(
        cls, *, discover_url: str, endpoint_id: str, meeting_url: str, run_id: str
    ) -> SessionScope:
        return cls(check_run_id(run_id), target_key(discover_url, endpoint_id, meeting_url))

    @property
    def legacy(self) -> bool:
        return not self.run_id and not self.target

    def __str__(self) -> str:
        return "legacy (unscoped)" if self.legacy else f"run {self.run_id or '-'} on {self.target or '-'}"


LEGACY_SCOPE = SessionScope()
"""The scope of a store given none, and of every record of a version-1 store file."""


class NewSession(NamedTuple):
    """One guest to look up or create (see :meth:`SessionStore.get_or_create_many`)."""

    guest_id: str
    meeting_url: str
    origin: str
    display_name: str
    application_session_id: str | None = None


class Fence(NamedTuple):
    """What a write under a lease carries: the lease's token and epoch. Its repr hides the token."""

    token: str
    epoch: int

    def __repr__(self) -> str:
        return f"Fence(epoch={self.epoch})"


class Outcome(NamedTuple):
    """How a guest ended (``last_outcome``) and how many rejoins to add to its count.

    With ``fence`` the write happens only while that lease is live and current (else :class:`LeaseLost`).
    """

    guest_id: str
    outcome: str
    rejoins: int = 0
    fence: Fence | None = None


@runtime_checkable
class SessionStore(Protocol):
    """Guest id -> :class:`SessionRecord`. Every method is atomic; implementations raise only ``StoreError``.

    A known guest keeps its applicationSessionId for ever; if it comes back for another meeting URL, origin
    or display name, those fields are updated (a rejoin goes where the guest went last).
    """

    async def get(self, guest_id: str) -> SessionRecord | None:
        """The record of ``guest_id``, or ``None`` for an unknown guest."""
        ...

    async def get_or_create(
        self,
        guest_id: str,
        *,
        meeting_url: str,
        origin: str,
        display_name: str,
        application_session_id: str | None = None,
    ) -> SessionRecord:
        """The record of a known guest (its applicationSessionId unchanged), else a new one.

        A new record takes ``application_session_id`` if given, else a fresh UUID4.
        """
        ...

    async def get_or_create_many(self, sessions: Sequence[NewSession]) -> list[SessionRecord]:
        """:meth:`get_or_create` for many guests in one transaction (all or none); records in input order."""
        ...

    async def record_outcome(self, guest_id: str, outcome: str, *, rejoins: int = 0) -> SessionRecord:
        """Set ``last_outcome`` and add ``rejoins`` to the guest's count. ``StoreError`` if unknown."""
        ...

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """:meth:`record_outcome` for many guests in one transaction; unknown guests are an error."""
        ...

    async def list(self) -> list[SessionRecord]:
        """Every record, oldest first."""
        ...

    def claim(
        self, guest_id: str, lease_s: float = DEFAULT_LEASE_S
    ) -> contextlib.AbstractAsyncContextManager[Lease]:
        """``async with store.claim(gid, 30) as lease:`` holds the guest's lease.

        :class:`LeaseHeld` if another holder's lease is live. Renewed in the background; released on exit
        (only if still ours)."""
        ...

    async def take(self, guest_id: str, lease_s: float = DEFAULT_LEASE_S) -> Lease:
        """:meth:`claim` without a ``with`` block (a lease that outlives one): call :meth:`Lease.release`."""
        ...

    async def aclose(self) -> None:
        """Release the store (idempotent)."""
        ...


def default_store_path() -> Path:
    """The CLI's default store file.

    ``$ANONJOIN_STORE`` if set, else ``$XDG_STATE_HOME/anonjoin/sessions.db`` (``~/.local/state/anonjoin/``
    when XDG_STATE_HOME is unset): one store per user, so ``anonjoin rejoin`` works from any directory.
    """
    env = os.environ.get("ANONJOIN_STORE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base).expanduser() / "anonjoin" / "sessions.db"


def _lease_seconds(lease_s: float) -> float:
    if not (isinstance(lease_s, int | float) and MIN_LEASE_S <= lease_s <= MAX_LEASE_S):
        raise StoreError(
            f"lease_s must be between {MIN_LEASE_S} and {MAX_LEASE_S:.0f} seconds, not {lease_s!r}"
        )
    return float(lease_s)


class Lease:
    """One held lease (from :meth:`SessionStore.claim`). :attr:`lost` is set once it is known to be lost."""

    def __init__(self, store: _Claims, guest_id: str, fence: Fence, lease_s: float) -> None:
        self.guest_id = guest_id
        self.lease_s = lease_s
        self.lost = asyncio.Event()
        self.renewals = 0
        self.renew_errors = 0
        self._fence = fence
        self._store = store
        self._task: asyncio.Task[None] | None = None
        self._released = False

    @property
    def fence(self) -> Fence:
        return self._fence

    @property
    def epoch(self) -> int:
        return self._fence.epoch

    async def record_outcome(self, outcome: str, *, rejoins: int = 0) -> None:
        """A fenced :meth:`SessionStore.record_outcome`: :class:`LeaseLost` unless this lease is current."""
        await self._store.record_outcomes([Outcome(self.guest_id, outcome, rejoins, self._fence)])

    def _start(self) -> None:
        self._task = asyncio.create_task(self._renew_loop(), name=f"anonjoin-lease-{self.guest_id}")

    async def _renew_loop(self) -> None:
        period = self.lease_s / 3
        delay = period
        failing = False
        while True:
            await asyncio.sleep(delay)
            try:
                epoch = await self._store._renew(self.guest_id, self._fence, self.lease_s)
            except StoreError as exc:
                # Unreachable: nobody can claim it there either. Retry from the floor, doubling to the period.
                self.renew_errors += 1
                log.debug("anonjoin.store.lease.renew_failed guest=%s: %s", self.guest_id, exc)
                delay = min(delay * 2, period) if failing else min(RENEW_RETRY_MIN_S, period)
                failing = True
                continue
            failing = False
            if epoch is None:
                log.info("anonjoin.store.lease.lost guest=%s", self.guest_id)
                self.lost.set()
                return
            if epoch != self._fence.epoch:  # re-acquired after the store lost it (a restart without data)
                self._fence = Fence(self._fence.token, epoch)
            self.renewals += 1
            delay = period

    def stop_renewing(self) -> None:
        """Stop the renewal (the lease then lapses within ``lease_s``); :meth:`release` also does this."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def release(self) -> bool:
        """Stop renewing and drop the lease if it is still ours. False if the store could not be reached
        (the lease then lapses on its own within ``lease_s``). Idempotent."""
        self.stop_renewing()
        if self._released:
            return True
        self._released = True
        try:
            await self._store._release(self.guest_id, self._fence)
        except StoreError as exc:
            log.debug("anonjoin.store.lease.release_failed guest=%s: %s", self.guest_id, exc)
            return False
        return True

    def __repr__(self) -> str:
        return f"Lease(guest_id={self.guest_id!r}, epoch={self.epoch}, lost={self.lost.is_set()})"


class _Claims:
    """:meth:`claim`, written once over three atomic primitives each store provides."""

    async def _acquire(self, guest_id: str, token: str, lease_s: float) -> int | None:
        """Take the lease if free (or expired): the new epoch; ``None`` if another holder's lease is live."""
        raise NotImplementedError

    async def _renew(self, guest_id: str, fence: Fence, lease_s: float) -> int | None:
        """Extend our lease: its epoch (a new one if the store had lost it and it was free); None if lost."""
        raise NotImplementedError

    async def _release(self, guest_id: str, fence: Fence) -> None:
        """Drop the lease if it is still ours."""
        raise NotImplementedError

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        raise NotImplementedError

    async def take(self, guest_id: str, lease_s: float = DEFAULT_LEASE_S) -> Lease:
        """:meth:`claim` without a ``with`` block: the caller must :meth:`Lease.release` it."""
        lease_s = _lease_seconds(lease_s)
        token = secrets.token_hex(16)
        epoch = await self._acquire(guest_id, token, lease_s)
        if epoch is None:
            raise LeaseHeld(guest_id)
        lease = Lease(self, guest_id, Fence(token, epoch), lease_s)
        lease._start()
        return lease

    @contextlib.asynccontextmanager
    async def claim(self, guest_id: str, lease_s: float = DEFAULT_LEASE_S) -> AsyncIterator[Lease]:
        lease = await self.take(guest_id, lease_s)
        try:
            yield lease
        finally:
            await lease.release()


def _check_fences(outcomes: Sequence[Outcome], live: Callable[[str, Fence], bool]) -> None:
    refused = [o.guest_id for o in outcomes if o.fence is not None and not live(o.guest_id, o.fence)]
    if refused:
        raise LeaseLost(refused)


_S = TypeVar("_S", bound="_Singles")


class _Singles(_Claims):
    """The one-guest methods, written once over the batch methods; the scope every built-in store has."""

    scope: SessionScope = LEGACY_SCOPE
    _shut: list[bool]  # [closed], shared by a store and its scoped views

    @property
    def _closed(self) -> bool:
        return self._shut[0]

    @_closed.setter
    def _closed(self, value: bool) -> None:
        self._shut[0] = value

    def scoped(self: _S, scope: SessionScope) -> _S:
        """A view of this store in ``scope``: the same file, connection or dict (close the store once;
        closing a view closes it too)."""
        view = copy.copy(self)
        view.scope = scope
        return view

    async def list_all(self, run_id: str | None = None) -> _Records:
        """Every record of every scope (of run ``run_id`` only, if given), oldest first."""
        raise NotImplementedError

    async def find(self, guest_id: str, run_id: str | None = None) -> _Records:
        """The records of ``guest_id`` in every scope (of run ``run_id`` only, if given), oldest first."""
        raise NotImplementedError

    async def get_or_create_many(self, sessions: Sequence[NewSession]) -> list[SessionRecord]:
        raise NotImplementedError

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        raise NotImplementedError

    async def get(self, guest_id: str) -> SessionRecord | None:
        raise NotImplementedError

    async def get_or_create(
        self,
        guest_id: str,
        *,
        meeting_url: str,
        origin: str,
        display_name: str,
        application_session_id: str | None = None,
    ) -> SessionRecord:
        new = NewSession(guest_id, meeting_url, origin, display_name, application_session_id)
        return (await self.get_or_create_many([new]))[0]

    async def record_outcome(self, guest_id: str, outcome: str, *, rejoins: int = 0) -> SessionRecord:
        await self.record_outcomes([Outcome(guest_id, outcome, rejoins)])
        found = await self.get(guest_id)
        assert found is not None
        return found


def _merge(
    found: SessionRecord | None, new: NewSession, now: float, scope: SessionScope
) -> SessionRecord | None:
    """The record to write for ``new`` given what is stored; ``None`` when nothing changes."""
    if found is None:
        return SessionRecord(
            run_id=scope.run_id,
            target=scope.target,
            guest_id=new.guest_id,
            application_session_id=new.application_session_id or str(uuid.uuid4()),
            meeting_url=new.meeting_url,
            origin=new.origin,
            display_name=new.display_name,
            created_at=now,
            updated_at=now,
        )
    if (found.meeting_url, found.origin, found.display_name) == (
        new.meeting_url,
        new.origin,
        new.display_name,
    ):
        return None
    return dataclasses.replace(
        found, meeting_url=new.meeting_url, origin=new.origin, display_name=new.display_name, updated_at=now
    )


class MemorySessionStore(_Singles):
    """An in-process store (a dict). Not durable: use :class:`SqliteSessionStore` to survive restarts."""

    def __init__(self, *, clock: Callable[[], float] = time.time, scope: SessionScope = LEGACY_SCOPE) -> None:
        self.scope = scope
        # Shared by every scoped view; keyed by (target, run id, guest id).
        self._records: dict[tuple[str, str, str], SessionRecord] = {}
        self._clock = clock
        self._leases: dict[tuple[str, str, str], tuple[str, float]] = {}  # -> (token, expires_at)
        self._epochs: dict[tuple[str, str, str], int] = {}

    def _k(self, guest_id: str) -> tuple[str, str, str]:
        return (self.scope.target, self.scope.run_id, guest_id)

    def _live(self, guest_id: str, fence: Fence) -> bool:
        key = self._k(guest_id)
        held = self._leases.get(key)
        return (
            held is not None
            and held[0] == fence.token
            and held[1] > self._clock()
            and self._epochs.get(key) == fence.epoch
        )

    async def _acquire(self, guest_id: str, token: str, lease_s: float) -> int | None:
        now = self._clock()
        key = self._k(guest_id)
        held = self._leases.get(key)
        if held is not None and held[1] > now:
            return None
        epoch = self._epochs.get(key, 0) + 1
        self._epochs[key] = epoch
        self._leases[key] = (token, now + lease_s)
        return epoch

    async def _renew(self, guest_id: str, fence: Fence, lease_s: float) -> int | None:
        # Ours while nobody claimed since (the epoch is unchanged), even if it lapsed meanwhile.
        key = self._k(guest_id)
        if self._epochs.get(key) != fence.epoch:
            return None
        self._leases[key] = (fence.token, self._clock() + lease_s)
        return fence.epoch

    async def _release(self, guest_id: str, fence: Fence) -> None:
        key = self._k(guest_id)
        held = self._leases.get(key)
        if held is not None and held[0] == fence.token:
            del self._leases[key]

    async def get(self, guest_id: str) -> SessionRecord | None:
        return self._records.get(self._k(guest_id))

    async def get_or_create_many(self, sessions: Sequence[NewSession]) -> list[SessionRecord]:
        now = self._clock()
        staged: dict[tuple[str, str, str], SessionRecord] = {}
        out: list[SessionRecord] = []
        taken = {r.application_session_id for r in self._records.values()}
        for new in sessions:
            key = self._k(new.guest_id)
            found = staged.get(key) or self._records.get(key)
            record = _merge(found, new, now, self.scope)
            if record is None:
                assert found is not None
                record = found
            elif found is None:
                if record.application_session_id in taken:
                    raise StoreError(
                        f"session store: applicationSessionId of guest {new.guest_id!r} is already "
                        "another guest's"
                    )
                taken.add(record.application_session_id)
            staged[key] = record
            out.append(record)
        self._records.update(staged)
        return out

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        _check_fences(outcomes, self._live)
        now = self._clock()
        staged: dict[tuple[str, str, str], SessionRecord] = {}
        for item in outcomes:
            key = self._k(item.guest_id)
            found = staged.get(key) or self._records.get(key)
            if found is None:
                raise StoreError(f"session store: no session for guest {item.guest_id!r}")
            staged[key] = dataclasses.replace(
                found, last_outcome=item.outcome, rejoins=found.rejoins + item.rejoins, updated_at=now
            )
        self._records.update(staged)

    async def list(self) -> list[SessionRecord]:
        return _oldest_first(r for r in self._records.values() if r.scope == self.scope)

    async def list_all(self, run_id: str | None = None) -> _Records:
        return _oldest_first(r for r in self._records.values() if run_id is None or r.run_id == run_id)

    async def find(self, guest_id: str, run_id: str | None = None) -> _Records:
        return _oldest_first(
            r
            for r in self._records.values()
            if r.guest_id == guest_id and (run_id is None or r.run_id == run_id)
        )

    async def aclose(self) -> None:
        return None


def _oldest_first(records: Iterable[SessionRecord]) -> list[SessionRecord]:
    return sorted(records, key=lambda r: (r.created_at, r.guest_id, r.run_id, r.target))


_COLUMNS = (
    "guest_id, application_session_id, meeting_url, origin, display_name, "
    "created_at, updated_at, last_outcome, rejoins, run_id, target"
)
_V1_COLUMNS = (
    "guest_id, application_session_id, meeting_url, origin, display_name, "
    "created_at, updated_at, last_outcome, rejoins"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    guest_id TEXT NOT NULL,
    application_session_id TEXT NOT NULL UNIQUE,
    meeting_url TEXT NOT NULL,
    origin TEXT NOT NULL,
    display_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_outcome TEXT,
    rejoins INTEGER NOT NULL DEFAULT 0,
    run_id TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (target, run_id, guest_id)
)
"""
_GUEST_INDEX = "CREATE INDEX IF NOT EXISTS sessions_by_guest ON sessions (guest_id, run_id)"


_LEASES = """
CREATE TABLE IF NOT EXISTS leases (
    guest_id TEXT NOT NULL,
    token TEXT,
    expires_at REAL NOT NULL,
    epoch INTEGER NOT NULL,
    run_id TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (target, run_id, guest_id)
)
"""

_SCOPED = "target = ? AND run_id = ? AND guest_id = ?"


def _row(values: tuple[object, ...]) -> SessionRecord:
    guest_id, asi, meeting_url, origin, display_name, created, updated, outcome, rejoins, run_id, target = (
        values
    )
    return SessionRecord(
        guest_id=str(guest_id),
        application_session_id=str(asi),
        meeting_url=str(meeting_url),
        origin=str(origin),
        display_name=str(display_name),
        created_at=float(created),  # type: ignore[arg-type]
        updated_at=float(updated),  # type: ignore[arg-type]
        last_outcome=None if outcome is None else str(outcome),
        rejoins=int(rejoins),  # type: ignore[call-overload]
        run_id=str(run_id),
        target=str(target),
    )


class SqliteSessionStore(_Singles):
    """A durable store in one SQLite file; safe to share between processes on one host.

    The file is opened (and created, with its directory) on construction, so a bad path fails at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        threaded: bool = False,
        clock: Callable[[], float] = time.time,
        scope: SessionScope = LEGACY_SCOPE,
    ) -> None:
        self.path = Path(path)
        self.scope = scope
        self._clock = clock
        self._lock = threading.Lock()
        self._shut = [False]
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="anonjoin-store")
            if threaded
            else None
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"session store {self.path}: cannot create its directory: {exc.strerror}"
            ) from exc
        try:
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(exc, "cannot open") from exc
        try:
            self._open()
        except StoreError:
            self._db.close()
            raise

    # -- plumbing ------------------------------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str) -> StoreError:
        text = str(exc)
        low = text.lower()
        if "locked" in low or "busy" in low:
            why = "the file is locked by another process (try again, or use another --store)"
        elif "not a database" in low or "malformed" in low or "corrupt" in low:
            why = "the file is corrupt or not an anonjoin session store (move it away to start afresh)"
        elif "readonly" in low or "read-only" in low or "unable to open" in low or "disk i/o" in low:
            why = f"the file cannot be written ({text})"
        else:
            why = text
        return StoreError(f"session store {self.path}: {doing}: {why}")

    def _open(self) -> None:
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                r[0]
                for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            }
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"session store {self.path}: schema version {version} is newer than this anonjoin "
                    f"understands ({SCHEMA_VERSION}); upgrade anonjoin or use another --store"
                )
            if version == 0 and tables and "sessions" not in tables:
                raise StoreError(
                    f"session store {self.path}: the file is an SQLite database but not an anonjoin "
                    "session store; use another --store"
                )
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # pragma: no cover - e.g. a file system without shared memory
                self._db.execute("PRAGMA journal_mode = DELETE")
            self._db.execute("PRAGMA synchronous = NORMAL")
            if version < SCHEMA_VERSION:
                self._write("create the schema", self._create_schema)
            else:
                self._check_columns(self._db, _COLUMNS)
        except StoreError:
            raise
        except sqlite3.Error as exc:
            raise self._error(exc, "cannot open") from exc

    def _check_columns(self, db: sqlite3.Connection, columns: str) -> None:
        cols = {r[1] for r in db.execute("PRAGMA table_info(sessions)").fetchall()}
        missing = {c.strip() for c in columns.split(",")} - cols
        if missing:
            raise StoreError(
                f"session store {self.path}: the sessions table lacks {sorted(missing)}; "
                "the file is damaged (move it away to start afresh)"
            )

    def _create_schema(self, db: sqlite3.Connection) -> None:
        """A new file's schema, or a version-1 file migrated: its rows (and leases) go to the legacy scope,
        none lost (one transaction: a crash leaves the old file as it was)."""
        # Under BEGIN IMMEDIATE: two processes creating (or migrating) the file at once serialise here.
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return  # another process did it meanwhile
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        if "sessions" in tables:
            self._check_columns(db, _V1_COLUMNS)
            db.execute("ALTER TABLE sessions RENAME TO sessions_v1")
        db.execute(_SCHEMA)
        if "sessions" in tables:
            db.execute(f"INSERT INTO sessions ({_V1_COLUMNS}) SELECT {_V1_COLUMNS} FROM sessions_v1")
            db.execute("DROP TABLE sessions_v1")
        if "leases" in tables:
            db.execute("ALTER TABLE leases RENAME TO leases_v1")
        db.execute(_LEASES)
        if "leases" in tables:
            db.execute(
                "INSERT INTO leases (guest_id, token, expires_at, epoch) "
                "SELECT guest_id, token, expires_at, epoch FROM leases_v1"
            )
            db.execute("DROP TABLE leases_v1")
        db.execute(_GUEST_INDEX)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if "sessions" in tables:
            log.info(
                "anonjoin.store.migrated path=%s to schema %d (old rows: the legacy scope)", self.path, 2
            )

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise StoreError(f"session store {self.path}: used after close")
        if self._executor is None:
            return self._locked(fn)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._locked, fn)

    def _locked(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            return fn()

    def _write(self, doing: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from exc
        try:
            result = fn(self._db)
            self._db.execute("COMMIT")
        except BaseException as exc:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc, doing) from exc
            raise
        return result

    def _read(self, doing: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            return fn(self._db)
        except sqlite3.Error as exc:
            raise self._error(exc, doing) from exc

    # -- the SessionStore protocol ---------------------------------------------------------------------------

    def _key(self, guest_id: str) -> tuple[str, str, str]:
        return (self.scope.target, self.scope.run_id, guest_id)

    def _select(self, db: sqlite3.Connection, guest_id: str) -> SessionRecord | None:
        found = db.execute(f"SELECT {_COLUMNS} FROM sessions WHERE {_SCOPED}", self._key(guest_id)).fetchone()
        return None if found is None else _row(found)

    async def get(self, guest_id: str) -> SessionRecord | None:
        return await self._call(lambda: self._read("read", lambda db: self._select(db, guest_id)))

    async def get_or_create_many(self, sessions: Sequence[NewSession]) -> list[SessionRecord]:
        def lookup(db: sqlite3.Connection) -> list[SessionRecord | None]:
            return [self._select(db, new.guest_id) for new in sessions]

        def upsert(db: sqlite3.Connection) -> list[SessionRecord]:
            # Inside BEGIN IMMEDIATE: another process creating the same guest waits, then finds our row.
            now = self._clock()
            out: list[SessionRecord] = []
            staged: dict[str, SessionRecord] = {}
            for new in sessions:
                found = staged.get(new.guest_id) or self._select(db, new.guest_id)
                record = _merge(found, new, now, self.scope)
                if record is None:
                    assert found is not None
                    record = found
                elif found is None:
                    db.execute(
                        f"INSERT INTO sessions ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        dataclasses.astuple(record),
                    )
                else:
                    db.execute(
                        "UPDATE sessions SET meeting_url = ?, origin = ?, display_name = ?, updated_at = ? "
                        f"WHERE {_SCOPED}",
                        (
                            record.meeting_url,
                            record.origin,
                            record.display_name,
                            now,
                            *self._key(new.guest_id),
                        ),
                    )
                staged[new.guest_id] = record
                out.append(record)
            return out

        def run() -> list[SessionRecord]:
            # The common case (every guest known, nothing changed) needs no write lock.
            found = self._read("read", lookup)
            if all(
                f is not None and _merge(f, new, 0.0, self.scope) is None
                for f, new in zip(found, sessions, strict=True)
            ):
                return [f for f in found if f is not None]
            return self._write("save sessions", upsert)

        return await self._call(run)

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        def update(db: sqlite3.Connection) -> None:
            now = self._clock()
            if any(o.fence is not None for o in outcomes):
                db.execute(_LEASES)
                _check_fences(outcomes, lambda g, f: self._live(db, g, f, now))
            for item in outcomes:
                cur = db.execute(
                    "UPDATE sessions SET last_outcome = ?, rejoins = rejoins + ?, updated_at = ? "
                    f"WHERE {_SCOPED}",
                    (item.outcome, item.rejoins, now, *self._key(item.guest_id)),
                )
                if cur.rowcount != 1:
                    raise StoreError(f"session store {self.path}: no session for guest {item.guest_id!r}")

        await self._call(lambda: self._write("record outcomes", update))

    def _live(self, db: sqlite3.Connection, guest_id: str, fence: Fence, now: float) -> bool:
        row = db.execute(
            f"SELECT token, expires_at, epoch FROM leases WHERE {_SCOPED}", self._key(guest_id)
        ).fetchone()
        return (
            row is not None and row[0] == fence.token and float(row[1]) > now and int(row[2]) == fence.epoch
        )

    async def _acquire(self, guest_id: str, token: str, lease_s: float) -> int | None:
        def take(db: sqlite3.Connection) -> int | None:
            db.execute(_LEASES)
            now = self._clock()
            row = db.execute(
                f"SELECT token, expires_at, epoch FROM leases WHERE {_SCOPED}", self._key(guest_id)
            ).fetchone()
            if row is not None and row[0] is not None and float(row[1]) > now:
                return None
            epoch = (int(row[2]) if row is not None else 0) + 1
            db.execute(
                "INSERT INTO leases (target, run_id, guest_id, token, expires_at, epoch) "
                "VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (target, run_id, guest_id) DO UPDATE SET token = excluded.token, "
                "expires_at = excluded.expires_at, epoch = excluded.epoch",
                (*self._key(guest_id), token, now + lease_s, epoch),
            )
            return epoch

        return await self._call(lambda: self._write("claim a lease", take))

    async def _renew(self, guest_id: str, fence: Fence, lease_s: float) -> int | None:
        def renew(db: sqlite3.Connection) -> int | None:
            # Ours while nobody claimed since (the epoch is unchanged), even if it lapsed meanwhile.
            db.execute(_LEASES)
            cur = db.execute(
                f"UPDATE leases SET token = ?, expires_at = ? WHERE {_SCOPED} AND epoch = ?",
                (fence.token, self._clock() + lease_s, *self._key(guest_id), fence.epoch),
            )
            return fence.epoch if cur.rowcount == 1 else None

        return await self._call(lambda: self._write("renew a lease", renew))

    async def _release(self, guest_id: str, fence: Fence) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.execute(_LEASES)
            db.execute(
                f"UPDATE leases SET token = NULL, expires_at = 0 WHERE {_SCOPED} AND token = ?",
                (*self._key(guest_id), fence.token),
            )

        await self._call(lambda: self._write("release a lease", release))

    async def list(self) -> list[SessionRecord]:
        def read(db: sqlite3.Connection) -> list[SessionRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE target = ? AND run_id = ? "
                "ORDER BY created_at, guest_id",
                (self.scope.target, self.scope.run_id),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._call(lambda: self._read("list sessions", read))

    async def list_all(self, run_id: str | None = None) -> _Records:
        return await self._query("list sessions", "run_id = ?" if run_id is not None else "1", (run_id,))

    async def find(self, guest_id: str, run_id: str | None = None) -> _Records:
        if run_id is None:
            return await self._query("find a guest", "guest_id = ?", (guest_id,))
        return await self._query("find a guest", "guest_id = ? AND run_id = ?", (guest_id, run_id))

    async def _query(self, doing: str, where: str, args: tuple[str | None, ...]) -> _Records:
        params = tuple(a for a in args if a is not None)

        def read(db: sqlite3.Connection) -> list[SessionRecord]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM sessions WHERE {where} "
                "ORDER BY created_at, guest_id, run_id, target",
                params,
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._call(lambda: self._read(doing, read))

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """Synchronous close, for callers outside an event loop."""
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        scope = "" if self.scope.legacy else f", run_id={self.scope.run_id!r}"
        return f"SqliteSessionStore({str(self.path)!r}{scope})"


def in_scope(store: SessionStore, scope: SessionScope) -> SessionStore:
    """``store`` seen in ``scope``: a built-in store's :meth:`~MemorySessionStore.scoped` view. A store of
    one's own (any :class:`SessionStore`) has only the legacy scope."""
    if isinstance(store, _Singles):
        return store.scoped(scope)
    if scope.legacy:
        return store
    raise StoreError(f"session store {type(store).__name__}: has no scopes (only the legacy one)")


async def list_sessions(store: SessionStore, run_id: str | None = None) -> list[SessionRecord]:
    """Every record of every scope of ``store`` (of run ``run_id`` only, if given), oldest first."""
    if isinstance(store, _Singles):
        return await store.list_all(run_id)
    return [r for r in await store.list() if run_id is None or r.run_id == run_id]


async def find_sessions(store: SessionStore, guest_id: str, run_id: str | None = None) -> list[SessionRecord]:
    """The records of ``guest_id`` in every scope of ``store`` (of run ``run_id`` only, if given)."""
    if isinstance(store, _Singles):
        return await store.find(guest_id, run_id)
    found = await store.get(guest_id)
    return [found] if found is not None and (run_id is None or found.run_id == run_id) else []
