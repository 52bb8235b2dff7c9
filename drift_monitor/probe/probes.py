"""Probe sets: prompts with categories, their formatting, tokenisation and batching.

The probe set is the fixed ruler of a run: the same tokens are pushed through the model at
every snapshot so that statistics at two steps are paired token by token. Hence the stable
hash of the *tokenised* set (not of the text): a different tokenizer or chat template gives a
different ruler and must not be compared silently.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..config import FORMATS
from ..errors import DriftMonitorError
from ..records import ALL
from ..settings import ProbeSettings
from ..textfiles import jsonl
from .tokens import TokenConventions

log = logging.getLogger(__name__)

#: ``prompt_end`` reads the last this-many prompt tokens of plain text (no template marks where
#: the user's words end); the direction ablation reads as many (offline.directions_ablation).
PLAIN_PROMPT_END_TOKENS = 4

class ProbeError(DriftMonitorError, ValueError):
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
            _check_category(r.category, f"probe set {self.name!r}, probe {r.id!r}")
            if r.id in seen:
                raise ProbeError(f"probe set {self.name!r}: duplicate id {r.id!r}; give every probe its own id")

            seen.add(r.id)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def categories(self) -> list[str]:
        """Categories in order of first appearance."""
        return list(dict.fromkeys(r.category for r in self.records))

    def filter(self, categories: Iterable[str]) -> ProbeSet:
        keep = set(categories)
        return ProbeSet([r for r in self.records if r.category in keep], name=f"{self.name}[{','.join(sorted(keep))}]")

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any] | ProbeRecord], name: str = "custom") -> ProbeSet:
        out = []
        for i, r in enumerate(records):
            out.append(r if isinstance(r, ProbeRecord) else _parse_record(dict(r), f"{name} record {i}"))
        return cls(out, name=name)

    @classmethod
    def load(cls, path: str | Path) -> ProbeSet:
        """Read a JSONL file of ``{"id", "category", "prompt", "response"?}`` records."""
        path = Path(path)
        if not path.is_file():
            raise ProbeError(f"probe file not found: {path}")
        records = []
        for where, obj in jsonl(path, ProbeError, "save the probe file as UTF-8"):
            if not isinstance(obj, dict):
                raise ProbeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            records.append(_parse_record(obj, where))
        if not records:
            raise ProbeError(f"probe file {path} is empty: it needs at least one JSON record per line")
        return cls(records, name=path.stem)

    @classmethod
    def default(cls) -> ProbeSet:
        """The bundled set: harmful requests, harmless instructions and general text."""
        ref = resources.files("drift_monitor") / "data" / "default_probes.jsonl"
        with resources.as_file(ref) as p:
            ps = cls.load(p)
        ps.name = "default"
        return ps

    @classmethod
    def resolve(cls, spec: str | Path | ProbeSet) -> ProbeSet:
        """``"default"``, a path, or a ProbeSet -> ProbeSet."""
        if isinstance(spec, ProbeSet):
            return spec
        if spec == "default":
            return cls.default()
        return cls.load(spec)


def _parse_record(obj: dict[str, Any], where: str) -> ProbeRecord:
    missing = [k for k in ("id", "category", "prompt") if k not in obj]
    if missing:
        raise ProbeError(f"{where}: missing field(s) {missing}; "
                         "a record needs id, category, prompt (response optional)")
    for k in ("id", "category", "prompt"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise ProbeError(f"{where}: field {k!r} must be a non-empty string")
    resp = obj.get("response")
    if resp is not None and not isinstance(resp, str):
        raise ProbeError(f"{where}: field 'response' must be a string when given")
    extra = set(obj) - {"id", "category", "prompt", "response"}
    if extra:
        raise ProbeError(f"{where}: unknown field(s) {sorted(extra)}; allowed: id, category, prompt, response")
    _check_category(obj["category"], where)
    return ProbeRecord(id=obj["id"], category=obj["category"], prompt=obj["prompt"], response=resp)


def _check_category(category: str, where: str) -> None:
    """``all`` names the aggregate of every probe token in each snapshot: a probe category of
    that name would overwrite it (and be overwritten), so it is refused where it is read."""
    if category == ALL:
        raise ProbeError(f"{where}: category {ALL!r} is reserved (it is the aggregate over every probe); "
                         "rename the category, e.g. 'all_topics'")


# ---------------------------------------------------------------------------------- formatting
#: How a probe is turned into text. ``chat``: the tokenizer's chat template (a user turn, then
#: the assistant's response); ``dialogue``: ``User: {prompt}\nAssistant: {response}``, the plain
#: transcript a base model reads (also what ``chat`` falls back to without a template);
#: ``plain``: the prompt text alone, then the response (general text, pre-training-like).
DIALOGUE_PROMPT = "User: {prompt}\nAssistant:"


@dataclass(frozen=True)
class FormattedProbe:
    """A probe as text, with the character spans that give positions their meaning."""

    text: str
    fmt: str
    content: tuple[int, int]  # the user's words (chat/dialogue) or the prompt text (plain)
    prompt_end: int  # where the prompt ends: the generation header (e.g. "<|im_start|>assistant\n") included
    response: tuple[int, int] | None  # the response's own words


def chat_prompt(tokenizer: Any, prompt: str, response: str | None = None) -> str:
    """The one chat formatter: a user turn (and the assistant's response) through the tokenizer's
    chat template, or the dialogue transcript when the tokenizer has none."""
    if not getattr(tokenizer, "chat_template", None):
        p = DIALOGUE_PROMPT.format(prompt=prompt)
        return p if response is None else f"{p} {response}"
    msgs = [{"role": "user", "content": prompt}]
    if response is None:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": response}], tokenize=False)


def format_probe(tokenizer: Any, record: ProbeRecord, fmt: str = "chat") -> FormattedProbe:
    """The probe's text under ``fmt``, with where its prompt words, prompt end and response are."""
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        fmt = "dialogue"
    resp = record.response
    if fmt == "plain":
        text = record.prompt if resp is None else f"{record.prompt} {resp}"
        n = len(record.prompt)
        return FormattedProbe(text, fmt, (0, n), n, None if resp is None else (n + 1, len(text)))
    if fmt == "dialogue":
        prompt = DIALOGUE_PROMPT.format(prompt=record.prompt)
        text = prompt if resp is None else f"{prompt} {resp}"
        c0 = DIALOGUE_PROMPT.index("{prompt}")
        return FormattedProbe(text, fmt, (c0, c0 + len(record.prompt)), len(prompt),
                              None if resp is None else (len(prompt) + 1, len(text)))
    if fmt != "chat":
        raise ProbeError(f"unknown probe format {fmt!r}; use one of {FORMATS}")
    text = chat_prompt(tokenizer, record.prompt, resp)
    r_span = None if resp is None else _locate(text, resp, len(text), record, "response")
    p_end = len(text) if r_span is None else r_span[0]
    return FormattedProbe(text, "chat", _locate(text, record.prompt, p_end, record, "prompt"), p_end, r_span)


def _locate(text: str, words: str, before: int, record: ProbeRecord, what: str) -> tuple[int, int]:
    """Span of the last occurrence of ``words`` in ``text[:before]`` (templates may strip them)."""
    for w in (words, words.strip()):
        i = text.rfind(w, 0, before)
        if i >= 0 and w:
            return i, i + len(w)
    raise ProbeError(
        f"probe {record.id!r}: the chat template does not reproduce the {what} text, so its tokens cannot be "
        "located; the template rewrites message content. Use format 'dialogue' for this category "
        "(MonitorConfig(formats={...})) or a template that keeps the content verbatim")


# ---------------------------------------------------------------------------------- refusal tokens
@dataclass(frozen=True)
class RefusalProbing:
    """Which tokens the refusal-feature scores read (docs/metrics.md, "Refusal features").

    ``positions``: "response" (the default): the tokens of ``response``, a refusal
    teacher-forced after each probe of ``categories`` that has no response of its own (a probe
    with one is read at its own response); "last": each such probe's last prompt token (where
    the model decides how its answer begins); "selected": the probe's selected positions.
    """

    categories: tuple[str, ...] = ()
    positions: str = "response"
    response: str | None = None

    def forced_for(self, category: str) -> str | None:
        if self.positions == "response" and category in self.categories:
            return self.response
        return None

    def _candidates(self, item: TokenizedProbe, selected: list[int]) -> list[int]:
        if item.record.category not in self.categories:
            return []
        if self.positions == "selected":
            return list(selected)
        if self.positions == "last":
            return [min(max(item.prompt_len - 1, 0), len(item.input_ids) - 1)]
        span = item.forced or item.response
        return list(range(*span)) if span is not None else []

    def select(self, item: TokenizedProbe, selected: list[int], conv: TokenConventions,
               special: set[int]) -> list[int]:
        """Positions of ``item`` the refusal scores read (the sink and excluded specials never)."""
        first = 1 if conv.skip_first else 0
        return [p for p in self._candidates(item, selected) if p >= first and item.input_ids[p] not in special]

    def describe(self) -> dict[str, Any]:
        return {"categories": list(self.categories), "positions": self.positions, "response": self.response}


# ---------------------------------------------------------------------------------- tokenising
@dataclass
class TokenizedProbe:
    record: ProbeRecord
    input_ids: list[int]
    prompt_len: int  # tokens of the formatted prompt, generation header included
    truncated: bool
    fmt: str = "chat"
    content: tuple[int, int] = (0, 0)  # token span of the prompt's words
    response: tuple[int, int] | None = None  # token span of the response's words
    #: per token, its character span relative to the prompt's words ("p") or the response's ("r"),
    #: None for template text: what pairs tokens across two formats ("aligned by content")
    keys: list[tuple[str, int, int] | None] = field(default_factory=list, repr=False)
    forced: tuple[int, int] | None = None  # token span of a teacher-forced response (refusal scores)


def _encode(tokenizer: Any, text: str, add_special: bool) -> tuple[list[int], list[tuple[int, int]] | None]:
    try:
        enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return list(tokenizer(text, add_special_tokens=add_special)["input_ids"]), None


def _add_special(tokenizer: Any, fmt: str, conv: TokenConventions) -> bool:
    # A chat template writes its own special tokens (BOS included) into the text.
    if fmt == "chat":
        return False
    return True if conv.prepend_bos is None else bool(conv.prepend_bos)


def tokenize_probe(tokenizer: Any, record: ProbeRecord, max_length: int, fmt: str = "chat",
                   conv: TokenConventions | None = None, forced: str | None = None) -> TokenizedProbe:
    """Token ids of a formatted probe and the token spans of its prompt words, prompt and response.

    ``forced``: a response teacher-forced after a probe that has none of its own (the refusal
    scores read it); its tokens are the ``forced`` span, never part of the probe's positions.
    Under causal attention they leave every prompt token's activation unchanged.
    """
    conv = conv or TokenConventions()
    if forced is not None and record.response is None:
        item = tokenize_probe(tokenizer, replace(record, response=forced), max_length, fmt, conv)
        item.record, item.forced, item.response = record, item.response, None
        return item
    fp = format_probe(tokenizer, record, fmt)
    add_special = _add_special(tokenizer, fp.fmt, conv)
    ids, offsets = _encode(tokenizer, fp.text, add_special)
    bos = getattr(tokenizer, "bos_token_id", None)
    if conv.prepend_bos and bos is not None and fp.fmt != "chat" and (not ids or ids[0] != bos):
        ids = [bos] + ids
        offsets = [(0, 0)] + offsets if offsets is not None else None
    if offsets is None:
        offsets = _prefix_offsets(tokenizer, fp.text, ids, add_special)
    starts = [s if e > s else -1 for s, e in offsets]  # zero-width (added) tokens start "before everything"
    ends = [e for _, e in offsets]

    def span(a: int, b: int) -> tuple[int, int]:  # tokens overlapping chars [a, b)
        return bisect.bisect_right(ends, a), max(bisect.bisect_right(ends, a), bisect.bisect_left(starts, b))

    content = span(*fp.content)
    prompt_len = bisect.bisect_right(ends, fp.prompt_end) if fp.response is not None else len(ids)
    response = span(*fp.response) if fp.response is not None else None
    keys: list[tuple[str, int, int] | None] = [None] * len(ids)
    for tag, chars, toks in (("p", fp.content, content), ("r", fp.response, response)):
        if toks is None or chars is None:
            continue
        for i in range(*toks):  # once per run, at preparation: never on the probe pass
            s, e = offsets[i]
            keys[i] = (tag, max(s, chars[0]) - chars[0], min(e, chars[1]) - chars[0])
    truncated = len(ids) > max_length
    clip = lambda sp: (min(sp[0], max_length), min(sp[1], max_length))  # noqa: E731
    return TokenizedProbe(record, ids[:max_length], min(prompt_len, max_length), truncated, fp.fmt, clip(content),
                          clip(response) if response is not None else None, keys[:max_length])


def _prefix_offsets(tokenizer: Any, text: str, ids: list[int], add_special: bool) -> list[tuple[int, int]]:
    """Character spans of tokens for tokenizers without offsets: decode growing prefixes."""
    out, prev = [], 0
    for i in range(len(ids)):
        cur = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        out.append((min(prev, len(text)), min(cur, len(text))))
        prev = cur
    return out


@dataclass
class ProbeBatch:
    """One padded batch. Masks are [B, T] booleans of the tokens that enter the statistics."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    select: torch.Tensor  # tokens selected by each record's position selector (padding, sink excluded)
    category: torch.Tensor  # [B] category index per sequence
    index: torch.Tensor  # [B] index of each sequence in the probe set
    #: [B, T] the tokens the refusal-feature scores read (docs/metrics.md, "Refusal features"):
    #: by default the teacher-forced refusal response of each harmful/harmless probe
    refusal: torch.Tensor
    #: [B, T] the post-instruction tokens of each harmful/harmless probe (the end of the user's words
    #: through the assistant header), where the model decides whether to refuse, whatever words it
    #: then uses (Arditi et al.): the refusal-erosion and post-instruction signals read these
    post: torch.Tensor

    def to(self, device: torch.device | str) -> ProbeBatch:
        return ProbeBatch(*(t.to(device, non_blocking=True) for t in
                            (self.input_ids, self.attention_mask, self.select, self.category, self.index,
                             self.refusal, self.post)))

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
    order: list[int] = field(default_factory=list)  # record indices in batch order

    @property
    def n_tokens(self) -> int:
        return sum(b.n_selected for b in self.batches)

    def selected_positions(self, i: int) -> list[int]:
        """Token positions of record ``i`` that enter the statistics."""
        for b in self.batches:
            rows = (b.index == i).nonzero()
            if rows.numel():
                return b.select[int(rows[0, 0])].nonzero().flatten().tolist()
        raise IndexError(i)


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


def prepare_probes(
    probe_set: ProbeSet,
    tokenizer: Any,
    settings: ProbeSettings,
    *,
    base: bool = False,
    conventions: TokenConventions | None = None,
    categories: Sequence[str] | None = None,
    order: Sequence[int] | None = None,
    refusal: RefusalProbing | None = None,
) -> PreparedProbes:
    """Tokenise, sort by length, pad into batches and build the selection masks, once.

    ``settings`` says how (batch size, length, positions, formats, ``prompt_end_tokens``,
    ``include_bos``); ``base``: in the base model's formats (``settings.base_formats``). Sorting
    by length keeps padding (computed and thrown away, at the cost of a real token) small.
    Padding is on the right, which leaves every real token's position unchanged. ``order``
    (record indices) imposes another preparation's batches, so that two formats of the same
    probes pair batch by batch. ``include_bos`` reads position 0 (the attention sink) despite
    ``conventions.skip_first``. ``refusal`` says which categories' tokens the refusal scores
    read, and teacher-forces its response after those probes.
    """
    conv = conventions or TokenConventions()
    if settings.include_bos:
        conv = replace(conv, skip_first=False)
    max_length, prompt_end_tokens = settings.max_length, settings.prompt_end_tokens
    selector_for = settings.selector_for

    def format_for(category: str) -> str:
        return settings.format_for(category, base=base)

    pad_id = ensure_pad_token(tokenizer)
    cats = list(categories) if categories is not None else probe_set.categories
    _check_selectors(probe_set, settings)
    refusal = refusal or RefusalProbing()
    items = [tokenize_probe(tokenizer, r, max_length, format_for(r.category), conv,
                            forced=refusal.forced_for(r.category)) for r in probe_set.records]
    n_trunc = sum(it.truncated for it in items)
    if n_trunc:
        log.warning("%d of %d probes were truncated to max_length=%d tokens", n_trunc, len(items), max_length)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if conv.exclude_special_tokens else set()
    if order is None:
        order = sorted(range(len(items)), key=lambda i: (len(items[i].input_ids), i))
    order = list(order)
    sel = [_positions(it, selector_for(it.record.category), prompt_end_tokens, conv, special) for it in items]
    ref = [refusal.select(it, s, conv, special) for it, s in zip(items, sel)]
    post = [_positions(it, "prompt_end", None, conv, special) if it.record.category in refusal.categories else []
            for it in items]
    batches = []
    for start in range(0, len(order), settings.batch_size):
        idx = order[start:start + settings.batch_size]
        batches.append(_make_batch([items[i] for i in idx], [sel[i] for i in idx], [ref[i] for i in idx],
                                   [post[i] for i in idx], idx, cats, pad_id))
    empty = [it.record.id for it, s in zip(items, sel) if not s]
    if empty:
        log.warning("%d probe(s) select no token (e.g. %s); check their position selector", len(empty), empty[:3])
    settings = {"max_length": max_length, "prompt_end_tokens": prompt_end_tokens,
                "selectors": {c: selector_for(c) for c in cats}, "formats": {c: format_for(c) for c in cats},
                "conventions": conv.to_metadata(), "categories": cats, "refusal": refusal.describe()}
    return PreparedProbes(probe_set, cats, items, batches, _hash(items, sel, settings, ref, post), settings, order)


def _check_selectors(probe_set: ProbeSet, settings: ProbeSettings) -> None:
    positions = settings.positions
    if isinstance(positions, Mapping):
        unknown = sorted(set(positions) - set(probe_set.categories))
        if unknown:
            raise ProbeError(
                f"position selector for unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                f"the probe set has categories {probe_set.categories}"
            )
    for r in probe_set.records:
        if settings.selector_for(r.category) == "response" and r.response is None:
            raise ProbeError(
                f"probe {r.id!r} (category {r.category!r}) uses the 'response' selector but has no response; "
                "add a 'response' field or choose 'all'/'prompt_end' for that category"
            )


def _positions(item: TokenizedProbe, selector: str, k: int | None, conv: TokenConventions,
               special: set[int]) -> list[int]:
    """Positions of ``item`` that ``selector`` reads (docs/metrics.md, "Token selection").

    ``all``: the prompt's words through the end of the response; template text *before* the
    user's words (a default system prompt, role markers) is identical in every probe, and
    under causal attention so are its activations: it carries no information about the probe.
    ``prompt_end``: the post-instruction tokens (end of the user's words through the assistant
    header), or the last ``k`` prompt tokens when ``k`` is given (and for plain text, k=4).
    ``response``: the response's own words.
    """
    n = len(item.input_ids)
    if selector == "all":
        if item.fmt == "plain":
            start, end = 0, n
        else:
            start, end = item.content[0], item.response[1] if item.response is not None else item.prompt_len
    elif selector == "prompt_end":
        if k is None and item.fmt != "plain":
            start, end = item.content[1], item.prompt_len
            if end <= start:  # a template with nothing after the user's words
                start = end - 1
        else:
            start, end = item.prompt_len - (k or PLAIN_PROMPT_END_TOKENS), item.prompt_len
    else:  # response
        start, end = item.response if item.response is not None else (item.prompt_len, n)
    start = max(0, start, 1 if conv.skip_first else 0)
    pos = range(start, min(max(start, end), n))
    if special:
        return [p for p in pos if item.input_ids[p] not in special]
    return list(pos)


def _make_batch(items: list[TokenizedProbe], sel: list[list[int]], ref: list[list[int]], post: list[list[int]],
                idx: list[int], cats: list[str], pad_id: int) -> ProbeBatch:
    T = max(len(it.input_ids) for it in items)
    B = len(items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    select = torch.zeros((B, T), dtype=torch.bool)
    cat_index = {c: i for i, c in enumerate(cats)}
    category = torch.empty(B, dtype=torch.long)
    refusal = torch.zeros((B, T), dtype=torch.bool)
    post_mask = torch.zeros((B, T), dtype=torch.bool)
    for row, (it, pos, rpos, ppos) in enumerate(zip(items, sel, ref, post)):  # per sequence, never per token
        n = len(it.input_ids)
        input_ids[row, :n] = torch.tensor(it.input_ids, dtype=torch.long)
        attn[row, :n] = 1
        if pos:
            select[row, torch.tensor(pos, dtype=torch.long)] = True
        if rpos:
            refusal[row, torch.tensor(rpos, dtype=torch.long)] = True
        if ppos:
            post_mask[row, torch.tensor(ppos, dtype=torch.long)] = True
        if it.record.category not in cat_index:
            raise ProbeError(f"probe {it.record.id!r} has category {it.record.category!r}, not in {cats}")
        category[row] = cat_index[it.record.category]
    return ProbeBatch(input_ids, attn, select, category, torch.tensor(idx, dtype=torch.long), refusal, post_mask)


def check_paired(current: PreparedProbes, base: PreparedProbes) -> None:
    """Two preparations (e.g. chat vs dialogue formats) must select the same content, token by
    token, in the same batches: what the paired metrics need. Raises ProbeError naming the
    first probe whose selected tokens differ, with both tokenisations."""
    if current.order != base.order:
        raise ProbeError("the two probe preparations are batched in different orders; pass order=")
    for i, (a, b) in enumerate(zip(current.items, base.items)):
        ka = [a.keys[p] for p in current.selected_positions(i)]
        kb = [b.keys[p] for p in base.selected_positions(i)]
        if ka != kb or None in ka:
            sel = current.settings["selectors"].get(a.record.category, "all")
            raise ProbeError(
                f"probe {a.record.id!r} (category {a.record.category!r}, selector {sel!r}) does not pair across "
                f"the formats {b.fmt!r} (base) and {a.fmt!r}: {len(kb)} vs {len(ka)} selected tokens, "
                f"{_describe_keys(kb)} vs {_describe_keys(ka)}. Across formats only the prompt's and the "
                "response's own words pair; use the 'response' selector, and a response whose tokenisation "
                "does not depend on the text before it")


def _describe_keys(keys: list) -> str:
    shown = [("template" if k is None else f"{k[0]}[{k[1]}:{k[2]}]") for k in keys[:6]]
    return "[" + ", ".join(shown) + (", ..." if len(keys) > 6 else "") + "]"


def _hash(items: list[TokenizedProbe], sel: list[list[int]], settings: dict[str, Any],
          ref: list[list[int]], post: list[list[int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for it, pos, rpos, ppos in zip(items, sel, ref, post):
        h.update(json.dumps([it.record.id, it.record.category, it.prompt_len, it.input_ids, pos, rpos, ppos]).encode())
    return h.hexdigest()[:16]
