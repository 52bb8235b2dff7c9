"""Compare: two or more runs overlaid on the same metric."""

from __future__ import annotations

import altair as alt
import streamlit as st

from drift_monitor.dashboard.common import PageContext, render_page


def body(ctx: PageContext) -> None:
    r = ctx.reader
    runs = r.runs()
    if runs.empty:
        st.info("No runs in this database yet.")
        return
    names = dict(zip(runs["run_id"], runs["name"].fillna("")))
    ids = list(names)
    chosen = [i for i in st.session_state.get("cmp_runs", []) if i in ids]
    st.session_state["cmp_runs"] = chosen or ids[:2]
    sel = st.multiselect("Runs", ids, key="cmp_runs", format_func=lambda i: names.get(i) or i)
    metrics = r.metric_names()
    if not metrics:
        st.info("No metrics stored yet.")
        return
    default = "explained_variance" if "explained_variance" in metrics else metrics[0]
    if st.session_state.get("cmp_metric") not in metrics:
        st.session_state["cmp_metric"] = default
    metric = st.selectbox("Metric", metrics, key="cmp_metric")
    hooks = r.all_hooks()
    if st.session_state.get("cmp_hook") not in hooks:
        st.session_state.pop("cmp_hook", None)
    hook = st.selectbox("Hook", hooks, key="cmp_hook")
    if not sel:
        st.info("Pick at least one run.")
        return
    df = r.metric_compare(sel, metric, hook=hook)
    if df.empty:
        st.info(f"No {metric} values at {hook} for these runs.")
        return
    st.altair_chart(
        alt.Chart(df, title=f"{metric} at {hook}").mark_line(point=True)
        .encode(x="step:Q", y=alt.Y("value:Q", title=metric, scale=alt.Scale(zero=False)),
                color=alt.Color("run_name:N", title="run"), tooltip=["run_name", "run_id", "step", "value"]),
        width="stretch",
    )
    last = df.sort_values("step").groupby("run_id").tail(1)[["run_name", "run_id", "step", "value"]]
    st.dataframe(last, hide_index=True, width="stretch")


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Compare runs", body)
