"""``drift-monitor preflight``: read training data against the start model before training
(``drift_monitor.preflight``)."""

from __future__ import annotations

import argparse

from .common import parse_saes, run_args, write_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..preflight.settings import PreflightSettings as D  # the defaults' one home

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
    run_args(p, "the result")
    return p


def _layers(spec: str | None) -> tuple[int, ...] | None:
    from ..preflight.settings import PreflightError

    if spec is None:
        return None
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise PreflightError(f"--layers {spec!r}: give decoder layer numbers separated by commas, e.g. 10,16,22") \
            from None


def run(args: argparse.Namespace) -> int:
    from ..offline.loading import load_pair
    from ..preflight.format import format_result
    from ..preflight.run import preflight
    from ..preflight.settings import PreflightSettings

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
        write_json(args.json, res.to_dict())
    return 0
