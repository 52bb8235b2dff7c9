"""Figures of the SmolLM2 test bed (drift_monitor/demo/testbed.py), as ratios measured in one run.

    python tests/bench/testbed_report.py [--verify] [--repeats 3]
    python tests/bench/testbed_report.py --residual

Prints: the base SAE's train-sae report (held-out EV, L0, dead/dense fractions, throughput, the EV
curve by tokens seen) and the cold build's stage timings, the probe pass against the forward cut
after the hooked layer (the same batches), the
callback's share of training time, base EV on the probes under the old and the new token
selection, emerging refusal features and alerts of the refusal and control runs, and with
--verify the causal check (`drift-monitor verify`) on the refusal run's emerging features.
--residual prints only what the base SAE cannot see: each run's residual directions, its CE-loss
metrics and their cost, and the refusal run's difference dictionary.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def probe_pass_ratio(tb, repeats: int) -> dict:
    from drift_monitor.demo.bench import _best, _truncated
    from drift_monitor.demo.testbed import monitor_config
    from drift_monitor.monitor import DriftMonitor

    model, tok = tb.load_model(), tb.tokenizer()
    mon = DriftMonitor(monitor_config(tb, None, "bench", baseline_cache_dir=None), tok)
    mon.baseline(model, use_cache=False)
    trunc = _truncated(model, tb.settings.hook_layer)
    dev = torch.device("cpu")

    def truncated() -> None:
        with torch.no_grad():
            for b in mon.probes.batches:
                trunc(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def probe() -> None:
        mon.snapshot(model, step=1)

    for fn in (truncated, probe):
        fn()
    best = {"trunc": float("inf"), "probe": float("inf")}
    for _ in range(repeats):
        best["trunc"] = min(best["trunc"], _best(truncated, 1, dev))
        best["probe"] = min(best["probe"], _best(probe, 1, dev))
    return {"probe_pass_s": best["probe"], "truncated_forward_s": best["trunc"],
            "ratio": best["probe"] / best["trunc"], "selected_tokens": mon.probes.n_tokens,
            "sequence_tokens": int(sum(int(b.attention_mask.sum()) for b in mon.probes.batches))}


def selection_ev(tb) -> dict:
    """Base EV on the default probes: today's selection, and the two things it fixed."""
    from drift_monitor.demo.testbed import monitor_config
    from drift_monitor.monitor import DriftMonitor

    model, tok = tb.load_model(), tb.tokenizer()
    out = {}
    for name, kw in {"now": {}, "sink read (include_bos)": {"include_bos": True, "outlier_factor": None},
                     "old: dialogue format, sink read": {"include_bos": True, "outlier_factor": None,
                                                        "formats": "dialogue"}}.items():
        mon = DriftMonitor(monitor_config(tb, None, "ev", baseline_cache_dir=None, probes=kw), tok)
        snap = mon.baseline(model, use_cache=False)
        out[name] = {"explained_variance": round(snap.metric(tb.hook, "explained_variance"), 4),
                     "n_tokens": snap.n_tokens}
    return out


def run_figures(runs) -> dict:
    from drift_monitor.store import StoreReader

    r = StoreReader(str(runs.db))
    out = {}
    for kind, rid in runs.run_ids.items():
        ms = r.metric_series(rid, names=["n_emerging_refusal_features", "max_refusal_score", "explained_variance",
                                         "base_explained_variance", "refusal_direction_cosine", "topk_jaccard"])
        last = ms[ms.step == ms.step.max()].set_index("name").value.round(4).to_dict()
        steps = sorted(set(ms.step))
        rf = r.refusal_features(rid, ms.hook.iloc[0], steps=[max(steps)], k=5)
        alerts = r.alerts(run_id=rid)
        out[kind] = {"last_step": max(steps), **last,
                     "top_refusal_features": [(int(x.feature), round(float(x.refusal_score), 3))
                                              for x in rf.itertuples()],
                     "alerts": sorted(set(alerts.rule)) if len(alerts) else [], "behaviour": runs.behaviour[kind]}
    t = runs.timings
    out["callback_share"] = {k: round(t[f"{k}_probe_s"] / t[f"{k}_s"], 4) for k in runs.run_ids}
    out["timings"] = t
    return out


