"""Prometheus exporter: Snapshot and Alert records -> bounded-cardinality metrics (docs/design.md §6).

Rank 0 of a training job serves ``/metrics`` (:meth:`PrometheusExporter.serve`, 127.0.0.1 by
default, ``prometheus_port`` 9464 suggested); a batch scan pushes to a Pushgateway
(:meth:`PrometheusExporter.push`). Everything lives in the exporter's own
:class:`~prometheus_client.CollectorRegistry`, so several exporters (one per run, or many in
tests) coexist in one process.

How: prometheus_client's pattern for mirroring state kept elsewhere. The exporter records
plain values (the last value of every metric per hook, the active alerts, the counters) and
one :class:`DriftMonitorCollector` per registry turns them into ``GaugeMetricFamily`` /
``CounterMetricFamily`` / ... objects at each scrape or push. The families and their help
text come from the metric catalog (:mod:`drift_monitor.catalog`), the one list of what the
engine emits.

Conventions: prefix ``drift_monitor_``, base units (seconds), ``_total`` on counters, ``_info``
for run metadata. The only labels are ``hook``, ``category``, ``severity``, ``rule`` and
``direction`` (``category`` and ``direction`` label the direction monitors'
``drift_monitor_direction_projection{,_delta}``: user-supplied directions x probe categories). No
per-feature label, ever: per-feature data lives in the DuckDB store.

Run identity is one series, ``drift_monitor_run_info{run, model, probe_hash, version, hostname,
job_id} 1``, whose metadata values are labels by the ``_info`` convention; no other series
carries the run. Why: identity is stated once, next to its metadata (model, probe hash, host,
cluster job), instead of as one more label on every series; and the scrape target already tells
exporters apart: Prometheus puts ``instance`` (and ``job``) on every series it scrapes, so a query
that wants the run joins::

    drift_monitor_explained_variance * on(instance) group_left(run) drift_monitor_run_info

Hence one run per registry (a second run in the same registry is refused). A push is the one
place the run lands on every series: the Pushgateway keeps groups apart by their grouping key
(``{"run": run}`` by default), and it writes the key's labels onto every series of the group.

Each scalar in ``HookResult.metrics`` becomes a gauge ``drift_monitor_<name>{hook}``
(:data:`METRIC_NAMES` holds the renamed ones, e.g. ``n_emerging_refusal_features`` ->
``drift_monitor_emerging_refusal_features``), except the catalog's patterns: every
``direction_projection[_delta]:<direction>:<category>`` key goes to the one labelled family
``drift_monitor_direction_projection[_delta]{hook, direction, category}``. A metric unknown
to the catalog is exported under its sanitised name. Non-finite values (NaN, ±inf, None) are exported as NaN: Prometheus
stores NaN, and a comparison with NaN is false, so no alert rule fires on it by accident.

This module takes plain records and never imports torch, models or SAEs.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import threading
import time
import weakref
from collections import Counter as _Tally
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import prometheus_client.metrics as _pm
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import delete_from_gateway, push_to_gateway, start_http_server
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from drift_monitor.errors import DriftMonitorError

from .. import catalog
from ..records import ADAPTER_HOOK_PREFIX, Alert, Snapshot
from .discovery import target_labels

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "ALLOWED_LABELS", "DEFAULT_PORT", "DURATION_BUCKETS", "METRIC_HELP", "METRIC_NAMES", "PREFIX",
    "DriftMonitorCollector", "PortInUseError", "PrometheusExporter", "PrometheusExporterError", "PushError",
    "metric_name",
]

log = logging.getLogger(__name__)

PREFIX = "drift_monitor_"

#: The only label names any drift-monitor series carries (``drift_monitor_run_info`` aside).
ALLOWED_LABELS = ("hook", "category", "severity", "rule", "direction")

#: Suggested ``prometheus_port`` (examples/prometheus/prometheus.yml scrapes it).
DEFAULT_PORT = 9464

#: HookResult.metrics key -> exported gauge name (without the prefix) where the two differ
#: (from the catalog: ``n_tokens`` -> ``probe_tokens``, ``adapter_B_norm`` -> ``adapter_b_norm``, ...).
METRIC_NAMES: dict[str, str] = {s.name: s.exported for s in catalog.CATALOG
                                if not s.pattern and s.exported != s.name}

#: Help text of the per-hook gauges: the catalog's, for every plain (non-pattern) metric.
METRIC_HELP: dict[str, str] = {s.name: s.help for s in catalog.CATALOG if not s.pattern}

#: Probe-duration histogram buckets, seconds (tiny models: tens of ms; 8B models: minutes).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, math.inf)

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class PrometheusExporterError(DriftMonitorError, RuntimeError):
    """A Prometheus exporter problem, with a message that names the fix."""


class PortInUseError(OSError, PrometheusExporterError):
    """The port asked of :meth:`PrometheusExporter.serve` is already taken."""


class PushError(OSError, PrometheusExporterError):
    """A push to the Pushgateway failed."""


def metric_name(key: str) -> str:
    """The exported gauge name of a ``HookResult.metrics`` key (with the prefix)."""
    name = METRIC_NAMES.get(key, key)
    name = _INVALID.sub("_", name)
    if not name or name[0].isdigit():
        name = "_" + name
    return PREFIX + name


def _as_float(value: Any) -> float:
    """A metric value as a float; anything non-finite or unconvertible becomes NaN."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


