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

Nothing computed is lost without a word: a write the store cannot make now (busy, full disk,
I/O error) waits in its spool or in memory and is retried at every later write
(:class:`~drift_monitor.store.Store`); while writes fail the recorder raises a
``store_write_failed`` alert (stored once the store works again), logs and exports the number
waiting (``drift_monitor_store_pending``), and alerts count as raised only once the write that
carries them is durable (:class:`~drift_monitor.alerts.AlertEngine`, ``confirm_writes``). What
still cannot be written when the run ends is dumped to a file and its replay command logged.

Alerts reach people through ``outputs.notify`` (:mod:`drift_monitor.notify`): each alert the
recorder stores (raised or resolved) is handed to a :class:`~drift_monitor.notify.Notifier`,
whose own thread sends it, so no step waits on a webhook. Its delivery state goes to the store
with the recorder's next write; undelivered notifications are retried at every snapshot and at
the end, and a resumed run reads them back so that none is sent twice.

The run's end is recorded honestly (:class:`RunEndWatch`): ``finished``, ``failed`` (an
exception), ``interrupted`` (KeyboardInterrupt) or ``preempted`` (SIGTERM).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import MonitorConfig
from .errors import ConfigError, first_line
from .records import Alert, HookResult, RunStatus, Snapshot

log = logging.getLogger("drift_monitor.recorder")

#: The rule name of the alert raised while store writes fail (not a configurable rule: it is
#: about the monitor's own output, so it needs no metric and fires whatever the rules say).
STORE_WRITE_FAILED = "store_write_failed"


def status_for(exc: BaseException | None) -> RunStatus:
    """The run state an exception ends a run in: none ``finished``, KeyboardInterrupt
    ``interrupted``, anything else ``failed`` (SIGTERM is :class:`RunEndWatch`'s ``preempted``)."""
    if exc is None:
        return "finished"
    return "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"


def merge_adapter_signals(snap: Snapshot, hooks: Mapping[str, HookResult]) -> Snapshot:
    """``snap`` plus the adapter hooks (``adapter``/``adapter:<module>``) measured at its step,
    as one snapshot: one store transaction, one alert evaluation. The callback and the scan both
    merge through here, so their rows for one checkpoint are the same. A copy when there is
    anything to add (the monitor's cached base snapshot is never modified), else ``snap`` itself."""
    return replace(snap, hooks={**snap.hooks, **hooks}) if hooks else snap


