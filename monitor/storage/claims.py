"""The SQL of replicas (PostgreSQL): membership rows, heartbeats and the claims on targets.

Every lease is on the database's clock (``now()``), never a replica's: replicas whose clocks
disagree still agree on who holds what. A claim is a row per target with an owner, a lease and
an epoch raised at every change of owner; nothing is a session lock, so a connection pooler in
transaction mode (PgBouncer) or a recycled connection changes nothing.

The policy (how many targets to hold, when to let go) is :mod:`monitor.cluster`'s; this module
only says what the database holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import Engine, bindparam, text
from sqlalchemy.engine import Connection
from sqlalchemy.types import ARRAY, Float, Integer, String

from monitor.errors import StorageError
from monitor.storage.engine import connect
from monitor.storage.schema import UTCDateTime

T = TypeVar("T")

__all__ = [
    "HELD",
    "Beat",
    "ClaimStore",
    "Claimed",
    "Member",
    "MirroredState",
    "NameInUse",
    "OtherKey",
    "Predecessor",
]


@dataclass(frozen=True, slots=True)
class Predecessor:
    """A live row of our name, left by a process of this host that may be dead."""

    host: str
    pid: int


class NameInUse(StorageError):
    """A live replica already has this name: ``holder`` says where it runs."""

    def __init__(self, message: str, holder: Predecessor) -> None:
        super().__init__(message)
        self.holder = holder


class OtherKey(StorageError):
    """The live replicas use another fingerprint key: their hashes would differ from ours."""


@dataclass(frozen=True, slots=True)
class Beat:
    """What one heartbeat found: the database's time, whether our row is still ours, how many
    replicas are live (us included), how many targets are free, and the claims we hold."""

    db_now: datetime
    member: bool
    live: int
    free: int
    owned: dict[str, int]  # target -> epoch


@dataclass(frozen=True, slots=True)
class Claimed:
    target: str
    epoch: int
    last_attempt_at: datetime | None  # poll_state's, written by the previous owner


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    heartbeat_at: datetime
    targets: list[str]


@dataclass(frozen=True, slots=True)
class MirroredState:
    """A target's state gauges as the database has them (another replica polls it)."""

    name: str
    enabled: bool | None
    provider_type: str | None
    hash: str | None
    drift: bool
    up: bool | None
    last_success_at: datetime | None
    last_change_at: datetime | None


_NAMES = ARRAY(String())
_LEASE = "make_interval(secs => :lease)"

_ROW_OF_NAME = text(
    "SELECT host, pid, lease_until >= now() AS live FROM replicas WHERE name = :me FOR UPDATE"
)
_OTHER_KEYS = text(
    "SELECT count(*) FROM replicas"
    " WHERE lease_until >= now() AND name <> :me AND key_check <> :key_check"
)
_JOIN = text(
    "INSERT INTO replicas (name, instance, host, pid, key_check, started_at, heartbeat_at,"
    " lease_until) VALUES (:me, :instance, :host, :pid, :key_check, now(), now(),"
    f" now() + {_LEASE})"
    " ON CONFLICT (name) DO UPDATE SET instance = excluded.instance, host = excluded.host,"
    " pid = excluded.pid, key_check = excluded.key_check, started_at = excluded.started_at,"
    " heartbeat_at = excluded.heartbeat_at, lease_until = excluded.lease_until"
).bindparams(bindparam("lease", type_=Float()))
# Rows of replicas gone for a day say nothing any more.
_FORGET_OLD = text("DELETE FROM replicas WHERE lease_until < now() - interval '1 day'")
_TARGETS_KNOWN = text(
    "INSERT INTO claims (target, owner, epoch, lease_until)"
    " SELECT name, NULL, 0, NULL FROM unnest(:targets) AS name ON CONFLICT (target) DO NOTHING"
).bindparams(bindparam("targets", type_=_NAMES))
_RELEASE_ALL = text("UPDATE claims SET owner = NULL, lease_until = NULL WHERE owner = :me")

