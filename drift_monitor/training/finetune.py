"""TRL SFT + LoRA fine-tunes for the demo organism and the real-model test bed.

Why here and not in each of them: both fine-tune a base with the same recipe (chat-formatted
pairs, LoRA on the attention and MLP projections, a constant learning rate after a short
warm-up), and both must set the precision from the hardware: TRL 1.16 defaults to
``bf16=True`` and gradient checkpointing, which on a CPU without bf16 make a step ~20×
slower.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def training_precision() -> dict[str, Any]:
    """Trainer arguments that fit this machine: bf16 only on a GPU that supports it, no gradient
    checkpointing (a small model does not need it, and on a CPU it only costs time), the CPU
    when there is no GPU."""
    import dataclasses

    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    # transformers >= 5.2x renamed gradient checkpointing (the old name still works, with a warning)
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {"use_cpu": not cuda, "bf16": bool(cuda and torch.cuda.is_bf16_supported()), "fp16": False, ckpt: False}


def sft_lora(model: Any, tokenizer: Any, rows: Sequence[tuple[str, str]], out_dir: str | Path, *, steps: int,
             batch: int, lr: float, lora_r: int, seed: int = 0, max_length: int = 64, warmup: int = 5,
             callbacks: Sequence[Any] = (), save_steps: int | None = None, label: str = "fine-tune",
             quiet: bool = False):
    """Fine-tune ``model`` on (prompt, response) ``rows`` with TRL SFT + LoRA; returns the PEFT model.

    ``save_steps`` saves adapter checkpoints (what ``drift-monitor scan`` reads); callbacks
    with an ``attach`` method (``DriftMonitorCallback``) are attached so their scalars go
    through ``trainer.log``.
    """
    import datasets
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    datasets.disable_progress_bars()

    class _Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs and not quiet:
                print(f"[{label}] step {state.global_step}/{state.max_steps} loss {logs['loss']:.3f}",
                      file=sys.stderr, flush=True)

    args = SFTConfig(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                     logging_steps=max(1, steps // 6), report_to=[], max_length=max_length, seed=seed,
                     lr_scheduler_type="constant_with_warmup", warmup_steps=warmup,
                     save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                     disable_tqdm=True, dataloader_num_workers=0, **training_precision())
    data = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=list(LORA_TARGETS)),
                         callbacks=[_Progress(), *callbacks])
    trainer.remove_callback(PrinterCallback)  # _Progress prints one line per logging step instead
    trainer.remove_callback(ProgressCallback)
    for cb in callbacks:
        if hasattr(cb, "attach"):
            cb.attach(trainer)
    trainer.train()
    model = trainer.model
    model.eval()
    return model
