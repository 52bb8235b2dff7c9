"""The SAE side of the probe pass: one batch's tokens at one hook encoded, decoded and added to
that hook's statistics (``stats.HookStats``).

Why apart from the monitor: the monitor decides *which* tokens of which model reach the SAE
(ranks, batches, pairing with the base, massive-norm exclusion); these functions only turn
activations into codes and sums, the part whose cost the benchmarks measure.
"""

from __future__ import annotations

import torch

from . import metrics as M
from .probes import ProbeBatch
from .saes import HookedSAE
from .stats import HookStats, PairedBatch
from .tokens import above_limit


def chunk_tokens(d_sae: int, chunk_mb: float) -> int:
    """Tokens per SAE chunk: the [tokens, d_sae] code buffers stay within ``chunk_mb``
    (``MonitorConfig.sae_chunk_mb``), which bounds peak memory and keeps them cache- and
    allocator-friendly."""
    return max(16, int(chunk_mb * 2**20) // (4 * d_sae))


def encode_selected(s: HookedSAE, x: torch.Tensor, cat: torch.Tensor, pair: PairedBatch | None, stats: HookStats,
                    device: torch.device, k_max: int, chunk: int) -> PairedBatch | None:
    """Encode, decode and accumulate one batch's selected tokens, ``chunk`` tokens at a time.

    Without ``pair`` (the base pass) the base pairs with itself, and what later snapshots
    need for pairing (activations, top-``k_max`` ids, L0) is returned.
    """
    kept: list[PairedBatch] = []
    for lo in range(0, x.shape[0], chunk):  # chunks of tokens, a handful per batch
        xc = x[lo:lo + chunk]
        x_in = xc.to(s.sae.dtype)
        codes = s.sae.encode(x_in)
        l0 = (codes > 0).sum(1)
        max_l0 = int(l0.max()) if l0.numel() else 0
        # Wide enough to hold every firing feature when that is still sparse (k ≤ d_sae/8):
        # then statistics and decode use the n·k top entries only, exactly.
        k = min(s.d_sae, max(k_max, max_l0))
        if k != s.d_sae and 8 * k > s.d_sae:
            k = min(k_max, s.d_sae)
        vals, top = M.topk_codes(codes, k)
        complete = max_l0 <= k
        x_hat = decode_codes(s, codes, vals, top, complete)
        cc = cat[lo:lo + chunk]
        if pair is None:  # the base pass
            p = PairedBatch(xc.detach().clone(), top[:, :k_max].contiguous(), l0.to(torch.int32))
            kept.append(p)
        else:
            p = PairedBatch(pair.x[lo:lo + chunk].to(device), pair.top_idx[lo:lo + chunk].to(device),
                            pair.l0[lo:lo + chunk].to(device))
        stats.update(x_in, x_hat, codes, cc, pair=p, k_max=k_max, top_idx=top,
                     top_vals=vals if complete else None, l0=l0)
    if pair is not None:
        return None
    if not kept:  # no token of this batch selected at this hook
        return PairedBatch(x.new_zeros((0, x.shape[1])), torch.zeros((0, k_max), dtype=torch.int32),
                           torch.zeros(0, dtype=torch.int32))
    return PairedBatch(torch.cat([p.x for p in kept]), torch.cat([p.top_idx for p in kept]),
                       torch.cat([p.l0 for p in kept]))


def encode_tokens(s: HookedSAE, acts: torch.Tensor, mask: torch.Tensor, category: torch.Tensor, limit: float,
                  stats: HookStats, keep: torch.Tensor | None = None) -> torch.Tensor:
    """A few tokens per probe (``mask``: the refusal tokens, the post-instruction tokens) into
    their own statistics, densely encoded (few tokens: at small cost). ``keep`` (the base's
    mask of these tokens) or else the base's massive-norm ``limit`` leaves tokens out. Returns
    the keep mask used."""
    x = acts[mask]
    cat = category[:, None].expand_as(mask)[mask]
    if keep is None or keep.numel() != x.shape[0]:
        keep = ~above_limit(x, limit)
    keep = keep.to(x.device)
    x, cat = x[keep], cat[keep]
    if x.shape[0]:
        x_in = x.to(s.sae.dtype)
        codes = s.sae.encode(x_in)
        stats.update(x_in, s.sae.decode(codes), codes, cat)
    return keep


def encode_refusal(s: HookedSAE, acts: torch.Tensor, batch: ProbeBatch, pair: PairedBatch | None, limit: float,
                   stats: HookStats) -> torch.Tensor:
    """The refusal scores' tokens (``ProbeBatch.refusal``: by default the teacher-forced refusal
    response after each harmful/harmless probe) into their own statistics. Massive-norm tokens
    are excluded where the base has them (its keep mask); when the base read another format
    whose refusal has another number of tokens, by the base's limit on each model's own tokens."""
    base_keep = pair.refusal_keep if pair is not None else None
    return encode_tokens(s, acts, batch.refusal, batch.category, limit, stats, base_keep)


def decode_codes(s: HookedSAE, codes: torch.Tensor, vals: torch.Tensor, top: torch.Tensor,
                 complete: bool) -> torch.Tensor:
    """x̂: the sparse decode when every firing feature is in the top-k and the dictionary is wide
    enough for it to pay (d_sae ≥ 8k: summing k decoder rows per token beats a dense matmul),
    else the SAE's own decode."""
    if complete and s.sparse_decode is not None and s.d_sae >= 8 * top.shape[1]:
        return s.sparse_decode(vals, top)
    return s.sae.decode(codes)
