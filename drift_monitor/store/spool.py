"""The spool: writes that could not reach the database, kept on disk until the writer can apply them.

Why: a training step must never block for long on a dashboard that happens to be reading, and
must never lose a snapshot either, not even on a full disk. When the writer cannot write the
file (busy beyond its retry budget, disk full, I/O error) it serialises the :class:`~.ops.Op`
to one self-contained file here (atomically: temp file, fsync, rename) and carries on; the next
write applies the queue first, in order. Exactly-once application is the writer's job (it
records each op id in the same transaction); this module only stores, loads and quarantines
the files, writes and reads *dump files* (the writes a run could not store anywhere else when
it ended, loaded back by :mod:`.replay`), and counts what waits (:func:`spool_state`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shlex
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import StoreError
from .ops import APPLY, Op

log = logging.getLogger(__name__)


class Spool:
    """A directory of pending writes, applied in file-name (= creation) order.

    Each file is a zip (stored, not compressed) of ``op.json`` and one Parquet file per table:
    a single file, so creating it (temp + fsync + rename) and deleting it are both atomic.
    Files that can never be applied (unreadable, or rejected by the database) are moved to
    ``failed/`` rather than deleted: nothing is lost, and they stop blocking the queue. A file
    that meets a transient error (disk full, I/O error, a lock) stays pending and is retried.
    """

    FORMAT = 1

    def __init__(self, directory: Path):
        self.dir = directory
        self._seq = 0
        # What the last listing (or put) of this process saw; True until the first listing, which
        # finds what an earlier process left.
        self._seen_waiting = True

    def pending(self) -> list[Path]:
        found = sorted(p for p in self.dir.glob("*.zip") if not p.name.startswith(".")) if self.dir.is_dir() else []
        self._seen_waiting = bool(found)
        return found

    def may_wait(self) -> bool:
        """Whether a file may be waiting, as this process last saw it, without touching the
        file system: asked at every training step, where a listing on NFS is a network round
        trip. Files another process spools later are found by the next write's listing."""
        return self._seen_waiting

    def put(self, op: Op) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"{time.time_ns():020d}-{os.getpid():07d}-{self._seq:06d}-{op.op_id[:8]}.zip"
        final = self.dir / name
        _write_atomic(final, op_bytes(op))
        self._seen_waiting = True
        return final

    @staticmethod
    def load(path: Path) -> Op:
        return op_from_bytes(path.read_bytes(), str(path))

    def quarantine(self, path: Path, why: BaseException) -> None:
        failed = self.dir / QUARANTINE
        failed.mkdir(exist_ok=True)
        os.replace(path, failed / path.name)
        log.error("drift-monitor: spooled write %s is unreadable or rejected (%s); kept in %s. %s",
                  path.name, why, failed, QUARANTINE_HINT)

    def quarantined(self) -> list[Path]:
        failed = self.dir / QUARANTINE
        return sorted(failed.glob("*.zip")) if failed.is_dir() else []


#: Sub-folder of the spool that holds files which can never be applied.
QUARANTINE = "failed"
QUARANTINE_HINT = ("Quarantined files are unreadable (truncated, corrupt) or rejected by the database; nothing "
                   "retries them: inspect them, then delete them")


def op_bytes(op: Op) -> bytes:
    """One write as a self-contained zip (stored, not compressed): ``op.json`` and one Parquet
    file per table. The format of spool files, and of each entry of a dump file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        meta = {"format": Spool.FORMAT, "kind": op.kind, "op_id": op.op_id, "payload": op.payload}
        zf.writestr("op.json", json.dumps(meta))
        for tname, table in op.tables.items():
            tbuf = io.BytesIO()
            pq.write_table(table, tbuf, compression="zstd")
            zf.writestr(f"{tname}.parquet", tbuf.getvalue())
    return buf.getvalue()


def op_from_bytes(data: bytes, where: str) -> Op:
    """The inverse of :func:`op_bytes`; raises :class:`CorruptSpoolFile` for anything unreadable."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            meta = json.loads(zf.read("op.json"))
            if meta.get("format") != Spool.FORMAT or meta.get("kind") not in APPLY:
                raise ValueError(f"unknown spool format/kind {meta.get('format')}/{meta.get('kind')}")
            tables = {n[: -len(".parquet")]: pq.read_table(io.BytesIO(zf.read(n)))
                      for n in zf.namelist() if n.endswith(".parquet")}
            return Op(meta["kind"], meta["payload"], tables, op_id=meta["op_id"])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, json.JSONDecodeError, UnicodeDecodeError, KeyError,
            ValueError, TypeError, EOFError, pa.ArrowException) as exc:
        raise CorruptSpoolFile(f"{where}: {type(exc).__name__}: {exc}") from exc


class CorruptSpoolFile(StoreError, ValueError):
    """A spool or dump entry that cannot be read back: the only reason a file is quarantined
    without trying the database (an ``OSError`` reading it is retried instead)."""


