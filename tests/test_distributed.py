"""The probe pass sharded over a real torch.distributed group must equal one process.

Two CPU processes join a gloo group on loopback (this file is also their entry point:
``python tests/test_distributed.py <mode> <out_dir> [cache_dir]``). Each builds the same tiny
Llama, tokenizer and SAE from fixed seeds and runs ``DriftMonitor.baseline`` and
``snapshot`` over a probe set whose batch count is odd, so rank 1 has one batch fewer and
must run a dummy forward it ignores. Both ranks write what they measured; the test runs the
same computation in this process (no process group) and compares: every scalar metric and
per-feature array to 1e-5, NaN equal to NaN, and rank 0 bitwise equal to rank 1.

A second, smaller test checks ``HookStats.all_reduce`` directly: each rank streams half of
the data, and after the all-reduce both must hold the statistics of the whole.

Every worker runs under a deadline: a hang (a collective one rank never enters) fails the
test after ``TIMEOUT_S`` instead of blocking CI.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from servers import single_thread

HOOK = "model.layers.2"
HIDDEN, LAYERS, D_SAE = 64, 4, 512
BATCH_SIZE = 20  # 216 default probes -> 11 batches: odd, and the last one is short
WORLD = 2
STEP = 5
TIMEOUT_S = 120  # wall-clock limit for the worker processes (a hang fails, never blocks)
PG_TIMEOUT_S = 60  # gloo's own collective timeout, so a stuck rank also exits by itself

FEATURE_COLS = ("count", "base_count", "density", "mean_act", "max_act", "drift", "log_density_ratio")
REFUSAL_COLS = ("harmful_drift", "harmless_drift", "refusal_score", "z_score")


# ------------------------------------------------------------------------------ the computations
def _build_world():
    """The same tiny tokenizer, base model, fine-tuned model and SAE in every process."""
    from drift_monitor import ProbeSet
    from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations

    probes = ProbeSet.default()
    texts = [r.prompt for r in probes.records]
    tok = build_tokenizer(texts)
    base = build_llama(len(tok), hidden=HIDDEN, layers=LAYERS, seed=1)
    acts = collect_activations(base, tok, texts, HOOK)
    sae = build_sae(HIDDEN, D_SAE, calibrate=acts, target_density=0.05, seed=2)
    cur = build_llama(len(tok), hidden=HIDDEN, layers=LAYERS, seed=1)
    cur.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in cur.parameters():  # "fine-tuning": weights + 0.2·noise·std, a fixed draw
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(0.2 * std * torch.randn(p.shape, generator=g))
    return probes, tok, base, cur, sae


def _snapshot_arrays(prefix: str, snap) -> dict[str, np.ndarray]:
    h = snap.hooks[HOOK]
    out: dict[str, np.ndarray] = {f"{prefix}.n_tokens": np.asarray(snap.n_tokens, dtype=np.int64)}
    for name, v in h.metrics.items():
        out[f"{prefix}.metric.{name}"] = np.asarray(v, dtype=np.float64)
    for cat, fs in h.features.items():
        out[f"{prefix}.{cat}.n_tokens"] = np.asarray(fs.n_tokens, dtype=np.int64)
        for col in FEATURE_COLS:
            out[f"{prefix}.{cat}.{col}"] = np.asarray(getattr(fs, col))
    if h.refusal is not None:
        for col in REFUSAL_COLS:
            out[f"{prefix}.refusal.{col}"] = np.asarray(getattr(h.refusal, col))
        out[f"{prefix}.refusal.emerging"] = np.asarray(sorted(h.refusal.emerging), dtype=np.int64)
    return out


def _count_probe_passes(mon) -> list[int]:
    """Wrap ``mon._probe_pass`` so that the returned one-item list counts its calls."""
    calls = [0]
    real = mon._probe_pass

    def counting(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    mon._probe_pass = counting
    return calls


def _monitor_results(cache_dir: str) -> dict[str, np.ndarray]:
    """baseline + snapshot, then the same again from the baseline cache (what a restart does)."""
    from torchrun_harness import ForwardCounter

    from drift_monitor import DriftMonitor, MonitorConfig

    probes, tok, base, cur, sae = _build_world()
    forwards = ForwardCounter(base.model.layers[0])  # the probe pass's forwards, not the start's generation
    cfg = MonitorConfig(saes={HOOK: sae}, baseline_cache_dir=cache_dir,
                        probes={"source": probes, "batch_size": BATCH_SIZE}, outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    out: dict[str, np.ndarray] = {}
    out.update(_snapshot_arrays("base", mon.baseline(base)))
    out["base_forwards"] = np.asarray(forwards.probe)
    out["n_batches"] = np.asarray(len(mon.probes.batches))
    out["my_batches"] = np.asarray([[i, c] for i, c in mon._my_batches()], dtype=np.int64)
    out.update(_snapshot_arrays("snap", mon.snapshot(cur, step=STEP)))

    again = DriftMonitor(cfg, tok)  # a fresh monitor: the baseline must come from the cache
    passes = _count_probe_passes(again)
    out.update(_snapshot_arrays("cached_base", again.baseline(base)))
    out["cached_base_probe_passes"] = np.asarray(passes[0])
    out.update(_snapshot_arrays("cached_snap", again.snapshot(cur, step=STEP)))

    # One rank lost its cache file (killed before it wrote it, a node-local disk wiped): a hit
    # on some ranks and a miss on others must not leave one rank in the probe pass's
    # collectives alone; every rank measures the base again.
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == world - 1:
        again._cache_path(again.base_fingerprint).unlink()
    third = DriftMonitor(cfg, tok)
    passes = _count_probe_passes(third)
    out.update(_snapshot_arrays("partial_base", third.baseline(base)))
    out["partial_base_probe_passes"] = np.asarray(passes[0])
    out.update(_snapshot_arrays("partial_snap", third.snapshot(cur, step=STEP)))
    return out


def _stats_data():
    """Tokens of a fake hook: x, x̂, codes, category, and base-model pairs; one row is NaN."""
    from drift_monitor.probe import metrics as M
    from drift_monitor.probe.stats import PairedBatch

    g = torch.Generator().manual_seed(0)
    n, d, d_sae, k = 240, 16, 48, 8
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, d_sae, generator=g) / d ** 0.5
    codes = torch.relu(x @ w - 0.8)
    x_hat = codes @ w.T + 0.1 * torch.randn(n, d, generator=g)
    half = n // 2
    # category 2 only in the second half (rank 0 never sees it: its act_max stays -inf there),
    # category 3 nowhere
    cat = torch.cat([torch.randint(0, 2, (half,), generator=g), torch.randint(0, 3, (n - half,), generator=g)])
    x0 = x + 0.3 * torch.randn(n, d, generator=g)
    codes0 = torch.relu(x0 @ w - 0.8)
    pair = PairedBatch(x0, M.topk_indices(codes0, k), (codes0 > 0).sum(1).to(torch.int32))
    x[n - 3, 0] = float("nan")  # a non-finite token, dropped and counted
    chunks = [slice(s, s + 60) for s in range(0, n, 60)]  # 4 batches; rank r streams 2r, 2r+1
    return ["a", "b", "c", "d"], d, d_sae, k, x, x_hat, codes, cat, pair, chunks


def _stream(chunk_ids: list[int]):
    from drift_monitor.probe import metrics as M
    from drift_monitor.probe.stats import HookStats, PairedBatch

    cats, d, d_sae, k, x, x_hat, codes, cat, pair, chunks = _stats_data()
    st = HookStats(cats, d, d_sae)
    for i in chunk_ids:
        s = chunks[i]
        p = PairedBatch(pair.x[s], pair.top_idx[s], pair.l0[s])
        st.update(x[s], x_hat[s], codes[s], cat[s], pair=p, k_max=k, top_idx=M.topk_indices(codes[s], k))
    return st


def _stats_results(rank: int, world: int) -> dict[str, np.ndarray]:
    n_chunks = len(_stats_data()[-1])
    st = _stream(list(range(rank * n_chunks // world, (rank + 1) * n_chunks // world)))
    st.all_reduce()
    return {k: v.numpy() for k, v in st.state_dict().items()}


# ------------------------------------------------------------------------------ worker processes
def _worker_main(mode: str, out_dir: str, *extra: str) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # as the in-process reference: identical float results per batch
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        res = _monitor_results(extra[0]) if mode == "monitor" else _stats_results(rank, world)
        np.savez(Path(out_dir) / f"rank{rank}.npz", **res)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out_dir: Path, *extra: str) -> list[tuple[subprocess.Popen, Path]]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname resolves to
    procs = []
    for r in range(WORLD):
        log = out_dir / f"rank{r}.log"
        with log.open("wb") as fh:
            p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), mode, str(out_dir), *extra],
                                 env={**env, "RANK": str(r)}, stdout=fh, stderr=subprocess.STDOUT)
        procs.append((p, log))
    return procs


def _join(procs: list[tuple[subprocess.Popen, Path]], out_dir: Path) -> list[dict[str, np.ndarray]]:
    """Wait for every rank; kill all of them on a failure or past the deadline, and fail."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            codes = [p.poll() for p, _ in procs]
            if all(c == 0 for c in codes):
                break
            failed = any(c not in (None, 0) for c in codes)
            if failed or time.monotonic() > deadline:
                why = "a rank failed" if failed else f"timed out after {TIMEOUT_S}s (a hang?)"
                logs = "\n".join(f"--- rank {r} (exit {p.poll()}) ---\n{log.read_text(errors='replace')[-4000:]}"
                                 for r, (p, log) in enumerate(procs))
                pytest.fail(f"distributed workers: {why}\n{logs}")
            time.sleep(0.1)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for r in range(WORLD):
        with np.load(out_dir / f"rank{r}.npz") as f:
            out.append({k: f[k] for k in f.files})
    return out




