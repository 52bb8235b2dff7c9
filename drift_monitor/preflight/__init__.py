"""Pre-flight: predict a fine-tune's effect on refusal from its data, before training, and name
the examples that cause it (docs/preflight.md).

The records (``result``) import no torch, so the store and the dashboard can read them; the
check itself (``run.preflight``) is imported on first use.
"""

from typing import Any

from .result import ExampleScore, FeaturePush, PreflightResult

__all__ = ["ExampleScore", "FeaturePush", "PreflightError", "PreflightResult", "PreflightSettings", "preflight"]


def __getattr__(name: str) -> Any:
    if name in ("PreflightError", "PreflightSettings", "preflight"):
        from . import run

        return getattr(run, name)
    raise AttributeError(name)
