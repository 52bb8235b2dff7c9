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
        return cls(**d)
