"""The residual monitor: what the base SAE cannot represent, from the second moments of its error.

Why: the base SAE is a fixed coordinate system. What a fine-tune adds that the base never had
shows in the SAE-feature metrics only as a falling explained variance; the error e = x − x̂ is
where it lives. We keep, per hook, a streaming sum of e eᵀ over the probe tokens (float64, a
sum like every other state, so it merges and all-reduces), for the base and for the current
model. The eigenvectors of Σ_cur − Σ_base with positive eigenvalues are the directions of *new*
error: each is read through the decoder (is it near a feature after all?), per probe category
(mean projection of the error), and through the model's unembedding (the logit lens: which
tokens it promotes), so a person can see what it says (docs/metrics.md "Residual directions").

Memory: the exact moment is d × d float64 (8 MiB at d = 1024). Above ``EXACT_MAX_D`` it is a
one-pass randomized sketch Y = Σ Ω with a fixed Gaussian Ω of ``SKETCH_RANK`` columns (d × 512
float64: 16 MiB at d = 4096), from which the top eigenpairs of a low-rank Σ_cur − Σ_base are
recovered as in Halko, Martinsson & Tropp (2011, §5.5). Ω is regenerated from a seed on any
device, so the base and current sketches share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..records import ResidualDirection

#: Widths up to this keep the exact d × d moment; wider ones a d × SKETCH_RANK sketch.
EXACT_MAX_D = 2048
SKETCH_RANK = 512
_SEED = 20261130
#: A direction is reported when its new error variance is at least this share of the current
#: model's error energy per token (below it, it is numerical noise or an unremarkable change).
MIN_SHARE = 0.01


def sketch_width(d: int) -> int:
    """Columns of the error moment kept for width ``d``: d (exact) or SKETCH_RANK."""
    return d if d <= EXACT_MAX_D else SKETCH_RANK


def sketch_matrix(d: int, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Ω [d, r] for a sketched width (the same on every device and process); None when exact."""
    r = sketch_width(d)
    if r == d:
        return None
    g = torch.Generator(device="cpu").manual_seed(_SEED + d)
    return (torch.randn(d, r, generator=g, dtype=torch.float64) / r ** 0.5).to(device, dtype)


def accumulate(gram: torch.Tensor, err: torch.Tensor, omega: torch.Tensor | None) -> None:
    """gram += eᵀ e (exact) or eᵀ (e Ω) (sketch), for one batch of errors ``err`` [n, d].

    The product runs in ``err``'s dtype (float32: one GEMM, the probe pass's cost) and is added
    in float64; the base and the current model go through the identical computation, so a model
    compared with itself gives a difference of exactly zero.
    """
    right = err if omega is None else err @ omega.to(err.dtype)
    gram += (err.T @ right).double()


@dataclass
class NewDirection:
    """One eigenvector of the new error (before it is read through the model)."""

    vector: torch.Tensor  # [d] unit
    variance: float  # its eigenvalue of Σ_cur/n_cur − Σ_base/n_base (error variance per token)
    share: float  # variance / the current model's error energy per token


def new_directions(cur_gram: torch.Tensor, cur_n: float, cur_energy: float, base_gram: torch.Tensor, base_n: float,
                   k: int, omega: torch.Tensor | None = None, min_share: float = MIN_SHARE,
                   mean_shift: torch.Tensor | None = None) -> list[NewDirection]:
    """The top ``k`` directions whose error variance grew, largest first.

    ``cur_energy``: the current model's mean ‖e‖² per token (the share's denominator). Only
    directions holding at least ``min_share`` of it are returned: a model compared with itself
    returns none. An eigenvector's sign is arbitrary; each is turned to point along
    ``mean_shift`` (the change of the mean error, current minus base) so that the logit lens
    reads what the error moved *toward*; without a shift, its largest component is positive.
    """
    if cur_n <= 0 or base_n <= 0 or cur_energy <= 0:
        return []
    diff = cur_gram / cur_n - base_gram / base_n
    if omega is None:
        vals, vecs = torch.linalg.eigh((diff + diff.T) / 2)
    else:
        vals, vecs = _sketched_eig(diff, omega.to(diff.device, diff.dtype))
    order = torch.argsort(vals, descending=True)[:k]
    out = []
    for i in order.tolist():
        share = float(vals[i]) / cur_energy
        if share < min_share:
            break
        v = vecs[:, i]
        v = v / v.norm()
        along = float(v @ mean_shift.to(v.dtype)) if mean_shift is not None else 0.0
        v = (v if along > 0 else -v) if along != 0 else _sign_fixed(v)
        out.append(NewDirection(v, float(vals[i]), share))
    return out


