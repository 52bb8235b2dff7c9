"""Plain records passed between the engine, the store, the exporters and the dashboard.

Why a separate module: the store and the exporters must never import models, SAEs or the
monitor (DESIGN.md §3: they take plain records). Everything here is NumPy/pandas and stdlib,
so `store.py` can be used by a dashboard process that never imports torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

#: Per-feature columns of a category's feature table, in store order.
FEATURE_COLUMNS = ("density", "mean_act", "max_act", "drift", "log_density_ratio")

#: Columns of the refusal-feature table.
REFUSAL_COLUMNS = ("harmful_drift", "harmless_drift", "refusal_score", "z_score")

#: Sort keys accepted by :meth:`Snapshot.top_features`.
TopBy = Literal["drift", "abs_drift", "refusal_score", "log_density_ratio", "abs_log_density_ratio"]

ALL = "all"  # the pseudo-category that aggregates every probe token


@dataclass
class FeatureStats:
    """Per-feature statistics of one hook at one step, for one category (or ``"all"``).

    Arrays are 1-D NumPy arrays of length ``d_sae``. ``count`` and ``base_count`` are the
    raw firing counts (so the store can drop features that never fired in either model).
    """

    category: str
    n_tokens: int
    count: np.ndarray
    base_count: np.ndarray
    density: np.ndarray
    mean_act: np.ndarray
    max_act: np.ndarray
    drift: np.ndarray
    log_density_ratio: np.ndarray


@dataclass
class RefusalFeatures:
    """Refusal scores of every feature at one hook (DESIGN.md §5, refusal features).

    ``refusal_score`` is NaN for features excluded from the ranking (base density ≥ the
    dense cut-off). ``emerging`` holds the feature ids flagged as emerging refusal features,
    best first.
    """

    harmful_drift: np.ndarray
    harmless_drift: np.ndarray
    refusal_score: np.ndarray
    z_score: np.ndarray
    emerging: list[int] = field(default_factory=list)


@dataclass
class HookResult:
    """Everything one snapshot measured at one hook."""

    hook: str
    d_sae: int
    metrics: dict[str, float]
    features: dict[str, FeatureStats]  # keyed by category, including "all"
    refusal: RefusalFeatures | None = None


@dataclass
class Snapshot:
    """The result of one probe pass: scalar metrics, per-feature tables, refusal features.

    ``step`` 0 with ``is_base=True`` is the base model's snapshot; its paired metrics are
    the model compared with itself.
    """

    step: int
    hooks: dict[str, HookResult]
    probe_hash: str
    n_tokens: int
    duration_s: float = 0.0
    created_at: float = field(default_factory=time.time)
    is_base: bool = False

    def hook(self, hook: str) -> HookResult:
        try:
            return self.hooks[hook]
        except KeyError:
            raise KeyError(f"snapshot has no hook {hook!r}; hooks: {sorted(self.hooks)}") from None

    def metric(self, hook: str, name: str) -> float:
        """A scalar metric of DESIGN.md §5 (e.g. ``explained_variance``) at ``hook``."""
        metrics = self.hook(hook).metrics
        if name not in metrics:
            raise KeyError(f"unknown metric {name!r}; known: {sorted(metrics)}")
        return metrics[name]

    def top_features(self, hook: str, by: TopBy = "drift", k: int = 20, category: str = ALL) -> list[int]:
        """Feature ids ranked by ``by`` (largest first), NaN scores last and dropped."""
        h = self.hook(hook)
        if by == "refusal_score":
            if h.refusal is None:
                raise ValueError("this snapshot has no refusal scores (needs harmful and harmless probes)")
            score = h.refusal.refusal_score
        else:
            stats = h.features[category]
            if by == "drift":
                score = stats.drift
            elif by == "abs_drift":
                score = np.abs(stats.drift)
            elif by == "log_density_ratio":
                score = stats.log_density_ratio
            elif by == "abs_log_density_ratio":
                score = np.abs(stats.log_density_ratio)
            else:
                raise ValueError(f"unknown ranking {by!r}; use one of {TopBy.__args__}")  # type: ignore[attr-defined]
        score = np.where(np.isnan(score), -np.inf, score)
        k = min(k, int(np.isfinite(score).sum()))
        if k <= 0:
            return []
        idx = np.argpartition(-score, k - 1)[:k]
        return [int(i) for i in idx[np.argsort(-score[idx], kind="stable")]]

    def feature_table(self, hook: str, category: str | None = None, alive_only: bool = False):
        """Per-feature columns as a pandas DataFrame (one row per feature and category).

        ``alive_only`` drops features that fired in neither model for that category.
        """
        import pandas as pd

        h = self.hook(hook)
        frames = []
        cats = [category] if category is not None else list(h.features)
        for cat in cats:
            s = h.features[cat]
            df = pd.DataFrame(
                {
                    "category": cat,
                    "feature": np.arange(h.d_sae, dtype=np.int64),
                    "density": s.density,
                    "mean_act": s.mean_act,
                    "max_act": s.max_act,
                    "drift": s.drift,
                    "log_density_ratio": s.log_density_ratio,
                    "count": s.count,
                    "base_count": s.base_count,
                }
            )
            if alive_only:
                df = df[(s.count > 0) | (s.base_count > 0)]
            frames.append(df)
        out = pd.concat(frames, ignore_index=True)
        if h.refusal is not None and (category is None or category == ALL):
            ref = pd.DataFrame(
                {
                    "feature": np.arange(h.d_sae, dtype=np.int64),
                    "harmful_drift": h.refusal.harmful_drift,
                    "harmless_drift": h.refusal.harmless_drift,
                    "refusal_score": h.refusal.refusal_score,
                }
            )
            out = out.merge(ref, on="feature", how="left")
        return out

    def scalars(self) -> dict[tuple[str, str], float]:
        """All scalar metrics as {(hook, name): value}: what trackers and Prometheus get."""
        return {(h, n): v for h, r in self.hooks.items() for n, v in r.metrics.items()}


Severity = Literal["info", "warning", "critical"]


@dataclass
class Alert:
    """One alert raised (or resolved) by a rule at a step. Built by ``alerts.py``."""

    rule: str
    severity: Severity
    step: int
    hook: str
    message: str
    value: float = math.nan
    threshold: float = math.nan
    status: Literal["active", "resolved"] = "active"
    created_at: float = field(default_factory=time.time)
