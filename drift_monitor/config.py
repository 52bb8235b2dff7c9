"""MonitorConfig: every knob of the monitor, validated at construction.

Why validate eagerly: the monitor runs inside somebody's training job; a typo found at step
5000 costs hours. Every check here fails at start-up with a message that names the fix.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

POSITION_SELECTORS = ("all", "prompt_end", "response")
PROBE_FORMATS = ("chat", "dialogue", "plain")
#: How a probe can be formatted: the model's chat template, a ``User:``/``Assistant:`` transcript,
#: or the bare text. Defined here (torch-free) so the CLI can offer them without importing torch.
FORMATS = ("chat", "dialogue", "plain")

#: Categories formatted as plain text unless ``formats`` says otherwise: general text is not a request.
PLAIN_CATEGORIES = ("general",)


@dataclass
class MetricSettings:
    """The knobs of docs/metrics.md that change a computed number (MonitorConfig inherits them).

    Kept apart so ``stats``/``metrics`` can take just these, and so they are defined once.
    """

    topk_jaccard_k: int = 100
    dense_density: float = 0.1
    drift_ratio: float = 2.0
    drift_min_firings: int = 5
    refusal_max_base_density: float = 0.3
    refusal_top_k: int = 20
    refusal_z_threshold: float = 3.5
    #: An emerging refusal feature's score (its drift in units of its own firing strength) must
    #: reach this: 0.5 reads "now fires, at its typical strength, on half of the refusal tokens
    #: more than before". The robust z alone does not discriminate: most features never move, so
    #: anything that moves has a large z. A benign chat fine-tune on the SmolLM2 test bed moved
    #: its top feature by up to 0.39; the refusal fine-tune by 0.63–0.73 (docs/metrics.md).
    refusal_min_rel_score: float = 0.5
    #: ... and its mean activity on the harmful refusal tokens must have grown this many times
    #: (with a pseudo-count of 0.1 × its strength): new activity, not more of what the base did.
    refusal_min_fold: float = 2.0
    #: Where refusal features are scored: "response" (the tokens of ``refusal_response``,
    #: teacher-forced after each harmful/harmless probe without a response of its own), "last"
    #: (each such probe's last prompt token) or "selected" (the probe's selected positions).
    refusal_positions: str = "response"
    #: The refusal teacher-forced for the "response" positions (the paper reads features at the
    #: chat model's refusal tokens; a fixed sentence keeps the tokens the same at every step).
    refusal_response: str = "I'm sorry, but I can't help with that request."
    #: Refusal score = (harmful drift − harmless drift) / strength when True; harmful drift /
    #: strength (the paper's) when False. Subtracting cancels drift every request shares, but a
    #: fine-tune that over-refuses then hides its refusal features.
    refusal_contrast: bool = False
    harmful_category: str = "harmful"
    harmless_category: str = "harmless"


@dataclass
class MonitorConfig(MetricSettings):
    """Settings of a :class:`~drift_monitor.monitor.DriftMonitor` and the callback.

    ``saes`` maps a hook (a module name such as ``"model.layers.12"``) to an SAE source: a
    local sae-lens directory, ``"release:sae_id"`` on the hub, or an SAE object. A list of
    sources (or a ``None``/empty key) takes the hook from the SAE's ``cfg.metadata.hook_name``.
    """

    saes: Mapping[str, Any] | list[Any] = field(default_factory=dict)
    probes: Any = "default"  # "default" | path to JSONL | ProbeSet
    every_n_steps: int = 50
    db_path: str | None = "drift.duckdb"
    run_name: str | None = None
    batch_size: int = 16
    max_length: int = 128
    #: "all" | "prompt_end" | "response", or {category: selector} (others get "all").
    positions: str | Mapping[str, str] = "all"
    #: How probes become text: "chat" (the tokenizer's chat template), "dialogue"
    #: ("User: ...\nAssistant: ..."), "plain" (the text alone); one for all, or {category: format}.
    #: None: "plain" for the general category, "chat" for the others.
    formats: str | Mapping[str, str] | None = None
    #: Formats for the *base* model when they differ (the paper's setting: the base reads the
    #: dialogue transcript, the chat model its template; tokens pair by content). None: ``formats``.
    base_formats: str | Mapping[str, str] | None = None
    #: ``prompt_end`` = the last k prompt tokens; None: the post-instruction tokens (end of the
    #: user's words through the assistant header) under chat/dialogue formats, 4 for plain text.
    prompt_end_tokens: int | None = None
    #: Read position 0 (the attention sink, BOS or not). Off: it dwarfs every other token.
    include_bos: bool = False
    #: Tokens whose activation norm exceeds this factor × the median of their batch are excluded
    #: (massive activations) and counted, unless the SAE records its own limit. None: keep them.
    outlier_factor: float | None = 10.0
    device: str | None = None  # None: the model's device
    sae_dtype: str | None = None  # None: keep the SAE's dtype
    #: Memory budget of one chunk of SAE codes ([tokens, d_sae] float32); bounds peak memory.
    sae_chunk_mb: float = 64
    #: Stop the forward after the deepest hooked layer. "auto" disables it for sharded models.
    early_stop: bool | str = "auto"
    baseline_cache_dir: str | None = None  # None: ~/.cache/drift_monitor/baselines
    fail_fast: bool = False
    #: Alert rules: None (the defaults), a YAML file, or a mapping (see drift_monitor.alerts).
    alert_rules: Any = None
    #: Direction monitors: {hook: source} with hook one of the SAE hooks and source a path
    #: (.safetensors, .pt/.pth, .npy, .json), a tensor/ndarray, a {name: vector} dict, or a
    #: list of these (see drift_monitor.probe.directions). Each direction's mean projection per
    #: probe category is logged as ``direction_projection:<name>:<category>``.
    directions: Mapping[str, Any] = field(default_factory=dict)
    show_progress: bool = True
    # Export / callback settings (used by the callback and exporters).
    prometheus_port: int | None = None
    prometheus_host: str = "127.0.0.1"
    pushgateway_url: str | None = None
    snapshot_on_save: bool = False
    snapshot_on_evaluate: bool = False
    #: LoRA adapter signals (drift_monitor.probe.adapters): True, False, or "auto" (on when the model
    #: has LoRA modules). Cheap: norms of the adapter weights, no forward pass.
    adapter_signals: bool | str = "auto"
    #: Cadence k of the adapter signals in optimizer steps (None: every_n_steps).
    adapter_every_n_steps: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        if isinstance(self.saes, Mapping):
            if not self.saes:
                raise ConfigError("MonitorConfig.saes is empty: give at least one {hook: sae_source}")
        elif isinstance(self.saes, (list, tuple)):
            if not self.saes:
                raise ConfigError("MonitorConfig.saes is empty: give at least one SAE source")
        else:
            raise ConfigError(
                "MonitorConfig.saes must be a dict {hook: source} or a list of sources, "
                f"got {type(self.saes).__name__}"
            )
        _positive("every_n_steps", self.every_n_steps)
        _positive("batch_size", self.batch_size)
        _positive("max_length", self.max_length)
        if self.prompt_end_tokens is not None:
            _positive("prompt_end_tokens", self.prompt_end_tokens)
        if self.outlier_factor is not None and (isinstance(self.outlier_factor, bool)
                                                or not isinstance(self.outlier_factor, (int, float))
                                                or not self.outlier_factor > 1):
            raise ConfigError(f"outlier_factor must be a number > 1 (times the median norm) or None, "
                              f"got {self.outlier_factor!r}")
        for name in ("formats", "base_formats"):
            spec = getattr(self, name)
            vals = [] if spec is None else [spec] if isinstance(spec, str) else list(spec.values()) \
                if isinstance(spec, Mapping) else [spec]
            for v in vals:
                if v not in PROBE_FORMATS:
                    raise ConfigError(f"{name}: unknown probe format {v!r}; use one of {PROBE_FORMATS}")
        _positive("topk_jaccard_k", self.topk_jaccard_k)
        if not isinstance(self.directions, Mapping) or not all(isinstance(h, str) and h for h in self.directions):
            raise ConfigError("directions must be a dict {hook: source}, e.g. "
                              "{'model.layers.12': 'refusal_dir.safetensors'}")
        if not isinstance(self.sae_chunk_mb, (int, float)) or self.sae_chunk_mb <= 0:
            raise ConfigError(f"sae_chunk_mb must be a positive number of MiB, got {self.sae_chunk_mb!r}")
        if self.drift_ratio <= 1:
            raise ConfigError(f"drift_ratio must be > 1 (a 2x change is 2.0), got {self.drift_ratio}")
        if self.refusal_positions not in ("response", "last", "selected"):
            raise ConfigError(f"refusal_positions must be 'response', 'last' or 'selected', "
                              f"got {self.refusal_positions!r}")
        if not isinstance(self.refusal_response, str) or not self.refusal_response.strip():
            raise ConfigError("refusal_response must be a non-empty sentence (the refusal teacher-forced after "
                              "harmful/harmless probes), e.g. \"I'm sorry, but I can't help with that.\"")
        if not 0 < self.refusal_max_base_density <= 1:
            raise ConfigError("refusal_max_base_density must be in (0, 1]")
        if self.adapter_signals not in (True, False, "auto"):
            raise ConfigError(f"adapter_signals must be True, False or 'auto', got {self.adapter_signals!r}")
        if self.adapter_every_n_steps is not None:
            _positive("adapter_every_n_steps", self.adapter_every_n_steps)
        if self.early_stop not in (True, False, "auto"):
            raise ConfigError(f"early_stop must be True, False or 'auto', got {self.early_stop!r}")
        sels = self.positions.values() if isinstance(self.positions, Mapping) else [self.positions]
        for sel in sels:
            if sel not in POSITION_SELECTORS:
                raise ConfigError(f"unknown position selector {sel!r}; use one of {POSITION_SELECTORS}")

    @property
    def adapter_cadence(self) -> int:
        """Steps between adapter-signal records (``adapter_every_n_steps`` or ``every_n_steps``)."""
        return self.adapter_every_n_steps or self.every_n_steps

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

    def sae_items(self) -> list[tuple[str | None, Any]]:
        """(hook or None, source) pairs; None means "take the hook from the SAE's metadata"."""
        if isinstance(self.saes, Mapping):
            return [(k or None, v) for k, v in self.saes.items()]
        return [(None, s) for s in self.saes]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings (SAE objects and ProbeSets are replaced by a description)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "saes":  # a list stays a list (hooks from the SAEs' metadata); a None key is ""
                v = [_describe(s) for _, s in self.sae_items()] if not isinstance(v, Mapping) else \
                    {(h or ""): _describe(s) for h, s in self.sae_items()}
            elif f.name == "directions":  # paths stay strings; in-memory tensors are described
                v = {h: [_describe(x) for x in src] if isinstance(src, (list, tuple)) else _describe(src)
                     for h, src in v.items()}
            elif f.name in ("probes", "alert_rules") and not isinstance(v, Mapping):
                v = _describe(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MonitorConfig:
        cls.check_keys(data)
        return cls(**dict(data))

    @classmethod
    def check_keys(cls, data: Mapping[str, Any]) -> None:
        """Unknown settings are an error that names the closest known one."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            hints = [f"{u!r} (did you mean {difflib.get_close_matches(u, known, 1)[0]!r}?)"
                     if difflib.get_close_matches(u, known, 1) else repr(u) for u in unknown]
            raise ConfigError(f"unknown MonitorConfig setting(s): {', '.join(hints)}")

    @classmethod
    def stored_settings(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The settings of a stored ``to_dict()`` (a run's ``config_json``) that can be rebuilt.

        In-memory objects were stored as descriptions (``"<ProbeSet default>"``) and are dropped,
        as are settings this version does not know and the ones that belong to one process
        (where it writes, what it serves). What is left reproduces the run's numbers.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        per_process = {"db_path", "run_name", "device", "show_progress", "prometheus_port", "prometheus_host",
                       "pushgateway_url", "fail_fast"}
        out: dict[str, Any] = {}
        for k, v in data.items():
            if k not in known or k in per_process or _is_description(v):
                continue
            if k == "saes" and isinstance(v, Mapping):
                v = {h: src for h, src in v.items() if not _is_description(src)}
                if not v:
                    continue
            if k == "saes" and isinstance(v, list):
                v = [src for src in v if not _is_description(src)]
                if not v:
                    continue
            out[k] = v
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> MonitorConfig:
        """Load from a ``.yaml``/``.yml`` or ``.json`` file."""
        return cls.from_dict(cls.read_file(path))

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The settings in a ``.yaml``/``.yml`` or ``.json`` file, checked for unknown keys but not
        yet validated as a whole (``drift-monitor scan --config`` adds the SAEs from its flags)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        cls.check_keys(data)
        return dict(data)


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _is_description(v: Any) -> bool:
    """True for what ``to_dict`` wrote in place of an in-memory object (``"<SAE d_in=...>"``)."""
    return isinstance(v, str) and v.startswith("<") and v.endswith(">")


def _describe(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    name = getattr(obj, "name", None)
    return f"<{type(obj).__name__}{' ' + str(name) if name else ''}>"
