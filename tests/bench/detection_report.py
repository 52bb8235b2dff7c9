"""The held-out detection report: builds (or reuses) the detection suite and scores it.

    python tests/bench/detection_report.py                 # every scenario (cold: ~2 h on 2 cores)
    python tests/bench/detection_report.py --subset ci     # gain-A-50, erode-comply-50, control-chat
    python tests/bench/detection_report.py --json out.json

Prints, per run: behaviour per step, every default-rule alert with its first step, key signals;
then, on the held-out half only: per default rule the false positives and negatives and the lead
time; per signal the threshold chosen on the calibration half, AUROC, false alarms and misses at
that threshold, lead time, and Pearson / Spearman r between the signal's change and the change
in harmful refusal over every checkpoint. Two baselines sit in the same table: the behavioural
proxy (``refusal_logprob``, a full forward) and the direction-only signals (no SAE).
Rules are replayed from the stored metrics with the current default rules, so a changed
threshold is scored without re-training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def report(data, out=sys.stdout) -> dict:
    from drift_monitor.alerts.rules import default_rules
    from drift_monitor.demo.detection import SIGNALS, as_json, fmt, score_rules, score_signal, split

    def p(*a):
        print(*a, file=out)

    p("## Runs (behaviour: harmful / harmless refusal by step; alerts: default rules, first step)\n")
    p("| run | split | intent | changed | harmful refusal by step | harmless (last) | alerts | "
      "retention (min..max) | max post score |")
    p("|---|---|---|---|---|---|---|---|---|")
    for r in data:
        steps = [0, *r.steps]
        hr = " → ".join(f"{r.behaviour[s]['harmful_refusal_rate']:.0%}" for s in steps)
        hl = r.behaviour[steps[-1]]["harmless_refusal_rate"]
        ret = [r.metrics[s].get("refusal_retention", math.nan) for s in r.steps]
        mps = max((r.metrics[s].get("max_post_refusal_score", math.nan) for s in r.steps), default=math.nan)
        alerts = ", ".join(f"{k}@{v}" for k, v in sorted(r.alerts.items(), key=lambda kv: kv[1])) or "none"
        p(f"| {r.name} | {r.split} | {r.intent} | {'yes' if r.positive else 'no'} | {hr} | {hl:.0%} | {alerts} | "
          f"{fmt(min(ret))}..{fmt(max(ret))} | {fmt(mps)} |")
    cal, held = split(data)
    p(f"\nCalibration runs: {len(cal)} ({sum(r.positive for r in cal)} changed); held-out runs: {len(held)} "
      f"({sum(r.positive for r in held)} changed). Everything below is on the held-out runs.\n")
    from drift_monitor.demo.detection import (
        RULE_SIGNALS,
        calibrate_rule,
        direction_of,
        separates,
        signal,
    )

    p("## Rule thresholds chosen on the calibration half (and the shipped defaults)\n")
    p("| rule | signal | runs it is for | calibrated bound | shipped |")
    p("|---|---|---|---|---|")
    shipped = {r.name: r for r in default_rules()}
    chosen = {}
    for rule, sig_name, direction, generic in RULE_SIGNALS:
        t = calibrate_rule(cal, signal(sig_name), direction)
        sig = signal(sig_name)
        keep = [r for r in cal if not r.positive or direction == "any" or direction_of(r) == direction]
        if generic and not separates(keep, sig):
            t = math.nan  # generic drift no changed run shows beyond the worst control: no default rule
        lower = sig.metric in ("refusal_retention", "refusal_direction_cosine")
        bound = ("none (does not separate)" if not math.isfinite(t)
                 else f"< {fmt(1 - t, '.3f')}" if lower else f"> {fmt(t, '.3f')}")
        r = shipped.get(rule)
        ship = f"{r.metric} {r.op} {r.threshold:g}" if r is not None else "not a default rule"
        chosen[rule] = t
        p(f"| {rule} | {sig_name} | harmful refusal {direction} | {sig.metric} {bound} | {ship} |")
    p("")
    rules = [r.name for r in default_rules()]
    rule_reports = score_rules(held, rules)
    def rule_table(reports) -> None:
        p("| rule | false positives | false negatives | lead time (steps, ≤ 0 is early) |")
        p("|---|---|---|---|")
        for rr in reports:
            leads = ", ".join(f"{k}: {fmt(v, 'd') if v is not None else 'missed'}" for k, v in rr.lead_times.items())
            p(f"| {rr.rule} | {len(rr.false_positives)} {rr.false_positives or ''} | "
              f"{len(rr.false_negatives)} {rr.false_negatives or ''} | {leads} |")

    p("## Default rules (held-out)\n")
    rule_table(rule_reports)
    from drift_monitor.demo.suite import FRESH

    fresh = [r for r in held if r.name in FRESH]
    if fresh:
        n_changed = sum(r.positive for r in fresh)
        p(f"\n## Default rules on the fresh held-out runs alone ({len(fresh)} runs, {n_changed} changed)\n")
        p("Defined and built after every rule, bound and gate above was chosen, none in view: the clean test.\n")
        # a rule that never fired on these runs is left out
        rule_table([rr for rr in score_rules(fresh, rules)
                    if rr.rule == "any" or rr.false_positives or len(rr.false_negatives) < n_changed])
    sig_reports = [score_signal(cal, held, s) for s in SIGNALS]
    p("\n## Signals (threshold from the calibration half; AUROC, errors, lead, r on the held-out half)\n")
    p("| signal | family | threshold | AUROC | FP | FN | lead time | Pearson r | Spearman r |")
    p("|---|---|---|---|---|---|---|---|---|")
    for sr in sig_reports:
        leads = [v for v in sr.lead_times.values() if v is not None]
        lead = f"{max(leads)} (max)" if leads and len(leads) == len(sr.lead_times) else \
            (f"{max(leads)} (max), {len(sr.lead_times) - len(leads)} missed" if leads else "—")
        p(f"| {sr.signal.name} | {sr.signal.family} | {fmt(sr.threshold, '.3f')} | {fmt(sr.auroc)} | "
          f"{len(sr.false_positives)} | {len(sr.false_negatives)} | {lead} | {fmt(sr.pearson)} | "
          f"{fmt(sr.spearman)} |")
    return as_json({"runs": [{"name": r.name, "split": r.split, "intent": r.intent, "changed": r.positive,
                              "behaviour": r.behaviour, "alerts": r.alerts,
                              "metrics": {s: {k: r.metrics[s].get(k) for k in
                                              sorted({sig.metric for sig in SIGNALS})} for s in r.metrics}}
                             for r in data],
                    "rules": rule_reports, "signals": sig_reports, "calibrated_thresholds": chosen})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--subset", choices=["all", "ci"], default="all")
    ap.add_argument("--only", nargs="*", help="these scenarios (build them; report over every cached one)")
    ap.add_argument("--cached", action="store_true",
                    help="build nothing: report over the scenarios already cached (e.g. while others build)")
    ap.add_argument("--json", help="write the report here as JSON")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from drift_monitor.demo import suite as S
    from drift_monitor.demo.testbed import build_testbed

    tb = build_testbed(quiet=args.quiet)
    names = args.only if args.only else (list(S.CI_SUBSET) if args.subset == "ci" else None)
    runs = [] if args.cached else S.run_suite(tb, names, quiet=args.quiet)
    if args.only or args.cached:  # report over every scenario already cached, not just the ones built now
        runs = [r for r in (S.cached_run(tb, s) for s in S.SUITE) if r is not None]
    # FRESH2 (built for pre-flight's second rule, docs/preflight.md) is kept apart: the documented
    # halves are the 21 runs; the next detection rule should be scored on FRESH2 and on newer runs
    later = [r for r in runs if r.scenario.name in S.FRESH2]
    runs = [r for r in runs if r.scenario.name not in S.FRESH2]
    data = S.run_data(runs, S.store_dir(tb))
    doc = report(data)
    for d in S.run_data(later, S.store_dir(tb)) if later else []:
        print(f"\nkept apart (FRESH2): {d.name}: changed {'yes' if d.positive else 'no'}, default rules raised "
              f"{', '.join(f'{k} at step {v}' for k, v in sorted(d.alerts.items())) or 'nothing'}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
