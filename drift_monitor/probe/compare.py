"""The metrics of one hook: a pure function of the current and the base model's statistics.

``compare(cur, base, ...)`` reads two ``stats.HookStats`` (never changing them) and returns
the ``HookResult`` of docs/metrics.md: scalar metrics, per-category feature tables, refusal
features, direction projections and the directions of new SAE error (``probe.residual``).
Everything is computed from the sums, counts and maxes the statistics keep, so it is the same
however the tokens were batched, sharded or reduced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..config import MetricSettings
from ..records import (
    ALL,
    PROJECTION,
    PROJECTION_DELTA,
    REFUSAL_BASE,
    FeatureStats,
    HookResult,
    RefusalFeatures,
    ResidualDirection,
)
from . import metrics as M
from . import residual as R
from .residual import ResidualReader
from .stats import HookStats

if TYPE_CHECKING:
    import numpy as np


def compare(cur: HookStats, base: HookStats, hook: str, settings: MetricSettings,
            directions: Mapping[str, torch.Tensor] | None = None,
            refusal: tuple[HookStats, HookStats] | None = None,
            reader: ResidualReader | None = None,
            post: tuple[HookStats, HookStats] | None = None) -> HookResult:
    """The metrics of ``cur`` (the current model's statistics) against ``base`` (the base model's).

    ``directions`` ({name: [d] vector}, see ``drift_monitor.probe.directions``) adds the mean
    projection of each category onto each direction, from the sums already kept.
    ``refusal`` (current, base): statistics of the refusal tokens (by default a refusal
    teacher-forced after each harmful/harmless probe), where refusal features are scored;
    without it they are scored on the categories' selected tokens.
    ``reader`` reads the directions of new SAE error (the decoder's nearest feature, the logit
    lens); without it they are not computed.
    ``post`` (current, base): statistics of the post-instruction tokens of the harmful and
    harmless probes, where the start model's refusal machinery is read and its retention
    measured (``_erosion``); without it those metrics are not computed.
    """
    s = settings
    n = cur.n.sum()
    base_ev = M.explained_variance(base.sq_err_sum.sum(), base.x_sq_sum.sum(), base.x_sum.sum(0), base.n.sum())
    ev = M.explained_variance(cur.sq_err_sum.sum(), cur.x_sq_sum.sum(), cur.x_sum.sum(0), n)
    n_f = float(n)
    count = cur.fire_count.sum(0)
    base_count = base.fire_count.sum(0)
    density = count / max(n_f, 1.0)
    base_density = base_count / max(float(base.n.sum()), 1.0)
    ldr = M.log_density_ratio(density, base_density, n_f)
    n_pair = float(cur.n_paired.sum())
    nan = math.nan
    metrics: dict[str, float] = {
        "n_tokens": n_f,
        "l0": float(cur.l0_sum.sum()) / n_f if n_f else nan,
        "mse": float(cur.sq_err_sum.sum()) / (n_f * cur.d) if n_f else nan,
        "explained_variance": ev,
        "fvu": 1.0 - ev,
        "cosine": float(cur.cos_sum.sum()) / n_f if n_f else nan,
        "dead_fraction": float((count == 0).double().mean()),
        "dense_fraction": float((density > s.dense_density).double().mean()),
        "base_explained_variance": base_ev,
        "explained_variance_delta": ev - base_ev,
        "act_relative_mse": (float(cur.pair_sq_diff.sum()) /
                             M.centered_ss(base.x_sq_sum.sum(), base.x_sum.sum(0), base.n.sum())) if n_pair else nan,
        "act_cosine": float(cur.pair_cos_sum.sum()) / n_pair if n_pair else nan,
        "topk_jaccard": float(cur.jaccard_sum.sum()) / n_pair if n_pair else nan,
        "topk_overlap": float(cur.overlap_sum.sum()) / n_pair if n_pair else nan,
        "fvu_token_mean": float(cur.fvu_tok_sum.sum()) / n_f if n_f else nan,
        "n_excluded_tokens": float(cur.excluded.sum()),
        "n_outlier_tokens": float(cur.outliers.sum()),
        "features_drifted_ratio": M.features_drifted_ratio(count, base_count, ldr, s.drift_ratio,
                                                          s.drift_min_firings),
        "density_js": M.js_distance(density, base_density),
        "density_spearman": M.spearman(density, base_density),
        "nonfinite_fraction": float(cur.nonfinite.sum()) / max(n_f + float(cur.nonfinite.sum()), 1.0),
    }
    features = {ALL: feature_stats(cur, base, None)}
    for c, name in enumerate(cur.categories):
        features[name] = feature_stats(cur, base, c)
    scores = None
    cats = cur.categories
    if s.harmful_category in cats and s.harmless_category in cats:
        scores, refusal_metrics = _refusal(cur, base, base_density, s, refusal or (cur, base))
        metrics.update(refusal_metrics)
        if post is not None:
            metrics.update(_erosion(post[0], post[1], s))
    metrics.update(_direction_metrics(cur, base, directions or {}, s))
    residual = _residual(cur, base, s, reader)
    metrics["residual_energy_ratio"] = _energy_ratio(cur, base)
    metrics["residual_top_share"] = residual[0].share if residual else 0.0
    return HookResult(hook=hook, d_sae=cur.d_sae, metrics=metrics, features=features, refusal=scores,
                      residual=residual)


def _energy_ratio(cur: HookStats, base: HookStats) -> float:
    """Mean ‖x − x̂‖² per token of the current model over the base's: 1 when nothing is new."""
    n, n0 = float(cur.n.sum()), float(base.n.sum())
    e, e0 = float(cur.sq_err_sum.sum()) / max(n, 1.0), float(base.sq_err_sum.sum()) / max(n0, 1.0)
    return e / e0 if n and n0 and e0 > 0 else math.nan


