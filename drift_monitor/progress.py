"""Progress bars: one place for how long work shows itself.

Why one function: every long job (the probe pass, a scan, SAE training, the causal check) should
look and behave alike — tqdm on stderr, "drift-monitor <what>" as its label, and silent when
stderr is not a terminal (CI logs, files, a service manager) or when the caller turned progress
off. Torch-free: tqdm only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def bar(items: Iterable[Any] | None = None, *, desc: str, unit: str, enabled: bool = True,
        total: int | None = None, leave: bool = True, unit_scale: bool = False) -> Any:
    """A tqdm bar labelled ``drift-monitor <desc>`` over ``items`` (or ``total`` steps updated by
    hand). ``enabled=False`` gives a bar that draws nothing, so callers need no branch; otherwise
    tqdm switches itself off when stderr is not a terminal (``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=f"drift-monitor {desc}", unit=unit, leave=leave, unit_scale=unit_scale,
                disable=None if enabled else True)
