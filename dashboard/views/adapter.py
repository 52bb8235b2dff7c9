"""Adapter signals of LoRA runs: A/B norms, the weight-update norm and the local cosine of the B
trajectory over steps, for all modules together and per module (drift_monitor.probe.adapters).

Why a page of its own: these hooks (``adapter``, ``adapter:<module>``) have no SAE and no feature
tables, so the hook-based pages do not offer them; and the cosine needs its fixed [−1, 1] axis to
be read (−1: B moves on a straight line; rising toward 0 or above: B turns, a phase transition).
"""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import PageContext, render_page
from drift_monitor.records import ADAPTER_HOOK, ADAPTER_HOOK_PREFIX, LORA_MODULE_METRICS

NORMS = ("adapter_A_norm", "adapter_B_norm", "adapter_BA_norm")
COSINES = ("adapter_B_local_cosine", "adapter_B_local_cosine_max", "adapter_B_local_cosine_global")
COSINE_NOTE = ("The value logged at step t is cos(B[t−2k] − B[t−k], B[t] − B[t−k]): the trajectory *around "
               "t − k* (k = the adapter cadence). −1: B moves on a straight line; rising toward 0 or above: B "
               "turns (the rotation that marks a behavioural phase transition).")


def line_chart(df: pd.DataFrame, title: str, color: str, cosine: bool = False) -> alt.Chart:
    """Lines over steps, one per ``color`` value; the cosine charts keep the fixed [−1, 1] axis."""
    scale = alt.Scale(domain=[-1, 1]) if cosine else alt.Scale(zero=False)
    return (
        alt.Chart(df.dropna(subset=["value"]), title=title)
        .mark_line(point=True)
        .encode(x=alt.X("step:Q", title="step"), y=alt.Y("value:Q", title=None, scale=scale),
                color=alt.Color(f"{color}:N"), tooltip=["step", color, "value"])
    )


def last_step_table(modules: pd.DataFrame) -> pd.DataFrame:
    """One row per module at the last step with adapter signals: its metrics as columns."""
    last = modules[modules["step"] == modules["step"].max()]
    table = last.pivot_table(index="module", columns="name", values="value", aggfunc="first", dropna=False)
    cols = [c for c in LORA_MODULE_METRICS if c in table.columns]
    return table[cols].reset_index()


def body(ctx: PageContext) -> None:
    r, rid = ctx.reader, ctx.run_id
    agg = r.metric_series(rid, hook=ADAPTER_HOOK)
    if agg.empty:
        st.info("This run has no adapter signals. They are recorded for LoRA runs by the trainer callback "
                "(MonitorConfig adapter_signals='auto' or True, cadence adapter_every_n_steps).")
        return
    st.altair_chart(line_chart(agg[agg["name"].isin(NORMS)], "Adapter norms (all modules)", "name"),
                    width="stretch")
    cos = agg[agg["name"].isin(COSINES)]
    if cos["value"].notna().any():
        st.altair_chart(line_chart(cos, "Local cosine of the B trajectory (all modules)", "name", cosine=True),
                        width="stretch")
    else:
        st.caption("Local cosine: needs three adapter records; not available yet.")
    st.caption(COSINE_NOTE)

    modules = r.metric_series(rid, hook_prefix=ADAPTER_HOOK_PREFIX)
    if modules.empty:
        return
    modules = modules.assign(module=modules["hook"].str.slice(len(ADAPTER_HOOK_PREFIX)))
    st.subheader("Per module")
    per_cos = modules[modules["name"] == "lora_B_local_cosine"]
    if per_cos["value"].notna().any():
        st.altair_chart(line_chart(per_cos, "B local cosine per module", "module", cosine=True), width="stretch")
    st.altair_chart(line_chart(modules[modules["name"] == "lora_B_norm"], "B norm per module", "module"),
                    width="stretch")
    st.caption(f"Last step with adapter signals: {int(modules['step'].max())}")
    st.dataframe(last_step_table(modules), hide_index=True, width="stretch")


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Adapter signals", body, key="adp")
