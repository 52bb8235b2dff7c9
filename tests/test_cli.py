"""The CLI's subcommands run, and errors are one line with a non-zero exit (no traceback)."""

from __future__ import annotations

import json

from drift_monitor.cli import main


def test_bench_smoke(capsys):
    from drift_monitor.demo import bench

    old = dict(bench.SIZES["tiny"])
    try:
        assert main(["bench", "--size", "tiny", "--prompts", "8", "--repeats", "1", "--no-store"]) == 0
    finally:
        bench.SIZES["tiny"] = old
    out = capsys.readouterr().out
    assert "ratio vs (full forward + encode)" in out and "peak memory" in out


def test_probes_command_and_errors(tmp_path, capsys):
    assert main(["probes"]) == 0
    assert "harmful      72" in capsys.readouterr().out
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"id": "a", "category": "general", "prompt": "x"}) + "\n{oops\n")
    assert main(["probes", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:2" in err and "Traceback" not in err


def test_runs_on_missing_db(tmp_path, capsys):
    assert main(["runs", "--db", str(tmp_path / "none.duckdb")]) == 2
    assert "none.duckdb" in capsys.readouterr().err
