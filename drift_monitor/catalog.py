"""The metric catalog: every scalar metric the engine emits, its name and meaning, in one place.

Why one catalog: a metric's name and meaning were listed in the alert rules (which metrics a
rule may name), the Prometheus exporter (families and help text), the dashboard (which
metrics a panel draws) and the README, and the lists drifted apart. Each of them now derives
its list from :data:`CATALOG`, and ``tests/test_catalog.py`` checks the catalog against what a
real monitor run emits, so a metric is added, renamed or documented here or nowhere.

The definitions themselves are the contract in docs/metrics.md. Help text says what a number
means, never a setting's default value: a rule's threshold or a cut-off is named by its
setting ("above the dense cut-off, dense_density"), since configurations change them.

Scopes (which hooks carry the metric in ``Snapshot.hooks``):

``hook``       every SAE hook, each probe snapshot (``drift_monitor.probe.compare``); the
               refusal metrics only when the probes have harmful and harmless categories.
``direction``  every SAE hook with direction monitors, or harmful and harmless probes (the base
               refusal direction ``refusal_base``); names are patterns (``pattern=True``):
               ``direction_projection:<direction>:<category>``.
``adapter``    LoRA runs (``drift_monitor.probe.adapters``): ``adapter_*`` on the aggregate hook
               ``adapter``, ``lora_*`` on the per-module hooks ``adapter:<module>``.

Stdlib only: the alerts, the exporters and the dashboard import it in processes without torch.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ADAPTER_AGGREGATE_PREFIX", "CATALOG", "DIRECTIONS", "PANELS", "SCOPES", "Direction", "MetricSpec", "Scope",
    "adapter_metrics", "by_scope", "find", "is_known", "markdown_table", "names", "panels", "spec",
]

Direction = Literal["higher_is_better", "lower_is_better", "neutral"]
Scope = Literal["hook", "adapter", "direction"]
DIRECTIONS: tuple[str, ...] = ("higher_is_better", "lower_is_better", "neutral")
SCOPES: tuple[str, ...] = ("hook", "adapter", "direction")

#: The Run detail page's charts, in display order; a metric joins one with ``MetricSpec.panel``.
#: One scale per chart: explained variance (near 0.7) and a residual energy ratio (thousands on a
#: toy run) on one axis would flatten the first, so each quantity of its own scale has its own
#: panel (and the metrics of one panel share a unit: checked below).
PANELS: tuple[str, ...] = (
    "Explained variance (current vs base)",
    "Activation cosine to base",
    "Activation relative MSE",
    "Features drifted ratio",
    "Top-k Jaccard",
    "Density JS distance",
    "Residual energy ratio (current / base)",
    "CE loss delta (SAE spliced - clean)",
)

_PLACEHOLDER = re.compile(r"<[^<>]+>")


@dataclass(frozen=True)
class MetricSpec:
    """One scalar metric.

    ``name``: the key in ``HookResult.metrics``; with ``pattern=True`` a template whose
    ``<placeholders>`` stand for names chosen at run time (a direction, a probe category).
    ``help``: one or two sentences (Prometheus HELP, the table in docs/metrics.md). ``unit``: what the
    value counts or measures. ``direction``: which way is healthier, i.e. closer to the base
    or better read by the base SAE (``neutral``: neither way is a warning by itself).
    ``scope``: which hooks carry it (module docstring). ``panel``: the Run detail chart that
    draws it (one of :data:`PANELS`), or None. ``default_alert``: the shipped rule
    (``drift_monitor.alerts.default_rules``) that watches it, or None; where two do (``sudden_change``
    also watches ``explained_variance`` and ``features_drifted_ratio``), the rule on its own
    value. ``prometheus_name``:
    the exported family name without the ``drift_monitor_`` prefix, where it differs from
    ``name`` (a pattern's family carries the placeholders as labels).
    """

    name: str
    help: str
    unit: str
    direction: Direction
    scope: Scope
    panel: str | None = None
    default_alert: str | None = None
    pattern: bool = False
    prometheus_name: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"metric {self.name!r}: direction must be one of {DIRECTIONS}")
        if self.scope not in SCOPES:
            raise ValueError(f"metric {self.name!r}: scope must be one of {SCOPES}")
        if self.panel is not None and self.panel not in PANELS:
            raise ValueError(f"metric {self.name!r}: panel {self.panel!r} is not one of {PANELS}")
        if self.pattern != bool(_PLACEHOLDER.search(self.name)):
            raise ValueError(f"metric {self.name!r}: pattern=True exactly when the name has <placeholders>")
        if self.pattern and not self.prometheus_name:
            raise ValueError(f"metric {self.name!r}: a pattern needs a prometheus_name (its labelled family)")

    @property
    def exported(self) -> str:
        """The Prometheus family name without the prefix."""
        return self.prometheus_name or self.name

    @property
    def labels(self) -> tuple[str, ...]:
        """The placeholders of a pattern, in order (() for a plain name)."""
        return tuple(p[1:-1] for p in _PLACEHOLDER.findall(self.name))

    def fields(self, key: str) -> tuple[str, ...] | None:
        """The placeholder values of ``key`` if it is this metric (() for a plain name), else None:
        ``fields("direction_projection:refusal:harmful")`` is ``("refusal", "harmful")``."""
        if not self.pattern:
            return () if key == self.name else None
        m = _regex(self.name).fullmatch(key)
        return m.groups() if m else None

    def matches(self, key: str) -> bool:
        """True when ``key`` is this metric (a pattern: any instance of it)."""
        return self.fields(key) is not None


@functools.cache
def _regex(template: str) -> re.Pattern[str]:
    """A pattern's regex: each placeholder is a non-empty name without ':', except a last one
    that ends the name, which takes the rest (a probe category is whatever follows the
    direction's ':', as ``drift_monitor.records.parse_direction_key`` reads it)."""
    parts = _PLACEHOLDER.split(template)
    n = len(parts) - 1
    out = ""
    for i, lit in enumerate(parts):
        out += re.escape(lit)
        if i < n:
            out += "(.+)" if i == n - 1 and not parts[-1] else "([^:]+)"
    return re.compile(out)


def _m(name: str, help: str, unit: str, direction: Direction, scope: Scope = "hook", **kw) -> MetricSpec:
    return MetricSpec(name, help, unit, direction, scope, **kw)


_EV, _ACT, _MSE, _FEAT, _TOPK, _JS, _RES, _CE = PANELS
_HI, _LO, _NEU = "higher_is_better", "lower_is_better", "neutral"

#: Every scalar metric, grouped as in docs/metrics.md. Order is display order (docs/metrics.md table,
#: and within a Run detail panel: the first metric of each panel is its key metric).
CATALOG: tuple[MetricSpec, ...] = (
    # --- reconstruction: the base SAE on the current model
    _m("explained_variance",
       "Explained variance of the base SAE's reconstruction of the current activations, over all selected "
       "tokens (1 - FVU). The ev_drop rule fires when it falls below the base's by more than the rule's "
       "threshold.", "ratio", _HI, panel=_EV, default_alert="ev_drop"),
    _m("base_explained_variance",
       "Explained variance of the base SAE on the base model's own activations at the same probes: the "
       "reference for explained_variance.", "ratio", _NEU, panel=_EV),
    _m("explained_variance_delta",
       "explained_variance - base_explained_variance (negative: the base SAE explains the model less well "
       "than it explains the base).", "ratio", _HI),
    _m("fvu", "Fraction of variance unexplained by the base SAE (1 - explained_variance).", "ratio", _LO),
    _m("fvu_token_mean",
       "The paper's per-token FVU: the mean over tokens of each token's squared reconstruction error over its "
       "own variance across the model dimensions (every token weighs the same).", "ratio", _LO),
    _m("l0", "Mean number of active SAE features per selected token.", "features", _NEU),
    _m("mse", "Mean squared reconstruction error per activation dimension.", "squared activation", _LO),
    _m("cosine", "Mean cosine similarity between activations and their SAE reconstructions.", "cosine", _HI),
    _m("dead_fraction", "Share of SAE features that never fired on the probe set.", "ratio", _LO),
    _m("dense_fraction",
       "Share of SAE features whose firing density is above the dense cut-off (dense_density).", "ratio", _LO),
    # --- activation drift: paired with the base token by token
    _m("act_cosine", "Mean cosine similarity between current and base activations at the same tokens.",
       "cosine", _HI, panel=_ACT, default_alert="sudden_change"),
    _m("act_relative_mse",
       "Sum of squared activation changes against the base at the same tokens, relative to the base's "
       "activation variance.", "ratio", _LO, panel=_MSE, default_alert="sudden_change"),
    _m("topk_jaccard",
       "Mean per-token Jaccard overlap of the top-k active features, current vs base (intersection over "
       "union).", "ratio", _HI, panel=_TOPK, default_alert="sudden_change"),
    _m("topk_overlap",
       "The paper's feature intersection ratio: the mean per-token share of the top-k features (k the smaller "
       "L0 of the pair, capped) that both models use.", "ratio", _HI),
    # --- feature drift
    _m("features_drifted_ratio",
       "Share of the features alive in either model whose firing density moved by more than the drift ratio "
       "(drift_ratio, either way) with at least drift_min_firings firings in one of the two.", "ratio", _LO,
       panel=_FEAT),
    _m("density_js",
       "Jensen-Shannon distance (base 2, in [0, 1]) between the current and base feature-density vectors, "
       "each normalised to sum 1.", "distance", _LO, panel=_JS, default_alert="sudden_change"),
    _m("density_spearman", "Spearman rank correlation between current and base feature densities.",
       "correlation", _HI),
    # --- refusal features (harmful and harmless probes), scored at the refusal tokens
    _m("max_refusal_score",
       "Largest refusal score over the features not dense in the base: a feature's drift at the refusal "
       "tokens after harmful probes (minus its harmless drift with refusal_contrast), in units of its own "
       "typical firing strength.", "score", _NEU, default_alert="sudden_change"),
    _m("n_emerging_refusal_features",
       "Emerging refusal features: among the refusal_top_k best-scoring features, those whose robust z-score "
       "exceeds refusal_z_threshold, whose score exceeds refusal_score_floor and whose activity at the "
       "refusal tokens grew at least refusal_min_fold times.", "features", _NEU,
       default_alert="emerging_refusal_features", prometheus_name="emerging_refusal_features"),
    _m("refusal_score_floor",
       "The refusal score an emerging refusal feature must reach (the refusal_min_rel_score setting), "
       "exported beside max_refusal_score.", "score", _NEU),
    _m("refusal_direction_cosine",
       "Cosine between the current and base refusal directions (mean harmful - mean harmless activation at "
       "the refusal tokens). The refusal_direction rule fires when it falls below the rule's threshold.",
       "cosine", _HI, default_alert="refusal_direction"),
    _m("refusal_direction_norm",
       "Norm of the current refusal direction (mean harmful - mean harmless activation at the refusal "
       "tokens).", "activation", _NEU),
    # --- refusal gained and lost: the start model's refusal machinery at the post-instruction tokens
    _m("refusal_retention",
       "How much of the start model's refusal direction remains: (mean harmful - mean harmless activation "
       "at the post-instruction tokens) projected on the start's, over the start's length. 1 at the start; "
       "below 1 refusal is eroding, above 1 it is growing.", "ratio", _NEU, default_alert="refusal_erosion"),
    _m("refusal_harmful_shift",
       "How far the harmful probes' mean activation at the post-instruction tokens moved along the start's "
       "refusal direction, in units of the start's harmful - harmless separation (0 at the start).",
       "ratio", _NEU),
    _m("refusal_post_cosine",
       "Cosine between the current and the start's refusal directions at the post-instruction tokens.",
       "cosine", _HI),
    _m("refusal_feature_retention",
       "Share of the start's refusal-feature contrast that remains: over the refusal_top_k base SAE features "
       "with the largest harmful - harmless mean code at the post-instruction tokens in the start model, "
       "the current contrast summed over the start's.", "ratio", _NEU),
    _m("max_post_refusal_score",
       "Largest new harmful-specific activity of a base SAE feature at the post-instruction tokens: its "
       "harmful drift minus its harmless drift, in units of its strength floored at the SAE's typical "
       "strength.", "score", _NEU),
    # --- the start model's own refusal (probe.start): measured once, with the baseline
    _m("start_harmful_refusal_rate",
       "Share of the harmful probes that the start model refuses (greedy answer with a refusal phrase), "
       "measured once with the baseline and repeated at every snapshot; refusal_erosion waits for a start "
       "that refuses.", "ratio", _NEU),
    _m("start_harmless_refusal_rate",
       "Share of the harmless probes that the start model refuses, measured once with the baseline.",
       "ratio", _NEU),
    # --- the residual monitor: what the base SAE cannot represent
    _m("residual_energy_ratio",
       "Mean squared SAE error per token of the current model over the base's (1: nothing new; 2: twice the "
       "error the base SAE leaves on the base).", "ratio", _LO, panel=_RES, default_alert="residual_growth"),
    _m("residual_top_share",
       "Share of the current model's SAE error energy along the first direction of new error (the top "
       "eigenvector of the error's second moment, current minus base); 0 when no direction holds the "
       "minimum share.",
       "ratio", _LO),
    # --- CE-loss transfer (cadence.ce_every_n_snapshots; the general probes, full forwards)
    _m("ce_loss_clean", "Mean next-token cross-entropy of the model on the general probes.", "nats", _NEU),
    _m("ce_loss_spliced",
       "The same with the base SAE's reconstruction spliced in at the hook (position 0 kept).", "nats", _LO),
    _m("ce_loss_zero_ablated", "The same with the hook's output zeroed.", "nats", _NEU),
    _m("ce_loss_delta", "ce_loss_spliced - ce_loss_clean: the loss the SAE's error costs the model.", "nats", _LO,
       panel=_CE),
    _m("ce_loss_score",
       "(ce_loss_zero_ablated - ce_loss_spliced) / (ce_loss_zero_ablated - ce_loss_clean), as sae-lens defines "
       "it: 1 when the reconstruction keeps all the loss the hook carries.", "ratio", _HI),
    # --- counts: what was read, and what was not
    _m("n_tokens", "Selected probe tokens that reached the SAE in the probe pass.", "tokens", _NEU,
       prometheus_name="probe_tokens"),
    _m("n_excluded_tokens",
       "Selected tokens excluded as massive-norm where the base has them (above the SAE's recorded outlier "
       "norm, or outlier_factor times the batch's median norm).", "tokens", _NEU),
    _m("n_outlier_tokens",
       "Kept tokens of the current model above the base's massive-norm limit where the base was not: new "
       "massive activations.", "tokens", _LO),
    _m("nonfinite_fraction", "Share of selected tokens dropped for NaN/inf activations.", "ratio", _LO,
       default_alert="nonfinite_activations"),
    # --- direction monitors
    _m("direction_projection:<direction>:<category>",
       "Mean projection of a probe category's activations (category all: every selected token) onto a unit "
       "direction (user-supplied, or refusal_base: the base refusal direction).", "activation", _NEU,
       "direction", pattern=True, prometheus_name="direction_projection"),
    _m("direction_projection_delta:<direction>:<category>",
       "Mean projection onto a unit direction, current minus base model.", "activation", _NEU,
       "direction", pattern=True, prometheus_name="direction_projection_delta"),
    # --- LoRA adapter signals: aggregates on hook "adapter"
    _m("adapter_A_norm", "Frobenius norm of all LoRA A matrices together (sqrt of the sum of squares over "
       "modules).", "norm", _NEU, "adapter", prometheus_name="adapter_a_norm"),
    _m("adapter_B_norm", "Frobenius norm of all LoRA B matrices together (sqrt of the sum of squares over "
       "modules).", "norm", _NEU, "adapter", prometheus_name="adapter_b_norm"),
    _m("adapter_BA_norm", "Frobenius norm of all LoRA weight updates scaling*B*A together.", "norm", _NEU,
       "adapter", prometheus_name="adapter_ba_norm"),
    _m("adapter_B_local_cosine",
       "Mean over LoRA modules of cos(B[t-2k]-B[t-k], B[t]-B[t-k]) (centred at t-k): -1 on a straight line, "
       "rising toward 0 or above when B turns.", "cosine", _LO, "adapter", default_alert="sudden_change",
       prometheus_name="adapter_b_local_cosine"),
    _m("adapter_B_local_cosine_max", "Largest per-module local cosine of the LoRA B trajectory (centred at "
       "t-k).", "cosine", _LO, "adapter", prometheus_name="adapter_b_local_cosine_max"),
    _m("adapter_B_local_cosine_global", "Local cosine of the concatenated LoRA B vector of all modules "
       "(centred at t-k).", "cosine", _LO, "adapter", default_alert="sudden_change",
       prometheus_name="adapter_b_local_cosine_global"),
    # --- per LoRA module, on hooks "adapter:<module>"
    _m("lora_A_norm", "Frobenius norm of one module's LoRA A matrix.", "norm", _NEU, "adapter",
       prometheus_name="lora_a_norm"),
    _m("lora_B_norm", "Frobenius norm of one module's LoRA B matrix.", "norm", _NEU, "adapter",
       prometheus_name="lora_b_norm"),
    _m("lora_BA_norm", "Frobenius norm of one module's LoRA weight update scaling*B*A.", "norm", _NEU,
       "adapter", prometheus_name="lora_ba_norm"),
    _m("lora_B_local_cosine", "One module's cos(B[t-2k]-B[t-k], B[t]-B[t-k]) (centred at t-k; NaN when B "
       "did not move).", "cosine", _LO, "adapter", prometheus_name="lora_b_local_cosine"),
)

_BY_NAME: dict[str, MetricSpec] = {s.name: s for s in CATALOG}
for _title in PANELS:
    if len({s.unit for s in CATALOG if s.panel == _title}) > 1:
        raise ValueError(f"drift_monitor.catalog: panel {_title!r} mixes units; give each scale its own panel")
_PATTERNS: tuple[MetricSpec, ...] = tuple(s for s in CATALOG if s.pattern)
if len(_BY_NAME) != len(CATALOG):
    raise ValueError("drift_monitor.catalog: two metrics share a name")


def names(*, patterns: bool = True) -> tuple[str, ...]:
    """Every metric name in catalog order (patterns as their templates; ``patterns=False``
    leaves them out: the names a value can be looked up by directly)."""
    return tuple(s.name for s in CATALOG if patterns or not s.pattern)


def by_scope(scope: Scope) -> tuple[MetricSpec, ...]:
    """The metrics of one scope, in catalog order."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")
    return tuple(s for s in CATALOG if s.scope == scope)


#: Name prefix of the adapter metrics of the aggregate hook ``adapter``; the other adapter
#: metrics (``lora_*``) are per LoRA module, on hooks ``adapter:<module>``.
ADAPTER_AGGREGATE_PREFIX = "adapter_"


def adapter_metrics(*, per_module: bool) -> tuple[str, ...]:
    """The adapter metrics of the aggregate hook (``per_module=False``) or of each LoRA module's
    hook, in catalog order: :data:`drift_monitor.records.ADAPTER_METRICS` and
    ``LORA_MODULE_METRICS`` are these."""
    return tuple(s.name for s in by_scope("adapter") if s.name.startswith(ADAPTER_AGGREGATE_PREFIX) != per_module)


def find(name: str) -> MetricSpec | None:
    """The spec of a metric name, resolving patterns, or None for a name the engine never emits."""
    if not isinstance(name, str):
        return None
    found = _BY_NAME.get(name)
    if found is not None and not found.pattern:
        return found
    return next((s for s in _PATTERNS if s.matches(name)), None)


def spec(name: str) -> MetricSpec:
    """The spec of a metric name, resolving patterns: ``spec("direction_projection:refusal:harmful")``
    is the ``direction_projection:<direction>:<category>`` entry. KeyError (with the closest
    name) for a name the engine never emits."""
    found = find(name)
    if found is None:
        match = difflib.get_close_matches(str(name), list(_BY_NAME), 1)
        hint = f" (did you mean {match[0]!r}?)" if match else ""
        raise KeyError(f"unknown metric {name!r}{hint}")
    return found


def is_known(name: str) -> bool:
    """True when ``name`` is a catalog metric or an instance of a pattern."""
    return find(name) is not None


def panels() -> dict[str, tuple[str, ...]]:
    """Run detail chart title -> the metrics it draws, in :data:`PANELS` order."""
    return {title: tuple(s.name for s in CATALOG if s.panel == title) for title in PANELS}


_BETTER = {"higher_is_better": "higher", "lower_is_better": "lower", "neutral": "neither"}
_WHERE = {"hook": "SAE hook", "direction": "SAE hook", "adapter": "adapter"}


def markdown_table() -> str:
    """The metric table of docs/metrics.md (between ``<!-- metrics:start -->`` and ``<!-- metrics:end -->``),
    one row per catalog entry; tests/test_catalog.py checks docs/metrics.md holds exactly this."""
    rows = ["| metric | hooks | unit | better | meaning |", "|---|---|---|---|---|"]
    for s in CATALOG:
        where = _WHERE[s.scope]
        if s.scope == "adapter":
            where = "`adapter`" if s.name.startswith(ADAPTER_AGGREGATE_PREFIX) else "`adapter:<module>`"
        help_ = s.help.replace("|", "\\|").replace("*", "\\*")
        rows.append(f"| `{s.name}` | {where} | {s.unit} | {_BETTER[s.direction]} | {help_} |")
    return "\n".join(rows) + "\n"
