"""``drift-monitor merge``: the runs of several stores copied into one."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    mg = subparsers.add_parser(
        "merge", help="copy the runs of several stores into one file, or into a store directory",
        description="Copy every run of the SOURCE stores (files, store directories or globs) into --into: a "
                    "new DuckDB file, or a directory (one file per run). Run ids two sources share stay apart "
                    "(<file stem>/<id>), as every reader shows them.")
    mg.add_argument("sources", nargs="+", metavar="SOURCE", help="a DuckDB file, a store directory or a glob")
    mg.add_argument("--into", required=True, metavar="FILE|DIR/", help="a new DuckDB file, or a directory")
    return mg


def run(args: argparse.Namespace) -> int:
    from ..store.merge import merge

    runs = merge(args.sources, args.into)
    print(f"{args.into}: {len(runs)} runs merged ({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''})")
    return 0
