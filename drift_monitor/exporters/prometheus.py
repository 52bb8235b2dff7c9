"""Prometheus exporter: Snapshot and Alert records -> bounded-cardinality metrics (docs/design.md §6).

Rank 0 of a training job serves ``/metrics`` (:meth:`PrometheusExporter.serve`, 127.0.0.1 by
default, ``prometheus_port`` 9464 suggested); a batch scan pushes to a Pushgateway
(:meth:`PrometheusExporter.push`). Everything lives in the exporter's own
:class:`~prometheus_client.CollectorRegistry`, so several exporters (one per run, or many in
tests) coexist in one process.

Conventions: prefix ``drift_monitor_``, base units (seconds), ``_total`` on counters, ``_info``
for run metadata. The only labels are ``run``, ``hook``, ``category``, ``severity``, ``rule`` and
``direction`` (``category`` and ``direction`` label the direction monitors'
``drift_monitor_direction_projection{,_delta}``: user-supplied directions x probe categories). No
per-feature label, ever: per-feature data lives in the DuckDB store. The one exception to the
label rule is ``drift_monitor_run_info``, whose metadata values are labels by the ``_info``
convention (one series per run, so still bounded).

Each scalar in ``HookResult.metrics`` becomes a gauge ``drift_monitor_<name>{run, hook}``
(:data:`METRIC_NAMES` holds the renamed ones, e.g. ``n_emerging_refusal_features`` ->
``drift_monitor_emerging_refusal_features``), except the direction monitors: every
``direction_projection[_delta]:<direction>:<category>`` key goes to the one labelled family
``drift_monitor_direction_projection[_delta]{run, hook, direction, category}``. A metric unknown
to this module is exported under its sanitised name. Non-finite values (NaN, ±inf, None) are exported as NaN: Prometheus
stores NaN, and a comparison with NaN is false, so no alert rule fires on it by accident.

This module takes plain records and never imports torch, models or SAEs.
"""

from __future__ import annotations

import errno
import logging
import math
import re
import threading
import weakref
from collections import Counter as _Tally
from typing import Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import push_to_gateway, start_http_server

from ..records import (ADAPTER_METRICS, LORA_MODULE_METRICS, PROJECTION, PROJECTION_DELTA, Alert, Snapshot,
                       parse_direction_key)

log = logging.getLogger(__name__)

PREFIX = "drift_monitor_"

#: The only label names any drift-monitor series carries (``drift_monitor_run_info`` aside).
ALLOWED_LABELS = ("run", "hook", "category", "severity", "rule", "direction")

#: Suggested ``prometheus_port`` (examples/prometheus/prometheus.yml scrapes it).
DEFAULT_PORT = 9464

#: HookResult.metrics key -> exported gauge name (without the prefix) where the two differ.
METRIC_NAMES: dict[str, str] = {
    "n_emerging_refusal_features": "emerging_refusal_features",
    "n_tokens": "probe_tokens",
    # LoRA adapter signals: lower-case gauge names (drift_monitor_adapter_b_norm, drift_monitor_lora_b_norm, ...)
    **{k: k.lower() for k in (*ADAPTER_METRICS, *LORA_MODULE_METRICS)},
}

