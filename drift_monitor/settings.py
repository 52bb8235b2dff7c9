"""The sections of :class:`~drift_monitor.config.MonitorConfig`, each validated field by field.

Why sections: the monitor has some forty knobs, and a flat list hides which ones change a number
(``metrics``), which ones change what is read (``probes``), when it runs (``cadence``) and where
results go (``outputs``). The section is also the unit other code takes: ``stats``/``compare``
take only :class:`MetricSettings`, the recorder only :class:`OutputSettings`.

Why a check per field, declared beside its default: a setting's type and range are one fact,
and a typo found at step 5000 costs hours. Every check fails at construction with a message
naming the setting and what it accepts. A bool is not an int here (``every_n_steps=True`` is
refused, not taken as 1), NaN fails every range, and a float is not an int.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .records import ALL as ALL_CATEGORY  # the aggregate over every category

#: The probe categories the refusal metrics contrast, by default (the default probe set's): the
#: one home of these defaults, for ``metrics.harmful_category``/``harmless_category`` and for
#: ``drift-monitor verify``'s ``--harmful-category``/``--harmless-category``.
HARMFUL_CATEGORY = "harmful"
HARMLESS_CATEGORY = "harmless"

POSITION_SELECTORS = ("all", "prompt_end", "response")
#: How a probe can be formatted: the model's chat template, a ``User:``/``Assistant:`` transcript,
#: or the bare text. Defined here (torch-free) so the CLI can offer them without importing torch.
FORMATS = ("chat", "dialogue", "plain")
#: Categories formatted as plain text unless ``formats`` says otherwise: general text is not a request.
PLAIN_CATEGORIES = ("general",)

Check = Callable[[str, Any], None]


# ---------------------------------------------------------------------------------- checks
def _fail(name: str, wants: str, value: Any) -> None:
    raise ConfigError(f"setting {name} must be {wants}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Check:
    wants = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
    wants += " or None" if optional else ""

    def check(name: str, v: Any) -> None:
        if v is None and optional:
            return
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail(name, wants, v)
    return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           optional: bool = False) -> Check:
    wants = "a finite number" + (f" {'>' if lo_open else '>='} {lo}" if lo is not None else "") \
        + (f" <= {hi}" if hi is not None else "") + (" or None" if optional else "")

    def check(name: str, v: Any) -> None:
        if v is None and optional:
            return
        if not _is_num(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            _fail(name, wants, v)
    return check


def choice(*values: Any) -> Check:
    """One of ``values``, compared by identity for bools so that 1 is not True."""
    def check(name: str, v: Any) -> None:
        ok = any(v is c if isinstance(c, bool) or isinstance(v, bool) else v == c for c in values)
        if not ok:
            _fail(name, "one of " + ", ".join(map(repr, values)), v)
    return check


def boolean(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(name, "True or False", v)


def text(*, optional: bool = False) -> Check:
    def check(name: str, v: Any) -> None:
        if v is None and optional:
            return
        if not isinstance(v, (str, Path)) or not str(v).strip():
            _fail(name, "a non-empty string" + (" or None" if optional else ""), v)
    return check


def per_category(allowed: tuple[str, ...], *, optional: bool = False) -> Check:
    """One of ``allowed``, or a {category: one of allowed} mapping."""
    def check(name: str, v: Any) -> None:
        if v is None and optional:
            return
        vals = list(v.values()) if isinstance(v, Mapping) else [v]
        for x in vals:
            if x not in allowed or not isinstance(x, str):
                raise ConfigError(f"setting {name}: unknown value {x!r}; use one of {allowed}"
                                  + ", or a {category: value} mapping")
    return check


def anything(name: str, v: Any) -> None:
    """Checked where it is used (a probe source, rules, an SAE): loading it gives the precise error."""


def setting(default: Any = None, check: Check = anything, *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its check (read by :func:`validate_fields`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"check": check})
    return field(default=default, metadata={"check": check})


def validate_fields(obj: Any, prefix: str) -> None:
    """Run every field's check, naming it ``prefix.field`` in the message."""
    for f in fields(obj):
        f.metadata.get("check", anything)(f"{prefix}{f.name}", getattr(obj, f.name))


