"""The causal check: do the drifted features *mediate* refusal, or only correlate with it?

    res = verify(model, tokenizer, sae, "model.layers.12", features=[102, 365],
                 harmful=harmful_prompts, harmless=harmless_prompts, base_model=base)
    print(format_result(res))

Conditions, each measured by greedy generation on the harmful and the harmless prompts:

``fine_tuned``     the model as trained (the reference);
``ablated``        the chosen features removed at the hook, SAE error kept (x' = x − Σ f_i d_i);
``random``         the same number of *random* features removed, each matched to a chosen one
                   by firing density (``n_random`` draws): ablating any features of that
                   density might disturb the model; only a gap to this control is evidence;
``base``           the base model (when given);
``steered_base``   the base model with α × (typical activation) × d_i added for each feature;
``direction_ablated``          (``settings.direction_ablation``) the reference: the refusal
                               direction removed at every chosen decoder layer (directions_ablation.py);
``random_direction_ablated``   its control, a random direction per layer removed the same way.

Over several hooks (:func:`verify_sites`) the feature conditions act at every hook together.

Refusal is a configurable list of phrases found in the decoded generation (case-insensitive).
``kl_harmless`` is the mean per-token KL(unmodified ‖ intervened) of next-token distributions
over the harmless prompts: an intervention that "removes refusal" by breaking the model shows
up there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..probe.capture import ActivationCapture, resolve_module
from ..probe.generate import batches as _batches
from ..probe.generate import generate_texts, refusal_share
from ..progress import bar as progress_bar
from ..records import ConditionResult, VerifyResult, VerifySettings, feature_label, pct
from .directions_ablation import ablate_directions, random_directions, refusal_directions, resolve_layers
from .interventions import VerifyError, intervene

log = logging.getLogger(__name__)

@torch.no_grad()
def harmless_kl(model: nn.Module, tok: Any, prompts: Sequence[str], s: VerifySettings,
                intervention: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Mean over prompt tokens of KL(p ‖ p_intervened), next-token distributions, in nats."""
    device = _device(model)
    total, count = 0.0, 0
    for enc in _batches(tok, prompts, s, device):
        logp = torch.log_softmax(model(**enc, use_cache=False).logits.float(), -1)
        with intervention():
            logq = torch.log_softmax(model(**enc, use_cache=False).logits.float(), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # [b, t]
        m = enc["attention_mask"].bool()
        total += float(kl[m].sum())
        count += int(m.sum())
    return total / max(count, 1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def feature_activity(model: nn.Module, tok: Any, sae: Any, hook: str, prompts: Sequence[str],
                     s: VerifySettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(density, typical activation) of every feature over the prompts' tokens (CPU float64).

    Typical activation = mean code where the feature fires (0 where it never does). Streaming
    sums over batches: the [tokens, d_sae] codes never exist for the whole set at once.
    """
    _, module = resolve_module(model, hook)
    device = _device(model)
    d_sae = int(sae.cfg.d_sae)
    count = torch.zeros(d_sae, dtype=torch.float64, device=device)
    total = torch.zeros(d_sae, dtype=torch.float64, device=device)
    n = 0
    with ActivationCapture({hook: module}, early_stop=True) as cap:
        for enc in _batches(tok, prompts, s, device):
            # cap.run calls the closure at once, within this iteration
            acts = cap.run(lambda: model(**enc, use_cache=False))[hook]  # noqa: B023
            x = acts[enc["attention_mask"].bool()].to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
            codes = sae.encode(x).to(device=device, dtype=torch.float64)
            count += (codes > 0).sum(0)
            total += codes.sum(0)
            n += x.shape[0]
    density = (count / max(n, 1)).cpu()
    typical = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).cpu()
    return density, typical


def density_matched(features: Sequence[int], density: torch.Tensor, pool: int, rng: random.Random) -> list[int]:
    """For each chosen feature, a random other feature among the ``pool`` nearest in log density.

    Why log density: firing rates span orders of magnitude; a feature firing on 1% of tokens is
    a fair control for one firing on 1.5%, not for one firing on 0.01%.
    """
    n = density.numel()
    eps = 1.0 / max(n, 1) * 1e-3
    logd = torch.log10(density.double() + eps)
    taken = torch.zeros(n, dtype=torch.bool)
    taken[torch.as_tensor(list(features), dtype=torch.long)] = True
    out: list[int] = []
    for f in features:
        dist = (logd - logd[f]).abs()
        dist[taken] = math.inf
        k = min(pool, int((~taken).sum()))
        if k == 0:
            raise VerifyError("not enough features left for a random control; lower --n-random or check fewer "
                              "features")
        cand = torch.topk(dist, k, largest=False).indices.tolist()
        pick = rng.choice(cand)
        taken[pick] = True
        out.append(pick)
    return out


# ----------------------------------------------------------------------------- the check
@dataclass(frozen=True)
class Site:
    """One hook of a check: its SAE and the features ablated (and steered) there."""

    hook: str
    sae: Any
    features: tuple[int, ...]


def _check_site(site: Site) -> Site:
    feats = tuple(int(f) for f in site.features)
    if not feats:
        raise VerifyError(f"verify needs at least one feature at {site.hook}")
    if len(set(feats)) != len(feats):
        raise VerifyError(f"duplicate feature ids in {list(feats)} at {site.hook}; give each feature once")
    return replace(site, features=feats)


def verify(model: nn.Module, tokenizer: Any, sae: Any, hook: str, features: Sequence[int],
           harmful: Sequence[str], harmless: Sequence[str], *, base_model: nn.Module | None = None,
           base_context: Callable[[], contextlib.AbstractContextManager] | None = None,
           settings: VerifySettings | None = None, progress: bool = True, run_id: str | None = None,
           step: int | None = None) -> VerifyResult:
    """Run every condition at one hook and return the results table (:func:`verify_sites` with one site).

    ``base_model``: the model before fine-tuning, for ``base`` and ``steered_base``. For a PEFT
    model pass ``base_context=model.disable_adapter`` instead: the base is the same module with
    the adapter switched off, so no second copy of the weights is loaded.
    """
    return verify_sites(model, tokenizer, [Site(hook, sae, tuple(features))], harmful, harmless,
                        base_model=base_model, base_context=base_context, settings=settings, progress=progress,
                        run_id=run_id, step=step)


def verify_sites(model: nn.Module, tokenizer: Any, sites: Sequence[Site], harmful: Sequence[str],
                 harmless: Sequence[str], *, base_model: nn.Module | None = None,
                 base_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 settings: VerifySettings | None = None, progress: bool = True, run_id: str | None = None,
                 step: int | None = None) -> VerifyResult:
    """Run every condition over one or several hooks and return the results table.

    Why several at once: refusal is computed across layers, so removing one layer's features
    can leave it intact while the features flagged at every monitored layer, removed together,
    do not. ``ablated`` enters every site's hook in one context (a later site sees the earlier
    sites' edits, as in the model); ``random`` draws, per site, a density-matched set of the same
    size at that site; ``steered_base`` adds every site's steering vector.
    """
    s = settings or VerifySettings()
    sites = _checked_inputs(sites, tokenizer, harmful, harmless)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    for site in sites:
        site.sae.eval()
    has_base = base_model is not None or base_context is not None
    bar = _Bar(2 + s.n_random + (2 if has_base else 0) + (2 if s.direction_ablation else 0), progress)
    layers: list[int] = []
    chosen = [list(site.features) for site in sites]
    try:
        prompts = list(harmful) + list(harmless)
        activity = [feature_activity(model, tokenizer, site.sae, site.hook, prompts, s) for site in sites]
        scales = [_steer_scales(list(site.features), typical, s.alpha) for site, (_, typical) in zip(sites, activity)]
        run = _Conditions(tokenizer, sites, harmful, harmless, s, scales, bar)
        run.measure("fine_tuned", model, None, [])
        run.measure("ablated", model, run.at_sites(model, chosen), chosen)
        rng = random.Random(s.seed)
        for i in range(s.n_random):
            rand = [density_matched(site.features, density, s.random_pool, rng)
                    for site, (density, _) in zip(sites, activity)]
            run.measure("random", model, run.at_sites(model, rand), rand, seed=s.seed + i)
        if has_base:
            bm = base_model if base_model is not None else model
            with (base_context or contextlib.nullcontext)():
                run.measure("base", bm, None, [])
                run.measure("steered_base", bm, run.at_sites(bm, steer=True), chosen, alpha=s.alpha)
        if s.direction_ablation:
            layers = run.direction_conditions(model)
    finally:
        bar.close()
        model.train(was_training)
    label = "+".join(site.hook for site in sites)
    return VerifyResult(label, [i for f in chosen for i in f], run.rows, s, [v for sc in scales for v in sc],
                        run_id=run_id, step=step, duration_s=time.perf_counter() - t0,
                        site_features={site.hook: list(site.features) for site in sites} if len(sites) > 1 else {},
                        direction_layers=layers)


def _checked_inputs(sites: Sequence[Site], tokenizer: Any, harmful: Sequence[str],
                    harmless: Sequence[str]) -> list[Site]:
    """The sites checked (features, hooks once each) and prompts present, before any forward."""
    sites = [_check_site(site) for site in sites]
    if not sites:
        raise VerifyError("verify needs at least one hook with features")
    if len({site.hook for site in sites}) != len(sites):
        raise VerifyError(f"hooks {[site.hook for site in sites]}: give each hook once")
    if not harmful:
        raise VerifyError("no harmful prompts: the refusal rate needs some (check --probes and the category names)")
    if not harmless:
        raise VerifyError("no harmless prompts: the KL and the over-refusal check need some")
    if getattr(tokenizer, "pad_token", None) is None:
        log.warning("tokenizer has no pad token; using eos (%r)", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return sites


@dataclass
class _Conditions:
    """What every condition of one check shares, and the rows measured so far."""

    tokenizer: Any
    sites: list[Site]
    harmful: Sequence[str]
    harmless: Sequence[str]
    s: VerifySettings
    scales: list[list[float]]  # per site, each feature's steering scale
    bar: _Bar
    rows: list[ConditionResult] = field(default_factory=list)

    def measure(self, name: str, m: nn.Module, ctx: Callable[[], contextlib.AbstractContextManager] | None,
                feats: list[list[int]], seed: int | None = None, alpha: float | None = None) -> None:
        """One row: refusal rates on both prompt sets under ``ctx`` and the harmless KL it causes."""
        s, tok = self.s, self.tokenizer
        with (ctx() if ctx else contextlib.nullcontext()):
            harm_txt = generate_texts(m, tok, self.harmful, s)
            safe_txt = generate_texts(m, tok, self.harmless, s)
        kl = harmless_kl(m, tok, self.harmless, s, ctx) if ctx else 0.0
        by_hook = {site.hook: f for site, f in zip(self.sites, feats)} if len(self.sites) > 1 and feats else {}
        self.rows.append(ConditionResult(
            name, [i for f in feats for i in f], _rate(harm_txt, s), _rate(safe_txt, s), kl, len(harm_txt),
            len(safe_txt), seed, alpha, examples=harm_txt[:s.n_examples], by_hook=by_hook))
        self.bar.step(f"{name}: harmful refusal {self.rows[-1].harmful_refusal_rate:.0%}")

    def at_sites(self, m: nn.Module, ablate: list[list[int]] | None = None,
                 steer: bool = False) -> Callable[[], contextlib.AbstractContextManager]:
        """One context entering every site's intervention hook (ablation or steering)."""
        @contextlib.contextmanager
        def ctx() -> Iterator[None]:
            with contextlib.ExitStack() as stack:
                for i, site in enumerate(self.sites):
                    if steer:
                        stack.enter_context(intervene(m, site.hook, site.sae, steer=site.features,
                                                      steer_scales=self.scales[i],
                                                      steer_prompt_only=self.s.steer_prompt_only))
                    else:
                        stack.enter_context(intervene(m, site.hook, site.sae, ablate=ablate[i]))
                yield
        return ctx

    def direction_conditions(self, model: nn.Module) -> list[int]:
        """The reference (the refusal direction removed at every chosen layer) and its random
        control; returns the layers."""
        s = self.s
        layers = resolve_layers(model, s.direction_layers)
        r_hat = refusal_directions(model, self.tokenizer, self.harmful, self.harmless, s, layers)
        rand_dirs = random_directions(len(layers), r_hat.shape[1], s.seed)
        self.measure("direction_ablated", model, lambda: ablate_directions(model, layers, r_hat), [])
        self.measure("random_direction_ablated", model, lambda: ablate_directions(model, layers, rand_dirs), [],
                     seed=s.seed)
        return layers


def _steer_scales(features: list[int], typical: torch.Tensor, alpha: float) -> list[float]:
    """α × each feature's typical activation; a feature that never fired on the probes takes the
    median typical activation of the features that did (a steering vector of length 0 tests nothing)."""
    alive = typical[typical > 0]
    fallback = float(alive.median()) if alive.numel() else 1.0
    return [alpha * (float(typical[f]) if typical[f] > 0 else fallback) for f in features]


def _rate(texts: list[str], s: VerifySettings) -> float:
    return refusal_share(texts, s.refusal_phrases)


class _Bar:
    """A tqdm bar over conditions when asked and stderr is a terminal; a log line per step else."""

    def __init__(self, total: int, enabled: bool):
        self.bar = progress_bar(total=total, desc="verify", unit="condition") if enabled else None

    def step(self, msg: str) -> None:
        log.info("verify: %s", msg)
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- presentation
#: What each condition is, for the reader of the table.
CONDITION_NOTES = {
    "fine_tuned": "the model as trained (reference)",
    "ablated": "the checked features removed",
    "random": "density-matched random features removed (control)",
    "base": "the base model",
    "steered_base": "the base + the checked features' decoder rows",
    "direction_ablated": "refusal direction removed at every chosen layer (reference)",
    "random_direction_ablated": "a random direction per layer removed (control)",
}


def _layers_text(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ",".join(map(str, layers))


def format_result(res: VerifyResult) -> str:
    """The results table and the judged figures, as text.

    The verdict judges the *features* (``ablated`` against ``random``, and steering); the
    direction conditions are a reference for what removing refusal across layers achieves.
    """
    where = (" + ".join(f"{h} {f}" for h, f in res.site_features.items()) if res.site_features
             else f"{res.hook}, features {res.features}")
    lines = [f"causal check at {where}" + (f" (run {res.run_id}, step {res.step})" if res.run_id else ""),
             f"steering: alpha {res.settings.alpha:g} x typical activation = "
             + ", ".join(f"{v:.3g}" for v in res.steer_scales), "",
             f"{'condition':<24} {'harmful refusal':>15} {'harmless refusal':>16} {'KL harmless':>11}  features"]
    for c in res.conditions:
        feats = feature_label(c)
        feats = feats if len(feats) <= 60 else feats[:57] + "..."
        if c.condition.startswith(("direction", "random_direction")):
            feats = _layers_text(res.direction_layers)
        lines.append(f"{c.condition:<24} {c.harmful_refusal_rate:>15.1%} {c.harmless_refusal_rate:>16.1%} "
                     f"{c.kl_harmless:>11.4f}  {feats or '-'}")
    names = list(dict.fromkeys(c.condition for c in res.conditions))
    lines += [""] + [f"  {n}: {CONDITION_NOTES[n]}" for n in names if n in CONDITION_NOTES]
    lines += ["", f"feature ablation ('ablated') lowers harmful refusal by {pct(res.ablation_relative_drop)} "
                  f"(relative); the random-feature control by {pct(res.random_relative_drop)}"]
    if res.rows("direction_ablated"):
        lines.append(f"reference: the refusal direction removed at {_layers_text(res.direction_layers)} lowers it "
                     f"by {pct(res.direction_relative_drop)}; a random direction per layer by "
                     f"{pct(res.random_direction_relative_drop)}")
    if res.rows("steered_base"):
        lines.append(f"steering the base: refusal {res.rate('base'):.1%} -> {res.rate('steered_base'):.1%}")
    lines.append(f"verdict (on the features): {res.verdict()}  ({res.duration_s:.0f} s)")
    return "\n".join(lines)


def result_json(res: VerifyResult) -> dict[str, Any]:
    d = asdict(res)
    d["settings"]["refusal_phrases"] = list(res.settings.refusal_phrases)
    d.update(rates=res.rates(), ablation_relative_drop=res.ablation_relative_drop,
             random_relative_drop=res.random_relative_drop, steering_gain=res.steering_gain, verdict=res.verdict(),
             direction_relative_drop=res.direction_relative_drop,
             random_direction_relative_drop=res.random_direction_relative_drop)
    return json.loads(json.dumps(d, default=float))
