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
    "ProbeError": "probe.probes", "ProbeRecord": "probe.probes", "ProbeSet": "probe.probes",
    "SAELoadError": "probe.saes", "load_sae": "probe.saes",
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


if TYPE_CHECKING:  # for type checkers and IDEs; the redundant aliases mark them as re-exports
    from .config import ConfigError as ConfigError
    from .config import MonitorConfig as MonitorConfig
    from .monitor import DriftMonitor as DriftMonitor
    from .probe.probes import ProbeError as ProbeError
    from .probe.probes import ProbeRecord as ProbeRecord
    from .probe.probes import ProbeSet as ProbeSet
    from .probe.saes import SAELoadError as SAELoadError
    from .probe.saes import load_sae as load_sae
    from .records import Alert as Alert
    from .records import HookResult as HookResult
    from .records import Snapshot as Snapshot
