"""Arrow tables (and alert rows) built from the records a write stores: the writer's hot path.

Why a module of its own: this is the part of a write that runs on the training process's time,
so it is written for speed and tested for exactness apart from any database. Feature tables are
built straight from the NumPy arrays of a :class:`~drift_monitor.records.Snapshot`, with no
Python loop over features: output columns are allocated once and filled slice by slice, and
repeated strings (run id, hook, category) are dictionary-encoded. Every builder validates the
shapes it reads, so a malformed snapshot raises ``ValueError`` before anything is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from drift_monitor.preflight.result import PreflightResult
from drift_monitor.records import (
    FEATURE_COLUMNS,
    REFUSAL_COLUMNS,
    Alert,
    HookResult,
    Snapshot,
    VerifyResult,
    feature_label,
)

from .errors import LabelError
from .schema import PREFLIGHT_COLUMNS, VERIFICATION_COLUMNS


def to_timestamp(epoch_s: float | None) -> dt.datetime | None:
    """Epoch seconds -> naive UTC datetime (the ``TIMESTAMP`` columns hold UTC)."""
    if epoch_s is None or (isinstance(epoch_s, float) and math.isnan(epoch_s)):
        return None
    return dt.datetime.fromtimestamp(float(epoch_s), tz=dt.UTC).replace(tzinfo=None)


def _float(v: Any) -> float:
    """A metric or alert value as a float: ``None`` (not computed) becomes NaN."""
    return math.nan if v is None else float(v)


def _code_dtype(n_values: int) -> type:
    return np.int8 if n_values <= 127 else np.int32


def _const_strings(value: str, n: int) -> pa.DictionaryArray:
    """A column of ``n`` copies of one string, as a dictionary array (no n Python strings)."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([value], pa.string()))


def _coded_strings(codes: np.ndarray, values: Sequence[str]) -> pa.DictionaryArray:
    codes = codes.astype(_code_dtype(len(values)), copy=False)
    return pa.DictionaryArray.from_arrays(pa.array(codes), pa.array(list(values), pa.string()))


