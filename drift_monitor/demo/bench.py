"""`drift-monitor bench`: the probe pass against its lower bound, measured in the same run.

Reported as ratios, never absolute targets, so the numbers mean the same on a laptop CPU
and an H100:

* ``ratio_full``   = probe pass ÷ (plain full forward, no hooks + bare SAE encode of the same
  activations): the issue's lower bound. Below 1 means the early stop saves more than the
  monitor's own work (decode, statistics, pairing) costs.
* ``ratio_trunc``  = probe pass ÷ (forward truncated after the hooked layer, no hooks + bare
  encode): the strict bound, the cost of everything the monitor adds to the work it cannot avoid.
* ``ratio_fingerprint`` = the base model's fingerprint (every weight, once per baseline) ÷ one
  probe pass.
* ``ratio_residual`` = the probe pass ÷ the same pass without the residual monitor's error
  moment (``metrics.residual_directions = 0``): what watching the base SAE's blind spot costs.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

SIZES: dict[str, dict[str, Any]] = {
    # name: model config, SAE width, probe shape (prompts × tokens), hooked layer
    "tiny": dict(hidden=64, layers=4, heads=4, vocab=512, d_sae=1024, prompts=64, tokens=32, layer=2, batch=16,
                 density=0.03),
    "mid": dict(hidden=1024, layers=8, heads=16, vocab=32000, d_sae=16384, prompts=256, tokens=64, layer=4, batch=32,
                density=0.005),
}


@dataclass
class BenchResult:
    size: str
    device: str
    probe_pass_s: float
    full_forward_s: float
    trunc_forward_s: float
    encode_s: float
    peak_mem_mb: float
    n_tokens: int
    fingerprint_s: float = 0.0  #: monitor.model_fingerprint of the model (the baseline cache key)
    probe_no_residual_s: float = 0.0  #: the probe pass with metrics.residual_directions = 0
    residual_state_mb: float = 0.0  #: the error moment kept per hook

    @property
    def ratio_residual(self) -> float:
        return self.probe_pass_s / self.probe_no_residual_s if self.probe_no_residual_s else float("nan")

    @property
    def ratio_fingerprint(self) -> float:
        return self.fingerprint_s / self.probe_pass_s

    @property
    def ratio_full(self) -> float:
        return self.probe_pass_s / (self.full_forward_s + self.encode_s)

    @property
    def ratio_trunc(self) -> float:
        return self.probe_pass_s / (self.trunc_forward_s + self.encode_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


class _PeakRSS:
    """Samples this process's resident set size; CPU tensors are invisible to tracemalloc."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> _PeakRSS:
        self.start = self.rss()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def _world(size: str, device: torch.device, dtype: torch.dtype):
    from ..config import MonitorConfig
    from ..monitor import DriftMonitor
    from ..probe.probes import ProbeSet
    from .tiny import build_llama, build_sae, build_tokenizer, collect_activations

    s = SIZES[size]
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(s["vocab"] - 8)]
    prompts = [" ".join(words[j] for j in torch.randint(0, len(words), (s["tokens"] - 1,), generator=g).tolist())
               for _ in range(s["prompts"])]
    cats = ["harmful", "harmless", "general", "general"]
    probes = ProbeSet.from_records([{"id": f"p{i}", "category": cats[i % 4], "prompt": p}
                                    for i, p in enumerate(prompts)])
    tok = build_tokenizer(prompts, chat_template=False)
    model = build_llama(len(tok), hidden=s["hidden"], layers=s["layers"], heads=s["heads"]).to(device, dtype)
    hook = f"model.layers.{s['layer']}"
    # a realistically sparse SAE: thresholds calibrated on the model's own activations
    calib = collect_activations(model, tok, prompts[:32], hook).float()
    sae = build_sae(s["hidden"], s["d_sae"], calibrate=calib, target_density=s["density"]).to(device)
    cfg = MonitorConfig(saes={hook: sae}, probes={"source": probes, "batch_size": s["batch"],
                                                  "max_length": s["tokens"] + 8},
                        outputs={"show_progress": False}, baseline_cache_dir=None, device=str(device))
    mon = DriftMonitor(cfg, tok)
    return mon, model, sae, hook, s


