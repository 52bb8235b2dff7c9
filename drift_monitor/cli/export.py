"""``drift-monitor export``: one run's tables as Parquet or CSV, or every run as a Parquet dataset."""

from __future__ import annotations

import argparse

from ..errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    ex = subparsers.add_parser(
        "export", help="export one run's tables as Parquet or CSV, or every run as a Parquet dataset",
        description="With --run: write that run's rows of every table (runs, snapshots, metrics, feature_stats, "
                    "refusal_features, alerts, residual_directions) to --out as Parquet or CSV files, one per "
                    "table. Without --run: every run of --db as a hive-partitioned Parquet dataset, "
                    "OUT/table=<table>/run=<run id>/*.parquet, that DuckDB, pandas or Spark read directly.")
    ex.add_argument("--db", required=True, help="a DuckDB file, a store directory or a glob of files (or, with "
                                                "--run, an exported Parquet dataset)")
    ex.add_argument("--run", default=None, help="a run id or name (omit: every run, as a dataset)")
    ex.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    ex.add_argument("--out", default=".", help="output folder (for a dataset: a new or empty one)")
    return ex


def run(args: argparse.Namespace) -> int:
    from ..store import export_run
    from ..store.dataset import is_dataset
    from ..store.merge import export_dataset

    if args.run is None:
        if is_dataset(args.db):
            raise ConfigError(f"--db {args.db} is a Parquet dataset already: give --run to export one run's tables")
        if args.format != "parquet":
            raise ConfigError("export without --run writes a Parquet dataset of every run: use --format parquet, "
                              "or give --run for one run's CSV files")
        written = export_dataset([args.db], args.out)
    else:
        written = export_run(args.db, args.run, args.out, fmt=args.format)
    for path in written:
        print(path)
    return 0
