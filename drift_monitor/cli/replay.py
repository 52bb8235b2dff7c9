"""``drift-monitor replay``: load writes a run could not store into its database."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    rp = subparsers.add_parser(
        "replay", help="load writes a run could not store (a dump file, or the spool) into its DB",
        description="Load the writes a run could not store — the .unsaved.zip file its log names, "
                    "or the DB's spool — into the DuckDB file, each exactly once. Exit 0 when "
                    "nothing waits any more, 1 when writes still wait.")
    rp.add_argument("dump", nargs="?", help="the .unsaved.zip file the run's log names (omit: apply the spool)")
    rp.add_argument("--db", required=True, help="the DuckDB file to load into")
    rp.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a busy database")
    return rp


def run(args: argparse.Namespace) -> int:
    from ..store.replay import replay

    r = replay(args.db, args.dump, timeout_s=args.timeout)
    print(r.summary(args.db))
    return 0 if r.waiting == 0 else 1
