"""Offline scan: the callback's computation over saved checkpoints, resumably.

    drift-monitor scan --base-model BASE --sae model.layers.12=SAE --checkpoints out/ --db drift.duckdb

Why a separate path from the callback: after the fact there is no trainer, the checkpoints may
be full models or PEFT adapters, some may be broken, and the scan may be interrupted. So:
checkpoints are found and validated up front (clear errors, nothing loaded yet); the base is
loaded once and adapters are swapped onto it (never a base reload per adapter); a
(run, step, hook) already stored is skipped unless ``force``; one checkpoint failing to load
is reported and the rest are still scanned (a bug of ours there keeps its traceback, in
``<db>.errors.log``: :class:`_CheckpointScan`); alerts are evaluated over the scanned sequence
exactly as in the callback; aggregates go to a Pushgateway when one is given.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import re
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DriftMonitorError, first_line
from ..progress import bar
from ..resume import changed_settings, existing_run_id, stored_config, stored_steps
from ..store.many import exists as store_exists
from ..store.many import run_file
from . import shards
from .loading import load_errors, load_model
from .shards import Shard

log = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: Beside the store file (``<db>.errors.log``): the tracebacks of checkpoints failed by a bug of ours.
ERROR_LOG_SUFFIX = ".errors.log"


class ScanError(DriftMonitorError, ValueError):
    """Bad scan input, with the path and the fix in the message."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    kind: str  # "full" | "adapter"


@dataclass
class CheckpointResult:
    checkpoint: Checkpoint
    status: str  # "scanned" | "skipped" | "failed"
    seconds: float = 0.0
    load_seconds: float = 0.0
    error: str | None = None
    #: an internal error's traceback (a bug in drift-monitor; also in the error log the error names)
    traceback: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    emerging: dict[str, list[int]] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)


@dataclass
class ScanResult:
    run_id: str
    results: list[CheckpointResult]
    hooks: list[str] = field(default_factory=list)
    #: files of writes the store could not take by the end (load them with ``drift-monitor replay``)
    unsaved: list[str] = field(default_factory=list)
    #: a sharded scan's shard (``"K/N"``), else None
    shard: str | None = None
    #: the last shard to finish: the run's alert events over every shard's steps (``step:rule:status``)
    run_alerts: list[str] | None = None

    @property
    def failed(self) -> list[CheckpointResult]:
        return [r for r in self.results if r.status == "failed"]


# ---------------------------------------------------------------------------------- discovery
def checkpoint_kind(path: Path) -> str:
    """"adapter" or "full"; a ScanError naming what is missing otherwise."""
    if (path / "adapter_config.json").is_file():
        if not any((path / f).is_file() for f in _ADAPTER_WEIGHTS):
            raise ScanError(f"{path}: adapter_config.json found but no adapter weights "
                            f"({' or '.join(_ADAPTER_WEIGHTS)})")
        return "adapter"
    if (path / "config.json").is_file():
        if not any((path / f).is_file() for f in _WEIGHT_FILES) and not list(path.glob("*.safetensors")):
            raise ScanError(f"{path}: config.json found but no model weights (model.safetensors or pytorch_model.bin)")
        return "full"
    raise ScanError(f"{path}: not a checkpoint (no config.json with weights, no adapter_config.json)")