class _Section:
    """Validated at construction; built from a mapping with unknown keys named."""

    #: The section's name in MonitorConfig (``cadence``) and so in files and messages.
    SECTION = ""

    def __post_init__(self) -> None:
        validate_fields(self, f"{self.SECTION}.")
        self.validate()

    def validate(self) -> None:
        """Checks across fields (none by default)."""

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """The section from itself, a mapping of its fields, or None (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            check_known(value, {f.name for f in fields(cls)}, f"the {cls.SECTION} section")
            return cls(**dict(value))
        raise ConfigError(f"setting {cls.SECTION} must be a {cls.__name__} or a mapping of its settings "
                          f"({', '.join(f.name for f in fields(cls))}), got {type(value).__name__}")


def check_known(data: Mapping[str, Any], known: set[str], where: str) -> None:
    """Unknown keys are an error that names the closest known one."""
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(u), known, 1)) else repr(u)
                 for u in unknown]
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(hints)}")


# ---------------------------------------------------------------------------------- sections
@dataclass
class ProbeSettings(_Section):
    """What is read: the probe set, how it is formatted and tokenised, which positions count."""

    SECTION = "probes"

    #: "default" (the built-in set), a JSONL path, or a ProbeSet.
    source: Any = setting("default")
    batch_size: int = setting(16, integer(1))
    max_length: int = setting(128, integer(1))
    #: "all" | "prompt_end" | "response", or {category: selector} (others get "all").
    positions: str | Mapping[str, str] = setting("all", per_category(POSITION_SELECTORS))
    #: How probes become text: "chat" (the tokenizer's chat template), "dialogue"
    #: ("User: ...\nAssistant: ..."), "plain" (the text alone); one for all, or {category: format}.
    #: None: "plain" for the general category, "chat" for the others.
    formats: str | Mapping[str, str] | None = setting(None, per_category(FORMATS, optional=True))
    #: Formats for the *base* model when they differ (the paper's setting: the base reads the
    #: dialogue transcript, the chat model its template; tokens pair by content). None: ``formats``.
    base_formats: str | Mapping[str, str] | None = setting(None, per_category(FORMATS, optional=True))
    #: ``prompt_end`` = the last k prompt tokens; None: the post-instruction tokens (end of the
    #: user's words through the assistant header) under chat/dialogue formats, 4 for plain text.
    prompt_end_tokens: int | None = setting(None, integer(1, optional=True))
    #: Read position 0 (the attention sink, BOS or not). Off: it dwarfs every other token.
    include_bos: bool = setting(False, boolean)
    #: Tokens whose activation norm exceeds this factor × the median of their batch are excluded
    #: (massive activations) and counted, unless the SAE records its own limit. None: keep them.
    outlier_factor: float | None = setting(10.0, number(1, lo_open=True, optional=True))

    def selector_for(self, category: str) -> str:
        """The position selector used for tokens of ``category``."""
        if isinstance(self.positions, Mapping):
            return self.positions.get(category, "all")
        return self.positions

    def format_for(self, category: str, base: bool = False) -> str:
        """The probe format of ``category`` (for the base model when ``base`` and base_formats is set)."""
        spec = self.base_formats if base and self.base_formats is not None else self.formats
        if isinstance(spec, str):
            return spec
        if isinstance(spec, Mapping) and category in spec:
            return spec[category]
        return "plain" if category in PLAIN_CATEGORIES else "chat"


@dataclass
class MetricSettings(_Section):
    """The knobs of docs/metrics.md that change a computed number.

    Kept apart so ``stats``/``compare`` take just these, and so they are defined once.
    """

    SECTION = "metrics"

    topk_jaccard_k: int = setting(100, integer(1))
    dense_density: float = setting(0.1, number(0, 1, lo_open=True))
    drift_ratio: float = setting(2.0, number(1, lo_open=True))
    drift_min_firings: int = setting(5, integer(0))
    refusal_max_base_density: float = setting(0.3, number(0, 1, lo_open=True))
    refusal_top_k: int = setting(20, integer(1))
    refusal_z_threshold: float = setting(3.5, number(0))
    #: An emerging refusal feature's score (its drift in units of its own firing strength) must
    #: reach this: 0.5 reads "now fires, at its typical strength, on half of the refusal tokens
    #: more than before". The robust z alone does not discriminate: most features never move, so
    #: anything that moves has a large z. A benign chat fine-tune on the SmolLM2 test bed moved
    #: its top feature by up to 0.39; the refusal fine-tune by 0.63–0.73 (docs/metrics.md).
    refusal_min_rel_score: float = setting(0.5, number(0))
    #: ... and its mean activity on the harmful refusal tokens must have grown this many times
    #: (with a pseudo-count of 0.1 × its strength): new activity, not more of what the base did.
    refusal_min_fold: float = setting(2.0, number(1))
    #: Where refusal features are scored: "response" (the tokens of ``refusal_response``,
    #: teacher-forced after each harmful/harmless probe without a response of its own), "last"
    #: (each such probe's last prompt token) or "selected" (the probe's selected positions).
    refusal_positions: str = setting("response", choice("response", "last", "selected"))
    #: The refusal teacher-forced for the "response" positions (the paper reads features at the
    #: chat model's refusal tokens; a fixed sentence keeps the tokens the same at every step).
    refusal_response: str = setting("I'm sorry, but I can't help with that request.", text())
    #: Refusal score = (harmful drift − harmless drift) / strength when True; harmful drift /
    #: strength (the paper's) when False. Subtracting cancels drift every request shares, but a
    #: fine-tune that over-refuses then hides its refusal features.
    refusal_contrast: bool = setting(False, boolean)
    #: The residual monitor (probe.residual): how many directions of new SAE error to report
    #: per hook (0: off, and the error's second moment is not kept).
    residual_directions: int = setting(3, integer(0))
    #: Greedy tokens generated once per start model after each harmful and harmless probe, to
    #: measure whether it refuses (``start_harmful_refusal_rate``): refusal cannot erode in a start
    #: that never refused, so the ``refusal_erosion`` rule waits for one that does. 0: not measured
    #: (and that rule is then never held back).
    start_refusal_tokens: int = setting(16, integer(0))
    harmful_category: str = setting(HARMFUL_CATEGORY, text())
    harmless_category: str = setting(HARMLESS_CATEGORY, text())

    def validate(self) -> None:
        for name in ("harmful_category", "harmless_category"):
            if getattr(self, name) == ALL_CATEGORY:
                raise ConfigError(f"setting metrics.{name} cannot be {ALL_CATEGORY!r}: it names the aggregate "
                                  "over every category; name the probe category itself")


@dataclass
class CadenceSettings(_Section):
    """When the monitor runs, in optimizer steps and trainer events."""

    SECTION = "cadence"

    every_n_steps: int = setting(50, integer(1))
    snapshot_on_save: bool = setting(False, boolean)
    snapshot_on_evaluate: bool = setting(False, boolean)
    #: LoRA adapter signals (drift_monitor.probe.adapters): True, False, or "auto" (on when the model
    #: has LoRA modules). Cheap: norms of the adapter weights, no forward pass.
    adapter_signals: bool | str = setting("auto", choice(True, False, "auto"))
    #: Cadence k of the adapter signals in optimizer steps (None: every_n_steps).
    adapter_every_n_steps: int | None = setting(None, integer(1, optional=True))
    #: The CE-loss metrics (probe.ce: three full forwards per hook on the general probes) at the
    #: base and at every step divisible by every_n_steps × this; 0: off. By step, not by count,
    #: so a scan of a run's checkpoints measures them where the run did.
    ce_every_n_snapshots: int = setting(0, integer(0))

    def ce_due(self, step: int) -> bool:
        """Whether the CE-loss metrics are measured at ``step`` (the base, step 0, always when on)."""
        return bool(self.ce_every_n_snapshots) and step % (self.every_n_steps * self.ce_every_n_snapshots) == 0

    @property
    def adapter_cadence(self) -> int:
        """Steps between adapter-signal records (``adapter_every_n_steps`` or ``every_n_steps``)."""
        return self.adapter_every_n_steps or self.every_n_steps


@dataclass
class OutputSettings(_Section):
    """Where results go: the store, alert rules, Prometheus, progress bars."""

    SECTION = "outputs"

    db_path: str | None = setting("drift.duckdb", text(optional=True))
    run_name: str | None = setting(None, text(optional=True))
    #: The training dataset this run fine-tunes on (a file or folder, as ``drift-monitor preflight
    #: --data`` reads it). Kept with the run's settings so the dashboard can show the pre-flight
    #: results of that data beside the run (drift_monitor.store.preflights); changes no number.
    train_data: str | None = setting(None, text(optional=True))
    #: Alert rules: None (the defaults), a YAML file, or a mapping (see drift_monitor.alerts).
    alert_rules: Any = setting(None)
    #: Serve /metrics on this port (0: an ephemeral one; None: off).
    prometheus_port: int | None = setting(None, integer(0, 65535, optional=True))
    prometheus_host: str = setting("127.0.0.1", text())
    #: Write a Prometheus file_sd target file here while serving /metrics (exporters.discovery),
    #: so a central server finds the run on whichever node it runs; removed when the run ends.
    prometheus_sd_dir: str | None = setting(None, text(optional=True))
    pushgateway_url: str | None = setting(None, text(optional=True))
    #: Export the per-LoRA-module adapter series (``hook="adapter:<module>"``, ~900 per run on a 7B
    #: model) to Prometheus too; the aggregates (hook ``adapter``) always are. The store keeps both.
    prometheus_adapter_modules: bool = setting(False, boolean)
    #: Keep the run's Pushgateway group after the run ends. Off: the last push is followed by a
    #: delete, so a finished run's values are not scraped as current forever.
    keep_pushed: bool = setting(False, boolean)
    show_progress: bool = setting(True, boolean)
    #: Webhook targets of alert notifications (drift_monitor.notify): a list of URLs or mappings
    #: {url, min_severity, format, headers, name, timeout_s, retries}; checked at start-up.
    notify: list[Any] = setting(factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.db_path, Path):
            self.db_path = str(self.db_path)
        if isinstance(self.train_data, Path):
            self.train_data = str(self.train_data)
        from .notify.targets import parse_targets

        self.notify = parse_targets(self.notify)
        super().__post_init__()


#: The sections by name, in the order they are written to files.
SECTIONS: dict[str, type[_Section]] = {cls.SECTION: cls for cls in
                                       (ProbeSettings, MetricSettings, CadenceSettings, OutputSettings)}

#: Where each old flat setting lives now: {flat name: (section, field)}. ``probes`` (the probe
#: source) became ``probes.source``; every other field kept its name.
FLAT_KEYS: dict[str, tuple[str, str]] = {
    ("probes" if (sec == "probes" and f.name == "source") else f.name): (sec, f.name)
    for sec, cls in SECTIONS.items() for f in fields(cls)}
