"""Resuming a run: which stored run a new process continues, and whether what it measures compares.

Why one module: the training callback (a job resumed from a checkpoint, or requeued and started
over) and the offline scan (a rerun into a stored run) answer the same two questions, and a run
continued the wrong way stores steps that do not compare. Each reads what it has:

* **Training's state files.** ``drift_monitor.json`` in each checkpoint (:class:`CheckpointState`:
  the run id, the base fingerprint that keys the baseline cache, the probe hash, the steps done,
  the alert state) lets a job resumed from that checkpoint keep its run; ``drift_monitor_run.json``
  in the output folder names the run while it is unfinished, so a job requeued before its first
  checkpoint (training from step 0 again) keeps it too, and goes when the run finishes.
* **The store.** A scan finds the run by name or id, the (step, hook) pairs already stored (skipped
  unless ``--force``) and the stored configuration and probe hash (a rerun with other settings is
  refused: :func:`changed_settings`).

Torch-free (config, store, text files only), so the callback and the scan share it without
either importing the other.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store.many import exists as store_exists
from .textfiles import write_json_atomic

log = logging.getLogger("drift_monitor.resume")

#: In each checkpoint the callback saves: the run a job resumed from that checkpoint continues.
STATE_FILE = "drift_monitor.json"
#: In the output folder while a run is unfinished: a requeued job that starts over continues it.
RUN_FILE = "drift_monitor_run.json"


# ---------------------------------------------------------------------------------- training's state files
@dataclass
class CheckpointState:
    """What ``drift_monitor.json`` holds (the field order is the file's key order)."""

    run_id: str | None
    base_fingerprint: str | None
    probe_hash: str | None
    done_steps: list[int] = field(default_factory=list)
    alerts: dict | None = None  # the alert engine's state: resuming keeps cooldowns and history

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointState:
        return cls(run_id=data.get("run_id"), base_fingerprint=data.get("base_fingerprint"),
                   probe_hash=data.get("probe_hash"), done_steps=list(data.get("done_steps", [])),
                   alerts=data.get("alerts"))


def read_checkpoint_state(output_dir: str | Path, step: int, probe_hash: str) -> CheckpointState | None:
    """The state a job resuming at ``step`` continues: ``checkpoint-<step>/drift_monitor.json`` of
    ``output_dir``; None at step 0, without the file, or when the probes changed since (a warning:
    steps measured with other probes do not compare, so that is a new run)."""
    if step == 0:
        return None
    path = Path(output_dir) / f"checkpoint-{step}" / STATE_FILE
    if not path.is_file():
        return None
    state = CheckpointState.from_dict(json.loads(path.read_text()))
    if state.probe_hash != probe_hash:
        log.warning("drift-monitor: the probe set changed since the checkpoint (%s -> %s); starting a new run",
                    state.probe_hash, probe_hash)
        return None
    return state


def write_checkpoint_state(output_dir: str | Path, step: int, state: CheckpointState) -> None:
    """Save ``state`` into ``checkpoint-<step>`` of ``output_dir`` (whole or not at all); a missing
    checkpoint folder is a warning (a trainer that saved elsewhere), not an error."""
    ckpt = Path(output_dir) / f"checkpoint-{step}"
    if not ckpt.is_dir():
        log.warning("drift-monitor: checkpoint folder %s not found; state not saved", ckpt)
        return
    write_json_atomic(ckpt / STATE_FILE, dataclasses.asdict(state))


def requeued_run(output_dir: str | Path, probe_hash: str, base_fingerprint: str | None) -> str | None:
    """The unfinished run ``output_dir`` names, when this job starts it over from the same base with
    the same probes (a requeued job); None otherwise (a new run)."""
    path = Path(output_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (data.get("probe_hash"), data.get("base_fingerprint")) != (probe_hash, base_fingerprint):
        log.info("drift-monitor: %s names run %s of another base or probe set; starting a new run",
                 path, data.get("run_id"))
        return None
    log.info("drift-monitor: continuing the unfinished run %s named by %s (a requeued job starting over)",
             data.get("run_id"), path)
    return str(data["run_id"]) if data.get("run_id") else None


def write_run_file(output_dir: str | Path, run_id: str | None, probe_hash: str, base_fingerprint: str | None) -> None:
    """Name the unfinished run in ``output_dir`` (read back by :func:`requeued_run`)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RUN_FILE, {"run_id": run_id, "probe_hash": probe_hash,
                                       "base_fingerprint": base_fingerprint})


def end_run_file(output_dir: str | Path) -> None:
    """The run finished: the next training in ``output_dir`` is a new run."""
    (Path(output_dir) / RUN_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- the store
def existing_run_id(db_path: str, run_name: str | None) -> str | None:
    """The id of the run named ``run_name`` in ``db_path`` (a callback run has a uuid id), if any."""
    from .store import StoreError, StoreReader

    if not run_name or not store_exists(db_path):
        return None
    try:
        runs = StoreReader(db_path).runs()
    except StoreError:
        return None
    hit = runs[(runs.run_id == run_name) | (runs.name == run_name)]
    return str(hit.run_id.iloc[0]) if len(hit) else None


def stored_steps(db_path: str, run_id: str) -> set[tuple[int, str]]:
    """(step, hook) pairs already stored for ``run_id``."""
    from .store import StoreNotFound, StoreReader

    try:
        snaps = StoreReader(db_path).snapshots(run_id)
    except StoreNotFound:
        return set()
    return {(int(s), str(h)) for s, h in zip(snaps.step, snaps.hook)}


def stored_config(db_path: str, run_id: str) -> dict[str, Any]:
    """The stored ``config_json`` of ``run_id`` (a name or id) in ``db_path``; {} when absent."""
    from .store import StoreError, StoreReader

    if not store_exists(db_path):
        return {}
    try:
        runs = StoreReader(db_path).runs()
        row = runs[runs.run_id == run_id]
        raw = row["config_json"].iloc[0] if len(row) else None
        return json.loads(raw) if raw else {}
    except (StoreError, ValueError, KeyError):
        return {}


def changed_settings(db_path: str, run_id: str, config: Any, probe_hash: str) -> list[str]:
    """What differs between the steps ``run_id`` has stored in ``db_path`` and a ``config``
    (a :class:`~drift_monitor.config.MonitorConfig`) measuring with ``probe_hash``: "the probes
    (their tokens)" first, then the names of the settings that differ, sorted. Empty when they
    compare, or when nothing of the run is stored yet (nothing to mix with)."""
    from .config import MonitorConfig
    from .store import StoreError, StoreReader

    if not store_exists(db_path):
        return []
    try:
        runs = StoreReader(db_path).runs()
    except StoreError:
        return []
    row = runs[runs.run_id == run_id]
    if not len(row) or not stored_steps(db_path, run_id):
        return []
    stored_hash = row["probe_hash"].iloc[0] if "probe_hash" in row else None
    raw = row["config_json"].iloc[0] if "config_json" in row else None
    before = MonitorConfig.stored_settings(json.loads(raw)) if raw else {}
    now = MonitorConfig.stored_settings(config.to_dict())
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if stored_hash and stored_hash != probe_hash:
        changed.insert(0, "the probes (their tokens)")
    return changed