def _assert_close(got: dict, want: dict, what: str, tol: float) -> None:
    assert sorted(got) == sorted(want), f"{what}: different keys"
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, equal_nan=True, err_msg=f"{what}: {k}")


def _assert_identical(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: different keys"
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")  # NaN == NaN here


# ------------------------------------------------------------------------------ the tests
def _not_in_a_group():
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _kill_on_error(procs):
    """If the parent's own work fails, kill the workers rather than leave them to time out."""
    try:
        yield
    except BaseException:
        for p, _ in procs:
            p.kill()
            p.wait()
        raise


def test_sharded_probe_pass_equals_single_process(tmp_path):
    assert _not_in_a_group(), "the reference must run without a process group"
    out_dir, cache_dir = tmp_path / "out", tmp_path / "cache"  # one cache dir shared by both ranks
    out_dir.mkdir()
    procs = _launch("monitor", out_dir, str(cache_dir))
    with _kill_on_error(procs), single_thread():  # the single-process reference, while the workers run
        ref = _monitor_results(str(tmp_path / "ref_cache"))
    r0, r1 = _join(procs, out_dir)

    # the set-up this test is about: an odd batch count, and rank 1 ran a dummy forward
    n = int(ref["n_batches"])
    assert n % 2 == 1 and n > WORLD
    assert [tuple(b) for b in r0["my_batches"]] == [(i, 1) for i in range(0, n, 2)]
    assert [tuple(b) for b in r1["my_batches"]] == [(i, 1) for i in range(1, n, 2)] + [(1, 0)]
    assert int(r0["base_forwards"]) == int(r1["base_forwards"]) == (n + 1) // 2  # equally many forwards
    assert int(ref["base_forwards"]) == n
    # the restart read the baseline from the cache: one file per rank, under one world-size key
    assert int(r0["cached_base_probe_passes"]) == int(r1["cached_base_probe_passes"]) == 0
    files = sorted(p.relative_to(cache_dir).as_posix() for p in cache_dir.rglob("*.safetensors"))
    assert len(files) == 2 and [f.split("/")[1] for f in files] == ["rank0.safetensors", "rank1.safetensors"]
    assert files[0].split("/")[0] == files[1].split("/")[0], files
    # rank 1's file was deleted: rank 0's hit is overruled, and both ranks measure the base again
    assert int(r0["partial_base_probe_passes"]) == int(r1["partial_base_probe_passes"]) == 1
    # the reference is not trivial: the fine-tuned model did drift, and counts came out whole
    assert float(ref["snap.metric.act_relative_mse"]) > 0 and float(ref["snap.metric.topk_jaccard"]) < 1
    assert float(ref["snap.metric.features_drifted_ratio"]) > 0
    assert int(ref["snap.n_tokens"]) == int(ref["snap.all.n_tokens"]) > 0
    for k in ("harmful", "harmless", "general"):
        assert f"snap.{k}.density" in ref
    assert "snap.refusal.refusal_score" in ref

    skip = {"base_forwards", "my_batches", "cached_base_probe_passes", "partial_base_probe_passes"}
    ref_c = {k: v for k, v in ref.items() if k not in skip}
    for name, r in (("rank 0", r0), ("rank 1", r1)):
        _assert_close({k: v for k, v in r.items() if k not in skip}, ref_c, f"{name} vs one process", 1e-5)
    _assert_identical({k: v for k, v in r1.items() if k not in skip}, {k: v for k, v in r0.items() if k not in skip},
                      "rank 1 vs rank 0")
    # the cached baseline, and the one measured again after a partial hit, give the same numbers
    for again in ("cached", "partial"):
        for pre in ("base", "snap"):
            _assert_identical({k[len(again) + 1:]: v for k, v in r0.items() if k.startswith(f"{again}_{pre}.")},
                              {k: v for k, v in r0.items() if k.startswith(f"{pre}.")}, f"{again} {pre} vs fresh")


def test_hookstats_all_reduce_sums_the_halves(tmp_path):
    procs = _launch("stats", tmp_path)
    with _kill_on_error(procs):
        n_chunks = len(_stats_data()[-1])
        whole = _stream(list(range(n_chunks)))
        before = {k: v.clone() for k, v in whole.state_dict().items()}
        whole.all_reduce()  # no process group: a no-op
        ref = {k: v.numpy() for k, v in whole.state_dict().items()}
    r0, r1 = _join(procs, tmp_path)
    for k, v in before.items():
        np.testing.assert_array_equal(ref[k], v.numpy(), err_msg=k)
    assert ref["nonfinite"].sum() == 1 and np.isneginf(ref["act_max"][3]).all()
    assert np.isfinite(ref["act_max"][2]).any()  # category 2 lives only in rank 1's half
    _assert_identical(r1, r0, "rank 1 vs rank 0")
    _assert_close(r0, ref, "all-reduced halves vs the whole", 1e-10)
    np.testing.assert_array_equal(r0["act_max"], ref["act_max"])  # a max is exact


if __name__ == "__main__":  # a worker: python tests/test_distributed.py <mode> <out_dir> [cache_dir]
    _worker_main(*sys.argv[1:])
