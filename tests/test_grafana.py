"""The Grafana dashboard (examples/grafana/drift-monitor.json): built from the catalog and the rules,
importable as Grafana exports dashboards, and every panel's query answered by a real Prometheus.

Grafana itself is not installable here, so the test does what Grafana would: it reads the JSON,
asks Prometheus for the ``run`` variable's values as the variable's ``label_values`` query does,
substitutes ``$run`` as Grafana's Prometheus data source interpolates a multi-value variable, and
runs each target as a range (or instant) query. Prometheus scrapes a live run's exporter and a
Pushgateway holding a pushed scan, both fed real Snapshot records through the RunRecorder (with
the LoRA adapter aggregates), so both halves of each query's join are exercised.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
from pathlib import Path

import pytest
from servers import free_port, http_get, need, start, start_prometheus, stop, wait_ready

from drift_monitor import catalog
from drift_monitor.alerts.rules import default_rules
from drift_monitor.config import MonitorConfig
from drift_monitor.exporters import grafana
from drift_monitor.recorder import RunRecorder
from drift_monitor.records import ADAPTER_HOOK, HookResult, Snapshot

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "grafana" / "drift-monitor.json"
HOOKS = ("model.layers.3", "model.layers.6")
#: a live training run (scraped) and a batch scan (pushed); the dot tests Grafana's regex escaping
LIVE, SCAN = "sft-lora", "scan.v2"


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    """The panels that query (rows only group them)."""
    return [p for p in dash["panels"] if p["type"] != "row"]


def targets(dash: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in panels(dash) for t in p["targets"]]


# ---------------------------------------------------------------------------- the file
def test_the_file_is_the_generated_dashboard():
    assert DASHBOARD.read_text() == grafana.render(), (
        "examples/grafana/drift-monitor.json is out of date: run "
        "`python -m drift_monitor.exporters.grafana > examples/grafana/drift-monitor.json`")


def test_structure_follows_grafanas_export_format():
    dash = load()
    [inp] = dash["__inputs"]
    assert (inp["name"], inp["type"], inp["pluginId"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 39
    required = {(r["type"], r["id"]) for r in dash["__requires"]}
    assert {("grafana", "grafana"), ("datasource", "prometheus")} <= required
    assert {("panel", p["type"]) for p in panels(dash)} <= required  # every panel plugin used is declared
    assert dash["uid"] and dash["title"] and dash["id"] is None

    [var] = dash["templating"]["list"]
    assert (var["name"], var["type"]) == ("run", "query")
    assert var["definition"] == var["query"]["query"] == "label_values(drift_monitor_run_info, run)"
    assert var["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert var["multi"] and var["includeAll"] and "allValue" not in var  # All: every run, as Grafana joins them

    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
            # $run is the only variable: anything else would reach Prometheus unsubstituted
            assert set(re.findall(r"\$\{?(\w+)", t["expr"])) <= {"run"}, t["expr"]


def test_the_issue_s_panels_are_there():
    exprs = " ".join(t["expr"] for _, t in targets(load()))
    for name in ("run_info", "explained_variance", "base_explained_variance", "features_drifted_ratio",
                 "act_cosine", "refusal_retention", "max_refusal_score", "n_emerging_refusal_features",
                 "refusal_direction_cosine", "residual_energy_ratio", "adapter_BA_norm", "alerts_active",
                 "probe_duration_seconds_sum", "last_probe_duration_seconds", "n_tokens"):
        assert re.search(rf"\b{grafana.series(name)}\b", exprs), name
    assert "drift_monitor_emerging_refusal_features" in exprs  # the catalog's exported name, not the key


def test_threshold_lines_are_the_shipped_rules():
    """A panel of a metric a default rule watches draws that rule's threshold, read from the rules."""
    dash = load()
    by_metric = {}
    for p in panels(dash):
        m = re.match(r"(drift_monitor_\w+) \* on\(instance\)", p["targets"][0]["expr"])  # a per_run() query
        if m:
            by_metric.setdefault(m.group(1), p)
    checked = 0
    for rule in default_rules():
        if rule.kind == "sudden_change":
            continue
        metric = "explained_variance_delta" if rule.kind == "ev_drop" else rule.metric
        bound = -rule.threshold if rule.kind == "ev_drop" else rule.threshold
        p = by_metric[grafana.series(metric)]
        steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert [s["value"] for s in steps] == [None, bound], (rule.name, steps)
        fires_above = rule.kind != "ev_drop" and rule.op != "<"
        assert steps[1]["color"] == ("red" if fires_above else "green"), rule.name
        assert p["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line+area", rule.name
        assert rule.name in p["description"]
        checked += 1
    assert checked >= 6


# ---------------------------------------------------------------------------- a real Prometheus
def metrics(ev_delta: float, residual: float, emerging: int) -> dict[str, float]:
    """Every plain hook-scope metric of the catalog, plausible values (ratios in [0, 1])."""
    m = {s.name: 0.5 for s in catalog.by_scope("hook") if not s.pattern}
    m.update(base_explained_variance=0.76, explained_variance=0.76 + ev_delta, explained_variance_delta=ev_delta,
             features_drifted_ratio=0.05, nonfinite_fraction=0.0, n_tokens=96.0, residual_energy_ratio=residual,
             refusal_retention=0.97, refusal_direction_cosine=0.98, max_refusal_score=1.5, refusal_score_floor=4.0,
             n_emerging_refusal_features=float(emerging))
    return m


def adapter_metrics(step: int) -> dict[str, float]:
    return {s.name: (0.01 * step if "norm" in s.name else -0.9) for s in catalog.by_scope("adapter")
            if s.name.startswith("adapter_")}


def snap(step: int, drops: dict[str, float], residual: float = 1.0) -> Snapshot:
    hooks = {h: HookResult(hook=h, d_sae=16, metrics=metrics(drops.get(h, 0.0), residual, 0), features={})
             for h in HOOKS}
    hooks[ADAPTER_HOOK] = HookResult(hook=ADAPTER_HOOK, d_sae=0, metrics=adapter_metrics(step), features={})
    return Snapshot(step=step, hooks=hooks, probe_hash="p", n_tokens=96, duration_s=0.2 + step / 100,
                    is_base=step == 0)


def grafana_regex(values: list[str]) -> str:
    """``$run`` as Grafana's Prometheus data source interpolates a multi-value variable inside a
    regex matcher (prometheusSpecialRegexEscape, then ``(a|b)``; one value alone, unbracketed)."""
    esc = [re.sub(r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), v.replace("\\", "\\\\\\\\")) for v in values]
    return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"


