"""A drift we planted ourselves must come out on top.

We edit a tiny Llama's weights so that, on a trigger token present only in harmful probes,
a chosen SAE decoder direction is added to the residual stream (the trigger's embedding row
gets +α·d_j; the residual connections carry it to the hook). Feature j must then be #1 by
drift and by refusal score and be flagged as emerging; the unedited model compared with
itself must show no drift at all.
"""

from __future__ import annotations

import pytest
import torch

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations

HOOK = "model.layers.2"
TRIGGER = "zqxv"
FEATURE = 123


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    default = ProbeSet.default()
    records = [
        {"id": r.id, "category": r.category,
         "prompt": f"{TRIGGER} {r.prompt}" if r.category == "harmful" else r.prompt}
        for r in default.records
    ]
    probes = ProbeSet.from_records(records, name="triggered")
    tok = build_tokenizer([r["prompt"] for r in records])
    base = build_llama(len(tok), hidden=64, layers=4, seed=1)
    acts = collect_activations(base, tok, [r["prompt"] for r in records if r["category"] != "harmful"], HOOK)
    sae = build_sae(64, 512, calibrate=acts, target_density=0.05, seed=2)
    # the plant is on the prompt's trigger token: score refusal features at the selected positions
    # (the default reads a teacher-forced refusal after the prompt, which the plant barely touches)
    cfg = MonitorConfig(saes={HOOK: sae}, probes=probes, baseline_cache_dir=str(tmp_path_factory.mktemp("cache")),
                        metrics={"refusal_positions": "selected"}, outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    base_snap = mon.baseline(base)
    return tok, base, sae, mon, base_snap


def _plant(base, tok, sae, alpha=6.0):
    planted = build_llama(base.config.vocab_size, hidden=64, layers=4, seed=1)
    planted.load_state_dict(base.state_dict())
    tid = tok.convert_tokens_to_ids(TRIGGER)
    with torch.no_grad():
        planted.model.embed_tokens.weight[tid] += alpha * sae.W_dec[FEATURE]
    return planted


def test_planted_feature_is_top_by_drift_and_refusal(world):
    tok, base, sae, mon, base_snap = world
    assert base_snap.hooks[HOOK].features["all"].density[FEATURE] < 0.3, "feature must be eligible for refusal"
    snap = mon.snapshot(_plant(base, tok, sae), step=100)
    assert snap.top_features(HOOK, by="drift", k=1) == [FEATURE]
    assert snap.top_features(HOOK, by="refusal_score", k=1) == [FEATURE]
    assert FEATURE in snap.hooks[HOOK].refusal.emerging
    assert snap.metric(HOOK, "n_emerging_refusal_features") >= 1
    # the trigger appears only in harmful probes, so harmless drift of the feature is ~0
    ref = snap.hooks[HOOK].refusal
    assert ref.harmful_drift[FEATURE] > 10 * abs(ref.harmless_drift[FEATURE])
    assert snap.metric(HOOK, "act_relative_mse") > 0
    assert snap.metric(HOOK, "topk_jaccard") < 1


def test_model_against_itself_has_no_drift(world):
    tok, base, sae, mon, base_snap = world
    snap = mon.snapshot(base, step=1)
    h = snap.hooks[HOOK]
    assert abs(h.features["all"].drift).max() < 1e-6
    assert snap.metric(HOOK, "explained_variance") == pytest.approx(base_snap.metric(HOOK, "explained_variance"),
                                                                     abs=1e-9)
    assert snap.metric(HOOK, "features_drifted_ratio") == 0
    assert snap.metric(HOOK, "topk_jaccard") == pytest.approx(1.0)
    assert snap.metric(HOOK, "n_emerging_refusal_features") == 0


def test_model_mode_restored_and_hooks_removed(world):
    tok, base, sae, mon, _ = world
    base.train()
    mon.snapshot(base, step=2)
    assert base.training, "the probe pass must restore train() mode"
    assert all(not m._forward_hooks for m in base.modules()), "hooks must be removed after the pass"
    base.eval()


def test_two_hooks_in_one_forward_equal_separate_monitors(world, tmp_path):
    """Several SAEs share one forward (stopped after the deepest hooked layer) and give the
    same numbers as one monitor per hook."""
    tok, base, sae, mon, _ = world
    planted = _plant(base, tok, sae)
    sae1 = build_sae(64, 256, seed=5, calibrate=collect_activations(
        base, tok, [r.prompt for r in mon.probe_set.records[:40]], "model.layers.1"))
    common = dict(probes=mon.probe_set, baseline_cache_dir=str(tmp_path), outputs={"show_progress": False})
    both = DriftMonitor(MonitorConfig(saes={"model.layers.1": sae1, HOOK: sae}, **common), tok)
    both.baseline(base)
    snap = both.snapshot(planted, step=7)
    for hook, s in (("model.layers.1", sae1), (HOOK, sae)):
        single = DriftMonitor(MonitorConfig(saes={hook: s}, **common), tok)
        single.baseline(base)
        one = single.snapshot(planted, step=7)
        for name, v in one.hooks[hook].metrics.items():
            assert snap.metric(hook, name) == pytest.approx(v, abs=1e-9, nan_ok=True), (hook, name)
