"""Trainer callbacks (installed as ``drift_monitor.callbacks``).

    from drift_monitor import MonitorConfig
    from drift_monitor.callbacks import DriftMonitorCallback

    cb = DriftMonitorCallback(MonitorConfig(saes={"model.layers.12": "sae_dir"}, cadence={"every_n_steps": 50}))
    trainer = SFTTrainer(..., callbacks=[cb]); cb.attach(trainer)   # attach: log through the trainer
"""

from .trainer import DriftMonitorCallback

__all__ = ["DriftMonitorCallback"]