def query(base: str, expr: str, instant: bool) -> list[dict]:
    now = time.time()
    if instant:
        q = urllib.parse.urlencode({"query": expr, "time": now})
        url = f"{base}/api/v1/query?{q}"
    else:
        q = urllib.parse.urlencode({"query": expr, "start": now - 120, "end": now, "step": 2})
        url = f"{base}/api/v1/query_range?{q}"
    body = json.loads(http_get(url, timeout=10))
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def last(series: dict) -> float:
    return float(series["value"][1] if "value" in series else series["values"][-1][1])


def runs_of(result: list[dict]) -> list[str | None]:
    return [r["metric"].get("run") for r in result]


@pytest.fixture
def prometheus(tmp_path):
    """A real Prometheus scraping a live run's exporter and a Pushgateway holding a pushed scan."""
    gw_port = free_port()
    gw_log = tmp_path / "pushgateway.log"
    gw = start([need("prometheus-pushgateway"), f"--web.listen-address=127.0.0.1:{gw_port}", "--log.level=warn"],
               gw_log)
    recs: list[RunRecorder] = []
    prom = None
    try:
        wait_ready(f"http://127.0.0.1:{gw_port}/-/ready", gw, gw_log)
        live = RunRecorder.open(MonitorConfig(saes={h: "x" for h in HOOKS}, outputs={
            "db_path": None, "prometheus_port": 0, "show_progress": False}), probe_hash="p", run_id=LIVE,
            model_name="tiny", watch=False)
        recs.append(live)
        scan = RunRecorder.open(MonitorConfig(saes={h: "x" for h in HOOKS}, outputs={
            "db_path": None, "pushgateway_url": f"127.0.0.1:{gw_port}", "show_progress": False}),
            probe_hash="p", run_id=SCAN, model_name="tiny", push_job="drift_monitor_scan", watch=False)
        recs.append(scan)
        # live: both hooks lose explained variance (two ev_drop alerts); scan: one hook, and its residual grows
        for rec, drops, residual in ((live, dict.fromkeys(HOOKS, -0.3), 1.2), (scan, {HOOKS[1]: -0.2}, 40.0)):
            for step in (0, 10, 20):
                rec.record(snap(step, drops if step == 20 else {}, residual if step else 1.0))
        assert live.exporter.port and not scan.errors
        prom, base, prom_log = start_prometheus(
            tmp_path, "  - job_name: drift_monitor_train\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{live.prometheus_port}']\n"
                      "  - job_name: pushgateway\n    honor_labels: true\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{gw_port}']\n")
        yield base, prom_log
    finally:
        if prom is not None:
            stop(prom)
        for rec in recs:
            rec.finish()
        stop(gw)


