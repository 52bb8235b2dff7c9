"""Pre-flight results in the store (schema migration 5): written and read back whole in a real
DuckDB file, replaced by id, a version-4 file migrated by the writer (read as it is by readers),
carried once by a merge (into a file, into a directory: a file of their own), through a dataset
export and ``export --run``, read over a store directory, and matched to a run by the training
data it names (``outputs.train_data``: by the file's hash where it can be read, else by path).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from store_fixtures import preflight_result
from test_store import _hold, _release

from drift_monitor.config import MonitorConfig
from drift_monitor.preflight.datahash import data_hash
from drift_monitor.preflight.result import PreflightResult
from drift_monitor.store import PREFLIGHT_COLUMNS, SCHEMA_VERSION, Store, StoreReader, export_run
from drift_monitor.store import schema as sch
from drift_monitor.store.many import PREFLIGHT_FILE, run_file
from drift_monitor.store.merge import export_dataset, merge
from drift_monitor.store.preflights import file_hash, result_of, run_preflights, train_data_of


def test_a_result_round_trips_through_a_duckdb_file(tmp_path):
    db = tmp_path / "pf.duckdb"
    first, second = preflight_result("pf1", generated=True), preflight_result(
        "pf2", score=-0.3, created_at="2026-12-08T03:30:00+02:00", dataset="other.jsonl", dhash="hash-b")
    with Store(db) as s:  # no run: a pre-flight belongs to a dataset
        assert s.write_preflight(first) == "committed"
        assert s.write_preflight(second) == "committed"
    r = StoreReader(db)
    rows = r.preflights()
    assert list(rows.columns) == list(PREFLIGHT_COLUMNS)
    # newest first, by time and not by text: 03:30+02:00 is 01:30 UTC, after 01:00 UTC
    assert rows.preflight_id.tolist() == ["pf2", "pf1"]
    back = result_of(rows.iloc[1])
    assert back == first  # every field, examples and own answers included
    assert result_of(rows.iloc[0]).created_at == "2026-12-08T01:30:00+00:00"  # the same instant, in UTC
    assert r.preflights(data_hash="hash-b").preflight_id.tolist() == ["pf2"]
    assert r.preflights(data_hash="nope").empty
    assert r.runs().empty  # no runs row made up for it
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT layers, n_examples FROM preflight WHERE preflight_id = 'pf1'").fetchall() == \
        [("[0, 1, 2]", 120)]
    con.close()


def test_nan_scores_and_no_own_answers_read_back(tmp_path):
    db = tmp_path / "pf.duckdb"
    res = preflight_result(score=math.nan)
    res.per_layer[1] = math.nan
    Store(db).write_preflight(res)
    back = result_of(StoreReader(db).preflights().iloc[0])
    assert math.isnan(back.score) and math.isnan(back.per_layer[1]) and back.per_layer[0] == 0.1
    assert back.own_refusal_share is None and all(e.own_text is None for e in back.raises + back.erodes)


def test_sae_signals_round_trip_and_a_result_without_them_stores_none(tmp_path):
    db = tmp_path / "pf.duckdb"
    with Store(db) as s:
        s.write_preflight(preflight_result("with", sae=True))
        s.write_preflight(preflight_result("without"))
    rows = StoreReader(db).preflights().set_index("preflight_id", drop=False)
    back = result_of(rows.loc["with"])
    assert back == preflight_result("with", sae=True)  # feature score, examples, refusal features, pushes
    assert back.sae_features["model.layers.1"][0].refusal and back.feature_raises[0].own_features == 0.5
    assert pd.isna(rows.loc["without"].sae_json)  # NULL in the file
    plain = result_of(rows.loc["without"])
    assert plain.feature_score is None and plain.sae_features == {} and plain.feature_raises == []


def test_a_result_written_before_the_sae_signals_reads_back():
    """Results are cached and stored as JSON: one without the SAE fields still reads."""
    d = preflight_result("old").to_dict()
    for k in ("feature_score", "feature_raises", "feature_erodes", "refusal_features", "sae_features"):
        d.pop(k)
    for e in d["raises"] + d["erodes"]:
        for k in ("feature_score", "response_features", "own_features"):
            e.pop(k)
    back = PreflightResult.from_dict(d)
    assert back == preflight_result("old") and back.feature_score is None


def test_rewriting_an_id_replaces_it(tmp_path):
    db = tmp_path / "pf.duckdb"
    s = Store(db)
    s.write_preflight(preflight_result("pf1", score=0.42))
    s.write_preflight(preflight_result("other", score=0.1))
    s.write_preflight(preflight_result("pf1", score=-0.7, dhash="hash-c"))
    rows = StoreReader(db).preflights().set_index("preflight_id")
    assert sorted(rows.index) == ["other", "pf1"]
    assert rows.loc["pf1", "score"] == -0.7 and rows.loc["pf1", "data_hash"] == "hash-c"


def test_a_malformed_result_raises_and_writes_nothing(tmp_path):
    db = tmp_path / "pf.duckdb"
    s = Store(db)
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        s.write_preflight(preflight_result(created_at="yesterday"))
    assert not db.exists() and s.pending() == 0


def test_a_result_written_while_the_file_is_held_is_spooled_and_applied_once(tmp_path):
    db = tmp_path / "pf.duckdb"
    s = Store(db, retry_timeout_s=0.3)
    s.write_preflight(preflight_result("other"))
    proc = _hold(db, None, "rw")
    try:
        assert s.write_preflight(preflight_result("pf1", score=0.1)) == "spooled"
        assert s.write_preflight(preflight_result("pf1", score=0.2)) == "spooled"  # the later one must win
        assert s.pending() == 2
    finally:
        _release(proc)
    assert s.flush_spool() == 2 and s.pending() == 0
    rows = StoreReader(db).preflights().set_index("preflight_id")
    assert sorted(rows.index) == ["other", "pf1"] and rows.loc["pf1", "score"] == 0.2


def _version_4_file(db: Path) -> None:
    """A genuine version-4 file: the DDL up to migration 4, version row 4, and a run."""
    con = duckdb.connect(str(db))
    for ddl in (*sch.V1_DDL, *(sql for m in sch.MIGRATIONS if m.version <= 4 for sql in m.statements)):
        con.execute(ddl)
    con.execute("INSERT INTO meta VALUES ('schema_version', '4')")
    con.execute("INSERT INTO runs (run_id, name, status, last_step) VALUES ('old', 'old run', 'finished', 3)")
    con.close()


def _tables(db: Path) -> set[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


def test_a_version_4_file_is_migrated_by_the_writer(tmp_path):
    db = tmp_path / "v4.duckdb"
    _version_4_file(db)
    assert SCHEMA_VERSION == 5 and sch.MIGRATIONS[-1].statements == (sch.PREFLIGHT_DDL,)
    r = StoreReader(db)
    # a reader cannot migrate: the table is absent and reads empty, with its columns
    assert r.schema_version() == 4 and "preflight" not in _tables(db)
    assert r.preflights().empty and list(r.preflights().columns) == list(PREFLIGHT_COLUMNS)
    assert Store(db).write_preflight(preflight_result()) == "committed"
    assert r.schema_version() == 5 and "preflight" in _tables(db)
    assert r.preflights().preflight_id.tolist() == ["pf1"]
    assert r.runs().run_id.tolist() == ["old"] and r.runs().iloc[0]["name"] == "old run"  # earlier rows intact


@pytest.fixture
def sources(tmp_path) -> Path:
    """Two store files: each a run, both holding pre-flight ``shared`` (an older and a newer copy),
    the second also ``only-b``."""
    src = tmp_path / "src"
    src.mkdir()
    for name, created in (("a", "2026-12-08T01:00:00+00:00"), ("b", "2026-12-08T02:00:00+00:00")):
        with Store(src / f"{name}.duckdb", run_id=f"run-{name}") as s:
            s.start_run(name=f"run {name}")
            s.write_preflight(preflight_result("shared", score=0.1 if name == "a" else 0.2, created_at=created))
            if name == "b":
                s.write_preflight(preflight_result("only-b", dhash="hash-b", created_at=created))
    return src


def test_a_store_directory_reads_each_result_once(sources):
    rows = StoreReader(sources).preflights()
    assert rows.preflight_id.tolist() == ["only-b", "shared"]  # both written at 02:00: then by id
    assert rows.set_index("preflight_id").loc["shared", "score"] == 0.2  # the newest copy
    assert StoreReader(sources).preflights(data_hash="hash-b").preflight_id.tolist() == ["only-b"]


def test_merge_into_a_file_carries_each_result_once(sources, tmp_path):
    into = tmp_path / "merged.duckdb"
    assert sorted(merge([sources], into)) == ["run-a", "run-b"]
    rows = StoreReader(into).preflights()
    assert rows.preflight_id.tolist() == ["only-b", "shared"] and rows.score.iloc[1] == 0.2  # the newest copy
    assert result_of(rows.iloc[0]) == preflight_result("only-b", dhash="hash-b", created_at="2026-12-08T02:00:00+00:00")


def test_merge_into_a_directory_puts_results_in_a_file_of_their_own(sources, tmp_path):
    out = tmp_path / "per-run"
    merge([sources], str(out) + "/")
    assert sorted(p.name for p in out.glob("*.duckdb")) == sorted(
        [run_file(out, "run-a").name, run_file(out, "run-b").name, PREFLIGHT_FILE])
    for rid in ("run-a", "run-b"):  # a run's file holds its run, not the dataset's results
        assert StoreReader(run_file(out, rid)).preflights().empty
    alone = StoreReader(out / PREFLIGHT_FILE)
    assert alone.runs().empty and sorted(alone.preflights().preflight_id) == ["only-b", "shared"]
    r = StoreReader(out)
    assert sorted(r.runs().run_id) == ["run-a", "run-b"]  # the results file adds no run
    assert sorted(r.preflights().preflight_id) == ["only-b", "shared"]


def test_a_dataset_export_holds_the_results_unpartitioned(sources, tmp_path):
    ds = tmp_path / "ds"
    export_dataset([sources], ds)
    assert [p.name for p in (ds / "table=preflight").iterdir()] == ["data_0.parquet"]
    rows = StoreReader(ds).preflights().set_index("preflight_id")
    assert sorted(rows.index) == ["only-b", "shared"] and rows.loc["shared", "score"] == 0.2
    assert sorted(StoreReader(ds).runs().run_id) == ["run-a", "run-b"]


def test_a_run_finds_its_results_by_the_hash_of_its_training_data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    db = tmp_path / "s.duckdb"
    cfg = MonitorConfig(saes=["x"], outputs={"train_data": str(data)}).to_dict()
    with Store(db, run_id="run") as s:
        s.start_run(name="run", config=cfg)
        s.write_preflight(preflight_result("mine", dataset="somewhere/else.jsonl", dhash=data_hash([data])))
        s.write_preflight(preflight_result("same-path", dataset=str(data), dhash="stale"))
    r = StoreReader(db)
    config_json = r.runs().config_json.iloc[0]
    assert train_data_of(config_json) == str(data)
    found = run_preflights(r, config_json)
    assert found.by == "data_hash" and found.rows.preflight_id.tolist() == ["mine"]  # the bytes decide, not the path
    data.write_text('{"prompt": "hi", "response": "no"}\n')  # edited since its check: no longer matches
    assert file_hash(data) != found.data_hash and run_preflights(r, config_json).rows.empty
    data.unlink()  # not readable here (another machine): the recorded path decides
    found = run_preflights(r, config_json)
    assert found.by == "dataset" and found.rows.preflight_id.tolist() == ["same-path"]
    assert run_preflights(r, json.dumps({"outputs": {"db_path": "x"}})) is None  # names no data
    assert run_preflights(r, None) is None
    assert train_data_of(json.dumps({"train_data": "flat.jsonl"})) == "flat.jsonl"  # a run stored flat
    assert train_data_of("not json") is None


def test_export_run_adds_the_results_of_the_runs_data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("x\n")
    db = tmp_path / "s.duckdb"
    with Store(db, run_id="run") as s:
        s.start_run(name="run", config={"outputs": {"train_data": str(data)}})
        s.write_preflight(preflight_result("mine", dhash=data_hash([data])))
        s.write_preflight(preflight_result("not-mine", dhash="other"))
    written = export_run(db, "run", tmp_path / "out", fmt="csv")
    target = tmp_path / "out" / "run_preflight.csv"
    assert target in written
    import pandas as pd

    assert pd.read_csv(target).preflight_id.tolist() == ["mine"]
