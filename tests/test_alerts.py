"""Alert rules and the alert engine (drift_monitor/alerts/).

Snapshots are synthetic: a HookResult per hook with a metrics dict and no feature tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drift_monitor import alerts as A
from drift_monitor.records import Alert, HookResult, RefusalFeatures, Snapshot

HOOK = "model.layers.12"
HOOK2 = "model.layers.20"

# A healthy snapshot: no rule fires on it.
CALM = {
    "explained_variance": 0.75, "base_explained_variance": 0.76, "explained_variance_delta": -0.01,
    "features_drifted_ratio": 0.05, "topk_jaccard": 0.9, "act_relative_mse": 0.02, "density_js": 0.05,
    "act_cosine": 0.98, "nonfinite_fraction": 0.0, "n_tokens": 1000.0,
}

#: The opt-in features_drifted rule (no default since the detection suite: docs/alerts.md), with the
#: defaults: the engine tests below use it as their plain threshold rule.
DRIFTED = A.AlertRule("features_drifted", "threshold", metric="features_drifted_ratio", op=">", threshold=0.25,
                      severity="warning")
WITH_DRIFTED = [*A.default_rules(), DRIFTED]


def snap(step: int, hooks=(HOOK,), is_base: bool = False, emerging: list[int] | None = None, **metrics) -> Snapshot:
    """A snapshot whose hooks all carry CALM metrics updated by ``metrics``."""
    out = {}
    for h in hooks:
        m = dict(CALM, **metrics)
        refusal = None
        if emerging is not None:
            z = np.zeros(8)
            refusal = RefusalFeatures(z, z, z, z, emerging=list(emerging))
        out[h] = HookResult(hook=h, d_sae=8, metrics=m, features={}, refusal=refusal)
    return Snapshot(step=step, hooks=out, probe_hash="p", n_tokens=1000, is_base=is_base)


def base(**metrics) -> Snapshot:
    return snap(0, is_base=True, **{"explained_variance_delta": 0.0, "explained_variance": 0.76, **metrics})


def run(engine: A.AlertEngine, snaps) -> dict[int, list[Alert]]:
    return {s.step: engine.evaluate(s) for s in snaps}


def keys(alerts: list[Alert]) -> list[tuple[str, str, str]]:
    return [(a.rule, a.hook, a.status) for a in alerts]


def rule(name: str) -> A.AlertRule:
    return next(r for r in A.default_rules() if r.name == name)


# --------------------------------------------------------------------------------------------
# Import hygiene
# --------------------------------------------------------------------------------------------


def test_import_does_not_pull_torch():
    code = "import sys, drift_monitor.alerts; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# Default rules: each fires once and resolves
# --------------------------------------------------------------------------------------------


def test_default_rule_names_and_severities():
    rules = {r.name: r for r in A.default_rules()}
    assert list(rules) == ["ev_drop", "emerging_refusal_features", "refusal_direction", "refusal_erosion",
                           "sudden_change", "residual_growth", "nonfinite_activations"]
    assert rules["nonfinite_activations"].severity == "critical"
    assert rules["emerging_refusal_features"].severity == "warning"
    assert A.default_rules(emerging_refusal_severity="info")[1].severity == "info"
    assert rules["refusal_erosion"].metric == "refusal_retention" and rules["refusal_erosion"].op == "<"
    # min_history 10: at 3, ~30% of smooth 50-snapshot runs raised a false alarm, ~2% at 10
    assert rules["sudden_change"].threshold == 6 and rules["sudden_change"].min_history == 10
    assert rules["refusal_direction"].metric == "refusal_direction_cosine" and rules["refusal_direction"].op == "<"
    assert "features_drifted" not in rules and rules["ev_drop"].threshold == 0.1


def test_ev_drop_fires_once_and_resolves():
    eng = A.AlertEngine()
    out = run(eng, [
        base(),
        snap(10),
        snap(20, explained_variance=0.612, base_explained_variance=0.755, explained_variance_delta=-0.143),
        snap(30, explained_variance=0.60, base_explained_variance=0.755, explained_variance_delta=-0.155),
        snap(40, explained_variance=0.70, base_explained_variance=0.755, explained_variance_delta=-0.055),
    ])
    assert out[0] == [] and out[10] == []
    assert keys(out[20]) == [("ev_drop", HOOK, "active")]
    a = out[20][0]
    assert a.severity == "warning" and a.step == 20
    assert a.value == pytest.approx(0.143) and a.threshold == pytest.approx(0.1)
    assert "0.612" in a.message and "0.143 below the base's 0.755" in a.message and HOOK in a.message
    assert out[30] == []  # still firing: not raised again
    assert keys(out[40]) == [("ev_drop", HOOK, "resolved")]
    assert out[40][0].step == 40 and out[40][0].severity == "warning"
    assert eng.active() == []
    assert eng.raised_total == {("ev_drop", "warning"): 1}


def test_ev_drop_uses_the_base_snapshot_when_the_metric_is_missing():
    def bare(step, ev, is_base=False):
        return Snapshot(step, {HOOK: HookResult(HOOK, 8, {"explained_variance": ev}, {})}, "p", 10, is_base=is_base)

    conds = A.evaluate([bare(0, 0.8, True), bare(10, 0.79)], bare(20, 0.65), [rule("ev_drop")])
    assert [(c.rule, c.firing) for c in conds] == [("ev_drop", True)]
    assert conds[0].value == pytest.approx(0.15)
    # without a base there is nothing to compare with: no condition at all
    assert A.evaluate([bare(10, 0.79)], bare(20, 0.65), [rule("ev_drop")]) == []


def test_features_drifted_threshold_rule():
    eng = A.AlertEngine(WITH_DRIFTED)
    out = run(eng, [base(), snap(1, features_drifted_ratio=0.31), snap(2, features_drifted_ratio=0.4),
                    snap(3, features_drifted_ratio=0.25), snap(4, features_drifted_ratio=0.3)])
    assert keys(out[1]) == [("features_drifted", HOOK, "active")]
    assert "0.31 is above the threshold 0.25" in out[1][0].message
    assert out[2] == []
    assert keys(out[3]) == [("features_drifted", HOOK, "resolved")]  # 0.25 is not > 0.25
    assert keys(out[4]) == [("features_drifted", HOOK, "active")]  # a new episode is a new alert
    assert eng.raised_total == {("features_drifted", "warning"): 2}
    assert eng.resolved_total == {("features_drifted", "warning"): 1}


def test_emerging_refusal_features_fire_and_resolve():
    eng = A.AlertEngine()
    out = run(eng, [
        base(n_emerging_refusal_features=0.0, max_refusal_score=0.01),
        snap(5, emerging=[], n_emerging_refusal_features=0.0, max_refusal_score=0.02),
        snap(10, emerging=[17, 3, 99], n_emerging_refusal_features=3.0, max_refusal_score=0.52),
        snap(15, emerging=[17], n_emerging_refusal_features=1.0, max_refusal_score=0.3),
        snap(20, emerging=[], n_emerging_refusal_features=0.0, max_refusal_score=0.02),
    ])
    assert out[5] == []
    assert keys(out[10]) == [("emerging_refusal_features", HOOK, "active")]
    msg = out[10][0].message
    assert "3 emerging refusal features" in msg and "17, 3, 99" in msg and "0.52" in msg
    assert out[10][0].value == 3
    assert out[15] == []
    assert keys(out[20]) == [("emerging_refusal_features", HOOK, "resolved")]


def test_emerging_refusal_rule_is_silent_without_refusal_probes():
    # CALM has no refusal metrics and the snapshots no refusal table: the rule has nothing to say
    conds = A.evaluate([base(), snap(1)], snap(2), [rule("emerging_refusal_features")])
    assert conds == []


def test_nonfinite_is_critical_and_checked_on_the_base():
    eng = A.AlertEngine()
    out = run(eng, [base(nonfinite_fraction=0.02), snap(10), snap(20, nonfinite_fraction=0.5), snap(30)])
    assert keys(out[0]) == [("nonfinite_activations", HOOK, "active")]
    assert out[0][0].severity == "critical" and "base model" in out[0][0].message and "2%" in out[0][0].message
    assert keys(out[10]) == [("nonfinite_activations", HOOK, "resolved")]
    assert keys(out[20]) == [("nonfinite_activations", HOOK, "active")] and "50%" in out[20][0].message
    assert keys(out[30]) == [("nonfinite_activations", HOOK, "resolved")]
    assert eng.raised_total == {("nonfinite_activations", "critical"): 2}


def test_base_snapshot_is_not_alerted_on_by_comparison_rules():
    eng = A.AlertEngine(WITH_DRIFTED)
    assert eng.evaluate(base(features_drifted_ratio=0.9, explained_variance_delta=-0.5)) == []
    assert eng.base is not None and eng.history == []


def test_nan_metric_neither_fires_nor_resolves():
    eng = A.AlertEngine(WITH_DRIFTED)
    run(eng, [base(), snap(1, features_drifted_ratio=0.5)])
    assert eng.evaluate(snap(2, features_drifted_ratio=math.nan)) == []
    assert [a.rule for a in eng.active()] == ["features_drifted"]
    assert keys(eng.evaluate(snap(3))) == [("features_drifted", HOOK, "resolved")]


# --------------------------------------------------------------------------------------------
# Sudden change (phase-transition detector)
# --------------------------------------------------------------------------------------------


def smooth_ev(n: int) -> list[float]:
    # EV decreasing 0.001 per snapshot with a small alternating wiggle (±0.0002), so the earlier
    # changes are well spread. With min_history=3 the detector judges against only 2 changes,
    # whose MAD is itself noisy: iid noise makes z > 6 fire by chance in ~30% of 30-snapshot
    # runs, and even a wiggle such as 0.0002·sin(2.1·i) (two near-equal early changes) gives
    # |z| = 34. This series pins the intended behaviour, not the false-alarm rate.
    return [0.80 - 0.001 * i + 0.0002 * (-1) ** i for i in range(1, n + 1)]


def sudden_only(**kw) -> list[A.AlertRule]:
    """The detector's mechanics, pinned at min_history=3 (the default is 10)."""
    kw.setdefault("min_history", 3)
    return [A.AlertRule("sudden_change", "sudden_change", metrics=["explained_variance"], **kw)]


