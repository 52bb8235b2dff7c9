"""``drift-monitor train-sae``: a base-model SAE in minutes, for a model that has none.

    drift-monitor train-sae --model BASE --hook model.layers.15 --out sae/ [--data corpus/ ...]

Public SAEs cover a handful of models; the monitor needs one for the *base* of whatever is
being fine-tuned. This trains one with sae-lens's own trainer (``SAETrainer`` and its
``*TrainingSAE`` classes) on activations collected here, and saves it in sae-lens format with
``hook_name`` and the token conventions (:mod:`drift_monitor.probe.tokens`) in its metadata, so
``MonitorConfig(saes=[OUT])`` and ``drift-monitor scan --sae OUT`` read it as trained.

Three stages, each resumable from ``OUT/.partial``:

1. **Text** (:mod:`drift_monitor.training.sae_data`): files, JSONL, ``datasets`` folders, or, with no
   ``--data``, the probe set plus the model's own answers to it.
2. **Activations**: one forward per batch of sequences, stopped after the hooked layer (later
   layers and the LM head are never computed), the attention-sink position and massive-norm
   tokens dropped by the monitor's own rule; saved, with a held-out share of the documents.
3. **Training**: ``SAETrainer.fit`` over shuffled batches of those activations, checkpointed
   so that an interrupted run (Ctrl-C, a killed job) continues where it stopped.

The report (held-out explained variance, L0, dead and dense fractions, the EV curve, timings)
is printed and written to ``OUT/train_report.json``, with a warning and what to change when the
SAE is poor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DriftMonitorError
from ..probe.capture import ActivationCapture, hidden_size, model_device, resolve_module
from ..probe.probes import chat_prompt
from ..probe.tokens import TokenConventions, first_position_mask, keep_mask
from ..progress import bar as progress_bar
from .sae_data import Document, load_documents, mix_chat

log = logging.getLogger(__name__)

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "standard")
PARTIAL = ".partial"
REPORT = "train_report.json"


class TrainSAEError(DriftMonitorError, ValueError):
    """Bad train-sae input, with the fix in the message."""


@dataclass
class TrainSAESettings:
    """Every knob of ``train-sae``; the defaults fit a ~100M–1B model on a CPU in minutes."""

    hook: str
    architecture: str = "topk"
    d_sae: int | None = None  # None: the power of two nearest 8 × d_in
    k: int | None = None  # TopK/BatchTopK: None -> min(32, max(8, d_sae // 64))
    tokens: int = 200_000  # activations collected (training + held-out)
    train_tokens: int | None = None  # tokens seen in training; None: 8 passes over the training activations
    context_size: int = 128
    batch_size: int = 4096  # tokens per training step
    lr: float = 1e-3
    l1_coefficient: float = 5.0  # standard architecture
    l0_coefficient: float = 1.0  # jumprelu architecture
    chat_fraction: float = 0.2
    holdout_fraction: float = 0.05
    outlier_factor: float = 10.0
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # the model's dtype for collection (the SAE trains in float32)
    gen_tokens: int = 48  # without --data: tokens of the model's own answer per probe
    checkpoint_every: int = 50  # training steps between checkpoints

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise TrainSAEError(f"--architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")
        for name in ("tokens", "context_size", "batch_size", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise TrainSAEError(f"{name} must be a positive integer, got {v!r}")
        for name in ("d_sae", "k", "train_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise TrainSAEError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.chat_fraction <= 1 or not 0 < self.holdout_fraction < 0.5:
            raise TrainSAEError("chat_fraction must be in [0, 1] and holdout_fraction in (0, 0.5)")
        if not self.lr > 0:
            raise TrainSAEError(f"lr must be > 0, got {self.lr!r}")

    def sizes(self, d_in: int) -> tuple[int, int]:
        """(d_sae, k) for a model of width ``d_in``."""
        d_sae = self.d_sae or 2 ** round(math.log2(8 * d_in))
        k = self.k or min(32, max(8, d_sae // 64))
        if k >= d_sae:
            raise TrainSAEError(f"k={k} must be smaller than d_sae={d_sae}")
        return d_sae, k

    def collection_key(self) -> dict[str, Any]:
        """What decides the collected activations (a resume reuses them only if these agree)."""
        return {k: getattr(self, k) for k in ("hook", "tokens", "context_size", "chat_fraction", "holdout_fraction",
                                              "outlier_factor", "seed", "dtype", "gen_tokens")}


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


# ----------------------------------------------------------------------------------- tokenising
def tokenize_documents(docs: Sequence[Document], tokenizer: Any, context_size: int) -> list[list[int]]:
    """Token sequences of at most ``context_size``: conversations through the chat template (one
    per sequence, truncated), plain text split into windows. Each sequence's position 0 is an
    attention sink and is dropped at collection, as in monitoring."""
    seqs: list[list[int]] = []
    for d in docs:
        if d.chat:
            text = chat_prompt(tokenizer, d.text, d.response)
            ids = tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
            seqs.append(list(ids[:context_size]))
        else:
            ids = list(tokenizer(d.text)["input_ids"])
            seqs.extend(ids[i:i + context_size] for i in range(0, len(ids), context_size))
    return [s for s in seqs if len(s) > 1]


# ----------------------------------------------------------------------------------- collecting
@dataclass
class Activations:
    train: torch.Tensor  # [n, d] float32
    heldout: torch.Tensor
    n_excluded: int
    limit: float
    seconds: float
    forward_tokens_per_s: float

    @property
    def tokens_per_s(self) -> float:
        return (self.train.shape[0] + self.heldout.shape[0] + self.n_excluded) / max(self.seconds, 1e-9)


@torch.no_grad()
def collect_activations(model: Any, tokenizer: Any, seqs: list[list[int]], hook: str, *, max_tokens: int,
                        holdout_fraction: float, outlier_factor: float, batch_seqs: int = 16,
                        progress: bool = True) -> Activations:
    """Activations at ``hook`` for the sequences, with the monitor's token rule (no sink, no
    massive-norm tokens); the first ``holdout_fraction`` of the sequences are held out."""
    _, module = resolve_module(model, hook)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    conv = TokenConventions(outlier_factor=outlier_factor)
    n_hold_seqs = max(1, int(round(holdout_fraction * len(seqs))))
    chunks: list[torch.Tensor] = []
    n_hold_tokens = 0
    total = 0
    bar = progress_bar(total=min(max_tokens, sum(len(s) - 1 for s in seqs)), desc="collecting activations",
                       unit="tok", unit_scale=True, enabled=progress)
    t0 = time.perf_counter()
    with ActivationCapture({hook: module}, early_stop=True) as cap:
        for lo in range(0, len(seqs), batch_seqs):
            batch = seqs[lo:lo + batch_seqs]
            ids, attn = _pad(batch, pad, device)
            # cap.run calls the closure at once, within this iteration
            x = cap.run(lambda: model(input_ids=ids, attention_mask=attn, use_cache=False))[hook]  # noqa: B023
            a = x[first_position_mask(attn, conv)].float().cpu()
            if lo < n_hold_seqs:  # held-out sequences come first; a batch may straddle the boundary
                split = int(first_position_mask(attn, conv)[: max(0, n_hold_seqs - lo)].sum())
                n_hold_tokens += split
            chunks.append(a)
            total += a.shape[0]
            bar.update(a.shape[0])
            if total >= max_tokens:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    acts = torch.cat(chunks)[:max_tokens]
    keep, limit = keep_mask(acts, conv)
    hold_keep = keep[:n_hold_tokens]
    heldout = acts[:n_hold_tokens][hold_keep]
    train = acts[n_hold_tokens:][keep[n_hold_tokens:]]
    fwd = _plain_forward_speed(model, seqs[:2 * batch_seqs], pad, device, batch_seqs)
    return Activations(train.contiguous(), heldout.contiguous(), int((~keep).sum()), limit, seconds, fwd)


def _pad(batch: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in batch)
    ids = torch.full((len(batch), T), pad, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    for i, s in enumerate(batch):  # per sequence
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    return ids.to(device), attn.to(device)


@torch.no_grad()
def _plain_forward_speed(model: Any, seqs: list[list[int]], pad: int, device: torch.device, batch_seqs: int) -> float:
    """Tokens per second of an ordinary full forward (no hooks, LM head included) on the same kind
    of batches: the reference the collection speed is reported against."""
    n, t0 = 0, time.perf_counter()
    for lo in range(0, len(seqs), batch_seqs):
        ids, attn = _pad(seqs[lo:lo + batch_seqs], pad, device)
        model(input_ids=ids, attention_mask=attn, use_cache=False)
        n += int(attn.sum())
    return n / max(time.perf_counter() - t0, 1e-9)


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
    x = acts.double()
    factor = float(x.shape[1] ** 0.5 / x.norm(dim=-1).mean())
    trainer.activation_scaler.scaling_factor = factor
    if hasattr(trainer.sae, "b_dec"):
        trainer.sae.b_dec.copy_((x.mean(0) * factor).to(trainer.sae.b_dec.dtype))


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
def default_documents(model: Any, tokenizer: Any, gen_tokens: int, seed: int, progress: bool) -> list[Document]:
    """Without ``--data``: the bundled probe set (requests as conversations, general text plain),
    each request with the model's own sampled answer, so the SAE sees the template, the
    requests and the model's way of answering. Small: pass --data for a better SAE."""
    from ..probe.probes import ProbeSet
    from .sae_data import probe_documents

    docs = probe_documents(ProbeSet.default())
    chats = [d for d in docs if d.chat]
    answers = generate_answers(model, tokenizer, [d.text for d in chats], gen_tokens, seed=seed, sample=True,
                               progress=progress)
    out = [Document(d.text, a, True) for d, a in zip(chats, answers)]
    return out + [d for d in docs if not d.chat]


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, *, seed: int = 0,
                     sample: bool = False, batch_size: int = 16, progress: bool = False) -> list[str]:
    """The model's answers to chat-formatted prompts (greedy, or sampled at temperature 0.8)."""
    device = model_device(model)
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    out: list[str] = []
    bar = progress_bar(total=len(prompts), desc="generating answers", unit="prompt", enabled=progress)
    try:
        for lo in range(0, len(prompts), batch_size):
            texts = [chat_prompt(tokenizer, p) for p in prompts[lo:lo + batch_size]]
            enc = tokenizer(texts, add_special_tokens=not getattr(tokenizer, "chat_template", None), padding=True,
                            return_tensors="pt").to(device)
            kw = dict(do_sample=True, temperature=0.8, top_p=0.95) if sample else dict(do_sample=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kw)
            new_tokens = gen[:, enc["input_ids"].shape[1]:]
            out += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            bar.update(len(texts))
    finally:
        tokenizer.padding_side = old
        bar.close()
    return out