def _step_of(path: Path) -> int | None:
    """The checkpoint's training step: ``global_step`` of its ``trainer_state.json``, else the N
    of a ``checkpoint-N`` name, else None. A state file that is there but unreadable, or whose
    step is not a non-negative integer, is refused rather than guessed around."""
    state = path / "trainer_state.json"
    if state.is_file():
        try:
            data = json.loads(state.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ScanError(f"{state}: not valid JSON ({e}); restore the file, or give the checkpoint as "
                            "--model STEP=PATH") from None
        step = data.get("global_step") if isinstance(data, dict) else None
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ScanError(f"{state}: global_step must be a non-negative integer, got {step!r}; fix the file, "
                                "or give the checkpoint as --model STEP=PATH")
            return step
    m = _CKPT.match(path.name)
    return int(m[1]) if m else None


def discover(checkpoints: Sequence[str] = (), models: Sequence[str] = ()) -> list[Checkpoint]:
    """Checkpoints from folders/globs (``checkpoint-N`` children, ordered by N, step from
    ``trainer_state.json``; a final output folder with weights counts too) and explicit
    ``STEP=PATH`` pairs. Raises ScanError for anything missing or unreadable, before loading."""
    found: dict[int, Checkpoint] = {}

    def add(step: int, path: Path) -> None:
        if step in found and found[step].path != path:
            raise ScanError(f"two checkpoints for step {step}: {found[step].path} and {path}; give one with --model")
        found[step] = Checkpoint(step, path, checkpoint_kind(path))

    for spec in models:
        if "=" not in spec:
            raise ScanError(f"--model {spec!r}: expected STEP=PATH, e.g. --model 0=base --model 1000=chat")
        s, p = spec.split("=", 1)
        if not s.strip().isdigit():
            raise ScanError(f"--model {spec!r}: the step {s!r} is not an integer >= 0; "
                            "give the training step, e.g. --model 1000=PATH")
        path = Path(p).expanduser()
        if not path.exists():
            raise ScanError(f"--model {spec!r}: {path} does not exist")
        add(int(s), path)
    for spec in checkpoints:
        paths = [Path(p) for p in sorted(globlib.glob(spec))] if any(c in spec for c in "*?[") else [Path(spec)]
        if not paths:
            raise ScanError(f"--checkpoints {spec!r}: the pattern matches nothing")
        for path in paths:
            _add_folder(path, add)
    if not found:
        raise ScanError("no checkpoints to scan: give --checkpoints DIR|GLOB or --model STEP=PATH")
    return [found[s] for s in sorted(found)]


def _add_folder(path: Path, add) -> None:
    if not path.exists():
        raise ScanError(f"--checkpoints {path}: no such directory")
    if not path.is_dir():
        raise ScanError(f"--checkpoints {path}: not a directory")
    children = sorted((c for c in path.iterdir() if c.is_dir() and _CKPT.match(c.name)),
                      key=lambda c: int(_CKPT.match(c.name)[1]))  # type: ignore[index]
    is_ckpt = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if not children and not is_ckpt:
        raise ScanError(f"--checkpoints {path}: no checkpoint-N folders and no model or adapter in it")
    for c in children:
        add(_step_of(c), c)  # type: ignore[arg-type]
    if is_ckpt:  # a checkpoint itself, or a final output folder beside its checkpoint-N children
        step = _step_of(path)
        if step is None:
            if not children:
                raise ScanError(f"{path}: cannot tell its training step (no trainer_state.json, not named "
                                "checkpoint-N); give it as --model STEP=PATH")
            step = max(_step_of(c) or 0 for c in children)
            log.info("%s: final output folder, taken as step %d (its last checkpoint's)", path, step)
        if any(_step_of(c) == step for c in children):
            return  # a final output folder (save_model + save_state) holds its last checkpoint's weights
        add(step, path)


# ---------------------------------------------------------------------------------- loading
class _AdapterSwapper:
    """Loads each adapter onto one base model, dropping the previous one (the base loads once)."""

    def __init__(self, base):
        self.base = base
        self.model = None
        self.current: str | None = None

    def load(self, ckpt: Checkpoint):
        from peft import PeftModel

        name = f"step{ckpt.step}"
        try:
            with load_errors("checkpoint", ckpt.path, "adapter"):
                if self.model is None:
                    self.model = PeftModel.from_pretrained(self.base, str(ckpt.path), adapter_name=name)
                else:
                    self.model.load_adapter(str(ckpt.path), adapter_name=name)
                    self.model.set_adapter(name)
        except RuntimeError as e:
            if "size mismatch" in str(e) or "shape" in str(e):
                detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), first_line(e))
                raise ScanError(f"{ckpt.path}: this adapter does not fit the base model ({detail}); "
                                "was it trained on a different base?") from None
            raise
        if self.current is not None and self.current != name:
            self.model.delete_adapter(self.current)
        self.current = name
        self.model.eval()
        return self.model


