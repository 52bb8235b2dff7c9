"""Trainer callbacks (installed as ``drift_monitor.callbacks``).

The Transformers/TRL ``DriftMonitorCallback`` is built on :class:`drift_monitor.DriftMonitor`;
see the issue tracker for its status.
"""
