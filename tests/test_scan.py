"""`drift-monitor scan` (and `runs`/`export`) against a real Trainer run on a tiny offline model.

The central check: scanning the checkpoints of a run that the callback monitored reproduces
the callback's stored figures at those steps, for full-model and for PEFT adapter checkpoints.
Then resumability, broken and bad input (one line, no traceback, non-zero exit), a real Debian
Pushgateway, and the export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import train_fixtures as tf
from servers import free_port, http_get, need, start, stop, wait_ready

import drift_monitor.offline.scan as scan_mod
from drift_monitor.callbacks import DriftMonitorCallback
from drift_monitor.cli import main
from drift_monitor.records import is_adapter_hook
from drift_monitor.store import StoreReader

HOOK = tf.HOOK
TOL = 1e-4
TRAINER_EXTRAS = shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
FEATURE_KEY = ["step", "hook", "category", "feature"]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base model + tokenizer saved with save_pretrained, the SAE, the probe file; and a Trainer
    run (full-model checkpoints every 2 steps) monitored by the callback into callback.duckdb."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tf.torch_threads()
    root = tmp_path_factory.mktemp("scan-world")
    tok, model, sae_dir, ps, base = tf.saved_world(root)
    # the saved tokenizer is the one the callback used: same class, template and token ids
    tok2 = AutoTokenizer.from_pretrained(base)
    assert isinstance(tok2, PreTrainedTokenizerFast) and tok2.chat_template == tok.chat_template
    msgs = [{"role": "user", "content": ps.records[0].prompt}]
    assert tok2.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    assert tok2(ps.records[0].prompt)["input_ids"] == tok(ps.records[0].prompt)["input_ids"]

    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": r.id, "category": r.category, "prompt": r.prompt,
                                          **({"response": r.response} if r.response is not None else {})}) + "\n"
                              for r in ps.records))
    w = SimpleNamespace(root=root, tok=tok, sae_dir=sae_dir, base=base, probes=probes)
    w.full = _train(w, model, "full")
    return w


@pytest.fixture(scope="module")
def adapter_run(world):
    """The same base wrapped by get_peft_model, trained with adapter checkpoints every 2 steps."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world.base)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    return _train(world, peft_model, "adapter")


def _train(w, model, name: str) -> SimpleNamespace:
    from transformers import Trainer

    d = w.root / name
    db = d / "callback.duckdb"
    cfg = tf.config(d, w.sae_dir, str(w.probes), every_n_steps=2, fail_fast=True, db_path=str(db))
    cb = DriftMonitorCallback(cfg, w.tok)
    args = tf.training_args(d, max_steps=4, save_strategy="steps", save_steps=2)
    Trainer(model=model, args=args, train_dataset=tf.lm_dataset(w.tok), callbacks=[cb]).train()
    out = d / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert tf.snapshot_steps(str(db), cb.run_id) == [0, 2, 4]
    return SimpleNamespace(out=out, db=db, run_id=cb.run_id, batch_size=cfg.probes.batch_size)


@pytest.fixture(autouse=True)
def scan_cache(tmp_path, monkeypatch):
    """The scan's baseline cache: per test (the first scan of a test measures its own base),
    and never the user's ~/.cache."""
    monkeypatch.setenv("DRIFT_MONITOR_CACHE", str(tmp_path / "scan-cache"))


def scan_args(w, db: Path, *extra: str, checkpoints: Path | None = None, run: str | None = "run") -> list[str]:
    args = ["scan", "--base-model", str(w.base), "--sae", f"{HOOK}={w.sae_dir}", "--db", str(db),
            "--probes", str(w.probes), "--batch-size", str(w.full.batch_size)]
    if checkpoints is not None:
        args += ["--checkpoints", str(checkpoints)]
    if run is not None:
        args += ["--run-name", run]
    return args + list(extra)


def count_loads(monkeypatch, fail_at: int | None = None, exc: type[BaseException] = KeyboardInterrupt) -> list:
    """Count drift_monitor.offline.scan.load_model calls; raise ``exc`` at call number ``fail_at``."""
    calls: list = []
    real = scan_mod.load_model

    def spy(path, **kw):
        calls.append(Path(path))
        if fail_at is not None and len(calls) == fail_at:
            raise exc()
        return real(path, **kw)

    monkeypatch.setattr(scan_mod, "load_model", spy)
    return calls


