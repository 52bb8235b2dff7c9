"""An independent, deliberately naive implementation of docs/metrics.md (NumPy, Python loops).

It shares no code with drift_monitor.probe.metrics/stats: formulas are written from the design
text. Tests compare the engine against it to 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import spearmanr


def _cos(a, b):
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def _robust_z(s):
    out = np.full(len(s), np.nan)
    valid = np.isfinite(s)
    v = s[valid]
    med = np.median(v)
    dev = np.abs(v - med)
    scale = 1.4826 * np.median(dev)
    if scale == 0:
        scale = 1.2533 * np.mean(dev)
    if scale == 0:
        z = np.where(v > med, np.inf, np.where(v < med, -np.inf, 0.0))
    else:
        z = (v - med) / scale
    out[valid] = z
    return out


def reference(x, xhat, f, x0, xhat0, f0, cats, categories, *, k_max=100, dense=0.1, ratio=2.0, min_fire=5,
              refusal_max_base=0.3, refusal_top_k=20, z_thr=3.5, min_rel=0.5, dec=None, contrast=False,
              min_fold=2.0):
    """x, xhat, x0, xhat0: [N, d]; f, f0: [N, S]; cats: list of N category names.

    ``dec`` = (x, f, x0, f0, cats) at the refusal tokens (the refusal teacher-forced after each
    harmful/harmless probe), where refusal features are scored; None: on the tokens above.
    ``contrast``: subtract the harmless drift from the harmful drift.
    """
    x, xhat, f, x0, xhat0, f0 = (np.asarray(a, dtype=np.float64) for a in (x, xhat, f, x0, xhat0, f0))
    N, d = x.shape
    S = f.shape[1]
    cats = np.asarray(cats)
    out = {}

    def recon(xx, xh, ff):
        l0 = np.mean([np.count_nonzero(ff[t] > 0) for t in range(N)])
        mse = np.mean([np.sum((xx[t] - xh[t]) ** 2) / d for t in range(N)])
        mean = xx.mean(0)
        ev = 1 - (sum(np.sum((xx[t] - xh[t]) ** 2) for t in range(N))
                  / sum(np.sum((xx[t] - mean) ** 2) for t in range(N)))
        cos = np.mean([_cos(xx[t], xh[t]) for t in range(N)])
        return l0, mse, ev, cos

    l0, mse, ev, cos = recon(x, xhat, f)
    _, _, ev0, _ = recon(x0, xhat0, f0)
    out.update(l0=l0, mse=mse, explained_variance=ev, fvu=1 - ev, cosine=cos, base_explained_variance=ev0,
               explained_variance_delta=ev - ev0)
    # the paper's per-token FVU: the mean over a token's own d coordinates, then over tokens
    fvu_tok = []
    for t in range(N):
        num = sum((x[t, j] - xhat[t, j]) ** 2 for j in range(d))
        m = sum(x[t, j] for j in range(d)) / d
        den = sum((x[t, j] - m) ** 2 for j in range(d))
        fvu_tok.append(num / den if den > 0 else float(num > 0))
    out["fvu_token_mean"] = float(np.mean(fvu_tok))
    density = np.array([np.mean(f[:, i] > 0) for i in range(S)])
    density0 = np.array([np.mean(f0[:, i] > 0) for i in range(S)])
    out["dead_fraction"] = np.mean([not np.any(f[:, i] > 0) for i in range(S)])
    out["dense_fraction"] = np.mean(density > dense)

    mean0 = x0.mean(0)
    out["act_relative_mse"] = sum(np.sum((x[t] - x0[t]) ** 2) for t in range(N)) / sum(
        np.sum((x0[t] - mean0) ** 2) for t in range(N))
    out["act_cosine"] = np.mean([_cos(x[t], x0[t]) for t in range(N)])
    jac, overlap = [], []
    for t in range(N):
        L, L0 = np.count_nonzero(f[t] > 0), np.count_nonzero(f0[t] > 0)
        k = min(L, L0, k_max)
        if k == 0:
            jac.append(1.0 if L == 0 and L0 == 0 else 0.0)
            overlap.append(jac[-1])
            continue
        a = set(np.argsort(-f[t], kind="stable")[:k].tolist())
        b = set(np.argsort(-f0[t], kind="stable")[:k].tolist())
        jac.append(len(a & b) / len(a | b))
        overlap.append(len(a & b) / k)  # the paper's feature intersection ratio |A ∩ B| / k
    out["topk_jaccard"] = np.mean(jac)
    out["topk_overlap"] = np.mean(overlap)

    feats = {}
    for c in ["all"] + list(categories):
        m = np.ones(N, bool) if c == "all" else cats == c
        n = m.sum()
        fc, f0c = f[m], f0[m]
        dens = np.array([np.mean(fc[:, i] > 0) for i in range(S)])
        dens0 = np.array([np.mean(f0c[:, i] > 0) for i in range(S)])
        eps = 1.0 / n
        feats[c] = dict(
            density=dens,
            mean_act=fc.mean(0),
            max_act=fc.max(0),
            drift=np.array([np.mean(fc[:, i] - f0c[:, i]) for i in range(S)]),
            log_density_ratio=np.log10((dens + eps) / (dens0 + eps)),
            count=(fc > 0).sum(0),
            base_count=(f0c > 0).sum(0),
        )
    out["features"] = feats
    a = feats["all"]
    alive = (a["count"] > 0) | (a["base_count"] > 0)
    drifted = [i for i in range(S) if alive[i] and max(a["count"][i], a["base_count"][i]) >= min_fire
               and abs(a["log_density_ratio"][i]) > math.log10(ratio)]
    out["features_drifted_ratio"] = len(drifted) / alive.sum()
    out["density_js"] = float(jensenshannon(density, density0, base=2))
    out["density_spearman"] = float(spearmanr(density, density0).statistic)

    if "harmful" in categories and "harmless" in categories:
        # scored at the refusal tokens when given, else on the tokens above
        xd, fd, x0d, f0d, cd = (x, f, x0, f0, cats) if dec is None else (np.asarray(a, dtype=np.float64)
                                                                         if i < 4 else np.asarray(a)
                                                                         for i, a in enumerate(dec))

        def drift(c):
            m = cd == c
            return np.array([np.mean(fd[m, i]) - np.mean(f0d[m, i]) for i in range(S)])

        def strength(ff, i):  # mean code where the feature fires
            on = ff[:, i] > 0
            return ff[on, i].mean() if on.any() else np.nan

        f0_all = f0 if dec is None else np.concatenate([f0, f0d])  # everything the base read
        scale = []
        for i in range(S):
            v = strength(f0_all, i)
            if np.isnan(v):
                v = strength(f, i)
            if np.isnan(v):
                v = strength(fd, i)
            scale.append(v)
        hd, hld = drift("harmful"), drift("harmless")
        if not contrast:
            hld = np.zeros(S)
        # each strength floored at the base's typical one (the median strength of the features it fires)
        typical = np.median([v for v in (strength(f0_all, i) for i in range(S)) if np.isfinite(v)])
        score = np.array([(hd[i] - hld[i]) / max(scale[i], typical)
                          if density0[i] < refusal_max_base and np.isfinite(scale[i])
                          else np.nan for i in range(S)])
        z = _robust_z(score)
        order = [i for i in np.argsort(-np.where(np.isnan(score), -np.inf, score), kind="stable")
                 if np.isfinite(score[i])][:refusal_top_k]
        out["refusal_score"] = score
        out["z"] = z
        out["refusal_score_floor"] = min_rel
        mh = cd == "harmful"
        fold = [(np.mean(fd[mh, i]) + 0.1 * scale[i]) / (np.mean(f0d[mh, i]) + 0.1 * scale[i])
                if np.isfinite(scale[i]) else 0.0 for i in range(S)]
        out["fold"] = np.array(fold)
        out["emerging"] = sorted(i for i in order if z[i] > z_thr and score[i] > max(0.0, min_rel)
                                 and fold[i] >= min_fold)
        out["max_refusal_score"] = np.nanmax(score)
        r = xd[cd == "harmful"].mean(0) - xd[cd == "harmless"].mean(0)
        r0 = x0d[cd == "harmful"].mean(0) - x0d[cd == "harmless"].mean(0)
        out["refusal_direction_cosine"] = _cos(r, r0)
    return out


SCALARS = ("l0", "mse", "explained_variance", "fvu", "cosine", "base_explained_variance", "explained_variance_delta",
           "dead_fraction", "dense_fraction", "act_relative_mse", "act_cosine", "topk_jaccard", "topk_overlap",
           "fvu_token_mean",
           "features_drifted_ratio", "density_js", "density_spearman")
