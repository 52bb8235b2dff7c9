"""drift_monitor.resume on its own (torch-free): the state files a resumed or requeued training
job reads. The callback's and the scan's use of it run in test_callback*.py, test_faults.py
(a requeued job keeps its run) and test_scan.py (resumed scans, refused mixes)."""

from __future__ import annotations

import json

from drift_monitor import resume


def test_checkpoint_state_round_trips_in_the_files_format(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    state = resume.CheckpointState(run_id="r1", base_fingerprint="fp", probe_hash="ph", done_steps=[0, 2, 4],
                                   alerts={"history": []})
    resume.write_checkpoint_state(tmp_path, 4, state)
    raw = json.loads((tmp_path / "checkpoint-4" / resume.STATE_FILE).read_text())
    # the keys checkpoints saved before this module hold, in their order: old checkpoints still resume
    assert list(raw) == ["run_id", "base_fingerprint", "probe_hash", "done_steps", "alerts"]
    assert resume.read_checkpoint_state(tmp_path, 4, "ph") == state


def test_no_state_at_step_zero_without_the_file_or_with_other_probes(tmp_path, caplog):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / resume.STATE_FILE).write_text(json.dumps(
        {"run_id": "r1", "base_fingerprint": "fp", "probe_hash": "old", "done_steps": [0, 2]}))
    assert resume.read_checkpoint_state(tmp_path, 0, "old") is None
    assert resume.read_checkpoint_state(tmp_path, 6, "old") is None  # no checkpoint-6
    assert resume.read_checkpoint_state(tmp_path, 2, "old").alerts is None  # a file without alert state reads
    with caplog.at_level("WARNING", logger="drift_monitor.resume"):
        assert resume.read_checkpoint_state(tmp_path, 2, "new") is None
    assert "probe set changed" in caplog.text


def test_a_missing_checkpoint_folder_is_a_warning(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="drift_monitor.resume"):
        resume.write_checkpoint_state(tmp_path, 8, resume.CheckpointState("r", "fp", "ph"))
    assert "checkpoint-8 not found" in caplog.text and not (tmp_path / "checkpoint-8").exists()


def test_the_run_file_names_the_run_for_a_requeued_job_until_it_ends(tmp_path):
    out = tmp_path / "out"
    assert resume.requeued_run(out, "ph", "fp") is None  # nothing there: a new run
    resume.write_run_file(out, "r1", "ph", "fp")
    assert resume.requeued_run(out, "ph", "fp") == "r1"
    assert resume.requeued_run(out, "other", "fp") is None  # other probes: a new run
    assert resume.requeued_run(out, "ph", "other") is None  # another base: a new run
    resume.end_run_file(out)
    assert not (out / resume.RUN_FILE).exists() and resume.requeued_run(out, "ph", "fp") is None
    resume.end_run_file(out)  # twice is fine


def test_a_store_that_does_not_exist_holds_nothing_to_resume(tmp_path):
    db = str(tmp_path / "none.duckdb")
    assert resume.existing_run_id(db, "r") is None
    assert resume.stored_config(db, "r") == {}
    assert resume.changed_settings(db, "r", config=None, probe_hash="ph") == []
