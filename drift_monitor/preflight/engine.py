"""The forward passes of the pre-flight check: the start model's refusal directions, and each
training example's response read on them, teacher-forced and (optionally) as the model's own answer.

Why these quantities (Chen et al. 2025, "projection difference"): fine-tuning pulls the model
towards what its data says *relative to what it would have said itself*. A refusal in the data
moves a model that complies; the same refusal moves a model that already refuses very little. So
each example is read twice on the start model's refusal direction of every layer: the data's
response teacher-forced, and the model's own greedy response to the same prompt. Their difference
is what the example would teach.

* The refusal direction of layer L is the monitor's: mean(harmful) − mean(harmless) of layer L's
  output at the post-instruction tokens of the probe set (``offline.directions_ablation``), kept
  with its length (the start's harmful/harmless gap), so projections are read in units of that gap:
  1.0 is as far as a harmful request sits from a harmless one where the model decides to refuse.
* A response's projection is the mean over its tokens (the positions where the response's tokens
  are the input, teacher-forced or generated alike), per layer.
* One forward per example (the teacher-forced response; the prompt's post-instruction projection
  comes with it), and with ``generate`` one generation whose own forward passes are read by the
  same hooks: no extra forward for the model's answer. SAE features (``features``), when asked
  for, are encoded by hooks in these same forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..probe.capture import layer_output
from ..probe.probes import chat_prompt, ensure_pad_token
from .stop import Barrier, StopForward

if TYPE_CHECKING:
    from .features import FeatureReader


@dataclass(frozen=True)
class Example:
    """One training example: a prompt and its response (chat data), or plain text (no prompt)."""

    response: str
    prompt: str | None = None

    @property
    def chat(self) -> bool:
        return self.prompt is not None


@dataclass
class Reference:
    """The start model's refusal machinery, read once: per layer a unit direction and its gap."""

    layers: list[int]
    directions: torch.Tensor  # [L, d] unit, float32
    gap: torch.Tensor  # [L] ‖mean(harmful) − mean(harmless)‖ at the post-instruction tokens


@dataclass
class Readings:
    """Per example and layer, in units of the start's refusal gap (NaN where not measured)."""

    train: np.ndarray  # [N, L] the data's response, teacher-forced
    post: np.ndarray  # [N, L] the prompt's post-instruction tokens (NaN for plain text)
    own: np.ndarray  # [N, L] the model's own greedy response (NaN without generation)
    train_tokens: np.ndarray  # [N] response tokens read
    own_text: list[str | None]


def start_reference(model: nn.Module, tok: Any, harmful: Sequence[str], harmless: Sequence[str],
                    layers: Sequence[int] | None, *, batch_size: int = 16, max_length: int = 256) -> Reference:
    """The refusal direction of each chosen decoder layer (all by default), with its length."""
    from ..offline.directions_ablation import refusal_vectors, resolve_layers
    from ..records import VerifySettings

    chosen = resolve_layers(model, list(layers) if layers is not None else None)
    r = refusal_vectors(model, tok, harmful, harmless, VerifySettings(batch_size=batch_size, max_length=max_length),
                        chosen)
    gap = r.norm(dim=-1)
    if bool((gap == 0).any()):
        raise ValueError("the harmful and harmless probes have the same mean activation at some layer: "
                         "no refusal direction to read")
    return Reference(chosen, (r / gap[:, None]).float().cpu(), gap.float().cpu())


class _Projector:
    """Forward hooks that project each chosen layer's output on its direction ([B, T] per layer),
    so no [L, B, T, d] stack is kept; with a ``barrier`` the forward stops once the deepest layer
    (and whatever else the barrier waits for) has run."""

    def __init__(self, layer_modules: list[nn.Module], ref: Reference, device: torch.device,
                 barrier: Barrier | None):
        self.modules = layer_modules
        self.dirs = ref.directions.to(device)
        self.gap = ref.gap.to(device)
        self.barrier = barrier
        self.values: list[torch.Tensor | None] = [None] * len(layer_modules)
        self.handles: list[Any] = []

    def __enter__(self) -> _Projector:
        for i, m in enumerate(self.modules):
            self.handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, i: int) -> Callable:
        last = len(self.modules) - 1

        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            h = layer_output(out)
            self.values[i] = (h.float() @ self.dirs[i]) / self.gap[i]  # [B, T]
            if self.barrier is not None and i == last:
                self.barrier.fire("directions")

        return hook

    def stacked(self) -> torch.Tensor:
        """[L, B, T] of the last forward."""
        return torch.stack([v for v in self.values if v is not None])


