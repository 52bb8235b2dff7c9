"""The table layout, its version number, and the migrations that bring an older file up to date.

Why versions: a store outlives the code that wrote it (a run's file is kept, copied, opened by
later releases), so the file records the version of its layout in ``meta.schema_version`` and
the code refuses a layout it does not know instead of failing half-way through a query.

Why migrations: adding a table must not strand the files written before it. The layout is the
version-1 DDL (:data:`V1_DDL`) followed by :data:`MIGRATIONS`, an ordered list in which the
migration to version *n* holds the statements that turn a version *n-1* file into a version *n*
one. The writer opens a file read-write, so it applies the pending migrations in order, in one
transaction together with the version bump (:func:`upgrade_schema`). Readers open the file
read-only and cannot migrate: they accept every version from :data:`OLDEST_VERSION` to
:data:`SCHEMA_VERSION` and treat a table added by a later migration as empty. A fresh file is
built from the same statements (:func:`create_schema`), so a new file and a migrated one cannot
differ.

Adding a migration: append a :class:`Migration` with the next version number; every statement
must be idempotent (``IF NOT EXISTS``), because :func:`create_schema` replays them all on a file
that may already hold some of them.

SQL is built only from the constants here (never from user data or file contents), and every
value travels as a parameter or an Arrow column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from drift_monitor.records import FEATURE_COLUMNS, REFUSAL_COLUMNS

from .connection import transaction
from .errors import SchemaVersionError

log = logging.getLogger(__name__)

#: The first released layout; files of this version or later can be read and migrated.
OLDEST_VERSION = 1

VERIFICATION_COLUMNS = ("verify_id", "run_id", "step", "hook", "created_at", "condition", "draw", "features",
                        "n_features", "alpha", "seed", "harmful_refusal_rate", "harmless_refusal_rate",
                        "kl_harmless", "n_harmful", "n_harmless", "examples_json", "summary_json")

RESIDUAL_COLUMNS = ("run_id", "step", "hook", "rank", "share", "variance", "nearest_feature", "decoder_cos",
                    "projections_json", "top_tokens_json", "bottom_tokens_json", "vector")

#: Alert notifications and their delivery state (drift_monitor.notify.messages.Notification's fields).
NOTIFICATION_COLUMNS = ("notification_id", "alert_id", "run_id", "target", "event", "rule", "severity", "hook",
                        "step", "message", "value", "threshold", "created_at", "notified_at", "attempts",
                        "last_error")

#: Pre-flight results (drift_monitor.preflight.result.PreflightResult): one row per dataset read
#: against a start model, before training. No run_id: a result belongs to a dataset, and a run
#: finds its own by the data it names (``outputs.train_data``, drift_monitor.store.preflights).
#: ``layers``, ``per_layer_json``, ``raises_json``, ``erodes_json``, ``settings_json``: JSON;
#: ``sae_json``: the SAE signals (``PreflightResult.sae_dict``: feature score, top examples by it,
#: refusal features, the features the data pushes), empty for a check without SAEs.
PREFLIGHT_COLUMNS = ("preflight_id", "created_at", "model", "model_fingerprint", "dataset", "data_hash",
                     "n_examples", "mode", "layers", "score", "per_layer_json", "data_refusal_share",
                     "own_refusal_share", "raises_json", "erodes_json", "settings_json", "sae_json")

#: Columns of each table in store order (the Arrow tables are inserted by these names).
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
    "residual_directions": RESIDUAL_COLUMNS,
    "notifications": NOTIFICATION_COLUMNS,
    "preflight": PREFLIGHT_COLUMNS,
}

#: DDL of schema version 1. Only small tables carry primary keys (see the package docstring).
V1_DDL: tuple[str, ...] = (
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
    # Ids of spooled writes already applied: makes a spool replay exactly-once (package docstring).
    "CREATE TABLE IF NOT EXISTS _spool_applied (op_id VARCHAR PRIMARY KEY, applied_at TIMESTAMP)",
)

#: Results of ``drift-monitor verify``, one row per condition (and random draw): migration 2.
#: ``IF NOT EXISTS`` matters here: files written before the migration existed were created
#: with this table while still recording version 1.
VERIFICATIONS_DDL = """CREATE TABLE IF NOT EXISTS verifications (
        verify_id VARCHAR, run_id VARCHAR, step BIGINT, hook VARCHAR, created_at TIMESTAMP, condition VARCHAR,
        draw INTEGER, features VARCHAR, n_features INTEGER, alpha DOUBLE, seed INTEGER,
        harmful_refusal_rate DOUBLE, harmless_refusal_rate DOUBLE, kl_harmless DOUBLE, n_harmful INTEGER,
        n_harmless INTEGER, examples_json VARCHAR, summary_json VARCHAR)"""


#: Directions of new SAE error (drift_monitor.probe.residual), per snapshot and hook: migration 3.
RESIDUAL_DDL = """CREATE TABLE IF NOT EXISTS residual_directions (
        run_id VARCHAR, step BIGINT, hook VARCHAR, "rank" INTEGER, share DOUBLE, variance DOUBLE,
        nearest_feature INTEGER, decoder_cos DOUBLE, projections_json VARCHAR, top_tokens_json VARCHAR,
        bottom_tokens_json VARCHAR, vector FLOAT[])"""


#: Webhook notifications of alerts, one row per (alert event, target), with the delivery state
#: (drift_monitor.notify): migration 4. Small (a few rows per alert), so it has a primary key.
NOTIFICATIONS_DDL = """CREATE TABLE IF NOT EXISTS notifications (
        notification_id VARCHAR PRIMARY KEY, alert_id VARCHAR, run_id VARCHAR, target VARCHAR, event VARCHAR,
        rule VARCHAR, severity VARCHAR, hook VARCHAR, step BIGINT, message VARCHAR, value DOUBLE,
        threshold DOUBLE, created_at TIMESTAMP, notified_at TIMESTAMP, attempts INTEGER, last_error VARCHAR)"""


#: Pre-flight results (drift-monitor preflight): migration 5. Small (one row per check), so it
#: has a primary key; a result re-written under its id replaces the earlier row.
PREFLIGHT_DDL = """CREATE TABLE IF NOT EXISTS preflight (
        preflight_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, model VARCHAR, model_fingerprint VARCHAR,
        dataset VARCHAR, data_hash VARCHAR, n_examples BIGINT, mode VARCHAR, layers VARCHAR, score DOUBLE,
        per_layer_json VARCHAR, data_refusal_share DOUBLE, own_refusal_share DOUBLE, raises_json VARCHAR,
        erodes_json VARCHAR, settings_json VARCHAR, sae_json VARCHAR)"""

#: Keeps one row per pre-flight result where several files hold it (a merge's sources, a store
#: directory): the newest. Appended to a query over ``preflight`` rows.
PREFLIGHT_NEWEST = "QUALIFY row_number() OVER (PARTITION BY preflight_id ORDER BY created_at DESC) = 1"


@dataclass(frozen=True)
class Migration:
    """The statements that turn a file of version ``version - 1`` into one of ``version``."""

    version: int
    why: str
    statements: tuple[str, ...]


#: Every change to the layout since :data:`OLDEST_VERSION`, in order.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "verifications table for drift-monitor verify results", (VERIFICATIONS_DDL,)),
    Migration(3, "residual_directions table for the residual monitor", (RESIDUAL_DDL,)),
    Migration(4, "notifications table: alert webhooks and their delivery state", (NOTIFICATIONS_DDL,)),
    Migration(5, "preflight table: drift-monitor preflight results (a dataset read against a start model)",
              (PREFLIGHT_DDL,)),
)

#: Version of the layout this code writes: the last migration's.
SCHEMA_VERSION = MIGRATIONS[-1].version if MIGRATIONS else OLDEST_VERSION

if [m.version for m in MIGRATIONS] != list(range(OLDEST_VERSION + 1, SCHEMA_VERSION + 1)):
    raise AssertionError("MIGRATIONS must number consecutive versions after OLDEST_VERSION")


def create_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table and record :data:`SCHEMA_VERSION` (idempotent, one transaction).

    A file that already records a version keeps it: bringing it up to date is
    :func:`upgrade_schema`'s job.
    """
    with transaction(con):
        for ddl in (*V1_DDL, *(sql for m in MIGRATIONS for sql in m.statements)):
            con.execute(ddl)
        con.execute(
            "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING", [str(SCHEMA_VERSION)]
        )


