"""The pre-flight check's settings and its error, with no torch: the CLI builds its parser from
these defaults (their one home) without importing the engine."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DriftMonitorError
from ..records import DEFAULT_REFUSAL_PHRASES, normalize_text
from ..settings import HARMFUL_CATEGORY, HARMLESS_CATEGORY


class PreflightError(DriftMonitorError, ValueError):
    """A pre-flight check that cannot run, with the fix in its message."""


@dataclass(frozen=True)
class PreflightSettings:
    """Knobs of the check. ``layers``: decoder layer indices the score averages over (None:
    ``DEFAULT_LAYERS``); ``generate``: measure each prompt's own answer by greedy generation
    (``max_new_tokens``) instead of predicting it; ``top``: examples listed per direction."""

    layers: tuple[int, ...] | None = None
    generate: bool = False
    max_new_tokens: int = 24
    batch_size: int = 16
    max_length: int = 256
    chunk: int = 512  # examples read per streamed chunk
    top: int = 10  # examples listed per direction and signal, and features listed per SAE
    refusal_top_k: int = 20  # the start's refusal features per SAE (as MetricSettings.refusal_top_k)
    harmful_category: str = HARMFUL_CATEGORY
    harmless_category: str = HARMLESS_CATEGORY
    refusal_phrases: tuple[str, ...] = DEFAULT_REFUSAL_PHRASES

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "max_length", "chunk"):
            if int(getattr(self, name)) < 1:
                raise PreflightError(f"preflight {name} must be at least 1, got {getattr(self, name)!r}")
        if int(self.refusal_top_k) < 1:
            raise PreflightError(f"preflight refusal_top_k must be at least 1, got {self.refusal_top_k!r}")
        if self.top < 0:
            raise PreflightError(f"preflight top must be 0 or more, got {self.top!r}")
        object.__setattr__(self, "refusal_phrases", tuple(normalize_text(p) for p in self.refusal_phrases))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
