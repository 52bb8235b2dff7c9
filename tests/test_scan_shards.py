"""Sharded scans (`drift-monitor scan --shard K/N`, one shard per `torchrun` rank) equal one scan.

A tiny model fine-tuned by a real Trainer leaves four full checkpoints. One process scans them
all into a file; two real processes started by `torchrun` (each rank a shard) scan them into a
store directory at the same time. The directory then reads as one run whose every stored row
(metrics, feature statistics, refusal features) and alert equals the single scan's, and the
base was measured once: the second shard waited on the baseline cache's lock and loaded it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import train_fixtures as tf
from test_scan import FEATURE_KEY, assert_close_frames, features_of, metrics_of, scan_args, table_of

from drift_monitor.cli import main
from drift_monitor.offline.shards import Shard, ShardError
from drift_monitor.store import StoreReader

STEPS = [0, 2, 4, 6, 8]
# rules whose outcome depends on the steps before: a shard alone would get them wrong
RULES = {"defaults": False, "rules": [
    {"name": "drifted_any", "kind": "threshold", "metric": "features_drifted_ratio", "op": ">", "threshold": 0.0},
    {"name": "ev_any", "kind": "ev_drop", "threshold": 0.0},
    {"name": "jump", "kind": "sudden_change", "threshold": 0.5, "min_history": 2},
]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved base, its SAE and probes, and a Trainer run with full checkpoints at 2, 4, 6, 8."""
    from transformers import Trainer

    tf.torch_threads()
    root = tmp_path_factory.mktemp("shard-world")
    tok, model, sae_dir, ps, base = tf.saved_world(root)
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": r.id, "category": r.category, "prompt": r.prompt}) + "\n"
                              for r in ps.records))
    args = tf.training_args(root, max_steps=8, save_strategy="steps", save_steps=2)
    Trainer(model=model, args=args, train_dataset=tf.lm_dataset(tok)).train()
    out = root / "out"
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{s}" for s in STEPS[1:]]
    rules = root / "rules.json"
    rules.write_text(json.dumps(RULES))
    config = root / "monitor.json"
    config.write_text(json.dumps({"outputs": {"alert_rules": str(rules)}}))
    w = SimpleNamespace(root=root, base=base, sae_dir=sae_dir, probes=probes, out=out, config=config,
                        full=SimpleNamespace(batch_size=12))
    single = root / "single.duckdb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFT_MONITOR_CACHE", str(root / "single-cache"))
        assert main(scan_args(w, single, "--config", str(config), "--no-progress", checkpoints=out)) == 0
    w.single = single
    return w


def _argv(world, db: Path, cache: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "DRIFT_MONITOR_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return (scan_args(world, db, "--config", str(world.config), "--no-progress", *extra, checkpoints=world.out),
            env)


def _alerts(db) -> list[tuple]:
    df = StoreReader(db).alerts("run")
    return sorted(zip(df.step, df.hook, df.rule, df.severity, df.status, df.resolved_step.fillna(-1), df.message))


def test_two_torchrun_ranks_scan_as_one_run_equal_to_a_single_scan(world, tmp_path):
    store = tmp_path / "store"
    cache = tmp_path / "cache"  # empty: the two shards race for the baseline
    argv, env = _argv(world, store, cache)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "drift_monitor.cli", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    files = sorted(p.name for p in store.glob("*.duckdb"))
    assert files == ["run.shard-1-of-2.duckdb", "run.shard-2-of-2.duckdb"]
    # each rank took every other checkpoint; only shard 1 holds the base
    assert tf.snapshot_steps(str(store / files[0]), "run") == [0, 2, 6]
    assert tf.snapshot_steps(str(store / files[1]), "run") == [4, 8]
    # the base was measured once: one shard waited on the cache lock and loaded the other's
    assert proc.stderr.count("baseline loaded from cache") == 1, proc.stderr[-3000:]

    runs = StoreReader(store).runs()
    assert list(runs.run_id) == ["run"] and runs.status.iloc[0] == "finished"
    assert int(runs.n_snapshots.iloc[0]) == len(STEPS) and int(runs.last_step.iloc[0]) == STEPS[-1]
    assert_close_frames(metrics_of(world.single, "run"), metrics_of(store, "run"), ["step", "hook", "name"],
                        "metrics")
    assert_close_frames(features_of(world.single, "run"), features_of(store, "run"), FEATURE_KEY, "feature_stats")
    key = ["step", "hook", "feature"]
    assert_close_frames(table_of(world.single, "run", "refusal_features", key),
                        table_of(store, "run", "refusal_features", key), key, "refusal_features")
    single = _alerts(world.single)
    assert single and {a[2] for a in single} >= {"drifted_any", "jump"}, single
    assert _alerts(store) == single  # the same events, steps and messages, evaluated over both shards' steps


