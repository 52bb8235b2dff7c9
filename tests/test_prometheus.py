"""Prometheus exporter against real components: its own HTTP server, a Prometheus server, a
Pushgateway and promtool, all started here on 127.0.0.1 (docs/design.md §6).

The binaries come from the Debian packages `prometheus` (prometheus, promtool) and
`prometheus-pushgateway`; `bash scripts/install.sh --test` installs them. A missing binary
fails the test (it never skips).
"""

from __future__ import annotations

import math
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port, http_get, need, prom_query, start, start_prometheus, stop, wait_ready

from drift_monitor.exporters.prometheus import (
    ALLOWED_LABELS,
    METRIC_HELP,
    PortInUseError,
    PrometheusExporter,
    PrometheusExporterError,
    PushError,
    metric_name,
)
from drift_monitor.records import Alert, HookResult, Snapshot

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "prometheus"
H1, H2 = "model.layers.6", "model.layers.12"


# ---------------------------------------------------------------------------- helpers
def snapshot(step: int, metrics: dict[str, dict[str, float]], duration_s: float = 0.0,
             probe_hash: str = "p0") -> Snapshot:
    hooks = {h: HookResult(hook=h, d_sae=64, metrics=dict(m), features={}, refusal=None) for h, m in metrics.items()}
    return Snapshot(step=step, hooks=hooks, probe_hash=probe_hash, n_tokens=128, duration_s=duration_s)


