"""Direction monitors (docs/signals.md, "Direction monitors"): user direction files, the mean projection per probe
category, the monitor's own base refusal direction, and their way into DuckDB, Prometheus and
the dashboard.

The values are checked against a direct computation: unbatched forwards of a float64 tiny Llama
with a forward hook, the tokens chosen by loops from the design text (all positions but BOS),
each token projected onto v̂ and averaged per category.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet
from drift_monitor.alerts import AlertEngine, AlertRule, AlertRuleError
from drift_monitor.config import ConfigError
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer
from drift_monitor.exporters.prometheus import PrometheusExporter
from drift_monitor.probe.directions import DirectionError, load_directions, load_hook_directions
from drift_monitor.records import ALL
from drift_monitor.store import Store, StoreReader

D = 32
LAYER = 1
HOOK = f"model.layers.{LAYER}"
CATS = ["harmful", "harmless", "general"]
REPO = Path(__file__).resolve().parents[1]


def _unit(v: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=torch.float64)
    return v / v.norm()


# --------------------------------------------------------------------------- loader
def test_each_file_format_round_trips(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    v = torch.randn(D, generator=g, dtype=torch.float64) * 3
    m = torch.randn(3, D, generator=g, dtype=torch.float64)
    save_file({"refusal": v.float(), "bank": m.float()}, str(tmp_path / "dirs.safetensors"))
    torch.save(v, tmp_path / "single.pt")
    torch.save({"refusal": v, "bank": m}, tmp_path / "many.pth")
    np.save(tmp_path / "bank.npy", m.numpy())
    (tmp_path / "dirs.json").write_text(json.dumps({"refusal": v.tolist(), "bank": m.tolist()}))

    f32 = lambda t: t.float().double()  # noqa: E731 - safetensors file written as float32
    cases = {
        "dirs.safetensors": {"refusal": f32(v), **{f"bank.{i}": f32(m[i]) for i in range(3)}},
        "single.pt": {"single": v},
        "many.pth": {"refusal": v, **{f"bank.{i}": m[i] for i in range(3)}},
        "bank.npy": {f"bank.{i}": m[i] for i in range(3)},
        "dirs.json": {"refusal": v, **{f"bank.{i}": m[i] for i in range(3)}},
    }
    for fname, want in cases.items():
        got = load_directions(str(tmp_path / fname), D, HOOK)
        assert sorted(got) == sorted(want), fname
        for name, w in want.items():
            assert got[name].dtype == torch.float64
            torch.testing.assert_close(got[name], _unit(w), atol=1e-12, rtol=0, msg=f"{fname}:{name}")
    # in-memory sources, and a list of sources merged
    assert list(load_directions(v, D)) == ["direction"]
    assert list(load_directions(m.numpy(), D)) == ["direction.0", "direction.1", "direction.2"]
    got = load_directions([{"a": v.tolist()}, str(tmp_path / "bank.npy")], D)
    assert list(got) == ["a", "bank.0", "bank.1", "bank.2"]
    torch.testing.assert_close(got["a"], _unit(v))


@pytest.mark.parametrize("case", ["missing", "width", "zero", "nan", "suffix", "duplicate", "reserved", "colon",
                                  "rank3"])
def test_bad_direction_inputs_fail_clearly(tmp_path, case):
    v = torch.randn(D, dtype=torch.float64)
    src: object
    if case == "missing":
        src, words = str(tmp_path / "nope.safetensors"), ["not found", "nope.safetensors"]
    elif case == "width":
        src, words = {"r": torch.randn(D + 3)}, ["width 35", f"width {D}", HOOK]
    elif case == "zero":
        src, words = {"r": torch.zeros(D)}, ["'r'", "zero vector"]
    elif case == "nan":
        w = v.clone()
        w[3] = math.nan
        src, words = {"r": w}, ["'r'", "NaN"]
    elif case == "suffix":
        (tmp_path / "dirs.txt").write_text("1 2 3")
        src, words = str(tmp_path / "dirs.txt"), ["'.txt'", ".safetensors", ".npy"]
    elif case == "duplicate":
        src, words = [{"r": v}, {"r": -v}], ["'r'", "twice"]
    elif case == "reserved":
        src, words = {"refusal_base": v}, ["reserved"]
    elif case == "colon":
        src, words = {"a:b": v}, ["':'"]
    else:
        src, words = {"r": torch.randn(2, 2, D)}, ["shape", "[n, d]"]
    with pytest.raises(DirectionError) as e:
        load_directions(src, D, HOOK)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_direction_at_an_unmonitored_hook_names_the_hooks():
    with pytest.raises(DirectionError, match=r"'model.layers.3'.*model.layers.1"):
        load_hook_directions({"model.layers.3": torch.ones(D)}, {"model.layers.1": D})
    with pytest.raises(ConfigError, match="directions must be a dict"):
        MonitorConfig(saes={HOOK: "x"}, directions=["a.npy"])


def test_config_with_direction_paths_round_trips(tmp_path):
    cfg = MonitorConfig(saes={HOOK: "sae_dir"}, directions={HOOK: [str(tmp_path / "a.npy"), torch.ones(D)]})
    d = cfg.to_dict()
    assert d["directions"] == {HOOK: [str(tmp_path / "a.npy"), "<Tensor>"]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**d, "directions": {HOOK: str(tmp_path / "a.npy")}}))
    assert MonitorConfig.from_file(path).directions == {HOOK: str(tmp_path / "a.npy")}


# --------------------------------------------------------------------------- values
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dirs")
    records = [{"id": f"{c}-{i}", "category": c, "prompt": f"{c} prompt number {i} " + "word " * (i % 4)}
               for c in CATS for i in range(6)]
    ps = ProbeSet.from_records(records, name="dirs")
    tok = build_tokenizer([r["prompt"] for r in records])
    torch.manual_seed(0)
    base = build_llama(len(tok), hidden=D, layers=3, heads=4).double()
    cur = build_llama(len(tok), hidden=D, layers=3, heads=4).double()
    with torch.no_grad():  # the "fine-tuned" model: the base with perturbed weights
        cur.load_state_dict(base.state_dict())
        for p in cur.parameters():
            p.add_(0.2 * torch.randn_like(p) * p.std().clamp_min(1e-3))
    sae = build_sae(D, 96, seed=1).double()
    g = torch.Generator().manual_seed(7)
    bank = torch.randn(2, D, generator=g, dtype=torch.float64)
    np.save(tmp / "bank.npy", bank.numpy())
    refusal = 5.0 * torch.randn(D, generator=g, dtype=torch.float64)  # not unit length on purpose
    raw = {"bank.0": bank[0], "bank.1": bank[1], "refusal": refusal}
    common = dict(probes={"source": ps, "batch_size": 4}, baseline_cache_dir=str(tmp / "cache"),
                  outputs={"show_progress": False})
    cfg = MonitorConfig(saes={HOOK: sae}, directions={HOOK: [str(tmp / "bank.npy"), {"refusal": refusal}]},
                        **common)
    mon = DriftMonitor(cfg, tok)
    base_snap = mon.baseline(base)
    snap = mon.snapshot(cur, step=10)
    return dict(ps=ps, tok=tok, base=base, cur=cur, sae=sae, raw=raw, common=common, cfg=cfg, mon=mon,
                base_snap=base_snap, snap=snap, tmp=tmp)


def _direct_activations(model, mon, refusal: bool = False) -> tuple[torch.Tensor, list[str]]:
    """One unbatched forward per probe with a forward hook on the layer, at the positions the
    monitor selects (token selection has its own tests: test_token_selection, test_metrics), or
    with ``refusal`` at the teacher-forced refusal's tokens."""
    layer = model.model.layers[LAYER]
    got: list[torch.Tensor] = []
    # transformers 5.x: a decoder layer returns a plain Tensor (4.x: a tuple)
    h = layer.register_forward_hook(lambda m, i, o: got.append((o[0] if isinstance(o, tuple) else o).detach()))
    xs, cats = [], []
    try:
        for i, it in enumerate(mon.probes.items):
            got.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([it.input_ids]))
            acts = got[0][0]
            positions = range(*it.forced) if refusal and it.forced else [] if refusal else \
                mon.probes.selected_positions(i)
            for p in positions:
                xs.append(acts[p])
                cats.append(it.record.category)
    finally:
        h.remove()
    return torch.stack(xs).double(), cats


