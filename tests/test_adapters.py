"""Adapter signals of LoRA runs (drift_monitor.probe.adapters): values against direct NumPy computations,
the alert engine's history with adapter-only points, a real Trainer run through DuckDB and
Prometheus, and the dashboard's Adapter page."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import train_fixtures as tf
from prometheus_client import generate_latest

from drift_monitor.alerts import AlertEngine, MetricPoint, evaluate
from drift_monitor.probe.adapters import (
    AdapterTracker,
    LoraModule,
    find_lora_modules,
    local_cosine,
    module_norms,
    segment_bounds,
)
from drift_monitor.records import HookResult, Snapshot

# --------------------------------------------------------------------------------------------
# Pure functions vs NumPy
# --------------------------------------------------------------------------------------------


def _np_cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def test_module_norms_match_numpy():
    rng = np.random.default_rng(0)
    mods, want = [], []
    for i, (out, r, inp, s) in enumerate([(12, 4, 7, 2.0), (5, 2, 9, 0.5), (3, 8, 3, 1.0)]):
        a, b = rng.normal(size=(r, inp)), rng.normal(size=(out, r))
        mods.append(LoraModule(f"m{i}", torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), s))
        want.append([np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(s * b @ a)])
    got = module_norms(mods)
    assert got == pytest.approx(np.array(want), rel=1e-5)


def test_local_cosine_straight_line_turn_and_random():
    sizes = [6, 4, 5]
    bounds = segment_bounds(sizes)
    rng = np.random.default_rng(1)
    direction = rng.normal(size=15).astype(np.float32)
    # straight line for every module: B(t) = t·d
    per, glob = local_cosine(0 * direction, 1 * direction, 2 * direction, bounds)
    assert per == pytest.approx([-1, -1, -1], abs=1e-6) and glob == pytest.approx(-1, abs=1e-6)
    # a 90° turn in module 0 (e1 then e2), a straight line in module 1, no motion in module 2
    b0, b1, b2 = np.zeros(15, np.float32), np.zeros(15, np.float32), np.zeros(15, np.float32)
    b1[0] = 1.0
    b2[0], b2[1] = 1.0, 1.0  # B moved along e0, then along e1
    b1[6], b2[6] = 1.0, 2.0
    per, glob = local_cosine(b0, b1, b2, bounds)
    assert per[0] == pytest.approx(0.0, abs=1e-7) and per[1] == pytest.approx(-1.0) and math.isnan(per[2])
    d1, d2 = b0 - b1, b2 - b1
    assert glob == pytest.approx(_np_cos(d1, d2))
    # random trajectories against a direct computation per segment
    x, y, z = (rng.normal(size=15).astype(np.float32) for _ in range(3))
    per, glob = local_cosine(x, y, z, bounds)
    want = [_np_cos((x - y)[s:e].astype(np.float64), (z - y)[s:e].astype(np.float64))
            for s, e in zip(bounds[:-1], bounds[1:])]
    assert per == pytest.approx(want, rel=1e-6) and glob == pytest.approx(_np_cos(x - y, z - y), rel=1e-5)


def test_tracker_on_peft_model_names_scaling_and_cosine_timing():
    from peft import LoraConfig, get_peft_model

    from drift_monitor.demo.tiny import build_llama

    model = get_peft_model(build_llama(50, hidden=16, layers=2, heads=2),
                           LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    mods, sharded = find_lora_modules(model)
    assert not sharded and {m.name for m in mods} == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                      for p in ("q_proj", "v_proj")}
    assert all(m.scaling == pytest.approx(3.0) for m in mods)
    tracker = AdapterTracker()
    first = tracker.record(model, 0)
    assert set(first) == {"adapter"} | {f"adapter:{m.name}" for m in mods}
    assert first["adapter"].metrics["adapter_B_norm"] == 0.0  # PEFT initialises B to zero
    assert "adapter_B_local_cosine" not in first["adapter"].metrics
    line = torch.randn_like(mods[0].B)
    with torch.no_grad():
        mods[0].B.add_(line)
        assert "adapter_B_local_cosine" not in tracker.record(model, 2)["adapter"].metrics
        mods[0].B.add_(line)  # module 0 on a straight line; the other modules never move
        third = tracker.record(model, 4)
    assert third[f"adapter:{mods[0].name}"].metrics["lora_B_local_cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert math.isnan(third[f"adapter:{mods[1].name}"].metrics["lora_B_local_cosine"])
    assert third["adapter"].metrics["adapter_B_local_cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert AdapterTracker().record(build_llama(50, hidden=16, layers=1, heads=2), 0) == {}  # no LoRA: nothing


# --------------------------------------------------------------------------------------------
# Alerts: adapter-only points and same-step merging
# --------------------------------------------------------------------------------------------


def _point(step: int, **hooks: dict[str, float]) -> MetricPoint:
    return MetricPoint(step, {h.replace("__", ":"): m for h, m in hooks.items()})


def _short_history_rules():
    """The default rules, with sudden_change judging after 3 snapshots (default 10): short series."""
    import dataclasses

    from drift_monitor.alerts import default_rules

    return [dataclasses.replace(r, min_history=3) if r.name == "sudden_change" else r for r in default_rules()]


def test_alert_history_skips_missing_hooks_and_merges_same_step():
    probe = "model.layers.1"
    ev = [0.9, 0.899, 0.898, 0.897, 0.896, 0.5]  # a sudden drop at the last probe step
    plain, mixed = AlertEngine(_short_history_rules()), AlertEngine(_short_history_rules())
    alerts_plain, alerts_mixed = [], []
    for i, v in enumerate(ev):
        step = 10 * (i + 1)
        alerts_plain += plain.evaluate(_point(step, **{probe: {"explained_variance": v}}))
        # the same run with adapter-only points in between, and one at the probe step itself first
        alerts_mixed += mixed.evaluate(_point(step - 5, adapter={"adapter_B_norm": 0.1 * i}))
        alerts_mixed += mixed.evaluate(_point(step, adapter={"adapter_B_norm": 0.1 * i + 0.05}))
        alerts_mixed += mixed.evaluate(_point(step, **{probe: {"explained_variance": v}}))
    fired = [(a.rule, a.hook, a.step) for a in alerts_plain]
    assert fired == [("sudden_change", probe, 60)]
    assert [(a.rule, a.hook, a.step) for a in alerts_mixed if a.hook == probe] == fired
    assert [a.message for a in alerts_mixed if a.hook == probe] == [a.message for a in alerts_plain]
    # the two points at step 60 merged: both hooks kept
    last = mixed.history[-1]
    assert last.step == 60 and set(last.metrics) == {"adapter", probe}
    assert last.value("adapter", "adapter_B_norm") == pytest.approx(0.55)
    # the pure evaluate() merges same-step history points the same way: one point per hook gives
    # the same conditions as the merged points
    split = [MetricPoint(p.step, {h: m}) for p in mixed.history[:-1] for h, m in p.metrics.items()]
    assert evaluate(split, last) == evaluate(mixed.history[:-1], last)


def test_sudden_change_fires_on_adapter_rotation_not_per_module():
    eng = AlertEngine(_short_history_rules())
    cos = [-0.98, -0.981, -0.979, -0.982, -0.98, -0.2]  # straight line, then B turns
    out = []
    for i, c in enumerate(cos):
        out += eng.evaluate(_point(i + 1, adapter={"adapter_B_local_cosine": c, "adapter_B_norm": 1.0 + 0.1 * i},
                                   adapter__q={"lora_B_local_cosine": c, "lora_B_norm": 1.0 + 0.1 * i}))
    assert [(a.rule, a.hook, a.step) for a in out] == [("sudden_change", "adapter", 6)]
    assert "adapter_B_local_cosine" in out[0].message


# --------------------------------------------------------------------------------------------
# A real Trainer run: DuckDB and Prometheus against weights saved by the test
# --------------------------------------------------------------------------------------------


def _saved_weights_callback(store: dict[int, dict[str, tuple[np.ndarray, np.ndarray, float]]]):
    """A TrainerCallback that copies every LoRA A/B (and its scaling) at the base and each step."""
    from transformers import TrainerCallback

    def grab(model, step):
        out = {}
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                key = name.replace("base_model.model.", "", 1)
                out[key] = (mod.lora_A["default"].weight.detach().double().numpy().copy(),
                            mod.lora_B["default"].weight.detach().double().numpy().copy(),
                            mod.lora_alpha["default"] / mod.r["default"])
        store[step] = out

    class Saver(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            grab(model, 0)

        def on_step_end(self, args, state, control, model=None, **kw):
            grab(model, state.global_step)

    return Saver()


def _prometheus_value(text: str, name: str, hook: str) -> float:
    pat = re.compile(rf'^{name}\{{([^}}]*)\}} (\S+)$', re.M)
    vals = [float(v) for labels, v in pat.findall(text) if f'hook="{hook}"' in labels]
    assert len(vals) == 1, (name, hook, vals)
    return vals[0]


def test_trainer_lora_signals_in_duckdb_and_prometheus(tmp_path):
    from peft import LoraConfig, get_peft_model
    from servers import http_get
    from transformers import Trainer

    from drift_monitor.callbacks import DriftMonitorCallback
    from drift_monitor.store import StoreReader

    tf.torch_threads()
    tok, model, sae_dir, ps = tf.world(tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]))
    cfg = tf.config(tmp_path, sae_dir, ps, every_n_steps=3, adapter_every_n_steps=1, fail_fast=True,
                    prometheus_port=0)
    saved: dict = {}
    cb = DriftMonitorCallback(cfg, tok)
    trainer = Trainer(model=peft_model, args=tf.training_args(tmp_path, max_steps=5), train_dataset=tf.lm_dataset(tok),
                      callbacks=[_saved_weights_callback(saved), cb])
    cb.attach(trainer)
    trainer.train()
    assert sorted(saved) == [0, 1, 2, 3, 4, 5]

    reader = StoreReader(cfg.outputs.db_path)
    stored = reader.metric_series(cb.run_id)
    val = {(int(s), h, n): v for s, h, n, v in stored[["step", "hook", "name", "value"]].itertuples(index=False)}
    modules = sorted(saved[0])
    assert len(modules) == 6 and {f"adapter:{m}" for m in modules} <= set(reader.hooks(cb.run_id))
    for step in range(6):
        sq = np.zeros(3)
        for m in modules:
            a, b, s = saved[step][m]
            want = [np.linalg.norm(a), np.linalg.norm(b), np.linalg.norm(s * b @ a)]
            got = [val[(step, f"adapter:{m}", n)] for n in ("lora_A_norm", "lora_B_norm", "lora_BA_norm")]
            assert got == pytest.approx(want, rel=1e-4, abs=1e-7), (step, m)
            sq += np.square(want)
        agg = [val[(step, "adapter", n)] for n in ("adapter_A_norm", "adapter_B_norm", "adapter_BA_norm")]
        assert agg == pytest.approx(np.sqrt(sq), rel=1e-4, abs=1e-7)
    # local cosine logged at t, centred at t-1 (k = 1), per module, mean, max and global
    for t in range(2, 6):
        per, d1s, d2s = [], [], []
        for m in modules:
            d1 = saved[t - 2][m][1] - saved[t - 1][m][1]
            d2 = saved[t][m][1] - saved[t - 1][m][1]
            c = _np_cos(d1.ravel(), d2.ravel()) if np.any(d1) and np.any(d2) else math.nan
            got = val[(t, f"adapter:{m}", "lora_B_local_cosine")]
            assert (math.isnan(got) and math.isnan(c)) or got == pytest.approx(c, abs=1e-4), (t, m)
            per.append(c)
            d1s.append(d1.ravel()), d2s.append(d2.ravel())
        assert val[(t, "adapter", "adapter_B_local_cosine")] == pytest.approx(np.nanmean(per), abs=1e-4)
        assert val[(t, "adapter", "adapter_B_local_cosine_max")] == pytest.approx(np.nanmax(per), abs=1e-4)
        glob = _np_cos(np.concatenate(d1s), np.concatenate(d2s))
        assert val[(t, "adapter", "adapter_B_local_cosine_global")] == pytest.approx(glob, abs=1e-4)
    assert (0, "adapter", "adapter_B_local_cosine") not in val and (1, "adapter", "adapter_B_local_cosine") not in val

    # probe snapshots where due; adapter-only snapshots between them; step 5 has both (train end)
    assert reader.steps(cb.run_id, tf.HOOK) == [0, 3, 5]
    assert reader.steps(cb.run_id, "adapter") == [0, 1, 2, 3, 4, 5]
    assert set(cb.alerts.history[-1].metrics) >= {"adapter", tf.HOOK}, "same-step points merged in the engine"
    # trackers get the aggregates, not the per-module values
    logged = [h for h in trainer.state.log_history if "drift_monitor/adapter/adapter_B_norm" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4, 5]
    assert not any(k.startswith("drift_monitor/adapter:") for h in trainer.state.log_history for k in h)

    text = http_get(f"http://127.0.0.1:{cb.prometheus_port}/metrics")
    for name, key in [("drift_monitor_adapter_b_norm", "adapter_B_norm"),
                      ("drift_monitor_adapter_b_local_cosine", "adapter_B_local_cosine")]:
        assert _prometheus_value(text, name, "adapter") == pytest.approx(val[(5, "adapter", key)], rel=1e-9)
    # per-module series are opt-in (outputs.prometheus_adapter_modules): the store keeps them, /metrics not
    assert f'hook="adapter:{modules[0]}"' not in text
    if cb.exporter is not None:
        cb.exporter.close()


def test_per_module_adapter_series_are_opt_in():
    from drift_monitor.exporters.prometheus import PrometheusExporter

    hooks = {"adapter": HookResult("adapter", 0, {"adapter_B_norm": 0.5}, {}),
             "adapter:layers.0.q": HookResult("adapter:layers.0.q", 0, {"lora_BA_norm": 0.25}, {})}
    snap = Snapshot(step=3, hooks=hooks, probe_hash="p", n_tokens=0)
    for opt_in in (False, True):
        exp = PrometheusExporter("r", adapter_modules=opt_in)
        exp.update(snap)
        text = generate_latest(exp.registry).decode()
        assert _prometheus_value(text, "drift_monitor_adapter_b_norm", "adapter") == 0.5
        assert ('hook="adapter:layers.0.q"' in text) is opt_in
        if opt_in:
            assert _prometheus_value(text, "drift_monitor_lora_ba_norm", "adapter:layers.0.q") == 0.25


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------


def _adapter_db(path: Path) -> None:
    from drift_monitor.store import Store

    s = Store(path, run_id="lora-id")
    s.start_run(name="lora")
    for step in range(0, 5):
        hooks = {"adapter": HookResult("adapter", 0, {"adapter_B_norm": 0.1 * step, "adapter_A_norm": 2.0,
                                                      "adapter_BA_norm": 0.2 * step}, {})}
        for m in ("q", "v"):
            metrics = {"lora_B_norm": 0.05 * step + (m == "v"), "lora_A_norm": 1.0, "lora_BA_norm": 0.1 * step}
            if step >= 2:
                metrics["lora_B_local_cosine"] = -0.9 + 0.1 * step + (m == "v") * 0.05
                hooks["adapter"].metrics["adapter_B_local_cosine"] = -0.9 + 0.1 * step
            hooks[f"adapter:layers.0.{m}"] = HookResult(f"adapter:layers.0.{m}", 0, metrics, {})
        s.write(Snapshot(step=step, hooks=hooks, probe_hash="p", n_tokens=0))
    s.close()
    s = Store(path, run_id="plain-id")
    s.start_run(name="plain")
    s.write(Snapshot(step=0, hooks={"model.layers.1": HookResult("model.layers.1", 0, {"l0": 3.0}, {})},
                     probe_hash="p", n_tokens=10))
    s.close()


def test_dashboard_adapter_page(tmp_path):
    from test_dashboard import app, charts, no_errors

    db = tmp_path / "drift.duckdb"
    _adapter_db(db)
    at = app(db, "Adapter")
    no_errors(at)
    at.selectbox(key="adp_run").set_value("lora-id").run()
    no_errors(at)
    titles = [c["title"] if isinstance(c.get("title"), str) else c.get("title", {}).get("text") for c in charts(at)]
    assert titles == ["Adapter norms (all modules)", "Local cosine of the B trajectory (all modules)",
                      "B local cosine per module", "B norm per module"]
    table = at.dataframe[0].value.set_index("module")
    assert sorted(table.index) == ["layers.0.q", "layers.0.v"]
    assert table.loc["layers.0.v", "lora_B_local_cosine"] == pytest.approx(-0.9 + 0.4 + 0.05)
    assert table.loc["layers.0.q", "lora_B_norm"] == pytest.approx(0.2)
    # a run without adapter signals: a message; and the hook pickers of other pages skip adapter hooks
    at.selectbox(key="adp_run").set_value("plain-id").run()
    no_errors(at)
    assert any("no adapter signals" in m.value for m in at.info)
    detail = app(db, "Run detail")
    detail.selectbox(key="detail_run").set_value("lora-id").run()
    no_errors(detail)
    assert not [s for s in detail.selectbox if s.key == "detail_hook"]
    assert any("adapter signals only" in m.value for m in detail.info)
