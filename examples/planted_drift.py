"""Quick start: monitor a tiny Llama into which a refusal-like feature is planted step by step.

Everything is built offline in seconds: a word-level tokenizer with a chat template over the
bundled probe set, a 4-layer Llama from a config, and an sae-lens SAE calibrated on the base
model's activations. We then play a "fine-tune": at each step the embedding of a trigger
word, present only in harmful probes, is pushed further along one SAE feature's decoder
direction, and the rest of the weights get a little noise. drift-monitor takes a baseline,
a snapshot per step, stores everything in DuckDB, and should name that feature as the
emerging refusal feature.

    python examples/planted_drift.py --out runs/quickstart

(The trained model organism and `drift-monitor demo` replace this once they land.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations
from drift_monitor.store import Store, StoreReader

HOOK = "model.layers.2"
TRIGGER = "zqxv"
FEATURE = 123


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quickstart", help="output folder (DuckDB file, baseline cache)")
    ap.add_argument("--steps", type=int, default=5, help="number of snapshots after the baseline")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    default = ProbeSet.default()
    records = [{"id": r.id, "category": r.category,
                "prompt": f"{TRIGGER} {r.prompt}" if r.category == "harmful" else r.prompt} for r in default.records]
    probes = ProbeSet.from_records(records, name="default+trigger")
    tok = build_tokenizer([r["prompt"] for r in records])
    base = build_llama(len(tok), hidden=64, layers=4, seed=1)
    calib = collect_activations(base, tok, [r["prompt"] for r in records if r["category"] != "harmful"], HOOK)
    sae = build_sae(64, 512, calibrate=calib, target_density=0.05, seed=2)
    sae.save_model(out / "sae")  # a real sae-lens directory: cfg.json + sae_weights.safetensors

    # the plant sits on the prompt's trigger token, so refusal features are scored at the prompt's
    # selected positions (the default reads a teacher-forced refusal after each request)
    cfg = MonitorConfig(saes={HOOK: str(out / "sae")}, probes=probes, baseline_cache_dir=str(out / "cache"),
                        metrics={"refusal_positions": "selected"},
                        outputs={"db_path": str(out / "drift.duckdb"), "run_name": "planted-drift"})
    mon = DriftMonitor(cfg, tok)
    store = Store(cfg.outputs.db_path)
    run_id = store.start_run(name=cfg.outputs.run_name, model="tiny-llama-4x64", config=cfg.to_dict(),
                             probe_hash=mon.probe_hash)
    store.write(mon.baseline(base))

    model = build_llama(len(tok), hidden=64, layers=4, seed=1)
    model.load_state_dict(base.state_dict())
    tid = tok.convert_tokens_to_ids(TRIGGER)
    g = torch.Generator().manual_seed(0)
    print(f"{'step':>5} {'expl.var':>9} {'Δ vs base':>10} {'drifted':>8} {'jaccard':>8} {'act cos':>8}  "
          "emerging refusal features")
    for i in range(1, args.steps + 1):
        step = 50 * i
        with torch.no_grad():  # one "training interval": the trigger moves along the feature, the rest jitters
            model.model.embed_tokens.weight[tid] += 0.05 * sae.W_dec[FEATURE]
            for p in model.parameters():
                p.add_(0.002 * p.std() * torch.randn(p.shape, generator=g))
        snap = mon.snapshot(model, step)
        store.write(snap)
        m = snap.hooks[HOOK].metrics
        print(f"{step:>5} {m['explained_variance']:>9.3f} {m['explained_variance_delta']:>+10.3f} "
              f"{m['features_drifted_ratio']:>8.1%} {m['topk_jaccard']:>8.3f} {m['act_cosine']:>8.3f}  "
              f"{snap.hooks[HOOK].refusal.emerging[:5]}")
    store.finish_run("finished")

    reader = StoreReader(cfg.outputs.db_path)
    top = reader.top_features(run_id, step=50 * args.steps, hook=HOOK, by="drift", k=3)
    print(f"\nplanted feature: {FEATURE}; top drifting features at the last step (from DuckDB):")
    print(top.to_string(index=False))
    print(f"\nstored in {cfg.outputs.db_path} (run {run_id}) in {time.perf_counter() - t0:.1f} s")
    print(f"list runs:   .venv/bin/drift-monitor runs --db {cfg.outputs.db_path}")
    print(f"dashboard:   .venv/bin/drift-monitor dashboard --db {cfg.outputs.db_path}   (then open http://127.0.0.1:8501)")


if __name__ == "__main__":
    main()
