"""``drift-monitor verify`` from paths: the run, its SAEs, features and probes resolved, the models
loaded, :func:`~drift_monitor.offline.verify.verify_sites` run, and the table stored with the run.

Why apart from the check itself: the check takes models and tensors and is what a library user
calls; this module turns the names a command line gives (a store, a run, ``top:K``, a probe file)
into those, and says which one is wrong when one is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..records import VerifyResult, VerifySettings
from ..settings import MetricSettings
from .interventions import VerifyError
from .verify import Site, verify_sites

log = logging.getLogger(__name__)


@dataclass
class VerifyOptions:
    """What ``drift-monitor verify`` checks and where each input comes from, as the command line names them.

    ``model`` is the fine-tuned model, or with ``adapter`` the base the adapter loads onto (then
    the base conditions switch the adapter off). ``db`` + ``run``: where ``top:K``/``emerging``
    features come from and where the results go; the SAEs and probes default to the run's own
    config. ``direction_layers``: "all" (or None), "hooks" (the checked hooks' layers) or indices
    "0,5,10". The categories default to the monitor's (:class:`~drift_monitor.settings.MetricSettings`).
    """

    model: str
    saes: dict[str, str] | None = None  # {hook: source}; None: the run's SAEs
    features: str | Sequence[str] = "emerging"  # [HOOK:]IDS | top:K | emerging, one or several
    adapter: str | None = None
    base_model: str | None = None
    db: str | None = None
    run: str | None = None
    step: int | None = None  # None: the run's last step
    probes: str | None = None  # a JSONL file, "default" or "harmful"; None: the run's probes
    harmful_category: str = MetricSettings.harmful_category
    harmless_category: str = MetricSettings.harmless_category
    direction_layers: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    trust_remote_code: bool = False


def parse_feature_spec(spec: str) -> list[int] | tuple[str, int]:
    """``"12,345"`` -> [12, 345]; ``"top:K"`` -> ("top", K); ``"emerging"`` -> ("emerging", 0)."""
    spec = str(spec).strip()
    if spec == "emerging":
        return ("emerging", 0)
    if spec.startswith("top:"):
        try:
            k = int(spec[4:])
        except ValueError:
            k = 0
        if k < 1:
            raise VerifyError(f"--features {spec!r}: top:K needs a positive integer K, e.g. top:5")
        return ("top", k)
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise VerifyError(f"--features {spec!r}: give feature ids (12,345), top:K or emerging") from None
    if not ids:
        raise VerifyError("--features is empty: give feature ids (12,345), top:K or emerging")
    return ids


def features_from_store(reader: Any, run_id: str, hook: str, step: int, spec: tuple[str, int]) -> list[int]:
    """The run's refusal features at ``step``: emerging ones first (by rank), then by rank.

    ``top:K`` takes K of them (with a warning when fewer than K are emerging), ``emerging`` all
    the emerging ones.
    """
    df = reader.refusal_features(run_id, hook, steps=[step])
    if df.empty:
        raise VerifyError(f"run {run_id} has no refusal features stored for hook {hook!r} at step {step} "
                         "(they need harmful and harmless probes); give --features 12,345 instead")
    df = df.assign(emerging=df["emerging"].fillna(False).astype(bool)).sort_values(
        ["emerging", "rank"], ascending=[False, True], na_position="last")
    emerging = df[df["emerging"]]["feature"].astype(int).tolist()
    kind, k = spec
    if kind == "emerging":
        if not emerging:
            raise VerifyError(f"no emerging refusal features at step {step} of run {run_id}; use top:K")
        return emerging
    if len(emerging) < k:
        log.warning("only %d emerging refusal features at step %d; top:%d adds the next by refusal score",
                    len(emerging), step, k)
    return df["feature"].astype(int).tolist()[:k]


def _run_config(reader: Any, run_id: str) -> dict[str, Any]:
    runs = reader.runs()
    raw = runs[runs.run_id == run_id]["config_json"]
    try:
        return json.loads(raw.iloc[0]) if len(raw) and raw.iloc[0] else {}
    except (TypeError, ValueError):
        return {}


def _prompts(probes: str | None, run_cfg: dict[str, Any], harmful_cat: str,
             harmless_cat: str) -> tuple[list[str], list[str]]:
    from ..probe.probes import ProbeSet

    if probes in (None, ""):
        stored = run_cfg.get("probes")
        probes = stored if isinstance(stored, str) and (stored == "default" or Path(stored).is_file()) else "default"
    if probes == "harmful":  # the shorthand: the default set's harmful probes
        probes = "default"
    ps = ProbeSet.resolve(probes)
    harmful = [r.prompt for r in ps.records if r.category == harmful_cat]
    harmless = [r.prompt for r in ps.records if r.category == harmless_cat]
    if not harmful or not harmless:
        raise VerifyError(f"probe set {ps.name!r} has {len(harmful)} {harmful_cat!r} and {len(harmless)} "
                         f"{harmless_cat!r} probes; verify needs both (categories: {ps.categories})")
    return harmful, harmless


def _run_saes(run_cfg: dict[str, Any], reader: Any, run_id: str | None) -> dict[str, str]:
    """The run's SAEs as {hook: source}. A run configured with a list of SAE folders stored the
    list (each SAE names its hook in its metadata); with one SAE, its hook is the run's one probe
    hook in the store."""
    stored = run_cfg.get("saes") or {}
    if isinstance(stored, dict):
        return {k: v for k, v in stored.items() if isinstance(v, str)}
    sources = [v for v in stored if isinstance(v, str)]
    named = {h: src for src in sources if (h := _folder_hook(src))}
    if len(sources) > 1 and len(named) == len(sources):
        return named
    if len(sources) == 1 and reader is not None:
        from ..records import is_adapter_hook

        hooks = [h for h in reader.hooks(run_id) if not is_adapter_hook(h)]
        if len(hooks) == 1:
            return {hooks[0]: sources[0]}
    return {}


def _folder_hook(source: str) -> str | None:
    """The hook an SAE folder's cfg.json names (sae-lens ``metadata.hook_name``), read without loading it."""
    try:
        cfg = json.loads((Path(source) / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    name = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name")
    return name if isinstance(name, str) and name else None


def parse_site_specs(specs: Sequence[str] | str, hooks: Sequence[str]) -> dict[str, list[int] | tuple[str, int]]:
    """``--features`` values -> {hook: spec} over the SAEs' ``hooks``.

    A bare spec (``12,345``, ``top:K``, ``emerging``) applies to every hook (ids only when there
    is one hook); ``HOOK:SPEC`` (repeatable) to that hook alone, and when only such specs are
    given, only their hooks are checked.
    """
    specs = [specs] if isinstance(specs, str) else list(specs) or ["emerging"]
    bare: list[int] | tuple[str, int] | None = None
    per_hook: dict[str, list[int] | tuple[str, int]] = {}
    for raw in specs:
        head, sep, rest = str(raw).strip().partition(":")
        if sep and head != "top":
            if head not in hooks:
                raise VerifyError(f"--features {raw!r}: no SAE at hook {head!r} (the SAEs are at {list(hooks)})")
            if head in per_hook:
                raise VerifyError(f"--features names hook {head!r} twice")
            per_hook[head] = parse_feature_spec(rest)
        elif bare is not None:
            raise VerifyError("--features: give one spec for every hook, or HOOK:SPEC per hook")
        else:
            bare = parse_feature_spec(raw)
    if bare is None:
        return per_hook
    if isinstance(bare, list) and len(hooks) - len(per_hook) > 1:
        raise VerifyError(f"--features {','.join(map(str, bare))}: feature ids belong to one SAE, and there are "
                          f"{len(hooks)} ({list(hooks)}); write HOOK:IDS, e.g. --features {hooks[0]}:12,345")
    return {h: per_hook.get(h, bare) for h in hooks}


def run_verify(options: VerifyOptions, settings: VerifySettings | None = None, *,
               progress: bool = True) -> VerifyResult:
    """``drift-monitor verify``: load everything ``options`` names, run the check, store the table.

    Every input is resolved and checked (the run, its SAEs, features, probes) before a model is
    loaded: a wrong name fails in a second, not after minutes of loading.
    """
    from ..probe.saes import load_sae
    from .loading import load_pair

    o = options
    s = _with_layer_indices(settings or VerifySettings(), o.direction_layers)
    reader, run_id, run_cfg = _open_run(o)
    saes = o.saes or _run_saes(run_cfg, reader, run_id)
    if not saes:
        raise VerifyError("no SAE to check: give --sae HOOK=SOURCE (repeatable), or --db/--run of a run whose "
                          "SAEs' hooks are known")
    specs = parse_site_specs(o.features, list(saes))
    step = _last_step(reader, run_id, specs) if reader is not None and o.step is None else o.step
    feats = _site_features(reader, run_id, step, specs)
    harmful, harmless = _prompts(o.probes, run_cfg, o.harmful_category, o.harmless_category)

    tok, m, base, base_ctx = load_pair(o.model, adapter=o.adapter, base_model=o.base_model, device=o.device,
                                       dtype=o.dtype, trust_remote_code=o.trust_remote_code)
    if base is None and base_ctx is None:
        log.warning("no --adapter or --base-model: the base and steered_base conditions are skipped")
    if o.direction_layers == "hooks":
        from .directions_ablation import hook_layer

        s = replace(s, direction_layers=tuple(hook_layer(m, h) for h in feats))
    sites = [Site(hook, load_sae(saes[hook], device=o.device, dtype=o.dtype), tuple(f)) for hook, f in feats.items()]
    res = verify_sites(m, tok, sites, harmful, harmless, base_model=base, base_context=base_ctx, settings=s,
                       progress=progress, run_id=run_id, step=step)
    if o.db is not None:
        _store_result(o.db, reader, run_id, res)
    return res


def _with_layer_indices(s: VerifySettings, direction_layers: str | None) -> VerifySettings:
    """``--direction-layers 0,5,10`` into the settings; "all" and "hooks" are resolved later."""
    if direction_layers in (None, "", "all", "hooks"):
        return s
    try:
        return replace(s, direction_layers=tuple(int(i) for i in str(direction_layers).split(",") if i.strip()))
    except ValueError:
        raise VerifyError(f"--direction-layers {direction_layers!r}: give all, hooks or layer indices "
                          "(0,5,10)") from None


def _open_run(o: VerifyOptions) -> tuple[Any, str | None, dict[str, Any]]:
    """(reader, run id, run config) of ``--db``/``--run``, or (None, None, {}) without ``--db``,
    when no feature spec needs a run."""
    if o.db is None:
        for raw in [o.features] if isinstance(o.features, str) else list(o.features) or ["emerging"]:
            head, sep, rest = str(raw).strip().partition(":")
            if isinstance(parse_feature_spec(rest if sep and head != "top" else raw), tuple):
                raise VerifyError(f"--features {raw}: reading features from a run needs --db and --run")
        return None, None, {}
    if o.run is None:
        raise VerifyError("--db needs --run: the run whose features are checked and to which results belong")
    from ..store import StoreReader
    from ..store.dataset import refuse_write

    refuse_write(o.db, "verify --db stores its result in the run's store")  # before any model is loaded
    reader = StoreReader(o.db)
    run_id = reader.resolve_run(o.run)
    return reader, run_id, _run_config(reader, run_id)


def _last_step(reader: Any, run_id: str, specs: dict[str, list[int] | tuple[str, int]]) -> int:
    steps = sorted(set().union(*(reader.steps(run_id, h) for h in specs)))
    if not steps:
        raise VerifyError(f"run {run_id} has no snapshots at hooks {list(specs)}")
    return max(steps)


def _site_features(reader: Any, run_id: str | None, step: int | None,
                   specs: dict[str, list[int] | tuple[str, int]]) -> dict[str, list[int]]:
    """{hook: feature ids}: given ids as they are, ``top:K``/``emerging`` read from the run at
    ``step``. Over several hooks, a hook without such features is left out (with a warning)."""
    feats: dict[str, list[int]] = {}
    for hook, spec in specs.items():
        if isinstance(spec, list):
            feats[hook] = spec
            continue
        try:
            feats[hook] = features_from_store(reader, run_id, hook, int(step), spec)
        except VerifyError as e:
            if len(specs) == 1:
                raise
            log.warning("verify: %s; %s is left out", e, hook)
    if not feats:
        raise VerifyError(f"no features to check at step {step} of run {run_id} at any of {list(specs)}")
    return feats


def _store_result(db: str, reader: Any, run_id: str, res: VerifyResult) -> None:
    from ..store import Store
    from ..store.many import is_many, locate

    # over many store files (a store directory), the result goes to the run's own file
    target, rid = locate(reader.runs(), run_id) if is_many(db) else (db, run_id)
    Store(target, run_id=rid).write_verification(replace(res, run_id=rid) if rid != run_id else res)
