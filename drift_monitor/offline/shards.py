"""Sharded scans: ``drift-monitor scan --shard K/N`` (or one shard per ``torchrun`` rank).

Why shards: a scan of 100 checkpoints in one process takes 100 probe passes end to end; N
processes (N jobs, N GPUs, or the ranks of one ``torchrun``) each take every N-th checkpoint
and finish N times sooner. What makes N shards equal one scan:

* **One run, N files.** Shard K writes ``<store dir>/<run>.shard-K-of-N.duckdb`` (a file per
  writer: DuckDB takes one writer process per file), and the readers show the N files as one
  run (:mod:`drift_monitor.store.many`). Every shard derives the same run id from the same
  inputs; only shard 1 stores the base (step 0).
* **One baseline.** The base is measured once: the baseline cache (``baseline_cache_dir``) is
  filled under a file lock, so the shard that comes second waits and loads it
  (:meth:`DriftMonitor.baseline`).
* **One alert history.** An alert rule looks at the steps before the current one (a sudden
  change, a drop since the base), and a shard sees only every N-th step. So shards store no
  alerts; the shard that finishes last (done markers under a lock) replays every stored step in
  order through the alert engine, exactly as a single scan evaluates them, and writes the alerts
  into shard 1's file (where a write back, e.g. an acknowledgement, goes). Its alerts are stored,
  not pushed: the Pushgateway groups are per shard (``shard`` in the grouping key).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import DriftMonitorError
from ..filelock import file_lock

log = logging.getLogger(__name__)

T = TypeVar("T")


class ShardError(DriftMonitorError, ValueError):
    """A bad ``--shard`` or a sharded scan without a store directory; the message names the fix."""


@dataclass(frozen=True)
class Shard:
    """Shard ``k`` (1-based) of ``n``."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if not (1 <= self.k <= self.n):
            raise ShardError(f"--shard {self.k}/{self.n}: K must lie in 1..N (e.g. --shard 1/4 … 4/4)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` → Shard(K, N)."""
        k, sep, n = str(text).partition("/")
        if not sep or not k.strip().isdigit() or not n.strip().isdigit():
            raise ShardError(f"--shard {text!r}: expected K/N with whole numbers, e.g. --shard 2/4")
        return cls(int(k), int(n))

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Shard | None:
        """Shard RANK+1 of WORLD_SIZE under ``torchrun`` (each rank scans its own checkpoints);
        None outside it or with one process."""
        env = dict(os.environ if env is None else env)
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
        except ValueError:
            return None
        return cls(rank + 1, world) if world > 1 else None

    @property
    def key(self) -> tuple[int, int]:
        return self.k, self.n

    @property
    def first(self) -> bool:
        """Shard 1 stores the base and the run's alerts."""
        return self.k == 1

    def select(self, items: Sequence[T]) -> list[T]:
        """Every N-th item from the K-th (items in step order): shards get the same spread of
        steps, so none waits on the others' late, large checkpoints."""
        return list(items[self.k - 1::self.n])

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def prepare_store(db_path: str) -> None:
    """A sharded scan needs a store directory (N files, one per shard): an existing one, or a new
    path (created) that does not name a ``.duckdb`` file."""
    from ..store.many import SUFFIX, is_many

    p = Path(db_path)
    if not p.exists() and not str(db_path).endswith(SUFFIX) and not any(c in str(db_path) for c in "*?["):
        p.mkdir(parents=True, exist_ok=True)
    if not is_many(db_path) or any(c in str(db_path) for c in "*?["):
        raise ShardError(f"--shard writes one file per shard, so --db must be a store directory (got {db_path!r}); "
                         "give a directory, e.g. --db runs/ (created if missing; read it with --db runs/)")


def shard_files(db_dir: str | os.PathLike[str], run_id: str, n: int) -> list[Path]:
    """The N files of a sharded run, in shard order (whether or not each exists yet)."""
    from ..store.many import run_file

    return [run_file(db_dir, run_id, (k, n)) for k in range(1, n + 1)]


def other_splits(db_dir: str | os.PathLike[str], run_id: str, n: int) -> list[Path]:
    """The files ``run_id`` has in ``db_dir`` from a scan split other than ``n`` ways (1: an
    unsharded scan, whose file is ``<run>.duckdb``). Two splits of one run would hold the same
    steps twice, so a scan does not add a second one (:func:`check_split`)."""
    from ..store.many import run_stem, shard_count, store_files

    stem = _stem(db_dir, run_id)
    return [f for f in store_files(db_dir) if run_stem(f) == stem and shard_count(f) != n]


def check_split(db_dir: str, run_id: str, n: int, force: bool) -> None:
    """Refuse to scan ``run_id`` split ``n`` ways over files of another split, naming both fixes;
    with ``force`` (rescan every step) remove those files, with their write-ahead logs, spools
    and done markers, instead."""
    import shutil

    from ..store.many import shard_count
    from ..store.spool import spool_dir_of

    stale = other_splits(db_dir, run_id, n)
    if stale and not force:
        how = " or ".join(f"--shard K/{m}" if m > 1 else "no --shard" for m in sorted({shard_count(f) for f in stale}))
        raise ShardError(f"run {run_id} already has files of a scan split another way in {db_dir} "
                         f"({', '.join(f.name for f in stale)}): resume it split as before ({how}), or give "
                         "--force to remove them and rescan every step")
    for f in stale:
        log.warning("scan --force: removing %s (run %s, scanned split another way)", f, run_id)
        f.unlink(missing_ok=True)
        Path(f"{f}.wal").unlink(missing_ok=True)
        shutil.rmtree(spool_dir_of(f), ignore_errors=True)
    if force:
        keep = _markers(db_dir, run_id, n)
        for folder in Path(db_dir).glob(f".{_stem(db_dir, run_id)}.shards-of-*"):
            if folder != keep:
                shutil.rmtree(folder, ignore_errors=True)


def _stem(db_dir: str | os.PathLike[str], run_id: str) -> str:
    """The file-name stem of ``run_id``'s files in ``db_dir`` (``<stem>[.shard-K-of-N].duckdb``)."""
    from ..store.many import run_file

    return run_file(db_dir, run_id).stem


def _markers(db_dir: str | os.PathLike[str], run_id: str, n: int) -> Path:
    """Where shards leave their done markers (hidden: not a store file)."""
    return Path(db_dir) / f".{_stem(db_dir, run_id)}.shards-of-{n}"


def begin(db_dir: str, run_id: str, shard: Shard) -> None:
    """A shard starts (or restarts): its done marker goes, so the alerts wait for it again."""
    folder = _markers(db_dir, run_id, shard.n)
    with file_lock(folder / "lock"):
        (folder / f"{shard.k}.done").unlink(missing_ok=True)


def finish(db_dir: str, run_id: str, shard: Shard, config: Any, hooks: Sequence[str]) -> list[Any] | None:
    """Mark ``shard`` done; the shard that completes the set evaluates the run's alerts over every
    stored step of every shard and stores them in shard 1's file. Returns those alerts, or None
    when other shards are still running. Call it after the shard's own store is closed (the last
    shard reads every shard file)."""
    folder = _markers(db_dir, run_id, shard.n)
    with file_lock(folder / "lock"):
        (folder / f"{shard.k}.done").write_text("done\n")
        if not all((folder / f"{k}.done").is_file() for k in range(1, shard.n + 1)):
            return None
        files = [f for f in shard_files(db_dir, run_id, shard.n) if f.is_file()]
        alerts = replay_alerts(files, run_id, hooks, config.outputs.alert_rules)
        from ..store import Store

        store = Store(files[0], run_id=run_id)
        try:
            store.write_alerts(alerts)
        finally:
            store.close()
        log.info("scan: shard %s finished last; %d alert events over the %d shards of run %s stored in %s",
                 shard, len(alerts), shard.n, run_id, files[0])
        return alerts


def replay_alerts(files: Sequence[Path], run_id: str, hooks: Sequence[str], rules: Any) -> list[Any]:
    """The alerts a single scan raises over the steps stored in ``files``, in step order."""
    from ..alerts import AlertEngine, load_rules

    points = stored_points(files, run_id, hooks)
    engine = AlertEngine(load_rules(rules), run=run_id)
    out: list[Any] = []
    for step in sorted(points):
        out += engine.evaluate(points[step])
    return out


def stored_points(files: Sequence[Path | str], run_id: str, hooks: Sequence[str]) -> dict[int, Any]:
    """{step: MetricPoint} of ``run_id`` over ``files`` (each read on its own: a run's shard files,
    or one store), with the emerging refusal features alert messages name, as a live snapshot gives."""
    import pandas as pd

    from ..alerts import MetricPoint
    from ..store import StoreNotFound, StoreReader

    series, refusal = [], []
    for f in files:
        reader = StoreReader(f)
        try:
            m = reader.metric_series(run_id)
        except StoreNotFound:
            continue
        series.append(m)
        for h in set(m.hook) & set(hooks):
            r = reader.refusal_features(run_id, h)
            refusal.append(r[r.emerging.astype(bool)].assign(hook=h))
    if not series:
        return {}
    metrics = pd.concat(series)
    emerging = (pd.concat(refusal).sort_values(["step", "hook", "rank", "feature"]) if refusal
                else pd.DataFrame({"step": [], "hook": [], "feature": []}))
    points: dict[int, Any] = {}
    for step, grp in metrics.groupby("step"):
        s = int(step)
        em = emerging[emerging.step == s]
        points[s] = MetricPoint.of(
            s, metrics={h: dict(zip(g.name, g.value)) for h, g in grp.groupby("hook") if h in hooks},
            emerging={h: g.feature for h, g in em.groupby("hook") if h in hooks})
    return points
