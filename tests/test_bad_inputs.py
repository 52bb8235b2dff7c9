"""Bad input, table-driven: each case gives one line that names the fix, through the CLI and the API.

Through the CLI (in-process ``drift_monitor.cli.main``) a case asserts the exit code (2 for our
own errors), that stderr holds exactly one line and no traceback, and the words that name the
fix; through the API it asserts the error type (a :class:`DriftMonitorError`) and the same
words in a one-line message. The reverse is tested too: a bug of ours (an exception that is
not a DriftMonitorError) keeps its traceback and asks for a report, with exit 1.

Everything is built offline in a few seconds: a tiny Llama saved with ``save_pretrained``, an
sae-lens SAE saved with ``save_model``, and variants of them damaged on disk. The read-only
file system is a real read-only tmpfs mount (we run as root), unmounted in the fixture.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import train_fixtures as tf

from drift_monitor import MonitorConfig, ProbeSet
from drift_monitor.alerts import load_rules
from drift_monitor.cli import build_parser, main
from drift_monitor.errors import ConfigError, DriftMonitorError
from drift_monitor.offline.loading import load_model
from drift_monitor.offline.scan import discover
from drift_monitor.offline.verify_run import parse_feature_spec
from drift_monitor.probe.probes import ProbeRecord
from drift_monitor.probe.saes import load_sae
from drift_monitor.records import VerifySettings
from drift_monitor.store import Store, StoreError, StoreReader

HOOK = tf.HOOK
PROBE = {"id": "a", "category": "general", "prompt": "hello world"}


# ------------------------------------------------------------------------------------------ world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A saved base model + tokenizer, its SAE, a small probe file, a Trainer-style output folder
    (checkpoint-2 with a trainer_state.json) and a DB holding one run with snapshots."""
    from store_fixtures import make_snapshot

    tf.torch_threads()
    root = tmp_path_factory.mktemp("bad-inputs")
    tok, model, sae_dir, ps, base = tf.saved_world(root)
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps({"id": r.id, "category": r.category, "prompt": r.prompt}) + "\n"
                              for r in ps.records[:6]))
    ckpt = root / "out" / "checkpoint-2"
    shutil.copytree(base, ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    db = root / "runs.duckdb"
    with Store(db, run_id="r1") as s:
        s.start_run("r1")
        s.write(make_snapshot(1, d_sae=64, hooks=(HOOK,)))
    return SimpleNamespace(root=root, base=base, sae=sae_dir, probes=probes, out=ckpt.parent, db=db)


@pytest.fixture(autouse=True)
def scan_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFT_MONITOR_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def readonly_dir(tmp_path):
    """A real read-only file system: a tmpfs mounted ``ro`` (the test needs root; it fails, never
    skips, without it)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ------------------------------------------------------------------------------ building blocks
def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def probe_file(tmp: Path, *lines: dict | bytes | str) -> Path:
    """A probe file whose first line is a good probe and whose next lines are ``lines``."""
    body = [json.dumps(PROBE).encode()]
    body += [ln if isinstance(ln, bytes) else (ln if isinstance(ln, str) else json.dumps(ln)).encode()
             for ln in lines]
    return write(tmp / "p.jsonl", b"\n".join(body) + b"\n")


def sae_variant(w, tmp: Path, edit: Callable[[Path], None]) -> Path:
    """A copy of the world's SAE folder, damaged by ``edit``."""
    d = tmp / "sae"
    shutil.copytree(w.sae, d)
    edit(d)
    return d


def edit_cfg(**changes) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        cfg = json.loads((d / "cfg.json").read_text())
        cfg.update(changes)
        (d / "cfg.json").write_text(json.dumps(cfg))
    return edit


def truncate(name: str) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return edit


def nan_weights(everywhere: bool) -> Callable[[Path], None]:
    def edit(d: Path) -> None:
        sae = load_sae(str(d))  # still the good copy
        with torch.no_grad():
            if everywhere:
                for p in sae.parameters():
                    p.fill_(float("nan"))
            else:
                sae.W_dec[3, 5] = float("nan")
        shutil.rmtree(d)
        sae.save_model(d)
    return edit


def scan(w, tmp: Path, *extra: str, sae: Path | None = None, checkpoints: Path | None = None,
         db: Path | None = None) -> list[str]:
    args = ["scan", "--base-model", str(w.base), "--sae", f"{HOOK}={sae or w.sae}",
            "--db", str(db or tmp / "scan.duckdb"), "--probes", str(w.probes), "--no-progress", *extra]
    if checkpoints is not None or not any(a.startswith("--model") or a == "--checkpoints" for a in extra):
        args += ["--checkpoints", str(checkpoints or w.out)]
    return args


def trainer_out(w, tmp: Path, state: str) -> Path:
    """A Trainer output folder whose one checkpoint has ``state`` as its trainer_state.json."""
    out = tmp / "out"
    shutil.copytree(w.out, out)
    (out / "checkpoint-2" / "trainer_state.json").write_text(state)
    return out


def damaged_base(w, tmp: Path) -> Path:
    d = tmp / "base"
    shutil.copytree(w.base, d)
    truncate("model.safetensors")(d)
    return d


def config_file(tmp: Path, text: str, name: str = "cfg.yaml") -> Path:
    return write(tmp / name, text)


BAD_YAML = "metrics:\n  refusal_top_k: [1\n  drift_ratio: 2\n"


# ------------------------------------------------------------------------------------ the table
@dataclass
class Cli:
    argv: list[str]
    needles: tuple[str, ...]
    code: int = 2


@dataclass
class Api:
    call: Callable[[], object]
    error: type[BaseException]
    needles: tuple[str, ...]


Case = Callable[[SimpleNamespace, Path], "Cli | Api"]

#: Cases that rest on MonitorConfig's own type and range checks (drift_monitor/settings.py).
CONFIG_CASES = {"cli-config-invalid-yaml", "cli-config-nan-threshold", "cli-config-refusal-top-k-negative",
                "cli-config-every-n-steps-bool", "cli-config-prometheus-port", "api-config-nan-threshold",
                "api-config-refusal-top-k-negative", "api-config-every-n-steps-bool", "api-config-prometheus-port"}

CASES: dict[str, Case] = {
    # ---- probe files
    "cli-probes-invalid-utf8": lambda w, t: Cli(
        ["probes", str(probe_file(t, b'{"id": "b", "category": "x", "prompt": "caf\xe9"}'))],
        ("p.jsonl:2", "not UTF-8", "save the probe file as UTF-8")),
    "cli-probes-reserved-all": lambda w, t: Cli(
        ["probes", str(probe_file(t, {"id": "b", "category": "all", "prompt": "x"}))],
        ("p.jsonl:2", "'all' is reserved", "rename the category")),
    "cli-probes-not-json": lambda w, t: Cli(["probes", str(probe_file(t, "{oops"))],
                                            ("p.jsonl:2", "not valid JSON", "one JSON object")),
    "cli-probes-not-an-object": lambda w, t: Cli(["probes", str(probe_file(t, "[1, 2]"))],
                                                 ("p.jsonl:2", "expected a JSON object")),
    "cli-probes-missing-field": lambda w, t: Cli(["probes", str(probe_file(t, {"id": "b", "prompt": "x"}))],
                                                 ("p.jsonl:2", "missing field(s) ['category']", "a record needs")),
    "cli-probes-unknown-field": lambda w, t: Cli(
        ["probes", str(probe_file(t, {**PROBE, "id": "b", "answer": "x"}))],
        ("p.jsonl:2", "unknown field(s) ['answer']", "allowed: id, category, prompt, response")),
    "cli-probes-duplicate-id": lambda w, t: Cli(["probes", str(probe_file(t, PROBE))], ("duplicate id 'a'",)),
    "cli-probes-empty-file": lambda w, t: Cli(["probes", str(write(t / "e.jsonl", "\n\n"))],
                                              ("e.jsonl is empty", "at least one JSON record")),
    "cli-probes-missing-file": lambda w, t: Cli(["probes", str(t / "nope.jsonl")],
                                                ("probe file not found", "nope.jsonl")),
    # ---- the store
    "cli-runs-db-is-an-empty-directory": lambda w, t: Cli(["runs", "--db", str(t)],
                                                          ("no drift-monitor store files", "<run>.duckdb")),
    "cli-runs-db-not-duckdb": lambda w, t: Cli(["runs", "--db", str(write(t / "x.duckdb", "hello" * 200))],
                                               ("not a DuckDB database file",)),
    "cli-runs-db-missing": lambda w, t: Cli(["runs", "--db", str(t / "none.duckdb")], ("none.duckdb",)),
    "cli-scan-db-is-a-glob": lambda w, t: Cli(scan(w, t, db=t / "*.duckdb"), ("a glob names files to read",
                                                                              "a store directory")),
    "cli-export-unknown-run": lambda w, t: Cli(["export", "--db", str(w.db), "--run", "nope", "--out", str(t)],
                                               ("no run with id or name 'nope'", "r1")),
    "cli-export-out-is-a-file": lambda w, t: Cli(
        ["export", "--db", str(w.db), "--run", "r1", "--out", str(write(t / "f", "x"))],
        ("--out", "cannot create the output folder", "give a folder path")),
    # ---- scan arguments and checkpoints
    "cli-scan-negative-step": lambda w, t: Cli(scan(w, t, f"--model=-5={w.out / 'checkpoint-2'}"),
                                               ("--model", "'-5' is not an integer >= 0", "the training step")),
    "cli-scan-step-not-a-number": lambda w, t: Cli(scan(w, t, "--model", f"x={w.base}"), ("not an integer",)),
    "cli-scan-model-without-step": lambda w, t: Cli(scan(w, t, "--model", "5"), ("expected STEP=PATH",)),
    "cli-scan-model-missing-path": lambda w, t: Cli(scan(w, t, "--model", f"5={t / 'gone'}"),
                                                    ("gone", "does not exist")),
    "cli-scan-glob-matches-nothing": lambda w, t: Cli(scan(w, t, checkpoints=t / "none-*"), ("matches nothing",)),
    "cli-scan-sae-without-hook": lambda w, t: Cli(scan(w, t, "--sae", str(w.sae)),
                                                  ("--sae", "expected HOOK=SOURCE")),
    "cli-scan-direction-without-hook": lambda w, t: Cli(scan(w, t, "--direction", "x.pt"),
                                                        ("--direction", "expected HOOK=PATH")),
    "cli-scan-global-step-list": lambda w, t: Cli(scan(w, t, checkpoints=trainer_out(w, t, '{"global_step": [10]}')),
                                                  ("trainer_state.json", "global_step must be a non-negative "
                                                   "integer, got [10]", "--model STEP=PATH")),
    "cli-scan-trainer-state-not-json": lambda w, t: Cli(scan(w, t, checkpoints=trainer_out(w, t, "{nope")),
                                                        ("trainer_state.json", "not valid JSON",
                                                         "--model STEP=PATH")),
    "cli-scan-truncated-base-model": lambda w, t: Cli(
        ["scan", "--base-model", str(damaged_base(w, t)), *scan(w, t)[3:]],
        ("base", "cannot load the model", "save it again")),
    # ---- SAEs
    "cli-scan-sae-one-nan": lambda w, t: Cli(scan(w, t, sae=sae_variant(w, t, nan_weights(False))),
                                             ("sae", "tensor W_dec", "1 non-finite", "use another copy")),
    "cli-scan-sae-all-nan": lambda w, t: Cli(scan(w, t, sae=sae_variant(w, t, nan_weights(True))),
                                             ("non-finite", "this SAE is damaged")),
    "cli-scan-sae-truncated": lambda w, t: Cli(scan(w, t, sae=sae_variant(w, t, truncate("sae_weights.safetensors"))),
                                               ("sae_weights.safetensors", "damaged or truncated",
                                                "download the SAE again")),
    "cli-scan-sae-cfg-d-in-mismatch": lambda w, t: Cli(scan(w, t, sae=sae_variant(w, t, edit_cfg(d_in=24))),
                                                       ("cfg.json", "d_in=24", "W_dec", "[128, 32]",
                                                        "belongs to another SAE")),
    "cli-scan-sae-cfg-bad-json": lambda w, t: Cli(
        scan(w, t, sae=sae_variant(w, t, lambda d: (d / "cfg.json").write_text("{bad"))),
        ("cfg.json", "not valid JSON", "restore the SAE's cfg.json")),
    "cli-scan-sae-unknown-architecture": lambda w, t: Cli(
        scan(w, t, sae=sae_variant(w, t, edit_cfg(architecture="topkk"))),
        ("cfg.json", "unknown SAE architecture 'topkk'", "sae-lens knows", "standard, temporal, topk")),
    "cli-scan-sae-no-cfg": lambda w, t: Cli(scan(w, t, sae=sae_variant(w, t, lambda d: (d / "cfg.json").unlink())),
                                            ("no cfg.json", "SAE.save_model")),
    # ---- rules and settings files
    "cli-scan-rules-invalid-yaml": lambda w, t: Cli(
        scan(w, t, "--config", str(config_file(t, f"outputs:\n  alert_rules: {write(t / 'r.yaml', BAD_YAML)}\n"))),
        ("r.yaml:3", "invalid YAML", "fix the syntax")),
    "cli-config-invalid-yaml": lambda w, t: Cli(scan(w, t, "--config", str(config_file(t, BAD_YAML))),
                                                ("cfg.yaml:3", "invalid YAML")),
    "cli-config-nan-threshold": lambda w, t: Cli(
        scan(w, t, "--config", str(config_file(t, "metrics:\n  refusal_z_threshold: .nan\n"))),
        ("metrics.refusal_z_threshold", "finite")),
    "cli-config-refusal-top-k-negative": lambda w, t: Cli(
        scan(w, t, "--config", str(config_file(t, "metrics:\n  refusal_top_k: -1\n"))),
        ("metrics.refusal_top_k", ">= 1")),
    "cli-config-every-n-steps-bool": lambda w, t: Cli(
        scan(w, t, "--config", str(config_file(t, "cadence:\n  every_n_steps: true\n"))),
        ("cadence.every_n_steps", "integer", "True")),
    "cli-config-prometheus-port": lambda w, t: Cli(
        scan(w, t, "--config", str(config_file(t, "outputs:\n  prometheus_port: 70000\n"))),
        ("outputs.prometheus_port", "65535")),
    # ---- verify and train-sae
    "cli-verify-bad-features": lambda w, t: Cli(["verify", "--model", str(w.base), "--features", "1,x"],
                                                ("--features '1,x'", "give feature ids")),
    "cli-verify-top-zero": lambda w, t: Cli(["verify", "--model", str(w.base), "--features", "top:0"],
                                            ("top:K needs a positive integer",)),
    "cli-verify-db-without-run": lambda w, t: Cli(["verify", "--model", str(w.base), "--db", str(w.db)],
                                                  ("--db needs --run",)),
    "cli-verify-missing-model": lambda w, t: Cli(
        ["verify", "--model", str(t / "nomodel"), "--sae", f"{HOOK}={w.sae}", "--features", "1"],
        ("--model", "nomodel", "no such folder")),
    "cli-train-sae-missing-model": lambda w, t: Cli(
        ["train-sae", "--model", str(t / "nomodel"), "--hook", HOOK, "--out", str(t / "o")],
        ("--model", "nomodel", "no such folder")),
    # ---- the API
    "api-sae-one-nan": lambda w, t: Api(lambda: load_sae(str(sae_variant(w, t, nan_weights(False)))),
                                        DriftMonitorError, ("tensor W_dec", "1 non-finite")),
    "api-sae-object-all-nan": lambda w, t: Api(lambda: load_sae(_all_nan_sae()), DriftMonitorError,
                                               ("non-finite", "d_in=8")),
    "api-sae-truncated": lambda w, t: Api(lambda: load_sae(sae_variant(w, t, truncate("sae_weights.safetensors"))),
                                          DriftMonitorError, ("damaged or truncated",)),
    "api-sae-d-sae-mismatch": lambda w, t: Api(lambda: load_sae(sae_variant(w, t, edit_cfg(d_sae=99))),
                                               DriftMonitorError, ("d_sae=99", "[128, 32]")),
    "api-probe-record-all": lambda w, t: Api(lambda: ProbeSet([ProbeRecord("a", "all", "x")]), DriftMonitorError,
                                             ("probe 'a'", "'all' is reserved")),
    "api-probes-reserved-all-file": lambda w, t: Api(
        lambda: ProbeSet.load(probe_file(t, {"id": "b", "category": "all", "prompt": "x"})),
        DriftMonitorError, ("p.jsonl:2", "reserved")),
    "api-labels-wrap-2**32+5": lambda w, t: Api(lambda: _labels(w, t, {1: "a", 2**32 + 5: "b"}), StoreError,
                                                ("row 2", "4294967301", "fix or remove that row")),
    "api-labels-negative": lambda w, t: Api(lambda: _labels(w, t, {-7: "b"}), StoreError,
                                            ("row 1", "-7", "fix or remove that row")),
    "api-labels-fraction": lambda w, t: Api(lambda: _labels(w, t, pd.DataFrame({"feature": [3, 9.9], "label": "x"})),
                                            StoreError, ("row 2", "9.9", "fix or remove that row")),
    "api-labels-beyond-d-sae": lambda w, t: Api(lambda: _labels(w, t, {63: "ok", 64: "b"}), StoreError,
                                                ("feature id 64", "64 features", "ids 0..63")),
    "api-labels-file-fraction": lambda w, t: Api(lambda: _parse_labels(b'[{"index": 9.9, "description": "x"}]'),
                                                 StoreError, ("row 1", "9.9")),
    "api-discover-negative-step": lambda w, t: Api(lambda: discover(models=[f"-5={w.base}"]), DriftMonitorError,
                                                   ("'-5' is not an integer >= 0",)),
    "api-discover-global-step-list": lambda w, t: Api(
        lambda: discover([str(trainer_out(w, t, '{"global_step": [10]}'))]), DriftMonitorError,
        ("trainer_state.json", "[10]")),
    "api-rules-invalid-yaml": lambda w, t: Api(lambda: load_rules(write(t / "r.yaml", BAD_YAML)), DriftMonitorError,
                                               ("r.yaml:3", "invalid YAML", "fix the syntax")),
    "api-rules-not-utf8": lambda w, t: Api(lambda: load_rules(write(t / "r.yaml", b"defaults: \xff\n")),
                                           DriftMonitorError, ("r.yaml", "not UTF-8", "save it as UTF-8")),
    "api-store-db-is-a-directory": lambda w, t: Api(lambda: Store(t).start_run("x"), StoreError,
                                                    ("is a directory",)),
    "api-reader-db-is-an-empty-directory": lambda w, t: Api(lambda: StoreReader(t).runs(), StoreError,
                                                            ("no drift-monitor store files",)),
    "api-load-model-truncated": lambda w, t: Api(lambda: load_model(damaged_base(w, t)), DriftMonitorError,
                                                 ("cannot load the model", "save it again")),
    "api-load-model-missing": lambda w, t: Api(lambda: load_model(t / "gone", what="--model"), DriftMonitorError,
                                               ("--model", "gone", "no such folder")),
    "api-verify-top-zero": lambda w, t: Api(lambda: parse_feature_spec("top:0"), DriftMonitorError, ("top:5",)),
    "api-verify-settings-negative": lambda w, t: Api(lambda: VerifySettings(n_random=-1), ConfigError,
                                                     ("n_random", "positive")),
    "api-config-nan-threshold": lambda w, t: Api(
        lambda: MonitorConfig(metrics={"refusal_z_threshold": math.nan}), ConfigError, ("refusal_z_threshold",)),
    "api-config-refusal-top-k-negative": lambda w, t: Api(
        lambda: MonitorConfig(metrics={"refusal_top_k": -1}), ConfigError, ("refusal_top_k", ">= 1")),
    "api-config-every-n-steps-bool": lambda w, t: Api(
        lambda: MonitorConfig(cadence={"every_n_steps": True}), ConfigError, ("every_n_steps", "True")),
    "api-config-prometheus-port": lambda w, t: Api(
        lambda: MonitorConfig(outputs={"prometheus_port": 70000}), ConfigError, ("prometheus_port", "70000")),
}


def _all_nan_sae():
    sae = tf.build_sae(8, 16)
    with torch.no_grad():
        for p in sae.parameters():
            p.fill_(float("nan"))
    return sae


def _labels(w, tmp: Path, labels):
    db = tmp / "labels.duckdb"
    shutil.copy(w.db, db)
    with Store(db) as s:
        return s.import_labels(HOOK, labels)


def _parse_labels(data: bytes):
    from drift_monitor.dashboard.views.features import parse_labels

    return parse_labels(data, "labels.json")


def error_lines(err: str) -> list[str]:
    """stderr's lines, less the progress bars transformers draws while loading a model (the scan
    loads the base before it opens the store): what a user reads as messages."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]


PROGRESS = re.compile(r"^Loading weights: +\d+%\|")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_that_names_the_fix(world, tmp_path, capsys, name):
    case = CASES[name](world, tmp_path)
    if isinstance(case, Cli):
        code = main(case.argv)
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert "Traceback" not in err, f"{name}: {err}"
        assert code == case.code, f"{name}: exit {code}, stderr {err!r}"
        assert len(lines) == 1 and lines[0].startswith("drift-monitor: error: "), f"{name}: {err!r}"
        message = lines[0]
    else:
        with pytest.raises(case.error) as info:
            case.call()
        assert isinstance(info.value, DriftMonitorError), f"{name}: {type(info.value).__mro__}"
        message = str(info.value)
        assert "\n" not in message, f"{name}: {message!r}"
    for needle in case.needles:
        assert needle in message, f"{name}: {needle!r} not in {message!r}"


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert sum(n.startswith("cli-") for n in CASES) >= 30 and sum(n.startswith("api-") for n in CASES) >= 20
    assert CONFIG_CASES <= set(CASES)


# -------------------------------------------------------------------- a read-only file system
def test_db_on_a_read_only_file_system(world, tmp_path, readonly_dir, capsys):
    with pytest.raises(StoreError, match=r"Read-only file system.*Point db_path \(--db\) at a writable file"):
        Store(readonly_dir / "x.duckdb").start_run("x")
    assert main(scan(world, tmp_path, db=readonly_dir / "sub" / "scan.duckdb")) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "Read-only file system" in lines[0] and "--db" in lines[0] and "writable" in lines[0]


def test_one_line_also_in_a_real_process(tmp_path):
    """Logging and warnings go to stderr too in a real process: still one line."""
    bad = probe_file(tmp_path, {"id": "b", "category": "all", "prompt": "x"})
    proc = subprocess.run([sys.executable, "-m", "drift_monitor.cli", "probes", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"drift-monitor: error: {bad}:2: category 'all' is reserved (it is the aggregate over every probe); "
        "rename the category, e.g. 'all_topics'"]


# -------------------------------------------------------------------------- our bugs stay loud
@pytest.mark.parametrize("exc", [ZeroDivisionError, ValueError, KeyError, OSError])
def test_an_internal_error_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys, exc):
    import drift_monitor.cli.probes as probes_command

    def broken(args):
        raise exc("a bug of ours")

    monkeypatch.setattr(probes_command, "run", broken)
    assert main(["probes"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{exc.__name__}: " in err and "a bug of ours" in err
    assert err.strip().splitlines()[-1].endswith("please report this with the traceback above")


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    bad = probe_file(tmp_path, "{oops")
    assert main(["--debug", "probes", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith(
        "drift-monitor: error: ")


# ------------------------------------------------------------------------------------ --help
def test_every_subcommand_help_starts_with_what_it_does(capsys):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) >= {"scan", "verify", "probes", "runs", "export", "dashboard", "demo", "train-sae",
                                "bench"}
    for name, parser in sub.choices.items():
        assert parser.description and len(parser.description.split()) >= 8, f"{name}: no description"
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        head = out.split("\n\n")[1]  # after the usage block: the description, before the options
        assert head.split()[:3] == parser.description.split()[:3], f"{name}: {out[:300]!r}"
