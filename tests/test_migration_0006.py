"""Migration 0006 (delivery lanes) on both databases: old outbox rows become lane 0 and are
still delivered; down again, rows of a second URL go, the rest stay."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect, text

from monitor.storage import create_store_engine, upgrade
from monitor.storage.engine import migrations_dir
from monitor.storage.lanes import LaneLeases
from monitor.storage.outbox import Outbox
from tests.test_migrations import _at_0003, _downgrade


def _below_0006() -> str:
    revision = ScriptDirectory(str(migrations_dir())).get_revision("0006")
    assert revision is not None and isinstance(revision.down_revision, str)
    return revision.down_revision


def _outbox(engine: Engine) -> list[tuple[int, str, int]]:
    with engine.connect() as c:
        rows = c.execute(text("SELECT event_id, sink, lane FROM outbox ORDER BY id")).all()
    return [(int(e), str(s), int(lane)) for e, s, lane in rows]


def test_0006_puts_old_rows_on_lane_0_and_down_again_keeps_them(db_url: str) -> None:
    t0 = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)
    _at_0003(db_url, t0)  # one pending row for sink "hook"
    engine = create_store_engine(db_url)
    upgrade(engine, _below_0006())
    upgrade(engine)  # through 0006 to the head: the outbox code below reads the head's schema
    assert "delivery_lanes" in inspect(engine).get_table_names()
    assert _outbox(engine) == [(3, "hook", 0)]
    [pending] = Outbox(engine).pending()
    assert (pending.sink, pending.lane, pending.event.row_id) == ("hook", 0, 3)
    assert Outbox(engine).due(("hook", 0), t0) == [pending], "due on its lane"
    assert LaneLeases(engine, holder="a").acquire("hook", 0, 30)

    with engine.begin() as c:  # the same event for a second URL of the sink
        c.execute(
            text(
                "INSERT INTO outbox (event_id, sink, lane, status, attempts, created_at,"
                " next_attempt_at) VALUES (3, 'hook', 1, 'pending', 0, :t, :t)"
            ),
            {"t": t0},
        )
    assert Outbox(engine).pending_counts([("hook", 0), ("hook", 1)]) == {"hook": 2}
    assert Outbox(engine).pending_count([("hook", 0)]) == 1, "a URL no longer given: not counted"

    _downgrade(engine, _below_0006())
    assert "delivery_lanes" not in inspect(engine).get_table_names()
    assert "lane" not in {c["name"] for c in inspect(engine).get_columns("outbox")}
    with engine.connect() as c:
        rows = c.execute(text("SELECT event_id, sink FROM outbox")).all()
    assert [tuple(r) for r in rows] == [(3, "hook")], "the second URL's row is gone"
    upgrade(engine)
    assert _outbox(engine) == [(3, "hook", 0)]
    engine.dispose()
