"""The audit hash chain (SPEC §9): one ordered chain over snapshot and event rows.

``chain_hash(n) = sha256(chain_hash(n-1) || JCS(content(n)))`` where content is the row's
immutable fields and its position ``chain_seq``. Editing a row, swapping two rows or deleting
one breaks the chain from that row on; the ``chain_head`` row holds the last sequence number
and hash, so cutting rows off the end shows too (and the head is logged at each change, so an
outside record can prove the tail). ``last_seen_at`` and ``seen_count`` of a snapshot are
updated by every poll, and ``drift`` is the verdict against a baseline the operator may change
later (it is updated when the baseline changes); they are therefore outside the chain.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import SQLAlchemyError

from monitor.core import canonical_json, snapshot_hash
from monitor.errors import StorageError
from monitor.storage.engine import describe_error
from monitor.storage.schema import chain_head, events, snapshots
from monitor.timeutil import format_time

__all__ = ["GENESIS", "ChainReport", "append", "event_content", "snapshot_content", "verify_chain"]

GENESIS = "0" * 64


def snapshot_content(row: RowMapping | dict[str, Any]) -> dict[str, Any]:
    return {
        "table": "snapshots",
        "id": row["id"],
        "target_id": row["target_id"],
        "hash": row["hash"],
        "document": json.loads(row["document"]),
        "enabled": bool(row["enabled"]),
        "provider_type": row["provider_type"],
        "first_seen_at": format_time(row["first_seen_at"]),
    }


def event_content(row: RowMapping | dict[str, Any]) -> dict[str, Any]:
    return {
        "table": "events",
        "id": row["id"],
        "target_id": row["target_id"],
        "kind": row["kind"],
        "severity": row["severity"],
        "status": row["status"],
        "at": format_time(row["at"]),
        "snapshot_hash": row["snapshot_hash"],
        "previous_hash": row["previous_hash"],
        "changes": json.loads(row["changes"]),
        "message": row["message"],
    }


def link(previous: str, seq: int, content: dict[str, Any]) -> str:
    body = canonical_json({"seq": seq, "row": content})
    return hashlib.sha256(previous.encode() + body).hexdigest()


def append(connection: Connection, table: str, row: dict[str, Any]) -> tuple[int, str]:
    """Give a just-inserted row its place in the chain; the caller's transaction commits it.

    The head row is locked (FOR UPDATE on PostgreSQL; SQLite writers are serialised by
    BEGIN IMMEDIATE), so two writers racing cannot fork the chain.
    """
    head = connection.execute(
        select(chain_head.c.seq, chain_head.c.hash).where(chain_head.c.id == 1).with_for_update()
    ).one()
    seq = head.seq + 1
    content = snapshot_content(row) if table == "snapshots" else event_content(row)
    digest = link(head.hash, seq, content)
    connection.execute(update(chain_head).where(chain_head.c.id == 1).values(seq=seq, hash=digest))
    target = snapshots if table == "snapshots" else events
    connection.execute(
        update(target).where(target.c.id == row["id"]).values(chain_seq=seq, chain_hash=digest)
    )
    return seq, digest


@dataclass(frozen=True, slots=True)
class ChainReport:
    intact: bool
    rows: int
    head: str
    problem: str | None = None

    def describe(self) -> str:
        if self.intact:
            return f"audit chain intact: {self.rows} rows checked, head {self.head}"
        return f"audit chain BROKEN after {self.rows} good rows: {self.problem}"


def _rows(connection: Connection, table: Any, name: str) -> Iterator[tuple[int, str, Any]]:
    result = connection.execution_options(yield_per=2000).execute(
        select(table).where(table.c.chain_seq.is_not(None)).order_by(table.c.chain_seq)
    )
    for row in result.mappings():
        yield row["chain_seq"], name, row


def verify_chain(engine: Engine) -> ChainReport:
    """Walk the chain in order and name the first row that does not match.

    Runs in one read transaction (REPEATABLE READ on PostgreSQL, a WAL read snapshot on
    SQLite), so rows the daemon appends meanwhile are not mistaken for tampering.
    """
    options = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
    try:
        with engine.connect().execution_options(**options) as connection, connection.begin():
            return _walk(connection)
    except SQLAlchemyError as exc:
        raise StorageError(describe_error(exc)) from None


def _walk(connection: Connection) -> ChainReport:
    head = connection.execute(select(chain_head.c.seq, chain_head.c.hash)).one()
    for table, name in ((snapshots, "snapshots"), (events, "events")):
        stray = connection.execute(
            select(table.c.id).where(table.c.chain_seq.is_(None)).limit(1)
        ).first()
        if stray is not None:
            return ChainReport(False, 0, GENESIS, f"{name} id={stray.id} is outside the chain")
    previous, expected_seq = GENESIS, 1
    merged = heapq.merge(
        _rows(connection, snapshots, "snapshots"),
        _rows(connection, events, "events"),
        key=lambda item: item[0],
    )
    for seq, name, row in merged:
        problem = _row_problem(previous, expected_seq, seq, name, row)
        if problem is not None:
            return ChainReport(False, expected_seq - 1, previous, problem)
        previous, expected_seq = row["chain_hash"], seq + 1
    checked = expected_seq - 1
    if head.seq != checked or head.hash != previous:
        problem = (
            f"chain head records {head.seq} rows ending in {head.hash}, found {checked}: "
            "rows at the end were deleted"
        )
        return ChainReport(False, checked, previous, problem)
    return ChainReport(True, checked, previous)


def _row_problem(previous: str, expected: int, seq: int, name: str, row: Any) -> str | None:
    where = f"{name} id={row['id']} (chain_seq {seq})"
    if seq != expected:
        return f"{where}: expected chain_seq {expected}; a row before it was deleted or renumbered"
    content = snapshot_content(row) if name == "snapshots" else event_content(row)
    if link(previous, seq, content) != row["chain_hash"]:
        return f"{where}: content does not match its chain hash (edited or moved)"
    if name == "snapshots" and snapshot_hash(content["document"]) != row["hash"]:
        return f"{where}: the document does not hash to the snapshot's hash"
    return None
