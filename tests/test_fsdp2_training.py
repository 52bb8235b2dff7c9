"""DriftMonitorCallback inside a real 2-process FSDP2 training run (``fully_shard``, torchrun,
gloo, CPU), monitoring two hooks: the stored figures equal a single-process replay on the
gathered full weights (≤ 1e-5), as the DDP test (test_distributed_training.py) checks for DDP.

1. ``python -m torch.distributed.run --nproc_per_node 2`` launches this file as the worker. Each
   rank builds the tiny Llama world from fixed seeds in its own folder, with one SAE at
   ``model.layers.0`` and one at ``model.layers.1``, shards the model with
   ``torch.distributed.fsdp.fully_shard`` (each decoder layer, then the root), and trains it for
   ``MAX_STEPS`` AdamW steps on its own slice of the data, calling the callback's hooks the way
   the HF Trainer does (``on_train_begin``, ``on_step_end`` after the optimizer step,
   ``on_train_end``), with ``DriftMonitorCallback(every_n_steps=2, fail_fast=True,
   early_stop="auto")`` writing one shared DuckDB file (rank 0 only). At every snapshot step
   (0, 2, 4) the ranks gather the full weights onto rank 0 (``get_model_state_dict`` with
   ``full_state_dict=True, cpu_offload=True``, a collective), which saves them.

   Why a plain loop, not ``transformers.Trainer``: the Trainer reaches FSDP2 only through
   accelerate's FSDP plugin (``fsdp=`` arguments; ``accelerate.utils.fsdp2_prepare_model``
   leaves a model that already is an ``FSDPModule`` as it is), and whether that path runs on
   CPU with gloo was not established here; a failure there would test accelerate, not the
   monitor. The callback only sees ``(args, state, control, model)``, so a loop that fires the
   same events at the same points (``on_step_end`` after the optimizer step) runs the same code.
2. This process replays the callback in one process, with no process group, on rank 0's
   gathered weights of each step, and compares every stored figure of both hooks
   (``torchrun_harness.compare_stores``).

The start model's refusal (``probe/start.py``: greedy generation) is not measured for a sharded
model (every rank would have to generate the same number of tokens in step); the workers keep
the default ``start_refusal_tokens`` (16), so its absence in the store is the sharding's doing,
and the replay is run with ``start_refusal_tokens=0`` so it leaves the metrics out as well: with
them, the ``refusal_erosion`` rule's gate (``requires:``) would differ between the two stores and
the comparison would test the gate, not the measurement. A replay with the default measures them
(checked here), so their absence on the FSDP side is not a property of the tiny world.

Also checked: the model really was sharded (every parameter a DTensor on each rank,
``is_sharded`` true, its local shard smaller than the full tensor), both ranks ran the same
number of probe forwards (3 batches: rank 1 runs a dummy forward; a sharded model all-gathers
in every layer, so a rank that skipped one would hang the other), the full forward ran (no
early stop: the LM head ran in every probe forward), exactly one run with steps [0, 2, 4] at both
hooks, rank 1 never opened the store. Hang safety as in the DDP test (``torchrun_harness``).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from servers import single_thread
from torchrun_harness import ForwardCounter, Launch, arm_worker, compare_stores, reference

WORLD = 2
MAX_STEPS = 4
EVERY = 2
STEPS = [0, 2, 4]
HOOKS = ["model.layers.0", "model.layers.1"]
BATCH = 4  # rows per rank per step
TOL = 1e-5
TIMEOUT_S = 170  # wall-clock limit of the whole torchrun launch (a hang fails, never blocks)
WORKER_TIMEOUT_S = 150  # each worker dumps its stack and exits by itself after this
PG_TIMEOUT_S = 45  # gloo's own collective timeout: a rank left alone in a collective raises


# ------------------------------------------------------------------------------ the worker
def _shard(model: torch.nn.Module) -> None:
    """FSDP2 as accelerate (FULL_SHARD) applies it: every decoder layer, then the root, each with
    ``reshard_after_forward=True`` (fully_shard's own default keeps the root's parameters whole
    after a forward; accelerate reshards it too, so the LM head is a sharded DTensor between forwards)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)