def full_metrics(ev: float) -> dict[str, float]:
    """Every metric of docs/metrics.md's table, with explained_variance = ev."""
    m = {k: 0.5 for k in METRIC_HELP}
    m.update(explained_variance=ev, base_explained_variance=0.9, explained_variance_delta=ev - 0.9,
             n_emerging_refusal_features=3, n_tokens=128, nonfinite_fraction=0.0)
    return m


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, name: str, **labels: str) -> float:
    found = [s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples found"
    return found[0]


# ---------------------------------------------------------------------------- 1. surface
def test_exposition_names_labels_and_values():
    exp = PrometheusExporter("sft-lora")
    exp.set_info(model="tiny-llama", base_model="base")
    m2 = full_metrics(0.7)
    m2.update(mse=math.inf, cosine=math.nan, l0=None, brand_new_metric=1.5)
    exp.update(snapshot(100, {H1: full_metrics(0.8), H2: m2}, duration_s=0.25, probe_hash="abc123"))
    exp.observe_probe_duration(2.0)
    exp.record_error()
    text = generate_latest(exp.registry).decode()
    fams = families(text)

    # one gauge per metric and hook, names as documented
    for key in METRIC_HELP:
        name = metric_name(key)
        assert fams[name].type == "gauge", name
        for hook in (H1, H2):
            value(text, name, hook=hook)
    assert metric_name("n_emerging_refusal_features") == "drift_monitor_emerging_refusal_features"
    assert metric_name("n_tokens") == "drift_monitor_probe_tokens"
    assert value(text, "drift_monitor_explained_variance", hook=H1) == pytest.approx(0.8)
    assert value(text, "drift_monitor_explained_variance", hook=H2) == pytest.approx(0.7)
    assert value(text, "drift_monitor_emerging_refusal_features", hook=H2) == 3
    assert value(text, "drift_monitor_probe_tokens", hook=H1) == 128
    assert value(text, "drift_monitor_brand_new_metric", hook=H2) == 1.5
    # non-finite and missing values are NaN, never dropped or raised
    for name in ("drift_monitor_mse", "drift_monitor_cosine", "drift_monitor_l0"):
        assert math.isnan(value(text, name, hook=H2)), name
    assert value(text, "drift_monitor_mse", hook=H1) == 0.5

    assert value(text, "drift_monitor_last_step") == 100
    assert value(text, "drift_monitor_snapshots_total") == 1
    assert value(text, "drift_monitor_errors_total") == 1
    assert abs(value(text, "drift_monitor_last_snapshot_timestamp_seconds") - time.time()) < 60
    assert value(text, "drift_monitor_probe_duration_seconds_count") == 2  # snapshot + explicit
    assert value(text, "drift_monitor_probe_duration_seconds_sum") == pytest.approx(2.25)
    assert value(text, "drift_monitor_last_probe_duration_seconds") == 2.0
    (info,) = fams["drift_monitor_run_info"].samples
    assert info.labels["run"] == "sft-lora" and info.labels["model"] == "tiny-llama"
    assert info.labels["probe_hash"] == "abc123" and info.labels["version"]

    # bounded labels only: the five allowed (+ `le` on histogram buckets; _info carries metadata),
    # so no `run` either: drift_monitor_run_info alone names the run
    for fam in fams.values():
        assert fam.name.startswith("drift_monitor_"), fam.name
        if fam.name.endswith("_info"):
            continue
        for s in fam.samples:
            extra = set(s.labels) - set(ALLOWED_LABELS) - ({"le"} if s.name.endswith("_bucket") else set())
            assert not extra, f"{s.name} has labels {extra} outside {ALLOWED_LABELS}"
    # counters end with _total
    counters = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE") and ln.split()[3] == "counter"]
    assert set(counters) >= {"drift_monitor_snapshots_total", "drift_monitor_errors_total",
                             "drift_monitor_alerts_raised_total"}
    assert all(c.endswith("_total") for c in counters), counters


def test_alert_counters_and_active_gauge_raise_then_resolve():
    exp = PrometheusExporter("r", registry=CollectorRegistry())

    def read(name: str, rule: str, severity: str) -> float:
        return value(generate_latest(exp.registry).decode(), name, rule=rule, severity=severity)

    ev1 = Alert("ev_drop", "warning", 10, H1, "EV fell", value=-0.2, threshold=-0.1)
    ev2 = Alert("ev_drop", "warning", 10, H2, "EV fell", value=-0.3, threshold=-0.1)
    nf = Alert("nonfinite_activations", "critical", 10, H1, "NaN")
    exp.update(snapshot(10, {H1: {"explained_variance": 0.5}}), alerts=[ev1, ev2, nf])
    assert read("drift_monitor_alerts_raised_total", "ev_drop", "warning") == 2
    assert read("drift_monitor_alerts_active", "ev_drop", "warning") == 2
    assert read("drift_monitor_alerts_active", "nonfinite_activations", "critical") == 1

    # resolve one ev_drop and the nonfinite alert: counters keep counting, gauges go down (to 0, not absent)
    res = [Alert("ev_drop", "warning", 20, H1, "ok", status="resolved"),
           Alert("nonfinite_activations", "critical", 20, H1, "ok", status="resolved")]
    exp.update(snapshot(20, {H1: {"explained_variance": 0.9}}), alerts=res)
    assert read("drift_monitor_alerts_raised_total", "ev_drop", "warning") == 2
    assert read("drift_monitor_alerts_active", "ev_drop", "warning") == 1
    assert read("drift_monitor_alerts_active", "nonfinite_activations", "critical") == 0
    assert read("drift_monitor_alerts_raised_total", "nonfinite_activations", "critical") == 1

    # a snapshot without alerts changes nothing
    exp.update(snapshot(30, {H1: {"explained_variance": 0.9}}))
    assert read("drift_monitor_alerts_active", "ev_drop", "warning") == 1

    # raise again: counter 3; then `active` (the full list of active alerts) overrides the tally
    exp.update(snapshot(40, {H1: {"explained_variance": 0.4}}), alerts=[ev1])
    assert read("drift_monitor_alerts_raised_total", "ev_drop", "warning") == 3
    assert read("drift_monitor_alerts_active", "ev_drop", "warning") == 2
    sc = Alert("sudden_change", "info", 50, H2, "jump")
    exp.update(snapshot(50, {H1: {"explained_variance": 0.4}}), alerts=[sc], active=[ev1, sc])
    assert read("drift_monitor_alerts_active", "ev_drop", "warning") == 1
    assert read("drift_monitor_alerts_active", "sudden_change", "info") == 1
    exp.update(snapshot(60, {H1: {"explained_variance": 0.9}}), active=[])
    for rule, sev in (("ev_drop", "warning"), ("sudden_change", "info"), ("nonfinite_activations", "critical")):
        assert read("drift_monitor_alerts_active", rule, sev) == 0
    assert read("drift_monitor_alerts_raised_total", "sudden_change", "info") == 1


def test_exporters_coexist_and_bad_input_is_named():
    a, b = PrometheusExporter("a"), PrometheusExporter("b")
    a.update(snapshot(1, {H1: {"explained_variance": 0.1}}))
    b.update(snapshot(2, {H1: {"explained_variance": 0.2}}))
    text_a, text_b = generate_latest(a.registry).decode(), generate_latest(b.registry).decode()
    assert value(text_a, "drift_monitor_explained_variance", hook=H1) == 0.1
    assert value(text_b, "drift_monitor_explained_variance", hook=H1) == 0.2
    assert value(text_a, "drift_monitor_run_info", run="a") == 1 and 'run="b"' not in text_a
    assert value(text_b, "drift_monitor_run_info", run="b") == 1 and 'run="a"' not in text_b
    # one run per registry: without a run label a second run's series would be indistinguishable
    shared = CollectorRegistry()
    c = PrometheusExporter("c", registry=shared)
    with pytest.raises(PrometheusExporterError, match="already exports run 'c'.*its own registry"):
        PrometheusExporter("d", registry=shared)
    c.update(snapshot(1, {H1: {"explained_variance": 0.3}}))
    assert 'run="d"' not in generate_latest(shared).decode()  # the refused run left nothing behind
    with pytest.raises(ValueError, match="reserved"):
        a.set_info(run="other")
    with pytest.raises(ValueError, match="non-empty run"):
        PrometheusExporter("")


# ---------------------------------------------------------------------------- 2. serve
def test_serve_ephemeral_port_and_port_in_use():
    exp = PrometheusExporter("served")
    other = PrometheusExporter("second")
    try:
        port = exp.serve(port=0)
        assert port > 0 and exp.port == port
        exp.update(snapshot(7, {H1: {"explained_variance": 0.625}}))
        text = http_get(f"http://127.0.0.1:{port}/metrics")
        assert value(text, "drift_monitor_explained_variance", hook=H1) == 0.625
        assert value(text, "drift_monitor_last_step") == 7

        with pytest.raises(PortInUseError) as info:
            other.serve(port=port)
        msg = str(info.value)
        assert str(port) in msg and "prometheus_port" in msg and "in use" in msg
        assert isinstance(info.value, OSError)
    finally:
        exp.close()
        other.close()
    exp.close()  # idempotent
    with pytest.raises(OSError):
        http_get(f"http://127.0.0.1:{port}/metrics", timeout=1)


@pytest.mark.parametrize("job_id", ["31337", None], ids=["slurm", "no-scheduler"])
def test_a_served_run_names_itself_in_run_info_only(monkeypatch, job_id):
    import socket

    from drift_monitor.config import MonitorConfig
    from drift_monitor.recorder import RunRecorder

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    if job_id:
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    cfg = MonitorConfig(saes={H1: "x"}, outputs={"db_path": None, "prometheus_port": 0})
    rec = RunRecorder.open(cfg, probe_hash="probe-7", run_id="identity-run", model_name="tiny-llama", watch=False)
    try:
        rec.exporter.update(snapshot(5, {H1: full_metrics(0.5)}, duration_s=0.5, probe_hash="probe-7"),
                            alerts=[Alert("ev_drop", "warning", 5, H1, "EV fell", value=-0.4, threshold=-0.1)])
        rec.exporter.record_error()
        text = http_get(f"http://127.0.0.1:{rec.prometheus_port}/metrics")
    finally:
        rec.exporter.close()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    with_run = {s.name for s in samples if "run" in s.labels}
    assert with_run == {"drift_monitor_run_info"}, with_run
    # every kind of series was served: per-hook gauges, counters, the histogram, alert series
    names = {s.name for s in samples}
    assert {"drift_monitor_explained_variance", "drift_monitor_errors_total", "drift_monitor_alerts_active",
            "drift_monitor_alerts_raised_total", "drift_monitor_probe_duration_seconds_bucket"} <= names
    (info,) = [s for s in samples if s.name == "drift_monitor_run_info"]
    assert info.value == 1
    assert {k: info.labels.get(k) for k in ("run", "model", "probe_hash", "hostname", "job_id")} == {
        "run": "identity-run", "model": "tiny-llama", "probe_hash": "probe-7", "hostname": socket.gethostname(),
        "job_id": job_id}


# ---------------------------------------------------------------------------- 3. Prometheus
def test_real_prometheus_scrapes_the_exporter(tmp_path):
    exp = PrometheusExporter("scraped-run")
    exp.update(snapshot(42, {H1: full_metrics(0.8125), H2: full_metrics(0.5)}))
    target = exp.serve(port=0)
    proc, base, log = start_prometheus(tmp_path, "  - job_name: drift_monitor_train\n    static_configs:\n"
                                                 f"      - targets: ['127.0.0.1:{target}']\n")
    try:
        # the run comes from drift_monitor_run_info, joined on the target's instance (docs/prometheus.md)
        result = prom_query(base, 'drift_monitor_explained_variance * on(instance) group_left(run) '
                                  'drift_monitor_run_info{run="scraped-run"}', want=2)
        got = {r["metric"]["hook"]: float(r["value"][1]) for r in result}
        assert got == {H1: 0.8125, H2: 0.5}, f"Prometheus returned {result}; log:\n{log.read_text()[-2000:]}"
        assert all(r["metric"]["job"] == "drift_monitor_train" and r["metric"]["run"] == "scraped-run"
                   for r in result)
    finally:
        stop(proc)
        exp.close()


# ---------------------------------------------------------------------------- 4. Pushgateway
def test_real_pushgateway_receives_a_push(tmp_path):
    binary = need("prometheus-pushgateway")
    port = free_port()
    log = tmp_path / "pushgateway.log"
    proc = start([binary, f"--web.listen-address=127.0.0.1:{port}",
                  f"--persistence.file={tmp_path / 'pushgateway.data'}", "--log.level=warn"], log)
    exp = PrometheusExporter("batch-scan")
    try:
        wait_ready(f"http://127.0.0.1:{port}/-/ready", proc, log)
        exp.update(snapshot(300, {H1: full_metrics(0.375)}))
        exp.push(f"127.0.0.1:{port}")
        text = http_get(f"http://127.0.0.1:{port}/metrics")
        # the exporter's series have no run label: the gateway wrote the grouping key {run} onto them
        own = text_string_to_metric_families(generate_latest(exp.registry).decode())
        assert {s.name for f in own for s in f.samples if "run" in s.labels} == {"drift_monitor_run_info"}
        assert value(text, "drift_monitor_explained_variance", run="batch-scan", hook=H1,
                     job="drift_monitor") == 0.375
        assert value(text, "drift_monitor_last_step", run="batch-scan", job="drift_monitor") == 300
        # a custom job and grouping key
        exp.push(f"http://127.0.0.1:{port}", job="scan", grouping_key={"run": "batch-scan", "hook": H1})
        text = http_get(f"http://127.0.0.1:{port}/metrics")
        assert value(text, "drift_monitor_explained_variance", run="batch-scan", hook=H1, job="scan") == 0.375
    finally:
        stop(proc)
    # the gateway is gone: a clear error, and the failure is counted
    with pytest.raises(PushError, match="Pushgateway at"):
        exp.push(f"127.0.0.1:{port}", timeout=2)
    assert value(generate_latest(exp.registry).decode(), "drift_monitor_errors_total") == 1


# ---------------------------------------------------------------------------- 5. promtool
@pytest.mark.parametrize("args", [
    ["check", "rules", "rules.yml"],
    ["test", "rules", "rules_test.yml"],
    ["check", "config", "prometheus.yml"],
], ids=["check-rules", "test-rules", "check-config"])
def test_promtool(args):
    promtool = need("promtool")
    r = subprocess.run([promtool, *args], cwd=EXAMPLES, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    assert "SUCCESS" in r.stdout + r.stderr


def test_shipped_prometheus_erosion_rule_uses_the_default_bound():
    """rules.yml spells the refusal_erosion bound and its gate in PromQL; they must be the Python
    rule's (one fact each: the bound chosen on the detection suite's calibration half, the gate
    the suite's definition of a changed run)."""
    import yaml

    from drift_monitor.alerts.rules import REFUSAL_EROSION, REFUSAL_GATE

    doc = yaml.safe_load((Path(__file__).parent.parent / "examples" / "prometheus" / "rules.yml").read_text())
    rule = next(r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "DriftMonitorRefusalErosion")
    start = "drift_monitor_start_harmful_refusal_rate"
    scraped = f"(drift_monitor_refusal_retention < {REFUSAL_EROSION:g} unless on(instance, job, hook) {start} < "
    pushed = (f'(drift_monitor_refusal_retention{{run!=""}} < {REFUSAL_EROSION:g} unless on(run, hook) '
              f'{start}{{run!=""}} < ')
    assert f"{scraped}{REFUSAL_GATE:g})" in rule["expr"]
    assert f"{pushed}{REFUSAL_GATE:g})" in rule["expr"]
