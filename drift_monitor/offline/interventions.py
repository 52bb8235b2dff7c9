"""Interventions at a hook through the base SAE's features: ablation and steering.

Why these two: a feature that *drifted* in the statistics is a correlate; the paper's claim is
that the emerging refusal features *mediate* refusal. Ablating them in the fine-tuned model
(refusal should drop) and adding them to the base model (refusal should appear) are the two
halves of that causal check.

* **Ablation** removes the chosen features' contribution and keeps everything else, the SAE's
  reconstruction error included: ``x' = x − Σ_i f_i(x)·d_i``. Replacing ``x`` by the SAE
  reconstruction instead would also remove the error term, which by itself changes behaviour
  (the ``ce_loss_delta`` of an SAE is rarely 0), and would confound the check.
* **Steering** adds ``Σ_i α·s_i·d_i`` at every position, ``s_i`` the feature's typical
  activation (its mean code where it fires), so α = 1 reads "as if the feature fired at its
  usual strength on every token".

Both apply at every position, prompt and generated tokens alike (as in Arditi et al.), through
a forward hook that is removed on exit, also on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import DriftMonitorError
from ..probe.capture import replace_output, resolve_module


class VerifyError(DriftMonitorError, ValueError):
    """A causal check that cannot run as asked (features, prompts, run), naming the fix."""


def _feature_index(features: Sequence[int], d_sae: int, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(list(features), dtype=torch.long)
    if idx.numel() == 0:
        raise VerifyError("an intervention needs at least one feature")
    bad = idx[(idx < 0) | (idx >= d_sae)]
    if bad.numel():
        raise VerifyError(f"feature ids {bad.tolist()} are outside the SAE's dictionary (0..{d_sae - 1}); "
                          "give ids of this SAE's features")

    return idx.to(device)


def ablation_delta(sae: Any, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``−Σ_i f_i(x)·d_i`` over the features ``idx``: what ablation adds to ``x`` ([..., d])."""
    codes = sae.encode(x.to(sae.W_dec.dtype))  # [..., d_sae]: TopK/JumpReLU need every pre-activation
    w = sae.W_dec[idx]  # [m, d]
    return -(codes[..., idx] @ w).to(x.dtype)


def steering_vector(sae: Any, idx: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``Σ_i s_i·d_i`` ([d]); ``scales`` are the per-feature strengths (α × typical activation)."""
    return (scales.to(sae.W_dec.dtype)[:, None] * sae.W_dec[idx]).sum(0)


@contextlib.contextmanager
def intervene(model: nn.Module, hook: str, sae: Any, *, ablate: Sequence[int] = (),
              steer: Sequence[int] = (), steer_scales: Sequence[float] | torch.Tensor = (),
              steer_prompt_only: bool = False) -> Iterator[None]:
    """Within the block, ``model``'s ``hook`` output is ablated and/or steered.

    ``ablate``: feature ids whose contribution is removed. ``steer``: feature ids whose decoder
    directions are added, each scaled by the matching ``steer_scales`` entry.
    """
    _, module = resolve_module(model, hook)
    d_sae = int(sae.cfg.d_sae)
    dev = sae.W_dec.device
    abl = _feature_index(ablate, d_sae, dev) if len(ablate) else None
    add = None
    if len(steer):
        scales = torch.as_tensor(steer_scales, dtype=torch.float32)
        if scales.numel() != len(steer):
            raise ValueError(f"{len(steer)} steered features but {scales.numel()} scales")
        with torch.no_grad():
            add = steering_vector(sae, _feature_index(steer, d_sae, dev), scales.to(dev))

    def edit(x: torch.Tensor) -> torch.Tensor:
        if abl is not None:
            x = x + ablation_delta(sae, x, abl.to(x.device)).to(x.device)
        if add is not None and not (steer_prompt_only and x.dim() == 3 and x.shape[1] == 1):
            x = x + add.to(device=x.device, dtype=x.dtype)
        return x

    def fwd_hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        return replace_output(out, edit)

    handle = module.register_forward_hook(fwd_hook)
    try:
        yield
    finally:
        handle.remove()
