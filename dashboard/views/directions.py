"""Directions: the mean projection of each probe category onto each monitored direction over steps.

One chart per direction (a user-supplied one from ``MonitorConfig.directions``, or ``refusal_base``,
the base model's own refusal direction r̂⁰), one line per category; then the refusal direction's
cosine to the base's and its norm. Why per direction: projections onto different directions have
unrelated scales, so sharing one y axis would flatten all but the largest.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import PageContext, render_page
from drift_monitor.records import REFUSAL_BASE

#: The refusal direction's own scalars, drawn under the projections.
REFUSAL_METRICS = ("refusal_direction_cosine", "refusal_direction_norm")


def projection_chart(df: pd.DataFrame, direction: str) -> alt.Chart:
    """Mean projection per category over steps for one direction (``df``: one direction's rows)."""
    title = f"{direction}: mean projection per category"
    if direction == REFUSAL_BASE:
        title += " (base refusal direction r̂⁰)"
    return (
        alt.Chart(df, title=title)
        .mark_line(point=True)
        .encode(x=alt.X("step:Q", title="step"),
                y=alt.Y("projection:Q", title="mean x·v̂", scale=alt.Scale(zero=False)),
                color=alt.Color("category:N", title="category"),
                tooltip=["step", "category", "projection", "delta"])
    )


def body(ctx: PageContext) -> None:
    r, rid, hook = ctx.reader, ctx.run_id, ctx.hook
    df = r.direction_projections(rid, hook)
    directions = sorted(df["direction"].unique().tolist(), key=lambda d: (d == REFUSAL_BASE, d))
    if not [d for d in directions if d != REFUSAL_BASE]:
        st.info("No user direction was configured for this run and hook. Add one with "
                "MonitorConfig(directions={hook: 'direction.safetensors'}) or `drift-monitor scan "
                "--direction HOOK=PATH`; the base refusal direction (refusal_base) is shown when the "
                "probes have harmful and harmless categories.")
    for d in directions:
        st.altair_chart(projection_chart(df[df["direction"] == d], d), width="stretch")
    series = r.metric_series(rid, hook=hook, names=list(REFUSAL_METRICS))
    if series.empty:
        st.caption("Refusal direction: not measured in this run (needs harmful and harmless probes).")
        return
    for name in REFUSAL_METRICS:
        sub = series[series["name"] == name]
        if sub.empty:
            continue
        st.altair_chart(
            alt.Chart(sub, title=name).mark_line(point=True)
            .encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
                    tooltip=["step", "value"]),
            width="stretch",
        )


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Directions", body, key="dir", hook=True)
