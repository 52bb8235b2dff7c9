"""The organism demo's bounded figures over seeds: what tests/test_organism.py's bounds rest on.

    python tests/bench/organism_seeds.py [--finetune-seeds 0 1 2 3 4] [--organism-seeds 0 1 2]
                                         [--out DIR] [--json F]

Why: test_organism.py bounds the refusal run's EV gap (base SAE's EV on the base minus on the
fine-tune, at the run's last step) and its refusal of held-out *benign* requests. Both are one
draw of a seeded pipeline, so a bound set from the one figure a test run printed is a bound fitted
to that draw. This runs ``drift-monitor demo --quick`` (``organism.run_demo``, unchanged: the
monitored refusal fine-tune, the scanned control, the behaviour and the causal check) over

* **fine-tune seeds** on the seed-0 organism (what a test run builds): the LoRA init, the order
  and the sampling of the fine-tuning rows. Cheap (~1 min each on 2 idle cores);
* **organism seeds**: the whole pipeline (corpus responses, base model, base SAE, fine-tunes).
  ~3 min each; the seed-0 organism is read from the user's organism cache when it is there.

Each (organism seed, fine-tune seed) result is cached as JSON under ``--out`` (default: a folder
in the system temp dir), so a rerun only prints. The seed-0/0 row is the test's own figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

#: The figures the organism tests bound (test_organism.py), per run.
KEYS = ("ev_gap", "features_drifted_ratio", "harmful_refusal_rate", "benign_refusal_rate", "benign_answer_rate",
        "max_refusal_score")


def _figures(summary: dict[str, Any], hook: str) -> dict[str, Any]:
    """The demo summary's bounded figures, per run, plus the causal check's drops, and from its
    store the extremes over the run's steps of the signals its alert rules read."""
    from drift_monitor.store import StoreReader

    reader = StoreReader(summary["db"])
    out: dict[str, Any] = {}
    for run in ("refusal", "control"):
        t, b = summary["tool"][run], summary["behaviour"][run]
        ms = reader.metric_series(t["run_id"], hook, ["explained_variance", "base_explained_variance",
                                                      "refusal_direction_cosine", "residual_energy_ratio"])
        wide = ms.pivot_table(index="step", columns="name", values="value").drop(index=0, errors="ignore")
        gap = wide["base_explained_variance"] - wide["explained_variance"]
        out[run] = {"ev_gap": t["base_explained_variance"] - t["explained_variance"],
                    "ev_gap_max_over_steps": float(gap.max()),
                    "min_refusal_direction_cosine": float(wide["refusal_direction_cosine"].min()),
                    "max_residual_energy_ratio": float(wide["residual_energy_ratio"].max()),
                    "features_drifted_ratio": t["features_drifted_ratio"],
                    "max_refusal_score": t.get("max_refusal_score", 0.0), "alert_rules": t["alert_rules"], **b}
    v = summary["verify"]
    out["verify"] = {"verdict": v["verdict"], "ablation_relative_drop": v["ablation_relative_drop"],
                     "random_relative_drop": v["random_relative_drop"]}
    out["n_benign"] = None  # filled by the caller: held-out benign requests behind the rate
    return out


