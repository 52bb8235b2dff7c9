"""Greedy generation and the refusal phrase test: what a model *says*, for the causal check
(``offline.verify``), the test bed's behaviour measurements and the start model's refusal check.

Why one module: the monitor decides whether the start model refuses at all (its erosion rule
means nothing for a start that never refused) with the same generation and the same phrase test
that ``verify`` and the detection suite use to measure behaviour, so the three cannot disagree
about what a refusal is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..records import VerifySettings, normalize_text


def is_refusal(text: str, phrases: Sequence[str]) -> bool:
    t = normalize_text(text)
    return any(p in t for p in phrases)


def formatted(tok: Any, prompts: Sequence[str]) -> list[str]:
    """Chat-formatted prompts when the tokenizer has a chat template, else the prompts as they are."""
    from .probes import chat_prompt

    if getattr(tok, "chat_template", None):
        return [chat_prompt(tok, p) for p in prompts]
    return list(prompts)


def batches(tok: Any, prompts: Sequence[str], s: VerifySettings, device: torch.device) -> Iterator[dict]:
    texts = formatted(tok, prompts)
    for lo in range(0, len(texts), s.batch_size):
        enc = tok(texts[lo:lo + s.batch_size], add_special_tokens=not getattr(tok, "chat_template", None),
                  padding=True, truncation=True, max_length=s.max_length, return_tensors="pt")
        yield {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@contextlib.contextmanager
def _left_padding(tok: Any) -> Iterator[None]:
    old = tok.padding_side
    tok.padding_side = "left"  # generation continues from the last column
    try:
        yield
    finally:
        tok.padding_side = old


@torch.no_grad()
def generate_texts(model: nn.Module, tok: Any, prompts: Sequence[str], s: VerifySettings) -> list[str]:
    """Greedy continuations, decoded without special tokens."""
    device = next(model.parameters()).device
    out: list[str] = []
    with _left_padding(tok):
        for enc in batches(tok, prompts, s, device):
            gen = model.generate(**enc, max_new_tokens=s.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            out += tok.batch_decode(new, skip_special_tokens=True)
    return out


def refusal_share(texts: Sequence[str], phrases: Sequence[str]) -> float:
    """Share of the texts that contain a refusal phrase (0 for none)."""
    return sum(is_refusal(t, phrases) for t in texts) / max(len(texts), 1)


def refusal_rate(model: nn.Module, tok: Any, prompts: Sequence[str], s: VerifySettings) -> float:
    """Share of the prompts whose greedy answer contains a refusal phrase (``s.refusal_phrases``)."""
    if not prompts:
        return float("nan")
    return refusal_share(generate_texts(model, tok, prompts, s), s.refusal_phrases)
