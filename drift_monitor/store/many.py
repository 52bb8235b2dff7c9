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

Shard files (``<run>.shard-K-of-N.duckdb``, a sharded scan) are one *unit*: the N files of one
run hold the same run id, never collide with each other, and the ``runs`` view shows one row per
run (:func:`runs_merged`); every other table is their union. A unit's ``store_file`` (and the
stem of a colliding unit's prefix) is its lowest shard's file, the one holding the base rows.

Reading what each file holds (:func:`scan`) is batched: one ATTACH per file, then one query
over all of them per fact, because DuckDB's per-statement cost (milliseconds) times hundreds
of files is what made a directory slow; :mod:`.routing` keeps the result per file between calls.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from drift_monitor.records import RUN_STATUSES, RunStatus

from .connection import retry_locked
from .errors import StoreEmpty, StoreNotFound
from .schema import COLUMNS, MIGRATIONS, V1_DDL, check_schema_version

#: The suffix of a store file inside a store directory.
SUFFIX = ".duckdb"


def is_many(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names many store files: an existing directory, a path ending with a
    separator, or a glob pattern."""
    s = str(path)
    return s.endswith(("/", os.sep)) or Path(s).is_dir() or any(c in s for c in "*?[")


#: A shard file of a sharded scan (``scan --shard K/N``): ``<run>.shard-K-of-N.duckdb``. The N
#: shard files of one run hold one run between them (each its own steps; shard 1 the base).
SHARD = re.compile(r"^(?P<stem>.+)\.shard-(?P<k>\d+)-of-(?P<n>\d+)$")


def run_file(directory: str | os.PathLike[str], run_id: str, shard: tuple[int, int] | None = None) -> Path:
    """The file of ``run_id`` in a store directory (made safe as a file name); ``shard=(k, n)``:
    the file shard ``k`` of ``n`` of a sharded scan writes."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", run_id) or "run"
    tail = f".shard-{shard[0]}-of-{shard[1]}" if shard is not None else ""
    return Path(directory) / f"{safe}{tail}{SUFFIX}"


#: The file of a store directory that holds pre-flight results (they belong to no run). The
#: ``@`` is a character :func:`run_file` never writes, so no run's file can take this name.
PREFLIGHT_FILE = f"@preflight{SUFFIX}"


def preflight_file(directory: str | os.PathLike[str]) -> Path:
    """Where pre-flight results go in a store directory (a merge into one, ``preflight --db DIR``).
    Readers of the directory read it like every other file: it is a store file with no runs."""
    return Path(directory) / PREFLIGHT_FILE


def shard_of(path: str | os.PathLike[str]) -> tuple[str, int, int] | None:
    """(run file stem, k, n) of a shard file (:func:`run_file` with ``shard``); None for any other file."""
    m = SHARD.match(Path(path).name[: -len(SUFFIX)] if str(path).endswith(SUFFIX) else Path(path).name)
    return (m["stem"], int(m["k"]), int(m["n"])) if m else None


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


def unit_of(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The key the files of one unit share: a shard file's folder, run stem and N; any other
    file is a unit of its own."""
    sh = shard_of(path)
    return (str(Path(path).parent), sh[0], str(sh[2])) if sh else (str(path),)


def shard_number(path: str | os.PathLike[str]) -> int:
    """K of a shard file; 1 for a file that is no shard (it holds its whole run)."""
    sh = shard_of(path)
    return sh[1] if sh else 1


def run_stem(path: str | os.PathLike[str]) -> str:
    """The run part of a store file's name: ``<stem>`` of ``<stem>.shard-K-of-N.duckdb`` and of
    ``<stem>.duckdb`` alike (what :func:`run_file` made of the run id)."""
    sh = shard_of(path)
    return sh[0] if sh else Path(path).stem


def shard_count(path: str | os.PathLike[str]) -> int:
    """N of a shard file; 1 for a file that is no shard."""
    sh = shard_of(path)
    return sh[2] if sh else 1


def locate(runs: Any, run_id: str) -> tuple[str, str]:
    """(store file, run id inside that file) of a run listed by ``StoreReader.runs()`` over many
    files: a write back (verify, an acknowledgement) goes to the run's own file (a sharded run's
    lowest shard), under the id the file knows (without the ``<file stem>/`` a colliding id reads with)."""
    row = runs.loc[runs.run_id == run_id]
    if not len(row):
        raise KeyError(run_id)
    path = Path(str(row.store_file.iloc[0]))
    return str(path), unprefixed(path, run_id)


def unprefixed(store_file: str | os.PathLike[str], run_or_alert_id: str) -> str:
    """An id (run or alert) as the unit whose ``store_file`` this is knows it: without the
    ``<file stem>/`` a colliding unit's ids read with."""
    return strip_prefix(f"{Path(store_file).stem}/", run_or_alert_id)


