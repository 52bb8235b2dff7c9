"""The CLI's subcommands run, and errors are one line with a non-zero exit (no traceback)."""

from __future__ import annotations

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


def test_probes_command(capsys):
    """Bad probe files and DB paths are cases of tests/test_bad_inputs.py."""
    assert main(["probes"]) == 0
    assert "harmful      72" in capsys.readouterr().out

