"""``drift-monitor preflight``: the command line of the pre-flight check (``run.preflight``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .result import ExampleScore, FeaturePush, PreflightResult


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from .settings import PreflightSettings as D  # the defaults' one home

    p = subparsers.add_parser(
        "preflight", help="before training: which way a dataset pushes the start model's refusal, and which examples",
        description="Read a fine-tuning dataset against the start model, before training: each example's response "
                    "on the start model's refusal direction at every layer, minus the model's own answer "
                    "(predicted from its prompt, or generated with --generate). A positive dataset score means "
                    "the data refuses more than the model would (fine-tuning should raise refusal), a negative "
                    "one less (it should erode refusal). Lists the examples that push most each way.")
    p.add_argument("--model", required=True, help="the start model folder (the model you will fine-tune)")
    p.add_argument("--adapter", default=None, help="a PEFT adapter applied to --model first (the start is both)")
    p.add_argument("--data", required=True, action="append", metavar="PATH",
                   help="training data: JSONL (messages, prompt/response or text), text files, a datasets folder; "
                        "repeat for several")
    p.add_argument("--sae", action="append", default=[], metavar="HOOK=DIR",
                   help="an SAE of the start model at HOOK (e.g. model.layers.12=path/to/sae_dir; repeatable): "
                        "also read each response's activity on the start's refusal features, and list the "
                        "features the data pushes most")
    p.add_argument("--refusal-top-k", type=int, default=D.refusal_top_k,
                   help=f"the start's refusal features per SAE (default {D.refusal_top_k}, as the monitor's "
                        "refusal_top_k)")
    p.add_argument("--generate", action="store_true",
                   help="generate the model's own answer to every prompt (one generation per example) instead of "
                        "predicting it from the prompt's post-instruction projection")
    p.add_argument("--layers", default=None,
                   help="decoder layers the score averages over, comma-separated (default: every layer)")
    p.add_argument("--top", type=int, default=D.top, help=f"examples listed each way (default {D.top})")
    p.add_argument("--max-new-tokens", type=int, default=D.max_new_tokens,
                   help=f"tokens generated per answer (default {D.max_new_tokens})")
    p.add_argument("--batch-size", type=int, default=D.batch_size)
    p.add_argument("--config", default=None, help="a monitor config (YAML/JSON): its probe set and categories "
                                                  "define the refusal direction, as in the monitor")
    p.add_argument("--db", default=None, help="also store the result in this drift-monitor DuckDB file "
                                              "(the dashboard shows it next to runs that name the dataset)")
    p.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def _layers(spec: str | None) -> tuple[int, ...] | None:
    from .settings import PreflightError

    if spec is None:
        return None
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise PreflightError(f"--layers {spec!r}: give decoder layer numbers separated by commas, e.g. 10,16,22") \
            from None


def run(args: argparse.Namespace) -> int:
    from ..cli.common import parse_saes
    from ..offline.loading import load_pair
    from .run import preflight
    from .settings import PreflightSettings

    saes = parse_saes(args.sae)
    probes, cats = None, {}
    if args.config:
        from ..config import MonitorConfig

        cfg = MonitorConfig.from_file(args.config)
        probes = cfg.probes.source
        cats = {"harmful_category": cfg.metrics.harmful_category, "harmless_category": cfg.metrics.harmless_category}
    settings = PreflightSettings(layers=_layers(args.layers), generate=args.generate, top=args.top,
                                 max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 refusal_top_k=args.refusal_top_k, **cats)
    tok, model, _, _ = load_pair(args.model, adapter=args.adapter, device=args.device, dtype=args.dtype,
                                 trust_remote_code=args.trust_remote_code)
    name = args.model if not args.adapter else f"{args.model} + {args.adapter}"
    res = preflight(model, tok, args.data, settings=settings, probes=probes, model_name=name, saes=saes,
                    use_cache=not args.no_cache, progress=not args.no_progress)
    print(format_result(res))
    if args.db:
        from ..store import Store

        Store(args.db).write_preflight(res)
        print(f"stored in {args.db} (preflight id {res.preflight_id}); name the dataset in a run's "
              "outputs.train_data to see it next to the run on the dashboard")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(res.to_dict(), indent=2))
        except OSError as e:
            from ..config import ConfigError

            raise ConfigError(f"--json {args.json}: cannot write it ({e.strerror or e}); give a writable file path") \
                from None
    return 0


def _clip(text: str | None, n: int = 70) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= n else t[:n - 1] + "…"


def _rows(title: str, items: list[ExampleScore]) -> list[str]:
    if not items:
        return []
    out = [title, f"  {'#':>6}  {'score':>7}  {'data':>7}  {'own':>7}  prompt → response"]
    for e in items:
        out.append(f"  {e.index:>6}  {e.score:>+7.3f}  {e.response_projection:>+7.2f}  {e.own_projection:>+7.2f}  "
                   f"{_clip(e.prompt, 40)} → {_clip(e.response, 50)}")
        if e.own_text is not None:
            out.append(f"  {'':>6}  {'':>7}  {'':>7}  {'':>7}  (own answer: {_clip(e.own_text, 60)})")
    return out


def format_result(res: PreflightResult) -> str:
    """The terminal table: the verdict line, the score per layer, the top examples each way."""
    own = f", the model's own answers {res.own_refusal_share:.0%}" if res.own_refusal_share is not None else ""
    lines = [
        f"pre-flight: {res.dataset} ({res.n_examples} examples) against {res.model or 'the model'}",
        f"  dataset score {res.score:+.3f} ({res.direction}; refusal-gap units, mean over layers "
        f"{_span(res.layers)}; own answers {res.mode})",
        f"  refusal phrases in the data's responses: {res.data_refusal_share:.0%}{own}",
        "  score by layer: " + " ".join(f"{k}:{v:+.2f}" for k, v in sorted(res.per_layer.items())),
    ]
    lines += _rows("examples that raise refusal most:", [e for e in res.raises if e.score > 0])
    lines += _rows("examples that erode refusal most:", [e for e in res.erodes if e.score < 0])
    return "\n".join(lines + _feature_lines(res))


def _feature_lines(res: PreflightResult) -> list[str]:
    """With SAEs: the refusal-feature score, the examples that push the start's refusal features
    most each way, and per SAE the features the data's responses push most."""
    if res.feature_score is None and not res.sae_features:
        return []
    k = {h: len(f) for h, f in res.refusal_features.items()}
    lines = [f"  refusal-feature score {_num(res.feature_score)} (the start's refusal features per SAE: "
             + ", ".join(f"{h} {n}" for h, n in k.items()) + "; mean code summed over them, data − own answer)"]
    lines += _feature_rows("examples that raise the refusal features most:",
                           [e for e in res.feature_raises if (e.feature_score or 0) > 0])
    lines += _feature_rows("examples that lower the refusal features most:",
                           [e for e in res.feature_erodes if (e.feature_score or 0) < 0])
    for hook, pushes in res.sae_features.items():
        lines.append(f"features the data pushes most at {hook} (* = a refusal feature):")
        lines += _push_rows(pushes) if pushes else ["  none above the model's own answers"]
    return lines


def _num(v: float | None, fmt: str = "+.3f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def _feature_rows(title: str, items: list[ExampleScore]) -> list[str]:
    if not items:
        return []
    out = [title, f"  {'#':>6}  {'score':>7}  {'data':>7}  {'own':>7}  prompt → response"]
    for e in items:
        out.append(f"  {e.index:>6}  {_num(e.feature_score):>7}  {_num(e.response_features, '.3f'):>7}  "
                   f"{_num(e.own_features, '.3f'):>7}  {_clip(e.prompt, 40)} → {_clip(e.response, 50)}")
    return out


def _push_rows(pushes: list[FeaturePush]) -> list[str]:
    out = [f"  {'feature':>8}  {'push':>8}  {'data':>8}  {'own':>8}"]
    for f in pushes:
        out.append(f"  {f.feature:>7}{'*' if f.refusal else ' '}  {f.push:>+8.4f}  {f.data_mean:>8.4f}  "
                   f"{f.own_mean:>8.4f}")
    return out


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))
