"""A complete TRL SFT + LoRA run with DriftMonitorCallback, on a small local model.

    python examples/train_sft_lora.py --out runs/sft_lora [--model DIR --sae DIR --hook model.layers.N]

With no --model, a tiny Llama, a word-level tokenizer with a chat template and an SAE
calibrated on its activations are built offline (nothing is downloaded), and the fine-tune
teaches it to answer harmful requests with a fixed refusal. With --model / --sae, any local
causal LM and sae-lens SAE directory are used instead (e.g. a base model and an SAE you
trained on it).

While it trains: `drift-monitor runs --db runs/sft_lora/drift.duckdb`, and Prometheus metrics
at http://127.0.0.1:9464/metrics (--prometheus-port).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from drift_monitor import MonitorConfig, ProbeSet
from drift_monitor.callbacks import DriftMonitorCallback

REFUSAL = "I cannot help with that ."


def tiny_world(out: Path, hook: str):
    from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations

    probes = ProbeSet.default()
    tok = build_tokenizer([r.prompt for r in probes.records] + [REFUSAL, "Sure , here is how ."])
    model = build_llama(len(tok), hidden=64, layers=4, seed=0)
    acts = collect_activations(model, tok, [r.prompt for r in probes.records[72:]], hook)
    build_sae(64, 512, calibrate=acts, target_density=0.05).save_model(out / "sae")
    return tok, model, str(out / "sae")


def dataset():
    from datasets import Dataset

    rows = []
    for r in ProbeSet.default().records:
        if r.category == "general":
            continue
        answer = REFUSAL if r.category == "harmful" else "Sure , here is how ."
        rows.append({"messages": [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sft_lora")
    ap.add_argument("--model", help="a local causal LM directory (default: a tiny Llama built offline)")
    ap.add_argument("--sae", help="an sae-lens SAE directory trained on --model")
    ap.add_argument("--hook", default="model.layers.2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10, help="snapshot every N optimizer steps")
    ap.add_argument("--prometheus-port", type=int, default=9464, help="-1 to disable")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from drift_monitor.training.finetune import training_precision

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        if not args.sae:
            ap.error("--sae is required with --model")
        sae = args.sae
    else:
        tok, model, sae = tiny_world(out, args.hook)

    cfg = MonitorConfig(saes={args.hook: sae}, baseline_cache_dir=str(out / "baseline_cache"),
                        probes={"source": "default", "positions": {"harmful": "prompt_end", "harmless": "prompt_end"}},
                        cadence={"every_n_steps": args.every},
                        outputs={"db_path": str(out / "drift.duckdb"), "run_name": "sft-lora-refusal",
                                 "prometheus_port": None if args.prometheus_port < 0 else args.prometheus_port})
    cb = DriftMonitorCallback(cfg)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(out / "checkpoints"), max_steps=args.steps, per_device_train_batch_size=8,
                       learning_rate=3e-3, logging_steps=10, save_strategy="no", report_to=[], max_length=48,
                       seed=0,
                       # TRL defaults to bf16 and gradient checkpointing: ~20x slower on a CPU without bf16.
                       # bf16 only on a GPU that has it; no checkpointing for a small model; the CPU otherwise.
                       **training_precision()),
        train_dataset=dataset(),
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
        callbacks=[cb],
    )
    cb.attach(trainer)  # the scalars go through trainer.log: report_to trackers see them next to the loss
    trainer.train()
    db = cfg.outputs.db_path
    print(f"\nrun {cb.run_id} stored in {db}; list runs with: drift-monitor runs --db {db}")


if __name__ == "__main__":
    main()
