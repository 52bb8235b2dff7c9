"""The Grafana dashboard of the exported metrics (examples/grafana/drift-monitor.json), built here.

Why built and not hand-written: the dashboard names metrics and draws the shipped rules'
thresholds, and both have one home each (metric names: :mod:`drift_monitor.catalog`; thresholds:
:func:`drift_monitor.alerts.rules.default_rules`). A hand-edited JSON would copy them and drift
apart, so the JSON file is this module's output, and ``tests/test_grafana.py`` checks that the
file equals it (regenerate with ``python -m drift_monitor.exporters.grafana >
examples/grafana/drift-monitor.json``) and runs every panel's query against a real Prometheus.

The JSON follows Grafana's export format, so it imports as is (Dashboards > New > Import):
``__inputs`` asks for a Prometheus data source (``DS_PROMETHEUS``, referenced as
``${DS_PROMETHEUS}``), ``__requires`` names what it needs, and the ``run`` variable lists
``label_values(drift_monitor_run_info, run)``.

Only ``drift_monitor_run_info`` carries the run (:mod:`drift_monitor.exporters.prometheus`), so
every query joins it in as the shipped rules do (examples/prometheus/rules.yml): a scraped
series through ``instance``, a pushed one (a scan, through the Pushgateway) by its own ``run``.

Stdlib, the catalog and the rules only (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .. import catalog
from ..alerts.rules import AlertRule, default_rules

__all__ = ["DATASOURCE", "SCHEMA_VERSION", "build", "per_run", "render", "series"]

PREFIX = "drift_monitor_"  # exporters.prometheus.PREFIX (not imported: that module pulls in prometheus_client)
#: Grafana's dashboard schema this JSON is written for (Grafana 10.4 / 11 write 39).
SCHEMA_VERSION = 39
#: Every panel's and target's data source: the import's ``DS_PROMETHEUS`` input.
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
_WIDTH = 24  # Grafana's grid is 24 columns wide


def series(name: str) -> str:
    """The exported series name of a catalog metric (``n_tokens`` -> ``drift_monitor_probe_tokens``),
    or of one of the exporter's own families given without the prefix (``last_step``)."""
    spec = catalog.find(name)
    return PREFIX + (spec.exported if spec is not None else name)


def per_run(name: str, matchers: str = "") -> str:
    """PromQL for the series of ``name`` of the runs chosen in ``$run``, each with its ``run`` label.

    A scraped series joins ``drift_monitor_run_info`` on ``instance``; a pushed one carries ``run``
    and no ``instance`` already. ``{instance!=""}`` keeps pushed run_info series (several runs, the
    same empty instance) out of the join, where they would be duplicates and fail the query; and
    ``run!=""`` keeps scraped series (no run label, which ``=~".*"`` would match) out of the second
    half. ``matchers``: more label matchers (``hook="adapter"``).
    """
    metric = series(name)
    own = f"{metric}{{{matchers}}}" if matchers else metric
    extra = f"{matchers}, " if matchers else ""
    return (f'{own} * on(instance) group_left(run) {PREFIX}run_info{{run=~"$run", instance!=""}}'
            f' or {metric}{{{extra}run=~"$run", run!=""}}')


@dataclass
class Target:
    """One query of a panel: PromQL, legend, and whether it is an instant query (tables, stats)."""

    expr: str
    legend: str = "{{run}} {{hook}}"
    instant: bool = False
    table: bool = False


@dataclass
class Panel:
    """One panel: ``kind`` is Grafana's panel type (timeseries, stat, table); ``unit`` Grafana's unit
    id; ``steps``: threshold steps [(colour, from value)], the first from -inf; ``line``: draw the
    thresholds on the chart (a rule's threshold); ``log``: a log2 y axis (for ratios that grow by
    orders of magnitude); ``dashed``: refIds drawn dashed (a reference, not a measurement)."""

    title: str
    targets: list[Target]
    description: str = ""
    kind: str = "timeseries"
    unit: str = "none"
    width: int = 8
    height: int = 8
    steps: list[tuple[str, float | None]] = field(default_factory=lambda: [("green", None)])
    line: bool = False
    min: float | None = None
    max: float | None = None
    log: bool = False
    dashed: tuple[str, ...] = ()


