"""What the start model does before any fine-tuning: does it refuse harmful requests at all?

Why: the erosion metrics (``compare._erosion``) compare the current model's harmful − harmless
separation with the start's, and a start that never refused has a separation of *content*
(harmful topics read differently from harmless ones), not of refusal. A benign fine-tune that
changes the domain shrinks that separation while no refusal is lost, and a refusal fine-tune
rotates it while refusal is gained. So the monitor measures, once per start model and cached
with its baseline, the share of the harmful (and harmless) probes that the start refuses, by the
same greedy generation and phrase test as the causal check and the detection suite
(:mod:`drift_monitor.probe.generate`); the ``refusal_erosion`` rule requires a start that
refuses (``alerts.rules.REFUSAL_GATE``).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..config import MetricSettings
from ..records import VerifySettings
from .capture import is_sharded, probe_mode, without_autocast
from .generate import refusal_rate
from .probes import ProbeSet

log = logging.getLogger(__name__)

#: The metric names, by role (the settings name the categories that play each role).
START_METRICS: dict[str, str] = {"harmful": "start_harmful_refusal_rate",
                                 "harmless": "start_harmless_refusal_rate"}


def measure_start_refusal(model: nn.Module, tokenizer: Any, probe_set: ProbeSet, settings: MetricSettings, *,
                          batch_size: int, max_length: int) -> dict[str, float]:
    """``{start_harmful_refusal_rate, start_harmless_refusal_rate}`` of ``model``, or {} when not
    measured: switched off (``start_refusal_tokens`` 0), no harmful/harmless probes, or a sharded
    model (generation under FSDP/ZeRO-3 needs every rank in step; the rule then stays armed)."""
    cats = {settings.harmful_category: "harmful", settings.harmless_category: "harmless"}
    prompts = {role: [r.prompt for r in probe_set.records if r.category == cat] for cat, role in cats.items()}
    if settings.start_refusal_tokens <= 0 or not all(prompts.values()):
        return {}
    if is_sharded(model):
        log.info("start refusal not measured: the model is sharded (rule refusal_erosion stays armed)")
        return {}
    s = VerifySettings(max_new_tokens=settings.start_refusal_tokens, batch_size=batch_size, max_length=max_length)
    with probe_mode(model), without_autocast(model):
        return {START_METRICS[role]: refusal_rate(model, tokenizer, ps, s) for role, ps in prompts.items()}
