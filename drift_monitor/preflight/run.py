"""``preflight``: read a fine-tuning dataset against the start model before training, and say
which way it pushes refusal and which examples push it most (docs/preflight.md).

The work, in order: the start model's refusal direction at every chosen layer (from the monitor's
probe set); without ``generate``, the start's own answers to the probe prompts, generated once,
which calibrate how a prompt's post-instruction projection predicts the model's own answer; then
the dataset streamed in chunks: one forward per example (plus one generation with ``generate``).
Only the per-example scores and the current top examples are kept, so a dataset larger than
memory is read in constant memory (bar the scores: 8 bytes per example). Results are cached by
(model fingerprint, data hash, settings, SAEs).

With SAEs (``saes={hook: source}``, ``--sae HOOK=DIR``) the same passes also read features
(:mod:`.features`): the start's refusal features (one extra batched pass over the probe prompts
at start-up), each response's activity on them in its teacher-forced forward, the model's own
answer's in its generation (predicted: the start's mean over its own probe answers, which are
generated once anyway), and the features the data's responses push most.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import score as SC
from .data import PreflightDataError, data_hash, iter_examples
from .engine import Example, own_responses, read_examples, start_reference
from .result import ExampleScore, FeaturePush, PreflightResult
from .settings import PreflightError, PreflightSettings

#: The decoder layers the dataset score averages over when none are named: every layer.
#: Why every layer: of the bands all / 0-9 / 10-19 / 20-29 of SmolLM2's 30 layers, "all" correlated
#: best with the change in refusal on the detection suite's calibration half in the default
#: (predicted) mode, r = 0.93 (tests/bench/preflight_report.py; held-out figures in docs/preflight.md).
DEFAULT_LAYERS: tuple[int, ...] | None = None
#: Bump when what a cached result holds or how it is computed changes.
CACHE_VERSION = "1"


@dataclass
class _Top:
    """The k largest items seen so far by key, with their payloads (a bounded heap)."""

    k: int
    heap: list[tuple[float, int, Any]] = field(default_factory=list)

    def push(self, key: float, index: int, payload: Any) -> None:
        if self.k <= 0 or not np.isfinite(key):
            return
        item = (key, -index, payload)  # ties: the earlier example first
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif item[:2] > self.heap[0][:2]:
            heapq.heapreplace(self.heap, item)

    def best_first(self) -> list[Any]:
        return [p for _, _, p in sorted(self.heap, key=lambda t: (t[0], t[1]), reverse=True)]


def _chunks(items: Iterable[Example], n: int) -> Iterator[list[Example]]:
    buf: list[Example] = []
    for x in items:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def _probe_prompts(probes: Any, s: PreflightSettings) -> tuple[list[str], list[str]]:
    from ..probe.probes import ProbeSet

    ps = ProbeSet.resolve(probes if probes is not None else "default")
    harmful = [r.prompt for r in ps.records if r.category == s.harmful_category]
    harmless = [r.prompt for r in ps.records if r.category == s.harmless_category]
    if not harmful or not harmless:
        raise PreflightError(f"the probe set needs {s.harmful_category!r} and {s.harmless_category!r} probes to "
                             f"find the start model's refusal direction; it has {', '.join(ps.categories)}")
    return harmful, harmless


def _cache_key(fingerprint: str, dhash: str, s: PreflightSettings, harmful: list[str], harmless: list[str],
               saes: Mapping[str, str] | None = None) -> str:
    """The cache file's name: what the result depends on (``saes``: hook -> ``sae_fingerprint``)."""
    blob = json.dumps({"v": CACHE_VERSION, "model": fingerprint, "data": dhash, "settings": asdict(s),
                       "saes": dict(saes or {}),
                       "probes": hashlib.sha256(json.dumps([harmful, harmless]).encode()).hexdigest()},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "drift_monitor" / "preflight"


def preflight(model: Any, tokenizer: Any, sources: Sequence[str | Path], *,
              settings: PreflightSettings | None = None, probes: Any = None, model_name: str = "",
              saes: Mapping[str, Any] | None = None, cache_dir: str | Path | None = None, use_cache: bool = True,
              progress: bool = True) -> PreflightResult:
    """Read ``sources`` (JSONL with messages / prompt+response / text, text files, datasets
    folders) against ``model``: the dataset's score, per layer, and its top examples each way;
    with ``saes`` ({hook: SAE directory, ``release:id`` or object}), also the refusal-feature
    signals (module docstring). SAEs are bound, and their hooks checked, before anything runs."""
    from ..monitor import model_fingerprint
    from ..probe.saes import sae_fingerprint
    from .features import bind_saes

    s = settings or PreflightSettings()
    harmful, harmless = _probe_prompts(probes, s)
    dhash = data_hash(sources)
    bound = bind_saes(model, saes, next(model.parameters()).device) if saes else []
    fp = model_fingerprint(model)
    key = _cache_key(fp, dhash, s, harmful, harmless, {b.hook: sae_fingerprint(b.hsae.sae) for b in bound})
    cdir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cdir / f"{key}.json"
    if use_cache and cached.is_file():
        return PreflightResult.from_dict(json.loads(cached.read_text()))
    result = _compute(model, tokenizer, sources, s, harmful, harmless, progress, bound)
    result.model, result.model_fingerprint, result.data_hash = model_name, fp, dhash
    if use_cache:
        cdir.mkdir(parents=True, exist_ok=True)
        from ..textfiles import write_json_atomic

        write_json_atomic(cached, result.to_dict())
    return result


def _entered(reader: Any) -> contextlib.AbstractContextManager:
    return reader if reader is not None else contextlib.nullcontext()


def _compute(model: Any, tok: Any, sources: Sequence[str | Path], s: PreflightSettings, harmful: list[str],
             harmless: list[str], progress: bool, bound: list[Any]) -> PreflightResult:
    import torch

    from ..offline.directions_ablation import post_instruction_tokens
    from ..probe.capture import probe_mode
    from ..probe.generate import is_refusal
    from ..progress import bar
    from .features import FeatureReader, refusal_features

    n_post = post_instruction_tokens(tok)
    with probe_mode(model), torch.no_grad():
        ref = start_reference(model, tok, harmful, harmless, None, batch_size=s.batch_size, max_length=s.max_length)
        scored = list(s.layers) if s.layers is not None else (list(DEFAULT_LAYERS) if DEFAULT_LAYERS else None)
        bad = [i for i in scored or [] if i not in ref.layers]
        if bad:
            raise PreflightError(f"preflight layers {bad}: this model has decoder layers 0..{len(ref.layers) - 1}")
        device = next(model.parameters()).device
        data_fr = own_fr = None
        if bound:
            refusal_features(model, tok, bound, harmful, harmless, top_k=s.refusal_top_k, batch_size=s.batch_size,
                             max_length=s.max_length)
            data_fr = FeatureReader(bound, device)
            own_fr = FeatureReader(bound, device, eos=tok.eos_token_id, embeddings=model.get_input_embeddings())
        own_model, own_feat = None, np.full(len(bound), np.nan)
        if not s.generate:  # calibrate the own-answer prediction on the probe prompts, once
            probe_rows = [np.full(len(harmful) + len(harmless), np.nan) for _ in bound]
            with _entered(own_fr):
                own_p, post_p, _ = own_responses(model, tok, [Example("", p) for p in harmful + harmless], ref,
                                                 n_post=n_post, max_new_tokens=s.max_new_tokens,
                                                 batch_size=s.batch_size, max_length=s.max_length, features=own_fr,
                                                 feature_rows=probe_rows)
            own_model = SC.fit_own_model(post_p, own_p)
            own_feat = np.array([SC.finite_mean(r) for r in probe_rows])
        scores: list[np.ndarray] = []
        layer_sum = np.zeros(len(ref.layers))
        layer_n = np.zeros(len(ref.layers))
        raises, erodes = _Top(s.top), _Top(s.top)
        f_raises, f_erodes, f_scores = _Top(s.top), _Top(s.top), []
        n = data_refusals = own_refusals = own_n = 0
        with bar(desc="preflight", unit="example", enabled=progress) as pbar:
            for chunk in _chunks(iter_examples(sources, tok), s.chunk):
                f_data = [np.full(len(chunk), np.nan) for _ in bound]
                with _entered(data_fr):
                    train, post, _ = read_examples(model, tok, chunk, ref, n_post=n_post, batch_size=s.batch_size,
                                                   max_length=s.max_length, features=data_fr, feature_rows=f_data)
                texts: list[str | None] = [None] * len(chunk)
                chat = np.array([ex.chat for ex in chunk])
                f_own = [np.where(chat, own_feat[i], np.nan) for i in range(len(bound))]
                if s.generate:
                    with _entered(own_fr):
                        own, _, texts = own_responses(model, tok, chunk, ref, n_post=n_post,
                                                      max_new_tokens=s.max_new_tokens, batch_size=s.batch_size,
                                                      max_length=s.max_length, features=own_fr, feature_rows=f_own)
                    own_refusals += sum(is_refusal(t, s.refusal_phrases) for t in texts if t is not None)
                    own_n += sum(t is not None for t in texts)
                else:
                    assert own_model is not None
                    own = own_model.predict(post)
                    own[~np.isfinite(post)] = np.nan
                diff = SC.projection_difference(train, own)
                ok = np.isfinite(diff)
                layer_sum += np.where(ok, diff, 0).sum(0)
                layer_n += ok.sum(0)
                per_ex = SC.layer_mean(diff, scored, ref.layers)
                tr, ow = SC.layer_mean(train, scored, ref.layers), SC.layer_mean(own, scored, ref.layers)
                fd, fo = SC.sae_mean(f_data, len(chunk)), SC.sae_mean(f_own, len(chunk))
                f_per = fd - fo
                for j, ex in enumerate(chunk):
                    data_refusals += is_refusal(ex.response, s.refusal_phrases)
                    payload = ExampleScore(n + j, ex.prompt, ex.response, float(per_ex[j]), float(tr[j]),
                                           float(ow[j]), texts[j], _opt(f_per[j]), _opt(fd[j]), _opt(fo[j]))
                    raises.push(float(per_ex[j]), n + j, payload)
                    erodes.push(-float(per_ex[j]), n + j, payload)
                    if bound:
                        f_raises.push(float(f_per[j]), n + j, payload)
                        f_erodes.push(-float(f_per[j]), n + j, payload)
                scores.append(per_ex)
                f_scores.append(f_per)
                n += len(chunk)
                pbar.update(len(chunk))
    if n == 0:
        raise PreflightDataError(f"{', '.join(map(str, sources))}: no examples found (empty files?)")
    all_scores = np.concatenate(scores)
    pushes: dict[str, list[FeaturePush]] = {}
    if bound:
        assert data_fr is not None and own_fr is not None
        for b, dm, om, n_own in zip(bound, data_fr.mean_codes(), own_fr.mean_codes(), own_fr.tokens):
            refusal = set(b.features.tolist()) if b.features is not None else set()
            pushes[b.hook] = [FeaturePush(i, d, o, p, i in refusal) for i, d, o, p in
                              SC.feature_pushes(dm.numpy(), om.numpy(), s.top)] if n_own else []
    with np.errstate(invalid="ignore"):
        per_layer = {layer: float(layer_sum[i] / layer_n[i]) if layer_n[i] else float("nan")
                     for i, layer in enumerate(ref.layers)}
    return PreflightResult(
        preflight_id=uuid.uuid4().hex[:12], created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        model="", model_fingerprint="", dataset=", ".join(map(str, sources)), data_hash="", n_examples=n,
        mode="generated" if s.generate else "predicted", layers=scored if scored is not None else list(ref.layers),
        score=SC.dataset_score(all_scores), per_layer=per_layer, data_refusal_share=data_refusals / n,
        own_refusal_share=own_refusals / own_n if own_n else None, raises=raises.best_first(),
        erodes=erodes.best_first(), settings=_settings_record(s, bound),
        feature_score=SC.dataset_score(np.concatenate(f_scores)) if bound else None,
        feature_raises=f_raises.best_first(), feature_erodes=f_erodes.best_first(),
        refusal_features={b.hook: b.features.tolist() for b in bound if b.features is not None},
        sae_features=pushes)


def _opt(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def _settings_record(s: PreflightSettings, bound: list[Any]) -> dict[str, Any]:
    """The settings a result records (the refusal phrases left out: long, and the default's)."""
    out = {k: v for k, v in asdict(s).items() if k != "refusal_phrases"}
    if bound:
        out["saes"] = {b.hook: b.hsae.source for b in bound}
    return out