def strip_prefix(prefix: str, run_or_alert_id: str) -> str:
    """An id without ``prefix`` (a colliding unit's ``<stem>/``, :func:`prefixes`), where it has it."""
    return run_or_alert_id[len(prefix):] if prefix and run_or_alert_id.startswith(prefix) else run_or_alert_id


def no_files(path: str | os.PathLike[str]) -> StoreNotFound:
    """The error for a directory or glob that names no store file."""
    return StoreNotFound(f"no drift-monitor store files at {path} (no *{SUFFIX} files): give a store file, a "
                         f"store directory of <run>{SUFFIX} files, or a glob that matches them")


def ddl_of(table: str) -> str:
    """The CREATE statement of ``table`` in the current layout (an empty stand-in)."""
    for sql in (*V1_DDL, *(s for m in MIGRATIONS for s in m.statements)):
        if re.search(rf"CREATE TABLE IF NOT EXISTS {table}\b", sql):
            return sql
    raise KeyError(table)


def quoted(value: str | os.PathLike[str]) -> str:
    """A SQL string literal (file paths and prefixes come from the file system, never from a query)."""
    return "'" + str(value).replace("'", "''") + "'"


#: Per run of each file (``_a``: its alias), what ``StoreReader.runs()`` needs beyond the runs
#: row: the snapshot steps (a list, so that shards' steps count once) and the open alert counts.
#: ``{runs}`` etc.: the union of every file's table, so that one aggregate serves all files.
SUMMARY_SQL = """WITH s AS (SELECT _a, run_id, list(DISTINCT step) AS steps FROM ({snapshots}) GROUP BY _a, run_id),
     a AS (SELECT _a, run_id, count(*) FILTER (WHERE status = 'active') AS active_alerts,
                  count(*) FILTER (WHERE status = 'active' AND NOT acknowledged) AS unacknowledged_alerts
           FROM ({alerts}) GROUP BY _a, run_id)
SELECT r.*, s.steps, coalesce(a.active_alerts, 0) AS active_alerts,
       coalesce(a.unacknowledged_alerts, 0) AS unacknowledged_alerts
FROM ({runs}) r LEFT JOIN s USING (_a, run_id) LEFT JOIN a USING (_a, run_id)"""


@dataclass(frozen=True)
class FileInfo:
    """What one store file holds, as far as choosing files and listing runs needs (:func:`scan`)."""

    path: Path
    version: str | None  #: None: a DuckDB file with no drift-monitor data yet (a run that has not written)
    tables: frozenset[str]
    run_ids: frozenset[str]
    n_labels: int  #: feature_labels rows: labels are per hook, so every query that joins them needs this file
    summary: pa.Table | None  #: :data:`SUMMARY_SQL` rows of the file


def attach(con: duckdb.DuckDBPyConnection, files: Sequence[Path], timeout_s: float = 5.0,
           retries: int | None = None) -> list[tuple[str, Path]]:
    """ATTACH ``files`` read-only to ``con`` (each retried while its writer holds it, then
    StoreLocked); returns (alias, file) pairs."""
    out = []
    for f in files:
        alias = f"s{len(out)}"
        sql = f"ATTACH {quoted(f)} AS {alias} (READ_ONLY)"
        retry_locked(lambda sql=sql: con.execute(sql), str(f), timeout_s, retries)
        out.append((alias, Path(f)))
    return out


