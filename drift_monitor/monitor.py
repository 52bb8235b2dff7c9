"""DriftMonitor: the base snapshot once, then a Snapshot of any later model at a step.

This is the public API the callback, the scan, the demo and the tests build on:

    mon = DriftMonitor(MonitorConfig(saes={"model.layers.4": sae_dir}), tokenizer)
    base = mon.baseline(base_model)          # step 0; cached on disk
    snap = mon.snapshot(model, step=100)     # paired against the base, token by token
    snap.metric("model.layers.4", "explained_variance")

One probe pass = one forward per batch with hooks attached only for that pass, stopped
after the deepest hooked layer when that is safe, the SAE applied to the selected tokens
only, and streaming sums (``stats.HookStats``) instead of stored feature matrices.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import PLAIN_CATEGORIES, MetricSettings, MonitorConfig
from .errors import ConfigError
from .filelock import file_lock
from .probe.baseline_cache import HookBase, cache_path, load_cache, model_fingerprint, save_cache
from .probe.capture import (
    ActivationCapture,
    hidden_size,
    is_sharded,
    model_device,
    plain_forward,
    probe_mode,
    resolve_module,
)
from .probe.ce import ce_batches, ce_losses
from .probe.compare import compare
from .probe.directions import load_hook_directions
from .probe.dist import on_every_rank, rank_world
from .probe.probes import PreparedProbes, ProbeBatch, ProbeSet, RefusalProbing, check_paired, prepare_probes
from .probe.residual import ResidualReader, logit_lens_weights
from .probe.sae_pass import chunk_tokens, encode_refusal, encode_selected, encode_tokens
from .probe.saes import HookedSAE, bind_sae, check_d_in
from .probe.start import measure_start_refusal
from .probe.stats import HookStats, PairedBatch
from .probe.tokens import TokenConventions, keep_mask, merge_conventions
from .progress import bar
from .records import Snapshot

log = logging.getLogger(__name__)

class DriftMonitor:
    """Runs the probe pass and turns it into :class:`~drift_monitor.records.Snapshot` records."""

    def __init__(self, config: MonitorConfig, tokenizer: Any, *, categories: list[str] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.probe_set = ProbeSet.resolve(config.probes.source)
        self.settings: MetricSettings = config.metrics
        device = config.device or "cpu"
        self.saes: list[HookedSAE] = [bind_sae(h, src, device, config.sae_dtype) for h, src in config.sae_items()]
        hooks = [s.hook for s in self.saes]
        if len(set(hooks)) != len(hooks):
            raise ConfigError(f"two SAEs on the same hook: {hooks}; give one SAE per hook")
        # What each SAE reads follows its own training conventions (drift_monitor.probe.tokens); the
        # config's outlier_factor applies where the SAE records no limit of its own.
        self.conventions: dict[str, TokenConventions] = {
            s.hook: _with_config(TokenConventions.from_sae(s.sae), config) for s in self.saes}
        conv = merge_conventions([(s.source, self.conventions[s.hook]) for s in self.saes])
        st = self.settings
        cats_present = set(self.probe_set.categories)
        refusal = RefusalProbing(
            categories=(st.harmful_category, st.harmless_category)
            if {st.harmful_category, st.harmless_category} <= cats_present else (),
            positions=st.refusal_positions, response=st.refusal_response)
        pc = config.probes
        self.probes: PreparedProbes = prepare_probes(self.probe_set, tokenizer, pc, conventions=conv,
                                                     categories=categories, refusal=refusal)
        #: The base model's probes: the same tokens, or, when base_formats differ (a base model read
        #: in its own format against a chat model), the same content in the base's format, batched
        #: in the same order and checked to pair token by token.
        self.base_probes: PreparedProbes = self.probes
        if any(pc.format_for(c) != pc.format_for(c, base=True) for c in self.probes.categories):
            self.base_probes = prepare_probes(self.probe_set, tokenizer, pc, base=True, order=self.probes.order,
                                              conventions=conv, categories=categories, refusal=refusal)
            check_paired(self.probes, self.base_probes)
        # The CE-loss metrics predict the general (plain-text) probes' tokens
        self._ce_batches = ce_batches([r.prompt for r in self.probe_set.records if r.category in PLAIN_CATEGORIES],
                                      tokenizer, pc.batch_size, pc.max_length) \
            if config.cadence.ce_every_n_snapshots else []
        # Loaded and checked now (file, width, hook), so a bad direction fails at start-up. Not part
        # of the baseline cache key: projections are computed from the cached sums at compute().
        self.directions: dict[str, dict[str, torch.Tensor]] = load_hook_directions(
            config.directions, {s.hook: s.d_in for s in self.saes})
        self._base: dict[str, HookBase] | None = None
        self._announced = False  # the first snapshot's pass logs its estimate too, later ones do not
        self._refusal_tokens: bool | None = None  # _scores_refusal(), decided on first use
        self._post_tokens: bool | None = None  # _has_post(), decided on first use
        self.base_snapshot: Snapshot | None = None
        self.base_fingerprint: str | None = None
        #: The start model's own refusal rates (probe.start), measured with the baseline and
        #: reported at every hook of every snapshot; {} when not measured.
        self.start_refusal: dict[str, float] = {}

    # ------------------------------------------------------------------ public API
    @property
    def hooks(self) -> list[str]:
        return [s.hook for s in self.saes]

    @property
    def probe_hash(self) -> str:
        """The tokenised probes (and the base's, when it reads another format)."""
        if self.base_probes is self.probes:
            return self.probes.hash
        return hashlib.sha256(f"{self.probes.hash}|{self.base_probes.hash}".encode()).hexdigest()[:16]

    def baseline(self, base_model: nn.Module, *, use_cache: bool = True) -> Snapshot:
        """Measure the base model (step 0). Cached on disk, keyed by model + SAEs + probes."""
        t0 = time.perf_counter()
        self.base_fingerprint = model_fingerprint(base_model)
        modules = self._bind(base_model)
        path = self._cache_path(self.base_fingerprint) if use_cache else None
        # Under a file lock: two processes measuring one base (the shards of a scan, two runs
        # of one base) take turns, and the second loads what the first saved.
        with (file_lock(path.with_suffix(".lock"), on_wait=lambda: log.info(
                "baseline: another process is measuring this base; waiting for it (%s)", path))
              if path is not None else contextlib.nullcontext()):
            base, start = self._load_cache(path) if path is not None else (None, {})
            device = torch.device(self.config.device) if self.config.device else model_device(base_model)
            if path is not None and not on_every_rank(base is not None, device):
                # A hit here but a miss (missing or unreadable file) on another rank: that rank's
                # probe pass has collectives, so every rank must run it, or they pair up wrongly.
                base = None
            if base is None:
                stats, pairs, refusal, post = self._probe_pass(base_model, modules, base=None, desc="baseline")
                base = {h: HookBase(stats[h], pairs[h], refusal.get(h), post.get(h)) for h in stats}
                pc = self.config.probes
                start = measure_start_refusal(base_model, self.tokenizer, self.probe_set, self.settings,
                                              batch_size=pc.batch_size, max_length=pc.max_length)
                if path is not None:
                    save_cache(path, base, start)
            else:
                log.info("baseline loaded from cache %s", path)
        self.start_refusal = start
        return self._with_ce(self._set_base(base, t0), base_model)

    def load_baseline(self, fingerprint: str) -> Snapshot:
        """The base snapshot from the on-disk cache alone, by the base model's fingerprint.

        Why: a run resumed from a checkpoint no longer has its base weights in memory, but its
        checkpoint records the base fingerprint, and the cache holds what pairing needs.
        Raises FileNotFoundError (on every rank, together) when any rank lacks its cache file.
        """
        t0 = time.perf_counter()
        path = self._cache_path(fingerprint)
        base, self.start_refusal = self._load_cache(path)
        if not on_every_rank(base is not None, torch.device(self.config.device or "cpu")):
            raise FileNotFoundError(
                f"no cached baseline for base model {fingerprint} at {path} (or on another rank); "
                "it is written by DriftMonitor.baseline() — keep baseline_cache_dir between runs")
        self.base_fingerprint = fingerprint
        return self._set_base(base, t0)

    def _set_base(self, base: dict[str, HookBase], t0: float) -> Snapshot:
        self._base = base
        hooks = {h: compare(b.stats, b.stats, h, self.settings, self.directions.get(h),
                            refusal=_pair(b.refusal, b.refusal), post=_pair(b.post, b.post))
                 for h, b in base.items()}
        self._add_start(hooks)
        self.base_snapshot = Snapshot(step=0, hooks=hooks, probe_hash=self.probe_hash,
                                      n_tokens=self._n_tokens(base), duration_s=time.perf_counter() - t0,
                                      is_base=True)
        return self.base_snapshot

    def snapshot(self, model: nn.Module, step: int) -> Snapshot:
        """Measure ``model`` at ``step`` against the baseline. Every rank must call it."""
        if self._base is None:
            raise RuntimeError("call DriftMonitor.baseline(base_model) before snapshot(); the base is step 0")
        t0 = time.perf_counter()
        modules = self._bind(model)
        stats, _, refusal, post = self._probe_pass(model, modules, base=self._base, desc=f"step {step}")
        readers = self._residual_readers(model) if self.settings.residual_directions else {}
        hooks = {h: compare(stats[h], self._base[h].stats, h, self.settings, self.directions.get(h),
                            refusal=_pair(refusal.get(h), self._base[h].refusal),
                            post=_pair(post.get(h), self._base[h].post), reader=readers.get(h))
                 for h in stats}
        self._add_start(hooks)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        snap = Snapshot(step=step, hooks=hooks, probe_hash=self.probe_hash,
                        n_tokens=int(sum(float(s.n.sum()) for s in stats.values()) / max(len(stats), 1)),
                        duration_s=time.perf_counter() - t0)
        return self._with_ce(snap, model)

    def _add_start(self, hooks: dict[str, Any]) -> None:
        """The start's refusal rates at every hook: a rule reads its gate where it reads its metric."""
        for r in hooks.values():
            r.metrics.update(self.start_refusal)

    def _with_ce(self, snap: Snapshot, model: nn.Module) -> Snapshot:
        """Add the CE-loss metrics (probe.ce) when ``cadence.ce_every_n_snapshots`` makes them due
        at this step and the probes have general text to predict."""
        if not self._ce_batches or not self.config.cadence.ce_due(snap.step):
            return snap
        device = torch.device(self.config.device) if self.config.device else model_device(model)
        t0 = time.perf_counter()
        losses = ce_losses(model, self._ce_batches, {s.hook: s.sae for s in self.saes}, device)
        for h, ce in losses.items():
            snap.hooks[h].metrics.update(ce.metrics())
        snap.duration_s += time.perf_counter() - t0
        return snap

    def _residual_readers(self, model: nn.Module) -> dict[str, ResidualReader]:
        """Per hook: the SAE's decoder and the model's logit lens, to read directions of new error."""
        unembed, norm = logit_lens_weights(model)
        tok = self.tokenizer

        def decode(ids: list[int]) -> list[str]:
            return [tok.decode([i]) for i in ids]

        return {s.hook: ResidualReader(s.sae.W_dec.detach(), unembed, norm, decode) for s in self.saes}

    # ------------------------------------------------------------------ the probe pass
    def _bind(self, model: nn.Module) -> dict[str, nn.Module]:
        """Resolve every hook on this model and check each SAE's width against it."""
        modules: dict[str, nn.Module] = {}
        width = hidden_size(model)
        for s in self.saes:
            name, module = resolve_module(model, s.hook)
            out_w = getattr(module, "out_features", None) or getattr(module, "embedding_dim", None) or width
            check_d_in(s, out_w, name)
            modules[s.hook] = module
        return modules

    def _early_stop(self, model: nn.Module) -> bool:
        if self.config.early_stop == "auto":
            return not is_sharded(model)
        return bool(self.config.early_stop)

    def _my_batches(self) -> list[tuple[int, bool]]:
        """(batch index, counts?) for this rank. Ranks run equally many forwards (FSDP needs
        every rank in every forward); a rank short of batches repeats one and ignores it."""
        rank, world = rank_world()
        n = len(self.probes.batches)
        mine = [(i, True) for i in range(rank, n, world)]
        per_rank = -(-n // world)
        while len(mine) < per_rank:
            mine.append((mine[0][0] if mine else 0, False))
        return mine

    def _scores_refusal(self) -> bool:
        """True when refusal features are scored on tokens of their own (the teacher-forced refusal
        or the last prompt token); "selected" scores them on the selected tokens' statistics.
        Decided once per monitor (the probes never change): the probe pass only reads it."""
        if self._refusal_tokens is None:
            self._refusal_tokens = self.settings.refusal_positions != "selected" and any(
                bool(b.refusal.any()) for b in self.probes.batches)
        return self._refusal_tokens

    @torch.no_grad()
    def _probe_pass(self, model: nn.Module, modules: dict[str, nn.Module], base: dict[str, HookBase] | None,
                    desc: str) -> tuple[dict[str, HookStats], dict[str, dict[int, PairedBatch]], dict[str, HookStats],
                                        dict[str, HookStats]]:
        device = torch.device(self.config.device) if self.config.device else model_device(model)
        for s in self.saes:
            s.sae.to(device)
        probes = self.base_probes if base is None else self.probes
        cats = probes.categories
        keep_residual = self.settings.residual_directions > 0
        stats = {s.hook: HookStats(cats, s.d_in, s.d_sae, device, keep_residual) for s in self.saes}
        scored = self._scores_refusal()
        refusal = {s.hook: HookStats(cats, s.d_in, s.d_sae, device, False) for s in self.saes} if scored else {}
        has_post = self._has_post()
        post = {s.hook: HookStats(cats, s.d_in, s.d_sae, device, False) for s in self.saes} if has_post else {}
        pairs: dict[str, dict[int, PairedBatch]] = {s.hook: {} for s in self.saes}
        k_max = self.settings.topk_jaccard_k
        chunks = {s.hook: chunk_tokens(s.d_sae, self.config.sae_chunk_mb) for s in self.saes}
        forward = _forward_fn(model)
        batches = self._my_batches()
        rank, _ = rank_world()
        announce = base is None or not self._announced
        if announce and rank == 0:
            log.info("drift-monitor %s: %d probes, %d selected tokens in %d batches", desc, len(probes.items),
                     probes.n_tokens, len(probes.batches))
        t0 = time.perf_counter()
        with probe_mode(model), ActivationCapture(modules, early_stop=self._early_stop(model)) as cap:
            shown = self.config.outputs.show_progress and rank == 0
            for i, (bi, counts) in enumerate(bar(batches, desc=desc, unit="batch", enabled=shown, leave=False)):
                batch: ProbeBatch = probes.batches[bi].to(device)
                acts = cap.run(lambda: forward(batch))  # noqa: B023 - cap.run calls it at once, in this iteration
                if i == 0 and announce and rank == 0:  # a slow start should not look like a hang
                    first = time.perf_counter() - t0
                    n_ids = sum(probes.batches[b].input_ids.numel() for b, _ in batches)
                    share = batch.input_ids.numel() / max(n_ids, 1)
                    log.info("drift-monitor %s: first batch took %.1f s; about %.0f s per probe pass",
                             desc, first, first / share)
                    self._announced = base is not None
                if not counts:
                    continue
                cat_sel = batch.category[:, None].expand_as(batch.select)[batch.select]
                for s in self.saes:
                    x_sel = acts[s.hook][batch.select]  # [n, d]: only selected tokens reach the SAE
                    pair = base[s.hook].pairs[bi] if base is not None else None
                    # Massive-norm tokens are excluded where the *base* has them, so both sides
                    # of every pair are the same tokens; the current model's new ones are counted.
                    if pair is None:
                        keep, limit = keep_mask(x_sel, self.conventions[s.hook])
                    else:
                        keep, limit = pair.keep.to(device), pair.limit
                    x, cat = x_sel[keep], cat_sel[keep]
                    stats[s.hook].count_tokens(cat_sel[~keep], cat, x, limit if pair is not None else None)
                    kept = encode_selected(s, x, cat, pair, stats[s.hook], device, k_max, chunks[s.hook])
                    if pair is None:
                        kept.keep, kept.limit = keep.cpu(), limit
                    if scored:
                        rkeep = encode_refusal(s, acts[s.hook], batch, pair, limit, refusal[s.hook])
                        if pair is None:
                            kept.refusal_keep = rkeep.cpu()
                    if has_post:
                        encode_tokens(s, acts[s.hook], batch.post, batch.category, limit, post[s.hook])
                    if pair is None:
                        pairs[s.hook][bi] = kept
        for st in list(stats.values()) + list(refusal.values()) + list(post.values()):
            st.all_reduce()
        return stats, pairs, refusal, post

    def _has_post(self) -> bool:
        """Whether any probe has post-instruction tokens (harmful and harmless probes both present).
        Decided once per monitor (the probes never change), not at every probe pass."""
        if self._post_tokens is None:
            self._post_tokens = any(bool(b.post.any()) for b in self.probes.batches)
        return self._post_tokens

    # ------------------------------------------------------------------ baseline cache
    def _cache_path(self, fingerprint: str) -> Path:
        return cache_path(self.config, fingerprint, self.probe_hash, self.saes)

    def _load_cache(self, path: Path) -> tuple[dict[str, HookBase] | None, dict[str, float]]:
        return load_cache(path, self.saes, self.probes.categories, [bi for bi, _ in self._my_batches()],
                          scores_refusal=self._scores_refusal(), has_post=self._has_post())

    @staticmethod
    def _n_tokens(base: dict[str, HookBase]) -> int:
        return int(next(iter(base.values())).stats.n.sum()) if base else 0


def _pair(current: HookStats | None, base: HookStats | None) -> tuple[HookStats, HookStats] | None:
    return (current, base) if current is not None and base is not None else None


def _with_config(conv: TokenConventions, config: MonitorConfig) -> TokenConventions:
    """The SAE's conventions, with the config's outlier factor where the SAE records no limit."""
    from dataclasses import replace

    if conv.outlier_norm is not None:
        return conv
    return replace(conv, outlier_factor=config.probes.outlier_factor)


def _forward_fn(model: nn.Module) -> Callable[[ProbeBatch], object]:
    """One probe forward (``capture.plain_forward``: never under the trainer's autocast)."""
    forward = plain_forward(model)
    return lambda batch: forward(batch.input_ids, batch.attention_mask)


