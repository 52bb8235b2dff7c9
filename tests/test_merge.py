"""`drift-monitor merge` and the hive-partitioned dataset export: a round trip is equal.

Two store files (one with two runs, one sharing a run id with the first) are merged into one
file and into a directory; the Parquet dataset exported from the merge equals the one exported
from the sources, table by table, and both equal what a reader of the sources shows.
"""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest
from store_fixtures import make_snapshot

from drift_monitor.cli import main
from drift_monitor.records import Alert
from drift_monitor.store import Store, StoreReader
from drift_monitor.store.merge import RUN_TABLES


@pytest.fixture
def sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for fname, runs in (("a", ("r1", "r2")), ("b", ("r1",))):
        for i, rid in enumerate(runs):
            s = Store(src / f"{fname}.duckdb", run_id=rid)
            s.start_run(name=f"{fname}-{rid}")
            for step in (0, 10):
                alerts = [Alert(rule="ev_drop", severity="warning", step=step, hook="model.layers.4",
                                message="m", value=0.5, threshold=0.1)] if step else []
                s.write(make_snapshot(step, d_sae=64, seed=i + step + len(fname)), alerts)
            s.close()
    return src


def _dataset(path) -> dict[str, pd.DataFrame]:
    con = duckdb.connect()
    out = {}
    for table in RUN_TABLES:
        files = list((path / f"table={table}").glob("run=*/*.parquet"))
        if files:
            df = con.execute(f"SELECT * FROM read_parquet('{path}/table={table}/*/*.parquet', "
                             "hive_partitioning = true)").df()
            out[table] = df.sort_values(list(df.columns[:4])).reset_index(drop=True)
    return out


def test_merge_and_export_round_trip_is_equal(sources, tmp_path, capsys):
    merged = tmp_path / "merged.duckdb"
    assert main(["merge", str(sources), "--into", str(merged)]) == 0
    assert "3 runs merged" in capsys.readouterr().out
    before, after = StoreReader(sources), StoreReader(merged)
    assert sorted(before.runs().run_id) == sorted(after.runs().run_id) == ["b/r1", "r1", "r2"]
    for rid in ("r1", "b/r1", "r2"):
        pd.testing.assert_frame_equal(before.metric_series(rid), after.metric_series(rid))
        assert before.steps(rid) == after.steps(rid) == [0, 10]
        assert len(before.alerts(run_id=rid)) == len(after.alerts(run_id=rid)) == 1

    assert main(["export", "--db", str(sources), "--out", str(tmp_path / "ds_src")]) == 0
    assert main(["export", "--db", str(merged), "--out", str(tmp_path / "ds_merged")]) == 0
    a, b = _dataset(tmp_path / "ds_src"), _dataset(tmp_path / "ds_merged")
    assert set(a) == set(b) >= {"runs", "snapshots", "metrics", "feature_stats", "alerts"}
    for table in a:
        cols = [c for c in a[table].columns if c not in ("created_at", "updated_at")]
        pd.testing.assert_frame_equal(a[table][cols], b[table][cols], check_dtype=False, obj=table)
    assert sorted(a["runs"]["run"]) == ["b/r1", "r1", "r2"]  # the hive partition column


def test_merge_into_a_directory_gives_a_file_per_run(sources, tmp_path):
    out = tmp_path / "per-run/"
    assert main(["merge", str(sources / "*.duckdb"), "--into", str(out) + "/"]) == 0
    assert sorted(p.name for p in out.glob("*.duckdb")) == ["b_r1.duckdb", "r1.duckdb", "r2.duckdb"]
    assert sorted(StoreReader(out).runs().run_id) == ["b/r1", "r1", "r2"]


def test_merge_and_dataset_refuse_to_overwrite(sources, tmp_path, capsys):
    merged = tmp_path / "m.duckdb"
    assert main(["merge", str(sources), "--into", str(merged)]) == 0
    capsys.readouterr()
    assert main(["merge", str(sources), "--into", str(merged)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["export", "--db", str(sources), "--format", "csv"]) == 2
    assert "--format parquet" in capsys.readouterr().err
