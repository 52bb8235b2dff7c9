"""An exclusive POSIX file lock, for work that two processes must not do at once.

Why a file lock and not a lock in memory: the processes that must take turns are separate jobs
(the shards of a scan, ``torchrun`` ranks, two scans of one base) that share only the file
system. ``flock`` is released by the kernel when a holder dies, so a killed shard never leaves
the others waiting.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder) for the block; ``on_wait`` is
    called once when another process holds it (to say why nothing happens)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
