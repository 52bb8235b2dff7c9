"""The delivery thread: alert notifications to webhooks, off the training step's path.

Why a thread with a bounded queue: a webhook receiver can hang (a proxy that accepts and never
answers) for as long as its timeout, and a training step must not wait on it. So
:meth:`Notifier.submit` only records the notification and puts its id on a bounded queue
(``put_nowait``: when the queue is full it is left pending and retried later, never blocking);
one daemon thread sends, retrying with exponential backoff (``retries`` more attempts per
target). A notification still undelivered after those attempts stays *pending*: the recorder
calls :meth:`Notifier.retry_pending` at every snapshot and at the end of the run
(:meth:`Notifier.drain` then waits, bounded by :data:`FINISH_WAIT_S`).

Why the state is handed out and not written here: the store is written by the main process's
recorder only (one writer, spool and all), so the thread changes notifications in memory and the
recorder writes :meth:`Notifier.changes` with its next write. Exactly once per event is the
goal: an event is a deterministic id (:class:`~.messages.Notification`); one seen before
(also one read back from the store on resume, :meth:`Notifier.load`) is never queued again once
delivered. A message delivered in the instant before the process died, whose delivery the
store never recorded, is sent again after a resume (at least once, not at most once).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from drift_monitor.errors import first_line
from drift_monitor.records import Alert

from .messages import Notification, body
from .targets import WebhookTarget

log = logging.getLogger("drift_monitor.notify")

#: How long :meth:`Notifier.drain` waits at the end of a run for pending notifications (seconds).
FINISH_WAIT_S = 15.0
#: Notifications the queue holds; beyond that they wait (pending) for the next snapshot.
MAX_QUEUE = 1000
#: First backoff between attempts (doubled each time, at most 30 s).
BACKOFF_S = 0.5


class Notifier:
    """Sends alert notifications of one run to its webhook targets from a daemon thread.

    ``alert_id``: the store's deterministic alert id function (``drift_monitor.store.alert_id``),
    passed in so that this package needs no store. Counters for the exporter: ``sent`` (delivered
    notifications), ``failed`` (failed requests) and :meth:`pending` (not delivered yet).
    """

    def __init__(self, targets: Sequence[WebhookTarget], run_id: str, run_name: str | None = None, *,
                 alert_id: Any, max_queue: int = MAX_QUEUE, backoff_s: float = BACKOFF_S) -> None:
        self.targets = {t.name: t for t in targets}
        self.run_id = run_id
        self.run_name = run_name
        self._alert_id = alert_id
        self.backoff_s = float(backoff_s)
        self.sent = 0
        self.failed = 0
        self._known: dict[str, Notification] = {}
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=max_queue)
        self._busy: set[str] = set()  # ids queued or being sent
        self._dirty: set[str] = set()  # ids whose state changed since the last changes()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._ready = threading.Event()  # the start-up reachability checks are done
        self._thread = threading.Thread(target=self._run, name="drift-monitor-notify", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ main process side
    def submit(self, alerts: Iterable[Alert]) -> list[Notification]:
        """Queue one notification per alert event and target that wants its severity; an
        event seen before is not queued again. Never blocks. Returns the new notifications."""
        made = []
        for a in alerts:
            aid = self._alert_id(self.run_id, a)
            for t in self.targets.values():
                if not t.wants(a.severity):
                    continue
                n = Notification.of(a, aid, self.run_id, t.name)
                with self._lock:
                    if n.notification_id in self._known:
                        continue
                    self._known[n.notification_id] = n
                    self._dirty.add(n.notification_id)
                made.append(n.copy())
                self._enqueue(n.notification_id)
        return made

    def load(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Take the run's notifications read back from the store (a resume): delivered ones are
        never sent again, undelivered ones (of a target still configured) are queued. Returns
        how many were queued."""
        queued = []
        fields = Notification.__dataclass_fields__
        for r in rows:
            n = Notification(**{k: _plain(r[k]) for k in fields if k in r})
            n.attempts = int(n.attempts or 0)
            with self._lock:
                if n.notification_id in self._known:
                    continue
                self._known[n.notification_id] = n
            if not n.delivered and n.target in self.targets:
                queued.append(n.notification_id)
        for nid in queued:
            self._enqueue(nid)
        return len(queued)

    def retry_pending(self) -> int:
        """Queue again every undelivered notification not already queued; returns how many."""
        with self._lock:
            ids = [i for i, n in self._known.items()
                   if not n.delivered and i not in self._busy and n.target in self.targets]
        for nid in ids:
            self._enqueue(nid)
        return len(ids)

    def changes(self) -> list[Notification]:
        """The notifications whose state changed since the last call (copies): what the store needs."""
        with self._lock:
            out = [self._known[i].copy() for i in sorted(self._dirty)]
            self._dirty.clear()
        return out

    def unwritten(self, notifications: Iterable[Notification]) -> None:
        """Hand ``notifications`` (from :meth:`changes`) out again with the next changes: the
        write that carried them failed."""
        with self._lock:
            self._dirty.update(n.notification_id for n in notifications if n.notification_id in self._known)

    def pending(self) -> int:
        """Notifications not delivered yet."""
        with self._lock:
            return sum(not n.delivered for n in self._known.values())

    def notifications(self) -> list[Notification]:
        """Every notification known (copies)."""
        with self._lock:
            return [n.copy() for n in self._known.values()]

    def drain(self, timeout_s: float = FINISH_WAIT_S) -> bool:
        """Wait until nothing is queued or being sent (at most ``timeout_s``); True if so."""
        deadline = time.monotonic() + timeout_s
        if not self._ready.wait(timeout_s):
            return False
        with self._lock:
            return self._lock.wait_for(lambda: not self._busy, max(0.0, deadline - time.monotonic()))

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread: a send in progress ends at its timeout (the thread is a daemon, so it
        never holds the process up); what it did not deliver stays pending in the store."""
        self._stop.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread sees _stop after its current item
        self._thread.join(timeout_s)

    def _enqueue(self, nid: str) -> None:
        with self._lock:
            if nid in self._busy:
                return
            try:
                self._queue.put_nowait(nid)
            except queue.Full:
                n = self._known[nid]
                n.last_error = f"notification queue full ({self._queue.maxsize} waiting); retried at the next snapshot"
                self._dirty.add(nid)
                return
            self._busy.add(nid)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        try:
            for t in self.targets.values():
                if self._stop.is_set():
                    break
                check_reachable(t)
        finally:
            self._ready.set()
        while not self._stop.is_set():
            nid = self._queue.get()
            if nid is None:
                break
            try:
                self._deliver(nid)
            except Exception:
                log.exception("drift-monitor: delivering notification %s failed unexpectedly", nid)
            finally:
                with self._lock:
                    self._busy.discard(nid)
                    self._lock.notify_all()

    def _deliver(self, nid: str) -> None:
        with self._lock:
            n = self._known[nid].copy()
        if n.delivered:
            return
        target = self.targets[n.target]
        for attempt in range(target.retries + 1):
            if attempt and self._stop.wait(min(30.0, self.backoff_s * 2 ** (attempt - 1))):
                return
            error = None
            try:
                send(target, body(n, target.format, self.run_name))
            except Exception as e:  # noqa: BLE001 - any failure is recorded and retried
                error = f"{type(e).__name__}: {first_line(e)}"
            with self._lock:
                cur = self._known[nid]
                cur.attempts += 1
                self._dirty.add(nid)
                if error is None:
                    cur.notified_at, cur.last_error = time.time(), None
                    self.sent += 1
                else:
                    cur.last_error = error
                    self.failed += 1
            if error is None:
                log.info("drift-monitor: notified %s of %s %s (step %d)", target.name, n.rule, n.event, n.step)
                return
            log.warning("drift-monitor: notifying %s of %s %s failed (attempt %d of %d): %s", target.name, n.rule,
                        n.event, attempt + 1, target.retries + 1, error)


def send(target: WebhookTarget, data: bytes) -> None:
    """POST ``data`` (JSON) to the target; a status other than 2xx raises."""
    headers = {"Content-Type": "application/json", "User-Agent": "drift-monitor", **target.resolved_headers()}
    req = urllib.request.Request(target.resolved_url(), data=data, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=target.timeout_s) as r:
        if not 200 <= r.status < 300:
            raise OSError(f"HTTP {r.status}")


def check_reachable(target: WebhookTarget, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the target's host and port opens now; a warning if not (the
    receiver may come up later: notifications wait and are retried)."""
    parts = urllib.parse.urlsplit(target.resolved_url())
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=min(timeout_s, target.timeout_s)):
            return True
    except OSError as e:
        log.warning("drift-monitor: notification target %s is not reachable now (%s); notifications wait and are "
                    "retried at every snapshot and at the end of the run", target.name, first_line(e))
        return False


def _plain(v: Any) -> Any:
    """A store value as the Notification field wants it: pandas' NaT/NaN -> None, Timestamps ->
    Unix seconds."""
    import math

    if v is None:
        return None
    if hasattr(v, "to_pydatetime"):  # pandas Timestamp (NaT has it too)
        try:
            if v != v:  # NaT
                return None
        except TypeError:
            pass
        import datetime as dt

        return v.to_pydatetime().replace(tzinfo=dt.UTC).timestamp()
    if isinstance(v, float) and math.isnan(v):
        return v
    if hasattr(v, "item"):  # NumPy scalars
        return v.item()
    return v