def residual_figures(tb, runs) -> dict:
    """What the base SAE cannot see in each run's final adapter: the residual directions (with the
    CE-loss metrics and their cost) and, for the refusal run, the difference dictionary."""
    from peft import PeftModel

    from drift_monitor.demo.testbed import monitor_config
    from drift_monitor.monitor import DriftMonitor
    from drift_monitor.offline.diffdict import diff_dict

    tok = tb.tokenizer()
    out: dict = {}
    for kind in runs.run_ids:
        model = PeftModel.from_pretrained(tb.load_model(), str(runs.adapter(kind))).eval()
        timed = {}
        for ce in (0, 1):
            mon = DriftMonitor(monitor_config(tb, None, "residual", baseline_cache_dir=None,
                                              cadence={"every_n_steps": 10, "ce_every_n_snapshots": ce}), tok)
            with model.disable_adapter():
                mon.baseline(model, use_cache=False)
            t0 = time.perf_counter()
            snap = mon.snapshot(model, step=40)
            timed[ce] = time.perf_counter() - t0
        h = snap.hooks[tb.hook]
        keys = ["explained_variance", "base_explained_variance", "residual_energy_ratio", "residual_top_share",
                "ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "ce_loss_delta", "ce_loss_score"]
        out[kind] = {"metrics": {k: round(h.metrics[k], 4) for k in keys if k in h.metrics},
                     "ce_seconds_per_snapshot": round(timed[1] - timed[0], 1),
                     "snapshot_seconds_without_ce": round(timed[0], 1),
                     "directions": [{"share": round(d.share, 4), "decoder_cos": round(d.decoder_cos, 3),
                                     "nearest_feature": d.nearest_feature,
                                     "projections": {c: round(p, 3) for c, p in d.projections.items()},
                                     "top_tokens": d.top_tokens, "bottom_tokens": d.bottom_tokens}
                                    for d in h.residual]}
        if kind == "refusal":
            from drift_monitor.probe.probes import ProbeSet

            dd = diff_dict(model, None, tok, ProbeSet.default(), tb.hook, n_atoms=4,
                           base_context=model.disable_adapter, progress=False)
            out["refusal_diff_dict"] = [{"share": round(a.share, 4), "source": f"{a.source_probe}:{a.source_token!r}",
                                         "top_probes": a.top_probes[:3], "top_tokens": a.top_tokens,
                                         "bottom_tokens": a.bottom_tokens} for a in dd.atoms]
    return out


def verify_figures(tb, runs) -> dict:
    from drift_monitor.offline.verify import result_json
    from drift_monitor.offline.verify_run import VerifyOptions, run_verify

    res = run_verify(VerifyOptions(str(tb.model_dir), None, "emerging", adapter=str(runs.adapter("refusal")),
                                   db=str(runs.db), run=runs.run_ids["refusal"]), progress=False)
    j = result_json(res)
    return {k: j[k] for k in ("features", "rates", "ablation_relative_drop", "random_relative_drop", "verdict")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", action="store_true", help="also run the causal check (minutes)")
    ap.add_argument("--residual", action="store_true", help="only the residual directions, CE metrics and "
                                                             "difference dictionary of both runs (minutes)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from drift_monitor.demo.testbed import build_testbed
    from drift_monitor.demo.testbed_runs import build_runs

    t0 = time.perf_counter()
    tb = build_testbed()
    runs = build_runs(tb)
    if args.residual:
        print(json.dumps(residual_figures(tb, runs), indent=2, default=str))
        return
    report = {"sae": {k: tb.sae_report()[k] for k in ("explained_variance", "l0", "dead_fraction", "dense_fraction",
                                                       "collect_seconds", "train_seconds", "collect_tokens_per_s",
                                                       "forward_tokens_per_s", "seconds_per_million",
                                                       "ev_curve")},
              "build_timings": tb.timings,
              "probe_pass": probe_pass_ratio(tb, args.repeats), "base_ev_by_selection": selection_ev(tb),
              "runs": run_figures(runs)}
    if args.verify:
        report["verify"] = verify_figures(tb, runs)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