class PrometheusExporter:
    """Turns Snapshot/Alert records of one run into Prometheus metrics.

    ``run`` is the ``run`` label of ``drift_monitor_run_info``, the one series that names the run
    (the module docstring says why). ``registry`` defaults to a new, private
    :class:`CollectorRegistry` (not the process-global one), so many exporters coexist in one
    process, each serving or pushing its own. A registry holds one run: the series of two runs
    would be indistinguishable without a run label, so a second run's exporter in the same
    registry raises :class:`PrometheusExporterError`.
    Thread-safe: ``update`` may run in the training thread while the HTTP server scrapes.
    """

    def __init__(self, run: str, registry: CollectorRegistry | None = None, *, adapter_modules: bool = False) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError(f"PrometheusExporter needs a non-empty run name (run_info's `run` label), got {run!r}")
        self.run = run
        #: export the per-LoRA-module hooks (``adapter:<module>``) too: ~900 series per run on a 7B
        #: model, so opt-in; the aggregate hook ``adapter`` is always exported
        self.adapter_modules = adapter_modules
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lock = threading.RLock()
        self._server = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._active: dict[tuple[str, str], str] = {}  # (rule, hook) -> severity of the active alert
        self._info_values: dict[str, str] = {}
        self.collector = _collector(self.registry)
        # The run's own series exist from the start (0), so rate()/increase() see the first event.
        self._state = self.collector.run_state(run)
        self.set_info(**target_labels())  # hostname, and job_id under a cluster scheduler

    # ------------------------------------------------------------------ recording
    def set_info(self, **metadata: Any) -> None:
        """Set (merge) run metadata: ``drift_monitor_run_info{run, model=..., probe_hash=..., version=...}``.

        ``version`` defaults to drift-monitor's version; ``hostname`` and (when ``SLURM_JOB_ID`` /
        ``TORCHELASTIC_RUN_ID`` is set) ``job_id`` are set from the start
        (:func:`~drift_monitor.exporters.discovery.target_labels`). Keys are sanitised to label
        names; values are turned into strings (None drops the key).
        """
        from .. import __version__

        with self._lock, self.collector.lock:
            self._info_values.setdefault("version", __version__)
            for key, value in metadata.items():
                name = _INVALID.sub("_", str(key))
                if name == "run" or name.startswith("__"):
                    raise ValueError(
                        f"set_info: {key!r} is reserved; the run label is the exporter's run name ({self.run!r})"
                    )
                if value is None:
                    self._info_values.pop(name, None)
                else:
                    self._info_values[name] = str(value)
            self._state.info = dict(self._info_values)

    def update(self, snapshot: Snapshot, alerts: Iterable[Alert] = (), active: Iterable[Alert] | None = None) -> None:
        """Export one snapshot and the alerts raised/resolved with it.

        Sets ``drift_monitor_<metric>{hook}`` for every scalar of every hook, the last
        step and snapshot time, counts the snapshot, and observes ``snapshot.duration_s`` (when
        > 0) as a probe duration. Each ``alerts`` record with status ``active`` increments
        ``drift_monitor_alerts_raised_total{rule, severity}``. ``drift_monitor_alerts_active``
        counts the active alerts per (rule, severity): taken from ``active`` when given (the
        complete list of alerts active now), else maintained from the records received, an
        active record of (rule, hook) replacing the previous one and a resolved record removing it.
        A hook's metrics keep their last value until a later snapshot sets them again.
        """
        with self._lock, self.collector.lock:
            st = self._state
            for hook, result in snapshot.hooks.items():
                if not self.adapter_modules and hook.startswith(ADAPTER_HOOK_PREFIX):
                    continue
                for key, value in result.metrics.items():
                    family = self.collector.family_of(key)
                    if family is not None:  # None: a name clash, not exported (logged once)
                        name, fields = family
                        st.values.setdefault(name, {})[(hook, *fields)] = _as_float(value)
            st.last_step = float(snapshot.step)
            st.last_ts = float(snapshot.created_at)
            st.snapshots += 1
            if snapshot.duration_s and snapshot.duration_s > 0:
                self.observe_probe_duration(snapshot.duration_s)
            if snapshot.probe_hash and self._info_values.get("probe_hash") != snapshot.probe_hash:
                self.set_info(probe_hash=snapshot.probe_hash)

            for alert in alerts:
                if alert.status == "active":
                    st.raised.setdefault((alert.rule, alert.severity), [0.0, time.time()])[0] += 1
                    self._active[(alert.rule, alert.hook)] = alert.severity
                elif alert.status == "resolved":
                    self._active.pop((alert.rule, alert.hook), None)
            if active is not None:
                self._active = {(a.rule, a.hook): a.severity for a in active if a.status == "active"}
            # every (rule, severity) ever active stays exported: 0 when resolved, never absent
            counts = _Tally((rule, severity) for (rule, _hook), severity in self._active.items())
            for key in set(st.active) | set(counts):
                st.active[key] = float(counts.get(key, 0))

    def observe_probe_duration(self, seconds: float) -> None:
        """Record one probe pass's duration (``update`` already records ``snapshot.duration_s``)."""
        seconds = float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            log.warning("ignoring probe duration %r s (not a finite, non-negative number)", seconds)
            return
        with self.collector.lock:
            self._state.observe(seconds)

    def record_error(self) -> None:
        """Count one error caught inside the monitor (``drift_monitor_errors_total``)."""
        with self.collector.lock:
            self._state.errors += 1

    def set_store_pending(self, n: int) -> None:
        """Writes computed but not in the store yet (``drift_monitor_store_pending``): above 0
        while the database is busy or failing; they are retried at every later write."""
        with self.collector.lock:
            self._state.store_pending = float(n)

    def set_notifications(self, *, sent: int, failed: int, pending: int) -> None:
        """Webhook notifications (drift_monitor.notify): delivered and failed requests so far
        (counters) and those not delivered yet (``drift_monitor_notifications_pending``)."""
        with self.collector.lock:
            st = self._state
            st.notifications_sent, st.notifications_failed = float(sent), float(failed)
            st.notifications_pending = float(pending)

    # ------------------------------------------------------------------ serving / pushing
    def serve(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` of this registry on ``host:port`` from a daemon thread; return the port.

        ``port=0`` picks a free ephemeral port; the bound port is returned and logged. A taken
        port raises :class:`PortInUseError` naming the port and the ``prometheus_port`` setting.
        """
        with self._lock:
            if self._server is not None:
                raise PrometheusExporterError(
                    f"this exporter already serves /metrics on {self._host}:{self._port}; call close() first"
                )
            try:
                server, thread = start_http_server(int(port), addr=host, registry=self.registry)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise PortInUseError(
                        errno.EADDRINUSE,
                        f"cannot serve Prometheus metrics: port {port} on {host} is already in use "
                        f"(another process, or another drift-monitor exporter, listens there). Set "
                        f"prometheus_port to a free port, or to 0 for an ephemeral one.",
                    ) from e
                raise PrometheusExporterError(
                    f"cannot serve Prometheus metrics on {host}:{port}: {e}. Check prometheus_host/prometheus_port."
                ) from e
            self._server, self._thread, self._host = server, thread, host
            self._port = int(server.server_port)
        log.info("drift-monitor: serving Prometheus metrics of run %r on http://%s:%d/metrics",
                 self.run, host, self._port)
        return self._port

    @property
    def port(self) -> int | None:
        """The port being served, or None."""
        return self._port

    def push(self, gateway: str, job: str = "drift_monitor", grouping_key: Mapping[str, str] | None = None,
             timeout: float | None = 30) -> None:
        """Push this registry to a Pushgateway (PUT: replaces the group), grouping key ``{"run": run}`` by default.

        The grouping key is how the gateway keeps the groups of different runs apart, and the
        gateway writes its labels onto every series of the group: pushed series do carry ``run``.

        ``gateway`` is ``host:port`` or a URL (``pushgateway_url``). A failure is counted in
        ``drift_monitor_errors_total`` (visible at the next successful push) and raised as
        :class:`PushError`.
        """
        key = dict(grouping_key) if grouping_key is not None else {"run": self.run}
        try:
            push_to_gateway(gateway, job=job, registry=self.registry, grouping_key=key, timeout=timeout)
        except Exception as e:  # URLError, HTTPError, socket errors
            self.record_error()
            raise PushError(
                errno.EIO, f"could not push metrics of run {self.run!r} to the Pushgateway at {gateway!r} "
                f"(job {job!r}, grouping key {key}): {e}. Check pushgateway_url and that the Pushgateway runs."
            ) from e

    def delete_pushed(self, gateway: str, job: str = "drift_monitor", grouping_key: Mapping[str, str] | None = None,
                      timeout: float | None = 30) -> None:
        """Delete this run's group from a Pushgateway (a finished run's values would otherwise stay
        there, and be scraped as current, forever). Raises :class:`PushError` on failure."""
        key = dict(grouping_key) if grouping_key is not None else {"run": self.run}
        try:
            delete_from_gateway(gateway, job=job, grouping_key=key, timeout=timeout)
        except Exception as e:  # URLError, HTTPError, socket errors
            self.record_error()
            raise PushError(errno.EIO, f"could not delete the group of run {self.run!r} from the Pushgateway at "
                                       f"{gateway!r} (job {job!r}): {e}. Delete it by hand in the Pushgateway's UI, "
                                       "or keep it with outputs.keep_pushed") from e

    def close(self) -> None:
        """Stop the HTTP server, if any (idempotent)."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
            self._port = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _RunState:
    """What the exporters of one run recorded in one registry: plain values, read by the collector."""

    created: float = field(default_factory=time.time)  # the counters' _created
    info: dict[str, str] = field(default_factory=dict)
    last_step: float | None = None
    last_ts: float | None = None
    snapshots: float = 0.0
    errors: float = 0.0
    store_pending: float = 0.0
    notifications_sent: float = 0.0
    notifications_failed: float = 0.0
    notifications_pending: float = 0.0
    raised: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (rule, severity) -> [n, created]
    active: dict[tuple[str, str], float] = field(default_factory=dict)  # (rule, severity) -> alerts active now
    #: family (without the prefix) -> label values (hook, then a pattern's fields) -> value
    values: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    buckets: list[float] | None = None  # probe-duration observations per bucket (None: none yet)
    duration_sum: float = 0.0
    duration_created: float = 0.0
    last_duration: float | None = None

    def observe(self, seconds: float) -> None:
        if self.buckets is None:
            self.buckets, self.duration_created = [0.0] * len(DURATION_BUCKETS), time.time()
        self.buckets[next(i for i, b in enumerate(DURATION_BUCKETS) if seconds <= b)] += 1
        self.duration_sum += seconds
        self.last_duration = seconds


# The families the collector always describes: name -> (type, help, labels).
_FIXED: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "run": ("info", "The run's identity and metadata (run, model, probe_hash, version, hostname, job_id, ...) as "
            "labels; the one series that carries the run.", ("run",)),
    "last_step": ("gauge", "Training step of the last snapshot.", ()),
    "last_snapshot_timestamp_seconds": ("gauge", "Unix time at which the last snapshot was computed.", ()),
    "snapshots": ("counter", "Snapshots exported.", ()),
    "errors": ("counter", "Errors caught inside the monitor (training went on).", ()),
    "store_pending": ("gauge", "Writes (snapshots, alerts) computed but not yet in the store: spooled or queued after "
                      "a failed write, retried at every later write.", ()),
    "notifications_sent": ("counter", "Alert notifications delivered to webhook targets (outputs.notify).", ()),
    "notifications_failed": ("counter", "Failed webhook requests of alert notifications (each is retried: with "
                             "backoff, then at every snapshot and at the end).", ()),
    "notifications_pending": ("gauge", "Alert notifications not delivered yet (the store lists them: "
                              "drift-monitor runs, undelivered_notifications).", ()),
    "probe_duration_seconds": ("histogram", "Duration of probe passes.", ()),
    "last_probe_duration_seconds": ("gauge", "Duration of the last probe pass.", ()),
    "alerts_raised": ("counter", "Alerts raised (Alert records received with status active).", ("rule", "severity")),
    "alerts_active": ("gauge", "Alerts currently active.", ("rule", "severity")),
    # the catalog: one gauge per metric and hook, a pattern's fields as more labels
    **{s.exported: ("gauge", s.help, ("hook", *s.labels)) for s in catalog.CATALOG},
}
_SUFFIXES = {"info": ("_info",), "counter": ("_total", "_created"), "gauge": (),
             "histogram": ("_bucket", "_count", "_sum", "_created")}
#: Every series name the fixed families produce (prometheus_client's CollectorRegistry reckoning).
_RESERVED = frozenset(PREFIX + n + sfx for n, (kind, _, _) in _FIXED.items() for sfx in ("", *_SUFFIXES[kind]))


class DriftMonitorCollector(Collector):
    """The drift-monitor series of one registry, built at each scrape from the recorded values.

    A custom collector (prometheus_client's pattern for state kept elsewhere): the exporter of
    the registry's run records plain values in a :class:`_RunState`, under :attr:`lock`, and
    :meth:`collect` yields the families from them. One per registry (:func:`_collector`), and one
    run per registry: no series but ``drift_monitor_run_info`` says which run it belongs to.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.run: str | None = None
        self._state: _RunState | None = None
        self._extra: dict[str, str] = {}  # family of a metric unknown to the catalog -> its key
        self._skipped: set[str] = set()  # keys not exported (a name clash), warned about once

    def run_state(self, run: str) -> _RunState:
        """The recorded values of ``run`` (exporters of the same run share them); another run raises."""
        with self.lock:
            if self._state is None:
                self.run, self._state = run, _RunState()
            elif run != self.run:
                raise PrometheusExporterError(
                    f"this registry already exports run {self.run!r}, and its series carry no run label "
                    f"(drift_monitor_run_info names the run), so it cannot hold run {run!r} too. "
                    f"Give each run's PrometheusExporter its own registry (the default)."
                )
            return self._state

    def family_of(self, key: str) -> tuple[str, tuple[str, ...]] | None:
        """(family without the prefix, label values a pattern adds) of a metrics key; None when
        the key's sanitised name collides with another series (not exported, logged once)."""
        spec = catalog.find(key)
        if spec is not None:
            return spec.exported, spec.fields(key) or ()
        name = metric_name(key)
        family = name[len(PREFIX):]
        with self.lock:
            owner = self._extra.setdefault(family, key) if name not in _RESERVED else None
            if owner == key:
                return family, ()
            if key not in self._skipped:
                self._skipped.add(key)
                log.warning("drift-monitor: not exporting metric %r to Prometheus: its name %s is taken by %s",
                            key, name, "another drift-monitor series" if owner is None else f"metric {owner!r}")
            return None

    def describe(self) -> Iterator[Metric]:
        """The fixed families, empty: what registering checks against the registry's other names."""
        for name, (kind, doc, labels) in _FIXED.items():
            yield _family(kind, name, doc, labels)

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            fams = {name: _family(kind, name, doc, labels) for name, (kind, doc, labels) in _FIXED.items()}
            st, created = self._state, getattr(_pm, "_use_created", True)
            if st is not None:
                fams["run"].add_metric([self.run], st.info)
                if st.last_step is not None:
                    fams["last_step"].add_metric([], st.last_step)
                if st.last_ts is not None:
                    fams["last_snapshot_timestamp_seconds"].add_metric([], st.last_ts)
                fams["snapshots"].add_metric([], st.snapshots, created=st.created if created else None)
                fams["errors"].add_metric([], st.errors, created=st.created if created else None)
                fams["store_pending"].add_metric([], st.store_pending)
                for name in ("notifications_sent", "notifications_failed"):
                    fams[name].add_metric([], getattr(st, name), created=st.created if created else None)
                fams["notifications_pending"].add_metric([], st.notifications_pending)
                if st.buckets is not None:
                    h, acc, cum = fams["probe_duration_seconds"], 0.0, []
                    for b, n in zip(DURATION_BUCKETS, st.buckets):
                        acc += n
                        cum.append((floatToGoString(b), acc))
                    h.add_metric([], cum, st.duration_sum)
                    if created:
                        h.samples.append(Sample(h.name + "_created", {}, st.duration_created))
                if st.last_duration is not None:
                    fams["last_probe_duration_seconds"].add_metric([], st.last_duration)
                for (rule, severity), (n, t0) in st.raised.items():
                    fams["alerts_raised"].add_metric([rule, severity], n, created=t0 if created else None)
                for (rule, severity), n in st.active.items():
                    fams["alerts_active"].add_metric([rule, severity], n)
                for name, series in st.values.items():
                    if name not in fams:  # a metric unknown to the catalog
                        fams[name] = _family("gauge", name, f"drift-monitor metric {self._extra[name]!r} per hook.",
                                             ("hook",))
                    for labels, v in series.items():
                        fams[name].add_metric(list(labels), v)
        yield from fams.values()


def _family(kind: str, name: str, doc: str, labels: tuple[str, ...]) -> Metric:
    cls = {"info": InfoMetricFamily, "gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
           "histogram": HistogramMetricFamily}[kind]
    return cls(PREFIX + name, doc, labels=list(labels))


_COLLECTORS: weakref.WeakKeyDictionary[CollectorRegistry, DriftMonitorCollector] = weakref.WeakKeyDictionary()
_COLLECTORS_LOCK = threading.Lock()


def _collector(registry: CollectorRegistry) -> DriftMonitorCollector:
    """The registry's drift-monitor collector, registered on first use (weakly keyed: it dies
    with the registry)."""
    with _COLLECTORS_LOCK:
        col = _COLLECTORS.get(registry)
        if col is None:
            col = DriftMonitorCollector()
            try:
                registry.register(col)
            except ValueError as e:
                raise ValueError(
                    f"this registry already holds drift_monitor_* metrics not made by PrometheusExporter: {e}. "
                    f"Give the exporter its own registry (the default)."
                ) from e
            _COLLECTORS[registry] = col
        return col
