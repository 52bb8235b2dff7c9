"""Many store files read as one: a directory (one file per run) or a glob.

Why: one DuckDB file takes one writer process at a time, so a team running many fine-tunes at
once gives each run its own file (``db_path`` a directory: ``<dir>/<run_id>.duckdb``, see
:func:`run_file`), and every reader shows them together. DuckDB's own means do the joining: an
in-memory database ATTACHes each file read-only and every table becomes a ``UNION ALL BY NAME``
view over the files that hold it (a table a file's older schema lacks is skipped; one no file
has is created empty), so every query of :class:`~.reader.StoreReader` runs unchanged.

Runs keep their identity: where two files hold the same run id (two scans named alike in
different places), the later file's ids read ``<file stem>/<run id>`` in every table.
``runs.store_file`` says which file a run lives in (what a write back, e.g. ``verify``, needs).
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from .errors import StoreEmpty, StoreNotFound
from .schema import COLUMNS, MIGRATIONS, V1_DDL, _check_version, _stored_schema_version

#: The suffix of a store file inside a store directory.
SUFFIX = ".duckdb"


def is_many(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names many store files: an existing directory, a path ending with a
    separator, or a glob pattern."""
    s = str(path)
    return s.endswith(("/", os.sep)) or Path(s).is_dir() or any(c in s for c in "*?[")


def run_file(directory: str | os.PathLike[str], run_id: str) -> Path:
    """The file of ``run_id`` in a store directory (made safe as a file name)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id) or "run"
    return Path(directory) / f"{safe}{SUFFIX}"


def exists(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a store: the file, or at least one store file of a directory/glob."""
    return bool(store_files(path)) if is_many(path) else Path(path).is_file()


def store_files(path: str | os.PathLike[str]) -> list[Path]:
    """The store files a directory or glob names, sorted (no spool or temporary files); a single
    file names itself."""
    s = str(path)
    if not is_many(s):
        return [Path(s)] if Path(s).is_file() else []
    pattern = s if any(c in s for c in "*?[") else os.path.join(s, f"*{SUFFIX}")
    return sorted(Path(p) for p in globlib.glob(pattern) if Path(p).is_file() and p.endswith(SUFFIX))


def locate(runs: Any, run_id: str) -> tuple[str, str]:
    """(store file, run id inside that file) of a run listed by ``StoreReader.runs()`` over many
    files: a write back (verify, an acknowledgement) goes to the run's own file, under the id the
    file knows (without the ``<file stem>/`` a colliding id reads with)."""
    row = runs.loc[runs.run_id == run_id]
    if not len(row):
        raise KeyError(run_id)
    path = Path(str(row.store_file.iloc[0]))
    prefix = f"{path.stem}/"
    return str(path), run_id[len(prefix):] if run_id.startswith(prefix) else run_id


def _ddl_of(table: str) -> str:
    """The CREATE statement of ``table`` in the current layout (an empty stand-in)."""
    for sql in (*V1_DDL, *(s for m in MIGRATIONS for s in m.statements)):
        if re.search(rf"CREATE TABLE IF NOT EXISTS {table}\b", sql):
            return sql
    raise KeyError(table)


def _quoted(value: str | os.PathLike[str]) -> str:
    """A SQL string literal (file paths and prefixes come from the file system, never from a query)."""
    return "'" + str(value).replace("'", "''") + "'"


def attach_all(con: duckdb.DuckDBPyConnection, path: str | os.PathLike[str], check_version: bool = True) -> None:
    """ATTACH every store file of ``path`` read-only to ``con`` and create one view per table.

    Raises StoreNotFound when nothing matches, StoreEmpty when no file holds drift-monitor data,
    and the schema-version error of a file this code cannot read. A file locked by its writer
    raises duckdb.IOException, which the caller retries like a single locked file.
    """
    files = store_files(path)
    if not files:
        raise StoreNotFound(f"no drift-monitor store files at {path} (no *{SUFFIX} files): give a store file, a "
                            f"store directory of <run>{SUFFIX} files, or a glob that matches them")
    attach_files(con, files, str(path), check_version)


def attach_files(con: duckdb.DuckDBPyConnection, files: Sequence[Path], where: str, check_version: bool = True) -> None:
    """:func:`attach_all` for an explicit list of store files (``where`` names them in errors)."""
    tables_of: list[tuple[str, Path, set[str]]] = []
    versions = []
    for i, f in enumerate(files):
        alias = f"s{i}"
        con.execute(f"ATTACH {_quoted(f)} AS {alias} (READ_ONLY)")
        found = _version_of(con, alias)
        if found is None:
            continue  # an empty DuckDB file (a run that has not written yet)
        if check_version:
            _check_version(f, found)
        versions.append(int(found))
        names = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = ?", [alias]).fetchall()}
        tables_of.append((alias, f, names))
    if not tables_of:
        raise StoreEmpty(f"{where}: no store file there holds drift-monitor data yet")
    renamed = _colliding(con, tables_of)
    for table, cols in COLUMNS.items():
        parts = [_select(alias, table, cols, renamed.get(alias)) for alias, _, names in tables_of if table in names]
        if not parts:
            con.execute(_ddl_of(table))
            if table == "runs":
                con.execute("ALTER TABLE runs ADD COLUMN store_file VARCHAR")
            continue
        if table == "runs":
            parts = [f"SELECT *, {_quoted(f)} AS store_file FROM ({_select(alias, table, cols, renamed.get(alias))})"
                     for alias, f, names in tables_of if table in names]
        con.execute(f"CREATE VIEW {table} AS " + " UNION ALL BY NAME ".join(parts))
    # the oldest file's version: what every query may rely on (later tables are empty stand-ins)
    con.execute(f"CREATE VIEW meta AS SELECT 'schema_version' AS key, '{min(versions)}' AS value")


def _version_of(con: duckdb.DuckDBPyConnection, alias: str) -> str | None:
    con.execute(f"USE {alias}")
    try:
        return _stored_schema_version(con)
    finally:
        con.execute("USE memory")


def _colliding(con: duckdb.DuckDBPyConnection, tables_of: Sequence[tuple[str, Path, set[str]]]) -> dict[str, str]:
    """{alias: prefix} for files holding a run id an earlier file already holds."""
    seen: set[str] = set()
    out: dict[str, str] = {}
    for alias, f, names in tables_of:
        if "runs" not in names:
            continue
        ids = {r[0] for r in con.execute(f"SELECT run_id FROM {alias}.runs").fetchall()}
        if ids & seen:
            out[alias] = f"{f.stem}/"
        seen |= ids
    return out


def _select(alias: str, table: str, cols: Sequence[str], prefix: str | None) -> str:
    """One file's rows of ``table``; ``run_id`` (and the alert ids derived from it) prefixed where
    the file's ids collide."""
    if prefix is None or "run_id" not in cols:
        return f"SELECT * FROM {alias}.{table}"
    ids = ", ".join(f"{_quoted(prefix)} || {c} AS {c}" for c in ("run_id", "alert_id") if c in cols)
    return f"SELECT * REPLACE ({ids}) FROM {alias}.{table}"