def scan(con: duckdb.DuckDBPyConnection, attached: Sequence[tuple[str, Path]]) -> list[FileInfo]:
    """What each attached file holds: one query per fact over all files (see the module docstring)."""
    if not attached:
        return []
    names = ", ".join(quoted(a) for a, _ in attached)
    tables: dict[str, set[str]] = {a: set() for a, _ in attached}
    n_labels: dict[str, int] = {}
    for db, table, rows in con.execute("SELECT database_name, table_name, estimated_size FROM duckdb_tables() "
                                       f"WHERE database_name IN ({names})").fetchall():
        tables[db].add(table)
        if table == "feature_labels":  # DuckDB's row count (deleted rows count until a checkpoint: never too low)
            n_labels[db] = int(rows or 0)
    with_meta = [a for a, _ in attached if "meta" in tables[a]]
    meta = _union(with_meta, "SELECT {q} AS a, value FROM {a}.meta WHERE key = 'schema_version'")
    versions = dict(con.sql(meta).fetchall()) if with_meta else {}
    data = [a for a, _ in attached if versions.get(a) is not None]
    summary = None
    if data:
        unions = {t: _union(data, f"SELECT {{q}} AS _a, {cols} FROM {{a}}.{t}")
                  for t, cols in (("runs", "*"), ("snapshots", "run_id, step"),
                                  ("alerts", "run_id, status, acknowledged"))}
        summary = con.sql(SUMMARY_SQL.format(**unions)).to_arrow_table()
    rows: dict[str, tuple[int, int]] = {}  # alias: (first row, rows) of the summary sorted by alias
    if summary is not None:
        summary = summary.sort_by("_a")
        for i, a in enumerate(summary["_a"].to_pylist()):
            first, n = rows.get(a, (i, 0))
            rows[a] = (first, n + 1)
    out = []
    for alias, f in attached:
        mine = None
        if summary is not None and alias in versions:
            mine = summary.slice(*rows.get(alias, (0, 0))).drop_columns(["_a"])
        out.append(FileInfo(f, versions.get(alias), frozenset(tables[alias]),
                            frozenset(mine["run_id"].to_pylist()) if mine is not None else frozenset(),
                            n_labels.get(alias, 0), mine))
    return out


def _union(aliases: Sequence[str], sql: str) -> str:
    """``sql`` (with ``{a}``: the alias, ``{q}``: it quoted) for every alias, as one query (by
    name: an older file's runs table may order its columns differently)."""
    return " UNION ALL BY NAME ".join(sql.format(a=a, q=quoted(a)) for a in aliases)


def prefixes(infos: Sequence[FileInfo]) -> dict[Path, str]:
    """{file: prefix of its run ids} ('' for most): a unit holding a run id an earlier unit (in
    file order) holds reads ``<stem of its lowest shard>/<id>``, the shards of one unit never collide."""
    units: dict[tuple[str, ...], list[FileInfo]] = {}
    for info in infos:
        if info.version is not None:
            units.setdefault(unit_of(info.path), []).append(info)
    seen: set[str] = set()
    out: dict[Path, str] = {}
    for members in units.values():
        ids = set().union(*(m.run_ids for m in members))
        head = min(members, key=lambda m: (shard_number(m.path), str(m.path)))
        prefix = f"{head.path.stem}/" if ids & seen else ""
        seen |= ids
        out.update((m.path, prefix) for m in members)
    return out


#: How the shards' statuses make a sharded run's: the first of these any shard has, else
#: ``finished`` (the one status left out). Every other status must be ranked here.
WORST_FIRST: tuple[RunStatus, ...] = ("running", "failed", "preempted", "interrupted")
if set(RUN_STATUSES) - set(WORST_FIRST) != {"finished"}:
    raise ValueError("drift_monitor.store.many: WORST_FIRST must rank every run status but 'finished'")