def _direct_means(x: torch.Tensor, cats: list[str]) -> dict[str, torch.Tensor]:
    out = {c: x[[i for i, k in enumerate(cats) if k == c]].mean(0) for c in CATS}
    out[ALL] = x.mean(0)
    return out


def _direct_projections(x: torch.Tensor, cats: list[str], v: torch.Tensor) -> dict[str, float]:
    """mean over the category's tokens of x_t · v̂ (per token, then averaged: no linearity used)."""
    per_token = x @ _unit(v)
    out = {c: float(per_token[[i for i, k in enumerate(cats) if k == c]].mean()) for c in CATS}
    out[ALL] = float(per_token.mean())
    return out


def test_projections_match_direct_computation(world):
    mon, snap, base_snap = world["mon"], world["snap"], world["base_snap"]
    x, cats = _direct_activations(world["cur"], mon)
    x0, cats0 = _direct_activations(world["base"], mon)
    assert cats == cats0 and len(cats) == snap.n_tokens
    m, m0 = snap.hooks[HOOK].metrics, base_snap.hooks[HOOK].metrics
    means0 = _direct_means(x0, cats0)
    r0 = means0["harmful"] - means0["harmless"]
    dirs = {**world["raw"], "refusal_base": r0}
    n_checked = 0
    for name, v in dirs.items():
        want = _direct_projections(x, cats, v)
        want0 = _direct_projections(x0, cats0, v)
        for c in CATS + [ALL]:
            assert m[f"direction_projection:{name}:{c}"] == pytest.approx(want[c], abs=1e-6), (name, c)
            assert m[f"direction_projection_delta:{name}:{c}"] == pytest.approx(want[c] - want0[c], abs=1e-6)
            assert m0[f"direction_projection:{name}:{c}"] == pytest.approx(want0[c], abs=1e-6), (name, c)
            assert m0[f"direction_projection_delta:{name}:{c}"] == 0.0
            n_checked += 1
    assert n_checked == 4 * 4
    # the projections differ between models and categories: the check is not vacuous
    assert max(abs(v) for k, v in m.items() if k.startswith("direction_projection_delta:")) > 1e-3
    # the refusal direction is measured at the refusal tokens (the teacher-forced refusal)
    xr, cr = _direct_activations(world["cur"], mon, refusal=True)
    xr0, _ = _direct_activations(world["base"], mon, refusal=True)
    rm, rm0 = _direct_means(xr, cr), _direct_means(xr0, cr)
    r, rr0 = rm["harmful"] - rm["harmless"], rm0["harmful"] - rm0["harmless"]
    assert m["refusal_direction_norm"] == pytest.approx(float(r.norm()), abs=1e-6)
    assert m0["refusal_direction_norm"] == pytest.approx(float(rr0.norm()), abs=1e-6)
    assert m["refusal_direction_cosine"] == pytest.approx(float(r @ rr0 / (r.norm() * rr0.norm())), abs=1e-6)


