"""Shared by the multi-process training tests (DDP, FSDP2): launching a test file as a torchrun
worker with hang safety, a single-process replay of the callback on saved weights, and comparing
two stores figure by figure.

Hang safety: a worker arms ``faulthandler`` to dump its stack and exit after its own timeout, and
asks the kernel to kill it if torchrun dies (:func:`arm_worker`); the launch runs under a
wall-clock limit, and on any failure or timeout :func:`join` ends torchrun (SIGTERM, then
SIGKILL) and any worker still alive (by its recorded pid, checked against its command line), and
fails with the tail of the launch log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from servers import free_port, stop


# ------------------------------------------------------------------------------ in the worker
def arm_worker(out_dir: Path, timeout_s: float) -> int:
    """Hang safety inside a worker: dump the stack and exit after ``timeout_s``; die with torchrun
    (Linux: PR_SET_PDEATHSIG); record the pid for the parent. Returns the rank."""
    import faulthandler

    faulthandler.dump_traceback_later(timeout_s, exit=True)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    rank = int(os.environ["RANK"])
    (out_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)  # as the in-process reference: identical float results per batch
    return rank


class ForwardCounter:
    """Counts the eval-mode forwards of ``module``: ``probe`` inside the monitor's probe pass,
    ``other`` outside it (the start-refusal generation, ``probe/start.py``, runs eval forwards too)."""

    _in_pass = [0]
    _patched = False

    def __init__(self, module: torch.nn.Module):
        self.probe = self.other = 0
        module.register_forward_pre_hook(self._count)
        if not ForwardCounter._patched:
            from drift_monitor.monitor import DriftMonitor

            inner = DriftMonitor._probe_pass

            def probe_pass(monitor, *a, **k):
                ForwardCounter._in_pass[0] += 1
                try:
                    return inner(monitor, *a, **k)
                finally:
                    ForwardCounter._in_pass[0] -= 1

            DriftMonitor._probe_pass = probe_pass
            ForwardCounter._patched = True

    def _count(self, mod: torch.nn.Module, _args: object) -> None:
        if mod.training:  # a training step
            return
        if ForwardCounter._in_pass[0]:
            self.probe += 1
        else:
            self.other += 1


# ------------------------------------------------------------------------------ launching
class Launch:
    """``python -m torch.distributed.run --nproc_per_node world script worker out_dir``, on loopback."""

    def __init__(self, script: str, out_dir: Path, world: int, timeout_s: float):
        self.script, self.out_dir, self.world, self.timeout_s = Path(script).resolve(), out_dir, world, timeout_s
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   TOKENIZERS_PARALLELISM="false")
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # torchrun sets these
            env.pop(k, None)
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname resolves to
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(self.script), "worker", str(out_dir)]
        self.log = out_dir / "torchrun.log"
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                         cwd=str(self.script.parent))

    def _alive_worker(self, pid: int) -> bool:
        """Is ``pid`` still one of this launch's workers (not a recycled pid)?"""
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return self.script.name.encode() in cmd and str(self.out_dir).encode() in cmd

    def stop(self) -> None:
        """End torchrun (SIGTERM: it stops its workers; then SIGKILL) and any worker left over."""
        stop(self.proc)
        for f in self.out_dir.glob("rank*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(f.read_text())
                if self._alive_worker(pid):
                    os.kill(pid, signal.SIGKILL)

    def join(self) -> list[dict]:
        """Wait (at most ``timeout_s``) for a clean exit; the ranks' ``rank{r}.json`` reports."""
        deadline = time.monotonic() + self.timeout_s
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            code = self.proc.poll()
            if code != 0:
                why = (f"torchrun exited with {code}" if code is not None
                       else f"timed out after {self.timeout_s}s (a hang?)")
                self.stop()
                pytest.fail(f"distributed training: {why}\n{self.log.read_text(errors='replace')[-8000:]}")
        finally:
            self.stop()
        return [json.loads((self.out_dir / f"rank{r}.json").read_text()) for r in range(self.world)]


# ------------------------------------------------------------------------------ the reference
def reference(tmp: Path, saes: dict[str, str], weights: dict[int, dict[str, torch.Tensor]], every: int,
              **settings) -> tuple[str, str, int]:
    """The callback in one process (no process group) on the saved weights of each step (the keys
    of ``weights``, step 0 first), the same tiny world and probe set; ``settings`` are flat
    setting overrides. Returns (DB path, run id, probe-pass forwards counted at layer 0)."""
    import train_fixtures as tf
    from transformers import TrainerControl, TrainerState

    from drift_monitor.callbacks import DriftMonitorCallback

    steps = sorted(weights)
    tok, model, _, ps = tf.world(tmp, seed=0)  # tokenizer and architecture; weights and SAEs from the run
    forwards = ForwardCounter(model.model.layers[0])
    cfg = tf.config(tmp, None, ps, **{"saes": saes, "every_n_steps": every, "fail_fast": True,
                                      "db_path": str(tmp / "ref.duckdb"), **settings})
    cb = DriftMonitorCallback(cfg, tok)
    args = SimpleNamespace(run_name=None, output_dir=str(tmp / "out"))
    state, control = TrainerState(is_world_process_zero=True, is_local_process_zero=True), TrainerControl()
    model.load_state_dict(weights[steps[0]])
    cb.on_train_begin(args, state, control, model=model, processing_class=tok)
    for step in steps[1:]:
        model.load_state_dict(weights[step])
        state.global_step = step
        cb.on_step_end(args, state, control, model=model)
    cb.on_train_end(args, state, control, model=model)
    assert cb.errors == 0 and sorted(cb.done_steps) == steps
    return cfg.outputs.db_path, cb.run_id, forwards.probe


# ------------------------------------------------------------------------------ comparing stores
def frames_close(got, want, keys: list[str], what: str, tol: float) -> None:
    """Same rows (by ``keys``, exactly), numeric columns within ``tol``, NaN equal to NaN, the rest equal."""
    got = got.sort_values(keys).reset_index(drop=True)
    want = want.sort_values(keys).reset_index(drop=True)
    assert list(got.columns) == list(want.columns), what
    assert len(got) == len(want) > 0, f"{what}: {len(got)} rows vs {len(want)}"
    for col in want.columns:
        g, w = got[col].to_numpy(), want[col].to_numpy()
        if col in keys or not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(g.dtype, np.floating)):
            np.testing.assert_array_equal(g, w, err_msg=f"{what}: {col}")
        else:
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol, atol=tol,
                                       equal_nan=True, err_msg=f"{what}: {col}")


