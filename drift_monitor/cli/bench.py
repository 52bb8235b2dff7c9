"""``drift-monitor bench``: time the probe pass and the store against their lower bounds."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench", help="benchmark the probe pass and the store against their lower bounds",
        description="Time the probe pass (forward + SAE encode + statistics) and a store write on a built-in "
                    "tiny or mid-size model, and compare them with their lower bounds (a bare forward and "
                    "encode; a bare DuckDB insert). Nothing is downloaded.")
    b.add_argument("--size", choices=["tiny", "mid", "both"], default="tiny",
                   help="tiny: 4-layer 64-wide Llama, 1k features; mid: 8-layer 1024-wide Llama, 16k features")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    b.add_argument("--repeats", type=int, default=3, help="best of N, measured round-robin")
    b.add_argument("--prompts", type=int, default=None, help="override the number of probe prompts")
    b.add_argument("--no-store", action="store_true", help="skip the store write benchmark")
    return b


def run(args: argparse.Namespace) -> int:
    from ..demo import bench

    sizes = ["tiny", "mid"] if args.size == "both" else [args.size]
    if args.prompts:
        for s in sizes:
            bench.SIZES[s]["prompts"] = args.prompts
    bench.main(sizes, args.device, args.repeats, store=not args.no_store)
    return 0