def test_shard_flag_reruns_one_shard_and_the_last_one_stores_the_alerts(world, tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    cache = tmp_path / "cache"
    monkeypatch.setenv("DRIFT_MONITOR_CACHE", str(cache))
    assert main(_argv(world, store, cache, "--shard", "2/2")[0]) == 0
    out = capsys.readouterr().out
    assert "shard 2/2" in out and "evaluated over every shard's steps by the shard that finishes last" in out
    assert StoreReader(store).alerts().empty  # shard 1 has not run: no alert yet
    assert StoreReader(store).runs().status.tolist() == ["running"]  # not every shard has its file yet
    assert main(_argv(world, store, cache, "--shard", "1/2")[0]) == 0
    out = capsys.readouterr().out
    assert "alerts of the run over every shard:" in out
    assert _alerts(store) == _alerts(world.single)
    assert StoreReader(store).runs().status.tolist() == ["finished"]
    # a rerun of a finished shard skips its stored steps and evaluates the same alerts again
    assert main(_argv(world, store, cache, "--shard", "1/2")[0]) == 0
    assert "0 scanned, 2 already stored" in capsys.readouterr().out
    assert _alerts(store) == _alerts(world.single)
    # split another way over the 2-way files, the steps would be stored twice: refused, naming both fixes
    assert main(_argv(world, store, cache, "--shard", "1/3")[0]) == 2
    err = capsys.readouterr().err
    assert "split another way" in err and "--shard K/2" in err and "--force" in err and "Traceback" not in err
    # --force rescans split 3 ways and removes the 2-way files: still one run, the same numbers and alerts
    for k in (1, 2, 3):
        assert main(_argv(world, store, cache, "--shard", f"{k}/3", "--force")[0]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in store.glob("*.duckdb")) == [f"run.shard-{k}-of-3.duckdb" for k in (1, 2, 3)]
    assert [p.name for p in store.glob(".run.shards-of-*")] == [".run.shards-of-3"]
    assert StoreReader(store).runs().status.tolist() == ["finished"]
    assert_close_frames(metrics_of(world.single, "run"), metrics_of(store, "run"), ["step", "hook", "name"],
                        "metrics")
    assert _alerts(store) == _alerts(world.single)


@pytest.mark.parametrize("text, needle", [("3/2", "K must lie in 1..N"), ("0/2", "K must lie in 1..N"),
                                          ("two", "expected K/N"), ("1/", "expected K/N")])
def test_bad_shard_values_name_the_fix(text, needle):
    with pytest.raises(ShardError, match=needle):
        Shard.parse(text)


def test_shard_needs_a_store_directory(world, tmp_path, capsys):
    argv, _ = _argv(world, tmp_path / "one.duckdb", tmp_path / "cache", "--shard", "1/2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--db must be a store directory" in err and "Traceback" not in err


def test_shards_from_the_torchrun_environment():
    assert Shard.from_env({"RANK": "2", "WORLD_SIZE": "4"}) == Shard(3, 4)
    assert Shard.from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    assert Shard.from_env({}) is None
    assert Shard(2, 3).select(list(range(8))) == [1, 4, 7]
