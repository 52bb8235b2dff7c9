"""`drift-monitor train-sae` on the organism's base: quality, round trip, resume, bad input.

The SmolLM2 figures (held-out EV ≥ 0.75, dead ≤ 30%, ≤ 15 min on 2 cores) are checked in
tests/test_real_model.py on the test bed's SAE, which this command built.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from drift_monitor.demo import organism as O
from drift_monitor.training.sae_data import DataError, Document, load_documents
from drift_monitor.training.train_sae import TrainSAEError, TrainSAESettings, train_sae


@pytest.fixture(scope="module")
def org(organism_root):
    return O.build_organism("quick", root=organism_root, quiet=True)


def _docs(org):
    pairs = org.pairs["train"]
    return [Document(p.prompt, p.response, chat=True) for p in pairs] + [Document(t) for t in O.general_text()]


@pytest.fixture(scope="module")
def trained(org, tmp_path_factory):
    out = tmp_path_factory.mktemp("sae") / "sae"
    settings = TrainSAESettings(hook=org.hook, tokens=40_000, train_tokens=1_200_000, batch_size=2048, lr=2e-3,
                                checkpoint_every=100)
    rep = train_sae(org.load_base(), org.tokenizer, settings, out, documents=_docs(org), progress=False)
    return out, rep


def test_organism_sae_explains_its_base(trained, org):
    out, rep = trained
    assert rep.explained_variance >= 0.95, rep.format()
    assert rep.dead_fraction <= 0.3 and rep.d_sae == 512 and rep.k == 8  # 8 × width 64, k = d_sae / 64
    assert rep.l0 == pytest.approx(8.0, abs=0.01)
    assert rep.n_heldout > 0 and rep.n_train > 10 * rep.n_heldout
    assert [t for t, _ in rep.ev_curve] == sorted(t for t, _ in rep.ev_curve) and rep.ev_curve[-1][1] == pytest.approx(
        rep.explained_variance, abs=1e-3)
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["explained_variance"] == rep.explained_variance and not (out / ".partial").exists()


def test_saved_sae_round_trips_through_sae_lens_and_the_monitor(trained, org, tmp_path):
    from sae_lens import SAE

    from drift_monitor import DriftMonitor, MonitorConfig
    from drift_monitor.probe.tokens import TokenConventions

    out, rep = trained
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.metadata.hook_name == org.hook and sae.cfg.d_sae == rep.d_sae
    conv = TokenConventions.from_sae(sae)
    assert conv.outlier_norm == pytest.approx(rep.outlier_norm) and conv.skip_first
    mon = DriftMonitor(MonitorConfig(saes=[str(out)], probes=str(org.probes_path), baseline_cache_dir=str(tmp_path),
                                     outputs={"show_progress": False}), org.tokenizer)
    assert mon.hooks == [org.hook] and mon.conventions[org.hook].outlier_norm == pytest.approx(rep.outlier_norm)
    base = mon.baseline(org.load_base())
    assert base.metric(org.hook, "explained_variance") > 0.9  # the held-out probes, read as trained


def test_interrupted_run_resumes(org, tmp_path):
    """SIGKILL after the first checkpoint, then the same command: it continues from there."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n"
                            for p in org.pairs["train"]))
    out = tmp_path / "sae"
    cmd = [sys.executable, "-m", "drift_monitor.cli", "train-sae", "--model", str(org.base_dir), "--hook", org.hook,
           "--out", str(out), "--data", str(data), "--tokens", "20000", "--train-tokens", "2000000",
           "--batch-size", "1024", "--checkpoint-every", "20", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ckpts = out / ".partial" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # a checkpoint is complete once its curve.json is written (what resuming looks for)
        if ckpts.is_dir() and any(p.name.isdigit() and int(p.name) >= 40 and (p / "curve.json").is_file()
                                  for p in ckpts.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "cfg.json").exists() and (out / ".partial" / "activations.safetensors").is_file()
    # a different setting must not silently reuse the interrupted run
    bad = subprocess.run(cmd[:-1] + ["--seed", "3", "--no-progress"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "interrupted run with other settings" in bad.stderr and "--force" in bad.stderr
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rep = json.loads((out / "train_report.json").read_text())
    assert rep["resumed_from"] >= 40 * 1024 and rep["explained_variance"] > 0.8
    assert "resumed at" in done.stdout


def test_bad_input_names_the_fix(org, tmp_path):
    from drift_monitor.cli import main

    model = str(org.base_dir)
    with pytest.raises(KeyError, match=r"Closest module names.*model\.layers\.2"):
        train_sae(org.load_base(), org.tokenizer, TrainSAESettings(hook="model.layer.2"), tmp_path / "x",
                  documents=[Document("a b c")])
    with pytest.raises(DataError, match="no such file"):
        load_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no text found"):
        load_documents([tmp_path / "empty.txt"])
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: a record needs 'text'"):
        load_documents([tmp_path / "bad.jsonl"])
    with pytest.raises(TrainSAEError, match="architecture"):
        TrainSAESettings(hook="h", architecture="gated")
    out = tmp_path / "done"
    out.mkdir()
    (out / "cfg.json").write_text("{}")
    rc = main(["train-sae", "--model", model, "--hook", org.hook, "--out", str(out), "--no-progress"])
    assert rc == 2
    (tmp_path / "tiny.txt").write_text("just a few words here")
    with pytest.raises(TrainSAEError, match="fewer than one batch"):
        train_sae(org.load_base(), org.tokenizer, TrainSAESettings(hook=org.hook), tmp_path / "y",
                  data=[tmp_path / "tiny.txt"], progress=False)


def test_settings_pick_sizes_from_the_width():
    s = TrainSAESettings(hook="h")
    assert s.sizes(576) == (4096, 32) and s.sizes(64) == (512, 8) and s.sizes(2048) == (16384, 32)
    assert TrainSAESettings(hook="h", d_sae=1000, k=20).sizes(64) == (1000, 20)
    with pytest.raises(TrainSAEError, match="positive integer"):
        TrainSAESettings(hook="h", tokens=0)
