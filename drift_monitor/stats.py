"""Streaming sufficient statistics of one hook: update per batch, merge, all-reduce, compute.

Modelled on torchmetrics' ``Metric``: everything accumulated is a sum, a count or a max, so
batches can be processed in any order, shards merged, and ranks all-reduced with SUM/MAX,
and the result is the same as one pass over the whole probe set. Token-space sums are kept
in float64 because explained variance subtracts two large numbers (Σ‖x‖² − ‖Σx‖²/n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F

from . import metrics as M
from .config import MetricSettings
from .records import ALL, PROJECTION, PROJECTION_DELTA, REFUSAL_BASE, FeatureStats, HookResult, RefusalFeatures


@dataclass
class PairedBatch:
    """What the base model left at one batch's selected tokens, for paired metrics."""

    x: torch.Tensor  # [n, d] base activations (model dtype)
    top_idx: torch.Tensor  # [n, K] int32, base codes' top indices, largest first
    l0: torch.Tensor  # [n] int32, base L0 per token
    #: [n_selected] bool: which of the batch's selected tokens the base kept (not massive-norm)
    keep: torch.Tensor | None = None
    limit: float = math.inf  # the base's massive-norm limit for this batch
    refusal_keep: torch.Tensor | None = None  # which of the batch's refusal tokens the base kept


_SUM_FIELDS = ("n", "l0_sum", "sq_err_sum", "x_sum", "x_sq_sum", "cos_sum", "nonfinite",
               "fire_count", "act_sum", "pair_sq_diff", "pair_cos_sum", "jaccard_sum", "n_paired",
               "excluded", "outliers", "overlap_sum", "fvu_tok_sum")
_MAX_FIELDS = ("act_max",)


