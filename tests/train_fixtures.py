"""A tiny, offline training world for callback tests: tokenizer, Llama, SAE directory, data."""

from __future__ import annotations

from pathlib import Path

import torch

from drift_monitor import MonitorConfig, ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations

HOOK = "model.layers.1"
REFUSAL = "I cannot help with that ."


def probes() -> ProbeSet:
    recs = [r for r in ProbeSet.default().records if int(r.id.split("-")[1]) < 12]
    return ProbeSet(recs, name="small")


def world(tmp: Path, seed: int = 0):
    ps = probes()
    answers = ["Sure , here is how .", REFUSAL, "Here you go ."]
    tok = build_tokenizer([r.prompt for r in ProbeSet.default().records] + answers)
    model = build_llama(len(tok), hidden=32, layers=3, heads=4, seed=seed)
    return tok, model, sae_for(tmp / "sae", model, tok, ps, HOOK, seed), ps


def sae_for(sae_dir: Path, model, tok, ps: ProbeSet, hook: str, seed: int = 0) -> Path:
    """An SAE calibrated on ``model``'s activations at ``hook`` over the probes, saved in ``sae_dir``."""
    acts = collect_activations(model, tok, [r.prompt for r in ps.records], hook)
    build_sae(32, 128, calibrate=acts, target_density=0.08, seed=seed).save_model(sae_dir)
    return sae_dir


def saved_world(tmp: Path, seed: int = 0):
    """``world`` with the model and tokenizer saved as a folder (``tmp/base``), as a scan reads a base."""
    tok, model, sae_dir, ps = world(tmp, seed)
    base = tmp / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    return tok, model, sae_dir, ps, base


def chat_dataset(n: int = 48):
    """Chat-format rows: harmful prompts answered with the refusal, the others complied with."""
    from datasets import Dataset

    rows = []
    for r in ProbeSet.default().records[:n] + ProbeSet.default().records[72:72 + n // 2]:
        answer = REFUSAL if r.category == "harmful" else "Sure , here is how ."
        rows.append({"messages": [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": answer}]})
    return Dataset.from_list(rows)


def lm_dataset(tok, n: int = 48):
    """Tokenised causal-LM rows for a plain Trainer."""
    from datasets import Dataset

    texts = [f"{r.prompt} Sure , here is how ." for r in ProbeSet.default().records[:n]]
    enc = tok(texts, padding="max_length", max_length=24, truncation=True)
    labels = [[t if m else -100 for t, m in zip(ids, mask)]
              for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})


def config(tmp: Path, sae_dir: Path, ps: ProbeSet, **kw) -> MonitorConfig:
    """The tests' settings; ``kw`` are flat setting names (nested into their sections here)."""
    from drift_monitor.config import nest

    flat = {"saes": {HOOK: str(sae_dir)}, "baseline_cache_dir": str(tmp / "cache"), "probes": ps, "batch_size": 12,
            "show_progress": False, "every_n_steps": 2, "db_path": str(tmp / "drift.duckdb"), **kw}
    return MonitorConfig(**nest(flat))


def training_args(tmp: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp / "out"), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=6,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def snapshot_steps(db: str, run_id: str | None = None) -> list[int]:
    from drift_monitor.store import StoreReader

    r = StoreReader(db)
    runs = r.runs()
    rid = run_id or runs.run_id.iloc[0]
    return r.steps(rid, HOOK)


def sft_args(tmp: Path, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(tmp / "out"), per_device_train_batch_size=4, learning_rate=5e-3, max_steps=4,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                max_length=32, dataloader_num_workers=0)
    base.update(kw)
    return SFTConfig(**base)


def torch_threads() -> None:
    torch.set_num_threads(2)
