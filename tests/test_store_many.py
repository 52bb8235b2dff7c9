"""Many store files read as one, fast: routing to the files of a run, the per-file facts kept
between calls (store.routing), and the shard files of a sharded scan read as one run.

Every store here is written by the real writer (:class:`Store`); the reference for "the same
answer" is a single file holding the same rows (:func:`merge`), read by the same reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from store_fixtures import HOOK, make_snapshot

from drift_monitor.records import Alert
from drift_monitor.store import Store, StoreReader
from drift_monitor.store.errors import StoreLocked
from drift_monitor.store.many import locate, run_file
from drift_monitor.store.merge import merge

OLD_NS = time.time_ns() - 3600 * 10**9  # an hour ago: a finished run's file, not one just written


def _write(db: Path, run_id: str, steps=(0, 10), name: str | None = None, seed: int = 0, status: str | None = None,
           alert_steps=(), labels: dict[int, str] | None = None) -> None:
    """Snapshots of ``run_id`` at ``steps`` into ``db`` (an alert at each of ``alert_steps``)."""
    s = Store(db, run_id=run_id)
    s.start_run(name=name or run_id, model="tiny")
    for i, step in enumerate(steps):
        alerts = [Alert(rule="ev_drop", severity="warning", step=step, hook=HOOK, message="m", value=0.5,
                        threshold=0.1)] if step in alert_steps else []
        s.write(make_snapshot(step, d_sae=64, seed=seed + i), alerts)
    if labels:
        s.import_labels(HOOK, labels, source="test")
    if status:
        s.finish_run(status)
    s.close()


def _age(directory: Path) -> None:
    """Date every store file an hour back, as a finished run's file is."""
    for f in directory.glob("*.duckdb"):
        os.utime(f, ns=(OLD_NS, OLD_NS))


def _every_query(r: StoreReader, rid: str) -> dict[str, object]:
    """What each run-scoped reader method returns for ``rid`` (and the labels)."""
    return {
        "hooks": r.hooks(rid), "steps": r.steps(rid, HOOK), "snapshots": r.snapshots(rid).drop(columns="created_at"),
        "series": r.metric_series(rid), "series_hook": r.metric_series(rid, hook=HOOK, names=["explained_variance"]),
        "table": r.feature_table(rid, 10, HOOK), "top": r.top_features(rid, 10, HOOK, by="drift", k=7),
        "top_refusal": r.top_features(rid, 10, HOOK, by="refusal_score", k=5),
        "trajectory": r.feature_trajectory(rid, HOOK, 3), "refusal": r.refusal_features(rid, HOOK, k=5),
        "alerts": r.alerts(run_id=rid).drop(columns="created_at"), "verifications": r.verifications(rid),
        "residual": r.residual_directions(rid), "names": r.metric_names(rid),
        "directions": r.direction_projections(rid, HOOK), "scatter": r.density_scatter(rid, 10, HOOK),
        "categories": r.categories(rid, 10, HOOK), "labels": r.labels(HOOK),
        "compare": r.metric_compare([rid], "explained_variance", hook=HOOK),
    }


def _assert_same(mine: dict[str, object], want: dict[str, object], rid: str) -> None:
    for key, value in want.items():
        if isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(mine[key], value, obj=f"{rid} {key}")
        else:
            assert mine[key] == value, (rid, key)


@pytest.fixture
def store_dir(tmp_path):
    """Four files: a.duckdb with two runs, b.duckdb with a run id a.duckdb has too (it reads
    ``b/r1``), c.duckdb with the labels, d.duckdb an empty DuckDB file (a run not started)."""
    d = tmp_path / "store"
    d.mkdir()
    _write(d / "a.duckdb", "r1", steps=(0, 10, 20), seed=1, status="finished", alert_steps=(10,))
    _write(d / "a.duckdb", "r2", steps=(0, 10), seed=2, status="failed")
    _write(d / "b.duckdb", "r1", steps=(0, 10), name="other r1", seed=3, alert_steps=(0, 10))
    _write(d / "c.duckdb", "r3", steps=(0, 10), seed=4, labels={3: "feature three", 5: "five"})
    import duckdb

    duckdb.connect(str(d / "d.duckdb")).close()
    _age(d)
    return d


