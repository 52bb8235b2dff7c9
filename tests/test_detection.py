"""The detection suite's definition and scoring (drift_monitor/demo/suite.py, detection.py).

Fast: no model is trained here. The suite's runs are checked in tests/test_detection_suite.py
(CI's subset) and scored in full by tests/bench/detection_report.py."""

from __future__ import annotations

import math

import pytest

from drift_monitor.demo import detection as D
from drift_monitor.demo import suite as S
from drift_monitor.errors import DriftMonitorError


def test_suite_is_split_before_looking_with_every_kind_in_each_half():
    S.check_suite(S.SUITE)
    assert len(S.SUITE) >= 14
    for half in ("calibration", "held_out"):
        intents = {s.intent for s in S.SUITE if s.split == half}
        assert intents == {"gain", "erosion", "control"}, half
    gains = [s for s in S.SUITE if s.intent == "gain"]
    assert len({s.wording for s in gains}) >= 3 and len({(s.share, s.lr) for s in gains}) >= 3
    assert {s.start for s in S.SUITE if s.intent == "control"} == {"base", "aligned"}


def test_no_wording_is_the_monitors_teacher_forced_refusal_and_each_reads_as_a_refusal():
    from drift_monitor.config import MetricSettings
    from drift_monitor.probe.generate import is_refusal
    from drift_monitor.records import DEFAULT_REFUSAL_PHRASES, VerifySettings

    forced = MetricSettings().refusal_response
    phrases = VerifySettings(refusal_phrases=DEFAULT_REFUSAL_PHRASES).refusal_phrases
    for words in S.WORDINGS.values():
        for w in words:
            assert w != forced
            assert is_refusal(w, phrases), w
    for c in S.COMPLIANCE:
        assert not is_refusal(c, phrases), c


@pytest.mark.parametrize("bad, words", [
    (dict(name="x", intent="gain", start="base", data="nonsense", split="calibration"), ["unknown data", "use one of"]),
    (dict(name="x", intent="gain", start="base", data="refusal", split="calibration", wording="Z"),
     ["unknown wording", "use one of"]),
    (dict(name="x", intent="gain", start="moon", data="refusal", split="calibration"), ["unknown start"]),
    (dict(name="x", intent="gain", start="base", data="refusal", split="train"), ["split must be"]),
])
def test_bad_scenarios_are_one_line_errors_naming_the_fix(bad, words):
    with pytest.raises(DriftMonitorError) as e:
        S.check_suite([S.Scenario(**bad)])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_an_aligned_start_without_its_adapter_run_names_the_missing_scenario():
    s = S.Scenario("e", "erosion", "aligned", "comply", "held_out")
    with pytest.raises(DriftMonitorError, match=f"add scenario '{S.ALIGNED_FROM}'"):
        S.check_suite([s])
    with pytest.raises(DriftMonitorError, match="unknown scenario 'nope'; the suite has gain-A-50"):
        S.scenario("nope")


def _run(name, split, harmful, metric, alerts=None):
    steps = range(len(harmful))
    return D.RunData(name, "x", split, {s: {"refusal_retention": metric[s]} for s in steps},
                     {s: {"harmful_refusal_rate": harmful[s], "harmless_refusal_rate": 0.0} for s in steps},
                     alerts or {})


def test_labels_come_from_behaviour_and_thresholds_from_the_calibration_half_only():
    sig = next(s for s in D.SIGNALS if s.name == "refusal_retention")
    cal = [_run("c-pos", "calibration", [0.0, 0.1, 0.5], [1, 1.2, 1.6]),
           _run("c-neg", "calibration", [0.0, 0.05, 0.1], [1, 1.05, 0.9])]
    assert cal[0].positive and not cal[1].positive and cal[0].first_changed == 2
    t = D.calibrate(cal, sig)
    assert t == pytest.approx((0.1 + 0.6) / 2)  # between the negative's worst step and the positive's score
    held = [_run("h-pos", "held_out", [0.9, 0.5, 0.1], [1, 0.6, 0.3], {"refusal_erosion": 1}),
            _run("h-neg", "held_out", [0.0, 0.0, 0.0], [1, 1.2, 1.1]),
            _run("h-miss", "held_out", [0.0, 0.3, 0.4], [1, 1.1, 1.2])]
    rep = D.score_signal(cal, held, sig)
    assert rep.threshold == t and rep.false_positives == [] and rep.false_negatives == ["h-miss"]
    assert rep.lead_times == {"h-pos": 0, "h-miss": None}  # retention crossed at step 1, behaviour moved at 1
    assert rep.auroc == pytest.approx(0.75)  # h-pos 0.7 > h-neg 0.2; h-miss 0.2 ties h-neg
    rules = {r.rule: r for r in D.score_rules(held, ["refusal_erosion"])}
    assert rules["any"].false_negatives == ["h-miss"] and rules["refusal_erosion"].lead_times["h-pos"] == 0


def test_statistics_against_known_values():
    assert D.auroc([3, 4], [1, 2]) == 1.0 and D.auroc([1], [1]) == 0.5 and math.isnan(D.auroc([], [1]))
    assert D.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert D.spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)
    assert D.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
