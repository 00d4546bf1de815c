"""The alert outbox: rows to deliver per lane, their attempts, and what is still firing.

A *lane* is one URL of one sink, ``(sink, index)``: a sink with one URL has lane 0, an
``alertmanager`` sink with ``urls = [...]`` one lane per URL, each with its own rows, so a dead
Alertmanager holds back no healthy one. Who may send a lane's rows is decided by its lease
(:mod:`monitor.storage.lanes`); this module only reads and marks rows."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Engine, and_, false, func, insert, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from monitor.core.alerting import FAMILIES, SinkRoute, firing_kind
from monitor.errors import StorageError
from monitor.storage.engine import WRITE, connect, describe_error
from monitor.storage.queries import EventView, event_select, event_view
from monitor.storage.schema import events, outbox

__all__ = ["Lane", "Outbox", "PendingDelivery", "enqueue"]

Lane = tuple[str, int]  # (sink name, index of its URL)


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    id: int
    status: str  # pending | rejected
    sink: str
    lane: int
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    event: EventView


def enqueue(
    connection: Connection,
    *,
    event_id: int,
    kind: str,
    severity: str,
    routes: Iterable[SinkRoute],
    now: datetime,
) -> int:
    """Outbox rows for every lane of every sink that wants this event, in the caller's
    transaction."""
    rows = [
        {
            "event_id": event_id,
            "sink": route.name,
            "lane": lane,
            "status": "pending",
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        }
        for route in routes
        if route.accepts(kind, severity)
        for lane in range(route.lanes)
    ]
    if rows:
        connection.execute(insert(outbox), rows)
    return len(rows)


class Outbox:
    """Reads and updates of the outbox for the delivery worker and the ``alerts`` commands."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{WRITE: True})

    def due(
        self, lane: Lane, now: datetime, limit: int = 20, *, max_wait: float | None = None
    ) -> list[PendingDelivery]:
        """The oldest pending rows of ``lane`` if its oldest is due (order is kept per lane).

        A due time more than ``max_wait`` seconds ahead (the sink's backoff cap) was stored by
        a clock that has since jumped back: it counts as due now."""
        rows = self._pending(sink=lane[0], lane=lane[1], limit=limit)
        if not rows:
            return []
        ahead = (rows[0].next_attempt_at - now).total_seconds()
        if ahead > 0 and (max_wait is None or ahead <= max_wait):
            return []
        return rows

    def pending(
        self, *, sink: str | None = None, limit: int = 1000, rejected: bool = False
    ) -> list[PendingDelivery]:
        """Rows not delivered yet; with ``rejected`` also those set aside as refused."""
        return self._pending(sink=sink, limit=limit, rejected=rejected)

    def pending_count(self, lanes: Collection[Lane]) -> int:
        """Rows still to deliver on these lanes (rows of a sink or URL no longer configured
        wait for it to come back and are not counted)."""
        return sum(self.pending_counts(lanes).values())

    def pending_counts(self, lanes: Collection[Lane]) -> dict[str, int]:
        """Rows still to deliver on these lanes, per sink (0 for a sink with none): the
        metrics keep the sink's name, whatever its URLs."""
        with self._connect() as c:
            rows = c.execute(
                select(outbox.c.sink, func.count())
                .where(outbox.c.status == "pending", _on_lanes(lanes))
                .group_by(outbox.c.sink)
            ).all()
        counts = dict.fromkeys((sink for sink, _ in lanes), 0)
        counts.update({sink: int(count) for sink, count in rows})
        return counts

    def next_due(self, lanes: Collection[Lane]) -> datetime | None:
        """When the next delivery attempt is due: the earliest *head* of a lane's queue (rows
        behind a lane's oldest wait for it, whatever their own time says)."""
        heads = []
        with self._connect() as c:
            for sink, lane in lanes:
                head = c.execute(
                    select(outbox.c.next_attempt_at)
                    .where(
                        outbox.c.status == "pending",
                        outbox.c.sink == sink,
                        outbox.c.lane == lane,
                    )
                    .order_by(outbox.c.id)
                    .limit(1)
                ).scalar()
                if head is not None:
                    heads.append(head)
        return min(heads, default=None)

    def routed(self, sink: str, event_ids: Collection[int]) -> set[int]:
        """Which of these events were ever queued for ``sink``."""
        if not event_ids:
            return set()
        with self._connect() as c:
            return set(
                c.execute(
                    select(outbox.c.event_id).where(
                        outbox.c.sink == sink, outbox.c.event_id.in_(list(event_ids))
                    )
                ).scalars()
            )

    # The marks below change a row only while it is pending: a holder that lost its lane
    # mid-send must not undo what the new holder did with the row.

    def delivered(self, row_id: int, now: datetime) -> None:
        self._write(
            update(outbox)
            .where(outbox.c.id == row_id, outbox.c.status == "pending")
            .values(
                status="delivered",
                delivered_at=now,
                attempts=outbox.c.attempts + 1,
                last_error=None,
            )
        )

    def failed(self, row_id: int, error: str, retry_at: datetime) -> None:
        self._write(
            update(outbox)
            .where(outbox.c.id == row_id, outbox.c.status == "pending")
            .values(
                attempts=outbox.c.attempts + 1, last_error=error[:500], next_attempt_at=retry_at
            )
        )

    def rejected(self, row_id: int, error: str, now: datetime) -> None:
        """Set aside a row its sink keeps refusing, so the rows behind it can go."""
        self._write(
            update(outbox)
            .where(outbox.c.id == row_id, outbox.c.status == "pending")
            .values(
                status="rejected",
                attempts=outbox.c.attempts + 1,
                last_error=error[:500],
                next_attempt_at=now,
            )
        )

    def retry_now(self, now: datetime, *, sink: str | None = None) -> int:
        """Make pending and rejected rows due at once (operators, after fixing a sink)."""
        query = (
            update(outbox)
            .where(outbox.c.status.in_(("pending", "rejected")))
            .values(status="pending", next_attempt_at=now)
        )
        if sink is not None:
            query = query.where(outbox.c.sink == sink)
        return self._write(query)

    def firing(self, *, since_one_off: datetime) -> list[EventView]:
        """Alerts in force: per target, the latest event of each family when it is the firing
        kind, plus one-off notices newer than ``since_one_off``."""
        kinds = [*FAMILIES, *FAMILIES.values()]
        latest = (
            select(func.max(events.c.id).label("id"))
            .where(events.c.kind.in_(kinds))
            .group_by(events.c.target_id, events.c.kind)
        )
        with self._connect() as c:
            ids = list(c.execute(latest).scalars())
            rows = (
                [
                    event_view(r._mapping)
                    for r in c.execute(event_select().where(events.c.id.in_(ids)))
                ]
                if ids
                else []
            )
            recent = [
                event_view(r._mapping)
                for r in c.execute(
                    event_select()
                    .where(and_(events.c.at >= since_one_off, events.c.kind.not_in(kinds)))
                    .order_by(events.c.id)
                )
            ]
        newest: dict[tuple[str, str], EventView] = {}
        for row in rows:
            key = (row.target, firing_kind(row.kind))
            if key not in newest or row.row_id > newest[key].row_id:
                newest[key] = row
        firing = [row for row in newest.values() if row.kind in FAMILIES]
        return sorted(firing, key=lambda r: r.row_id) + recent

    def last_delivery(self, lane: Lane, event_id: int) -> tuple[str, datetime | None] | None:
        with self._connect() as c:
            row = c.execute(
                select(outbox.c.status, outbox.c.delivered_at)
                .where(
                    outbox.c.sink == lane[0],
                    outbox.c.lane == lane[1],
                    outbox.c.event_id == event_id,
                )
                .order_by(outbox.c.id.desc())
                .limit(1)
            ).first()
        return (row.status, row.delivered_at) if row is not None else None

    def requeue(self, lane: Lane, event_id: int, now: datetime) -> None:
        self._write(
            insert(outbox).values(
                event_id=event_id,
                sink=lane[0],
                lane=lane[1],
                status="pending",
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
        )

    def _pending(
        self, *, sink: str | None, limit: int, rejected: bool = False, lane: int | None = None
    ) -> list[PendingDelivery]:
        statuses = ("pending", "rejected") if rejected else ("pending",)
        query = (
            event_select()
            .add_columns(
                outbox.c.id.label("outbox_id"),
                outbox.c.status.label("outbox_status"),
                outbox.c.sink,
                outbox.c.lane,
                outbox.c.attempts,
                outbox.c.next_attempt_at,
                outbox.c.last_error,
                outbox.c.follow_up.label("outbox_follow_up"),  # read by event_view
            )
            .join(outbox, outbox.c.event_id == events.c.id)
            .where(outbox.c.status.in_(statuses))
            .order_by(outbox.c.id)
            .limit(limit)
        )
        if sink is not None:
            query = query.where(outbox.c.sink == sink)
        if lane is not None:
            query = query.where(outbox.c.lane == lane)
        with self._connect() as c:
            return [
                PendingDelivery(
                    id=r.outbox_id,
                    status=r.outbox_status,
                    sink=r.sink,
                    lane=r.lane,
                    attempts=r.attempts,
                    next_attempt_at=r.next_attempt_at,
                    last_error=r.last_error,
                    event=event_view(r._mapping),
                )
                for r in c.execute(query)
            ]

    def _connect(self) -> AbstractContextManager[Connection]:
        return connect(self.engine)

    def _write(self, statement: object) -> int:
        try:
            with self._writer.begin() as c:
                return int(c.execute(statement).rowcount)  # type: ignore[call-overload]
        except SQLAlchemyError as exc:
            raise StorageError(describe_error(exc)) from None


def _on_lanes(lanes: Collection[Lane]) -> ColumnElement[bool]:
    """Rows of these lanes (a sink's lanes are 0 to n-1: one bound per sink)."""
    last: dict[str, int] = {}
    for sink, lane in lanes:
        last[sink] = max(lane, last.get(sink, -1))
    if not last:
        return false()
    return or_(*(and_(outbox.c.sink == s, outbox.c.lane <= n) for s, n in last.items()))
