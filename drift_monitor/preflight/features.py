"""The SAE side of the pre-flight check: the start model's refusal features, and each response's
activity on them, read by hooks in the forward passes the check runs anyway.

Why features next to the refusal direction: the direction says *how much* a response pushes
refusal; an SAE says *what* it pushes, in the same features the monitor watches during training
(the start's refusal features, ``MetricSettings.refusal_top_k``). So, per SAE:

* The start's refusal features: the ``top_k`` features with the largest positive
  mean(harmful) − mean(harmless) code at the probe set's post-instruction tokens (the monitor's
  choice, ``probe.metrics.feature_retention``), read in one batched pass over the probe prompts.
* A response's refusal-feature activity: the mean over its tokens of the summed codes of those
  features (the data's response teacher-forced, or the model's own answer as it is generated).
* The dataset's push: per feature, the mean code over the data's response tokens minus that over
  the model's own answers' tokens.

Only the selected tokens are encoded, a chunk of tokens at a time, on the model's device; what is
kept is [B] per-example sums and one [d_sae] running sum per SAE, never a [tokens, d_sae] matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..probe.capture import hidden_size, layer_output, resolve_module
from ..probe.saes import HookedSAE, bind_sae, check_d_in
from .stop import Barrier, StopForward

#: Tokens encoded at once: bounds the [tokens, d_sae] code buffer (64 MB at d_sae = 16k, float32).
TOKENS_PER_ENCODE = 1024


@dataclass
class BoundSae:
    """An SAE bound to the module of the start model whose output it reads, with the start's
    refusal features once :func:`refusal_features` has found them."""

    hsae: HookedSAE
    module_name: str
    module: nn.Module
    features: torch.Tensor | None = None  # [k] refusal feature ids (long, on the SAE's device)
    contrast: list[float] = field(default_factory=list)  # their harmful − harmless mean codes

    @property
    def hook(self) -> str:
        return self.hsae.hook


def bind_saes(model: nn.Module, saes: Mapping[str, Any], device: str | torch.device,
              dtype: str | None = None) -> list[BoundSae]:
    """Load each ``{hook: source}`` SAE and resolve its hook on ``model`` as the monitor does
    (``resolve_module``: an unknown hook names the model's layer names; ``check_d_in``: an SAE
    of another width says so), before any forward pass."""
    width = hidden_size(model)
    out: list[BoundSae] = []
    for hook, source in saes.items():
        name, module = resolve_module(model, hook)
        hsae = bind_sae(hook, source, device, dtype)
        out_w = getattr(module, "out_features", None) or getattr(module, "embedding_dim", None) or width
        check_d_in(hsae, out_w, name)
        out.append(BoundSae(hsae, name, module))
    return out


class FeatureReader:
    """Forward hooks that encode the selected tokens of each SAE's module output and keep, per
    SAE, the per-row sum of the refusal features' codes (``row_sum`` [B], with ``row_n`` tokens)
    and the running sum of every feature's code (``code_sum`` [d_sae], over ``tokens``).

    Which tokens: teacher-forced, those of ``mask`` ([B, T], set before each forward); during
    generation (``mask`` None), the newest position of every forward after the prompt's, while
    its row has not ended (its input token, generated token s−1, is not an end token): the same
    positions ``engine.own_responses`` reads the direction at.
    """

    def __init__(self, saes: Sequence[BoundSae], device: torch.device, barrier: Barrier | None = None,
                 eos: int | Sequence[int] | None = None, embeddings: nn.Module | None = None):
        self.saes = list(saes)
        self.device = device
        self.barrier = barrier
        self.mask: torch.Tensor | None = None
        self.eos = None if eos is None else torch.tensor(list(eos) if isinstance(eos, (list, tuple)) else [eos],
                                                         device=device)
        self.embeddings = embeddings
        self.code_sum = [torch.zeros(s.hsae.d_sae, dtype=torch.float64, device=device) for s in self.saes]
        self.tokens = [0] * len(self.saes)
        self.row_sum: list[torch.Tensor] = []
        self.row_n: list[torch.Tensor] = []
        self._alive: torch.Tensor | None = None  # generation: rows not yet ended
        self._valid: torch.Tensor | None = None  # generation: rows whose newest token is read now
        self.handles: list[Any] = []

    def __enter__(self) -> FeatureReader:
        for i, s in enumerate(self.saes):
            self.handles.append(s.module.register_forward_hook(self._hook(i)))
        if self.embeddings is not None:
            self.handles.append(self.embeddings.register_forward_pre_hook(self._see_ids))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def reset_rows(self, batch: int) -> None:
        """Start a batch: zero the per-row sums (and, generating, forget which rows ended)."""
        self.row_sum = [torch.zeros(batch, dtype=torch.float64, device=self.device) for _ in self.saes]
        self.row_n = [torch.zeros(batch, dtype=torch.float64, device=self.device) for _ in self.saes]
        self._alive = self._valid = None

    def row_means(self) -> list[torch.Tensor]:
        """Per SAE, [B] on the host: each row's mean refusal-feature activity (NaN: no token read)."""
        return [torch.where(n > 0, s / n.clamp_min(1), torch.nan).cpu() for s, n in zip(self.row_sum, self.row_n)]

    def _see_ids(self, _m: nn.Module, args: tuple) -> None:
        """Generation: the first forward of a batch reads the prompt (nothing to encode); each later
        one feeds back generated token s−1, which ends its row when it is an end token."""
        ids = args[0] if args else None
        if not isinstance(ids, torch.Tensor):
            return
        if self._alive is None:
            self._alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
            self._valid = None
            return
        last = ids[:, -1]
        ended = torch.isin(last, self.eos.to(last.device)) if self.eos is not None else torch.zeros_like(self._alive)
        self._alive = self._alive & ~ended
        self._valid = self._alive

    def _hook(self, i: int) -> Any:
        s = self.saes[i]

        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            h = layer_output(out)
            if self.mask is not None:
                mask = self.mask.to(h.device)  # a sharded model's layer may sit on another device
                rows = mask.nonzero()[:, 0]
                x = h[mask]
            elif self._valid is not None:
                rows = self._valid.to(h.device).nonzero()[:, 0]
                x = h[rows, -1]
            else:
                rows, x = None, None
            if x is not None and rows is not None:
                self._encode(i, s, x, rows)
            if self.barrier is not None:
                self.barrier.fire(f"sae:{i}")

        return hook

    def _encode(self, i: int, s: BoundSae, x: torch.Tensor, rows: torch.Tensor) -> None:
        sae = s.hsae.sae
        w = sae.W_enc
        for lo in range(0, x.shape[0], TOKENS_PER_ENCODE):  # chunks of tokens, a handful per batch
            codes = sae.encode(x[lo:lo + TOKENS_PER_ENCODE].to(device=w.device, dtype=w.dtype)).float()  # [n, d_sae]
            self.code_sum[i] += codes.sum(0, dtype=torch.float64).to(self.device)
            self.tokens[i] += int(codes.shape[0])
            if s.features is not None and self.row_sum:
                r = rows[lo:lo + TOKENS_PER_ENCODE].to(self.device)
                act = codes[:, s.features.to(codes.device)].sum(-1, dtype=torch.float64).to(self.device)
                self.row_sum[i].index_add_(0, r, act)
                self.row_n[i].index_add_(0, r, torch.ones_like(act))

    def mean_codes(self) -> list[torch.Tensor]:
        """Per SAE, [d_sae] on the host: the mean code over every token read so far."""
        return [(c / max(n, 1)).cpu() for c, n in zip(self.code_sum, self.tokens)]


