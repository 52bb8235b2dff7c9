"""Probe sets: prompts with categories, their formatting, tokenisation and batching.

The probe set is the fixed ruler of a run: the same tokens are pushed through the model at
every snapshot so that statistics at two steps are paired token by token. Hence the stable
hash of the *tokenised* set (not of the text): a different tokenizer or chat template gives a
different ruler and must not be compared silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

FALLBACK_TEMPLATE = "User: {prompt}\nAssistant:"


class ProbeError(ValueError):
    """A malformed or empty probe set, with the file and line that is wrong."""


@dataclass(frozen=True)
class ProbeRecord:
    id: str
    category: str
    prompt: str
    response: str | None = None


@dataclass
class ProbeSet:
    """An ordered list of :class:`ProbeRecord`; ids are unique."""

    records: list[ProbeRecord]
    name: str = "custom"

    def __post_init__(self) -> None:
        if not self.records:
            raise ProbeError(f"probe set {self.name!r} is empty: it needs at least one record")
        seen: set[str] = set()
        for r in self.records:
            if r.id in seen:
                raise ProbeError(f"probe set {self.name!r}: duplicate id {r.id!r}")
            seen.add(r.id)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def categories(self) -> list[str]:
        """Categories in order of first appearance."""
        return list(dict.fromkeys(r.category for r in self.records))

    def filter(self, categories: Iterable[str]) -> "ProbeSet":
        keep = set(categories)
        return ProbeSet([r for r in self.records if r.category in keep], name=f"{self.name}[{','.join(sorted(keep))}]")

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any] | ProbeRecord], name: str = "custom") -> "ProbeSet":
        out = []
        for i, r in enumerate(records):
            out.append(r if isinstance(r, ProbeRecord) else _parse_record(dict(r), f"{name} record {i}"))
        return cls(out, name=name)

    @classmethod
    def load(cls, path: str | Path) -> "ProbeSet":
        """Read a JSONL file of ``{"id", "category", "prompt", "response"?}`` records."""
        path = Path(path)
        if not path.is_file():
            raise ProbeError(f"probe file not found: {path}")
        records = []
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ProbeError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise ProbeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                records.append(_parse_record(obj, where))
        if not records:
            raise ProbeError(f"probe file {path} is empty: it needs at least one JSON record per line")
        return cls(records, name=path.stem)

    @classmethod
    def default(cls) -> "ProbeSet":
        """The bundled set: harmful requests, harmless instructions and general text."""
        ref = resources.files("drift_monitor") / "data" / "default_probes.jsonl"
        with resources.as_file(ref) as p:
            ps = cls.load(p)
        ps.name = "default"
        return ps

    @classmethod
    def resolve(cls, spec: "str | Path | ProbeSet") -> "ProbeSet":
        """``"default"``, a path, or a ProbeSet -> ProbeSet."""
        if isinstance(spec, ProbeSet):
            return spec
        if spec == "default":
            return cls.default()
        return cls.load(spec)


def _parse_record(obj: dict[str, Any], where: str) -> ProbeRecord:
    missing = [k for k in ("id", "category", "prompt") if k not in obj]
    if missing:
        raise ProbeError(f"{where}: missing field(s) {missing}; a record needs id, category, prompt (response optional)")
    for k in ("id", "category", "prompt"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise ProbeError(f"{where}: field {k!r} must be a non-empty string")
    resp = obj.get("response")
    if resp is not None and not isinstance(resp, str):
        raise ProbeError(f"{where}: field 'response' must be a string when given")
    extra = set(obj) - {"id", "category", "prompt", "response"}
    if extra:
        raise ProbeError(f"{where}: unknown field(s) {sorted(extra)}; allowed: id, category, prompt, response")
    return ProbeRecord(id=obj["id"], category=obj["category"], prompt=obj["prompt"], response=resp)


# ---------------------------------------------------------------------------------- tokenising
@dataclass
class TokenizedProbe:
    record: ProbeRecord
    input_ids: list[int]
    prompt_len: int  # tokens of the formatted prompt (including any BOS)
    truncated: bool


@dataclass
class ProbeBatch:
    """One padded batch. Masks are [B, T] booleans of the tokens that enter the statistics."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    select: torch.Tensor  # tokens selected by each record's position selector (padding/BOS excluded)
    category: torch.Tensor  # [B] category index per sequence
    index: torch.Tensor  # [B] index of each sequence in the probe set

    def to(self, device: torch.device | str) -> "ProbeBatch":
        return ProbeBatch(*(t.to(device, non_blocking=True) for t in
                            (self.input_ids, self.attention_mask, self.select, self.category, self.index)))

    @property
    def n_selected(self) -> int:
        return int(self.select.sum())


@dataclass
class PreparedProbes:
    """A probe set tokenised and batched once per run, and its stable hash."""

    probe_set: ProbeSet
    categories: list[str]
    items: list[TokenizedProbe]
    batches: list[ProbeBatch]
    hash: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(b.n_selected for b in self.batches)



def ensure_pad_token(tokenizer: Any) -> int:
    """The pad id; a tokenizer without one falls back to eos, with a warning saying so."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ProbeError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
    warnings.warn(
        "tokenizer has no pad token; using eos_token as pad for the probe pass "
        "(padding is masked out, so this does not change the statistics)",
        stacklevel=2,
    )
    tokenizer.pad_token = tokenizer.eos_token
    return int(eos)


def format_probe(tokenizer: Any, record: ProbeRecord) -> tuple[str, str | None]:
    """(prompt text, full text or None): the chat template when there is one, else the fallback."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": record.prompt}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        full = None
        if record.response is not None:
            full = tokenizer.apply_chat_template(
                msgs + [{"role": "assistant", "content": record.response}], tokenize=False
            )
        return prompt, full
    prompt = FALLBACK_TEMPLATE.format(prompt=record.prompt)
    full = None if record.response is None else f"{prompt} {record.response}"
    return prompt, full


