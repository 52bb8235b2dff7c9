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

This module imports only the standard library, NumPy, pandas, pyarrow, DuckDB and
:mod:`drift_monitor.records`: the dashboard imports it and must never pull in torch.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import random
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from drift_monitor.records import (ALL, FEATURE_COLUMNS, PROJECTION, PROJECTION_DELTA, REFUSAL_COLUMNS, Alert,
                                   HookResult, Snapshot, VerifyResult)

log = logging.getLogger(__name__)

#: Version of the table layout below. Bump it (and write a migration) on any incompatible change.
SCHEMA_VERSION = 1

#: Default number of refusal features stored per (step, hook), besides every emerging one.
REFUSAL_TOP_N = 200

RunStatus = Literal["running", "finished", "failed"]
WriteOutcome = Literal["committed", "spooled"]

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class StoreNotFound(StoreError):
    """The database file does not exist (nothing has been written yet, or a wrong path)."""


class StoreEmpty(StoreNotFound):
    """The file is a DuckDB database but holds no drift-monitor schema (nothing written yet).

    A subclass of :class:`StoreNotFound` so that a dashboard can treat both as "no data yet".
    """


class SchemaVersionError(StoreError):
    """The file was written with another schema version than this code understands."""

    def __init__(self, path: str | os.PathLike[str], found: int | str, expected: int = SCHEMA_VERSION):
        self.path, self.found, self.expected = str(path), found, expected
        hint = "upgrade drift-monitor" if _as_int(found, -1) > expected else "re-create or migrate the store"
        super().__init__(
            f"{self.path}: schema version {found} in the file, this drift-monitor reads version "
            f"{expected}; {hint}"
        )


class StoreLocked(StoreError):
    """The database stayed locked by another process for the whole retry budget."""


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

#: Results of ``drift-monitor verify``, one row per condition (and random draw). Added after
#: schema version 1 shipped: older files get the table on their first verify write
#: (``CREATE TABLE IF NOT EXISTS``), and readers treat a missing table as empty.
VERIFICATIONS_DDL = """CREATE TABLE IF NOT EXISTS verifications (
        verify_id VARCHAR, run_id VARCHAR, step BIGINT, hook VARCHAR, created_at TIMESTAMP, condition VARCHAR,
        draw INTEGER, features VARCHAR, n_features INTEGER, alpha DOUBLE, seed INTEGER,
        harmful_refusal_rate DOUBLE, harmless_refusal_rate DOUBLE, kl_harmless DOUBLE, n_harmful INTEGER,
        n_harmless INTEGER, examples_json VARCHAR, summary_json VARCHAR)"""
VERIFICATION_COLUMNS = ("verify_id", "run_id", "step", "hook", "created_at", "condition", "draw", "features",
                        "n_features", "alpha", "seed", "harmful_refusal_rate", "harmless_refusal_rate",
                        "kl_harmless", "n_harmful", "n_harmless", "examples_json", "summary_json")

#: Columns of each table in store order. SQL is built only from these constants (never from
#: user data or file contents), and every value travels as a parameter or an Arrow column.
COLUMNS: dict[str, tuple[str, ...]] = {
    "runs": ("run_id", "name", "created_at", "updated_at", "model", "config_json", "probe_hash", "status", "last_step"),
    "snapshots": (
        "run_id", "step", "hook", "created_at", "n_tokens", "duration_s", "probe_hash", "is_base", "d_sae",
        "n_feature_rows", "n_metrics", "n_refusal_rows",
    ),
    "metrics": ("run_id", "step", "hook", "name", "value"),
    "feature_stats": ("run_id", "step", "hook", "category", "feature", *FEATURE_COLUMNS, "count", "base_count"),
    "refusal_features": ("run_id", "step", "hook", "feature", *REFUSAL_COLUMNS, "rank", "emerging"),
    "alerts": (
        "alert_id", "run_id", "step", "hook", "rule", "severity", "message", "value", "threshold", "status",
        "created_at", "acknowledged", "acknowledged_at", "resolved_step", "resolved_at",
    ),
    "feature_labels": ("hook", "feature", "label", "source"),
    "verifications": VERIFICATION_COLUMNS,
}

#: DDL of schema version 1. Only small tables carry primary keys (see the module docstring).
SCHEMA_DDL: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, name VARCHAR, created_at TIMESTAMP, updated_at TIMESTAMP,
        model VARCHAR, config_json VARCHAR, probe_hash VARCHAR, status VARCHAR, last_step BIGINT)""",
    """CREATE TABLE IF NOT EXISTS snapshots (
        run_id VARCHAR, step BIGINT, hook VARCHAR, created_at TIMESTAMP, n_tokens BIGINT,
        duration_s DOUBLE, probe_hash VARCHAR, is_base BOOLEAN, d_sae INTEGER,
        n_feature_rows BIGINT, n_metrics INTEGER, n_refusal_rows INTEGER,
        PRIMARY KEY (run_id, step, hook))""",
    "CREATE TABLE IF NOT EXISTS metrics (run_id VARCHAR, step BIGINT, hook VARCHAR, name VARCHAR, value DOUBLE)",
    """CREATE TABLE IF NOT EXISTS feature_stats (
        run_id VARCHAR, step BIGINT, hook VARCHAR, category VARCHAR, feature INTEGER,
        density DOUBLE, mean_act DOUBLE, max_act DOUBLE, drift DOUBLE, log_density_ratio DOUBLE,
        "count" BIGINT, base_count BIGINT)""",
    """CREATE TABLE IF NOT EXISTS refusal_features (
        run_id VARCHAR, step BIGINT, hook VARCHAR, feature INTEGER, harmful_drift DOUBLE,
        harmless_drift DOUBLE, refusal_score DOUBLE, z_score DOUBLE, "rank" INTEGER, emerging BOOLEAN)""",
    """CREATE TABLE IF NOT EXISTS alerts (
        alert_id VARCHAR PRIMARY KEY, run_id VARCHAR, step BIGINT, hook VARCHAR, rule VARCHAR,
        severity VARCHAR, message VARCHAR, value DOUBLE, threshold DOUBLE, status VARCHAR,
        created_at TIMESTAMP, acknowledged BOOLEAN, acknowledged_at TIMESTAMP,
        resolved_step BIGINT, resolved_at TIMESTAMP)""",
    "CREATE TABLE IF NOT EXISTS feature_labels (hook VARCHAR, feature INTEGER, label VARCHAR, source VARCHAR)",
    VERIFICATIONS_DDL,
    # Ids of spooled writes already applied: makes a spool replay exactly-once (module docstring).
    "CREATE TABLE IF NOT EXISTS _spool_applied (op_id VARCHAR PRIMARY KEY, applied_at TIMESTAMP)",
)

#: Tables whose rows belong to one (run, step, hook) and are replaced on re-write.
_SNAPSHOT_TABLES = ("feature_stats", "metrics", "refusal_features", "snapshots")


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table and record :data:`SCHEMA_VERSION` (idempotent, one transaction)."""
    with _transaction(con):
        for ddl in SCHEMA_DDL:
            con.execute(ddl)
        con.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING", [str(SCHEMA_VERSION)]
        )


