"""The package installs three ways (wheel, editable, checkout), and CI runs the README's command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:3]
    return [b.split("```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    install_and_demo, tests = _readme_commands()
    assert "scripts/install.sh" in install_and_demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f".ci/run must run the README's test command verbatim: {tests!r}"


def test_editable_or_checkout_import_maps_subpackages():
    import drift_monitor.callbacks
    import drift_monitor.dashboard

    assert Path(drift_monitor.callbacks.__file__).parent.name == "callbacks"
    assert Path(drift_monitor.dashboard.__file__).parent.name == "dashboard"


@pytest.mark.slow
def test_wheel_install_imports_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, text=True)
    wheel = next(dist.glob("drift_monitor-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for must in ("drift_monitor/callbacks/__init__.py", "drift_monitor/dashboard/__init__.py",
                 "drift_monitor/data/default_probes.jsonl", "drift_monitor/monitor.py"):
        assert must in names, must
    # every module of the checkout is shipped (a subpackage missing from pyproject's list would be
    # dropped silently), and nothing else (no stale module from an old build/ folder)
    source = {f"drift_monitor/{p.relative_to(ROOT / 'drift_monitor').as_posix()}"
              for p in (ROOT / "drift_monitor").rglob("*.py")}
    shipped = {n for n in names if n.startswith("drift_monitor/") and n.endswith(".py")
               and not n.startswith(("drift_monitor/callbacks/", "drift_monitor/dashboard/"))}
    assert shipped == source, (sorted(source - shipped), sorted(shipped - source))
    assert not any(n.startswith(("callbacks/", "dashboard/", "tests/")) for n in names), \
        "no generic top-level module may be installed"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import drift_monitor, drift_monitor.callbacks, drift_monitor.dashboard, drift_monitor.store, "
            "drift_monitor.alerts, sys;"
            "from drift_monitor import ProbeSet; assert len(ProbeSet.default()) == 216;"
            "print(drift_monitor.__file__)")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         check=True, capture_output=True, text=True).stdout
    assert out.strip().startswith(str(site)), out


def test_documented_alert_rules_example_loads():
    import yaml

    from drift_monitor.alerts import load_rules

    text = (ROOT / "docs" / "alerts.md").read_text()
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    rules = {r.name: r for r in load_rules(yaml.safe_load(block))}
    assert rules["emerging_refusal_features"].severity == "info"
    assert {"ev_drop", "sudden_change", "nonfinite_activations", "low_jaccard"} <= set(rules)