def _sharding_facts(model: torch.nn.Module) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from drift_monitor.probe.capture import is_sharded

    params = list(model.parameters())
    return {"is_sharded": is_sharded(model), "fsdp_root": isinstance(model, FSDPModule),
            "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "local_smaller": all(p.to_local().numel() < p.numel() for p in params if p.dim() and p.shape[0] > 1)}


def _worker_main(out_dir: str) -> None:
    out = Path(out_dir)
    rank, world = arm_worker(out, WORKER_TIMEOUT_S), int(os.environ["WORLD_SIZE"])

    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    dist.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    import train_fixtures as tf
    from transformers import TrainerControl, TrainerState

    from drift_monitor.callbacks import DriftMonitorCallback

    mine = out / f"rank{rank}"  # this rank's own world: SAE dirs, baseline cache, output dir
    mine.mkdir()
    tok, model, sae1, ps = tf.world(mine, seed=0)
    sae0 = tf.sae_for(mine / "sae0", model, tok, ps, HOOKS[0], seed=1)
    data = tf.lm_dataset(tok).with_format("torch")

    layer0 = ForwardCounter(model.model.layers[0])  # runs in every probe forward
    head = ForwardCounter(model.lm_head)  # reached in a probe forward only without an early stop
    _shard(model)
    facts = _sharding_facts(model)
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def save_full(step: int) -> None:  # a collective: every rank gathers, rank 0 receives and saves
        sd = get_model_state_dict(model, options=full_opts)
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in sd.items()}, out / f"weights-{step}.pt")

    cfg = tf.config(mine, None, ps, saes={HOOKS[0]: str(sae0), HOOKS[1]: str(sae1)}, every_n_steps=EVERY,
                    fail_fast=True, early_stop="auto", db_path=str(out / "drift.duckdb"))
    cb = DriftMonitorCallback(cfg, tok)
    args = SimpleNamespace(run_name=None, output_dir=str(mine / "out"))
    state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=rank == 0)
    control = TrainerControl()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)

    model.train()
    save_full(0)
    cb.on_train_begin(args, state, control, model=model, processing_class=tok)
    losses = []
    for step in range(1, MAX_STEPS + 1):
        lo = ((step - 1) * world + rank) * BATCH  # this rank's rows of the global batch
        batch = data[lo:lo + BATCH]
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
        state.global_step = step
        if step % EVERY == 0:
            save_full(step)
        cb.on_step_end(args, state, control, model=model)
    cb.on_train_end(args, state, control, model=model)

    report = {
        "rank": rank, "world": world, "dist_world": dist.get_world_size(), "backend": dist.get_backend(),
        **facts, "probe_forwards": layer0.probe, "head_forwards": head.probe, "other_forwards": layer0.other,
        "losses": losses, "n_batches": len(cb.monitor.probes.batches),
        "my_batches": [[int(i), bool(c)] for i, c in cb.monitor._my_batches()],
        "early_stop": cb.monitor._early_stop(model), "start_refusal": cb.monitor.start_refusal,
        "done_steps": sorted(cb.done_steps), "errors": cb.errors, "run_id": cb.run_id,
        "has_store": cb.store is not None,
        "logged_steps": {h: [e["step"] for e in state.log_history if f"drift_monitor/{h}/l0" in e] for h in HOOKS},
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # no rank leaves while another is still writing
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the test
def test_fsdp2_training_stores_what_one_process_measures(tmp_path):
    import torch.distributed as dist

    from drift_monitor.probe.start import START_METRICS
    from drift_monitor.store import StoreReader

    assert not dist.is_initialized(), "the reference must run without a process group"
    out_dir = tmp_path / "fsdp2"
    out_dir.mkdir()
    r0, r1 = Launch(__file__, out_dir, WORLD, TIMEOUT_S).join()
    db = out_dir / "drift.duckdb"

    # FSDP2 really sharded the model, on both ranks, and training ran to the end
    n = r0["n_batches"]
    assert n == 3
    for r, rep in enumerate((r0, r1)):
        assert (rep["rank"], rep["world"], rep["dist_world"], rep["backend"]) == (r, WORLD, WORLD, "gloo"), rep
        assert rep["is_sharded"] and rep["fsdp_root"] and rep["all_dtensor"] and rep["local_smaller"], rep
        assert rep["early_stop"] is False, "early_stop='auto' must run the full forward on a sharded model"
        assert rep["done_steps"] == STEPS and rep["errors"] == 0 and len(rep["losses"]) == MAX_STEPS
        assert rep["start_refusal"] == {}, "no generation under FSDP: the start refusal is not measured"
        # every rank in every probe forward: baseline + 2 snapshots, 2 forwards each, and every one
        # ran to the LM head (no early stop)
        assert rep["probe_forwards"] == rep["head_forwards"] == len(STEPS) * 2, rep
        assert rep["other_forwards"] == 0, "no generation (start refusal) forward ran on a sharded model"
        for h in HOOKS:
            assert rep["logged_steps"][h] == STEPS[1:], "every rank logs the all-reduced scalars"
    assert r0["my_batches"] == [[0, True], [2, True]] and r1["my_batches"] == [[1, True], [1, False]]
    assert r0["losses"] != r1["losses"], "the ranks trained on different rows"

    # only rank 0 wrote the store: one run, both hooks at every snapshot step
    assert r0["has_store"] and not r1["has_store"] and r0["run_id"] and r1["run_id"] is None
    assert not Path(f"{db}.spool").exists(), "no write was spooled (rank 1 never opened the store)"
    assert sorted(p.name for p in out_dir.glob("*.duckdb*")) == ["drift.duckdb"]
    reader = StoreReader(db)
    runs = reader.runs()
    assert len(runs) == 1 and runs.run_id.iloc[0] == r0["run_id"] and runs.status.iloc[0] == "finished"
    run = r0["run_id"]
    for h in HOOKS:
        assert reader.steps(run, h) == STEPS, h
    assert not set(reader.metric_series(run).name) & set(START_METRICS.values())

    # both ranks built the same SAEs; the gathered weights moved
    for d in ("sae", "sae0"):
        a, b = out_dir / "rank0" / d, out_dir / "rank1" / d
        for f in sorted(p.name for p in a.iterdir()):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"SAE file {d}/{f} differs between ranks"
    weights = {step: torch.load(out_dir / f"weights-{step}.pt") for step in STEPS}
    assert all(type(v) is torch.Tensor for v in weights[0].values()), "full, plain tensors"
    assert any(not torch.equal(weights[4][k], weights[0][k]) for k in weights[0]), "training moved no weight"

    # the single-process replay on the gathered weights, same probe set, same SAEs
    saes = {HOOKS[0]: str(out_dir / "rank0" / "sae0"), HOOKS[1]: str(out_dir / "rank0" / "sae")}
    with single_thread():
        ref_db, ref_run, ref_forwards = reference(tmp_path / "ref", saes, weights, EVERY, start_refusal_tokens=0)
    assert ref_forwards == len(STEPS) * n  # one process runs every batch
    ref = StoreReader(ref_db)
    for h in HOOKS:
        act_cos = ref.metric_series(ref_run, h, names=["act_cosine"]).value.tolist()
        assert act_cos[0] == pytest.approx(1.0) and act_cos[-1] < 1.0, f"{h}: the model did not drift"
    compare_stores(str(db), run, ref_db, ref_run, HOOKS, STEPS, TOL)

    # the replay with the default settings does measure the start refusal: its absence above is the
    # sharding's doing, not the tiny world's
    with single_thread():
        full_db, full_run, _ = reference(tmp_path / "ref_default", saes, {0: weights[0], EVERY: weights[EVERY]},
                                         EVERY)
    assert set(START_METRICS.values()) <= set(StoreReader(full_db).metric_series(full_run).name)


if __name__ == "__main__":  # a worker, under torchrun: python tests/test_fsdp2_training.py worker <out_dir>
    assert sys.argv[1] == "worker", sys.argv
    _worker_main(sys.argv[2])
