"""Stage 2 of ``train-sae``: every hook's activations from one forward pass, split and stored.

Why one pass for all hooks: the forward up to the deepest hooked layer is most of the
collection's cost, and :class:`ActivationCapture` stops it there whatever the number of hooks,
so N SAEs cost one collection instead of N.

Why the held-out share is taken from what is *collected*: collection stops at ``--tokens``, so a
share of the whole corpus (what this once did) could exceed the budget and leave no training
token at all. The first ``holdout_fraction`` of the collected sequences are held out.

Why spilling: ``--tokens`` × the widths of all hooks can exceed RAM (4 hooks × 2M tokens × 2048
floats is 64 GB). Past ``max_memory_bytes`` each hook's rows go to a float32 ``.npy`` file in
``.partial`` as they arrive and training reads its batches from there (numpy memmap), so memory
holds one hook's working set, not all of them. Both paths give the same rows in the same order.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..probe.capture import ActivationCapture, model_device, resolve_module
from ..probe.probes import chat_prompt
from ..probe.tokens import TokenConventions, first_position_mask, keep_from_norms
from ..progress import bar as progress_bar
from .sae_data import Document
from .settings import TrainSAEError

log = logging.getLogger(__name__)

META = "activations.json"


@dataclass
class Activations:
    """One hook's activations: float32 [n, d] tensors, in RAM or views of a memmapped file."""

    train: torch.Tensor
    heldout: torch.Tensor
    n_excluded: int
    limit: float
    seconds: float  # the shared collection pass (all hooks)
    forward_tokens_per_s: float
    n_sequences: int = 0  # sequences (partly) collected
    n_heldout_sequences: int = 0
    spilled: bool = False  # train/heldout are views of a float32 .npy memmap

    @property
    def n_collected(self) -> int:
        return self.train.shape[0] + self.heldout.shape[0] + self.n_excluded

    @property
    def tokens_per_s(self) -> float:
        return self.n_collected / max(self.seconds, 1e-9)


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


def default_memory_bytes() -> int:
    """A quarter of physical memory (4 GB where it cannot be read): room for the model and training."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


class _Rows:
    """One hook's rows as they arrive, with their norms (for the massive-norm limit): chunks in RAM,
    or written into a preallocated float32 ``.npy`` memmap of ``max_rows`` rows when spilling."""

    def __init__(self, d: int, max_rows: int, path: Path | None):
        self.chunks: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []
        self.n = 0
        self.mm = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(max_rows, d))

    def add(self, a: torch.Tensor) -> None:
        self.norms.append(a.norm(dim=-1))
        if self.mm is None:
            self.chunks.append(a)
        else:
            self.mm[self.n:self.n + a.shape[0]] = a.numpy()
        self.n += a.shape[0]

    def split(self, n_hold: int, conv: TokenConventions) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """(train, heldout, n_excluded, limit): rows under the massive-norm limit, held-out rows first."""
        keep, limit = keep_from_norms(torch.cat(self.norms), conv)
        n_excluded = int((~keep).sum())
        if self.mm is None:
            acts = torch.cat(self.chunks)
            self.chunks = []
            heldout, train = acts[:n_hold][keep[:n_hold]], acts[n_hold:][keep[n_hold:]]
            return train.contiguous(), heldout.contiguous(), n_excluded, limit
        # compact in place, in order (the write position never passes the read position)
        keep_np, w, step = keep.numpy(), 0, max(1, (64 << 20) // (4 * self.mm.shape[1]))
        for r in range(0, self.n, step):
            rows = self.mm[r:min(r + step, self.n)][keep_np[r:r + step]]
            self.mm[w:w + rows.shape[0]] = rows
            w += rows.shape[0]
        self.mm.flush()
        h = int(keep[:n_hold].sum())
        t = torch.from_numpy(self.mm)
        return t[h:w], t[:h], n_excluded, limit


@torch.no_grad()
def collect_activations(model: Any, tokenizer: Any, seqs: list[list[int]], hooks: Sequence[str], *,
                        max_tokens: int, holdout_fraction: float, outlier_factor: float,
                        holdout_sequences: int | None = None,
                        spill: Callable[[str], Path] | None = None, max_memory_bytes: int | None = None,
                        batch_seqs: int = 16, progress: bool = True) -> dict[str, Activations]:
    """Activations at every hook from one forward per batch (stopped after the deepest hooked
    layer), with the monitor's token rule (no sink, no massive-norm tokens); the first
    ``holdout_fraction`` of the *collected* sequences are held out. When ``max_tokens`` × the
    hooks' widths × 4 bytes exceeds ``max_memory_bytes``, rows go to ``spill(hook)`` files."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    modules = {h: resolve_module(model, h)[1] for h in hooks}
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    conv = TokenConventions(outlier_factor=outlier_factor)
    budget = default_memory_bytes() if max_memory_bytes is None else max_memory_bytes
    rows: dict[str, _Rows] = {}
    per_seq: list[torch.Tensor] = []  # kept tokens per sequence, for the held-out split
    total = 0
    bar = progress_bar(total=min(max_tokens, sum(len(s) - 1 for s in seqs)), desc="collecting activations",
                       unit="tok", unit_scale=True, enabled=progress)
    t0 = time.perf_counter()
    with ActivationCapture(modules, early_stop=True) as cap:
        for lo in range(0, len(seqs), batch_seqs):
            ids, attn = _pad(seqs[lo:lo + batch_seqs], pad, device)
            # cap.run calls the closure at once, within this iteration
            xs = cap.run(lambda: model(input_ids=ids, attention_mask=attn, use_cache=False))  # noqa: B023
            mask = first_position_mask(attn, conv)
            per_seq.append(mask.sum(1).cpu())
            take = min(int(mask.sum()), max_tokens - total)
            if not rows:
                widths = {h: x.shape[-1] for h, x in xs.items()}
                spilled = spill is not None and max_tokens * sum(widths.values()) * 4 > budget
                if spilled:
                    log.info("train-sae: %d hooks × %d tokens exceed the %.1f GB memory budget; spilling to disk",
                             len(hooks), max_tokens, budget / 2**30)
                rows = {h: _Rows(widths[h], max_tokens, spill(h) if spilled and spill else None) for h in hooks}
            for h, x in xs.items():
                rows[h].add(x[mask].float().cpu()[:take])
            total += take
            bar.update(take)
            if total >= max_tokens:
                break
    bar.close()
    seconds = time.perf_counter() - t0
    counts = torch.cat(per_seq)
    starts = counts.cumsum(0) - counts
    n_seqs = int((starts < total).sum())  # sequences with at least one collected token
    n_hold_seqs = holdout_sequences or max(1, int(round(holdout_fraction * n_seqs)))
    n_hold = min(total, int(counts[:n_hold_seqs].sum()))
    fwd = _plain_forward_speed(model, seqs[:2 * batch_seqs], pad, device, batch_seqs)
    out = {}
    for h in hooks:
        train, heldout, n_excluded, limit = rows[h].split(n_hold, conv)
        out[h] = Activations(train, heldout, n_excluded, limit, seconds, fwd, n_seqs, n_hold_seqs,
                             spilled=rows[h].mm is not None)
    return out


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


