"""drift-monitor: watch a fine-tuning run through the base model's sparse autoencoder.

Public API: :class:`MonitorConfig`, :class:`DriftMonitor`, :class:`Snapshot`,
:class:`ProbeSet`, :func:`load_sae`; the store in :mod:`drift_monitor.store`.

Names are imported lazily (PEP 562): ``import drift_monitor.store`` from the dashboard must
not pull in torch, transformers or sae-lens.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Alert": "records", "HookResult": "records", "Snapshot": "records",
    "ConfigError": "config", "MonitorConfig": "config",
    "DriftMonitor": "monitor",
    "ProbeError": "probes", "ProbeRecord": "probes", "ProbeSet": "probes",
    "SAELoadError": "saes", "load_sae": "saes",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'drift_monitor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # cache: later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs
    from .config import ConfigError, MonitorConfig
    from .monitor import DriftMonitor
    from .probes import ProbeError, ProbeRecord, ProbeSet
    from .records import Alert, HookResult, Snapshot
    from .saes import SAELoadError, load_sae
