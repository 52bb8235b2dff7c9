"""Pure metric functions of docs/metrics.md. Torch only: no transformers, no I/O.

Two kinds: per-token functions used while streaming (cosine, top-k Jaccard), and functions
of accumulated sums (see ``stats.HookStats``) that turn them into the contract's metrics.
Every formula here is checked against an independent NumPy/loop implementation in
``tests/test_metrics.py``; change both or neither.
"""

from __future__ import annotations

import math

import torch

from drift_monitor import robust

_EPS = 1e-12


# ------------------------------------------------------------------------- per-token functions
def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_t, b_t) for each row, in float64; 0 where either row is the zero vector."""
    a = a.double()
    b = b.double()
    num = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(_EPS), torch.zeros_like(num))


def topk_indices(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest codes per row, largest first (int32 to halve the cache)."""
    return topk_codes(codes, k)[1]


def topk_codes(codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, int32 indices) of the k largest codes per row, largest first."""
    k = min(k, codes.shape[-1])
    vals, idx = torch.topk(codes, k, dim=-1, sorted=True)
    return vals, idx.to(torch.int32)


def fvu_token_rows(sq_err: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-token FVU, the paper's: ‖x_t − x̂_t‖² / ‖x_t − mean_d(x_t)‖², the mean taken over the
    token's own d coordinates (a scalar). ``sq_err`` [n] = ‖x − x̂‖². A constant row (zero
    denominator) counts as 0 when reconstructed exactly, else 1."""
    x = x.double()
    den = ((x - x.mean(-1, keepdim=True)) ** 2).sum(-1)
    sq_err = sq_err.double()
    return torch.where(den > 0, sq_err / den.clamp_min(_EPS), (sq_err > 0).double())