# ---------------------------------------------------------------------------------- the scan
def run_id_for(run_name: str | None, base_model: str, checkpoints: Sequence[Checkpoint]) -> str:
    """Stable across reruns (so a rerun resumes): the run name, else a hash of the inputs."""
    if run_name:
        return run_name
    h = hashlib.sha256(str(Path(base_model).resolve()).encode())
    for c in checkpoints:
        h.update(str(c.path.resolve().parent).encode())
    return "scan-" + h.hexdigest()[:12]


def scan(
    base_model: str,
    config: Any,
    *,
    checkpoints: Sequence[str] = (),
    models: Sequence[str] = (),
    dtype: str | None = None,
    force: bool = False,
    trust_remote_code: bool = False,
    shard: Shard | str | None = None,
) -> ScanResult:
    """Scan ``checkpoints`` (and ``STEP=PATH`` ``models``) against ``base_model``; see the module docstring.

    ``config`` is the :class:`~drift_monitor.config.MonitorConfig` (or a YAML/JSON file) whose
    ``outputs`` say where the run goes (``db_path``, ``run_name``, ``pushgateway_url``,
    ``show_progress``) and whose ``device`` the models load on. :func:`resolve_config` builds one
    that continues a stored run's settings, as ``drift-monitor scan`` does.

    A rerun into a run already in the store resumes it, and is refused when its probes, SAEs or
    settings differ from the stored ones: mixing them would store steps that do not compare.
    ``force`` rescans every step instead (the stored settings are then replaced).

    ``shard`` (``"K/N"``; by default RANK+1/WORLD_SIZE under ``torchrun``): scan every N-th
    checkpoint into this shard's own file of the store directory (:mod:`.shards`).
    """
    from transformers import AutoTokenizer

    from ..config import MonitorConfig
    from ..monitor import DriftMonitor
    from ..recorder import RunRecorder

    cfg = config if isinstance(config, MonitorConfig) else MonitorConfig.from_file(config)
    if not cfg.outputs.db_path:
        raise ScanError("a scan needs a store: set outputs.db_path (drift-monitor scan --db FILE)")
    db_path, run_name, progress = cfg.outputs.db_path, cfg.outputs.run_name, cfg.outputs.show_progress
    device = cfg.device or "cpu"
    base_path, ckpts = _inputs(base_model, checkpoints, models)
    run_id = existing_run_id(db_path, run_name) or run_id_for(run_name, base_model, ckpts)
    shard = Shard.parse(shard) if isinstance(shard, str) else shard or Shard.from_env()
    own = db_path  # what this process reads back: its own shard file in a sharded scan
    if shard is not None:
        shards.prepare_store(db_path)
        shards.check_split(db_path, run_id, shard.n, force)
        ckpts = shard.select(ckpts)
        own = str(run_file(db_path, run_id, shard.key))
        shards.begin(db_path, run_id, shard)
        log.info("scan: shard %s of run %s: %d checkpoints into %s", shard, run_id, len(ckpts), own)
    elif force and Path(db_path).is_dir():  # an unsharded rescan replaces a sharded one's files
        shards.check_split(db_path, run_id, 1, force)
    with load_errors("--base-model", base_path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(base_path), trust_remote_code=trust_remote_code)
    mon = DriftMonitor(cfg, tok)
    if not force:
        _check_resumable(own, run_id, cfg, mon.probe_hash)
    # the store first: a bad --db fails in a second, before the base model loads
    rec = RunRecorder.open(cfg, probe_hash=mon.probe_hash, run_id=run_id, run_name=run_name or run_id,
                           model_name=str(base_path), push_job="drift_monitor_scan",
                           shard=shard.key if shard else None, alerts=shard is None)
    results: list[CheckpointResult] = []
    hooks = mon.hooks
    try:
        base = load_model(base_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          what="--base-model")
        base_snap = mon.baseline(base)  # once per base: a second shard waits for the cache and loads it
        done = stored_steps(own, run_id)
        if shard is None or shard.first:  # of a sharded scan's files, shard 1's holds the base
            if force or not all((0, h) in done for h in hooks):
                rec.record(base_snap)
            else:
                rec.observe(base_snap)
        one = _CheckpointScan(mon, _AdapterSwapper(base), rec, device, dtype, trust_remote_code,
                              error_log=error_log_path(own))
        if cfg.cadence.adapter_signals is not False and any(c.kind == "adapter" for c in ckpts):
            from ..probe.adapters import AdapterTracker

            one.tracker = AdapterTracker()  # LoRA norms and B-trajectory cosines over the scanned adapters
        history = shards.stored_points([own], run_id, hooks) if shard is None and store_exists(own) else {}
        for ckpt in bar(ckpts, desc="scan", unit="ckpt", enabled=progress):
            if not force and all((ckpt.step, h) in done for h in hooks):
                if ckpt.step in history:
                    rec.observe(history[ckpt.step])
                results.append(CheckpointResult(ckpt, "skipped"))
                continue
            results.append(one(ckpt))
    except BaseException as e:
        # interrupted (Ctrl-C) or failed; SIGTERM is recorded as preempted by the recorder's
        # RunEndWatch. Every stored snapshot is whole (one transaction each); a rerun skips
        # them and finishes.
        from ..recorder import status_for

        rec.finish(status_for(e))
        raise
    rec.finish("failed" if any(r.status == "failed" for r in results) else "finished")
    result = ScanResult(run_id, results, hooks, unsaved=[str(p) for p in rec.unsaved],
                        shard=str(shard) if shard else None)
    if shard is not None:  # the last shard to finish evaluates the run's alerts over every shard's steps
        alerts = shards.finish(db_path, run_id, shard, cfg, hooks)
        result.run_alerts = None if alerts is None else [f"{a.step}:{a.rule}:{a.status}" for a in alerts]
    return result