#: Help text of the scalar metrics of docs/metrics.md.
METRIC_HELP: dict[str, str] = {
    "explained_variance": "Explained variance of the base SAE's reconstruction of the current activations (1 - FVU).",
    "base_explained_variance": "Explained variance of the base SAE on the base model's own activations.",
    "explained_variance_delta": "explained_variance - base_explained_variance (negative: the base SAE explains the model less well).",
    "fvu": "Fraction of variance unexplained by the base SAE (1 - explained_variance).",
    "l0": "Mean number of active SAE features per selected token.",
    "mse": "Mean squared reconstruction error per activation dimension.",
    "cosine": "Mean cosine similarity between activations and their SAE reconstructions.",
    "dead_fraction": "Share of SAE features that never fired on the probe set.",
    "dense_fraction": "Share of SAE features with firing density above the dense cut-off (0.1).",
    "act_relative_mse": "Sum of squared activation change vs the base at the same tokens, relative to the base variance.",
    "act_cosine": "Mean cosine similarity between current and base activations at the same tokens.",
    "topk_jaccard": "Mean Jaccard overlap of the top-k active features, current vs base, per token.",
    "features_drifted_ratio": "Share of live SAE features whose firing density moved by more than the drift ratio (2x).",
    "density_js": "Jensen-Shannon distance (base 2) between current and base feature-density vectors.",
    "density_spearman": "Spearman rank correlation between current and base feature densities.",
    "nonfinite_fraction": "Share of selected tokens dropped for NaN/inf activations.",
    "n_tokens": "Selected probe tokens that reached the SAE in the last probe pass.",
    "max_refusal_score": "Largest refusal score (harmful drift - harmless drift) over ranked features.",
    "n_emerging_refusal_features": "Number of emerging refusal features (robust z-score above the threshold).",
    "refusal_direction_cosine": "Cosine between the current and base refusal directions (mean harmful - mean harmless activation).",
    "refusal_direction_norm": "Norm of the current refusal direction (mean harmful - mean harmless activation).",
    # LoRA adapter signals (drift_monitor.adapters); hook="adapter" aggregates, hook="adapter:<module>" per module
    "adapter_A_norm": "Frobenius norm of all LoRA A matrices together (sqrt of the sum of squares over modules).",
    "adapter_B_norm": "Frobenius norm of all LoRA B matrices together (sqrt of the sum of squares over modules).",
    "adapter_BA_norm": "Frobenius norm of all LoRA weight updates scaling*B*A together.",
    "adapter_B_local_cosine": "Mean over LoRA modules of cos(B[t-2k]-B[t-k], B[t]-B[t-k]) (centred at t-k): "
                              "-1 straight line, rising toward 0 or above when B turns.",
    "adapter_B_local_cosine_max": "Largest per-module local cosine of the LoRA B trajectory (centred at t-k).",
    "adapter_B_local_cosine_global": "Local cosine of the concatenated LoRA B vector of all modules (centred at t-k).",
    "lora_A_norm": "Frobenius norm of one module's LoRA A matrix.",
    "lora_B_norm": "Frobenius norm of one module's LoRA B matrix.",
    "lora_BA_norm": "Frobenius norm of one module's LoRA weight update scaling*B*A.",
    "lora_B_local_cosine": "One module's cos(B[t-2k]-B[t-k], B[t]-B[t-k]) (centred at t-k; NaN when B did not move).",
}

#: Probe-duration histogram buckets, seconds (tiny models: tens of ms; 8B models: minutes).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, math.inf)

_INVALID = re.compile(r"[^a-zA-Z0-9_]")


