"""The callback's cost inside a short SFT + LoRA run, measured in the same run.

    python tests/bench/bench_callback.py [--steps 200] [--every 50] [--batch 16] [--response-words 120]

Reports (a) the share of the run's wall time spent in the monitor (baseline + snapshots, as the
callback measures it: drift_monitor_probe_duration_seconds) at the given cadence — target <= 3%
at the default every_n_steps=50 — and (b) one snapshot's time against a bare forward of the
same probe set (no hooks, full model), best of 3.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16, help="per-device train batch size")
    ap.add_argument("--response-words", type=int, default=120,
                    help="length of each training response (the share depends on tokens per step)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from drift_monitor import MonitorConfig, ProbeSet
    from drift_monitor.callbacks import DriftMonitorCallback
    from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations

    hook = f"model.layers.{args.layers // 2}"
    probes = ProbeSet.default()
    tok = build_tokenizer([r.prompt for r in probes.records] + ["I cannot help with that .", "Sure , here is how ."])
    model = build_llama(len(tok), hidden=args.hidden, layers=args.layers, heads=4)
    acts = collect_activations(model, tok, [r.prompt for r in probes.records[72:]], hook)
    sae = build_sae(args.hidden, 8 * args.hidden, calibrate=acts, target_density=0.03)
    filler = " ".join(r.prompt for r in probes.records[144:]).split()
    reply = " ".join(filler[: args.response_words])
    rows = [{"messages": [{"role": "user", "content": r.prompt},
                          {"role": "assistant", "content": ("I cannot help with that . " if r.category == "harmful"
                                                            else "Sure , here is how . ") + reply}]}
            for r in probes.records]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = MonitorConfig(saes={hook: sae}, baseline_cache_dir=str(Path(tmp) / "cache"),
                            cadence={"every_n_steps": args.every},
                            outputs={"db_path": str(Path(tmp) / "drift.duckdb"), "show_progress": False})
        cb = DriftMonitorCallback(cfg)
        trainer = SFTTrainer(
            model=model, processing_class=tok, train_dataset=Dataset.from_list(rows), callbacks=[cb],
            peft_config=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
            args=SFTConfig(output_dir=str(Path(tmp) / "out"), max_steps=args.steps,
                           per_device_train_batch_size=args.batch, learning_rate=1e-3, report_to=[], use_cpu=True,
                           save_strategy="no", logging_steps=50,
                           max_length=48 + args.response_words * 2, disable_tqdm=True, seed=0))
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
        monitor_s = cb.probe_seconds  # the callback's own report: the baseline pass is already in it
        n_snaps = len(cb.done_steps) - 1

        mon, m = cb.monitor, trainer.model
        batches = mon.probes.batches

        @torch.no_grad()
        def bare() -> None:
            for b in batches:
                m(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

        def best(fn) -> float:
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return min(ts)

        m.eval()
        t_bare = best(bare)
        t_snap = best(lambda: mon.snapshot(m, step=10_000))
    base_s = cb.monitor.base_snapshot.duration_s
    snaps_s = monitor_s - base_s
    res = {"wall_s": wall, "monitor_s": monitor_s, "share": monitor_s / wall, "snapshots": n_snaps,
           "baseline_s": base_s, "snapshots_s": snaps_s, "share_snapshots": snaps_s / wall,
           "snapshot_s": t_snap, "bare_forward_s": t_bare, "snapshot_vs_forward": t_snap / t_bare}
    print(f"SFT+LoRA, Llama {args.hidden}x{args.layers}, SAE {8 * args.hidden}, {args.steps} steps of "
          f"{args.batch} x ~{args.response_words + 15} tokens, "
          f"snapshot every {args.every} ({n_snaps} + baseline), probe set {mon.probes.n_tokens} tokens")
    print(f"  run wall time          {wall:8.1f} s")
    print(f"  monitor (base + snaps) {monitor_s:8.2f} s   share {100 * res['share']:.2f}% (target <= 3%)")
    print(f"    baseline {base_s:.2f} s (once per run; cached on disk), snapshots {snaps_s:.2f} s "
          f"({100 * res['share_snapshots']:.2f}%)")
    print(f"  one snapshot           {t_snap * 1e3:8.1f} ms  vs bare forward of the probe set "
          f"{t_bare * 1e3:.1f} ms: {res['snapshot_vs_forward']:.2f}x")
    return res


if __name__ == "__main__":
    main()
