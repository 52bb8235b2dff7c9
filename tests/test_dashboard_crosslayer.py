"""The Refusal page's cross-layer section (dashboard/views/crosslayer.py): the pure shaping
(layer order, the rule named in the caption, one ranking over hooks) and, under AppTest, the
section on a 3-hook run and its absence on a 1-hook run."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest
from store_fixtures import HOOK, make_snapshot
from test_dashboard import app, no_errors

from drift_monitor.alerts.rules import REFUSAL_DIRECTION, REFUSAL_EROSION, AlertRule
from drift_monitor.dashboard.views import crosslayer as xl
from drift_monitor.store import Store, StoreReader

#: Written out of layer order on purpose: the page must sort them.
HOOKS = ("model.layers.20", "model.layers.4", "model.layers.12")
IN_ORDER = ["model.layers.4", "model.layers.12", "model.layers.20"]
STEPS = (0, 10, 20)


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_layer_number_and_hook_order():
    assert xl.layer_number("model.layers.12") == 12
    assert xl.layer_number("blocks.6.hook_resid_post") == 6  # TransformerLens names carry it mid-name
    assert xl.layer_number("embed") is None and xl.layer_number("layers12") is None
    hooks = ["model.layers.20", "zeta", "model.layers.4", "adapter", "adapter:q_proj", "alpha", "model.layers.12"]
    # layer order, adapter hooks dropped, the unnumbered last and alphabetically, duplicates once
    assert xl.order_hooks(hooks + ["model.layers.4"]) == IN_ORDER + ["alpha", "zeta"]


def test_layer_grid_keeps_one_metric_in_layer_order():
    series = pd.DataFrame({
        "step": [0, 10, 0, 10, 0, 0],
        "hook": ["model.layers.20", "model.layers.20", "model.layers.4", "model.layers.4", "adapter", "model.layers.4"],
        "name": ["refusal_retention"] * 4 + ["refusal_retention", "max_refusal_score"],
        "value": [0.5, float("nan"), 1.0, 0.9, 0.1, 3.0],
    })
    grid = xl.layer_grid(series, "refusal_retention")
    assert list(grid.columns) == ["hook", "layer", "step", "value"]
    assert grid["hook"].tolist() == ["model.layers.4"] * 2 + ["model.layers.20"] * 2
    assert grid["layer"].tolist() == [4, 4, 20, 20] and grid["step"].tolist() == [0, 10, 0, 10]
    assert grid["value"].iloc[:3].tolist() == [1.0, 0.9, 0.5] and pd.isna(grid["value"].iloc[3])  # a gap, not 0


def test_rule_caption_names_the_default_rule_and_its_bound():
    cap = xl.rule_caption("refusal_retention")
    assert f"refusal_erosion (warning) fires where refusal_retention < {REFUSAL_EROSION:g}" in cap
    assert "start_harmful_refusal_rate >= 0.2" in cap  # the rule's gate is part of when it fires
    assert f"refusal_direction (warning) fires where refusal_direction_cosine < {REFUSAL_DIRECTION:g}" in \
        xl.rule_caption("refusal_direction_cosine")
    assert "emerging_refusal_features" in xl.rule_caption("n_emerging_refusal_features")
    # max_refusal_score is watched only by sudden_change (a z of its changes): no bound on its scale
    assert xl.rule_caption("max_refusal_score") is None and xl.rule_caption("refusal_post_cosine") is None
    mine = [AlertRule("deep_erosion", "threshold", metric="refusal_post_cosine", op="<=", threshold=0.5)]
    assert xl.rule_caption("refusal_post_cosine", mine) == \
        "Alert rule deep_erosion (warning) fires where refusal_post_cosine <= 0.5."
    # the colour scale turns at the bound, red on the side that fires
    scale = xl.colour_scale("refusal_retention").to_dict()
    assert scale["domainMid"] == REFUSAL_EROSION and scale["scheme"] == "redblue" and not scale["reverse"]


def _features(step: int, rows: list[tuple[int, float, bool]]) -> pd.DataFrame:
    return pd.DataFrame({"step": step, "feature": [f for f, _, _ in rows], "harmful_drift": 0.0,
                         "harmless_drift": 0.0, "refusal_score": [s for _, s, _ in rows],
                         "z_score": [s * 2 for _, s, _ in rows], "rank": range(1, len(rows) + 1),
                         "emerging": [e for _, _, e in rows], "label": None})


def test_top_across_hooks_ranks_every_hook_on_one_scale():
    frames = {
        "model.layers.4": pd.concat([_features(10, [(7, 9.0, True)]),  # an older step: not shown
                                     _features(20, [(1, 2.0, False), (2, 0.5, True), (3, float("nan"), False)])]),
        "model.layers.12": _features(20, [(1, 3.0, True), (5, 1.0, False)]),
        "model.layers.20": _features(15, [(9, 2.0, False)]),  # measured less often: its own latest step
        "adapter": _features(20, [(4, 99.0, True)]),  # no refusal features at an adapter hook
        "model.layers.30": _features(20, []),
    }
    top = xl.top_across_hooks(frames, k=3)
    assert list(top.columns) == list(xl.TOP_COLUMNS)
    # the 3 highest over all hooks (a tie goes to the earlier layer), plus the emerging one below them
    assert list(zip(top["hook"], top["feature"])) == [
        ("model.layers.12", 1), ("model.layers.4", 1), ("model.layers.20", 9), ("model.layers.4", 2)]
    assert top["score"].tolist() == [3.0, 2.0, 2.0, 0.5] and top["z"].tolist() == [6.0, 4.0, 4.0, 1.0]
    assert top["emerging"].tolist() == [True, False, False, True] and top["emerging"].dtype == bool
    assert top["step"].tolist() == [20, 20, 15, 20]
    assert xl.top_across_hooks({}, k=3).empty and list(xl.top_across_hooks({}).columns) == list(xl.TOP_COLUMNS)


# --------------------------------------------------------------------------------------------
# The page under AppTest
# --------------------------------------------------------------------------------------------


def retention(hook: str, i: int) -> float:
    """A made-up refusal_retention that erodes faster the deeper the layer."""
    return round(1.0 - 0.01 * i * xl.layer_number(hook), 4)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("crosslayer") / "drift.duckdb"
    with Store(path, run_id="three") as s:
        s.start_run(name="three hooks", model="tiny-llama")
        for i, step in enumerate(STEPS):
            snap = make_snapshot(step, d_sae=64, hooks=HOOKS, seed=i)
            for hook, h in snap.hooks.items():
                h.metrics.update(refusal_retention=retention(hook, i), refusal_direction_cosine=0.99,
                                 max_refusal_score=2.0 + i, refusal_score_floor=1.0)
            s.write(snap)
    with Store(path, run_id="one") as s:
        s.start_run(name="one hook", model="tiny-llama")
        for i, step in enumerate(STEPS):
            s.write(make_snapshot(step, d_sae=64, hooks=(HOOK,), seed=i))
    return path


def _refusal_page(db, run: str):
    at = app(db, "Refusal", run=run)
    no_errors(at)
    assert at.selectbox(key="ref_run").value == run
    return at


def _chart_data(chart) -> pd.DataFrame:
    """The rows a Vega-Lite element draws: Streamlit ships an Altair chart's data as Arrow datasets."""
    (ds,) = chart.proto.datasets
    return pa.ipc.open_stream(ds.data.data).read_all().to_pandas()