def tokenize_probe(tokenizer: Any, record: ProbeRecord, max_length: int) -> TokenizedProbe:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_text, full_text = format_probe(tokenizer, record)
    # A chat template already writes its special tokens (BOS included) into the text.
    add_special = not has_template
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"])
    ids = prompt_ids
    if full_text is not None:
        full_ids = list(tokenizer(full_text, add_special_tokens=add_special)["input_ids"])
        if full_ids[: len(prompt_ids)] != prompt_ids:
            # Tokens merged across the prompt/response boundary: keep the prompt's own
            # tokenisation so the prompt positions mean the same thing in every record.
            resp_text = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else record.response
            full_ids = prompt_ids + list(tokenizer(resp_text, add_special_tokens=False)["input_ids"])
        ids = full_ids
    truncated = len(ids) > max_length
    return TokenizedProbe(record, ids[:max_length], min(len(prompt_ids), max_length), truncated)


def prepare_probes(
    probe_set: ProbeSet,
    tokenizer: Any,
    *,
    batch_size: int,
    max_length: int,
    selector_for: Any,  # Callable[[str], str]
    prompt_end_tokens: int = 4,
    include_bos: bool = False,
    categories: Sequence[str] | None = None,
) -> PreparedProbes:
    """Tokenise, sort by length, pad into batches and build the selection masks, once.

    Sorting by length keeps padding (computed and thrown away, at the cost of a real token)
    small. Padding is on the right, which leaves every real token's position unchanged.
    """
    pad_id = ensure_pad_token(tokenizer)
    cats = list(categories) if categories is not None else probe_set.categories
    _check_selectors(probe_set, selector_for)
    items = [tokenize_probe(tokenizer, r, max_length) for r in probe_set.records]
    n_trunc = sum(it.truncated for it in items)
    if n_trunc:
        log.warning("%d of %d probes were truncated to max_length=%d tokens", n_trunc, len(items), max_length)
    bos = getattr(tokenizer, "bos_token_id", None)
    order = sorted(range(len(items)), key=lambda i: (len(items[i].input_ids), i))
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batches.append(_make_batch([items[i] for i in idx], idx, cats, pad_id, bos, selector_for,
                                   prompt_end_tokens, include_bos))
    empty = [it.record.id for it in items if not _selected_any(it, selector_for, prompt_end_tokens, include_bos, bos)]
    if empty:
        log.warning("%d probe(s) select no token (e.g. %s); check their position selector", len(empty), empty[:3])
    settings = {"max_length": max_length, "prompt_end_tokens": prompt_end_tokens, "include_bos": include_bos,
                "selectors": {c: selector_for(c) for c in cats}, "categories": cats}
    return PreparedProbes(probe_set, cats, items, batches, _hash(items, settings), settings)


def _check_selectors(probe_set: ProbeSet, selector_for: Any) -> None:
    owner = getattr(selector_for, "__self__", None)
    positions = getattr(owner, "positions", None)
    if isinstance(positions, Mapping):
        unknown = sorted(set(positions) - set(probe_set.categories))
        if unknown:
            raise ProbeError(
                f"position selector for unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                f"the probe set has categories {probe_set.categories}"
            )
    for r in probe_set.records:
        if selector_for(r.category) == "response" and r.response is None:
            raise ProbeError(
                f"probe {r.id!r} (category {r.category!r}) uses the 'response' selector but has no response; "
                "add a 'response' field or choose 'all'/'prompt_end' for that category"
            )


def _positions(item: TokenizedProbe, selector: str, k: int, include_bos: bool, bos: int | None) -> tuple[int, int]:
    """[start, end) of the selected tokens within the sequence."""
    n = len(item.input_ids)
    if selector == "all":
        start, end = 0, n
    elif selector == "prompt_end":
        start, end = max(0, item.prompt_len - k), item.prompt_len
    else:  # response
        start, end = item.prompt_len, n
    if not include_bos and start == 0 and n > 0 and bos is not None and item.input_ids[0] == bos:
        start = 1
    return start, max(start, end)


def _selected_any(item, selector_for, k, include_bos, bos) -> bool:
    s, e = _positions(item, selector_for(item.record.category), k, include_bos, bos)
    return e > s


def _make_batch(items, idx, cats, pad_id, bos, selector_for, k, include_bos) -> ProbeBatch:
    T = max(len(it.input_ids) for it in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    select = torch.zeros((B, T), dtype=torch.bool)
    cat_index = {c: i for i, c in enumerate(cats)}
    category = torch.empty(B, dtype=torch.long)
    for row, it in enumerate(items):  # per sequence, never per token
        n = len(it.input_ids)
        input_ids[row, :n] = torch.tensor(it.input_ids, dtype=torch.long)
        attn[row, :n] = 1
        s, e = _positions(it, selector_for(it.record.category), k, include_bos, bos)
        select[row, s:e] = True
        if it.record.category not in cat_index:
            raise ProbeError(f"probe {it.record.id!r} has category {it.record.category!r}, not in {cats}")
        category[row] = cat_index[it.record.category]
    return ProbeBatch(input_ids, attn, select, category, torch.tensor(idx, dtype=torch.long))


def _hash(items: list[TokenizedProbe], settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for it in items:
        h.update(json.dumps([it.record.id, it.record.category, it.prompt_len, it.input_ids]).encode())
    return h.hexdigest()[:16]
