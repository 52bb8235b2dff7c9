"""`drift-monitor scan`: seconds per checkpoint against its lower bound, measured in the same run.

    python tests/bench/bench_scan.py [--n 4] [--hidden 256] [--layers 6] [--device cpu] [--repeats 3]

Builds a small Llama (hidden 256, 6 layers by default), saves N full-model checkpoints and N
LoRA adapter checkpoints of it, runs ``drift_monitor.offline.scan.scan`` over each set, and reports per
checkpoint:

* ``scan s``  the scan's own time for that checkpoint (load + probe pass + alerts + store write,
  ``CheckpointResult.seconds``), best of ``--repeats`` scans (``force=True``);
* ``bound s`` the lower bound: loading the weights (``AutoModelForCausalLM.from_pretrained`` for
  a full checkpoint; ``PeftModel.load_adapter`` + ``set_adapter`` onto an already loaded base for
  an adapter) + a plain forward of the same probe batches (full model, no hooks, no SAE), best of
  ``--repeats``;
* ``ratio`` = scan ÷ bound;
* ``load s`` and ``probe s``: the scan's weight loading and its probe pass (forward to the hooked
  layer + SAE + statistics, ``snapshots.duration_s``), each best of ``--repeats``.

It also counts the scan's base-model loads: 1 for the adapter set (the base is loaded once and
adapters are swapped onto it), 1 + N for the full set.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(root: Path, n: int, hidden: int, layers: int, d_sae: int, device: str) -> dict:
    """Base model + tokenizer, an SAE on the middle layer, N full and N adapter checkpoints."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from drift_monitor import ProbeSet
    from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations

    probes = ProbeSet.default()
    hook = f"model.layers.{layers // 2}"
    tok = build_tokenizer([r.prompt for r in probes.records] + ["I cannot help with that .", "Sure , here is how ."])
    model = build_llama(len(tok), hidden=hidden, layers=layers, heads=8, seed=0)
    acts = collect_activations(model, tok, [r.prompt for r in probes.records], hook)
    sae_dir = root / "sae"
    build_sae(hidden, d_sae, calibrate=acts, target_density=0.02, seed=0).save_model(sae_dir)
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)

    full, lora = root / "full", root / "lora"
    gen = torch.Generator().manual_seed(1)
    for i in range(1, n + 1):  # "training": the weights drift a little more at every checkpoint
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.002 * p.detach().std().clamp_min(1e-3))
        ckpt = full / f"checkpoint-{100 * i}"
        model.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 100 * i}))

    base_model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(base_model, LoraConfig(r=16, lora_alpha=32,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]))
    for i in range(1, n + 1):
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.02 * i if "lora_B" in name else 0.05))
        ckpt = lora / f"checkpoint-{100 * i}"
        peft.save_pretrained(ckpt)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 100 * i}))
    return {"base": base, "sae": sae_dir, "hook": hook, "full": full, "lora": lora}


