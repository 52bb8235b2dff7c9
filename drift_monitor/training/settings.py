"""The settings of ``train-sae``, with no torch: the CLI builds its parser (defaults, help) from
them without importing torch, so ``--help`` stays fast and each default has one home."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DriftMonitorError

#: The SAE architectures sae-lens trains here.
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")


class TrainSAEError(DriftMonitorError, ValueError):
    """Bad train-sae input, with the fix in the message (raised by the settings, the collection
    and the training alike; :mod:`.train_sae` re-exports it)."""


@dataclass
class TrainSAESettings:
    """Every knob of ``train-sae``; the defaults fit a ~100M–1B model on a CPU in minutes."""

    hook: str | None = None  # one hook: the same as hooks=[hook]
    architecture: str = "topk"
    d_sae: int | None = None  # None: the power of two nearest 8 × d_in
    k: int | None = None  # TopK/BatchTopK: None -> min(32, max(8, d_sae // 64))
    tokens: int = 200_000  # activations collected (training + held-out)
    train_tokens: int | None = None  # tokens seen in training; None: 8 passes over the training activations
    context_size: int = 128
    batch_size: int = 4096  # tokens per training step
    lr: float = 1e-3
    l1_coefficient: float = 5.0  # standard architecture
    l0_coefficient: float = 1.0  # jumprelu architecture
    chat_fraction: float = 0.2
    holdout_fraction: float = 0.05
    #: A fixed held-out set instead: the first this-many sequences (e.g. to compare SAEs trained
    #: on different budgets on the same held-out text). None: holdout_fraction of those collected.
    holdout_sequences: int | None = None
    outlier_factor: float = 10.0
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # the model's dtype for collection (the SAE trains in float32)
    gen_tokens: int = 48  # without --data: tokens of the model's own answer per probe
    checkpoint_every: int = 50  # training steps between checkpoints
    hooks: Sequence[str] = ()  # several hooks, one collection pass; "a,b" lists are split
    max_memory_gb: float | None = None  # activations of all hooks past this go to disk; None: a quarter of RAM

    def __post_init__(self) -> None:
        hooks = [self.hooks] if isinstance(self.hooks, str) else list(self.hooks)
        if self.hook is not None:
            if hooks and hooks != [self.hook]:
                raise TrainSAEError("give hook (one) or hooks (several), not both")
            hooks = [self.hook]
        hooks = [h.strip() for item in hooks for h in str(item).split(",") if h.strip()]
        if not hooks:
            raise TrainSAEError("no hook given: name the module(s) to train on, e.g. --hook model.layers.15")
        self.hooks = tuple(dict.fromkeys(hooks))
        self.hook = self.hooks[0] if len(self.hooks) == 1 else None
        if self.max_memory_gb is not None and not self.max_memory_gb >= 0:
            raise TrainSAEError(f"max_memory_gb must be >= 0, got {self.max_memory_gb!r}")
        if self.architecture not in ARCHITECTURES:
            raise TrainSAEError(f"--architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        for name in ("tokens", "context_size", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise TrainSAEError(f"{name} must be a positive integer, got {v!r}")
        for name in ("d_sae", "k", "train_tokens", "holdout_sequences"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise TrainSAEError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.chat_fraction <= 1 or not 0 < self.holdout_fraction < 0.5:
            raise TrainSAEError("chat_fraction must be in [0, 1] and holdout_fraction in (0, 0.5)")
        if not self.lr > 0:
            raise TrainSAEError(f"lr must be > 0, got {self.lr!r}")

    def sizes(self, d_in: int) -> tuple[int, int]:
        """(d_sae, k) for a model of width ``d_in``."""
        d_sae = self.d_sae or 2 ** round(math.log2(8 * d_in))
        k = self.k or min(32, max(8, d_sae // 64))
        if k >= d_sae:
            raise TrainSAEError(f"k={k} must be smaller than d_sae={d_sae}")
        return d_sae, k

    def collection_key(self) -> dict[str, Any]:
        """What decides the collected activations (a resume reuses them only if these agree)."""
        return {k: getattr(self, k) for k in ("hooks", "tokens", "context_size", "chat_fraction", "holdout_fraction",
                                              "holdout_sequences", "outlier_factor", "seed", "dtype", "gen_tokens")} | {
            "hooks": list(self.hooks)}
