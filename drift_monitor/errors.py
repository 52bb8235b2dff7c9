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


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): third-party errors
    (YAML, JSON, safetensors, transformers) often span several lines, and ours are one."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else type(e).__name__


def invalid_yaml(origin: str, e: BaseException) -> str:
    """One line for a YAML syntax error: ``origin:line``, PyYAML's problem and the usual fix
    (PyYAML's own message spans several lines, with a caret under the offending text)."""
    mark = getattr(e, "problem_mark", None)
    where = f"{origin}:{mark.line + 1}" if mark is not None else origin
    return f"{where}: invalid YAML ({getattr(e, 'problem', None) or first_line(e)}); " \
           "fix the syntax (indentation, a ':' after each key)"
