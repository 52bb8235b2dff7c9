"""A Parquet dataset of exported runs read as a store: archived runs, and runs on object storage.

``drift-monitor export`` without ``--run`` writes every run as ``<root>/table=<table>/run=<run
id>/*.parquet`` (:func:`~.merge.export_dataset`), plus ``table=feature_labels/`` and
``table=meta/`` (the layout's version), unpartitioned. :class:`~.reader.StoreReader` given such a
root reads it through :func:`connect`: an in-memory DuckDB with one view per store table over
``read_parquet``, so every reader query runs unchanged and the dashboard, ``runs`` and
``export --run`` work on an archive as on a store file.

Why the views look the way they do:

* **Each view starts from the table's empty stand-in** (the store's own DDL, :func:`~.many.ddl_of`,
  in a schema of its own) ``UNION ALL BY NAME`` the Parquet files: column order and types come
  out as in a store file, a column a dataset lacks reads NULL, a table it lacks reads empty.
* **``run_id`` is the folder's ``run=`` value** (read back as VARCHAR, never cast: a run named
  ``007`` stays ``007``; DuckDB unescapes what it escaped on export, ``/``, ``=``, ``%``, spaces,
  non-ASCII). The files hold ``run_id`` too, but only the folder lets DuckDB skip every other
  run's files when a query asks for one run: on object storage each skipped file is a request.
* **No ``union_by_name``**: it opens every file of a table to merge their schemas, for every
  query, which undoes that skipping; one export writes every file of a table with the same
  columns, so the first file's schema is every file's.
* **Read-only.** A dataset is an archive: nothing writes back. :func:`refuse_write` is what a
  writer (:class:`~.writer.Store`, ``verify --db``) calls, and the dashboard turns its two
  writing controls off for a dataset by itself.

Object storage: a root such as ``s3://bucket/prefix``, ``gs://...`` or ``https://...`` is handed
to DuckDB, which reads it with its ``httpfs`` extension (``INSTALL httpfs`` once per machine) and
the credentials of a DuckDB secret (``CREATE PERSISTENT SECRET``: every DuckDB connection on the
machine, ours included, finds it). A missing extension or a refused request is one
:class:`DatasetError` line naming that fix.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import duckdb

from drift_monitor.errors import first_line

from .errors import StoreEmpty, StoreError, StoreNotFound
from .many import ddl_of, quoted
from .schema import COLUMNS, SCHEMA_VERSION, check_schema_version

#: The folder prefix of each table in a dataset.
TABLE_DIR = "table="
#: URL schemes handed to DuckDB's httpfs (a remote root is always a dataset, never a store file).
REMOTE_SCHEMES = ("s3", "s3a", "s3n", "gs", "gcs", "r2", "az", "azure", "abfss", "http", "https", "hf")
#: ``scheme:/`` or ``scheme://``: pathlib collapses ``//``, so a URL that went through a Path
#: (StoreReader keeps its path as one) reads ``s3:/bucket``; both mean the same root.
_URL = re.compile(rf"^({'|'.join(REMOTE_SCHEMES)}):/+(.+)$", re.IGNORECASE)
#: How to get the extension where DuckDB cannot download it by itself at query time.
INSTALL_HINT = "python -c \"import duckdb; duckdb.execute('INSTALL httpfs')\""


class DatasetError(StoreError):
    """A dataset that cannot be read (a remote one without httpfs or credentials), or a write to one."""


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an object-storage or web URL (``s3://``, ``gs://``, ``https://``, ...)."""
    return bool(_URL.match(str(path)))


def root_of(path: str | os.PathLike[str]) -> str:
    """The dataset root as DuckDB reads it: a URL with its ``//`` back, a local path as given,
    without a trailing separator."""
    m = _URL.match(str(path))
    if m:
        return f"{m[1].lower()}://{m[2].rstrip('/')}"
    s = str(path)
    return s.rstrip("/" + os.sep) or s


def is_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a dataset root: a URL, or a directory with a ``table=<name>`` folder.

    Cheap (one directory listing, stopped at the first ``table=`` folder) and unambiguous: a
    store directory holds ``*.duckdb`` files and never a ``table=`` folder.
    """
    if is_remote(path):
        return True
    try:
        with os.scandir(path) as entries:
            return any(e.name.startswith(TABLE_DIR) and e.is_dir() for e in entries)
    except OSError:  # not a directory, does not exist, a glob pattern
        return False


def refuse_write(path: str | os.PathLike[str], action: str) -> None:
    """Raise :class:`DatasetError` when ``path`` is a dataset, or a file directly inside one
    (a store file there would be invisible: readers of the folder read the dataset)."""
    p = str(path)
    inside = not is_remote(p) and is_dataset(Path(p).parent)
    if is_dataset(p) or inside:
        where = root_of(p) if not inside else f"{Path(p).parent} (the folder of {p})"
        raise DatasetError(f"{where}: an exported Parquet dataset is read-only and {action}; give the store "
                           "file or store directory the runs were exported from")


#: A remote dataset's views are rebuilt at most this often (a local one whenever its folders change).
REMOTE_REFRESH_S = 300.0
#: root -> (signature, connection holding the views, schema version): built once per dataset.
_OPEN: dict[str, tuple[object, duckdb.DuckDBPyConnection, str]] = {}
_OPEN_LOCK = threading.Lock()


def connect(path: str | os.PathLike[str], check_version: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection (close it after the call) whose views read the dataset at ``path``.

    Why a cursor on views built once per dataset, when a store file is opened per call: there is
    no writer to let in (a dataset is never written), and building the views lists every table's
    folder and reads a file footer per table, 60 ms locally and a request each on object storage.
    They are rebuilt when the local folders change (a dataset deleted and exported again) or,
    remote, every :data:`REMOTE_REFRESH_S` seconds.

    Raises StoreNotFound for a local root that is gone, StoreEmpty for one without Parquet
    files, SchemaVersionError for a dataset written by a layout this code cannot read, and
    DatasetError for a remote one DuckDB cannot reach (httpfs, credentials).
    """
    root = root_of(path)
    signature = _signature(root)
    with _OPEN_LOCK:
        held = _OPEN.get(root)
        if held is None or held[0] != signature:
            _OPEN.pop(root, None)
            con = _open(root)
            held = _OPEN[root] = (signature, con, _version(con))
        cursor = held[1].cursor()  # a connection of its own to the same views: one per call and thread
    if check_version:
        try:
            check_schema_version(root, held[2])  # root, not a Path: a URL keeps its //
        except BaseException:
            cursor.close()
            raise
    return cursor


