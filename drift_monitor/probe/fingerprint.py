"""Fingerprints of weights that depend on every element, computed where the weights live.

Why not a sample: the baseline cache is keyed by the base model's fingerprint, and a fingerprint
that read ~1,024 values per tensor took a different base model, whose changes missed the
samples, for the first one and reused its baseline (docs/reliability.md).

How: per tensor, an integer projection of the raw bits onto a fixed pseudo-random vector ``r``,
on the tensor's own device; only one int64 per tensor comes back to the host. Why integers
rather than a float64 dot product:

* exact: integer sums wrap and are associative, so the result is the same whatever the
  reduction order, device or process; a float sum differs in its last bits between CPU and GPU
  kernels and would need rounding, which can hide a tiny change;
* certain: every ``r_i`` is odd, hence invertible modulo a power of two, so changing any single
  element (any bit of it) changes the projection; a float projection only makes that likely.

``r_i`` is a splitmix64-style mix of the index ``i``, built from integer tensor ops, so every
device computes the same vector with no generator state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

_CHUNK = 1 << 22  # elements per step: bounds the temporaries (16 MiB in int32) whatever the tensor's size
_MIX = (0x9E3779B97F4A7C15 - (1 << 64), 0xBF58476D1CE4E5B9 - (1 << 64))  # splitmix64 constants as signed int64
#: element size -> the integer type its bits are read as, and the type the products wrap in
_BITS = {1: (torch.int8, torch.int32), 2: (torch.int16, torch.int32), 4: (torch.int32, torch.int32),
         8: (torch.int64, torch.int64)}


def _odd_mix(start: int, n: int, device: torch.device) -> torch.Tensor:
    """``r_i`` for ``i`` in ``[start, start + n)``: pseudo-random, odd, below 2**31, the same on every device."""
    r = torch.arange(start, start + n, dtype=torch.int64, device=device)
    r = r * _MIX[0]
    r ^= r >> 31
    r = r * _MIX[1]
    r ^= r >> 29
    return (r & 0x7FFFFFFF) | 1


class Projector:
    """Projects tensors; holds the vector ``r`` of each device and integer type, made once."""

    def __init__(self) -> None:
        self._r: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _vector(self, device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
        r = self._r.get((device, dtype))
        if r is None or r.numel() < n:
            r = self._r[(device, dtype)] = _odd_mix(0, n, device).to(dtype)
        return r[:n]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s projection, a 0-d int64 tensor on ``t``'s device.

        Chunk ``k`` (``_CHUNK`` elements) gives ``s_k = sum_i bits_i * r_i``, the products wrapping
        in int32 (elements of up to 4 bytes) or int64 (8-byte ones) and summed in int64; the total
        is ``sum_k c_k * s_k mod 2**64`` with ``c_k`` odd. A change of one element changes its
        product (``r_i`` is odd), so its ``s_k``, so the total (``c_k`` is odd).
        """
        if hasattr(t, "to_local"):  # a DTensor (FSDP2, tensor parallel): this rank's shard, no collective
            t = t.to_local()  # (the baseline cache is per rank)
        flat = t.detach().reshape(-1)  # a copy only for a non-contiguous tensor, and on its device
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        view, wrap = _BITS[flat.element_size()]
        bits = flat.view(view)
        total = torch.zeros((), dtype=torch.int64, device=flat.device)
        for k, start in enumerate(range(0, bits.numel(), _CHUNK)):
            x = bits[start:start + _CHUNK].to(wrap)
            s_k = (x * self._vector(x.device, wrap, x.numel())).sum(dtype=torch.int64)
            total += s_k * (2 * k + 1) if k else s_k
        return total


def projection(t: torch.Tensor) -> torch.Tensor:
    """One tensor's projection (:class:`Projector`), a 0-d int64 tensor on its device."""
    return Projector()(t)


def weights_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 (hex) of every tensor's name, dtype, shape and projection.

    The projections stay on their devices until all are computed, then come to the host in one
    copy per device (one sync each, not one per tensor).
    """
    meta, sums, project = [], [], Projector()
    for name, t in tensors:
        meta.append(f"{name}|{t.dtype}|{tuple(t.shape)}")
        sums.append(project(t))
    values: list[int] = [0] * len(sums)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(sums):
        by_device.setdefault(s.device, []).append(i)
    for idx in by_device.values():
        for i, v in zip(idx, torch.stack([sums[i] for i in idx]).cpu().tolist()):
            values[i] = v
    h = hashlib.sha256()
    for m, v in zip(meta, values):
        h.update(m.encode())
        h.update(int(v).to_bytes(8, "little", signed=True))
    return h.hexdigest()
