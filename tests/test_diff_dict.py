"""`drift-monitor diff-dict` finds the planted change as its first atom, reads it, and finds
nothing in a model compared with itself (tests/residual_world.py plants it)."""

from __future__ import annotations

import json

import pytest
import residual_world as rw
import torch

from drift_monitor.cli import main
from drift_monitor.offline.diffdict import diff_dict, greedy_atoms


@pytest.fixture(scope="module")
def world():
    return rw.build_world()


def test_the_planted_change_is_the_first_atom(world):
    tok, base, planted, _, probes, v = world
    res = diff_dict(planted, base, tok, probes, rw.HOOK, n_atoms=4, progress=False)
    first = res.atoms[0]
    assert abs(float(torch.tensor(first.vector, dtype=torch.float64) @ v)) >= 0.9
    assert first.source_token == rw.TRIGGER  # a real difference vector: the change at a trigger token
    assert first.top_tokens[0] == rw.TARGET  # the logit lens of the fine-tuned model
    assert all(c == "harmful" for _, c, _ in first.top_probes)  # only harmful probes carry the trigger
    assert first.projections["harmful"] > 5 * abs(first.projections["harmless"])
    assert first.share > 0.5 and res.atoms[-1].cumulative <= 1.0 + 1e-9


def test_a_model_against_itself_has_no_atom(world):
    tok, base, _, _, probes, _ = world
    res = diff_dict(base, base, tok, probes, rw.HOOK, progress=False)
    assert res.atoms == [] and res.mean_energy == 0.0


def test_greedy_atoms_explain_a_rank_two_change_in_two_steps():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 2, generator=g, dtype=torch.float64))[0]
    delta = torch.randn(200, 2, generator=g, dtype=torch.float64) @ basis.T
    picked = greedy_atoms(delta, 5)
    assert len(picked) == 2 and sum(s for _, s in picked) == pytest.approx(1.0, abs=1e-9)


def test_cli_writes_the_atoms(world, tmp_path, capsys):
    tok, base, planted, _, probes, _ = world
    for name, m in (("base", base), ("ft", planted)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text("".join(json.dumps({"id": r.id, "category": r.category, "prompt": r.prompt}) + "\n"
                                  for r in probes.records))
    out = tmp_path / "atoms.json"
    assert main(["diff-dict", "--model", str(tmp_path / "ft"), "--base-model", str(tmp_path / "base"), "--hook",
                 rw.HOOK, "--probes", str(probe_file), "--atoms", "3", "--json", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "difference dictionary at model.layers.2" in text and rw.TARGET in text
    atoms = json.loads(out.read_text())["atoms"]
    assert 1 <= len(atoms) <= 3 and atoms[0]["source_token"] == rw.TRIGGER
    assert main(["diff-dict", "--model", str(tmp_path / "ft"), "--hook", rw.HOOK]) == 2
    assert "--adapter" in capsys.readouterr().err
