"""Table definitions, as the queries see them. Migrations (``migrations/``) create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
)

__all__ = [
    "ID",
    "UTCDateTime",
    "attribution_lookups",
    "attributions",
    "claims",
    "delivery_lanes",
    "events",
    "meta",
    "metadata",
    "poll_errors",
    "poll_state",
    "replicas",
    "snapshots",
    "targets",
]

# Stable constraint names on SQLite and PostgreSQL, so migrations can refer to them.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

# 64-bit keys on PostgreSQL; SQLite only auto-increments a column declared INTEGER.
ID = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the database keeps."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


targets = Table(
    "targets",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
)

snapshots = Table(
    "snapshots",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("target_id", ID, ForeignKey("targets.id"), nullable=False),
    Column("hash", String(71), nullable=False),
    Column("document", Text, nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("provider_type", String(64)),
    Column("drift", Boolean, nullable=False),
    Column("first_seen_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=False),
    Column("seen_count", Integer, nullable=False),
    Column("chain_seq", ID, unique=True),
    Column("chain_hash", String(64)),
    Index(None, "target_id", "first_seen_at"),
    Index(None, "hash"),
)

poll_state = Table(
    "poll_state",
    metadata,
    Column("target_id", ID, ForeignKey("targets.id"), primary_key=True),
    Column("current_snapshot_id", ID, ForeignKey("snapshots.id")),
    Column("up", Boolean),
    Column("consecutive_failures", Integer, nullable=False),
    Column("last_attempt_at", UTCDateTime()),
    Column("last_success_at", UTCDateTime()),
    Column("last_change_at", UTCDateTime()),
    Column("last_error_reason", String(32)),
    Column("last_error_status", Integer),
    Column("last_error_api_code", Integer),
    Column("last_error_message", Text),
    Column("last_error_request_id", String(128)),
    Column("last_error_at", UTCDateTime()),
)

# One row per run of identical failures, so a long outage costs one row, not one per poll.
poll_errors = Table(
    "poll_errors",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("target_id", ID, ForeignKey("targets.id"), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("http_status", Integer),
    Column("api_code", Integer),
    Column("message", Text, nullable=False),
    Column("request_id", String(128)),
    Column("first_at", UTCDateTime(), nullable=False),
    Column("last_at", UTCDateTime(), nullable=False),
    Column("count", Integer, nullable=False),
    Index(None, "target_id", "last_at"),
)

events = Table(
    "events",
    metadata,
    # Internal: order, keyset cursors, the outbox's foreign key. Never shown: after a restore
    # from a backup the database hands out the integers of lost rows again.
    Column("id", ID, primary_key=True, autoincrement=True),
    # The event's public id (the "id" of the event JSON): a UUID, never reused (migration 0004).
    Column("public_id", String(36), nullable=False, unique=True),
    Column("target_id", ID, ForeignKey("targets.id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("snapshot_hash", String(71)),
    Column("previous_hash", String(71)),
    Column("changes", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("chain_seq", ID, unique=True),
    Column("chain_hash", String(64)),
    Index(None, "target_id", "at"),
    Index(None, "at"),
)

# One row per (event, sink) to deliver; written in the transaction that wrote the event.
outbox = Table(
    "outbox",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("event_id", ID, ForeignKey("events.id"), nullable=False),
    Column("sink", String(128), nullable=False),
    # Which of the sink's URLs (0 for a sink with one): each is a lane of its own (0006).
    Column("lane", Integer, nullable=False, server_default="0"),
    Column("status", String(16), nullable=False),  # pending | delivered | rejected
    Column("attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("delivered_at", UTCDateTime()),
    Column("last_error", Text),
    # A re-send of the event once its attribution settled (SPEC §4 "follow_up"; migration 0008).
    Column("follow_up", Boolean, nullable=False, server_default=false()),
    Index(None, "status", "sink", "lane", "id"),
    Index(None, "event_id"),
)

# One row per delivery lane (sink, URL index): who may send its rows, until when on the
# database's clock (migration 0006). One holder at a time keeps a lane's order across replicas;
# a holder that dies loses the lane when its lease ends (monitor/storage/lanes.py).
delivery_lanes = Table(
    "delivery_lanes",
    metadata,
    Column("sink", String(128), primary_key=True),
    Column("lane", Integer, primary_key=True, autoincrement=False),
    Column("holder", String(128)),
    Column("lease_until", UTCDateTime()),
)

# The single row (id = 1) holding the end of the audit chain; locked by every append.
chain_head = Table(
    "chain_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", ID, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Facts about the database itself (migration 0004): ``database_id`` (a UUID) and
# ``string_ids_from_chain_seq`` (the first chain position whose event rows chain their string
# id; see monitor/storage/chain.py).
meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# The daemons sharing the database (migration 0007; PostgreSQL only, empty on SQLite): a row per
# running process, kept alive by its heartbeats until ``lease_until`` (database time).
replicas = Table(
    "replicas",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("instance", String(36), nullable=False),  # random per process: a restart is another
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("key_check", String(32), nullable=False),  # which fingerprint key it uses, not the key
    Column("started_at", UTCDateTime(), nullable=False),
    Column("heartbeat_at", UTCDateTime(), nullable=False),
    Column("lease_until", UTCDateTime(), nullable=False),
)

# Which replica polls which target, until ``lease_until``; ``epoch`` rises with every new owner,
# so a write carrying an older epoch is known to come from a replica that lost the claim.
claims = Table(
    "claims",
    metadata,
    Column("target", String(128), primary_key=True),
    Column("owner", String(128)),
    Column("epoch", BigInteger, nullable=False),
    Column("lease_until", UTCDateTime()),
    Index(None, "owner"),
)

# Who made a change (SPEC §11; migration 0008). One row per attributed event once its lookup
# settled: chained like snapshots and events, never updated (an edited actor breaks verify).
attributions = Table(
    "attributions",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("event_id", ID, ForeignKey("events.id"), nullable=False, unique=True),
    Column("result", String(16), nullable=False),  # single | ambiguous | none | unavailable
    Column("actors", Text, nullable=False),  # JSON list of the event JSON's actors
    Column("settled_at", UTCDateTime(), nullable=False),
    Column("chain_seq", ID, unique=True),
    Column("chain_hash", String(64)),
)

# An event still being attributed: written with the event, deleted when its attribution row
# is, so a restart or another replica finishes it. Outside the chain (it changes per attempt).
attribution_lookups = Table(
    "attribution_lookups",
    metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("event_id", ID, ForeignKey("events.id"), nullable=False, unique=True),
    Column("target_id", ID, ForeignKey("targets.id"), nullable=False),
    Column("since", UTCDateTime()),  # the previous sighting (None: unknown)
    Column("until", UTCDateTime(), nullable=False),  # this sighting (the event's time)
    Column("created_at", UTCDateTime(), nullable=False),
    Column("deadline", UTCDateTime(), nullable=False),  # created_at + attribution_wait
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    # The event's deliveries are not queued yet: a non-critical alert waits for its actors.
    Column("hold_outbox", Boolean, nullable=False),
    Column("last_error", Text),
    Index(None, "next_attempt_at"),
)
