"""Finding hook modules through wrappers, and capturing their outputs for one probe pass.

Why name normalisation: the same decoder layer is called ``model.layers.12`` in a plain
model, ``base_model.model.model.layers.12`` under PEFT, ``module.model.layers.12`` under DDP
and ``_fsdp_wrapped_module.model.layers.12`` under FSDP. Users (and SAE configs) name it one
way; we must find it whichever way the trainer wrapped it.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DriftMonitorError

# Wrapper segments that add a level of naming without changing the computation.
_WRAPPER_SEGMENTS = ("module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_PEFT_PREFIX = "base_model.model."

# TransformerLens-style names that sae-lens SAEs often carry in cfg.metadata.hook_name.
_TL_RESID_POST = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")
_TL_RESID_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")
_TL_MLP_OUT = re.compile(r"^blocks\.(\d+)\.hook_mlp_out$")
_TL_ATTN_OUT = re.compile(r"^blocks\.(\d+)\.hook_attn_out$")


class HookNotFoundError(DriftMonitorError, KeyError):
    """No module (or several) matches a hook name. The message lists close names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


def normalize_name(name: str) -> str:
    """Strip wrapper segments and the PEFT prefix: the canonical module name."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    out = ".".join(parts)
    while out.startswith(_PEFT_PREFIX):
        out = out[len(_PEFT_PREFIX):]
    return out


def _tl_to_hf(hook: str) -> list[str]:
    """Candidate HF module names for a TransformerLens hook name (empty if not TL-style)."""
    if m := _TL_RESID_POST.match(hook):
        return [f"layers.{m[1]}", f"h.{m[1]}"]
    if m := _TL_RESID_PRE.match(hook):
        layer = int(m[1])
        return [f"layers.{layer - 1}", f"h.{layer - 1}"] if layer > 0 else ["embed_tokens", "wte"]
    if m := _TL_MLP_OUT.match(hook):
        return [f"layers.{m[1]}.mlp", f"h.{m[1]}.mlp"]
    if m := _TL_ATTN_OUT.match(hook):
        return [f"layers.{m[1]}.self_attn", f"h.{m[1]}.attn"]
    return []


def resolve_module(model: nn.Module, hook: str) -> tuple[str, nn.Module]:
    """Find the module ``hook`` names, through PEFT/DDP/FSDP/compile wrappers.

    Matches, in order: the exact (normalised) name; a unique module whose normalised name
    ends with ``.<hook>`` (so ``layers.12`` finds ``model.layers.12``); TransformerLens names
    (``blocks.12.hook_resid_post`` -> output of layer 12). Raises HookNotFoundError listing
    the closest module names otherwise.
    """
    modules = {normalize_name(n): m for n, m in model.named_modules() if n}
    target = normalize_name(hook)
    if target in modules:
        return target, modules[target]
    for cand in [target] + _tl_to_hf(target):
        hits = [n for n in modules if n == cand or n.endswith("." + cand)]
        if len(hits) == 1:
            return hits[0], modules[hits[0]]
        if len(hits) > 1:
            raise HookNotFoundError(f"hook {hook!r} is ambiguous: it matches {hits[:6]}; give the full name")
    close = difflib.get_close_matches(target, list(modules), n=5, cutoff=0.4)
    layered = sorted({re.sub(r"\.\d+(\..*)?$", ".N", n) for n in modules if re.search(r"\.\d+$", n)})
    raise HookNotFoundError(
        f"no module named {hook!r} in {type(model).__name__}. Closest module names: {close or 'none'}. "
        f"Layer stacks in this model: {layered[:5]} (e.g. use 'model.layers.12' for a decoder layer's output)"
    )


#: ``auto`` hooks: decoder layers evenly spaced from a third of the depth to the last but one.
#: Why there: on the SmolLM2 test bed's calibration runs (``tests/bench/layer_profile.py``), the
#: refusal direction's harmful − harmless separation at the post-instruction tokens moved most at
#: layer 28 of 30 in the aligned start's erosion runs (layer 15 barely moved) and around layer 20
#: in the base-start runs; Arditi et al. find the refusal direction mid-to-late.
AUTO_HOOKS = 4
_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|blocks)\.(\d+)$")


def decoder_layers(model: nn.Module) -> list[str]:
    """The decoder layers' (normalised) module names, in depth order: the longest numbered stack."""
    stacks: dict[str, list[tuple[int, str]]] = {}
    for n, _ in model.named_modules():
        name = normalize_name(n)
        m = _LAYER.match(name)
        if m:
            stacks.setdefault(name[: m.start(1)], []).append((int(m[1]), name))
    if not stacks:
        raise HookNotFoundError(f"no numbered layer stack (layers.N, h.N, blocks.N) in {type(model).__name__}; "
                                "name the hooks yourself, e.g. --hook model.layers.12")
    best = max(stacks.values(), key=len)
    return [name for _, name in sorted(best)]


