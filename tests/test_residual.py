"""The residual monitor finds what the base SAE cannot represent.

The plant (tests/residual_world.py): a direction v the SAE can neither read nor write, added to
a harmful-only trigger token, v the unembedding row of a chosen token. The SAE-feature metrics
barely move, while the error energy rises and the first direction of new error is v, read by
the logit lens as that token. A model compared with itself shows nothing.
"""

from __future__ import annotations

import pytest
import residual_world as rw
import torch

from drift_monitor import DriftMonitor, MonitorConfig
from drift_monitor.alerts import AlertEngine, default_rules
from drift_monitor.probe import residual as R

HOOK = rw.HOOK
TARGET = rw.TARGET
#: The shipped rule, read where it is defined: the plant must clear what users get.
GROWTH = {r.name: r for r in default_rules()}["residual_growth"].threshold


@pytest.fixture(scope="module")
def world():
    return rw.build_world()


def _monitor(world, tmp_path):
    tok, base, _, sae, probes, _ = world
    cfg = MonitorConfig(saes={HOOK: sae}, probes=probes, baseline_cache_dir=str(tmp_path),
                        metrics={"refusal_positions": "selected"}, outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    mon.baseline(base)
    return mon


def _check_plant_found(world, mon):
    tok, _, planted, _, _, v = world
    snap = mon.snapshot(planted, step=10)
    m, res = snap.hooks[HOOK].metrics, snap.hooks[HOOK].residual
    # 15.3 measured at ALPHA = 4: well past the shipped residual_growth threshold (3)
    assert m["residual_energy_ratio"] > 2 * GROWTH, m["residual_energy_ratio"]
    assert res, "no direction of new error found"
    first = torch.tensor(res[0].vector, dtype=torch.float64)
    assert abs(float(first @ v)) >= 0.9, float(first @ v)
    assert m["residual_top_share"] == res[0].share > 0.1
    # oriented along the error's move: the logit lens reads the token whose unembedding v is
    assert res[0].top_tokens[0] == tok.decode([tok.convert_tokens_to_ids(TARGET)])
    assert TARGET not in res[0].bottom_tokens
    # the plant sits on the harmful probes' trigger token: their error moved along v, the rest barely
    assert res[0].projections["harmful"] > 5 * abs(res[0].projections["harmless"])
    # the SAE cannot see it: its own metrics barely move
    assert m["topk_jaccard"] > 0.8 and m["features_drifted_ratio"] < 0.05, (m["topk_jaccard"],
                                                                             m["features_drifted_ratio"])
    assert res[0].decoder_cos < 0.2  # v is orthogonal to every decoder row
    return snap


def test_a_direction_the_sae_cannot_represent_is_found(world, tmp_path):
    _check_plant_found(world, _monitor(world, tmp_path))


def test_the_sketch_finds_it_too(world, tmp_path, monkeypatch):
    """Above EXACT_MAX_D the moment is a d × SKETCH_RANK sketch; shrink both to run it at d = 64."""
    monkeypatch.setattr(R, "EXACT_MAX_D", 32)
    monkeypatch.setattr(R, "SKETCH_RANK", 16)
    mon = _monitor(world, tmp_path)
    assert mon._base[HOOK].stats.err_gram.shape == (64, 16)
    _check_plant_found(world, mon)


def test_self_compare_reports_nothing(world, tmp_path):
    _, base, _, _, _, _ = world
    snap = _monitor(world, tmp_path).snapshot(base, step=1)
    m = snap.hooks[HOOK].metrics
    assert m["residual_energy_ratio"] == 1.0 and m["residual_top_share"] == 0.0
    assert snap.hooks[HOOK].residual == []


def test_off_keeps_no_moment(world, tmp_path):
    tok, base, planted, sae, probes, _ = world
    cfg = MonitorConfig(saes={HOOK: sae}, probes=probes, baseline_cache_dir=str(tmp_path),
                        metrics={"residual_directions": 0}, outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    mon.baseline(base)
    snap = mon.snapshot(planted, step=1)
    assert mon._base[HOOK].stats.err_gram.numel() == 0 and snap.hooks[HOOK].residual == []
    assert snap.metric(HOOK, "residual_energy_ratio") > 2 * GROWTH  # the ratio needs no moment


def _planted_at(world, alpha: float):
    """The base with the plant at strength ``alpha`` (the world's planted model is ALPHA = 4)."""
    import copy

    tok, base, _, _, _, v = world
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.embed_tokens.weight[tok.convert_tokens_to_ids(rw.TRIGGER)] += alpha * v.float()
    return model


def _growth_alerts(mon, model) -> tuple[float, list]:
    """The residual energy ratio of ``model`` and the residual_growth alerts the shipped rules
    raise on it, through the engine the recorder uses (base snapshot first, as a run records it)."""
    eng = AlertEngine(default_rules())
    assert eng.evaluate(mon.base_snapshot) == []
    snap = mon.snapshot(model, step=10)
    return snap.metric(HOOK, "residual_energy_ratio"), [a for a in eng.evaluate(snap) if a.rule == "residual_growth"]


def test_the_shipped_residual_growth_rule_fires_on_the_plant(world, tmp_path):
    """The planted direction makes the shipped rule (default_rules(), threshold 3) fire, with the
    ratio it read; the same plant at a quarter of its strength grows the error 1.9x (measured),
    a real but smaller move under the threshold, and raises nothing, nor does the base itself."""
    mon = _monitor(world, tmp_path)
    ratio, alerts = _growth_alerts(mon, world[2])
    assert [(a.hook, a.status, a.severity) for a in alerts] == [(HOOK, "active", "warning")], alerts
    assert alerts[0].value == pytest.approx(ratio) and alerts[0].threshold == GROWTH == 3.0
    weak, quiet = _growth_alerts(mon, _planted_at(world, rw.ALPHA / 4))
    assert 1.5 < weak < GROWTH and quiet == [], (weak, quiet)
    same, none = _growth_alerts(mon, world[1])
    assert same == pytest.approx(1.0) and none == []


def test_sketched_eigenpairs_of_a_low_rank_difference():
    """The one-pass sketch recovers the top eigenvectors of a low-rank D from Y = D Ω alone."""
    g = torch.Generator().manual_seed(0)
    d = 300
    u = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))[0]
    dmat = u @ torch.diag(torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64)) @ u.T
    omega = torch.randn(d, 24, generator=g, dtype=torch.float64)
    vals, vecs = R._sketched_eig(dmat @ omega, omega)
    top = torch.argsort(vals, descending=True)[:3]
    assert torch.allclose(vals[top], torch.tensor([5.0, 2.0, 1.0], dtype=torch.float64), atol=1e-8)
    for j, i in enumerate(top.tolist()):
        assert abs(float(vecs[:, i] @ u[:, j])) > 1 - 1e-8