def _stored_schema_version(con: duckdb.DuckDBPyConnection) -> str | None:
    """The schema version recorded in the file, or None if it has no drift-monitor schema."""
    try:
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    except duckdb.CatalogException:  # no meta table: not (yet) a drift-monitor store
        return None
    return rows[0][0] if rows else None


def _check_version(path: Path, found: str) -> None:
    if _as_int(found, -1) != SCHEMA_VERSION:
        raise SchemaVersionError(path, found)


# --------------------------------------------------------------------------------------------
# Connections: lock detection, bounded retry, transactions
# --------------------------------------------------------------------------------------------

_LOCK_MARKERS = ("could not set lock", "conflicting lock", "different configuration", "lock on file")


def _is_lock_error(exc: BaseException) -> bool:
    """True for errors that mean "someone else has the file now; try again later".

    Found by experiment with DuckDB 2.0: another process holding the file gives
    ``duckdb.IOException: IO Error: Could not set lock on file "...": Conflicting lock is held
    in ... (PID n)``; a connection in *this* process opened with the other read-only flag gives
    ``duckdb.ConnectionException: ... different configuration than existing connections``.
    """
    if not isinstance(exc, (duckdb.IOException, duckdb.ConnectionException)):
        return False
    msg = str(exc).lower()
    return any(marker in msg for marker in _LOCK_MARKERS)


def _connect(
    path: Path,
    read_only: bool,
    timeout_s: float,
    max_attempts: int | None = None,
    first_delay_s: float = 0.01,
    max_delay_s: float = 0.25,
) -> duckdb.DuckDBPyConnection:
    """Open ``path``, retrying with jittered exponential backoff while it is locked.

    Raises :class:`StoreLocked` once ``timeout_s`` (or ``max_attempts``) is spent, so callers
    decide what "busy" means for them (the writer spools, a reader reports).
    """
    start = time.monotonic()
    delay = first_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc):
                raise _translate_open_error(path, exc) from exc
            waited = time.monotonic() - start
            if waited + delay > timeout_s or (max_attempts is not None and attempt >= max_attempts):
                raise StoreLocked(
                    f"{path} stayed locked by another process for {waited:.2f}s ({attempt} attempts): {exc}"
                ) from exc
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, max_delay_s)


def _translate_open_error(path: Path, exc: Exception) -> Exception:
    msg = str(exc)
    if "does not exist" in msg:
        return StoreNotFound(f"no drift-monitor store at {path} (the file does not exist)")
    if "not a valid DuckDB database" in msg:
        return StoreError(f"{path} is not a DuckDB database file: {msg}")
    return exc


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK and re-raise: a failed write leaves no trace."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


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


def _ts(epoch_s: float | None) -> dt.datetime | None:
    """Epoch seconds -> naive UTC datetime (the ``TIMESTAMP`` columns hold UTC)."""
    if epoch_s is None or (isinstance(epoch_s, float) and math.isnan(epoch_s)):
        return None
    return dt.datetime.fromtimestamp(float(epoch_s), tz=dt.timezone.utc).replace(tzinfo=None)


