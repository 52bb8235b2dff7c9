"""Which store files a query over many files needs, and what each file holds, kept between calls.

Why: a store directory of hundreds of run files was slow to read because every query ATTACHed
every file (milliseconds each) only to filter on one run. Here each file's facts (schema version,
tables, run ids, labels, per-run summary: :class:`~.many.FileInfo`) are read once and kept per
process, keyed by the file's stat (inode, mtime, size, and its write-ahead log's), so a file that
changes (a live run writing) or appears is read again on the next call and an unchanged one
(a finished run's) is not reopened. A query about some runs then ATTACHes only the files of
those runs (all shards of a sharded run), plus the files holding feature labels (labels are per
hook, so every label join needs them); ``StoreReader.runs()`` is answered from the kept
summaries without attaching anything.

Nothing stays open: every call still opens its files read-only and closes them (a live run's
writer must get its lock); only facts read from them are kept.

Why "racy" entries: file times tick coarsely (a few ms, 1 s on some file systems), so a write
landing in the same tick as our stat, without changing the size, would look unchanged. An entry
whose file was modified within :data:`RACY_NS` of being read is read again next time (as git
does with its index).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from .many import (
    FileInfo,
    attach,
    build_views,
    no_files,
    prefixes,
    runs_merged,
    scan,
    shard_count,
    shard_number,
    store_files,
    strip_prefix,
    unit_of,
)
from .spool import DUMP_SUFFIX, SPOOL_SUFFIX, SpoolState, spool_state

#: A file modified this recently (ns) when read is read again on the next call (module docstring).
RACY_NS = 2_000_000_000

StatKey = tuple[int, int, int, tuple[int, int, int] | None]


def stat_key(path: Path) -> StatKey | None:
    """What tells a changed file: (inode, mtime ns, size) of the file and of its ``.wal``
    (DuckDB commits there first); None when the file is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        w = os.stat(f"{path}.wal")
        wal = (w.st_ino, w.st_mtime_ns, w.st_size)
    except FileNotFoundError:
        wal = None
    return st.st_ino, st.st_mtime_ns, st.st_size, wal


def modified_ns(key: StatKey) -> int:
    """When the file (or its write-ahead log) was last modified."""
    return max(key[1], key[3][1] if key[3] else 0)


@dataclass(frozen=True)
class _Entry:
    key: StatKey
    info: FileInfo
    racy: bool


class FileFacts:
    """What each store file holds (:class:`~.many.FileInfo`), per file path and stat key; one
    per process (:data:`FILE_FACTS`), shared by every reader and thread."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def infos(self, files: Sequence[Path], timeout_s: float = 5.0, retries: int | None = None) -> list[FileInfo]:
        """The facts of ``files`` (those still there), reading only the new and changed ones (all
        at once: one ATTACH each, one query per fact)."""
        return [e.info for e in self.entries(files, timeout_s, retries)]

    def entries(self, files: Sequence[Path], timeout_s: float = 5.0, retries: int | None = None) -> list[_Entry]:
        """:meth:`infos` with each file's stat key."""
        now = time.time_ns()
        keys = {f: stat_key(f) for f in files}
        with self._lock:
            known = {f: self._entries.get(str(f)) for f in files}
        stale = [f for f, k in keys.items() if k is not None and (known[f] is None or known[f].key != k
                                                                   or known[f].racy)]
        if stale:
            fresh = _scan(stale, timeout_s, retries)
            for f, info in zip(stale, fresh):
                known[f] = _Entry(keys[f], info, racy=modified_ns(keys[f]) > now - RACY_NS)
        with self._lock:
            self._entries.update((str(f), known[f]) for f in stale)
            for f in (f for f, k in keys.items() if k is None):  # gone: forget it
                self._entries.pop(str(f), None)
        return [known[f] for f in files if keys[f] is not None]

    def cached(self, files: Sequence[Path]) -> list[FileInfo]:
        """The facts already known of ``files`` (nothing is read)."""
        with self._lock:
            return [e.info for f in files if (e := self._entries.get(str(f))) is not None]


#: The process's facts of every store file read so far.
FILE_FACTS = FileFacts()

#: Threads reading many new files at once (each its own connection; DuckDB works outside the
#: GIL): most of a cold read is DuckDB opening each file, so two halve it on two idle cores.
SCAN_THREADS = min(2, os.cpu_count() or 1)


