"""Alert rules over snapshots (docs/design.md §4): conditions -> :class:`~drift_monitor.records.Alert` records.

Two layers:

* :func:`evaluate` is pure: given the run's earlier snapshots and a new one, it says for every
  (rule, hook) whether the rule's condition holds now, with the value, the threshold and a
  message that names the numbers. It keeps no state and raises nothing.
* :class:`AlertEngine` keeps the run's history (scalar metrics only, never feature tables) and
  the set of active (rule, hook) conditions. It turns condition *changes* into Alert records:
  an ``active`` alert when a condition starts to hold (not again while it keeps holding), a
  ``resolved`` alert (at the step where it cleared) when it stops. That is the contract of the
  store, which assumes at most one alert per (rule, hook, step) and closes the matching active
  alert on a ``resolved`` one. The engine's :meth:`~AlertEngine.state` is plain JSON, so the
  trainer callback can save it in a checkpoint and a resumed run does not re-raise.

Rules come from :func:`default_rules` or a YAML file (:func:`load_rules`). Rule kinds:

``threshold``         ``metric op threshold`` (``op`` one of ``> < >= <=``).
``ev_drop``           explained variance more than ``threshold`` below the base's.
``emerging_refusal``  more than ``threshold`` emerging refusal features (expected in safety
                      tuning, alarming elsewhere: its severity is meant to be configured).
``sudden_change``     the phase-transition detector: a robust z-score of the newest
                      snapshot-to-snapshot change of each watched metric against the run's
                      earlier changes (see :func:`robust_change_z`).
``nonfinite``         a share of probe tokens with NaN/inf activations above ``threshold`` (0).

Unknown or missing values are *not* a clearing: a rule whose metric is missing or NaN in a
snapshot gives no condition there, so an active alert stays active until the metric is back
and below its threshold.

This module imports only the stdlib, NumPy, PyYAML and :mod:`drift_monitor.records`: the
dashboard and the exporters import it without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence, Union

import numpy as np
import yaml

from drift_monitor.records import (ADAPTER_METRICS, LORA_MODULE_METRICS, Alert, Snapshot, is_adapter_hook,
                                   parse_direction_key)

log = logging.getLogger(__name__)

__all__ = [
    "AlertEngine", "AlertRule", "AlertRuleError", "Condition", "DEFAULT_SUDDEN_CHANGE_METRICS", "KINDS",
    "KNOWN_METRICS", "MetricPoint", "OPS", "SEVERITIES", "default_rules", "evaluate", "load_rules",
    "robust_change_z",
]

Kind = Literal["threshold", "ev_drop", "emerging_refusal", "sudden_change", "nonfinite"]
KINDS: tuple[str, ...] = ("threshold", "ev_drop", "emerging_refusal", "sudden_change", "nonfinite")
SEVERITIES: tuple[str, ...] = ("info", "warning", "critical")

#: Comparison operators of ``threshold`` rules, with the words used in messages.
OPS: dict[str, tuple[Callable[[float, float], bool], str]] = {
    ">": (operator.gt, "above"),
    "<": (operator.lt, "below"),
    ">=": (operator.ge, "at or above"),
    "<=": (operator.le, "at or below"),
}

#: Scalar metrics a rule may name (docs/metrics.md). A misspelt metric
#: would silently never fire, so rules are checked against this list at load time.
KNOWN_METRICS: tuple[str, ...] = (
    "explained_variance", "base_explained_variance", "explained_variance_delta", "fvu", "l0", "mse", "cosine",
    "dead_fraction", "dense_fraction", "act_relative_mse", "act_cosine", "topk_jaccard", "topk_overlap",
    "fvu_token_mean", "n_excluded_tokens", "n_outlier_tokens", "features_drifted_ratio",
    "density_js", "density_spearman", "nonfinite_fraction", "n_tokens", "max_refusal_score", "refusal_score_floor",
    "n_emerging_refusal_features", "refusal_direction_cosine", "refusal_direction_norm", "ce_loss_delta",
    "ce_loss_score",
    # LoRA adapter signals (drift_monitor.adapters): aggregates on hook "adapter", per module on "adapter:<module>"
    *ADAPTER_METRICS, *LORA_MODULE_METRICS,
)

#: What ``sudden_change`` watches unless told otherwise.
DEFAULT_SUDDEN_CHANGE_METRICS: tuple[str, ...] = (
    "explained_variance", "features_drifted_ratio", "topk_jaccard", "act_relative_mse", "density_js",
    "act_cosine", "max_refusal_score",
    # the rotation of the LoRA B trajectory (aggregate hook "adapter" only: per-module names differ).
    # Not the B norm: its growth follows the LR schedule, so warm-up and decay would look sudden.
    "adapter_B_local_cosine", "adapter_B_local_cosine_global",
)

# Per kind: the default threshold, severity and metric (None: the kind takes no single metric).
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "threshold": {"threshold": None, "severity": "warning", "metric": None},
    "ev_drop": {"threshold": 0.1, "severity": "warning", "metric": "explained_variance"},
    "emerging_refusal": {"threshold": 0.0, "severity": "warning", "metric": "n_emerging_refusal_features"},
    "sudden_change": {"threshold": 6.0, "severity": "warning", "metric": None},
    "nonfinite": {"threshold": 0.0, "severity": "critical", "metric": "nonfinite_fraction"},
}

_MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
_MEAN_AD_SCALE = 1.2533  # mean absolute deviation -> standard deviation (sqrt(pi/2))
_REL_TOL = 1e-12  # a change this small relative to the metric's size counts as no change
_EMERGING_IN_MESSAGE = 5  # emerging feature ids named in a message


class AlertRuleError(ValueError):
    """A bad alert rule or rules file, with a message that names the problem and the fix."""


def _suggest(name: str, known: Iterable[str]) -> str:
    match = difflib.get_close_matches(str(name), list(known), 1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _fmt(v: float, spec: str = ".3g") -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


@dataclass
class AlertRule:
    """One alert rule. Validated at construction; ``name`` is the stable ``rule`` label.

    ``threshold`` means, per kind: ``threshold`` – the bound of ``metric op threshold``;
    ``ev_drop`` – the largest allowed drop of explained variance below the base's (0.1);
    ``emerging_refusal`` – the count of emerging refusal features that is still fine (0);
    ``sudden_change`` – the |robust z| above which a change is sudden (6);
    ``nonfinite`` – the share of non-finite tokens that is still fine (0).
    ``severity`` and ``threshold`` default per kind (``nonfinite`` is critical, the rest warn).
    ``min_history`` (sudden_change only) is the number of earlier non-base snapshots needed
    before the rule can fire. ``hooks`` limits the rule to those hooks (None: every hook).
    """

    name: str
    kind: Kind
    metric: str | None = None
    op: str | None = None
    threshold: float | None = None
    severity: str | None = None
    min_history: int = 10
    metrics: list[str] | None = None
    hooks: list[str] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise AlertRuleError(f"alert rule name must be a non-empty string, got {self.name!r}")
        where = f"alert rule {self.name!r}"
        if self.kind not in KINDS:
            raise AlertRuleError(f"{where}: unknown kind {self.kind!r}{_suggest(self.kind, KINDS)}; "
                                 f"use one of {', '.join(KINDS)}")
        d = _KIND_DEFAULTS[self.kind]
        if self.severity is None:
            self.severity = d["severity"]
        if self.severity not in SEVERITIES:
            raise AlertRuleError(f"{where}: bad severity {self.severity!r}; use one of {', '.join(SEVERITIES)}")
        # threshold
        if self.threshold is None:
            if d["threshold"] is None:
                raise AlertRuleError(f"{where}: kind 'threshold' needs a threshold (e.g. threshold: 0.25)")
            self.threshold = d["threshold"]
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold):
            raise AlertRuleError(f"{where}: threshold must be a finite number, got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if self.kind == "ev_drop" and self.threshold < 0:
            raise AlertRuleError(f"{where}: an ev_drop threshold is the size of the drop below the base's "
                                 f"explained variance (e.g. 0.1), not the delta; got {self.threshold!r}, "
                                 f"did you mean {-self.threshold!r}?")
        if self.kind == "sudden_change" and self.threshold <= 0:
            raise AlertRuleError(f"{where}: a sudden_change threshold is a |robust z| (e.g. 6), got {self.threshold!r}")
        # op
        if self.kind == "threshold":
            if self.op is None:
                raise AlertRuleError(f"{where}: kind 'threshold' needs op, one of {', '.join(OPS)}")
            if self.op not in OPS:
                raise AlertRuleError(f"{where}: unknown op {self.op!r}; use one of {', '.join(OPS)}")
        elif self.op is not None:
            raise AlertRuleError(f"{where}: op applies to kind 'threshold' only (kind {self.kind!r} fixes its "
                                 "comparison); remove it")
        # metric / metrics
        self.hooks = self._str_list("hooks", self.hooks)
        self.metrics = self._str_list("metrics", self.metrics)
        if self.kind == "sudden_change":
            if self.metric is not None:
                if self.metrics is not None:
                    raise AlertRuleError(f"{where}: give either metric or metrics, not both")
                self.metrics = [self._check_metric(self.metric)]
                self.metric = None
            if self.metrics is None:
                self.metrics = list(DEFAULT_SUDDEN_CHANGE_METRICS)
            for m in self.metrics:
                self._check_metric(m)
            if isinstance(self.min_history, bool) or not isinstance(self.min_history, int) or self.min_history < 2:
                raise AlertRuleError(f"{where}: min_history must be an integer >= 2 (two earlier snapshots give "
                                     f"one step-to-step change to compare with), got {self.min_history!r}")
        else:
            if self.metrics is not None:
                raise AlertRuleError(f"{where}: metrics applies to kind 'sudden_change' only; "
                                     f"use metric for kind {self.kind!r}")
            if isinstance(self.min_history, bool) or not isinstance(self.min_history, int) or self.min_history < 0:
                raise AlertRuleError(f"{where}: min_history must be a non-negative integer, got {self.min_history!r}")
            if self.kind == "threshold":
                if self.metric is None:
                    raise AlertRuleError(f"{where}: kind 'threshold' needs a metric, e.g. features_drifted_ratio")
                self._check_metric(self.metric)
            else:
                fixed = d["metric"]
                if self.metric is None:
                    self.metric = fixed
                elif self.metric != fixed:
                    raise AlertRuleError(f"{where}: kind {self.kind!r} always reads {fixed!r}; remove metric "
                                         f"{self.metric!r} or use kind 'threshold' for it")
        if not isinstance(self.description, str):
            raise AlertRuleError(f"{where}: description must be a string")

    def _str_list(self, key: str, v: Any) -> list[str] | None:
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
            raise AlertRuleError(f"alert rule {self.name!r}: {key} must be a non-empty list of names, got {v!r}")
        return list(v)

    def _check_metric(self, m: Any) -> str:
        # Direction monitors are named by the user's config, so they are accepted by pattern:
        # direction_projection[_delta]:<direction>:<category>, e.g. direction_projection:refusal:harmful.
        if m not in KNOWN_METRICS and not (isinstance(m, str) and parse_direction_key(m) is not None):
            raise AlertRuleError(f"alert rule {self.name!r}: unknown metric {m!r}{_suggest(m, KNOWN_METRICS)}; "
                                 f"known metrics: {', '.join(KNOWN_METRICS)}, or direction_projection:<direction>:"
                                 f"<category> and direction_projection_delta:<direction>:<category>")
        return m

    def applies_to(self, hook: str) -> bool:
        return self.hooks is None or hook in self.hooks


_RULE_FIELDS = tuple(f.name for f in dataclasses.fields(AlertRule))


def default_rules(emerging_refusal_severity: str = "warning") -> list[AlertRule]:
    """The shipped rules; their names are the stable ``rule`` label values.

    ``emerging_refusal_severity``: emerging refusal features are expected in safety tuning
    (use ``"info"`` there) and alarming elsewhere (``"critical"``).
    """
    return [
        AlertRule("ev_drop", "ev_drop", threshold=0.1, severity="warning",
                  description="explained variance dropped more than 0.1 below the base's: the base SAE "
                              "no longer explains the activations (something new is being learnt)"),
        AlertRule("features_drifted", "threshold", metric="features_drifted_ratio", op=">", threshold=0.25,
                  severity="warning", description="more than a quarter of the live features changed density 2x"),
        AlertRule("emerging_refusal_features", "emerging_refusal", threshold=0.0, severity=emerging_refusal_severity,
                  description="features that now fire on a refusal read after harmful requests, which the "
                              "base's did not (expected in safety tuning, alarming elsewhere)"),
        AlertRule("refusal_direction", "threshold", metric="refusal_direction_cosine", op="<", threshold=0.9,
                  severity="warning",
                  description="the refusal direction (mean harmful − mean harmless activation at the refusal "
                              "tokens) turned more than 25° from the base's: how the model separates harmful "
                              "requests changed"),
        AlertRule("sudden_change", "sudden_change", threshold=6.0, min_history=10, severity="warning",
                  description="a step-to-step change far outside the run's earlier changes (robust z > 6): "
                              "a phase transition"),
        AlertRule("nonfinite_activations", "nonfinite", threshold=0.0, severity="critical",
                  description="NaN/inf activations at a hook"),
    ]


RulesSource = Union[None, str, "os.PathLike[str]", Mapping[str, Any], Sequence[Any]]


def load_rules(source: RulesSource = None) -> list[AlertRule]:
    """Rules from a YAML file, a dict of the same shape, a list of rules, or None (the defaults).

    File format::

        defaults: true            # start from default_rules() (default: true unless `rules` is given)
        overrides:                # change fields of rules by name (of the defaults or of `rules`)
          emerging_refusal_features: {severity: info}
          features_drifted: {threshold: 0.3, hooks: [model.layers.12]}
          sudden_change: {enabled: false}      # drop a rule
        rules:                    # more rules; one named like a default replaces it
          - {name: low_cosine, kind: threshold, metric: act_cosine, op: "<", threshold: 0.8, severity: warning}

    A bare list is read as ``rules``. Unknown keys, kinds, severities, metrics and rule names
    raise :class:`AlertRuleError` naming the key and the file.
    """
    if source is None:
        return default_rules()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AlertRuleError(f"alert rules file {origin} does not exist") from None
        except OSError as e:
            raise AlertRuleError(f"alert rules file {origin} cannot be read: {e}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise AlertRuleError(f"alert rules file {origin} is not valid YAML: {e}") from None
        if data is None:
            raise AlertRuleError(f"alert rules file {origin} is empty; write `defaults: true` for the default rules")
        return _parse_rules(data, origin)
    if isinstance(source, Mapping):
        return _parse_rules(source, "<alert rules dict>")
    if isinstance(source, Sequence) and all(isinstance(r, AlertRule) for r in source):
        rules = list(source)
        _check_unique([r.name for r in rules], "<alert rules list>")
        return rules
    if isinstance(source, Sequence):
        return _parse_rules(list(source), "<alert rules list>")
    raise AlertRuleError(f"alert rules must be a YAML path, a dict, a list or None, got {type(source).__name__}")


def _check_unique(names: list[str], origin: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise AlertRuleError(f"{origin}: two rules are named {n!r}; rule names must be unique")
        seen.add(n)


def _parse_rules(data: Any, origin: str) -> list[AlertRule]:
    if isinstance(data, list):
        data = {"rules": data}
    if not isinstance(data, Mapping):
        raise AlertRuleError(f"{origin}: expected a mapping with keys defaults/overrides/rules, "
                             f"got {type(data).__name__}")
    top = ("defaults", "overrides", "rules")
    for key in data:
        if key not in top:
            raise AlertRuleError(f"{origin}: unknown key {key!r}{_suggest(key, top)}; "
                                 f"allowed top-level keys: {', '.join(top)}")
    use_defaults = data.get("defaults", "rules" not in data)
    if not isinstance(use_defaults, bool):
        raise AlertRuleError(f"{origin}: defaults must be true or false, got {use_defaults!r}")
    rules: dict[str, AlertRule] = {r.name: r for r in default_rules()} if use_defaults else {}

    entries = data.get("rules") or []
    if not isinstance(entries, list):
        raise AlertRuleError(f"{origin}: rules must be a list of rules, got {type(entries).__name__}")
    own: set[str] = set()
    for i, entry in enumerate(entries):
        label = f"rule #{i + 1}"
        if not isinstance(entry, Mapping):
            raise AlertRuleError(f"{origin}: {label} must be a mapping (name, kind, ...), got {entry!r}")
        if "name" in entry:
            label += f" ({entry['name']!r})"
        for key in entry:
            if key not in _RULE_FIELDS:
                raise AlertRuleError(f"{origin}: {label}: unknown key {key!r}{_suggest(key, _RULE_FIELDS)}; "
                                     f"allowed: {', '.join(_RULE_FIELDS)}")
        for key in ("name", "kind"):
            if key not in entry:
                raise AlertRuleError(f"{origin}: {label}: missing {key!r}")
        try:
            rule = AlertRule(**dict(entry))
        except AlertRuleError as e:
            raise AlertRuleError(f"{origin}: {label}: {e}") from None
        if rule.name in own:
            raise AlertRuleError(f"{origin}: two rules are named {rule.name!r}; rule names must be unique")
        own.add(rule.name)
        rules[rule.name] = rule  # a rule named like a default replaces it, in place

    overrides = data.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise AlertRuleError(f"{origin}: overrides must map rule names to fields, got {type(overrides).__name__}")
    for name, changes in overrides.items():
        if name not in rules:
            hint = "" if use_defaults else " (defaults: false, so only the file's own rules can be overridden)"
            raise AlertRuleError(f"{origin}: overrides: unknown rule {name!r}{_suggest(name, rules)}{hint}; "
                                 f"rules: {', '.join(rules) or '(none)'}")
        if not isinstance(changes, Mapping):
            raise AlertRuleError(f"{origin}: overrides: {name!r} must map fields to values, got {changes!r}")
        changes = dict(changes)
        enabled = changes.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise AlertRuleError(f"{origin}: overrides: {name!r}: enabled must be true or false, got {enabled!r}")
        allowed = tuple(f for f in _RULE_FIELDS if f not in ("name", "kind")) + ("enabled",)
        for key in changes:
            if key in ("name", "kind"):
                raise AlertRuleError(f"{origin}: overrides: {name!r}: {key} cannot be overridden; "
                                     "define a new rule under rules: instead")
            if key not in _RULE_FIELDS:
                raise AlertRuleError(f"{origin}: overrides: {name!r}: unknown key {key!r}{_suggest(key, allowed)}; "
                                     f"allowed: {', '.join(allowed)}")
        if not enabled:
            del rules[name]
            continue
        try:
            rules[name] = dataclasses.replace(rules[name], **changes)
        except AlertRuleError as e:
            raise AlertRuleError(f"{origin}: overrides: {e}") from None
    return list(rules.values())


def _coerce_rules(rules: RulesSource) -> list[AlertRule]:
    return load_rules(rules)


# --------------------------------------------------------------------------------------------
# History points and conditions
# --------------------------------------------------------------------------------------------


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
    def from_snapshot(cls, snap: Snapshot | "MetricPoint") -> "MetricPoint":
        if isinstance(snap, MetricPoint):
            return snap
        metrics = {h: {k: float(v) for k, v in r.metrics.items()} for h, r in snap.hooks.items()}
        emerging = {h: [int(i) for i in r.refusal.emerging[:_EMERGING_IN_MESSAGE]]
                    for h, r in snap.hooks.items() if r.refusal is not None}
        return cls(int(snap.step), metrics, bool(snap.is_base) or int(snap.step) == 0, emerging)

    def value(self, hook: str, name: str) -> float | None:
        """The metric, or None when the hook or metric is missing or the value is NaN."""
        v = self.metrics.get(hook, {}).get(name)
        if v is None or math.isnan(v):
            return None
        return float(v)

    def merged_over(self, older: "MetricPoint") -> "MetricPoint":
        """This point with ``older``'s hooks (same step) that it lacks; this point's hooks win."""
        return MetricPoint(self.step, {**older.metrics, **self.metrics}, self.is_base or older.is_base,
                           {**{h: v for h, v in older.emerging.items() if h not in self.metrics}, **self.emerging})

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "is_base": self.is_base,
                "metrics": {h: {k: _enc(v) for k, v in m.items()} for h, m in self.metrics.items()},
                "emerging": self.emerging}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "MetricPoint":
        return cls(int(d["step"]), {h: {k: _dec(v) for k, v in m.items()} for h, m in d["metrics"].items()},
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


def robust_change_z(deltas: Sequence[float], d: float, scale_ref: float = 0.0) -> tuple[float, float, float]:
    """Robust z of a change ``d`` against earlier changes: ``(z, median, scale)``.

    z = (d − median) / (1.4826·MAD). When MAD is 0 the mean absolute deviation about the median
    ×1.2533 is used; if that is 0 too (every earlier change identical), z is ±inf when ``d``
    differs from the median by more than 1e-12 relative to ``scale_ref`` (the metric's size)
    and the changes' own size, else 0. Same estimator as the refusal z-scores (metrics.robust_z).
    """
    a = np.asarray(deltas, dtype=np.float64)
    if a.size == 0:
        raise ValueError("robust_change_z needs at least one earlier change")
    med = float(np.median(a))
    dev = np.abs(a - med)
    scale = _MAD_SCALE * float(np.median(dev))
    if scale == 0.0:
        scale = _MEAN_AD_SCALE * float(dev.mean())
    diff = d - med
    if scale == 0.0:
        tol = _REL_TOL * max(abs(scale_ref), abs(d), abs(med))
        if abs(diff) > tol:
            return (math.inf if diff > 0 else -math.inf), med, 0.0
        return 0.0, med, 0.0
    return diff / scale, med, scale


def evaluate(
    history: Sequence[Snapshot | MetricPoint], snapshot: Snapshot | MetricPoint, rules: RulesSource = None
) -> list[Condition]:
    """Every rule's condition at every hook of ``snapshot``, given the run's earlier snapshots.

    Pure: nothing is stored. ``history`` may hold the base snapshot (``is_base`` or step 0;
    used for the base's explained variance when the snapshot lacks it) and the run's other
    snapshots in any order; only steps before ``snapshot.step`` count (a resumed run that
    re-evaluates a step ignores the abandoned future). On a base snapshot only ``nonfinite``
    rules are evaluated: the others compare the model with the base. A rule whose metric is
    missing or NaN at a hook gives no condition there.
    """
    rules = _coerce_rules(rules)
    cur = MetricPoint.from_snapshot(snapshot)
    points = [MetricPoint.from_snapshot(p) for p in history]
    bases = [p for p in points if p.is_base]
    base = bases[-1] if bases else None
    by_step: dict[int, MetricPoint] = {}
    for p in points:
        if not p.is_base and p.step < cur.step:
            # a re-written step: the later record wins, hook by hook (an adapter-only point and a
            # probe snapshot at the same step complement each other)
            by_step[p.step] = p.merged_over(by_step[p.step]) if p.step in by_step else p
    hist = [by_step[s] for s in sorted(by_step)]

    out: list[Condition] = []
    for rule in rules:
        if cur.is_base and rule.kind != "nonfinite":
            continue
        for hook in cur.metrics:
            if not rule.applies_to(hook):
                continue
            cond = _EVALUATORS[rule.kind](rule, hook, cur, hist, base)
            if cond is not None:
                out.append(cond)
    return out


def _cond(rule: AlertRule, hook: str, value: float, firing: bool, message: str) -> Condition:
    return Condition(rule.name, hook, float(value), float(rule.threshold), bool(firing), message, str(rule.severity))


def _eval_threshold(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                    base: MetricPoint | None) -> Condition | None:
    v = cur.value(hook, rule.metric)
    if v is None:
        return None
    fn, word = OPS[rule.op]
    firing = fn(v, rule.threshold)
    msg = (f"{rule.metric} {_fmt(v, '.4g')} is {'' if firing else 'not '}{word} the threshold "
           f"{_fmt(rule.threshold, '.4g')} at {hook}")
    return _cond(rule, hook, v, firing, msg)


def _eval_ev_drop(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                  base: MetricPoint | None) -> Condition | None:
    ev = cur.value(hook, "explained_variance")
    delta = cur.value(hook, "explained_variance_delta")
    base_ev = cur.value(hook, "base_explained_variance")
    if base_ev is None and base is not None:
        base_ev = base.value(hook, "explained_variance")
    if ev is None and delta is not None and base_ev is not None:
        ev = base_ev + delta
    if base_ev is None and delta is not None and ev is not None:
        base_ev = ev - delta
    if ev is None or base_ev is None:
        return None
    drop = -delta if delta is not None else base_ev - ev
    firing = drop > rule.threshold
    where = "below" if drop >= 0 else "above"
    msg = (f"explained variance {ev:.3f} is {abs(drop):.3f} {where} the base's {base_ev:.3f} at {hook} "
           f"({'more than' if firing else 'within'} the allowed drop {_fmt(rule.threshold)})")
    return _cond(rule, hook, drop, firing, msg)


def _eval_emerging(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                   base: MetricPoint | None) -> Condition | None:
    n = cur.value(hook, rule.metric)
    ids = cur.emerging.get(hook)
    if n is None:
        if ids is None:
            return None
        n = float(len(ids))  # the metric is missing but the snapshot has the refusal table
    firing = n > rule.threshold
    count = int(n) if float(n).is_integer() else n
    if firing:
        msg = f"{count} emerging refusal feature{'s' if count != 1 else ''} at {hook}"
        if ids:
            msg += f" (top: {', '.join(map(str, ids))}{', ...' if count > len(ids) else ''})"
        mx = cur.value(hook, "max_refusal_score")
        if mx is not None:
            msg += f"; max refusal score {mx:.3g}"
    else:
        msg = (f"no emerging refusal features at {hook}" if n == 0 else
               f"{count} emerging refusal features at {hook}, not above {_fmt(rule.threshold)}")
    return _cond(rule, hook, n, firing, msg)


def _eval_nonfinite(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                    base: MetricPoint | None) -> Condition | None:
    v = cur.value(hook, rule.metric)
    if v is None:
        return None
    firing = v > rule.threshold
    model = "the base model's" if cur.is_base else "the model's"
    msg = (f"{_fmt(100.0 * v, '.3g')}% of probe tokens had non-finite (NaN/inf) activations in {model} "
           f"{hook} (allowed: {_fmt(100.0 * rule.threshold, '.3g')}%); those tokens are left out of every metric")
    if not firing:
        msg = (f"activations at {hook} are finite" if v == 0 else
               f"{_fmt(100.0 * v, '.3g')}% of probe tokens had non-finite activations at {hook}, within "
               f"the allowed {_fmt(100.0 * rule.threshold, '.3g')}%")
    return _cond(rule, hook, v, firing, msg)


def _eval_sudden(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                 base: MetricPoint | None) -> Condition | None:
    results = []  # (|z|, z, metric, detail)
    for m in rule.metrics or ():
        v = cur.value(hook, m)
        if v is None:
            continue
        series = [(p.step, x) for p in hist if (x := p.value(hook, m)) is not None]
        if len(series) < max(rule.min_history, 2):
            continue
        vals = np.array([x for _, x in series])
        prev_step, prev = series[-1]
        d = v - prev
        z, med, scale = robust_change_z(np.diff(vals), d, scale_ref=max(abs(v), abs(prev)))
        detail = (f"{m} changed by {d:+.3g} ({prev:.4g} -> {v:.4g}, step {prev_step} -> {cur.step}) against a "
                  f"typical step-to-step change of {med:+.3g} ± {scale:.2g} over the last {len(vals) - 1} "
                  f"changes: robust z = {_fmt(z, '.1f')}")
        results.append((abs(z), z, m, detail))
    if not results:
        return None
    results.sort(key=lambda r: -r[0])  # stable: ties keep the rules' metric order
    top_abs, top_z, top_m, top_detail = results[0]
    firing = top_abs > rule.threshold
    if firing:
        others = [f"{m} (z = {_fmt(z, '.1f')})" for a, z, m, _ in results[1:] if a > rule.threshold]
        msg = f"sudden change at {hook}: {top_detail} (|z| > {_fmt(rule.threshold, '.3g')})"
        if others:
            msg += f"; also {', '.join(others)}"
    else:
        msg = f"no sudden change at {hook}: largest |robust z| {_fmt(top_abs, '.2f')} ({top_m})"
    return _cond(rule, hook, top_z, firing, msg)


_EVALUATORS: dict[str, Callable[..., Condition | None]] = {
    "threshold": _eval_threshold,
    "ev_drop": _eval_ev_drop,
    "emerging_refusal": _eval_emerging,
    "sudden_change": _eval_sudden,
    "nonfinite": _eval_nonfinite,
}


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------


def _enc(v: float) -> float | str | None:
    """A float as JSON-safe value: NaN -> None, ±inf -> "inf"/"-inf"."""
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _dec(v: Any) -> float:
    if v is None:
        return math.nan
    return float(v)  # float("inf") / float("-inf") parse the strings


_STATE_VERSION = 1


class AlertEngine:
    """Turns each snapshot of one run into the Alerts that changed state.

    ``evaluate(snapshot)`` returns an ``active`` Alert for each (rule, hook) condition that
    starts firing (never again while it keeps firing) and a ``resolved`` Alert, at the
    snapshot's step, for each active one that cleared. A base snapshot (``is_base`` or step 0)
    is recorded as the base; only ``nonfinite`` rules are checked on it, since the base with
    NaN/inf activations poisons every later comparison and should be seen at once (such an
    alert clears at the first snapshot whose activations are finite again).

    ``raised_total[(rule, severity)]`` counts raised alerts (for a Prometheus counter);
    :meth:`active_counts` gives the gauge. :meth:`state` / :meth:`from_state` round-trip
    through JSON, so a resumed run continues without re-raising.
    """

    def __init__(self, rules: RulesSource = None, run: str | None = None) -> None:
        self.rules: list[AlertRule] = _coerce_rules(rules)
        self.run = run
        self._base: MetricPoint | None = None
        self._history: list[MetricPoint] = []  # non-base points, ascending steps
        self._active: dict[tuple[str, str], Alert] = {}
        self.raised_total: dict[tuple[str, str], int] = {}
        self.resolved_total: dict[tuple[str, str], int] = {}
        self._warned_hooks: set[tuple[str, str]] = set()

    # -- public API ------------------------------------------------------------------------

    def evaluate(self, snapshot: Snapshot | MetricPoint) -> list[Alert]:
        """Record ``snapshot`` and return the Alerts that changed state with it."""
        return self._step(MetricPoint.from_snapshot(snapshot), emit=True)

    def observe(self, snapshot: Snapshot | MetricPoint, *, sync_active: bool = True) -> None:
        """Record ``snapshot`` without returning or counting alerts (replaying a resumed run).

        With ``sync_active`` the active set still follows the conditions, as if the alerts had
        been raised and stored then, so the next :meth:`evaluate` does not raise them again.
        """
        self._step(MetricPoint.from_snapshot(snapshot), emit=False, sync=sync_active)

    def active(self) -> list[Alert]:
        """The alerts now active (copies), in the order they were raised."""
        return [dataclasses.replace(a) for a in self._active.values()]

    def active_counts(self) -> dict[tuple[str, str], int]:
        """Active alerts per (rule, severity): the ``drift_monitor_alerts_active`` gauge."""
        out: dict[tuple[str, str], int] = {}
        for a in self._active.values():
            out[(a.rule, a.severity)] = out.get((a.rule, a.severity), 0) + 1
        return out

    def restore_active(self, alerts: Iterable[Alert]) -> None:
        """Mark alerts as active (e.g. the run's open alerts read back from the store)."""
        for a in alerts:
            if a.status == "active":
                self._active[(a.rule, a.hook)] = dataclasses.replace(a)

    @property
    def base(self) -> MetricPoint | None:
        return self._base

    @property
    def history(self) -> list[MetricPoint]:
        """The run's non-base points, in step order."""
        return list(self._history)

    def state(self) -> dict[str, Any]:
        """JSON-safe state (history, base, active alerts, counters); rules are not included."""
        return {
            "version": _STATE_VERSION,
            "run": self.run,
            "base": self._base.to_json() if self._base is not None else None,
            "history": [p.to_json() for p in self._history],
            "active": [_alert_to_json(a) for a in self._active.values()],
            "raised_total": [[r, s, n] for (r, s), n in self.raised_total.items()],
            "resolved_total": [[r, s, n] for (r, s), n in self.resolved_total.items()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], rules: RulesSource = None, run: str | None = None) -> "AlertEngine":
        """An engine continuing from :meth:`state` (rules are given again: they live in the config)."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not an AlertEngine state of version {_STATE_VERSION} (got {got!r})")
        eng = cls(rules, run=run if run is not None else state.get("run"))
        try:
            eng._base = MetricPoint.from_json(state["base"]) if state.get("base") is not None else None
            eng._history = sorted((MetricPoint.from_json(p) for p in state.get("history", [])), key=lambda p: p.step)
            for d in state.get("active", []):
                a = _alert_from_json(d)
                eng._active[(a.rule, a.hook)] = a
            eng.raised_total = {(r, s): int(n) for r, s, n in state.get("raised_total", [])}
            eng.resolved_total = {(r, s): int(n) for r, s, n in state.get("resolved_total", [])}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed AlertEngine state: {e!r}") from None
        return eng

    # -- internals -------------------------------------------------------------------------

    def _step(self, point: MetricPoint, emit: bool, sync: bool = True) -> list[Alert]:
        earlier = [p for p in self._history if p.step < point.step]
        hist = ([self._base] if self._base is not None else []) + earlier
        conds = evaluate(hist, point, self.rules) if (emit or sync) else []
        if point.is_base:
            self._base = point
        else:
            same = [p for p in self._history if p.step == point.step]
            # Two points at one step (e.g. adapter signals, then a snapshot on_save) merge hook by
            # hook; a hook re-measured at that step replaces its earlier values.
            self._history = earlier + [point.merged_over(same[-1]) if same else point]
        if emit:
            self._warn_missing_hooks(point)
        if not (emit or sync):
            return []

        out: list[Alert] = []
        names = {r.name for r in self.rules}
        for key in [k for k in self._active if k[0] not in names]:  # rule removed from the config
            old = self._active.pop(key)
            if emit:
                out.append(self._resolved(old, point.step, old.value,
                                          f"resolved: rule {old.rule!r} is no longer configured"))
        for c in conds:
            key = (c.rule, c.hook)
            old = self._active.get(key)
            if c.firing and old is None:
                alert = Alert(rule=c.rule, severity=c.severity, step=point.step, hook=c.hook,  # type: ignore[arg-type]
                              message=c.message, value=c.value, threshold=c.threshold, status="active")
                self._active[key] = alert
                if emit:
                    k = (c.rule, c.severity)
                    self.raised_total[k] = self.raised_total.get(k, 0) + 1
                    out.append(dataclasses.replace(alert))
            elif not c.firing and old is not None and point.step >= old.step:
                del self._active[key]
                if emit:
                    out.append(self._resolved(old, point.step, c.value, f"resolved: {c.message}"))
        return out

    def _resolved(self, old: Alert, step: int, value: float, message: str) -> Alert:
        k = (old.rule, old.severity)
        self.resolved_total[k] = self.resolved_total.get(k, 0) + 1
        return Alert(rule=old.rule, severity=old.severity, step=step, hook=old.hook, message=message,
                     value=value, threshold=old.threshold, status="resolved")

    def _warn_missing_hooks(self, point: MetricPoint) -> None:
        if all(is_adapter_hook(h) for h in point.metrics):
            return  # an adapter-only point between probe snapshots lacks the SAE hooks by design
        for r in self.rules:
            for h in r.hooks or ():
                if h not in point.metrics and (r.name, h) not in self._warned_hooks:
                    self._warned_hooks.add((r.name, h))
                    log.warning("alert rule %r names hook %r, which the snapshot at step %d does not have "
                                "(hooks: %s)%s", r.name, h, point.step, ", ".join(point.metrics),
                                _suggest(h, point.metrics))


def _alert_to_json(a: Alert) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["value"], d["threshold"] = _enc(a.value), _enc(a.threshold)
    return d


def _alert_from_json(d: Mapping[str, Any]) -> Alert:
    return Alert(rule=d["rule"], severity=d["severity"], step=int(d["step"]), hook=d["hook"], message=d["message"],
                 value=_dec(d.get("value")), threshold=_dec(d.get("threshold")), status=d.get("status", "active"),
                 created_at=float(d.get("created_at", 0.0)))
