"""Export of one run's rows to Parquet or CSV files, for analysis outside drift-monitor.

Why through :class:`~.reader.StoreReader`: the file is opened read-only, one connection for all
tables, so a training run can keep writing between the export's reads and the run is resolved
by id or name exactly as the CLI and dashboard do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from .errors import StoreError
from .preflights import run_preflights
from .reader import StoreReader

#: The tables exported, each restricted to the run's rows (plus, when the run names its training
#: data, the pre-flight results of that data: ``<run>_preflight.<fmt>``, store.preflights).
EXPORT_TABLES = ("runs", "snapshots", "metrics", "feature_stats", "refusal_features", "alerts",
                 "residual_directions", "notifications")


def export_run(path: str | os.PathLike[str], run: str, out_dir: str | os.PathLike[str],
               fmt: Literal["parquet", "csv"] = "parquet") -> list[Path]:
    """Write one run's rows of every table in :data:`EXPORT_TABLES` to ``out_dir/<run>_<table>.<fmt>``.

    ``run`` is a run id or a run name. The file is opened read-only, so a training run can keep
    writing (between its writes).
    """
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"unknown export format {fmt!r}; use parquet or csv")
    reader = StoreReader(path)
    run_id = reader.resolve_run(run)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"--out {out}: cannot create the output folder ({e.strerror or e}); give a folder "
                         "path that can be written") from None

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    written = []
    with reader._connection() as con:
        present = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        for table in (t for t in EXPORT_TABLES if t in present):  # a table of a later migration may be absent
            target = out / f"{safe}_{table}.{fmt}"
            # fixed table names, not user data
            df = con.execute(f"SELECT * FROM {table} WHERE run_id = ?", [run_id]).df()
            if fmt == "parquet":
                df.to_parquet(target, index=False)
            else:
                df.to_csv(target, index=False)
            written.append(target)
    found = run_preflights(reader, _config_json(reader, run_id))
    if found is not None and len(found.rows):  # they belong to the run's data, not the run: no run_id
        target = out / f"{safe}_preflight.{fmt}"
        if fmt == "parquet":
            found.rows.to_parquet(target, index=False)
        else:
            found.rows.to_csv(target, index=False)
        written.append(target)
    return written


def _config_json(reader: StoreReader, run_id: str) -> str | None:
    runs = reader.runs()
    row = runs[runs.run_id == run_id]
    return row["config_json"].iloc[0] if len(row) else None