def test_refusal_page_cross_layer_section_for_three_hooks(db):
    at = _refusal_page(db, "three")
    assert at.subheader[0].value == "Across layers"
    assert at.selectbox(key="ref_xl_metric").value == "refusal_retention"
    chart = at.get("vega_lite_chart")[0]
    spec = json.loads(chart.proto.spec)
    assert spec["mark"]["type"] == "rect" and spec["encoding"]["y"]["sort"] == IN_ORDER
    shown = _chart_data(chart)
    assert shown["hook"].tolist() == [h for h in IN_ORDER for _ in STEPS]
    assert shown["value"].tolist() == pytest.approx([retention(h, i) for h in IN_ORDER for i in range(len(STEPS))])
    assert any(f"refusal_retention < {REFUSAL_EROSION:g}" in c.value for c in at.caption)
    assert "Emerging refusal features across layers" in [m.value.strip("*") for m in at.markdown]
    top = at.dataframe[0].value
    r = StoreReader(db)
    want = xl.top_across_hooks({h: r.refusal_features("three", h, k=10) for h in HOOKS}, k=10)
    assert list(top.columns) == list(xl.TOP_COLUMNS) and set(top["hook"]) == set(HOOKS)
    assert list(zip(top["hook"], top["feature"])) == list(zip(want["hook"], want["feature"]))
    assert top["score"].is_monotonic_decreasing
    # another metric: the chart follows, and a metric no rule bounds says so
    at.selectbox(key="ref_xl_metric").set_value("max_refusal_score").run()
    assert not at.exception
    assert _chart_data(at.get("vega_lite_chart")[0])["value"].tolist() == [2.0, 3.0, 4.0] * 3
    # a refusal score: the per-hook heatmap's scale, anchored to the floor (refusal_score_floor 1)
    assert json.loads(at.get("vega_lite_chart")[0].proto.spec)["encoding"]["color"]["scale"]["domain"] == [0, 1, 2]
    assert any("No default alert rule reads max_refusal_score" in c.value for c in at.caption)
    assert at.subheader[1].value == f"At {at.selectbox(key='ref_hook').value}"  # then the picked hook's detail


def test_refusal_page_has_no_cross_layer_section_for_one_hook(db):
    at = _refusal_page(db, "one")
    assert "Across layers" not in [s.value for s in at.subheader]
    assert not [s for s in at.selectbox if s.key == "ref_xl_metric"]
    assert "Emerging refusal features across layers" not in [m.value.strip("*") for m in at.markdown]
    assert json.loads(at.get("vega_lite_chart")[0].proto.spec)["encoding"]["color"]["field"] == "refusal_score"