def test_sudden_change_smooth_series_raises_nothing():
    eng = A.AlertEngine(sudden_only())
    eng.evaluate(base())
    for i, ev in enumerate(smooth_ev(40), start=1):
        assert eng.evaluate(snap(10 * i, explained_variance=ev)) == [], f"false alarm at snapshot {i}"
    # the detector did run (it had history): its conditions exist and stay quiet
    conds = A.evaluate(eng.history, snap(999, explained_variance=eng.history[-1].value(HOOK, "explained_variance")
                                         - 0.001), sudden_only())
    assert len(conds) == 1 and not conds[0].firing and abs(conds[0].value) < 6


def test_sudden_change_jump_raises_once_then_resolves():
    evs = smooth_ev(20)
    evs[12:] = [v - 0.1 for v in evs[12:]]  # a jump at snapshot 13, the level stays down
    eng = A.AlertEngine(sudden_only())
    eng.evaluate(base())
    out = {i: eng.evaluate(snap(10 * i, explained_variance=ev)) for i, ev in enumerate(evs, start=1)}
    fired = {i: a for i, a in out.items() if a}
    assert list(fired) == [13, 14]
    (raised,) = fired[13]
    assert (raised.rule, raised.status, raised.step) == ("sudden_change", "active", 130)
    assert raised.value < -6 and raised.threshold == 6
    assert "explained_variance" in raised.message and "-0.1" in raised.message and "step 120 -> 130" in raised.message
    (resolved,) = fired[14]
    assert (resolved.status, resolved.step) == ("resolved", 140)