def _sketched_eig(y: torch.Tensor, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric D from its sketch Y = D Ω: Q = orth(Y), B (Qᵀ Ω) ≈ Qᵀ Y."""
    q, _ = torch.linalg.qr(y)
    lhs = q.T @ omega  # [r, r]
    b = torch.linalg.lstsq(lhs.T, (q.T @ y).T).solution.T
    vals, w = torch.linalg.eigh((b + b.T) / 2)
    return vals, q @ w


def _sign_fixed(v: torch.Tensor) -> torch.Tensor:
    """An eigenvector's sign is arbitrary: fix it so its largest |component| is positive."""
    return v if v[v.abs().argmax()] >= 0 else -v


def nearest_decoder(v: torch.Tensor, w_dec: torch.Tensor) -> tuple[int, float]:
    """(feature, |cos|) of the SAE decoder direction nearest to ``v`` (rows of ``w_dec`` [d_sae, d])."""
    w = w_dec.to(v.dtype)
    cos = (w @ v).abs() / w.norm(dim=1).clamp_min(1e-12)
    i = int(cos.argmax())
    return i, float(cos[i])


def category_projections(err_sum: torch.Tensor, n: torch.Tensor, v: torch.Tensor,
                         categories: Sequence[str]) -> dict[str, float]:
    """Mean projection of the error onto ``v`` per probe category (NaN where a category is empty)."""
    proj = (err_sum.to(v.dtype) @ v) / n.to(v.dtype)
    return {c: float(p) for c, p in zip(categories, proj)}


@dataclass
class ResidualReader:
    """What reads a new direction at one hook: the SAE's decoder and the model's logit lens.

    ``unembed`` [vocab, d] is the output embedding and ``norm_weight`` [d] the final norm's
    scale (None where the architecture has none); the lens reads W_U · (g ⊙ v), the direction
    as the final norm would pass it (its scale 1/rms is a positive factor: it does not change
    which tokens rank first). ``decode`` turns token ids into text.
    """

    w_dec: torch.Tensor
    unembed: torch.Tensor | None = None
    norm_weight: torch.Tensor | None = None
    decode: Callable[[list[int]], list[str]] | None = None
    n_tokens: int = 8

    def read(self, rank: int, d: NewDirection, projections: dict[str, float]) -> ResidualDirection:
        feature, cos = nearest_decoder(d.vector, self.w_dec.to(d.vector.device))
        top, bottom = logit_lens(d.vector, self.unembed, self.norm_weight, self.n_tokens)
        text = self.decode or (lambda ids: [str(i) for i in ids])
        return ResidualDirection(rank=rank, share=d.share, variance=d.variance, nearest_feature=feature,
                                 decoder_cos=cos, projections=projections, top_tokens=text(top),
                                 bottom_tokens=text(bottom), vector=d.vector.float().cpu().tolist())


def logit_lens(v: torch.Tensor, unembed: torch.Tensor | None, norm_weight: torch.Tensor | None,
               k: int = 8) -> tuple[list[int], list[int]]:
    """Token ids a direction promotes most and suppresses most: the top and bottom of
    W_U · (g ⊙ v), g the final norm's scale (``logit_lens_weights``); ([], []) without W_U."""
    if unembed is None:
        return [], []
    u = v.to(unembed.device, torch.float32)
    if norm_weight is not None:
        u = u * norm_weight.to(u.device, torch.float32)
    logits = unembed.float() @ u
    k = min(k, logits.numel())
    return logits.topk(k).indices.tolist(), (-logits).topk(k).indices.tolist()


#: Where architectures keep the norm applied before the unembedding (after PEFT/DDP unwrapping).
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                "model.decoder.final_layer_norm", "norm", "ln_f")


def logit_lens_weights(model: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(W_U [vocab, d], the final norm's scale [d] or None) of a causal LM; (None, None) without an
    output embedding. Detached views, no copies, except for sharded weights (below).

    Under FSDP2 (``fully_shard``) a weight between forwards is this rank's shard, a DTensor (unless
    its module keeps parameters whole after a forward, as a root does by fully_shard's own default;
    accelerate reshards the root too): it is gathered whole (``full_tensor``, a collective: every
    rank calls this, as every rank computes a snapshot). A shard would be the wrong matrix, and
    mixed with plain tensors it raises."""
    from .capture import resolve_module

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or getattr(head, "weight", None) is None:
        return None, None
    norm = None
    for name in _FINAL_NORMS:
        try:
            _, module = resolve_module(model, name)
        except (KeyError, AttributeError, ValueError):
            continue
        norm = getattr(module, "weight", None)
        break
    return _whole(head.weight), None if norm is None else _whole(norm)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached; a DTensor (FSDP2, tensor parallel) gathered into a plain tensor first."""
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t