def auto_hooks(model: nn.Module, n: int = AUTO_HOOKS) -> list[str]:
    """``n`` decoder layers evenly spaced from a third of the depth to the last but one."""
    layers = decoder_layers(model)
    depth = len(layers)
    lo, hi = depth // 3, max(depth // 3, depth - 2)
    if n <= 1:
        return [layers[(lo + hi) // 2]]
    picks = sorted({round(lo + i * (hi - lo) / (n - 1)) for i in range(n)})
    return [layers[i] for i in picks]


def expand_auto(model: nn.Module, hooks: list[str]) -> list[str]:
    """Hooks with ``auto`` / ``auto:N`` replaced by :func:`auto_hooks` (duplicates dropped)."""
    out: list[str] = []
    for h in hooks:
        if h == "auto" or h.startswith("auto:"):
            count = h.partition(":")[2] or str(AUTO_HOOKS)
            if not count.isdigit() or int(count) < 1:
                raise HookNotFoundError(f"--hook {h}: write auto or auto:N with N >= 1 layers, e.g. auto:4")
            out += auto_hooks(model, int(count))
        else:
            out.append(h)
    return list(dict.fromkeys(out))


class _StopForward(Exception):
    """Raised from the last hook to skip the rest of the forward (later layers, LM head)."""


@dataclass
class _Slot:
    hook: str
    module: nn.Module
    value: torch.Tensor | None = None


def layer_output(out: object) -> torch.Tensor:
    """The hidden states of a module's output: a Tensor (transformers 5.x) or a tuple's first item.

    Never ``out[0]`` on a Tensor: that silently takes batch row 0.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    hs = getattr(out, "hidden_states", None) or getattr(out, "last_hidden_state", None)
    if isinstance(hs, torch.Tensor):
        return hs
    raise TypeError(f"cannot find hidden states in a module output of type {type(out).__name__}")


class ActivationCapture:
    """Forward hooks on the hooked modules for the duration of a ``with`` block.

    After each forward, ``values[hook]`` holds that module's output [B, T, d]. With
    ``early_stop`` the forward is aborted once every hooked module has produced its output,
    so deeper layers and the LM head are never computed.
    """

    def __init__(self, modules: dict[str, nn.Module], early_stop: bool = True):
        self.slots = [_Slot(h, m) for h, m in modules.items()]
        self.early_stop = early_stop
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending = 0

    def __enter__(self) -> ActivationCapture:
        for slot in self.slots:
            self._handles.append(slot.module.register_forward_hook(self._make_hook(slot)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, slot: _Slot) -> Callable:
        def hook(_module: nn.Module, _inputs: object, out: object) -> None:
            slot.value = layer_output(out)
            self._pending -= 1
            if self.early_stop and self._pending <= 0:
                raise _StopForward

        return hook

    def run(self, forward: Callable[[], object]) -> dict[str, torch.Tensor]:
        """Run one forward and return {hook: activations}."""
        for slot in self.slots:
            slot.value = None
        self._pending = len(self.slots)
        try:
            forward()
        except _StopForward:
            pass
        missing = [s.hook for s in self.slots if s.value is None]
        if missing:
            raise RuntimeError(f"hooked module(s) {missing} did not run in the forward pass")
        return {s.hook: s.value for s in self.slots}  # type: ignore[misc]


@contextlib.contextmanager
def probe_mode(model: nn.Module) -> Iterator[None]:
    """eval() + no_grad for the probe pass; the previous train/eval mode is restored after.

    eval() also switches off dropout and gradient checkpointing's re-execution, so each
    hook fires exactly once per forward.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def is_sharded(model: nn.Module) -> bool:
    """FSDP (the wrapper of FSDP1, or FSDP2's ``fully_shard``, which recent accelerate and TRL
    use: it changes the modules' classes and makes every parameter a DTensor) or DeepSpeed
    ZeRO-3: every rank must run the full forward in step (no early stop)."""
    fsdp2 = _fsdp2_module_type()
    for name, m in model.named_modules():
        if "_fsdp_wrapped_module" in name or (fsdp2 is not None and isinstance(m, fsdp2)):
            return True
    dtensor = _dtensor_type()
    return any(hasattr(p, "ds_id") or (dtensor is not None and isinstance(p, dtensor)) for p in model.parameters())


def _fsdp2_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 (or without distributed)
        return None
    return FSDPModule


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return None
    return DTensor


def hidden_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int):
            return v
    inner = getattr(model, "module", None) or getattr(model, "base_model", None)
    if inner is not None and inner is not model:
        return hidden_size(inner)
    return None


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def replace_output(out: object, fn: Callable[[torch.Tensor], torch.Tensor]) -> object:
    """Apply ``fn`` to a module output that is a Tensor (transformers 5.x decoder layers) or a
    tuple whose first element is the hidden state (older layers, attention modules): what a
    forward hook returns to change what the rest of the model sees."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return (fn(out[0]), *out[1:])
    raise TypeError(f"cannot change a module output of type {type(out).__name__}")


def plain_forward(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """``forward(input_ids, attention_mask)`` of a measurement, never under a mixed-precision autocast.

    Why: a trainer with ``bf16=True`` has accelerate wrap ``model.forward`` in an autocast
    context (keeping the original as ``_original_forward``); measured under it, activations
    would be bf16 products and every snapshot would mix the run's precision into the drift.
    The original forward is called, inside ``autocast(enabled=False)`` for any outer context,
    without a KV cache.
    """
    cfg = getattr(model, "config", None)
    kwargs = {"use_cache": False} if cfg is not None and hasattr(cfg, "use_cache") else {}
    call = getattr(model, "_original_forward", None) or model

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        with torch.autocast(input_ids.device.type, enabled=False):
            return call(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return forward


@contextlib.contextmanager
def without_autocast(model: nn.Module) -> Iterator[None]:
    """For a measurement that calls the model's own methods (``generate``): the forward accelerate
    wrapped in the trainer's autocast is swapped for the original for the block, under
    ``autocast(enabled=False)``, for the reason ``plain_forward`` gives."""
    original = getattr(model, "_original_forward", None)
    wrapped = model.__dict__.get("forward")
    if original is not None:
        model.forward = original
    try:
        with torch.autocast(model_device(model).type, enabled=False):
            yield
    finally:
        if original is not None:
            if wrapped is not None:
                model.forward = wrapped
            else:
                del model.forward
