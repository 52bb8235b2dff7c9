"""An exported Parquet dataset read as a store (drift_monitor/store/dataset.py).

A store with two runs (one id with characters a hive path escapes, one that looks like a
number), alerts (one acknowledged), labels, a verification and residual directions is exported
with ``drift-monitor export``; every StoreReader method then returns the same frame over the
dataset as over the store. The dashboard opened on the dataset shows the runs, renders a run
and offers no write; every path that writes refuses a dataset; a remote root without DuckDB's
httpfs extension is one line that names the fix.
"""

from __future__ import annotations

import inspect
import shutil

import duckdb
import numpy as np
import pandas as pd
import pytest
from store_fixtures import HOOK, make_snapshot, preflight_result
from test_dashboard import app, no_errors

from drift_monitor.cli import build_parser, dashboard_command, main
from drift_monitor.notify import Notification
from drift_monitor.records import (
    PROJECTION,
    PROJECTION_DELTA,
    Alert,
    ConditionResult,
    ResidualDirection,
    VerifyResult,
    VerifySettings,
)
from drift_monitor.store import SCHEMA_VERSION, SchemaVersionError, Store, StoreEmpty, StoreReader
from drift_monitor.store.dataset import DatasetError, is_dataset, is_remote, refuse_write, root_of

#: Run ids: one a hive path escapes (/, space, =, %, non-ASCII), one a number-looking id.
ODD, NUMERIC = "team/a b=c%ü", "007"


def _run(s: Store, offset: int) -> None:
    for i, step in enumerate((0, 10, 20)):
        snap = make_snapshot(step, d_sae=64, seed=offset + i)
        h = snap.hooks[HOOK]
        h.metrics.update({f"{PROJECTION}:refusal:harmful": 0.1 * i, f"{PROJECTION_DELTA}:refusal:harmful": 0.2 * i})
        if step:
            h.residual = [ResidualDirection(rank=r, share=0.05 * step, variance=0.3 + r, nearest_feature=7 + r,
                                            decoder_cos=0.12, projections={"harmful": 2.5, "harmless": 0.1},
                                            top_tokens=[" sorry"], bottom_tokens=[" sure"], vector=[0.0, 1.0, 0.5])
                          for r in range(2)]
        alerts = [Alert(rule="ev_drop", severity="warning", step=step, hook=HOOK, message="ev dropped",
                        value=0.5, threshold=0.1)] if step == 10 else []
        if step == 20:
            alerts.append(Alert(rule="nonfinite", severity="critical", step=step, hook=HOOK, message="NaN",
                                value=float("nan"), threshold=0.0))
        s.write(snap, alerts)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    db = tmp_path_factory.mktemp("ds") / "drift.duckdb"
    for offset, (rid, name) in enumerate(((ODD, "odd"), (NUMERIC, "numeric"))):
        s = Store(db, run_id=rid)
        s.start_run(name=name, model="tiny", config={"k": offset})
        _run(s, offset * 100)
        s.close()
    with Store(db) as s:
        s.import_labels(HOOK, {1: "refuses", 2: "cats"}, source="test")
        s.acknowledge_alert(StoreReader(db).alerts(run_id=ODD).alert_id.iloc[0])
    res = VerifyResult(HOOK, [1, 2], [ConditionResult("fine_tuned", [], 0.8, 0.1, 0.0, 5, 5),
                                      ConditionResult("ablated", [], 0.2, 0.1, 0.3, 5, 5)],
                       VerifySettings(), [1.0], run_id=NUMERIC, step=20)
    assert Store(db, run_id=NUMERIC).write_verification(res) == "committed"
    # a delivered and an undelivered alert notification (drift_monitor.notify)
    delivered = Notification.of(Alert("ev_drop", "warning", 10, HOOK, "m"), "a1", ODD, "team")
    delivered.notified_at, delivered.attempts = 1.7e9, 1
    waiting = Notification.of(Alert("ev_drop", "warning", 20, HOOK, "m"), "a2", NUMERIC, "team")
    waiting.attempts, waiting.last_error = 2, "URLError: refused"
    assert Store(db, run_id=ODD).write_notifications([delivered.row(), waiting.row()]) == "committed"
    assert Store(db).write_preflight(preflight_result("pf1", dhash="hash-a")) == "committed"  # belongs to no run
    return db