# Per-path in-process locks: two Store objects (threads) on one file must not interleave, and
# DuckDB's in-process instance cache would otherwise let them into the same file at once.
_PATH_LOCKS: dict[str, threading.RLock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _path_lock(path: Path) -> threading.RLock:
    key = str(path.resolve())
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(key, threading.RLock())


# --------------------------------------------------------------------------------------------
# Building Arrow tables from records (no Python loops over features)
# --------------------------------------------------------------------------------------------


def _code_dtype(n_values: int) -> type:
    return np.int8 if n_values <= 127 else np.int32


def _const_strings(value: str, n: int) -> pa.DictionaryArray:
    """A column of ``n`` copies of one string, as a dictionary array (no n Python strings)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([value], pa.string()))


def _coded_strings(codes: np.ndarray, values: Sequence[str]) -> pa.DictionaryArray:
    codes = codes.astype(_code_dtype(len(values)), copy=False)
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(values), pa.string()))


def _checked(arr: Any, n: int, what: str, dtype: Any) -> np.ndarray:
    a = np.asarray(arr, dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{what}: expected shape ({n},), got {a.shape}")
    return a


@dataclass
class _Block:
    """The rows one (hook, category) contributes: ``idx`` None means every feature."""

    hook_code: int
    cat_code: int
    stats: Any
    d: int
    idx: np.ndarray | None
    where: str

    @property
    def n(self) -> int:
        return self.d if self.idx is None else int(self.idx.size)


def _feature_blocks(snapshot: Snapshot, categories: list[str], store_dead: bool) -> list[_Block]:
    blocks = []
    for h_i, (hook, result) in enumerate(snapshot.hooks.items()):
        for category, stats in result.features.items():
            d, where = result.d_sae, f"hook {hook!r} category {category!r}"
            idx = None
            if not store_dead:
                count = _checked(stats.count, d, f"{where} count", np.int64)
                base = _checked(stats.base_count, d, f"{where} base_count", np.int64)
                alive = np.flatnonzero((count > 0) | (base > 0))
                idx = None if alive.size == d else alive
            blocks.append(_Block(h_i, categories.index(category), stats, d, idx, where))
    return blocks


def _fill(out: np.ndarray, blk: _Block, src: Any, what: str) -> None:
    """Copy one block's column into its slice of the output (one copy, no temporaries)."""
    arr = _checked(src, blk.d, f"{blk.where} {what}", out.dtype)
    if blk.idx is None:
        out[:] = arr
    else:
        # mode="clip": idx comes from flatnonzero, so it is always in range, and "raise"
        # makes NumPy buffer the whole output before copying it (a third slower here).
        np.take(arr, blk.idx, out=out, mode="clip")


def build_feature_stats_table(
    snapshot: Snapshot, run_id: str, store_dead_features: bool = False
) -> pa.Table:
    """The ``feature_stats`` rows of a snapshot, one Arrow table in table column order.

    By default a feature is kept for a category only if it fired in the tuned or the base model
    (``count > 0 or base_count > 0``); a missing row therefore means "never fired in either
    model", which keeps a 131k-feature SAE's table to the features that matter. Output columns
    are allocated once and filled slice by slice: this runs on the training process's time.
    """
    hooks = list(snapshot.hooks)
    categories: list[str] = sorted({c for h in snapshot.hooks.values() for c in h.features})
    blocks = _feature_blocks(snapshot, categories, store_dead_features)
    n = sum(b.n for b in blocks)
    cols: dict[str, np.ndarray] = {c: np.empty(n, np.float64) for c in FEATURE_COLUMNS}
    cols["count"], cols["base_count"] = np.empty(n, np.int64), np.empty(n, np.int64)
    feature = np.empty(n, np.int32)
    hook_codes = np.empty(n, _code_dtype(len(hooks)))
    cat_codes = np.empty(n, _code_dtype(len(categories)))
    pos = 0
    for blk in blocks:
        sl = slice(pos, pos + blk.n)
        pos += blk.n
        hook_codes[sl], cat_codes[sl] = blk.hook_code, blk.cat_code
        feature[sl] = np.arange(blk.d) if blk.idx is None else blk.idx
        for col in cols:
            _fill(cols[col][sl], blk, getattr(blk.stats, col), col)
    return pa.table(
        {
            "run_id": _const_strings(run_id, n),
            "step": pa.array(np.full(n, snapshot.step, np.int64)),
            "hook": _coded_strings(hook_codes, hooks),
            "category": _coded_strings(cat_codes, categories),
            "feature": pa.array(feature),
            **{c: pa.array(cols[c]) for c in FEATURE_COLUMNS},
            "count": pa.array(cols["count"]),
            "base_count": pa.array(cols["base_count"]),
        }
    )


def _metrics_table(snapshot: Snapshot, run_id: str) -> pa.Table:
    """Long-format metrics; ``None`` becomes NaN so the column stays numeric."""
    rows = [(hook, name, _float(v)) for hook, r in snapshot.hooks.items() for name, v in r.metrics.items()]
    n = len(rows)
    return pa.table(
        {
            "run_id": pa.array([run_id] * n, pa.string()),
            "step": pa.array([snapshot.step] * n, pa.int64()),
            "hook": pa.array([r[0] for r in rows], pa.string()),
            "name": pa.array([r[1] for r in rows], pa.string()),
            "value": pa.array(np.array([r[2] for r in rows], np.float64)),
        }
    )


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def _top_order(score: np.ndarray, top_n: int) -> np.ndarray:
    """Ids of the ``top_n`` largest non-NaN scores, best first, ties to the lower id.

    A partition then a sort of the candidates only: a full argsort of 131k scores costs more
    than the rest of building the refusal table.
    """
    scored = np.flatnonzero(~np.isnan(score))
    neg = -score[scored]
    if 0 < top_n < scored.size:
        kth = np.partition(neg, top_n - 1)[top_n - 1]
        keep = neg <= kth  # every tie of the cut-off value stays a candidate
        scored, neg = scored[keep], neg[keep]
    elif top_n <= 0:
        return np.zeros(0, np.int64)
    return scored[np.lexsort((scored, neg))][:top_n]


def _rank_of(score: np.ndarray, feature: int) -> int:
    """1-based rank of one feature among all non-NaN scores (-1 if it has none)."""
    s = score[feature]
    if np.isnan(s):
        return -1
    ids = np.arange(score.size)
    return 1 + int(np.count_nonzero(score > s)) + int(np.count_nonzero((score == s) & (ids < feature)))


def _refusal_rows(result: HookResult, top_n: int) -> dict[str, np.ndarray]:
    """The refusal rows kept for one hook: top ``top_n`` by score (non-NaN) plus every emerging.

    ``rank`` is the 1-based position by ``refusal_score`` among all scored features of the hook
    (-1 = unscored, stored as NULL), so ranks mean the same whatever the cut.
    """
    ref, d = result.refusal, result.d_sae
    assert ref is not None
    score = _checked(ref.refusal_score, d, f"hook {result.hook!r} refusal_score", np.float64)
    top = _top_order(score, top_n)
    emerging = np.asarray(list(ref.emerging), dtype=np.int64)
    if emerging.size and (emerging.min() < 0 or emerging.max() >= d):
        raise ValueError(f"hook {result.hook!r}: emerging feature ids must lie in [0, {d})")
    rank = dict(zip(top.tolist(), range(1, top.size + 1)))
    for e in emerging.tolist():
        if e not in rank:
            rank[e] = _rank_of(score, e)
    keep = np.array(sorted(rank), dtype=np.int64)
    out = {
        "feature": keep,
        "rank": np.array([rank[f] for f in keep.tolist()], np.int64),
        "emerging": np.isin(keep, emerging),
    }
    for col in REFUSAL_COLUMNS:
        out[col] = _checked(getattr(ref, col), d, f"hook {result.hook!r} {col}", np.float64)[keep]
    return out


def _refusal_table(snapshot: Snapshot, run_id: str, top_n: int) -> pa.Table:
    parts: list[tuple[str, dict[str, np.ndarray]]] = [
        (hook, _refusal_rows(r, top_n)) for hook, r in snapshot.hooks.items() if r.refusal is not None
    ]
    if not parts:
        return _empty_table("refusal_features")
    hooks = [h for h, _ in parts]
    sizes = [p["feature"].size for _, p in parts]
    col = {k: np.concatenate([p[k] for _, p in parts]) for k in parts[0][1]}
    n = int(sum(sizes))
    return pa.table(
        {
            "run_id": _const_strings(run_id, n),
            "step": pa.array(np.full(n, snapshot.step, np.int64)),
            "hook": _coded_strings(np.repeat(np.arange(len(hooks)), sizes), hooks),
            "feature": pa.array(col["feature"].astype(np.int32)),
            **{c: pa.array(col[c]) for c in REFUSAL_COLUMNS},
            "rank": pa.array(col["rank"].astype(np.int32), mask=col["rank"] < 0),
            "emerging": pa.array(col["emerging"].astype(bool)),
        }
    )


def _snapshots_table(
    snapshot: Snapshot, run_id: str, feature_stats: pa.Table, metrics: pa.Table, refusal: pa.Table
) -> pa.Table:
    """One ``snapshots`` row per hook, with the row counts written (a completeness check)."""
    hooks = list(snapshot.hooks)

    def counts(table: pa.Table) -> list[int]:
        by_hook = _rows_per_hook(table)
        return [by_hook.get(h, 0) for h in hooks]

    n = len(hooks)
    return pa.table(
        {
            "run_id": pa.array([run_id] * n, pa.string()),
            "step": pa.array([snapshot.step] * n, pa.int64()),
            "hook": pa.array(hooks, pa.string()),
            "created_at": pa.array([_ts(snapshot.created_at)] * n, pa.timestamp("us")),
            "n_tokens": pa.array([int(snapshot.n_tokens)] * n, pa.int64()),
            "duration_s": pa.array([float(snapshot.duration_s)] * n, pa.float64()),
            "probe_hash": pa.array([snapshot.probe_hash] * n, pa.string()),
            "is_base": pa.array([bool(snapshot.is_base)] * n, pa.bool_()),
            "d_sae": pa.array([int(snapshot.hooks[h].d_sae) for h in hooks], pa.int32()),
            "n_feature_rows": pa.array(counts(feature_stats), pa.int64()),
            "n_metrics": pa.array(counts(metrics), pa.int32()),
            "n_refusal_rows": pa.array(counts(refusal), pa.int32()),
        }
    )


def _rows_per_hook(table: pa.Table) -> dict[str, int]:
    """Row count per hook; dictionary-encoded columns are counted on their codes (no cast)."""
    out: dict[str, int] = {}
    for chunk in table.column("hook").chunks:
        if pa.types.is_dictionary(chunk.type):
            codes = chunk.indices.to_numpy(zero_copy_only=False)
            for value, n in zip(chunk.dictionary.to_pylist(), np.bincount(codes, minlength=len(chunk.dictionary))):
                out[value] = out.get(value, 0) + int(n)
        else:
            for item in pc.value_counts(chunk).to_pylist():
                out[item["values"]] = out.get(item["values"], 0) + int(item["counts"])
    return out


_EMPTY_TYPES: dict[str, dict[str, pa.DataType]] = {
    "refusal_features": {
        "run_id": pa.string(), "step": pa.int64(), "hook": pa.string(), "feature": pa.int32(),
        **{c: pa.float64() for c in REFUSAL_COLUMNS}, "rank": pa.int32(), "emerging": pa.bool_(),
    },
}


def _empty_table(name: str) -> pa.Table:
    return pa.schema(list(_EMPTY_TYPES[name].items())).empty_table()


def alert_id(run_id: str, alert: Alert) -> str:
    """Deterministic id of an alert: re-writing a step re-raises the *same* alert, not a copy."""
    key = "\x1f".join((run_id, alert.hook, alert.rule, str(int(alert.step)), alert.status))
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def _alert_payload(run_id: str, alert: Alert) -> dict[str, Any]:
    if alert.status not in ("active", "resolved"):
        raise ValueError(f"alert status must be 'active' or 'resolved', got {alert.status!r}")
    return {
        "alert_id": alert_id(run_id, alert), "run_id": run_id, "step": int(alert.step), "hook": alert.hook,
        "rule": alert.rule, "severity": alert.severity, "message": alert.message, "value": _float(alert.value),
        "threshold": _float(alert.threshold), "status": alert.status, "created_at": float(alert.created_at),
    }


# --------------------------------------------------------------------------------------------
# Write operations: what a write *is*, so it can be applied now or spooled and applied later
# --------------------------------------------------------------------------------------------


@dataclass
class _Op:
    """One write operation: JSON-able parameters plus Arrow tables of rows to insert."""

    kind: str
    payload: dict[str, Any]
    tables: dict[str, pa.Table] = field(default_factory=dict)
    op_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def _apply_start_run(con: duckdb.DuckDBPyConnection, op: _Op) -> None:
    p = op.payload
    t = _ts(p["t"])
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
    t = _ts(epoch_s)
    con.execute(
        "INSERT INTO runs (run_id, name, created_at, updated_at, status) VALUES (?, ?, ?, ?, 'running') "
        "ON CONFLICT (run_id) DO NOTHING",
        [run_id, run_id[:12], t, t],
    ).fetchall()


def _apply_snapshot(con: duckdb.DuckDBPyConnection, op: _Op) -> None:
    p = op.payload
    run_id, step = p["run_id"], int(p["step"])
    _ensure_run(con, run_id, p["t"])
    for hook in p["hooks"]:
        _delete_snapshot(con, run_id, step, hook)
    # The snapshots row (with its row counts) goes first: order is irrelevant inside the
    # transaction, but it lets a completeness check catch any write that escaped one.
    for name in ("snapshots", "metrics", "refusal_features", "feature_stats"):
        _insert_arrow(con, name, op.tables[name])
    for alert in p["alerts"]:
        _apply_alert(con, alert)
    con.execute(
        "UPDATE runs SET last_step = greatest(coalesce(last_step, ?), ?), updated_at = ?, "
        "probe_hash = coalesce(probe_hash, ?) WHERE run_id = ?",
        [step, step, _ts(p["t"]), p["probe_hash"], run_id],
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
            [a["step"], _ts(a["created_at"]), a["run_id"], a["hook"], a["rule"], a["step"]],
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
            a["value"], a["threshold"], a["status"], _ts(a["created_at"]),
            a["step"] if resolved else None, _ts(a["created_at"]) if resolved else None,
        ],
    ).fetchall()


