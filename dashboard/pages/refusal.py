"""Refusal: emerging refusal features as a feature × step heatmap, and harmful vs harmless drift."""

from __future__ import annotations

import altair as alt
import streamlit as st

from drift_monitor.dashboard.common import pick_run_and_hook
from drift_monitor.store import StoreReader


def page(r: StoreReader) -> None:
    st.header("Refusal features")
    picked = pick_run_and_hook(r, "ref")
    if picked is None:
        return
    run, hook = picked
    rid = run["run_id"]
    k = int(st.number_input("Top-k per step (plus every emerging feature)", 1, 200, 10, key="ref_k"))
    df = r.refusal_features(rid, hook, k=k)
    if df.empty:
        st.info("No refusal scores stored for this run and hook (they need harmful and harmless probes).")
        return
    heat = df.assign(label=df["label"].fillna(""), feature=df["feature"].astype(str))
    st.altair_chart(
        alt.Chart(heat, title="refusal_score by feature and step").mark_rect()
        .encode(x=alt.X("step:O"), y=alt.Y("feature:N", sort="-color"),
                color=alt.Color("refusal_score:Q", scale=alt.Scale(scheme="orangered")),
                stroke=alt.condition("datum.emerging", alt.value("black"), alt.value(None)),
                tooltip=["feature", "label", "step", "refusal_score", "harmful_drift", "harmless_drift",
                         "rank", "emerging"]),
        width="stretch",
    )
    last = int(df["step"].max())
    st.subheader(f"Harmful vs harmless drift at step {last}")
    table = df[df["step"] == last][["feature", "harmful_drift", "harmless_drift", "refusal_score", "z_score",
                                    "rank", "emerging", "label"]]
    st.dataframe(table, hide_index=True, width="stretch")
    emerging = sorted(df[df["emerging"].fillna(False).astype(bool)]["feature"].unique().tolist())
    st.caption(f"Emerging refusal features in this run: {', '.join(map(str, emerging)) or 'none'}")