def _layer_modules(model: nn.Module, layers: Sequence[int]) -> list[nn.Module]:
    from ..offline.directions_ablation import decoder_layers

    stack = decoder_layers(model)
    return [stack[i] for i in layers]


def _encode(tok: Any, ex: Example, max_length: int) -> tuple[list[int], int, int]:
    """Token ids of the formatted example, where its response starts and ends."""
    if ex.chat:
        pre = chat_prompt(tok, ex.prompt or "")
        pre_ids = tok(pre, add_special_tokens=False)["input_ids"]
        full_ids = tok(pre + ex.response, add_special_tokens=False)["input_ids"]
        # a BPE merge across the boundary can shift it by a token: the response starts where the ids part
        start = next((i for i, (a, b) in enumerate(zip(pre_ids, full_ids)) if a != b), len(pre_ids))
    else:
        full_ids = tok(ex.response, add_special_tokens=True)["input_ids"]
        start = 0
    full_ids = full_ids[:max_length]
    return full_ids, min(start, len(full_ids)), len(full_ids)


def batched(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    for lo in range(0, len(items), size):
        yield lo, items[lo:lo + size]


@torch.no_grad()
def read_examples(model: nn.Module, tok: Any, examples: Sequence[Example], ref: Reference, *, n_post: int,
                  batch_size: int = 16, max_length: int = 256, on_batch: Callable[[int], None] | None = None,
                  features: FeatureReader | None = None, feature_rows: list[np.ndarray] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher-forced readings: ``train`` [N, L], ``post`` [N, L], response token counts [N].
    One forward per example (batched, right-padded), stopped after the deepest chosen layer (or
    SAE module). With ``features`` (its hooks entered by the caller), the same forward encodes
    the response tokens in each SAE: ``feature_rows`` (one [N] array per SAE) receives each
    response's mean refusal-feature activity, and the reader keeps the dataset's code sums."""
    device = next(model.parameters()).device
    pad = ensure_pad_token(tok)
    L, N = len(ref.layers), len(examples)
    train = np.full((N, L), np.nan)
    post = np.full((N, L), np.nan)
    counts = np.zeros(N, dtype=np.int64)
    barrier = Barrier({"directions"} | ({f"sae:{i}" for i in range(len(features.saes))} if features else set()))
    if features is not None:
        features.barrier = barrier
    with _Projector(_layer_modules(model, ref.layers), ref, device, barrier) as proj:
        for lo, chunk in batched(examples, batch_size):
            enc = [_encode(tok, ex, max_length) for ex in chunk]
            T = max(len(ids) for ids, _, _ in enc)
            ids = torch.full((len(enc), T), pad, dtype=torch.long)
            att = torch.zeros((len(enc), T), dtype=torch.long)
            resp = torch.zeros((len(enc), T), dtype=torch.bool)
            pmask = torch.zeros((len(enc), T), dtype=torch.bool)
            for r, ((x, a, b), ex) in enumerate(zip(enc, chunk)):
                ids[r, :len(x)] = torch.tensor(x)
                att[r, :len(x)] = 1
                resp[r, a:b] = True
                if ex.chat and a > 0:
                    pmask[r, max(0, a - n_post):a] = True
            barrier.reset()
            if features is not None:
                features.mask = resp.to(device)
                features.reset_rows(len(chunk))
            try:
                model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False)
            except StopForward:
                pass
            if features is not None and feature_rows is not None:
                for arr, m in zip(feature_rows, features.row_means()):
                    arr[lo:lo + len(chunk)] = m.numpy()
            p = proj.stacked().double().cpu()  # [L, B, T]
            for mask, out in ((resp, train), (pmask, post)):
                n = mask.sum(1)  # [B]
                mean = (p * mask[None]).sum(-1) / n.clamp_min(1)[None]  # [L, B]
                vals = mean.T.numpy()
                vals[(n == 0).numpy()] = np.nan
                out[lo:lo + len(chunk)] = vals
            counts[lo:lo + len(chunk)] = resp.sum(1).numpy()
            if on_batch:
                on_batch(len(chunk))
    return train, post, counts


@torch.no_grad()
def own_responses(model: nn.Module, tok: Any, examples: Sequence[Example], ref: Reference, *, n_post: int,
                  max_new_tokens: int = 32, batch_size: int = 16, max_length: int = 256,
                  on_batch: Callable[[int], None] | None = None, features: FeatureReader | None = None,
                  feature_rows: list[np.ndarray] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """The model's own greedy answer to each chat example's prompt, read on the same directions by
    the same hooks during generation (step s reads generated token s−1 as input, as teacher forcing
    reads a response token): ``own`` [N, L] (NaN for plain text), the prompts' post-instruction
    projections ``post`` [N, L] (from the generation's first forward: left padding puts every
    prompt's last ``n_post`` tokens in the last columns) and the answers' text. With ``features``
    (entered by the caller, built with the end tokens and the input embeddings), each SAE encodes
    the same generated positions: ``feature_rows`` receives each answer's mean refusal-feature
    activity (NaN for plain text), and the reader keeps the own answers' code sums."""
    device = next(model.parameters()).device
    pad = ensure_pad_token(tok)
    eos = tok.eos_token_id
    L, N = len(ref.layers), len(examples)
    own = np.full((N, L), np.nan)
    post = np.full((N, L), np.nan)
    texts: list[str | None] = [None] * N
    chat_idx = [i for i, ex in enumerate(examples) if ex.chat]
    old_side = tok.padding_side, tok.truncation_side
    tok.padding_side = tok.truncation_side = "left"  # generation continues from the last column
    try:
        with _Projector(_layer_modules(model, ref.layers), ref, device, None) as proj:
            steps: list[torch.Tensor] = []
            first: list[torch.Tensor] = []

            def collect(_m: nn.Module, _i: object, _o: object) -> None:
                p = proj.stacked()
                if not steps:
                    first[:] = [p[:, :, -n_post:].mean(-1).double().cpu()]  # [L, B]
                steps.append(p[:, :, -1].clone())  # [L, B]: the newest position

            handle = proj.modules[-1].register_forward_hook(collect)
            try:
                for _, idx in batched(chat_idx, batch_size):
                    steps.clear()
                    if features is not None:
                        features.mask, features.barrier = None, None  # every step runs to the end
                        features.reset_rows(len(idx))
                    prompts = [chat_prompt(tok, examples[i].prompt or "") for i in idx]
                    enc = tok(prompts, add_special_tokens=False, padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt").to(device)
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=pad, eos_token_id=eos)
                    new = gen[:, enc["input_ids"].shape[1]:].cpu()  # [B, S]
                    post[idx] = first[0].T.numpy()
                    # steps[0] is the prompt's forward; steps[s] (s >= 1) read generated token s-1
                    read = torch.stack(steps[1:], -1).double().cpu() if len(steps) > 1 \
                        else torch.zeros(L, len(idx), 0, dtype=torch.float64)  # [L, B, S-1]
                    S = read.shape[-1]
                    valid = _before_eos(new[:, :S], eos)  # [B, S]
                    n = valid.sum(1)
                    mean = ((read * valid[None]).sum(-1) / n.clamp_min(1)[None]).T.numpy()  # [B, L]
                    mean[(n == 0).numpy()] = np.nan
                    own[idx] = mean
                    if features is not None and feature_rows is not None:
                        for arr, m in zip(feature_rows, features.row_means()):
                            arr[idx] = m.numpy()
                    for r, i in enumerate(idx):
                        texts[i] = tok.decode(new[r], skip_special_tokens=True)
                    if on_batch:
                        on_batch(len(idx))
            finally:
                handle.remove()
    finally:
        tok.padding_side, tok.truncation_side = old_side
    return own, post, texts


def _before_eos(ids: torch.Tensor, eos: int | Sequence[int] | None) -> torch.Tensor:
    """[B, S] True at the generated tokens up to (excluding) each row's first end token."""
    if eos is None:
        return torch.ones_like(ids, dtype=torch.bool)
    ends = torch.isin(ids, torch.tensor(list(eos) if isinstance(eos, (list, tuple)) else [eos]))
    return ends.long().cumsum(1) == 0
