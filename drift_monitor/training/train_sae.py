"""``drift-monitor train-sae``: a base-model SAE in minutes, for a model that has none.

    drift-monitor train-sae --model BASE --hook model.layers.15 --out sae/ [--data corpus/ ...]
    drift-monitor train-sae --model BASE --hook model.layers.6,model.layers.10 --out saes/  # saes/model.layers.6/ ...

Public SAEs cover a handful of models; the monitor needs one for the *base* of whatever is
being fine-tuned. This trains one with sae-lens's own trainer (``SAETrainer`` and its
``*TrainingSAE`` classes) on activations collected here, and saves it in sae-lens format with
``hook_name`` and the token conventions (:mod:`drift_monitor.probe.tokens`) in its metadata, so
``MonitorConfig(saes=[OUT])`` and ``drift-monitor scan --sae OUT`` read it as trained.

Three stages, each resumable from ``OUT/.partial``:

1. **Text** (:mod:`drift_monitor.training.sae_data`): files, JSONL, ``datasets`` folders, or, with no
   ``--data``, the probe set plus the model's own answers to it.
2. **Activations** (:mod:`drift_monitor.training.collect`): one forward per batch of sequences
   for every hook at once, stopped after the deepest hooked layer, the attention-sink position
   and massive-norm tokens dropped by the monitor's own rule; the first ``holdout_fraction`` of
   the collected sequences held out; kept in RAM or, past ``max_memory_gb``, spilled to disk.
3. **Training**: ``SAETrainer.fit`` over shuffled batches of those activations, one hook after
   the other, checkpointed so that an interrupted run (Ctrl-C, a killed job) continues where it
   stopped; a hook whose SAE is finished is not trained again.

With one hook ``OUT`` is the SAE folder; with several, ``OUT/<hook>/`` is each hook's. The report
(held-out explained variance, L0, dead and dense fractions, the EV curve, timings) is printed
and written to each SAE's ``train_report.json`` (and, with several hooks, a summary to
``OUT/train_report.json``), with a warning and what to change when an SAE is poor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..probe.capture import expand_auto, resolve_module
from ..probe.tokens import TokenConventions
from .collect import (
    Activations,
    Stored,
    collect_activations,
    default_documents,
    generate_answers,
    tokenize_documents,
)
from .sae_data import Document, load_documents, mix_chat
from .settings import TrainSAEError, TrainSAESettings

__all__ = ["Activations", "TrainReport", "TrainSAEError", "TrainSAESettings", "TrainSummary", "evaluate_sae",
           "generate_answers", "tokenize_documents", "train_sae"]

log = logging.getLogger(__name__)

PARTIAL = ".partial"
REPORT = "train_report.json"


@dataclass
class TrainReport:
    """What ``train-sae`` measured; written as JSON next to the SAE."""

    out: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    k: int | None
    explained_variance: float  # held out, 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² (the monitor's definition)
    l0: float
    dead_fraction: float  # never firing on the held-out + a training sample
    dense_fraction: float  # density > 0.1 there
    n_train: int
    n_heldout: int
    n_excluded: int  # massive-norm tokens dropped (besides position 0)
    outlier_norm: float
    train_tokens: int
    collect_seconds: float
    collect_tokens_per_s: float
    forward_tokens_per_s: float  # a plain full forward of the same batches, for comparison
    train_seconds: float
    seconds_per_million: float
    ev_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, held-out EV)
    resumed_from: int = 0
    warnings: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"SAE saved to {self.out} ({self.architecture}, d_sae {self.d_sae}" + (f", k {self.k}" if self.k else "")
            + f", hook {self.hook})",
            f"  held-out explained variance {self.explained_variance:.3f}, L0 {self.l0:.1f}, "
            f"dead {self.dead_fraction:.1%}, dense {self.dense_fraction:.1%}",
            f"  activations: {self.n_train:,} training + {self.n_heldout:,} held-out tokens "
            f"({self.n_excluded} massive-norm tokens excluded, limit {self.outlier_norm:.4g}); "
            f"collected at {self.collect_tokens_per_s:,.0f} tok/s "
            f"(plain forward {self.forward_tokens_per_s:,.0f} tok/s)",
            f"  training: {self.train_tokens:,} tokens in {self.train_seconds:.0f} s "
            f"({self.seconds_per_million:.0f} s per million tokens)"
            + (f", resumed at {self.resumed_from:,}" if self.resumed_from else ""),
            "  EV vs tokens seen: " + ", ".join(f"{t:,}: {ev:.3f}" for t, ev in self.ev_curve),
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


@dataclass
class TrainSummary:
    """Several hooks' SAEs from one collection: ``OUT/train_report.json``."""

    out: str
    collect_seconds: float  # the one activation pass, for every hook
    seconds: float  # this run's wall time (a resumed run: since it resumed)
    reports: list[TrainReport]
    spilled: bool = False  # activations went to disk (past max_memory_gb)

    def format(self) -> str:
        head = (f"{len(self.reports)} SAEs in {self.out} from one activation pass ({self.collect_seconds:.1f} s"
                + (", spilled to disk" if self.spilled else "") + f"), {self.seconds:.0f} s in all")
        return "\n\n".join([head] + [r.format() for r in self.reports])