@pytest.fixture(scope="module")
def dataset(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "ds"
    assert main(["export", "--db", str(store), "--out", str(out)]) == 0
    return out


#: Every public StoreReader method and the calls that compare it (a new method fails the test
#: below until it is added here).
CALLS = {
    "runs": [()], "hooks": [(ODD,), (NUMERIC,)], "steps": [(ODD,), (NUMERIC, HOOK)],
    "snapshots": [(ODD,), (NUMERIC,)],
    "metric_series": [(ODD,), (NUMERIC, HOOK, ["l0", "nan_metric"]), (ODD, None, None, "blocks.")],
    "feature_table": [(ODD, 10, HOOK), (NUMERIC, 20, HOOK, None)],
    "top_features": [(ODD, 20, HOOK, by, 15) for by in ("abs_drift", "density", "refusal_score")],
    "feature_trajectory": [(ODD, HOOK, 1), (NUMERIC, HOOK, 5, "harmful")],
    "refusal_features": [(ODD, HOOK), (NUMERIC, HOOK, [10, 20], 5)],
    "alerts": [(), (ODD,), (None, "active", "critical"), (NUMERIC, None, None, HOOK)],
    "resolve_run": [(ODD,), ("numeric",)],
    "verifications": [(), (NUMERIC,), (ODD, HOOK)],
    "residual_directions": [(ODD,), (NUMERIC, HOOK, [20])],
    "notifications": [(), (ODD,), (NUMERIC, True)],
    "labels": [(HOOK,), ("no-such-hook",)],
    "metric_sparklines": [(["l0", "explained_variance"],), (["l0"], 2)],
    "metric_names": [(), (ODD,)], "all_hooks": [()],
    "metric_compare": [([ODD, NUMERIC], "l0"), ([NUMERIC], "explained_variance", HOOK)],
    "direction_projections": [(ODD, HOOK), (NUMERIC, HOOK)],
    "density_scatter": [(ODD, 20, HOOK), (NUMERIC, 10, HOOK, "harmful", 7)],
    "categories": [(ODD, 10, HOOK)],
    "schema_version": [()], "spool_state": [()], "alert_file": [("?", ODD)],
    "preflights": [(), ("hash-a",)],
}


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """Array cells (residual direction vectors) as tuples, so frames compare cell by cell."""
    return df.assign(**{c: [tuple(v) if isinstance(v, np.ndarray) else v for v in df[c]]
                        for c in df.columns if df[c].dtype == object})


def _same(a, b, what: str) -> None:
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(_plain(a), _plain(b), check_exact=True, obj=what)
    else:
        assert a == b, what


def test_every_reader_method_reads_the_dataset_as_the_store(store, dataset):
    public = {n for n, _ in inspect.getmembers(StoreReader, inspect.isfunction) if not n.startswith("_")}
    assert public == set(CALLS), "cover every StoreReader method here"
    src, ds = StoreReader(store), StoreReader(dataset)
    for name, calls in CALLS.items():
        for args in calls:
            a, b = getattr(src, name)(*args), getattr(ds, name)(*args)
            if name == "runs":  # the one intended difference: where the run lives
                assert (a.store_file == str(store)).all() and (b.store_file == str(dataset)).all()
                a, b = a.drop(columns="store_file"), b.drop(columns="store_file")
            if name == "alert_file":  # where an acknowledgement would go: the store; a dataset refuses it
                assert a == (str(store), "?") and b == (str(dataset), "?")
                with pytest.raises(DatasetError):
                    Store(b[0])
                continue
            if name == "spool_state":
                a, b = (a.n_pending, a.quarantined, a.dumps), (b.n_pending, b.quarantined, b.dumps)
            _same(a, b, f"{name}{args}")
            if isinstance(a, pd.DataFrame) and name not in ("labels", "metric_names", "categories"):
                assert len(a) or name in ("verifications",) and args == (ODD, HOOK), f"{name}{args} is empty"
    assert sorted(ds.runs().run_id) == sorted([ODD, NUMERIC])
    assert ds.schema_version() == SCHEMA_VERSION
    assert ds.alerts(run_id=ODD).acknowledged.sum() == 1 and len(ds.labels(HOOK)) == 2
    assert len(ds.verifications(NUMERIC)) == 2 and len(ds.residual_directions(ODD)) == 4
    assert ds.runs().set_index("run_id").undelivered_notifications.to_dict() == {ODD: 0, NUMERIC: 1}


def test_run_ids_come_back_exactly_from_escaped_folders(dataset):
    folders = sorted(p.name for p in (dataset / "table=runs").iterdir())
    assert folders == ["run=007", "run=team%2Fa%20b%3Dc%25%C3%BC"]  # escaped on disk ...
    assert sorted(StoreReader(dataset).runs().run_id) == [NUMERIC, ODD]  # ... exact when read


def test_number_like_run_ids_stay_strings(tmp_path):
    """Where every run= folder looks like a number, the folder values still read as the ids, as
    text (the views ask for VARCHAR; DuckDB 2.0 would also keep 007 by itself, older ones not)."""
    db = tmp_path / "n.duckdb"
    for rid in ("007", "1e3"):
        s = Store(db, run_id=rid)
        s.start_run(name=rid)
        s.write(make_snapshot(0, d_sae=16))
        s.close()
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "ds")]) == 0
    r = StoreReader(tmp_path / "ds")
    assert sorted(r.runs().run_id) == ["007", "1e3"] and r.steps("007") == [0]