def lower_bounds(w: dict, kind: str, batches, device: str, repeats: int) -> dict[int, float]:
    """Per checkpoint step: best of ``repeats`` (load its weights + a plain forward of the probe batches)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = w[kind]
    ckpts = sorted(folder.iterdir(), key=lambda p: int(p.name.split("-")[1]))
    batches = [b.to(device) for b in batches]

    @torch.no_grad()
    def forward(m) -> None:
        for b in batches:
            m(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
        _sync(device)

    best: dict[int, float] = {}
    peft = None
    if kind == "lora":  # the base is loaded once, outside the timing (as in the scan)
        base = AutoModelForCausalLM.from_pretrained(w["base"]).to(device).eval()
        peft = PeftModel.from_pretrained(base, str(ckpts[0]), adapter_name="warm")
    for _ in range(repeats):
        for c in ckpts:
            step = int(c.name.split("-")[1])
            gc.collect()
            t0 = time.perf_counter()
            if kind == "full":
                m = AutoModelForCausalLM.from_pretrained(c).to(device).eval()
            else:
                name = f"s{step}"
                peft.load_adapter(str(c), adapter_name=name)
                peft.set_adapter(name)
                m = peft.eval()
            forward(m)
            dt = time.perf_counter() - t0
            if kind == "lora":
                peft.set_adapter("warm")
                peft.delete_adapter(name)
            del m
            best[step] = min(dt, best.get(step, float("inf")))
    return best


def scan_times(w: dict, kind: str, db: Path, device: str, repeats: int, batch_size: int):
    """Per checkpoint step: best of ``repeats`` scans' seconds (and load seconds), and base loads."""
    import drift_monitor.offline.scan as scan_mod
    from drift_monitor.store import StoreReader

    real = scan_mod.load_model
    loads: list[str] = []

    def counting(path, **kw):
        loads.append(str(path))
        return real(path, **kw)

    scan_mod.load_model = counting
    best: dict[int, tuple[float, float, float]] = {}
    base_loads: list[int] = []
    wall: list[float] = []
    try:
        for _ in range(repeats):
            loads.clear()
            t0 = time.perf_counter()
            res = scan_mod.scan(str(w["base"]), {w["hook"]: str(w["sae"])}, checkpoints=[str(w[kind])],
                                db_path=str(db), run_name=kind, device=device, batch_size=batch_size,
                                force=True, progress=False)
            wall.append(time.perf_counter() - t0)
            assert not res.failed, [r.error for r in res.failed]
            base_loads.append(sum(p == str(w["base"]) for p in loads))
            snaps = StoreReader(db).snapshots(kind)
            probe = dict(zip(snaps.step.astype(int), snaps.duration_s))  # the probe pass alone
            for r in res.results:
                s = r.checkpoint.step
                prev = best.get(s, (float("inf"),) * 3)
                best[s] = (min(prev[0], r.seconds), min(prev[1], r.load_seconds), min(prev[2], probe[s]))
    finally:
        scan_mod.load_model = real
    return best, base_loads, len(loads), min(wall)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="checkpoints per kind")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic
        pass

    from drift_monitor import MonitorConfig
    from drift_monitor.monitor import DriftMonitor

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["DRIFT_MONITOR_CACHE"] = str(root / "cache")
        w = build(root, args.n, args.hidden, args.layers, args.d_sae, args.device)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = MonitorConfig(saes={w["hook"]: str(w["sae"])}, probes={"batch_size": args.batch_size},
                            outputs={"show_progress": False, "db_path": None})
        mon = DriftMonitor(cfg, AutoTokenizer.from_pretrained(w["base"]))
        batches = mon.probes.batches
        n_tokens = sum(int(b.attention_mask.sum()) for b in batches)
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(w["base"]).parameters())
        print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {n_params / 1e6:.1f} M params "
              f"({(w['full'] / 'checkpoint-100' / 'model.safetensors').stat().st_size / 2**20:.1f} MiB safetensors); "
              f"SAE {args.hidden}x{args.d_sae} on {w['hook']}; {len(mon.probe_set)} probes, {n_tokens} tokens "
              f"in {len(batches)} batches; device {args.device}, torch threads {torch.get_num_threads()}; "
              f"best of {args.repeats}")
        print(f"{'kind':<8} {'step':>6} {'scan s':>8} {'load s':>8} {'probe s':>8} {'bound s':>8} {'ratio':>6}")
        for kind in ("full", "lora"):
            bound = lower_bounds(w, kind, batches, args.device, args.repeats)
            best, base_loads, n_loads, wall = scan_times(w, kind, root / f"{kind}.duckdb", args.device,
                                                         args.repeats, args.batch_size)
            ratios = []
            for step in sorted(best):
                s, load, probe = best[step]
                ratios.append(s / bound[step])
                print(f"{kind:<8} {step:>6} {s:>8.3f} {load:>8.3f} {probe:>8.3f} {bound[step]:>8.3f} "
                      f"{ratios[-1]:>6.2f}")
            med_scan = statistics.median(v[0] for v in best.values())
            med_bound = statistics.median(bound.values())
            print(f"{kind:<8} {'median':>6} {med_scan:>8.3f} {'':>8} {'':>8} {med_bound:>8.3f} "
                  f"{statistics.median(ratios):>6.2f}   base loads per scan: {base_loads}; "
                  f"load_model calls in the last scan: {n_loads}; whole scan (incl. base + baseline) {wall:.2f} s")
            out[f"{kind}_scan_s"] = med_scan
            out[f"{kind}_bound_s"] = med_bound
            out[f"{kind}_ratio"] = statistics.median(ratios)
            out[f"{kind}_base_loads"] = max(base_loads)
        assert out["lora_base_loads"] == 1, "the adapter scan must load the base exactly once"
    return out


if __name__ == "__main__":
    main()