# ----------------------------------------------------------------------------------- training
def _training_sae(settings: TrainSAESettings, d_in: int, metadata: dict[str, Any]):
    from sae_lens.saes.sae import SAEMetadata

    d_sae, k = settings.sizes(d_in)
    common = dict(d_in=d_in, d_sae=d_sae, normalize_activations="expected_average_only_in",
                  metadata=SAEMetadata(**metadata))
    arch = settings.architecture
    if arch == "topk":
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    if arch == "batchtopk":
        from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, **common))
    if arch == "jumprelu":
        from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=settings.l0_coefficient, **common))
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig

    return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=settings.l1_coefficient, **common))


class _Batches(Iterator[torch.Tensor]):
    """Shuffled training batches, a new permutation each pass, reproducible from any step (so a
    resumed run sees the batches it would have seen), with a hook for the EV curve."""

    def __init__(self, acts: torch.Tensor, batch: int, seed: int, start_step: int,
                 on_step: Callable[[int], None] | None = None):
        self.acts, self.batch, self.seed, self.step, self.on_step = acts, batch, seed, start_step, on_step
        self.per_pass = max(1, acts.shape[0] // batch)
        self._perm: tuple[int, torch.Tensor] | None = None

    def __next__(self) -> torch.Tensor:
        if self.on_step is not None:
            self.on_step(self.step)
        epoch, i = divmod(self.step, self.per_pass)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.acts.shape[0], generator=g))
        self.step += 1
        return self.acts[self._perm[1][i * self.batch:(i + 1) * self.batch]]