def test_a_dataset_exported_again_in_the_same_place_is_read_anew(store, tmp_path):
    """The views are built once per dataset (a cursor per call): replacing the dataset rebuilds them."""
    ds = tmp_path / "ds"
    db = tmp_path / "one.duckdb"
    with Store(db, run_id="only") as s:
        s.start_run(name="only")
        s.write(make_snapshot(0, d_sae=16))
    assert main(["export", "--db", str(db), "--out", str(ds)]) == 0
    assert StoreReader(ds).runs().run_id.tolist() == ["only"]
    shutil.rmtree(ds)
    assert main(["export", "--db", str(store), "--out", str(ds)]) == 0
    assert sorted(StoreReader(ds).runs().run_id) == sorted([ODD, NUMERIC])
    assert len(StoreReader(ds).verifications()) == 2  # a table the first export did not have


def test_a_query_for_one_run_opens_only_that_runs_files(store, tmp_path):
    """The views filter on the run= folder, so DuckDB skips the other runs' files: a damaged file
    of one run does not stop reading another (and on object storage, skipped files cost nothing)."""
    ds = tmp_path / "ds"
    assert main(["export", "--db", str(store), "--out", str(ds)]) == 0
    for f in (ds / "table=metrics").glob("run=team*/*.parquet"):
        f.write_bytes(b"not parquet")
    r = StoreReader(ds)
    pd.testing.assert_frame_equal(r.metric_series(NUMERIC), StoreReader(store).metric_series(NUMERIC))
    with pytest.raises(duckdb.Error, match="run=team"):  # the damaged file is real: reading it fails
        r.metric_series(ODD)


def test_missing_tables_are_empty_and_versions_are_checked(store, tmp_path):
    ds = tmp_path / "ds"
    assert main(["export", "--db", str(store), "--out", str(ds)]) == 0
    for table in ("verifications", "residual_directions", "meta"):  # as a dataset of an older export
        shutil.rmtree(ds / f"table={table}")
    r = StoreReader(ds)
    assert r.verifications().empty and r.residual_directions(ODD).empty
    assert list(r.verifications().columns) == list(StoreReader(store).verifications().columns)
    assert r.schema_version() == SCHEMA_VERSION and len(r.runs()) == 2

    (ds / "table=meta").mkdir()
    duckdb.execute(f"COPY (SELECT 'schema_version' AS key, '{SCHEMA_VERSION + 1}' AS value) "
                   f"TO '{ds}/table=meta/data_0.parquet' (FORMAT PARQUET)")
    with pytest.raises(SchemaVersionError, match="upgrade drift-monitor"):
        StoreReader(ds).runs()
    empty = tmp_path / "empty" / "table=runs"
    empty.mkdir(parents=True)
    with pytest.raises(StoreEmpty, match="without Parquet files"):
        StoreReader(empty.parent).runs()