# -- dump files: what could not be written anywhere else when a run ended ------------------------

DUMP_SUFFIX = ".unsaved.zip"


def write_dump(path: Path, ops: list[Op]) -> Path:
    """Write ``ops`` (in order) to one file: a zip whose entries are spool files, named so that
    they sort in the order they must be applied. Atomic (temp file, fsync, rename)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, op in enumerate(ops):
            zf.writestr(f"{i:08d}-{op.op_id}.zip", op_bytes(op))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, buf.getvalue())
    return path


def read_dump(path: Path) -> list[Op]:
    """The writes of a dump file, in order (:class:`CorruptSpoolFile` if it cannot be read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            entries = sorted(n for n in zf.namelist() if n.endswith(".zip"))
            return [op_from_bytes(zf.read(n), f"{path}:{n}") for n in entries]
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CorruptSpoolFile(f"{path}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class SpoolNotice:
    """One line of :meth:`SpoolState.notices`: ``level`` says how loud (a dashboard box colour)."""

    level: Literal["warning", "error"]
    text: str


@dataclass
class SpoolState:
    """What waits outside the database of ``db``, for ``drift-monitor runs`` and the dashboard:
    writes pending per run (spool files and dump files beside the database), quarantined files."""

    spool_dir: Path
    pending: dict[str, int] = field(default_factory=dict)  # run id ("" when unknown) -> writes
    quarantined: list[Path] = field(default_factory=list)
    dumps: list[Path] = field(default_factory=list)

    @property
    def n_pending(self) -> int:
        return sum(self.pending.values())

    def notices(self, db: str | os.PathLike[str], *, markdown: bool = False) -> list[SpoolNotice]:
        """What to tell the user about this state, with the fix: the waiting writes and the
        commands that load them (a ``warning``), the quarantined files (an ``error``); none when
        nothing waits. One text for ``drift-monitor runs`` and the dashboard's Runs page, so the
        two never say different things; ``markdown`` sets paths and commands as code."""
        def code(text: object) -> str:
            return f"`{text}`" if markdown else str(text)

        out: list[SpoolNotice] = []
        if self.n_pending:
            beside = f" and {len(self.dumps)} dump files beside it" if self.dumps else ""
            commands = "".join(f"\n{'- ' if markdown else '  '}{code(replay_command(db, dump))}"
                               for dump in self.dumps or [None])
            out.append(SpoolNotice("warning", f"{self.n_pending} writes are not in the database yet (in "
                                              f"{code(self.spool_dir)}{beside}); load them with:{commands}"))
        if self.quarantined:
            out.append(SpoolNotice("error", f"{len(self.quarantined)} quarantined spool files in "
                                            f"{code(self.quarantined[0].parent)}: "
                                            f"{', '.join(p.name for p in self.quarantined)}.\n{QUARANTINE_HINT}."))
        return out


def replay_command(db: str | os.PathLike[str], dump: str | os.PathLike[str] | None = None) -> str:
    """The shell command that loads ``dump`` (or, without it, the spool) into ``db``."""
    parts = [sys.executable, "-m", "drift_monitor.store.replay", *([str(dump)] if dump else []), "--db", str(db)]
    return " ".join(shlex.quote(p) for p in parts)


#: A store file's spool folder is the file's name plus this (:func:`spool_dir_of`).
SPOOL_SUFFIX = ".spool"


def spool_dir_of(db: str | os.PathLike[str]) -> Path:
    """The spool folder of the store file ``db``: ``<db>.spool``, beside it."""
    return Path(f"{db}{SPOOL_SUFFIX}")


def spool_state(db: str | os.PathLike[str], spool_dir: str | os.PathLike[str] | None = None) -> SpoolState:
    """Read the spool of ``db`` (default :func:`spool_dir_of`) and the dump files beside ``db``."""
    spool = Spool(Path(spool_dir) if spool_dir is not None else spool_dir_of(db))
    state = SpoolState(spool.dir, quarantined=spool.quarantined())
    dumps = sorted(Path(db).parent.glob(f"{Path(db).name}*{DUMP_SUFFIX}"))
    state.dumps = dumps
    for path in spool.pending():
        _count(state.pending, _run_of(path))
    for dump in dumps:
        with contextlib.suppress(OSError, zipfile.BadZipFile):
            with zipfile.ZipFile(dump) as zf:
                for n in zf.namelist():
                    _count(state.pending, _run_of_bytes(zf.read(n)))
    return state


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


def _run_of(path: Path) -> str:
    try:
        return _run_of_bytes(path.read_bytes())
    except OSError:
        return ""


def _run_of_bytes(data: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return str(json.loads(zf.read("op.json")).get("payload", {}).get("run_id") or "")
    except (zipfile.BadZipFile, KeyError, ValueError):
        return ""


def _write_atomic(final: Path, data: bytes) -> None:
    tmp = final.parent / f".{final.name}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(final.parent)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: fsync the directory entry too (best effort: not every OS allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

