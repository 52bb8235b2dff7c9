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

from ..errors import DriftMonitorError, first_line
from .fingerprint import weights_digest


class SAELoadError(DriftMonitorError, ValueError):
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
    """An sae-lens SAE from an object, a local directory or ``"release:sae_id"``.

    Every SAE is checked for non-finite weights (:func:`check_finite`): one NaN in a decoder
    row makes every reconstruction NaN, and the metrics would report NaN (or l0 = 0) without
    a word rather than fail.
    """
    if hasattr(source, "encode") and hasattr(source, "decode") and hasattr(source, "cfg"):
        sae = source
        if dtype is not None:
            sae = sae.to(dtype=getattr(torch, dtype))
        return check_finite(sae.to(device), _describe(source))
    from sae_lens import SAE

    if isinstance(source, Path) or (isinstance(source, str) and Path(source).exists()):
        path = Path(source)
        _check_sae_dir(path)
        return check_finite(SAE.load_from_disk(str(path), device=str(device), dtype=dtype), str(path))
    if isinstance(source, str) and ":" in source and not source.startswith((".", "/", "~")):
        release, sae_id = source.split(":", 1)
        return check_finite(SAE.from_pretrained(release, sae_id, device=str(device), dtype=dtype or "float32"),
                            source)
    raise SAELoadError(
        f"cannot load an SAE from {source!r}: give a local sae-lens directory (cfg.json + "
        "sae_weights.safetensors), 'release:sae_id' for a sae-lens hub release, or an SAE object"
    )


def _check_sae_dir(path: Path) -> None:
    """The checks sae-lens leaves to a traceback, each as one line naming the file and the fix:
    a missing or unreadable ``cfg.json``, an architecture sae-lens does not know, a damaged
    (e.g. truncated) weights file, and a ``cfg.json`` whose widths are not its weights'.

    Why read the safetensors header first: it holds every tensor's shape, so a cfg.json copied
    from another SAE is caught here, without loading a byte of the weights.
    """
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
    from sae_lens.registry import SAE_CLASS_REGISTRY
    from safetensors import SafetensorError, safe_open

    cfg_file, weights = path / "cfg.json", path / "sae_weights.safetensors"
    if not cfg_file.is_file():
        raise SAELoadError(f"{path} is not an sae-lens SAE directory: it has no cfg.json "
                           "(expected cfg.json + sae_weights.safetensors, as written by SAE.save_model)")
    if not weights.is_file():
        raise SAELoadError(f"{path}: cfg.json found but sae_weights.safetensors is missing")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAELoadError(f"{cfg_file}: not valid JSON ({first_line(e)}); restore the SAE's cfg.json "
                           "(SAE.save_model writes it)") from None
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{cfg_file}: expected a JSON object of SAE settings, got {type(cfg).__name__}")
    arch = handle_config_defaulting(dict(cfg)).get("architecture")
    if arch not in SAE_CLASS_REGISTRY:
        raise SAELoadError(f"{cfg_file}: "
                           + (f"unknown SAE architecture {arch!r}" if arch else "no 'architecture' given")
                           + "; sae-lens knows "
                           f"{', '.join(sorted(SAE_CLASS_REGISTRY))} (fix 'architecture', or upgrade sae-lens)")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise SAELoadError(f"{weights}: damaged or truncated ({first_line(e)}); copy or download the SAE "
                           "again") from None
    w_dec = shapes.get("W_dec")
    if w_dec is not None and len(w_dec) == 2:
        for key, want in (("d_sae", w_dec[0]), ("d_in", w_dec[1])):
            if key in cfg and cfg[key] != want:
                raise SAELoadError(f"{cfg_file}: {key}={cfg[key]!r} but W_dec in sae_weights.safetensors is "
                                   f"{list(w_dec)} ({key}={want}); the cfg.json belongs to another SAE: restore "
                                   "the one saved with these weights")


def check_finite(sae: Any, where: str) -> Any:
    """``sae`` itself, or :class:`SAELoadError` naming the first tensor with a NaN or inf.

    One float32 reduction per tensor (no copy of the weights): a sum is finite exactly when
    every term is, short of an overflow no real SAE's weights come near.
    """
    for name, t in sae.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float32))):
            bad = int((~torch.isfinite(t)).sum())
            raise SAELoadError(f"SAE {where}: tensor {name} has {bad} non-finite value(s) (NaN or inf) of "
                               f"{t.numel()}; this SAE is damaged: use another copy, or retrain it")
    return sae


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
    """A stable identity for cache keys: config + every weight (the same projection as the model's
    fingerprint, :func:`~drift_monitor.probe.fingerprint.weights_digest`; a sample missed changes)."""
    h = hashlib.sha256()
    cfg = sae.cfg.to_dict() if hasattr(sae.cfg, "to_dict") else vars(sae.cfg)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(weights_digest(sorted(sae.state_dict().items())).encode())
    return h.hexdigest()[:16]


def _describe(source: Any) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    cfg = source.cfg
    return f"<{type(source).__name__} d_in={getattr(cfg, 'd_in', '?')} d_sae={getattr(cfg, 'd_sae', '?')}>"