def test_directions_are_stored_and_read_back(world, tmp_path):
    """The store keeps each direction (a re-write of the step replaces them) and exports them."""
    from drift_monitor.store import Store, StoreReader, export_run

    tok, _, planted, _, _, _ = world
    mon = _monitor(world, tmp_path)
    snap = mon.snapshot(planted, step=10)
    db = str(tmp_path / "drift.duckdb")
    store = Store(db)
    rid = store.start_run(name="plant", probe_hash=mon.probe_hash)
    store.write(snap)
    store.write(snap)  # the same (run, step, hook) again: replaced, not doubled
    got = StoreReader(db).residual_directions(rid, hook=HOOK)
    want = snap.hooks[HOOK].residual
    assert list(got["rank"]) == [d.rank for d in want] and list(got.step) == [10] * len(want)
    first = got.iloc[0]
    assert first.top_tokens == want[0].top_tokens and first.projections == pytest.approx(want[0].projections)
    assert first.share == pytest.approx(want[0].share) and first.decoder_cos == pytest.approx(want[0].decoder_cos)
    assert list(first.vector) == pytest.approx(want[0].vector, abs=1e-7)
    files = export_run(db, rid, tmp_path / "export")
    assert any(f.name.endswith("_residual_directions.parquet") for f in files)
