"""Delivery lane leases: which process may send a lane's outbox rows, on the database clock.

A lane is one URL of one sink (``sink``, ``lane`` = the URL's index). Replicas sharing a
database each run every lane, but only the holder of a lane's lease sends its rows, oldest
first, so each row is sent once and a resolution never overtakes the alert it resolves. A
lease is a row of ``delivery_lanes`` taken with a compare-and-set ``UPDATE`` (free, expired,
or already ours), not a session lock: it survives connection pools and poolers, and a holder
that dies (SIGKILL, a lost node) loses it when ``lease_until`` passes. Times are the
database's (:func:`monitor.storage.dbclock.db_time`), never a replica's.

The same statements run on SQLite and PostgreSQL: PostgreSQL re-checks an ``UPDATE``'s
``WHERE`` after waiting for the row lock, SQLite serialises writers.
"""

from __future__ import annotations

from sqlalchemy import Engine, and_, insert, or_, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.sql import Executable

from monitor.errors import StorageError
from monitor.storage.dbclock import db_time
from monitor.storage.engine import WRITE, describe_error
from monitor.storage.schema import delivery_lanes

__all__ = ["LaneLeases"]


class LaneLeases:
    """Take, extend and give back the lease of one lane as ``holder``."""

    def __init__(self, engine: Engine, *, holder: str) -> None:
        self.holder = holder
        self._writer = engine.execution_options(**{WRITE: True})

    def acquire(self, sink: str, lane: int, seconds: float) -> bool:
        """Hold the lane for ``seconds`` from now if it is free, expired or ours already."""
        lanes = delivery_lanes.c
        take = (
            update(delivery_lanes)
            .where(
                lanes.sink == sink,
                lanes.lane == lane,
                or_(
                    lanes.holder.is_(None),
                    lanes.holder == self.holder,
                    lanes.lease_until.is_(None),
                    lanes.lease_until < db_time(),
                ),
            )
            .values(holder=self.holder, lease_until=db_time(seconds))
        )
        if self._run(take):
            return True
        # The lane's first use: its row (unless another process has just made it), then the
        # same compare-and-set.
        self._run(insert(delivery_lanes).values(sink=sink, lane=lane), exists_ok=True)
        return bool(self._run(take))

    def extend(self, sink: str, lane: int, seconds: float) -> bool:
        """Push our lease ``seconds`` past now; False if the lane is no longer ours."""
        lanes = delivery_lanes.c
        return bool(
            self._run(
                update(delivery_lanes)
                .where(and_(lanes.sink == sink, lanes.lane == lane, lanes.holder == self.holder))
                .values(lease_until=db_time(seconds))
            )
        )

    def release(self, sink: str, lane: int) -> None:
        """Give the lane back at once (a graceful stop, or nothing left to send)."""
        lanes = delivery_lanes.c
        self._run(
            update(delivery_lanes)
            .where(and_(lanes.sink == sink, lanes.lane == lane, lanes.holder == self.holder))
            .values(holder=None, lease_until=None)
        )

    def _run(self, statement: Executable, *, exists_ok: bool = False) -> int:
        try:
            with self._writer.begin() as c:
                return int(c.execute(statement).rowcount)
        except IntegrityError as exc:
            if exists_ok:
                return 0
            raise StorageError(describe_error(exc)) from None
        except SQLAlchemyError as exc:
            raise StorageError(describe_error(exc)) from None