@torch.no_grad()
def evaluate_sae(sae: Any, heldout: torch.Tensor, sample: torch.Tensor, scale: Callable | None = None,
                 chunk: int = 8192) -> dict[str, float]:
    """Held-out EV (dataset-level, the monitor's definition) and L0; dead/dense over held-out + sample."""
    scale = scale or (lambda t: t)
    sq_err, l0, n = 0.0, 0.0, 0
    x_sum = torch.zeros(heldout.shape[1], dtype=torch.float64)
    x_sq = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n_all = 0
    for part, is_hold in ((heldout, True), (sample, False)):
        for lo in range(0, part.shape[0], chunk):
            x = scale(part[lo:lo + chunk].to(sae.W_enc.device, sae.W_enc.dtype))
            codes = sae.encode(x)
            fired += (codes > 0).double().sum(0).cpu()
            n_all += x.shape[0]
            if is_hold:
                x_hat = sae.decode(codes)
                xd = x.double()
                sq_err += float(((xd - x_hat.double()) ** 2).sum())
                x_sum += xd.sum(0).cpu()
                x_sq += float((xd * xd).sum())
                l0 += float((codes > 0).sum())
                n += x.shape[0]
    total = x_sq - float((x_sum ** 2).sum()) / max(n, 1)
    density = fired / max(n_all, 1)
    return {"explained_variance": 1.0 - sq_err / total if total > 0 else math.nan, "l0": l0 / max(n, 1),
            "dead_fraction": float((fired == 0).double().mean()),
            "dense_fraction": float((density > 0.1).double().mean())}


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: ``curve.json`` is written last, so a checkpoint a kill
    interrupted half-way is never resumed from."""
    done = [p for p in ckpt_dir.glob("*") if p.is_dir() and p.name.isdigit() and (p / "curve.json").is_file()]
    return max(done, key=lambda p: int(p.name)) if done else None


def run_training(acts: Activations, settings: TrainSAESettings, d_in: int, metadata: dict[str, Any], work: Path,
                 progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """Fit the SAE with sae-lens's SAETrainer, checkpointing under ``work``; resumes from the latest checkpoint."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(settings.seed)
    total = settings.train_tokens or 8 * acts.train.shape[0]
    steps = max(1, total // settings.batch_size)
    device = settings.device or "cpu"
    ckpt_dir = work / "checkpoints"
    latest = _latest_checkpoint(ckpt_dir)
    if latest is not None:
        from sae_lens.saes.sae import TrainingSAE

        sae = TrainingSAE.load_from_disk(str(latest), device=device)
    else:
        sae = _training_sae(settings, d_in, metadata)
    cfg = SAETrainerConfig(
        total_training_samples=steps * settings.batch_size, train_batch_size_samples=settings.batch_size,
        lr=settings.lr, lr_end=settings.lr / 10, lr_scheduler_name="constant", lr_warm_up_steps=min(50, steps // 10),
        lr_decay_steps=steps // 5, device=device,
        # a feature silent for ~25k tokens counts as dead (TopK's auxiliary loss revives it)
        dead_feature_window=max(1, 25_000 // settings.batch_size), feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=min(100, max(1, acts.train.shape[0] // settings.batch_size)),
    )
    curve: list[tuple[int, float]] = []
    eval_every = max(1, steps // 6)
    trainer: Any = None

    seen: set[int] = set()

    def on_step(_: int) -> None:  # before each batch is served; the trainer's count is authoritative
        step = trainer.n_training_steps if trainer is not None else 0
        if step == 0 or step in seen:  # (the norm estimate draws batches before step 1)
            return
        seen.add(step)
        if step % settings.checkpoint_every == 0:
            trainer.save_checkpoint(checkpoint_name=str(step), base_path=str(ckpt_dir))
        if step % eval_every == 0:
            ev = evaluate_sae(trainer.sae, acts.heldout, acts.heldout[:0], trainer.activation_scaler)
            curve.append((step * settings.batch_size, round(ev["explained_variance"], 4)))

    start = int(latest.name) if latest is not None else 0
    data = _Batches(acts.train, settings.batch_size, settings.seed, start, on_step)
    trainer = SAETrainer(cfg, sae, data)
    if latest is not None:
        trainer.load_trainer_state(latest)
        curve.extend(tuple(c) for c in json.loads((latest / "curve.json").read_text()))
    else:
        _init_from_data(trainer, acts.train)
    orig_save = trainer.save_checkpoint

    def save_with_curve(checkpoint_name: str, base_path: Any = None, wandb_aliases: Any = None) -> None:
        orig_save(checkpoint_name, base_path=base_path)
        if base_path is not None:
            (Path(base_path) / checkpoint_name / "curve.json").write_text(json.dumps(curve))

    trainer.save_checkpoint = save_with_curve  # type: ignore[method-assign]
    t0 = time.perf_counter()
    try:
        with _trainer_progress(progress):
            sae = trainer.fit()
    except KeyboardInterrupt:
        step = trainer.n_training_steps
        trainer.save_checkpoint(checkpoint_name=str(step), base_path=str(ckpt_dir))
        raise KeyboardInterrupt(f"train-sae interrupted at step {step} of {steps}; run the same command again "
                                "to resume") from None
    seconds = time.perf_counter() - t0
    curve.append((steps * settings.batch_size, None))  # filled by the final evaluation
    return sae, {"train_tokens": steps * settings.batch_size, "train_seconds": seconds, "curve": curve,
                 "resumed_from": start * settings.batch_size, "steps_run": steps - start}


@torch.no_grad()
def _init_from_data(trainer: Any, acts: torch.Tensor) -> None:
    """The activation scale (sqrt(d_in) / mean norm, sae-lens's estimate, over every activation
    rather than a few batches) and the decoder bias at the mean activation: what sae-lens's own
    runner does before calling the trainer (``b_dec_init_method``). Without it the features
    spend their first hundreds of steps learning the mean, and more of them end dead."""
    rows = max(1, (512 << 20) // (8 * acts.shape[1]))  # float64 chunks of ≤ 512 MB (spilled activations)
    if acts.shape[0] <= rows:
        x = acts.double()
        norm_mean, mean = x.norm(dim=-1).mean(), x.mean(0)
    else:
        norm_sum, total = torch.zeros((), dtype=torch.float64), torch.zeros(acts.shape[1], dtype=torch.float64)
        for lo in range(0, acts.shape[0], rows):
            x = acts[lo:lo + rows].double()
            norm_sum += x.norm(dim=-1).sum()
            total += x.sum(0)
        norm_mean, mean = norm_sum / acts.shape[0], total / acts.shape[0]
    factor = float(acts.shape[1] ** 0.5 / norm_mean)
    trainer.activation_scaler.scaling_factor = factor
    if hasattr(trainer.sae, "b_dec"):
        trainer.sae.b_dec.copy_((mean * factor).to(trainer.sae.b_dec.dtype))


@contextlib.contextmanager
def _trainer_progress(enabled: bool) -> Iterator[None]:
    """sae-lens's own "Training SAE" bar (with its time estimate), or none when ``enabled`` is False."""
    import sae_lens.training.sae_trainer as st

    orig = st.tqdm
    if not enabled:
        st.tqdm = functools.partial(orig, disable=True)
    try:
        yield
    finally:
        st.tqdm = orig


# ----------------------------------------------------------------------------------- the command
def train_sae(model: Any, tokenizer: Any, settings: TrainSAESettings, out: str | Path, *,
              data: Sequence[str | Path] = (), documents: Sequence[Document] | None = None, force: bool = False,
              model_name: str | None = None, progress: bool = True) -> TrainReport | TrainSummary:
    """Collect activations at every hook in one pass, then train, evaluate and save one SAE per
    hook; resumable from ``out/.partial``. One hook: ``out`` is the SAE folder and a
    :class:`TrainReport` is returned; several: ``out/<hook>/`` each, and a :class:`TrainSummary`."""
    t_start = time.perf_counter()
    out = Path(out)
    hooks = expand_auto(model, list(settings.hooks))  # auto[:N]: layers spread over the depth
    if hooks != list(settings.hooks):
        settings = dataclasses.replace(settings, hooks=hooks, hook=None)
        hooks = list(settings.hooks)
    single = len(hooks) == 1
    if out.exists() and not out.is_dir():
        raise TrainSAEError(f"--out {out} is a file; give a folder")
    done = (out / "cfg.json").is_file() or (not single and (out / REPORT).is_file() and not (out / PARTIAL).exists())
    if done and not force:
        raise TrainSAEError(f"--out {out} already holds an SAE; pass --force to replace it")
    resolved: dict[str, str] = {}
    for h in hooks:
        name, _ = resolve_module(model, h)  # an unknown hook lists the close names
        if name in resolved:
            raise TrainSAEError(f"--hook {h} and --hook {resolved[name]} name the same module ({name}); give it once")
        resolved[name] = h
    work = out / PARTIAL
    if force and out.exists():
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    sae_dirs = {h: out if single else out / h for h in hooks}
    hook_work = {h: work if single else work / h for h in hooks}
    todo = [h for h in hooks if single or not (sae_dirs[h] / "cfg.json").is_file()]
    stored = _load_or_collect(model, tokenizer, settings, work, hook_work, data, documents, progress)
    for h in todo:
        _check_enough(stored.meta, settings, h)
    reports: dict[str, TrainReport] = {}
    for h in hooks:
        if h not in todo:
            log.info("train-sae: %s is already trained in %s; skipping it", h, sae_dirs[h])
            reports[h] = _load_report(sae_dirs[h] / REPORT)
            continue
        if not single and progress:  # which of the bars that follow is which hook's
            print(f"train-sae: training the SAE at {h} ({hooks.index(h) + 1} of {len(hooks)})", file=sys.stderr,
                  flush=True)
        reports[h] = _train_one(model, tokenizer, settings, h, stored.get(h), sae_dirs[h], hook_work[h], data,
                                model_name, progress)
        stored.release(h)
        if not single:
            shutil.rmtree(hook_work[h], ignore_errors=True)
    spilled = any(m["spilled"] for m in stored.meta["hooks"].values())
    shutil.rmtree(work, ignore_errors=True)
    if single:
        return reports[hooks[0]]
    summary = TrainSummary(str(out), stored.seconds, time.perf_counter() - t_start, [reports[h] for h in hooks],
                           spilled)
    (out / REPORT).write_text(json.dumps(asdict(summary), indent=2))
    return summary


def corpus_sequences(documents: Sequence[Document], tokenizer: Any, settings: TrainSAESettings) -> list[list[int]]:
    """The token sequences collection reads, in its order: chat mixed in, shuffled, cut to context."""
    docs = mix_chat(documents, settings.chat_fraction, settings.seed)
    random.Random(settings.seed).shuffle(docs)
    return tokenize_documents(docs, tokenizer, settings.context_size)


def _load_or_collect(model: Any, tokenizer: Any, settings: TrainSAESettings, work: Path, hook_work: dict[str, Path],
                     data: Sequence[str | Path], documents: Sequence[Document] | None, progress: bool) -> Stored:
    """The activations of an interrupted run with the same settings, or a fresh collection (saved)."""
    key = settings.collection_key() | {"data": [str(d) for d in data]}
    stored = Stored.load(work, hook_work, key)
    if stored is not None:
        return stored
    if documents is None:
        documents = load_documents(data) if data else default_documents(model, tokenizer, settings.gen_tokens,
                                                                          settings.seed, progress)
    seqs = corpus_sequences(documents, tokenizer, settings)
    if not seqs:
        raise TrainSAEError("the training data tokenised to nothing (every document is empty or one token long)")
    budget = None if settings.max_memory_gb is None else int(settings.max_memory_gb * 2**30)
    acts = collect_activations(model, tokenizer, seqs, list(settings.hooks), max_tokens=settings.tokens,
                               holdout_fraction=settings.holdout_fraction, outlier_factor=settings.outlier_factor,
                               holdout_sequences=settings.holdout_sequences,
                               spill=lambda h: hook_work[h] / "activations.npy", max_memory_bytes=budget,
                               progress=progress)
    return Stored.save(work, hook_work, key, acts)


def _check_enough(meta: dict[str, Any], settings: TrainSAESettings, hook: str) -> None:
    """Fewer training tokens than one batch: say what was collected, held out and needed, and the fix.
    (From the collection's record, so that no hook's activations are read for it.)"""
    m, bs = meta["hooks"][hook], settings.batch_size
    n = m["n_train"]
    if n >= bs:
        return
    got = n + m["n_heldout"] + m["n_excluded"]
    fix = (f"the data ran out before --tokens {settings.tokens:,}: give more --data"
           if got < settings.tokens else "raise --tokens")
    raise TrainSAEError(
        f"only {n:,} training tokens were collected at {hook}, fewer than one batch ({bs:,}): {got:,} tokens "
        f"collected from {meta['n_sequences']:,} sequences, {m['n_heldout']:,} held out (the first "
        f"{meta['n_heldout_sequences']:,} sequences, {settings.holdout_fraction:.0%} of those collected), "
        f"{m['n_excluded']:,} massive-norm tokens excluded; needed: at least {bs:,} training tokens "
        f"(about {math.ceil(bs / (1 - settings.holdout_fraction)):,} collected). Fix: {fix}, or a smaller "
        "--batch-size")


def _train_one(model: Any, tokenizer: Any, settings: TrainSAESettings, hook: str, acts: Activations, out: Path,
               work: Path, data: Sequence[str | Path], model_name: str | None, progress: bool) -> TrainReport:
    """Train, evaluate and save one hook's SAE in ``out`` (checkpoints under ``work``)."""
    d_in = acts.train.shape[1]
    conv = TokenConventions(outlier_factor=settings.outlier_factor, outlier_norm=acts.limit,
                            prepend_bos=None, exclude_special_tokens=False)
    metadata = {"hook_name": hook, "model_name": model_name or _model_name(model),
                "context_size": settings.context_size, "prepend_bos": _adds_bos(tokenizer),
                "exclude_special_tokens": False, "dataset_path": ", ".join(map(str, data)) or "probes+generations",
                "drift_monitor_tokens": conv.to_metadata()}
    sae, fit = run_training(acts, settings, d_in, metadata, work, progress)
    sample = acts.train[torch.randperm(acts.train.shape[0], generator=torch.Generator().manual_seed(1))[:100_000]]
    tmp = out / ".final"
    sae.save_inference_model(str(tmp))
    from sae_lens import SAE

    final = SAE.load_from_disk(str(tmp))  # evaluate exactly what is saved
    ev = evaluate_sae(final, acts.heldout, sample)
    curve = [(t, e if e is not None else round(ev["explained_variance"], 4)) for t, e in fit["curve"]]
    d_sae, k = settings.sizes(d_in)
    report = TrainReport(
        out=str(out), hook=hook, architecture=settings.architecture, d_in=d_in, d_sae=d_sae,
        k=k if settings.architecture in ("topk", "batchtopk") else None, n_train=acts.train.shape[0],
        n_heldout=acts.heldout.shape[0], n_excluded=acts.n_excluded, outlier_norm=acts.limit,
        train_tokens=fit["train_tokens"], collect_seconds=acts.seconds, collect_tokens_per_s=acts.tokens_per_s,
        forward_tokens_per_s=acts.forward_tokens_per_s, train_seconds=fit["train_seconds"],
        seconds_per_million=fit["train_seconds"] / max(fit["steps_run"] * settings.batch_size, 1) * 1e6,
        ev_curve=curve, resumed_from=fit["resumed_from"], **ev)
    report.warnings = advice(report)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    (out / REPORT).write_text(json.dumps(asdict(report), indent=2))
    return report


def _load_report(path: Path) -> TrainReport:
    d = json.loads(path.read_text())
    d["ev_curve"] = [tuple(c) for c in d.get("ev_curve", [])]
    return TrainReport(**d)


def advice(r: TrainReport) -> list[str]:
    """Warnings for a poor SAE, each with what to change."""
    out = []
    if not r.explained_variance >= 0.7:
        out.append(f"held-out explained variance {r.explained_variance:.3f} < 0.7: the monitor's EV and drift "
                   "readings will be noisy. Give more varied --data (text like the model's use, some of it chat), "
                   "more --tokens / --train-tokens, or a larger --d-sae or --k")
    if r.dead_fraction > 0.5:
        out.append(f"{r.dead_fraction:.0%} of the features never fire: train longer (--train-tokens), lower --lr, "
                   "or use a smaller --d-sae")
    return out


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", "") or type(model).__name__)
