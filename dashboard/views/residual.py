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

#: The residual monitor's scalars, drawn over steps.
RESIDUAL_METRICS = ("residual_energy_ratio", "residual_top_share")


def body(ctx: PageContext) -> None:
    r, rid, hook = ctx.reader, ctx.run_id, ctx.hook
    series = r.metric_series(rid, hook=hook, names=list(RESIDUAL_METRICS))
    if not series.empty:
        st.altair_chart(
            alt.Chart(series, title="SAE error, current / base (energy ratio) and the first new direction's share")
            .mark_line(point=True)
            .encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
                    color=alt.Color("name:N", title="metric"), tooltip=["step", "name", "value"]),
            width="stretch")
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