def test_cached_baseline_gives_the_same_projections(world):
    mon2 = DriftMonitor(world["cfg"], world["tok"])
    passes: list[str] = []
    real = mon2._probe_pass
    mon2._probe_pass = lambda *a, **k: passes.append(k["desc"]) or real(*a, **k)  # count probe passes
    base2 = mon2.baseline(world["base"])
    assert passes == [], "the baseline must come from the cache"
    snap2 = mon2.snapshot(world["cur"], step=10)
    for snap_a, snap_b in ((world["base_snap"], base2), (world["snap"], snap2)):
        a, b = snap_a.hooks[HOOK].metrics, snap_b.hooks[HOOK].metrics
        keys = [k for k in a if k.startswith("direction_projection")]
        assert len(keys) == 2 * 4 * 4
        for k in keys:
            assert b[k] == pytest.approx(a[k], abs=1e-12), k


def test_no_directions_still_gives_refusal_base_only(world):
    mon = DriftMonitor(MonitorConfig(saes={HOOK: world["sae"]}, **world["common"]), world["tok"])
    mon.baseline(world["base"])
    m = mon.snapshot(world["cur"], step=10).hooks[HOOK].metrics
    names = {k.split(":")[1] for k in m if k.startswith("direction_projection")}
    assert names == {"refusal_base"}
    for k, v in m.items():
        if k.startswith("direction_projection"):
            assert v == pytest.approx(world["snap"].hooks[HOOK].metrics[k], abs=1e-12)