# ---------------------------------------------------------------------------------- comparisons
def _rows(df: pd.DataFrame, key: list[str], steps=None, step_map=None) -> pd.DataFrame:
    if step_map:
        df = df.assign(step=df.step.map(lambda s: step_map.get(s, s)))
    if steps is not None:
        df = df[df.step.isin(steps)]
    return df.sort_values(key).reset_index(drop=True)


def metrics_of(db, run_id, steps=None, step_map=None) -> pd.DataFrame:
    """The probe hooks' metrics (the callback's LoRA runs also store adapter signals, which the
    scan does not compute)."""
    df = StoreReader(db).metric_series(run_id)
    return _rows(df[~df.hook.map(is_adapter_hook)], ["step", "hook", "name"], steps, step_map)


def table_of(db, run_id, table: str, key: list[str], steps=None, step_map=None) -> pd.DataFrame:
    with StoreReader(db)._connection() as con:
        df = con.execute(f"SELECT * EXCLUDE (run_id) FROM {table} WHERE run_id = ?", [run_id]).df()
    return _rows(df, key, steps, step_map)


def features_of(db, run_id, steps=None, step_map=None) -> pd.DataFrame:
    return table_of(db, run_id, "feature_stats", FEATURE_KEY, steps, step_map)


def alerts_of(db, run_id) -> list[tuple]:
    df = StoreReader(db).alerts(run_id)
    return sorted(zip(df.step, df.hook, df.rule, df.severity, df.status, df.resolved_step.fillna(-1)))


def assert_close_frames(a: pd.DataFrame, b: pd.DataFrame, key: list[str], what: str) -> None:
    assert len(a) == len(b) and len(a) > 0, f"{what}: {len(a)} rows vs {len(b)}"
    assert (a[key].astype(str).to_numpy() == b[key].astype(str).to_numpy()).all(), f"{what}: different rows"
    for col in a.columns.difference(key):
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype.kind in "fc":
            assert np.allclose(x, y, rtol=0, atol=TOL, equal_nan=True), \
                f"{what}.{col}: max |diff| {np.nanmax(np.abs(x - y))}"
        else:
            assert (x == y).all(), f"{what}.{col} differs"


def assert_matches_callback(run, db, run_id, steps=(0, 2, 4), step_map=None) -> None:
    """Every stored metric, feature-stat and refusal row of the scan equals the callback's at
    ``steps`` (≤ 1e-4); ``step_map`` renames the scan's steps to the callback's."""
    assert sorted(set(metrics_of(db, run_id, step_map=step_map).step)) == sorted(steps)
    assert_close_frames(metrics_of(run.db, run.run_id, steps), metrics_of(db, run_id, steps, step_map),
                        ["step", "hook", "name"], "metrics")
    assert_close_frames(features_of(run.db, run.run_id, steps), features_of(db, run_id, steps, step_map),
                        FEATURE_KEY, "feature_stats")
    key = ["step", "hook", "feature"]
    assert_close_frames(table_of(run.db, run.run_id, "refusal_features", key, steps),
                        table_of(db, run_id, "refusal_features", key, steps, step_map), key, "refusal_features")


def assert_whole_snapshots(db, run_id) -> None:
    """Every stored (step, hook) has exactly the rows its snapshots row announces, once."""
    with StoreReader(db)._connection() as con:
        snaps = con.execute("SELECT step, hook, n_feature_rows, n_metrics, n_refusal_rows FROM snapshots "
                            "WHERE run_id = ?", [run_id]).fetchall()
        assert len({(s, h) for s, h, *_ in snaps}) == len(snaps)
        for step, hook, nf, nm, nr in snaps:
            got = [con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ? AND step = ? AND hook = ?",
                               [run_id, step, hook]).fetchall()[0][0]
                   for t in ("feature_stats", "metrics", "refusal_features")]
            assert got == [nf, nm, nr], f"step {step}: partial snapshot {got} vs {[nf, nm, nr]}"
        for t in ("feature_stats", "metrics", "refusal_features"):
            orphans = con.execute(f"SELECT count(*) FROM {t} x WHERE run_id = ? AND NOT EXISTS (SELECT 1 FROM "
                                  "snapshots s WHERE s.run_id = x.run_id AND s.step = x.step AND s.hook = x.hook)",
                                  [run_id]).fetchall()[0][0]
            assert orphans == 0, f"{t}: rows without a snapshot"


