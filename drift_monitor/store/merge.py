"""Many stores into one: ``drift-monitor merge`` and the hive-partitioned dataset export.

Why: runs written one file per run (a store directory) or on several machines are archived
together, and analysed outside drift-monitor. Both read their sources the way every reader does
(:mod:`.many`: files, directories and globs as one, colliding run ids kept apart), so a merge
holds exactly what a reader of the sources showed.

* :func:`merge` writes every row of the sources into one new store file (schema and all), or,
  into a directory, one file per run (``<dir>/<run>.duckdb``, as a run writes there).
* Pre-flight results belong to a dataset, not a run: a merge carries each once (the same
  result copied into several sources is one ``preflight_id``; its newest row is kept), into the
  merged file, or, into a directory, into a file of their own (:func:`~.many.preflight_file`),
  written only when there are any. A dataset export holds them unpartitioned, like the labels.
* :func:`export_dataset` writes every run as a hive-partitioned Parquet dataset,
  ``<out>/table=<table>/run=<run id>/*.parquet``, which DuckDB (``read_parquet(...,
  hive_partitioning = true)``), pandas/pyarrow and Spark read directly, and so does
  :class:`~.reader.StoreReader` (:mod:`.dataset`; with the labels and the layout's version, in
  ``table=feature_labels/`` and ``table=meta/``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import duckdb

from .errors import StoreError
from .many import attach_files, is_many, preflight_file, quoted, run_file, store_files
from .schema import COLUMNS, PREFLIGHT_NEWEST, SCHEMA_VERSION, create_schema

#: The tables whose rows belong to no run: labels (a hook's) and pre-flight results (a dataset's).
SHARED_TABLES = tuple(t for t, cols in COLUMNS.items() if "run_id" not in cols)
#: The tables a merge into a directory and a dataset carry per run (every other one).
RUN_TABLES = tuple(t for t in COLUMNS if t not in SHARED_TABLES)
#: Pre-flight rows, one per id (the newest): a result copied into several sources is one result.
PREFLIGHT_ROWS = f"SELECT * FROM preflight {PREFLIGHT_NEWEST}"


def _sources_connection(sources: Sequence[str | os.PathLike[str]]) -> duckdb.DuckDBPyConnection:
    """An in-memory connection whose views are every store file of ``sources`` together (store.many)."""
    files = [f for src in sources for f in store_files(src)]
    if not files:
        raise StoreError(f"no drift-monitor store file at {', '.join(map(str, sources))}: give store files, "
                         "store directories or globs")
    con = duckdb.connect(":memory:")
    try:
        attach_files(con, files, ", ".join(map(str, sources)))
    except BaseException:
        con.close()
        raise
    return con


def merge(sources: Sequence[str | os.PathLike[str]], into: str | os.PathLike[str]) -> list[str]:
    """Copy every run of ``sources`` into ``into`` (a new file, or a directory: a file per run).
    Returns the run ids merged."""
    con = _sources_connection(sources)
    try:
        run_ids = [r[0] for r in con.execute("SELECT run_id FROM runs ORDER BY run_id").fetchall()]
        if is_many(into) or str(into).endswith(("/", os.sep)):
            Path(into).mkdir(parents=True, exist_ok=True)
            for rid in run_ids:
                _copy(con, run_file(into, rid), [rid])
            if con.execute("SELECT count(*) FROM preflight").fetchall()[0][0]:
                _copy(con, preflight_file(into), None, tables=("preflight",))
        else:
            _copy(con, Path(into), None)
        return run_ids
    finally:
        con.close()


def _copy(con: duckdb.DuckDBPyConnection, target: Path, run_ids: list[str] | None,
          tables: Sequence[str] = tuple(COLUMNS)) -> None:
    """Insert the views' rows of ``tables`` (of ``run_ids``; None: all) into a new store file
    ``target``, in one transaction; a failed copy leaves no file behind."""
    if target.exists():
        raise StoreError(f"merge: {target} exists already; merge into a new file or an empty directory")
    with duckdb.connect(str(target)) as dst:
        create_schema(dst)
    try:
        con.execute(f"ATTACH {quoted(target)} AS dst")
        try:
            con.execute("BEGIN")
            for table in tables:
                cols = COLUMNS[table]
                if run_ids is not None and "run_id" not in cols:
                    continue  # labels and pre-flights belong to no run: a run's file does not carry them
                col_sql = ", ".join(f'"{c}"' for c in cols)
                where, params = ("", []) if run_ids is None else \
                    (" WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [run_ids])
                source = f"({PREFLIGHT_ROWS})" if table == "preflight" else table
                con.execute(f"INSERT INTO dst.{table} ({col_sql}) SELECT {col_sql} FROM {source}{where}", params)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.execute("DETACH dst")
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def export_dataset(sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> list[Path]:
    """Every run of ``sources`` as ``<out>/table=<table>/run=<run id>/*.parquet``. Returns the table folders."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"export: {out} is not empty; give a new or empty folder for the dataset")
    out.mkdir(parents=True, exist_ok=True)
    con = _sources_connection(sources)
    written = []
    try:
        for table in RUN_TABLES:
            if not con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]:
                continue
            target = out / f"table={table}"
            cols = ", ".join(f'"{c}"' for c in COLUMNS[table])
            con.execute(f"COPY (SELECT {cols}, run_id AS run FROM {table}) TO {quoted(target)} "
                        "(FORMAT PARQUET, PARTITION_BY (run))")
            written.append(target)
        # labels (per hook), pre-flight results (per dataset) and the layout's version,
        # unpartitioned: a reader of the dataset (store.dataset) shows them and checks the
        # version as it does for a store file
        shared = [("feature_labels", "SELECT * FROM feature_labels"),
                  ("meta", f"SELECT 'schema_version' AS key, '{SCHEMA_VERSION}' AS value")]
        if con.execute("SELECT count(*) FROM preflight").fetchall()[0][0]:  # a folder only when there are any
            shared.append(("preflight", PREFLIGHT_ROWS))
        for table, select in shared:
            target = out / f"table={table}"
            target.mkdir()
            con.execute(f"COPY ({select}) TO {quoted(target / 'data_0.parquet')} (FORMAT PARQUET)")
            written.append(target)
    finally:
        con.close()
    return written