# One statement per heartbeat: our row and every claim we hold renewed, and what the claiming
# step needs to know. The claims are locked in target order, as the fence of a write locks
# them, so a heartbeat and a write never deadlock. A claim of ours whose lease ran out is
# renewed too: nobody took it (the owner would be another), so nobody wrote under a newer epoch.
_BEAT = text(
    "WITH me AS (UPDATE replicas SET heartbeat_at = now(), lease_until = now() + "
    f"{_LEASE} WHERE name = :me AND instance = :instance RETURNING name),"
    f" renewed AS (UPDATE claims SET lease_until = now() + {_LEASE}"
    " WHERE target IN (SELECT target FROM claims WHERE owner = :me ORDER BY target FOR UPDATE)"
    " AND EXISTS (SELECT 1 FROM me) RETURNING target, epoch)"
    " SELECT now() AS db_now, (SELECT count(*) FROM me) AS member,"
    " (SELECT count(*) FROM replicas WHERE lease_until >= now() AND name <> :me) AS others,"
    " (SELECT count(*) FROM claims WHERE target = ANY(:targets)"
    "  AND (owner IS NULL OR lease_until < now()) AND owner IS DISTINCT FROM :me) AS free,"
    " (SELECT coalesce(json_agg(json_build_array(target, epoch)), '[]') FROM renewed) AS owned"
).bindparams(bindparam("lease", type_=Float()), bindparam("targets", type_=_NAMES))

# Free claims (no owner, or a lease run out) taken with a new epoch. Each replica prefers its
# own order of the targets (md5 of target and replica), so two claiming at once mostly want
# different rows, and SKIP LOCKED lets each pass over what the other is taking.
_CLAIM = text(
    f"UPDATE claims AS c SET owner = :me, epoch = c.epoch + 1, lease_until = now() + {_LEASE}"
    " FROM (SELECT target FROM claims WHERE target = ANY(:targets)"
    "  AND (owner IS NULL OR lease_until < now()) AND owner IS DISTINCT FROM :me"
    "  ORDER BY md5(target || :me) LIMIT :n FOR UPDATE SKIP LOCKED) AS free"
    " WHERE c.target = free.target"
    " RETURNING c.target, c.epoch, (SELECT ps.last_attempt_at FROM poll_state AS ps"
    "  JOIN targets AS t ON t.id = ps.target_id WHERE t.name = c.target) AS last_attempt_at"
).bindparams(
    bindparam("lease", type_=Float()),
    bindparam("targets", type_=_NAMES),
    bindparam("n", type_=Integer()),
)
_RELEASE = text(
    "UPDATE claims SET owner = NULL, lease_until = NULL"
    " WHERE owner = :me AND target = ANY(:targets)"
).bindparams(bindparam("targets", type_=_NAMES))
_LEAVE = text("DELETE FROM replicas WHERE name = :me AND instance = :instance")

# The fence of a write (inside its transaction): which of these targets we still hold, and under
# which epoch. FOR SHARE keeps a claimer from taking them until the write commits.
HELD = text(
    "SELECT target, epoch FROM claims WHERE owner = :me AND target = ANY(:targets)"
    " ORDER BY target FOR SHARE"
).bindparams(bindparam("targets", type_=_NAMES))

_MEMBERS = text(
    "SELECT r.name, r.heartbeat_at, coalesce(array_agg(c.target ORDER BY c.target)"
    " FILTER (WHERE c.target IS NOT NULL), '{}') AS targets FROM replicas AS r"
    " LEFT JOIN claims AS c ON c.owner = r.name AND c.lease_until >= now()"
    " WHERE r.lease_until >= now() GROUP BY r.name, r.heartbeat_at ORDER BY r.name"
).columns(heartbeat_at=UTCDateTime())

_STATES = (
    text(
        "SELECT t.name, s.enabled, s.provider_type, s.hash, s.drift, ps.up, ps.last_success_at,"
        " ps.last_change_at FROM targets AS t JOIN poll_state AS ps ON ps.target_id = t.id"
        " LEFT JOIN snapshots AS s ON s.id = ps.current_snapshot_id WHERE t.name = ANY(:targets)"
    )
    .bindparams(bindparam("targets", type_=_NAMES))
    .columns(last_success_at=UTCDateTime(), last_change_at=UTCDateTime())
)


