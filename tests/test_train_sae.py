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


# ----------------------------------------------------------------------------------- several hooks
HOOKS = ("model.layers.1", "model.layers.2")


def _small(**kw) -> TrainSAESettings:
    base = dict(tokens=12_000, train_tokens=40_960, batch_size=1024, checkpoint_every=1000)
    return TrainSAESettings(**(base | kw))


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _forwards(model) -> list[int]:
    """A counter of the model's forward passes (a hook on its first layer)."""
    calls = [0]
    model.model.layers[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(scope="module")
def multi(org, tmp_path_factory):
    """Two hooks in one run, and the same deeper hook alone: the forwards each made, and the outputs."""
    root = tmp_path_factory.mktemp("multi")
    model = org.load_base()
    calls = _forwards(model)
    summary = train_sae(model, org.tokenizer, _small(hooks=HOOKS), root / "both", documents=_docs(org),
                        progress=False)
    n_multi = calls[0]
    one = train_sae(model, org.tokenizer, _small(hook=HOOKS[1]), root / "one", documents=_docs(org),
                    progress=False)
    return root, summary, one, n_multi, calls[0] - n_multi


def test_several_hooks_share_one_pass_and_match_single_runs(multi):
    root, summary, one, n_multi, n_one = multi
    assert n_multi == n_one  # one collection pass for both hooks, as for one
    assert [r.hook for r in summary.reports] == list(HOOKS) and not summary.spilled
    for h in HOOKS:
        folder = root / "both" / h
        rep = json.loads((folder / "train_report.json").read_text())
        assert (folder / "cfg.json").is_file() and rep["hook"] == h
        assert json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"] == h
    saved = json.loads((root / "both" / "train_report.json").read_text())
    assert [r["hook"] for r in saved["reports"]] == list(HOOKS) and saved["collect_seconds"] > 0
    assert not (root / "both" / ".partial").exists() and not (root / "both" / "cfg.json").exists()
    # the deeper hook's SAE is the one a one-hook run trains, bit for bit
    assert _same(_weights(root / "both" / HOOKS[1]), _weights(root / "one"))
    assert summary.reports[1].explained_variance == one.explained_variance


def test_spilled_activations_train_the_same_saes(multi, org, tmp_path):
    root, summary, *_ = multi
    spilled = train_sae(org.load_base(), org.tokenizer, _small(hooks=HOOKS, max_memory_gb=0.0), tmp_path / "s",
                        documents=_docs(org), progress=False)
    assert spilled.spilled
    for a, b in zip(summary.reports, spilled.reports):
        assert _same(_weights(root / "both" / a.hook), _weights(tmp_path / "s" / b.hook))
        assert (a.explained_variance, a.n_train, a.n_heldout, a.outlier_norm) == (
            b.explained_variance, b.n_train, b.n_heldout, b.outlier_norm)


def test_several_hooks_resume_skips_finished_saes(multi, org, tmp_path, monkeypatch):
    """Killed while training the second hook (spilled): the rerun keeps the first SAE and the activations."""
    import drift_monitor.training.train_sae as T

    root, summary, *_ = multi
    orig = T._train_one

    def dies_on_second(*a, **kw):
        if a[3] == HOOKS[1]:
            raise KeyboardInterrupt
        return orig(*a, **kw)

    monkeypatch.setattr(T, "_train_one", dies_on_second)
    settings = _small(hooks=HOOKS, max_memory_gb=0.0)
    with pytest.raises(KeyboardInterrupt):
        train_sae(org.load_base(), org.tokenizer, settings, tmp_path / "r", documents=_docs(org), progress=False)
    first = tmp_path / "r" / HOOKS[0] / "cfg.json"
    assert first.is_file() and (tmp_path / "r" / ".partial" / HOOKS[1] / "activations.npy").is_file()
    mtime = first.stat().st_mtime_ns
    trained: list[str] = []
    monkeypatch.setattr(T, "_train_one", lambda *a, **kw: trained.append(a[3]) or orig(*a, **kw))
    monkeypatch.setattr(T, "collect_activations", lambda *a, **kw: pytest.fail("activations collected again"))
    again = train_sae(org.load_base(), org.tokenizer, settings, tmp_path / "r", documents=_docs(org),
                      progress=False)
    assert trained == [HOOKS[1]] and first.stat().st_mtime_ns == mtime
    assert [r.explained_variance for r in again.reports] == [r.explained_variance for r in summary.reports]
    assert _same(_weights(tmp_path / "r" / HOOKS[1]), _weights(root / "both" / HOOKS[1]))
    assert not (tmp_path / "r" / ".partial").exists()


def test_heldout_share_comes_from_what_is_collected(org, tmp_path):
    """A user's case at small scale: the corpus's first 5% of sequences hold more tokens than
    --tokens. The held-out share was taken from the whole corpus, so every collected token was held
    out ("only 0 training tokens"); it is now 5% of the sequences collected."""
    from drift_monitor.training.collect import tokenize_documents

    docs = _docs(org) * 4
    seqs = tokenize_documents(docs, org.tokenizer, 128)
    tokens = 3000
    assert sum(len(s) - 1 for s in seqs[:round(0.05 * len(seqs))]) > tokens  # the user's situation
    settings = _small(hook=org.hook, tokens=tokens, batch_size=512, train_tokens=2048)
    rep = train_sae(org.load_base(), org.tokenizer, settings, tmp_path / "sae", documents=docs, progress=False)
    collected = rep.n_train + rep.n_heldout + rep.n_excluded
    assert collected == tokens and 0 < rep.n_heldout < 0.1 * tokens and rep.n_train > 0.85 * tokens


def test_too_few_training_tokens_say_collected_heldout_and_needed(org, tmp_path):
    with pytest.raises(TrainSAEError) as e:
        train_sae(org.load_base(), org.tokenizer, _small(hook=org.hook, tokens=800, batch_size=1024), tmp_path / "sae",
                  documents=_docs(org), progress=False)
    msg = str(e.value)
    assert "fewer than one batch (1,024)" in msg and "800 tokens collected" in msg and "held out" in msg
    assert "needed: at least 1,024 training tokens" in msg and "raise --tokens" in msg


def test_hooks_settings():
    assert TrainSAESettings(hooks="a,b").hooks == ("a", "b")
    assert TrainSAESettings(hooks=["a", "b,a"]).hooks == ("a", "b")
    s = TrainSAESettings(hook="h")
    assert s.hooks == ("h",) and s.hook == "h" and TrainSAESettings(hooks=["h"]).hook == "h"
    assert TrainSAESettings(hooks=["a", "b"]).hook is None
    with pytest.raises(TrainSAEError, match="not both"):
        TrainSAESettings(hook="a", hooks=["b"])
    with pytest.raises(TrainSAEError, match="no hook"):
        TrainSAESettings()


def test_cli_takes_several_hooks(org, tmp_path, capsys):
    from drift_monitor.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n"
                            for p in org.pairs["train"]))
    out = tmp_path / "saes"
    rc = main(["train-sae", "--model", str(org.base_dir), "--hook", HOOKS[0] + "," + HOOKS[1], "--hook", HOOKS[0],
               "--out", str(out), "--data", str(data), "--tokens", "6000", "--train-tokens", "4096",
               "--batch-size", "1024", "--max-memory-gb", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "2 SAEs in" in printed and "spilled to disk" in printed
    assert all((out / h / "cfg.json").is_file() for h in HOOKS)
    assert f"--sae {HOOKS[0]}={out / HOOKS[0]} --sae {HOOKS[1]}={out / HOOKS[1]}" in printed


def test_cli_auto_picks_the_layers(org, tmp_path, capsys):
    """``--hook auto:2`` through a whole run: the layers ``probe.capture.auto_hooks`` names are the
    ones trained, each into its own folder, and the printed ``--sae`` line names them."""
    from drift_monitor.cli import main
    from drift_monitor.probe.capture import auto_hooks

    chosen = auto_hooks(org.load_base(), 2)
    assert len(chosen) == 2
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n"
                            for p in org.pairs["train"]))
    out = tmp_path / "saes"
    rc = main(["train-sae", "--model", str(org.base_dir), "--hook", "auto:2", "--out", str(out), "--data", str(data),
               "--tokens", "6000", "--train-tokens", "4096", "--batch-size", "1024", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and all((out / h / "cfg.json").is_file() for h in chosen)
    assert f"--sae {chosen[0]}={out / chosen[0]} --sae {chosen[1]}={out / chosen[1]}" in printed
