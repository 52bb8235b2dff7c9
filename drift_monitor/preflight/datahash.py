"""The identity of a pre-flight dataset: a hash of its files' bytes (torch-free).

Why a module of its own: the check (``run``) keys its cache by it, and the store and dashboard
match a run to the pre-flight results of its training data by it (``outputs.train_data``,
:mod:`drift_monitor.store.preflights`); those read no model and must not import torch, which
``data`` does through ``engine``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path


def data_hash(sources: Sequence[str | Path]) -> str:
    """The bytes of every source file (a folder: every file in it, by relative path), hashed in
    blocks: the identity that keys the cache and that the dashboard matches runs by.

    Raises ``FileNotFoundError`` for a source that does not exist (and ``OSError`` for one that
    cannot be read): the check turns it into its data error, a matcher into "no hash".
    """
    h = hashlib.sha256()
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--data {src}: no such file or folder")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]