def _scan(files: Sequence[Path], timeout_s: float, retries: int | None) -> list[FileInfo]:
    """:func:`~.many.scan` of ``files``, in order, in up to :data:`SCAN_THREADS` threads."""
    def one(part: Sequence[Path]) -> list[FileInfo]:
        con = duckdb.connect(":memory:")
        try:
            return scan(con, attach(con, part, timeout_s, retries))
        finally:
            con.close()

    n = max(1, min(SCAN_THREADS, len(files) // 32))
    if n == 1:
        return one(files)
    with ThreadPoolExecutor(n) as pool:
        found = {i.path: i for part in pool.map(one, [files[k::n] for k in range(n)]) for i in part}
    return [found[Path(f)] for f in files]


def connect(path: str | os.PathLike[str], check_version: bool = True, run_ids: Sequence[str] | None = None,
            timeout_s: float = 5.0, retries: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory connection whose views (store.many) hold the files of ``run_ids`` (as the
    reader shows them: prefixed where they collide) and the files holding labels; ``run_ids``
    None: every file. The caller closes it."""
    files = store_files(path)
    if not files:
        raise no_files(path)
    every = FILE_FACTS.infos(files, timeout_s, retries)
    parts = [i for i in every if i.version is not None]
    if run_ids is not None and parts:
        wanted, prefix = set(run_ids), prefixes(every)
        units = {unit_of(i.path) for i in parts if any(prefix[i.path] + r in wanted for r in i.run_ids)}
        parts = [i for i in parts if unit_of(i.path) in units or i.n_labels]
    return _connect_parts(path, parts, every, check_version, timeout_s, retries)


def _connect_parts(path: str | os.PathLike[str], parts: Sequence[FileInfo], every: Sequence[FileInfo],
                   check_version: bool, timeout_s: float, retries: int | None) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the files ``parts`` attached and the views over them."""
    con = duckdb.connect(":memory:")
    try:
        attached = attach(con, [i.path for i in parts], timeout_s, retries)
        build_views(con, [(a, i) for (a, _), i in zip(attached, parts)], every, str(path), check_version)
    except BaseException:
        con.close()
        raise
    return con


#: A unit whose files were all last modified this long ago (ns) is "settled": the answers of
#: :func:`union_query` over the settled units are kept (a finished run's file stays settled).
SETTLED_NS = 60 * 10**9

_ANSWERS: OrderedDict[tuple, pa.Table] = OrderedDict()
_ANSWERS_KEPT = 64
_ANSWERS_LOCK = threading.Lock()


def union_query(path: str | os.PathLike[str], sql: str, params: Sequence[object], combine: str,
                timeout_s: float = 5.0, retries: int | None = None) -> pd.DataFrame:
    """A query over every run of many files (no run to route by) whose answer is ``combine``
    (SQL over ``u``) of the union of its answers over any split of the files by unit (per-run
    rows, distinct values). The answer over the settled units is kept, keyed by their stat keys
    (and prefixes); only the units modified within :data:`SETTLED_NS` are queried each call."""
    files = store_files(path)
    if not files:
        raise no_files(path)
    entries = FILE_FACTS.entries(files, timeout_s, retries)
    every = [e.info for e in entries]
    prefix = prefixes(every)
    recent: set[tuple[str, ...]] = set()
    now = time.time_ns()
    for e in entries:
        if e.info.version is not None and modified_ns(e.key) > now - SETTLED_NS:
            recent.add(unit_of(e.info.path))
    settled = [e for e in entries if e.info.version is not None and unit_of(e.info.path) not in recent]
    key = (str(path), sql, repr(list(params)), tuple((str(e.info.path), e.key, prefix[e.info.path]) for e in settled))
    with _ANSWERS_LOCK:
        kept = _ANSWERS.get(key)
    if kept is None:
        kept = _answer(path, [e.info for e in settled], every, sql, params, timeout_s, retries)
        with _ANSWERS_LOCK:
            _ANSWERS[key] = kept
            while len(_ANSWERS) > _ANSWERS_KEPT:
                _ANSWERS.popitem(last=False)
    fresh = [i for i in every if i.version is not None and unit_of(i.path) in recent]
    both = [kept, _answer(path, fresh, every, sql, params, timeout_s, retries)] if fresh else [kept]
    con = duckdb.connect(":memory:")
    try:
        con.register("u", pa.concat_tables(both, promote_options="permissive"))
        return con.execute(combine).df()
    finally:
        con.close()


def _answer(path: str | os.PathLike[str], parts: Sequence[FileInfo], every: Sequence[FileInfo], sql: str,
            params: Sequence[object], timeout_s: float, retries: int | None) -> pa.Table:
    with contextlib.closing(_connect_parts(path, parts, every, True, timeout_s, retries)) as con:
        return con.sql(sql, params=list(params)).to_arrow_table()


#: ``StoreReader.runs()`` columns from the kept summaries (store.many.SUMMARY_SQL), shards merged.
_RUNS_SQL = """WITH r AS ({merged})
SELECT run_id, name, status, model, probe_hash, created_at, updated_at,
       coalesce(list_max(steps), last_step) AS last_step, coalesce(len(steps), 0) AS n_snapshots,
       active_alerts, unacknowledged_alerts, config_json, store_file
FROM r ORDER BY created_at DESC, run_id"""


def runs_rows(path: str | os.PathLike[str], timeout_s: float = 5.0, retries: int | None = None) -> pd.DataFrame:
    """The runs of every file of ``path`` with their counts (``StoreReader.runs()`` less the
    pending writes), from the kept per-file summaries: only new or changed files are opened."""
    files = store_files(path)
    if not files:
        raise no_files(path)
    every = FILE_FACTS.infos(files, timeout_s, retries)
    data = [i for i in every if i.version is not None and i.summary is not None]
    con = duckdb.connect(":memory:")
    try:
        build_views(con, [], every, str(path))  # the version checks and errors of any other query
        prefix = prefixes(every)
        con.register("s", pa.concat_tables([_tagged(i, prefix[i.path]) for i in data]))
        merged = runs_merged("(SELECT * REPLACE (prefix || run_id AS run_id) FROM s)",
                             ", list_distinct(flatten(list(steps) FILTER (WHERE steps IS NOT NULL))) AS steps, "
                             "sum(active_alerts)::BIGINT AS active_alerts, "
                             "sum(unacknowledged_alerts)::BIGINT AS unacknowledged_alerts")
        return con.execute(_RUNS_SQL.format(merged=merged)).df()
    finally:
        con.close()


def _tagged(info: FileInfo, prefix: str) -> pa.Table:
    """A file's summary with the columns :func:`runs_rows` groups by: its prefix, shard number, file."""
    assert info.summary is not None
    n = info.summary.num_rows
    return (info.summary.append_column("prefix", pa.array([prefix] * n, pa.string()))
            .append_column("k", pa.array([shard_number(info.path)] * n, pa.int64()))
            .append_column("n", pa.array([shard_count(info.path)] * n, pa.int64()))
            .append_column("store_file", pa.array([str(info.path)] * n, pa.string())))


def spool_state_of(path: str | os.PathLike[str]) -> SpoolState:
    """The spools and dump files of every store file of ``path`` together, keyed by run ids as
    the reader shows them. Only files with a spool folder or a dump file beside them are looked
    into (one listing per folder, not a glob per file)."""
    files = store_files(path)
    listing: dict[Path, list[str]] = {}
    for f in files:
        if f.parent not in listing:
            listing[f.parent] = os.listdir(f.parent)
    busy = set()
    for folder, names in listing.items():
        spools = {n[: -len(SPOOL_SUFFIX)] for n in names if n.endswith(SPOOL_SUFFIX)}
        dumps = [n for n in names if n.endswith(DUMP_SUFFIX)]
        busy |= {f for f in files if f.parent == folder and (f.name in spools or any(d.startswith(f.name)
                                                                                      for d in dumps))}
    prefix = prefixes(FILE_FACTS.cached(files))  # as runs() just read them; a file not read yet: no prefix
    total = SpoolState(Path(path))
    for f in sorted(busy):
        s = spool_state(f)
        total.quarantined += s.quarantined
        total.dumps += s.dumps
        for run, n in s.pending.items():
            key = prefix.get(f, "") + run if run else run
            total.pending[key] = total.pending.get(key, 0) + n
    return total


def alert_file(path: str | os.PathLike[str], run_id: str, alert_id: str, timeout_s: float = 5.0,
               retries: int | None = None) -> tuple[str, str]:
    """(store file, alert id inside it) of an alert of ``run_id`` as the reader shows both: the
    file an acknowledgement must go to (a sharded run's alerts may be in any shard's file), under
    the id that file knows (without a colliding unit's prefix). KeyError when no file holds it."""
    every = FILE_FACTS.infos(store_files(path), timeout_s, retries)
    prefix = prefixes(every)
    mine = [i for i in every if i.version is not None and any(prefix[i.path] + r == run_id for r in i.run_ids)]
    con = duckdb.connect(":memory:")
    try:
        for alias, f in attach(con, [i.path for i in mine], timeout_s, retries):
            raw = strip_prefix(prefix[f], alert_id)
            if con.execute(f"SELECT count(*) FROM {alias}.alerts WHERE alert_id = ?", [raw]).fetchall()[0][0]:
                return str(f), raw
    finally:
        con.close()
    raise KeyError(alert_id)