def _rules() -> dict[str, AlertRule]:
    return {r.name: r for r in default_rules()}


def _help(*names: str) -> str:
    """Panel descriptions from the catalog's help text: one meaning per metric, written once."""
    return "\n\n".join(f"{series(n)}: {catalog.spec(n).help}" for n in names)


def _watched(title: str, name: str, rule: AlertRule, note: str = "", **kw: Any) -> Panel:
    """A panel of ``name`` that draws ``rule``'s threshold as a line, red on the side where the
    rule fires (read from the rule: its kind, op and threshold)."""
    if rule.kind == "ev_drop":  # fires when explained_variance_delta < -threshold
        bound, above = -rule.threshold, False
    elif rule.kind == "threshold":
        bound, above = rule.threshold, rule.op in (">", ">=")
    elif rule.kind in ("emerging_refusal", "nonfinite"):  # metric > threshold
        bound, above = rule.threshold, True
    else:
        raise ValueError(f"rule {rule.name!r} of kind {rule.kind!r} has no line to draw")
    steps: list[tuple[str, float | None]] = [("green", None), ("red", bound)] if above else \
        [("red", None), ("green", bound)]
    where = "above" if above else "below"
    text = f"{_help(name)}\n\nThe line: rule {rule.name} ({rule.severity}) fires {where} {bound:g}.{note}"
    return Panel(title, [Target(per_run(name), "{{run}} {{hook}}")], text, steps=steps, line=True, **kw)