def compare_stores(db: str, run: str, ref_db: str, ref_run: str, hooks: list[str], steps: list[int],
                   tol: float) -> None:
    """Every stored figure of ``run`` against ``ref_run``: snapshot rows, every scalar metric, every
    ``feature_stats`` row and the refusal features of each hook at each step, and the alerts."""
    from drift_monitor.store import StoreReader

    got, want = StoreReader(db), StoreReader(ref_db)
    skip = ["run_id", "created_at", "duration_s"]  # ids and timings are not figures
    frames_close(got.snapshots(run).drop(columns=skip), want.snapshots(ref_run).drop(columns=skip),
                 ["step", "hook"], "snapshots", tol)
    frames_close(got.metric_series(run), want.metric_series(ref_run), ["step", "hook", "name"], "metrics", tol)
    for hook in hooks:
        for step in steps:
            frames_close(got.feature_table(run, step, hook, category=None),
                         want.feature_table(ref_run, step, hook, category=None), ["category", "feature"],
                         f"feature_stats of {hook} at step {step}", tol)
        # refusal features: the top rows by score; compared by feature (a rank could only differ on
        # a near-tie, which the score columns would show)
        g_ref, w_ref = got.refusal_features(run, hook), want.refusal_features(ref_run, hook)
        if len(w_ref):
            frames_close(g_ref, w_ref, ["step", "feature"], f"refusal_features of {hook}", tol)
    acols = ["step", "hook", "rule", "severity", "status", "value", "threshold", "resolved_step"]
    g_al, w_al = got.alerts(run)[acols], want.alerts(ref_run)[acols]
    assert len(g_al) == len(w_al), f"alerts: {g_al} vs {w_al}"
    if len(w_al):
        frames_close(g_al, w_al, ["step", "hook", "rule"], "alerts", tol)
