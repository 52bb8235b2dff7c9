"""The Refusal page's cross-layer section: one refusal metric as a layer × step heatmap, and the
refusal features of the latest step ranked over every SAE hook at once.

Why one view over the hooks: a run monitored at several layers answers "where did refusal
change?" only when the layers sit side by side on one scale. The refusal scores allow it: each is
in units of the feature's firing strength floored at its SAE's typical strength (docs/metrics.md,
"Refusal features"), so a score at one layer ranks against a score at another.

Not a page (``app.py`` does not register it): ``views/refusal.py`` calls :func:`section`. The
shaping (:func:`layer_number`, :func:`order_hooks`, :func:`layer_grid`, :func:`rule_caption`,
:func:`top_across_hooks`) is pure pandas, tested without Streamlit; :func:`section` only reads the
store and draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import altair as alt
import pandas as pd
import streamlit as st

from drift_monitor.alerts.rules import AlertRule, default_rules
from drift_monitor.records import is_adapter_hook
from drift_monitor.store import StoreReader

#: The metrics the heatmap offers, the first the default: per hook and step, all in the catalog.
METRICS: tuple[str, ...] = (
    "refusal_retention", "refusal_post_cosine", "refusal_direction_cosine", "max_refusal_score",
    "max_post_refusal_score", "n_emerging_refusal_features",
)
#: Metrics in refusal-score units: coloured on the floor-anchored scale of the per-hook heatmap.
SCORE_METRICS: tuple[str, ...] = ("max_refusal_score", "max_post_refusal_score")
#: Table columns of :func:`top_across_hooks`.
TOP_COLUMNS: tuple[str, ...] = ("hook", "feature", "score", "z", "emerging", "step", "label")


def layer_number(hook: str) -> int | None:
    """The layer index a hook name carries: its last dot-separated part that is an integer
    (``model.layers.12`` -> 12, ``blocks.6.hook_resid_post`` -> 6), or None when no part is one."""
    for part in reversed(str(hook).split(".")):
        if part.isdigit():
            return int(part)
    return None


def order_hooks(hooks: Iterable[str]) -> list[str]:
    """SAE hooks (adapter hooks dropped) from the first layer to the last, so the heatmap's rows
    read down the model; hooks without a layer number go last, alphabetically."""
    def key(h: str) -> tuple[bool, int, str]:
        n = layer_number(h)
        return (n is None, n if n is not None else 0, h)

    return sorted({h for h in hooks if not is_adapter_hook(h)}, key=key)


def layer_grid(series: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One metric of ``StoreReader.metric_series`` (long: ``step, hook, name, value``) as the
    heatmap's cells: ``hook, layer, step, value`` over the SAE hooks, in layer order. NaN cells
    (a metric the step could not measure) are kept: they show as gaps, not as zeros."""
    rows = series[(series["name"] == metric) & ~series["hook"].map(is_adapter_hook).astype(bool)]
    order = {h: i for i, h in enumerate(order_hooks(rows["hook"]))}
    out = rows.assign(layer=rows["hook"].map(layer_number), _o=rows["hook"].map(order))
    out = out.sort_values(["_o", "step"], kind="stable")
    return out[["hook", "layer", "step", "value"]].reset_index(drop=True)


def metric_rules(metric: str, rules: Sequence[AlertRule] | None = None) -> list[AlertRule]:
    """The rules (default: :func:`default_rules`) that fire on ``metric`` crossing a bound: the
    ``threshold`` rules on it and ``emerging_refusal`` on its count. Not ``sudden_change``: it
    bounds a z-score of the changes, not the metric's value, so no line on the metric's scale."""
    rules = default_rules() if rules is None else rules
    return [r for r in rules if r.kind in ("threshold", "emerging_refusal") and r.metric == metric]


def _op(rule: AlertRule) -> str:
    return rule.op if rule.kind == "threshold" and rule.op else ">"


def rule_caption(metric: str, rules: Sequence[AlertRule] | None = None) -> str | None:
    """The heatmap's caption line naming each rule that reads ``metric`` and its bound, e.g.
    ``Rule refusal_erosion (warning) fires where refusal_retention < 0.871 ...``; None when no rule
    reads it. Why on the chart: a colour is read against the line an alert crosses."""
    found = metric_rules(metric, rules)
    if not found:
        return None
    parts = []
    for r in found:
        text = f"rule {r.name} ({r.severity}) fires where {metric} {_op(r)} {r.threshold:g}"
        if r.requires is not None:
            text += f", for a run where {r.requires.describe()}"
        parts.append(text)
    return "Alert " + "; ".join(parts) + "."


