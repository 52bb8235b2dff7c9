"""Loading models and tokenizers from disk or the hub, safely by default.

Why one place: the scan, the causal check and ``train-sae`` all load user models, and all must
follow the same rules: safetensors when present (transformers' default), no remote code
unless asked, the model in eval mode on the requested device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DriftMonitorError, first_line


class ModelLoadError(DriftMonitorError, OSError):
    """A model or tokenizer that cannot be loaded from what the user gave, naming the path."""


@contextlib.contextmanager
def load_errors(what: str, path: str | Path, kind: str) -> Iterator[None]:
    """transformers' and safetensors' load failures (a missing folder, a truncated weights
    file, a broken config.json) as one :class:`ModelLoadError` line naming ``what`` (the
    option, e.g. ``--model``) and the path; anything else is left to propagate as a bug."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        hint = ("no such folder, and not a model id on the Hugging Face hub" if not Path(path).exists()
                else f"check that it holds a complete saved {kind}, or save it again")
        raise ModelLoadError(f"{what} {path}: cannot load the {kind} ({first_line(e)}); {hint}") from e


def load_model(path: str | Path, *, device: str = "cpu", dtype: str | None = None, trust_remote_code: bool = False,
               what: str = "model"):
    """A causal LM, safely: safetensors when present, no remote code unless asked. ``what``
    names the path in errors (the CLI passes its option, e.g. ``--base-model``)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype:
        import torch

        kwargs["dtype"] = getattr(torch, dtype)
    with load_errors(what, path, "model"):
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    return model.to(device).eval()


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False, what: str = "model"):
    """The tokenizer saved with a model (pad token set to eos when missing, as the monitor does)."""
    from transformers import AutoTokenizer

    with load_errors(what, path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_pair(model: str | Path, *, adapter: str | Path | None = None, base_model: str | Path | None = None,
              device: str = "cpu", dtype: str | None = None, trust_remote_code: bool = False):
    """A fine-tuned model and its base, as the offline commands take them (``verify``, ``diff-dict``).

    ``model`` is the fine-tuned model, or with ``adapter`` the base the PEFT adapter loads onto:
    then one model serves both, and the base is the adapter switched off (``base_context``, a
    context manager) instead of a second copy in memory. Returns ``(tokenizer, fine_tuned, base,
    base_context)``; ``base`` is the ``base_model`` loaded (None without one), ``base_context``
    None without an adapter.
    """
    tok_dir = adapter if adapter and has_tokenizer(adapter) else model
    tok = load_tokenizer(tok_dir, trust_remote_code=trust_remote_code,
                         what="--adapter" if tok_dir == adapter else "--model")
    m = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, what="--model")
    base = base_ctx = None
    if adapter:
        from peft import PeftModel

        with load_errors("--adapter", adapter, "adapter"):
            m = PeftModel.from_pretrained(m, str(adapter)).eval()
        base_ctx = m.disable_adapter
    elif base_model:
        base = load_model(base_model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          what="--base-model")
    return tok, m, base, base_ctx
