"""The read side: :class:`StoreReader`, the parameterised queries the dashboard and CLI run.

Why every call opens and closes the file: DuckDB admits one read-write process *or* many
read-only ones, so a reader that kept the file open would lock the training run's writer out.
Each query opens read-only (retrying briefly while a write is in progress), runs, and closes.
Over many files (a store directory or glob) a query about some runs opens only their files, and
what each file holds is kept between calls by its stat, not by an open file (:mod:`.routing`).

Why readers accept older schema versions: opened read-only they cannot migrate a file, so they
read every version from :data:`~.schema.OLDEST_VERSION` on and treat a table added by a later
migration as empty (see :meth:`StoreReader.verifications`).

Rankings are computed in SQL and skip NaN explicitly, because DuckDB sorts NaN above every
number; NaN values themselves come back as NaN.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from drift_monitor.records import ALL, FEATURE_COLUMNS, PROJECTION, PROJECTION_DELTA

from . import dataset, routing
from .connection import connect_file
from .errors import StoreEmpty, StoreError, StoreNotFound
from .many import is_many
from .schema import (
    NOTIFICATION_COLUMNS,
    PREFLIGHT_COLUMNS,
    PREFLIGHT_NEWEST,
    RESIDUAL_COLUMNS,
    VERIFICATION_COLUMNS,
    as_int,
    check_schema_version,
    stored_schema_version,
)
from .spool import SpoolState, spool_state

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
    def _connection(self, check_version: bool = True,
                    run_ids: Sequence[str] | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for one call. ``run_ids``: the query reads only these runs (and
        labels), so over many files only their files are attached (store.routing); None: all."""
        if dataset.is_dataset(self.path):  # an exported Parquet dataset, local or remote (store.dataset)
            with contextlib.closing(dataset.connect(self.path, check_version)) as con:
                yield con
            return
        if is_many(self.path):  # a directory or a glob: its store files as one (store.many, store.routing)
            with contextlib.closing(routing.connect(self.path, check_version, run_ids, self.retry_timeout_s,
                                                    self.retries)) as con:
                yield con
            return
        if not self.path.exists():
            raise StoreNotFound(f"no drift-monitor store at {self.path} (the file does not exist)")
        con = connect_file(self.path, read_only=True, timeout_s=self.retry_timeout_s, max_attempts=self.retries)
        try:
            found = stored_schema_version(con)
            if found is None:
                raise StoreEmpty(f"{self.path} is a DuckDB file but holds no drift-monitor data yet")
            if check_version:
                check_schema_version(self.path, found)
            yield con
        finally:
            con.close()

    def _df(self, sql: str, params: Sequence[Any] = (), run_ids: Sequence[str] | None = None) -> pd.DataFrame:
        with self._connection(run_ids=run_ids) as con:
            return con.execute(sql, list(params)).df()

    def _every_run(self, sql: str, params: Sequence[Any], combine: str) -> pd.DataFrame:
        """A query about every run whose answer over many files is ``combine`` (SQL over ``u``,
        the union of its answers per file): over many files the settled files' answers are kept
        between calls (store.routing.union_query)."""
        if self._many():
            return routing.union_query(self.path, sql, params, combine, self.retry_timeout_s, self.retries)
        return self._df(sql, params)

    def schema_version(self) -> int:
        """The schema version recorded in the file (not checked against this code's)."""
        with self._connection(check_version=False, run_ids=()) as con:  # many files: meta is every file's
            return as_int(stored_schema_version(con), -1)

    def spool_state(self) -> SpoolState:
        """Writes that wait outside the database (spool, dump files beside it) and quarantined
        spool files: read from the folder, not the database (they are not in it). For many
        files, theirs together."""
        if self._many():
            return routing.spool_state_of(self.path)
        return spool_state(self.path)

    def _many(self) -> bool:
        """Whether the store is many DuckDB files (a directory or glob; not a Parquet dataset)."""
        return is_many(self.path) and not dataset.is_dataset(self.path)

    def runs(self) -> pd.DataFrame:
        """Every run with its last step, number of snapshots (steps) and open alert counts, newest first.

        ``store_file``: the file holding the run (the store itself, or one of many).
        ``pending_writes``: the run's writes not in the database yet (spooled, or in a dump file
        beside it), read from disk at each call. Why not a stored column: writes are applied in
        order, so a count stored with a write is stale the moment it lands.
        """
        df = self._runs_rows()
        pending = self.spool_state().pending
        df["pending_writes"] = [int(pending.get(r, 0)) for r in df["run_id"]]
        undelivered = self._undelivered()
        df["undelivered_notifications"] = [int(undelivered.get(r, 0)) for r in df["run_id"]]
        if not is_many(self.path):  # many files: the runs view says which file each run lives in
            df["store_file"] = str(self.path)
        return df

    def _undelivered(self) -> dict[str, int]:
        """{run: alert notifications not delivered yet} (drift_monitor.notify); none in a file
        written before migration 4."""
        sql = ("SELECT run_id, count(*) FILTER (WHERE notified_at IS NULL) AS n FROM notifications "
               "GROUP BY run_id")
        if self._many():
            df = routing.union_query(self.path, sql, [], "SELECT run_id, sum(n)::BIGINT AS n FROM u GROUP BY run_id",
                                     self.retry_timeout_s, self.retries)
        else:
            with self._connection(run_ids=None) as con:
                if not _has_table(con, "notifications"):
                    return {}
                df = con.execute(sql).df()
        return {str(r): int(n) for r, n in zip(df["run_id"], df["n"])}

    def notifications(self, run_id: str | None = None, undelivered: bool = False) -> pd.DataFrame:
        """Alert notifications (drift_monitor.notify), newest step first, with their delivery state
        (``notified_at`` NaT: not delivered; ``attempts``; ``last_error``). Empty in a file written
        before migration 4. ``undelivered``: only those not delivered yet."""
        with self._connection(run_ids=None if run_id is None else [run_id]) as con:
            if not _has_table(con, "notifications"):
                return pd.DataFrame(columns=list(NOTIFICATION_COLUMNS))
            clauses, params = [], []
            if run_id is not None:
                clauses.append("run_id = ?")
                params.append(run_id)
            if undelivered:
                clauses.append("notified_at IS NULL")
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            return con.execute(f"SELECT * FROM notifications {where} ORDER BY step DESC, created_at DESC, "
                               "notification_id", params).df()

    def _runs_rows(self) -> pd.DataFrame:
        if self._many():  # from what each file holds, kept between calls: unchanged files stay shut
            return routing.runs_rows(self.path, self.retry_timeout_s, self.retries)
        return self._df(
            f"""SELECT r.run_id, r.name, r.status, r.model, r.probe_hash, r.created_at, r.updated_at,
                      coalesce(s.last_step, r.last_step) AS last_step,
                      coalesce(s.n_snapshots, 0) AS n_snapshots,
                      coalesce(a.active_alerts, 0) AS active_alerts,
                      coalesce(a.unacknowledged_alerts, 0) AS unacknowledged_alerts,
                      r.config_json{", r.store_file" if is_many(self.path) else ""}
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
        df = self._df("SELECT DISTINCT hook FROM snapshots WHERE run_id = ? ORDER BY hook", [run_id], [run_id])
        return df["hook"].tolist()

    def steps(self, run_id: str, hook: str | None = None) -> list[int]:
        sql, params = "SELECT DISTINCT step FROM snapshots WHERE run_id = ?", [run_id]
        if hook is not None:
            sql, params = sql + " AND hook = ?", params + [hook]
        return [int(s) for s in self._df(sql + " ORDER BY step", params, [run_id])["step"]]

    def snapshots(self, run_id: str) -> pd.DataFrame:
        """The ``snapshots`` rows of a run (one per step and hook)."""
        return self._df("SELECT * FROM snapshots WHERE run_id = ? ORDER BY step, hook", [run_id], [run_id])

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
        return self._df(sql + " ORDER BY hook, name, step", params, [run_id])

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
        return self._df(sql + " ORDER BY f.category, f.feature", params, [run_id])

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
                [run_id, int(step), hook, k], [run_id],
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
            [run_id, int(step), hook, category, k], [run_id],
        )

    def feature_trajectory(self, run_id: str, hook: str, feature: int, category: str = ALL) -> pd.DataFrame:
        """One feature's statistics over steps (steps where it fired in neither model are absent)."""
        return self._df(
            f"""SELECT f.step, {_FEATURE_SELECT} FROM feature_stats f
                WHERE f.run_id = ? AND f.hook = ? AND f.feature = ? AND f.category = ? ORDER BY f.step""",
            [run_id, hook, int(feature), category], [run_id],
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
        return self._df(sql + ' ORDER BY r.step, r."rank" NULLS LAST, r.feature', params, [run_id])

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
        sql = f"SELECT * FROM alerts {where} ORDER BY step DESC, created_at DESC, alert_id"
        if run_id is None:
            return self._every_run(sql, params, "SELECT * FROM u ORDER BY step DESC, created_at DESC, alert_id")
        return self._df(sql, params, [run_id])

    def alert_file(self, alert_id: str, run_id: str) -> tuple[str, str]:
        """(store file, alert id inside it): where acknowledging alert ``alert_id`` of run ``run_id``
        (both as listed here) writes. Over many files the file that holds the alert (a sharded
        run's alerts may be in any shard), under the id that file knows."""
        if self._many():
            return routing.alert_file(self.path, run_id, alert_id, self.retry_timeout_s, self.retries)
        return str(self.path), alert_id

    def resolve_run(self, run: str) -> str:
        """The id of the run whose id or name is ``run``; a clear error if none or several match."""
        runs = self._runs_rows()  # newest first
        match = runs[(runs.run_id == run) | (runs.name == run)]
        if match.empty:
            known = ", ".join(f"{r.run_id} ({r.name})" for r in runs.head(10).itertuples()) or "none"
            raise StoreError(f"{self.path}: no run with id or name {run!r}; runs: {known}")
        if len(match) > 1:
            raise StoreError(f"{self.path}: several runs are named {run!r}; give the run id: {match.run_id.tolist()}")
        return str(match.run_id.iloc[0])

    def verifications(self, run_id: str | None = None, hook: str | None = None) -> pd.DataFrame:
        """``drift-monitor verify`` results, newest first (empty when there are none, also in a
        version-1 file no writer has migrated yet: the table comes with migration 2). ``hook``
        also matches a check over several hooks that includes it (stored as ``h1+h2``)."""
        with self._connection(run_ids=None if run_id is None else [run_id]) as con:
            have = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'verifications'"
                               ).fetchall()[0][0]
            if not have:
                return pd.DataFrame(columns=list(VERIFICATION_COLUMNS))
            clauses, params = [], []
            if run_id is not None:
                clauses.append("run_id = ?")
                params.append(run_id)
            if hook is not None:  # a check over several hooks is labelled "h1+h2": it is at each of them
                clauses.append("(hook = ? OR list_contains(string_split(hook, '+'), ?))")
                params += [hook, hook]
            where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
            return con.execute(f"SELECT * FROM verifications {where} ORDER BY created_at DESC, verify_id, "
                               "CASE condition WHEN 'fine_tuned' THEN 0 WHEN 'ablated' THEN 1 WHEN 'random' THEN 2 "
                               "WHEN 'base' THEN 3 WHEN 'steered_base' THEN 4 "
                               "WHEN 'direction_ablated' THEN 5 WHEN 'random_direction_ablated' THEN 6 ELSE 7 END, "
                               "draw", params).df()

    def residual_directions(self, run_id: str, hook: str | None = None,
                            steps: Sequence[int] | None = None) -> pd.DataFrame:
        """Directions of new SAE error per step (drift_monitor.probe.residual), rank 0 first; the
        JSON columns decoded (``projections``: {category: mean projection}, ``top_tokens``,
        ``bottom_tokens``). Empty in a file written before migration 3."""
        cols = [c for c in RESIDUAL_COLUMNS if not c.endswith("_json")] + ["projections", "top_tokens",
                                                                           "bottom_tokens"]
        with self._connection(run_ids=[run_id]) as con:
            have = con.execute("SELECT count(*) FROM information_schema.tables "
                               "WHERE table_name = 'residual_directions'").fetchall()[0][0]
            if not have:
                return pd.DataFrame(columns=cols)
            clauses, params = ["run_id = ?"], [run_id]
            if hook is not None:
                clauses.append("hook = ?")
                params.append(hook)
            if steps is not None:
                clauses.append("list_contains(?, step)")
                params.append([int(s) for s in steps])
            df = con.execute(f"SELECT * FROM residual_directions WHERE {' AND '.join(clauses)} "
                             'ORDER BY step, hook, "rank"', params).df()
        for c in ("projections", "top_tokens", "bottom_tokens"):
            df[c] = [json.loads(v) for v in df.pop(f"{c}_json")]
        return df[cols]

    def preflights(self, data_hash: str | None = None) -> pd.DataFrame:
        """``drift-monitor preflight`` results (the ``preflight`` table's columns, JSON as stored),
        newest first; ``data_hash``: only those of that dataset. Empty in a file written before
        migration 5. Over many files (a store directory) every file's results together, one row
        per ``preflight_id`` (a merge or a copy may hold one result in several files: the newest
        row wins). :func:`drift_monitor.store.preflights.result_of` turns a row back into a
        :class:`~drift_monitor.preflight.result.PreflightResult`."""
        where, params = ("WHERE data_hash = ?", [data_hash]) if data_hash is not None else ("", [])
        order = "ORDER BY created_at DESC, preflight_id"
        if self._many():
            return routing.union_query(
                self.path, f"SELECT * FROM preflight {where}", params,
                f"SELECT * FROM u {PREFLIGHT_NEWEST} {order}", self.retry_timeout_s, self.retries)
        with self._connection(run_ids=()) as con:
            if not _has_table(con, "preflight"):
                return pd.DataFrame(columns=list(PREFLIGHT_COLUMNS))
            return con.execute(f"SELECT * FROM preflight {where} {order}", params).df()

    def labels(self, hook: str) -> pd.DataFrame:
        return self._df("SELECT feature, label, source FROM feature_labels WHERE hook = ? ORDER BY feature", [hook],
                        run_ids=[])

    # -- dashboard helpers: small, parameterised, aggregated in SQL ------------------------------

    def metric_sparklines(self, names: Sequence[str], last_n: int = 50) -> pd.DataFrame:
        """Per run and metric, the last ``last_n`` values over steps (mean over hooks, NaN skipped),
        as lists: ``run_id, name, steps, values`` (for a runs table with sparklines)."""
        return self._every_run(
            """WITH m AS (SELECT run_id, name, step, avg(value) AS value FROM metrics
                          WHERE list_contains(?, name) AND NOT isnan(value) GROUP BY run_id, name, step),
                    r AS (SELECT *, row_number() OVER (PARTITION BY run_id, name ORDER BY step DESC) AS rn FROM m)
               SELECT run_id, name, list(step ORDER BY step) AS steps, list(value ORDER BY step) AS "values"
               FROM r WHERE rn <= ? GROUP BY run_id, name ORDER BY run_id, name""",
            [list(names), int(last_n)], "SELECT * FROM u ORDER BY run_id, name",
        )

    def metric_names(self, run_id: str | None = None) -> list[str]:
        """Distinct metric names (of one run, or of every run)."""
        if run_id is None:
            return self._every_run("SELECT DISTINCT name FROM metrics ORDER BY name", [],
                                   "SELECT DISTINCT name FROM u ORDER BY name")["name"].tolist()
        return self._df("SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", [run_id],
                        [run_id])["name"].tolist()

    def all_hooks(self) -> list[str]:
        return self._every_run("SELECT DISTINCT hook FROM snapshots ORDER BY hook", [],
                               "SELECT DISTINCT hook FROM u ORDER BY hook")["hook"].tolist()

    def metric_compare(self, run_ids: Sequence[str], name: str, hook: str | None = None) -> pd.DataFrame:
        """One metric over steps for several runs: ``run_id, run_name, step, hook, value``."""
        sql = ("SELECT m.run_id, coalesce(r.name, m.run_id) AS run_name, m.step, m.hook, m.value "
               "FROM metrics m LEFT JOIN runs r USING (run_id) WHERE list_contains(?, m.run_id) AND m.name = ?")
        params: list[Any] = [list(run_ids), name]
        if hook is not None:
            sql, params = sql + " AND m.hook = ?", params + [hook]
        return self._df(sql + " ORDER BY m.run_id, m.hook, m.step", params, list(run_ids))

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
            [run_id, hook, PROJECTION + ":", PROJECTION_DELTA + ":", PROJECTION, PROJECTION_DELTA], [run_id],
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
            [run_id, int(step), hook, category, int(limit)], [run_id],
        )

    def categories(self, run_id: str, step: int, hook: str) -> list[str]:
        return self._df(
            "SELECT DISTINCT category FROM feature_stats WHERE run_id = ? AND step = ? AND hook = ? ORDER BY category",
            [run_id, int(step), hook], [run_id],
        )["category"].tolist()


def _has_table(con: duckdb.DuckDBPyConnection, table: str) -> bool:
    """Whether the open store has ``table`` (a file of an older schema, read-only, may lack it)."""
    return bool(con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                            [table]).fetchall()[0][0])