def _inputs(base_model: str, checkpoints: Sequence[str], models: Sequence[str]) -> tuple[Path, list[Checkpoint]]:
    """The base folder and the checkpoints to scan (step 0, the base itself, measured apart)."""
    ckpts = discover(checkpoints, models)
    base_path = Path(base_model)
    if not base_path.exists():
        raise ScanError(f"--base-model {base_model}: no such directory")
    if checkpoint_kind(base_path) != "full":
        raise ScanError(f"--base-model {base_model}: expected a full model folder (config.json + weights)")
    # Step 0 is the base: `--model 0=BASE` names the baseline itself (measured once, below);
    # another model at step 0 would overwrite the baseline every later step is paired against.
    for c in ckpts:
        if c.step == 0 and c.path.resolve() != base_path.resolve():
            raise ScanError(f"{c.path} is given as step 0, but step 0 is the base model ({base_model}); "
                            "give it another step, or pass it as --base-model")
    return base_path, [c for c in ckpts if c.step != 0]


def resolve_config(base_model: str, *, db_path: str, run_name: str | None = None, checkpoints: Sequence[str] = (),
                   models: Sequence[str] = (), config: Any = None, overrides: dict[str, Any] | None = None):
    """The MonitorConfig of a scan into ``db_path``: the defaults < the stored configuration of the run
    being scanned into, when it exists (so a rerun, or a scan of a callback run's checkpoints into
    that run, measures exactly what the run measured) < ``config`` (a MonitorConfig, or a YAML/JSON
    file) < ``overrides`` (flat settings, e.g. from command-line flags)."""
    from ..config import MonitorConfig, flatten, nest

    run_id = existing_run_id(db_path, run_name) or run_name
    if run_id is None and store_exists(db_path):  # a scan without --run-name: its id comes from the inputs
        run_id = run_id_for(None, base_model, _inputs(base_model, checkpoints, models)[1])
    settings: dict[str, Any] = {}
    stored = stored_config(db_path, run_id) if run_id else {}
    if stored:
        settings.update(MonitorConfig.stored_settings(stored))
        log.info("scan: using the stored configuration of run %s (explicit settings override it)", run_id)
    if isinstance(config, MonitorConfig):
        given = config.to_dict()  # in-memory SAEs, directions and probe sets are kept as objects
        settings.update(flatten({**given, "saes": config.saes, "directions": config.directions,
                                 "probes": {**given["probes"], "source": config.probes.source}}))
    elif config is not None:
        settings.update(MonitorConfig.read_file(config))
    settings.update(overrides or {})
    settings.update(db_path=db_path, run_name=run_name)
    if not settings.get("saes"):
        raise ScanError("no SAE to scan with: give --sae HOOK=SOURCE, a --config that names saes, or scan into "
                        "an existing run (--run-name) whose stored configuration does")
    return MonitorConfig(**nest(settings))