def _apply_finish_run(con: duckdb.DuckDBPyConnection, op: _Op) -> None:
    p = op.payload
    _ensure_run(con, p["run_id"], p["t"])
    con.execute(
        "UPDATE runs SET status = ?, updated_at = ? WHERE run_id = ?", [p["status"], _ts(p["t"]), p["run_id"]]
    ).fetchall()


def _apply_ack_alert(con: duckdb.DuckDBPyConnection, op: _Op) -> None:
    p = op.payload
    n = con.execute(
        "UPDATE alerts SET acknowledged = true, acknowledged_at = ? WHERE alert_id = ?", [_ts(p["t"]), p["alert_id"]]
    ).fetchall()[0][0]
    if not n:
        raise KeyError(f"no alert with id {p['alert_id']!r}")


def _apply_labels(con: duckdb.DuckDBPyConnection, op: _Op) -> None:
    table = op.tables["feature_labels"]
    if table.num_rows == 0:
        return
    con.register("_dm_labels_keys", table.select(["feature"]))
    try:
        con.execute(
            "DELETE FROM feature_labels WHERE hook = ? AND feature IN (SELECT feature FROM _dm_labels_keys)",
            [op.payload["hook"]],
        ).fetchall()
    finally:
        con.unregister("_dm_labels_keys")
    _insert_arrow(con, "feature_labels", table)


