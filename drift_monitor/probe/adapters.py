"""Adapter signals of LoRA runs: A/B norms, the size of the weight update, and the local cosine
of the B trajectory.

Why: in LoRA fine-tuning the SAE metrics say *what* the model now represents; the adapter's own
weights say *how* training moves. In the emergent-misalignment model organisms the behavioural
phase transition shows up as a rotation of the LoRA B matrices: B first moves on a nearly straight
line, then turns. The local cosine of B's trajectory,

    cos(B_{t−k} − B_t, B_{t+k} − B_t),

is −1 on a straight line and rises toward 0 (a right-angle turn) or above (turning back) when
the direction of motion changes. Per LoRA module (a PEFT ``LoraLayer``, active adapters only):

* ``lora_A_norm``, ``lora_B_norm``: Frobenius norms of A [r, in] and B [out, r];
* ``lora_BA_norm``: ‖scaling·B·A‖_F, the norm of the effective weight update ΔW (computed as
  scaling·sqrt(Σ (BᵀB)∘(AAᵀ)), r×r matrices, never the out×in product);
* ``lora_B_local_cosine``: the cosine above (NaN when B did not move on one side).

Aggregates (hook ``"adapter"``): ``adapter_A_norm``/``adapter_B_norm``/``adapter_BA_norm`` are the
norms of all modules together (sqrt of the sum of squares); ``adapter_B_local_cosine`` and
``adapter_B_local_cosine_max`` are the mean and max over modules (NaN modules skipped);
``adapter_B_local_cosine_global`` is the cosine of the concatenated B vector.

Timing: the signals are recorded every k steps (k = ``adapter_every_n_steps``). At a record step t
only the past is known, so the value logged at t is the cosine *centred at t − k*:
cos(B_{t−2k} − B_{t−k}, B_t − B_{t−k}). A rotation logged at step t happened around t − k.

Cost: norms are computed on the weights' device and copied to the host once per device (no
per-module sync); the cosine keeps three float32 host copies of the flattened B matrices
(about 4 bytes × r × Σ out_features each). Weights sharded by FSDP/ZeRO-3 (DTensor, empty local
shards) are skipped with one warning, never gathered; replicated (DDP) weights are read on the
rank that records. After a resume the B history starts empty, so the cosine needs two more
records before it reappears.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from drift_monitor.probe.capture import normalize_name
from drift_monitor.records import ADAPTER_HOOK, ADAPTER_HOOK_PREFIX, HookResult

log = logging.getLogger(__name__)

_DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class LoraModule:
    """One active LoRA adapter of one module: its weights (not copies) and scaling."""

    name: str  # normalised module name, "@<adapter>" appended for a non-default adapter
    A: torch.Tensor
    B: torch.Tensor
    scaling: float


def is_sharded(p: torch.Tensor) -> bool:
    """True when this rank holds only a shard of ``p`` (FSDP2 DTensor, FSDP1 flat views, ZeRO-3)."""
    if type(p).__name__ == "DTensor" or hasattr(p, "ds_id"):
        return True
    return p.numel() == 0


def find_lora_modules(model: nn.Module) -> tuple[list[LoraModule], list[str]]:
    """The active LoRA adapters of ``model`` and the names of those skipped as sharded.

    Generic over PEFT's layer types: a LoRA layer is any module with ``lora_A``/``lora_B``
    ModuleDicts (peft.tuners.lora.LoraLayer); embedding LoRA (``lora_embedding_*``) is not read.
    """
    found: list[LoraModule] = []
    sharded: list[str] = []
    for raw_name, mod in model.named_modules():
        lora_a, lora_b = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        active = getattr(mod, "active_adapters", None) or list(lora_a.keys())
        if isinstance(active, str):
            active = [active]
        scaling = getattr(mod, "scaling", {}) or {}
        for adapter in active:
            if adapter not in lora_a or adapter not in lora_b:
                continue
            name = normalize_name(raw_name) + ("" if adapter == _DEFAULT_ADAPTER else f"@{adapter}")
            a, b = lora_a[adapter].weight, lora_b[adapter].weight
            if is_sharded(a) or is_sharded(b):
                sharded.append(name)
                continue
            found.append(LoraModule(name, a, b, float(scaling.get(adapter, 1.0))))
    return found, sharded


def _to_host(tensors: list[torch.Tensor]) -> np.ndarray:
    """Flatten and concatenate ``tensors`` (float32) on the host with one copy per device.

    Why: a ``.item()`` or ``.cpu()`` per module is one device sync per module; with hundreds of
    LoRA modules that is most of the cost.
    """
    if not tensors:
        return np.zeros(0, np.float32)
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    parts: list[np.ndarray | None] = [None] * len(tensors)
    for idx in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1).float() for i in idx]).cpu().numpy()
        for i, piece in zip(idx, np.split(flat, np.cumsum([tensors[i].numel() for i in idx])[:-1])):
            parts[i] = piece
    return np.concatenate(parts)  # type: ignore[arg-type]


@torch.no_grad()
def _squared_norms(m: LoraModule) -> torch.Tensor:
    """[‖A‖², ‖B‖², ‖scaling·BA‖²] of one module, as a float32 tensor on the weights' device."""
    a = m.A.detach().float().reshape(m.A.shape[0], -1)  # [r, in] (conv: [r, in·k·k])
    b = m.B.detach().float().reshape(m.B.shape[0], -1)  # [out, r] (conv with 1x1 B: [out, r])
    sq_a, sq_b = (a * a).sum(), (b * b).sum()
    if b.shape[1] == a.shape[0]:
        # ‖BA‖² = tr(AᵀBᵀBA) = Σ (BᵀB)∘(AAᵀ): r×r work instead of the out×in product
        sq_ba = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0) * (m.scaling ** 2)
    else:
        sq_ba = torch.full((), math.nan, device=a.device)
    return torch.stack([sq_a, sq_b, sq_ba.to(sq_a.device)])


