"""DuckDB store for snapshots, alerts and feature labels (docs/design.md §5).

Why it looks the way it does:

* **One file, one writer at a time.** DuckDB lets either one read-write process *or* many
  read-only processes open a file, never both. The writer (:class:`Store`) therefore opens the
  file, runs one transaction and closes it again (milliseconds), so the dashboard's readers
  (:class:`StoreReader`, read-only, one open per call) get their turn between writes.
* **Nothing is lost when the file is busy.** If the writer cannot get the lock within a bounded
  retry budget, the write is *spooled*: serialised to one self-contained file in
  ``<db>.spool/`` (written atomically: temp file, fsync, rename). The next write,
  :meth:`Store.flush_spool` or :meth:`Store.close` applies spooled writes in order, each in its
  own transaction, before any new write; a spool file is deleted only after its transaction
  committed, and its id is recorded in that same transaction so it is applied exactly once even
  if the process dies between the commit and the delete.
* **Nothing is lost when the disk fails either.** A full disk, an I/O error or a read-only
  file system mid-run is retried like a lock: the write goes to the spool, or waits in memory
  (bounded) when the spool cannot be written either, and every later write applies what waits
  first, in order. What still waits when the store is closed is dumped to a file whose replay
  command is logged (:mod:`.replay`). Only unreadable spool files (or ones the database
  rejects) are quarantined in ``<db>.spool/failed/``; ``StoreReader.runs()`` counts each run's
  waiting writes. The start of a run (:meth:`Store.start_run`) is strict instead: a store that
  cannot be written raises :class:`StoreUnwritable` before any work.
* **Whole snapshots or none.** Every write of one snapshot (all hooks, metrics, feature tables,
  refusal features, alerts) is one transaction, so a process killed mid-write leaves the
  previous state. Re-writing ``(run, step, hook)`` replaces it (delete + insert in the same
  transaction), so resuming a run never duplicates rows.
* **Bulk, not row by row.** Feature tables are built as Arrow tables straight from the NumPy
  arrays of the :class:`~drift_monitor.records.Snapshot` and inserted with one
  ``INSERT ... SELECT`` each. The big tables (``feature_stats``, ``metrics``) have no primary key
  or index: DuckDB's ART index makes bulk inserts several times slower, and replacement is done
  by ``DELETE`` instead.
* **NaN is stored as NaN** (an IEEE value in a ``DOUBLE`` column), never converted to ``NULL``:
  a snapshot reads back bit-for-bit. ``NULL`` only means "not known" (e.g. ``rank`` of a feature
  with no refusal score). Rankings in SQL skip NaN explicitly, because DuckDB sorts NaN above
  every number.
* **Old files keep working.** The file records its schema version; the writer migrates an
  older file when it opens it, readers (who cannot) read every version from the oldest
  migratable one on (:mod:`.schema`).

Its modules, one job each, are listed once, in docs/design.md (§3, the layout).

The package imports only the standard library, NumPy, pandas, pyarrow, DuckDB,
:mod:`drift_monitor.records` and the torch-free pre-flight records
(:mod:`drift_monitor.preflight.result`, :mod:`~drift_monitor.preflight.datahash`): the
dashboard imports it and must never pull in torch.
"""

from __future__ import annotations

from drift_monitor.records import FEATURE_COLUMNS, RUN_STATUSES, RunStatus

from .errors import (
    SchemaVersionError,
    StoreEmpty,
    StoreError,
    StoreLocked,
    StoreNotFound,
    StoreUnwritable,
    is_transient,
)
from .export import EXPORT_TABLES, export_run
from .reader import TOP_BY_SQL, StoreReader
from .schema import (
    COLUMNS,
    MIGRATIONS,
    NOTIFICATION_COLUMNS,
    OLDEST_VERSION,
    PREFLIGHT_COLUMNS,
    SCHEMA_VERSION,
    VERIFICATION_COLUMNS,
    Migration,
    create_schema,
)
from .spool import QUARANTINE_HINT, SpoolNotice, SpoolState, replay_command, spool_state
from .tables import alert_id, build_feature_stats_table
from .writer import REFUSAL_TOP_N, Store, WriteOutcome

__all__ = [
    "COLUMNS",
    "EXPORT_TABLES",
    "FEATURE_COLUMNS",
    "MIGRATIONS",
    "NOTIFICATION_COLUMNS",
    "OLDEST_VERSION",
    "PREFLIGHT_COLUMNS",
    "QUARANTINE_HINT",
    "REFUSAL_TOP_N",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "TOP_BY_SQL",
    "VERIFICATION_COLUMNS",
    "Migration",
    "RunStatus",
    "SchemaVersionError",
    "SpoolNotice",
    "SpoolState",
    "Store",
    "StoreEmpty",
    "StoreError",
    "StoreLocked",
    "StoreNotFound",
    "StoreReader",
    "StoreUnwritable",
    "WriteOutcome",
    "alert_id",
    "build_feature_stats_table",
    "create_schema",
    "export_run",
    "is_transient",
    "replay_command",
    "spool_state",
]
