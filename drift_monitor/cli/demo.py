"""``drift-monitor demo``: the refusal model organism, built, fine-tuned monitored and summarised."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    dm = subparsers.add_parser(
        "demo", help="the refusal model organism: build it (cached), fine-tune it monitored, "
                     "scan a control run, summarise",
        description="Build the refusal model organism (cached), fine-tune it with the monitor on, scan a "
                    "control run, and summarise what was detected; everything lands in --out.")
    dm.add_argument("--out", default="runs/demo", help="output folder (drift.duckdb, checkpoints, summary.json)")
    dm.add_argument("--quick", action="store_true", help="the small CI size (about a minute on 2 cores)")
    dm.add_argument("--prometheus-port", type=int, default=-1, help="serve /metrics on this port (-1: off)")
    return dm


def run(args: argparse.Namespace) -> int:
    from ..demo.organism import format_demo, run_demo

    port = None if args.prometheus_port < 0 else args.prometheus_port
    summary = run_demo(args.out, "quick" if args.quick else "full", prometheus_port=port)
    print(format_demo(summary))
    return 0
