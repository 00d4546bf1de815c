"""The daemon's database migrated by a process of its own.

Alembic and Mako take about 13 MiB of resident memory once imported, and an import stays for
the life of the process: a daemon started on a database that needs migrating (its first start,
or the first after an upgrade) would carry them for months. ``run`` therefore migrates through
a short-lived child that imports them and exits. The child reads the storage URL from its
standard input, never from its command line (``ps`` shows that to every user), and runs
:func:`monitor.storage.engine.upgrade`; its one-line error comes back as the parent's
:class:`StorageError`, so a failed migration reads the same as one made in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Final

from monitor.errors import StorageError
from monitor.storage.engine import at_shipped_heads, create_store_engine, upgrade

__all__ = ["main", "upgrade_apart"]

_FAILED: Final = 3  # the child's exit code for a StorageError it printed


def upgrade_apart(url: str) -> None:
    """Migrate the database at ``url`` to the newest schema in a child process; nothing to do
    (and no child) when it is there already."""
    engine = create_store_engine(url)
    try:
        if at_shipped_heads(engine):
            return
    finally:
        engine.dispose()
    # The child imports this very package, wherever the parent found it (a checkout run with
    # `python -m monitor`, or an installed wheel); -P keeps the working directory out of its
    # path, so a `monitor` directory there cannot stand in for it.
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-P", "-c", "from monitor.storage.migrate_apart import main; main()"],
        input=url.encode(),
        capture_output=True,
        env={**os.environ, "PYTHONPATH": path},
        check=False,
    )
    if done.returncode == 0:
        return
    said = done.stderr.decode(errors="replace").strip().splitlines()
    if done.returncode == _FAILED and said:
        raise StorageError(said[-1])
    # Not an error of the migration's own: the child crashed. Its output is this program's
    # own (no URL is ever printed), and it is what tells why.
    sys.stderr.write(done.stderr.decode(errors="replace"))
    raise StorageError(f"migration failed: its process exited with code {done.returncode}")


def main() -> None:
    """The child: migrate the database whose URL is on standard input."""
    engine = create_store_engine(sys.stdin.read())
    try:
        upgrade(engine)
    except StorageError as exc:
        print(exc, file=sys.stderr)
        sys.exit(_FAILED)
    finally:
        engine.dispose()
