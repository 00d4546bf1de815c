"""The command layer: the questions users ask of the recorded history, as plain functions.

Parameters come in as users give them (text from a command line or a query string), are
validated here, and every problem is one :class:`~monitor.errors.BadParameter` (the name is the
API's: ``since``, ``kind``, ``cursor``, ...) or :class:`~monitor.errors.NotFound`. Answers are
the read side's views (``storage.queries``); :mod:`monitor.views` turns them into the one model
of each shape. The CLI, the HTTP API and the web view only parse and render: none of them
validates a parameter or builds an answer of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from monitor.core import Change, diff
from monitor.core.kinds import EVENT_KINDS, SEVERITIES
from monitor.errors import BadParameter, NotFound
from monitor.storage.chain import ChainReport, verify_chain
from monitor.storage.queries import (
    AmbiguousReference,
    ChainHead,
    EventView,
    Queries,
    SnapshotView,
    TargetView,
    decode_cursor,
)
from monitor.timeutil import Clock, parse_time

__all__ = ["SEVERITIES", "AuditCommands", "Diff", "Page"]

Row = TypeVar("Row", EventView, SnapshotView)


@dataclass(frozen=True, slots=True)
class Page(Generic[Row]):
    """Rows newest first; ``next_cursor`` reads the next page (None: this one is the last)."""

    rows: list[Row]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Diff:
    old: SnapshotView
    new: SnapshotView
    changes: list[Change]


class AuditCommands:
    """Read-only questions over one query layer. ``configured`` are the target names of the
    configuration: one not polled yet is known all the same (an empty history, not an error)."""

    def __init__(self, queries: Queries, *, clock: Clock, configured: Collection[str] = ()):
        self.queries = queries
        self._clock = clock
        self._configured = frozenset(configured)

    # -- the commands ------------------------------------------------------------------------

    def targets(self, name: str | None = None) -> list[TargetView]:
        """Every target's state, or the one called ``name`` (NotFound if unknown; an empty
        list for a configured target that was never polled)."""
        return self.queries.targets(self.target(name))

    def events(
        self,
        *,
        target: str | None = None,
        kind: str | Iterable[str] | None = None,
        severity: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        max_limit: int = 500,
        cursor: str | None = None,
        actor: str | None = None,
    ) -> Page[EventView]:
        """Events newest first; ``actor``: only those attributed (SPEC §11) to an admin with
        this id or display name."""
        self.limit(limit, max_limit)
        if severity is not None and severity not in SEVERITIES:
            raise BadParameter("severity", f"must be one of {', '.join(SEVERITIES)}")
        rows = self.queries.events(
            target=self.target(target),
            kinds=self.kinds(kind),
            severity=severity,
            since=self.time("since", since),
            until=self.time("until", until),
            limit=limit,
            cursor=self.cursor(cursor),
            actor=self.actor(actor),
        )
        return _page(rows, limit)

    def snapshots(
        self,
        *,
        target: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 100,
        max_limit: int = 500,
        cursor: str | None = None,
    ) -> Page[SnapshotView]:
        self.limit(limit, max_limit)
        rows = self.queries.snapshots(
            target=self.target(target),
            since=self.time("since", since),
            until=self.time("until", until),
            limit=limit,
            cursor=self.cursor(cursor),
        )
        return _page(rows, limit)

    def snapshot(self, ref: str, *, name: str = "hash") -> SnapshotView:
        """A snapshot by hash, unique hash prefix or id; ``name`` is the parameter it came in."""
        try:
            found = self.queries.snapshot(ref)
        except AmbiguousReference as exc:
            raise BadParameter(name, f"{exc}; give more of the hash") from None
        if found is None:
            raise NotFound("snapshot", f"unknown snapshot {ref!r}")
        return found

    def neighbours(self, snapshot: SnapshotView) -> tuple[SnapshotView | None, SnapshotView | None]:
        """The target's versions one change before and one change after ``snapshot``."""
        return self.queries.neighbours(snapshot)

    def at(self, target: str, time: str) -> SnapshotView:
        moment = self.time("time", time)
        assert moment is not None
        name = self.target(target)
        assert name is not None
        found = self.queries.at(name, moment)
        if found is None:
            raise NotFound("moment", f"target {target!r} was not observed yet at {time}")
        return found

    def diff(self, old: str, new: str, *, names: tuple[str, str] = ("from", "to")) -> Diff:
        a, b = self.snapshot(old, name=names[0]), self.snapshot(new, name=names[1])
        return Diff(a, b, diff(a.document, b.document))

    def chain_head(self) -> ChainHead:
        return self.queries.chain_head()

    def verify(self) -> ChainReport:
        """Walk the whole audit chain (SPEC §9): one read transaction, as long as the history.
        StorageError when the database cannot be read."""
        return verify_chain(self.queries.engine)

    # -- parameters, one rule each -----------------------------------------------------------

    def target(self, name: str | None) -> str | None:
        """A known target name (or None for all); NotFound otherwise."""
        if name is None:
            return None
        # A NUL byte can never be in a name, and PostgreSQL refuses it as text.
        if "\x00" not in name and (name in self._configured or self.queries.target_exists(name)):
            return name
        raise NotFound("target", f"unknown target {name!r}")

    def time(self, name: str, value: str | None) -> datetime | None:
        """An RFC 3339 time or an age (``24h``, ``7d``, ``1h30m``) before now."""
        if value is None:
            return None
        try:
            return parse_time(value, now=self._clock())
        except ValueError as exc:
            raise BadParameter(name, str(exc)) from None

    @staticmethod
    def kinds(value: str | Iterable[str] | None) -> tuple[str, ...]:
        """Event kinds from ``a,b`` or repeated values; each one of SPEC §4's."""
        values: Sequence[str] = [value] if isinstance(value, str) else list(value or ())
        kinds = tuple(k for text in values for k in text.split(",") if k)
        unknown = [k for k in kinds if k not in EVENT_KINDS]
        if unknown:
            raise BadParameter("kind", f"unknown event kind {unknown[0]!r}")
        return kinds

    @staticmethod
    def actor(value: str | None) -> str | None:
        """An admin id or display name: not empty, at most 128 characters, no NUL."""
        if value is None:
            return None
        if not value or len(value) > 128 or "\x00" in value:
            raise BadParameter("actor", "must be an admin id or display name (1-128 characters)")
        return value

    @staticmethod
    def cursor(value: str | None) -> str | None:
        if value is not None:
            try:
                decode_cursor(value)
            except ValueError:
                raise BadParameter("cursor", "not a cursor this API returned") from None
        return value

    @staticmethod
    def limit(value: int, maximum: int) -> int:
        if not 1 <= value <= maximum:
            raise BadParameter("limit", f"must be between 1 and {maximum}")
        return value


def _page(rows: list[Row], limit: int) -> Page[Row]:
    """A full page carries the cursor of its last row for the next one."""
    full = bool(rows) and len(rows) == limit
    return Page(rows, rows[-1].cursor() if full else None)