def test_a_wrong_width_direction_fails_at_start_up(world):
    cfg = MonitorConfig(saes={HOOK: world["sae"]}, directions={HOOK: {"r": torch.ones(D + 1)}}, **world["common"])
    with pytest.raises(DirectionError, match=f"width {D + 1}.*width {D}"):
        DriftMonitor(cfg, world["tok"])
    cfg = MonitorConfig(saes={HOOK: world["sae"]}, directions={"model.layers.2": {"r": torch.ones(D)}},
                        **world["common"])
    with pytest.raises(DirectionError, match=f"one of: {HOOK}"):
        DriftMonitor(cfg, world["tok"])


# --------------------------------------------------------------------------- outputs
def _write_db(world, path: Path) -> None:
    s = Store(path, run_id="with-dirs")
    s.start_run(name="with directions", model="tiny")
    s.write(world["base_snap"])
    s.write(world["snap"])
    s.close()


def test_store_round_trips_projections(world, tmp_path):
    db = tmp_path / "drift.duckdb"
    _write_db(world, db)
    df = StoreReader(db).direction_projections("with-dirs", HOOK)
    assert set(df.columns) == {"step", "direction", "category", "projection", "delta"}
    assert len(df) == 2 * 4 * 4  # 2 steps x 4 directions x (3 categories + all)
    for snap in (world["base_snap"], world["snap"]):
        m = snap.hooks[HOOK].metrics
        rows = df[df["step"] == snap.step]
        for row in rows.itertuples():
            assert row.projection == pytest.approx(m[f"direction_projection:{row.direction}:{row.category}"], abs=1e-12)
            assert row.delta == pytest.approx(m[f"direction_projection_delta:{row.direction}:{row.category}"],
                                              abs=1e-12)
    assert set(df["direction"]) == {"bank.0", "bank.1", "refusal", "refusal_base"}
    assert set(df["category"]) == set(CATS) | {ALL}


def test_prometheus_exports_one_labelled_family(world):
    exp = PrometheusExporter("dir-run")
    exp.update(world["snap"])
    text = generate_latest(exp.registry).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    fam = fams["drift_monitor_direction_projection"]
    assert fam.type == "gauge" and "projection" in fam.documentation
    m = world["snap"].hooks[HOOK].metrics
    samples = {(s.labels["direction"], s.labels["category"]): s.value for s in fam.samples}
    assert len(samples) == 4 * 4
    assert all(set(s.labels) == {"hook", "direction", "category"} and s.labels["hook"] == HOOK for s in fam.samples)
    assert samples[("refusal", "harmful")] == pytest.approx(m["direction_projection:refusal:harmful"], abs=1e-12)
    delta = {(s.labels["direction"], s.labels["category"]): s.value
             for s in fams["drift_monitor_direction_projection_delta"].samples}
    assert delta[("bank.1", ALL)] == pytest.approx(m["direction_projection_delta:bank.1:all"], abs=1e-12)
    # no gauge per direction/category key
    assert not [n for n in fams if n.startswith("drift_monitor_direction_projection_") and n != (
        "drift_monitor_direction_projection_delta")]
    assert "drift_monitor_refusal_direction_norm" in fams


