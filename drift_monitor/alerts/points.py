"""What the alerts keep of a snapshot (:class:`MetricPoint`) and what a rule says of it
(:class:`Condition`).

Why a point and not the snapshot: the engine keeps the run's whole history, and a snapshot
carries per-feature tables (tens of thousands of rows per hook). A point keeps the scalar
metrics and a few emerging feature ids for messages, and round-trips through JSON so the
history can be saved in a training checkpoint.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from drift_monitor.records import Snapshot

_EMERGING_IN_MESSAGE = 5  # emerging feature ids named in a message


def encode_float(v: float) -> float | str | None:
    """A float as JSON-safe value: NaN -> None, ±inf -> "inf"/"-inf"."""
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def decode_float(v: Any) -> float:
    if v is None:
        return math.nan
    return float(v)  # float("inf") / float("-inf") parse the strings



@dataclass
class MetricPoint:
    """What the alerts need of one snapshot: its step and scalar metrics (no feature tables).

    ``metrics`` is ``{hook: {name: value}}``; ``emerging`` holds the first few emerging refusal
    feature ids per hook (for messages). Build one with :meth:`from_snapshot`, or from stored
    metrics (``StoreReader.metric_series``) to replay a run.
    """

    step: int
    metrics: dict[str, dict[str, float]]
    is_base: bool = False
    emerging: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snap: Snapshot | MetricPoint) -> MetricPoint:
        if isinstance(snap, MetricPoint):
            return snap
        metrics = {h: {k: float(v) for k, v in r.metrics.items()} for h, r in snap.hooks.items()}
        emerging = {h: r.refusal.emerging for h, r in snap.hooks.items() if r.refusal is not None}
        return cls.of(int(snap.step), metrics, emerging, is_base=bool(snap.is_base))

    @classmethod
    def of(cls, step: int, metrics: dict[str, dict[str, float]], emerging: Mapping[str, Iterable[int]],
           is_base: bool = False) -> MetricPoint:
        """The point of ``step`` from its metrics and each hook's emerging refusal feature ids,
        best first (all of them: the point keeps the few messages name). A live snapshot
        (:meth:`from_snapshot`) and a run rebuilt from the store (``offline.shards``) both come
        through here, so their alerts name the same features. Step 0 is the base."""
        first = {h: [int(i) for i in itertools.islice(ids, _EMERGING_IN_MESSAGE)] for h, ids in emerging.items()}
        return cls(int(step), metrics, is_base or int(step) == 0, first)

    def value(self, hook: str, name: str) -> float | None:
        """The metric, or None when the hook or metric is missing or the value is NaN."""
        v = self.metrics.get(hook, {}).get(name)
        if v is None or math.isnan(v):
            return None
        return float(v)

    def merged_over(self, older: MetricPoint) -> MetricPoint:
        """This point with ``older``'s hooks (same step) that it lacks; this point's hooks win."""
        return MetricPoint(self.step, {**older.metrics, **self.metrics}, self.is_base or older.is_base,
                           {**{h: v for h, v in older.emerging.items() if h not in self.metrics}, **self.emerging})

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "is_base": self.is_base,
                "metrics": {h: {k: encode_float(v) for k, v in m.items()} for h, m in self.metrics.items()},
                "emerging": self.emerging}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MetricPoint:
        return cls(int(d["step"]), {h: {k: decode_float(v) for k, v in m.items()} for h, m in d["metrics"].items()},
                   bool(d.get("is_base", False)), {h: [int(i) for i in v] for h, v in d.get("emerging", {}).items()})


class Condition(NamedTuple):
    """The state of one rule at one hook in one snapshot (what :func:`evaluate` returns)."""

    rule: str
    hook: str
    value: float
    threshold: float
    firing: bool
    message: str
    severity: str