def _panels() -> list[tuple[str, list[Panel]]]:
    """The dashboard's rows and their panels, in display order."""
    rules = _rules()
    hook, by_rule = "{{run}} {{hook}}", "{{run}} {{rule}} ({{severity}})"
    adapter = 'hook="adapter"'
    dur = series("probe_duration_seconds")
    return [
        ("Runs", [
            Panel("Runs", [Target(f'{PREFIX}run_info{{run=~"$run"}}', "{{run}}", instant=True, table=True)],
                  "The chosen runs and their metadata (drift_monitor_run_info: model, probe hash, version, host, "
                  "cluster job).", kind="table", width=12),
            Panel("Last step", [Target(per_run("last_step"), "{{run}}")],
                  "Training step of each run's last snapshot.", kind="stat", width=4),
            Panel("Snapshot age", [Target(f'time() - ({per_run("last_snapshot_timestamp_seconds")})', "{{run}}")],
                  "Time since each run's last snapshot (a finished or pushed run keeps its last one).",
                  kind="stat", unit="s", width=4),
            Panel("Active alerts", [Target(f'sum by (run) ({per_run("alerts_active")})', "{{run}}")],
                  "Alerts drift-monitor's rules hold active now, per run (drift_monitor_alerts_active).",
                  kind="stat", width=4, steps=[("green", None), ("red", 1)]),
        ]),
        ("Reconstruction: the base SAE on the current model", [
            Panel("Explained variance vs base",
                  [Target(per_run("explained_variance"), f"{hook} current"),
                   Target(per_run("base_explained_variance"), f"{hook} base")],
                  _help("explained_variance", "base_explained_variance"), unit="percentunit", width=12,
                  min=0, max=1, dashed=("B",)),
            _watched("Explained variance − base", "explained_variance_delta", rules["ev_drop"], width=12),
        ]),
        ("Drift against the base", [
            Panel("Features drifted ratio", [Target(per_run("features_drifted_ratio"), hook)],
                  _help("features_drifted_ratio") + "\n\nNo default rule reads it (benign fine-tunes drift as many "
                  "features): add the opt-in features_drifted rule to alert on it.",
                  unit="percentunit", min=0, max=1),
            Panel("Activation cosine to base", [Target(per_run("act_cosine"), hook)], _help("act_cosine"), max=1),
            Panel("Activation relative MSE", [Target(per_run("act_relative_mse"), hook)],
                  _help("act_relative_mse"), min=0),
            Panel("Top-k Jaccard", [Target(per_run("topk_jaccard"), hook)], _help("topk_jaccard"), min=0, max=1),
            Panel("Density JS distance", [Target(per_run("density_js"), hook)], _help("density_js"), min=0, max=1),
            _watched("Non-finite activations", "nonfinite_fraction", rules["nonfinite_activations"],
                     unit="percentunit", min=0),
        ]),
        ("Refusal", [
            _watched("Refusal retention", "refusal_retention", rules["refusal_erosion"], width=12),
            _watched("Refusal direction cosine", "refusal_direction_cosine", rules["refusal_direction"], width=12,
                     max=1),
            Panel("Max refusal score vs floor",
                  [Target(per_run("max_refusal_score"), f"{hook} max score"),
                   Target(per_run("refusal_score_floor"), f"{hook} floor")],
                  _help("max_refusal_score", "refusal_score_floor"), width=12, dashed=("B",)),
            _watched("Emerging refusal features", "n_emerging_refusal_features", rules["emerging_refusal_features"],
                     width=12, min=0),
        ]),
        ("Residual: what the base SAE cannot represent", [
            _watched("Residual energy ratio", "residual_energy_ratio", rules["residual_growth"],
                     " Log scale: a toy run reaches thousands.", width=12, log=True),
            Panel("Residual top share", [Target(per_run("residual_top_share"), hook)], _help("residual_top_share"),
                  unit="percentunit", width=12, min=0, max=1),
        ]),
        ("Adapter (LoRA runs)", [
            Panel("Adapter norms",
                  [Target(per_run(n, adapter), f"{{{{run}}}} {catalog.spec(n).exported}")
                   for n in ("adapter_A_norm", "adapter_B_norm", "adapter_BA_norm")],
                  _help("adapter_A_norm", "adapter_B_norm", "adapter_BA_norm"), width=12, min=0),
            Panel("Adapter B local cosine",
                  [Target(per_run(n, adapter), f"{{{{run}}}} {catalog.spec(n).exported}")
                   for n in ("adapter_B_local_cosine", "adapter_B_local_cosine_global", "adapter_B_local_cosine_max")],
                  _help("adapter_B_local_cosine", "adapter_B_local_cosine_global", "adapter_B_local_cosine_max"),
                  width=12, min=-1, max=1),
        ]),
        ("Alerts and health", [
            Panel("Active alerts by rule",
                  [Target(f'sum by (run, rule, severity) ({per_run("alerts_active")})', by_rule)],
                  "Alerts active now per rule and severity (drift_monitor_alerts_active; 0 once resolved).",
                  width=12, min=0, steps=[("green", None), ("red", 1)]),
            Panel("Alerts raised", [Target(f'sum by (run, rule, severity) ({per_run("alerts_raised_total")})',
                                           by_rule, instant=True, table=True)],
                  "Alerts raised so far per rule and severity (drift_monitor_alerts_raised_total).",
                  kind="table", width=6),
            Panel("Monitor errors and pending writes",
                  [Target(per_run("errors_total"), "{{run}} errors"),
                   Target(per_run("store_pending"), "{{run}} store pending"),
                   Target(per_run("notifications_pending"), "{{run}} notifications pending")],
                  "Errors the monitor caught (training went on), writes waiting for the store, alert "
                  "notifications not delivered yet.", width=6, min=0),
        ]),
        ("Probe cost", [
            Panel("Probe pass duration",
                  [Target(per_run("last_probe_duration_seconds"), "{{run}} last"),
                   Target(f'({per_run("probe_duration_seconds_sum")}) / ({per_run("probe_duration_seconds_count")})',
                          "{{run}} mean"),
                   Target(f'histogram_quantile(0.9, sum by (run, le) ({per_run("probe_duration_seconds_bucket")}))',
                          "{{run}} p90")],
                  f"How long the probe passes take ({dur}: last, mean and 90th percentile over the run).",
                  unit="s", width=12, min=0),
            Panel("Probe tokens", [Target(per_run("n_tokens"), hook)], _help("n_tokens"), width=12, min=0),
        ]),
    ]


