"""Streaming sufficient statistics of one hook: update per batch, merge, all-reduce.

Modelled on torchmetrics' ``Metric``: everything accumulated is a sum, a count or a max, so
batches can be processed in any order, shards merged, and ranks all-reduced with SUM/MAX,
and the result is the same as one pass over the whole probe set. Token-space sums are kept
in float64 because explained variance subtracts two large numbers (Σ‖x‖² − ‖Σx‖²/n).

Each state is declared once, in ``STATES`` (torchmetrics' ``add_state``): its name, shape,
dtype and reduction drive ``HookStats`` initialisation, ``merge``, ``all_reduce``,
``state_dict``/``load_state_dict`` and ``STATE_LAYOUT``. A new statistic is one more row
there plus the lines of ``update`` that accumulate it. The metrics computed from a current
and a base ``HookStats`` are a pure function, ``drift_monitor.probe.compare.compare``, one layer
up: it reads these statistics, they never call it (no import cycle).

Outside the table, on purpose:

* ``categories``, ``d``, ``d_sae``, ``device``, ``residual``: configuration, the sizes the
  shapes name (``r``, the error moment's width, follows ``d`` and ``residual``);
* ``HookStats._reduced``: a Python flag, so ``all_reduce`` cannot count the ranks twice; it
  is per process and in memory only (never merged, reduced or saved);
* ``PairedBatch``: the base model's per-token tensors at one batch's selected tokens, kept
  by the monitor per batch index for pairing. They are not sufficient statistics (nothing
  to sum or max: each rank keeps its own batches), so they are never merged or reduced and
  the baseline cache stores them beside the states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from . import metrics as M
from .dist import is_distributed
from .residual import accumulate, sketch_matrix, sketch_width


@dataclass
class PairedBatch:
    """What the base model left at one batch's selected tokens, for paired metrics."""

    x: torch.Tensor  # [n, d] base activations (model dtype)
    top_idx: torch.Tensor  # [n, K] int32, base codes' top indices, largest first
    l0: torch.Tensor  # [n] int32, base L0 per token
    #: [n_selected] bool: which of the batch's selected tokens the base kept (not massive-norm)
    keep: torch.Tensor | None = None
    limit: float = math.inf  # the base's massive-norm limit for this batch
    refusal_keep: torch.Tensor | None = None  # which of the batch's refusal tokens the base kept


Reduce = Literal["sum", "max"]


@dataclass(frozen=True)
class StateSpec:
    """One streaming state of ``HookStats`` (torchmetrics' ``Metric.add_state``).

    ``shape`` names its dimensions after the sizes of the ``HookStats``: ``"C"`` (categories),
    ``"d"`` (model width), ``"d_sae"`` (features). ``reduce`` is how two shards combine, in
    ``merge`` and ``all_reduce`` alike; a state starts at that reduction's identity (0 for a
    sum, −inf for a max).
    """

    name: str
    shape: tuple[str, ...]
    reduce: Reduce = "sum"
    dtype: torch.dtype = torch.float64
    doc: str = ""

    @property
    def identity(self) -> float:
        return -math.inf if self.reduce == "max" else 0.0


#: The streaming states of one hook, per category; order is ``state_dict``'s order.
STATES: tuple[StateSpec, ...] = (
    StateSpec("n", ("C",), doc="tokens"),
    StateSpec("l0_sum", ("C",), doc="Σ L0_t"),
    StateSpec("sq_err_sum", ("C",), doc="Σ ‖x − x̂‖²"),
    StateSpec("x_sum", ("C", "d"), doc="Σ x"),
    StateSpec("x_sq_sum", ("C",), doc="Σ ‖x‖²"),
    StateSpec("cos_sum", ("C",), doc="Σ cos(x, x̂)"),
    StateSpec("nonfinite", ("C",), doc="tokens dropped for NaN/inf activations"),
    StateSpec("fire_count", ("C", "d_sae"), doc="Σ 1[f > 0]"),
    StateSpec("act_sum", ("C", "d_sae"), doc="Σ f"),
    StateSpec("pair_sq_diff", ("C",), doc="Σ ‖x − x⁰‖²"),
    StateSpec("pair_cos_sum", ("C",), doc="Σ cos(x, x⁰)"),
    StateSpec("jaccard_sum", ("C",), doc="Σ top-k Jaccard"),
    StateSpec("n_paired", ("C",), doc="tokens with a base pair"),
    StateSpec("excluded", ("C",), doc="selected tokens excluded as massive-norm (the base's)"),
    StateSpec("outliers", ("C",), doc="kept tokens above the base's massive-norm limit"),
    StateSpec("overlap_sum", ("C",), doc="Σ |K ∩ K⁰| / k (the paper's overlap)"),
    StateSpec("fvu_tok_sum", ("C",), doc="Σ per-token FVU ‖x − x̂‖² / ‖x − mean_d x‖²"),
    StateSpec("act_max", ("C", "d_sae"), "max", torch.float32, doc="max f (−inf before any token)"),
    StateSpec("err_sum", ("C", "d"), doc="Σ e, e = x − x̂ (the SAE's error)"),
    StateSpec("err_gram", ("d", "r"), doc="Σ e eᵀ over all categories, or its sketch Σ e (e Ω) (probe.residual); "
                                          "r = 0 when the residual monitor is off"),
)