def as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def stored_schema_version(con: duckdb.DuckDBPyConnection) -> str | None:
    """The schema version recorded in the file, or None if it has no drift-monitor schema."""
    try:
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    except duckdb.CatalogException:  # no meta table: not (yet) a drift-monitor store
        return None
    return rows[0][0] if rows else None


def check_schema_version(path: Path, found: str) -> int:
    """The file's version as a number if this code can read (and migrate) it, else raise
    :class:`SchemaVersionError` naming the fix."""
    version = as_int(found, -1)
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(path, found, SCHEMA_VERSION, "upgrade drift-monitor")
    if version < OLDEST_VERSION:
        raise SchemaVersionError(
            path, found, SCHEMA_VERSION, f"re-create the store (migrations start at version {OLDEST_VERSION})"
        )
    return version


def upgrade_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Make the schema of a file open read-write current: create it in a file that has none,
    apply the pending migrations (in order, one transaction with the version bump) to an older
    one, and refuse a version this code cannot handle."""
    found = stored_schema_version(con)
    if found is None:
        create_schema(con)
        return
    version = check_schema_version(path, found)
    pending = [m for m in MIGRATIONS if m.version > version]
    if not pending:
        return
    with transaction(con):
        for migration in pending:
            for sql in migration.statements:
                con.execute(sql)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    log.info("drift-monitor: migrated %s from schema version %s to %d (%s)", path, found, SCHEMA_VERSION,
             "; ".join(m.why for m in pending))
