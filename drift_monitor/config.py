"""MonitorConfig: every knob of the monitor, in sections, validated at construction.

Why validate eagerly: the monitor runs inside somebody's training job; a typo found at step
5000 costs hours. Every check fails at start-up with a message that names the fix.

Why sections (``probes``, ``metrics``, ``cadence``, ``outputs``; drift_monitor.settings): they
tell which knob changes a number and which only where it goes. The SAEs, direction monitors and
the runtime knobs (device, dtypes, memory, cache) stay at the top. A file or a call may still use
the old flat keys (``every_n_steps: 10``): they load, with a :class:`ConfigDeprecationWarning`
that gives the sectioned spelling. ``probes`` given as a path, ``"default"`` or a ProbeSet is the
shorthand for ``probes.source`` and is not deprecated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, invalid_yaml
from .settings import (
    FLAT_KEYS,
    FORMATS,
    PLAIN_CATEGORIES,
    POSITION_SELECTORS,
    SECTIONS,
    CadenceSettings,
    MetricSettings,
    OutputSettings,
    ProbeSettings,
    boolean,
    check_known,
    choice,
    number,
    setting,
    text,
    validate_fields,
)
from .textfiles import read_utf8

__all__ = ["FORMATS", "PLAIN_CATEGORIES", "POSITION_SELECTORS", "CadenceSettings",
           "ConfigDeprecationWarning", "ConfigError", "MetricSettings", "MonitorConfig", "OutputSettings",
           "ProbeSettings"]

log = logging.getLogger(__name__)

#: Settings that belong to one process (where it writes, what it serves, which device): a stored
#: run's configuration is rebuilt without them (:meth:`MonitorConfig.stored_settings`).
PER_PROCESS = ("db_path", "run_name", "device", "show_progress", "prometheus_port", "prometheus_host",
               "pushgateway_url", "keep_pushed", "prometheus_sd_dir", "fail_fast", "notify")


class ConfigDeprecationWarning(DeprecationWarning):
    """An old spelling of a setting that still loads (the message gives the new one)."""


@dataclass
class _Fields:
    """MonitorConfig's fields (the class below adds the flat-key shim to the generated ``__init__``)."""

    #: {hook: source} (a module name such as "model.layers.12" → a local sae-lens directory,
    #: "release:sae_id" on the hub, or an SAE object), or a list of sources whose hooks come from
    #: the SAEs' ``cfg.metadata.hook_name``.
    saes: Mapping[str, Any] | list[Any] = field(default_factory=dict)
    probes: ProbeSettings = field(default_factory=ProbeSettings)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    cadence: CadenceSettings = field(default_factory=CadenceSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    #: Direction monitors: {hook: source} with hook one of the SAE hooks and source a path
    #: (.safetensors, .pt/.pth, .npy, .json), a tensor/ndarray, a {name: vector} dict, or a
    #: list of these (see drift_monitor.probe.directions). Each direction's mean projection per
    #: probe category is logged as ``direction_projection:<name>:<category>``.
    directions: Mapping[str, Any] = field(default_factory=dict)
    device: str | None = setting(None, text(optional=True))  # None: the model's device
    sae_dtype: str | None = setting(None, choice(None, "float32", "bfloat16", "float16"))  # None: the SAE's
    #: Memory budget of one chunk of SAE codes ([tokens, d_sae] float32); bounds peak memory.
    sae_chunk_mb: float = setting(64, number(0, lo_open=True))
    #: Stop the forward after the deepest hooked layer. "auto" disables it for sharded models.
    early_stop: bool | str = setting("auto", choice(True, False, "auto"))
    baseline_cache_dir: str | None = setting(None, text(optional=True))  # None: ~/.cache/drift_monitor/baselines
    fail_fast: bool = setting(False, boolean)

    def __post_init__(self) -> None:
        """Declared so that the generated ``__init__`` calls MonitorConfig's (which validates)."""


class MonitorConfig(_Fields):
    """Settings of a :class:`~drift_monitor.monitor.DriftMonitor` and the callback::

        MonitorConfig(saes={"model.layers.12": "sae_dir"}, probes="probes.jsonl",
                      cadence={"every_n_steps": 100}, outputs={"db_path": "drift.duckdb"})

    A section may be given as its dataclass or as a mapping of its fields.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **nest(kwargs, warn_stacklevel=3))

    def __post_init__(self) -> None:
        if not isinstance(self.probes, (ProbeSettings, Mapping)):  # the shorthand probes="file.jsonl"
            self.probes = ProbeSettings(source=self.probes)
        for name, cls in SECTIONS.items():
            setattr(self, name, cls.coerce(getattr(self, name)))
        self.validate()

    def __getattr__(self, name: str) -> Any:
        """Old flat reads (``cfg.every_n_steps``) still work, with a deprecation warning."""
        if name.startswith("_") or name not in FLAT_KEYS or "cadence" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!s} has no setting {name!r}")
        section, attr = FLAT_KEYS[name]
        warnings.warn(f"MonitorConfig.{name} is deprecated: read MonitorConfig.{section}.{attr}",
                      ConfigDeprecationWarning, stacklevel=2)
        return getattr(getattr(self, section), attr)

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
        if not isinstance(self.directions, Mapping) or not all(isinstance(h, str) and h for h in self.directions):
            raise ConfigError("directions must be a dict {hook: source}, e.g. "
                              "{'model.layers.12': 'refusal_dir.safetensors'}")
        validate_fields(self, "")

    def sae_items(self) -> list[tuple[str | None, Any]]:
        """(hook or None, source) pairs; None means "take the hook from the SAE's metadata"."""
        if isinstance(self.saes, Mapping):
            return [(k or None, v) for k, v in self.saes.items()]
        return [(None, s) for s in self.saes]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings in sections (SAE objects and ProbeSets are replaced by a description)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "saes":  # a list stays a list (hooks from the SAEs' metadata); a None key is ""
                v = [_describe(s) for _, s in self.sae_items()] if not isinstance(v, Mapping) else \
                    {(h or ""): _describe(s) for h, s in self.sae_items()}
            elif f.name == "directions":  # paths stay strings; in-memory tensors are described
                v = {h: [_describe(x) for x in src] if isinstance(src, (list, tuple)) else _describe(src)
                     for h, src in v.items()}
            elif f.name in SECTIONS:
                v = {sf.name: _jsonable(getattr(v, sf.name)) for sf in dataclasses.fields(v)}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MonitorConfig:
        """From a mapping in sections (old flat keys load, with a deprecation warning)."""
        return cls(**nest(data, warn_stacklevel=3))

    @classmethod
    def stored_settings(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """The settings of a stored ``to_dict()`` (a run's ``config_json``) that can be rebuilt, flat.

        In-memory objects were stored as descriptions (``"<ProbeSet default>"``) and are dropped,
        as are settings this version does not know and the ones that belong to one process
        (where it writes, what it serves). What is left reproduces the run's numbers. Runs stored
        before the sections (flat) and after read the same.
        """
        out: dict[str, Any] = {}
        for k, v in flatten(data, strict=False).items():
            if k in PER_PROCESS or _is_description(v):
                continue
            if k == "saes":
                v = {h: s for h, s in v.items() if not _is_description(s)} if isinstance(v, Mapping) else \
                    [s for s in v if not _is_description(s)]
                if not v:
                    continue
            out[k] = v
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> MonitorConfig:
        """Load from a ``.yaml``/``.yml`` or ``.json`` file."""
        return cls(**nest(cls.read_file(path)))

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """The settings in a ``.yaml``/``.yml`` or ``.json`` file, flat and checked for unknown keys
        but not yet validated as a whole (``drift-monitor scan --config`` adds the SAEs from its
        flags). Flat keys in the file give a deprecation warning naming the file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text_ = read_utf8(path, ConfigError, "save the config as UTF-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text_)
            except yaml.YAMLError as e:
                raise ConfigError(invalid_yaml(str(path), e)) from None
        else:
            try:
                data = json.loads(text_)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        flat_used = sorted(k for k in data if k in FLAT_KEYS and k not in SECTIONS)
        if flat_used:
            _warn_flat(flat_used, f"{path}: ", stacklevel=3)
        return flatten(data)


# ---------------------------------------------------------------------------------- flat <-> sections
_TOP = {f.name for f in dataclasses.fields(_Fields)} - set(SECTIONS)


def flatten(data: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """Sectioned or flat settings → one flat mapping (``probes`` = the probe source). Unknown keys
    raise naming the closest known one; with ``strict=False`` (a stored run) they are dropped."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k in SECTIONS and (isinstance(v, Mapping) or isinstance(v, SECTIONS[k])):
            items = _section_items(v)
            if strict:
                check_known(dict(items), {f.name for f in dataclasses.fields(SECTIONS[k])}, f"the {k} section")
            for sk, sv in items:
                flat = "probes" if (k, sk) == ("probes", "source") else sk
                if flat in FLAT_KEYS:
                    out[flat] = sv
        elif k in _TOP or k in FLAT_KEYS:
            out[k] = v
        elif strict:
            check_known({k: v}, _TOP | set(FLAT_KEYS) | set(SECTIONS), "MonitorConfig")
    return out


def nest(data: Mapping[str, Any], *, warn_stacklevel: int | None = None) -> dict[str, Any]:
    """Flat or mixed settings → MonitorConfig's keyword arguments in sections. Flat keys warn (with
    ``warn_stacklevel``) unless they come from :func:`flatten` (our own round trip)."""
    out: dict[str, Any] = {}
    flat_used: list[str] = []
    for k, v in data.items():
        if k in SECTIONS and (isinstance(v, Mapping) or isinstance(v, SECTIONS[k])):
            section = out.setdefault(k, {})
            section.update(_section_items(v))
        elif k == "probes":  # the shorthand for probes.source
            out.setdefault("probes", {})["source"] = v
        elif k in FLAT_KEYS:
            sec, attr = FLAT_KEYS[k]
            out.setdefault(sec, {})[attr] = v
            flat_used.append(k)
        elif k in _TOP:
            out[k] = v
        else:
            check_known({k: v}, _TOP | set(FLAT_KEYS) | set(SECTIONS), "MonitorConfig")
    if flat_used and warn_stacklevel is not None:
        _warn_flat(flat_used, "", stacklevel=warn_stacklevel + 1)
    return out


def _section_items(v: Any) -> list[tuple[str, Any]]:
    """A section's (field, value) pairs, from the dataclass (no deep copy) or a mapping."""
    if isinstance(v, Mapping):
        return list(v.items())
    return [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v)]


def _warn_flat(keys: list[str], where: str, stacklevel: int) -> None:
    spelled = ", ".join(f"{k} → {FLAT_KEYS[k][0]}.{FLAT_KEYS[k][1]}" for k in keys)
    warnings.warn(f"{where}flat MonitorConfig settings are deprecated; use sections ({spelled})",
                  ConfigDeprecationWarning, stacklevel=stacklevel)


def _is_description(v: Any) -> bool:
    """True for what ``to_dict`` wrote in place of an in-memory object (``"<SAE d_in=...>"``)."""
    return isinstance(v, str) and v.startswith("<") and v.endswith(">")


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return dict(v)
    if hasattr(v, "to_dict") and not isinstance(v, type):  # e.g. a webhook target: its templates, no secret
        return v.to_dict()
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v if v is None or isinstance(v, (str, int, float, bool, list)) else _describe(v)


def _describe(obj: Any) -> Any:
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    name = getattr(obj, "name", None)
    return f"<{type(obj).__name__}{' ' + str(name) if name else ''}>"
