"""The stateful layer of the alerts: one run's history and its active alerts.

Why state: the store wants condition *changes*, not conditions. It assumes at most one alert
per (rule, hook, step) and closes the matching active alert on a ``resolved`` one, so the
engine raises an ``active`` alert when a condition starts to hold (not again while it keeps
holding) and a ``resolved`` one, at the step where it cleared, when it stops. Its
:meth:`AlertEngine.state` is plain JSON, so the trainer callback saves it in a checkpoint and a
resumed run does not re-raise.

Why "stored" is a state of its own: an alert that the engine counts as active but that never
reached the store is an alert nobody sees, and the engine would not raise it again. With
``confirm_writes=True`` (the recorder, whenever there is a store) a raised or resolved alert
stays *unstored* until :meth:`AlertEngine.confirm` (the write that carried it is durable): it is
not in :meth:`AlertEngine.active`, not counted, and :meth:`AlertEngine.unstored` hands it out
again with every later write, under the same deterministic id, so it is stored once, at the step
it was raised, however many writes failed first.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from drift_monitor.records import Alert, Snapshot, is_adapter_hook

from .conditions import evaluate
from .points import MetricPoint, decode_float, encode_float
from .rules import AlertRule, RulesSource, load_rules, suggest

log = logging.getLogger("drift_monitor.alerts")  # the name it had as one module: log filters keep working


_STATE_VERSION = 1


class AlertEngine:
    """Turns each snapshot of one run into the Alerts that changed state.

    ``evaluate(snapshot)`` returns an ``active`` Alert for each (rule, hook) condition that
    starts firing (never again while it keeps firing) and a ``resolved`` Alert, at the
    snapshot's step, for each active one that cleared. A base snapshot (``is_base`` or step 0)
    is recorded as the base; only ``nonfinite`` rules are checked on it, since the base with
    NaN/inf activations poisons every later comparison and should be seen at once (such an
    alert clears at the first snapshot whose activations are finite again).

    ``raised_total[(rule, severity)]`` counts raised alerts (for a Prometheus counter);
    :meth:`active_counts` gives the gauge. :meth:`state` / :meth:`from_state` round-trip
    through JSON, so a resumed run continues without re-raising.
    """

    def __init__(self, rules: RulesSource = None, run: str | None = None, *, confirm_writes: bool = False) -> None:
        self.rules: list[AlertRule] = load_rules(rules)
        self.run = run
        self.confirm_writes = confirm_writes
        self._base: MetricPoint | None = None
        self._history: list[MetricPoint] = []  # non-base points, ascending steps
        self._active: dict[tuple[str, str], Alert] = {}  # stored (confirmed) active alerts
        self._unstored: list[Alert] = []  # state changes not yet confirmed stored, in order
        self.raised_total: dict[tuple[str, str], int] = {}
        self.resolved_total: dict[tuple[str, str], int] = {}
        self._warned_hooks: set[tuple[str, str]] = set()

    # -- public API ------------------------------------------------------------------------

    def evaluate(self, snapshot: Snapshot | MetricPoint) -> list[Alert]:
        """Record ``snapshot`` and return the Alerts that changed state with it.

        Without ``confirm_writes`` they count as stored at once; with it they wait in
        :meth:`unstored` until :meth:`confirm`."""
        out = self._step(MetricPoint.from_snapshot(snapshot), emit=True)
        if not self.confirm_writes:
            self.confirm()
        return out

    def unstored(self) -> list[Alert]:
        """Every state change not yet confirmed stored (copies, in order): what the next write
        must carry. Re-writing one is harmless: its id is deterministic and the store upserts."""
        return [dataclasses.replace(a) for a in self._unstored]

    def confirm(self) -> list[Alert]:
        """The write carrying :meth:`unstored` is durable: the alerts now count (active set,
        raised/resolved totals). Returns them, for the exporter."""
        done, self._unstored = self._unstored, []
        for a in done:
            key, k = (a.rule, a.hook), (a.rule, a.severity)
            if a.status == "active":
                self._active[key] = a
                self.raised_total[k] = self.raised_total.get(k, 0) + 1
            else:
                self._active.pop(key, None)
                self.resolved_total[k] = self.resolved_total.get(k, 0) + 1
        return [dataclasses.replace(a) for a in done]

    def observe(self, snapshot: Snapshot | MetricPoint, *, sync_active: bool = True) -> None:
        """Record ``snapshot`` without returning or counting alerts (replaying a resumed run).

        With ``sync_active`` the active set still follows the conditions, as if the alerts had
        been raised and stored then, so the next :meth:`evaluate` does not raise them again.
        """
        self._step(MetricPoint.from_snapshot(snapshot), emit=False, sync=sync_active)

    def active(self) -> list[Alert]:
        """The alerts now active (copies), in the order they were raised."""
        return [dataclasses.replace(a) for a in self._active.values()]

    def active_counts(self) -> dict[tuple[str, str], int]:
        """Active alerts per (rule, severity): the ``drift_monitor_alerts_active`` gauge."""
        out: dict[tuple[str, str], int] = {}
        for a in self._active.values():
            out[(a.rule, a.severity)] = out.get((a.rule, a.severity), 0) + 1
        return out

    def restore_active(self, alerts: Iterable[Alert]) -> None:
        """Mark alerts as active (e.g. the run's open alerts read back from the store)."""
        for a in alerts:
            if a.status == "active":
                self._active[(a.rule, a.hook)] = dataclasses.replace(a)

    @property
    def base(self) -> MetricPoint | None:
        return self._base

    @property
    def history(self) -> list[MetricPoint]:
        """The run's non-base points, in step order."""
        return list(self._history)

    def state(self) -> dict[str, Any]:
        """JSON-safe state (history, base, active alerts, counters); rules are not included."""
        return {
            "version": _STATE_VERSION,
            "run": self.run,
            "base": self._base.to_json() if self._base is not None else None,
            "history": [p.to_json() for p in self._history],
            "active": [_alert_to_json(a) for a in self._active.values()],
            "unstored": [_alert_to_json(a) for a in self._unstored],
            "raised_total": [[r, s, n] for (r, s), n in self.raised_total.items()],
            "resolved_total": [[r, s, n] for (r, s), n in self.resolved_total.items()],
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], rules: RulesSource = None, run: str | None = None, *,
                   confirm_writes: bool = False) -> AlertEngine:
        """An engine continuing from :meth:`state` (rules are given again: they live in the config)."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not an AlertEngine state of version {_STATE_VERSION} (got {got!r})")
        eng = cls(rules, run=run if run is not None else state.get("run"), confirm_writes=confirm_writes)
        try:
            eng._base = MetricPoint.from_json(state["base"]) if state.get("base") is not None else None
            eng._history = sorted((MetricPoint.from_json(p) for p in state.get("history", [])), key=lambda p: p.step)
            for d in state.get("active", []):
                a = _alert_from_json(d)
                eng._active[(a.rule, a.hook)] = a
            eng._unstored = [_alert_from_json(d) for d in state.get("unstored", [])]
            eng.raised_total = {(r, s): int(n) for r, s, n in state.get("raised_total", [])}
            eng.resolved_total = {(r, s): int(n) for r, s, n in state.get("resolved_total", [])}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed AlertEngine state: {e!r}") from None
        return eng

    # -- internals -------------------------------------------------------------------------

    def _step(self, point: MetricPoint, emit: bool, sync: bool = True) -> list[Alert]:
        earlier = [p for p in self._history if p.step < point.step]
        hist = ([self._base] if self._base is not None else []) + earlier
        conds = evaluate(hist, point, self.rules) if (emit or sync) else []
        if point.is_base:
            self._base = point
        else:
            same = [p for p in self._history if p.step == point.step]
            # Two points at one step (e.g. adapter signals, then a snapshot on_save) merge hook by
            # hook; a hook re-measured at that step replaces its earlier values.
            self._history = earlier + [point.merged_over(same[-1]) if same else point]
        if emit:
            self._warn_missing_hooks(point)
        if not (emit or sync):
            return []

        out: list[Alert] = []
        names = {r.name for r in self.rules}
        current = self._current()
        for key in [k for k in current if k[0] not in names]:  # rule removed from the config
            old = current.pop(key)
            if emit:
                out.append(self._resolved(old, point.step, old.value,
                                          f"resolved: rule {old.rule!r} is no longer configured"))
            else:
                self._active.pop(key, None)
        for c in conds:
            key = (c.rule, c.hook)
            old = current.get(key)
            if c.firing and old is None:
                alert = Alert(rule=c.rule, severity=c.severity, step=point.step, hook=c.hook,  # type: ignore[arg-type]
                              message=c.message, value=c.value, threshold=c.threshold, status="active")
                current[key] = alert
                if emit:
                    out.append(dataclasses.replace(alert))
                else:
                    self._active[key] = alert
            elif not c.firing and old is not None and point.step >= old.step:
                del current[key]
                if emit:
                    out.append(self._resolved(old, point.step, c.value, f"resolved: {c.message}"))
                else:
                    self._active.pop(key, None)
        self._unstored.extend(dataclasses.replace(a) for a in out)
        return out

    def _current(self) -> dict[tuple[str, str], Alert]:
        """The active alerts as the conditions see them: the stored ones, updated by the state
        changes not yet stored (a raised alert is not raised twice while its write waits)."""
        cur = dict(self._active)
        for a in self._unstored:
            if a.status == "active":
                cur[(a.rule, a.hook)] = a
            else:
                cur.pop((a.rule, a.hook), None)
        return cur

    def _resolved(self, old: Alert, step: int, value: float, message: str) -> Alert:
        return Alert(rule=old.rule, severity=old.severity, step=step, hook=old.hook, message=message,
                     value=value, threshold=old.threshold, status="resolved")

    def _warn_missing_hooks(self, point: MetricPoint) -> None:
        if all(is_adapter_hook(h) for h in point.metrics):
            return  # an adapter-only point between probe snapshots lacks the SAE hooks by design
        for r in self.rules:
            for h in r.hooks or ():
                if h not in point.metrics and (r.name, h) not in self._warned_hooks:
                    self._warned_hooks.add((r.name, h))
                    log.warning("alert rule %r names hook %r, which the snapshot at step %d does not have "
                                "(hooks: %s)%s", r.name, h, point.step, ", ".join(point.metrics),
                                suggest(h, point.metrics))


def _alert_to_json(a: Alert) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["value"], d["threshold"] = encode_float(a.value), encode_float(a.threshold)
    return d


def _alert_from_json(d: Mapping[str, Any]) -> Alert:
    return Alert(rule=d["rule"], severity=d["severity"], step=int(d["step"]), hook=d["hook"], message=d["message"],
                 value=decode_float(d.get("value")), threshold=decode_float(d.get("threshold")),
                 status=d.get("status", "active"), created_at=float(d.get("created_at", 0.0)))
