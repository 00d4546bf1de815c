"""The database's clock in SQL, for leases every process must agree on (SPEC §10).

Replicas' own clocks drift apart; a lease compared with one of them can be taken over early
or held too long. ``db_time(seconds)`` is the database's current time plus ``seconds``,
evaluated by the server in the statement that uses it, so every comparison and every stored
lease end uses one clock. On PostgreSQL it is ``statement_timestamp()`` (not ``now()``, which
stands still for a whole transaction); on SQLite ``strftime('%Y-%m-%d %H:%M:%f', 'now', ...)``
in the text form the schema's UTC columns are stored in, so comparisons with them hold.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Float, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from monitor.storage.schema import UTCDateTime

__all__ = ["db_time"]


class db_time(FunctionElement[datetime]):  # lower case: it reads as a SQL function
    """The database's time now, plus ``seconds`` (may be negative)."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0) -> None:
        super().__init__(literal(float(seconds), Float()))


@compiles(db_time, "postgresql")
def _postgresql(element: db_time, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(statement_timestamp() + make_interval(secs => {seconds}))"


@compiles(db_time, "sqlite")
def _sqlite(element: db_time, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {seconds}))"
