"""One metric catalog (drift_monitor.catalog) for everything that lists metrics.

(a) the catalog equals what the engine emits: a tiny monitor run with direction monitors and a
    LoRA adapter's signals, every emitted scalar resolves in the catalog and every catalog entry
    is emitted; (b) docs/metrics.md's metric table is the catalog's; (c) alert rules accept exactly
    the catalog's names; (d) every Prometheus family of a metric has the catalog's help text.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from drift_monitor import DriftMonitor, MonitorConfig, ProbeSet, catalog
from drift_monitor.alerts import KNOWN_METRICS, AlertRule, AlertRuleError, default_rules
from drift_monitor.exporters.prometheus import (
    METRIC_HELP,
    PREFIX,
    PrometheusExporter,
    metric_name,
)
from drift_monitor.records import (
    ADAPTER_HOOK,
    ADAPTER_HOOK_PREFIX,
    ADAPTER_METRICS,
    LORA_MODULE_METRICS,
    HookResult,
    Snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
D, HOOK = 32, "model.layers.1"
CATS = ("harmful", "harmless", "general")


def instance(s: catalog.MetricSpec) -> str:
    """A concrete metric key of a spec (a pattern's placeholders filled in)."""
    return re.sub(r"<[^<>]+>", lambda m: {"<direction>": "refusal", "<category>": "harmful"}[m.group(0)], s.name)


# --------------------------------------------------------------------------- (a) the engine
@pytest.fixture(scope="module")
def emitted(tmp_path_factory) -> dict[str, dict[str, dict[str, float]]]:
    """{"base"/"snap"/"adapter": {hook: metrics}} of a tiny run: SAE hook with a user direction,
    harmful/harmless probes (refusal metrics, refusal_base), and three adapter records (cosines)."""
    from peft import LoraConfig, get_peft_model

    from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer
    from drift_monitor.probe.adapters import AdapterTracker

    tmp = tmp_path_factory.mktemp("catalog")
    records = [{"id": f"{c}-{i}", "category": c, "prompt": f"{c} prompt number {i} " + "word " * (i % 3)}
               for c in CATS for i in range(4)]
    tok = build_tokenizer([r["prompt"] for r in records])
    base = build_llama(len(tok), hidden=D, layers=2, heads=4, seed=0)
    cur = build_llama(len(tok), hidden=D, layers=2, heads=4, seed=1)
    cfg = MonitorConfig(saes={HOOK: build_sae(D, 64, seed=1)}, directions={HOOK: {"mine": torch.ones(D)}},
                        baseline_cache_dir=str(tmp / "cache"),
                        probes={"source": ProbeSet.from_records(records, name="cat"), "batch_size": 4},
                        cadence={"every_n_steps": 10, "ce_every_n_snapshots": 1}, outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    out = {"base": {h: r.metrics for h, r in mon.baseline(base).hooks.items()},
           "snap": {h: r.metrics for h, r in mon.snapshot(cur, step=10).hooks.items()}}

    model = get_peft_model(build_llama(50, hidden=16, layers=2, heads=2),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    tracker, adapter = AdapterTracker(), {}
    with torch.no_grad():
        for step in (0, 2, 4):  # three records: the local cosines appear at the third
            for p in (p for n, p in model.named_parameters() if "lora_B" in n):
                p.add_(torch.randn_like(p))
            adapter = {h: r.metrics for h, r in tracker.record(model, step).items()}
    out["adapter"] = adapter
    return out


def test_every_emitted_metric_is_in_the_catalog(emitted):
    for source, hooks in emitted.items():
        for hook, metrics in hooks.items():
            for key in metrics:
                s = catalog.find(key)
                assert s is not None, f"{source} {hook}: {key!r} is emitted but not in drift_monitor.catalog"
                want = "adapter" if source == "adapter" else ("direction" if s.pattern else "hook")
                assert s.scope == want, f"{key!r} emitted at {hook} but cataloged with scope {s.scope!r}"


def test_every_catalog_metric_is_emitted(emitted):
    for source in ("base", "snap"):
        keys = set(emitted[source][HOOK])
        missing = [s.name for s in catalog.by_scope("hook") if s.name not in keys]
        assert not missing, f"catalog metrics of scope 'hook' the {source} snapshot lacks: {missing}"
        for s in catalog.by_scope("direction"):
            found = {s.fields(k) for k in keys if s.matches(k)}
            assert {("mine", c) for c in (*CATS, "all")} | {("refusal_base", "harmful")} <= found, s.name
    adapter = emitted["adapter"]
    agg = set(adapter[ADAPTER_HOOK])
    per_module = set().union(*(m for h, m in adapter.items() if h.startswith(ADAPTER_HOOK_PREFIX)))
    assert agg | per_module == {s.name for s in catalog.by_scope("adapter")}
    # the hook column of the docs/metrics.md table: adapter_* on "adapter", lora_* on "adapter:<module>"
    assert agg == set(ADAPTER_METRICS) and all(k.startswith("adapter_") for k in agg)
    assert per_module == set(LORA_MODULE_METRICS) and all(k.startswith("lora_") for k in per_module)


def test_the_naive_reference_checks_catalog_metrics():
    from naive import SCALARS

    assert not [k for k in SCALARS if catalog.find(k) is None]


# --------------------------------------------------------------------------- the catalog itself
def test_catalog_entries_are_well_formed_and_lookups_resolve_patterns():
    assert len(catalog.names()) == len(set(catalog.names())) == len(catalog.CATALOG)
    for s in catalog.CATALOG:
        assert s.help.strip() and s.help.endswith(".") and s.unit, s.name
        assert catalog.spec(instance(s)) is s
        # help never hard-codes a setting's default (configs change them): it names the setting or
        # the rule's threshold instead of 0.1, 0.25, 2x, 25°, 30%, ...
        assert not re.search(r"\d\.\d|\d\s*(x|×|%|°)(?!\w)", s.help), s.help
    s = catalog.spec("direction_projection_delta:bank.0:a:b")
    assert s.name.startswith("direction_projection_delta:") and s.fields("direction_projection_delta:bank.0:a:b") == (
        "bank.0", "a:b")
    for bad in ("direction_projection:refusal", "direction_projection::harmful", "ce_loss", "explained_varance"):
        assert not catalog.is_known(bad)
    with pytest.raises(KeyError, match="did you mean 'explained_variance'"):
        catalog.spec("explained_varance")
    assert catalog.panels() and all(catalog.panels().values())
    assert all(catalog.spec(n).scope == "hook" for g in catalog.panels().values() for n in g)


def test_catalog_imports_no_torch():
    code = "import sys, drift_monitor.catalog\nassert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- (b) the docs' tables
def test_documented_metric_table_is_the_catalog():
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- metrics:start -->\n(.*?)<!-- metrics:end -->", text, re.DOTALL)
    assert m, "docs/metrics.md has no <!-- metrics:start --> ... <!-- metrics:end --> block"
    assert m.group(1) == catalog.markdown_table(), (
        "docs/metrics.md's metric table differs from the catalog; paste the output of "
        "python -c 'from drift_monitor import catalog; print(catalog.markdown_table())' between the markers")


def test_documented_prometheus_table_names_every_family():
    text = (ROOT / "docs" / "prometheus.md").read_text(encoding="utf-8")
    section = text[text.index("## Prometheus metrics"):]
    section = section[:section.index("\n## ", 1)]
    listed = set(re.findall(r"`(drift_monitor_[a-z0-9_]+)`", section))
    missing = sorted(PREFIX + s.exported for s in catalog.CATALOG if PREFIX + s.exported not in listed)
    assert not missing, f"docs/prometheus.md's Prometheus table lacks {missing}"


# --------------------------------------------------------------------------- (c) alert rules
def test_alert_rules_accept_every_catalog_metric_and_nothing_else():
    assert KNOWN_METRICS == catalog.names(patterns=False)
    for s in catalog.CATALOG:
        AlertRule("r", "threshold", metric=instance(s), op=">", threshold=0.0)
        AlertRule("s", "sudden_change", metrics=[instance(s)])
    for bad in ("ce_loss", "ce_loss_scores", "explained_varance", "direction_projection:refusal", "probe_tokens"):
        with pytest.raises(AlertRuleError, match="unknown metric"):
            AlertRule("r", "threshold", metric=bad, op=">", threshold=0.0)


def test_default_alerts_agree_with_the_default_rules():
    rules = {r.name: r for r in default_rules()}
    reads = {name: set(r.metrics or [r.metric]) for name, r in rules.items()}
    for name, metrics in reads.items():
        assert all(catalog.is_known(m) for m in metrics), (name, metrics)
    for s in catalog.CATALOG:
        if s.default_alert is not None:
            assert s.name in reads.get(s.default_alert, ()), (
                f"{s.name}: default_alert {s.default_alert!r} never reads it")
    # every rule of the defaults is some metric's default alert
    assert {s.default_alert for s in catalog.CATALOG} - {None} == set(rules)


# --------------------------------------------------------------------------- (d) Prometheus
def test_every_prometheus_family_has_the_catalog_help():
    assert METRIC_HELP == {s.name: s.help for s in catalog.CATALOG if not s.pattern}
    metrics = {instance(s): 0.5 for s in catalog.CATALOG}
    exp = PrometheusExporter("cat")
    exp.update(Snapshot(1, {HOOK: HookResult(HOOK, 64, metrics, {})}, "p", 10))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(exp.registry).decode())}
    for s in catalog.CATALOG:
        name = PREFIX + s.exported
        assert name == (metric_name(s.name) if not s.pattern else PREFIX + s.name.split(":")[0])
        fam = fams[name]
        assert fam.type == "gauge" and fam.documentation == s.help, name
        (sample,) = fam.samples
        assert set(sample.labels) == {"hook", *s.labels} and sample.value == 0.5, name
    # every per-hook family is a catalog metric
    per_hook = {n for n, f in fams.items() if f.samples and "hook" in f.samples[0].labels}
    assert per_hook == {PREFIX + s.exported for s in catalog.CATALOG}
