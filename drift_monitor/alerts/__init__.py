"""Alert rules over snapshots (docs/design.md §4): conditions -> :class:`~drift_monitor.records.Alert` records.

A package of small modules, one job each, re-exported here so ``from drift_monitor.alerts
import X`` is the one import callers need:

* :mod:`.rules` – :class:`AlertRule`, the kinds and known metrics, :func:`default_rules` and
  :func:`load_rules` (YAML), all validated at load time.
* :mod:`.points` – :class:`MetricPoint` (the scalar metrics the alerts keep of a snapshot)
  and :class:`Condition` (a rule's verdict at one hook).
* :mod:`.conditions` – :func:`evaluate`, pure: given the run's earlier snapshots and a new one,
  every (rule, hook) condition with the value, the threshold and a message naming the numbers.
* :mod:`.engine` – :class:`AlertEngine`, the run's history and active alerts; it turns
  condition *changes* into ``active`` / ``resolved`` Alerts, and its state is plain JSON.
* :func:`robust_change_z` (the ``sudden_change`` statistic) lives in :mod:`drift_monitor.robust`,
  the one definition of the robust z-score, shared with the monitor's refusal statistics.

Why it must stay torch-free: the dashboard and the exporters import it in processes without
torch. It imports only the stdlib, NumPy, PyYAML, :mod:`drift_monitor.records` and
:mod:`drift_monitor.robust`.
"""

from __future__ import annotations

from drift_monitor.robust import robust_change_z

from .conditions import evaluate
from .engine import AlertEngine
from .points import Condition, MetricPoint
from .rules import (
    DEFAULT_SUDDEN_CHANGE_METRICS,
    KINDS,
    KNOWN_METRICS,
    OPS,
    SEVERITIES,
    AlertRule,
    AlertRuleError,
    Requirement,
    RulesSource,
    default_rules,
    load_rules,
)

__all__ = [
    "DEFAULT_SUDDEN_CHANGE_METRICS", "KINDS", "KNOWN_METRICS", "OPS", "SEVERITIES",
    "AlertEngine", "AlertRule", "AlertRuleError", "Condition", "MetricPoint", "Requirement", "RulesSource",
    "default_rules", "evaluate", "load_rules", "robust_change_z",
]
