"""``drift-monitor scan``: saved checkpoints measured against their base, as the callback would have."""

from __future__ import annotations

import argparse
import sys

from .common import parse_directions, parse_saes


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..settings import FORMATS, ProbeSettings  # torch-free

    sc = subparsers.add_parser(
        "scan", help="scan saved checkpoints (full models or PEFT adapters) against a base model",
        description="Measure saved checkpoints (full models or PEFT adapters) against the base model through "
                    "its SAE, as the training callback would have, and store snapshots and alerts in --db. "
                    "Resumable: steps already stored are skipped unless --force.")
    sc.add_argument("--base-model", required=True, help="the base model folder (step 0; adapters load onto it)")
    sc.add_argument("--sae", action="append", default=[], metavar="HOOK=SOURCE",
                    help="an SAE per hook: a local sae-lens folder or release:sae_id (repeatable; default: "
                         "the --config's, or the stored run's when scanning into an existing run)")
    sc.add_argument("--config", default=None, metavar="FILE",
                    help="monitor settings (YAML/JSON with MonitorConfig's sections: probes, metrics, cadence, "
                         "outputs; e.g. 'probes: {positions: response}'); flags given here override it")
    sc.add_argument("--model-format", default=None, choices=FORMATS,
                    help="how every probe is formatted for the checkpoints (default: the config's; chat for "
                         "requests, plain for general text)")
    sc.add_argument("--base-format", default=None, choices=FORMATS,
                    help="format the base model's probes differently (the paper's setting: --base-format plain "
                         "--model-format chat); tokens pair by the response's content")
    sc.add_argument("--direction", action="append", default=[], metavar="HOOK=PATH",
                    help="direction vectors to monitor at an SAE hook: .safetensors, .pt, .npy or .json (repeatable)")
    sc.add_argument("--checkpoints", action="append", default=[], metavar="DIR|GLOB",
                    help="a Trainer output folder (checkpoint-N inside), a checkpoint, or a glob (repeatable)")
    sc.add_argument("--model", action="append", default=[], metavar="STEP=PATH",
                    help="an explicit checkpoint, e.g. --model 1000=path/to/chat (repeatable)")
    sc.add_argument("--db", required=True, help="the DuckDB file to write (created if missing), or a store "
                                                 "directory: the run then writes DIR/<run>.duckdb")
    sc.add_argument("--probes", default=None, help="a JSONL probe file, or 'default' (default: the config's)")
    sc.add_argument("--run-name", default=None, help="the run's name and id (default: derived from the inputs)")
    sc.add_argument("--pushgateway", default=None, metavar="URL",
                    help="push aggregates to this Pushgateway (its group is deleted at the end)")
    sc.add_argument("--keep-pushed", action="store_true", help="keep the run's Pushgateway group after the scan")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    sc.add_argument("--batch-size", type=int, default=None, help="probes per forward (default: the config's, "
                                                                     f"{ProbeSettings.batch_size})")
    sc.add_argument("--force", action="store_true", help="re-scan steps already in the DB")
    sc.add_argument("--shard", default=None, metavar="K/N",
                    help="scan every N-th checkpoint from the K-th into DIR/<run>.shard-K-of-N.duckdb (--db a "
                         "directory); N shards read as one run. Default under torchrun: RANK+1/WORLD_SIZE")
    sc.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint folders")
    sc.add_argument("--no-progress", action="store_true")
    return sc


def run(args: argparse.Namespace) -> int:
    from ..offline.scan import format_summary, resolve_config, scan

    flags = {"saes": parse_saes(args.sae) or None, "directions": parse_directions(args.direction) or None,
             "formats": args.model_format, "base_formats": args.base_format, "probes": args.probes,
             "batch_size": args.batch_size, "pushgateway_url": args.pushgateway, "device": args.device,
             "keep_pushed": True if args.keep_pushed else None,
             "show_progress": False if args.no_progress else None}
    cfg = resolve_config(args.base_model, db_path=args.db, run_name=args.run_name, checkpoints=args.checkpoints,
                         models=args.model, config=args.config,
                         overrides={k: v for k, v in flags.items() if v is not None})
    result = scan(args.base_model, cfg, checkpoints=args.checkpoints, models=args.model, dtype=args.dtype,
                  force=args.force, trust_remote_code=args.trust_remote_code, shard=args.shard)
    print(format_summary(result, result.hooks))
    for r in result.failed:
        print(f"drift-monitor: checkpoint {r.checkpoint.path} (step {r.checkpoint.step}) failed: {r.error}",
              file=sys.stderr)
    for path in result.unsaved:
        from ..store.writer import replay_command

        print(f"drift-monitor: writes the store could not take are in {path}; load them with: "
              f"{replay_command(args.db, path)}", file=sys.stderr)
    return 1 if result.failed or result.unsaved else 0