@torch.no_grad()
def run_probe_bench(size: str = "tiny", device: str | None = None, repeats: int = 3,
                    dtype: str = "float32") -> BenchResult:
    from dataclasses import replace

    from ..monitor import DriftMonitor
    from ..probe.baseline_cache import model_fingerprint

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tdtype = getattr(torch, dtype)
    mon, model, sae, hook, s = _world(size, dev, tdtype)
    mon.baseline(model, use_cache=False)
    off = replace(mon.config, metrics=replace(mon.config.metrics, residual_directions=0))
    mon_off = DriftMonitor(off, mon.tokenizer)
    mon_off.baseline(model, use_cache=False)
    batches = [b.to(dev) for b in mon.probes.batches]

    # the lower bound's parts: forwards with no hooks, and the bare encode of the same activations
    def full_forward() -> None:
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    trunc = _truncated(model, s["layer"])

    def trunc_forward() -> None:
        for b in batches:
            trunc(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    acts = [trunc(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state[b.select]
            for b in batches]

    def encode() -> None:
        for a in acts:
            sae.encode(a.to(sae.dtype))

    def probe_pass() -> None:
        mon.snapshot(model, step=1)

    def fingerprint() -> None:
        model_fingerprint(model)

    def probe_no_residual() -> None:
        mon_off.snapshot(model, step=1)

    fns = {"full": full_forward, "trunc": trunc_forward, "enc": encode, "probe": probe_pass, "fp": fingerprint,
           "probe_off": probe_no_residual}
    for fn in fns.values():  # warm-up (allocator, kernels, lazy inits)
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):  # round-robin, so load on the machine hits every measurement alike
        for k, fn in fns.items():
            best[k] = min(best[k], _best(fn, 1, dev))
    t_full, t_trunc, t_enc, t_probe = best["full"], best["trunc"], best["enc"], best["probe"]
    acts.clear()  # free the activations before measuring memory
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        probe_pass()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with _PeakRSS() as m:
            probe_pass()
        peak = (m.peak - m.start) / 2**20
    gram = mon._base[hook].stats.err_gram
    return BenchResult(size, str(dev), t_probe, t_full, t_trunc, t_enc, peak, mon.probes.n_tokens, best["fp"],
                       best["probe_off"], gram.numel() * gram.element_size() / 2**20)


def _truncated(model: Any, layer: int) -> Any:
    """A view of the decoder stack up to ``layer`` (shared weights): the no-hook early-stopped forward."""
    import copy

    inner = copy.copy(model.model)  # shallow: parameters are shared, nothing is copied
    inner._modules = dict(model.model._modules)
    inner.layers = torch.nn.ModuleList(list(model.model.layers)[: layer + 1])
    inner.norm = torch.nn.Identity()
    return inner


def format_result(r: BenchResult) -> str:
    return (f"[{r.size} on {r.device}] tokens={r.n_tokens}  probe pass {r.probe_pass_s * 1e3:.1f} ms | "
            f"full fwd {r.full_forward_s * 1e3:.1f} ms, trunc fwd {r.trunc_forward_s * 1e3:.1f} ms, "
            f"encode {r.encode_s * 1e3:.1f} ms\n"
            f"    ratio vs (full forward + encode)      = {r.ratio_full:.3f}   (target <= 1.15)\n"
            f"    ratio vs (truncated forward + encode) = {r.ratio_trunc:.3f}\n"
            f"    base fingerprint ÷ probe pass         = {r.ratio_fingerprint:.3f}   "
            f"({r.fingerprint_s * 1e3:.1f} ms, every weight, once per baseline)\n"
            f"    probe pass ÷ without residual monitor = {r.ratio_residual:.3f}   "
            f"(error moment {r.residual_state_mb:.1f} MiB per hook)\n"
            f"    peak memory of the probe pass         = {r.peak_mem_mb:.1f} MiB "
            f"({'CUDA allocated' if r.device.startswith('cuda') else 'process RSS increase'})")


def run_store_bench(d_sae: int = 131072, repeats: int = 3) -> str:
    """One big snapshot's Store.write vs a raw DuckDB insert of the same Arrow table."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tests" / "bench" / "bench_store.py"
    if path.is_file():
        spec = importlib.util.spec_from_file_location("bench_store", path)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        mod.main(["--d-sae", str(d_sae), "--repeats", str(repeats)])  # prints its own report
        return ""
    return "store bench: tests/bench/bench_store.py not found (run from a source checkout)"


def main(sizes: list[str], device: str | None, repeats: int, store: bool) -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}")
    for size in sizes:
        print(format_result(run_probe_bench(size, device, repeats)), flush=True)
    if store:
        msg = run_store_bench(repeats=repeats)
        if msg:
            print(msg, flush=True)
