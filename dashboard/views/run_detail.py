"""Run detail: the key metrics over steps for one run and hook, with alert markers, and the
pre-flight result of the run's training data when the store holds one (dashboard/preflight.py).

``/run_detail?run=ID`` opens it on that run (the Runs table links here)."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor import catalog
from drift_monitor.dashboard.common import SEVERITY_COLOURS, PageContext, render_page
from drift_monitor.dashboard.preflight import run_section

#: Chart title -> metrics drawn together (each catalog metric's ``panel``, drift_monitor.catalog).
PANELS: dict[str, tuple[str, ...]] = catalog.panels()


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
                    domain=list(SEVERITY_COLOURS), range=list(SEVERITY_COLOURS.values()))),
                tooltip=["step", "rule", "severity", "status", "message"])
    )
    return alt.layer(lines, marks).resolve_scale(color="independent")


def body(ctx: PageContext) -> None:
    r, run, hook = ctx.reader, ctx.run, ctx.hook
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
    run_section(r, run)  # what the run's training data was predicted to do, before training
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


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Run detail", body, key="detail", hook=True)
