"""The test bed's two monitored fine-tunes (refusal and control), which are the detection suite's
``gain-A-50`` and ``control-chat`` runs, with their behaviour.

Why its own module: it needs both the test bed (``testbed``) and the suite (``suite``), and the
suite needs the test bed; here the dependency runs one way (testbed <- suite <- testbed_runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .suite import run_scenario, scenario, store_dir
from .testbed import TestBed

KINDS = ("refusal", "control")
#: The detection suite's scenarios that are the test bed's two runs (drift_monitor/demo/suite.py).
SUITE_NAMES = {"refusal": "gain-A-50", "control": "control-chat"}


@dataclass
class TestBedRuns:
    """Both fine-tunes, monitored live by the callback into one store directory, with their
    adapter checkpoints (what ``drift-monitor scan`` reads) and the measured behaviour. They are
    the detection suite's ``gain-A-50`` and ``control-chat`` runs (``suite.run_scenario``)."""

    path: Path
    every_n_steps: int
    run_ids: dict[str, str]
    timings: dict[str, float]
    behaviour: dict[str, dict[str, float]]
    run_paths: dict[str, Path] = field(default_factory=dict)

    @property
    def db(self) -> Path:
        return self.path

    def checkpoints(self, kind: str) -> Path:
        return self.run_paths[kind] / "checkpoints"

    def adapter(self, kind: str) -> Path:
        return self.run_paths[kind] / "adapter"


def build_runs(tb: TestBed, *, every_n_steps: int = 10, quiet: bool = False) -> TestBedRuns:
    """Run (or reuse from the cache) both monitored fine-tunes and measure their behaviour."""
    if every_n_steps != 10:
        raise ValueError("the test bed's runs are the detection suite's, monitored every 10 steps")
    runs = {kind: run_scenario(tb, scenario(name), every_n_steps=every_n_steps, quiet=quiet)
            for kind, name in SUITE_NAMES.items()}
    last = {kind: r.behaviour[max(r.behaviour)] for kind, r in runs.items()}
    behaviour = {kind: {k: v for k, v in b.items() if k.endswith("_rate")} for kind, b in last.items()}
    base = runs["control"].behaviour[0]
    behaviour["base"] = {k: v for k, v in base.items() if k.endswith("_rate")}
    timings = {}
    for kind, r in runs.items():
        timings[f"{kind}_s"] = r.timings["train_s"]
        timings[f"{kind}_probe_s"] = r.timings["probe_s"]
    return TestBedRuns(store_dir(tb), every_n_steps, {k: r.run_id for k, r in runs.items()}, timings, behaviour,
                       {k: r.path for k, r in runs.items()})