def test_routed_queries_equal_one_merged_file(store_dir, tmp_path):
    """Every run-scoped query of the directory returns the frame the single merged file returns
    (labels of another run's file joined as before), and runs() is the same table."""
    merged = tmp_path / "merged.duckdb"
    merge([store_dir], merged)
    many, one = StoreReader(store_dir), StoreReader(merged)
    runs_many, runs_one = many.runs(), one.runs()
    assert sorted(runs_many.run_id) == ["b/r1", "r1", "r2", "r3"]
    cols = [c for c in runs_one.columns if c not in ("store_file",)]
    pd.testing.assert_frame_equal(runs_many[cols], runs_one[cols])
    for rid in runs_one.run_id:
        _assert_same(_every_query(many, rid), _every_query(one, rid), rid)
    labelled = many.feature_table("r1", 10, HOOK).dropna(subset=["label"])  # c's labels join r1's rows
    assert len(labelled) and set(labelled.label) <= {"feature three", "five"}
    pd.testing.assert_frame_equal(many.metric_compare(["r1", "b/r1", "r3"], "explained_variance"),
                                  one.metric_compare(["r1", "b/r1", "r3"], "explained_variance"))
    for status in (None, "active"):
        pd.testing.assert_frame_equal(many.alerts(status=status).drop(columns="created_at"),
                                      one.alerts(status=status).drop(columns="created_at"))
    assert many.all_hooks() == one.all_hooks() and many.metric_names() == one.metric_names()
    for _ in range(2):  # the second time from the answers kept for the settled files
        pd.testing.assert_frame_equal(many.metric_sparklines(["explained_variance", "l0"], last_n=2),
                                      one.metric_sparklines(["explained_variance", "l0"], last_n=2))
    assert many.resolve_run("other r1") == "b/r1"
    assert locate(runs_many, "b/r1") == (str(store_dir / "b.duckdb"), "r1")
    assert many.steps("no-such-run") == [] and many.snapshots("no-such-run").empty


def _hold(path: Path) -> subprocess.Popen:
    """Another process that holds ``path`` open read-write (as a live run's writer does) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                             "print('held', flush=True); time.sleep(600)", str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_query_opens_only_the_files_of_its_run(store_dir):
    """With a.duckdb held by another process's writer, runs() (unchanged files are not reopened)
    and every query about runs of other files still answer; a query about a.duckdb's run waits
    for the lock and says so."""
    r = StoreReader(store_dir, retries=3, retry_timeout_s=0.2)
    before = r.runs()
    proc = _hold(store_dir / "a.duckdb")
    try:
        pd.testing.assert_frame_equal(r.runs(), before)
        assert r.steps("r3", HOOK) == [0, 10]
        assert r.metric_series("b/r1", names=["explained_variance"])["step"].tolist() == [0, 10]
        assert len(r.feature_table("r3", 10, HOOK).dropna(subset=["label"]))
        with pytest.raises(StoreLocked):
            r.steps("r1", HOOK)
    finally:
        proc.kill()
        proc.wait()
    assert r.steps("r1", HOOK) == [0, 10, 20]


def test_a_file_written_after_a_read_and_a_new_file_are_seen(store_dir):
    """A file that changes after a read (another snapshot, an alert) and a file that appears
    are read on the next call, by a reader and by a new reader alike."""
    r = StoreReader(store_dir)
    runs = r.runs().set_index("run_id")
    assert runs.loc["r3", "last_step"] == 10 and runs.loc["r3", "active_alerts"] == 0
    assert r.steps("r3", HOOK) == [0, 10]
    spark = r.metric_sparklines(["explained_variance"]).set_index("run_id")
    assert list(spark.loc["r3", "steps"]) == [0, 10] and "r3" not in set(r.alerts(status="active").run_id)
    _write(store_dir / "c.duckdb", "r3", steps=(30,), seed=9, alert_steps=(30,))
    runs = r.runs().set_index("run_id")
    assert runs.loc["r3", "last_step"] == 30 and runs.loc["r3", "n_snapshots"] == 3
    assert runs.loc["r3", "active_alerts"] == 1 and runs.loc["r3", "status"] == "running"
    assert r.steps("r3", HOOK) == [0, 10, 30]
    assert list(r.metric_sparklines(["explained_variance"]).set_index("run_id").loc["r3", "steps"]) == [0, 10, 30]
    assert "r3" in set(r.alerts(status="active").run_id)
    _write(run_file(store_dir, "r4"), "r4", steps=(0,), seed=5)
    assert "r4" in set(r.runs().run_id) and "r4" in set(StoreReader(store_dir).runs().run_id)
    assert r.steps("r4", HOOK) == [0]
    assert "r4" in set(r.metric_sparklines(["explained_variance"]).run_id)
    assert r.metric_series("r4", names=["explained_variance"])["step"].tolist() == [0]


def test_a_write_within_the_file_clock_tick_is_seen(store_dir):
    """A file read in the same clock tick as a write, then written again without its stat
    changing (a coarse file clock, the same size), is still read again (a racy entry)."""
    r = StoreReader(store_dir)
    f = store_dir / "c.duckdb"
    now = time.time_ns()
    os.utime(f, ns=(now, now))  # just written, as far as the reader can tell
    assert r.steps("r3", HOOK) == [0, 10]
    st = f.stat()
    s = Store(f, run_id="r3")
    s.finish_run("preempted")
    s.close()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert not Path(f"{f}.wal").exists()
    assert r.runs().set_index("run_id").loc["r3", "status"] == "preempted"


def _shards(d: Path) -> tuple[Path, Path]:
    """A run ``scan`` in two shard files, as ``scan --shard K/2`` writes it: shard 1 the base
    and step 10, shard 2 steps 20 and 30 (with alerts); both hold a runs row."""
    one, two = run_file(d, "scan", shard=(1, 2)), run_file(d, "scan", shard=(2, 2))
    _write(one, "scan", steps=(0, 10), name="the scan", seed=11, status="finished")
    _write(two, "scan", steps=(20, 30), name="the scan", seed=12, alert_steps=(20, 30))
    return one, two


def test_shard_files_read_as_one_run(tmp_path):
    """Two shard files of one run are one run: one runs row (counts over both, the shard-1
    file as its store_file, status by the rule), every table their union, equal to the merged
    file; a plain file holding the same run id still collides with the shards' unit."""
    d = tmp_path / "store"
    d.mkdir()
    one, two = _shards(d)
    _write(d / "other.duckdb", "scan", steps=(0,), seed=13, status="finished")
    _age(d)
    r = StoreReader(d)
    runs = r.runs().set_index("run_id")
    assert sorted(runs.index) == ["scan", "scan.shard-1-of-2/scan"]
    row = runs.loc["scan.shard-1-of-2/scan"]
    assert (row.n_snapshots, row.last_step, row.active_alerts, row["name"]) == (4, 30, 2, "the scan")
    assert row.status == "running" and row.store_file == str(one)
    rid = "scan.shard-1-of-2/scan"
    assert r.steps(rid, HOOK) == [0, 10, 20, 30]
    assert r.snapshots(rid)["step"].tolist() == [0, 10, 20, 30]
    assert locate(r.runs(), rid) == (str(one), "scan")
    merged = tmp_path / "merged.duckdb"
    merge([d], merged)
    m = StoreReader(merged)
    cols = [c for c in m.runs().columns if c != "store_file"]
    pd.testing.assert_frame_equal(r.runs()[cols], m.runs()[cols])
    _assert_same(_every_query(r, rid), _every_query(m, rid), rid)

    for status, shown in (("failed", "failed"), ("finished", "finished")):
        s = Store(two, run_id="scan")
        s.finish_run(status)
        s.close()
        assert r.runs().set_index("run_id").loc[rid, "status"] == shown
    s = Store(one, run_id="scan")
    s.finish_run("preempted")
    s.close()
    assert r.runs().set_index("run_id").loc[rid, "status"] == "preempted"


