"""Features: base vs current density at a step, the top drifting features, one feature's trajectory,
and the import of feature explanations (labels; off with ``--read-only``)."""

from __future__ import annotations

import csv
import io
import json

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from drift_monitor.dashboard.common import PageContext, render_page
from drift_monitor.store import TOP_BY_SQL, Store
from drift_monitor.store.tables import label_id

_ID_KEYS = ("feature", "index", "feature_id", "featureId", "id", "feature_index")
_LABEL_KEYS = ("label", "description", "explanation", "text")


def _pick(d: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in d and d[k] not in (None, ""):
            return d[k]
    return None


def _rows_from_dicts(items: list[dict]) -> pd.DataFrame:
    feats, labels = [], []
    for row, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ValueError("each record must be an object with a feature id and an explanation")
        fid, label = _pick(item, _ID_KEYS), _pick(item, _LABEL_KEYS)
        if label is None and isinstance(item.get("explanations"), list) and item["explanations"]:
            label = _pick(item["explanations"][0], _LABEL_KEYS)  # Neuronpedia feature export
        if fid is None or label is None:
            continue
        feats.append(label_id(fid, row, "label file"))
        labels.append(str(label))
    if not feats:
        raise ValueError(f"no (feature id, explanation) pairs found; expected keys like {_ID_KEYS[:2]} "
                         f"and {_LABEL_KEYS[:3]}")
    return pd.DataFrame({"feature": feats, "label": labels})


def parse_labels(data: bytes, filename: str) -> pd.DataFrame:
    """A Neuronpedia-style export -> ``feature, label``.

    JSON: a list of objects (``index``/``feature`` + ``description``/``explanation``/``label``),
    an object ``{"explanations": [...]}``, or a mapping ``{feature_id: explanation}``.
    CSV: a header with one id column and one explanation column of those names.
    """
    text = data.decode("utf-8-sig")
    if filename.lower().endswith(".json") or text.lstrip()[:1] in ("[", "{"):
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("explanations"), list):
            obj = obj["explanations"]
        if isinstance(obj, dict):
            return pd.DataFrame({"feature": [label_id(k, i, filename) for i, k in enumerate(obj, 1)],
                                 "label": [str(v) for v in obj.values()]})
        if isinstance(obj, list):
            return _rows_from_dicts(obj)
        raise ValueError("a JSON label file must be a list of records or a {feature: explanation} object")
    return _rows_from_dicts(list(csv.DictReader(io.StringIO(text))))


def import_labels(db: str, hook: str, data: bytes, filename: str, source: str = "neuronpedia") -> int:
    """Parse and store labels through :meth:`Store.import_labels`; returns how many were stored."""
    df = parse_labels(data, filename)
    with Store(db, retry_timeout_s=5.0) as s:
        outcome = s.import_labels(hook, df, source=source)
    if outcome != "committed":
        raise RuntimeError("the database stayed busy; the labels were spooled and are applied with the next write")
    return len(df.drop_duplicates("feature"))


def density_chart(df: pd.DataFrame, eps: float) -> alt.Chart:
    d = df.assign(density=np.maximum(df["density"], eps), base_density=np.maximum(df["base_density"], eps),
                  label=df["label"].fillna(""))
    return (
        alt.Chart(d, title="Base vs current density (log-log; 0 drawn at the floor)")
        .mark_circle(size=18, opacity=0.6)
        .encode(
            x=alt.X("base_density:Q", scale=alt.Scale(type="log"), title="base density"),
            y=alt.Y("density:Q", scale=alt.Scale(type="log"), title="current density"),
            color=alt.Color("drift:Q", scale=alt.Scale(scheme="redblue", domainMid=0, reverse=True)),
            tooltip=["feature", "label", "drift", "density", "base_density"],
        )
    )


#: A feature's trajectory: three quantities of three scales (a density in [0, 1], a log ratio, a
#: drift in units of the feature's strength), each on its own axis.
TRAJECTORY = ("drift", "density", "log_density_ratio")


def trajectory_chart(traj: pd.DataFrame, feature: int) -> alt.FacetChart:
    """One row per quantity, each with its own y axis (one shared axis would flatten the density)."""
    long = traj.melt(id_vars="step", value_vars=list(TRAJECTORY))
    return (
        alt.Chart(long).mark_line(point=True)
        .encode(x=alt.X("step:Q"), y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
                tooltip=["step", "variable", "value"])
        .properties(height=110)
        .facet(row=alt.Row("variable:N", title=None, sort=list(TRAJECTORY)), title=f"Feature {feature} over steps")
        .resolve_scale(y="independent")
    )


def body(ctx: PageContext) -> None:
    r, rid, hook = ctx.reader, ctx.run_id, ctx.hook
    steps = r.steps(rid, hook)
    if st.session_state.get("feat_step") not in steps:
        st.session_state["feat_step"] = steps[-1]
    step = st.selectbox("Step", steps, key="feat_step")
    cats = r.categories(rid, step, hook) or ["all"]
    category = st.selectbox("Category", cats, index=cats.index("all") if "all" in cats else 0, key="feat_cat")

    scatter = r.density_scatter(rid, step, hook, category, limit=5000)
    if scatter.empty:
        st.info("No feature statistics at this step.")
    else:
        pos = pd.concat([scatter["density"], scatter["base_density"]])
        pos = pos[pos > 0]
        eps = float(pos.min()) / 2 if len(pos) else 1e-6
        st.altair_chart(density_chart(scatter, eps), width="stretch")

    st.subheader("Top drifting features")
    c1, c2 = st.columns(2)
    by = c1.selectbox("Rank by", list(TOP_BY_SQL), key="feat_by")
    k = int(c2.number_input("How many", min_value=1, max_value=1000, value=25, key="feat_k"))
    top = r.top_features(rid, step, hook, by=by, k=k, category=category)
    st.dataframe(top, hide_index=True, width="stretch",
                 column_config={"label": st.column_config.TextColumn("label")})

    st.subheader("Feature trajectory")
    default = int(top["feature"].iloc[0]) if not top.empty else 0
    feature = int(st.number_input("Feature id", min_value=0, value=default, step=1, key="feat_id"))
    traj = r.feature_trajectory(rid, hook, feature, category=category)
    if traj.empty:
        st.info(f"Feature {feature} did not fire at any stored step.")
    else:
        st.altair_chart(trajectory_chart(traj, feature), width="stretch")
    labels = r.labels(hook)
    mine = labels[labels["feature"] == feature]
    st.text(f"Label: {mine['label'].iloc[0] if len(mine) else '(none)'}")  # text, never HTML

    with st.expander("Import feature labels (Neuronpedia export, JSON or CSV)"):
        st.caption(f"{len(labels)} labels stored for {hook}.")
        if not ctx.offer_write("Importing labels", "feature_labels"):
            return
        up = st.file_uploader("Label file", type=["json", "csv"], key="labels_file")
        if up is not None and st.button("Import labels", key="labels_import"):
            try:
                n = import_labels(ctx.write_path(), hook, up.getvalue(), up.name)
            except (ValueError, RuntimeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                st.error(f"Could not import {up.name}: {exc}")
            else:
                st.success(f"Imported {n} labels for {hook}.")


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Features", body, key="feat", hook=True)
