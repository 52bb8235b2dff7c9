"""A store location that is a directory (one DuckDB file per run) or a glob of store files.

Why a directory: one DuckDB file takes one writer process at a time, so concurrent fine-tunes
sharing one file would contend for its lock. With ``outputs.db_path`` a directory each run writes
``<dir>/<run_id>.duckdb`` and every reader (``StoreReader``, ``drift-monitor runs``, the
dashboard) shows the files together.

The first test runs three real training processes at once into one directory. This file is
also their worker: ``python tests/test_store_dir.py worker WORK_DIR DB_DIR RUN_NAME BARRIER``
builds a tiny Llama, waits at a file barrier until all three are built (so the trainings truly
overlap, whatever the load), trains with ``DriftMonitorCallback`` (snapshots every 2 steps, 6
steps), prints when its training began and ended, and exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

NAMES = ("run-red", "run-green", "run-blue")
STEPS = [0, 2, 4, 6]
TIMEOUT_S = 300  # all three trainings together, on two shared cores: a hang fails, never blocks


# ------------------------------------------------------------------------------ the worker
def worker(work: str, db_dir: str, name: str, barrier: str) -> None:
    """One training run writing into the store directory ``db_dir`` under the run name ``name``,
    started once every worker has touched its file in ``barrier``."""
    import torch

    torch.set_num_threads(1)  # three of these share two cores
    import train_fixtures as tf
    from transformers import Trainer

    from drift_monitor.callbacks import DriftMonitorCallback

    tmp = Path(work)
    tok, model, sae_dir, ps = tf.world(tmp)
    cfg = tf.config(tmp, sae_dir, ps, db_path=db_dir, run_name=name, every_n_steps=2, fail_fast=True)
    cb = DriftMonitorCallback(cfg, tok)
    trainer = Trainer(model=model, args=tf.training_args(tmp, max_steps=6), train_dataset=tf.lm_dataset(tok),
                      callbacks=[cb])
    (Path(barrier) / name).touch()
    deadline = time.monotonic() + TIMEOUT_S
    while len(list(Path(barrier).iterdir())) < len(NAMES):
        if time.monotonic() > deadline:
            raise SystemExit("the other workers never reached the barrier")
        time.sleep(0.05)
    began = time.time()
    trainer.train()
    print(f"trained {began} {time.time()}", flush=True)


# ------------------------------------------------------------------------------ the tests
@pytest.mark.slow
def test_three_concurrent_trainers_write_one_directory(tmp_path, capsys):
    """Three Trainers started together, one store directory: three files, three finished runs
    with every snapshot, and the reader, the ``runs`` command and the dashboard show all three."""
    from servers import stop
    from test_dashboard import app, no_errors

    from drift_monitor.cli import main
    from drift_monitor.store import StoreReader

    db_dir, barrier = tmp_path / "store", tmp_path / "barrier"
    db_dir.mkdir()
    barrier.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs, logs = [], []
    started = time.monotonic()
    try:
        for name in NAMES:
            log = tmp_path / f"{name}.log"
            logs.append(log)
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "worker", str(tmp_path / name), str(db_dir), name, str(barrier)],
                    stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(Path(__file__).parents[1])))
        for proc, log in zip(procs, logs):
            left = TIMEOUT_S - (time.monotonic() - started)
            try:
                proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{log.stem} still training after {TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
    finally:
        for proc in procs:
            stop(proc)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log.stem} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
    print(f"three trainings took {time.monotonic() - started:.1f}s")
    spans = [[float(t) for t in log.read_text().split("trained ")[1].split()[:2]] for log in logs]
    assert max(b for b, _ in spans) < min(e for _, e in spans), f"the trainings did not overlap: {spans}"

    files = sorted(p.name for p in db_dir.glob("*.duckdb"))
    assert len(files) == 3, files
    reader = StoreReader(db_dir)
    runs = reader.runs()
    assert sorted(runs["name"]) == sorted(NAMES)
    assert runs["run_id"].is_unique
    assert sorted(Path(f).name for f in runs["store_file"]) == files  # each run in its own file
    import train_fixtures as tf

    for row in runs.itertuples():
        assert row.status == "finished", (row.name, row.status)
        assert reader.steps(row.run_id, tf.HOOK) == STEPS, row.name
        assert row.pending_writes == 0

    capsys.readouterr()
    assert main(["runs", "--db", str(db_dir)]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out, out

    at = app(db_dir, "Runs")
    no_errors(at)
    shown = at.dataframe[0].value
    assert len(shown) == 3
    assert sorted(shown["name"]) == sorted(NAMES)
    assert set(shown["run_id"]) == set(runs["run_id"])


def _write(db: Path, run_id: str, name: str, marker: float, steps=(0, 10)) -> None:
    """One run in its own store file; metric ``marker`` tells the files apart."""
    from store_fixtures import make_snapshot

    from drift_monitor.store import Store

    s = Store(db, run_id=run_id)
    s.start_run(name=name, model="tiny")
    for i, step in enumerate(steps):
        snap = make_snapshot(step, d_sae=64, seed=int(marker * 100) + i)
        for h in snap.hooks.values():
            h.metrics["marker"] = marker + i
        s.write(snap)
    s.close()


def test_runs_with_the_same_id_in_two_files_stay_distinct(tmp_path):
    """Two files each hold a run called ``same``: read together they are two runs, and each
    run's metrics and feature rows are its own file's, never a mix."""
    from store_fixtures import HOOK

    from drift_monitor.store import StoreReader

    _write(tmp_path / "a.duckdb", "same", "alpha", 1.0)
    _write(tmp_path / "b.duckdb", "same", "beta", 5.0, steps=(0, 20))
    reader = StoreReader(tmp_path)
    runs = reader.runs()
    assert len(runs) == 2
    assert runs["run_id"].is_unique, runs["run_id"].tolist()
    assert all("same" in rid for rid in runs["run_id"])
    ids = dict(zip(runs["name"], runs["run_id"]))
    for name, file, marker, last in (("alpha", "a", 1.0, 10), ("beta", "b", 5.0, 20)):
        rid = ids[name]
        series = reader.metric_series(rid, names=["marker"])
        assert series["value"].tolist() == [marker, marker + 1], name
        assert reader.steps(rid, HOOK) == [0, last]
        own = StoreReader(tmp_path / f"{file}.duckdb")
        mine = reader.top_features(rid, last, HOOK, by="drift", k=10)
        want = own.top_features("same", last, HOOK, by="drift", k=10)
        assert mine["feature"].tolist() == want["feature"].tolist(), name
        assert mine["drift"].tolist() == pytest.approx(want["drift"].tolist())
        assert int(runs.set_index("run_id").loc[rid, "n_snapshots"]) == 2


def test_a_glob_selects_files(tmp_path):
    """``DIR/a*.duckdb`` reads the files it matches and no other file of the folder."""
    from drift_monitor.store import StoreReader

    _write(tmp_path / "a1.duckdb", "id-a1", "a1", 1.0)
    _write(tmp_path / "a2.duckdb", "id-a2", "a2", 2.0)
    _write(tmp_path / "b1.duckdb", "id-b1", "b1", 3.0)
    picked = StoreReader(str(tmp_path / "a*.duckdb"))
    assert sorted(picked.runs()["run_id"]) == ["id-a1", "id-a2"]
    assert picked.metric_series("id-a2", names=["marker"])["value"].tolist() == [2.0, 3.0]
    assert sorted(StoreReader(tmp_path).runs()["run_id"]) == ["id-a1", "id-a2", "id-b1"]  # the folder: all


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        raise SystemExit(f"usage: {sys.argv[0]} worker WORK_DIR DB_DIR RUN_NAME BARRIER")
    worker(*sys.argv[2:6])
