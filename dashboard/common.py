"""Shared pieces of the dashboard pages: the DB path, the reader, error messages, live refresh.

Safety rules every page follows: the DB is read through :class:`StoreReader` only (read-only,
opened per query and closed again, so a training run keeps writing); every query is a
parameterised reader method; labels are shown as plain text (no ``unsafe_allow_html``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import duckdb
import streamlit as st

from drift_monitor.records import is_adapter_hook
from drift_monitor.store import SchemaVersionError, StoreEmpty, StoreError, StoreLocked, StoreNotFound, StoreReader

DB_ENV = "DRIFT_MONITOR_DB"

#: Metrics shown on the runs table and the run-detail page (docs/metrics.md).
KEY_METRICS = ("explained_variance", "act_cosine", "features_drifted_ratio", "topk_jaccard", "density_js")


def db_path() -> str | None:
    """``--db`` after ``--`` on the streamlit command line, else $DRIFT_MONITOR_DB, else the session's."""
    if st.session_state.get("db_path"):
        return str(st.session_state["db_path"])
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--db", default=None)
    args, _ = p.parse_known_args(sys.argv[1:])
    return args.db or os.environ.get(DB_ENV) or None


def reader() -> StoreReader:
    path = db_path()
    assert path is not None
    return StoreReader(path, retries=50, retry_timeout_s=5.0)


def show_page(page: Callable[[StoreReader], None]) -> None:
    """Run one page; store problems become one clear message on the page, never a traceback."""
    path = db_path()
    if not path:
        st.info("No database given. Start the dashboard with `drift-monitor dashboard --db PATH` "
                "or `streamlit run dashboard/app.py -- --db PATH`.")
        return
    try:
        page(reader())
    except StoreEmpty:
        st.info(f"The database {path} holds no drift-monitor data yet. It fills in once a run writes "
                "its first snapshot; this page refreshes itself in live mode.")
    except StoreNotFound:
        st.error(f"No drift-monitor database at {path}: the file does not exist. Check the --db path "
                 "(a training run creates it with its first snapshot).")
    except SchemaVersionError as exc:
        st.error(f"This database was written with another schema version (found {exc.found}, this "
                 f"dashboard reads version {exc.expected}). {exc}")
    except StoreLocked:
        st.warning("The database is busy (a writer holds it); showing it again at the next refresh.")
    except StoreError as exc:
        st.error(f"Cannot read the database: {exc}")
    except duckdb.Error as exc:  # e.g. a damaged file: a message, not a traceback
        st.error(f"Cannot read the database {path}: {type(exc).__name__}: {exc}")


def pick_run(r: StoreReader, key: str = "run"):
    """A run selector; returns the selected runs row (a Series) or None when there are no runs."""
    runs = r.runs()
    if runs.empty:
        st.info("No runs in this database yet.")
        return None
    ids = runs["run_id"].tolist()
    names = dict(zip(runs["run_id"], runs["name"].fillna("")))
    if st.session_state.get(key) not in ids:
        st.session_state.pop(key, None)
    rid = st.selectbox("Run", ids, key=key, format_func=lambda i: f"{names.get(i) or i} ({i})")
    return runs[runs["run_id"] == rid].iloc[0]


def pick_hook(r: StoreReader, run_id: str, key: str = "hook") -> str | None:
    """A selector over the run's SAE hooks (adapter-signal hooks have no feature tables: the
    Adapter page shows them)."""
    every = r.hooks(run_id)
    hooks = [h for h in every if not is_adapter_hook(h)]
    if not hooks:
        st.info("This run has adapter signals only (see the Adapter page)." if every else
                "This run has no snapshots yet.")
        return None
    if st.session_state.get(key) not in hooks:
        st.session_state.pop(key, None)
    return st.selectbox("Hook", hooks, key=key)


def pick_run_and_hook(r: StoreReader, prefix: str):
    """A run selector and a hook selector; (runs row, hook) or None when either has nothing yet."""
    run = pick_run(r, key=f"{prefix}_run")
    if run is None:
        return None
    hook = pick_hook(r, run["run_id"], key=f"{prefix}_hook")
    if hook is None:
        return None
    return run, hook
