"""Tiny models built from configs: a word-level tokenizer, a small Llama and an SAE.

Why this exists: nothing can be downloaded in CI or on an air-gapped box, yet the tests,
the benchmark and the quick-start example need a real transformers model, a real tokenizer
with a chat template, and a real sae-lens SAE. These builders make them offline in
milliseconds. (The trained model organism of ``organism.py`` is the richer sibling.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(texts: Iterable[str], *, chat_template: bool = True, extra_words: Iterable[str] = ()):
    """A word-level PreTrainedTokenizerFast over the words of ``texts`` (BOS added, pad set)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    pre = pre_tokenizers.Whitespace()
    words: dict[str, None] = {}
    for t in list(texts) + ["user : assistant :"] + list(extra_words):
        for w, _ in pre.pre_tokenize_str(t):
            words.setdefault(w, None)
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(vocab_size: int, *, hidden: int = 64, layers: int = 4, heads: int = 4, intermediate: int | None = None,
                seed: int = 0, max_positions: int = 512):
    """A randomly initialised LlamaForCausalLM from a config (eval mode, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=intermediate or 4 * hidden, max_position_embeddings=max_positions,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


def build_sae(d_in: int, d_sae: int, *, hook_name: str | None = None, seed: int = 0, target_density: float = 0.05,
              calibrate: torch.Tensor | None = None, architecture: str = "standard", k: int = 16):
    """An sae-lens SAE with unit-norm decoder rows and W_enc = W_decᵀ (sae-lens's own init).

    ``calibrate`` ([n, d_in] activations) sets each feature's threshold b_enc so that it fires
    on about ``target_density`` of those tokens: a sparse dictionary without training, which
    is all the metric tests need. ``architecture`` is "standard" or "topk".
    """
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    meta = SAEMetadata(hook_name=hook_name) if hook_name else SAEMetadata()
    if architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():
        w = torch.randn(d_sae, d_in)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.zero_()
        if calibrate is not None:
            sae.b_dec.copy_(calibrate.mean(0))
            pre = (calibrate - calibrate.mean(0)) @ sae.W_enc
            # densities spread log-uniformly over [target/4, 4·target], as in a trained SAE
            dens = target_density * 4 ** (2 * torch.rand(d_sae) - 1)
            srt = torch.sort(pre, dim=0).values
            row = ((1 - dens.clamp(max=0.99)) * (pre.shape[0] - 1)).long()
            q = srt.gather(0, row[None, :])[0]
            sae.b_enc.copy_(-q)
            # one least-squares gain on the codes, so x̂ has the right scale (an overcomplete random
            # frame with W_enc = W_decᵀ overshoots by about d_sae·density/d_in)
            centred = calibrate - calibrate.mean(0)
            recon = torch.relu(pre - q) @ sae.W_dec
            gain = (centred * recon).sum() / (recon * recon).sum().clamp_min(1e-12)
            sae.W_enc.mul_(gain)
            sae.b_enc.mul_(gain)
        else:
            sae.b_enc.fill_(-math.sqrt(2.0 / d_in))
    sae.eval()
    return sae


@torch.no_grad()
def collect_activations(model, tokenizer, texts: list[str], hook: str) -> torch.Tensor:
    """Activations at ``hook`` for every non-pad token of ``texts`` (for calibrating an SAE)."""
    from ..probe.capture import ActivationCapture, resolve_module

    _, module = resolve_module(model, hook)
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with ActivationCapture({hook: module}, early_stop=True) as cap:
        acts = cap.run(lambda: model(**enc, use_cache=False))[hook]
    return acts[enc["attention_mask"].bool()]


def build_key(settings: object, version: str, prefix: str) -> str:
    """The cache key of a cached build (the organism, the test bed): ``prefix-<hash>`` of its
    settings and version. Settings named ``ft_*``/``lora_*`` are left out: the fine-tunes run
    after the build and do not change what is cached."""
    import hashlib
    import json
    from dataclasses import asdict

    build = {k: v for k, v in asdict(settings).items() if not k.startswith(("ft_", "lora_"))}  # type: ignore[call-overload]
    s = json.dumps({"v": version, **build}, sort_keys=True)
    return f"{prefix}-{hashlib.sha256(s.encode()).hexdigest()[:12]}"
