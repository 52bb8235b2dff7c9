"""Loading user-supplied direction vectors (a refusal or misalignment direction, a file of them).

One job: turn ``MonitorConfig.directions`` ({hook: source}) into ``{hook: {name: unit vector}}``
(float64, CPU), checked against the width of each hook, failing at start-up with a message that
names the fix (docs/metrics.md, direction monitors). The projections themselves are computed from the streaming sums
in ``compare.compare`` (by linearity, no per-token work), see ``metrics.mean_projections``.

A source is a path to ``.safetensors`` (every named tensor a [d] vector or an [n, d] matrix),
``.pt``/``.pth`` (loaded with ``weights_only=True``: a tensor or a dict of tensors), ``.npy``
([d] or [n, d]) or ``.json`` (``{"name": [floats]}`` or ``{"name": [[floats], ...]}``), an
in-memory tensor/ndarray (named ``direction``), a dict ``{name: tensor/ndarray/list}``, or a
list of these. A [d] tensor is named ``name``; the rows of an [n, d] matrix ``name.0 .. name.{n-1}``.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..records import REFUSAL_BASE  # reserved: the monitor's own base refusal direction r̂⁰

#: File suffixes the loader reads.
SUFFIXES = (".safetensors", ".pt", ".pth", ".npy", ".json")

#: The name of an unnamed in-memory tensor/ndarray source.
DEFAULT_NAME = "direction"


class DirectionError(ConfigError):
    """A bad direction source, with a message that says how to fix it."""


def load_hook_directions(spec: Mapping[str, Any] | None,
                         widths: Mapping[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """``{hook: source}`` -> ``{hook: {name: unit vector [d] float64}}``, checked against ``widths``.

    ``widths`` maps each monitored (SAE) hook to its width d: only those hooks are captured by
    the probe pass, so a direction at any other hook could never be measured.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for hook, source in (spec or {}).items():
        if hook not in widths:
            close = difflib.get_close_matches(str(hook), list(widths), 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DirectionError(
                f"directions: hook {hook!r} has no SAE{hint}; a direction must sit at a monitored hook, "
                f"one of: {', '.join(widths)}")
        out[hook] = load_directions(source, widths[hook], hook)
    return out


def load_directions(source: Any, d: int, hook: str = "?") -> dict[str, torch.Tensor]:
    """One source (or a list of sources) -> ``{name: unit vector [d] float64}``, validated."""
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise DirectionError(f"directions[{hook!r}] is an empty list; give a file or a tensor")
    out: dict[str, torch.Tensor] = {}
    for src in sources:
        where = str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"
        for name, raw in _read(src).items():
            for full, vec in _split(name, raw, where):
                if full in out:
                    raise DirectionError(f"direction name {full!r} appears twice at hook {hook!r} (again in "
                                         f"{where}); rename one of them")
                out[full] = _unit(full, vec, d, hook, where)
    return out


# ---------------------------------------------------------------------------- reading
def _read(src: Any) -> dict[str, Any]:
    """A source as {name: array-like}, without any checks of the values yet."""
    if isinstance(src, (str, Path)):
        return _read_file(Path(src))
    if isinstance(src, (torch.Tensor, np.ndarray)):
        return {DEFAULT_NAME: src}
    if isinstance(src, Mapping):
        return {str(k): v for k, v in src.items()}
    raise DirectionError(f"cannot read a direction from a {type(src).__name__}; give a path "
                         f"({', '.join(SUFFIXES)}), a tensor, an ndarray or a dict of them")


def _read_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DirectionError(f"{path}: unknown direction file type {path.suffix or '(no suffix)'!r}; "
                             f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise DirectionError(f"direction file not found: {path}")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if suffix in (".pt", ".pth"):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # safe by default (§8)
            if isinstance(obj, torch.Tensor):
                return {path.stem: obj}
            if isinstance(obj, Mapping):
                return {str(k): v for k, v in obj.items()}
            raise DirectionError(f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}")
        if suffix == ".npy":
            return {path.stem: np.load(str(path), allow_pickle=False)}
        data = json.loads(path.read_text())
    except DirectionError:
        raise
    except Exception as e:  # a corrupt file: say which and why
        raise DirectionError(f"{path}: cannot read directions ({type(e).__name__}: {e})") from e
    if not isinstance(data, Mapping):
        raise DirectionError(f'{path}: expected a JSON object {{"name": [floats]}}, got {type(data).__name__}')
    return {str(k): v for k, v in data.items()}


def _split(name: str, raw: Any, where: str) -> list[tuple[str, torch.Tensor]]:
    """A [d] value as one named vector, an [n, d] value as ``name.0 .. name.{n-1}``."""
    if not name or ":" in name or name == REFUSAL_BASE:
        why = "is reserved for the monitor's own base refusal direction" if name == REFUSAL_BASE \
            else "must be non-empty and free of ':' (metric names use ':' as separator)"
        raise DirectionError(f"{where}: direction name {name!r} {why}; rename it")
    try:
        t = torch.as_tensor(np.asarray(raw, dtype=np.float64)) if not isinstance(raw, torch.Tensor) else raw
    except (TypeError, ValueError) as e:
        raise DirectionError(f"{where}: direction {name!r} is not a numeric vector ({e})") from e
    t = t.detach().to("cpu", torch.float64)
    if t.dim() == 1:
        return [(name, t)]
    if t.dim() == 2:
        return [(f"{name}.{i}", row) for i, row in enumerate(t)]
    raise DirectionError(f"{where}: direction {name!r} has shape {tuple(t.shape)}; expected [d] or [n, d]")


def _unit(name: str, v: torch.Tensor, d: int, hook: str, where: str) -> torch.Tensor:
    """v / ‖v‖ after the checks; why unit length: a projection onto v̂ is in activation units."""
    if v.numel() != d:
        raise DirectionError(f"{where}: direction {name!r} has width {v.numel()} but hook {hook!r} has "
                             f"width {d}; give a vector of the hook's width")
    if not bool(torch.isfinite(v).all()):
        raise DirectionError(f"{where}: direction {name!r} holds NaN or inf values")
    norm = float(v.norm())
    if norm == 0 or not math.isfinite(norm):
        raise DirectionError(f"{where}: direction {name!r} is the zero vector; it has no direction to project on")
    return (v / norm).contiguous()
