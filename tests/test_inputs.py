"""Bad input gets a clear error at start-up that names the fix; hook names resolve through wrappers."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from drift_monitor import ConfigError, DriftMonitor, MonitorConfig, ProbeError, ProbeSet, SAELoadError, load_sae
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer
from drift_monitor.probe.capture import ActivationCapture, HookNotFoundError, layer_output, probe_mode, resolve_module


@pytest.fixture(scope="module")
def tiny():
    ps = ProbeSet.default()
    tok = build_tokenizer([r.prompt for r in ps.records])
    return tok, build_llama(len(tok), hidden=32, layers=3)


def _cfg(tmp_path, **kw):
    kw.setdefault("saes", {"model.layers.1": build_sae(32, 64)})
    return MonitorConfig(baseline_cache_dir=str(tmp_path), outputs={"show_progress": False}, **kw)


def test_unknown_hook_lists_close_names(tiny, tmp_path):
    tok, model = tiny
    mon = DriftMonitor(_cfg(tmp_path, saes={"model.layer.1": build_sae(32, 64)}), tok)
    with pytest.raises(HookNotFoundError) as e:
        mon.baseline(model)
    assert "model.layers.1" in str(e.value) and "Closest module names" in str(e.value)


def test_sae_width_mismatch(tiny, tmp_path):
    tok, model = tiny
    mon = DriftMonitor(_cfg(tmp_path, saes={"model.layers.1": build_sae(48, 64)}), tok)
    with pytest.raises(SAELoadError, match=r"d_in=48.*size 32"):
        mon.baseline(model)


def test_empty_and_malformed_probe_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ProbeError, match="empty"):
        ProbeSet.load(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "category": "general", "prompt": "hi"}) + "\n\n{not json\n")
    with pytest.raises(ProbeError, match=r"bad.jsonl:3: not valid JSON"):
        ProbeSet.load(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    with pytest.raises(ProbeError, match=r"missing.jsonl:1: missing field\(s\) \['category'\]"):
        ProbeSet.load(missing)
    with pytest.raises(ProbeError, match="not found"):
        ProbeSet.load(tmp_path / "nope.jsonl")


def test_unknown_category_in_position_selector(tiny, tmp_path):
    tok, _ = tiny
    with pytest.raises(ProbeError, match=r"unknown category \['harmfull'\].*'harmful'"):
        DriftMonitor(_cfg(tmp_path, probes={"positions": {"harmfull": "prompt_end"}}), tok)
    with pytest.raises(ConfigError, match="probes.positions: unknown value .last."):
        _cfg(tmp_path, probes={"positions": "last"})


def test_response_selector_needs_responses(tiny, tmp_path):
    tok, _ = tiny
    with pytest.raises(ProbeError, match="has no response"):
        DriftMonitor(_cfg(tmp_path, probes={"positions": {"harmful": "response"}}), tok)


def test_tokenizer_without_pad_falls_back_to_eos(tiny, tmp_path):
    tok, model = tiny
    tok2 = build_tokenizer([r.prompt for r in ProbeSet.default().records])
    tok2.pad_token = None
    assert tok2.pad_token_id is None
    with pytest.warns(UserWarning, match="no pad token; using eos_token"):
        mon = DriftMonitor(_cfg(tmp_path), tok2)
    assert tok2.pad_token == tok2.eos_token
    assert mon.probes.batches[0].input_ids.shape[0] > 0


# --------------------------------------------------------------------------- hook resolution
def test_hook_names_resolve_through_wrappers(tiny):
    _, model = tiny
    target = model.model.layers[1]
    for name in ("model.layers.1", "layers.1", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"):
        assert resolve_module(model, name)[1] is target, name

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_llama(model.config.vocab_size, hidden=32, layers=3),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    peft_target = peft_model.base_model.model.model.layers[1]
    for name in ("model.layers.1", "layers.1", "base_model.model.model.layers.1"):
        assert resolve_module(peft_model, name)[1] is peft_target, name

    class DDPLike(nn.Module):  # DDP/FSDP add a `module.` / `_fsdp_wrapped_module.` level
        def __init__(self, inner):
            super().__init__()
            self.module = inner

    wrapped = DDPLike(model)
    assert resolve_module(wrapped, "model.layers.1")[1] is target
    assert resolve_module(wrapped, "module.model.layers.1")[1] is target


def test_sae_metadata_hook_name_is_used(tiny, tmp_path):
    tok, model = tiny
    sae = build_sae(32, 64, hook_name="model.layers.2")
    cfg = MonitorConfig(saes=[sae], baseline_cache_dir=str(tmp_path), outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    assert mon.hooks == ["model.layers.2"]
    snap = mon.baseline(model)
    assert snap.metric("model.layers.2", "n_tokens") > 0


def test_layer_output_tensor_vs_tuple():
    t = torch.randn(3, 5, 4)
    assert layer_output(t) is t  # never t[0] (that would be batch row 0)
    assert layer_output((t, None)) is t


def test_capture_removes_hooks_and_restores_mode_on_error(tiny):
    _, model = tiny
    model.train()
    layer = model.model.layers[1]
    with pytest.raises(RuntimeError, match="boom"):
        with probe_mode(model), ActivationCapture({"l": layer}):
            raise RuntimeError("boom")
    assert model.training and not layer._forward_hooks
    model.eval()


def test_early_stop_skips_later_layers(tiny):
    _, model = tiny
    calls = []
    h = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        ids = torch.tensor([[2, 5, 6]])
        with probe_mode(model), ActivationCapture({"l": model.model.layers[1]}, early_stop=True) as cap:
            a = cap.run(lambda: model(input_ids=ids))
        assert calls == [] and a["l"].shape == (1, 3, 32)
        with probe_mode(model), ActivationCapture({"l": model.model.layers[1]}, early_stop=False) as cap:
            b = cap.run(lambda: model(input_ids=ids))
        assert calls == [1] and torch.equal(a["l"], b["l"])
    finally:
        h.remove()


# --------------------------------------------------------------------------- SAE loading
def test_load_sae_from_disk_and_architectures(tmp_path):
    for arch in ("standard", "topk"):
        sae = build_sae(16, 40, hook_name="model.layers.0", architecture=arch, k=4)
        d = tmp_path / arch
        sae.save_model(d)
        assert (d / "cfg.json").is_file() and (d / "sae_weights.safetensors").is_file()
        loaded = load_sae(str(d))
        assert type(loaded).__name__ == type(sae).__name__
        x = torch.randn(5, 16)
        assert torch.allclose(loaded.encode(x), sae.encode(x))
        assert loaded.cfg.metadata.hook_name == "model.layers.0"
    with pytest.raises(SAELoadError, match="no cfg.json"):
        load_sae(str(tmp_path))
    with pytest.raises(SAELoadError, match="cannot load an SAE"):
        load_sae(12345)


def test_hub_release_goes_to_the_download(monkeypatch):
    """'release:sae_id' is resolved by sae-lens's registry up to the hub download, which we stop."""
    import sae_lens.loading.pretrained_sae_loaders as loaders

    calls = []

    def fake_download(repo_id, filename, *a, **k):
        calls.append((repo_id, filename))
        raise ConnectionError("offline test: download blocked")

    monkeypatch.setattr(loaders, "hf_hub_download", fake_download)
    with pytest.raises(ConnectionError, match="download blocked"):
        load_sae("gpt2-small-res-jb:blocks.8.hook_resid_pre")
    assert calls and calls[0][0] == "jbloom/GPT2-Small-SAEs-Reformatted"
    assert "blocks.8.hook_resid_pre" in calls[0][1]


def test_sparse_decode_equals_dense_decode():
    from drift_monitor.probe.metrics import topk_indices
    from drift_monitor.probe.saes import sparse_decoder

    x = torch.randn(300, 16)
    for arch in ("standard", "topk"):
        sae = build_sae(16, 200, calibrate=x, target_density=0.05, architecture=arch, k=8)
        codes = sae.encode(x)
        top = topk_indices(codes, 100)
        assert int((codes > 0).sum(1).max()) <= 100
        dec = sparse_decoder(sae)
        assert dec is not None, arch
        torch.testing.assert_close(dec(codes.gather(1, top.long()), top), sae.decode(codes), atol=1e-5, rtol=1e-5)
    sae = build_sae(16, 200)
    sae.cfg.normalize_activations = "layer_norm"
    assert sparse_decoder(sae) is None, "a decode with extra steps must not take the shortcut"
