"""What a write *is*, as data (:class:`Op`), and how each kind is applied inside a transaction.

Why writes are records: the writer must be able to apply a write now or, if the file is busy,
serialise it to the spool and apply it later in another process, with the same effect. So every
public write becomes an :class:`Op` (JSON-able parameters plus Arrow tables of rows), and one
``_apply_<kind>`` function per kind turns it into SQL on an open connection. The caller owns the
transaction; the functions here never commit.

Why re-writes replace: rows of one (run, step, hook) are deleted before the new ones go in, in
the same transaction, so resuming a run never duplicates rows. The big tables carry no primary
key (DuckDB's index makes bulk inserts several times slower), hence ``DELETE`` not upsert.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from .errors import LabelError
from .schema import COLUMNS, PREFLIGHT_DDL, VERIFICATIONS_DDL
from .tables import to_timestamp

#: Tables whose rows belong to one (run, step, hook) and are replaced on re-write.
_SNAPSHOT_TABLES = ("feature_stats", "metrics", "refusal_features", "residual_directions", "snapshots")


@dataclass
class Op:
    """One write operation: JSON-able parameters plus Arrow tables of rows to insert."""

    kind: str
    payload: dict[str, Any]
    tables: dict[str, pa.Table] = field(default_factory=dict)
    op_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def _insert_arrow(con: duckdb.DuckDBPyConnection, table_name: str, table: pa.Table) -> None:
    """Bulk-insert an Arrow table: register, one ``INSERT ... SELECT``, unregister."""
    if table.num_rows == 0:
        return
    cols = COLUMNS[table_name]
    table = table.select(list(cols))  # also rejects a (spool) file with unexpected columns
    view = f"_dm_in_{table_name}"
    col_sql = ", ".join(f'"{c}"' for c in cols)
    con.register(view, table)
    try:
        con.execute(f"INSERT INTO {table_name} ({col_sql}) SELECT {col_sql} FROM {view}").fetchall()
    finally:
        con.unregister(view)


def _apply_start_run(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    p = op.payload
    t = to_timestamp(p["t"])
    con.execute(
        """INSERT INTO runs (run_id, name, created_at, updated_at, model, config_json, probe_hash, status, last_step)
           VALUES (?, ?, ?, ?, ?, ?, ?, 'running', NULL)
           ON CONFLICT (run_id) DO UPDATE SET
             name = coalesce(excluded.name, runs.name), updated_at = excluded.updated_at,
             model = coalesce(excluded.model, runs.model),
             config_json = coalesce(excluded.config_json, runs.config_json),
             probe_hash = coalesce(excluded.probe_hash, runs.probe_hash), status = 'running'""",
        [p["run_id"], p["name"], t, t, p["model"], p["config_json"], p["probe_hash"]],
    ).fetchall()


def _ensure_run(con: duckdb.DuckDBPyConnection, run_id: str, epoch_s: float) -> None:
    """A write for a run nobody started (e.g. ``Store(run_id=...)`` only) creates its row."""
    t = to_timestamp(epoch_s)
    con.execute(
        "INSERT INTO runs (run_id, name, created_at, updated_at, status) VALUES (?, ?, ?, ?, 'running') "
        "ON CONFLICT (run_id) DO NOTHING",
        [run_id, run_id[:12], t, t],
    ).fetchall()


def _apply_snapshot(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    p = op.payload
    run_id, step = p["run_id"], int(p["step"])
    _ensure_run(con, run_id, p["t"])
    for hook in p["hooks"]:
        _delete_snapshot(con, run_id, step, hook)
    # The snapshots row (with its row counts) goes first: order is irrelevant inside the
    # transaction, but it lets a completeness check catch any write that escaped one.
    for name in ("snapshots", "metrics", "refusal_features", "residual_directions", "feature_stats"):
        if name in op.tables:  # a write spooled by a version before migration 3 has no residual table
            _insert_arrow(con, name, op.tables[name])
    for alert in p["alerts"]:
        _apply_alert(con, alert)
    if p.get("notifications"):
        _upsert_notifications(con, p["notifications"])
    con.execute(
        "UPDATE runs SET last_step = greatest(coalesce(last_step, ?), ?), updated_at = ?, "
        "probe_hash = coalesce(probe_hash, ?) WHERE run_id = ?",
        [step, step, to_timestamp(p["t"]), p["probe_hash"], run_id],
    ).fetchall()


def _delete_snapshot(con: duckdb.DuckDBPyConnection, run_id: str, step: int, hook: str) -> None:
    """Remove a previous copy of (run, step, hook).

    The big tables are scanned only if a ``snapshots`` row exists: since every snapshot is
    written in one transaction, rows in ``feature_stats``/``metrics`` never exist without it.
    """
    key = [run_id, step, hook]
    exists = con.execute(
        "SELECT count(*) FROM snapshots WHERE run_id = ? AND step = ? AND hook = ?", key
    ).fetchall()[0][0]
    if exists:
        for table in _SNAPSHOT_TABLES:
            con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step = ? AND hook = ?", key).fetchall()


def _apply_alert(con: duckdb.DuckDBPyConnection, a: Mapping[str, Any]) -> None:
    """Insert an active alert (upsert by its deterministic id), or resolve the open one.

    A "resolved" alert closes every *active* alert of the same (run, hook, rule) raised at or
    before its step instead of adding a row; only when there is none (and this resolution was
    not already recorded) is it stored as a resolved row, so the history still shows it.
    """
    if a["status"] == "resolved":
        closed = con.execute(
            "UPDATE alerts SET status = 'resolved', resolved_step = ?, resolved_at = ? "
            "WHERE run_id = ? AND hook = ? AND rule = ? AND status = 'active' AND step <= ?",
            [a["step"], to_timestamp(a["created_at"]), a["run_id"], a["hook"], a["rule"], a["step"]],
        ).fetchall()[0][0]
        if closed:
            return
        seen = con.execute(
            "SELECT count(*) FROM alerts WHERE run_id = ? AND hook = ? AND rule = ? AND resolved_step = ?",
            [a["run_id"], a["hook"], a["rule"], a["step"]],
        ).fetchall()[0][0]
        if seen:
            return
    resolved = a["status"] == "resolved"
    con.execute(
        """INSERT INTO alerts (alert_id, run_id, step, hook, rule, severity, message, value, threshold,
                               status, created_at, acknowledged, acknowledged_at, resolved_step, resolved_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, false, NULL, ?, ?)
           ON CONFLICT (alert_id) DO UPDATE SET severity = excluded.severity, message = excluded.message,
             value = excluded.value, threshold = excluded.threshold""",
        [
            a["alert_id"], a["run_id"], a["step"], a["hook"], a["rule"], a["severity"], a["message"],
            a["value"], a["threshold"], a["status"], to_timestamp(a["created_at"]),
            a["step"] if resolved else None, to_timestamp(a["created_at"]) if resolved else None,
        ],
    ).fetchall()


def _apply_finish_run(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    p = op.payload
    _ensure_run(con, p["run_id"], p["t"])
    con.execute(
        "UPDATE runs SET status = ?, updated_at = ? WHERE run_id = ?", [p["status"], to_timestamp(p["t"]), p["run_id"]]
    ).fetchall()


def _apply_ack_alert(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    p = op.payload
    n = con.execute(
        "UPDATE alerts SET acknowledged = true, acknowledged_at = ? WHERE alert_id = ?",
        [to_timestamp(p["t"]), p["alert_id"]]
    ).fetchall()[0][0]
    if not n:
        raise KeyError(f"no alert with id {p['alert_id']!r}")


def _apply_labels(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    """Replace the labels of these features; ids beyond the hook's SAE (its ``d_sae`` in the
    stored snapshots, when there are any) are refused whole, in the same transaction."""
    table = op.tables["feature_labels"]
    if table.num_rows == 0:
        return
    hook = op.payload["hook"]
    d_sae = con.execute("SELECT max(d_sae) FROM snapshots WHERE hook = ?", [hook]).fetchall()[0][0]
    top = max(table.column("feature").to_pylist())
    if d_sae is not None and top >= d_sae:
        raise LabelError(f"labels for hook {hook!r}: feature id {top} is beyond its SAE's {d_sae} features "
                         f"(ids 0..{d_sae - 1}); fix or remove that row, or import the labels for the right hook")
    con.register("_dm_labels_keys", table.select(["feature"]))
    try:
        con.execute(
            "DELETE FROM feature_labels WHERE hook = ? AND feature IN (SELECT feature FROM _dm_labels_keys)",
            [op.payload["hook"]],
        ).fetchall()
    finally:
        con.unregister("_dm_labels_keys")
    _insert_arrow(con, "feature_labels", table)


def _apply_alerts(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    _ensure_run(con, op.payload["run_id"], op.payload["t"])
    for alert in op.payload["alerts"]:
        _apply_alert(con, alert)


def _apply_verification(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    p = op.payload
    # Migration 2 creates the table when the writer opens the file; re-stating it (a no-op
    # catalog check) keeps a verify write working on a file whose table was dropped by hand.
    con.execute(VERIFICATIONS_DDL)
    if p.get("run_id"):
        _ensure_run(con, p["run_id"], p["t"])
    con.execute("DELETE FROM verifications WHERE verify_id = ?", [p["verify_id"]]).fetchall()
    _insert_arrow(con, "verifications", op.tables["verifications"])


def _apply_preflight(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    """Store a pre-flight result, replacing an earlier row of the same id (a re-run of the same
    check, or a spooled write applied twice). It belongs to no run, so no runs row is made."""
    con.execute(PREFLIGHT_DDL)  # as for verifications: survives a table dropped by hand
    con.execute("DELETE FROM preflight WHERE preflight_id = ?", [op.payload["preflight_id"]]).fetchall()
    _insert_arrow(con, "preflight", op.tables["preflight"])


def _apply_notifications(con: duckdb.DuckDBPyConnection, op: Op) -> None:
    """Upsert notification rows by id. A delivery is never undone by an older state written
    later (a spooled write applied after a newer one): ``notified_at`` once set stays, and
    ``attempts`` only grows."""
    p = op.payload
    _ensure_run(con, p["run_id"], p["t"])
    _upsert_notifications(con, p["rows"])


def _upsert_notifications(con: duckdb.DuckDBPyConnection, rows: list[Mapping[str, Any]]) -> None:
    """One ``INSERT ... SELECT ... ON CONFLICT`` for all ``rows`` (a statement per row cost
    tens of milliseconds each on a busy machine, inside a training step's write)."""
    if not rows:
        return
    cols = COLUMNS["notifications"]
    times = ("created_at", "notified_at")
    table = pa.table({c: pa.array([to_timestamp(r[c]) if c in times else r[c] for r in rows],
                                  type=pa.timestamp("us") if c in times else None) for c in cols})
    con.register("_dm_in_notifications", table)
    try:
        con.execute(
            f"""INSERT INTO notifications ({", ".join(cols)}) SELECT {", ".join(cols)} FROM _dm_in_notifications
               ON CONFLICT (notification_id) DO UPDATE SET
                 notified_at = coalesce(notifications.notified_at, excluded.notified_at),
                 attempts = greatest(notifications.attempts, excluded.attempts),
                 last_error = CASE WHEN coalesce(notifications.notified_at, excluded.notified_at) IS NULL
                                   THEN excluded.last_error END""").fetchall()
    finally:
        con.unregister("_dm_in_notifications")


def apply_once(con: duckdb.DuckDBPyConnection, op: Op) -> bool:
    """Apply a write that may have been applied before (a spool or dump file: the process may
    have died between the commit and the file's delete). Its id is recorded in the same
    transaction, so it takes effect exactly once. The caller owns the transaction. Returns
    False when it had been applied already."""
    done = con.execute("SELECT count(*) FROM _spool_applied WHERE op_id = ?", [op.op_id]).fetchall()
    if done[0][0]:
        return False
    APPLY[op.kind](con, op)
    con.execute("INSERT INTO _spool_applied VALUES (?, ?)", [op.op_id, to_timestamp(time.time())]).fetchall()
    return True


#: How each kind of write is applied (also the kinds a spool file may hold).
APPLY: dict[str, Callable[[duckdb.DuckDBPyConnection, Op], None]] = {
    "verification": _apply_verification,
    "start_run": _apply_start_run,
    "snapshot": _apply_snapshot,
    "alerts": _apply_alerts,
    "finish_run": _apply_finish_run,
    "ack_alert": _apply_ack_alert,
    "labels": _apply_labels,
    "notifications": _apply_notifications,
    "preflight": _apply_preflight,
}
