"""drift-monitor: watch a fine-tuning run through the base model's sparse autoencoder.

Public API: :class:`MonitorConfig`, :class:`DriftMonitor`, :class:`Snapshot`,
:class:`ProbeSet`, :func:`load_sae`; the store in :mod:`drift_monitor.store`.
"""

from .config import ConfigError, MonitorConfig
from .monitor import DriftMonitor
from .probes import ProbeError, ProbeRecord, ProbeSet
from .records import Alert, HookResult, Snapshot
from .saes import SAELoadError, load_sae

__version__ = "0.1.0"

__all__ = [
    "Alert", "ConfigError", "DriftMonitor", "HookResult", "MonitorConfig", "ProbeError", "ProbeRecord",
    "ProbeSet", "SAELoadError", "Snapshot", "load_sae", "__version__",
]