def test_acknowledging_an_alert_of_shard_2_and_of_a_colliding_run(tmp_path):
    """The dashboard's acknowledgement reaches the file holding the alert (shard 2's, not the
    run's shard-1 file) under that file's id, also for a colliding run's prefixed alert id."""
    from drift_monitor.dashboard.views.alerts import acknowledge

    d = tmp_path / "store"
    d.mkdir()
    _, two = _shards(d)
    _write(d / "x.duckdb", "scan", steps=(0, 10), seed=3, alert_steps=(10,))
    r = StoreReader(d)
    for rid in ("scan", "x/scan"):
        alert = r.alerts(run_id=rid).iloc[0]
        target = r.alert_file(alert.alert_id, rid)
        assert target[0] == str(two if rid == "scan" else d / "x.duckdb")
        assert acknowledge(*target) == "committed"
        acked = r.alerts(run_id=rid).set_index("alert_id").loc[alert.alert_id]
        assert bool(acked.acknowledged), rid
    with pytest.raises(KeyError):
        r.alert_file("no-such-alert", "scan")


def test_seventy_files_with_one_run_id(tmp_path):
    """70 copies of one run's file (read in two threads when new): 70 runs, the first file's id
    plain and every later file's prefixed with its stem, each routed to its own file."""
    import shutil

    from drift_monitor.store import routing

    d = tmp_path / "store"
    d.mkdir()
    _write(d / "f00.duckdb", "r", steps=(0, 10), seed=1)
    for i in range(1, 70):
        shutil.copy(d / "f00.duckdb", d / f"f{i:02d}.duckdb")
    _write(d / "f37.duckdb", "r", steps=(20,), seed=2)
    assert routing.SCAN_THREADS < 2 or len(list(d.glob("*.duckdb"))) // 32 >= 2  # the threaded read
    r = StoreReader(d)
    runs = r.runs().set_index("run_id")
    assert sorted(runs.index) == sorted(["r", *(f"f{i:02d}/r" for i in range(1, 70))])
    assert runs.loc["f37/r", "last_step"] == 20 and runs.loc["f36/r", "last_step"] == 10
    assert runs.loc["f37/r", "store_file"] == str(d / "f37.duckdb")
    assert r.steps("f37/r", HOOK) == [0, 10, 20] and r.steps("r", HOOK) == [0, 10]
