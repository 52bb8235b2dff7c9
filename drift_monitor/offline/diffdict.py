"""``drift-monitor diff-dict``: a small dictionary of what the fine-tune changed, in real vectors.

Why: the residual monitor shows the directions of new SAE error; this looks at the change
itself. On the probes, the fine-tuned and the base model read the same tokens, so each selected
token gives a paired difference δ = x_ft − x_base at the hook. A few directions usually carry
most of that change; we find them ITDA-style (Inference-Time Decomposition of Activations):
greedily, the atom added next is the real difference vector worst reconstructed by the atoms
so far (its residual after projecting out their span is largest). Real vectors, not learned
ones: each atom is the change at one named probe token, so it can be read directly.

Each atom is reported like a residual direction: the share of the total difference energy it
adds, the probes (and categories) whose tokens moved most along it, its source token, and the
logit lens of the fine-tuned model (the tokens it promotes and suppresses).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..config import ProbeSettings
from ..probe.capture import ActivationCapture, plain_forward, probe_mode, resolve_module
from ..probe.probes import ProbeSet, prepare_probes
from ..probe.residual import logit_lens, logit_lens_weights
from ..progress import bar

#: Stop adding atoms once the next one adds less than this share of the difference energy.
MIN_SHARE = 0.01


@dataclass
class DiffAtom:
    """One atom: a real difference vector (unit), what it explains, and how it reads."""

    rank: int
    share: float  # difference energy it adds to the atoms before it
    cumulative: float  # share explained by the atoms up to and including it
    source_probe: str  # the probe and token whose difference it is
    source_token: str
    top_probes: list[tuple[str, str, float]]  # (probe id, category, mean projection of its tokens' δ)
    projections: dict[str, float]  # mean projection of δ per probe category
    top_tokens: list[str]  # logit lens of the fine-tuned model
    bottom_tokens: list[str]
    vector: list[float] = field(default_factory=list, repr=False)


@dataclass
class DiffDict:
    hook: str
    n_tokens: int
    mean_energy: float  # mean ‖δ‖² per selected token
    atoms: list[DiffAtom]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairedDiffs:
    """δ at every selected probe token, with where each came from."""

    delta: torch.Tensor  # [N, d] float64
    probe: torch.Tensor  # [N] index into the probe set's records
    token: torch.Tensor  # [N] token id


@torch.no_grad()
def paired_differences(model: nn.Module, base: nn.Module | None, tokenizer: Any, probes: ProbeSet, hook: str, *,
                       base_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                       settings: ProbeSettings | None = None, device: str = "cpu",
                       progress: bool = True) -> PairedDiffs:
    """δ = x_ft − x_base at ``hook`` over the probes' selected tokens (every token of each probe but
    position 0, formatted as the monitor does). The base is ``base``, or ``model`` inside
    ``base_context()`` (a PEFT model with its adapter off)."""
    s = settings or ProbeSettings()
    prep = prepare_probes(probes, tokenizer, replace(s, positions="all", include_bos=False))
    deltas, where, tokens = [], [], []
    for b in bar(prep.batches, desc="diff-dict", unit="batch", enabled=progress):
        b = b.to(device)
        x_ft = _capture(model, hook, b.input_ids, b.attention_mask)
        with base_context() if base_context is not None else contextlib.nullcontext():
            x_base = _capture(base if base is not None else model, hook, b.input_ids, b.attention_mask)
        sel = b.select
        deltas.append((x_ft[sel].double() - x_base[sel].double()).cpu())
        where.append(b.index[:, None].expand_as(sel)[sel].cpu())
        tokens.append(b.input_ids[sel].cpu())
    return PairedDiffs(torch.cat(deltas), torch.cat(where), torch.cat(tokens))


def _capture(model: nn.Module, hook: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    _, module = resolve_module(model, hook)
    forward = plain_forward(model)
    with probe_mode(model), ActivationCapture({hook: module}) as cap:
        return cap.run(lambda: forward(ids, mask))[hook]


def greedy_atoms(delta: torch.Tensor, n_atoms: int, min_share: float = MIN_SHARE) -> list[tuple[int, float]]:
    """ITDA-style selection: (row index, energy share it adds), at most ``n_atoms``.

    Each step takes the row of ``delta`` with the largest residual after projecting out the
    span of the rows taken so far, and stops early when a step would add less than
    ``min_share`` of the total energy (nothing left to explain: a model against itself adds none).
    """
    resid = delta.clone()
    total = float((delta * delta).sum())
    picked: list[tuple[int, float]] = []
    if total <= 0:
        return picked
    for _ in range(n_atoms):
        norms = (resid * resid).sum(1)
        j = int(norms.argmax())
        if float(norms[j]) <= 0:
            break
        q = resid[j] / norms[j].sqrt()
        proj = resid @ q
        share = float((proj * proj).sum()) / total
        if share < min_share:
            break
        picked.append((j, share))
        resid -= proj[:, None] * q[None, :]
    return picked


def diff_dict(model: nn.Module, base: nn.Module | None, tokenizer: Any, probes: ProbeSet, hook: str, *,
              n_atoms: int = 8, base_context: Callable[[], contextlib.AbstractContextManager] | None = None,
              settings: ProbeSettings | None = None, device: str = "cpu", progress: bool = True,
              n_top: int = 5) -> DiffDict:
    """The difference dictionary of ``model`` against its base at ``hook`` (module docstring)."""
    pairs = paired_differences(model, base, tokenizer, probes, hook, base_context=base_context, settings=settings,
                               device=device, progress=progress)
    unembed, norm = logit_lens_weights(model)
    records = probes.records
    cats = probes.categories
    cat_of = torch.tensor([cats.index(r.category) for r in records])
    atoms, cumulative = [], 0.0
    for rank, (j, share) in enumerate(greedy_atoms(pairs.delta, n_atoms)):
        v = pairs.delta[j] / pairs.delta[j].norm()
        proj = pairs.delta @ v
        per_probe = _means(proj, pairs.probe, len(records))
        per_cat = _means(proj, cat_of[pairs.probe], len(cats))
        order = [int(i) for i in torch.argsort(per_probe.abs().nan_to_num(-1.0), descending=True)[:n_top]]
        top, bottom = logit_lens(v, unembed, norm)
        cumulative += share
        atoms.append(DiffAtom(
            rank=rank, share=share, cumulative=cumulative, source_probe=records[int(pairs.probe[j])].id,
            source_token=tokenizer.decode([int(pairs.token[j])]),
            top_probes=[(records[i].id, records[i].category, float(per_probe[i])) for i in order],
            projections={c: float(per_cat[i]) for i, c in enumerate(cats)},
            top_tokens=[tokenizer.decode([t]) for t in top], bottom_tokens=[tokenizer.decode([t]) for t in bottom],
            vector=v.float().tolist()))
    n = pairs.delta.shape[0]
    return DiffDict(hook, n, float((pairs.delta * pairs.delta).sum()) / max(n, 1), atoms)


def _means(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``values`` per group id (NaN for an empty group): one scatter, no loop."""
    sums = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, groups, values)
    counts = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, groups, torch.ones_like(values))
    return sums / counts


def format_diff_dict(result: DiffDict) -> str:
    """The atoms as a table of text."""
    lines = [f"difference dictionary at {result.hook}: {result.n_tokens} probe tokens, "
             f"mean |delta|^2 {result.mean_energy:.4g}",
             f"{'atom':>4} {'share':>6} {'cum.':>6}  {'source':<28} logit lens (+) / (-)"]
    for a in result.atoms:
        src = f"{a.source_probe}:{a.source_token!r}"
        lines.append(f"{a.rank:>4} {a.share:>6.1%} {a.cumulative:>6.1%}  {src:<28} "
                     f"{' '.join(a.top_tokens[:5])} / {' '.join(a.bottom_tokens[:5])}")
        lines.append(f"{'':>19}top probes: " + ", ".join(f"{p} ({c}) {m:+.3g}" for p, c, m in a.top_probes[:3]))
    if not result.atoms:
        lines.append("no atom: the fine-tuned model's activations equal the base's on these probes")
    return "\n".join(lines)