def run_one(org_seed: int, ft_seed: int, out: Path) -> dict[str, Any]:
    """One demo run (cached as ``out/o{org_seed}-f{ft_seed}.json``)."""
    cached = out / f"o{org_seed}-f{ft_seed}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    from drift_monitor.demo import organism as O

    settings = dataclasses.replace(O.SIZES["quick"], seed=org_seed)
    # the seed-0 organism is the one the user's cache (and every test session) holds: read it there
    user = O.cache_root() / settings.key() / "done.json"
    os.environ["DRIFT_MONITOR_ORGANISM_CACHE"] = str(user.parents[1] if user.is_file() else out / "organisms")
    name = f"seed{org_seed}"
    O.SIZES[name] = settings
    real_finetune = O.finetune

    def finetune(org, kind, out_dir, **kw):
        """The demo's fine-tune with its seed (rows' order, LoRA init, sampling) set to ``ft_seed``."""
        org = dataclasses.replace(org, settings=dataclasses.replace(org.settings, seed=ft_seed))
        return real_finetune(org, kind, out_dir, **kw)

    O.finetune = finetune
    try:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            summary = O.run_demo(Path(tmp) / "demo", size=name, quiet=True)
            res = _figures(summary, settings.hook)
    finally:
        O.finetune = real_finetune
        del O.SIZES[name]
    res["n_benign"] = len(O.build_organism(settings, quiet=True).heldout("harmless"))
    res["seeds"] = {"organism": org_seed, "finetune": ft_seed}
    cached.write_text(json.dumps(res, indent=1))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--finetune-seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4],
                    help="fine-tune seeds on the seed-0 organism")
    ap.add_argument("--organism-seeds", type=int, nargs="*", default=[1, 2],
                    help="organism seeds (whole pipeline; fine-tune seed = organism seed, as the demo does)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "drift_monitor_organism_seeds")
    ap.add_argument("--json", type=Path, help="write every row and the maxima here")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = [(0, f) for f in args.finetune_seeds] + [(o, o) for o in args.organism_seeds if (o, o) != (0, 0)]
    rows = []
    for o, f in dict.fromkeys(pairs):
        print(f"organism seed {o}, fine-tune seed {f} ...", file=sys.stderr, flush=True)
        rows.append(run_one(o, f, args.out))
    print("org ft  run      EV gap (max over steps)  cos_min  resid_max  drifted  harmful->ref  benign->ref  "
          "benign answered  max score  alerts")
    for r in rows:
        for run in ("refusal", "control"):
            x, n = r[run], r["n_benign"]
            print(f"{r['seeds']['organism']:>3} {r['seeds']['finetune']:>2}  {run:<8} {x['ev_gap']:6.3f} "
                  f"({x['ev_gap_max_over_steps']:.3f})  "
                  f"{x['min_refusal_direction_cosine']:7.3f}  {x['max_residual_energy_ratio']:9.2f}  "
                  f"{x['features_drifted_ratio']:7.3f}  {x['harmful_refusal_rate']:12.1%}  "
                  f"{x['benign_refusal_rate']:6.1%} ({round(x['benign_refusal_rate'] * n)}/{n})"
                  f"  {x['benign_answer_rate']:15.1%}  {x['max_refusal_score']:9.3f}  "
                  f"{','.join(x['alert_rules']) or '-'}")
        v = r["verify"]
        print(f"        verify: {v['verdict']}, ablation drop {v['ablation_relative_drop']:.2f}, "
              f"random drop {v['random_relative_drop']:.2f}")
    worst = {run: {k: round(max(r[run][k] for r in rows), 4)
                   for k in ("ev_gap", "ev_gap_max_over_steps", "benign_refusal_rate", "harmful_refusal_rate",
                             "max_residual_energy_ratio", "min_refusal_direction_cosine", "max_refusal_score")}
             for run in ("refusal", "control")}
    least = {run: {k: round(min(r[run][k] for r in rows), 4)
                   for k in ("harmful_refusal_rate", "benign_answer_rate", "features_drifted_ratio",
                             "max_residual_energy_ratio", "min_refusal_direction_cosine", "max_refusal_score")}
             for run in ("refusal", "control")}
    alerts = {run: {rule: sum(rule in r[run]["alert_rules"] for r in rows)
                    for rule in sorted({a for r in rows for a in r[run]["alert_rules"]})}
              for run in ("refusal", "control")}
    print(f"max over {len(rows)} seeds: {json.dumps(worst)}")
    print(f"min over {len(rows)} seeds: {json.dumps(least)}")
    print(f"runs raising each alert, of {len(rows)}: {json.dumps(alerts)}")
    res = {"rows": rows, "max": worst, "min": least, "alerts": alerts}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