def _check_resumable(db_path: str, run_id: str, cfg: Any, probe_hash: str) -> None:
    """Refuse to add steps to a stored run measured with other probes, SAEs or settings."""
    changed = changed_settings(db_path, run_id, cfg, probe_hash)
    if changed:
        raise ScanError(f"run {run_id} in {db_path} was measured with other settings ({', '.join(changed)}); "
                        "scanning into it would mix steps that do not compare: give a new --run-name, or --force "
                        "to rescan every step with these settings")


def error_log_path(db_path: str | Path) -> Path:
    """Where a scan into ``db_path`` appends the tracebacks of internal errors: ``<db>.errors.log``
    beside the store file (inside a store directory). Beside the data it concerns, like the
    spool, so it is found, and kept, with it."""
    db = Path(db_path)
    return db / f"drift_monitor{ERROR_LOG_SUFFIX}" if db.is_dir() else db.with_name(db.name + ERROR_LOG_SUFFIX)


def save_traceback(path: Path, header: str, text: str) -> Path | None:
    """Append ``header`` and the traceback ``text`` to ``path`` (else to the same name in the temp
    folder, when ``path``'s folder cannot take it); the file written, or None when neither could."""
    for target in (path, Path(tempfile.gettempdir()) / path.name):
        try:
            with target.open("a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {header}\n{text.rstrip()}\n\n")
        except OSError:
            continue
        return target
    return None


