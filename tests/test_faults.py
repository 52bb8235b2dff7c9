"""Fault injection: every computed snapshot and alert is eventually stored, or its loss is loud;
run states are honest. Every fault is real: a full tmpfs, a read-only remount, a process
holding the DuckDB lock, SIGKILL, SIGTERM and SIGINT sent to a real training process.

Needs root (mount); the suite runs as root. The store-level SIGKILL test (a writer killed
mid-transaction leaves whole snapshots) is tests/test_store.py::test_sigkill_leaves_whole_snapshots;
here a replay of the spool is killed.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import train_fixtures as tf
from store_fixtures import HOOK as STORE_HOOK
from store_fixtures import make_snapshot
from test_store import _check_whole, _hold, _release

from drift_monitor import store as st
from drift_monitor.callbacks import DriftMonitorCallback
from drift_monitor.cli import main as cli_main
from drift_monitor.recorder import STORE_WRITE_FAILED
from drift_monitor.store import StoreReader
from drift_monitor.store import replay as replay_mod

TESTS = Path(__file__).resolve().parent
ALWAYS = [{"name": "always", "kind": "threshold", "metric": "act_cosine", "op": "<", "threshold": 2.0}]


# ---------------------------------------------------------------------------------- a real small disk
class Disk:
    """A tmpfs of ``size`` mounted at ``path``: fill() makes it really full, free() undoes it,
    readonly()/writable() remount it."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        self.filler = path / "filler"

    def fill(self) -> None:
        with open(self.filler, "ab", buffering=0) as fh:
            for chunk in (1 << 16, 4096, 512, 1):
                try:
                    while True:
                        fh.write(b"\0" * chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        assert os.statvfs(self.path).f_bavail == 0

    def free(self) -> None:
        self.filler.unlink()

    def readonly(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)

    def umount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path / "fs", "64m")
    try:
        yield d
    finally:
        d.umount()


def replay_commands(caplog) -> list[str]:
    return [r.getMessage().split("Load them with: ", 1)[1] for r in caplog.records
            if "Load them with: " in r.getMessage()]


