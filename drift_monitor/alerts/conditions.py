"""The pure layer of the alerts: every rule's condition at every hook of a new snapshot.

Why pure: the same function serves the live engine, a replay of a stored run and the tests,
so it keeps no state and raises nothing. Each rule kind has one evaluator that returns a
:class:`~drift_monitor.alerts.points.Condition` whose message names the numbers behind it, or
None when the metric is missing or NaN. A missing value is *not* a clearing: an active alert
stays active until the metric is back and below its threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from drift_monitor.records import Snapshot
from drift_monitor.robust import robust_change_z

from .points import Condition, MetricPoint
from .rules import OPS, AlertRule, RulesSource, load_rules


def _fmt(v: float, spec: str = ".3g") -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def evaluate(
    history: Sequence[Snapshot | MetricPoint], snapshot: Snapshot | MetricPoint, rules: RulesSource = None
) -> list[Condition]:
    """Every rule's condition at every hook of ``snapshot``, given the run's earlier snapshots.

    Pure: nothing is stored. ``history`` may hold the base snapshot (``is_base`` or step 0;
    used for the base's explained variance when the snapshot lacks it) and the run's other
    snapshots in any order; only steps before ``snapshot.step`` count (a resumed run that
    re-evaluates a step ignores the abandoned future). On a base snapshot only ``nonfinite``
    rules are evaluated: the others compare the model with the base. A rule whose metric is
    missing or NaN at a hook gives no condition there.
    """
    rules = load_rules(rules)
    cur = MetricPoint.from_snapshot(snapshot)
    points = [MetricPoint.from_snapshot(p) for p in history]
    bases = [p for p in points if p.is_base]
    base = bases[-1] if bases else None
    by_step: dict[int, MetricPoint] = {}
    for p in points:
        if not p.is_base and p.step < cur.step:
            # a re-written step: the later record wins, hook by hook (an adapter-only point and a
            # probe snapshot at the same step complement each other)
            by_step[p.step] = p.merged_over(by_step[p.step]) if p.step in by_step else p
    hist = [by_step[s] for s in sorted(by_step)]

    out: list[Condition] = []
    for rule in rules:
        if cur.is_base and rule.kind != "nonfinite":
            continue
        for hook in cur.metrics:
            if not rule.applies_to(hook):
                continue
            if rule.requires is not None and not rule.requires.holds(cur.value(hook, rule.requires.metric)):
                continue  # e.g. refusal_erosion in a start that never refused: nothing to erode
            cond = _EVALUATORS[rule.kind](rule, hook, cur, hist, base)
            if cond is not None:
                out.append(cond)
    return out


def _cond(rule: AlertRule, hook: str, value: float, firing: bool, message: str) -> Condition:
    return Condition(rule.name, hook, float(value), float(rule.threshold), bool(firing), message, str(rule.severity))


def _eval_threshold(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                    base: MetricPoint | None) -> Condition | None:
    v = cur.value(hook, rule.metric)
    if v is None:
        return None
    fn, word = OPS[rule.op]
    firing = fn(v, rule.threshold)
    msg = (f"{rule.metric} {_fmt(v, '.4g')} is {'' if firing else 'not '}{word} the threshold "
           f"{_fmt(rule.threshold, '.4g')} at {hook}")
    return _cond(rule, hook, v, firing, msg)


def _eval_ev_drop(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                  base: MetricPoint | None) -> Condition | None:
    ev = cur.value(hook, "explained_variance")
    delta = cur.value(hook, "explained_variance_delta")
    base_ev = cur.value(hook, "base_explained_variance")
    if base_ev is None and base is not None:
        base_ev = base.value(hook, "explained_variance")
    if ev is None and delta is not None and base_ev is not None:
        ev = base_ev + delta
    if base_ev is None and delta is not None and ev is not None:
        base_ev = ev - delta
    if ev is None or base_ev is None:
        return None
    drop = -delta if delta is not None else base_ev - ev
    firing = drop > rule.threshold
    where = "below" if drop >= 0 else "above"
    msg = (f"explained variance {ev:.3f} is {abs(drop):.3f} {where} the base's {base_ev:.3f} at {hook} "
           f"({'more than' if firing else 'within'} the allowed drop {_fmt(rule.threshold)})")
    return _cond(rule, hook, drop, firing, msg)


def _eval_emerging(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                   base: MetricPoint | None) -> Condition | None:
    n = cur.value(hook, rule.metric)
    ids = cur.emerging.get(hook)
    if n is None:
        if ids is None:
            return None
        n = float(len(ids))  # the metric is missing but the snapshot has the refusal table
    firing = n > rule.threshold
    count = int(n) if float(n).is_integer() else n
    if firing:
        msg = f"{count} emerging refusal feature{'s' if count != 1 else ''} at {hook}"
        if ids:
            msg += f" (top: {', '.join(map(str, ids))}{', ...' if count > len(ids) else ''})"
        mx = cur.value(hook, "max_refusal_score")
        if mx is not None:
            msg += f"; max refusal score {mx:.3g}"
    else:
        msg = (f"no emerging refusal features at {hook}" if n == 0 else
               f"{count} emerging refusal features at {hook}, not above {_fmt(rule.threshold)}")
    return _cond(rule, hook, n, firing, msg)


def _eval_nonfinite(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                    base: MetricPoint | None) -> Condition | None:
    v = cur.value(hook, rule.metric)
    if v is None:
        return None
    firing = v > rule.threshold
    model = "the base model's" if cur.is_base else "the model's"
    msg = (f"{_fmt(100.0 * v, '.3g')}% of probe tokens had non-finite (NaN/inf) activations in {model} "
           f"{hook} (allowed: {_fmt(100.0 * rule.threshold, '.3g')}%); those tokens are left out of every metric")
    if not firing:
        msg = (f"activations at {hook} are finite" if v == 0 else
               f"{_fmt(100.0 * v, '.3g')}% of probe tokens had non-finite activations at {hook}, within "
               f"the allowed {_fmt(100.0 * rule.threshold, '.3g')}%")
    return _cond(rule, hook, v, firing, msg)


def _eval_sudden(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                 base: MetricPoint | None) -> Condition | None:
    results = []  # (|z|, z, metric, detail)
    for m in rule.metrics or ():
        v = cur.value(hook, m)
        if v is None:
            continue
        series = [(p.step, x) for p in hist if (x := p.value(hook, m)) is not None]
        if len(series) < max(rule.min_history, 2):
            continue
        vals = np.array([x for _, x in series])
        prev_step, prev = series[-1]
        d = v - prev
        z, med, scale = robust_change_z(np.diff(vals), d, scale_ref=max(abs(v), abs(prev)))
        detail = (f"{m} changed by {d:+.3g} ({prev:.4g} -> {v:.4g}, step {prev_step} -> {cur.step}) against a "
                  f"typical step-to-step change of {med:+.3g} ± {scale:.2g} over the last {len(vals) - 1} "
                  f"changes: robust z = {_fmt(z, '.1f')}")
        results.append((abs(z), z, m, detail))
    if not results:
        return None
    results.sort(key=lambda r: -r[0])  # stable: ties keep the rules' metric order
    top_abs, top_z, top_m, top_detail = results[0]
    firing = top_abs > rule.threshold
    if firing:
        others = [f"{m} (z = {_fmt(z, '.1f')})" for a, z, m, _ in results[1:] if a > rule.threshold]
        msg = f"sudden change at {hook}: {top_detail} (|z| > {_fmt(rule.threshold, '.3g')})"
        if others:
            msg += f"; also {', '.join(others)}"
    else:
        msg = f"no sudden change at {hook}: largest |robust z| {_fmt(top_abs, '.2f')} ({top_m})"
    return _cond(rule, hook, top_z, firing, msg)


def _eval_change_window(rule: AlertRule, hook: str, cur: MetricPoint, hist: list[MetricPoint],
                        base: MetricPoint | None) -> Condition | None:
    v = cur.value(hook, rule.metric)
    if v is None:
        return None
    series = [x for p in hist if (x := p.value(hook, rule.metric)) is not None] + [v]
    n, m = int(rule.window), int(rule.prior)
    if len(series) < n + m:
        return None  # not enough snapshots yet: no verdict (an active alert stays active)
    now, before = float(np.mean(series[-n:])), float(np.mean(series[-(n + m):-n]))
    d = now - before
    if rule.change == "relative":
        d = d / abs(before) if before != 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
    size = {"increase": d, "decrease": -d, "either": abs(d)}[str(rule.direction)]
    firing = size > rule.threshold
    unit = "%" if rule.change == "relative" else ""
    shown = (lambda x: f"{_fmt(100.0 * x, '+.3g')}%") if unit else (lambda x: _fmt(x, "+.4g"))
    way = {"increase": "a rise", "decrease": "a fall", "either": "a change"}[str(rule.direction)]
    msg = (f"{rule.metric} mean of the last {n} snapshots {now:.4g} vs {before:.4g} over the {m} before: "
           f"{shown(d)} at {hook} ({'more than' if firing else 'within'} {way} of "
           f"{shown(rule.threshold).lstrip('+')})")
    return _cond(rule, hook, d, firing, msg)


_EVALUATORS: dict[str, Callable[..., Condition | None]] = {
    "threshold": _eval_threshold,
    "ev_drop": _eval_ev_drop,
    "emerging_refusal": _eval_emerging,
    "sudden_change": _eval_sudden,
    "nonfinite": _eval_nonfinite,
    "change_window": _eval_change_window,
}
