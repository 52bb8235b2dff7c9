"""Pure functions of the pre-flight readings (NumPy only): what each example would teach, the
dataset's score, the examples to read first.

The readings are in units of the start model's refusal gap (``engine``): per example and layer,
the data's response (``train``), the prompt's post-instruction tokens (``post``) and the model's
own answer (``own``, measured by generation, or predicted from ``post``, see :func:`predict_own`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OwnModel:
    """Per layer, own-answer projection ≈ ``intercept + slope · post``: fitted on the probe set
    (whose own answers the start model generates once), so that without ``--generate`` each
    example's own answer is predicted from where its prompt sits before the model answers (the
    post-instruction projection, which decides refusal: Arditi et al.)."""

    intercept: np.ndarray  # [L]
    slope: np.ndarray  # [L]

    def predict(self, post: np.ndarray) -> np.ndarray:
        return self.intercept[None, :] + self.slope[None, :] * post


def fit_own_model(post: np.ndarray, own: np.ndarray) -> OwnModel:
    """Least squares per layer over the rows where both are finite (at least two distinct posts)."""
    L = post.shape[1]
    a, b = np.zeros(L), np.zeros(L)
    for j in range(L):
        ok = np.isfinite(post[:, j]) & np.isfinite(own[:, j])
        x, y = post[ok, j], own[ok, j]
        if len(x) >= 2 and np.ptp(x) > 0:
            b[j], a[j] = np.polyfit(x, y, 1)
        elif len(y):
            a[j] = float(np.mean(y))
    return OwnModel(a, b)


def projection_difference(train: np.ndarray, own: np.ndarray) -> np.ndarray:
    """[N, L] what each example would teach on each layer's refusal direction: its response's
    projection minus the model's own answer's (Chen et al.'s "projection difference"). Positive:
    the data refuses more than the model would; negative: less (erosion)."""
    return train - own


def layer_mean(values: np.ndarray, layers: Sequence[int] | None, all_layers: Sequence[int]) -> np.ndarray:
    """[N] the mean over the chosen layers (indices into ``all_layers``' decoder layer numbers)."""
    cols = list(range(len(all_layers))) if layers is None else [list(all_layers).index(i) for i in layers]
    sub = values[:, cols]
    ok = np.isfinite(sub)
    n = ok.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, sub, 0.0).sum(1) / n, np.nan)


def dataset_score(per_example: np.ndarray) -> float:
    """The mean of the finite per-example scores (NaN when none): the dataset's push on refusal."""
    v = per_example[np.isfinite(per_example)]
    return float(v.mean()) if v.size else float("nan")


def top_indices(scores: np.ndarray, k: int, *, largest: bool = True) -> list[int]:
    """Indices of the ``k`` largest (or smallest) finite scores, best first; ties by index."""
    idx = np.flatnonzero(np.isfinite(scores))
    order = np.argsort(-scores[idx] if largest else scores[idx], kind="stable")
    return [int(i) for i in idx[order[:k]]]


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney)."""
    p, n = np.asarray(pos, float), np.asarray(neg, float)
    if not p.size or not n.size:
        return float("nan")
    greater = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
    return float(greater / (p.size * n.size))


def finite_mean(values: np.ndarray) -> float:
    """The mean of the finite values, NaN when none (no warning)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def sae_mean(per_sae: Sequence[np.ndarray], n: int) -> np.ndarray:
    """[n] the mean over SAEs of a per-example feature reading (each [n]), ignoring NaN; NaN
    where no SAE read the example, or where there are no SAEs. Why a mean: one feature score
    per example, whichever layers the SAEs read (with one SAE, its own reading)."""
    if not per_sae:
        return np.full(n, np.nan)
    stack = np.stack([np.asarray(a, float) for a in per_sae])
    ok = np.isfinite(stack)
    k = ok.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, np.where(ok, stack, 0.0).sum(0) / k, np.nan)


def feature_pushes(data_mean: np.ndarray, own_mean: np.ndarray, k: int) -> list[tuple[int, float, float, float]]:
    """The ``k`` features the data's responses push most: (feature, data mean code, own-answer
    mean code, push = data − own), largest positive push first; ties by feature id."""
    push = np.asarray(data_mean, float) - np.asarray(own_mean, float)
    idx = [i for i in top_indices(push, k) if push[i] > 0]
    return [(int(i), float(data_mean[i]), float(own_mean[i]), float(push[i])) for i in idx]
