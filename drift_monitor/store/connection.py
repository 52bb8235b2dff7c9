"""Opening the DuckDB file: lock detection, bounded retry, transactions, per-path locks.

Why: DuckDB lets either one read-write process *or* many read-only processes open a file,
never both, so "the file is busy" is a normal state, not a failure. Every opener (the writer,
each reader call) goes through :func:`connect_file`, which tells a lock from a real error, retries
a lock with jittered backoff for a bounded time and then raises :class:`StoreLocked`, leaving
the caller to decide what busy means for it (the writer spools, a reader reports).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import duckdb

from .errors import StoreError, StoreLocked, StoreNotFound

T = TypeVar("T")

_LOCK_MARKERS = ("could not set lock", "conflicting lock", "different configuration", "lock on file")


def _is_lock_error(exc: BaseException) -> bool:
    """True for errors that mean "someone else has the file now; try again later".

    Found by experiment with DuckDB 2.0: another process holding the file gives
    ``duckdb.IOException: IO Error: Could not set lock on file "...": Conflicting lock is held
    in ... (PID n)``; a connection in *this* process opened with the other read-only flag gives
    ``duckdb.ConnectionException: ... different configuration than existing connections``.
    """
    if not isinstance(exc, (duckdb.IOException, duckdb.ConnectionException)):
        return False
    msg = str(exc).lower()
    return any(marker in msg for marker in _LOCK_MARKERS)


def connect_file(
    path: Path,
    read_only: bool,
    timeout_s: float,
    max_attempts: int | None = None,
    first_delay_s: float = 0.01,
    max_delay_s: float = 0.25,
) -> duckdb.DuckDBPyConnection:
    """Open ``path``, retrying with jittered exponential backoff while it is locked.

    Raises :class:`StoreLocked` once ``timeout_s`` (or ``max_attempts``) is spent, so callers
    decide what "busy" means for them (the writer spools, a reader reports).
    """
    def open_() -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc):
                raise _translate_open_error(path, exc) from exc
            raise

    return retry_locked(open_, str(path), timeout_s, max_attempts, first_delay_s, max_delay_s)


def retry_locked(open_: Callable[[], T], what: str, timeout_s: float, max_attempts: int | None = None,
                 first_delay_s: float = 0.01, max_delay_s: float = 0.25) -> T:
    """``open_()``, retried with jittered exponential backoff while it fails on a lock held by
    another process; :class:`StoreLocked` naming ``what`` once the time or attempts are spent."""
    start = time.monotonic()
    delay = first_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return open_()
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            if not _is_lock_error(exc):
                raise
            waited = time.monotonic() - start
            if waited + delay > timeout_s or (max_attempts is not None and attempt >= max_attempts):
                raise StoreLocked(
                    f"{what} stayed locked by another process for {waited:.2f}s ({attempt} attempts): {exc}"
                ) from exc
        time.sleep(delay * random.uniform(0.5, 1.0))
        delay = min(delay * 2, max_delay_s)


def _translate_open_error(path: Path, exc: Exception) -> Exception:
    """DuckDB's open errors as store errors where they mean "no store here" (else unchanged)."""
    msg = str(exc)
    if "does not exist" in msg:
        return StoreNotFound(f"no drift-monitor store at {path} (the file does not exist)")
    if "not a valid DuckDB database" in msg:
        return StoreError(f"{path} is not a DuckDB database file: {msg}")
    if "Is a directory" in msg:
        return StoreError(f"{path} is a directory, not a drift-monitor DuckDB file: give the file's path, e.g. "
                          f"{path / 'drift.duckdb'}")
    return exc



@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK and re-raise: a failed write leaves no trace."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# Per-path in-process locks: two Store objects (threads) on one file must not interleave, and
# DuckDB's in-process instance cache would otherwise let them into the same file at once.
_PATH_LOCKS: dict[str, threading.RLock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def path_lock(path: Path) -> threading.RLock:
    key = str(path.resolve())
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(key, threading.RLock())
