"""Run detail: the key metrics over steps for one run and hook, with alert markers."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import pick_run_and_hook
from drift_monitor.store import StoreReader

#: Chart title -> metrics drawn together.
PANELS: dict[str, tuple[str, ...]] = {
    "Explained variance (current vs base)": ("explained_variance", "base_explained_variance"),
    "Activation drift": ("act_cosine", "act_relative_mse"),
    "Features drifted ratio": ("features_drifted_ratio",),
    "Top-k Jaccard": ("topk_jaccard",),
    "Density JS distance": ("density_js",),
}


def metric_chart(series: pd.DataFrame, alerts: pd.DataFrame, title: str) -> alt.LayerChart | alt.Chart:
    lines = (
        alt.Chart(series, title=title)
        .mark_line(point=True)
        .encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
                color=alt.Color("name:N", title="metric"), tooltip=["step", "name", "value"])
    )
    if alerts.empty:
        return lines
    marks = (
        alt.Chart(alerts)
        .mark_rule(strokeDash=[4, 3])
        .encode(x="step:Q", color=alt.Color("severity:N", scale=alt.Scale(
                    domain=["info", "warning", "critical"], range=["#4c78a8", "#f58518", "#e45756"])),
                tooltip=["step", "rule", "severity", "status", "message"])
    )
    return alt.layer(lines, marks).resolve_scale(color="independent")


def page(r: StoreReader) -> None:
    st.header("Run detail")
    picked = pick_run_and_hook(r, "detail")
    if picked is None:
        return
    run, hook = picked
    names = [n for names in PANELS.values() for n in names]
    series = r.metric_series(run["run_id"], hook=hook, names=names)
    alerts = r.alerts(run_id=run["run_id"], hook=hook)
    c = st.columns(4)
    c[0].metric("status", str(run["status"]))
    c[1].metric("last step", int(run["last_step"]) if pd.notna(run["last_step"]) else "-")
    c[2].metric("active alerts", int(run["active_alerts"]))
    if not series.empty:
        last = series[series["step"] == series["step"].max()]
        ev = last[last["name"] == "explained_variance"]["value"]
        c[3].metric("explained variance", f"{float(ev.iloc[0]):.4f}" if len(ev) else "-")
    if series.empty:
        st.info("No metrics for this run and hook yet.")
        return
    amarks = alerts[["step", "rule", "severity", "status", "message"]] if not alerts.empty else alerts
    for title, group in PANELS.items():
        sub = series[series["name"].isin(group)]
        if sub.empty:
            st.caption(f"{title}: not measured in this run.")
            continue
        st.altair_chart(metric_chart(sub, amarks, title), width="stretch")