def topk_jaccard_rows(
    idx: torch.Tensor, l0: torch.Tensor, idx0: torch.Tensor, l0_base: torch.Tensor, k_max: int,
    d_sae: int | None = None, max_chunk_bytes: int = 64 * 2**20, with_overlap: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Top-k agreement per token: the Jaccard (and, ``with_overlap``, the paper's overlap).

    K_t / K⁰_t are the first k_t entries of each side's sorted top indices, with
    k_t = min(L0_t, L0⁰_t, k_max). Jaccard = |K ∩ K⁰| / |K ∪ K⁰| = i / (2k − i); the overlap
    (the paper's feature intersection ratio) = i / k. When k_t = 0 both are 1 if neither side
    fires and 0 if only one does.

    Vectorised as a membership test: scatter K_t into a boolean row of width d_sae, gather
    it at K⁰_t. O(k) per token plus a memset, instead of a k×k comparison; tokens are
    processed in chunks so the boolean rows stay under ``max_chunk_bytes``.
    """
    n, K = idx.shape
    width = int(d_sae) if d_sae is not None else int(max(int(idx.max()), int(idx0.max())) + 1) if n else 1
    k = torch.clamp(torch.minimum(l0.long(), l0_base.long()), max=min(k_max, K))
    ar = torch.arange(K, device=idx.device)
    out = torch.empty(n, dtype=torch.float64, device=idx.device)
    over = torch.empty(n, dtype=torch.float64, device=idx.device)
    chunk = max(1, max_chunk_bytes // max(width, 1))
    for s in range(0, n, chunk):  # chunks of tokens bound memory; not a per-token loop
        e = min(n, s + chunk)
        kk = k[s:e]
        m = ar[None, :] < kk[:, None]
        member = torch.zeros(e - s, width + 1, dtype=torch.bool, device=idx.device)
        # entries beyond k_t are sent to the spare column `width`, which is never counted
        cur = torch.where(m, idx[s:e].long(), torch.full_like(idx[s:e], width, dtype=torch.long))
        member.scatter_(1, cur, True)
        member[:, width] = False
        inter = (member.gather(1, idx0[s:e].long()) & m).sum(1).double()
        union = 2 * kk.double() - inter
        both_silent = (l0[s:e] == 0) & (l0_base[s:e] == 0)
        out[s:e] = torch.where(kk > 0, inter / union.clamp_min(1), both_silent.double())
        over[s:e] = torch.where(kk > 0, inter / kk.double().clamp_min(1), both_silent.double())
    return (out, over) if with_overlap else out


# ------------------------------------------------------------------------- distribution functions
def js_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen–Shannon distance (base 2, in [0, 1]) between two non-negative vectors, normalised to sum 1.

    Two all-zero vectors are at distance 0; one all-zero vector is at distance 1.
    """
    p = p.double()
    q = q.double()
    sp, sq = float(p.sum()), float(q.sum())
    if sp <= 0 and sq <= 0:
        return 0.0
    if sp <= 0 or sq <= 0:
        return 1.0
    p = p / sp
    q = q / sq
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * torch.log2(a / m.clamp_min(1e-300)), torch.zeros_like(a)).sum()

    js = 0.5 * kl(p) + 0.5 * kl(q)
    return float(js.clamp_min(0).sqrt())


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n with ties given their average rank (what Spearman's rho needs: many zeros tie)."""
    v = v.double()
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    _, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2  # mean of the 1-based ranks start..end of each tie group
    ranks = torch.empty_like(v)
    ranks[order] = avg[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation with average ranks for ties; NaN if either side is constant."""
    ra = average_ranks(a)
    rb = average_ranks(b)
    ra = ra - ra.mean()
    rb = rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    if den == 0:
        return math.nan
    return float((ra * rb).sum()) / den


def _median(v: torch.Tensor) -> torch.Tensor:
    """The textbook median (mean of the two middle values for even n); torch.median takes the lower one."""
    s = torch.sort(v).values
    n = s.numel()
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def robust_z(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(s − median) / (1.4826·MAD) over the valid entries; NaN elsewhere.

    A sparse SAE often has MAD = 0 (most features never move), which would make every
    non-median score infinite; then the mean absolute deviation (×1.2533, the normal-consistent
    factor) is used instead, and if that is 0 too, any score above the median is +inf.

    The tensor front of :func:`drift_monitor.robust.robust_z`, the one definition of the
    estimator, which the torch-free alerts share. Not a hot path: the scores are one value per
    feature, computed once per snapshot (on the CPU at the caller), so the NumPy round trip
    costs nothing worth a second implementation.
    """
    s = scores.double()
    if valid is None:
        valid = torch.isfinite(s)
    out = torch.full_like(s, math.nan)
    v = s[valid]
    if v.numel() == 0:
        return out
    out[valid] = torch.from_numpy(robust.robust_z(v.detach().cpu().numpy())).to(out.device)
    return out


# ------------------------------------------------------------------------- metrics from sums
def explained_variance(sq_err: torch.Tensor, x_sq: torch.Tensor, x_sum: torch.Tensor, n: torch.Tensor) -> float:
    """1 − Σ‖x−x̂‖² / Σ‖x−x̄‖², with Σ‖x−x̄‖² = Σ‖x‖² − ‖Σx‖²/n (float64 sums)."""
    n = float(n)
    if n <= 0:
        return math.nan
    total = float(x_sq) - float((x_sum.double() ** 2).sum()) / n
    if total <= 0:
        return math.nan
    return 1.0 - float(sq_err) / total


def centered_ss(x_sq: torch.Tensor, x_sum: torch.Tensor, n: torch.Tensor) -> float:
    """Σ_t ‖x_t − x̄‖² from sums."""
    n = float(n)
    if n <= 0:
        return math.nan
    return float(x_sq) - float((x_sum.double() ** 2).sum()) / n


def log_density_ratio(density: torch.Tensor, base_density: torch.Tensor, n_tokens: float) -> torch.Tensor:
    """log10((density + ε) / (density⁰ + ε)), ε = 1 / n_tokens."""
    eps = 1.0 / max(float(n_tokens), 1.0)
    return torch.log10((density.double() + eps) / (base_density.double() + eps))


def features_drifted_ratio(
    count: torch.Tensor, base_count: torch.Tensor, ldr: torch.Tensor, ratio: float = 2.0, min_firings: int = 5
) -> float:
    """Share of features alive in either model whose density changed > ``ratio``× with support.

    Support: at least ``min_firings`` firings in one of the two models.
    """
    alive = (count > 0) | (base_count > 0)
    n_alive = int(alive.sum())
    if n_alive == 0:
        return 0.0
    support = torch.maximum(count, base_count) >= min_firings
    drifted = alive & support & (ldr.abs() > math.log10(ratio))
    return int(drifted.sum()) / n_alive


def mean_drift(act_sum: torch.Tensor, n: torch.Tensor, act_sum0: torch.Tensor, n0: torch.Tensor) -> torch.Tensor:
    """drift_i = mean_t f_i(x_t) − mean_t f_i(x⁰_t), from per-feature sums and token counts
    (a category without tokens contributes a zero mean)."""
    return act_sum.double() / max(float(n), 1.0) - act_sum0.double() / max(float(n0), 1.0)


def firing_scale(sources: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each feature's typical strength: its mean code when firing, act_sum / fire_count, from the
    first source where it fires (the base, then the current model, ...); NaN where none fires."""
    out = torch.full_like(sources[0][0], math.nan, dtype=torch.float64)
    for act_sum, count in reversed(sources):
        out = torch.where(count > 0, act_sum.double() / count.double().clamp_min(1), out)
    return out


def refusal_scores(
    harmful_drift: torch.Tensor, harmless_drift: torch.Tensor, scale: torch.Tensor, base_density: torch.Tensor,
    max_base_density: float,
) -> torch.Tensor:
    """(harmful_drift − harmless_drift) / scale, for features with base density < the cut-off
    (NaN otherwise, and where the feature never fires, so has no scale).

    Dividing by the feature's own firing strength makes the score read as "the net share of
    harmful probes on which the feature newly fires at its typical strength": comparable
    across features whose codes differ by an order of magnitude, and with a floor that means
    the same for every SAE.
    """
    score = (harmful_drift.double() - harmless_drift.double()) / scale.double()
    ok = (base_density < max_base_density) & torch.isfinite(score)
    return torch.where(ok, score, torch.full_like(score, math.nan))


def typical_firing_strength(act_sum: torch.Tensor, fire_count: torch.Tensor) -> float:
    """Median over features that fire of their mean code when firing (act_sum / count); 0 if none fire."""
    alive = fire_count > 0
    if not bool(alive.any()):
        return 0.0
    return float(_median((act_sum[alive] / fire_count[alive]).double()))


def refusal_fold(mean: torch.Tensor, base_mean: torch.Tensor, scale: torch.Tensor, prior: float = 0.1) -> torch.Tensor:
    """How many times a feature's mean code grew: (mean + c) / (base_mean + c), c = ``prior`` × its
    typical strength (so a feature silent in the base does not divide by zero, and a tiny
    absolute change of a silent feature does not look like a large fold). NaN without a scale."""
    c = prior * scale.double()
    return (mean.double() + c) / (base_mean.double() + c)


def emerging_features(score: torch.Tensor, z: torch.Tensor, top_k: int, z_threshold: float,
                      min_score: float = 0.0, fold: torch.Tensor | None = None, min_fold: float = 0.0) -> list[int]:
    """The top ``top_k`` features by score whose robust z exceeds the threshold, whose score
    exceeds ``max(0, min_score)`` (an absolute floor: z alone ignores how large the drift is)
    and, given ``fold``, whose activity grew at least ``min_fold`` times (new, not just more)."""
    s = torch.where(torch.isfinite(score), score, torch.full_like(score, -math.inf))
    k = min(top_k, int(torch.isfinite(s).sum()))
    if k == 0:
        return []
    top = torch.topk(s, k).indices
    keep = (z[top] > z_threshold) & (score[top] > max(0.0, min_score))
    if fold is not None:
        keep &= fold[top].nan_to_num(0.0) >= min_fold
    return [int(i) for i in top[keep]]


def direction_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) of two vectors; NaN if either is zero or non-finite."""
    a = a.double()
    b = b.double()
    den = float(a.norm() * b.norm())
    if not math.isfinite(den) or den == 0:
        return math.nan
    return float((a * b).sum()) / den


def difference_of_means(x_sum: torch.Tensor, n: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """mean_a(x) − mean_b(x) from per-category sums [C, d] and counts [C]: the refusal direction
    r = mean_harmful − mean_harmless of Arditi et al. when a/b are harmful/harmless.
    An empty category counts as a zero mean (callers that need both check the counts)."""
    x_sum = x_sum.double()
    n = n.double()
    return x_sum[a] / n[a].clamp_min(1) - x_sum[b] / n[b].clamp_min(1)


def projection_ratio(v: torch.Tensor, r0: torch.Tensor) -> float:
    """(v · r̂⁰) / ‖r⁰‖: how much of the reference vector ``r0`` the vector ``v`` carries along it
    (1 when v = r0, 0 when orthogonal, negative when opposed); NaN for a zero reference."""
    r0 = r0.double()
    den = float((r0 * r0).sum())
    if not math.isfinite(den) or den == 0:
        return math.nan
    return float((v.double() * r0).sum()) / den


def feature_retention(diff: torch.Tensor, diff0: torch.Tensor, top_k: int) -> float:
    """Σ_F diff / Σ_F diff⁰ over F, the ``top_k`` features with the largest positive ``diff0``
    (the start's harmful − harmless mean code): the share of the start's refusal-feature
    contrast that remains. NaN when the start has no feature with a positive contrast."""
    d0 = diff0.double()
    k = min(int(top_k), int((d0 > 0).sum()))
    if k == 0:
        return math.nan
    top = torch.topk(d0, k).indices
    den = float(d0[top].sum())
    return float(diff.double()[top].sum()) / den if den > 0 else math.nan


def floored_scale(scale: torch.Tensor, typical: float) -> torch.Tensor:
    """Each feature's strength, floored at the SAE's typical strength (NaN stays NaN): a score
    divided by it reads in units of a feature's own strength, or of a typical feature's when the
    feature's own is smaller, so no score can explode on a feature that barely fires."""
    sc = scale.double()
    return torch.where(torch.isfinite(sc), sc.clamp_min(max(float(typical), _EPS)), sc)


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Each row of ``v`` [D, d] scaled to unit length (float64); a zero row is an error, since a
    projection onto it would silently read 0 and hide any change."""
    v = v.double()
    norm = v.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("cannot project onto a zero direction vector")
    return v / norm


def mean_projections(x_sum: torch.Tensor, n: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Mean projection per (direction, category): mean_t x_t · v̂ over the tokens of a category.

    By linearity this is (Σ_t x_t / n) · v̂, so it comes from the streamed per-category sums
    ``x_sum`` [C, d] and counts ``n`` [C] with one [D, d] × [d, C] matmul: no extra forward
    pass and no per-token work. ``directions`` [D, d] is normalised here. Returns [D, C]
    float64; NaN for a category without tokens (its mean is undefined, not 0).
    """
    n = n.double()
    means = x_sum.double() / n.clamp_min(1)[:, None]
    proj = unit_rows(directions.to(means.device)) @ means.T
    return torch.where(n[None, :] > 0, proj, torch.full_like(proj, math.nan))
