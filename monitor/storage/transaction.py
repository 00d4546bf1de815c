"""One write transaction of the poll path or the attribution tables, and what its commit
announces: the audit chain head it wrote (logged, so an outside log anchors the chain's tail)
and whether it queued deliveries (the delivery worker is woken)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DataError, SQLAlchemyError

from monitor.errors import StorageError
from monitor.storage.engine import describe_error

__all__ = ["Tx", "write"]

log = logging.getLogger("monitor.storage")

T = TypeVar("T")


@dataclass(slots=True)
class Tx:
    """One write transaction, and what its commit announces: the audit chain head it wrote
    and how many deliveries it queued."""

    connection: Connection
    chain_head: tuple[int, str] | None = None
    queued: int = 0


def write(
    writer: Engine, work: Callable[[Tx], T], *, on_outbox: Callable[[], None] | None = None
) -> T:
    """Run ``work`` in one transaction of ``writer``; database errors become StorageError
    (permanent when the database refuses the data itself)."""
    try:
        with writer.connect() as connection, connection.begin():
            tx = Tx(connection)
            result = work(tx)
    except SQLAlchemyError as exc:
        raise StorageError(describe_error(exc), permanent=isinstance(exc, DataError)) from None
    if tx.chain_head is not None:
        seq, digest = tx.chain_head
        log.info("audit chain head", extra={"chain_seq": seq, "chain_hash": digest})
    if tx.queued and on_outbox is not None:
        on_outbox()
    return result