def train_sae(model: Any, tokenizer: Any, settings: TrainSAESettings, out: str | Path, *,
              data: Sequence[str | Path] = (), documents: Sequence[Document] | None = None, force: bool = False,
              model_name: str | None = None, progress: bool = True) -> TrainReport:
    """Collect activations, train, evaluate and save an SAE; resumable from ``out/.partial``."""
    out = Path(out)
    if (out / "cfg.json").is_file() and not force:
        raise TrainSAEError(f"--out {out} already holds an SAE; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise TrainSAEError(f"--out {out} is a file; give a folder")
    name, _ = resolve_module(model, settings.hook)  # an unknown hook lists the close names
    d_in = hidden_size(model) or 0
    work = out / PARTIAL
    if force and out.exists():
        shutil.rmtree(out)
    work.mkdir(parents=True, exist_ok=True)
    acts = _load_or_collect(model, tokenizer, settings, work, data, documents, progress)
    if acts.train.shape[0] < settings.batch_size:
        raise TrainSAEError(f"only {acts.train.shape[0]} training tokens were collected, fewer than one batch "
                            f"({settings.batch_size}); give more --data or a smaller --batch-size")
    d_in = acts.train.shape[1]
    conv = TokenConventions(outlier_factor=settings.outlier_factor, outlier_norm=acts.limit,
                            prepend_bos=None, exclude_special_tokens=False)
    metadata = {"hook_name": settings.hook, "model_name": model_name or _model_name(model),
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
        out=str(out), hook=settings.hook, architecture=settings.architecture, d_in=d_in, d_sae=d_sae,
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
    shutil.rmtree(work, ignore_errors=True)
    return report


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


def _load_or_collect(model, tokenizer, settings: TrainSAESettings, work: Path, data, documents,
                     progress: bool) -> Activations:
    from safetensors.torch import load_file, save_file

    path, meta_path = work / "activations.safetensors", work / "activations.json"
    key = settings.collection_key() | {"data": [str(d) for d in data]}
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["key"] != key:
            raise TrainSAEError(f"{work} holds an interrupted run with other settings ({_diff(meta['key'], key)}); "
                                "run it again with the same settings to resume, or pass --force to start over")
        t = load_file(str(path))
        log.info("train-sae: reusing %d collected activations from %s", t["train"].shape[0], path)
        return Activations(t["train"], t["heldout"], meta["n_excluded"], meta["limit"], meta["seconds"],
                           meta["forward_tokens_per_s"])
    if documents is None:
        documents = load_documents(data) if data else default_documents(model, tokenizer, settings.gen_tokens,
                                                                          settings.seed, progress)
    docs = mix_chat(documents, settings.chat_fraction, settings.seed)
    random.Random(settings.seed).shuffle(docs)
    seqs = tokenize_documents(docs, tokenizer, settings.context_size)
    if not seqs:
        raise TrainSAEError("the training data tokenised to nothing (every document is empty or one token long)")
    acts = collect_activations(model, tokenizer, seqs, settings.hook, max_tokens=settings.tokens,
                               holdout_fraction=settings.holdout_fraction, outlier_factor=settings.outlier_factor,
                               progress=progress)
    save_file({"train": acts.train, "heldout": acts.heldout}, str(path))
    meta_path.write_text(json.dumps({"key": key, "n_excluded": acts.n_excluded, "limit": acts.limit,
                                     "seconds": acts.seconds, "forward_tokens_per_s": acts.forward_tokens_per_s}))
    return acts


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _model_name(model: Any) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "_name_or_path", None) or getattr(cfg, "model_type", "") or type(model).__name__)
