"""The root of the errors drift-monitor raises on purpose.

Why one root: the CLI shows a :class:`DriftMonitorError` as one line (its message names the
fix) and anything else with its traceback and a request for a report, because anything else
is a bug of ours. Every module's own error class (ConfigError, ScanError, StoreError, ...)
derives from it; many also derive from ``ValueError`` so existing ``except ValueError`` code
keeps working. Torch-free, so the store and the exporters can use it.
"""

from __future__ import annotations


class DriftMonitorError(Exception):
    """An error whose message already says what to fix."""


class ConfigError(DriftMonitorError, ValueError):
    """A bad setting, with a message that says how to fix it."""