def steps_once(db: Path | str, run_id: str, hook: str) -> list[int]:
    """The stored steps of ``hook``, after checking each (step, hook) is whole and stored once."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT step, n_metrics, (SELECT count(*) FROM metrics m WHERE m.run_id = s.run_id AND "
                           "m.step = s.step AND m.hook = s.hook) FROM snapshots s WHERE run_id = ? AND hook = ? "
                           "ORDER BY step", [run_id, hook]).fetchall()
    finally:
        con.close()
    assert all(n == got for _, n, got in rows), f"partial snapshots: {rows}"
    steps = [r[0] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicated steps: {steps}"
    return steps


def alerts_of(db, run_id) -> list[tuple]:
    df = StoreReader(db).alerts(run_id)
    return sorted(zip(df.rule, df.step, df.status, df.resolved_step.fillna(-1).astype(int)))


# ---------------------------------------------------------------------------------- 1. disk full, callback
def test_disk_full_under_the_callback_loses_nothing(tmp_path, disk, caplog):
    """Snapshots every 2 steps; the DB's disk is full from step 1 to 3 (the write at step 2
    fails; the retry at step 3, a step without a snapshot, stores it) and again from step 5 to
    the end (dumped beside the output, loaded back by the logged command). Training never
    notices; every snapshot and alert ends up stored exactly once."""
    from transformers import Trainer, TrainerCallback

    caplog.set_level(logging.INFO, logger="drift_monitor")
    tok, model, sae_dir, ps = tf.world(tmp_path)
    db = disk.path / "drift.duckdb"
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=2, db_path=str(db), alert_rules=ALWAYS, prometheus_port=0)
    cb = DriftMonitorCallback(cfg, tok)
    seen: dict = {}

    class Faults(TrainerCallback):  # runs before the monitor at each step
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (1, 5):
                disk.fill()
            elif state.global_step == 3:
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{cb.prometheus_port}/metrics").read().decode()
                seen["gauge"] = next(float(line.split()[-1]) for line in metrics.splitlines()
                                     if line.split()[0] == "drift_monitor_store_pending")
                seen["pending"] = cb.store.pending()
                seen["active"] = [a.rule for a in cb.alerts.active()]
                disk.free()
            elif state.global_step == 4:
                seen["pending_at_4"] = cb.store.pending()
                seen["stored_at_4"] = steps_once(db, cb.run_id, tf.HOOK)

    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=6), train_dataset=tf.lm_dataset(tok),
                      callbacks=[Faults(), cb])
    trainer.train()
    cb.exporter.close()
    assert trainer.state.global_step == 6 and cb.errors == 0
    # the step-2 snapshot and the store_write_failed alert waited; the gauge said so
    assert seen["pending"] >= 2 and seen["gauge"] == seen["pending"]
    assert "always" not in seen["active"], "an alert whose write failed must not count as active yet"
    assert seen["pending_at_4"] == 0 and seen["stored_at_4"] == [0, 2], "retried at step 3"
    assert "always" in [a.rule for a in cb.alerts.active()]
    # the end found the disk full again: what waited is in one dump in the output folder
    commands = replay_commands(caplog)
    assert len(commands) == 1 and len(cb.recorder.unsaved) == 1
    dump = cb.recorder.unsaved[0]
    assert dump.parent == tmp_path / "out" and str(dump) in commands[0] and str(db) in commands[0]
    assert steps_once(db, cb.run_id, tf.HOOK) == [0, 2, 4]
    keep = tmp_path / "dump-copy.zip"
    keep.write_bytes(dump.read_bytes())

    disk.free()
    r = subprocess.run(shlex.split(commands[0]), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not dump.exists()
    r2 = subprocess.run(shlex.split(commands[0].replace(str(dump), str(keep))), capture_output=True, text=True,
                        timeout=120)
    assert r2.returncode == 0, r2.stderr  # the same writes again: applied exactly once
    assert steps_once(db, cb.run_id, tf.HOOK) == [0, 2, 4, 6]
    alerts = alerts_of(db, cb.run_id)
    assert [a for a in alerts if a[0] == "always"] == [("always", 2, "active", -1)]
    assert (STORE_WRITE_FAILED, 2, "resolved", 2) in alerts  # failed at step 2, stored again (retry at step 3)
    assert (STORE_WRITE_FAILED, 6, "active", -1) in alerts  # the run ended while failing
    runs = StoreReader(db).runs()
    assert runs.status.iloc[0] == "finished" and runs.pending_writes.iloc[0] == 0


# ---------------------------------------------------------------------------------- 2. disk full, scan
def test_disk_full_under_scan_is_dumped_and_replayed(tmp_path, disk, caplog, monkeypatch):
    import drift_monitor.offline.scan as scan_mod

    caplog.set_level(logging.INFO, logger="drift_monitor")
    monkeypatch.setenv("DRIFT_MONITOR_CACHE", str(tmp_path / "scan-cache"))
    tok, model, sae_dir, ps = tf.world(tmp_path)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    models = []
    weight = model.model.layers[0].mlp.down_proj.weight
    for step in (2, 4):
        with torch.no_grad():
            weight.add_(0.05 * torch.randn_like(weight))
        model.save_pretrained(tmp_path / f"m{step}")
        models.append(f"{step}={tmp_path / f'm{step}'}")
    db = disk.path / "scan.duckdb"
    cfg = tf.config(tmp_path, sae_dir, ps, db_path=str(db), run_name="scan")
    real = scan_mod.load_model

    def fill_then_load(path, **kw):
        if Path(path) != base and not disk.filler.exists():
            disk.fill()  # after the base snapshot was stored
        return real(path, **kw)

    monkeypatch.setattr(scan_mod, "load_model", fill_then_load)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the dump goes: the DB folder is full
    (tmp_path / "tmp").mkdir()
    result = scan_mod.scan(str(base), cfg, models=models)
    assert [r.status for r in result.results] == ["scanned", "scanned"]
    assert steps_once(db, "scan", tf.HOOK) == [0]
    assert StoreReader(db).runs().status.iloc[0] == "running"  # the end is in the dump too
    (command,) = replay_commands(caplog)
    assert str(tmp_path / "tmp") in command
    disk.free()
    r = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert steps_once(db, "scan", tf.HOOK) == [0, 2, 4]
    assert StoreReader(db).runs().status.iloc[0] == "finished"


# ---------------------------------------------------------------------------------- 3. spool replay
def test_transient_error_during_spool_replay_keeps_the_file_pending(tmp_path, disk, capsys):
    """A spooled write meets a full disk when replayed: it stays pending (not quarantined) and
    is applied once space returns. A corrupt file next to it is quarantined, and `runs` says so."""
    db = disk.path / "runs.duckdb"
    s = st.Store(db, retry_timeout_s=0.2)
    run_id = s.start_run("r")
    s.write(make_snapshot(1, d_sae=64))
    holder = _hold(db, None, "rw")
    try:
        assert s.write(make_snapshot(2, d_sae=256, seed=2)) == "spooled"
    finally:
        _release(holder)
    (s.spool.dir / "00000000000000000000-junk.zip").write_bytes(b"PK\x03\x04 truncated")
    (s.spool.dir / "failed").mkdir()  # so that quarantining needs no space: only the decision can keep it pending
    disk.fill()
    assert s.flush_spool() == 0
    assert len(s.spool.pending()) == 1 and s.pending() == 1, "the spooled write must stay pending"
    assert [p.name for p in s.spool.quarantined()] == ["00000000000000000000-junk.zip"]
    assert StoreReader(db).steps(run_id) == [1]
    assert cli_main(["runs", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "1 quarantined spool files" in out and "00000000000000000000-junk.zip" in out and "delete them" in out
    assert "1 writes are not in the database yet" in out and "drift_monitor.store.replay --db" in out
    from test_dashboard import app  # the dashboard's home page says the same

    at = app(db, "Runs")
    assert "00000000000000000000-junk.zip" in at.error[0].value and "1 writes" in at.warning[0].value
    assert at.dataframe[0].value.pending_writes.tolist() == [1]
    disk.free()
    assert s.flush_spool() == 1 and s.pending() == 0
    assert StoreReader(db).steps(run_id) == [1, 2]


# ---------------------------------------------------------------------------------- 4. read-only file system
def test_read_only_file_system_fails_at_start_with_one_line(tmp_path, disk):
    """Decision: a store that cannot be written when a run starts is a start-up error (one line
    naming the fix, before the first training step), not a run that spools into nowhere."""
    from transformers import Trainer

    tok, model, sae_dir, ps = tf.world(tmp_path)
    disk.readonly()
    cfg = tf.config(tmp_path, sae_dir, ps, db_path=str(disk.path / "drift.duckdb"))
    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=2), train_dataset=tf.lm_dataset(tok),
                      callbacks=[DriftMonitorCallback(cfg, tok)])
    with pytest.raises(st.StoreUnwritable) as e:
        trainer.train()
    assert trainer.state.global_step == 0
    msg = str(e.value)
    assert "\n" not in msg and "Read-only file system" in msg and "db_path" in msg


def test_read_only_mid_run_is_kept_and_loud(tmp_path, disk, caplog):
    """The file system turning read-only during a run: writes wait in memory (the spool is on
    the same file system), the end dumps them to the fallback folder, the replay stores them."""
    caplog.set_level(logging.INFO, logger="drift_monitor")
    db = disk.path / "runs.duckdb"
    s = st.Store(db, fallback_dirs=[tmp_path / "out"])
    run_id = s.start_run("r")
    assert s.write(make_snapshot(1, d_sae=64)) == "committed"
    disk.readonly()
    assert s.write(make_snapshot(2, d_sae=64), [st_alert(2)]) == "queued"
    assert s.finish_run("finished") == "queued"
    assert s.failure is not None and "Read-only file system" in str(s.failure) and s.pending() == 2
    s.close()
    (dump,) = s.unsaved
    assert dump.parent == tmp_path / "out"
    assert any("writing" in r.getMessage() and "failed" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)
    disk.writable()
    assert replay_mod.main([str(dump), "--db", str(db)]) == 0
    assert StoreReader(db).steps(run_id) == [1, 2]
    assert StoreReader(db).runs().status.iloc[0] == "finished" and len(StoreReader(db).alerts(run_id)) == 1


def st_alert(step: int):
    from drift_monitor.records import Alert

    return Alert("ev_drop", "warning", step, STORE_HOOK, "x")


# ---------------------------------------------------------------------------------- 5. start-up errors
def test_start_up_errors_raise_before_the_first_step(tmp_path):
    from transformers import Trainer

    from drift_monitor.errors import ConfigError

    tok, model, sae_dir, ps = tf.world(tmp_path)
    with pytest.raises(ConfigError, match="MonitorConfig"):
        DriftMonitorCallback({"saes": {tf.HOOK: str(sae_dir)}}, tok)
    cfg = tf.config(tmp_path, tmp_path / "no-such-sae", ps)
    trainer = Trainer(model=model, args=tf.training_args(tmp_path, max_steps=2), train_dataset=tf.lm_dataset(tok),
                      callbacks=[DriftMonitorCallback(cfg, tok)])
    with pytest.raises(Exception, match="no-such-sae"):
        trainer.train()
    assert trainer.state.global_step == 0 and not Path(cfg.outputs.db_path).exists()


# ---------------------------------------------------------------------------------- 6. SIGKILL mid-replay
KILLED_REPLAY = """
import sys
sys.path.insert(0, sys.argv[2])
from store_fixtures import import_store_only
store = import_store_only()
s = store.Store(sys.argv[1])
print("started", flush=True)
s.flush_spool()
print("done", flush=True)
"""


def test_sigkill_during_spool_replay_loses_and_duplicates_nothing(tmp_path):
    """A process applying the spool is killed with SIGKILL part-way; the next one applies the
    rest: every write whole, none lost, none applied twice (later copies of a step win)."""
    db = tmp_path / "killed.duckdb"
    s = st.Store(db, run_id="killed-run")
    s.start_run("killed run")
    snap = make_snapshot(0, d_sae=16384, dead_frac=0.0)
    want: dict[int, int] = {}
    for seq in range(1, 13):  # three copies of each of four steps, in order
        snap.step = 100 + seq % 4
        for result in snap.hooks.values():
            result.metrics["seq"] = float(seq)
            for stats in result.features.values():
                stats.max_act[:] = seq
        s.spool.put(s._snapshot_op(snap, [], "killed-run"))
        want[snap.step] = seq
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_REPLAY, str(db), str(TESTS)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "started"
    target = 12 - random.Random(7).randint(1, 4)  # kill once a few files are applied: inside the next one
    while len(s.spool.pending()) > target and proc.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.002)
    time.sleep(random.Random(8).uniform(0, 0.05))
    proc.kill()
    proc.communicate()
    left = len(s.spool.pending())
    assert 0 < left < 12, f"the kill should land mid-replay ({left} files left after {time.monotonic() - t0:.1f}s)"
    _check_whole(db)
    assert st.Store(db).flush_spool() == left
    assert _check_whole(db) == want


# ---------------------------------------------------------------------------------- 7. run states
RUN = """
import os, sys, time
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(1)
from pathlib import Path
import train_fixtures as tf
from transformers import Trainer, TrainerCallback
from drift_monitor.callbacks import DriftMonitorCallback

