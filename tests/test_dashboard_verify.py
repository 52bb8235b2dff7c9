"""The Refusal page's causal check (dashboard/views/refusal.py causal_check) for a check over
several hooks with the direction conditions: listed at each of its hooks, under AppTest."""

from __future__ import annotations

from store_fixtures import make_snapshot
from test_dashboard import app, no_errors

from drift_monitor.dashboard.views.refusal import check_where
from drift_monitor.records import ConditionResult, VerifyResult, VerifySettings
from drift_monitor.store import Store

H6, H15 = "model.layers.6", "model.layers.15"


def _result() -> VerifyResult:
    both = {H6: [3], H15: [840]}
    rows = [ConditionResult("fine_tuned", [], 0.9, 0.1, 0.0, 10, 10),
            ConditionResult("ablated", [3, 840], 0.3, 0.1, 0.2, 10, 10, by_hook=both),
            ConditionResult("random", [5, 9], 0.9, 0.1, 0.1, 10, 10, seed=0, by_hook={H6: [5], H15: [9]}),
            ConditionResult("direction_ablated", [], 0.1, 0.0, 0.3, 10, 10),
            ConditionResult("random_direction_ablated", [], 0.9, 0.1, 0.01, 10, 10, seed=0)]
    return VerifyResult(f"{H6}+{H15}", [3, 840], rows, VerifySettings(), [1.0, 2.0], run_id="r", step=10,
                        site_features=both, direction_layers=list(range(30)))


def test_a_check_over_two_hooks_shows_at_each_with_the_direction_reference(tmp_path):
    db = tmp_path / "v.duckdb"
    s = Store(db, run_id="r")
    s.start_run(name="r", model="tiny")
    for step in (0, 10):
        snap = make_snapshot(step, d_sae=64, seed=step)
        snap.hooks = {H6: next(iter(snap.hooks.values())), H15: next(iter(snap.hooks.values()))}
        s.write(snap)
    s.write_verification(_result())
    s.close()
    assert check_where(H15) == H15 and check_where(f"{H6}+{H15}") == "2 hooks"
    for hook in (H6, H15):
        at = app(db, "Refusal", run="r")
        if at.selectbox(key="ref_hook").value != hook:
            at.selectbox(key="ref_hook").set_value(hook).run()
        no_errors(at)
        text = " ".join(m.value for m in at.markdown)
        assert "ablated together at 2 hooks" in text and f"`{H6}`" in text, hook
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Ablation: harmful refusal drop"] == "67%"
        assert metrics["Reference: refusal direction removed"] == "89%"
        assert metrics["Random direction removed: drop"] == "0%"
        shown = at.dataframe[-1].value
        assert shown["condition"].tolist()[-2:] == ["direction_ablated", "random_direction_ablated"]
        assert shown["features"].iloc[1] == f"{H6}:3 {H15}:840"
