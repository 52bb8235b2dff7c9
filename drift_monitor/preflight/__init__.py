"""Pre-flight: predict a fine-tune's effect on refusal from its data, before training, and name
the examples that cause it (docs/preflight.md).

The records (``result``) and the settings (``settings``) import no torch, so the store, the
dashboard and the CLI's parser can read them; the check itself (``run.preflight``) is imported
on first use.
"""

from typing import Any

from .result import ExampleScore, FeaturePush, PreflightResult
from .settings import PreflightError, PreflightSettings

__all__ = ["ExampleScore", "FeaturePush", "PreflightError", "PreflightResult", "PreflightSettings", "preflight"]


def __getattr__(name: str) -> Any:
    if name == "preflight":
        from .run import preflight

        return preflight
    raise AttributeError(name)