def _apply_alerts(con: duckdb.DuckDBPyConnection, op: _Op) -> None:
    _ensure_run(con, op.payload["run_id"], op.payload["t"])
    for alert in op.payload["alerts"]:
        _apply_alert(con, alert)


def _apply_verification(con: duckdb.DuckDBPyConnection, op: _Op) -> None:
    p = op.payload
    con.execute(VERIFICATIONS_DDL)
    if p.get("run_id"):
        _ensure_run(con, p["run_id"], p["t"])
    con.execute("DELETE FROM verifications WHERE verify_id = ?", [p["verify_id"]]).fetchall()
    _insert_arrow(con, "verifications", op.tables["verifications"])


def _verification_table(res: VerifyResult) -> pa.Table:
    summary = json.dumps({
        "features": res.features, "steer_scales": res.steer_scales, "duration_s": res.duration_s,
        "ablation_relative_drop": _float(res.ablation_relative_drop),
        "random_relative_drop": _float(res.random_relative_drop), "steering_gain": _float(res.steering_gain),
        "verdict": res.verdict(), "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in vars(res.settings).items()},
    }, default=str)
    draws: dict[str, int] = {}
    rows: dict[str, list[Any]] = {c: [] for c in VERIFICATION_COLUMNS}
    for c in res.conditions:
        draw = draws.get(c.condition, 0)
        draws[c.condition] = draw + 1
        values = (res.verify_id, res.run_id, res.step, res.hook, _ts(res.created_at), c.condition, draw,
                  ",".join(map(str, c.features)), len(c.features), c.alpha, c.seed, c.harmful_refusal_rate,
                  c.harmless_refusal_rate, c.kl_harmless, c.n_harmful, c.n_harmless, json.dumps(c.examples), summary)
        for col, v in zip(VERIFICATION_COLUMNS, values):
            rows[col].append(v)
    types = {"step": pa.int64(), "created_at": pa.timestamp("us"), "draw": pa.int32(), "n_features": pa.int32(),
             "alpha": pa.float64(), "seed": pa.int32(), "harmful_refusal_rate": pa.float64(),
             "harmless_refusal_rate": pa.float64(), "kl_harmless": pa.float64(), "n_harmful": pa.int32(),
             "n_harmless": pa.int32()}
    return pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in rows.items()})


_APPLY: dict[str, Callable[[duckdb.DuckDBPyConnection, _Op], None]] = {
    "verification": _apply_verification,
    "start_run": _apply_start_run,
    "snapshot": _apply_snapshot,
    "alerts": _apply_alerts,
    "finish_run": _apply_finish_run,
    "ack_alert": _apply_ack_alert,
    "labels": _apply_labels,
}


# --------------------------------------------------------------------------------------------
# Spool: pending writes on disk, one self-contained zip file each
# --------------------------------------------------------------------------------------------


