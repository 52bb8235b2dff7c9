"""``drift-monitor diff-dict``: a small dictionary of what a fine-tune changed at a hook."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import model_pair_args, run_args, write_json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..settings import ProbeSettings  # torch-free: the defaults from their one home

    dd = subparsers.add_parser(
        "diff-dict", help="a small dictionary of what a fine-tune changed at a hook (real difference vectors)",
        description="Pair the fine-tuned and the base model's activations token by token on the probes, and "
                    "pick, ITDA-style, the few real difference vectors that explain most of the change; each "
                    "atom is read by its probes, its source token and the logit lens.")
    model_pair_args(dd, "not needed with --adapter")
    dd.add_argument("--hook", required=True, help="the module whose output is compared, e.g. model.layers.12")
    dd.add_argument("--probes", default=ProbeSettings.source, help="a JSONL probe file, or 'default'")
    dd.add_argument("--atoms", type=int, default=8, help="most atoms to pick (fewer when the change is explained)")
    dd.add_argument("--batch-size", type=int, default=ProbeSettings.batch_size)
    run_args(dd, "the atoms")
    return dd


def run(args: argparse.Namespace) -> int:
    from ..offline.diffdict import diff_dict, format_diff_dict
    from ..offline.loading import load_pair
    from ..probe.probes import ProbeSet
    from ..settings import ProbeSettings

    if not args.adapter and not args.base_model:
        raise ConfigError("diff-dict compares two models: give --adapter (its base is --model with the adapter "
                          "off) or --base-model")
    if args.atoms < 1:
        raise ConfigError(f"--atoms must be at least 1, got {args.atoms}")
    tok, model, base, base_ctx = load_pair(args.model, adapter=args.adapter, base_model=args.base_model,
                                           device=args.device, dtype=args.dtype,
                                           trust_remote_code=args.trust_remote_code)
    res = diff_dict(model, base, tok, ProbeSet.resolve(args.probes), args.hook, n_atoms=args.atoms,
                    base_context=base_ctx, settings=ProbeSettings(batch_size=args.batch_size), device=args.device,
                    progress=not args.no_progress)
    print(format_diff_dict(res))
    if args.json:
        write_json(args.json, res.to_dict())
    return 0