def test_every_panel_query_returns_data_from_a_real_prometheus(prometheus):
    base, log = prometheus
    dash = load()
    # the run variable: Grafana's label_values(drift_monitor_run_info, run) asks the label values API
    [var] = dash["templating"]["list"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"]).groups()
    url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric})
    deadline, values = time.monotonic() + 30, []
    while time.monotonic() < deadline and sorted(values) != sorted([LIVE, SCAN]):
        values = json.loads(http_get(url))["data"]
        time.sleep(0.25)
    assert sorted(values) == sorted([LIVE, SCAN]), f"{values}; log:\n{log.read_text()[-2000:]}"

    every = grafana_regex(values)  # "All", as Grafana sends it without an allValue
    for panel, t in targets(dash):
        expr, instant, what = t["expr"].replace("$run", every), t["instant"], f"{panel['title']} {t['refId']}"
        deadline, result = time.monotonic() + 20, []
        while time.monotonic() < deadline:  # the first scrapes (1 s apart) may not hold every series yet
            result = query(base, expr, instant)
            if set(runs_of(result)) == {LIVE, SCAN}:
                break
            time.sleep(0.5)
        assert result, f"{what}: no data for {expr}; log:\n{log.read_text()[-2000:]}"
        assert sorted(set(runs_of(result)), key=str) == sorted([LIVE, SCAN]), (what, runs_of(result))
        assert all(math.isfinite(last(r)) for r in result), (what, result)
        # one run chosen: only its series
        one = query(base, t["expr"].replace("$run", grafana_regex([SCAN])), instant)
        assert one and set(runs_of(one)) == {SCAN}, (what, runs_of(one))

    def panel_values(title: str, ref: str = "A", run: str = every) -> dict[tuple, float]:
        [t] = [t for p, t in targets(dash) if p["title"] == title and t["refId"] == ref]
        return {(r["metric"].get("run"), r["metric"].get("hook")): last(r)
                for r in query(base, t["expr"].replace("$run", run), t["instant"])}

    # the join gives each series its own run: values are the runs' own
    ev = panel_values("Explained variance vs base")
    assert ev == pytest.approx({(LIVE, HOOKS[0]): 0.46, (LIVE, HOOKS[1]): 0.46,
                                (SCAN, HOOKS[0]): 0.76, (SCAN, HOOKS[1]): 0.56})
    # live: ev_drop at both hooks; scan: ev_drop at one, residual_growth (40 > its threshold) at both
    assert panel_values("Active alerts") == {(LIVE, None): 2, (SCAN, None): 3}
    assert panel_values("Residual energy ratio") == pytest.approx({(r, h): v for r, v in ((LIVE, 1.2), (SCAN, 40.0))
                                                                   for h in HOOKS})
    assert panel_values("Adapter norms") == pytest.approx({(LIVE, ADAPTER_HOOK): 0.2, (SCAN, ADAPTER_HOOK): 0.2})
    assert panel_values("Last step") == {(LIVE, None): 20, (SCAN, None): 20}
    assert panel_values("Probe pass duration", "B") == pytest.approx({(LIVE, None): 0.3, (SCAN, None): 0.3})
