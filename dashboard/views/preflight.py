"""Pre-flight: every ``drift-monitor preflight`` result in the store (a dataset read against a
start model before training), newest first, and one picked result in full.

Works on a store that holds pre-flight results only (no run yet): results belong to datasets,
not runs. A run whose ``outputs.train_data`` names checked data shows its result on Run detail.
"""

from __future__ import annotations

import streamlit as st

from drift_monitor.dashboard.common import PageContext, render_page
from drift_monitor.dashboard.preflight import results_table, show_result, verdict
from drift_monitor.store.preflights import result_of


def body(ctx: PageContext) -> None:
    rows = ctx.reader.preflights()
    if rows.empty:
        st.info("No pre-flight results in this database yet. They appear here once `drift-monitor preflight` "
                "stores one in it.")
        return
    table = results_table(rows)
    cfg = {"score": st.column_config.NumberColumn("score", format="%+.3f"),
           "data_refusal_share": st.column_config.NumberColumn("refusals in data", format="percent"),
           "own_refusal_share": st.column_config.NumberColumn("refusals in own answers", format="percent")}
    st.dataframe(table, hide_index=True, width="stretch", column_config=cfg, key="preflight_table")
    st.caption(f"{len(table)} pre-flight results; score > 0: the data would raise the start model's refusal, "
               "< 0: erode it (refusal-gap units).")
    ids = table["preflight_id"].tolist()
    labels = {pid: f"{d} · {m} · {c}" for pid, d, m, c in zip(ids, table["dataset"], table["model"],
                                                              table["created_at"])}
    if st.session_state.get("preflight_pick") not in ids:
        st.session_state.pop("preflight_pick", None)
    pick = st.selectbox("Result", ids, key="preflight_pick", format_func=lambda i: labels.get(i, i))
    res = result_of(rows[rows["preflight_id"] == pick].iloc[0])
    st.subheader(verdict(res))
    show_result(res, key="preflight")


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Pre-flight", body)
