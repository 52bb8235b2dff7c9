"""``drift-monitor verify``: the causal check of drifted features (offline.verify)."""

from __future__ import annotations

import argparse

from .common import model_pair_args, parse_saes, run_args, write_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    # Defaults from their one home (NumPy only: --help stays fast): the check's knobs from
    # VerifySettings, the probe categories from the monitor's MetricSettings.
    from ..records import VerifySettings
    from ..settings import MetricSettings

    alpha = VerifySettings.alpha
    v = subparsers.add_parser(
        "verify", help="causal check: ablate drifted features (vs a random control) and steer "
                       "the base with them; refusal rates, KL on harmless probes",
        description="Causal check of drifted SAE features: ablate them in the fine-tuned model (against a "
                    "density-matched random control) and add them to the base model, then compare refusal "
                    "rates on harmful prompts and the KL on harmless ones. Features come from --features "
                    "or from a run's refusal features in --db; results are stored there too.")
    model_pair_args(v, "for the steering condition; not needed with --adapter")
    v.add_argument("--sae", action="append", default=[], metavar="HOOK=SOURCE",
                   help="an SAE and its hook, repeatable: several hooks are checked together (default: the "
                        "run's SAEs, from --db/--run)")
    v.add_argument("--features", action="append", default=[], metavar="[HOOK:]IDS|top:K|emerging",
                   help="feature ids (12,345; one hook), or from the run's refusal features at --step: every "
                        "emerging one (the default, at every hook) or top:K per hook (emerging first, then by "
                        "refusal score). HOOK:SPEC (repeatable) gives one hook its own spec, e.g. "
                        "--features model.layers.6:12,345 --features model.layers.15:7")
    v.add_argument("--no-direction-ablation", action="store_true",
                   help="skip the reference conditions: the run's refusal direction (and a random one) removed "
                        "at every layer of --direction-layers")
    v.add_argument("--direction-layers", default="all", metavar="all|hooks|0,5,10",
                   help="decoder layers whose output loses the refusal direction: all (Arditi et al.; the "
                        "default), hooks (the checked hooks' layers) or indices")
    v.add_argument("--db", default=None, help="the run's DuckDB file (or a store directory): features come from "
                                              "it, results go to the run's file")
    v.add_argument("--run", default=None, help="a run id or name in --db")
    v.add_argument("--step", type=int, default=None, help="the step whose refusal features are read (default: last)")
    v.add_argument("--probes", default=None, metavar="harmful|FILE",
                   help="a JSONL probe file, or 'harmful' for the default set (default: the run's probes)")
    v.add_argument("--harmful-category", default=MetricSettings.harmful_category)
    v.add_argument("--harmless-category", default=MetricSettings.harmless_category)
    v.add_argument("--alpha", type=float, default=alpha,
                   help=f"steering strength in units of each feature's typical activation (default {alpha:g})")
    v.add_argument("--n-random", type=int, default=VerifySettings.n_random,
                   help="random-control draws (density-matched features)")
    v.add_argument("--max-new-tokens", type=int, default=VerifySettings.max_new_tokens)
    v.add_argument("--batch-size", type=int, default=VerifySettings.batch_size)
    v.add_argument("--seed", type=int, default=VerifySettings.seed)
    v.add_argument("--refusal-phrases", default=None, metavar="FILE|a,b,c",
                   help="phrases that mark a refusal (a file, one per line, or comma-separated)")
    run_args(v, "the results")
    return v


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..offline.verify import format_result, result_json
    from ..offline.verify_run import VerifyOptions, run_verify
    from ..records import DEFAULT_REFUSAL_PHRASES, VerifySettings

    phrases = DEFAULT_REFUSAL_PHRASES
    if args.refusal_phrases:
        path = Path(args.refusal_phrases)
        text = path.read_text() if path.is_file() else args.refusal_phrases.replace(",", "\n")
        phrases = tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))
    settings = VerifySettings(alpha=args.alpha, n_random=args.n_random, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed, refusal_phrases=phrases,
                              direction_ablation=not args.no_direction_ablation)
    options = VerifyOptions(
        args.model, parse_saes(args.sae) if args.sae else None, args.features or ["emerging"], adapter=args.adapter,
        base_model=args.base_model, db=args.db, run=args.run, step=args.step, probes=args.probes,
        harmful_category=args.harmful_category, harmless_category=args.harmless_category,
        direction_layers=args.direction_layers, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code)
    res = run_verify(options, settings, progress=not args.no_progress)
    print(format_result(res))
    if args.db:
        print(f"stored in {args.db} (verify id {res.verify_id}); see the dashboard's Refusal page")
    if args.json:
        write_json(args.json, result_json(res))
    return 0