class PrometheusExporterError(RuntimeError):
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

    ``run`` is the value of the ``run`` label on every series. ``registry`` defaults to a new,
    private :class:`CollectorRegistry` (not the process-global one), so many exporters coexist.
    Exporters of different runs may also share one registry (one ``/metrics`` for all runs);
    use one exporter per run and registry.
    Thread-safe: ``update`` may run in the training thread while the HTTP server scrapes.
    """

    def __init__(self, run: str, registry: CollectorRegistry | None = None) -> None:
        if not isinstance(run, str) or not run:
            raise ValueError(f"PrometheusExporter needs a non-empty run name (the `run` label), got {run!r}")
        self.run = run
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lock = threading.RLock()
        self._server = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self._active: dict[tuple[str, str], str] = {}  # (rule, hook) -> severity of the active alert
        self._active_keys: set[tuple[str, str]] = set()  # (rule, severity) series ever exported
        self._info_values: dict[str, str] = {}
        self._m = _families(self.registry)
        # Series of the run itself exist from the start (0), so rate()/increase() see the first event.
        self._m.snapshots.labels(run)
        self._m.errors.labels(run)
        self.set_info()

    # ------------------------------------------------------------------ recording
    def set_info(self, **metadata: Any) -> None:
        """Set (merge) run metadata: ``drift_monitor_run_info{run, model=..., probe_hash=..., version=...}``.

        ``version`` defaults to drift-monitor's version. Keys are sanitised to label names;
        values are turned into strings (None drops the key).
        """
        from .. import __version__

        with self._lock:
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
            self._m.info.labels(self.run).info(dict(self._info_values))

    def update(self, snapshot: Snapshot, alerts: Iterable[Alert] = (), active: Iterable[Alert] | None = None) -> None:
        """Export one snapshot and the alerts raised/resolved with it.

        Sets ``drift_monitor_<metric>{run, hook}`` for every scalar of every hook, the last
        step and snapshot time, counts the snapshot, and observes ``snapshot.duration_s`` (when
        > 0) as a probe duration. Each ``alerts`` record with status ``active`` increments
        ``drift_monitor_alerts_raised_total{run, rule, severity}``. ``drift_monitor_alerts_active``
        counts the active alerts per (rule, severity): taken from ``active`` when given (the
        complete list of alerts active now), else maintained from the records received, an
        active record of (rule, hook) replacing the previous one and a resolved record removing it.
        """
        with self._lock:
            run = self.run
            for hook, result in snapshot.hooks.items():
                for key, value in result.metrics.items():
                    parsed = parse_direction_key(key)
                    if parsed is not None:  # one labelled family, not a gauge per direction/category
                        kind, direction, category = parsed
                        self._m.directions[kind].labels(run, hook, direction, category).set(_as_float(value))
                        continue
                    gauge = self._m.gauge(key)
                    if gauge is not None:
                        gauge.labels(run, hook).set(_as_float(value))
            self._m.last_step.labels(run).set(snapshot.step)
            self._m.last_ts.labels(run).set(snapshot.created_at)
            self._m.snapshots.labels(run).inc()
            if snapshot.duration_s and snapshot.duration_s > 0:
                self.observe_probe_duration(snapshot.duration_s)
            if snapshot.probe_hash and self._info_values.get("probe_hash") != snapshot.probe_hash:
                self.set_info(probe_hash=snapshot.probe_hash)

            for alert in alerts:
                if alert.status == "active":
                    self._m.raised.labels(run, alert.rule, alert.severity).inc()
                    self._active[(alert.rule, alert.hook)] = alert.severity
                elif alert.status == "resolved":
                    self._active.pop((alert.rule, alert.hook), None)
            if active is not None:
                self._active = {(a.rule, a.hook): a.severity for a in active if a.status == "active"}
            self._export_active()

    def observe_probe_duration(self, seconds: float) -> None:
        """Record one probe pass's duration (``update`` already records ``snapshot.duration_s``)."""
        seconds = float(seconds)
        if not math.isfinite(seconds) or seconds < 0:
            log.warning("ignoring probe duration %r s (not a finite, non-negative number)", seconds)
            return
        self._m.duration.labels(self.run).observe(seconds)
        self._m.last_duration.labels(self.run).set(seconds)

    def record_error(self) -> None:
        """Count one error caught inside the monitor (``drift_monitor_errors_total``)."""
        self._m.errors.labels(self.run).inc()

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
        log.info("drift-monitor: serving Prometheus metrics of run %r on http://%s:%d/metrics", self.run, host, self._port)
        return self._port

    @property
    def port(self) -> int | None:
        """The port being served, or None."""
        return self._port

    def push(self, gateway: str, job: str = "drift_monitor", grouping_key: Mapping[str, str] | None = None,
             timeout: float | None = 30) -> None:
        """Push this registry to a Pushgateway (PUT: replaces the group), grouping key ``{"run": run}`` by default.

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

    def __enter__(self) -> "PrometheusExporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _export_active(self) -> None:
        counts = _Tally((rule, severity) for (rule, _hook), severity in self._active.items())
        for key in self._active_keys | set(counts):
            self._m.active.labels(self.run, *key).set(counts.get(key, 0))
        self._active_keys |= set(counts)


class _Families:
    """The metric families of one registry, shared by every exporter (run) that uses it."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self._registry = weakref.ref(reg)  # weak: _FAMILIES must not keep the registry alive
        self.lock = threading.Lock()
        self.info = Info(PREFIX + "run", "Run metadata (model, probe_hash, version, ...) as labels.", ["run"], registry=reg)
        self.last_step = Gauge(PREFIX + "last_step", "Training step of the last snapshot.", ["run"], registry=reg)
        self.last_ts = Gauge(PREFIX + "last_snapshot_timestamp_seconds",
                             "Unix time at which the last snapshot was computed.", ["run"], registry=reg)
        self.snapshots = Counter(PREFIX + "snapshots", "Snapshots exported.", ["run"], registry=reg)
        self.errors = Counter(PREFIX + "errors", "Errors caught inside the monitor (training went on).", ["run"], registry=reg)
        self.duration = Histogram(PREFIX + "probe_duration_seconds", "Duration of probe passes.", ["run"],
                                  buckets=DURATION_BUCKETS, registry=reg)
        self.last_duration = Gauge(PREFIX + "last_probe_duration_seconds", "Duration of the last probe pass.",
                                   ["run"], registry=reg)
        self.raised = Counter(PREFIX + "alerts_raised", "Alerts raised (Alert records received with status active).",
                              ["run", "rule", "severity"], registry=reg)
        self.active = Gauge(PREFIX + "alerts_active", "Alerts currently active.", ["run", "rule", "severity"], registry=reg)
        self.gauges: dict[str, Gauge | None] = {}  # metrics key -> gauge (None: name clash, not exported)
        # Direction monitors: bounded labels (user-supplied directions x probe categories).
        dir_labels = ["run", "hook", "direction", "category"]
        self.directions = {
            PROJECTION: Gauge(PREFIX + PROJECTION, "Mean projection of a probe category's activations onto a unit "
                              "direction (user-supplied, or refusal_base: the base refusal direction).",
                              dir_labels, registry=reg),
            PROJECTION_DELTA: Gauge(PREFIX + PROJECTION_DELTA, "Mean projection onto a unit direction, current "
                                    "minus base model.", dir_labels, registry=reg),
        }
        for key in METRIC_HELP:
            self.gauge(key)

    def gauge(self, key: str) -> Gauge | None:
        """The per-hook gauge of a ``HookResult.metrics`` key, created on first use."""
        with self.lock:
            if key in self.gauges:
                return self.gauges[key]
            doc = METRIC_HELP.get(key, f"drift-monitor metric {key!r} per hook.")
            try:
                gauge: Gauge | None = Gauge(metric_name(key), doc, ["run", "hook"], registry=self._registry())
            except ValueError as e:  # the sanitised name collides with another series
                log.warning("drift-monitor: not exporting metric %r to Prometheus: %s", key, e)
                gauge = None
            self.gauges[key] = gauge
            return gauge


_FAMILIES: "weakref.WeakKeyDictionary[CollectorRegistry, _Families]" = weakref.WeakKeyDictionary()
_FAMILIES_LOCK = threading.Lock()


def _families(registry: CollectorRegistry) -> _Families:
    with _FAMILIES_LOCK:
        fams = _FAMILIES.get(registry)
        if fams is None:
            try:
                fams = _FAMILIES[registry] = _Families(registry)
            except ValueError as e:
                raise ValueError(
                    f"this registry already holds drift_monitor_* metrics not made by PrometheusExporter: {e}. "
                    f"Give the exporter its own registry (the default)."
                ) from e
        return fams
