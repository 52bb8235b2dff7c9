"""Next-token cross-entropy with the SAE spliced in: what the base SAE's error costs the model.

``ce_loss_delta`` = CE_spliced − CE_clean and ``ce_loss_score`` = (CE_zero − CE_spliced) /
(CE_zero − CE_clean), as sae-lens's evals define them (docs/metrics.md "CE-loss transfer"): the
SAE's reconstruction replaces the hook's output (spliced), the hook's output is zeroed (zero
ablation), or nothing changes (clean); CE is the mean over every predicted token of the
general probes. A score of 1 means the reconstruction keeps all the loss the hook carries; a
score falling during training means the base SAE no longer transfers to the model.

Why apart from the probe pass: these need logits, so the forward cannot stop at the deepest
hook, and they cost three full forwards per hook (the clean one is shared). They run every
``cadence.ce_every_n_snapshots`` snapshots on the general probes only.

Position 0 (the attention sink, BOS or not) keeps its own activation when spliced: the SAE was
trained without it (drift_monitor.probe.tokens), and its reconstruction there would dominate
the loss; sae-lens reads the same convention through ``ignore_tokens=[bos]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .capture import plain_forward, probe_mode, replace_output, resolve_module


@dataclass(frozen=True)
class CEBatch:
    """Token ids [b, t] and their attention mask, right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class CELosses:
    """Mean next-token CE over the batches' predicted tokens, three ways."""

    clean: float
    spliced: float
    zero: float
    n_tokens: int

    @property
    def delta(self) -> float:
        return self.spliced - self.clean

    @property
    def score(self) -> float:
        denom = self.zero - self.clean
        return (self.zero - self.spliced) / denom if denom != 0 else float("nan")

    def metrics(self) -> dict[str, float]:
        """The catalog's ce_loss_* metrics."""
        return {"ce_loss_clean": self.clean, "ce_loss_spliced": self.spliced, "ce_loss_zero_ablated": self.zero,
                "ce_loss_delta": self.delta, "ce_loss_score": self.score}


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-token CE of predicting token t+1 from position t, where both are real tokens ([b, t−1], 0 elsewhere)."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).flatten().to(ce.dtype)
    return (ce * valid).view(input_ids.shape[0], -1)


@contextlib.contextmanager
def spliced(model: nn.Module, hook: str, fn: Callable[[torch.Tensor], torch.Tensor],
            keep_first: bool = True) -> Iterator[None]:
    """Within the block, ``hook``'s output h [b, t, d] becomes ``fn(h)``, at positions ≥ 1 when
    ``keep_first`` (position 0 keeps its own activation), at every position otherwise."""
    _, module = resolve_module(model, hook)

    def edit(h: torch.Tensor) -> torch.Tensor:
        new = fn(h).to(h.dtype)
        return torch.cat([h[:, :1], new[:, 1:]], dim=1) if keep_first else new

    handle = module.register_forward_hook(lambda _m, _i, out: replace_output(out, edit))
    try:
        yield
    finally:
        handle.remove()


def _mean_ce(model: nn.Module, batches: Sequence[CEBatch], device: torch.device) -> tuple[float, int]:
    forward = plain_forward(model)
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for b in batches:
        ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
        logits = forward(ids, mask).logits
        total += token_losses(logits, ids, mask).double().sum()
        n += int((mask[:, :-1] * mask[:, 1:]).sum())
    return float(total) / max(n, 1), n


def ce_losses(model: nn.Module, batches: Sequence[CEBatch], saes: dict[str, object],
              device: torch.device) -> dict[str, CELosses]:
    """CE clean (once), spliced and zero-ablated per hook, for ``saes`` {hook: SAE}; in eval
    mode without gradients (the model's mode is restored)."""
    with probe_mode(model):
        return _ce_losses(model, batches, saes, device)


def _ce_losses(model: nn.Module, batches: Sequence[CEBatch], saes: dict[str, object],
               device: torch.device) -> dict[str, CELosses]:
    clean, n = _mean_ce(model, batches, device)
    out: dict[str, CELosses] = {}
    for hook, sae in saes.items():
        def reconstruct(h: torch.Tensor, sae=sae) -> torch.Tensor:
            return sae.decode(sae.encode(h.to(sae.W_dec.dtype)))

        with spliced(model, hook, reconstruct):
            recon, _ = _mean_ce(model, batches, device)
        with spliced(model, hook, torch.zeros_like, keep_first=False):  # as sae-lens: every position
            zero, _ = _mean_ce(model, batches, device)
        out[hook] = CELosses(clean, recon, zero, n)
    return out


def ce_batches(texts: Sequence[str], tokenizer, batch_size: int, max_length: int) -> list[CEBatch]:
    """The texts as the tokenizer frames plain text (its BOS when it adds one), right-padded
    batches of ``batch_size``, each row at most ``max_length`` tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    rows = [r for r in rows if len(r) >= 2]  # a row needs a next token to predict
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        out.append(CEBatch(ids, mask))
    return out
