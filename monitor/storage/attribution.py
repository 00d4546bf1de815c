"""Attribution rows (SPEC §11): pending lookups, settled attributions, held and follow-up alerts.

* :meth:`Attributions.open` runs inside the transaction that writes an event (the store calls
  it): an event caused by an upstream change on a target with attribution on gets a lookup row.
  A non-critical event's deliveries are then *held*: no outbox row yet (the caller skips its
  enqueue), so it waits for its actors.
* :meth:`Attributions.settle` writes the verdict in one transaction: the lookup row is deleted
  (only one writer can: a second replica's settle finds nothing and writes nothing), the
  attribution row is inserted and chained, and the event's deliveries are queued: the held
  ones, or, for an event that went out already (critical, or held past the wait), a
  ``follow_up`` row for each webhook/Slack sink it was sent to.
* :meth:`Attributions.release` queues the held deliveries of lookups past their deadline
  (``attribution_wait``), so a slow audit log never holds an alert longer than that.

Lookups are claimed by moving their ``next_attempt_at`` a lease ahead, guarded by its old value:
two replicas never ask the log for one lookup at once (and if they did, only one would settle).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.engine import Connection

from monitor.core.alerting import SinkRoute
from monitor.core.attribution import Verdict, applies
from monitor.storage import chain, transaction
from monitor.storage import outbox as outbox_rows
from monitor.storage.engine import WRITE, connect
from monitor.storage.schema import (
    attribution_lookups,
    attributions,
    events,
    outbox,
    targets,
)
from monitor.storage.transaction import Tx as _Tx
from monitor.timeutil import Clock

__all__ = ["Attributions", "Lookup", "actors_json"]

log = logging.getLogger("monitor.storage")

T = TypeVar("T")


def actors_json(verdict: Verdict) -> str:
    """The stored form of a verdict's actors (the event JSON's), keys sorted."""
    return json.dumps(
        [actor.as_dict() for actor in verdict.actors], ensure_ascii=False, sort_keys=True
    )


@dataclass(frozen=True, slots=True)
class Lookup:
    """A pending lookup with what its attempts need of the event."""

    id: int
    event_id: int
    public_id: str
    target: str
    kind: str
    severity: str
    since: datetime | None
    until: datetime
    created_at: datetime
    deadline: datetime
    attempts: int
    next_attempt_at: datetime
    hold_outbox: bool


class Attributions:
    """The attribution tables. ``enabled``: the targets whose changes are attributed;
    ``routes``: every sink's filter (for held deliveries); ``follow_up_sinks``: the sinks that
    get a re-send once attribution settles (webhook, Slack); ``wait``: attribution_wait."""

    def __init__(
        self,
        engine: Engine,
        *,
        enabled: Collection[str],
        routes: Sequence[SinkRoute] = (),
        follow_up_sinks: Collection[str] = (),
        wait: float = 60.0,
        clock: Clock,
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        self._enabled = frozenset(enabled)
        self._routes = tuple(routes)
        self._follow_up = frozenset(follow_up_sinks)
        self.wait = wait
        self._clock = clock
        self._on_outbox = on_outbox

    # -- in the event's transaction ----------------------------------------------------------

    def open(
        self,
        connection: Connection,
        *,
        target: str,
        target_id: int,
        event_id: int,
        values: Mapping[str, Any],
        since: datetime | None,
        notify: bool,
    ) -> bool:
        """A lookup for the event just inserted (``values``: its row), if it is attributed;
        True when its deliveries are held (the caller must not queue them)."""
        kind = values["kind"]
        if target not in self._enabled or not applies(
            kind, values["snapshot_hash"], values["previous_hash"]
        ):
            return False
        severity = values["severity"]
        hold = (
            notify
            and severity != "critical"
            and any(route.accepts(kind, severity) for route in self._routes)
        )
        now = self._clock()
        connection.execute(
            insert(attribution_lookups).values(
                event_id=event_id,
                target_id=target_id,
                since=since,
                until=values["at"],
                created_at=now,
                deadline=now + timedelta(seconds=self.wait),
                attempts=0,
                next_attempt_at=now,
                hold_outbox=hold,
            )
        )
        return hold

    # -- the worker's side -------------------------------------------------------------------

    def due(self, now: datetime, *, limit: int = 20) -> list[Lookup]:
        """Lookups whose next attempt is due, oldest first."""
        return self._lookups(attribution_lookups.c.next_attempt_at <= now, limit=limit)

    def pending(self, event_ids: Collection[int] | None = None) -> list[Lookup]:
        """Every pending lookup, or those of these events."""
        condition = (
            attribution_lookups.c.id.is_not(None)
            if event_ids is None
            else attribution_lookups.c.event_id.in_(list(event_ids))
        )
        return self._lookups(condition, limit=10_000)

    def claim(self, lookup: Lookup, now: datetime, lease: float) -> bool:
        """Take ``lookup`` for one attempt: False when another worker took it first."""
        statement = (
            update(attribution_lookups)
            .where(
                attribution_lookups.c.id == lookup.id,
                attribution_lookups.c.next_attempt_at == lookup.next_attempt_at,
            )
            .values(next_attempt_at=now + timedelta(seconds=lease))
        )
        return self._write(lambda tx: int(tx.connection.execute(statement).rowcount)) == 1

    def retry(self, lookup: Lookup, *, attempts: int, at: datetime, error: str | None) -> None:
        """Ask again at ``at`` (the log had nothing yet, or could not be read)."""
        self._write(
            lambda tx: tx.connection.execute(
                update(attribution_lookups)
                .where(attribution_lookups.c.id == lookup.id)
                .values(
                    attempts=attempts,
                    next_attempt_at=at,
                    last_error=None if error is None else error[:500],
                )
            )
        )

    def settle(self, lookup: Lookup, verdict: Verdict, now: datetime) -> bool:
        """Record the verdict (chained) and queue the event's deliveries; False when the
        lookup was settled already (by another replica)."""

        def work(tx: _Tx) -> bool:
            connection = tx.connection
            gone = connection.execute(
                delete(attribution_lookups).where(attribution_lookups.c.id == lookup.id)
            )
            if gone.rowcount != 1:
                return False
            values = {
                "event_id": lookup.event_id,
                "result": verdict.result,
                "actors": actors_json(verdict),
                "settled_at": now,
            }
            row_id = connection.execute(
                insert(attributions).values(values).returning(attributions.c.id)
            ).scalar_one()
            tx.chain_head = chain.append(connection, "attributions", {**values, "id": row_id})
            # Held deliveries go out now, with the actors; an event already sent is re-sent.
            self._queue(tx, lookup, now, held=lookup.hold_outbox)
            return True

        return self._write(work)

    def release(self, now: datetime, event_ids: Collection[int] | None = None) -> int:
        """Queue the held deliveries of lookups past their deadline (they go out with
        attribution ``pending``; the settle that follows sends the follow-ups); with
        ``event_ids``, of these events' lookups whatever their deadline."""
        if event_ids is None:
            condition = attribution_lookups.c.deadline <= now
        else:
            condition = attribution_lookups.c.event_id.in_(list(event_ids))
        late = self._lookups(condition & attribution_lookups.c.hold_outbox, limit=100)

        def work(tx: _Tx) -> int:
            released = 0
            for lookup in late:
                taken = tx.connection.execute(
                    update(attribution_lookups)
                    .where(attribution_lookups.c.id == lookup.id, attribution_lookups.c.hold_outbox)
                    .values(hold_outbox=False)
                )
                if taken.rowcount == 1:
                    self._queue(tx, lookup, now, held=True)
                    released += 1
            return released

        return self._write(work) if late else 0

    # -- internals ---------------------------------------------------------------------------

    def _queue(self, tx: _Tx, lookup: Lookup, now: datetime, *, held: bool) -> None:
        connection = tx.connection
        if held:
            queued = outbox_rows.enqueue(
                connection,
                event_id=lookup.event_id,
                kind=lookup.kind,
                severity=lookup.severity,
                routes=self._routes,
                now=now,
            )
        else:
            # Lanes (a sink's URLs) that were sent the event (or tried): a row never tried yet
            # goes out with the settled attribution anyway, so it needs no re-send.
            tried = (outbox.c.status != "pending") | (outbox.c.attempts > 0)
            sent_to = sorted(
                (row.sink, row.lane)
                for row in connection.execute(
                    select(outbox.c.sink, outbox.c.lane)
                    .where(outbox.c.event_id == lookup.event_id, tried)
                    .where(outbox.c.sink.in_(sorted(self._follow_up)))
                    .distinct()
                )
            )
            rows = [
                {
                    "event_id": lookup.event_id,
                    "sink": sink,
                    "lane": lane,
                    "status": "pending",
                    "attempts": 0,
                    "created_at": now,
                    "next_attempt_at": now,
                    "follow_up": True,
                }
                for sink, lane in sent_to
            ]
            if rows:
                connection.execute(insert(outbox), rows)
            queued = len(rows)
        tx.queued += queued

    def _lookups(self, condition: Any, *, limit: int) -> list[Lookup]:
        query = (
            select(
                attribution_lookups,
                events.c.public_id,
                events.c.kind,
                events.c.severity,
                targets.c.name,
            )
            .join(events, events.c.id == attribution_lookups.c.event_id)
            .join(targets, targets.c.id == attribution_lookups.c.target_id)
            .where(condition)
            .order_by(attribution_lookups.c.next_attempt_at, attribution_lookups.c.id)
            .limit(limit)
        )
        with connect(self.engine) as c:
            return [
                Lookup(
                    id=r.id,
                    event_id=r.event_id,
                    public_id=r.public_id,
                    target=r.name,
                    kind=r.kind,
                    severity=r.severity,
                    since=r.since,
                    until=r.until,
                    created_at=r.created_at,
                    deadline=r.deadline,
                    attempts=r.attempts,
                    next_attempt_at=r.next_attempt_at,
                    hold_outbox=bool(r.hold_outbox),
                )
                for r in c.execute(query)
            ]

    def next_due(self) -> datetime | None:
        """When the next attempt or release is due."""
        with connect(self.engine) as c:
            attempt = c.execute(select(func.min(attribution_lookups.c.next_attempt_at))).scalar()
            release = c.execute(
                select(func.min(attribution_lookups.c.deadline)).where(
                    attribution_lookups.c.hold_outbox
                )
            ).scalar()
        due = [moment for moment in (attempt, release) if moment is not None]
        return min(due, default=None)

    def _write(self, work: Callable[[_Tx], T]) -> T:
        return transaction.write(self._writer, work, on_outbox=self._on_outbox)
