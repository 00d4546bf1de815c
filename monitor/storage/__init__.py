"""Everything that speaks SQL: the schema, the engine, the write path and the read queries."""

from __future__ import annotations

from monitor.storage.engine import create_store_engine, upgrade
from monitor.storage.queries import Queries
from monitor.storage.store import FailureRecord, Store, TargetState

__all__ = ["FailureRecord", "Queries", "Store", "TargetState", "create_store_engine", "upgrade"]