def _residual(cur: HookStats, base: HookStats, s: MetricSettings,
              reader: ResidualReader | None) -> list[ResidualDirection]:
    """The directions of new SAE error, read through the decoder and the logit lens."""
    if reader is None or not s.residual_directions or not cur.residual or not base.residual:
        return []
    n, n0 = float(cur.n.sum()), float(base.n.sum())
    energy = float(cur.sq_err_sum.sum()) / max(n, 1.0)
    shift = cur.err_sum.sum(0) / max(n, 1.0) - base.err_sum.sum(0) / max(n0, 1.0)
    found = R.new_directions(cur.err_gram, n, energy, base.err_gram, n0, s.residual_directions, cur.omega,
                             mean_shift=shift)
    return [reader.read(i, d, R.category_projections(cur.err_sum, cur.n, d.vector, cur.categories))
            for i, d in enumerate(found)]


def feature_stats(cur: HookStats, base: HookStats, c: int | None) -> FeatureStats:
    """Per-feature statistics of category ``c`` (its index; None: all categories together)."""
    sel = (lambda t: t.sum(0)) if c is None else (lambda t: t[c])
    n = float(sel(cur.n))
    n0 = float(sel(base.n))
    count, count0 = sel(cur.fire_count), sel(base.fire_count)
    density = count / max(n, 1.0)
    density0 = count0 / max(n0, 1.0)
    mean_act = sel(cur.act_sum) / max(n, 1.0)
    mean_act0 = sel(base.act_sum) / max(n0, 1.0)
    mx = cur.act_max.amax(0) if c is None else cur.act_max[c]
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)).double()
    ldr = M.log_density_ratio(density, density0, n)
    name = ALL if c is None else cur.categories[c]

    def np_(t: torch.Tensor) -> np.ndarray:
        return t.cpu().numpy()

    return FeatureStats(name, int(n), np_(count), np_(count0), np_(density), np_(mean_act), np_(mx),
                        np_(mean_act - mean_act0), np_(ldr))


def _refusal(cur_sel: HookStats, base: HookStats, base_density: torch.Tensor, s: MetricSettings,
             tokens: tuple[HookStats, HookStats]) -> tuple[RefusalFeatures, dict[str, float]]:
    """Refusal scores (docs/metrics.md, "Refusal features"): each feature's harmful drift (minus
    its harmless drift with ``refusal_contrast``) at the refusal tokens, in units of the
    feature's own firing strength; and the refusal direction there. ``cur_sel``/``base``: the
    selected tokens' statistics; ``tokens``: (current, base) at the refusal tokens."""
    cur, cur0 = tokens
    h = cur_sel.categories.index(s.harmful_category)
    hl = cur_sel.categories.index(s.harmless_category)
    hd = M.mean_drift(cur.act_sum[h], cur.n[h], cur0.act_sum[h], cur0.n[h]).cpu()
    hld = M.mean_drift(cur.act_sum[hl], cur.n[hl], cur0.act_sum[hl], cur0.n[hl]).cpu()
    contrast = hld if s.refusal_contrast else torch.zeros_like(hld)
    # a feature's typical strength over everything the base read (selected + refusal tokens)
    base_act, base_cnt = base.act_sum.sum(0), base.fire_count.sum(0)
    if cur0 is not base:
        base_act, base_cnt = base_act + cur0.act_sum.sum(0), base_cnt + cur0.fire_count.sum(0)
    scale = M.firing_scale([(base_act, base_cnt), (cur_sel.act_sum.sum(0), cur_sel.fire_count.sum(0)),
                            (cur.act_sum.sum(0), cur.fire_count.sum(0))]).cpu()
    # floored at the SAE's typical strength: a feature that barely fires in the base must not score
    # hundreds for a tiny drift (docs/metrics.md, "Refusal features")
    typical = M.typical_firing_strength(base_act, base_cnt)
    score = M.refusal_scores(hd, contrast, M.floored_scale(scale, typical), base_density.cpu(),
                             s.refusal_max_base_density)
    fold = M.refusal_fold(cur.act_sum[h] / max(float(cur.n[h]), 1.0), cur0.act_sum[h] / max(float(cur0.n[h]), 1.0),
                          scale).cpu()
    z = M.robust_z(score)
    emerging = M.emerging_features(score, z, s.refusal_top_k, s.refusal_z_threshold,
                                   min_score=s.refusal_min_rel_score, fold=fold, min_fold=s.refusal_min_fold)
    metrics: dict[str, float] = {"refusal_score_floor": s.refusal_min_rel_score}
    finite = score[torch.isfinite(score)]
    metrics["max_refusal_score"] = float(finite.max()) if finite.numel() else math.nan
    metrics["n_emerging_refusal_features"] = float(len(emerging))

    r = M.difference_of_means(cur.x_sum, cur.n, h, hl)
    metrics["refusal_direction_cosine"] = M.direction_cosine(r, M.difference_of_means(cur0.x_sum, cur0.n, h, hl))
    metrics["refusal_direction_norm"] = float(r.norm())
    return RefusalFeatures(hd.numpy(), hld.numpy(), score.numpy(), z.numpy(), emerging), metrics