def test_threshold_rule_on_a_direction_projection(world):
    value = world["snap"].hooks[HOOK].metrics["direction_projection:refusal:harmful"]
    rule = {"name": "refusal_up", "kind": "threshold", "metric": "direction_projection:refusal:harmful",
            "op": ">", "threshold": value - 1.0}
    eng = AlertEngine({"defaults": False, "rules": [rule]})
    eng.evaluate(world["base_snap"])
    alerts = eng.evaluate(world["snap"])
    assert [a.rule for a in alerts] == ["refusal_up"] and alerts[0].value == pytest.approx(value)
    with pytest.raises(AlertRuleError, match="unknown metric"):
        AlertRule("bad", "threshold", metric="direction_projection:refusal", op=">", threshold=0)


def test_dashboard_directions_page(world, tmp_path):
    from streamlit.testing.v1 import AppTest

    db = tmp_path / "drift.duckdb"
    _write_db(world, db)
    # a run without user directions: the monitor itself still measures refusal_base
    mon = DriftMonitor(MonitorConfig(saes={HOOK: world["sae"]}, **world["common"]), world["tok"])
    s = Store(db, run_id="no-dirs")
    s.start_run(name="plain", model="tiny")
    s.write(mon.baseline(world["base"]))
    s.write(mon.snapshot(world["cur"], step=10))
    s.close()

    def page(run_id: str) -> AppTest:
        at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60)
        at.session_state["db_path"] = str(db)
        at.session_state["page"] = "Directions"
        at.session_state["live"] = False
        at.session_state["dir_run"] = run_id
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, [e.value for e in at.error]
        return at

    at = page("with-dirs")
    specs = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    titles = [sp["title"] for sp in specs]
    assert [t.split(":")[0] for t in titles[:4]] == ["bank.0", "bank.1", "refusal", "refusal_base"]
    assert titles[4:] == ["refusal_direction_cosine", "refusal_direction_norm"]
    assert specs[0]["encoding"]["y"]["field"] == "projection" and specs[0]["encoding"]["color"]["field"] == "category"
    assert not at.info

    at = page("no-dirs")
    assert any("No user direction" in i.value for i in at.info)
    titles = [json.loads(c.proto.spec)["title"] for c in at.get("vega_lite_chart")]
    assert titles[0].startswith("refusal_base") and len(titles) == 3


def test_scan_cli_passes_directions(monkeypatch):
    import drift_monitor.offline.scan as scan_mod
    from drift_monitor import cli
    from drift_monitor.cli.common import parse_directions

    seen: dict = {}

    def fake_scan(base_model, config, **kw):
        seen["config"] = config
        raise scan_mod.ScanError("stop here")  # a user error: the CLI prints it and returns 2

    monkeypatch.setattr(scan_mod, "scan", fake_scan)
    rc = cli.main(["scan", "--base-model", "b", "--sae", f"{HOOK}=sae", "--db", "x.duckdb",
                   "--direction", f"{HOOK}=a.npy", "--direction", f"{HOOK}=b.safetensors"])
    assert rc == 2
    assert seen["config"].directions == {HOOK: ["a.npy", "b.safetensors"]}
    with pytest.raises(ValueError, match="HOOK=PATH"):
        parse_directions(["no-equals-sign"])


def test_mean_projections_from_sums_equal_per_token_means():
    """The pure function on random tensors: linearity holds, an empty category is NaN, not 0."""
    from drift_monitor.probe import metrics as M

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, D, generator=g, dtype=torch.float64) + 1.0
    cat = torch.randint(0, 2, (200,), generator=g)  # category 2 gets no tokens
    V = torch.randn(3, D, generator=g, dtype=torch.float64) * 4
    x_sum = torch.stack([x[cat == c].sum(0) for c in range(3)])
    n = torch.tensor([float((cat == c).sum()) for c in range(3)], dtype=torch.float64)
    got = M.mean_projections(x_sum, n, V)
    for i in range(3):
        v = V[i] / V[i].norm()
        for c in range(2):
            want = float(np.mean([float(x[t] @ v) for t in range(200) if int(cat[t]) == c]))
            assert float(got[i, c]) == pytest.approx(want, abs=1e-10)
        assert math.isnan(float(got[i, 2]))
    with pytest.raises(ValueError, match="zero direction"):
        M.mean_projections(x_sum, n, torch.zeros(1, D))
