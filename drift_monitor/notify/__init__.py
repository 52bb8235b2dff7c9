"""Alert notifications that reach people: webhooks (``outputs.notify``), sent off the training step.

A package of small modules, one job each:

* :mod:`.targets` – :class:`WebhookTarget` (URL, minimum severity, body format, headers whose
  secrets come from ``${ENV}`` variables) and its start-up checks (:class:`NotifyError`).
* :mod:`.messages` – :class:`Notification` (one alert event for one target, with its delivery
  state: a row of the store's ``notifications`` table) and the JSON / Slack bodies.
* :mod:`.delivery` – :class:`Notifier`, the bounded queue and daemon thread that send with
  retries and backoff; the recorder (:mod:`drift_monitor.recorder`) submits the alerts it
  stores and writes the delivery state back with its writes.

Torch-free (stdlib, :mod:`drift_monitor.records`, :mod:`drift_monitor.alerts.rules`), like the
store and the exporters.
"""

from __future__ import annotations

from .delivery import FINISH_WAIT_S, Notifier, check_reachable, send
from .messages import Notification, body, text
from .targets import FORMATS, NotifyError, WebhookTarget, parse_targets

__all__ = ["FINISH_WAIT_S", "FORMATS", "Notification", "Notifier", "NotifyError", "WebhookTarget", "body",
           "check_reachable", "parse_targets", "send", "text"]