def run_status(db, run_id) -> str:
    runs = StoreReader(db).runs()
    return str(runs[runs.run_id == run_id].status.iloc[0])


# ---------------------------------------------------------------------------------- 1. full checkpoints
def test_full_checkpoints_reproduce_the_callback(world, tmp_path, capsys):
    db = tmp_path / "scan.duckdb"
    assert main(scan_args(world, db, checkpoints=world.full.out, run="full")) == 0  # progress bar on
    out, err = capsys.readouterr()
    assert "run full: 2 scanned, 0 already stored, 0 failed" in out
    assert "Traceback" not in err
    assert_matches_callback(world.full, db, "full")
    # alerts evaluated over the scanned sequence exactly as in the callback
    assert alerts_of(world.full.db, world.full.run_id) == alerts_of(db, "full")
    assert StoreReader(db).runs().probe_hash.iloc[0] == StoreReader(world.full.db).runs().probe_hash.iloc[0]
    snaps = StoreReader(db).snapshots("full")
    assert snaps.step.tolist() == [0, 2, 4] and snaps.is_base.tolist() == [True, False, False]
    assert run_status(db, "full") == "finished"
    # `drift-monitor runs`
    assert main(["runs", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "full" in out and "finished" in out


def test_final_output_folder_beside_its_checkpoints(world, tmp_path):
    """trainer.save_model() + save_state() put the final weights and trainer_state.json into the
    output folder itself: the same step as the last checkpoint, scanned once, not an error."""
    out = tmp_path / "out"
    shutil.copytree(world.full.out, out, ignore=TRAINER_EXTRAS)
    for name in ("config.json", "model.safetensors", "trainer_state.json"):
        shutil.copy(out / "checkpoint-4" / name, out / name)
    found = scan_mod.discover([str(out)])
    assert [(c.step, c.path.name, c.kind) for c in found] == [(2, "checkpoint-2", "full"), (4, "checkpoint-4", "full")]
    (out / "trainer_state.json").write_text(json.dumps({"global_step": 6}))  # trained on after checkpoint-4
    assert [(c.step, c.path) for c in scan_mod.discover([str(out)])][-1] == (6, out)
    # a glob over the checkpoints, in step order (checkpoint-10 after checkpoint-4)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-10")
    (out / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    assert [c.step for c in scan_mod.discover([str(out / "checkpoint-*")])] == [2, 4, 10]


# ---------------------------------------------------------------------------------- 2. adapters
def test_adapter_checkpoints_reproduce_the_callback_loading_the_base_once(world, adapter_run, tmp_path,
                                                                           monkeypatch, capsys):
    calls = count_loads(monkeypatch)
    db = tmp_path / "scan.duckdb"
    assert main(scan_args(world, db, "--no-progress", checkpoints=adapter_run.out, run="lora")) == 0
    out = capsys.readouterr().out
    assert calls == [world.base], f"the base must be loaded once and nothing else: {calls}"
    assert out.count(" adapter  scanned ") == 2
    assert_matches_callback(adapter_run, db, "lora")
    assert alerts_of(adapter_run.db, adapter_run.run_id) == alerts_of(db, "lora")
    # the scan records the adapter signals of the checkpoints it loads, equal to the callback's
    cb, sc = (StoreReader(d).metric_series(r, hook_prefix="adapter") for d, r in ((adapter_run.db, adapter_run.run_id),
                                                                                   (db, "lora")))
    norms = ["adapter_A_norm", "adapter_B_norm", "adapter_BA_norm"]
    sc = sc[sc.name.isin(norms)].set_index(["step", "hook", "name"]).value.sort_index()
    cb = cb[cb.name.isin(norms) & cb.step.isin(sorted(set(s for s, _, _ in sc.index)))]
    assert len(sc) > 0 and sorted(set(s for s, _, _ in sc.index)) == [2, 4]
    assert sc.to_numpy() == pytest.approx(
        cb.set_index(["step", "hook", "name"]).value.sort_index().to_numpy(), rel=1e-6)


def test_mixed_full_and_adapter_checkpoints_in_one_scan(world, adapter_run, tmp_path, monkeypatch, capsys):
    """Both kinds in one scan: a full checkpoint loads on its own, an adapter onto the one base."""
    calls = count_loads(monkeypatch)
    db = tmp_path / "scan.duckdb"
    args = scan_args(world, db, "--no-progress", "--model", f"2={adapter_run.out / 'checkpoint-2'}",
                     "--model", f"5={world.full.out / 'checkpoint-4'}", run="mixed")
    assert main(args) == 0
    assert calls == [world.base, world.full.out / "checkpoint-4"]
    m = metrics_of(db, "mixed")
    ev = m[m.name == "explained_variance"].set_index("step").value
    cb_full = metrics_of(world.full.db, world.full.run_id)
    cb_lora = metrics_of(adapter_run.db, adapter_run.run_id)
    assert ev[2] == pytest.approx(cb_lora[(cb_lora.step == 2) & (cb_lora.name == "explained_variance")].value.item(),
                                  abs=TOL)
    assert ev[5] == pytest.approx(cb_full[(cb_full.step == 4) & (cb_full.name == "explained_variance")].value.item(),
                                  abs=TOL)


def test_adapter_of_another_base_fails_alone(world, adapter_run, tmp_path, monkeypatch, capsys):
    """The first adapter does not fit (PEFT has already touched the base when it fails): it is
    reported, and the adapters after it still load onto the one base and give the callback's figures."""
    calls = count_loads(monkeypatch)
    bad = _bad_adapter(tmp_path, world) / "checkpoint-3"
    db = tmp_path / "scan.duckdb"
    args = scan_args(world, db, "--no-progress", "--model", f"1={bad}", checkpoints=adapter_run.out, run="lora")
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "run lora: 2 scanned, 0 already stored, 1 failed" in out
    assert "(step 1) failed:" in err and "size mismatch" in err and "Traceback" not in err
    assert calls == [world.base]
    assert_matches_callback(adapter_run, db, "lora")


# ---------------------------------------------------------------------------------- 3. base/chat pair
def test_model_step_path_pair(world, tmp_path, monkeypatch, capsys):
    calls = count_loads(monkeypatch)
    db = tmp_path / "scan.duckdb"
    chat = world.full.out / "checkpoint-4"
    args = scan_args(world, db, "--no-progress", "--model", f"0={world.base}", "--model", f"1000={chat}", run="pair")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "run pair: 1 scanned, 0 already stored, 0 failed" in out
    assert calls == [world.base, chat], "step 0 is the base itself: measured once, not loaded twice"
    snaps = StoreReader(db).snapshots("pair")
    assert snaps.step.tolist() == [0, 1000] and snaps.is_base.tolist() == [True, False]
    # the chat model is checkpoint-4: the callback's figures at step 4, stored at step 1000
    assert_matches_callback(world.full, db, "pair", steps=(0, 4), step_map={1000: 4})
    # a different model at step 0 would overwrite the baseline: refused up front
    other = tmp_path / "other"
    shutil.copytree(world.full.out / "checkpoint-2", other, ignore=TRAINER_EXTRAS)
    assert main(scan_args(world, tmp_path / "x.duckdb", "--no-progress", "--model", f"0={other}", run="x")) == 2
    err = capsys.readouterr().err
    assert "step 0" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- 4. resumable
def test_rerun_skips_force_rescans(world, tmp_path, capsys):
    db = tmp_path / "scan.duckdb"
    args = scan_args(world, db, "--no-progress", checkpoints=world.full.out, run="again")
    assert main(args) == 0
    first = metrics_of(db, "again")
    capsys.readouterr()
    assert main(args) == 0
    assert "run again: 0 scanned, 2 already stored, 0 failed" in capsys.readouterr().out
    snaps = StoreReader(db).snapshots("again")
    assert list(zip(snaps.step, snaps.hook)) == [(0, HOOK), (2, HOOK), (4, HOOK)]
    assert_close_frames(first, metrics_of(db, "again"), ["step", "hook", "name"], "metrics after rerun")
    assert alerts_of(db, "again") == alerts_of(world.full.db, world.full.run_id)
    assert main(args + ["--force"]) == 0
    assert "run again: 2 scanned, 0 already stored, 0 failed" in capsys.readouterr().out
    assert len(StoreReader(db).snapshots("again")) == 3
    assert_whole_snapshots(db, "again")
    assert_matches_callback(world.full, db, "again")
    assert alerts_of(db, "again") == alerts_of(world.full.db, world.full.run_id)
    assert len(StoreReader(db).runs()) == 1


def test_resumed_scan_with_other_probes_or_settings_is_refused(world, tmp_path, capsys):
    """A rerun into a stored run must measure what the run measured: other probes (other tokens)
    or another setting would store steps that do not compare. Refused with one line naming
    --run-name and --force; --force rescans every step with the new settings."""
    db = tmp_path / "scan.duckdb"
    args = scan_args(world, db, "--no-progress", checkpoints=world.full.out, run="r")
    assert main(args) == 0
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(world.probes.read_text().splitlines(keepends=True)[:-3]))
    stored = metrics_of(db, "r")
    capsys.readouterr()
    for changed, words in ((["--probes", str(fewer)], "the probes"), (["--batch-size", "3"], "batch_size")):
        other = [a if a != str(world.probes) else changed[1] for a in args] if changed[0] == "--probes" \
            else args + changed
        assert main(other) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "--run-name" in err and "--force" in err, err
        assert_close_frames(stored, metrics_of(db, "r"), ["step", "hook", "name"], "nothing written")
    swapped = [a if a != str(world.probes) else str(fewer) for a in args]
    assert main(swapped + ["--force"]) == 0
    assert len(StoreReader(db).runs()) == 1 and len(StoreReader(db).snapshots("r")) == 3
    capsys.readouterr()
    assert main(swapped) == 0  # the run now holds the new settings: a plain rerun resumes it
    assert "run r: 0 scanned, 2 already stored, 0 failed" in capsys.readouterr().out


def test_scan_into_a_store_directory_writes_its_own_file_and_resumes(world, tmp_path, capsys):
    """--db DIR: the scan writes DIR/<run>.duckdb beside other runs' files, readers of DIR see it,
    and a rerun into DIR resumes it (nothing scanned twice)."""
    store_dir = tmp_path / "runs"
    store_dir.mkdir()
    shutil.copy(world.full.db, store_dir / "callback.duckdb")  # another run's file already there
    args = scan_args(world, store_dir, "--no-progress", checkpoints=world.full.out, run="dir-scan")
    assert main(args) == 0
    assert sorted(p.name for p in store_dir.glob("*.duckdb")) == ["callback.duckdb", "dir-scan.duckdb"]
    runs = StoreReader(store_dir).runs()
    assert set(runs.name) >= {"dir-scan"} and world.full.run_id in set(runs.run_id)
    assert_matches_callback(world.full, store_dir / "dir-scan.duckdb", "dir-scan")
    capsys.readouterr()
    assert main(args) == 0
    assert "run dir-scan: 0 scanned, 2 already stored, 0 failed" in capsys.readouterr().out


def test_interrupted_scan_leaves_whole_snapshots_and_a_rerun_finishes(world, tmp_path, monkeypatch, capsys):
    db = tmp_path / "scan.duckdb"
    args = scan_args(world, db, "--no-progress", checkpoints=world.full.out, run=None)  # derived run id
    with monkeypatch.context() as m:
        calls = count_loads(m, fail_at=3)  # base, checkpoint-2, then Ctrl-C while loading checkpoint-4
        assert main(args) == 130
        assert calls[-1] == world.full.out / "checkpoint-4"
    assert "interrupted" in capsys.readouterr().err
    runs = StoreReader(db).runs()
    assert len(runs) == 1
    run_id = runs.run_id.iloc[0]
    assert StoreReader(db).steps(run_id) == [0, 2]
    assert_whole_snapshots(db, run_id)
    assert runs.status.iloc[0] != "finished", "an interrupted scan is not finished"

    calls = count_loads(monkeypatch)
    assert main(args) == 0
    assert f"run {run_id}: 1 scanned, 1 already stored, 0 failed" in capsys.readouterr().out
    assert calls == [world.base, world.full.out / "checkpoint-4"], "only the missing step is loaded"
    assert StoreReader(db).steps(run_id) == [0, 2, 4]
    assert_whole_snapshots(db, run_id)
    assert_matches_callback(world.full, db, run_id)
    # the resumed run replays the stored steps, so no alert is raised twice or lost
    assert alerts_of(db, run_id) == alerts_of(world.full.db, world.full.run_id)
    assert run_status(db, run_id) == "finished"


# ---------------------------------------------------------------------------------- 5. broken checkpoint
def test_broken_checkpoint_is_reported_and_the_rest_scanned(world, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(world.full.out, out, ignore=TRAINER_EXTRAS)
    weights = out / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated on disk: discovery is fine, loading fails
    db = tmp_path / "scan.duckdb"
    assert main(scan_args(world, db, "--no-progress", checkpoints=out, run="broken")) == 1
    stdout, err = capsys.readouterr()
    assert "run broken: 1 scanned, 0 already stored, 1 failed" in stdout
    line = next(ln for ln in err.splitlines() if "checkpoint-2" in ln)
    assert "(step 2) failed:" in line and len(line.split("failed:", 1)[1].strip()) > 10, line
    assert "Traceback" not in err
    assert StoreReader(db).steps("broken") == [0, 4]
    assert_matches_callback(world.full, db, "broken", steps=(0, 4))
    assert run_status(db, "broken") == "failed"


# ---------------------------------------------------------------------------------- 6. bad input
def _bad_adapter(tmp: Path, world) -> Path:
    """A LoRA adapter trained (saved) on a model of another hidden size."""
    from peft import LoraConfig, get_peft_model

    other = tf.build_llama(len(world.tok), hidden=48, layers=3, heads=4, seed=1)
    path = tmp / "bad-adapter" / "checkpoint-3"
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return path.parent


def _no_weights(tmp: Path, world) -> Path:
    path = tmp / "no-weights"
    shutil.copytree(world.full.out, path, ignore=TRAINER_EXTRAS)
    (path / "checkpoint-4" / "model.safetensors").unlink()
    return path


def _empty(tmp: Path, world) -> Path:
    (tmp / "empty" / "logs").mkdir(parents=True)
    return tmp / "empty"


BAD_CHECKPOINTS = {
    "missing-directory": (lambda tmp, w: tmp / "nope", 2, ["nope", "no such directory"]),
    "no-checkpoints": (_empty, 2, ["empty", "no checkpoint-N folders"]),
    "missing-weights": (_no_weights, 2, ["checkpoint-4", "no model weights"]),
    "adapter-base-mismatch": (_bad_adapter, 1, ["checkpoint-3", "does not fit the base model", "size mismatch"]),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_give_one_clear_line(world, tmp_path, capsys, case):
    make, code, needles = BAD_CHECKPOINTS[case]
    path = make(tmp_path, world)
    assert main(scan_args(world, tmp_path / "scan.duckdb", "--no-progress", checkpoints=path)) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next((ln for ln in err.splitlines() if ln.startswith("drift-monitor:")), "")
    for needle in needles:
        assert needle in line, f"{case}: {needle!r} not in {err!r}"


def test_sae_of_the_wrong_width(world, tmp_path, capsys):
    sae_dir = tmp_path / "sae48"
    tf.build_sae(48, 64).save_model(sae_dir)
    args = scan_args(world, tmp_path / "scan.duckdb", "--no-progress", checkpoints=world.full.out)
    args[args.index("--sae") + 1] = f"{HOOK}={sae_dir}"
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("drift-monitor:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "d_in=48" in lines[0] and "size 32" in lines[0] and str(sae_dir) in lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["--model", "x=foo"], "not an integer"),
    (["--model", "5"], "expected STEP=PATH"),
    (["--model", "5=/no/such/model"], "does not exist"),
    (["--checkpoints", "/no/such/glob-*"], "matches nothing"),
    ([], "no checkpoints to scan"),
])
def test_bad_arguments(world, tmp_path, capsys, argv, needle):
    assert main(scan_args(world, tmp_path / "scan.duckdb", "--no-progress", *argv)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_base_model(world, tmp_path, capsys):
    args = scan_args(world, tmp_path / "scan.duckdb", "--no-progress", checkpoints=world.full.out)
    args[args.index("--base-model") + 1] = str(tmp_path / "no-base")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--base-model" in err and "no-base" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------- 7. Pushgateway
def test_pushgateway_receives_the_run_aggregates(world, tmp_path, capsys):
    from prometheus_client.parser import text_string_to_metric_families

    binary = need("prometheus-pushgateway")
    port = free_port()
    log = tmp_path / "pushgateway.log"
    proc = start([binary, f"--web.listen-address=127.0.0.1:{port}",
                  f"--persistence.file={tmp_path / 'pushgateway.data'}", "--log.level=warn"], log)
    try:
        wait_ready(f"http://127.0.0.1:{port}/-/ready", proc, log)
        db = tmp_path / "scan.duckdb"
        gateway = f"http://127.0.0.1:{port}"
        assert main(scan_args(world, db, "--no-progress", "--pushgateway", gateway, "--keep-pushed",
                              checkpoints=world.full.out, run="pushed")) == 0
        text = http_get(f"{gateway}/metrics")
        # without --keep-pushed the finished scan deletes its group: nothing of it stays to be scraped
        assert main(scan_args(world, tmp_path / "other.duckdb", "--no-progress", "--pushgateway", gateway,
                              checkpoints=world.full.out, run="deleted")) == 0
        after = http_get(f"{gateway}/metrics")
    finally:
        stop(proc)
    assert 'run="deleted"' not in after and 'run="pushed"' in after
    samples = {(s.name, s.labels.get("run"), s.labels.get("hook")): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    m = metrics_of(db, "pushed")
    last_ev = m[(m.step == 4) & (m.name == "explained_variance")].value.item()
    assert samples[("drift_monitor_explained_variance", "pushed", HOOK)] == pytest.approx(last_ev, rel=1e-9)
    assert samples[("drift_monitor_last_step", "pushed", None)] == 4
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------- 8. export
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_matches_the_db(world, tmp_path, capsys, fmt):
    db = tmp_path / "scan.duckdb"
    assert main(scan_args(world, db, "--no-progress", checkpoints=world.full.out, run="exported")) == 0
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--db", str(db), "--run", "exported", "--format", fmt, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    read = pd.read_csv if fmt == "csv" else pd.read_parquet
    with StoreReader(db)._connection() as con:
        for table in ("runs", "snapshots", "metrics", "feature_stats", "refusal_features", "alerts"):
            path = out / f"exported_{table}.{fmt}"
            assert str(path) in printed and path.is_file()
            got = read(path)
            want = con.execute(f"SELECT * FROM {table} WHERE run_id = 'exported'").df()
            assert list(got.columns) == list(want.columns) and len(got) == len(want), table
            assert (got.run_id == "exported").all()
    got = read(out / f"exported_metrics.{fmt}").sort_values(["step", "hook", "name"]).reset_index(drop=True)
    assert_close_frames(got[["step", "hook", "name", "value"]], metrics_of(db, "exported"),
                        ["step", "hook", "name"], "exported metrics")
    feats = read(out / f"exported_feature_stats.{fmt}").drop(columns="run_id")
    assert_close_frames(feats.sort_values(FEATURE_KEY).reset_index(drop=True), features_of(db, "exported"),
                        FEATURE_KEY, "exported feature_stats")

    assert main(["export", "--db", str(db), "--run", "nope", "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no run with id or name 'nope'" in err and "exported" in err and "Traceback" not in err
