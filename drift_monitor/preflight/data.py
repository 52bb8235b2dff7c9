"""The training data of a pre-flight check, streamed: the formats ``train-sae`` reads (JSONL with
``messages``, ``prompt``/``response`` or ``text``; text files; saved ``datasets`` folders), as
:class:`~drift_monitor.preflight.engine.Example` records, one at a time.

Why stricter than ``train-sae``: an SAE learns from any text, but pre-flight reads what the model
is *taught to answer*, so a conversation without an answer has nothing to read, and chat data on a
model without a chat template would be read in a format it will not be trained in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..training.sae_data import DataError, iter_documents
from .datahash import data_hash as _data_hash
from .engine import Example


class PreflightDataError(DataError):
    """Unusable pre-flight data, with the file and the fix in the message."""


def iter_examples(sources: Sequence[str | Path], tokenizer: Any) -> Iterator[Example]:
    """The examples of ``sources`` in order; raises on the first one that cannot be read."""
    if not sources:
        raise PreflightDataError("no --data given: name a JSONL file (messages, prompt/response or text records)")
    checked_template = False
    for i, doc in enumerate(iter_documents(sources)):
        if not doc.chat:
            if doc.text.strip():
                yield Example(doc.text)
            continue
        if doc.response is None or not str(doc.response).strip():
            raise PreflightDataError(
                f"{', '.join(map(str, sources))}: example {i} has a prompt but no response; pre-flight reads "
                "what the model is taught to answer: give each record a 'response' (or an assistant message)")
        if not checked_template and not getattr(tokenizer, "chat_template", None):
            raise PreflightDataError(
                f"{', '.join(map(str, sources))} holds conversations but the tokenizer has no chat template: "
                "give the chat model's tokenizer (--tokenizer) or the data as plain 'text' records")
        checked_template = True
        yield Example(str(doc.response), doc.text)


def data_hash(sources: Sequence[str | Path]) -> str:
    """:func:`.datahash.data_hash` (the dataset's identity), a missing or unreadable source
    raised as :class:`PreflightDataError` like every other problem with the data."""
    try:
        return _data_hash(sources)
    except OSError as e:
        raise PreflightDataError(str(e) if isinstance(e, FileNotFoundError) else
                                 f"--data {', '.join(map(str, sources))}: cannot read it ({e})") from None
