"""A scan's failed checkpoint: our bug keeps its traceback, the input's fault stays one line.

A bug is planted in the probe pass (``DriftMonitor.snapshot`` divides by zero for the checkpoint;
the base is measured by ``baseline``, so it still succeeds). The checkpoint must fail, the rest
of the scan go on, and the traceback, with the planted function's name, must reach the error log
always and stderr under ``--debug`` (issue 26: a bug in the probe pass read like a bad
checkpoint). A :class:`DriftMonitorError` raised at the same place stays one line, with no
traceback anywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import train_fixtures as tf

import drift_monitor.offline.scan as scan_mod
from drift_monitor.errors import ConfigError
from drift_monitor.monitor import DriftMonitor
from drift_monitor.store import StoreReader

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved tiny base, the SAE, a probe file, and a checkpoint at step 2 (a copy of the base:
    what it holds does not matter, the planted bug fails its probe pass)."""
    tf.torch_threads()
    root = tmp_path_factory.mktemp("scan-errors")
    tok, model, sae_dir, ps, base = tf.saved_world(root)
    ckpt = root / "out" / "checkpoint-2"
    model.save_pretrained(ckpt)
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": r.id, "category": r.category, "prompt": r.prompt}) + "\n"
                              for r in ps.records))
    return SimpleNamespace(root=root, ps=ps, sae_dir=sae_dir, base=base, ckpt=ckpt, probes=probes)


@pytest.fixture(autouse=True)
def scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFT_MONITOR_CACHE", str(tmp_path / "scan-cache"))


def planted_bug_in_the_probe_pass(self, model, step):
    return step / 0


def _scan(world, tmp_path):
    db = tmp_path / "scan.duckdb"
    cfg = tf.config(tmp_path, world.sae_dir, world.ps, db_path=str(db), run_name="bug")
    return db, scan_mod.scan(str(world.base), cfg, models=[f"2={world.ckpt}"])


def test_an_internal_error_fails_the_checkpoint_and_keeps_its_traceback(world, tmp_path, monkeypatch):
    monkeypatch.setattr(DriftMonitor, "snapshot", planted_bug_in_the_probe_pass)
    db, result = _scan(world, tmp_path)
    (r,) = result.results
    assert r.status == "failed" and result.failed == [r]
    log_file = tmp_path / "scan.duckdb.errors.log"
    assert log_file == scan_mod.error_log_path(db)
    # one line that says it is our bug and where its traceback is
    assert "\n" not in r.error
    assert r.error.startswith("internal error ZeroDivisionError: division by zero")
    assert f"its traceback is in {log_file}" in r.error and "please report it" in r.error
    # the whole traceback: in the result and in the log file, with the function that raised
    logged = log_file.read_text()
    for text in (r.traceback, logged):
        assert "Traceback (most recent call last)" in text
        assert "planted_bug_in_the_probe_pass" in text and "ZeroDivisionError: division by zero" in text
    assert f"run bug, checkpoint {world.ckpt} (step 2): internal error" in logged
    # the store: the base is kept, the run failed, and its monitor_error alert names the log file
    reader = StoreReader(db)
    assert reader.steps("bug") == [0]
    assert reader.runs().set_index("run_id").status["bug"] == "failed"
    errors = reader.alerts("bug")
    errors = errors[errors.rule == "monitor_error"]
    assert len(errors) == 1 and errors.step.iloc[0] == 2
    assert str(log_file) in errors.message.iloc[0] and "ZeroDivisionError" in errors.message.iloc[0]


def test_our_own_error_stays_one_line_without_a_traceback(world, tmp_path, monkeypatch):
    def refuse(self, model, step):
        raise ConfigError("the planted setting is wrong; set it right")

    monkeypatch.setattr(DriftMonitor, "snapshot", refuse)
    db, result = _scan(world, tmp_path)
    (r,) = result.results
    assert r.status == "failed"
    assert r.error == "ConfigError: the planted setting is wrong; set it right"
    assert r.traceback is None
    assert not scan_mod.error_log_path(db).exists()
    assert "monitor_error" not in set(StoreReader(db).alerts("bug").rule)


_CLI = textwrap.dedent("""
    import sys
    from drift_monitor.monitor import DriftMonitor

    def planted_bug_in_the_probe_pass(self, model, step):
        return step / 0

    DriftMonitor.snapshot = planted_bug_in_the_probe_pass
    from drift_monitor.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_the_cli_prints_the_traceback_under_debug_only(world, tmp_path, debug):
    """The real command in its own process (its logging set up by the CLI, not by pytest)."""
    db = tmp_path / "scan.duckdb"
    args = (["--debug"] if debug else []) + [
        "scan", "--base-model", str(world.base), "--sae", f"{tf.HOOK}={world.sae_dir}", "--db", str(db),
        "--probes", str(world.probes), "--batch-size", "12", "--model", f"2={world.ckpt}", "--run-name", "cli",
        "--no-progress"]
    env = {**os.environ, "DRIFT_MONITOR_CACHE": str(tmp_path / "scan-cache")}
    p = subprocess.run([sys.executable, "-c", _CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1, p.stderr
    log_file = scan_mod.error_log_path(db)
    line = next(ln for ln in p.stderr.splitlines() if "(step 2) failed:" in ln)
    assert "internal error ZeroDivisionError" in line and f"its traceback is in {log_file}" in line
    assert "planted_bug_in_the_probe_pass" in log_file.read_text()
    if debug:
        assert "Traceback (most recent call last)" in p.stderr and "planted_bug_in_the_probe_pass" in p.stderr
    else:
        assert "Traceback" not in p.stderr and "planted_bug_in_the_probe_pass" not in p.stderr
