"""The dashboard reads like an alarm panel: a run's active alerts come first on every run view, no
chart puts quantities of different scales on one axis, and colour scales are anchored to the rule's
threshold (the refusal floor), not stretched over the run's own range, so a quiet run reads calm.

Each view runs under Streamlit's AppTest on a DB written through the Store API; what is checked is
read from the page's element tree and from the Vega-Lite figures it sends (spec and datasets).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from store_fixtures import HOOK, make_snapshot
from test_dashboard import app, no_errors

from drift_monitor import catalog
from drift_monitor.dashboard.common import ALERT_ICON
from drift_monitor.records import Alert
from drift_monitor.settings import MetricSettings
from drift_monitor.store import Store

LOUD, QUIET = "loud-id", "quiet-id"
#: the loud run's own refusal_min_rel_score (not the default: the page must read the run's)
LOUD_FLOOR = 0.8
STEPS = (0, 10, 20)
#: the views that show one run (render_page with a run picker)
RUN_VIEWS = ("Run detail", "Features", "Refusal", "Directions", "Residual", "Adapter")


def _alerts(step: int) -> list[Alert]:
    a = lambda rule, sev, status="active": Alert(rule=rule, severity=sev, step=step, hook=HOOK,  # noqa: E731
                                                 message=f"{rule} <b>fired</b>", status=status)
    if step == 10:
        return [a("ev_drop", "warning"), a("features_drifted", "warning")]
    if step == 20:
        return [a("features_drifted", "warning", "resolved"), a("residual_growth", "warning"),
                a("nonfinite_activations", "critical")]
    return []


def _write(db, run_id: str, loud: bool) -> None:
    s = Store(db, run_id=run_id)
    s.start_run(name=run_id.split("-")[0], model="tiny")
    for i, step in enumerate(STEPS):
        snap = make_snapshot(step, d_sae=64, seed=i + (0 if loud else 50), n_emerging=2 if loud else 0)
        h = snap.hooks[HOOK]
        score = h.refusal.refusal_score
        # loud: the best score is 2.5x its floor; quiet: a tenth of the default floor's... at most 0.06
        h.refusal.refusal_score = score / np.nanmax(score) * (2.5 * LOUD_FLOOR if loud else 0.06)
        if not loud:
            h.refusal.emerging = []
        h.metrics.update(explained_variance=0.7 - (0.05 * i if loud else 0), base_explained_variance=0.72,
                         residual_energy_ratio=(1.0, 40.0, 3000.0)[i] if loud else 1.0 + 0.01 * i,
                         residual_top_share=0.1 * i, act_cosine=0.99 - 0.1 * i, act_relative_mse=0.2 * i * 10,
                         ce_loss_delta=0.1 * i, features_drifted_ratio=0.05 * i)
        if loud:  # the quiet run was recorded before the floor was stored: the page falls back to the default
            h.metrics["refusal_score_floor"] = LOUD_FLOOR
        s.write(snap, alerts=_alerts(step) if loud else [])
    s.close()


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("alarm") / "drift.duckdb"
    _write(path, LOUD, loud=True)
    _write(path, QUIET, loud=False)
    return path


def run_view(at) -> list:
    """The run view's elements in page order, after its header (blocks flattened)."""
    out = []

    def walk(node):
        for child in node.children.values():
            if getattr(child, "children", None) and type(child).__name__ in ("Block", "SpecialBlock"):
                walk(child)
            else:
                out.append(child)

    walk(at.main)
    assert out[0].type == "header"
    return out[1:]


def figures(at) -> list[tuple[dict, dict[str, pd.DataFrame]]]:
    """Each Vega-Lite figure on the page: (spec, its datasets by name)."""
    return [(json.loads(c.proto.spec), {d.name: pa.ipc.open_stream(d.data.data).read_pandas()
                                        for d in c.proto.datasets})
            for c in at.get("vega_lite_chart")]


def y_metrics(spec: dict, data: dict[str, pd.DataFrame]) -> set[str]:
    """The metrics a figure draws on its (shared) y axis: the ``name`` values of every layer
    encoding y (alert markers have no y)."""
    layers = spec.get("layer", [spec])
    names: set[str] = set()
    for layer in layers:
        if "y" not in layer.get("encoding", {}):
            continue
        df = data[layer.get("data", spec.get("data"))["name"]]
        names |= set(df["name"]) if "name" in df else {layer["encoding"]["y"].get("title") or "?"}
    return names