# ----------------------------------------------------------------------------------- storage
class Stored:
    """Collected activations per hook, saved under ``.partial`` so a resumed run reuses them.

    ``ACTS/activations.safetensors`` (in RAM) or ``ACTS/activations.npy`` (spilled, read back as
    a memmap) per hook, and ``work/activations.json`` written last: without it nothing is reused.
    """

    def __init__(self, work: Path, hook_dirs: dict[str, Path], meta: dict[str, Any],
                 acts: dict[str, Activations] | None = None):
        self.work, self.hook_dirs, self.meta = work, hook_dirs, meta
        self._acts = dict(acts or {})

    @property
    def seconds(self) -> float:
        return float(self.meta["seconds"])

    @classmethod
    def load(cls, work: Path, hook_dirs: dict[str, Path], key: dict[str, Any]) -> Stored | None:
        """The saved collection of the same settings, None if there is none; a different one raises."""
        path = work / META
        if not path.is_file():
            return None
        meta = json.loads(path.read_text())
        if meta.get("key") != key:
            raise TrainSAEError(f"{work} holds an interrupted run with other settings "
                                f"({_diff(meta.get('key') or {}, key)}); run it again with the same settings to "
                                "resume, or pass --force to start over")
        return cls(work, hook_dirs, meta)

    @classmethod
    def save(cls, work: Path, hook_dirs: dict[str, Path], key: dict[str, Any],
             acts: dict[str, Activations]) -> Stored:
        from safetensors.torch import save_file

        hooks: dict[str, Any] = {}
        for h, a in acts.items():
            if not a.spilled:
                hook_dirs[h].mkdir(parents=True, exist_ok=True)
                save_file({"train": a.train, "heldout": a.heldout}, str(hook_dirs[h] / "activations.safetensors"))
            hooks[h] = {"n_excluded": a.n_excluded, "limit": a.limit, "spilled": a.spilled,
                        "n_train": a.train.shape[0], "n_heldout": a.heldout.shape[0]}
        first = next(iter(acts.values()))
        meta = {"key": key, "seconds": first.seconds, "forward_tokens_per_s": first.forward_tokens_per_s,
                "n_sequences": first.n_sequences, "n_heldout_sequences": first.n_heldout_sequences, "hooks": hooks}
        tmp = work / (META + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, work / META)
        return cls(work, hook_dirs, meta, acts)

    def get(self, hook: str) -> Activations:
        if hook in self._acts:
            return self._acts[hook]
        m = self.meta["hooks"][hook]
        if m["spilled"]:
            mm = np.load(self.hook_dirs[hook] / "activations.npy", mmap_mode="c")
            t = torch.from_numpy(mm)
            heldout, train = t[:m["n_heldout"]], t[m["n_heldout"]:m["n_heldout"] + m["n_train"]]
        else:
            from safetensors.torch import load_file

            d = load_file(str(self.hook_dirs[hook] / "activations.safetensors"))
            train, heldout = d["train"], d["heldout"]
        log.info("train-sae: reusing %d collected activations at %s", train.shape[0], hook)
        return Activations(train, heldout, m["n_excluded"], m["limit"], self.meta["seconds"],
                           self.meta["forward_tokens_per_s"], self.meta["n_sequences"],
                           self.meta["n_heldout_sequences"], spilled=m["spilled"])

    def release(self, hook: str) -> None:
        """Drop the hook's rows from memory once its SAE is trained."""
        self._acts.pop(hook, None)


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
