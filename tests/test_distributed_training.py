"""DriftMonitorCallback inside a real 2-process DDP training run (torchrun, gloo, CPU).

The claim under test (the distributed part of the callback): under ``torchrun`` every rank
runs the probe forward on its shard of the probe batches, the statistics are all-reduced,
and only the world process zero writes DuckDB and serves Prometheus; the stored figures
equal a single-process run on the same probe set (≤ 1e-5).

How it is made exact. A one-process training run need not reach the same *weights* as the
2-rank DDP run at step 2 or 4 (the distributed sampler interleaves the data, the gradient
all-reduce sums in another float order, and Adam amplifies tiny differences), so comparing
two trainings would test DDP, not the monitor. What the callback is responsible for is the
measurement, so the test compares the measurement on the same weights:

1. ``python -m torch.distributed.run --nproc_per_node 2`` launches this file as the worker
   (``python tests/test_distributed_training.py worker <out_dir>``). Each rank builds the
   same tiny world from fixed seeds in its own folder (tokenizer, Llama, SAE: no shared
   files, no race) and runs a ``transformers.Trainer`` (``ddp_backend="gloo"``,
   ``max_steps=4``) with ``DriftMonitorCallback(every_n_steps=2, fail_fast=True)`` writing
   one shared DuckDB file. A second callback saves the weights each rank held at every
   snapshot step (0, 2, 4), and a forward pre-hook counts the probe forwards per rank.
2. This process then replays the same callback in one process, with no process group,
   on rank 0's saved weights of each step, into a reference DuckDB file, and compares every
   stored figure: snapshot rows, every scalar metric, every ``feature_stats`` row, the
   refusal features and the alerts.

Also checked: DDP really ran (2 ranks, a DDP-wrapped model, bitwise equal weights on both
ranks at each step, weights that moved), both ranks reached step 4, the probe set has an
odd batch count (rank 1 runs a dummy forward) and both ranks ran their probe forwards,
exactly one run in the DB with steps [0, 2, 4], no spool folder, rank 1 never opened the
store nor served Prometheus, and rank 0 did serve ``/metrics``.

Hang safety: a rank left alone in a collective raises after gloo's ``PG_TIMEOUT_S`` (the
worker joins the group itself for that: with ``use_cpu=True`` the Trainer does not pass
``ddp_timeout`` on), which ends the launch; each worker also arms ``faulthandler`` to dump
its stack and exit after ``WORKER_TIMEOUT_S``, and asks the kernel to kill it if torchrun
dies; the whole launch runs under ``TIMEOUT_S``. On any failure or timeout the test ends
torchrun (SIGTERM, then SIGKILL) and any worker still alive (by its recorded pid), and
fails with the tail of the launch log (the launch, the replay and the comparison: ``torchrun_harness``).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from servers import single_thread
from torchrun_harness import ForwardCounter, Launch, arm_worker, compare_stores, reference

WORLD = 2
MAX_STEPS = 4
EVERY = 2
STEPS = [0, 2, 4]
TOL = 1e-5
TIMEOUT_S = 130  # wall-clock limit of the whole torchrun launch (a hang fails, never blocks)
WORKER_TIMEOUT_S = 110  # each worker dumps its stack and exits by itself after this
PG_TIMEOUT_S = 45  # gloo's own collective timeout: a rank left alone in a collective raises


# ------------------------------------------------------------------------------ the worker
def _worker_main(out_dir: str) -> None:
    out = Path(out_dir)
    rank, world = arm_worker(out, WORKER_TIMEOUT_S), int(os.environ["WORLD_SIZE"])  # a hang dumps and exits

    import torch.distributed as dist

    # Joined here, as a training script may, rather than by the Trainer: with use_cpu=True,
    # TrainingArguments does not pass ddp_timeout on, and gloo's default (30 min) would let a
    # collective that one rank never enters block until the deadline. Accelerate adopts the group.
    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    import train_fixtures as tf
    from transformers import Trainer, TrainerCallback

    from drift_monitor.callbacks import DriftMonitorCallback

    mine = out / f"rank{rank}"  # this rank's own world: SAE dir, baseline cache, output dir
    mine.mkdir()
    tok, model, sae_dir, ps = tf.world(mine, seed=0)

    probe_forwards = ForwardCounter(model.model.layers[0])  # layer 0 runs in every probe forward

    class SaveWeights(TrainerCallback):
        """The weights this rank holds at every snapshot step (they do not change within an event)."""

        def _save(self, step, model):
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, mine / f"weights-{step}.pt")

        def on_train_begin(self, args, state, control, model=None, **kw):
            self._save(state.global_step, model)

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % EVERY == 0:
                self._save(state.global_step, model)

    cfg = tf.config(mine, sae_dir, ps, every_n_steps=EVERY, fail_fast=True, db_path=str(out / "drift.duckdb"),
                    prometheus_port=0)
    cb = DriftMonitorCallback(cfg, tok)
    args = tf.training_args(mine, max_steps=MAX_STEPS, per_device_train_batch_size=4, ddp_backend="gloo",
                            seed=0, data_seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=tf.lm_dataset(tok), callbacks=[SaveWeights(), cb])
    cb.attach(trainer)
    trainer.train()

    scraped = None
    if cb.prometheus_port is not None:
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{cb.prometheus_port}/metrics", timeout=10) as r:
            scraped = r.read().decode()
    report = {
        "rank": rank, "world": world,
        "dist_rank": dist.get_rank() if dist.is_initialized() else None,
        "dist_world": dist.get_world_size() if dist.is_initialized() else None,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "args_world_size": args.world_size, "wrapped": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step, "is_zero": trainer.is_world_process_zero(),
        "probe_forwards": probe_forwards.probe, "n_batches": len(cb.monitor.probes.batches),
        "my_batches": [[int(i), bool(c)] for i, c in cb.monitor._my_batches()],
        "done_steps": sorted(cb.done_steps), "errors": cb.errors, "run_id": cb.run_id,
        "has_store": cb.store is not None, "has_exporter": cb.exporter is not None,
        "prometheus_port": cb.prometheus_port, "metrics_text": scraped,
        "logged_steps": [h["step"] for h in trainer.state.log_history if f"drift_monitor/{tf.HOOK}/l0" in h],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # no rank leaves while another is still writing
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the test
def test_ddp_training_stores_what_one_process_measures(tmp_path):
    import torch.distributed as dist
    import train_fixtures as tf

    from drift_monitor.store import StoreReader

    assert not dist.is_initialized(), "the reference must run without a process group"
    out_dir = tmp_path / "ddp"
    out_dir.mkdir()
    r0, r1 = Launch(__file__, out_dir, WORLD, TIMEOUT_S).join()
    db = out_dir / "drift.duckdb"

    # DDP really ran, on both ranks, to the end
    for r, rep in enumerate((r0, r1)):
        assert (rep["rank"], rep["world"], rep["dist_rank"], rep["dist_world"]) == (r, WORLD, r, WORLD), rep
        assert rep["backend"] == "gloo" and rep["args_world_size"] == WORLD
        assert rep["wrapped"] == "DistributedDataParallel", rep["wrapped"]
        assert rep["global_step"] == MAX_STEPS and rep["done_steps"] == STEPS and rep["errors"] == 0
        assert rep["logged_steps"] == STEPS[1:], "every rank logs the all-reduced scalars"
    assert (r0["is_zero"], r1["is_zero"]) == (True, False)
    assert r0["run_id"] and r1["run_id"] is None, "rank 1 never starts a run"

    # the probe set is sharded: 3 batches, rank 1 has one real batch and a dummy forward, and both
    # ranks ran the same number of probe forwards (baseline + 2 snapshots)
    n = r0["n_batches"]
    assert n == 3
    assert r0["my_batches"] == [[0, True], [2, True]] and r1["my_batches"] == [[1, True], [1, False]]
    assert r0["probe_forwards"] == r1["probe_forwards"] == len(STEPS) * 2

    # only rank 0 wrote DuckDB and served Prometheus
    assert r0["has_store"] and not r1["has_store"]
    assert r0["has_exporter"] and not r1["has_exporter"] and r1["prometheus_port"] is None
    assert r0["prometheus_port"] and "drift_monitor_" in (r0["metrics_text"] or "")
    assert not Path(f"{db}.spool").exists(), "no write was spooled (rank 1 never opened the store)"
    assert sorted(p.name for p in out_dir.glob("*.duckdb*")) == ["drift.duckdb"]
    for r in range(WORLD):
        assert not list((out_dir / f"rank{r}").glob("*.duckdb*")), f"rank {r} wrote a DB of its own"
    reader = StoreReader(db)
    runs = reader.runs()
    assert len(runs) == 1 and runs.run_id.iloc[0] == r0["run_id"] and runs.status.iloc[0] == "finished"
    run = r0["run_id"]
    assert reader.steps(run, tf.HOOK) == STEPS

    # both ranks built the same world and held the same weights at every snapshot step
    sae0, sae1 = out_dir / "rank0" / "sae", out_dir / "rank1" / "sae"
    for f in sorted(p.name for p in sae0.iterdir()):
        assert (sae0 / f).read_bytes() == (sae1 / f).read_bytes(), f"SAE file {f} differs between ranks"
    weights = {}
    for step in STEPS:
        w0 = torch.load(out_dir / "rank0" / f"weights-{step}.pt")
        w1 = torch.load(out_dir / "rank1" / f"weights-{step}.pt")
        assert w0.keys() == w1.keys()
        for k in w0:
            assert torch.equal(w0[k], w1[k]), f"step {step}: {k} differs between the ranks"
        weights[step] = w0
    assert any(not torch.equal(weights[4][k], weights[0][k]) for k in weights[0]), "training moved no weight"

    # the single-process reference on the same weights, same probe set, same SAE
    with single_thread():
        ref_db, ref_run, ref_forwards = reference(tmp_path / "ref", {tf.HOOK: str(sae0)}, weights, EVERY)
    assert ref_forwards == len(STEPS) * n  # one process runs every batch
    ref = StoreReader(ref_db)
    act_cos = ref.metric_series(ref_run, names=["act_cosine"]).value.tolist()
    assert act_cos[0] == pytest.approx(1.0) and act_cos[-1] < 1.0, "the reference is not trivial: the model drifted"
    compare_stores(str(db), run, ref_db, ref_run, [tf.HOOK], STEPS, TOL)


if __name__ == "__main__":  # a worker, under torchrun: python tests/test_distributed_training.py worker <out_dir>
    assert sys.argv[1] == "worker", sys.argv
    _worker_main(sys.argv[2])
