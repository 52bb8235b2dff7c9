"""Reading the text files users give (configs, rules, probes, SAE training data), with one error
line; writing the small JSON files the tool leaves for others to read, whole or not at all.

Why one place: every file a user names can be in the wrong encoding or hold a broken line, and
the message must say which file (and line) and how to fix it, the same way everywhere. Each
caller passes its own error class (ConfigError, ProbeError, ...) so the CLI shows one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_utf8(path: str | os.PathLike[str], error: type[Exception], fix: str) -> str:
    """The file's text, or ``error("<path>: not UTF-8 text (byte n); <fix>")``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start}); {fix}") from None


def jsonl(path: str | os.PathLike[str], error: type[Exception], utf8_fix: str) -> Iterator[tuple[str, Any]]:
    """``("<path>:<line>", object)`` for each non-blank line of a JSONL file; a line that is not
    UTF-8 or not JSON raises ``error`` naming ``path:line``."""
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{where}: not UTF-8 text (byte {e.start + 1} of the line is "
                            f"0x{raw[e.start]:02x}); {utf8_fix}") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a hidden temporary file and a rename: a reader
    (a resumed job, a Prometheus server watching the folder) sees the old file or the new one,
    never half of one, even when the writer is killed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path