def runs_merged(source: str, extra: str = "") -> str:
    """One row per run of ``source`` (runs columns, ``k``/``n``: the shard number and count,
    ``store_file``): the shard files of one run hold a runs row each. Name, model, config and
    probe hash are the lowest shard's (it holds the base), the times span every shard, and the
    status is 'running' while any shard runs or has not written its file yet, else the first of
    failed/preempted/interrupted any shard has, else 'finished'.
    ``extra``: more aggregate columns (``, expr AS name``)."""
    worst = " ".join(f"WHEN bool_or(status = '{s}') THEN '{s}'" for s in WORST_FIRST)
    agg = {"run_id": "run_id", "created_at": "min(created_at)", "updated_at": "max(updated_at)",
           "status": f"CASE WHEN count(DISTINCT k) < max(n) THEN 'running' WHEN count(*) = 1 THEN first(status) "
                     f"{worst} ELSE 'finished' END",
           "last_step": "max(last_step)"}
    cols = ", ".join(f"{agg.get(c, f'first({c} ORDER BY k)')} AS {c}" for c in (*COLUMNS["runs"], "store_file"))
    return f"SELECT {cols}{extra} FROM {source} GROUP BY run_id"


def attach_all(con: duckdb.DuckDBPyConnection, path: str | os.PathLike[str], check_version: bool = True) -> None:
    """ATTACH every store file of ``path`` read-only to ``con`` and create one view per table.

    Raises StoreNotFound when nothing matches, StoreEmpty when no file holds drift-monitor data,
    and the schema-version error of a file this code cannot read. A file locked by its writer
    raises duckdb.IOException, which the caller retries like a single locked file.
    """
    files = store_files(path)
    if not files:
        raise no_files(path)
    attach_files(con, files, str(path), check_version)


def attach_files(con: duckdb.DuckDBPyConnection, files: Sequence[Path], where: str, check_version: bool = True) -> None:
    """:func:`attach_all` for an explicit list of store files (``where`` names them in errors)."""
    attached = attach(con, files)
    infos = scan(con, attached)
    build_views(con, list(zip((a for a, _ in attached), infos)), infos, where, check_version)


def build_views(con: duckdb.DuckDBPyConnection, parts: Sequence[tuple[str, FileInfo]], every: Sequence[FileInfo],
                where: str, check_version: bool = True) -> None:
    """One view per table over the attached files ``parts`` ((alias, what it holds)); ``every``:
    all the files of the store (their versions are checked, the oldest is ``meta``'s, and they
    decide the colliding prefixes), of which ``parts`` may be a few (:mod:`.routing`)."""
    data = [i for i in every if i.version is not None]
    if check_version:
        for i in data:
            check_schema_version(i.path, i.version)
    if not data:
        raise StoreEmpty(f"{where}: no store file there holds drift-monitor data yet")
    prefix = prefixes(every)
    parts = [(a, i) for a, i in parts if i.version is not None]
    for table, cols in COLUMNS.items():
        have = [(a, i) for a, i in parts if table in i.tables]
        if not have:
            con.execute(ddl_of(table))
            if table == "runs":
                con.execute("ALTER TABLE runs ADD COLUMN store_file VARCHAR")
            continue
        sql = " UNION ALL BY NAME ".join(_select(a, table, cols, prefix[i.path]) for a, i in have)
        if table == "runs":
            sql = runs_merged("(" + " UNION ALL BY NAME ".join(
                f"SELECT *, {shard_number(i.path)} AS k, {shard_count(i.path)} AS n, {quoted(i.path)} AS store_file "
                f"FROM ({_select(a, table, cols, prefix[i.path])})" for a, i in have) + ")")
        con.execute(f"CREATE VIEW {table} AS {sql}")
    # the oldest file's version: what every query may rely on (later tables are empty stand-ins)
    con.execute(f"CREATE VIEW meta AS SELECT 'schema_version' AS key, '{min(int(i.version) for i in data)}' AS value")


def _select(alias: str, table: str, cols: Sequence[str], prefix: str) -> str:
    """One file's rows of ``table``; ``run_id`` (and the alert ids derived from it) prefixed where
    the file's ids collide."""
    if not prefix or "run_id" not in cols:
        return f"SELECT * FROM {alias}.{table}"
    ids = ", ".join(f"{quoted(prefix)} || {c} AS {c}" for c in ("run_id", "alert_id") if c in cols)
    return f"SELECT * REPLACE ({ids}) FROM {alias}.{table}"
