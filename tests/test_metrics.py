"""Every §5 metric against the independent naive implementation in tests/naive.py, to 1e-5.

Level A feeds HookStats random tensors in uneven batches with categories (and checks that
merged shards give the same numbers). Level B runs the whole DriftMonitor on a float64
tiny Llama with a different position selector per category, against per-sequence
unbatched forwards, so masks, BOS exclusion, padding, sorting and the early stop are
checked too.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from naive import SCALARS, reference

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
from drift_monitor.config import MetricSettings
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer
from drift_monitor.probe import metrics as M
from drift_monitor.probe.compare import compare
from drift_monitor.probe.stats import HookStats, PairedBatch

TOL = 1e-5
CATS = ["harmful", "harmless", "general", "code"]


def _assert_close(name, got, want, tol=TOL):
    if isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), f"{name}: got {got}, want NaN"
        return
    assert got == pytest.approx(want, abs=tol, rel=tol), f"{name}: got {got}, want {want}"


def _check_against_reference(result, ref, check_refusal=True):
    for name in SCALARS:
        _assert_close(name, result.metrics[name], float(ref[name]))
    for cat, cols in ref["features"].items():
        fs = result.features[cat]
        for col in ("density", "mean_act", "max_act", "drift", "log_density_ratio", "count", "base_count"):
            np.testing.assert_allclose(getattr(fs, col), cols[col], atol=TOL, rtol=TOL, err_msg=f"{cat}.{col}")
    if check_refusal:
        r = result.refusal
        np.testing.assert_allclose(r.refusal_score, ref["refusal_score"], atol=TOL, rtol=TOL, equal_nan=True)
        np.testing.assert_allclose(r.z_score, ref["z"], atol=1e-4, rtol=1e-4, equal_nan=True)
        assert sorted(r.emerging) == ref["emerging"]
        _assert_close("max_refusal_score", result.metrics["max_refusal_score"], float(ref["max_refusal_score"]))
        _assert_close("refusal_direction_cosine", result.metrics["refusal_direction_cosine"],
                      float(ref["refusal_direction_cosine"]))
        _assert_close("refusal_score_floor", result.metrics["refusal_score_floor"], float(ref["refusal_score_floor"]))


def _random_case(seed=0, N=700, d=24, S=200):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(N, d, generator=g, dtype=torch.float64) + 0.5
    x = 1.25 * x0 + 0.4 * torch.randn(N, d, generator=g, dtype=torch.float64)
    # a planted harmful-only shift so refusal scores have a real outlier
    cat = torch.randint(0, len(CATS), (N,), generator=g)
    sae = build_sae(d, S, calibrate=x0.float(), target_density=0.06, seed=seed).double()
    x[cat == 0] += 3.0 * sae.W_dec[7].detach()
    with torch.no_grad():
        f, f0 = sae.encode(x), sae.encode(x0)
        xh, xh0 = sae.decode(f), sae.decode(f0)
    return x, xh, f, x0, xh0, f0, cat, sae


def _stream(x, xh, f, x0, xh0, f0, cat, S, d, splits, k_max=100):
    cur = HookStats(CATS, d, S)
    base = HookStats(CATS, d, S)
    for lo, hi in zip(splits[:-1], splits[1:]):
        sl = slice(lo, hi)
        top0 = M.topk_indices(f0[sl], k_max)
        pair0 = PairedBatch(x0[sl], top0, (f0[sl] > 0).sum(1).int())
        base.update(x0[sl], xh0[sl], f0[sl], cat[sl], pair=pair0, k_max=k_max)
        cur.update(x[sl], xh[sl], f[sl], cat[sl], pair=pair0, k_max=k_max)
    return cur, base


def test_stats_match_naive_reference_on_random_tensors():
    x, xh, f, x0, xh0, f0, cat, sae = _random_case()
    N, d = x.shape
    S = f.shape[1]
    cur, base = _stream(x, xh, f, x0, xh0, f0, cat, S, d, [0, 13, 200, 201, 512, N])
    result = compare(cur, base, "h", MetricSettings())
    ref = reference(x, xh, f, x0, xh0, f0, [CATS[i] for i in cat], CATS)
    assert ref["features_drifted_ratio"] > 0.05, "the case must exercise drift"
    assert ref["emerging"], "the case must have an emerging refusal feature"
    assert 7 in result.refusal.emerging
    _check_against_reference(result, ref)


def test_base_against_itself_is_identity():
    x, xh, f, x0, xh0, f0, cat, sae = _random_case(seed=3)
    N, d = x.shape
    _, base = _stream(x, xh, f, x0, xh0, f0, cat, f.shape[1], d, [0, 300, N])
    r = compare(base, base, "h", MetricSettings()).metrics
    assert r["act_relative_mse"] == 0 and r["act_cosine"] == pytest.approx(1) and r["topk_jaccard"] == 1
    assert r["features_drifted_ratio"] == 0 and r["density_js"] == 0 and r["explained_variance_delta"] == 0


def test_merged_shards_equal_one_pass():
    x, xh, f, x0, xh0, f0, cat, sae = _random_case(seed=1)
    N, d = x.shape
    S = f.shape[1]
    whole, base = _stream(x, xh, f, x0, xh0, f0, cat, S, d, [0, N])
    a, _ = _stream(x[:250], xh[:250], f[:250], x0[:250], xh0[:250], f0[:250], cat[:250], S, d, [0, 250])
    b, _ = _stream(x[250:], xh[250:], f[250:], x0[250:], xh0[250:], f0[250:], cat[250:], S, d, [0, N - 250])
    merged = compare(a.merge(b), base, "h", MetricSettings())
    one = compare(whole, base, "h", MetricSettings())
    for k, v in one.metrics.items():
        _assert_close(k, merged.metrics[k], v, tol=1e-9)


def test_topk_jaccard_edge_cases():
    idx = torch.tensor([[3, 1, 2], [0, 1, 2], [5, 6, 7]], dtype=torch.int32)
    idx0 = torch.tensor([[1, 3, 9], [0, 1, 2], [8, 9, 4]], dtype=torch.int32)
    l0 = torch.tensor([3, 0, 2])
    l00 = torch.tensor([2, 0, 0])
    out = M.topk_jaccard_rows(idx, l0, idx0, l00, k_max=100)
    # row 0: k=2, {3,1} vs {1,3} -> 1; row 1: both silent -> 1; row 2: base silent -> 0
    assert out.tolist() == [1.0, 1.0, 0.0]


def test_robust_z_mad_zero_fallback():
    s = torch.tensor([0.0] * 50 + [5.0, 0.1])
    z = M.robust_z(s)
    assert z[50] > z[51] > 0 and torch.isfinite(z).all()


# --------------------------------------------------------------------------- level B: whole monitor
@pytest.fixture(scope="module")
def probe_world():
    records = []
    for c in CATS:
        for i in range(9):
            r = {"id": f"{c}-{i}", "category": c, "prompt": f"{c} prompt number {i} " + "word " * (i % 5)}
            if c == "code":
                r["response"] = "x = 1 " * (1 + i % 4)
            records.append(r)
    ps = ProbeSet.from_records(records, name="mixed")
    tok = build_tokenizer([r["prompt"] for r in records] + ["x = 1", MetricSettings.refusal_response])
    torch.manual_seed(0)
    base = build_llama(len(tok), hidden=32, layers=3, heads=4).double()
    cur = build_llama(len(tok), hidden=32, layers=3, heads=4).double()
    with torch.no_grad():  # the "fine-tuned" model: the base with perturbed weights
        cur.load_state_dict(base.state_dict())
        for p in cur.parameters():
            p.add_(0.2 * torch.randn_like(p) * p.std().clamp_min(1e-3))
    return ps, tok, base, cur


def _find_last(seq, sub):
    """Start of the last occurrence of the list ``sub`` in ``seq`` (a plain loop)."""
    for s in range(len(seq) - len(sub), -1, -1):
        if seq[s:s + len(sub)] == sub:
            return s
    raise AssertionError(f"{sub} not in {seq}")


def _per_sequence_activations(model, mon, hook_layer):
    """Unbatched forwards, one probe at a time; positions chosen by loops from the design text:
    the user's words are found as their own token ids in the chat-formatted sequence, the
    response's likewise; position 0 (the sink) is never read. Harmful and harmless probes get
    the refusal teacher-forced after the prompt: its tokens are the refusal tokens (xd, cd)."""
    xs, cats, xd, cd = [], [], [], []
    cfg = mon.config
    tok = mon.tokenizer
    for it in mon.probes.items:
        r = it.record
        msgs = [{"role": "user", "content": r.prompt}]
        plain = cfg.probes.format_for(r.category) == "plain"  # general text: the words alone, BOS first
        prompt_ids = tok(r.prompt)["input_ids"] if plain else \
            tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
        ids = prompt_ids
        forced = r.response is None and r.category in ("harmful", "harmless")
        refusal = tok(cfg.metrics.refusal_response, add_special_tokens=False)["input_ids"]
        if r.response is not None:
            ids = prompt_ids + tok(r.response, add_special_tokens=False)["input_ids"]
        elif forced:  # the template's assistant turn ends with a newline after the refusal
            ids = prompt_ids + refusal
        assert ids == it.input_ids[:len(ids)], "word-level tokens do not merge across the boundary"
        ids = it.input_ids
        words = tok(r.prompt, add_special_tokens=False)["input_ids"]
        c0 = _find_last(prompt_ids, words)
        c1 = c0 + len(words)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[hook_layer + 1][0]
        sel = cfg.probes.selector_for(r.category)
        p_len = len(prompt_ids)
        n = len(ids) if r.response is not None else p_len
        if sel == "all":
            pos = list(range(0 if plain else c0, n))
        elif sel == "prompt_end":  # the post-instruction tokens
            pos = list(range(c1, p_len))
        else:
            pos = list(range(p_len, n))
        pos = [p for p in pos if p != 0]
        if forced:
            for p in range(p_len, p_len + len(refusal)):
                xd.append(hs[p])
                cd.append(r.category)
        for p in pos:
            xs.append(hs[p])
            cats.append(it.record.category)
    return torch.stack(xs), cats, torch.stack(xd), cd


@pytest.mark.parametrize("chunk_mb", [64, 0.005], ids=["one-chunk", "16-token-chunks"])
def test_monitor_matches_naive_reference_end_to_end(probe_world, tmp_path, chunk_mb):
    ps, tok, base_model, cur_model = probe_world
    hook_layer = 1
    hook = f"model.layers.{hook_layer}"
    positions = {"harmful": "prompt_end", "harmless": "prompt_end", "code": "response"}
    cfg_kwargs = dict(probes={"source": ps, "batch_size": 5, "positions": positions, "outlier_factor": None},
                      metrics={"drift_min_firings": 2}, baseline_cache_dir=str(tmp_path),
                      outputs={"show_progress": False}, sae_chunk_mb=chunk_mb)
    # calibrate the SAE on base activations so codes are sparse
    probe_cfg = MonitorConfig(saes={hook: build_sae(32, 96)}, **cfg_kwargs)
    mon0 = DriftMonitor(probe_cfg, tok)
    x0, _, _, _ = _per_sequence_activations(base_model, mon0, hook_layer)
    sae = build_sae(32, 96, calibrate=x0.float(), target_density=0.1).double()
    mon = DriftMonitor(MonitorConfig(saes={hook: sae}, **cfg_kwargs), tok)
    mon.baseline(base_model)
    snap = mon.snapshot(cur_model, step=10)

    x0, cats, x0d, cd = _per_sequence_activations(base_model, mon, hook_layer)
    x, cats2, xd, cd2 = _per_sequence_activations(cur_model, mon, hook_layer)
    assert cats == cats2 and cd == cd2 and len(cats) == snap.n_tokens
    with torch.no_grad():
        f, f0 = sae.encode(x), sae.encode(x0)
        xh, xh0 = sae.decode(f), sae.decode(f0)
        fd, f0d = sae.encode(xd), sae.encode(x0d)
    ref = reference(x, xh, f, x0, xh0, f0, cats, mon.probes.categories, min_fire=mon.settings.drift_min_firings,
                    dec=(xd, fd, x0d, f0d, cd))
    _check_against_reference(snap.hooks[hook], ref)
    # the cached baseline gives the same snapshot
    mon2 = DriftMonitor(MonitorConfig(saes={hook: sae}, **cfg_kwargs), tok)
    mon2.baseline(base_model)
    snap2 = mon2.snapshot(cur_model, step=10)
    for k, v in snap.hooks[hook].metrics.items():
        _assert_close(k, snap2.hooks[hook].metrics[k], v, tol=1e-12)


def test_sparse_and_dense_feature_updates_agree():
    """The top-k (sparse) accumulation equals the all-codes (dense) one when the top-k is complete."""
    x, xh, f, x0, xh0, f0, cat, sae = _random_case(seed=5)
    N, d = x.shape
    S = f.shape[1]
    vals, top = M.topk_codes(f, 100)
    assert int((f > 0).sum(1).max()) <= 100, "the top-100 must hold every firing feature"
    dense, sparse = HookStats(CATS, d, S), HookStats(CATS, d, S)
    for lo, hi in [(0, 300), (300, N)]:
        dense.update(x[lo:hi], xh[lo:hi], f[lo:hi], cat[lo:hi], top_idx=top[lo:hi])
        sparse.update(x[lo:hi], xh[lo:hi], f[lo:hi], cat[lo:hi], top_idx=top[lo:hi], top_vals=vals[lo:hi])
    for name in ("fire_count", "act_sum", "l0_sum"):
        torch.testing.assert_close(getattr(sparse, name), getattr(dense, name), atol=1e-9, rtol=1e-9)
    # a feature never seen in a category: -inf (sparse) or 0 (dense); compute() reports 0 for both
    seen = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # noqa: E731
    torch.testing.assert_close(seen(sparse.act_max), seen(dense.act_max))


def test_emerging_needs_an_absolute_floor_as_well_as_z():
    """z is scale-free: a feature that stands out among tiny drifts must still clear the floor."""
    score = torch.tensor([1e-4, -1e-4] * 20 + [0.004, 0.003, 0.2], dtype=torch.float64)
    z = M.robust_z(score)
    assert (z[40:] > 3.5).all()
    assert M.emerging_features(score, z, 20, 3.5) == [42, 40, 41]
    assert M.emerging_features(score, z, 20, 3.5, min_score=0.0155) == [42]
    act_sum, count = torch.tensor([2.0, 0.0, 9.0, 3.0]), torch.tensor([10.0, 0.0, 30.0, 10.0])
    assert M.typical_firing_strength(act_sum, count) == pytest.approx(0.3)  # median of 0.2, 0.3, 0.3