def test_detection(store, dataset, tmp_path):
    assert is_dataset(dataset) and is_dataset(f"{dataset}/")
    assert not is_dataset(store) and not is_dataset(store.parent)  # a store file, a store directory
    assert not is_dataset(tmp_path / "missing") and not is_dataset(f"{store.parent}/*.duckdb")
    for url in ("s3://bucket/runs", "gs://b/p/", "https://example.org/ds", "S3://b/x"):
        assert is_remote(url) and is_dataset(url)
    assert root_of(StoreReader("s3://bucket/pre/fix").path) == "s3://bucket/pre/fix"  # Path collapses //
    assert not is_remote("/data/s3/x") and not is_remote("runs.duckdb")


# --------------------------------------------------------------------------------------------
# The command line and the dashboard
# --------------------------------------------------------------------------------------------


def test_cli_runs_export_and_dashboard_on_a_dataset(store, dataset, tmp_path, capsys):
    assert main(["runs", "--db", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert ODD in out and NUMERIC in out and "numeric" in out
    one = tmp_path / "one"
    assert main(["export", "--db", str(dataset), "--run", "odd", "--out", str(one), "--format", "csv"]) == 0
    mine = pd.read_csv(next(one.glob("*_metrics.csv")))
    theirs = StoreReader(store).metric_series(ODD)
    assert len(mine) == len(theirs) and set(mine.run_id) == {ODD}
    assert main(["export", "--db", str(dataset), "--out", str(tmp_path / "again")]) == 2
    assert "give --run" in capsys.readouterr().err
    cmd = dashboard_command(build_parser().parse_args(["dashboard", "--db", "s3://bucket/pre/fix"]))
    assert cmd[cmd.index("--db") + 1] == "s3://bucket/pre/fix"  # a URL is not made a local path


def test_dashboard_on_a_dataset_shows_the_runs_and_offers_no_write(store, dataset):
    at = app(dataset, "Runs", read_only=False)  # read-only whatever the flag: a dataset takes no writes
    no_errors(at)
    assert set(at.dataframe[0].value["run_id"]) == {ODD, NUMERIC}
    for page, key in (("Run detail", "detail_run"), ("Features", "feat_run"), ("Residual", None)):
        at = app(dataset, page, read_only=False, run=ODD)
        no_errors(at)
        if key:
            assert at.selectbox(key=key).value == ODD
    at = app(dataset, "Alerts", read_only=False)
    no_errors(at)
    captions = [c.value for c in at.caption]
    assert "Acknowledging an alert is off: a Parquet dataset is read-only." in captions
    assert "al_ack" not in [b.key for b in at.button] and "al_ack_id" not in [s.key for s in at.selectbox]
    at = app(dataset, "Features", read_only=False)
    no_errors(at)
    assert not at.get("file_uploader") and "Importing labels is off: a Parquet dataset is read-only." in \
        [c.value for c in at.caption]


def test_every_write_refuses_a_dataset(dataset, capsys):
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    for target in (dataset, dataset / "run.duckdb", "s3://bucket/ds"):  # the root, a file in it, a remote
        with pytest.raises(DatasetError, match="read-only.*give the store file"):
            Store(target, run_id="x")
    with pytest.raises(DatasetError, match="verify --db"):
        refuse_write(dataset, "verify --db stores its result in the run's store")
    # verify --db refuses before it loads any model (the model path does not even exist)
    assert main(["verify", "--model", "/no/such/model", "--sae", f"{HOOK}=/no/sae", "--features", "1",
                 "--db", str(dataset), "--run", "odd"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only" in err and "verify --db" in err
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before  # nothing was written


# --------------------------------------------------------------------------------------------
# Object storage: what can be tested without a network (no remote is faked)
# --------------------------------------------------------------------------------------------


def test_a_remote_dataset_without_httpfs_is_one_line_naming_the_fix(tmp_path, monkeypatch, capsys):
    """DuckDB looks for extensions under $HOME/.duckdb: an empty HOME is a machine where httpfs was
    never installed (this one cannot download it), whatever the test machine has."""
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DatasetError, match=r"INSTALL httpfs.*CREATE PERSISTENT SECRET"):
        StoreReader("s3://bucket/prefix").runs()
    assert main(["runs", "--db", "gs://bucket/prefix"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("drift-monitor: error: gs://bucket/prefix: ")
    assert "httpfs" in err and "INSTALL httpfs" in err
    at = app("s3://bucket/prefix", "Runs")  # the dashboard: the same line as a message, no traceback
    assert not at.exception and any("INSTALL httpfs" in e.value for e in at.error)