@dataclass
class RunRecorder:
    """The outputs of one run. Build it with :meth:`open`; every output is optional.

    ``push_job`` is the Pushgateway job (``drift_monitor`` for training, ``drift_monitor_scan``
    for scans); a push that fails is logged and counted, never raised: an outage of the gateway
    must not stop training or a scan. ``unsaved``: the dump files :meth:`finish` had to write
    (writes the store could not take; each logged with the command that loads it).
    A ``with`` block finishes the run in the state its exception implies (:func:`status_for`).
    """

    run_id: str
    config: MonitorConfig
    store: Any = None  # drift_monitor.store.Store
    alerts: Any = None  # drift_monitor.alerts.AlertEngine
    exporter: Any = None  # drift_monitor.exporters.prometheus.PrometheusExporter
    notifier: Any = None  # drift_monitor.notify.Notifier (outputs.notify)
    push_job: str = "drift_monitor"
    prometheus_port: int | None = None
    errors: int = 0
    last_step: int = 0
    status: RunStatus = "running"
    unsaved: list[Path] = field(default_factory=list)
    sd_target: Path | None = None  #: the Prometheus file_sd target file, while serving (outputs.prometheus_sd_dir)
    #: the Pushgateway grouping key (None: the exporter's ``{"run": run}``); a scan shard adds ``shard``
    push_key: dict[str, str] | None = None
    _finished: bool = field(default=False, repr=False)
    _store_alert: Alert | None = field(default=None, repr=False)  # the active store_write_failed alert
    _busy: int = field(default=0, repr=False)
    _deferred: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _watch: RunEndWatch | None = field(default=None, repr=False)

    @classmethod
    def open(cls, config: MonitorConfig, *, probe_hash: str, run_id: str | None = None,
             run_name: str | None = None, model_name: str | None = None, alert_state: dict | None = None,
             push_job: str = "drift_monitor", fallback_dirs: Sequence[str | os.PathLike[str]] = (),
             watch: bool = True, shard: tuple[int, int] | None = None, alerts: bool = True) -> RunRecorder:
        """Open the store run (when ``config.db_path``), the alert engine (resumed from
        ``alert_state``) and the Prometheus exporter (when a port or a Pushgateway is set).

        A store that cannot be written raises here (:class:`~drift_monitor.store.StoreUnwritable`),
        before any work. ``fallback_dirs``: where a dump goes when the database's folder cannot
        take it (the callback passes the training output folder). ``watch``: record how the run
        ends even if the caller never gets to :meth:`finish` (:class:`RunEndWatch`).
        ``shard=(k, n)``: shard k of n of a sharded scan, which writes its own file of the store
        directory and pushes its own group. ``alerts=False``: no alert engine (a shard sees only
        some steps; :mod:`drift_monitor.offline.shards` evaluates the run's alerts at the end).
        """
        from .alerts import AlertEngine, load_rules

        outputs = config.outputs
        name = run_name or outputs.run_name
        store = None
        if outputs.db_path:
            from .store import Store
            from .store.many import is_many, run_file

            db = outputs.db_path
            if is_many(db):  # a store directory: this run writes its own file, so runs never contend
                if any(c in str(db) for c in "*?["):
                    raise ConfigError(f"outputs.db_path {db!r}: a glob names files to read; a run writes to a "
                                      "file or to a store directory")
                run_id = run_id or uuid.uuid4().hex
                Path(db).mkdir(parents=True, exist_ok=True)
                db = str(run_file(db, run_id, shard))
            store = Store(db, run_id=run_id, run_name=name, fallback_dirs=fallback_dirs)
            run_id = store.start_run(name=name, model=model_name, config=config.to_dict(),
                                     probe_hash=probe_hash)
        run_id = run_id or uuid.uuid4().hex
        rules = load_rules(outputs.alert_rules)
        confirm = store is not None  # an alert counts once the write that carries it is durable
        engine = (None if not alerts
                  else AlertEngine.from_state(alert_state, rules=rules, confirm_writes=confirm) if alert_state
                  else AlertEngine(rules, run=run_id, confirm_writes=confirm))
        rec = cls(run_id=run_id, config=config, store=store, alerts=engine, push_job=push_job,
                  push_key={"run": run_id, "shard": f"{shard[0]}-of-{shard[1]}"} if shard else None)
        if outputs.prometheus_port is not None or outputs.pushgateway_url:
            rec._guard("prometheus", rec._open_exporter, model_name, probe_hash)
        if outputs.notify and engine is not None:  # a shard has no alerts; the run's are notified at its end
            rec._open_notifier(name)
        if watch:
            rec._watch = RunEndWatch(rec).install()
        return rec

    def _open_exporter(self, model_name: str | None, probe_hash: str) -> None:
        from . import __version__
        from .exporters.prometheus import PrometheusExporter

        outputs = self.config.outputs
        self.exporter = PrometheusExporter(run=self.run_id,
                                           adapter_modules=self.config.outputs.prometheus_adapter_modules)
        self.exporter.set_info(model=model_name or "", probe_hash=probe_hash, version=__version__)
        if outputs.prometheus_port is not None:
            self.prometheus_port = self.exporter.serve(outputs.prometheus_port, outputs.prometheus_host)
            log.info("drift-monitor: Prometheus metrics at http://%s:%d/metrics", outputs.prometheus_host,
                     self.prometheus_port)
            if outputs.prometheus_sd_dir:
                from .exporters.discovery import write_target

                self.sd_target = write_target(outputs.prometheus_sd_dir, outputs.prometheus_host,
                                              self.prometheus_port)
                log.info("drift-monitor: Prometheus file_sd target %s", self.sd_target)

    def _open_notifier(self, run_name: str | None) -> None:
        from .notify import Notifier
        from .store import alert_id

        self.notifier = Notifier(self.config.outputs.notify, self.run_id, run_name, alert_id=alert_id)
        if self.store is not None:  # a resumed run: what was delivered is not sent again, the rest is retried
            self._guard("read the run's notifications", self._load_notifications)

    def _load_notifications(self) -> None:
        from .store import StoreReader

        rows = StoreReader(self.store.path).notifications(self.run_id).to_dict("records")
        n = self.notifier.load(rows)
        if n:
            log.info("drift-monitor: %d undelivered notifications of run %s queued again", n, self.run_id)

    def _notify(self, alerts: list[Alert]) -> None:
        """Hand the stored alert events to the notifier (never blocks) and retry what is still
        undelivered. Their states go to the store with the next write (:meth:`record`)."""
        self.notifier.retry_pending()
        self.notifier.submit(alerts)
        self._export_notifications()

    def _export_notifications(self) -> None:
        if self.exporter is not None:
            n = self.notifier
            self.exporter.set_notifications(sent=n.sent, failed=n.failed, pending=n.pending())

    # ------------------------------------------------------------------ per snapshot
    def record(self, snap: Snapshot) -> list[Alert]:
        """Evaluate the rules over the run's history, write the snapshot and its alerts in one
        store transaction, update the exporter and push. Returns the alerts raised/resolved.

        The write also carries every earlier alert not yet durably stored (same ids: stored
        once). The exporter is updated even when the write raises."""
        with self._busy_section():
            self.last_step = max(self.last_step, int(snap.step))
            alerts = self.alerts.evaluate(snap) if self.alerts is not None else []
            for a in alerts:
                (log.warning if a.status == "active" else log.info)("drift-monitor alert [%s] %s: %s", a.severity,
                                                                     a.rule, a.message)
            outcome = None
            stored = alerts
            # delivery states changed since the last write ride along with this one
            states = self.notifier.changes() if self.notifier is not None and self.store is not None else []
            try:
                if self.store is not None:
                    carried = self.alerts.unstored() if self.alerts is not None else alerts
                    outcome = self.store.write(snap, carried, notifications=[s.row() for s in states])
            except BaseException:
                if states:
                    self.notifier.unwritten(states)
                raise
            finally:
                if self.store is not None:
                    stored = self._confirm(outcome) + self._check_store()
                if self.notifier is not None:
                    self._guard("notify", self._notify, stored)
                if self.exporter is not None:
                    # update() also records snap.duration_s in drift_monitor_probe_duration_seconds
                    self.exporter.update(snap, stored, active=self._active())
                    self._export_pending()
                    self.push()
        return alerts

    def _confirm(self, outcome: str | None) -> list[Alert]:
        """Alerts count once the write carrying them is durable: in the database or the spool."""
        if self.alerts is None or outcome not in ("committed", "spooled"):
            return []
        return self.alerts.confirm()

    def _active(self) -> list[Alert] | None:
        if self.alerts is None:
            return None
        return self.alerts.active() + ([self._store_alert] if self._store_alert is not None else [])

    def _check_store(self) -> list[Alert]:
        """Raise (or resolve) the ``store_write_failed`` alert as the store fails (or works
        again), and log what waits. The alert itself waits with the other writes: it is stored
        once the store works. Returns the alert records made now (for the exporter)."""
        st = self.store
        made: list[Alert] = []
        if st.failure is not None and self._store_alert is None:
            self._store_alert = Alert(
                rule=STORE_WRITE_FAILED, severity="critical", step=self.last_step, hook="",
                message=f"writing {st.path} failed ({type(st.failure).__name__}: {first_line(st.failure)}); "
                        f"{st.pending()} writes wait and are retried at every later write",
                value=float(st.pending()))
            log.error("drift-monitor alert [critical] %s: %s", STORE_WRITE_FAILED, self._store_alert.message)
            made.append(self._store_alert)
            st.write_alerts([self._store_alert])
        elif st.failure is None and self._store_alert is not None:
            resolved = Alert(rule=STORE_WRITE_FAILED, severity="critical", step=self.last_step, hook="",
                             message=f"resolved: {st.path} is written again", status="resolved")
            log.info("drift-monitor alert [critical] %s: %s", STORE_WRITE_FAILED, resolved.message)
            self._store_alert = None
            made.append(resolved)
            st.write_alerts([resolved])
        n = st.pending()
        if n:
            log.warning("drift-monitor: %d writes wait for %s (%s); retried at every later write", n, st.path,
                        "failing" if st.failure is not None else "busy")
        return made

    def retry(self) -> None:
        """Apply waiting writes now, at a step without a snapshot. Brief (0.1 s for a busy file):
        a training step must not wait on a dashboard. The alerts they carry are confirmed by the
        next :meth:`record`, which carries them again (same ids)."""
        if self.store is None or not self.store.may_wait():
            return
        with self._busy_section():
            self.store.flush_spool(timeout_s=0.1)
            self._check_store()
            self._export_pending()

    def _export_pending(self) -> None:
        if self.exporter is not None and self.store is not None:
            self.exporter.set_store_pending(self.store.pending())

    def observe(self, point: Any) -> None:
        """Add a step already stored (a resumed scan) to the alert history without writing it."""
        if self.alerts is not None:
            self.alerts.observe(point)

    def push(self) -> None:
        """Push to the Pushgateway when one is configured; a failure is logged and counted."""
        if self.exporter is not None and self.config.outputs.pushgateway_url:
            self._guard("push", self.exporter.push, self.config.outputs.pushgateway_url, self.push_job,
                        self.push_key)

    # ------------------------------------------------------------------ errors and status
    def record_error(self, what: str, e: BaseException, step: int | None = None) -> None:
        """Count an error caught inside the monitor (``drift_monitor_errors_total``) and store it
        as a ``monitor_error`` alert. ``errors`` counts only the recorder's own failures: a caller
        that reports its errors here keeps its own count."""
        with self._busy_section():
            try:
                if self.exporter is not None:
                    self.exporter.record_error()
                if self.store is not None:
                    self.store.write_alerts([Alert(rule="monitor_error", severity="warning",
                                                   step=self.last_step if step is None else step, hook="",
                                                   message=f"{what}: {type(e).__name__}: {e}")])
                    self._check_store()
                    self._export_pending()
            except Exception:
                log.debug("drift-monitor: could not record the error", exc_info=True)

    def alert_state(self) -> dict | None:
        """The alert engine's state, for a checkpoint (resuming keeps cooldowns and history)."""
        return self.alerts.state() if self.alerts is not None else None

    def finish(self, status: RunStatus = "finished") -> None:
        """Mark the run ``status``, write what waits (else dump it to a file and log the command
        that loads it), close the store and push a last time. Idempotent: the first call wins."""
        if self._finished:
            return
        self._finished = True
        self.status = status
        if self._watch is not None:
            self._watch.uninstall()
        with self._busy_section():
            if self.notifier is not None:
                self._guard("notify", self._finish_notifications)
            if self.store is not None:
                try:
                    self.store.finish_run(status)
                    self._check_store()
                finally:
                    self.store.close()
                    self.unsaved = list(self.store.unsaved)
                    self._export_pending()
            log.info("drift-monitor: run %s %s", self.run_id, status)
            if self.sd_target is not None:
                from .exporters.discovery import remove_target

                self._guard("remove the Prometheus file_sd target", remove_target, self.sd_target)
            out = self.config.outputs
            if self.exporter is not None and out.pushgateway_url and not out.keep_pushed:
                # the run is over: its last values must not be scraped as current forever
                self._guard("delete the Pushgateway group", self.exporter.delete_pushed, out.pushgateway_url,
                            self.push_job, self.push_key)
            else:
                self.push()

    def _finish_notifications(self) -> None:
        """Retry what is undelivered, wait for it (bounded: FINISH_WAIT_S), store the final state."""
        from .notify import FINISH_WAIT_S

        n = self.notifier
        deadline = time.monotonic() + FINISH_WAIT_S
        n.drain(FINISH_WAIT_S)  # what is in flight first: a notification being sent is not queued twice
        n.retry_pending()
        if not n.drain(max(0.0, deadline - time.monotonic())):
            log.warning("drift-monitor: %d notifications still undelivered at the end of run %s; they are in the "
                        "store (drift-monitor runs: undelivered_notifications)", n.pending(), self.run_id)
        n.close()
        changes = n.changes()
        if changes and self.store is not None:
            self.store.write_notifications([c.row() for c in changes])
        self._export_notifications()

    def __enter__(self) -> RunRecorder:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.finish(status_for(exc))

    # ------------------------------------------------------------------ signal safety
    def _busy_section(self) -> _Busy:
        return _Busy(self)

    def when_idle(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` now, or, if a write is in progress on this thread's stack (a signal
        handler interrupted it), as soon as that write is done: a handler must not interleave
        with a half-made write."""
        if self._busy:
            self._deferred.append(fn)
        else:
            fn()

    def _guard(self, what: str, fn, *args: Any) -> None:
        guarded(what, fn, *args, fail_fast=self.config.fail_fast, on_error=self._own_error)

    def _own_error(self, what: str, e: Exception) -> None:
        self.errors += 1
        self.record_error(what, e)


class _Busy:
    """``with``: marks the recorder busy; on leaving the outermost one, runs deferred work."""

    def __init__(self, rec: RunRecorder):
        self.rec = rec

    def __enter__(self) -> None:
        self.rec._busy += 1

    def __exit__(self, *exc: object) -> None:
        self.rec._busy -= 1
        while not self.rec._busy and self.rec._deferred:
            self.rec._deferred.pop(0)()


class RunEndWatch:
    """Records how a run ended when the code that knows never gets to say it.

    Why these three hooks: a Trainer callback sees no exception (``on_train_end`` is simply not
    called when training raises), and a scheduler's preemption is a SIGTERM that no callback
    sees at all. So, on the main thread of the process that owns the run:

    * **SIGTERM** → ``preempted``: the handler writes the status and flushes (deferred to the
      end of a write in progress, see :meth:`RunRecorder.when_idle`), then restores the
      previous handler and chains to it, or, if it was the default, re-delivers SIGTERM so the
      process still dies by the signal as the scheduler expects. Not installed when SIGTERM was
      ignored (then nothing would end the run), nor off the main thread (Python allows
      handlers only there).
    * **sys.excepthook** (chained to the previous hook) → ``interrupted`` for an uncaught
      KeyboardInterrupt, ``failed`` for any other uncaught exception, with its type and message
      in the log. It runs before the interpreter shuts down, while the store still works.
    * **atexit** → ``failed`` when the process exits normally without the run being finished
      (an exception caught by the script, ``sys.exit`` mid-training), logged as such.

    A context manager around ``trainer.train()`` would be exact, but the callback is given to a
    Trainer the user builds and runs, so nothing would call it; these hooks need nothing from
    the user. :meth:`uninstall` (called by :meth:`RunRecorder.finish`) restores the handler and
    hook where they are still ours; the watch holds the recorder weakly, so a recorder that was
    dropped unfinished (a test) is not touched at exit.
    """

    def __init__(self, rec: RunRecorder):
        self._rec = weakref.ref(rec)
        self._prev_term: Any = None
        self._term_installed = False
        self._prev_hook: Callable[..., Any] | None = None

    def install(self) -> RunEndWatch:
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            if prev is not signal.SIG_IGN:
                self._prev_term = prev
                signal.signal(signal.SIGTERM, self._on_sigterm)
                self._term_installed = True
        self._prev_hook = sys.excepthook
        sys.excepthook = self._on_exception
        atexit.register(self._at_exit)
        return self

    def uninstall(self) -> None:
        if self._term_installed and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._prev_term if self._prev_term is not None else signal.SIG_DFL)
            self._term_installed = False
        if sys.excepthook == self._on_exception and self._prev_hook is not None:
            sys.excepthook = self._prev_hook
        atexit.unregister(self._at_exit)

    def _finish(self, status: RunStatus, why: str) -> None:
        rec = self._rec()
        if rec is None or rec._finished:
            return
        log.warning("drift-monitor: %s; recording run %s as %s", why, rec.run_id, status)
        try:
            rec.finish(status)
        except Exception:  # noqa: BLE001 - the process is ending: report, never mask its own error
            log.error("drift-monitor: could not record run %s as %s:\n%s", rec.run_id, status,
                      traceback.format_exc())

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        rec = self._rec()

        def end() -> None:
            self._finish("preempted", "SIGTERM received")
            self._chain(signum, frame)

        if rec is not None and not rec._finished:
            rec.when_idle(end)
        else:
            self._chain(signum, frame)

    def _chain(self, signum: int, frame: Any) -> None:
        prev = self._prev_term
        self.uninstall()
        if callable(prev):
            prev(signum, frame)
        elif prev is None or prev == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _on_exception(self, exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        self._finish(status_for(exc), f"uncaught {exc_type.__name__}: {first_line(exc)}")
        (self._prev_hook or sys.__excepthook__)(exc_type, exc, tb)

    def _at_exit(self) -> None:
        self._finish("failed", "the process is exiting before the run finished (training or the scan did not end "
                               "normally)")


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