class ClaimStore:
    """The rows of one replica (``me``, this process's ``instance``) and its claims."""

    def __init__(self, engine: Engine, *, me: str, instance: str, lease: float) -> None:
        self._engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self.me = me
        self._instance = instance
        self._lease = lease

    def join(
        self,
        *,
        host: str,
        pid: int,
        key_check: str,
        targets: Sequence[str],
        may_replace: Predecessor | None = None,
    ) -> None:
        """Become a member: our row, a claim row for every target, and no claim of a process
        that had our name before. Refused (NameInUse) while a live replica has our name, unless
        it is ``may_replace`` (a dead process of this host); refused (OtherKey) when the live
        replicas use another fingerprint key."""

        def work(connection: Connection) -> Predecessor | None:
            row = connection.execute(_ROW_OF_NAME, {"me": self.me}).first()
            if row is not None and row.live and Predecessor(row.host, row.pid) != may_replace:
                return Predecessor(row.host, row.pid)
            others = connection.execute(
                _OTHER_KEYS, {"me": self.me, "key_check": key_check}
            ).scalar_one()
            if others:
                raise OtherKey(
                    "the live replicas on this database use another fingerprint key "
                    "(set the same fingerprint_key_env or fingerprint_key_file on every replica)"
                )
            connection.execute(_FORGET_OLD)
            connection.execute(
                _JOIN,
                {
                    "me": self.me,
                    "instance": self._instance,
                    "host": host[:255],
                    "pid": pid,
                    "key_check": key_check,
                    "lease": self._lease,
                },
            )
            connection.execute(_RELEASE_ALL, {"me": self.me})
            connection.execute(_TARGETS_KNOWN, {"targets": list(targets)})
            return None

        holder = self._transaction(work)
        if holder is not None:
            raise NameInUse(
                f"replica name {self.me!r} is in use by a live replica "
                f"(host {holder.host}, pid {holder.pid})",
                holder,
            )

    def beat(self, targets: Sequence[str]) -> Beat:
        with self._connect() as connection:
            row = connection.execute(
                _BEAT,
                {
                    "me": self.me,
                    "instance": self._instance,
                    "lease": self._lease,
                    "targets": list(targets),
                },
            ).one()
        owned = row.owned if isinstance(row.owned, list) else json.loads(row.owned)
        member = bool(row.member)
        return Beat(
            db_now=row.db_now.astimezone(UTC),
            member=member,
            live=int(row.others) + (1 if member else 0),
            free=int(row.free),
            owned={str(target): int(epoch) for target, epoch in owned},
        )

    def claim(self, targets: Sequence[str], count: int) -> list[Claimed]:
        if count <= 0:
            return []
        with self._connect() as connection:
            rows = connection.execute(
                _CLAIM,
                {"me": self.me, "lease": self._lease, "targets": list(targets), "n": count},
            ).all()
        return [Claimed(str(row.target), int(row.epoch), _utc(row.last_attempt_at)) for row in rows]

    def release(self, targets: Sequence[str]) -> None:
        if targets:
            with self._connect() as connection:
                connection.execute(_RELEASE, {"me": self.me, "targets": list(targets)})

    def leave(self) -> None:
        """Give up every claim and our row: the others take the targets at their next beat."""

        def work(connection: Connection) -> None:
            connection.execute(_RELEASE_ALL, {"me": self.me})
            connection.execute(_LEAVE, {"me": self.me, "instance": self._instance})

        self._transaction(work)

    def members(self) -> list[Member]:
        with self._connect() as connection:
            rows = connection.execute(_MEMBERS).all()
        return [Member(str(r.name), r.heartbeat_at, [str(t) for t in r.targets]) for r in rows]

    def states(self, targets: Sequence[str]) -> list[MirroredState]:
        if not targets:
            return []
        with self._connect() as connection:
            rows = connection.execute(_STATES, {"targets": list(targets)}).all()
        return [
            MirroredState(
                name=str(r.name),
                enabled=r.enabled,
                provider_type=r.provider_type,
                hash=r.hash,
                drift=bool(r.drift),
                up=r.up,
                last_success_at=r.last_success_at,
                last_change_at=r.last_change_at,
            )
            for r in rows
        ]

    # -- internals -------------------------------------------------------------------------

    def _connect(self) -> AbstractContextManager[Connection]:
        return connect(self._autocommit)

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        with connect(self._engine) as connection, connection.begin():
            return work(connection)


def _utc(value: datetime | None) -> datetime | None:
    return value.astimezone(UTC) if value is not None else None
