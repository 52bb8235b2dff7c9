"""``drift-monitor runs``: the runs of a store, and the writes and notifications still waiting."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    r = subparsers.add_parser(
        "runs", help="list the runs in a drift-monitor DuckDB file",
        description="List the runs in a drift-monitor DuckDB file: status, model, last step, "
                    "snapshots and active alerts.")
    r.add_argument("--db", required=True, help="a DuckDB file, a store directory, a glob of files, or an exported "
                                               "Parquet dataset (a folder, s3://..., gs://..., https://...)")
    return r


def run(args: argparse.Namespace) -> int:
    from ..store import StoreReader

    reader = StoreReader(args.db)
    df = reader.runs()
    if df.empty:
        print(f"{args.db}: no runs yet")
    else:
        cols = [c for c in ("run_id", "name", "status", "model", "last_step", "n_snapshots", "active_alerts",
                            "pending_writes", "undelivered_notifications", "updated_at") if c in df.columns]
        print(df[cols].to_string(index=False))
        waiting = int(df["undelivered_notifications"].sum())
        if waiting:
            last = reader.notifications(undelivered=True).iloc[0]
            print(f"{waiting} alert notifications are not delivered (last error, {last.target}: {last.last_error}); "
                  "they are retried at the run's next snapshot and at its end")
    for notice in reader.spool_state().notices(args.db):
        print(notice.text)
    return 0
