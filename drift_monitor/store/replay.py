"""Load the writes a run could not store back into its database: a dump file, or the spool.

Why a command of its own: when a run ends while its database cannot be written (a full disk,
a read-only file system), :meth:`Store.close <drift_monitor.store.Store.close>` dumps what
still waits in memory to a file and logs the exact command (:func:`~.spool.replay_command`)::

    python -m drift_monitor.store.replay /out/drift.duckdb.<run>-<time>.unsaved.zip --db /data/drift.duckdb

Each write carries its id and is applied exactly once (``_spool_applied``), so replaying a
file twice, or a file whose writes partly reached the database, stores nothing twice. The
writes go through the spool of ``--db``: if the database is still busy or failing they wait
there (applied by the next write, or by running this again) and the command says so.
Without a file it applies the spool alone. Exit status: 0 when nothing waits any more, 1 when
writes still wait, 2 for an unreadable file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .spool import CorruptSpoolFile, read_dump, spool_state
from .writer import Store


@dataclass
class ReplayReport:
    """What a replay did: writes read from the dump, applied now, still waiting, quarantined."""

    read: int
    applied: int
    waiting: int
    quarantined: int

    def summary(self, db: str | Path) -> str:
        return (f"{db}: {self.read} writes read, {self.applied} applied, {self.waiting} still waiting"
                + (f", {self.quarantined} quarantined (see drift-monitor runs)" if self.quarantined else ""))


def replay(db: str | Path, dump: str | Path | None = None, *, timeout_s: float = 10.0) -> ReplayReport:
    """Apply ``dump`` (a dump file; None: only the spool) to ``db``. The dump file is deleted
    once every write in it is in the database (its writes are then in the spool or applied)."""
    if dump is not None and not Path(dump).is_file():
        raise CorruptSpoolFile(f"{dump}: no such dump file; give the .unsaved.zip path the run's log names")
    store = Store(db, retry_timeout_s=timeout_s)
    ops = read_dump(Path(dump)) if dump is not None else []
    for op in ops:
        store.spool.put(op)
    applied = store.flush_spool(timeout_s=timeout_s)
    state = spool_state(db)
    if dump is not None and not store.spool.pending():
        Path(dump).unlink()
    return ReplayReport(len(ops), applied, len(store.spool.pending()), len(state.quarantined))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m drift_monitor.store.replay",
                                description="Load writes a run could not store (a dump file, or the spool) into "
                                            "its drift-monitor database.")
    p.add_argument("dump", nargs="?", help="the .unsaved.zip file the run's log names (omit: apply the spool)")
    p.add_argument("--db", required=True, help="the DuckDB file to load into")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a busy database")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        r = replay(args.db, args.dump, timeout_s=args.timeout)
    except (CorruptSpoolFile, FileNotFoundError) as e:
        print(f"drift-monitor replay: error: {e}", file=sys.stderr)
        return 2
    print(r.summary(args.db))
    return 0 if r.waiting == 0 else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