@torch.no_grad()
def refusal_features(model: nn.Module, tok: Any, saes: Sequence[BoundSae], harmful: Sequence[str],
                     harmless: Sequence[str], *, top_k: int, batch_size: int, max_length: int) -> None:
    """Fill each SAE's ``features`` (and ``contrast``): the ``top_k`` features with the largest
    positive mean(harmful) − mean(harmless) code at the probe prompts' post-instruction tokens,
    on the same prompt batches and positions as the refusal direction
    (``offline.directions_ablation.refusal_vectors``). One batched pass per category at start-up,
    stopped once every SAE's module has run."""
    from ..offline.directions_ablation import post_instruction_tokens, post_mask
    from ..probe.generate import batches
    from ..records import VerifySettings

    device = next(model.parameters()).device
    n_post = post_instruction_tokens(tok)
    vs = VerifySettings(batch_size=batch_size, max_length=max_length)
    means = []
    for prompts in (harmful, harmless):
        barrier = Barrier({f"sae:{i}" for i in range(len(saes))})
        with FeatureReader(saes, device, barrier) as reader:
            for enc in batches(tok, prompts, vs, device):
                reader.mask = post_mask(enc["attention_mask"], n_post)
                barrier.reset()
                try:
                    model(**enc, use_cache=False)
                except StopForward:
                    pass
        means.append(reader.mean_codes())
    for s, harm, safe in zip(saes, *means):
        diff = (harm - safe).double()
        k = min(int(top_k), int((diff > 0).sum()))
        top = torch.topk(diff, k).indices if k else torch.zeros(0, dtype=torch.long)
        s.features = top.to(device)
        s.contrast = [float(v) for v in diff[top]]
