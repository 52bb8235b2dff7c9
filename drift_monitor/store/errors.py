"""The errors the store raises on purpose, one class per thing a caller can do about it.

Why separate classes: a dashboard shows "no data yet" for :class:`StoreNotFound` (and its
subclass :class:`StoreEmpty`), tells the user how to fix a :class:`SchemaVersionError`, and
tries again later after :class:`StoreLocked`; any other exception is a bug or a damaged file.
They live in a module of their own so every other store module can raise them without an
import cycle.
"""

from __future__ import annotations

import os


class StoreError(Exception):
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
