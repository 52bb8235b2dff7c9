"""Stopping a pre-flight forward early, once every hook that reads it has run.

Why a module of its own: the refusal-direction projections (``engine``) and the SAE features
(``features``) hook the same forward, and whichever of their modules runs last ends it; both
import this, so neither imports the other for it (no cycle).
"""

from __future__ import annotations


class StopForward(Exception):
    """Raised from a forward hook to end a forward whose remaining layers nothing reads."""


class Barrier:
    """Raises :class:`StopForward` once every hook named in ``keys`` has run in the current forward
    (``reset`` before each): the projections' deepest layer and each SAE's module, whichever comes
    last. ``keys`` empty: never."""

    def __init__(self, keys: set[str]):
        self.keys = set(keys)
        self.fired: set[str] = set()

    def reset(self) -> None:
        self.fired.clear()

    def fire(self, key: str) -> None:
        self.fired.add(key)
        if self.keys and self.keys <= self.fired:
            raise StopForward
