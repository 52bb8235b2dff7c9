"""Pre-flight results read back: a stored row as a :class:`PreflightResult`, and the results that
belong to a run, found through the training data the run names.

Why matching and not a ``run_id`` column: a pre-flight check reads a dataset before any run
exists (and one check serves every run on that data), so a run finds its results by the data
it trains on: its ``outputs.train_data`` setting (kept in ``runs.config_json``). Where that path
can be read here, its bytes decide (the results whose ``data_hash`` equals the file's: a file
edited since its check no longer matches it); where it cannot (the dashboard runs on another
machine than training did), the dataset path the check recorded is compared as text.

Torch-free (the dashboard imports it): the hash comes from :mod:`drift_monitor.preflight.datahash`.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from drift_monitor.preflight.datahash import data_hash
from drift_monitor.preflight.result import PreflightResult

from .reader import StoreReader


def result_of(row: Mapping[str, Any] | pd.Series) -> PreflightResult:
    """The :class:`PreflightResult` a row of :meth:`StoreReader.preflights` was written from
    (``created_at`` comes back in UTC: ``...+00:00``)."""
    created = row["created_at"]
    if isinstance(created, pd.Timestamp):
        created = created.to_pydatetime()
    if hasattr(created, "isoformat"):  # a naive UTC TIMESTAMP
        created = created.isoformat(timespec="seconds") + "+00:00"
    own = row["own_refusal_share"]
    return PreflightResult.from_dict({
        "preflight_id": str(row["preflight_id"]), "created_at": str(created), "model": _text(row["model"]),
        "model_fingerprint": _text(row["model_fingerprint"]), "dataset": _text(row["dataset"]),
        "data_hash": _text(row["data_hash"]), "n_examples": int(row["n_examples"]), "mode": row["mode"],
        "layers": json.loads(row["layers"]), "score": float(row["score"]),
        "per_layer": json.loads(row["per_layer_json"]), "data_refusal_share": float(row["data_refusal_share"]),
        "own_refusal_share": None if own is None or (isinstance(own, float) and math.isnan(own)) else float(own),
        "raises": json.loads(row["raises_json"]), "erodes": json.loads(row["erodes_json"]),
        "settings": json.loads(row["settings_json"] or "{}"),
        **_sae_signals(row),
    })


def _sae_signals(row: Mapping[str, Any] | pd.Series) -> dict[str, Any]:
    """The SAE signals a row keeps in ``sae_json`` (none: a check without SAEs)."""
    raw = row.get("sae_json")
    return json.loads(raw) if isinstance(raw, str) and raw else {}


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def train_data_of(config_json: str | Mapping[str, Any] | None) -> str | None:
    """The ``outputs.train_data`` a run was started with (its ``config_json``, sectioned or in
    the old flat layout); None when it names none or the JSON cannot be read."""
    if config_json is None or (isinstance(config_json, float) and math.isnan(config_json)):
        return None
    try:
        cfg = json.loads(config_json) if isinstance(config_json, str) else dict(config_json)
    except (TypeError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    outputs = cfg.get("outputs")
    value = outputs.get("train_data") if isinstance(outputs, dict) else None
    value = value if value is not None else cfg.get("train_data")
    return str(value) if isinstance(value, (str, os.PathLike)) and str(value).strip() else None


@dataclass(frozen=True)
class RunPreflights:
    """The pre-flight results of a run's training data. ``by``: how they were found
    (``data_hash``: the file was read here and its hash matched; ``dataset``: it could not be
    read, the recorded dataset path matched); ``rows``: :meth:`StoreReader.preflights` rows."""

    train_data: str
    by: Literal["data_hash", "dataset"]
    data_hash: str | None
    rows: pd.DataFrame


def run_preflights(reader: StoreReader, config_json: str | Mapping[str, Any] | None) -> RunPreflights | None:
    """The results matching the run whose ``config_json`` this is (module docstring); None when
    the run names no ``outputs.train_data``."""
    train_data = train_data_of(config_json)
    if train_data is None:
        return None
    dhash = file_hash(train_data)
    if dhash is not None:
        return RunPreflights(train_data, "data_hash", dhash, reader.preflights(data_hash=dhash))
    every = reader.preflights()
    want = _norm(train_data)
    rows = every[[_norm(d) == want for d in every["dataset"]]] if len(every) else every
    return RunPreflights(train_data, "dataset", None, rows.reset_index(drop=True))


def _norm(path: Any) -> str:
    """A dataset path compared as text: ``~`` expanded, ``./`` and doubled separators gone."""
    return os.path.normpath(os.path.expanduser(str(path))) if path is not None else ""


#: {path: (what its files' stats were, their hash)}: a live dashboard asks every few seconds,
#: and hashing a dataset reads all of it, so it is hashed again only when a file changes.
_HASHES: dict[str, tuple[tuple, str]] = {}
_HASHES_LOCK = threading.Lock()


def file_hash(path: str | os.PathLike[str]) -> str | None:
    """:func:`~drift_monitor.preflight.datahash.data_hash` of the file or folder at ``path``, or
    None where it does not exist or cannot be read."""
    p = Path(path).expanduser()
    try:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        key = tuple((str(f), st.st_mtime_ns, st.st_size) for f in files for st in (f.stat(),))
    except OSError:
        return None
    with _HASHES_LOCK:
        held = _HASHES.get(str(p))
    if held is not None and held[0] == key:
        return held[1]
    try:
        digest = data_hash([p])
    except OSError:
        return None
    with _HASHES_LOCK:
        _HASHES[str(p)] = (key, digest)
    return digest
