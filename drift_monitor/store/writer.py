"""The writer: :class:`Store` turns runs, snapshots, alerts, labels, verify and pre-flight results into rows.

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
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb
import pandas as pd
import pyarrow as pa

from drift_monitor.errors import first_line
from drift_monitor.preflight.result import PreflightResult
from drift_monitor.records import RUN_STATUSES, Alert, RunStatus, Snapshot, VerifyResult

from .connection import connect_file, path_lock, transaction
from .dataset import refuse_write
from .errors import StoreLocked, StoreUnwritable, is_transient
from .ops import APPLY, Op, apply_once
from .schema import upgrade_schema
from .spool import DUMP_SUFFIX, CorruptSpoolFile, Spool, replay_command, spool_dir_of, write_dump
from .tables import (
    alert_payload,
    build_feature_stats_table,
    labels_table,
    metrics_table,
    preflight_table,
    refusal_table,
    residual_table,
    snapshots_table,
    verification_table,
)

if TYPE_CHECKING:
    from typing import Self

log = logging.getLogger(__name__)

#: Default number of refusal features stored per (step, hook), besides every emerging one.
REFUSAL_TOP_N = 200

#: ``committed``: in the database. ``spooled``: on disk in the spool, applied by the next write.
#: ``queued``: in memory only (the database and the spool both failed); retried at every later
#: write, and dumped to a file by :meth:`Store.close` if it still cannot be written.
WriteOutcome = Literal["committed", "spooled", "queued"]

#: Default bound of the in-memory queue (bytes of Arrow tables); beyond it the oldest writes
#: are dumped to a file at once.
MAX_QUEUE_BYTES = 256 << 20


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

    Errors that retrying can fix (:func:`~.errors.is_transient`: a lock, a full disk, an I/O
    error, a read-only file system) never lose a write. The write goes to the spool; if the
    spool cannot be written either (it lives beside the database, usually on the same full
    disk) it waits in memory (``max_queue_bytes``; beyond that the oldest are dumped to a
    file). Every later write first applies what waits, in order. :meth:`close` writes what
    still waits in memory to a *dump file* beside the database (else in ``fallback_dirs``, else
    the temp folder) and logs the command that loads it (:func:`replay_command`).
    ``failure`` is the last non-lock error while writes are failing (None once the store
    works), ``unsaved`` the dump files written, ``lost`` writes that could not be kept
    anywhere (each logged as an error).
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
        max_queue_bytes: int = MAX_QUEUE_BYTES,
        fallback_dirs: Sequence[str | os.PathLike[str]] = (),
    ):
        refuse_write(path, "this would write to it")  # an archive (store.dataset), never a write target
        self.path = Path(path)
        self.run_id = run_id
        self.run_name = run_name
        self.retry_timeout_s = float(retry_timeout_s)
        self.store_dead_features = store_dead_features
        self.refusal_top_n = int(refusal_top_n)
        self.spool = Spool(Path(spool_dir) if spool_dir is not None else spool_dir_of(self.path))
        self._lock = path_lock(self.path)
        self.max_queue_bytes = int(max_queue_bytes)
        self.fallback_dirs = [Path(d) for d in fallback_dirs]
        self._queue: deque[Op] = deque()  # writes neither in the database nor on disk, in order
        self.failure: BaseException | None = None
        self.unsaved: list[Path] = []
        self.lost = 0

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
        ``None`` fields keep their stored values on resume. This is the start of a run, so a
        store that cannot be written (read-only file system, full disk, a directory in the way)
        raises :class:`StoreUnwritable` here, before any work, instead of queueing; a busy file
        (a reader) still spools.
        """
        rid = run_id or self.run_id or uuid.uuid4().hex
        self.run_id = rid
        payload = {
            "run_id": rid, "name": name or self.run_name, "model": model,
            "config_json": json.dumps(dict(config), sort_keys=True, default=str) if config is not None else None,
            "probe_hash": probe_hash, "t": time.time(),
        }
        self._submit(Op("start_run", payload), strict=True)
        return rid

    def finish_run(self, status: RunStatus = "finished", run_id: str | None = None) -> WriteOutcome:
        """Record the run's end state, so the dashboard can tell live runs from dead ones."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}; got {status!r}")
        return self._submit(Op("finish_run", {"run_id": self._run(run_id), "status": status, "t": time.time()}))

    # -- snapshots and alerts ------------------------------------------------------------------

    def write(self, snapshot: Snapshot, alerts: Iterable[Alert] = (), run_id: str | None = None, *,
              notifications: Iterable[Mapping[str, Any]] = ()) -> WriteOutcome:
        """Store a snapshot (all its hooks) and its alerts in one transaction.

        ``notifications``: delivery states of alert notifications (``Notification.row()``) that
        ride along, so that tracking them costs a training step no write of its own.

        Returns ``"committed"`` or ``"spooled"`` (the file was busy; the write is on disk and will
        be applied, in order, by the next write, :meth:`flush_spool` or :meth:`close`).
        """
        rid = self._run(run_id)
        alerts = list(alerts)
        rows = [dict(r) for r in notifications]
        return self._submit(lambda: self._snapshot_op(snapshot, alerts, rid, rows))

    def _snapshot_op(self, snapshot: Snapshot, alerts: Iterable[Alert], run_id: str,
                     notifications: list[dict[str, Any]] | None = None) -> Op:
        features = build_feature_stats_table(snapshot, run_id, self.store_dead_features)
        metrics = metrics_table(snapshot, run_id)
        refusal = refusal_table(snapshot, run_id, self.refusal_top_n)
        snaps = snapshots_table(snapshot, run_id, features, metrics, refusal)
        payload = {
            "run_id": run_id, "step": int(snapshot.step), "hooks": list(snapshot.hooks),
            "probe_hash": snapshot.probe_hash, "t": time.time(),
            "alerts": [alert_payload(run_id, a) for a in alerts],
        }
        if notifications:
            payload["notifications"] = notifications
        tables = {"feature_stats": features, "metrics": metrics, "refusal_features": refusal, "snapshots": snaps,
                  "residual_directions": residual_table(snapshot, run_id)}
        return Op("snapshot", payload, tables)

    def write_alerts(self, alerts: Iterable[Alert], run_id: str | None = None) -> WriteOutcome:
        """Store alerts that come with no snapshot (e.g. a monitor error), in one transaction."""
        rid = self._run(run_id)
        return self._submit(Op("alerts", {"run_id": rid, "t": time.time(),
                                           "alerts": [alert_payload(rid, a) for a in alerts]}))

    def write_notifications(self, rows: Iterable[Mapping[str, Any]], run_id: str | None = None) -> WriteOutcome:
        """Store the delivery state of alert notifications (``Notification.row()`` dicts), upserted
        by id (drift_monitor.notify)."""
        rid = self._run(run_id)
        return self._submit(Op("notifications", {"run_id": rid, "t": time.time(), "rows": [dict(r) for r in rows]}))

    def acknowledge_alert(self, alert_id: str) -> WriteOutcome:
        """Mark an alert acknowledged (it stays active until its rule resolves it).

        Raises ``KeyError`` for an unknown id when applied at once.
        """
        return self._submit(Op("ack_alert", {"alert_id": alert_id, "t": time.time()}))

    def write_verification(self, result: VerifyResult) -> WriteOutcome:
        """Store a ``drift-monitor verify`` results table (one transaction; re-writing replaces it)."""
        payload = {"verify_id": result.verify_id, "run_id": result.run_id, "t": time.time()}
        return self._submit(Op("verification", payload, {"verifications": verification_table(result)}))

    def write_preflight(self, result: PreflightResult) -> WriteOutcome:
        """Store a ``drift-monitor preflight`` result (one row; re-writing its ``preflight_id``
        replaces it). It belongs to no run: this works on a Store given no run id."""
        table = preflight_table(result)  # before the op: a malformed result raises, nothing spooled
        return self._submit(Op("preflight", {"preflight_id": str(result.preflight_id), "t": time.time()},
                                {"preflight": table}))

    # -- labels ------------------------------------------------------------------------------

    def import_labels(
        self, hook: str, labels: Mapping[int, str] | pd.DataFrame, source: str = "manual"
    ) -> WriteOutcome:
        """Set feature explanations for ``hook``: ``{feature: label}`` or a DataFrame with
        ``feature`` and ``label`` columns. Replaces existing labels of those features only."""
        table = labels_table(hook, labels, source)
        return self._submit(Op("labels", {"hook": hook, "source": source}, {"feature_labels": table}))

    # -- spool and lifecycle --------------------------------------------------------------------

    def pending(self) -> int:
        """Number of writes not yet in the database: spooled (on disk) plus queued (in memory)."""
        return len(self.spool.pending()) + len(self._queue)

    def may_wait(self) -> bool:
        """Whether writes of this process may wait, without a listing when none do (the
        callback asks at every step; :meth:`pending` lists the spool folder)."""
        return bool(self._queue) or self.spool.may_wait()

    def flush_spool(self, timeout_s: float | None = None) -> int:
        """Apply waiting writes (spooled, then queued) now; returns how many were applied (0 if
        the file is still busy or failing: they keep waiting)."""
        if not self.spool.pending() and not self._queue:
            return 0
        with self._lock:
            applied = 0
            try:
                con = self._open(self.retry_timeout_s if timeout_s is None else timeout_s)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._failed(exc, "flush")
                return 0
            try:
                applied = self._flush_spool(con)
                applied += self._flush_queue(con)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._failed(exc, "flush")
                return applied
            finally:
                _close(con)
            self.failure = None
            return applied

    def close(self) -> None:
        """Flush; what cannot be flushed stays in the spool for the next Store on this path, and
        what the spool cannot take either is dumped to a file (logged with its replay command)."""
        self.flush_spool()
        self._spill()
        if self._queue:
            self._dump(list(self._queue))
            self._queue.clear()
        n = len(self.spool.pending())
        if n:
            log.warning("drift-monitor: %d writes wait in %s; the next write to %s applies them, or now: %s",
                        n, self.spool.dir, self.path, replay_command(self.path))

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
        con = connect_file(self.path, read_only=False, timeout_s=timeout_s)
        try:
            upgrade_schema(con, self.path)
        except BaseException:
            con.close()
            raise
        return con

    def _submit(self, op_or_builder: Op | Callable[[], Op], strict: bool = False) -> WriteOutcome:
        """Apply one write now (after what waits), else spool or queue it (class docstring).

        A snapshot's Arrow tables are built (``op_or_builder`` callable) while the file is being
        opened on a helper thread: see :class:`_Opening`. ``strict`` (the start of a run): an
        unwritable store raises :class:`StoreUnwritable` instead of queueing.
        """
        with self._lock:
            # While earlier writes wait the file was busy or failing a moment ago: try once,
            # briefly, rather than stall training for the full retry budget at every write.
            waiting = bool(self._queue) or bool(self.spool.pending())
            budget = min(self.retry_timeout_s, 0.1) if waiting else self.retry_timeout_s
            opening = _Opening(lambda: self._open(budget))
            try:
                op = op_or_builder() if callable(op_or_builder) else op_or_builder
            except BaseException:
                opening.discard()
                raise
            try:
                con = opening.result()
            except Exception as exc:  # noqa: BLE001 - _defer re-raises what retrying cannot fix
                return self._defer(op, exc, strict)
            try:
                try:
                    self._flush_spool(con)
                    self._flush_queue(con)
                except Exception as exc:  # noqa: BLE001 - as above
                    return self._defer(op, exc, strict=False)
                try:
                    with transaction(con):
                        APPLY[op.kind](con, op)
                except Exception as exc:  # noqa: BLE001 - as above
                    return self._defer(op, exc, strict)
            finally:
                _close(con)
            self.failure = None
            return "committed"

    def _defer(self, op: Op, exc: Exception, strict: bool) -> WriteOutcome:
        """Keep ``op`` for later after ``exc``: in the spool if it can take it (and nothing older
        waits in memory), else in memory. Raises what retrying cannot fix."""
        if not is_transient(exc):
            raise exc
        if strict and not isinstance(exc, StoreLocked):
            raise StoreUnwritable(self.path, exc) from exc
        self._failed(exc, op.kind)
        self._spill()
        if not self._queue:
            try:
                where = self.spool.put(op)
            except OSError as spool_exc:
                log.warning("drift-monitor: cannot spool to %s either (%s); the write waits in memory",
                            self.spool.dir, spool_exc)
            else:
                log.warning("drift-monitor: %s write spooled to %s (%s: %s)", op.kind, where, type(exc).__name__,
                            first_line(exc))
                return "spooled"
        self._queue.append(op)
        self._bound_queue()
        log.warning("drift-monitor: %s write queued in memory (%d waiting)", op.kind, self.pending())
        return "queued"

    def _failed(self, exc: Exception, what: str) -> None:
        """Remember a failure (a lock is normal operation, not a failure of the store)."""
        if isinstance(exc, StoreLocked):
            return
        if self.failure is None:
            log.error("drift-monitor: writing %s failed (%s: %s); the write is kept and retried at every later "
                      "write", self.path, type(exc).__name__, first_line(exc))
        self.failure = exc

    def _spill(self) -> None:
        """Move queued writes to the spool, oldest first, while it takes them."""
        while self._queue:
            try:
                self.spool.put(self._queue[0])
            except OSError:
                return
            self._queue.popleft()

    def _bound_queue(self) -> None:
        size = sum(_op_bytes(o) for o in self._queue)
        spill: list[Op] = []
        while self._queue and size > self.max_queue_bytes:
            spill.append(self._queue.popleft())
            size -= _op_bytes(spill[-1])
        if spill:
            log.error("drift-monitor: over %d bytes of writes wait in memory; dumping the %d oldest",
                      self.max_queue_bytes, len(spill))
            self._dump(spill)

    def _dump(self, ops: list[Op]) -> Path | None:
        """Write ``ops`` to a dump file beside the database, else in a fallback folder; log the
        command that loads it. If no folder takes it, the writes are lost: say so, loudly."""
        run = next((o.payload.get("run_id") for o in ops if o.payload.get("run_id")), None) or "store"
        name = f"{self.path.name}.{str(run)[:12]}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}{DUMP_SUFFIX}"
        errors = []
        for folder in [self.path.parent, *self.fallback_dirs, Path(tempfile.gettempdir())]:
            try:
                path = write_dump(folder / name, ops)
            except OSError as exc:
                errors.append(f"{folder}: {exc.strerror or exc}")
                continue
            self.unsaved.append(path)
            log.error("drift-monitor: %d writes could not be stored in %s; they are in %s. Load them with: %s",
                      len(ops), self.path, path, replay_command(self.path, path))
            return path
        self.lost += len(ops)
        steps = sorted({o.payload["step"] for o in ops if "step" in o.payload})
        log.error("drift-monitor: LOST %d writes (%s): neither %s, its spool nor any dump folder could take them "
                  "(%s)", len(ops), f"snapshots at steps {steps}" if steps else "no snapshots", self.path,
                  "; ".join(errors))
        return None

    def _flush_spool(self, con: duckdb.DuckDBPyConnection) -> int:
        """Apply every spooled write in order, each exactly once, each in its own transaction.

        Only a file that cannot be read (:class:`CorruptSpoolFile`) or that the database rejects
        (a constraint, a schema mismatch) is quarantined; a transient error (disk full, I/O, a
        lock) raises, leaving it and every later file pending, in order, for the next try.
        """
        applied = 0
        for path in self.spool.pending():
            try:
                op = self.spool.load(path)
            except FileNotFoundError:
                continue  # another writer applied and removed it meanwhile
            except CorruptSpoolFile as exc:
                self.spool.quarantine(path, exc)
                continue
            if not _applied(con, op, lambda exc, path=path: self.spool.quarantine(path, exc)):
                continue
            path.unlink(missing_ok=True)
            applied += 1
        return applied

    def _flush_queue(self, con: duckdb.DuckDBPyConnection) -> int:
        """Apply the writes waiting in memory, oldest first; a transient error raises and leaves
        the rest. One the database rejects goes to the spool's quarantine (kept, not retried)."""
        applied = 0
        while self._queue:
            op = self._queue[0]
            _applied(con, op, lambda exc, op=op: self.spool.quarantine(self.spool.put(op), exc))
            self._queue.popleft()
            applied += 1
        return applied


def _op_bytes(op: Op) -> int:
    return sum(t.nbytes for t in op.tables.values()) + 1024


def _close(con: duckdb.DuckDBPyConnection) -> None:
    """Close, ignoring a failed checkpoint on close: what committed is in the WAL, which the
    next open replays (measured on a full disk)."""
    try:
        con.close()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.debug("drift-monitor: closing the store: %s", exc)


def _applied(con: duckdb.DuckDBPyConnection, op: Op, reject) -> bool:
    """Apply ``op`` in one transaction. A transient error (busy, full, I/O) or a bug raises, so the
    write stays where it waits; one the database rejects (a constraint, a malformed table) is
    handed to ``reject`` (quarantined: kept, not retried) and False returned."""
    try:
        with transaction(con):
            apply_once(con, op)
    except Exception as exc:
        if is_transient(exc) or not isinstance(exc, (duckdb.Error, ValueError, KeyError, pa.ArrowException)):
            raise
        reject(exc)
        return False
    return True
