"""One notification (an alert event for one target) and the body a webhook receives.

Why a record of its own: delivery is tracked per (alert event, target), because one target may
take a message that another refused. Its id is deterministic (the alert's id, which already
names the run, rule, hook, step and raised/resolved, plus the target's name), so the same event
is the same notification however often it is seen: after a resume that re-evaluates a step, a
notification the store knows as delivered is not sent again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

from drift_monitor.records import Alert


@dataclass
class Notification:
    """One alert event to deliver to one target, with its delivery state: one row of the
    store's ``notifications`` table (its fields are the table's columns, in order).

    ``event``: ``raised`` or ``resolved``. ``notified_at``: Unix time of the delivery (None: not
    delivered yet). ``attempts``: requests made so far. ``last_error``: why the last one failed
    (None after a delivery).
    """

    notification_id: str
    alert_id: str
    run_id: str
    target: str
    event: str
    rule: str
    severity: str
    hook: str
    step: int
    message: str
    value: float = math.nan
    threshold: float = math.nan
    created_at: float = 0.0
    notified_at: float | None = None
    attempts: int = 0
    last_error: str | None = None

    @classmethod
    def of(cls, alert: Alert, alert_id: str, run_id: str, target: str) -> Notification:
        nid = hashlib.sha1(f"{alert_id}\x1f{target}".encode()).hexdigest()[:24]
        return cls(notification_id=nid, alert_id=alert_id, run_id=run_id, target=target,
                   event="raised" if alert.status == "active" else "resolved", rule=alert.rule,
                   severity=alert.severity, hook=alert.hook, step=int(alert.step), message=alert.message,
                   value=float(alert.value), threshold=float(alert.threshold), created_at=time.time())

    @property
    def delivered(self) -> bool:
        return self.notified_at is not None

    def copy(self) -> Notification:
        return dataclasses.replace(self)

    def row(self) -> dict[str, Any]:
        """The store row (times as Unix seconds; the store converts them)."""
        return dataclasses.asdict(self)


def text(n: Notification, run_name: str | None) -> str:
    """The one-line human message (Slack's ``text``)."""
    run = f"{run_name} ({n.run_id})" if run_name else n.run_id
    if n.event == "raised":
        return f"[{n.severity.upper()}] drift-monitor alert {n.rule} at step {n.step}, {n.hook or 'run'} — {run}: " \
               f"{n.message}"
    return f"[RESOLVED] drift-monitor alert {n.rule} at step {n.step}, {n.hook or 'run'} — {run}: {n.message}"


def body(n: Notification, fmt: str, run_name: str | None) -> bytes:
    """The JSON body for a target of format ``fmt`` (see :data:`.targets.FORMATS`)."""
    if fmt == "slack":
        return json.dumps({"text": text(n, run_name)}).encode()
    data = {"text": text(n, run_name), "event": n.event, "run": n.run_id, "run_name": run_name, "rule": n.rule,
            "severity": n.severity, "hook": n.hook, "step": n.step, "message": n.message,
            "value": n.value if math.isfinite(n.value) else None,
            "threshold": n.threshold if math.isfinite(n.threshold) else None,
            "alert_id": n.alert_id, "notification_id": n.notification_id}
    return json.dumps(data).encode()
