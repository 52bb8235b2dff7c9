"""Directional ablation across decoder layers: the reference condition of the causal check.

Why it is there: ablating the flagged SAE features at one layer may leave refusal untouched
while the refusal computation runs through many layers (on the SmolLM2 test bed, ablating any
one layer's features or refusal direction left harmful refusal at 76-83%). Arditi et al. remove
the refusal direction at *every* layer and refusal falls to near zero. Running that removal
next to the feature ablation says what a complete intervention achieves on this model, so a
feature ablation that fails can be read against it (and a direction ablation that fails says
the refusal does not live on one direction per layer here).

* The refusal direction of layer L is ``r_L = mean(harmful) − mean(harmless)`` of layer L's
  output at the post-instruction tokens (the end of the user's words through the assistant
  header: where the model decides whether to refuse), measured on the fine-tuned model in one
  forward with hooks on every decoder layer (not ``output_hidden_states``: in transformers its
  last entry has the final norm applied, which is not the last layer's output).
* Ablation removes it at layer L's output: ``x ← x − (x·r̂_L) r̂_L``, at every position, prompt
  and generated tokens alike.
* The control removes a random unit direction per layer (seeded) the same way: a rank-1
  projection per layer disturbs the residual a little whatever the direction.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..probe.capture import ActivationCapture, HookNotFoundError, normalize_name, replace_output, resolve_module
from ..probe.capture import decoder_layers as layer_names
from ..probe.generate import batches as _batches
from ..records import VerifySettings
from .interventions import VerifyError

_SENTINEL = "\x1fDRIFTMONITOR\x1f"


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers in order (``probe.capture.decoder_layers``: the longest numbered stack,
    found through PEFT/DDP/FSDP wrappers by their normalised names)."""
    try:
        names = layer_names(model)
    except HookNotFoundError:
        raise VerifyError(f"no decoder layers (modules named layers.N) in {type(model).__name__}: the direction "
                          "ablation needs them; switch it off with --no-direction-ablation") from None
    modules = {normalize_name(n): m for n, m in model.named_modules() if n}
    return [modules[n] for n in names]


def hook_layer(model: nn.Module, hook: str) -> int:
    """The decoder layer index a hook names (``model.layers.15`` -> 15), for ``--direction-layers hooks``."""
    name, mod = resolve_module(model, hook)
    for i, layer in enumerate(decoder_layers(model)):
        if layer is mod:
            return i
    raise VerifyError(f"hook {hook!r} ({name}) is not a decoder layer's output; give --direction-layers as "
                      "layer indices")


def resolve_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """``None`` -> every decoder layer (Arditi's setting); else the given indices, checked."""
    n = len(decoder_layers(model))
    if layers is None:
        return list(range(n))
    out = sorted({int(i) for i in layers})
    bad = [i for i in out if not 0 <= i < n]
    if bad or not out:
        raise VerifyError(f"direction layers {bad or 'none'}: this model has decoder layers 0..{n - 1}")
    return out


def post_instruction_tokens(tok: Any) -> int:
    """How many tokens end every formatted prompt after the user's words: the chat template's
    text after the message (``<|im_end|>\\n<|im_start|>assistant\\n``), tokenised alone. The same
    positions as ProbeBatch.post (``prompt_end``) for templates that end the user turn with a special
    token, without tokenising every probe with offsets; without a template, the last
    ``PLAIN_PROMPT_END_TOKENS``, as ``prompt_end`` reads plain text.

    Why not ProbeBatch.post itself: those masks belong to the monitor's preparation (its formats,
    ``ProbeSettings.max_length``, length-sorted batches); the directions are read on the check's
    own prompt batches (``probe.generate.batches``, ``VerifySettings``), and their means would move."""
    from ..probe.probes import PLAIN_PROMPT_END_TOKENS, chat_prompt

    if not getattr(tok, "chat_template", None):
        return PLAIN_PROMPT_END_TOKENS
    text = chat_prompt(tok, _SENTINEL)
    at = text.rfind(_SENTINEL)
    suffix = text[at + len(_SENTINEL):] if at >= 0 else ""
    return max(1, len(tok(suffix, add_special_tokens=False)["input_ids"]))


