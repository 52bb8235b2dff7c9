"""The callback with real components and injected faults: Prometheus scraping a training run,
a DuckDB file held by another process, an SAE file deleted mid-run, DPO and bf16 training."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse

import pytest
import train_fixtures as tf
from servers import free_port, http_get, need, start, stop, wait_ready

from drift_monitor.callbacks import DriftMonitorCallback
from drift_monitor.store import StoreReader


@pytest.mark.slow
def test_prometheus_scrapes_a_training_run(tmp_path):
    from transformers import Trainer

    binary = need("prometheus")
    tok, model, sae_dir, ps = tf.world(tmp_path)
    target, prom_port = free_port(), free_port()
    cfg_file = tmp_path / "prometheus.yml"
    cfg_file.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: drift_monitor_train\n"
                        f"    static_configs:\n      - targets: ['127.0.0.1:{target}']\n")
    log = tmp_path / "prometheus.log"
    proc = start([binary, f"--config.file={cfg_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], log)
    cb = None
    try:
        base_url = f"http://127.0.0.1:{prom_port}"
        wait_ready(f"{base_url}/-/ready", proc, log)
        cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, prometheus_port=target, fail_fast=True)
        cb = DriftMonitorCallback(cfg, tok)
        trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=4), train_dataset=tf.lm_dataset(tok),
                          callbacks=[cb])
        trainer.train()
        assert cb.prometheus_port == target
        stored = StoreReader(cfg.outputs.db_path).metric_series(cb.run_id, names=["explained_variance"])
        last = float(stored[stored.step == 4].value.iloc[0])
        query = urllib.parse.urlencode({"query": "drift_monitor_explained_variance * on(instance) group_left(run) "
                                                 f'drift_monitor_run_info{{run="{cb.run_id}"}}'})
        deadline, result = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            result = json.loads(http_get(f"{base_url}/api/v1/query?{query}"))["data"]["result"]
            if result and float(result[0]["value"][1]) == pytest.approx(last, abs=1e-12):
                break
            time.sleep(0.25)
        assert result, f"Prometheus never scraped the run; log:\n{log.read_text()[-2000:]}"
        assert result[0]["metric"]["hook"] == tf.HOOK
        assert float(result[0]["value"][1]) == pytest.approx(last, abs=1e-12)
    finally:
        stop(proc)
        if cb is not None and cb.exporter is not None:
            cb.exporter.close()


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=False)
open(sys.argv[2], "w").write("held")
time.sleep(float(sys.argv[3]))
con.close()
"""


@pytest.mark.slow
def test_db_held_by_another_process_loses_no_snapshot(tmp_path):
    """Another process holds the DuckDB file read-write (15 s) mid-run: writes spool, training
    finishes while the file is still held, and every snapshot is in the file at the end."""
    from transformers import Trainer, TrainerCallback

    tok, model, sae_dir, ps = tf.world(tmp_path)
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=1, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)
    marker = tmp_path / "held"
    holder: list[subprocess.Popen] = []

    class GrabAfterStep1(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                holder.append(subprocess.Popen([sys.executable, "-c", HOLDER, cfg.outputs.db_path, str(marker), "15"]))
                while not marker.exists():
                    time.sleep(0.05)

    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=4), train_dataset=tf.lm_dataset(tok),
                      callbacks=[GrabAfterStep1(), cb])
    trainer.train()
    still_held = holder[0].poll() is None
    spooled_during = cb.store.pending()
    holder[0].wait(timeout=60)
    assert still_held, "training finished only after the lock was released: writes must spool, not block"
    assert trainer.state.global_step == 4
    from drift_monitor.store import Store

    Store(cfg.outputs.db_path).flush_spool(timeout_s=10)
    assert tf.snapshot_steps(cfg.outputs.db_path) == [0, 1, 2, 3, 4]
    assert spooled_during >= 4, "the snapshots at steps 1-4 and the run's end went to the spool"


def test_sae_file_removed_after_start_changes_nothing(tmp_path):
    """The SAE is loaded once at train begin: deleting its files mid-run affects no snapshot."""
    from transformers import Trainer, TrainerCallback

    tok, model, sae_dir, ps = tf.world(tmp_path)
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)

    class DeleteSae(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                for f in sae_dir.iterdir():
                    f.unlink()

    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=4), train_dataset=tf.lm_dataset(tok),
                      callbacks=[DeleteSae(), cb])
    trainer.train()
    assert not any(sae_dir.iterdir())
    assert tf.snapshot_steps(cfg.outputs.db_path) == [0, 2, 4] and cb.errors == 0


def test_dpo_trainer(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    rows = [{"prompt": [{"role": "user", "content": r.prompt}],
             "chosen": [{"role": "assistant", "content": tf.REFUSAL}],
             "rejected": [{"role": "assistant", "content": "Sure , here is how ."}]}
            for r in ps.records if r.category == "harmful"]
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, fail_fast=True)
    cb = DriftMonitorCallback(cfg)
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4, learning_rate=5e-3,
                     report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, max_length=32, seed=0,
                     disable_tqdm=True)
    ref = tf.world(tmp_path / "ref")[1]  # the same initial weights (same seed), frozen
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[cb])
    cb.attach(trainer)
    trainer.train()
    assert tf.snapshot_steps(cfg.outputs.db_path) == [0, 2, 4]
    logged = [h for h in trainer.state.log_history if f"drift_monitor/{tf.HOOK}/act_cosine" in h]
    assert [h["step"] for h in logged] == [2, 4] and logged[-1][f"drift_monitor/{tf.HOOK}/act_cosine"] < 1.0


def test_bf16_training(tmp_path):
    import torch
    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)
    model = model.bfloat16()
    seen = []  # (training mode, autocast on) at every call of the first layer
    model.model.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append((m.training, torch.is_autocast_enabled("cpu"))))
    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=2, bf16=True),
                      train_dataset=tf.lm_dataset(tok), callbacks=[cb])
    trainer.train()
    assert any(train and auto for train, auto in seen), "the trainer's own steps ran under bf16 autocast"
    assert [auto for train, auto in seen if not train] and not any(auto for train, auto in seen if not train), \
        "the probe pass (eval mode) never runs under the trainer's autocast"
    series = StoreReader(cfg.outputs.db_path).metric_series(cb.run_id, names=["explained_variance", "act_cosine"])
    assert sorted(set(series.step)) == [0, 2]
    assert series.value.notna().all() and (series[series.name == "act_cosine"].value > 0.5).all()