def test_sudden_change_needs_min_history():
    eng = A.AlertEngine(sudden_only())
    out = run(eng, [base(explained_variance=0.9), snap(1, explained_variance=0.2),
                    snap(2, explained_variance=0.8), snap(3, explained_variance=0.1)])
    assert all(v == [] for v in out.values())  # 0 and 1 and 2 earlier snapshots: never judged
    # with 3 earlier snapshots (2 changes) it is judged: a change of -0.5 after -0.001, -0.001
    hist = [snap(1, explained_variance=0.8), snap(2, explained_variance=0.799), snap(3, explained_variance=0.798)]
    conds = A.evaluate(hist, snap(4, explained_variance=0.3), sudden_only())
    assert len(conds) == 1 and conds[0].firing
    assert A.evaluate(hist[:2], snap(4, explained_variance=0.3), sudden_only()) == []
    conds = A.evaluate(hist, snap(4, explained_variance=0.3), sudden_only(min_history=4))
    assert conds == []


def test_sudden_change_ignores_the_base_and_nan_values():
    hist = [base(explained_variance=0.0), snap(1, explained_variance=0.8), snap(2, explained_variance=math.nan),
            snap(3, explained_variance=0.799)]
    # only 2 usable earlier snapshots: the base and the NaN one do not count towards min_history
    assert A.evaluate(hist, snap(4, explained_variance=0.798), sudden_only()) == []
    hist.append(snap(4, explained_variance=0.798))
    (c,) = A.evaluate(hist, snap(5, explained_variance=0.797), sudden_only())
    assert not c.firing and c.value == 0.0  # changes -0.001, -0.001 (not 0.8 from the base), now -0.001
    assert A.evaluate(hist, snap(5, explained_variance=math.nan), sudden_only()) == []


