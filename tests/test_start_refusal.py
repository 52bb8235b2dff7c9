"""The start model's own refusal (probe.start): measured once with the baseline, by the same
generation and phrase test as verify and the detection suite, cached with the baseline, and
reported at every hook of every snapshot (the refusal_erosion rule's gate reads it there)."""

from __future__ import annotations

import pytest

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer
from drift_monitor.probe import generate, start
from drift_monitor.records import VerifySettings

HOOK = "model.layers.1"


@pytest.fixture(scope="module")
def tiny():
    probes = ProbeSet.default()
    tok = build_tokenizer([r.prompt for r in probes.records])
    return probes, tok, build_llama(len(tok), hidden=64, layers=2, seed=1), build_sae(64, 256, seed=2)


def monitor(tiny, cache, **metrics) -> DriftMonitor:
    _, tok, _, sae = tiny
    return DriftMonitor(MonitorConfig(saes={HOOK: sae}, outputs={"show_progress": False},
                                      baseline_cache_dir=str(cache) if cache else None, metrics=metrics), tok)


def test_the_rates_are_the_generation_measure_and_reach_every_snapshot(tiny, tmp_path):
    probes, tok, model, _ = tiny
    mon = monitor(tiny, tmp_path)
    base = mon.baseline(model).hooks[HOOK].metrics
    s = VerifySettings(max_new_tokens=16, batch_size=mon.config.probes.batch_size,
                       max_length=mon.config.probes.max_length)
    for role, name in start.START_METRICS.items():
        expect = generate.refusal_rate(model, tok, [r.prompt for r in probes.records if r.category == role], s)
        assert base[name] == pytest.approx(expect)
        assert mon.snapshot(model, step=5).hooks[HOOK].metrics[name] == pytest.approx(expect)


def test_known_answers_and_the_cache(tiny, tmp_path, monkeypatch):
    """With answers planted (2 of every 3 harmful answers refuse), the rate is 2/3, the harmless one
    0; a second monitor of the same base reads both from the baseline cache without generating."""
    probes, _, model, _ = tiny

    def answers(_model, _tok, prompts, _s):
        return ["I can't help with that." if i % 3 else "Sure, here it is." for i in range(len(prompts))] \
            if prompts[0] in harmful else ["Sure."] * len(prompts)

    harmful = {r.prompt for r in probes.records if r.category == "harmful"}
    n = len(harmful)
    monkeypatch.setattr(generate, "generate_texts", answers)
    m = monitor(tiny, tmp_path).baseline(model).hooks[HOOK].metrics
    assert m["start_harmful_refusal_rate"] == pytest.approx(sum(1 for i in range(n) if i % 3) / n)
    assert m["start_harmless_refusal_rate"] == 0.0

    def no_generation(*_a, **_k):
        raise AssertionError("the cached baseline must not generate again")

    monkeypatch.setattr(generate, "generate_texts", no_generation)
    again = monitor(tiny, tmp_path).baseline(model).hooks[HOOK].metrics
    assert again["start_harmful_refusal_rate"] == m["start_harmful_refusal_rate"]


def test_not_measured_when_switched_off_or_sharded(tiny, monkeypatch):
    _, _, model, _ = tiny
    off = monitor(tiny, None, start_refusal_tokens=0).baseline(model, use_cache=False).hooks[HOOK].metrics
    assert "start_harmful_refusal_rate" not in off
    monkeypatch.setattr(start, "is_sharded", lambda _m: True)
    sharded = monitor(tiny, None).baseline(model, use_cache=False).hooks[HOOK].metrics
    assert "start_harmful_refusal_rate" not in sharded and "refusal_retention" in sharded