def colour_scale(metric: str, rules: Sequence[AlertRule] | None = None,
                 score_scale: alt.Scale | None = None) -> alt.Scale:
    """The heatmap's colour scale: a metric a rule bounds diverges at the rule's bound (red on the
    side that fires, blue on the quiet side); a refusal score takes ``score_scale`` (the per-hook
    heatmap's, anchored to the floor an emerging feature must reach); anything else is sequential."""
    found = metric_rules(metric, rules)
    if found:
        r = found[0]
        fires_low = _op(r) in ("<", "<=")
        return alt.Scale(scheme="redblue", domainMid=float(r.threshold or 0.0), reverse=not fires_low)
    if metric in SCORE_METRICS and score_scale is not None:
        return score_scale
    return alt.Scale(scheme="oranges")


def heatmap(grid: pd.DataFrame, metric: str, scale: alt.Scale) -> alt.Chart:
    """Hooks (rows, first layer on top) × steps (columns), coloured by ``metric``'s value."""
    hooks = list(dict.fromkeys(grid["hook"]))
    return (
        alt.Chart(grid, title=f"{metric} by layer and step").mark_rect()
        .encode(x=alt.X("step:O"), y=alt.Y("hook:N", sort=hooks, title="hook (layer order)"),
                color=alt.Color("value:Q", scale=scale, title=metric),
                tooltip=["hook", "layer", "step", alt.Tooltip("value:Q", title=metric)])
    )


def top_across_hooks(frames: Mapping[str, pd.DataFrame], k: int = 10) -> pd.DataFrame:
    """The refusal features of each hook's latest step (``StoreReader.refusal_features`` per hook),
    ranked by refusal score over all hooks: the ``k`` highest scores plus every emerging feature,
    highest first (ties: layer order, then feature id). Columns :data:`TOP_COLUMNS`.

    Why one ranking: the scores are in floored firing-strength units, comparable between SAEs,
    so the top of this table is where refusal is carried most strongly, whichever layer that is.
    Each hook's own latest step, not the run's: a hook measured less often still shows its newest.
    """
    order = {h: i for i, h in enumerate(order_hooks(frames))}
    parts = []
    for hook, df in frames.items():
        if hook not in order or df.empty:
            continue
        last = df[df["step"] == df["step"].max()]
        parts.append(pd.DataFrame({
            "hook": hook, "feature": last["feature"].astype(int), "score": last["refusal_score"].astype(float),
            "z": last["z_score"].astype(float), "emerging": last["emerging"].fillna(False).astype(bool),
            "step": last["step"].astype(int),
            "label": last["label"] if "label" in last else None, "_o": order[hook],
        }))
    if not parts:
        return pd.DataFrame({c: [] for c in TOP_COLUMNS})
    rows = pd.concat(parts, ignore_index=True)
    rows = rows[rows["score"].notna()].sort_values(["score", "_o", "feature"], ascending=[False, True, True],
                                                   kind="stable")
    keep = rows.head(max(int(k), 0)).index.union(rows.index[rows["emerging"]])
    return rows.loc[rows.index.isin(keep), list(TOP_COLUMNS)].reset_index(drop=True)


def section(r: StoreReader, run_id: str, hooks: Sequence[str], k: int, score_scale: alt.Scale | None = None) -> bool:
    """Draw the cross-layer section for a run with two or more SAE hooks; False (nothing drawn)
    for fewer, where one hook's own view says it all."""
    ordered = order_hooks(hooks)
    if len(ordered) < 2:
        return False
    st.subheader("Across layers")
    metric = st.selectbox("Metric by layer and step", METRICS, key="ref_xl_metric")
    grid = layer_grid(r.metric_series(run_id, names=[metric]), metric)
    grid = grid[grid["hook"].isin(ordered)]
    if grid.empty:
        st.info(f"No {metric} stored for this run's hooks.")
    else:
        st.altair_chart(heatmap(grid, metric, colour_scale(metric, score_scale=score_scale)), width="stretch")
    caption = rule_caption(metric)
    st.caption(f"{len(ordered)} hooks, first layer on top. " + (caption or f"No default alert rule reads {metric}."))
    st.markdown("**Emerging refusal features across layers**")
    top = top_across_hooks({h: r.refusal_features(run_id, h, k=k) for h in ordered}, k=k)
    if top.empty:
        st.info("No refusal scores stored for this run's hooks.")
    else:
        st.dataframe(top, hide_index=True, width="stretch", key="ref_xl_top")
        st.caption("Each hook's latest step, ranked by refusal score over every hook (the scores are in units of "
                   "each feature's firing strength floored at its SAE's typical strength, so they compare between "
                   f"layers): the top {k} plus every emerging feature.")
    return True
