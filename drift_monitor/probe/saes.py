"""Loading SAEs through sae-lens, and the checks that catch a wrong SAE at start-up.

Sources: an SAE object; a local sae-lens directory (``cfg.json`` + ``sae_weights.safetensors``,
``SAE.load_from_disk``); or ``"release:sae_id"`` for the hub (``SAE.from_pretrained``). Any
sae-lens architecture works because we only call ``encode``/``decode``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class SAELoadError(ValueError):
    """An SAE that cannot be loaded or does not fit the model, with the fix in the message."""


@dataclass
class HookedSAE:
    """An SAE bound to the module whose output it reads."""

    hook: str  # the name the user gave (or the SAE's metadata hook_name)
    sae: Any  # sae_lens.SAE
    source: str
    sparse_decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)


def load_sae(source: Any, device: str | torch.device = "cpu", dtype: str | None = None) -> Any:
    """An sae-lens SAE from an object, a local directory or ``"release:sae_id"``."""
    if hasattr(source, "encode") and hasattr(source, "decode") and hasattr(source, "cfg"):
        sae = source
        if dtype is not None:
            sae = sae.to(dtype=getattr(torch, dtype))
        return sae.to(device)
    from sae_lens import SAE

    if isinstance(source, Path) or (isinstance(source, str) and Path(source).exists()):
        path = Path(source)
        if not (path / "cfg.json").is_file():
            raise SAELoadError(
                f"{path} is not an sae-lens SAE directory: it has no cfg.json "
                "(expected cfg.json + sae_weights.safetensors, as written by SAE.save_model)"
            )
        if not (path / "sae_weights.safetensors").is_file():
            raise SAELoadError(f"{path}: cfg.json found but sae_weights.safetensors is missing")
        return SAE.load_from_disk(str(path), device=str(device), dtype=dtype)
    if isinstance(source, str) and ":" in source and not source.startswith((".", "/", "~")):
        release, sae_id = source.split(":", 1)
        return SAE.from_pretrained(release, sae_id, device=str(device), dtype=dtype or "float32")
    raise SAELoadError(
        f"cannot load an SAE from {source!r}: give a local sae-lens directory (cfg.json + "
        "sae_weights.safetensors), 'release:sae_id' for a sae-lens hub release, or an SAE object"
    )


def metadata_hook_name(sae: Any) -> str | None:
    """The hook an sae-lens 6.x SAE was trained on (``cfg.metadata.hook_name``)."""
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else None
    return name or getattr(sae.cfg, "hook_name", None)


def bind_sae(hook: str | None, source: Any, device: str | torch.device, dtype: str | None) -> HookedSAE:
    sae = load_sae(source, device=device, dtype=dtype)
    sae.eval()
    if hook is None:
        hook = metadata_hook_name(sae)
        if not hook:
            raise SAELoadError(
                f"SAE {_describe(source)} names no hook (cfg.metadata.hook_name is empty); "
                "give it as MonitorConfig(saes={'model.layers.N': source})"
            )
    return HookedSAE(hook=hook, sae=sae, source=_describe(source), sparse_decode=sparse_decoder(sae))


def sparse_decoder(sae: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """An exact decode from each token's top-k codes, for SAEs whose decode is ``f @ W_dec + b_dec``.

    Why: a dense decode costs as much as the encode (n × d_sae × d), but a trained SAE fires
    ~10–100 of 16k–131k features per token, and the probe pass already has each token's top
    indices (for the Jaccard metric). When every firing feature is among them, summing those
    decoder rows (``embedding_bag``) gives the same x̂ for a fraction of the work. Returns None
    for architectures or settings where that identity does not hold (then ``sae.decode`` runs).
    """
    try:
        from sae_lens import JumpReLUSAE, StandardSAE, TopKSAE
    except ImportError:  # pragma: no cover
        return None
    cfg = sae.cfg
    dec = getattr(type(sae), "decode", None)
    plain = dec in (StandardSAE.decode, JumpReLUSAE.decode) or (
        dec is TopKSAE.decode and not getattr(cfg, "rescale_acts_by_decoder_norm", False))
    hook = getattr(sae, "hook_sae_recons", None)
    if (not plain or getattr(cfg, "normalize_activations", "none") != "none"
            or getattr(cfg, "reshape_activations", "none") != "none" or (hook is not None and hook._forward_hooks)):
        return None

    def decode(top_vals: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(top_idx.long(), sae.W_dec, per_sample_weights=top_vals.to(sae.W_dec.dtype),
                               mode="sum") + sae.b_dec

    return decode


def check_d_in(hsae: HookedSAE, width: int | None, module_name: str) -> None:
    """The SAE must read vectors of the hooked module's width."""
    if width is not None and hsae.d_in != width:
        raise SAELoadError(
            f"SAE {hsae.source} has d_in={hsae.d_in} but hook {hsae.hook!r} (module {module_name}) "
            f"outputs vectors of size {width}: use an SAE trained on this model and layer"
        )


def sae_fingerprint(sae: Any) -> str:
    """A cheap, stable identity for cache keys: config + a strided sample of the weights."""
    h = hashlib.sha256()
    cfg = sae.cfg.to_dict() if hasattr(sae.cfg, "to_dict") else vars(sae.cfg)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(sae.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.float64)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    cfg = source.cfg
    return f"<{type(source).__name__} d_in={getattr(cfg, 'd_in', '?')} d_sae={getattr(cfg, 'd_sae', '?')}>"
