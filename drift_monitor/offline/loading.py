"""Loading models and tokenizers from disk or the hub, safely by default.

Why one place: the scan, the causal check and ``train-sae`` all load user models, and all must
follow the same rules: safetensors when present (transformers' default), no remote code
unless asked, the model in eval mode on the requested device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | None = None, trust_remote_code: bool = False):
    """A causal LM, safely: safetensors when present, no remote code unless asked."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype:
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False):
    """The tokenizer saved with a model (pad token set to eos when missing, as the monitor does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