def test_robust_change_z_mad_zero_fallbacks():
    # MAD = 0 (3 of 4 changes equal) -> 1.2533 * mean absolute deviation about the median
    deltas = [0.0, 0.0, 0.0, 0.01]
    z, med, scale = A.robust_change_z(deltas, 0.05)
    assert med == 0 and scale == pytest.approx(1.2533 * 0.0025)
    assert z == pytest.approx(0.05 / (1.2533 * 0.0025))
    # all changes identical: any real difference is infinitely surprising, float noise is not
    z, _, scale = A.robust_change_z([-0.001] * 5, -0.002, scale_ref=0.8)
    assert z == -math.inf and scale == 0
    assert A.robust_change_z([-0.001] * 5, -0.001 + 1e-17, scale_ref=0.8)[0] == 0.0
    assert A.robust_change_z([0.0, 0.0], 0.0)[0] == 0.0
    # the ordinary case: (d - median) / (1.4826 MAD)
    z, med, scale = A.robust_change_z([1.0, 2.0, 4.0], 10.0)
    assert med == 2.0 and scale == pytest.approx(1.4826 * 1.0) and z == pytest.approx(8 / 1.4826)


def test_sudden_change_constant_metric_then_a_move():
    # a frozen layer: every earlier change is exactly 0, so any move gives z = inf
    eng = A.AlertEngine(sudden_only())
    out = run(eng, [base(), *(snap(i, explained_variance=0.7) for i in range(1, 6)), snap(6, explained_variance=0.69),
                    snap(7, explained_variance=0.69)])
    assert keys(out[6]) == [("sudden_change", HOOK, "active")] and out[6][0].value == -math.inf
    assert "inf" in out[6][0].message
    assert keys(out[7]) == [("sudden_change", HOOK, "resolved")]
    json.dumps(eng.state(), allow_nan=False)  # an inf value still gives JSON-safe state


def test_sudden_change_is_one_alert_per_hook_naming_every_metric():
    rules = [A.AlertRule("sudden_change", "sudden_change", min_history=3)]  # default metric list
    assert rules[0].metrics == list(A.DEFAULT_SUDDEN_CHANGE_METRICS)
    hist = [snap(i, explained_variance=0.8 - 0.001 * i + 0.0002 * math.sin(2.1 * i),
                 topk_jaccard=0.9 - 0.002 * i + 0.0003 * math.sin(1.3 * i)) for i in range(1, 10)]
    now = snap(10, explained_variance=0.5, topk_jaccard=0.4)
    (c,) = A.evaluate(hist, now, rules)
    assert c.firing and "explained_variance" in c.message and "topk_jaccard" in c.message


