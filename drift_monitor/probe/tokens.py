"""Which tokens an SAE reads: one set of conventions for training an SAE and for monitoring.

Why this is its own module: an SAE is only meaningful on the kind of activations it was
trained on. Real chat models put an *attention sink* at the first position (SmolLM2-135M:
norm ≈ 23,000 at position 0 against ≈ 170 elsewhere, whether or not that token is a BOS), and
a few other tokens reach the same *massive* norms. One such token outweighs hundreds of
ordinary ones in every sum of squares, so an SAE trained with them learns little else, and a
monitor that feeds them to an SAE trained without them reports a meaningless explained
variance. ``drift-monitor train-sae`` and the monitor therefore call the same functions here,
and the conventions travel with the SAE in its sae-lens metadata (``cfg.metadata``).

The conventions:

* ``skip_first``: position 0 is never read (the sink), whatever token it is.
* ``outlier_factor`` / ``outlier_norm``: a token whose activation norm exceeds
  ``outlier_norm`` (an absolute value recorded at training time), or, when the SAE records
  none, ``outlier_factor`` × the median norm of the tokens read alongside it, is excluded and
  counted. Massive activations are 2–3 orders of magnitude above the median, so the factor
  (10) is far from ordinary tokens.
* ``prepend_bos`` / ``exclude_special_tokens``: sae-lens's own metadata fields, honoured
  when formatting plain text and when selecting tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

#: Metadata key under which drift-monitor records its conventions in an SAE's cfg.metadata.
METADATA_KEY = "drift_monitor_tokens"
DEFAULT_OUTLIER_FACTOR = 10.0


@dataclass(frozen=True)
class TokenConventions:
    """What is fed to an SAE. Defaults are drift-monitor's; an SAE's metadata overrides them."""

    skip_first: bool = True
    outlier_factor: float | None = DEFAULT_OUTLIER_FACTOR  # None: no massive-norm exclusion
    outlier_norm: float | None = None  # absolute norm limit recorded at training (wins over the factor)
    prepend_bos: bool | None = None  # None: the tokenizer's own behaviour for plain text
    exclude_special_tokens: bool = False

    def to_metadata(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sae(cls, sae: Any) -> TokenConventions:
        """The conventions an SAE was trained with (sae-lens metadata + ours), defaults elsewhere."""
        meta = getattr(getattr(sae, "cfg", None), "metadata", None)
        ours = _meta_get(meta, METADATA_KEY) or {}
        fields = {k: v for k, v in dict(ours).items() if k in cls.__dataclass_fields__}
        pb = _meta_get(meta, "prepend_bos")
        if pb is not None and "prepend_bos" not in fields:
            fields["prepend_bos"] = bool(pb)
        ex = _meta_get(meta, "exclude_special_tokens")
        if ex is not None and "exclude_special_tokens" not in fields:
            fields["exclude_special_tokens"] = bool(ex)
        return cls(**fields)

    def describe(self) -> str:
        parts = ["position 0 skipped" if self.skip_first else "position 0 read"]
        if self.outlier_norm is not None:
            parts.append(f"tokens with norm > {self.outlier_norm:.4g} excluded")
        elif self.outlier_factor is not None:
            parts.append(f"tokens with norm > {self.outlier_factor:g}x the median excluded")
        if self.exclude_special_tokens:
            parts.append("special tokens excluded")
        return ", ".join(parts)


def _meta_get(meta: Any, key: str) -> Any:
    if meta is None:
        return None
    if isinstance(meta, dict):
        return meta.get(key)
    if hasattr(meta, "__contains__") and key not in meta:  # sae-lens SAEMetadata returns None for unset keys
        return None
    return getattr(meta, key, None)


def merge_conventions(items: list[tuple[str, TokenConventions]]) -> TokenConventions:
    """One set of conventions for a probe pass shared by several SAEs.

    The probe tokens are the same for every hook, so the formatting conventions must agree;
    the outlier limits are per hook and are applied per hook (``norm_limit``), so they may differ.
    """
    if not items:
        return TokenConventions()
    first_name, first = items[0]
    for name, c in items[1:]:
        for f in ("skip_first", "prepend_bos", "exclude_special_tokens"):
            if getattr(c, f) != getattr(first, f):
                raise ValueError(
                    f"SAEs {first_name} and {name} were trained with different token conventions "
                    f"({f}={getattr(first, f)!r} vs {getattr(c, f)!r}); monitor them in separate runs")
    return first


def norm_limit(norms: torch.Tensor, conv: TokenConventions) -> float:
    """The activation-norm limit above which a token counts as a massive-norm outlier (inf: none)."""
    if conv.outlier_norm is not None:
        return float(conv.outlier_norm)
    if conv.outlier_factor is None or norms.numel() == 0:
        return float("inf")
    return float(conv.outlier_factor) * float(norms.float().median())


def keep_mask(x: torch.Tensor, conv: TokenConventions) -> tuple[torch.Tensor, float]:
    """(keep [n] bool, limit): tokens of ``x`` [n, d] under the massive-norm limit.

    The one rule for training and monitoring. Non-finite rows are kept here (the statistics
    count and drop them separately, so a NaN is reported, never silently filtered).
    """
    return keep_from_norms(x.float().norm(dim=-1), conv)


def keep_from_norms(norms: torch.Tensor, conv: TokenConventions) -> tuple[torch.Tensor, float]:
    """``keep_mask`` from the row norms alone: what a caller that holds the rows on disk (train-sae's
    spilled activations) computes without reading them back."""
    limit = norm_limit(norms[torch.isfinite(norms)], conv)
    return ~_above(norms, limit), limit


def above_limit(x: torch.Tensor, limit: float) -> torch.Tensor:
    """[n] bool: the finite rows of ``x`` [n, d] whose norm exceeds ``limit`` (a limit decided
    elsewhere, e.g. on the base model's tokens)."""
    return _above(x.float().norm(dim=-1), limit)


def _above(norms: torch.Tensor, limit: float) -> torch.Tensor:
    return torch.isfinite(norms) & (norms > limit)


def first_position_mask(attention_mask: torch.Tensor, conv: TokenConventions) -> torch.Tensor:
    """[B, T] bool: real tokens (attention mask) with position 0 removed when ``skip_first``.

    Right padding is assumed (the monitor and train-sae pad on the right), so position 0 of
    each row is its first real token: the attention sink.
    """
    m = attention_mask.bool().clone()
    if conv.skip_first and m.shape[1]:
        m[:, 0] = False
    return m
