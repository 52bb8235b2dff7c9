"""RunRecorder: a run's outputs on the main process — store, alerts, exporter, errors, status.

Why one class: the training callback and the offline scan produce the same kind of run (a base
snapshot, then snapshots at steps) and must record it identically, so that a scan of a callback
run's checkpoints compares 1:1 with the callback's rows and alerts. Both used to re-implement
"evaluate the rules, write one store transaction, update the exporter, push"; now both call
:meth:`RunRecorder.record`. The recorder never runs a model and never imports torch (the store,
alerts and exporters are torch-free), so it is also what a custom loop would use::

    rec = RunRecorder.open(config, probe_hash=mon.probe_hash, model_name="my-model")
    rec.record(mon.baseline(base))
    rec.record(mon.snapshot(model, step=100))
    rec.finish()

Only the world process zero creates one: per-rank work (the probe pass, the all-reduce) stays in
the callers, the shape of TRL's callbacks.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import MonitorConfig
from .records import Alert, Snapshot

log = logging.getLogger("drift_monitor.recorder")

RunStatus = Literal["running", "finished", "failed"]


@dataclass
class RunRecorder:
    """The outputs of one run. Build it with :meth:`open`; every output is optional.

    ``push_job`` is the Pushgateway job (``drift_monitor`` for training, ``drift_monitor_scan``
    for scans); a push that fails is logged and counted, never raised: an outage of the gateway
    must not stop training or a scan.
    """

    run_id: str
    config: MonitorConfig
    store: Any = None  # drift_monitor.store.Store
    alerts: Any = None  # drift_monitor.alerts.AlertEngine
    exporter: Any = None  # drift_monitor.exporters.prometheus.PrometheusExporter
    push_job: str = "drift_monitor"
    prometheus_port: int | None = None
    errors: int = 0
    last_step: int = 0
    _finished: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, config: MonitorConfig, *, probe_hash: str, run_id: str | None = None,
             run_name: str | None = None, model_name: str | None = None, alert_state: dict | None = None,
             push_job: str = "drift_monitor") -> RunRecorder:
        """Open the store run (when ``config.outputs.db_path``), the alert engine (resumed from
        ``alert_state``) and the Prometheus exporter (when a port or a Pushgateway is set)."""
        from .alerts import AlertEngine, load_rules

        name = run_name or config.outputs.run_name
        store = None
        if config.outputs.db_path:
            from .store import Store

            store = Store(config.outputs.db_path, run_id=run_id, run_name=name)
            run_id = store.start_run(name=name, model=model_name, config=config.to_dict(),
                                     probe_hash=probe_hash)
        run_id = run_id or uuid.uuid4().hex
        rules = load_rules(config.outputs.alert_rules)
        engine = AlertEngine.from_state(alert_state, rules=rules) if alert_state else AlertEngine(rules, run=run_id)
        rec = cls(run_id=run_id, config=config, store=store, alerts=engine, push_job=push_job)
        if config.outputs.prometheus_port is not None or config.outputs.pushgateway_url:
            rec._guard("prometheus", rec._open_exporter, model_name, probe_hash)
        return rec

    def _open_exporter(self, model_name: str | None, probe_hash: str) -> None:
        from . import __version__
        from .exporters.prometheus import PrometheusExporter

        self.exporter = PrometheusExporter(run=self.run_id)
        self.exporter.set_info(model=model_name or "", probe_hash=probe_hash, version=__version__)
        out = self.config.outputs
        if out.prometheus_port is not None:
            self.prometheus_port = self.exporter.serve(out.prometheus_port, out.prometheus_host)
            log.info("drift-monitor: Prometheus metrics at http://%s:%d/metrics", out.prometheus_host,
                     self.prometheus_port)

    # ------------------------------------------------------------------ per snapshot
    def record(self, snap: Snapshot) -> list[Alert]:
        """Evaluate the rules over the run's history, write the snapshot and its alerts in one
        store transaction, update the exporter and push. Returns the alerts raised/resolved."""
        self.last_step = max(self.last_step, int(snap.step))
        alerts = self.alerts.evaluate(snap) if self.alerts is not None else []
        for a in alerts:
            (log.warning if a.status == "active" else log.info)("drift-monitor alert [%s] %s: %s", a.severity,
                                                                 a.rule, a.message)
        if self.store is not None:
            self.store.write(snap, alerts)
        if self.exporter is not None:
            # update() also records snap.duration_s in drift_monitor_probe_duration_seconds
            self.exporter.update(snap, alerts, active=self.alerts.active() if self.alerts else None)
            self.push()
        return alerts

    def observe(self, point: Any) -> None:
        """Add a step already stored (a resumed scan) to the alert history without writing it."""
        if self.alerts is not None:
            self.alerts.observe(point)

    def push(self) -> None:
        """Push to the Pushgateway when one is configured; a failure is logged and counted."""
        if self.exporter is not None and self.config.outputs.pushgateway_url:
            self._guard("push", self.exporter.push, self.config.outputs.pushgateway_url, self.push_job)

    # ------------------------------------------------------------------ errors and status
    def record_error(self, what: str, e: BaseException, step: int | None = None) -> None:
        """Count an error caught inside the monitor (``drift_monitor_errors_total``) and store it
        as a ``monitor_error`` alert. ``errors`` counts only the recorder's own failures: a caller
        that reports its errors here keeps its own count."""
        try:
            if self.exporter is not None:
                self.exporter.record_error()
            if self.store is not None:
                self.store.write_alerts([Alert(rule="monitor_error", severity="warning",
                                               step=self.last_step if step is None else step, hook="",
                                               message=f"{what}: {type(e).__name__}: {e}")])
        except Exception:
            log.debug("drift-monitor: could not record the error", exc_info=True)

    def alert_state(self) -> dict | None:
        """The alert engine's state, for a checkpoint (resuming keeps cooldowns and history)."""
        return self.alerts.state() if self.alerts is not None else None

    def finish(self, status: RunStatus = "finished") -> None:
        """Mark the run ``status``, close the store and push a last time. Idempotent."""
        if self._finished:
            return
        self._finished = True
        if self.store is not None:
            self.store.finish_run(status)
            self.store.close()
        self.push()

    def _guard(self, what: str, fn, *args: Any) -> None:
        guarded(what, fn, *args, fail_fast=self.config.fail_fast, on_error=self._own_error)

    def _own_error(self, what: str, e: Exception) -> None:
        self.errors += 1
        self.record_error(what, e)


def guarded(what: str, fn: Callable[..., Any], *args: Any, fail_fast: bool,
            on_error: Callable[[str, Exception], None]) -> None:
    """Run ``fn(*args)``; an exception is logged and handed to ``on_error`` (count it, report
    it), never raised: the monitor must not stop training or a scan. ``fail_fast`` (tests)
    re-raises instead. The one guard of the callback and the recorder."""
    try:
        fn(*args)
    except Exception as e:
        if fail_fast:
            raise
        log.error("drift-monitor: %s failed (%s: %s); carrying on", what, type(e).__name__, e)
        log.debug("%s", traceback.format_exc())
        on_error(what, e)