def _erosion(cur: HookStats, base: HookStats, s: MetricSettings) -> dict[str, float]:
    """How much of the start model's refusal machinery remains, read at the post-instruction tokens
    (docs/metrics.md, "Refusal gained and lost"). Both directions: above 1 refusal grew, below 1 it
    faded. No SAE is needed for the direction signals; the feature signals read the base SAE."""
    h = cur.categories.index(s.harmful_category)
    hl = cur.categories.index(s.harmless_category)
    nan = math.nan
    if min(float(cur.n[h]), float(cur.n[hl]), float(base.n[h]), float(base.n[hl])) <= 0:
        return {}
    r0 = M.difference_of_means(base.x_sum, base.n, h, hl)
    r = M.difference_of_means(cur.x_sum, cur.n, h, hl)
    shift_h = M.mean_drift(cur.x_sum[h], cur.n[h], base.x_sum[h], base.n[h])
    out = {
        "refusal_retention": M.projection_ratio(r, r0),
        "refusal_harmful_shift": M.projection_ratio(shift_h, r0),
        "refusal_post_cosine": M.direction_cosine(r, r0),
    }
    # the start's own refusal features: the top ones by (harmful − harmless) mean code at these tokens
    m = cur.act_sum / cur.n.clamp_min(1)[:, None]
    m0 = base.act_sum / base.n.clamp_min(1)[:, None]
    out["refusal_feature_retention"] = M.feature_retention(m[h] - m[hl], m0[h] - m0[hl], s.refusal_top_k) \
        if s.refusal_top_k else nan
    # new harmful-specific activity at these tokens, in units of a feature's strength (floored at the SAE's
    # typical strength, so a feature that barely fires in the base cannot divide by a vanishing number)
    scale = M.firing_scale([(base.act_sum.sum(0), base.fire_count.sum(0)), (cur.act_sum.sum(0), cur.fire_count.sum(0))])
    typical = M.typical_firing_strength(base.act_sum.sum(0), base.fire_count.sum(0))
    drift = (m[h] - m0[h]) - (m[hl] - m0[hl])
    score = drift.double() / M.floored_scale(scale, typical)
    finite = score[torch.isfinite(score)]
    out["max_post_refusal_score"] = float(finite.max()) if finite.numel() else nan
    return out


def _direction_metrics(cur: HookStats, base: HookStats, directions: Mapping[str, torch.Tensor],
                       s: MetricSettings) -> dict[str, float]:
    """``direction_projection:<name>:<category>`` (and ``..._delta:``, current − base) for
    each user direction and for the base refusal direction r̂⁰ (``refusal_base``), the
    standard way to watch refusal strengthen (Arditi et al.). One matmul per model."""
    names = list(directions)
    vecs = [directions[k].to(cur.x_sum.device, torch.float64) for k in names]
    cats = cur.categories
    if s.harmful_category in cats and s.harmless_category in cats:
        h, hl = cats.index(s.harmful_category), cats.index(s.harmless_category)
        r0 = M.difference_of_means(base.x_sum, base.n, h, hl)
        if float(base.n[h]) > 0 and float(base.n[hl]) > 0 and float(r0.norm()) > 0:
            names.append(REFUSAL_BASE)
            vecs.append(r0)
    if not names:
        return {}
    V = torch.stack(vecs)

    def proj(st: HookStats) -> torch.Tensor:  # [D, C + 1]: the categories, then "all"
        sums = torch.cat([st.x_sum, st.x_sum.sum(0, keepdim=True)])
        return M.mean_projections(sums, torch.cat([st.n, st.n.sum(0, keepdim=True)]), V)

    proj_cur = proj(cur)
    delta = (proj_cur - proj(base)).tolist()
    cur_l = proj_cur.tolist()
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        for j, cat in enumerate(cats + [ALL]):
            out[f"{PROJECTION}:{name}:{cat}"] = cur_l[i][j]
            out[f"{PROJECTION_DELTA}:{name}:{cat}"] = delta[i][j]
    return out