#: The table as one string (name:shape:dtype:reduce per state), for anything keyed on the
#: set of states, such as a baseline cache key: it changes whenever the table does.
STATE_LAYOUT = ";".join(f"{s.name}:{'x'.join(s.shape)}:{str(s.dtype).removeprefix('torch.')}:{s.reduce}"
                        for s in STATES)


@dataclass
class HookStats:
    """Per-category sums for one hook. C categories, d model width, d_sae features.

    One tensor attribute per row of ``STATES`` (``self.n``, ``self.x_sum``, ...), created by
    ``__post_init__`` from the table.
    """

    categories: list[str]
    d: int
    d_sae: int
    device: torch.device | str = "cpu"
    #: keep the error's second moment (``err_gram``) for the residual monitor
    residual: bool = True
    #: set by ``all_reduce``: the states are totals over the ranks (see the module docstring)
    _reduced: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        for s in STATES:
            setattr(self, s.name, torch.full(self._shape(s), s.identity, dtype=s.dtype, device=self.device))

    def _shape(self, spec: StateSpec) -> tuple[int, ...]:
        sizes = {"C": len(self.categories), "d": self.d, "d_sae": self.d_sae,
                 "r": sketch_width(self.d) if self.residual else 0}
        return tuple(sizes[dim] for dim in spec.shape)

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def count_tokens(self, excluded_cat: torch.Tensor, cat: torch.Tensor, x: torch.Tensor,
                     limit: float | None) -> None:
        """Count the tokens excluded as massive-norm (``excluded_cat``: their categories), and,
        given the base's ``limit``, the kept tokens of this model that exceed it."""
        if excluded_cat.numel():
            self.excluded.index_add_(0, excluded_cat, torch.ones_like(excluded_cat, dtype=torch.float64))
        if limit is not None and math.isfinite(limit) and x.shape[0]:
            over = x.float().norm(dim=-1) > limit  # no .any() check: it would sync the device per batch
            self.outliers.index_add_(0, cat[over], torch.ones_like(cat[over], dtype=torch.float64))

    @torch.no_grad()
    def update(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        codes: torch.Tensor,
        cat: torch.Tensor,
        pair: PairedBatch | None = None,
        k_max: int = 100,
        top_idx: torch.Tensor | None = None,
        top_vals: torch.Tensor | None = None,
        l0: torch.Tensor | None = None,
    ) -> None:
        """Add one batch of selected tokens: x, x̂ [n, d], codes [n, d_sae], cat [n] (long).

        ``top_idx``/``top_vals`` are each row's largest codes, largest first (any width; the
        Jaccard uses the first ``k_max``). Give ``top_vals`` only when they hold every firing
        feature: the feature statistics are then accumulated from those n·k entries instead of
        all n·d_sae codes. ``l0`` (firing features per row) may be passed if already known.
        """
        C = len(self.categories)
        finite = torch.isfinite(x).all(-1)
        if not bool(finite.all()):
            self.nonfinite.index_add_(0, cat[~finite], torch.ones_like(cat[~finite], dtype=torch.float64))
            x, x_hat, codes, cat = x[finite], x_hat[finite], codes[finite], cat[finite]
            if top_idx is not None:
                top_idx = top_idx[finite]
            if top_vals is not None:
                top_vals = top_vals[finite]
            if l0 is not None:
                l0 = l0[finite]
            if pair is not None:
                pair = PairedBatch(pair.x[finite], pair.top_idx[finite], pair.l0[finite], None, pair.limit)
        if x.shape[0] == 0:
            return
        x64 = x.double()
        one64 = F.one_hot(cat, C).T.double()  # [C, n]: per-category sums as small matmuls
        self.n += one64.sum(1)
        self.x_sum += one64 @ x64
        self.x_sq_sum += one64 @ (x64 * x64).sum(1)
        err = x64 - x_hat.double()
        sq_err = (err * err).sum(1)
        self.sq_err_sum += one64 @ sq_err
        self.fvu_tok_sum += one64 @ M.fvu_token_rows(sq_err, x64)
        self.err_sum += one64 @ err
        if self.residual:
            accumulate(self.err_gram, err.to(x.dtype if x.dtype == torch.float64 else torch.float32), self.omega)
        self.cos_sum += one64 @ M.cosine_rows(x, x_hat)

        if top_vals is not None and top_idx is not None:
            row_l0 = self._update_features_sparse(top_vals, top_idx, cat)
        else:
            row_l0 = self._update_features_dense(codes, cat, one64)
        l0 = row_l0 if l0 is None else l0
        self.l0_sum += one64 @ l0.double()

        if pair is not None:
            x0 = pair.x.double()
            d0 = x64 - x0
            self.pair_sq_diff += one64 @ (d0 * d0).sum(1)
            self.pair_cos_sum += one64 @ M.cosine_rows(x, pair.x)
            top_k = M.topk_indices(codes, k_max) if top_idx is None else top_idx[:, :k_max]
            jac, overlap = M.topk_jaccard_rows(top_k, l0, pair.top_idx[:, :k_max], pair.l0.to(l0.device), k_max,
                                               d_sae=self.d_sae, with_overlap=True)
            self.jaccard_sum += one64 @ jac
            self.overlap_sum += one64 @ overlap
            self.n_paired += one64.sum(1)

    def _update_features_dense(self, codes: torch.Tensor, cat: torch.Tensor, one64: torch.Tensor) -> torch.Tensor:
        """Per-category firing counts, sums and maxes from all codes: matmuls with the one-hot."""
        active = codes > 0
        one32 = one64.to(codes.dtype)
        self.fire_count += (one32 @ active.to(codes.dtype)).double()
        self.act_sum += (one32 @ codes).double()
        for c in torch.unique(cat).tolist():  # a loop over categories (a handful), never tokens
            self.act_max[c] = torch.maximum(self.act_max[c], codes[cat == c].amax(0).float())
        return active.sum(1)

    def _update_features_sparse(self, vals: torch.Tensor, idx: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """The same from the top-k entries only: scatter-adds on flat (category, feature) ids.

        Exact when the top-k holds every firing feature: codes outside it are 0, which adds
        nothing to counts or sums, and a max of 0 is what compute() reports for a feature
        that never fired in a category.
        """
        flat = (cat[:, None] * self.d_sae + idx.long()).reshape(-1)
        v = vals.reshape(-1)
        firing = v > 0
        self.fire_count.view(-1).index_add_(0, flat, firing.double())
        self.act_sum.view(-1).index_add_(0, flat, v.double())
        self.act_max.view(-1).scatter_reduce_(0, flat, v.float(), reduce="amax")
        return firing.view(vals.shape).sum(1)

    def merge(self, other: HookStats) -> HookStats:
        """Fold another shard's states into this one (same categories and sizes), each by its
        reduction: sums add, maxes max."""
        if other.categories != self.categories or other.d_sae != self.d_sae or other.d != self.d \
                or other.residual != self.residual:
            raise ValueError("cannot merge statistics of different hooks or category sets")
        for s in STATES:
            mine, theirs = getattr(self, s.name), getattr(other, s.name).to(self.device)
            if s.reduce == "sum":
                mine.add_(theirs)
            else:
                torch.maximum(mine, theirs, out=mine)
        return self

    def all_reduce(self, group: object | None = None) -> HookStats:
        """Reduce every state over a torch.distributed group by its reduction (SUM or MAX),
        one collective per (reduction, dtype). Outside a group of several ranks, nothing to do.

        Call it once, after the last ``update``: it turns this rank's sums into totals over
        the ranks, and a second call would count every rank world_size times, so it raises
        RuntimeError (in a single process too, where it would be harmless, so the mistake is
        caught before it matters).
        """
        import torch.distributed as dist

        if self._reduced:
            raise RuntimeError("HookStats.all_reduce() was already called on these statistics: they hold the "
                               "totals over the ranks, and reducing again would count each rank's tokens "
                               "world_size times")
        self._reduced = True
        if not is_distributed(group):
            return self
        groups: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}
        for s in STATES:
            groups.setdefault((s.reduce, s.dtype), []).append(getattr(self, s.name))
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        for (reduce, _), tensors in groups.items():
            if len(tensors) == 1:
                dist.all_reduce(tensors[0], op=ops[reduce], group=group)
                continue
            flat = torch.cat([t.reshape(-1) for t in tensors])
            dist.all_reduce(flat, op=ops[reduce], group=group)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        return self

    # ------------------------------------------------------------------ persistence (baseline cache)
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every state of ``STATES``, on the CPU, by name."""
        return {s.name: getattr(self, s.name).cpu() for s in STATES}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> HookStats:
        """Copy a ``state_dict`` into this one. Strict: the names, shapes and dtypes must be
        exactly those of ``STATES`` at these sizes, so a state dict written by another version
        of the table raises ValueError instead of loading as something else."""
        names = [s.name for s in STATES]
        if set(state) != set(names):
            missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
            raise ValueError(f"HookStats state dict does not match STATES: missing {missing}, unexpected {extra}")
        for s in STATES:
            t, shape = state[s.name], self._shape(s)
            if tuple(t.shape) != shape or t.dtype != s.dtype:
                raise ValueError(f"HookStats state {s.name!r}: expected {list(shape)} {s.dtype}, "
                                 f"got {list(t.shape)} {t.dtype}")
            getattr(self, s.name).copy_(t)
        return self

    @classmethod
    def from_state_dict(cls, categories: list[str], d: int, d_sae: int, state: Mapping[str, torch.Tensor],
                        device: torch.device | str = "cpu") -> HookStats:
        residual = "err_gram" in state and state["err_gram"].shape[-1] > 0
        return cls(categories, d, d_sae, device, residual).load_state_dict(state)

    @property
    def omega(self) -> torch.Tensor | None:
        """The residual sketch's Ω (None: the exact moment), made once per HookStats."""
        if "_omega" not in self.__dict__:
            self._omega = sketch_matrix(self.d, self.device)
        return self._omega
