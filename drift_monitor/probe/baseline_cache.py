"""The on-disk cache of a base model's probe pass: what pairing needs, keyed by everything it depends on.

Why a cache: the base pass is the most expensive probe pass of a run (it also keeps each batch's
activations for pairing) and the same base is measured again by every run, scan shard and
resumed job; a hit skips it. Why the key holds every weight, the SAEs, the tokenised probes and
the settings that change a stored number: a stale hit silently compares against the wrong
base, so anything that could change the cached tensors is in the key, and ``CACHE_VERSION``
covers what the key cannot see (a change of what is stored).

One safetensors file per rank, ``<root>/<key digest>/rank<R>.safetensors``, written atomically;
an unreadable file is a miss (recomputed), never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MonitorConfig
from .dist import rank_world
from .fingerprint import weights_digest
from .saes import HookedSAE, sae_fingerprint
from .stats import STATE_LAYOUT, HookStats, PairedBatch

log = logging.getLogger(__name__)

CACHE_VERSION = "5"  # bump when what the cache holds changes (HookStats' states are keyed by STATE_LAYOUT)


@dataclass
class HookBase:
    """The base model's state at one hook: its sums and, per batch, what pairing needs."""

    stats: HookStats
    pairs: dict[int, PairedBatch]  # batch index -> base tensors at that batch's selected tokens
    refusal: HookStats | None = None  # the base at the refusal tokens (ProbeBatch.refusal)
    post: HookStats | None = None  # the base at the post-instruction tokens (ProbeBatch.post)


def model_fingerprint(model: nn.Module) -> str:
    """The identity of a model's weights that keys its baseline cache: config, class, and every
    parameter's name, dtype, shape and exact projection (:func:`~drift_monitor.probe.fingerprint.weights_digest`).

    Why every weight: a fingerprint of sampled values reused a stale baseline for a different base
    whose changes missed the samples. The projection runs on the weights' device and brings back
    one integer per tensor, so it reads the weights once and copies none of them to the host.
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    h.update(type(model).__name__.encode())
    with torch.no_grad():
        h.update(weights_digest(model.named_parameters()).encode())
    return h.hexdigest()[:16]


def cache_path(config: MonitorConfig, fingerprint: str, probe_hash: str, saes: Sequence[HookedSAE]) -> Path:
    """This rank's cache file for the base model ``fingerprint`` read through ``saes`` on the
    probes ``probe_hash`` (``baseline_cache_dir``, else $DRIFT_MONITOR_CACHE, else ~/.cache)."""
    rank, world = rank_world()
    root = Path(config.baseline_cache_dir or os.environ.get("DRIFT_MONITOR_CACHE")
                or Path.home() / ".cache" / "drift_monitor" / "baselines")
    key = json.dumps({"v": CACHE_VERSION, "states": STATE_LAYOUT, "model": fingerprint, "probes": probe_hash,
                      "saes": {s.hook: sae_fingerprint(s.sae) for s in saes},
                      "k": config.metrics.topk_jaccard_k, "batch": config.probes.batch_size,
                      "residual": config.metrics.residual_directions > 0,
                      "early": str(config.early_stop), "world": world}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return root / digest / f"rank{rank}.safetensors"


def save_cache(path: Path, base: dict[str, HookBase], start: dict[str, float]) -> None:
    """Write the base (hooks in order, ``i/…`` keys) and the start's refusal rates, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, (_hook, b) in enumerate(base.items()):
        for name, t in b.stats.state_dict().items():
            tensors[f"{i}/stats/{name}"] = t.contiguous()
        if b.refusal is not None:
            for name, t in b.refusal.state_dict().items():
                tensors[f"{i}/refusal/{name}"] = t.contiguous()
        if b.post is not None:
            for name, t in b.post.state_dict().items():
                tensors[f"{i}/post/{name}"] = t.contiguous()
        for bi, p in b.pairs.items():
            tensors[f"{i}/pair/{bi}/x"] = p.x.cpu().contiguous()
            tensors[f"{i}/pair/{bi}/top"] = p.top_idx.cpu().contiguous()
            tensors[f"{i}/pair/{bi}/l0"] = p.l0.cpu().contiguous()
            tensors[f"{i}/pair/{bi}/keep"] = p.keep.cpu().contiguous()
            tensors[f"{i}/pair/{bi}/limit"] = torch.tensor([p.limit], dtype=torch.float64)
            if p.refusal_keep is not None:
                tensors[f"{i}/pair/{bi}/rkeep"] = p.refusal_keep.cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"hooks": json.dumps(list(base)), "start": json.dumps(start)})
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache


def load_cache(path: Path, saes: Sequence[HookedSAE], categories: list[str], batches: Sequence[int], *,
               scores_refusal: bool, has_post: bool) -> tuple[dict[str, HookBase] | None, dict[str, float]]:
    """(the cached base statistics, the start's refusal rates), or (None, {}) on a miss.

    ``batches``: this rank's batch indices (the pairs it keeps); ``scores_refusal``/``has_post``:
    whether the monitor reads refusal and post-instruction tokens, which the file must match.
    """
    if not path.is_file():
        return None, {}
    from safetensors import safe_open

    try:
        out: dict[str, HookBase] = {}
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            start = {k: float(v) for k, v in json.loads(fh.metadata()["start"]).items()}

            def states(i: int, part: str) -> HookStats | None:
                state = {k.split("/")[-1]: fh.get_tensor(k) for k in keys if k.startswith(f"{i}/{part}/")}
                s = saes[i]
                return HookStats.from_state_dict(categories, s.d_in, s.d_sae, state) if state else None

            for i, s in enumerate(saes):
                st = HookStats.from_state_dict(categories, s.d_in, s.d_sae, {
                    k.split("/")[-1]: fh.get_tensor(k) for k in keys if k.startswith(f"{i}/stats/")})
                pairs = {}
                for bi in batches:
                    pfx = f"{i}/pair/{bi}/"
                    if pfx + "x" in keys:
                        pairs[bi] = PairedBatch(fh.get_tensor(pfx + "x"), fh.get_tensor(pfx + "top"),
                                                fh.get_tensor(pfx + "l0"), fh.get_tensor(pfx + "keep"),
                                                float(fh.get_tensor(pfx + "limit")[0]),
                                                fh.get_tensor(pfx + "rkeep") if pfx + "rkeep" in keys else None)
                dec = states(i, "refusal")
                if (dec is None) == scores_refusal:
                    raise ValueError("the cache was written with other refusal positions")
                post = states(i, "post")
                if (post is None) == has_post:
                    raise ValueError("the cache was written without post-instruction statistics")
                out[s.hook] = HookBase(st, pairs, dec, post)
        return out, start
    except Exception as e:  # noqa: BLE001 - a corrupt cache is recomputed, never fatal
        log.warning("ignoring unreadable baseline cache %s (%s)", path, e)
        return None, {}