tmp, mode = Path(sys.argv[1]), sys.argv[2]
tok, model, sae_dir, ps = tf.world(tmp)
cfg = tf.config(tmp, sae_dir, ps, every_n_steps=1)

class Fault(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2 and mode != "ok":
            if mode == "raise":
                raise RuntimeError("boom in training")
            print("waiting", flush=True)  # the test sends SIGTERM or SIGINT now
            time.sleep(60)

Trainer(model=model, args=tf.training_args(tmp, max_steps=3), train_dataset=tf.lm_dataset(tok),
        callbacks=[DriftMonitorCallback(cfg, tok), Fault()]).train()
print("trained", flush=True)
"""


def test_run_states_failed_interrupted_preempted(tmp_path):
    """Three real training processes: one raises, one gets SIGINT (Ctrl-C), one SIGTERM (a
    scheduler's preemption). Each run's stored status says so, steps 0-2 are stored, and the
    SIGTERM one still dies by SIGTERM. Requeued in its output folder (no checkpoint yet), the
    preempted job continues its run under the same id."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = {}
    for mode in ("raise", "int", "term"):
        (tmp_path / mode).mkdir()
        procs[mode] = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path / mode), mode, str(TESTS)],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for mode, sig in (("int", signal.SIGINT), ("term", signal.SIGTERM)):
        for line in procs[mode].stdout:  # the Trainer prints its logs too
            if line.strip() == "waiting":
                break
        else:
            raise AssertionError(procs[mode].communicate()[1][-3000:])
        procs[mode].send_signal(sig)
    out = {m: (*p.communicate(timeout=300), p.returncode) for m, p in procs.items()}
    expected = {"raise": "failed", "int": "interrupted", "term": "preempted"}
    for mode, status in expected.items():
        stdout, stderr, rc = out[mode]
        assert rc != 0 and "trained" not in stdout, (mode, rc, stderr[-2000:])
        db = tmp_path / mode / "drift.duckdb"
        runs = StoreReader(db).runs()
        assert runs.status.iloc[0] == status, (mode, stderr[-2000:])
        assert steps_once(db, runs.run_id.iloc[0], tf.HOOK) == [0, 1, 2]
    assert out["term"][2] == -signal.SIGTERM, "the process must still end by SIGTERM"
    assert "boom in training" in out["raise"][1]  # the previous excepthook still prints the traceback

    # the scheduler requeues the preempted job (same output folder, no checkpoint): it keeps its run
    db = tmp_path / "term" / "drift.duckdb"
    preempted = StoreReader(db).runs().run_id.iloc[0]
    done = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "term"), "ok", str(TESTS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-2000:]
    runs = StoreReader(db).runs()
    assert list(runs.run_id) == [preempted] and runs.status.iloc[0] == "finished"
    assert steps_once(db, preempted, tf.HOOK) == [0, 1, 2, 3]
    assert not (tmp_path / "term" / "out" / "drift_monitor_run.json").exists()  # finished: the next is a new run
