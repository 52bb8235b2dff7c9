"""DriftMonitorCallback: the probe pass inside a Transformers/TRL training run.

Modelled on TRL's ``LogCompletionsCallback`` and transformers' tracker integrations:

* **Cadence.** Baseline at ``on_train_begin`` (before any update), a snapshot every
  ``every_n_steps`` optimizer steps (``on_step_end``, so gradient accumulation counts once),
  optionally at ``on_save`` / ``on_evaluate``, and a final one at ``on_train_end``; never two
  for one step.
* **Per-rank work.** Every rank runs the probe forward on its shard (FSDP/ZeRO-3 hang
  otherwise) and the statistics are all-reduced; only the world process zero writes DuckDB,
  evaluates alerts and serves Prometheus.
* **Fails at start, never breaks training after.** Set-up (the configuration, tokenizer, SAEs,
  probes, a writable store, the baseline pass) runs in ``on_train_begin``, before the first
  training step, and raises: a run the user asked to monitor must not go on unmonitored, and
  failing there costs no training time. From the first step on, any exception in the monitor
  is logged, counted (``drift_monitor_errors_total``) and stored as a ``monitor_error`` alert,
  and training goes on; ``MonitorConfig(fail_fast=True)`` re-raises (for tests). A write the
  store cannot make is not an exception at all: it waits and is retried (the recorder).
* **Honest run states.** ``finished`` at ``on_train_end``; ``failed`` when training raised,
  ``interrupted`` on Ctrl-C, ``preempted`` on SIGTERM, recorded by the recorder's
  :class:`~drift_monitor.recorder.RunEndWatch` (a callback never sees those ends).
* **Resumable.** ``on_save`` writes ``drift_monitor.json`` into the checkpoint (run id, base
  fingerprint, alert state); resuming reloads the baseline from the on-disk cache by that
  fingerprint and keeps the run id, and the store's replace semantics mean no step is stored
  twice. A job requeued before its first checkpoint (same output folder, training from step 0
  again) keeps its run id too: ``drift_monitor_run.json`` in the output folder names the run
  until it finishes, and the run's steps are measured again over the stored ones (both files:
  :mod:`drift_monitor.resume`, which the scan's resuming shares).
* **Adapter signals (LoRA).** With ``adapter_signals`` on ("auto": when the model has LoRA
  modules), rank 0 records the A/B norms, ‖scaling·BA‖ and the local cosine of the B trajectory
  (:mod:`drift_monitor.probe.adapters`) at the base and every ``adapter_every_n_steps`` steps. At a step
  that also has a probe snapshot they are merged into it (one store transaction, one alert
  evaluation); otherwise an adapter-only snapshot (hooks ``adapter``/``adapter:<module>``, no
  probe pass) goes the same way. They are read on rank 0 only, which is right for replicated
  (DDP) weights; FSDP/ZeRO-3-sharded LoRA weights are skipped with a warning. The B history is
  not saved in checkpoints: after a resume the cosine needs two records to reappear.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from transformers import TrainerCallback

from drift_monitor import resume
from drift_monitor.config import MonitorConfig
from drift_monitor.recorder import guarded, merge_adapter_signals
from drift_monitor.records import ADAPTER_HOOK_PREFIX, Snapshot, is_adapter_hook

log = logging.getLogger("drift_monitor.callback")

LOG_PREFIX = "drift_monitor"


class DriftMonitorCallback(TrainerCallback):
    """Watch a run through the base model's SAE(s). See :class:`~drift_monitor.MonitorConfig`.

    ``trainer``: pass it (or call :meth:`attach`) so the scalars go through ``trainer.log`` and
    reach W&B / TensorBoard / MLflow next to the loss; without it they are only appended to
    ``state.log_history``.
    """

    def __init__(self, config: MonitorConfig, tokenizer: Any = None, *, trainer: Any = None, run_id: str | None = None):
        if not isinstance(config, MonitorConfig):
            from drift_monitor.errors import ConfigError

            raise ConfigError(f"DriftMonitorCallback needs a MonitorConfig, got {type(config).__name__}; build one "
                              "with MonitorConfig(...) or MonitorConfig.from_file(PATH)")
        self.config = config
        self.tokenizer = tokenizer
        self.trainer = trainer
        self.run_id = run_id
        self.monitor = None
        self.recorder = None  # drift_monitor.recorder.RunRecorder, world process zero only
        self.base_fingerprint: str | None = None
        self.done_steps: set[int] = set()
        self._errors = 0  # caught here; the recorder counts its own output failures
        self.probe_seconds = 0.0
        self.adapters = None  # drift_monitor.probe.adapters.AdapterTracker when adapter signals are on (rank 0)
        self.adapter_steps: set[int] = set()
        self._t_start = time.perf_counter()
        self._is_zero = True

    def attach(self, trainer: Any) -> DriftMonitorCallback:
        """Register with ``trainer`` (if not yet) and log through it."""
        self.trainer = trainer
        if not any(cb is self for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(self)
        return self

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        self._is_zero = bool(state.is_world_process_zero)
        self._t_start = time.perf_counter()
        self._start(args, state, model, processing_class)  # unguarded: set-up errors stop the run here

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.monitor is None:
            return
        if state.global_step % self.config.cadence.every_n_steps == 0:
            self._guard("snapshot", self._snapshot, args, state, model)  # merges due adapter signals
        elif self._adapter_due(state.global_step):
            self._guard("adapter signals", self._adapter_snapshot, state, model)
        elif self.recorder is not None:
            self._guard("store retry", self.recorder.retry)  # writes that failed earlier: retried every step

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.monitor is None:
            return
        if self.config.cadence.snapshot_on_save:
            self._guard("snapshot", self._snapshot, args, state, model)
        if self._is_zero:
            self._guard("checkpoint", self._write_checkpoint_state, args, state)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.monitor is not None and self.config.cadence.snapshot_on_evaluate:
            self._guard("snapshot", self._snapshot, args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.monitor is not None:
            self._guard("snapshot", self._snapshot, args, state, model)
        self._guard("finish", self._finish, state, args.output_dir)

    # ------------------------------------------------------------------ work
    def _start(self, args, state, model, processing_class) -> None:
        from drift_monitor.monitor import DriftMonitor

        tokenizer = self.tokenizer or processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        if tokenizer is None:
            raise ValueError("DriftMonitorCallback needs a tokenizer: pass it, or give the trainer processing_class=")
        if model is None:
            raise ValueError("the trainer passed no model to the callback")
        self.monitor = DriftMonitor(self.config, tokenizer)
        resumed = resume.read_checkpoint_state(args.output_dir, state.global_step, self.monitor.probe_hash)
        if resumed is not None:
            self.run_id = resumed.run_id
            self.base_fingerprint = resumed.base_fingerprint
            self.done_steps = {s for s in resumed.done_steps if s <= state.global_step}
            base = self.monitor.load_baseline(self.base_fingerprint)
            log.info("drift-monitor: resumed run %s at step %d", self.run_id, state.global_step)
        else:
            if state.global_step > 0:
                log.warning("drift-monitor: resuming at step %d without %s in the checkpoint; the current "
                            "weights become the base of a new run", state.global_step, resume.STATE_FILE)
            t0 = time.perf_counter()
            base = self.monitor.baseline(model)
            self.probe_seconds += time.perf_counter() - t0  # the baseline is part of the monitor's cost
            self.base_fingerprint = self.monitor.base_fingerprint
            if self.run_id is None and state.global_step == 0:
                self.run_id = resume.requeued_run(args.output_dir, self.monitor.probe_hash, self.base_fingerprint)
        self.done_steps.add(0)
        if not self._is_zero:
            return
        self._open_outputs(args, model, resumed)
        self._guard("run file", resume.write_run_file, args.output_dir, self.run_id, self.monitor.probe_hash,
                    self.base_fingerprint)
        self._guard("adapter signals", self._start_adapters, model)
        if resumed is None:
            self._record(self._with_adapters(base, model), state)

    def _open_outputs(self, args, model, resumed) -> None:
        from drift_monitor.recorder import RunRecorder

        self.recorder = RunRecorder.open(
            self.config, probe_hash=self.monitor.probe_hash, run_id=self.run_id,
            run_name=self.config.outputs.run_name or getattr(args, "run_name", None), model_name=_model_name(model),
            alert_state=resumed.alerts if resumed is not None else None, fallback_dirs=[args.output_dir])
        self.run_id = self.recorder.run_id

    # the recorder's outputs, for users and tests that reach them through the callback
    @property
    def store(self):
        return self.recorder.store if self.recorder is not None else None

    @property
    def exporter(self):
        return self.recorder.exporter if self.recorder is not None else None

    @property
    def alerts(self):
        return self.recorder.alerts if self.recorder is not None else None

    @property
    def errors(self) -> int:
        """Errors caught inside the monitor so far (training went on after each)."""
        return self._errors + (self.recorder.errors if self.recorder is not None else 0)

    @property
    def prometheus_port(self) -> int | None:
        return self.recorder.prometheus_port if self.recorder is not None else None

    def _snapshot(self, args, state, model) -> None:
        step = int(state.global_step)
        if step in self.done_steps:
            return
        self.done_steps.add(step)  # before the pass: a failing step is not retried at every event
        t0 = time.perf_counter()
        snap = self.monitor.snapshot(model, step)
        self.probe_seconds += time.perf_counter() - t0
        if self._is_zero:
            snap = self._with_adapters(snap, model)
            self._record(snap, state)
        self._log_scalars(snap, state)

    # ------------------------------------------------------------------ adapter signals (rank 0)
    def _start_adapters(self, model) -> None:
        """Turn adapter signals on per ``config.cadence.adapter_signals`` ("auto": if LoRA modules exist)."""
        mode = self.config.cadence.adapter_signals
        if mode is False:
            return
        from drift_monitor.probe.adapters import AdapterTracker, find_lora_modules

        modules, sharded = find_lora_modules(model)
        if not modules and not sharded:
            if mode is True:
                log.warning("drift-monitor: adapter_signals=True but the model has no LoRA modules; none recorded")
            return
        self.adapters = AdapterTracker()

    def _adapter_due(self, step: int) -> bool:
        return (self.adapters is not None and self._is_zero and step not in self.adapter_steps
                and step % self.config.cadence.adapter_cadence == 0)

    def _with_adapters(self, snap: Snapshot, model) -> Snapshot:
        """``snap`` plus the adapter hooks when they are due at its step (a copy: the monitor's
        cached base snapshot is never modified). An adapter failure never loses the snapshot."""
        extra: dict = {}
        if self._adapter_due(snap.step):
            self._guard("adapter signals", lambda: extra.update(self._adapter_hooks(model, snap.step)))
        return merge_adapter_signals(snap, extra)

    def _adapter_hooks(self, model, step: int) -> dict:
        self.adapter_steps.add(step)  # before the work: a failing step is not retried
        return self.adapters.record(model, step)

    def _adapter_snapshot(self, state, model) -> None:
        """Adapter signals at a step without a probe pass: an adapter-only snapshot, same path."""
        step = int(state.global_step)
        hooks = self._adapter_hooks(model, step)
        if not hooks:
            return
        snap = Snapshot(step=step, hooks=hooks, probe_hash=self.monitor.probe_hash, n_tokens=0, duration_s=0.0)
        self._record(snap, state)
        self._log_scalars(snap, state)

    def _record(self, snap: Snapshot, state) -> None:
        """Rank 0: alerts, one store transaction, exporter (the recorder's job)."""
        if self.recorder is not None:
            self.recorder.record(snap)

    def _log_scalars(self, snap: Snapshot, state) -> None:
        # per-LoRA-module signals stay in the store / Prometheus: trackers get the aggregates
        logs = {f"{LOG_PREFIX}/{hook}/{name}": float(v) for (hook, name), v in snap.scalars().items()
                if v is not None and math.isfinite(v) and not hook.startswith(ADAPTER_HOOK_PREFIX)}
        if not all(is_adapter_hook(h) for h in snap.hooks):  # a probe pass happened
            logs[f"{LOG_PREFIX}/probe_seconds"] = snap.duration_s
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": int(state.global_step)})

    def _write_checkpoint_state(self, args, state) -> None:
        resume.write_checkpoint_state(args.output_dir, state.global_step, resume.CheckpointState(
            run_id=self.run_id, base_fingerprint=self.base_fingerprint, probe_hash=self.monitor.probe_hash,
            done_steps=sorted(self.done_steps),
            alerts=self.recorder.alert_state() if self.recorder is not None else None))

    def _finish(self, state, output_dir: str | None = None) -> None:
        if not self._is_zero:
            return
        wall = time.perf_counter() - self._t_start
        if wall > 0:
            log.info("drift-monitor: probe passes (baseline included) took %.1f s of %.1f s of training (%.1f%%)",
                     self.probe_seconds, wall, 100 * self.probe_seconds / wall)
        if self.recorder is not None:
            self.recorder.finish("finished")
        if output_dir is not None:  # finished: the next training in this folder is a new run
            resume.end_run_file(output_dir)

    # ------------------------------------------------------------------ never break training
    def _guard(self, what: str, fn, *args) -> None:
        try:
            guarded(what, fn, *args, fail_fast=self.config.fail_fast, on_error=self._report_error)
        except Exception:  # only with fail_fast: the error is about to end training
            if self.recorder is not None:
                self.recorder.finish("failed")
            raise

    def _report_error(self, what: str, e: Exception) -> None:
        self._errors += 1
        if self.recorder is not None and self._is_zero:
            self.recorder.record_error(what, e, step=max(self.done_steps) if self.done_steps else 0)


def _model_name(model: Any) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", None) or type(model).__name__
