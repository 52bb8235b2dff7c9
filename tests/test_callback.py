"""DriftMonitorCallback inside real Trainer / TRL runs on a tiny offline model."""

from __future__ import annotations

import pytest
import train_fixtures as tf

from drift_monitor.callbacks import DriftMonitorCallback
from drift_monitor.store import StoreReader


def test_trainer_cadence_log_history_and_store(tmp_path):
    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)
    args = tf.training_args(tmp_path, max_steps=5, gradient_accumulation_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=tf.lm_dataset(tok), callbacks=[cb])
    cb.attach(trainer)
    trainer.train()
    # baseline, every 2 optimizer steps, and a final one at step 5; never twice for one step
    assert tf.snapshot_steps(cfg.outputs.db_path) == [0, 2, 4, 5]
    logged = [h for h in trainer.state.log_history if f"drift_monitor/{tf.HOOK}/explained_variance" in h]
    assert [h["step"] for h in logged] == [2, 4, 5]
    assert all("epoch" in h for h in logged), "attach(): the scalars went through trainer.log"
    reader = StoreReader(cfg.outputs.db_path)
    series = reader.metric_series(cb.run_id, names=["act_cosine"])
    assert len(series) == 4 and series.value.iloc[0] == pytest.approx(1.0)
    assert series.value.iloc[-1] < 1.0, "training must move the activations"
    assert reader.runs().status.iloc[0] == "finished"


def test_sft_lora_peft_config_with_gradient_checkpointing(tmp_path):
    from peft import LoraConfig
    from trl import SFTTrainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, fail_fast=True)
    cb = DriftMonitorCallback(cfg)
    args = tf.sft_args(tmp_path, max_steps=4, gradient_checkpointing=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=tf.chat_dataset(), processing_class=tok,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                         callbacks=[cb])
    cb.attach(trainer)
    trainer.train()
    assert tf.snapshot_steps(cfg.outputs.db_path) == [0, 2, 4]
    reader = StoreReader(cfg.outputs.db_path)
    jac = reader.metric_series(cb.run_id, names=["topk_jaccard"]).value.tolist()
    assert jac[0] == pytest.approx(1.0) and jac[-1] < 1.0


def test_get_peft_model_wrapped(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=3, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)
    trainer = Trainer(model=peft_model, args=tf.training_args(tmp_path, max_steps=3), train_dataset=tf.lm_dataset(tok),
                      callbacks=[cb])
    trainer.train()
    assert tf.snapshot_steps(cfg.outputs.db_path) == [0, 3]
    # without attach(): the scalars still reach the log history (appended, not via trainer.log)
    entries = [h for h in trainer.state.log_history if f"drift_monitor/{tf.HOOK}/l0" in h]
    assert [h["step"] for h in entries] == [3] and "epoch" not in entries[0]


def test_resume_keeps_run_id_and_duplicates_no_step(tmp_path):
    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, fail_fast=True)
    args = tf.training_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
    cb1 = DriftMonitorCallback(cfg, tok)
    Trainer(model=model, args=args, train_dataset=tf.lm_dataset(tok), callbacks=[cb1]).train()
    first = StoreReader(cfg.outputs.db_path).metric_series(cb1.run_id, names=["explained_variance"])

    model2 = tf.world(tmp_path / "w2")[1]
    model2.load_state_dict(init)
    cb2 = DriftMonitorCallback(cfg, tok)
    Trainer(model=model2, args=args, train_dataset=tf.lm_dataset(tok), callbacks=[cb2]).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    assert cb2.run_id == cb1.run_id
    reader = StoreReader(cfg.outputs.db_path)
    assert len(reader.runs()) == 1
    snaps = reader.snapshots(cb1.run_id)
    assert sorted(snaps.step.tolist()) == [0, 2, 4, 6], "one row per (step, hook): no duplicates"
    second = reader.metric_series(cb1.run_id, names=["explained_variance"])
    # the resumed run re-measured steps 4 and 6 from the same checkpoint: same numbers
    assert second.value.tolist() == pytest.approx(first.value.tolist(), abs=1e-6)


def test_monitor_errors_never_stop_training(tmp_path):
    """A taken Prometheus port and NaN activations: training finishes, snapshots are stored,
    the error is counted and stored, NaNs raise the critical alert."""
    import socket

    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, prometheus_port=port)
        cb = DriftMonitorCallback(cfg, tok)
        layer = model.model.layers[1]

        def poison(mod, inp, out):  # NaN only in the probe pass (eval mode), from step 4 on
            if not mod.training and getattr(cb, "done_steps", None) and max(cb.done_steps) >= 4:
                return out * float("nan")
            return out

        h = layer.register_forward_hook(poison)
        trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=6), train_dataset=tf.lm_dataset(tok),
                          callbacks=[cb])
        trainer.train()
        h.remove()
    finally:
        blocker.close()
    assert trainer.state.global_step == 6
    assert tf.snapshot_steps(cfg.outputs.db_path) == [0, 2, 4, 6]
    alerts = StoreReader(cfg.outputs.db_path).alerts(cb.run_id)
    # every error counted is stored, one monitor_error alert each (the taken port at least)
    assert cb.errors == (alerts.rule == "monitor_error").sum() >= 1, (cb.errors, alerts)
    assert "nonfinite_activations" in set(alerts.rule)
    nonfinite = alerts[alerts.rule == "nonfinite_activations"]
    assert (nonfinite.severity == "critical").all()


def test_fail_fast_reraises(tmp_path):
    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    cfg = tf.config(tmp_path, sae_dir, ps, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)
    (sae_dir / "sae_weights.safetensors").unlink()  # SAE gone before the run starts
    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=1), train_dataset=tf.lm_dataset(tok),
                      callbacks=[cb])
    with pytest.raises(Exception, match="sae_weights.safetensors"):
        trainer.train()


def test_end_of_run_cost_line_carries_the_baseline(tmp_path, caplog):
    """The log line the callback ends a run with reports the probe cost *with* the baseline: its
    seconds are the stored passes' durations summed, step 0 included, and its percentage is those
    seconds over the wall time it prints. (Whether the share is small is a benchmark's ratio:
    tests/bench/bench_callback.py.)"""
    import logging
    import re

    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)
    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=4), train_dataset=tf.lm_dataset(tok),
                      callbacks=[cb])
    with caplog.at_level(logging.INFO, logger="drift_monitor"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "probe passes (baseline included)" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    m = re.search(r"took ([\d.]+) s of ([\d.]+) s of training \(([\d.]+)%\)", lines[0])
    assert m, lines[0]
    probe_s, wall_s, pct = map(float, m.groups())
    per_step = StoreReader(cfg.outputs.db_path).snapshots(cb.run_id).groupby("step")["duration_s"].first()
    assert list(per_step.index) == [0, 2, 4]
    assert per_step[0] > 0
    # the callback's total is the stored passes, baseline included (without it: short by per_step[0])
    assert cb.probe_seconds == pytest.approx(per_step.sum(), rel=1e-2)
    assert per_step[0] > 0.02 * per_step.sum()  # so a total without the baseline breaks the equality above
    # the line prints that total to 0.1 s, and its share of the wall time it prints (both rounded)
    assert probe_s == pytest.approx(cb.probe_seconds, abs=0.051)
    lo, hi = 100 * cb.probe_seconds / (wall_s + 0.05) - 0.05, 100 * cb.probe_seconds / max(wall_s - 0.05, 1e-9) + 0.05
    assert lo <= pct <= hi, (pct, lo, hi)
