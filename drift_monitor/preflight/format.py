"""How a pre-flight result reads as text, in one place: numbers (NaN and missing as '-'), layer
spans, and the terminal table ``drift-monitor preflight`` prints. Torch-free, so the dashboard
formats with the same functions."""

from __future__ import annotations

from collections.abc import Callable

from .result import ExampleScore, FeaturePush, PreflightResult


def num(v: float | None, fmt: str = "+.3f") -> str:
    """A number for a reader; '-' for a missing or NaN one."""
    return "-" if v is None or v != v else format(v, fmt)


def layer_span(layers: list[int]) -> str:
    """Decoder layers as a reader scans them: '0-29' for a run of more than two, else a list."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers)) or "-"


def _clip(text: str | None, n: int = 70) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= n else t[:n - 1] + "…"


def _rows(title: str, items: list[ExampleScore], columns: Callable[[ExampleScore], tuple[str, str, str]],
          own_text: bool = True) -> list[str]:
    """One table of examples: index, the three numbers ``columns`` formats (score, data, own),
    prompt → response, and (``own_text``) the model's own answer under it when it was generated."""
    if not items:
        return []
    out = [title, f"  {'#':>6}  {'score':>7}  {'data':>7}  {'own':>7}  prompt → response"]
    for e in items:
        score, data, own = columns(e)
        out.append(f"  {e.index:>6}  {score:>7}  {data:>7}  {own:>7}  {_clip(e.prompt, 40)} → {_clip(e.response, 50)}")
        if own_text and e.own_text is not None:
            out.append(f"  {'':>6}  {'':>7}  {'':>7}  {'':>7}  (own answer: {_clip(e.own_text, 60)})")
    return out


def _projections(e: ExampleScore) -> tuple[str, str, str]:
    return num(e.score), num(e.response_projection, "+.2f"), num(e.own_projection, "+.2f")


def _features(e: ExampleScore) -> tuple[str, str, str]:
    return num(e.feature_score), num(e.response_features, ".3f"), num(e.own_features, ".3f")


def format_result(res: PreflightResult) -> str:
    """The terminal table: the verdict line, the score per layer, the top examples each way."""
    own = f", the model's own answers {res.own_refusal_share:.0%}" if res.own_refusal_share is not None else ""
    lines = [
        f"pre-flight: {res.dataset} ({res.n_examples} examples) against {res.model or 'the model'}",
        f"  dataset score {num(res.score)} ({res.direction}; refusal-gap units, mean over layers "
        f"{layer_span(res.layers)}; own answers {res.mode})",
        f"  refusal phrases in the data's responses: {res.data_refusal_share:.0%}{own}",
        "  score by layer: " + " ".join(f"{k}:{v:+.2f}" for k, v in sorted(res.per_layer.items())),
    ]
    lines += _rows("examples that raise refusal most:", [e for e in res.raises if e.score > 0], _projections)
    lines += _rows("examples that erode refusal most:", [e for e in res.erodes if e.score < 0], _projections)
    return "\n".join(lines + _feature_lines(res))


def _feature_lines(res: PreflightResult) -> list[str]:
    """With SAEs: the refusal-feature score, the examples that push the start's refusal features
    most each way, and per SAE the features the data's responses push most."""
    if res.feature_score is None and not res.sae_features:
        return []
    k = {h: len(f) for h, f in res.refusal_features.items()}
    lines = [f"  refusal-feature score {num(res.feature_score)} (the start's refusal features per SAE: "
             + ", ".join(f"{h} {n}" for h, n in k.items()) + "; mean code summed over them, data − own answer)"]
    lines += _rows("examples that raise the refusal features most:",
                   [e for e in res.feature_raises if (e.feature_score or 0) > 0], _features, own_text=False)
    lines += _rows("examples that lower the refusal features most:",
                   [e for e in res.feature_erodes if (e.feature_score or 0) < 0], _features, own_text=False)
    for hook, pushes in res.sae_features.items():
        lines.append(f"features the data pushes most at {hook} (* = a refusal feature):")
        lines += _push_rows(pushes) if pushes else ["  none above the model's own answers"]
    return lines


def _push_rows(pushes: list[FeaturePush]) -> list[str]:
    out = [f"  {'feature':>8}  {'push':>8}  {'data':>8}  {'own':>8}"]
    for f in pushes:
        out.append(f"  {f.feature:>7}{'*' if f.refusal else ' '}  {f.push:>+8.4f}  {f.data_mean:>8.4f}  "
                   f"{f.own_mean:>8.4f}")
    return out