# --------------------------------------------------------------------------------------------
# Hooks filter, pure evaluate
# --------------------------------------------------------------------------------------------


def test_hooks_filter():
    r = A.AlertRule("drift12", "threshold", metric="features_drifted_ratio", op=">", threshold=0.25, hooks=HOOK)
    assert r.hooks == [HOOK]
    eng = A.AlertEngine([r])
    eng.evaluate(base())
    out = eng.evaluate(snap(1, hooks=(HOOK, HOOK2), features_drifted_ratio=0.9))
    assert keys(out) == [("drift12", HOOK, "active")]
    eng2 = A.AlertEngine(WITH_DRIFTED)  # default: all hooks
    eng2.evaluate(base())
    out = eng2.evaluate(snap(1, hooks=(HOOK, HOOK2), features_drifted_ratio=0.9))
    assert keys(out) == [("features_drifted", HOOK, "active"), ("features_drifted", HOOK2, "active")]
    # one alert per layer, each message naming its own layer (the cross-layer view reads them side by side)
    assert [(a.hook in a.message, (HOOK2 if a.hook == HOOK else HOOK) in a.message) for a in out] == [(True, False)] * 2


def test_evaluate_is_pure_and_reports_non_firing_conditions():
    hist = [base(), snap(10), snap(20), snap(30)]
    now = snap(40, features_drifted_ratio=0.3)
    rules = [r if r.name != "sudden_change" else dataclasses.replace(r, min_history=3) for r in WITH_DRIFTED]
    conds = A.evaluate(hist, now, rules)
    by = {(c.rule, c.hook): c for c in conds}
    assert by[("features_drifted", HOOK)].firing and not by[("ev_drop", HOOK)].firing
    assert not by[("nonfinite_activations", HOOK)].firing
    # features_drifted_ratio was exactly constant before: its first move is an infinite robust z
    assert by[("sudden_change", HOOK)].firing and by[("sudden_change", HOOK)].value == math.inf
    assert A.evaluate(hist, now, rules) == conds  # same input, same answer
    # later steps in the history (an abandoned branch before a resume) are ignored
    assert A.evaluate(hist + [snap(50, features_drifted_ratio=9.0)], now, rules) == conds


# --------------------------------------------------------------------------------------------
# Rules from YAML
# --------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "alerts.yaml"
    p.write_text(text)
    return p


def test_yaml_overrides_and_extra_rules(tmp_path):
    p = write(tmp_path, """
defaults: true
overrides:
  emerging_refusal_features: {severity: info}
  refusal_direction: {threshold: 0.4, hooks: [model.layers.12]}
  sudden_change: {enabled: false}
rules:
  - {name: low_act_cosine, kind: threshold, metric: act_cosine, op: "<", threshold: 0.8, severity: critical}
""")
    rules = {r.name: r for r in A.load_rules(p)}
    assert list(rules) == ["ev_drop", "emerging_refusal_features", "refusal_direction", "refusal_erosion",
                           "residual_growth", "nonfinite_activations", "low_act_cosine"]
    assert rules["emerging_refusal_features"].severity == "info"
    assert rules["refusal_direction"].threshold == 0.4 and rules["refusal_direction"].hooks == [HOOK]
    eng = A.AlertEngine(p)
    eng.evaluate(base())
    out = eng.evaluate(snap(1, emerging=[4], n_emerging_refusal_features=1.0, act_cosine=0.5))
    sev = {a.rule: a.severity for a in out}
    assert sev == {"emerging_refusal_features": "info", "low_act_cosine": "critical"}