def _target(t: Target, ref: str) -> dict[str, Any]:
    out: dict[str, Any] = {"datasource": DATASOURCE, "refId": ref, "expr": t.expr, "legendFormat": t.legend,
                           "range": not t.instant, "instant": t.instant}
    if t.table:
        out["format"] = "table"
    return out


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    thresholds = {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in p.steps]}
    defaults: dict[str, Any] = {"unit": p.unit, "thresholds": thresholds, "color": {"mode": "palette-classic"}}
    if p.min is not None:
        defaults["min"] = p.min
    if p.max is not None:
        defaults["max"] = p.max
    options: dict[str, Any]
    if p.kind == "timeseries":
        # a gauge keeps its value between snapshots: a step function, not a slope
        defaults["custom"] = {"drawStyle": "line", "lineInterpolation": "stepAfter", "lineWidth": 2,
                              "showPoints": "never", "spanNulls": True, "fillOpacity": 0,
                              "thresholdsStyle": {"mode": "line+area" if p.line else "off"},
                              "scaleDistribution": {"type": "log", "log": 2} if p.log else {"type": "linear"}}
        options = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                   "tooltip": {"mode": "multi", "sort": "none"}}
    elif p.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "value", "graphMode": "none", "textMode": "auto", "orientation": "auto"}
    else:
        options = {"showHeader": True, "cellHeight": "sm"}
    overrides = [{"matcher": {"id": "byFrameRefID", "options": ref},
                  "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}
                 for ref in p.dashed]
    out: dict[str, Any] = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description, "datasource": DATASOURCE,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": overrides}, "options": options,
        "targets": [_target(t, chr(ord("A") + i)) for i, t in enumerate(p.targets)],
    }
    if p.kind == "table":
        out["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True,
                                                                                   "__name__": True}}}]
    return out


def build() -> dict[str, Any]:
    """The dashboard as Grafana exports one (a dict; :func:`render` writes the file's text)."""
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for title, row in _panels():
        panels.append({"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": _WIDTH, "x": 0, "y": y}})
        pid, y, x, height = pid + 1, y + 1, 0, 0
        for p in row:
            if x + p.width > _WIDTH:  # wrap to the next line of the grid
                x, y, height = 0, y + height, 0
            panels.append(_panel(p, pid, x, y))
            pid, x, height = pid + 1, x + p.width, max(height, p.height)
        y += height
    run_query = f"label_values({PREFIX}run_info, run)"
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "The Prometheus that scrapes "
                      "the runs' exporters (and the Pushgateway of scans)", "type": "datasource",
                      "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__elements": {},
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.4.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *({"type": "panel", "id": k, "name": k.capitalize() if k != "timeseries" else "Time series",
               "version": ""} for k in ("stat", "table", "timeseries")),
        ],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "drift-monitor: a fine-tuning run seen through its base model's sparse autoencoder "
                       "(github: drift-monitor, examples/grafana).",
        "editable": True, "fiscalYearStartMonth": 0, "graphTooltip": 1, "id": None, "links": [],
        "liveNow": False, "panels": panels, "refresh": "30s", "schemaVersion": SCHEMA_VERSION,
        "tags": ["drift-monitor", "fine-tuning", "sae"],
        "templating": {"list": [{
            "name": "run", "label": "Run", "type": "query", "datasource": DATASOURCE,
            "definition": run_query,
            "query": {"qryType": 1, "query": run_query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2, "multi": True, "includeAll": True, "current": {}, "options": [], "regex": "",
            "sort": 1, "hide": 0, "skipUrlSync": False,
        }]},
        "time": {"from": "now-6h", "to": "now"}, "timepicker": {}, "timezone": "browser",
        "title": "drift-monitor", "uid": "drift-monitor", "version": 1, "weekStart": "",
    }


def render() -> str:
    """The text of examples/grafana/drift-monitor.json."""
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(render(), end="")
