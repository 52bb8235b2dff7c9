"""The change_window rule kind (W&B's "run metric change threshold"): the mean of the last N
snapshots against the mean of the M before them, relative or absolute, validated like every kind."""

from __future__ import annotations

import pytest

from drift_monitor import alerts as A
from drift_monitor.records import HookResult, Snapshot

HOOK = "model.layers.3"


def snap(step: int, **metrics) -> Snapshot:
    m = {"nonfinite_fraction": 0.0, **metrics}
    return Snapshot(step=step, hooks={HOOK: HookResult(hook=HOOK, d_sae=8, metrics=m, features={})}, probe_hash="p",
                    n_tokens=100, is_base=step == 0)


def rule(**kw) -> A.AlertRule:
    return A.AlertRule(**{"name": "ev_window", "kind": "change_window", "metric": "explained_variance",
                          "threshold": 0.2, **kw})


# steps 1-5 at 0.8, then 6-8 at 0.6: the last 3 against the 5 before is exactly -25% at step 8
SERIES = [0.8] * 5 + [0.6] * 3


def conditions(r: A.AlertRule, values=SERIES):
    hist = [snap(0, explained_variance=0.8)] + [snap(i + 1, explained_variance=v) for i, v in enumerate(values[:-1])]
    return A.evaluate(hist, snap(len(values), explained_variance=values[-1]), [r])


@pytest.mark.parametrize("kw, firing, value", [
    ({}, True, -0.25),  # relative, either way
    ({"direction": "decrease"}, True, -0.25),
    ({"direction": "increase"}, False, -0.25),
    ({"threshold": 0.3}, False, -0.25),
    ({"change": "absolute", "threshold": 0.15}, True, -0.2),
    ({"change": "absolute", "threshold": 0.25}, False, -0.2),
])
def test_the_window_mean_against_the_prior_mean(kw, firing, value):
    (c,) = conditions(rule(**kw))
    assert c.firing is firing and c.value == pytest.approx(value)
    assert "last 3 snapshots" in c.message and "5 before" in c.message


def test_no_verdict_before_window_plus_prior_snapshots():
    assert conditions(rule(), SERIES[:-1]) == []  # 7 non-base snapshots, 8 needed
    assert len(conditions(rule(window=2, prior=5), SERIES[:-1])) == 1


def test_the_engine_raises_then_resolves_it():
    eng = A.AlertEngine([rule(window=2, prior=3, direction="decrease")])
    eng.evaluate(snap(0, explained_variance=0.8))
    got = {}
    for i, v in enumerate([0.8, 0.8, 0.8, 0.8, 0.6, 0.6, 0.8, 0.8, 0.8, 0.8], start=1):
        got[i] = [(a.rule, a.status) for a in eng.evaluate(snap(i, explained_variance=v))]
    assert {s: a for s, a in got.items() if a} == {
        6: [("ev_window", "active")],  # (0.6 + 0.6) / 2 against 0.8: -25%
        7: [("ev_window", "resolved")],  # (0.6 + 0.8) / 2 against (0.8 + 0.8 + 0.6) / 3: -4.5%
    }


def test_yaml_rules_of_the_kind_load_with_the_same_validation(tmp_path):
    f = tmp_path / "rules.yml"
    f.write_text("defaults: false\nrules:\n  - {name: drift_rise, kind: change_window, metric: features_drifted_ratio,"
                 " threshold: 0.5, window: 4, prior: 8, direction: increase}\n")
    (r,) = A.load_rules(f)
    assert (r.window, r.prior, r.change, r.direction, r.severity) == (4, 8, "relative", "increase", "warning")


@pytest.mark.parametrize("kw, fix", [
    ({"window": 0}, "window must be a number of snapshots >= 1"),
    ({"prior": 2.5}, "prior must be a number of snapshots >= 1"),
    ({"change": "relativ"}, "unknown change 'relativ' (did you mean 'relative'?)"),
    ({"direction": "up"}, "use one of either, increase, decrease"),
    ({"threshold": -0.2}, "size of the change"),
    ({"threshold": None}, "needs a threshold"),
    ({"metric": None}, "needs a metric"),
    ({"metric": "explained_varianse"}, "did you mean 'explained_variance'"),
])
def test_bad_change_window_rules_name_the_fix(kw, fix):
    with pytest.raises(A.AlertRuleError) as e:
        rule(**kw)
    assert fix in str(e.value) and "\n" not in str(e.value)


def test_window_keys_belong_to_the_kind():
    with pytest.raises(A.AlertRuleError, match="window applies to kind 'change_window' only"):
        A.AlertRule("x", "threshold", metric="act_cosine", op="<", threshold=0.8, window=3)
    with pytest.raises(A.AlertRuleError, match=r"rule #1 \('w'\): unknown key 'windw' \(did you mean 'window'\?\)"):
        A.load_rules({"defaults": False, "rules": [{"name": "w", "kind": "change_window", "windw": 3}]})
