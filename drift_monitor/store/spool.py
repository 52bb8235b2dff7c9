"""The spool: writes that found the file busy, kept on disk until the writer can apply them.

Why: a training step must never block for long on a dashboard that happens to be reading, and
must never lose a snapshot either. When the writer cannot get the file within its retry budget
it serialises the :class:`~.ops._Op` to one self-contained file here (atomically: temp file,
fsync, rename) and carries on; the next write applies the queue first, in order. Exactly-once
application is the writer's job (it records each op id in the same transaction); this module
only stores, loads and quarantines the files.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import pyarrow.parquet as pq

from .ops import _APPLY, _Op

log = logging.getLogger(__name__)


class _Spool:
    """A directory of pending writes, applied in file-name (= creation) order.

    Each file is a zip (stored, not compressed) of ``op.json`` and one Parquet file per table:
    a single file, so creating it (temp + fsync + rename) and deleting it are both atomic.
    Files that cannot be applied (corrupt, or rejected by the database) are moved to
    ``failed/`` rather than deleted: nothing is lost, and they stop blocking the queue.
    """

    FORMAT = 1

    def __init__(self, directory: Path):
        self.dir = directory
        self._seq = 0

    def pending(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.zip") if not p.name.startswith("."))

    def put(self, op: _Op) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid():07d}-{self._seq:06d}-{op.op_id[:8]}.zip"
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
                meta = {"format": self.FORMAT, "kind": op.kind, "op_id": op.op_id, "payload": op.payload}
                zf.writestr("op.json", json.dumps(meta))
                for tname, table in op.tables.items():
                    buf = io.BytesIO()
                    pq.write_table(table, buf, compression="zstd")
                    zf.writestr(f"{tname}.parquet", buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        return final

    @staticmethod
    def load(path: Path) -> _Op:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("op.json"))
            if meta.get("format") != _Spool.FORMAT or meta.get("kind") not in _APPLY:
                raise ValueError(f"unknown spool format/kind in {path}: {meta.get('format')}/{meta.get('kind')}")
            tables = {
                n[: -len(".parquet")]: pq.read_table(io.BytesIO(zf.read(n)))
                for n in zf.namelist()
                if n.endswith(".parquet")
            }
        return _Op(meta["kind"], meta["payload"], tables, op_id=meta["op_id"])

    def quarantine(self, path: Path, why: BaseException) -> None:
        failed = self.dir / "failed"
        failed.mkdir(exist_ok=True)
        os.replace(path, failed / path.name)
        log.error("drift-monitor: spooled write %s could not be applied (%s); kept in %s", path.name, why, failed)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the directory entry too (best effort: not every OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

