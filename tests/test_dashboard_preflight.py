"""Pre-flight results on the dashboard (dashboard/preflight.py, views/preflight.py), under
AppTest, on stores written through the Store API with results built by hand (no model).

The Pre-flight page lists every result and shows one in full; a store holding only pre-flight
results (no run yet) opens on every page without error. Run detail shows the newest result of
the run's training data (``outputs.train_data``) when one matches, and says why when none does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from store_fixtures import HOOK, make_snapshot, preflight_result
from test_dashboard import PAGES, app, no_errors

from drift_monitor.dashboard.common import plain
from drift_monitor.dashboard.preflight import verdict
from drift_monitor.preflight.datahash import data_hash
from drift_monitor.store import Store, StoreReader
from drift_monitor.store.many import preflight_file


def _figures(at) -> list[tuple[dict, pd.DataFrame]]:
    """Each Vega-Lite figure: its spec and the rows of its first dataset (Altair's data, as Arrow)."""
    return [(json.loads(c.proto.spec), pa.ipc.open_stream(c.proto.datasets[0].data.data).read_pandas())
            for c in at.get("vega_lite_chart")]


def _frames(at) -> list[pd.DataFrame]:
    return [d.value for d in at.dataframe]


@pytest.fixture
def only_preflights(tmp_path) -> Path:
    """A store with two pre-flight results and no run: an older one that generated its own answers."""
    db = tmp_path / "pf.duckdb"
    with Store(db) as s:
        s.write_preflight(preflight_result("old", score=-0.25, created_at="2026-12-07T10:00:00+00:00",
                                           dataset="erode.jsonl", dhash="hash-e", generated=True))
        s.write_preflight(preflight_result("new", score=0.42, created_at="2026-12-08T10:00:00+00:00"))
    return db


def test_the_preflight_page_lists_every_result_and_shows_one_in_full(only_preflights):
    at = app(only_preflights, "Pre-flight")
    no_errors(at)
    table = _frames(at)[0]
    assert table.preflight_id.tolist() == ["new", "old"]  # newest first
    assert table.direction.tolist() == ["raises refusal", "erodes refusal"]
    assert table.score.tolist() == [0.42, -0.25] and table.dataset.tolist() == ["data/train.jsonl", "erode.jsonl"]
    # the newest in full: its verdict, per-layer scores, the top examples each way
    new = preflight_result("new", score=0.42, created_at="2026-12-08T10:00:00+00:00")
    assert at.subheader[0].value == verdict(new) == \
        "Pre-flight: data/train.jsonl scored +0.420 (raises refusal) against tiny-chat"
    assert {m.label: m.value for m in at.metric}["dataset score"] == "+0.420"
    (spec, layers), = _figures(at)
    assert dict(zip(layers.layer, layers.score)) == new.per_layer
    raises, erodes = _frames(at)[1:]
    assert raises.response.tolist() == [e.response for e in new.raises]
    assert raises.prompt.tolist() == ["How do I pick a lock?", ""] and raises.score.tolist() == [1.5, 0.9]
    assert erodes.response.tolist() == ["Sure, here is the code", "Hello!"]
    assert "own_answer" not in raises.columns  # predicted own answers: no text to show
    # picking the other result shows it, with the model's own answers it generated
    at.selectbox(key="preflight_pick").set_value("old").run()
    no_errors(at)
    assert at.subheader[0].value.startswith("Pre-flight: erode.jsonl scored -0.250 (erodes refusal)")
    raises, erodes = _frames(at)[1:]
    assert erodes.own_answer.tolist() == ["I can't.", "Hello."]
    assert {m.label: m.value for m in at.metric}["refusals in its own answers"] == "50.0%"


@pytest.mark.parametrize("page", PAGES)
def test_a_store_of_preflights_only_opens_on_every_page(only_preflights, page):
    at = app(only_preflights, page)
    no_errors(at)
    if page == "Pre-flight":
        assert _frames(at)[0].preflight_id.tolist() == ["new", "old"]
        return
    assert at.info  # a message: no runs yet (no alerts, on the Alerts page)
    if page == "Runs":  # the first page says where the results are
        assert any("2 pre-flight results" in m.value and "Pre-flight page" in m.value for m in at.info)


def test_a_store_directory_with_only_its_preflight_file_opens(tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    Store(preflight_file(folder)).write_preflight(preflight_result("pf1"))
    at = app(folder, "Pre-flight")
    no_errors(at)
    assert _frames(at)[0].preflight_id.tolist() == ["pf1"]
    at = app(folder, "Runs")
    no_errors(at)
    assert any("1 pre-flight result:" in m.value for m in at.info)


def _run_store(tmp_path: Path, outputs: dict, results=()) -> Path:
    db = tmp_path / "run.duckdb"
    with Store(db, run_id="r1") as s:
        s.start_run(name="r1", model="tiny-chat", config={"outputs": outputs})
        for step in (0, 10):
            s.write(make_snapshot(step, d_sae=64, seed=step))
        for res in results:
            s.write_preflight(res)
    return db


def test_run_detail_shows_the_result_of_the_runs_training_data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "hi", "response": "I cannot help."}\n')
    mine = preflight_result("mine", dataset="train.jsonl", dhash=data_hash([data]),
                            created_at="2026-12-08T09:00:00+00:00")
    older = preflight_result("older", dataset="train.jsonl", dhash=data_hash([data]), score=0.3,
                             created_at="2026-12-01T09:00:00+00:00")
    other = preflight_result("other", dataset="else.jsonl", dhash="hash-x", created_at="2026-12-09T09:00:00+00:00")
    db = _run_store(tmp_path, {"train_data": str(data)}, [older, mine, other])
    at = app(db, "Run detail", run="r1")
    no_errors(at)
    assert at.selectbox(key="detail_hook").value == HOOK
    shown = [m.value for m in at.info]
    assert verdict(mine) in shown  # the newest result on this data, not the newer one on other data
    captions = " ".join(c.value for c in at.caption)
    assert f"Training data {plain(str(data))}, matched by the file's hash; 1 earlier on this data" in captions
    # the details: per-layer scores and both example tables, next to the run's metric charts
    figures = _figures(at)
    per_layer = [d for s, d in figures if s.get("layer", [{}])[0].get("title") == "Score per layer"]
    assert len(per_layer) == 1 and dict(zip(per_layer[0].layer, per_layer[0].score)) == mine.per_layer
    raises, erodes = _frames(at)
    assert raises["index"].tolist() == [7, 2] and erodes["index"].tolist() == [11, 4]


def test_run_detail_says_why_no_result_is_shown(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("text\n")
    res = preflight_result("stale", dataset=str(data), dhash="not-this-file")
    db = _run_store(tmp_path, {"train_data": str(data)}, [res])
    at = app(db, "Run detail", run="r1")
    no_errors(at)
    assert not any(m.value.startswith("Pre-flight:") for m in at.info)
    assert any(f"No pre-flight result for this run's training data {plain(str(data))} (data hash "
               f"{data_hash([data])})" in c.value for c in at.caption)
    # the same store read where the file is gone: its recorded path matches, and the page says how
    data.unlink()
    at = app(db, "Run detail", run="r1")
    no_errors(at)
    assert verdict(res) in [m.value for m in at.info]
    assert any("matched by its path" in c.value for c in at.caption)


def test_run_detail_of_a_run_naming_no_data_points_to_the_page(tmp_path):
    db = _run_store(tmp_path, {}, [preflight_result()])
    at = app(db, "Run detail", run="r1")
    no_errors(at)
    assert not any(m.value.startswith("Pre-flight:") for m in at.info)
    assert any("outputs.train_data" in c.value for c in at.caption)
    assert len(StoreReader(db).preflights()) == 1
    # and a store without any result says nothing about pre-flight at all
    (tmp_path / "bare").mkdir()
    at = app(_run_store(tmp_path / "bare", {}), "Run detail", run="r1")
    no_errors(at)
    assert not any("pre-flight" in c.value.lower() for c in at.caption)


def test_paths_and_names_from_the_data_are_plain_text_in_markdown():
    res = preflight_result(dataset="my_data/*train*.jsonl", model="<b>m</b>")
    assert verdict(res) == r"Pre-flight: my\_data/\*train\*.jsonl scored +0.420 (raises refusal) against \<b\>m\</b\>"


def test_a_result_without_a_score_reads_not_measured():
    res = preflight_result(score=float("nan"))
    assert res.direction == "neutral"  # the record's own word, for a NaN score
    assert verdict(res) == "Pre-flight: data/train.jsonl scored - (not measured) against tiny-chat"
    assert verdict(preflight_result(score=-0.5)).endswith("scored -0.500 (erodes refusal) against tiny-chat")


def test_a_result_with_sae_signals_shows_its_features(tmp_path):
    """With SAEs, the detail adds the top examples by the refusal-feature score and, per SAE, the
    features the data pushes most; a result without them shows none of it (the tests above)."""
    db = tmp_path / "pf.duckdb"
    res = preflight_result("sae", sae=True)
    Store(db).write_preflight(res)
    at = app(db, "Pre-flight")
    no_errors(at)
    frames = _frames(at)
    assert len(frames) == 1 + 2 + 2 + 1  # the list, the examples each way, by feature score each way, one SAE
    f_up, f_down, pushes = frames[3:]
    assert f_up.feature_score.tolist() == [0.7] and f_up.response.tolist() == ["Sure, here is the code"]
    assert f_down.feature_score.tolist() == [-0.4] and f_down.own.tolist() == [0.5]
    assert pushes.feature.tolist() == [9, 40] and pushes.refusal_feature.tolist() == [True, False]
    assert pushes.push.tolist() == [0.2, 0.1]
    assert any("Refusal-feature score +0.120" in c.value and "model.layers.1: 2" in c.value for c in at.caption)