@dataclass
class HookStats:
    """Per-category sums for one hook. C categories, d model width, d_sae features."""

    categories: list[str]
    d: int
    d_sae: int
    device: torch.device | str = "cpu"
    n: torch.Tensor = field(init=False)  # [C] tokens
    l0_sum: torch.Tensor = field(init=False)  # [C] Σ L0_t
    sq_err_sum: torch.Tensor = field(init=False)  # [C] Σ ‖x − x̂‖²
    x_sum: torch.Tensor = field(init=False)  # [C, d] Σ x
    x_sq_sum: torch.Tensor = field(init=False)  # [C] Σ ‖x‖²
    cos_sum: torch.Tensor = field(init=False)  # [C] Σ cos(x, x̂)
    nonfinite: torch.Tensor = field(init=False)  # [C] tokens dropped for NaN/inf activations
    fire_count: torch.Tensor = field(init=False)  # [C, d_sae] Σ 1[f > 0]
    act_sum: torch.Tensor = field(init=False)  # [C, d_sae] Σ f
    act_max: torch.Tensor = field(init=False)  # [C, d_sae] max f (−inf before any token)
    pair_sq_diff: torch.Tensor = field(init=False)  # [C] Σ ‖x − x⁰‖²
    pair_cos_sum: torch.Tensor = field(init=False)  # [C] Σ cos(x, x⁰)
    jaccard_sum: torch.Tensor = field(init=False)  # [C] Σ top-k Jaccard
    n_paired: torch.Tensor = field(init=False)  # [C] tokens with a base pair
    excluded: torch.Tensor = field(init=False)  # [C] selected tokens excluded as massive-norm (the base's)
    outliers: torch.Tensor = field(init=False)  # [C] kept tokens above the base's massive-norm limit
    overlap_sum: torch.Tensor = field(init=False)  # [C] Σ |K ∩ K⁰| / k (the paper's overlap)
    fvu_tok_sum: torch.Tensor = field(init=False)  # [C] Σ per-token FVU ‖x − x̂‖² / ‖x − mean_d x‖²

    def __post_init__(self) -> None:
        C, dev = len(self.categories), self.device
        f64 = dict(dtype=torch.float64, device=dev)
        for name in ("n", "l0_sum", "sq_err_sum", "x_sq_sum", "cos_sum", "nonfinite",
                     "pair_sq_diff", "pair_cos_sum", "jaccard_sum", "n_paired", "excluded", "outliers",
                     "overlap_sum", "fvu_tok_sum"):
            setattr(self, name, torch.zeros(C, **f64))
        self.x_sum = torch.zeros(C, self.d, **f64)
        self.fire_count = torch.zeros(C, self.d_sae, **f64)
        self.act_sum = torch.zeros(C, self.d_sae, **f64)
        self.act_max = torch.full((C, self.d_sae), -math.inf, dtype=torch.float32, device=dev)

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def count_tokens(self, excluded_cat: torch.Tensor, cat: torch.Tensor, x: torch.Tensor,
                     limit: float | None) -> None:
        """Count the tokens excluded as massive-norm (``excluded_cat``: their categories), and,
        given the base's ``limit``, the kept tokens of this model that exceed it."""
        if excluded_cat.numel():
            self.excluded.index_add_(0, excluded_cat, torch.ones_like(excluded_cat, dtype=torch.float64))
        if limit is not None and math.isfinite(limit) and x.shape[0]:
            over = x.float().norm(dim=-1) > limit
            if bool(over.any()):
                self.outliers.index_add_(0, cat[over], torch.ones_like(cat[over], dtype=torch.float64))

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        codes: torch.Tensor,
        cat: torch.Tensor,
        pair: PairedBatch | None = None,
        k_max: int = 100,
        top_idx: torch.Tensor | None = None,
        top_vals: torch.Tensor | None = None,
        l0: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of selected tokens: x, x̂ [n, d], codes [n, d_sae], cat [n] (long).

        ``top_idx``/``top_vals`` are each row's largest codes, largest first (any width; the
        Jaccard uses the first ``k_max``). Give ``top_vals`` only when they hold every firing
        feature: the feature statistics are then accumulated from those n·k entries instead of
        all n·d_sae codes. ``l0`` (firing features per row) may be passed if already known.
        """
        C = len(self.categories)
        finite = torch.isfinite(x).all(-1)
        if not bool(finite.all()):
            self.nonfinite.index_add_(0, cat[~finite], torch.ones_like(cat[~finite], dtype=torch.float64))
            x, x_hat, codes, cat = x[finite], x_hat[finite], codes[finite], cat[finite]
            if top_idx is not None:
                top_idx = top_idx[finite]
            if top_vals is not None:
                top_vals = top_vals[finite]
            if l0 is not None:
                l0 = l0[finite]
            if pair is not None:
                pair = PairedBatch(pair.x[finite], pair.top_idx[finite], pair.l0[finite], None, pair.limit)
        if x.shape[0] == 0:
            return
        x64 = x.double()
        one64 = F.one_hot(cat, C).T.double()  # [C, n]: per-category sums as small matmuls
        self.n += one64.sum(1)
        self.x_sum += one64 @ x64
        self.x_sq_sum += one64 @ (x64 * x64).sum(1)
        err = x64 - x_hat.double()
        sq_err = (err * err).sum(1)
        self.sq_err_sum += one64 @ sq_err
        self.fvu_tok_sum += one64 @ M.fvu_token_rows(sq_err, x64)
        self.cos_sum += one64 @ M.cosine_rows(x, x_hat)

        if top_vals is not None and top_idx is not None:
            row_l0 = self._update_features_sparse(top_vals, top_idx, cat)
        else:
            row_l0 = self._update_features_dense(codes, cat, one64)
        l0 = row_l0 if l0 is None else l0
        self.l0_sum += one64 @ l0.double()

        if pair is not None:
            x0 = pair.x.double()
            d0 = x64 - x0
            self.pair_sq_diff += one64 @ (d0 * d0).sum(1)
            self.pair_cos_sum += one64 @ M.cosine_rows(x, pair.x)
            top_k = M.topk_indices(codes, k_max) if top_idx is None else top_idx[:, :k_max]
            jac, overlap = M.topk_jaccard_rows(top_k, l0, pair.top_idx[:, :k_max], pair.l0.to(l0.device), k_max,
                                               d_sae=self.d_sae, with_overlap=True)
            self.jaccard_sum += one64 @ jac
            self.overlap_sum += one64 @ overlap
            self.n_paired += one64.sum(1)

    def _update_features_dense(self, codes: torch.Tensor, cat: torch.Tensor, one64: torch.Tensor) -> torch.Tensor:
        """Per-category firing counts, sums and maxes from all codes: matmuls with the one-hot."""
        active = codes > 0
        one32 = one64.to(codes.dtype)
        self.fire_count += (one32 @ active.to(codes.dtype)).double()
        self.act_sum += (one32 @ codes).double()
        for c in torch.unique(cat).tolist():  # a loop over categories (a handful), never tokens
            self.act_max[c] = torch.maximum(self.act_max[c], codes[cat == c].amax(0).float())
        return active.sum(1)

    def _update_features_sparse(self, vals: torch.Tensor, idx: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """The same from the top-k entries only: scatter-adds on flat (category, feature) ids.

        Exact when the top-k holds every firing feature: codes outside it are 0, which adds
        nothing to counts or sums, and a max of 0 is what compute() reports for a feature
        that never fired in a category.
        """
        flat = (cat[:, None] * self.d_sae + idx.long()).reshape(-1)
        v = vals.reshape(-1)
        firing = v > 0
        self.fire_count.view(-1).index_add_(0, flat, firing.double())
        self.act_sum.view(-1).index_add_(0, flat, v.double())
        self.act_max.view(-1).scatter_reduce_(0, flat, v.float(), reduce="amax")
        return firing.view(vals.shape).sum(1)

    def merge(self, other: "HookStats") -> "HookStats":
        """Fold another shard's sums into this one (same categories and sizes)."""
        if other.categories != self.categories or other.d_sae != self.d_sae or other.d != self.d:
            raise ValueError("cannot merge statistics of different hooks or category sets")
        for name in _SUM_FIELDS:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        self.act_max = torch.maximum(self.act_max, other.act_max.to(self.device))
        return self

    def all_reduce(self, group: object | None = None) -> "HookStats":
        """SUM the sums and MAX the maxes over a torch.distributed group (one collective each)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        flat = torch.cat([getattr(self, n).reshape(-1) for n in _SUM_FIELDS])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for n in _SUM_FIELDS:
            t = getattr(self, n)
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        dist.all_reduce(self.act_max, op=dist.ReduceOp.MAX, group=group)
        return self

    # ------------------------------------------------------------------ persistence (baseline cache)
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n).cpu() for n in _SUM_FIELDS + _MAX_FIELDS}

    @classmethod
    def from_state_dict(cls, categories: list[str], d: int, d_sae: int, state: dict[str, torch.Tensor],
                        device: torch.device | str = "cpu") -> "HookStats":
        st = cls(categories, d, d_sae, device)
        for n in _SUM_FIELDS + _MAX_FIELDS:
            getattr(st, n).copy_(state[n])
        return st

    # ------------------------------------------------------------------ results
    def _category_feature_stats(self, base: "HookStats", c: int | None) -> FeatureStats:
        sel = (lambda t: t.sum(0)) if c is None else (lambda t: t[c])
        n = float(sel(self.n))
        n0 = float(sel(base.n))
        count, count0 = sel(self.fire_count), sel(base.fire_count)
        density = count / max(n, 1.0)
        density0 = count0 / max(n0, 1.0)
        mean_act = sel(self.act_sum) / max(n, 1.0)
        mean_act0 = sel(base.act_sum) / max(n0, 1.0)
        mx = self.act_max.amax(0) if c is None else self.act_max[c]
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)).double()
        ldr = M.log_density_ratio(density, density0, n)
        name = ALL if c is None else self.categories[c]
        np_ = lambda t: t.cpu().numpy()  # noqa: E731
        return FeatureStats(name, int(n), np_(count), np_(count0), np_(density), np_(mean_act), np_(mx),
                            np_(mean_act - mean_act0), np_(ldr))

    def compute(self, base: "HookStats", hook: str, settings: MetricSettings,
                directions: Mapping[str, torch.Tensor] | None = None,
                refusal: tuple["HookStats", "HookStats"] | None = None) -> HookResult:
        """The metrics of this (current) model against ``base`` (the base model's stats).

        ``directions`` ({name: [d] vector}, see ``drift_monitor.directions``) adds the mean
        projection of each category onto each direction, from the sums already kept.
        ``refusal`` (current, base): statistics of the refusal tokens (by default a refusal
        teacher-forced after each harmful/harmless probe), where refusal features are scored;
        without it they are scored on the categories' selected tokens.
        """
        s = settings
        n = self.n.sum()
        base_ev = M.explained_variance(base.sq_err_sum.sum(), base.x_sq_sum.sum(), base.x_sum.sum(0), base.n.sum())
        ev = M.explained_variance(self.sq_err_sum.sum(), self.x_sq_sum.sum(), self.x_sum.sum(0), n)
        n_f = float(n)
        count = self.fire_count.sum(0)
        base_count = base.fire_count.sum(0)
        density = count / max(n_f, 1.0)
        base_density = base_count / max(float(base.n.sum()), 1.0)
        ldr = M.log_density_ratio(density, base_density, n_f)
        n_pair = float(self.n_paired.sum())
        nan = math.nan
        metrics: dict[str, float] = {
            "n_tokens": n_f,
            "l0": float(self.l0_sum.sum()) / n_f if n_f else nan,
            "mse": float(self.sq_err_sum.sum()) / (n_f * self.d) if n_f else nan,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "cosine": float(self.cos_sum.sum()) / n_f if n_f else nan,
            "dead_fraction": float((count == 0).double().mean()),
            "dense_fraction": float((density > s.dense_density).double().mean()),
            "base_explained_variance": base_ev,
            "explained_variance_delta": ev - base_ev,
            "act_relative_mse": (float(self.pair_sq_diff.sum()) /
                                 M.centered_ss(base.x_sq_sum.sum(), base.x_sum.sum(0), base.n.sum())) if n_pair else nan,
            "act_cosine": float(self.pair_cos_sum.sum()) / n_pair if n_pair else nan,
            "topk_jaccard": float(self.jaccard_sum.sum()) / n_pair if n_pair else nan,
            "topk_overlap": float(self.overlap_sum.sum()) / n_pair if n_pair else nan,
            "fvu_token_mean": float(self.fvu_tok_sum.sum()) / n_f if n_f else nan,
            "n_excluded_tokens": float(self.excluded.sum()),
            "n_outlier_tokens": float(self.outliers.sum()),
            "features_drifted_ratio": M.features_drifted_ratio(count, base_count, ldr, s.drift_ratio,
                                                              s.drift_min_firings),
            "density_js": M.js_distance(density, base_density),
            "density_spearman": M.spearman(density, base_density),
            "nonfinite_fraction": float(self.nonfinite.sum()) / max(n_f + float(self.nonfinite.sum()), 1.0),
        }
        features = {ALL: self._category_feature_stats(base, None)}
        for c, name in enumerate(self.categories):
            features[name] = self._category_feature_stats(base, c)
        scores = None
        cats = self.categories
        if s.harmful_category in cats and s.harmless_category in cats:
            scores = self._refusal(base, base_density, metrics, s, refusal or (self, base))
        self._direction_metrics(base, directions or {}, metrics, s)
        return HookResult(hook=hook, d_sae=self.d_sae, metrics=metrics, features=features, refusal=scores)

    def _refusal(self, base: "HookStats", base_density: torch.Tensor, metrics: dict[str, float],
                 s: MetricSettings, tokens: tuple["HookStats", "HookStats"]) -> RefusalFeatures:
        """Refusal scores (docs/metrics.md, "Refusal features"): each feature's harmful drift (minus
        its harmless drift with ``refusal_contrast``) at the refusal tokens, in units of the
        feature's own firing strength; and the refusal direction there."""
        cur, cur0 = tokens
        h = self.categories.index(s.harmful_category)
        hl = self.categories.index(s.harmless_category)
        hd = M.mean_drift(cur.act_sum[h], cur.n[h], cur0.act_sum[h], cur0.n[h]).cpu()
        hld = M.mean_drift(cur.act_sum[hl], cur.n[hl], cur0.act_sum[hl], cur0.n[hl]).cpu()
        contrast = hld if s.refusal_contrast else torch.zeros_like(hld)
        # a feature's typical strength over everything the base read (selected + refusal tokens)
        base_act, base_cnt = base.act_sum.sum(0), base.fire_count.sum(0)
        if cur0 is not base:
            base_act, base_cnt = base_act + cur0.act_sum.sum(0), base_cnt + cur0.fire_count.sum(0)
        scale = M.firing_scale([(base_act, base_cnt), (self.act_sum.sum(0), self.fire_count.sum(0)),
                                (cur.act_sum.sum(0), cur.fire_count.sum(0))]).cpu()
        score = M.refusal_scores(hd, contrast, scale, base_density.cpu(), s.refusal_max_base_density)
        fold = M.refusal_fold(cur.act_sum[h] / max(float(cur.n[h]), 1.0), cur0.act_sum[h] / max(float(cur0.n[h]), 1.0),
                              scale).cpu()
        z = M.robust_z(score)
        emerging = M.emerging_features(score, z, s.refusal_top_k, s.refusal_z_threshold,
                                       min_score=s.refusal_min_rel_score, fold=fold, min_fold=s.refusal_min_fold)
        metrics["refusal_score_floor"] = s.refusal_min_rel_score
        finite = score[torch.isfinite(score)]
        metrics["max_refusal_score"] = float(finite.max()) if finite.numel() else math.nan
        metrics["n_emerging_refusal_features"] = float(len(emerging))

        r = M.difference_of_means(cur.x_sum, cur.n, h, hl)
        metrics["refusal_direction_cosine"] = M.direction_cosine(r, M.difference_of_means(cur0.x_sum, cur0.n, h, hl))
        metrics["refusal_direction_norm"] = float(r.norm())
        return RefusalFeatures(hd.numpy(), hld.numpy(), score.numpy(), z.numpy(), emerging)

    def _direction_metrics(self, base: "HookStats", directions: Mapping[str, torch.Tensor],
                           metrics: dict[str, float], s: MetricSettings) -> None:
        """``direction_projection:<name>:<category>`` (and ``..._delta:``, current − base) for
        each user direction and for the base refusal direction r̂⁰ (``refusal_base``), the
        standard way to watch refusal strengthen (Arditi et al.). One matmul per model."""
        names = list(directions)
        vecs = [directions[k].to(self.x_sum.device, torch.float64) for k in names]
        cats = self.categories
        if s.harmful_category in cats and s.harmless_category in cats:
            h, hl = cats.index(s.harmful_category), cats.index(s.harmless_category)
            r0 = M.difference_of_means(base.x_sum, base.n, h, hl)
            if float(base.n[h]) > 0 and float(base.n[hl]) > 0 and float(r0.norm()) > 0:
                names.append(REFUSAL_BASE)
                vecs.append(r0)
        if not names:
            return
        V = torch.stack(vecs)

        def proj(st: HookStats) -> torch.Tensor:  # [D, C + 1]: the categories, then "all"
            sums = torch.cat([st.x_sum, st.x_sum.sum(0, keepdim=True)])
            return M.mean_projections(sums, torch.cat([st.n, st.n.sum(0, keepdim=True)]), V)

        cur = proj(self)
        delta = (cur - proj(base)).tolist()
        cur_l = cur.tolist()
        for i, name in enumerate(names):
            for j, cat in enumerate(cats + [ALL]):
                metrics[f"{PROJECTION}:{name}:{cat}"] = cur_l[i][j]
                metrics[f"{PROJECTION_DELTA}:{name}:{cat}"] = delta[i][j]
