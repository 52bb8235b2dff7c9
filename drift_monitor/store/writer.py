"""The writer: :class:`Store` turns runs, snapshots, alerts, labels and verify results into rows.

Why it opens and closes the file on every write: DuckDB admits one read-write process *or* many
read-only ones, so a writer holding the file would lock the dashboard out for the whole run.
Each write opens the file, applies any spooled writes, applies its own write in one transaction
(a snapshot's hooks, metrics, feature tables and alerts commit together or not at all) and
closes it again, milliseconds later. Opening is also where an older file is migrated to the
current schema (:mod:`.schema`). If the file stays busy, the write goes to the spool
(:mod:`.spool`) instead of stalling training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb
import pandas as pd
import pyarrow as pa

from drift_monitor.records import Alert, Snapshot, VerifyResult

from .connection import _connect, _path_lock, _transaction
from .errors import StoreLocked
from .ops import _APPLY, _Op
from .schema import _upgrade_schema
from .spool import _Spool
from .tables import (
    _alert_payload,
    _labels_table,
    _metrics_table,
    _refusal_table,
    _snapshots_table,
    _ts,
    _verification_table,
    build_feature_stats_table,
)

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger(__name__)

#: Default number of refusal features stored per (step, hook), besides every emerging one.
REFUSAL_TOP_N = 200

RunStatus = Literal["running", "finished", "failed"]
WriteOutcome = Literal["committed", "spooled"]


class _Opening:
    """Opens the store on a helper thread while the caller builds the write's Arrow tables.

    Why: opening a DuckDB file is ~12 ms of set-up that releases the GIL, and building a
    131k-feature table is ~20 ms of NumPy copying; overlapping them takes the smaller off every
    write (the training process is waiting). The connection is handed back to the caller's
    thread and used there only.
    """

    def __init__(self, open_fn: Callable[[], duckdb.DuckDBPyConnection]):
        self._con: duckdb.DuckDBPyConnection | None = None
        self._exc: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(open_fn,), name="drift-monitor-store-open", daemon=True)
        self._thread.start()

    def _run(self, open_fn: Callable[[], duckdb.DuckDBPyConnection]) -> None:
        try:
            self._con = open_fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._exc = exc

    def result(self) -> duckdb.DuckDBPyConnection:
        self._thread.join()
        if self._exc is not None:
            raise self._exc
        assert self._con is not None
        return self._con

    def discard(self) -> None:
        """Close the connection if it opened (the caller failed before using it)."""
        with contextlib.suppress(BaseException):
            self.result().close()


class Store:
    """The writer side: runs, snapshots, alerts and labels into one DuckDB file.

    Each public write opens the file, applies pending spooled writes, applies its own write in one
    transaction and closes the file again. If the file stays locked for ``retry_timeout_s``
    (a reader, or another writer), the write is spooled to ``spool_dir`` (default
    ``<path>.spool``) and the call returns ``"spooled"`` instead of blocking training.

    ``run_id``/``run_name``: the run later writes belong to (``start_run`` sets it too).
    ``retry_timeout_s``: how long a write waits for a busy file before spooling (keep it short:
    it is training time). ``store_dead_features``: also store features that fired in neither
    model (by default their rows are left out; a missing row means "never fired").
    ``refusal_top_n``: refusal features kept per (step, hook), besides every emerging one.

    Errors that retrying cannot fix (a file of another schema version, a file that is not a
    DuckDB database, a malformed snapshot) raise at once and nothing is spooled: spooling
    them would only postpone the same failure.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        run_id: str | None = None,
        run_name: str | None = None,
        *,
        retry_timeout_s: float = 2.0,
        spool_dir: str | os.PathLike[str] | None = None,
        store_dead_features: bool = False,
        refusal_top_n: int = REFUSAL_TOP_N,
    ):
        self.path = Path(path)
        self.run_id = run_id
        self.run_name = run_name
        self.retry_timeout_s = float(retry_timeout_s)
        self.store_dead_features = store_dead_features
        self.refusal_top_n = int(refusal_top_n)
        self.spool = _Spool(Path(spool_dir) if spool_dir is not None else Path(f"{self.path}.spool"))
        self._lock = _path_lock(self.path)

    # -- runs -----------------------------------------------------------------------------

    def start_run(
        self,
        name: str | None = None,
        model: str | None = None,
        config: Mapping[str, Any] | None = None,
        probe_hash: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a run (or resume it, if the id exists: status back to 'running') and return its id.

        The id is ``run_id``, else the one given to the constructor, else a fresh uuid4 hex.
        ``None`` fields keep their stored values on resume.
        """
        rid = run_id or self.run_id or uuid.uuid4().hex
        self.run_id = rid
        payload = {
            "run_id": rid, "name": name or self.run_name, "model": model,
            "config_json": json.dumps(dict(config), sort_keys=True, default=str) if config is not None else None,
            "probe_hash": probe_hash, "t": time.time(),
        }
        self._submit(_Op("start_run", payload))
        return rid

    def finish_run(self, status: RunStatus = "finished", run_id: str | None = None) -> WriteOutcome:
        """Record the run's end state, so the dashboard can tell live runs from dead ones."""
        if status not in ("running", "finished", "failed"):
            raise ValueError(f"run status must be 'running', 'finished' or 'failed', got {status!r}")
        return self._submit(_Op("finish_run", {"run_id": self._run(run_id), "status": status, "t": time.time()}))

    # -- snapshots and alerts ------------------------------------------------------------------

    def write(self, snapshot: Snapshot, alerts: Iterable[Alert] = (), run_id: str | None = None) -> WriteOutcome:
        """Store a snapshot (all its hooks) and its alerts in one transaction.

        Returns ``"committed"`` or ``"spooled"`` (the file was busy; the write is on disk and will
        be applied, in order, by the next write, :meth:`flush_spool` or :meth:`close`).
        """
        rid = self._run(run_id)
        alerts = list(alerts)
        return self._submit(lambda: self._snapshot_op(snapshot, alerts, rid))

    def _snapshot_op(self, snapshot: Snapshot, alerts: Iterable[Alert], run_id: str) -> _Op:
        features = build_feature_stats_table(snapshot, run_id, self.store_dead_features)
        metrics = _metrics_table(snapshot, run_id)
        refusal = _refusal_table(snapshot, run_id, self.refusal_top_n)
        snaps = _snapshots_table(snapshot, run_id, features, metrics, refusal)
        payload = {
            "run_id": run_id, "step": int(snapshot.step), "hooks": list(snapshot.hooks),
            "probe_hash": snapshot.probe_hash, "t": time.time(),
            "alerts": [_alert_payload(run_id, a) for a in alerts],
        }
        tables = {"feature_stats": features, "metrics": metrics, "refusal_features": refusal, "snapshots": snaps}
        return _Op("snapshot", payload, tables)

    def write_alerts(self, alerts: Iterable[Alert], run_id: str | None = None) -> WriteOutcome:
        """Store alerts that come with no snapshot (e.g. a monitor error), in one transaction."""
        rid = self._run(run_id)
        return self._submit(_Op("alerts", {"run_id": rid, "t": time.time(),
                                           "alerts": [_alert_payload(rid, a) for a in alerts]}))

    def acknowledge_alert(self, alert_id: str) -> WriteOutcome:
        """Mark an alert acknowledged (it stays active until its rule resolves it).

        Raises ``KeyError`` for an unknown id when applied at once.
        """
        return self._submit(_Op("ack_alert", {"alert_id": alert_id, "t": time.time()}))

    def write_verification(self, result: VerifyResult) -> WriteOutcome:
        """Store a ``drift-monitor verify`` results table (one transaction; re-writing replaces it)."""
        payload = {"verify_id": result.verify_id, "run_id": result.run_id, "t": time.time()}
        return self._submit(_Op("verification", payload, {"verifications": _verification_table(result)}))

    # -- labels ------------------------------------------------------------------------------

    def import_labels(
        self, hook: str, labels: Mapping[int, str] | pd.DataFrame, source: str = "manual"
    ) -> WriteOutcome:
        """Set feature explanations for ``hook``: ``{feature: label}`` or a DataFrame with
        ``feature`` and ``label`` columns. Replaces existing labels of those features only."""
        table = _labels_table(hook, labels, source)
        return self._submit(_Op("labels", {"hook": hook, "source": source}, {"feature_labels": table}))

    # -- spool and lifecycle --------------------------------------------------------------------

    def pending(self) -> int:
        """Number of spooled writes not yet in the database."""
        return len(self.spool.pending())

    def flush_spool(self, timeout_s: float | None = None) -> int:
        """Apply spooled writes now; returns how many were applied (0 if the file is still busy)."""
        if not self.spool.pending():
            return 0
        with self._lock:
            try:
                con = self._open(self.retry_timeout_s if timeout_s is None else timeout_s)
            except StoreLocked as exc:
                log.warning("drift-monitor: %d spooled writes still pending: %s", self.pending(), exc)
                return 0
            try:
                return self._flush_spool(con)
            finally:
                con.close()

    def close(self) -> None:
        """Flush the spool; what cannot be flushed stays on disk for the next Store on this path."""
        self.flush_spool()
        if self.pending():
            log.warning("drift-monitor: %d writes left in %s; the next Store on %s applies them",
                        self.pending(), self.spool.dir, self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _run(self, run_id: str | None) -> str:
        rid = run_id or self.run_id
        if not rid:
            raise ValueError("no run: call start_run() first, or pass run_id (to Store() or to this call)")
        return rid

    def _open(self, timeout_s: float) -> duckdb.DuckDBPyConnection:
        """Open read-write with retry and make the schema current: created in a new file,
        migrated in an older one, refused (:class:`SchemaVersionError`) in one too new."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = _connect(self.path, read_only=False, timeout_s=timeout_s)
        try:
            _upgrade_schema(con, self.path)
        except BaseException:
            con.close()
            raise
        return con

    def _submit(self, op_or_builder: _Op | Callable[[], _Op]) -> WriteOutcome:
        """Apply one write now (after the spool), or spool it if the file stays busy.

        A snapshot's Arrow tables are built (``op_or_builder`` callable) while the file is being
        opened on a helper thread: see :class:`_Opening`.
        """
        with self._lock:
            # While earlier writes wait in the spool the file was busy a moment ago: try once,
            # briefly, rather than stall training for the full retry budget at every write.
            budget = self.retry_timeout_s if not self.spool.pending() else min(self.retry_timeout_s, 0.1)
            opening = _Opening(lambda: self._open(budget))
            try:
                op = op_or_builder() if callable(op_or_builder) else op_or_builder
            except BaseException:
                opening.discard()
                raise
            try:
                con = opening.result()
            except StoreLocked as exc:
                where = self.spool.put(op)
                log.warning("drift-monitor: %s busy, %s write spooled to %s (%s)", self.path, op.kind, where, exc)
                return "spooled"
            try:
                self._flush_spool(con)
                with _transaction(con):
                    _APPLY[op.kind](con, op)
            finally:
                con.close()
            return "committed"

    def _flush_spool(self, con: duckdb.DuckDBPyConnection) -> int:
        """Apply every spooled write in order, each exactly once, each in its own transaction."""
        applied = 0
        for path in self.spool.pending():
            try:
                op = self.spool.load(path)
            except FileNotFoundError:
                continue  # another writer applied and removed it meanwhile
            except Exception as exc:  # noqa: BLE001 - a corrupt file must not block the queue forever
                self.spool.quarantine(path, exc)
                continue
            try:
                with _transaction(con):
                    done = con.execute("SELECT count(*) FROM _spool_applied WHERE op_id = ?", [op.op_id]).fetchall()
                    if not done[0][0]:
                        _APPLY[op.kind](con, op)
                        con.execute(
                            "INSERT INTO _spool_applied VALUES (?, ?)", [op.op_id, _ts(time.time())]
                        ).fetchall()
            except (duckdb.Error, ValueError, KeyError, pa.ArrowException) as exc:
                self.spool.quarantine(path, exc)
                continue
            path.unlink(missing_ok=True)
            applied += 1
        return applied
