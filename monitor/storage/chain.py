"""The audit hash chain (SPEC §9): one ordered chain over snapshot and event rows.

``chain_hash(n) = sha256(chain_hash(n-1) || JCS(content(n)))`` where content is the row's
immutable fields and its position ``chain_seq``. Editing a row, swapping two rows or deleting
one breaks the chain from that row on; the ``chain_head`` row holds the last sequence number
and hash, so cutting rows off the end shows too (and the head is logged at each change, so an
outside record can prove the tail). ``last_seen_at`` and ``seen_count`` of a snapshot are
updated by every poll, and ``drift`` is the verdict against a baseline the operator may change
later (it is updated when the baseline changes); they are therefore outside the chain.

Event ids. An event has an internal integer ``id`` (order, cursors, the outbox) and a public
string id ``public_id`` (the ``id`` of the event JSON, a UUID: SQLite and PostgreSQL hand out
the integers of lost rows again after a restore from a backup, so the integer must not be the
public id). Migration 0004 gave every older event the derived id
``uuid5(UUID(database_id), f"{id}:{chain_hash}")`` (``derived_event_id``) and recorded in the
``meta`` table the database's ``database_id`` and ``string_ids_from_chain_seq``, the chain
position of the first row written after it. So event content has two forms, and a row's
position says which one it has:

* ``chain_seq < string_ids_from_chain_seq`` (chained before 0004): the content is as it was,
  with the integer ``id``, so its ``chain_hash`` and every head logged before are unchanged.
  Its string id is not in the chain; instead ``verify`` checks that it is the derived one, so
  editing it is found too (unless ``database_id`` and every old id are rewritten together,
  like any consistent rewrite of the chain).
* ``chain_seq >= string_ids_from_chain_seq``: the content's ``id`` is the string id.

Snapshot content never changed (a snapshot's public id is its hash).

Attribution rows (SPEC §11, migration 0008) join the same chain when a lookup settles, after
the event they attribute: their content is the event's row id, the result, the actors and the
time it settled. They are never updated, so an edited actor breaks the chain like an edited
event; the event row itself is never touched by attribution.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine, select, update
from sqlalchemy.engine import Connection, RowMapping
from sqlalchemy.exc import SQLAlchemyError

from monitor.core import canonical_json, snapshot_hash
from monitor.errors import StorageError
from monitor.storage.engine import describe_error
from monitor.storage.schema import attributions, chain_head, events, meta, snapshots
from monitor.timeutil import format_time

__all__ = [
    "DATABASE_ID",
    "GENESIS",
    "STRING_IDS_FROM",
    "ChainReport",
    "append",
    "attribution_content",
    "derived_event_id",
    "event_content",
    "snapshot_content",
    "verify_chain",
]

GENESIS = "0" * 64
# Keys of the ``meta`` table (migration 0004).
DATABASE_ID = "database_id"
STRING_IDS_FROM = "string_ids_from_chain_seq"


def derived_event_id(database_id: str, row_id: int, chain_hash: str | None) -> str:
    """The string id migration 0004 gave an event written before it: the same in every copy
    of one database, different between databases, and different for two events that got the
    same integer in copies that went separate ways before 0004 (their chain hashes differ)."""
    name = str(row_id) if chain_hash is None else f"{row_id}:{chain_hash}"
    return str(uuid.uuid5(uuid.UUID(database_id), name))


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


def event_content(row: RowMapping | dict[str, Any], *, string_id: bool) -> dict[str, Any]:
    """An event's chained fields; ``string_id``: the form of rows chained since migration 0004
    (the public string id), else the form before it (the integer row id)."""
    return {
        "table": "events",
        "id": row["public_id"] if string_id else row["id"],
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


def attribution_content(row: RowMapping | dict[str, Any]) -> dict[str, Any]:
    return {
        "table": "attributions",
        "id": row["id"],
        "event_id": row["event_id"],
        "result": row["result"],
        "actors": json.loads(row["actors"]),
        "settled_at": format_time(row["settled_at"]),
    }


_TABLES: Final = {"snapshots": snapshots, "events": events, "attributions": attributions}


def _content(name: str, row: Any, *, string_id: bool = True) -> dict[str, Any]:
    if name == "snapshots":
        return snapshot_content(row)
    if name == "attributions":
        return attribution_content(row)
    return event_content(row, string_id=string_id)


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
    digest = link(head.hash, seq, _content(table, row))
    connection.execute(update(chain_head).where(chain_head.c.id == 1).values(seq=seq, hash=digest))
    target = _TABLES[table]
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


@dataclass(frozen=True, slots=True)
class _Forms:
    """Which event rows chain their string id, and the database id old rows derive theirs from."""

    database_id: str
    string_ids_from: int


def _forms(connection: Connection) -> _Forms | str:
    facts = {row.key: row.value for row in connection.execute(select(meta.c.key, meta.c.value))}
    for key in (DATABASE_ID, STRING_IDS_FROM):
        if key not in facts:
            return f"the meta table has no {key} (deleted?), so event ids cannot be checked"
    try:
        uuid.UUID(facts[DATABASE_ID])
        start = int(facts[STRING_IDS_FROM])
    except ValueError:
        return "the meta table's database_id or string_ids_from_chain_seq is not valid"
    return _Forms(facts[DATABASE_ID], start)


def _walk(connection: Connection) -> ChainReport:
    head = connection.execute(select(chain_head.c.seq, chain_head.c.hash)).one()
    forms = _forms(connection)
    if isinstance(forms, str):
        return ChainReport(False, 0, GENESIS, forms)
    for name, table in _TABLES.items():
        stray = connection.execute(
            select(table.c.id).where(table.c.chain_seq.is_(None)).limit(1)
        ).first()
        if stray is not None:
            return ChainReport(False, 0, GENESIS, f"{name} id={stray.id} is outside the chain")
    previous, expected_seq = GENESIS, 1
    merged = heapq.merge(
        *(_rows(connection, table, name) for name, table in _TABLES.items()),
        key=lambda item: item[0],
    )
    for seq, name, row in merged:
        problem = _row_problem(previous, expected_seq, seq, name, row, forms)
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


def _row_problem(
    previous: str, expected: int, seq: int, name: str, row: Any, forms: _Forms
) -> str | None:
    where = f"{name} id={row['id']} (chain_seq {seq})"
    if seq != expected:
        return f"{where}: expected chain_seq {expected}; a row before it was deleted or renumbered"
    string_id = seq >= forms.string_ids_from
    content = _content(name, row, string_id=string_id)
    if link(previous, seq, content) != row["chain_hash"]:
        return f"{where}: content does not match its chain hash (edited or moved)"
    if (
        name == "events"
        and not string_id
        and row["public_id"] != derived_event_id(forms.database_id, row["id"], row["chain_hash"])
    ):
        return f"{where}: its event id is not the one derived from the database id (edited)"
    if name == "snapshots" and snapshot_hash(content["document"]) != row["hash"]:
        return f"{where}: the document does not hash to the snapshot's hash"
    return None