def _signature(root: str) -> object:
    """What changes when a local dataset is replaced: its table folders and their times."""
    if is_remote(root):
        return int(time.monotonic() // REMOTE_REFRESH_S)
    try:
        with os.scandir(root) as entries:
            return sorted((e.name, e.inode(), e.stat().st_mtime_ns) for e in entries if e.name.startswith(TABLE_DIR))
    except OSError:
        raise StoreNotFound(f"no drift-monitor dataset at {root} (the folder does not exist)") from None


def _open(root: str) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the dataset's views (module docstring)."""
    con = duckdb.connect(":memory:")
    try:
        if is_remote(root):
            _load_httpfs(con, root)
        try:
            _create_views(con, root)
        except duckdb.Error as e:
            if not is_remote(root):
                raise
            raise DatasetError(f"{root}: cannot read the dataset ({first_line(e)}); check the URL, and that DuckDB "
                               "has credentials for it (CREATE PERSISTENT SECRET, see docs/store.md, "
                               "\"Reading a dataset back\")") from None
    except BaseException:
        con.close()
        raise
    return con


def _version(con: duckdb.DuckDBPyConnection) -> str:
    found = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    return str(found[0][0]) if found else "none"


def _load_httpfs(con: duckdb.DuckDBPyConnection, root: str) -> None:
    """LOAD httpfs, never a download at query time (a dashboard would hang on a machine without
    network): a missing extension is one line with the command that installs it."""
    try:
        con.execute("LOAD httpfs")
    except duckdb.Error as e:
        raise DatasetError(f"{root}: reading a dataset from object storage needs DuckDB's httpfs extension, "
                           f"which is not installed here ({first_line(e)}); install it once with {INSTALL_HINT} "
                           "(or copy the dataset to a local folder), and give DuckDB credentials with "
                           "CREATE PERSISTENT SECRET") from None


def _files(con: duckdb.DuckDBPyConnection, root: str, table: str) -> str | None:
    """The ``read_parquet`` pattern of ``table``'s files, or None when the dataset has none."""
    pattern = f"{root}/{TABLE_DIR}{table}/**/*.parquet"
    return pattern if con.execute("SELECT 1 FROM glob(?) LIMIT 1", [pattern]).fetchall() else None


def _create_views(con: duckdb.DuckDBPyConnection, root: str) -> None:
    meta = _files(con, root, "meta")
    if meta is not None:
        con.execute(f"CREATE VIEW meta AS SELECT key, value FROM read_parquet({quoted(meta)})")
    else:  # a dataset exported before the version was written: the views give the current layout
        con.execute(f"CREATE VIEW meta AS SELECT 'schema_version' AS key, '{SCHEMA_VERSION}' AS value")
    con.execute("CREATE SCHEMA layout")
    con.execute("USE layout")
    for table in COLUMNS:
        con.execute(ddl_of(table))
    con.execute("USE memory.main")
    any_files = False
    for table, cols in COLUMNS.items():
        pattern = _files(con, root, table)
        sql = f"SELECT * FROM layout.{table}"
        if pattern is not None:
            any_files = True
            sql += " UNION ALL BY NAME " + _parquet_select(pattern, cols)
        if table == "runs":
            sql = f"SELECT *, {quoted(root)} AS store_file FROM ({sql})"
        con.execute(f"CREATE VIEW {table} AS {sql}")
    if not any_files:
        raise StoreEmpty(f"{root}: a dataset folder without Parquet files: export runs into it with "
                         "drift-monitor export --db STORE --out FOLDER")


def _parquet_select(pattern: str, cols: tuple[str, ...]) -> str:
    """The store columns of a table's Parquet files (hive columns of the root's own path left out),
    ``run_id`` from the ``run=`` folder where the table is per run."""
    per_run = "run_id" in cols
    keep = ", ".join(quoted(c) for c in cols if not (per_run and c == "run_id"))
    options = "hive_partitioning = true, hive_types = {'run': VARCHAR}, " if per_run else \
        "hive_partitioning = false, "
    return (f"SELECT COLUMNS(lambda c: list_contains([{keep}], c)){', run AS run_id' if per_run else ''} "
            f"FROM read_parquet({quoted(pattern)}, {options}union_by_name = false)")