def _checked(arr: Any, n: int, what: str, dtype: Any) -> np.ndarray:
    a = np.asarray(arr, dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{what}: expected shape ({n},), got {a.shape}")
    return a


@dataclass
class _Block:
    """The rows one (hook, category) contributes: ``idx`` None means every feature."""

    hook_code: int
    cat_code: int
    stats: Any
    d: int
    idx: np.ndarray | None
    where: str

    @property
    def n(self) -> int:
        return self.d if self.idx is None else int(self.idx.size)


def _feature_blocks(snapshot: Snapshot, categories: list[str], store_dead: bool) -> list[_Block]:
    blocks = []
    for h_i, (hook, result) in enumerate(snapshot.hooks.items()):
        for category, stats in result.features.items():
            d, where = result.d_sae, f"hook {hook!r} category {category!r}"
            idx = None
            if not store_dead:
                count = _checked(stats.count, d, f"{where} count", np.int64)
                base = _checked(stats.base_count, d, f"{where} base_count", np.int64)
                alive = np.flatnonzero((count > 0) | (base > 0))
                idx = None if alive.size == d else alive
            blocks.append(_Block(h_i, categories.index(category), stats, d, idx, where))
    return blocks


def _fill(out: np.ndarray, blk: _Block, src: Any, what: str) -> None:
    """Copy one block's column into its slice of the output (one copy, no temporaries)."""
    arr = _checked(src, blk.d, f"{blk.where} {what}", out.dtype)
    if blk.idx is None:
        out[:] = arr
    else:
        # mode="clip": idx comes from flatnonzero, so it is always in range, and "raise"
        # makes NumPy buffer the whole output before copying it (a third slower here).
        np.take(arr, blk.idx, out=out, mode="clip")


def build_feature_stats_table(
    snapshot: Snapshot, run_id: str, store_dead_features: bool = False
) -> pa.Table:
    """The ``feature_stats`` rows of a snapshot, one Arrow table in table column order.

    By default a feature is kept for a category only if it fired in the tuned or the base model
    (``count > 0 or base_count > 0``); a missing row therefore means "never fired in either
    model", which keeps a 131k-feature SAE's table to the features that matter. Output columns
    are allocated once and filled slice by slice: this runs on the training process's time.
    """
    hooks = list(snapshot.hooks)
    categories: list[str] = sorted({c for h in snapshot.hooks.values() for c in h.features})
    blocks = _feature_blocks(snapshot, categories, store_dead_features)
    n = sum(b.n for b in blocks)
    cols: dict[str, np.ndarray] = {c: np.empty(n, np.float64) for c in FEATURE_COLUMNS}
    cols["count"], cols["base_count"] = np.empty(n, np.int64), np.empty(n, np.int64)
    feature = np.empty(n, np.int32)
    hook_codes = np.empty(n, _code_dtype(len(hooks)))
    cat_codes = np.empty(n, _code_dtype(len(categories)))
    pos = 0
    for blk in blocks:
        sl = slice(pos, pos + blk.n)
        pos += blk.n
        hook_codes[sl], cat_codes[sl] = blk.hook_code, blk.cat_code
        feature[sl] = np.arange(blk.d) if blk.idx is None else blk.idx
        for col in cols:
            _fill(cols[col][sl], blk, getattr(blk.stats, col), col)
    return pa.table(
        {
            "run_id": _const_strings(run_id, n),
            "step": pa.array(np.full(n, snapshot.step, np.int64)),
            "hook": _coded_strings(hook_codes, hooks),
            "category": _coded_strings(cat_codes, categories),
            "feature": pa.array(feature),
            **{c: pa.array(cols[c]) for c in FEATURE_COLUMNS},
            "count": pa.array(cols["count"]),
            "base_count": pa.array(cols["base_count"]),
        }
    )


def metrics_table(snapshot: Snapshot, run_id: str) -> pa.Table:
    """Long-format metrics; ``None`` becomes NaN so the column stays numeric."""
    rows = [(hook, name, _float(v)) for hook, r in snapshot.hooks.items() for name, v in r.metrics.items()]
    n = len(rows)
    return pa.table(
        {
            "run_id": pa.array([run_id] * n, pa.string()),
            "step": pa.array([snapshot.step] * n, pa.int64()),
            "hook": pa.array([r[0] for r in rows], pa.string()),
            "name": pa.array([r[1] for r in rows], pa.string()),
            "value": pa.array(np.array([r[2] for r in rows], np.float64)),
        }
    )



def _top_order(score: np.ndarray, top_n: int) -> np.ndarray:
    """Ids of the ``top_n`` largest non-NaN scores, best first, ties to the lower id.

    A partition then a sort of the candidates only: a full argsort of 131k scores costs more
    than the rest of building the refusal table.
    """
    scored = np.flatnonzero(~np.isnan(score))
    neg = -score[scored]
    if 0 < top_n < scored.size:
        kth = np.partition(neg, top_n - 1)[top_n - 1]
        keep = neg <= kth  # every tie of the cut-off value stays a candidate
        scored, neg = scored[keep], neg[keep]
    elif top_n <= 0:
        return np.zeros(0, np.int64)
    return scored[np.lexsort((scored, neg))][:top_n]


def _rank_of(score: np.ndarray, feature: int) -> int:
    """1-based rank of one feature among all non-NaN scores (-1 if it has none)."""
    s = score[feature]
    if np.isnan(s):
        return -1
    ids = np.arange(score.size)
    return 1 + int(np.count_nonzero(score > s)) + int(np.count_nonzero((score == s) & (ids < feature)))


def _refusal_rows(result: HookResult, top_n: int) -> dict[str, np.ndarray]:
    """The refusal rows kept for one hook: top ``top_n`` by score (non-NaN) plus every emerging.

    ``rank`` is the 1-based position by ``refusal_score`` among all scored features of the hook
    (-1 = unscored, stored as NULL), so ranks mean the same whatever the cut.
    """
    ref, d = result.refusal, result.d_sae
    assert ref is not None
    score = _checked(ref.refusal_score, d, f"hook {result.hook!r} refusal_score", np.float64)
    top = _top_order(score, top_n)
    emerging = np.asarray(list(ref.emerging), dtype=np.int64)
    if emerging.size and (emerging.min() < 0 or emerging.max() >= d):
        raise ValueError(f"hook {result.hook!r}: emerging feature ids must lie in [0, {d})")
    rank = dict(zip(top.tolist(), range(1, top.size + 1)))
    for e in emerging.tolist():
        if e not in rank:
            rank[e] = _rank_of(score, e)
    keep = np.array(sorted(rank), dtype=np.int64)
    out = {
        "feature": keep,
        "rank": np.array([rank[f] for f in keep.tolist()], np.int64),
        "emerging": np.isin(keep, emerging),
    }
    for col in REFUSAL_COLUMNS:
        out[col] = _checked(getattr(ref, col), d, f"hook {result.hook!r} {col}", np.float64)[keep]
    return out


def refusal_table(snapshot: Snapshot, run_id: str, top_n: int) -> pa.Table:
    parts: list[tuple[str, dict[str, np.ndarray]]] = [
        (hook, _refusal_rows(r, top_n)) for hook, r in snapshot.hooks.items() if r.refusal is not None
    ]
    if not parts:
        return _empty_table("refusal_features")
    hooks = [h for h, _ in parts]
    sizes = [p["feature"].size for _, p in parts]
    col = {k: np.concatenate([p[k] for _, p in parts]) for k in parts[0][1]}
    n = int(sum(sizes))
    return pa.table(
        {
            "run_id": _const_strings(run_id, n),
            "step": pa.array(np.full(n, snapshot.step, np.int64)),
            "hook": _coded_strings(np.repeat(np.arange(len(hooks)), sizes), hooks),
            "feature": pa.array(col["feature"].astype(np.int32)),
            **{c: pa.array(col[c]) for c in REFUSAL_COLUMNS},
            "rank": pa.array(col["rank"].astype(np.int32), mask=col["rank"] < 0),
            "emerging": pa.array(col["emerging"].astype(bool)),
        }
    )


def residual_table(snapshot: Snapshot, run_id: str) -> pa.Table:
    """One row per direction of new SAE error (``HookResult.residual``), every hook."""
    rows = [(h, d) for h, r in snapshot.hooks.items() for d in r.residual]
    cols = {
        "run_id": pa.array([run_id] * len(rows), pa.string()),
        "step": pa.array([int(snapshot.step)] * len(rows), pa.int64()),
        "hook": pa.array([h for h, _ in rows], pa.string()),
        "rank": pa.array([d.rank for _, d in rows], pa.int32()),
        "share": pa.array([_float(d.share) for _, d in rows], pa.float64()),
        "variance": pa.array([_float(d.variance) for _, d in rows], pa.float64()),
        "nearest_feature": pa.array([d.nearest_feature for _, d in rows], pa.int32()),
        "decoder_cos": pa.array([_float(d.decoder_cos) for _, d in rows], pa.float64()),
        "projections_json": pa.array([json.dumps(d.projections) for _, d in rows], pa.string()),
        "top_tokens_json": pa.array([json.dumps(d.top_tokens) for _, d in rows], pa.string()),
        "bottom_tokens_json": pa.array([json.dumps(d.bottom_tokens) for _, d in rows], pa.string()),
        "vector": pa.array([d.vector for _, d in rows], pa.list_(pa.float32())),
    }
    return pa.table(cols)


def snapshots_table(
    snapshot: Snapshot, run_id: str, feature_stats: pa.Table, metrics: pa.Table, refusal: pa.Table
) -> pa.Table:
    """One ``snapshots`` row per hook, with the row counts written (a completeness check)."""
    hooks = list(snapshot.hooks)

    def counts(table: pa.Table) -> list[int]:
        by_hook = _rows_per_hook(table)
        return [by_hook.get(h, 0) for h in hooks]

    n = len(hooks)
    return pa.table(
        {
            "run_id": pa.array([run_id] * n, pa.string()),
            "step": pa.array([snapshot.step] * n, pa.int64()),
            "hook": pa.array(hooks, pa.string()),
            "created_at": pa.array([to_timestamp(snapshot.created_at)] * n, pa.timestamp("us")),
            "n_tokens": pa.array([int(snapshot.n_tokens)] * n, pa.int64()),
            "duration_s": pa.array([float(snapshot.duration_s)] * n, pa.float64()),
            "probe_hash": pa.array([snapshot.probe_hash] * n, pa.string()),
            "is_base": pa.array([bool(snapshot.is_base)] * n, pa.bool_()),
            "d_sae": pa.array([int(snapshot.hooks[h].d_sae) for h in hooks], pa.int32()),
            "n_feature_rows": pa.array(counts(feature_stats), pa.int64()),
            "n_metrics": pa.array(counts(metrics), pa.int32()),
            "n_refusal_rows": pa.array(counts(refusal), pa.int32()),
        }
    )


def _rows_per_hook(table: pa.Table) -> dict[str, int]:
    """Row count per hook; dictionary-encoded columns are counted on their codes (no cast)."""
    out: dict[str, int] = {}
    for chunk in table.column("hook").chunks:
        if pa.types.is_dictionary(chunk.type):
            codes = chunk.indices.to_numpy(zero_copy_only=False)
            for value, n in zip(chunk.dictionary.to_pylist(), np.bincount(codes, minlength=len(chunk.dictionary))):
                out[value] = out.get(value, 0) + int(n)
        else:
            for item in pc.value_counts(chunk).to_pylist():
                out[item["values"]] = out.get(item["values"], 0) + int(item["counts"])
    return out


_EMPTY_TYPES: dict[str, dict[str, pa.DataType]] = {
    "refusal_features": {
        "run_id": pa.string(), "step": pa.int64(), "hook": pa.string(), "feature": pa.int32(),
        **{c: pa.float64() for c in REFUSAL_COLUMNS}, "rank": pa.int32(), "emerging": pa.bool_(),
    },
}


def _empty_table(name: str) -> pa.Table:
    return pa.schema(list(_EMPTY_TYPES[name].items())).empty_table()


def alert_id(run_id: str, alert: Alert) -> str:
    """Deterministic id of an alert: re-writing a step re-raises the *same* alert, not a copy."""
    key = "\x1f".join((run_id, alert.hook, alert.rule, str(int(alert.step)), alert.status))
    return hashlib.sha1(key.encode()).hexdigest()[:20]


def alert_payload(run_id: str, alert: Alert) -> dict[str, Any]:
    if alert.status not in ("active", "resolved"):
        raise ValueError(f"alert status must be 'active' or 'resolved', got {alert.status!r}")
    return {
        "alert_id": alert_id(run_id, alert), "run_id": run_id, "step": int(alert.step), "hook": alert.hook,
        "rule": alert.rule, "severity": alert.severity, "message": alert.message, "value": _float(alert.value),
        "threshold": _float(alert.threshold), "status": alert.status, "created_at": float(alert.created_at),
    }


def verification_table(res: VerifyResult) -> pa.Table:
    """A ``drift-monitor verify`` result, one row per condition; ``draw`` numbers repeats of one
    condition (the random draws), and the whole result's summary rides along as JSON."""
    summary = json.dumps({
        "features": res.features, "steer_scales": res.steer_scales, "duration_s": res.duration_s,
        "ablation_relative_drop": _float(res.ablation_relative_drop),
        "random_relative_drop": _float(res.random_relative_drop), "steering_gain": _float(res.steering_gain),
        "verdict": res.verdict(), "settings": {k: (list(v) if isinstance(v, tuple) else v)
                                               for k, v in vars(res.settings).items()},
        "hooks": res.hooks, "site_features": res.site_features, "direction_layers": res.direction_layers,
        "direction_relative_drop": _float(res.direction_relative_drop),
        "random_direction_relative_drop": _float(res.random_direction_relative_drop),
    }, default=str)
    draws: dict[str, int] = {}
    rows: dict[str, list[Any]] = {c: [] for c in VERIFICATION_COLUMNS}
    for c in res.conditions:
        draw = draws.get(c.condition, 0)
        draws[c.condition] = draw + 1
        values = (res.verify_id, res.run_id, res.step, res.hook, to_timestamp(res.created_at), c.condition, draw,
                  feature_label(c), len(c.features), c.alpha, c.seed, c.harmful_refusal_rate,
                  c.harmless_refusal_rate, c.kl_harmless, c.n_harmful, c.n_harmless, json.dumps(c.examples), summary)
        for col, v in zip(VERIFICATION_COLUMNS, values):
            rows[col].append(v)
    types = {"step": pa.int64(), "created_at": pa.timestamp("us"), "draw": pa.int32(), "n_features": pa.int32(),
             "alpha": pa.float64(), "seed": pa.int32(), "harmful_refusal_rate": pa.float64(),
             "harmless_refusal_rate": pa.float64(), "kl_harmless": pa.float64(), "n_harmful": pa.int32(),
             "n_harmless": pa.int32()}
    return pa.table({c: pa.array(v, types.get(c, pa.string())) for c, v in rows.items()})


def _utc(iso: str) -> dt.datetime:
    """An ISO 8601 time (a pre-flight's ``created_at``) as the naive UTC datetime a ``TIMESTAMP``
    column holds; one without an offset is taken as UTC. Why not keep the string: results are
    listed newest first, and strings with different offsets do not sort by time."""
    try:
        t = dt.datetime.fromisoformat(str(iso))
    except ValueError:
        raise ValueError(f"pre-flight created_at {iso!r} is not an ISO 8601 time") from None
    return t.astimezone(dt.UTC).replace(tzinfo=None) if t.tzinfo is not None else t


def preflight_table(res: PreflightResult) -> pa.Table:
    """A pre-flight result as its one ``preflight`` row: the scalars as columns (what the list
    and the run matching filter on), the per-layer scores, examples and settings as JSON (NaN
    kept as NaN: Python's JSON reads it back)."""
    d = res.to_dict()
    values = {
        "preflight_id": str(res.preflight_id), "created_at": _utc(res.created_at), "model": res.model,
        "model_fingerprint": res.model_fingerprint, "dataset": res.dataset, "data_hash": res.data_hash,
        "n_examples": int(res.n_examples), "mode": res.mode, "layers": json.dumps([int(i) for i in res.layers]),
        "score": _float(res.score), "per_layer_json": json.dumps(d["per_layer"]),
        "data_refusal_share": _float(res.data_refusal_share),
        "own_refusal_share": None if res.own_refusal_share is None else float(res.own_refusal_share),
        "raises_json": json.dumps(d["raises"]), "erodes_json": json.dumps(d["erodes"]),
        "settings_json": json.dumps(d["settings"], default=str),
        "sae_json": json.dumps(res.sae_dict()) if res.sae_features or res.feature_score is not None else None,
    }
    types = {"created_at": pa.timestamp("us"), "n_examples": pa.int64(), "score": pa.float64(),
             "data_refusal_share": pa.float64(), "own_refusal_share": pa.float64()}
    return pa.table({c: pa.array([values[c]], types.get(c, pa.string())) for c in PREFLIGHT_COLUMNS})


def labels_table(hook: str, labels: Mapping[int, str] | pd.DataFrame, source: str) -> pa.Table:
    """The ``feature_labels`` rows of ``{feature: label}`` or a DataFrame with ``feature`` and
    ``label`` columns (the last label of a repeated feature wins)."""
    if isinstance(labels, pd.DataFrame):
        missing = {"feature", "label"} - set(labels.columns)
        if missing:
            raise ValueError(f"labels DataFrame needs columns 'feature' and 'label'; missing {sorted(missing)}")
        df = labels[["feature", "label"]]
    else:
        df = pd.DataFrame({"feature": list(labels.keys()), "label": list(labels.values())})
    ids = [label_id(v, i, f"labels for hook {hook!r}") for i, v in enumerate(df["feature"].tolist(), 1)]
    df = pd.DataFrame({"feature": ids, "label": df["label"].tolist()}).drop_duplicates("feature", keep="last")
    n = len(df)
    return pa.table(
        {
            "hook": pa.array([hook] * n, pa.string()),
            "feature": pa.array(df["feature"].to_numpy(np.int64), pa.int32()),
            "label": pa.array(df["label"].astype(str).tolist(), pa.string()),
            "source": pa.array([source] * n, pa.string()),
        }
    )


#: Feature ids are stored as INTEGER: the bound of any SAE this store can label.
_MAX_FEATURE_ID = 2**31 - 1


def label_id(value: Any, row: int, where: str = "labels") -> int:
    """One label row's feature id as an int: an integer (or an integral float, or a string of
    digits, as CSV and JSON keys give it) in [0, 2**31). Anything else raises
    :class:`LabelError` naming the row: 9.9 is not feature 9, and 2**32 + 5 is not feature 5.
    The upper bound of the hook's own SAE (its d_sae) is checked when the labels are applied,
    against the snapshots stored for the hook (:func:`.ops._apply_labels`)."""
    fid: int | None = None
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        fid = int(value.strip())
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        fid = int(value)
    elif isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        fid = int(value)
    if fid is None or not 0 <= fid <= _MAX_FEATURE_ID:
        raise LabelError(f"{where}, row {row}: feature id {value!r} is not a feature index "
                         "(an integer from 0 to the SAE's d_sae - 1); fix or remove that row")
    return fid