def test_yaml_rules_alone_replace_the_defaults(tmp_path):
    p = write(tmp_path, """
rules:
  - name: ev_drop
    kind: ev_drop
    threshold: 0.2
  - {name: phase, kind: sudden_change, metrics: [topk_jaccard], min_history: 5, threshold: 8}
""")
    rules = A.load_rules(p)
    assert [r.name for r in rules] == ["ev_drop", "phase"]
    assert rules[0].threshold == 0.2 and rules[1].metrics == ["topk_jaccard"] and rules[1].min_history == 5
    # a rule named like a default replaces it when the defaults are kept
    rules = A.load_rules({"defaults": True, "rules": [{"name": "ev_drop", "kind": "ev_drop", "threshold": 0.3}]})
    assert [r.name for r in rules][0] == "ev_drop" and rules[0].threshold == 0.3 and len(rules) == 7
    assert [r.name for r in A.load_rules(None)] == [r.name for r in A.default_rules()]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("defaults: true\nrulez: []\n", ["unknown key 'rulez'", "did you mean 'rules'", "alerts.yaml"]),
        ("rules:\n  - {name: x, kind: threshold, metric: l0, op: '>', threshold: 1, treshold: 2}\n",
         ["unknown key 'treshold'", "rule #1 ('x')", "alerts.yaml"]),
        ("rules:\n  - {name: x, kind: spike, metric: l0}\n", ["unknown kind 'spike'", "sudden_change"]),
        ("rules:\n  - {name: x, kind: threshold, metric: l0, op: '>', threshold: 1, severity: high}\n",
         ["bad severity 'high'", "info, warning, critical"]),
        ("rules:\n  - {name: x, kind: threshold, metric: features_drift_ratio, op: '>', threshold: 1}\n",
         ["unknown metric 'features_drift_ratio'", "did you mean 'features_drifted_ratio'"]),
        ("rules:\n  - {name: x, kind: threshold, metric: l0, op: '>'}\n", ["needs a threshold"]),
        ("rules:\n  - {name: x, kind: threshold, metric: l0, op: '!=', threshold: 1}\n", ["unknown op '!='"]),
        ("rules:\n  - {kind: nonfinite}\n", ["missing 'name'"]),
        ("rules:\n  - {name: x, kind: ev_drop, threshold: -0.1}\n", ["size of the drop", "did you mean 0.1"]),
        ("rules:\n  - {name: x, kind: nonfinite}\n  - {name: x, kind: nonfinite}\n", ["two rules are named 'x'"]),
        ("overrides:\n  emerging_refusal: {severity: info}\n",
         ["unknown rule 'emerging_refusal'", "did you mean 'emerging_refusal_features'"]),
        ("overrides:\n  ev_drop: {severty: info}\n", ["unknown key 'severty'", "did you mean 'severity'"]),
        ("overrides:\n  ev_drop: {severity: loud}\n", ["bad severity 'loud'"]),
        ("overrides:\n  ev_drop: {kind: threshold}\n", ["kind cannot be overridden"]),
        ("", ["is empty"]),
        ("rules: [\n", ["alerts.yaml:2: invalid YAML", "fix the syntax"]),

        ("42\n", ["expected a mapping"]),
    ],
)
def test_yaml_errors_name_the_problem(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(A.AlertRuleError) as e:
        A.load_rules(p)
    for part in expected:
        assert part in str(e.value), str(e.value)


def test_missing_file_and_rule_validation():
    with pytest.raises(A.AlertRuleError, match="does not exist"):
        A.load_rules("/nonexistent/alerts.yaml")
    with pytest.raises(A.AlertRuleError, match="op applies to kind 'threshold' only"):
        A.AlertRule("x", "nonfinite", op=">")
    with pytest.raises(A.AlertRuleError, match="metrics applies to kind 'sudden_change' only"):
        A.AlertRule("x", "threshold", metric="l0", op=">", threshold=1, metrics=["l0"])
    with pytest.raises(A.AlertRuleError, match="min_history must be an integer >= 2"):
        A.AlertRule("x", "sudden_change", min_history=1)
    with pytest.raises(A.AlertRuleError, match="always reads 'nonfinite_fraction'"):
        A.AlertRule("x", "nonfinite", metric="l0")
    with pytest.raises(A.AlertRuleError, match="finite number"):
        A.AlertRule("x", "threshold", metric="l0", op=">", threshold=math.nan)


# --------------------------------------------------------------------------------------------
# State: resume without re-raising
# --------------------------------------------------------------------------------------------


def test_state_round_trip_does_not_reraise():
    evs = smooth_ev(12)
    rules = A.load_rules({"defaults": True, "overrides": {"sudden_change": {"metrics": ["explained_variance"]}},
                          "rules": [dataclasses.asdict(DRIFTED)]})
    eng = A.AlertEngine(rules, run="r1")
    eng.evaluate(base())
    for i, ev in enumerate(evs[:10], start=1):
        eng.evaluate(snap(10 * i, explained_variance=ev))
    out = eng.evaluate(snap(110, explained_variance=evs[10], features_drifted_ratio=0.5))
    assert keys(out) == [("features_drifted", HOOK, "active")]

    state = json.loads(json.dumps(eng.state(), allow_nan=False))
    eng2 = A.AlertEngine.from_state(state, rules)
    assert eng2.run == "r1" and eng2.raised_total == eng.raised_total
    assert [(a.rule, a.hook, a.step) for a in eng2.active()] == [("features_drifted", HOOK, 110)]
    assert [p.step for p in eng2.history] == [p.step for p in eng.history]

    # still drifting: nothing new; the history carried over, so a jump is still seen as one
    out = eng2.evaluate(snap(120, explained_variance=evs[11] - 0.1, features_drifted_ratio=0.6))
    assert keys(out) == [("sudden_change", HOOK, "active")]
    out = eng2.evaluate(snap(130, explained_variance=evs[11] - 0.101))
    assert sorted(keys(out)) == [("features_drifted", HOOK, "resolved"), ("sudden_change", HOOK, "resolved")]
    assert eng2.active() == []

    # a fresh engine (no state) would have raised the active alert again
    fresh = A.AlertEngine(WITH_DRIFTED)
    fresh.evaluate(base())
    assert keys(fresh.evaluate(snap(120, features_drifted_ratio=0.6))) == [("features_drifted", HOOK, "active")]


def test_from_state_rejects_garbage():
    with pytest.raises(ValueError, match="version"):
        A.AlertEngine.from_state({"version": 99})
    with pytest.raises(ValueError, match="malformed"):
        A.AlertEngine.from_state({"version": 1, "history": [{"metrics": {}}]})


def test_observe_replays_without_alerting_and_keeps_active_in_sync():
    eng = A.AlertEngine(WITH_DRIFTED)
    for s in [base(), snap(10), snap(20, features_drifted_ratio=0.5)]:
        eng.observe(s)
    assert eng.raised_total == {} and [a.rule for a in eng.active()] == ["features_drifted"]
    assert eng.evaluate(snap(30, features_drifted_ratio=0.5)) == []
    assert keys(eng.evaluate(snap(40))) == [("features_drifted", HOOK, "resolved")]


def test_removed_rule_resolves_its_active_alert():
    eng = A.AlertEngine(WITH_DRIFTED)
    run(eng, [base(), snap(1, features_drifted_ratio=0.5)])
    eng2 = A.AlertEngine.from_state(eng.state(), rules=[rule("ev_drop")])
    out = eng2.evaluate(snap(2, features_drifted_ratio=0.5))
    assert keys(out) == [("features_drifted", HOOK, "resolved")] and "no longer configured" in out[0].message


def test_engine_alerts_fit_the_store(tmp_path):
    from drift_monitor.store import Store, StoreReader

    eng = A.AlertEngine(WITH_DRIFTED)
    db = tmp_path / "a.duckdb"
    store = Store(db)
    rid = store.start_run("r")
    for s in [base(), snap(10, features_drifted_ratio=0.5), snap(20, features_drifted_ratio=0.6)]:
        store.write_alerts(eng.evaluate(s))
    df = StoreReader(db).alerts(rid)
    assert df[["rule", "step", "status"]].values.tolist() == [["features_drifted", 10, "active"]]
    store.write_alerts(eng.evaluate(snap(30)))
    store.close()
    df = StoreReader(db).alerts(rid)
    assert df[["rule", "step", "status", "resolved_step"]].values.tolist() == [["features_drifted", 10, "resolved", 30]]


def test_restore_active_and_gauge_counts():
    eng = A.AlertEngine(WITH_DRIFTED)
    eng.evaluate(base())
    eng.restore_active([Alert("features_drifted", "warning", 10, HOOK, "from the store", 0.5, 0.25),
                        Alert("ev_drop", "warning", 10, HOOK, "closed", 0.2, 0.1, status="resolved")])
    assert eng.active_counts() == {("features_drifted", "warning"): 1}
    assert eng.evaluate(snap(20, features_drifted_ratio=0.5)) == []
    assert keys(eng.evaluate(snap(30))) == [("features_drifted", HOOK, "resolved")]
    assert eng.active_counts() == {}


def test_refusal_direction_rule_fires_when_the_direction_turns():
    eng = A.AlertEngine(WITH_DRIFTED)
    out = run(eng, [base(refusal_direction_cosine=1.0), snap(10, refusal_direction_cosine=0.97),
                    snap(20, refusal_direction_cosine=0.85), snap(30, refusal_direction_cosine=0.99)])
    assert out[10] == []
    assert keys(out[20]) == [("refusal_direction", HOOK, "active")] and out[20][0].value == pytest.approx(0.85)
    assert keys(out[30]) == [("refusal_direction", HOOK, "resolved")]


def test_refusal_erosion_rule_fires_when_retention_falls():
    eng = A.AlertEngine()
    out = run(eng, [base(refusal_retention=1.0), snap(10, refusal_retention=0.95),
                    snap(20, refusal_retention=0.6), snap(30, refusal_retention=1.02)])
    assert out[10] == []
    assert keys(out[20]) == [("refusal_erosion", HOOK, "active")] and out[20][0].value == pytest.approx(0.6)
    assert keys(out[30]) == [("refusal_erosion", HOOK, "resolved")]


def test_refusal_erosion_waits_for_a_start_that_refuses():
    """The gate (rule requires start_harmful_refusal_rate >= REFUSAL_GATE): the same fall of
    retention alerts in a start that refused 97% of the harmful probes, not in one that refused
    1% (its harmful - harmless separation was content, not refusal), and a run without the start's
    rate (not measured) keeps the rule armed."""
    from drift_monitor.alerts.rules import REFUSAL_GATE

    assert rule("refusal_erosion").requires == A.Requirement("start_harmful_refusal_rate", ">=", REFUSAL_GATE)
    for start, fires in ((0.97, True), (0.01, False), (REFUSAL_GATE, True), (None, True), (math.nan, True)):
        extra = {} if start is None else {"start_harmful_refusal_rate": start}
        out = run(A.AlertEngine(), [base(refusal_retention=1.0, **extra), snap(10, refusal_retention=0.6, **extra)])
        assert (keys(out[10]) == [("refusal_erosion", HOOK, "active")]) is fires, start


def test_requires_from_yaml_and_its_errors(tmp_path):
    f = tmp_path / "rules.yml"
    f.write_text("defaults: true\nrules:\n"
                 "  - {name: low_ev, kind: threshold, metric: explained_variance, op: '<', threshold: 0.5,\n"
                 "     requires: {metric: start_harmful_refusal_rate, op: '<', threshold: 0.2}}\n"
                 "overrides:\n  refusal_erosion: {requires: null}\n")
    rules = {r.name: r for r in A.load_rules(f)}
    assert rules["low_ev"].requires == A.Requirement("start_harmful_refusal_rate", "<", 0.2)
    assert rules["refusal_erosion"].requires is None  # switched off by the user: armed in every run
    bad = [({"metric": "start_harmful_refusal_rat", "op": "<", "threshold": 0.2}, "did you mean"),
           ({"metric": "explained_variance", "op": "=", "threshold": 0.2}, "unknown op"),
           ({"metric": "explained_variance", "op": "<"}, "exactly metric, op and threshold"),
           ({"metric": "explained_variance", "op": "<", "threshold": "x"}, "finite number"),
           ("start_harmful_refusal_rate >= 0.2", "mapping")]
    for req, msg in bad:
        with pytest.raises(A.AlertRuleError, match=msg):
            A.AlertRule("r", "threshold", metric="explained_variance", op="<", threshold=0.5, requires=req)