def post_mask(attention_mask: torch.Tensor, n_post: int) -> torch.Tensor:
    """[B, T] True at each sequence's last ``n_post`` real tokens, whichever side it is padded on."""
    m = attention_mask.long()
    from_end = m.flip(-1).cumsum(-1).flip(-1)  # real tokens at or after each position
    return m.bool() & (from_end <= n_post)


@torch.no_grad()
def _post_means(model: nn.Module, tok: Any, prompts: Sequence[str], s: VerifySettings, layers: list[nn.Module],
                n_post: int) -> torch.Tensor:
    """[L, d] float64 mean of each layer's output over the prompts' post-instruction tokens."""
    device = next(model.parameters()).device
    total: torch.Tensor | None = None
    count = 0
    with ActivationCapture({str(i): m for i, m in enumerate(layers)}, early_stop=True) as cap:
        for enc in _batches(tok, prompts, s, device):
            acts = cap.run(lambda: model(**enc, use_cache=False))  # noqa: B023 (runs at once)
            post = post_mask(enc["attention_mask"], n_post)
            h = torch.stack([acts[str(i)] for i in range(len(layers))])  # [L, B, T, d]
            sums = h[:, post].double().sum(1)  # [L, d]
            total = sums if total is None else total + sums
            count += int(post.sum())
    assert total is not None
    return total / max(count, 1)


def refusal_vectors(model: nn.Module, tok: Any, harmful: Sequence[str], harmless: Sequence[str],
                    s: VerifySettings, layers: Sequence[int]) -> torch.Tensor:
    """[len(layers), d] refusal vectors r_L = mean(harmful) − mean(harmless) (float64), unnormalised:
    their length is the start's harmful/harmless gap, the unit that ``preflight`` reads in."""
    stack = decoder_layers(model)
    chosen = [stack[i] for i in layers]
    n_post = post_instruction_tokens(tok)
    return _post_means(model, tok, harmful, s, chosen, n_post) - _post_means(model, tok, harmless, s, chosen, n_post)


def refusal_directions(model: nn.Module, tok: Any, harmful: Sequence[str], harmless: Sequence[str],
                       s: VerifySettings, layers: Sequence[int]) -> torch.Tensor:
    """[len(layers), d] unit refusal directions r̂_L (float64, CPU), one per chosen layer."""
    r = refusal_vectors(model, tok, harmful, harmless, s, layers)
    norm = r.norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise VerifyError("the harmful and harmless prompts have the same mean activation at some layer: "
                          "no refusal direction to remove")
    return (r / norm).cpu()


def random_directions(n_layers: int, d: int, seed: int) -> torch.Tensor:
    """[n_layers, d] random unit directions (float64), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    r = torch.randn(n_layers, d, generator=g, dtype=torch.float64)
    return r / r.norm(dim=-1, keepdim=True)


@contextlib.contextmanager
def ablate_directions(model: nn.Module, layers: Sequence[int], directions: torch.Tensor) -> Iterator[None]:
    """Within the block, layer ``layers[i]``'s output loses its component on ``directions[i]``
    (unit vectors): ``x ← x − (x·r̂) r̂`` at every position. Hooks are removed on exit, also on error."""
    stack = decoder_layers(model)
    if len(layers) != directions.shape[0]:
        raise ValueError(f"{len(layers)} layers but {directions.shape[0]} directions")
    handles = []

    def make(r: torch.Tensor):
        cache: dict[tuple, torch.Tensor] = {}

        def edit(x: torch.Tensor) -> torch.Tensor:
            key = (x.device, x.dtype)
            if key not in cache:
                cache[key] = r.to(device=x.device, dtype=x.dtype)
            u = cache[key]
            return x - (x @ u)[..., None] * u

        return lambda _m, _i, out: replace_output(out, edit)

    try:
        for i, r in zip(layers, directions):
            handles.append(stack[i].register_forward_hook(make(r)))
        yield
    finally:
        for h in handles:
            h.remove()