class _Spool:
    """A directory of pending writes, applied in file-name (= creation) order.

    Each file is a zip (stored, not compressed) of ``op.json`` and one Parquet file per table:
    a single file, so creating it (temp + fsync + rename) and deleting it are both atomic.
    Files that cannot be applied (corrupt, or rejected by the database) are moved to
    ``failed/`` rather than deleted: nothing is lost, and they stop blocking the queue.
    """

    FORMAT = 1

    def __init__(self, directory: Path):
        self.dir = directory
        self._seq = 0

    def pending(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.zip") if not p.name.startswith("."))

    def put(self, op: _Op) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid():07d}-{self._seq:06d}-{op.op_id[:8]}.zip"
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
                meta = {"format": self.FORMAT, "kind": op.kind, "op_id": op.op_id, "payload": op.payload}
                zf.writestr("op.json", json.dumps(meta))
                for tname, table in op.tables.items():
                    buf = io.BytesIO()
                    pq.write_table(table, buf, compression="zstd")
                    zf.writestr(f"{tname}.parquet", buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        return final

    @staticmethod
    def load(path: Path) -> _Op:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("op.json"))
            if meta.get("format") != _Spool.FORMAT or meta.get("kind") not in _APPLY:
                raise ValueError(f"unknown spool format/kind in {path}: {meta.get('format')}/{meta.get('kind')}")
            tables = {
                n[: -len(".parquet")]: pq.read_table(io.BytesIO(zf.read(n)))
                for n in zf.namelist()
                if n.endswith(".parquet")
            }
        return _Op(meta["kind"], meta["payload"], tables, op_id=meta["op_id"])

    def quarantine(self, path: Path, why: BaseException) -> None:
        failed = self.dir / "failed"
        failed.mkdir(exist_ok=True)
        os.replace(path, failed / path.name)
        log.error("drift-monitor: spooled write %s could not be applied (%s); kept in %s", path.name, why, failed)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


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
        except BaseException as exc:  # re-raised in the caller's thread by result()
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
        if isinstance(labels, pd.DataFrame):
            missing = {"feature", "label"} - set(labels.columns)
            if missing:
                raise ValueError(f"labels DataFrame needs columns 'feature' and 'label'; missing {sorted(missing)}")
            df = labels[["feature", "label"]]
        else:
            df = pd.DataFrame({"feature": list(labels.keys()), "label": list(labels.values())})
        df = df.drop_duplicates("feature", keep="last")
        n = len(df)
        table = pa.table(
            {
                "hook": pa.array([hook] * n, pa.string()),
                "feature": pa.array(df["feature"].to_numpy(np.int64).astype(np.int32)),
                "label": pa.array(df["label"].astype(str).tolist(), pa.string()),
                "source": pa.array([source] * n, pa.string()),
            }
        )
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

    def __enter__(self) -> Store:
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
        """Open read-write with retry and make sure the schema is there and of our version."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = _connect(self.path, read_only=False, timeout_s=timeout_s)
        try:
            found = _stored_schema_version(con)
            if found is None:
                create_schema(con)
            else:
                _check_version(self.path, found)
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
            except Exception as exc:  # a corrupt file must not block the queue forever
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


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------

#: Ranking expressions accepted by :meth:`StoreReader.top_features` (SQL over ``feature_stats f``).
TOP_BY_SQL: dict[str, str] = {
    "drift": "f.drift",
    "abs_drift": "abs(f.drift)",
    "log_density_ratio": "f.log_density_ratio",
    "abs_log_density_ratio": "abs(f.log_density_ratio)",
    "density": "f.density",
    "mean_act": "f.mean_act",
    "max_act": "f.max_act",
}

_FEATURE_SELECT = ", ".join(f"f.{c}" for c in FEATURE_COLUMNS) + ', f."count", f.base_count'


class StoreReader:
    """Read-only queries for the dashboard; every call opens the file read-only and closes it.

    Never holding the file between calls is what lets the writer in. While the writer has the
    file (milliseconds per write), opening is retried with backoff for up to ``retry_timeout_s``
    / ``retries`` attempts, then :class:`StoreLocked` is raised.
    """

    def __init__(self, path: str | os.PathLike[str], retries: int = 50, retry_timeout_s: float = 5.0):
        self.path = Path(path)
        self.retries = int(retries)
        self.retry_timeout_s = float(retry_timeout_s)

    @contextlib.contextmanager
    def _connection(self, check_version: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        if not self.path.exists():
            raise StoreNotFound(f"no drift-monitor store at {self.path} (the file does not exist)")
        con = _connect(self.path, read_only=True, timeout_s=self.retry_timeout_s, max_attempts=self.retries)
        try:
            found = _stored_schema_version(con)
            if found is None:
                raise StoreEmpty(f"{self.path} is a DuckDB file but holds no drift-monitor data yet")
            if check_version:
                _check_version(self.path, found)
            yield con
        finally:
            con.close()

    def _df(self, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
        with self._connection() as con:
            return con.execute(sql, list(params)).df()

    def schema_version(self) -> int:
        """The schema version recorded in the file (not checked against this code's)."""
        with self._connection(check_version=False) as con:
            return _as_int(_stored_schema_version(con), -1)

    def runs(self) -> pd.DataFrame:
        """Every run with its last step, number of snapshots (steps) and open alert counts, newest first."""
        return self._df(
            """SELECT r.run_id, r.name, r.status, r.model, r.probe_hash, r.created_at, r.updated_at,
                      coalesce(s.last_step, r.last_step) AS last_step,
                      coalesce(s.n_snapshots, 0) AS n_snapshots,
                      coalesce(a.active_alerts, 0) AS active_alerts,
                      coalesce(a.unacknowledged_alerts, 0) AS unacknowledged_alerts,
                      r.config_json
               FROM runs r
               LEFT JOIN (SELECT run_id, max(step) AS last_step, count(DISTINCT step) AS n_snapshots
                          FROM snapshots GROUP BY run_id) s USING (run_id)
               LEFT JOIN (SELECT run_id, count(*) FILTER (WHERE status = 'active') AS active_alerts,
                                 count(*) FILTER (WHERE status = 'active' AND NOT acknowledged)
                                     AS unacknowledged_alerts
                          FROM alerts GROUP BY run_id) a USING (run_id)
               ORDER BY r.created_at DESC, r.run_id"""
        )

    def hooks(self, run_id: str) -> list[str]:
        df = self._df("SELECT DISTINCT hook FROM snapshots WHERE run_id = ? ORDER BY hook", [run_id])
        return df["hook"].tolist()

    def steps(self, run_id: str, hook: str | None = None) -> list[int]:
        sql, params = "SELECT DISTINCT step FROM snapshots WHERE run_id = ?", [run_id]
        if hook is not None:
            sql, params = sql + " AND hook = ?", params + [hook]
        return [int(s) for s in self._df(sql + " ORDER BY step", params)["step"]]

    def snapshots(self, run_id: str) -> pd.DataFrame:
        """The ``snapshots`` rows of a run (one per step and hook)."""
        return self._df("SELECT * FROM snapshots WHERE run_id = ? ORDER BY step, hook", [run_id])

    def metric_series(
        self, run_id: str, hook: str | None = None, names: Sequence[str] | None = None,
        hook_prefix: str | None = None,
    ) -> pd.DataFrame:
        """Scalar metrics over steps, long format: ``step, hook, name, value`` (NaN kept as NaN).

        ``hook_prefix`` selects every hook starting with it (``"adapter:"``: the per-LoRA-module hooks).
        """
        sql, params = "SELECT step, hook, name, value FROM metrics WHERE run_id = ?", [run_id]
        if hook is not None:
            sql, params = sql + " AND hook = ?", params + [hook]
        if hook_prefix is not None:
            sql, params = sql + " AND starts_with(hook, ?)", params + [hook_prefix]
        if names is not None:
            sql, params = sql + " AND list_contains(?, name)", params + [list(names)]
        return self._df(sql + " ORDER BY hook, name, step", params)

    def feature_table(self, run_id: str, step: int, hook: str, category: str | None = ALL) -> pd.DataFrame:
        """Per-feature statistics at one step (``category=None``: every category), with labels.

        Only stored features appear: by default those that fired in either model.
        """
        sql = (
            f"SELECT f.category, f.feature, {_FEATURE_SELECT}, l.label FROM feature_stats f "
            "LEFT JOIN feature_labels l ON l.hook = f.hook AND l.feature = f.feature "
            "WHERE f.run_id = ? AND f.step = ? AND f.hook = ?"
        )
        params: list[Any] = [run_id, int(step), hook]
        if category is not None:
            sql, params = sql + " AND f.category = ?", params + [category]
        return self._df(sql + " ORDER BY f.category, f.feature", params)

    def top_features(
        self, run_id: str, step: int, hook: str, by: str = "abs_drift", k: int = 20, category: str = ALL
    ) -> pd.DataFrame:
        """The ``k`` features with the largest ``by`` score at one step, ranked in SQL.

        NaN scores are skipped; ties go to the lower feature id. ``by="refusal_score"`` ranks the
        stored refusal features (the top :data:`REFUSAL_TOP_N` per step, so ``k`` up to that).
        """
        k = int(k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if by == "refusal_score":
            return self._df(
                """SELECT r.feature, r.refusal_score AS score, r.harmful_drift, r.harmless_drift,
                          r.refusal_score, r.z_score, r."rank", r.emerging, l.label
                   FROM refusal_features r
                   LEFT JOIN feature_labels l ON l.hook = r.hook AND l.feature = r.feature
                   WHERE r.run_id = ? AND r.step = ? AND r.hook = ? AND NOT isnan(r.refusal_score)
                   ORDER BY score DESC, r.feature LIMIT ?""",
                [run_id, int(step), hook, k],
            )
        if by not in TOP_BY_SQL:
            raise ValueError(f"unknown ranking {by!r}; use one of {sorted([*TOP_BY_SQL, 'refusal_score'])}")
        score = TOP_BY_SQL[by]
        return self._df(
            f"""SELECT f.feature, {score} AS score, {_FEATURE_SELECT}, l.label
                FROM feature_stats f
                LEFT JOIN feature_labels l ON l.hook = f.hook AND l.feature = f.feature
                WHERE f.run_id = ? AND f.step = ? AND f.hook = ? AND f.category = ? AND NOT isnan({score})
                ORDER BY score DESC, f.feature LIMIT ?""",
            [run_id, int(step), hook, category, k],
        )

    def feature_trajectory(self, run_id: str, hook: str, feature: int, category: str = ALL) -> pd.DataFrame:
        """One feature's statistics over steps (steps where it fired in neither model are absent)."""
        return self._df(
            f"""SELECT f.step, {_FEATURE_SELECT} FROM feature_stats f
                WHERE f.run_id = ? AND f.hook = ? AND f.feature = ? AND f.category = ? ORDER BY f.step""",
            [run_id, hook, int(feature), category],
        )

    def refusal_features(
        self, run_id: str, hook: str, steps: Sequence[int] | None = None, k: int | None = None
    ) -> pd.DataFrame:
        """Stored refusal features over steps; ``k`` keeps ranks ≤ k plus every emerging feature."""
        sql = (
            'SELECT r.step, r.feature, r.harmful_drift, r.harmless_drift, r.refusal_score, r.z_score, r."rank", '
            "r.emerging, l.label FROM refusal_features r "
            "LEFT JOIN feature_labels l ON l.hook = r.hook AND l.feature = r.feature "
            "WHERE r.run_id = ? AND r.hook = ?"
        )
        params: list[Any] = [run_id, hook]
        if steps is not None:
            sql, params = sql + " AND list_contains(?, r.step)", params + [[int(s) for s in steps]]
        if k is not None:
            sql, params = sql + ' AND (r."rank" <= ? OR r.emerging)', params + [int(k)]
        return self._df(sql + ' ORDER BY r.step, r."rank" NULLS LAST, r.feature', params)

    def alerts(
        self,
        run_id: str | None = None,
        status: str | None = None,
        severity: str | None = None,
        hook: str | None = None,
    ) -> pd.DataFrame:
        """Alerts, newest step first, filtered by any of the given fields."""
        clauses, params = [], []
        for column, value in (("run_id", run_id), ("status", status), ("severity", severity), ("hook", hook)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return self._df(f"SELECT * FROM alerts {where} ORDER BY step DESC, created_at DESC, alert_id", params)

    def resolve_run(self, run: str) -> str:
        """The id of the run whose id or name is ``run``; a clear error if none or several match."""
        runs = self._df("SELECT run_id, name FROM runs ORDER BY created_at DESC")
        match = runs[(runs.run_id == run) | (runs.name == run)]
        if match.empty:
            known = ", ".join(f"{r.run_id} ({r.name})" for r in runs.head(10).itertuples()) or "none"
            raise StoreError(f"{self.path}: no run with id or name {run!r}; runs: {known}")
        if len(match) > 1:
            raise StoreError(f"{self.path}: several runs are named {run!r}; give the run id: {match.run_id.tolist()}")
        return str(match.run_id.iloc[0])

    def verifications(self, run_id: str | None = None, hook: str | None = None) -> pd.DataFrame:
        """``drift-monitor verify`` results, newest first (empty when there are none, also in
        files written before the table existed)."""
        with self._connection() as con:
            have = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'verifications'"
                               ).fetchall()[0][0]
            if not have:
                return pd.DataFrame(columns=list(VERIFICATION_COLUMNS))
            clauses, params = [], []
            for column, value in (("run_id", run_id), ("hook", hook)):
                if value is not None:
                    clauses.append(f"{column} = ?")
                    params.append(value)
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            return con.execute(f"SELECT * FROM verifications {where} ORDER BY created_at DESC, verify_id, "
                               "CASE condition WHEN 'fine_tuned' THEN 0 WHEN 'ablated' THEN 1 WHEN 'random' THEN 2 "
                               "WHEN 'base' THEN 3 ELSE 4 END, draw", params).df()

    def labels(self, hook: str) -> pd.DataFrame:
        return self._df("SELECT feature, label, source FROM feature_labels WHERE hook = ? ORDER BY feature", [hook])

    # -- dashboard helpers: small, parameterised, aggregated in SQL ------------------------------

    def metric_sparklines(self, names: Sequence[str], last_n: int = 50) -> pd.DataFrame:
        """Per run and metric, the last ``last_n`` values over steps (mean over hooks, NaN skipped),
        as lists: ``run_id, name, steps, values`` (for a runs table with sparklines)."""
        return self._df(
            """WITH m AS (SELECT run_id, name, step, avg(value) AS value FROM metrics
                          WHERE list_contains(?, name) AND NOT isnan(value) GROUP BY run_id, name, step),
                    r AS (SELECT *, row_number() OVER (PARTITION BY run_id, name ORDER BY step DESC) AS rn FROM m)
               SELECT run_id, name, list(step ORDER BY step) AS steps, list(value ORDER BY step) AS "values"
               FROM r WHERE rn <= ? GROUP BY run_id, name ORDER BY run_id, name""",
            [list(names), int(last_n)],
        )

    def metric_names(self, run_id: str | None = None) -> list[str]:
        """Distinct metric names (of one run, or of every run)."""
        sql, params = "SELECT DISTINCT name FROM metrics", []
        if run_id is not None:
            sql, params = sql + " WHERE run_id = ?", [run_id]
        return self._df(sql + " ORDER BY name", params)["name"].tolist()

    def all_hooks(self) -> list[str]:
        return self._df("SELECT DISTINCT hook FROM snapshots ORDER BY hook")["hook"].tolist()

    def metric_compare(self, run_ids: Sequence[str], name: str, hook: str | None = None) -> pd.DataFrame:
        """One metric over steps for several runs: ``run_id, run_name, step, hook, value``."""
        sql = ("SELECT m.run_id, coalesce(r.name, m.run_id) AS run_name, m.step, m.hook, m.value "
               "FROM metrics m LEFT JOIN runs r USING (run_id) WHERE list_contains(?, m.run_id) AND m.name = ?")
        params: list[Any] = [list(run_ids), name]
        if hook is not None:
            sql, params = sql + " AND m.hook = ?", params + [hook]
        return self._df(sql + " ORDER BY m.run_id, m.hook, m.step", params)

    def direction_projections(self, run_id: str, hook: str) -> pd.DataFrame:
        """The direction monitors of one run and hook over steps: ``step, direction, category,
        projection, delta``, from the metrics named ``direction_projection[_delta]:<direction>:<category>``
        (direction names hold no ':', so the category is everything after the second ':')."""
        return self._df(
            """WITH p AS (
                 SELECT step, value, split_part(name, ':', 1) AS kind, split_part(name, ':', 2) AS direction,
                        substr(name, length(split_part(name, ':', 1)) + length(split_part(name, ':', 2)) + 3)
                          AS category
                 FROM metrics WHERE run_id = ? AND hook = ? AND (starts_with(name, ?) OR starts_with(name, ?)))
               SELECT step, direction, category,
                      first(value) FILTER (WHERE kind = ?) AS projection,
                      first(value) FILTER (WHERE kind = ?) AS delta
               FROM p WHERE direction <> '' AND category <> ''
               GROUP BY step, direction, category ORDER BY direction, category, step""",
            [run_id, hook, PROJECTION + ":", PROJECTION_DELTA + ":", PROJECTION, PROJECTION_DELTA],
        )

    def density_scatter(
        self, run_id: str, step: int, hook: str, category: str = ALL, limit: int = 5000
    ) -> pd.DataFrame:
        """Current vs base density of at most ``limit`` features at one step (the most drifted by
        ``|log_density_ratio|`` first), with labels: ``feature, density, base_density, drift, label``.

        The base density is ``base_count`` times the category's density per firing (``density =
        count / n_tokens``), so it needs no extra column.
        """
        return self._df(
            """WITH f AS (SELECT * FROM feature_stats WHERE run_id = ? AND step = ? AND hook = ? AND category = ?),
                    k AS (SELECT sum(density) / nullif(sum("count"), 0) AS per FROM f WHERE "count" > 0)
               SELECT f.feature, f.density, f.base_count * k.per AS base_density, f.drift,
                      f.log_density_ratio, l.label
               FROM f CROSS JOIN k
               LEFT JOIN feature_labels l ON l.hook = f.hook AND l.feature = f.feature
               ORDER BY CASE WHEN isnan(f.log_density_ratio) THEN -1 ELSE abs(f.log_density_ratio) END DESC,
                        f.feature
               LIMIT ?""",
            [run_id, int(step), hook, category, int(limit)],
        )

    def categories(self, run_id: str, step: int, hook: str) -> list[str]:
        return self._df(
            "SELECT DISTINCT category FROM feature_stats WHERE run_id = ? AND step = ? AND hook = ? ORDER BY category",
            [run_id, int(step), hook],
        )["category"].tolist()


EXPORT_TABLES = ("runs", "snapshots", "metrics", "feature_stats", "refusal_features", "alerts")


def export_run(path: str | os.PathLike[str], run: str, out_dir: str | os.PathLike[str],
               fmt: Literal["parquet", "csv"] = "parquet") -> list[Path]:
    """Write one run's rows of every table to ``out_dir/<run>_<table>.<fmt>`` (DuckDB's COPY).

    ``run`` is a run id or a run name. The file is opened read-only, so a training run can keep
    writing (between its writes).
    """
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"unknown export format {fmt!r}; use parquet or csv")
    reader = StoreReader(path)
    run_id = reader.resolve_run(run)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    written = []
    with reader._connection() as con:
        for table in EXPORT_TABLES:
            target = out / f"{safe}_{table}.{fmt}"
            df = con.execute(f"SELECT * FROM {table} WHERE run_id = ?", [run_id]).df()  # noqa: S608 - fixed names
            if fmt == "parquet":
                df.to_parquet(target, index=False)
            else:
                df.to_csv(target, index=False)
            written.append(target)
    return written
