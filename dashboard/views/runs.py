"""Runs: every run with its status, last step, active alerts and sparklines of the key metrics.

Selecting a row opens that run's detail (``/run_detail?run=ID``)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import (
    KEY_METRICS,
    RUN_DETAIL,
    PageContext,
    open_run,
    render_page,
)
from drift_monitor.store import StoreReader


def runs_table(r: StoreReader) -> pd.DataFrame:
    runs = r.runs()
    if runs.empty:
        return runs
    spark = r.metric_sparklines(KEY_METRICS, last_n=50)
    out = runs[["name", "run_id", "status", "last_step", "n_snapshots", "active_alerts", "pending_writes",
                "undelivered_notifications", "model", "updated_at"]].copy()
    for name in KEY_METRICS:
        sub = spark[spark["name"] == name].set_index("run_id")["values"]
        out[name] = [list(sub[rid]) if rid in sub.index else [] for rid in out["run_id"]]
    return out


def spool_notice(r: StoreReader) -> None:
    """Writes waiting outside the database, and quarantined spool files, with the fix: the same
    text ``drift-monitor runs`` prints (:meth:`~drift_monitor.store.SpoolState.notices`)."""
    for notice in r.spool_state().notices(r.path, markdown=True):
        (st.error if notice.level == "error" else st.warning)(notice.text)


def body(ctx: PageContext) -> None:
    spool_notice(ctx.reader)
    df = runs_table(ctx.reader)
    if df.empty:
        n = len(ctx.reader.preflights())  # a store may hold pre-flight checks before any run
        st.info("No runs in this database yet." + (f" It holds {n} pre-flight result{'s' if n != 1 else ''}: "
                                                   "see the Pre-flight page." if n else ""))
        return
    cfg = {name: st.column_config.LineChartColumn(name, help=f"{name}, last 50 steps") for name in KEY_METRICS}
    cfg["last_step"] = st.column_config.NumberColumn("last step", format="%d")
    cfg["active_alerts"] = st.column_config.NumberColumn("active alerts", format="%d")
    cfg["pending_writes"] = st.column_config.NumberColumn("pending writes", format="%d",
                                                          help="writes not in the database yet (spooled or dumped)")
    cfg["undelivered_notifications"] = st.column_config.NumberColumn(
        "undelivered notifications", format="%d", help="alert webhooks not delivered yet (outputs.notify); "
                                                        "see the Alerts page for the error")
    picked = st.dataframe(df, hide_index=True, column_config=cfg, width="stretch", key="runs_table",
                          on_select="rerun", selection_mode="single-row")
    st.caption(f"{len(df)} runs; sparklines show the mean over hooks of the last 50 snapshots. "
               "Select a row to open the run's detail.")
    rows = picked.selection.rows
    if rows and rows[0] < len(df):
        open_run(RUN_DETAIL, str(df["run_id"].iloc[rows[0]]))


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Runs", body)
