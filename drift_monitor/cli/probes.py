"""``drift-monitor probes``: validate a probe file and count its records per category."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    pr = subparsers.add_parser(
        "probes", help="validate a probe file and count its records per category",
        description="Check a JSONL probe file (one {id, category, prompt, response?} object per line; "
                    "'all' is a reserved category) and print its probes per category. Errors name the file "
                    "and line.")
    pr.add_argument("file", nargs="?", default="default", help="a JSONL probe file, or 'default'")
    return pr


def run(args: argparse.Namespace) -> int:
    from ..probe.probes import ProbeSet

    ps = ProbeSet.resolve(args.file)
    counts: dict[str, int] = {}
    for r in ps.records:
        counts[r.category] = counts.get(r.category, 0) + 1
    with_resp = sum(r.response is not None for r in ps.records)
    print(f"{ps.name}: {len(ps)} probes, {with_resp} with a response")
    for c, n in counts.items():
        print(f"  {c:<12} {n}")
    return 0
