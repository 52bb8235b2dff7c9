"""The Residual view (dashboard/views/residual.py) on a run whose snapshots carry directions of
new SAE error, and on one without."""

from __future__ import annotations

from store_fixtures import HOOK, make_snapshot
from test_dashboard import app, charts, header, no_errors

from drift_monitor.records import ResidualDirection
from drift_monitor.store import Store


def _run_with_directions(db, run_id: str) -> None:
    s = Store(db, run_id=run_id)
    s.start_run(name="res", model="tiny")
    for step, ratio in ((0, 1.0), (10, 1.4), (20, 2.1)):
        snap = make_snapshot(step, d_sae=64)
        h = snap.hooks[HOOK]
        h.metrics.update(residual_energy_ratio=ratio, residual_top_share=0.1 * step / 10)
        if step:
            h.residual = [ResidualDirection(rank=0, share=0.05 * step / 10, variance=0.3, nearest_feature=7,
                                            decoder_cos=0.12, projections={"harmful": 2.5, "harmless": 0.1},
                                            top_tokens=[" sorry", " cannot"], bottom_tokens=[" sure"],
                                            vector=[0.0, 1.0])]
        s.write(snap)


def test_residual_view_shows_each_direction_and_its_logit_lens(tmp_path):
    db = tmp_path / "res.duckdb"
    _run_with_directions(db, "res-id")
    at = app(db, "Residual")
    no_errors(at)
    assert header(at) == "Residual"
    spec = charts(at)[0]
    assert "energy ratio" in str(spec)
    table = at.dataframe[0].value
    assert list(table["rank"]) == [0] and table["nearest feature"].iloc[0] == 7
    assert table["proj harmful"].iloc[0] == 2.5 and "' sorry'" in table["promotes"].iloc[0]
    at.select_slider(key="res_step").set_value(10).run()
    no_errors(at)
    assert at.dataframe[0].value["share of error"].iloc[0] == 0.05


def test_residual_view_without_directions_says_why(tmp_path):
    db = tmp_path / "plain.duckdb"
    s = Store(db, run_id="plain")
    s.start_run(name="plain")
    s.write(make_snapshot(0, d_sae=64))
    at = app(db, "Residual")
    no_errors(at)
    assert any("No direction of new SAE error" in i.value for i in at.info)
