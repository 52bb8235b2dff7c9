"""Training text for ``drift-monitor train-sae``: files, JSONL, ``datasets`` folders, or our own.

An SAE learns the directions its training activations span, so the text should look like what
the monitor will read: ordinary prose for general text, and the model's chat template (system
prompt, role markers, the post-instruction tokens) for requests. Hence ``Document.chat``: a
share of plain documents is wrapped as a user turn (``chat_fraction``), and conversations in
JSONL (``messages`` or ``prompt``/``response``) are always formatted with the template.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DriftMonitorError
from ..textfiles import jsonl, read_utf8

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


class DataError(DriftMonitorError, ValueError):
    """Unusable training data, with the file and the fix in the message."""


@dataclass(frozen=True)
class Document:
    """One training document: plain text, or a conversation (a user turn and an optional response)."""

    text: str
    response: str | None = None
    chat: bool = False


def load_documents(sources: Sequence[str | Path]) -> list[Document]:
    """Documents from text files, JSONL files, folders of them, or saved ``datasets`` folders."""
    docs = [d for d in iter_documents(sources) if d.text.strip()]
    if not docs:
        raise DataError(f"--data {', '.join(map(str, sources))}: no text found (empty files?)")
    return docs


def iter_documents(sources: Sequence[str | Path]) -> Iterator[Document]:
    """The documents of ``sources`` one at a time, so a corpus larger than memory can be read
    (``drift-monitor preflight`` streams; ``train-sae`` collects a list). Each source is checked
    before its first document is read."""
    for src in sources:
        path = Path(src).expanduser()
        if not path.exists():
            raise DataError(f"--data {src}: no such file or folder")
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file()):
            yield from _from_dataset(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
            if not files:
                raise DataError(f"--data {src}: the folder holds no {', '.join(TEXT_SUFFIXES)} or .jsonl files")
            for f in files:
                yield from _from_file(f)
        else:
            yield from _from_file(path)


def _from_file(path: Path) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _from_jsonl(path)
        return
    text = read_utf8(path, DataError, "convert it or leave it out")
    # Paragraphs (blank-line separated) are documents: short enough to mix, long enough for context.
    yield from (Document(p.strip()) for p in text.split("\n\n") if p.strip())


def _from_jsonl(path: Path) -> Iterator[Document]:
    for where, obj in jsonl(path, DataError, "convert it or leave it out"):
        doc = _from_record(obj, where)
        if doc is not None:
            yield doc


def _from_record(obj: Any, where: str) -> Document | None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'text', 'messages' or 'prompt'")
    if isinstance(obj.get("messages"), list):
        msgs = obj["messages"]
        user = next((m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "user"), None)
        reply = next((m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "assistant"), None)
        return Document(str(user), reply, chat=True) if user else None
    if isinstance(obj.get("prompt"), str):
        resp = obj.get("response")
        return Document(obj["prompt"], resp if isinstance(resp, str) else None, chat=True)
    if isinstance(obj.get("text"), str):
        return Document(obj["text"])
    raise DataError(f"{where}: a record needs 'text' (plain), 'messages' (a conversation) or 'prompt' (+ 'response')")


def _from_dataset(path: Path) -> Iterator[Document]:
    try:
        from datasets import load_from_disk
    except ImportError as e:  # pragma: no cover - datasets comes with trl
        raise DataError(f"{path} is a datasets folder but the 'datasets' package is missing: "
                        "pip install datasets") from e
    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: the train split, else the first
        ds = ds["train"] if "train" in ds else ds[next(iter(ds.keys()))]
    cols = set(ds.column_names)
    if not cols & {"text", "messages", "prompt"}:
        raise DataError(f"{path}: the dataset has columns {sorted(cols)}; it needs 'text', 'messages' or 'prompt'")
    for i, row in enumerate(ds):
        doc = _from_record(dict(row), f"{path} row {i}")
        if doc is not None:
            yield doc


def mix_chat(docs: Iterable[Document], fraction: float, seed: int) -> list[Document]:
    """Wrap ``fraction`` of the plain documents as a user turn, so that the SAE also learns the
    chat template's tokens (system prompt, role markers, post-instruction tokens) that the
    monitor reads on every request probe."""
    rng = random.Random(seed)
    return [Document(d.text, d.response, True) if not d.chat and rng.random() < fraction else d for d in docs]


def probe_documents(probes: Any) -> list[Document]:
    """The probe set as training text: requests as conversations, general text as plain text."""
    from ..config import PLAIN_CATEGORIES

    return [Document(r.prompt, r.response, chat=r.category not in PLAIN_CATEGORIES) for r in probes.records]