@pytest.mark.parametrize("page", RUN_VIEWS)
def test_active_alerts_are_the_first_thing_on_every_run_view(db, page):
    at = app(db, page, run=LOUD)
    no_errors(at)
    first = run_view(at)[0]
    assert first.type == "error" and first.icon == ALERT_ICON, (page, first)  # a critical alert: red
    text = first.value.replace("\\_", "_")  # markdown-escaped underscores
    assert text.startswith("**3 active alerts** (1 critical, 2 warning)"), text
    # the active ones, critical first, then the newest; not the resolved features_drifted
    assert text.index("nonfinite_activations") < text.index("residual_growth") < text.index("ev_drop"), text
    assert "features_drifted" not in text, text
    assert "<b>" not in text and "\\<b\\>" in text  # an alert message stays plain text

    quiet = app(db, page, run=QUIET)
    no_errors(quiet)
    first = run_view(quiet)[0]
    assert first.type == "success" and "No active alerts" in first.value, (page, first)


def test_no_run_detail_chart_mixes_scales(db):
    at = app(db, "Run detail", run=LOUD)
    no_errors(at)
    drawn = [y_metrics(spec, data) for spec, data in figures(at)]
    assert {"explained_variance", "residual_energy_ratio", "ce_loss_delta", "act_cosine",
            "act_relative_mse"} <= set().union(*drawn)
    for names in drawn:
        assert not {"explained_variance", "residual_energy_ratio"} <= names, names
        assert len({catalog.spec(n).unit for n in names}) == 1, names  # one unit per axis
    # the energy ratio (thousands here) has a chart of its own
    assert {"residual_energy_ratio"} in drawn


def test_residual_view_draws_each_scale_on_its_own_chart(db):
    at = app(db, "Residual", run=LOUD)
    no_errors(at)
    figs = figures(at)
    by_metric = {frozenset(y_metrics(spec, data)): spec for spec, data in figs}
    assert set(by_metric) == {frozenset({"residual_energy_ratio"}), frozenset({"residual_top_share"})}
    assert by_metric[frozenset({"residual_energy_ratio"})]["encoding"]["y"]["scale"]["type"] == "log"
    assert by_metric[frozenset({"residual_top_share"})]["encoding"]["y"]["scale"]["domain"] == [0, 1]


def heat_scale(at) -> tuple[dict, float]:
    """The refusal heatmap's colour scale and the largest score it draws."""
    [(spec, data)] = [(s, d) for s, d in figures(at) if s.get("mark", {}).get("type") == "rect"]
    df = data[spec["data"]["name"]]
    return spec["encoding"]["color"]["scale"], float(df["refusal_score"].max())


def test_refusal_heatmap_colours_are_anchored_to_the_floor(db):
    loud = app(db, "Refusal", run=LOUD)
    no_errors(loud)
    scale, top = heat_scale(loud)
    # the run's own stored floor sits at the middle colour; the scale does not follow the data
    assert scale["domain"] == [0.0, LOUD_FLOOR, 2 * LOUD_FLOOR] and scale["clamp"] is True
    assert "scheme" not in scale and top == pytest.approx(2.5 * LOUD_FLOOR)
    red = scale["range"][-1]

    quiet = app(db, "Refusal", run=QUIET)
    no_errors(quiet)
    scale, top = heat_scale(quiet)
    floor = MetricSettings().refusal_min_rel_score  # no stored floor: the setting's default
    assert scale["domain"] == [0.0, floor, 2 * floor] and scale["range"][-1] == red
    # the quiet run's best score (0.06) sits in the pale first eighth of the scale, far from red
    assert top == pytest.approx(0.06) and top / scale["domain"][-1] < 0.125


def test_a_feature_trajectory_gives_each_quantity_its_own_axis(db):
    at = app(db, "Features", run=LOUD)
    no_errors(at)
    figs = figures(at)
    [(spec, data)] = [(s, d) for s, d in figs if "facet" in s]
    assert spec["facet"]["row"]["field"] == "variable" and spec["resolve"]["scale"]["y"] == "independent"
    df = data[spec["data"]["name"]]
    assert set(df["variable"]) == {"drift", "density", "log_density_ratio"}
    # and no other figure on the page draws the quantities as colours of one axis
    assert not [s for s, _ in figs if s.get("encoding", {}).get("color", {}).get("field") == "variable"]
