"""Prometheus on a cluster: a run that serves /metrics writes a file_sd target file, a real
Prometheus server discovers it there, and the file goes when the run ends."""

from __future__ import annotations

import json

from servers import http_get, prom_query, start_prometheus, stop
from test_prometheus import H1, full_metrics, snapshot

from drift_monitor.config import MonitorConfig
from drift_monitor.exporters.discovery import target_labels, write_target
from drift_monitor.exporters.prometheus import PrometheusExporter
from drift_monitor.recorder import RunRecorder


def test_a_real_prometheus_discovers_two_live_exporters_through_file_sd(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    sd = tmp_path / "targets"
    exporters = []
    for run, ev in (("run-a", 0.75), ("run-b", 0.5)):
        exp = PrometheusExporter(run)
        exp.update(snapshot(7, {H1: full_metrics(ev)}))
        port = exp.serve(port=0)
        write_target(sd, "127.0.0.1", port)
        exporters.append(exp)
    # docs/prometheus.md's scrape config: honor_labels keeps run_info's own hostname/job_id (the same values as
    # the target's) instead of renaming them to exported_hostname/exported_job_id
    proc, base, log = start_prometheus(tmp_path, "  - job_name: drift_monitor\n    honor_labels: true\n"
                                                 "    file_sd_configs:\n"
                                                 f"      - files: ['{sd}/*.json']\n        refresh_interval: 1s\n")
    try:
        result = prom_query(base, "drift_monitor_explained_variance", want=2, timeout=40)
        assert len(result) == 2, f"{result}; log:\n{log.read_text()[-2000:]}"
        # the target file's labels arrive on every series; the run does not (only run_info has it)
        assert {r["metric"]["job_id"] for r in result} == {"4242"}
        assert {r["metric"]["hostname"] for r in result} == {target_labels()["hostname"]}
        assert not [r for r in result if "run" in r["metric"]]
        # the join of docs/prometheus.md gives each run's series its run label
        joined = prom_query(base, "drift_monitor_explained_variance * on(instance) group_left(run) "
                                  "drift_monitor_run_info", want=2)
        got = {r["metric"]["run"]: (r["metric"]["instance"], float(r["value"][1])) for r in joined}
        assert got == {"run-a": (f"127.0.0.1:{exporters[0].port}", 0.75),
                       "run-b": (f"127.0.0.1:{exporters[1].port}", 0.5)}, joined
        assert {r["metric"]["hook"] for r in joined} == {H1}
        info = prom_query(base, "drift_monitor_run_info", want=2)
        assert {r["metric"]["job_id"] for r in info} == {"4242"}
        assert not [k for r in info for k in r["metric"] if k.startswith("exported_")], info
    finally:
        stop(proc)
        for exp in exporters:
            exp.close()


def test_the_recorder_writes_the_target_while_serving_and_removes_it_at_the_end(tmp_path):
    sd = tmp_path / "targets"
    cfg = MonitorConfig(saes={"h": "x"}, outputs={"db_path": None, "prometheus_port": 0,
                                                  "prometheus_sd_dir": str(sd)})
    rec = RunRecorder.open(cfg, probe_hash="p", run_id="served", model_name="m")
    try:
        files = list(sd.glob("*.json"))
        assert files == [rec.sd_target]
        [entry] = json.loads(files[0].read_text())
        assert entry["targets"] == [f"127.0.0.1:{rec.prometheus_port}"]
        assert entry["labels"] == target_labels() and "run" not in entry["labels"]  # run_info names the run
        assert "drift_monitor_last_step" in http_get(f"http://{entry['targets'][0]}/metrics")
        rec.finish()
        assert not list(sd.glob("*.json"))  # gone: Prometheus drops the target at its next refresh
    finally:
        rec.exporter.close()
