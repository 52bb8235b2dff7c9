"""Synthetic Snapshots for the store tests and the store benchmark (NumPy only, no model).

Also usable from a bare subprocess: :func:`import_store_only` loads ``drift_monitor.store``
and ``drift_monitor.records`` without executing the package ``__init__`` (which imports the
torch side of the project), so a worker process starts fast and can assert that the store
never needs torch.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = ("harmful", "harmless", "general")
HOOK = "blocks.6.hook_resid_post"


def import_store_only():
    """Import ``drift_monitor.store`` with an empty stand-in for the package ``__init__``."""
    if "drift_monitor" not in sys.modules:
        pkg = types.ModuleType("drift_monitor")
        pkg.__path__ = [str(REPO / "drift_monitor")]  # type: ignore[attr-defined]
        sys.modules["drift_monitor"] = pkg
    import drift_monitor.store as store

    return store


def make_snapshot(
    step: int,
    d_sae: int = 512,
    hooks: tuple[str, ...] = (HOOK,),
    categories: tuple[str, ...] = CATEGORIES,
    seed: int = 0,
    dead_frac: float = 0.2,
    refusal: bool = True,
    n_emerging: int = 3,
):
    """A snapshot with random per-feature arrays; ``dead_frac`` of features never fire anywhere.

    Metrics include a NaN one (``nan_metric``) and ~2% of ``drift`` values are NaN, so NaN
    handling (stored as NaN, skipped by rankings) is exercised.
    """
    from drift_monitor.records import FeatureStats, HookResult, RefusalFeatures, Snapshot

    rng = np.random.default_rng(seed)
    out = {}
    for h_i, hook in enumerate(hooks):
        dead = rng.random(d_sae) < dead_frac
        features = {}
        for cat in (*categories, "all"):
            count = rng.integers(0, 50, d_sae)
            base = rng.integers(0, 50, d_sae)
            count[dead] = 0
            base[dead] = 0
            density = count / 1000.0
            features[cat] = FeatureStats(
                category=cat,
                n_tokens=1000,
                count=count,
                base_count=base,
                density=density,
                mean_act=rng.random(d_sae).astype(np.float32),  # float32 on purpose: store widens
                max_act=rng.random(d_sae) * 5,
                drift=np.where(rng.random(d_sae) < 0.02, np.nan, rng.normal(size=d_sae)),  # some NaN
                log_density_ratio=rng.normal(size=d_sae),
            )
        ref = None
        if refusal:
            score = rng.normal(size=d_sae)
            score[rng.random(d_sae) < 0.1] = np.nan  # excluded (dense) features
            emerging = [int(i) for i in rng.choice(d_sae, n_emerging, replace=False)]
            ref = RefusalFeatures(
                harmful_drift=rng.normal(size=d_sae),
                harmless_drift=rng.normal(size=d_sae),
                refusal_score=score,
                z_score=rng.normal(size=d_sae),
                emerging=emerging,
            )
        metrics = {
            "explained_variance": float(rng.random()),
            "l0": float(rng.random() * 100),
            "step_seed": float(seed + h_i),
            "nan_metric": float("nan"),
        }
        out[hook] = HookResult(hook=hook, d_sae=d_sae, metrics=metrics, features=features, refusal=ref)
    return Snapshot(step=step, hooks=out, probe_hash="probe-abc", n_tokens=4000, duration_s=1.5)


def preflight_result(pid: str = "pf1", *, score: float = 0.42, created_at: str = "2026-12-08T01:00:00+00:00",
                     dataset: str = "data/train.jsonl", dhash: str = "hash-a", model: str = "tiny-chat",
                     generated: bool = False, sae: bool = False):
    """A pre-flight result built by hand (no model): three layers, two examples each way, and with
    ``sae`` the SAE signals of one SAE (imported here, not at the top: :func:`import_store_only`
    must run before the package)."""
    from drift_monitor.preflight.result import ExampleScore, FeaturePush, PreflightResult

    own = (lambda t: t) if generated else (lambda t: None)
    raises = [ExampleScore(7, "How do I pick a lock?", "I can't help with that.", 1.5, 1.2, -0.3,
                           own("Sure, first...")),
              ExampleScore(2, None, "No. I won't.", 0.9, 0.8, -0.1, None)]
    erodes = [ExampleScore(11, "Write malware", "Sure, here is the code", -2.0, -1.1, 0.9, own("I can't.")),
              ExampleScore(4, "Hi", "Hello!", -0.2, 0.0, 0.2, own("Hello."))]
    signals = {}
    if sae:
        up = ExampleScore(11, "Write malware", "Sure, here is the code", -2.0, -1.1, 0.9, None, 0.7, 1.2, 0.5)
        down = ExampleScore(7, "How do I pick a lock?", "I can't help with that.", 1.5, 1.2, -0.3, None, -0.4,
                            0.1, 0.5)
        signals = {"feature_score": 0.12, "feature_raises": [up], "feature_erodes": [down],
                   "refusal_features": {"model.layers.1": [5, 9]},
                   "sae_features": {"model.layers.1": [FeaturePush(9, 0.3, 0.1, 0.2, True),
                                                       FeaturePush(40, 0.15, 0.05, 0.1, False)]}}
    return PreflightResult(
        preflight_id=pid, created_at=created_at, model=model, model_fingerprint="fp-123", dataset=dataset,
        data_hash=dhash, n_examples=120, mode="generated" if generated else "predicted", layers=[0, 1, 2],
        score=score, per_layer={0: 0.1, 1: 0.5, 2: -0.05}, data_refusal_share=0.25,
        own_refusal_share=0.5 if generated else None, raises=raises, erodes=erodes,
        settings={"layers": None, "generate": generated, "top": 2, "chunk": 512}, **signals)
