"""The shipped Prometheus rules (examples/prometheus/rules.yml) end to end: a real Prometheus
scrapes the real exporter of a run, evaluates the rules and sends to a real Alertmanager, which
delivers the alert, with the run's labels, to a webhook receiver on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path

from servers import WebhookReceiver, start_alertmanager, start_prometheus, stop

from drift_monitor.config import MonitorConfig
from drift_monitor.recorder import RunRecorder
from drift_monitor.records import HookResult, Snapshot

RULES = Path(__file__).resolve().parent.parent / "examples" / "prometheus" / "rules.yml"
HOOK = "model.layers.3"


def snap(step: int, delta: float) -> Snapshot:
    m = {"explained_variance": 0.76 + delta, "base_explained_variance": 0.76, "explained_variance_delta": delta,
         "features_drifted_ratio": 0.05, "nonfinite_fraction": 0.0, "n_tokens": 100.0}
    return Snapshot(step=step, hooks={HOOK: HookResult(hook=HOOK, d_sae=8, metrics=m, features={})}, probe_hash="p",
                    n_tokens=100, is_base=step == 0)


def test_shipped_rules_reach_a_webhook_through_a_real_alertmanager(tmp_path):
    cfg = MonitorConfig(saes={HOOK: "x"}, outputs={"db_path": None, "prometheus_port": 0, "show_progress": False})
    rec = RunRecorder.open(cfg, probe_hash="p", run_id="am-run", model_name="tiny", watch=False)
    with WebhookReceiver() as rx:
        am, am_base, am_log = start_alertmanager(tmp_path, rx.url + "/alertmanager")
        prom = None
        try:
            rec.record(snap(0, 0.0))
            rec.record(snap(10, -0.3))  # explained variance 0.3 below the base's: DriftMonitorExplainedVarianceDrop
            prom, _, prom_log = start_prometheus(
                tmp_path, "  - job_name: drift_monitor_train\n    static_configs:\n"
                          f"      - targets: ['127.0.0.1:{rec.prometheus_port}']\n",
                extra=f"rule_files: ['{RULES}']\nalerting:\n  alertmanagers:\n    - static_configs:\n"
                      f"        - targets: ['{am_base.removeprefix('http://')}']\n")
            deadline, alerts = time.monotonic() + 90, []
            while time.monotonic() < deadline:
                alerts = [a for b in rx.bodies() for a in b["alerts"]
                          if a["labels"]["alertname"] == "DriftMonitorExplainedVarianceDrop"]
                if alerts:
                    break
                time.sleep(0.5)
            assert alerts, f"no alert delivered; prometheus:\n{prom_log.read_text()[-2000:]}\n" \
                           f"alertmanager:\n{am_log.read_text()[-2000:]}"
            a = alerts[0]
            assert a["status"] == "firing"
            assert {k: a["labels"].get(k) for k in ("run", "hook", "severity", "job")} == {
                "run": "am-run", "hook": HOOK, "severity": "warning", "job": "drift_monitor_train"}
            assert "am-run" in a["annotations"]["summary"]
        finally:
            if prom is not None:
                stop(prom)
            stop(am)
            rec.finish()
