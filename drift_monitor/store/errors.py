"""The errors the store raises on purpose, one class per thing a caller can do about it.

Why separate classes: a dashboard shows "no data yet" for :class:`StoreNotFound` (and its
subclass :class:`StoreEmpty`), tells the user how to fix a :class:`SchemaVersionError`, and
tries again later after :class:`StoreLocked`; any other exception is a bug or a damaged file.
They live in a module of their own so every other store module can raise them without an
import cycle.
"""

from __future__ import annotations

import errno
import os

import duckdb

from drift_monitor.errors import DriftMonitorError, first_line


class StoreError(DriftMonitorError):
    """Base class of every error the store raises on purpose."""


class StoreNotFound(StoreError):
    """The database file does not exist (nothing has been written yet, or a wrong path)."""


class StoreEmpty(StoreNotFound):
    """The file is a DuckDB database but holds no drift-monitor schema (nothing written yet).

    A subclass of :class:`StoreNotFound` so that a dashboard can treat both as "no data yet".
    """


class SchemaVersionError(StoreError):
    """The file's schema version is one this code can neither read nor migrate.

    ``hint`` names the fix (:mod:`.schema` picks it): a file newer than the code needs a newer
    drift-monitor, one older than the oldest migratable version needs re-creating.
    """

    def __init__(self, path: str | os.PathLike[str], found: int | str, expected: int, hint: str):
        self.path, self.found, self.expected, self.hint = str(path), found, expected, hint
        super().__init__(
            f"{self.path}: schema version {found} in the file, this drift-monitor reads version "
            f"{expected}; {hint}"
        )


class StoreLocked(StoreError):
    """The database stayed locked by another process for the whole retry budget."""


class LabelError(StoreError, ValueError):
    """Feature labels whose ids are not features of the hook's SAE (not an integer, negative, or
    beyond its d_sae): refused whole, naming the row, rather than wrapped or truncated into
    another feature's label."""


class StoreUnwritable(StoreError):
    """The store cannot be written at start-up (read-only file system, no space, no permission,
    a directory in the way). Raised before a run starts, with the fix in the message; the same
    condition later in a run is retried instead (:func:`is_transient`)."""

    def __init__(self, path: str | os.PathLike[str], cause: BaseException):
        self.path, self.cause = str(path), cause
        super().__init__(f"cannot write the drift-monitor store {self.path}: {first_line(cause)}. Point db_path "
                         f"(--db) at a writable file on a file system with free space")


#: Words of DuckDB errors that come from the file system (DuckDB wraps them in several classes:
#: IOException at open, TransactionException "Failed to commit: Could not write file ...").
_IO_MARKERS = ("no space left", "could not write", "could not read", "cannot open file", "read-only file system",
               "input/output error", "disk quota", "could not truncate", "could not fsync", "permission denied",
               "database has been invalidated")
#: OSError numbers that say "the environment, not the data": worth retrying later.
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT, errno.EAGAIN, errno.EBUSY, errno.EACCES,
                     errno.EPERM, errno.ENOENT, errno.ESTALE}


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same write later can succeed: the file is locked, the disk is full,
    the file system is read-only or failing. False for what retrying cannot fix (a file of
    another schema version, not a DuckDB file, a write the database rejects): those raise.

    Why by kind and message: DuckDB reports a full disk as ``TransactionException: Failed to
    commit: Could not write file "...wal": No space left on device`` (measured with DuckDB 2.0
    on a full tmpfs), a read-only file system as ``IOException: Cannot open file ...``, and
    Python's own file calls (the spool) raise ``OSError`` with an errno.
    """
    if isinstance(exc, StoreLocked):
        return True
    if isinstance(exc, (SchemaVersionError, StoreError)):
        return False
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS or exc.errno is None
    if isinstance(exc, (duckdb.IOException, duckdb.OutOfMemoryException)):
        return True
    if isinstance(exc, duckdb.Error):
        msg = str(exc).lower()
        return any(m in msg for m in _IO_MARKERS)
    return False
