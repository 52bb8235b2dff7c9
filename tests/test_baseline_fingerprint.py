"""The baseline cache key depends on every weight (docs/reliability.md).

The key used to read ~1,024 strided values per tensor, so a different base model whose changes
missed those values reused the first model's cached baseline (EV 0.41 from the cache vs -3.63
recomputed). Here ONE weight element, in the middle of a big tensor and off the old sampler's
stride, must give another key and a recomputed baseline whose numbers are the new model's;
the same weights must give the same key in another process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations
from drift_monitor.monitor import model_fingerprint
from drift_monitor.probe import fingerprint as fp
from drift_monitor.probe.saes import sae_fingerprint

HOOK = "model.layers.2"
TENSOR = "model.layers.0.mlp.down_proj.weight"  # 64 x 256, below the hook: every token's activation moves


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ps = ProbeSet.default()
    tok = build_tokenizer([r.prompt for r in ps.records])
    base = build_llama(len(tok), hidden=64, layers=4, seed=1)
    acts = collect_activations(base, tok, [r.prompt for r in ps.records[:24]], HOOK)
    sae = build_sae(64, 512, calibrate=acts, target_density=0.05, seed=2)
    cfg = MonitorConfig(saes={HOOK: sae}, baseline_cache_dir=str(tmp_path_factory.mktemp("cache")),
                        outputs={"show_progress": False})
    return tok, base, sae, cfg


def _one_weight_changed(base: torch.nn.Module, tok) -> tuple[torch.nn.Module, int]:
    """A copy of ``base`` with one element of TENSOR changed, at an index the old sampler skipped."""
    other = build_llama(len(tok), hidden=64, layers=4, seed=1)
    other.load_state_dict(base.state_dict())
    w = dict(other.named_parameters())[TENSOR]
    index = w.numel() // 2 + 1  # the middle, odd: the old key read flat[::numel // 1024] (every 16th here)
    assert index % max(1, w.numel() // 1024) != 0
    with torch.no_grad():
        w.view(-1)[index] += 40.0
    return other, index


def _monitor(cfg, tok) -> tuple[DriftMonitor, list[str]]:
    """A fresh monitor that records each probe pass it runs (a cache hit runs none)."""
    mon = DriftMonitor(cfg, tok)
    passes: list[str] = []
    real = mon._probe_pass
    mon._probe_pass = lambda *a, **k: passes.append(k["desc"]) or real(*a, **k)
    return mon, passes


def test_one_changed_weight_gives_another_key_and_a_recomputed_baseline(world):
    tok, base, sae, cfg = world
    first, passes = _monitor(cfg, tok)
    cached = first.baseline(base)
    assert passes == ["baseline"]
    again, passes = _monitor(cfg, tok)  # the same model: a cache hit, the same numbers
    hit = again.baseline(base)
    assert passes == [] and hit.metric(HOOK, "explained_variance") == cached.metric(HOOK, "explained_variance")

    other, _ = _one_weight_changed(base, tok)
    mon, passes = _monitor(cfg, tok)
    recomputed = mon.baseline(other)
    assert mon.base_fingerprint != first.base_fingerprint
    assert mon._cache_path(mon.base_fingerprint) != first._cache_path(first.base_fingerprint)
    assert passes == ["baseline"], "a changed model must not load the first model's baseline"
    ev_cached, ev_new = cached.metric(HOOK, "explained_variance"), recomputed.metric(HOOK, "explained_variance")
    assert abs(ev_new - ev_cached) > 1e-3, (ev_cached, ev_new)
    dens_cached = cached.hooks[HOOK].features["all"].density
    dens_new = recomputed.hooks[HOOK].features["all"].density
    assert not torch.equal(torch.as_tensor(dens_cached), torch.as_tensor(dens_new))
    # and the recomputed numbers are the changed model's own (no cache involved)
    fresh = DriftMonitor(cfg, tok).baseline(other, use_cache=False)
    assert fresh.metric(HOOK, "explained_variance") == pytest.approx(ev_new, abs=1e-9)


def test_one_changed_sae_weight_changes_the_sae_key(world):
    _, _, sae, _ = world
    before = sae_fingerprint(sae)
    w = sae.W_dec.detach()  # shares the storage: an in-place change is the SAE's
    index = w.numel() // 2 + 3  # off the old SAE sampler's stride (numel // 4096 = 8 here)
    assert index % max(1, w.numel() // 4096) != 0
    old = float(w.view(-1)[index])
    with torch.no_grad():
        w.view(-1)[index] = torch.nextafter(torch.tensor(old), torch.tensor(1e9))  # the smallest change there is
    try:
        assert sae_fingerprint(sae) != before
    finally:
        with torch.no_grad():
            w.view(-1)[index] = old
    assert sae_fingerprint(sae) == before


_CHILD = """
import sys, torch
from safetensors.torch import load_file
from drift_monitor.demo.tiny import build_llama
from drift_monitor.monitor import model_fingerprint
model = build_llama(int(sys.argv[2]), hidden=64, layers=4, seed=99)  # other random weights, then the file's
model.load_state_dict(load_file(sys.argv[1]))
print(model_fingerprint(model))
"""


def test_same_weights_same_key_in_a_fresh_process(world, tmp_path):
    tok, base, _, _ = world
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))
    here = model_fingerprint(base)
    assert model_fingerprint(base) == here  # deterministic in this process
    out = subprocess.run([sys.executable, "-c", _CHILD, str(weights), str(len(tok))], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == here
    # the loaded file with one element changed: another key (the same check as above, through the file)
    state = load_file(str(weights))
    state[TENSOR].view(-1)[state[TENSOR].numel() // 2 + 1] += 1e-3
    changed = build_llama(len(tok), hidden=64, layers=4, seed=1)
    changed.load_state_dict(state)
    assert model_fingerprint(changed) != here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
                                   torch.uint8, torch.bool])
def test_every_single_element_change_changes_the_projection(dtype, monkeypatch):
    """Exhaustive on a small tensor split in several chunks: each element flipped alone (its
    lowest bit) changes the projection, and so does swapping two chunks' contents."""
    monkeypatch.setattr(fp, "_CHUNK", 64)
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(10, 30, generator=g) * 50).to(dtype) if dtype.is_floating_point else \
        torch.randint(0, 2, (10, 30), generator=g).to(dtype)
    ref = int(fp.projection(t))
    assert int(fp.projection(t.clone())) == ref and int(fp.projection(t.t().contiguous().t())) == ref
    seen = {ref}
    flat = t.reshape(-1)
    for i in range(flat.numel()):
        other = flat.clone()
        if dtype == torch.bool:
            other[i] = ~other[i]
        else:
            bits = other.view(fp._BITS[other.element_size()][0])
            bits[i] ^= 1
        v = int(fp.projection(other))
        assert v != ref, i
        seen.add(v)
    assert len(seen) == flat.numel() + 1  # every change gives its own value, not just another one
    swapped = torch.cat([flat[64:128], flat[:64], flat[128:]])
    if not torch.equal(swapped, flat):
        assert int(fp.projection(swapped)) != ref