def module_norms(modules: list[LoraModule]) -> np.ndarray:
    """[n_modules, 3] float64: ‖A‖_F, ‖B‖_F, ‖scaling·B·A‖_F per module (one host copy per device)."""
    if not modules:
        return np.zeros((0, 3))
    sq = _to_host([_squared_norms(m) for m in modules]).reshape(len(modules), 3).astype(np.float64)
    return np.sqrt(sq)


def segment_bounds(sizes: list[int]) -> np.ndarray:
    """Start offsets of consecutive segments of the given (positive) sizes, plus the total."""
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def local_cosine(before: np.ndarray, centre: np.ndarray, after: np.ndarray,
                 bounds: np.ndarray) -> tuple[np.ndarray, float]:
    """cos(before − centre, after − centre) per segment and over the whole vector.

    ``bounds`` are segment offsets (:func:`segment_bounds`; every segment non-empty). A segment
    with zero displacement on either side gives NaN (the direction is undefined), not an error.
    Sums are accumulated in float64.
    """
    d1 = before.astype(np.float64) - centre
    d2 = after.astype(np.float64) - centre
    starts = bounds[:-1]
    dot = np.add.reduceat(d1 * d2, starts)
    n1 = np.add.reduceat(d1 * d1, starts)
    n2 = np.add.reduceat(d2 * d2, starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where((n1 > 0) & (n2 > 0), dot / np.sqrt(n1 * n2), np.nan)
    t1, t2 = float(n1.sum()), float(n2.sum())
    glob = float(dot.sum() / math.sqrt(t1 * t2)) if t1 > 0 and t2 > 0 else math.nan
    return np.clip(per, -1.0, 1.0), (max(-1.0, min(1.0, glob)) if math.isfinite(glob) else glob)


def aggregate(norms: np.ndarray, cosines: np.ndarray | None, global_cosine: float | None) -> dict[str, float]:
    """The ``"adapter"`` hook's metrics from per-module norms (and cosines, when known)."""
    out = {
        "adapter_A_norm": float(np.sqrt(np.sum(norms[:, 0] ** 2))),
        "adapter_B_norm": float(np.sqrt(np.sum(norms[:, 1] ** 2))),
        "adapter_BA_norm": float(np.sqrt(np.nansum(norms[:, 2] ** 2))),
    }
    if cosines is not None:
        finite = cosines[np.isfinite(cosines)]
        out["adapter_B_local_cosine"] = float(finite.mean()) if finite.size else math.nan
        out["adapter_B_local_cosine_max"] = float(finite.max()) if finite.size else math.nan
        out["adapter_B_local_cosine_global"] = float(global_cosine) if global_cosine is not None else math.nan
    return out


class AdapterTracker:
    """Computes the adapter signals at each record step and keeps the B history the cosine needs.

    One per training run (the callback owns it). Not thread-safe; call from the training loop.
    """

    def __init__(self) -> None:
        self._history: deque[tuple[int, np.ndarray]] = deque(maxlen=3)
        self._layout: tuple[tuple[str, int], ...] = ()
        self._warned_sharded = False

    def record(self, model: nn.Module, step: int) -> dict[str, HookResult]:
        """The adapter HookResults at ``step`` ({} when the model has no readable LoRA modules)."""
        modules, sharded = find_lora_modules(model)
        if sharded and not self._warned_sharded:
            self._warned_sharded = True
            log.warning("drift-monitor: %d LoRA module(s) are sharded (FSDP/ZeRO-3), e.g. %s; their adapter "
                        "signals are skipped (weights are never gathered for them)", len(sharded), sharded[0])
        if not modules:
            return {}
        norms = module_norms(modules)
        cosines, glob = self._cosines(modules, step)
        hooks = {ADAPTER_HOOK: HookResult(ADAPTER_HOOK, 0, aggregate(norms, cosines, glob), {})}
        for i, m in enumerate(modules):
            metrics = {"lora_A_norm": float(norms[i, 0]), "lora_B_norm": float(norms[i, 1]),
                       "lora_BA_norm": float(norms[i, 2])}
            if cosines is not None:
                metrics["lora_B_local_cosine"] = float(cosines[i])
            hook = ADAPTER_HOOK_PREFIX + m.name
            hooks[hook] = HookResult(hook, 0, metrics, {})
        return hooks

    def _cosines(self, modules: list[LoraModule], step: int) -> tuple[np.ndarray | None, float | None]:
        """Push B at ``step`` into the history; the cosine centred at the middle record, if 3 exist."""
        layout = tuple((m.name, m.B.numel()) for m in modules)
        if layout != self._layout:  # modules added/removed: earlier B vectors do not line up
            self._history.clear()
            self._layout = layout
        if self._history and self._history[-1][0] >= step:
            return None, None  # the same (or an earlier) step again: no new displacement
        self._history.append((step, _to_host([m.B for m in modules])))
        if len(self._history) < 3:
            return None, None
        (_, before), (_, centre), (_, after) = self._history
        return local_cosine(before, centre, after, segment_bounds([n for _, n in layout]))
