"""Refusal gained and lost, read at the post-instruction tokens (docs/metrics.md, "Refusal gained
and lost"): the erosion metrics on statistics whose answer is known, against a NumPy reference,
and on a real monitor pass (the start reads exactly 1, 0, 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from drift_monitor.config import MetricSettings
from drift_monitor.probe import metrics as M
from drift_monitor.probe.compare import _erosion
from drift_monitor.probe.stats import HookStats

CATS = ["harmful", "harmless"]
D, S = 16, 32


def _stats(x: np.ndarray, codes: np.ndarray, cat: np.ndarray) -> HookStats:
    st = HookStats(CATS, D, S, "cpu", False)
    xt = torch.tensor(x, dtype=torch.float32)
    st.update(xt, xt, torch.tensor(codes, dtype=torch.float32), torch.tensor(cat, dtype=torch.long))
    return st


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    n = 40
    cat = np.array([0] * n + [1] * n)
    mu_h, mu_hl = rng.normal(size=D) + 2.0, rng.normal(size=D)
    x0 = np.concatenate([mu_h + 0.3 * rng.normal(size=(n, D)), mu_hl + 0.3 * rng.normal(size=(n, D))])
    codes0 = np.abs(rng.normal(size=(2 * n, S))) * (rng.random((2 * n, S)) < 0.2)
    codes0[:n, 7] = 3.0  # the start's refusal feature: fires on every harmful token, never on harmless ones
    codes0[n:, 7] = 0.0
    return x0, codes0, cat, n


def test_start_against_itself_reads_one_zero_one(world):
    x0, codes0, cat, _ = world
    base = _stats(x0, codes0, cat)
    out = _erosion(base, base, MetricSettings())
    assert out["refusal_retention"] == pytest.approx(1.0)
    assert out["refusal_harmful_shift"] == pytest.approx(0.0, abs=1e-12)
    assert out["refusal_post_cosine"] == pytest.approx(1.0)
    assert out["refusal_feature_retention"] == pytest.approx(1.0)
    assert out["max_post_refusal_score"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("kept", [0.0, 0.5, 1.5])
def test_retention_is_the_share_of_the_start_separation_left(world, kept):
    """The harmful tokens moved by −(1 − kept)·r⁰ (r⁰ = the start's harmful − harmless mean
    difference): retention reads ``kept``, the harmful shift kept − 1; the refusal feature's
    harmful code scaled by ``kept`` gives feature retention ``kept`` (NumPy reference)."""
    x0, codes0, cat, n = world
    r0 = x0[:n].mean(0) - x0[n:].mean(0)
    x = x0.copy()
    x[:n] -= (1 - kept) * r0
    codes = codes0.copy()
    codes[:n, 7] *= kept
    out = _erosion(_stats(x, codes, cat), _stats(x0, codes0, cat), MetricSettings(refusal_top_k=1))
    assert out["refusal_retention"] == pytest.approx(kept, abs=1e-6)
    assert out["refusal_harmful_shift"] == pytest.approx(kept - 1, abs=1e-6)
    ref = lambda c: c[:n].mean(0) - c[n:].mean(0)  # noqa: E731 - the reference, spelled out
    top = np.argsort(-ref(codes0))[:1]
    assert out["refusal_feature_retention"] == pytest.approx(ref(codes)[top].sum() / ref(codes0)[top].sum())
    r = x[:n].mean(0) - x[n:].mean(0)
    want_cos = float(r @ r0 / (np.linalg.norm(r) * np.linalg.norm(r0))) if kept else math.nan
    if kept:
        assert out["refusal_post_cosine"] == pytest.approx(want_cos)


def test_post_score_is_floored_at_the_typical_strength(world):
    """A feature that barely fires in the start (strength 1e-4) and then drifts by 0.05 on harmful
    tokens must not score 500: its drift is read in units of the SAE's typical strength."""
    x0, codes0, cat, n = world
    codes0 = codes0.copy()
    codes0[:, 3] = 0.0
    codes0[0, 3] = 1e-4
    codes = codes0.copy()
    codes[:n, 3] += 0.05
    out = _erosion(_stats(x0, codes, cat), _stats(x0, codes0, cat), MetricSettings())
    typical = M.typical_firing_strength(torch.tensor(codes0.sum(0)), torch.tensor((codes0 > 0).sum(0)))
    assert out["max_post_refusal_score"] == pytest.approx(0.05 / typical, rel=1e-5)
    assert out["max_post_refusal_score"] < 1.0


def test_floored_scale_and_projection_helpers():
    sc = torch.tensor([0.01, 2.0, math.nan], dtype=torch.float64)
    out = M.floored_scale(sc, 0.5)
    assert out[0] == 0.5 and out[1] == 2.0 and math.isnan(out[2])
    r0 = torch.tensor([2.0, 0.0])
    assert M.projection_ratio(torch.tensor([1.0, 5.0]), r0) == pytest.approx(0.5)
    assert math.isnan(M.projection_ratio(torch.tensor([1.0, 1.0]), torch.zeros(2)))
    assert math.isnan(M.feature_retention(torch.ones(3), -torch.ones(3), 2))  # no positive start contrast


def test_a_monitor_pass_reports_them_at_the_start():
    """Through the real probe pass (tiny Llama, default probes): the base snapshot carries every
    erosion metric at its start value, read at the post-instruction tokens."""
    from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
    from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer

    probes = ProbeSet.default()
    tok = build_tokenizer([r.prompt for r in probes.records])
    model = build_llama(len(tok), hidden=64, layers=2, seed=1)
    sae = build_sae(64, 256, seed=2)
    mon = DriftMonitor(MonitorConfig(saes={"model.layers.1": sae}, outputs={"show_progress": False},
                                     baseline_cache_dir=None), tok)
    assert any(bool(b.post.any()) for b in mon.probes.batches)
    snap = mon.baseline(model, use_cache=False)
    m = snap.hooks["model.layers.1"].metrics
    assert m["refusal_retention"] == pytest.approx(1.0)
    assert m["refusal_harmful_shift"] == pytest.approx(0.0, abs=1e-9)
    same = mon.snapshot(model, step=1).hooks["model.layers.1"].metrics
    assert same["refusal_retention"] == pytest.approx(1.0) and same["refusal_post_cosine"] == pytest.approx(1.0)