@dataclass
class _CheckpointScan:
    """Scans one checkpoint at a time (``one(ckpt)``) with what every checkpoint of a scan shares.

    Why the error split: a checkpoint that cannot be loaded or does not fit (a
    :class:`~drift_monitor.errors.DriftMonitorError`, whose message names it and the fix) is the
    input's fault, so it is one line and the rest are scanned. Anything else is a bug of ours
    that would read like a bad checkpoint on one line: the checkpoint fails too (the rest are
    still scanned), but the whole traceback is appended to the error log (:func:`error_log_path`)
    always, logged at DEBUG (so ``--debug`` prints it on stderr), and stored as a
    ``monitor_error`` alert that says where the traceback is."""

    mon: Any  # drift_monitor.monitor.DriftMonitor
    swapper: _AdapterSwapper
    rec: Any  # drift_monitor.recorder.RunRecorder
    device: str
    dtype: str | None
    trust_remote_code: bool
    error_log: Path
    tracker: Any = None  # drift_monitor.probe.adapters.AdapterTracker, when adapter signals are on

    def __call__(self, ckpt: Checkpoint) -> CheckpointResult:
        from ..recorder import merge_adapter_signals

        t0 = time.perf_counter()
        try:
            if ckpt.kind == "adapter":
                model = self.swapper.load(ckpt)
            else:
                model = load_model(ckpt.path, device=self.device, dtype=self.dtype,
                                   trust_remote_code=self.trust_remote_code)
            t_load = time.perf_counter() - t0
            snap = self.mon.snapshot(model, ckpt.step)
            if self.tracker is not None and ckpt.kind == "adapter":
                # the adapter signals of the callback, with k = the checkpoint spacing (hooks adapter/adapter:<module>)
                snap = merge_adapter_signals(snap, self.tracker.record(model, ckpt.step))
        except ScanError as e:
            return CheckpointResult(ckpt, "failed", time.perf_counter() - t0, error=str(e))
        except DriftMonitorError as e:
            return CheckpointResult(ckpt, "failed", time.perf_counter() - t0,
                                    error=f"{type(e).__name__}: {first_line(e)}")
        except Exception as e:  # noqa: BLE001 - a bug of ours: its traceback is kept, the rest is scanned
            return self._internal_error(ckpt, e, time.perf_counter() - t0)
        alerts = self.rec.record(snap)
        if ckpt.kind == "full":
            del model
        return CheckpointResult(
            ckpt, "scanned", time.perf_counter() - t0, load_seconds=t_load,
            metrics={h: dict(r.metrics) for h, r in snap.hooks.items()},
            emerging={h: list(r.refusal.emerging) if r.refusal else [] for h, r in snap.hooks.items()},
            alerts=[f"{a.rule}:{a.status}" for a in alerts])

    def _internal_error(self, ckpt: Checkpoint, e: Exception, seconds: float) -> CheckpointResult:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        what = f"checkpoint {ckpt.path} (step {ckpt.step})"
        log.debug("scan: internal error scanning %s:\n%s", what, tb)
        saved = save_traceback(self.error_log, f"run {self.rec.run_id}, {what}: internal error", tb)
        where = f"its traceback is in {saved}" if saved else \
            f"its traceback could not be saved ({self.error_log} and the temp folder refused it)"
        if saved is None:
            log.error("scan: internal error scanning %s:\n%s", what, tb)  # kept somewhere: the log itself
        self.rec.record_error(f"scan of {what}, internal error ({where})", e, step=ckpt.step)
        return CheckpointResult(ckpt, "failed", seconds, traceback=tb,
                                error=f"internal error {type(e).__name__}: {first_line(e)} (a bug in drift-monitor, "
                                      f"not in the checkpoint; {where}: please report it)")


def format_summary(result: ScanResult, hooks: Sequence[str]) -> str:
    """The end-of-scan table: step, status, EV, drifted share, top refusal features, alerts."""
    lines = [f"{'step':>7} {'kind':<8} {'status':<8} {'hook':<22} {'expl.var':>9} {'drifted':>8} "
             f"{'time s':>7}  top refusal features / alerts / error"]
    for r in result.results:
        c = r.checkpoint
        if r.status != "scanned":
            lines.append(f"{c.step:>7} {c.kind:<8} {r.status:<8} {'':<22} {'':>9} {'':>8} {r.seconds:>7.1f}  "
                         f"{r.error or ''}")
            continue
        for h in hooks:
            m = r.metrics.get(h, {})
            extra = ", ".join(map(str, r.emerging.get(h, [])[:5]))
            if r.alerts:
                extra += ("  " if extra else "") + "alerts: " + ", ".join(r.alerts)
            lines.append(f"{c.step:>7} {c.kind:<8} {r.status:<8} {h:<22} "
                         f"{m.get('explained_variance', float('nan')):>9.3f} "
                         f"{m.get('features_drifted_ratio', float('nan')):>8.1%} {r.seconds:>7.1f}  {extra}")
    n_failed = len(result.failed)
    lines.append(f"run {result.run_id}{f' shard {result.shard}' if result.shard else ''}: "
                 f"{sum(r.status == 'scanned' for r in result.results)} scanned, "
                 f"{sum(r.status == 'skipped' for r in result.results)} already stored, {n_failed} failed")
    if result.shard:
        lines.append("alerts of the run over every shard: " + (", ".join(result.run_alerts) or "none")
                     if result.run_alerts is not None else
                     "alerts: evaluated over every shard's steps by the shard that finishes last")
    return "\n".join(lines)
