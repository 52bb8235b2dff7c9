"""Residual: what the base SAE cannot represent (drift_monitor.probe.residual).

The error energy ratio over steps (1 = nothing new), then, at a chosen step, each direction of
new SAE error: its share of the error, the nearest decoder direction (is it a feature after
all?), its mean projection per probe category, and the logit lens (the tokens it promotes and
suppresses). Why this page: the feature pages show only what the base SAE's coordinates can
express; a fine-tune's new directions show up here instead.
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import PageContext, render_page

#: The residual monitor's scalars, each drawn over steps on its own chart: the energy ratio reaches
#: thousands on a toy run, the share lives in [0, 1]; one axis for both would flatten the share.
RESIDUAL_METRICS = ("residual_energy_ratio", "residual_top_share")
TITLES = {"residual_energy_ratio": "SAE error, current / base (energy ratio; log scale)",
          "residual_top_share": "Share of the error along the first new direction"}


def metric_chart(series: pd.DataFrame, name: str) -> alt.Chart:
    """One metric over steps: the ratio on a log axis (1 = nothing new, thousands on a toy run),
    the share on its fixed [0, 1]."""
    scale = alt.Scale(type="log") if name == "residual_energy_ratio" else alt.Scale(domain=[0, 1])
    return (
        alt.Chart(series, title=TITLES[name]).mark_line(point=True)
        .encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=name, scale=scale),
                tooltip=["step", "name", "value"])
    )


def body(ctx: PageContext) -> None:
    r, rid, hook = ctx.reader, ctx.run_id, ctx.hook
    series = r.metric_series(rid, hook=hook, names=list(RESIDUAL_METRICS))
    for name in RESIDUAL_METRICS:
        sub = series[series["name"] == name] if not series.empty else series
        if name == "residual_energy_ratio":
            sub = sub[sub["value"] > 0]  # a log axis: a ratio of 0 cannot be drawn
        if not sub.empty:
            st.altair_chart(metric_chart(sub, name), width="stretch")
    df = r.residual_directions(rid, hook=hook)
    if df.empty:
        st.info("No direction of new SAE error at this hook: the base SAE explains the model's changes "
                "(or the run was recorded before the residual monitor, or with metrics.residual_directions = 0).")
        return
    steps = sorted(df.step.unique().tolist())
    step = st.select_slider("step", options=steps, value=steps[-1], key="res_step")
    at = df[df.step == step]
    cats = sorted({c for p in at.projections for c in p})
    table = pd.DataFrame({
        "rank": at["rank"], "share of error": at.share, "nearest feature": at.nearest_feature,
        "|cos| to it": at.decoder_cos,
        **{f"proj {c}": [p.get(c) for p in at.projections] for c in cats},
        "promotes": [" ".join(map(repr, t[:6])) for t in at.top_tokens],
        "suppresses": [" ".join(map(repr, t[:6])) for t in at.bottom_tokens],
    })
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"share of error": st.column_config.ProgressColumn(format="%.3f", min_value=0.0,
                                                                                  max_value=1.0)})
    st.caption("share: the direction's new error variance over the current model's error per token; |cos| near 1 "
               "means a decoder direction exists but is under-used; promotes/suppresses: the logit lens "
               "(W_U · final-norm scale ⊙ direction).")


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Residual", body, key="res", hook=True)
