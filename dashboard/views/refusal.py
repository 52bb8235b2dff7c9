"""Refusal: for a run with several SAE hooks first the cross-layer section (views/crosslayer.py:
a refusal metric by layer and step, the refusal features ranked over every hook), then the picked
hook's emerging refusal features as a feature × step heatmap, harmful vs harmless drift, and the
causal check (``drift-monitor verify``) results stored for the run."""

from __future__ import annotations

import json

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import PageContext, render_page
from drift_monitor.dashboard.views import crosslayer
from drift_monitor.records import pct
from drift_monitor.settings import MetricSettings
from drift_monitor.store import StoreReader

#: The heatmap's colours at 0, at the floor and at twice the floor (clamped beyond): white, orange, red.
HEAT_COLOURS = ("#f7f7f7", "#fdae61", "#d7191c")


def score_floor(r: StoreReader, run_id: str, hook: str) -> float:
    """The refusal score an emerging refusal feature must reach in this run: its last stored
    ``refusal_score_floor`` (the run's ``refusal_min_rel_score`` setting), else the setting's default
    (a run recorded before the metric was stored)."""
    floor = r.metric_series(run_id, hook=hook, names=["refusal_score_floor"])["value"].dropna()
    if len(floor) and float(floor.iloc[-1]) > 0:
        return float(floor.iloc[-1])
    return float(MetricSettings().refusal_min_rel_score)


def floor_scale(floor: float) -> alt.Scale:
    """A refusal score's colour scale, anchored to the floor, not to the run's own range: the floor
    is always orange, so a run whose best score is a tenth of it reads pale instead of red (a scale
    stretched over the run's range paints any maximum red)."""
    return alt.Scale(domain=[0.0, floor, 2 * floor], range=list(HEAT_COLOURS), clamp=True)


def heatmap(df: pd.DataFrame, floor: float) -> alt.Chart:
    """Refusal scores by feature and step, coloured on :func:`floor_scale`."""
    heat = df.assign(label=df["label"].fillna(""), feature=df["feature"].astype(str))
    scale = floor_scale(floor)
    return (
        alt.Chart(heat, title="refusal_score by feature and step").mark_rect()
        .encode(x=alt.X("step:O"), y=alt.Y("feature:N", sort="-color"),
                color=alt.Color("refusal_score:Q", scale=scale),
                stroke=alt.condition("datum.emerging", alt.value("black"), alt.value(None)),
                tooltip=["feature", "label", "step", "refusal_score", "harmful_drift", "harmless_drift",
                         "rank", "emerging"])
    )


def body(ctx: PageContext) -> None:
    r, rid, hook = ctx.reader, ctx.run_id, ctx.hook
    k = int(st.number_input("Top-k per step (plus every emerging feature)", 1, 200, 10, key="ref_k"))
    floor = score_floor(r, rid, hook)
    if crosslayer.section(r, rid, r.hooks(rid), k, score_scale=floor_scale(floor)):
        st.subheader(f"At {hook}")
    df = r.refusal_features(rid, hook, k=k)
    if df.empty:
        st.info("No refusal scores stored for this run and hook (they need harmful and harmless probes).")
        causal_check(r, rid, hook)
        return
    st.altair_chart(heatmap(df, floor), width="stretch")
    st.caption(f"Colour: the refusal score against the floor an emerging feature must reach ({floor:g}, "
               "orange); white is no refusal activity, red twice the floor. The scale is the same for every "
               "run, so a quiet run stays pale.")
    last = int(df["step"].max())
    st.subheader(f"Harmful vs harmless drift at step {last}")
    table = df[df["step"] == last][["feature", "harmful_drift", "harmless_drift", "refusal_score", "z_score",
                                    "rank", "emerging", "label"]]
    st.dataframe(table, hide_index=True, width="stretch")
    emerging = sorted(df[df["emerging"].fillna(False).astype(bool)]["feature"].unique().tolist())
    st.caption(f"Emerging refusal features in this run: {', '.join(map(str, emerging)) or 'none'}")
    causal_check(r, rid, hook)


def causal_check(r: StoreReader, run_id: str, hook: str) -> None:
    """The stored ``drift-monitor verify`` tables of this run and hook, newest first: a check over
    several hooks (stored as ``h1+h2``) is listed at each of them, with its hooks named."""
    st.subheader("Causal check (drift-monitor verify)")
    v = r.verifications(run_id=run_id, hook=hook)
    if v.empty:
        st.info("No causal check stored for this run and hook. Run `drift-monitor verify --db DB --run RUN "
                "--model BASE --adapter ADAPTER` to ablate the emerging refusal features "
                "(against a density-matched random control) and steer the base with them.")
        return
    ids = list(dict.fromkeys(v["verify_id"]))
    when = dict(zip(v["verify_id"], v["created_at"].astype(str)))
    label = dict(zip(v["verify_id"], v["hook"]))
    vid = st.selectbox("Check", ids, key="ref_verify",
                       format_func=lambda i: f"{when[i]} (step {int(v[v.verify_id == i].step.iloc[0])}, "
                                             f"{check_where(label[i])}, {i})")
    rows = v[v["verify_id"] == vid]
    summary = json.loads(rows["summary_json"].iloc[0] or "{}")
    hooks = str(label[vid]).split("+")
    if len(hooks) > 1:
        st.markdown(f"Features ablated together at {len(hooks)} hooks: " + ", ".join(f"`{h}`" for h in hooks))
    st.markdown(f"**Verdict (on the features):** {summary.get('verdict', '?')}")
    c1, c2, c3 = st.columns(3)
    c1.metric("Ablation: harmful refusal drop", pct(summary.get("ablation_relative_drop")))
    c2.metric("Random control: drop", pct(summary.get("random_relative_drop")))
    c3.metric("Steering the base: refusal gain", pct(summary.get("steering_gain"), signed=True))
    if "direction_ablated" in set(rows["condition"]):
        layers = summary.get("direction_layers") or []
        d1, d2, _ = st.columns(3)
        d1.metric("Reference: refusal direction removed", pct(summary.get("direction_relative_drop")))
        d2.metric("Random direction removed: drop", pct(summary.get("random_direction_relative_drop")))
        st.caption(f"Reference conditions: the run's refusal direction (and, as a control, a random direction) "
                   f"removed at {len(layers)} decoder layers' outputs (Arditi et al.); the verdict judges the "
                   "features only.")
    mean = rows.groupby("condition", sort=False, as_index=False)[["harmful_refusal_rate", "harmless_refusal_rate",
                                                                 "kl_harmless"]].mean()
    st.altair_chart(
        alt.Chart(mean, title="Harmful refusal rate by condition (random: mean of draws)").mark_bar()
        .encode(x=alt.X("condition:N", sort=list(mean["condition"])),
                y=alt.Y("harmful_refusal_rate:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
                tooltip=["condition", "harmful_refusal_rate", "harmless_refusal_rate", "kl_harmless"]),
        width="stretch",
    )
    st.dataframe(rows[["condition", "draw", "features", "alpha", "harmful_refusal_rate", "harmless_refusal_rate",
                       "kl_harmless", "n_harmful", "n_harmless"]], hide_index=True, width="stretch")


def check_where(label: str) -> str:
    """A stored check's hook label for the picker: ``model.layers.15``, or ``3 hooks`` for ``h1+h2+h3``."""
    n = len(str(label).split("+"))
    return str(label) if n == 1 else f"{n} hooks"


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Refusal features", body, key="ref", hook=True)
