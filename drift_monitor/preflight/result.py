"""The pre-flight check's result as plain records (no torch): what the store, the dashboard, the
terminal table and ``--json`` all read."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: How each example's own answer was obtained: generated, or predicted from its prompt's
#: post-instruction projection (``score.OwnModel``).
Mode = Literal["generated", "predicted"]


@dataclass
class ExampleScore:
    """One example worth reading: where it is in the data, its text, and what it would teach."""

    index: int
    prompt: str | None
    response: str
    score: float  # projection difference, mean over the scored layers (refusal-gap units)
    response_projection: float  # the data's response alone
    own_projection: float  # the model's own answer (generated or predicted)
    own_text: str | None = None  # the model's own answer, with --generate
    # with SAEs: the mean over response tokens of the start's refusal features' summed codes (mean
    # over the SAEs), the data's response minus the model's own answer, and each alone
    feature_score: float | None = None
    response_features: float | None = None
    own_features: float | None = None


@dataclass
class FeaturePush:
    """One SAE feature the data's responses push: its mean code over the data's response tokens,
    over the model's own answers' tokens (generated for the data's prompts, or without
    ``--generate`` its answers to the probe prompts), and their difference (``push``);
    ``refusal``: one of the start's refusal features."""

    feature: int
    data_mean: float
    own_mean: float
    push: float
    refusal: bool = False


@dataclass
class PreflightResult:
    """A dataset read against a start model. ``score`` > 0: the data refuses more than the model
    would (fine-tuning on it should raise refusal); < 0: less (it should erode refusal)."""

    preflight_id: str
    created_at: str
    model: str
    model_fingerprint: str
    dataset: str
    data_hash: str
    n_examples: int
    mode: Mode
    layers: list[int]  # the decoder layers the score averages over
    score: float
    per_layer: dict[int, float]  # the dataset score read at each layer alone
    data_refusal_share: float  # share of the data's responses that contain a refusal phrase
    own_refusal_share: float | None  # the same for the model's own answers (with --generate)
    raises: list[ExampleScore] = field(default_factory=list)  # top examples pushing refusal up
    erodes: list[ExampleScore] = field(default_factory=list)  # top examples pushing it down
    settings: dict[str, Any] = field(default_factory=dict)
    # with SAEs (``--sae``; empty or None without): the dataset's refusal-feature score (mean of
    # the examples' feature_score), the top examples by it each way, the start's refusal features
    # per hook, and per hook the features the data's responses push most
    feature_score: float | None = None
    feature_raises: list[ExampleScore] = field(default_factory=list)
    feature_erodes: list[ExampleScore] = field(default_factory=list)
    refusal_features: dict[str, list[int]] = field(default_factory=dict)
    sae_features: dict[str, list[FeaturePush]] = field(default_factory=dict)

    @property
    def direction(self) -> str:
        return "raises refusal" if self.score > 0 else "erodes refusal" if self.score < 0 else "neutral"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_layer"] = {str(k): v for k, v in self.per_layer.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreflightResult:
        d = dict(d)
        d["per_layer"] = {int(k): float(v) for k, v in d.get("per_layer", {}).items()}
        d["raises"] = [ExampleScore(**e) for e in d.get("raises", [])]
        d["erodes"] = [ExampleScore(**e) for e in d.get("erodes", [])]
        # results cached or stored before the SAE signals read back without them
        d["feature_raises"] = [ExampleScore(**e) for e in d.get("feature_raises") or []]
        d["feature_erodes"] = [ExampleScore(**e) for e in d.get("feature_erodes") or []]
        d["refusal_features"] = {str(k): [int(i) for i in v] for k, v in (d.get("refusal_features") or {}).items()}
        d["sae_features"] = {str(k): [FeaturePush(**f) for f in v] for k, v in (d.get("sae_features") or {}).items()}
        return cls(**d)

    def sae_dict(self) -> dict[str, Any]:
        """The SAE signals alone, as :meth:`to_dict` writes them (the store keeps them in one column)."""
        d = self.to_dict()
        return {k: d[k] for k in SAE_FIELDS}


#: The fields of :class:`PreflightResult` that only a check with SAEs fills.
SAE_FIELDS = ("feature_score", "feature_raises", "feature_erodes", "refusal_features", "sae_features")
