"""The README and docs/ say only what the code has (issue 26, "every figure has a command").

Checked over README.md and docs/*.md, from the text alone (nothing is run but the parser build):
(a) the README stays a page a newcomer reads (≤ 350 lines); (b) every command the docs name
exists: each repository path (``tests/bench/x.py``, ``drift_monitor/...``, ``tests/test_x.py::test_y``)
is there, each ``python tests/bench/x.py --flag`` is a flag of that script, each
``drift-monitor SUB --flag`` a subcommand and flag of ``cli.build_parser()``; (c) each metric,
Prometheus family, alert rule and setting named in backticks exists in the catalog, the exporter,
the default rules or the settings dataclasses; (d) every relative link resolves, anchors included,
and no link leaves the repository. Each checker is a plain function over text, so the negative
checks at the end show it flags a typo.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 350

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
#: repository paths the docs cite: a top-level folder of this repository, then a file with an extension
REPO_PATH = re.compile(r"(?<![\w./-])((?:drift_monitor|tests|examples|scripts|callbacks|dashboard|docs)/[\w./-]*"
                       r"\.(?:py|md|jsonl|json|yml|yaml|png|toml|txt))(?![\w-])(?:::(\w+))?")
#: a drift-monitor command line: the console script, or ``python -m drift_monitor.cli``
CLI = re.compile(r"(?:drift-monitor|-m drift_monitor\.cli) ([a-z][a-z-]*)([^\n]*)")
#: a script run by path: a benchmark or an example
SCRIPT = re.compile(r"python ((?:tests/bench|examples)/[\w/-]+\.py)([^\n]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
SECTIONS = ("probes", "metrics", "cadence", "outputs")


def _page(p: Path) -> str:
    return p.read_text(encoding="utf-8")


def code_spans(text: str) -> list[str]:
    """Every fenced block's lines and every inline code span: where commands and names are quoted."""
    fenced = [line for block in FENCE.findall(text) for line in block.splitlines()]
    return fenced + INLINE.findall(FENCE.sub("", text))


def _command_part(line: str) -> str:
    """A command line without its trailing ``# comment`` (comments are prose)."""
    return re.split(r"\s#\s", line, maxsplit=1)[0]


# ------------------------------------------------------------------------------ what the code has
@cache
def cli_flags() -> dict[str, set[str]]:
    """{subcommand: its option strings (with the global ones)} from ``cli.build_parser()``."""
    from drift_monitor.cli import build_parser

    parser = build_parser()
    top = {s for a in parser._actions for s in a.option_strings}
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: top | {s for a in sp._actions for s in a.option_strings} for name, sp in subs.choices.items()}


@cache
def setting_fields() -> dict[str, set[str]]:
    """{section: its fields} of the monitor config, and "" for MonitorConfig's own fields."""
    from drift_monitor.config import MonitorConfig
    from drift_monitor.settings import CadenceSettings, MetricSettings, OutputSettings, ProbeSettings

    classes = {"probes": ProbeSettings, "metrics": MetricSettings, "cadence": CadenceSettings,
               "outputs": OutputSettings, "": MonitorConfig}
    return {k: {f.name for f in dataclasses.fields(c)} for k, c in classes.items()}


@cache
def prometheus_names() -> set[str]:
    """Every family and sample name an exporter produces, from a live exporter and the catalog."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from drift_monitor import catalog
    from drift_monitor.exporters.prometheus import PREFIX, PrometheusExporter

    fams = list(text_string_to_metric_families(generate_latest(PrometheusExporter(run="docs").registry).decode()))
    names = {f.name for f in fams} | {s.name for f in fams for s in f.samples}
    names |= {f.name + "_info" for f in fams if f.type == "info"}
    names |= {f.name + "_total" for f in fams if f.type == "counter"}
    return names | {PREFIX + s.exported for s in catalog.CATALOG}


@cache
def vocabulary() -> set[str]:
    """Names a backticked identifier may be: metrics, settings, rules, rule kinds, feature columns."""
    from drift_monitor import catalog
    from drift_monitor.alerts.rules import default_rules

    rules = default_rules()
    words = set(catalog.names(patterns=False)) | {s.name.split(":")[0] for s in catalog.CATALOG}
    words |= {f for fields in setting_fields().values() for f in fields}
    words |= {r.name for r in rules} | {r.kind for r in rules}
    return words


#: Identifiers the docs name that are neither metrics nor settings, though they share a metric's
#: first word: columns, record fields, functions, constants. A new one is added here on purpose.
NOT_METRICS = {
    "refusal_score", "refusal_features", "refusal_response", "refusal_base", "refusal_logprob",
    "refusal_retention_loss", "refusal_up", "refusal_shift", "refusal_phrases", "refusal_dir",
    "residual_directions", "max_act", "mean_act", "density_scatter", "n_snapshots", "n_outlier",
    "start_run", "act_relative", "adapter_signals", "adapter_every_n_steps", "lora_A", "lora_B",
    "explained_variance_drop", "ce_every_n_snapshots", "max_refusal", "topk_jaccard_k", "dense_density",
    "density_js", "n_random", "max_new_tokens", "features_drifted",
}
#: drift_monitor_* names that are not exported families: the example Prometheus config's scrape job
NOT_FAMILIES = {"drift_monitor_train"}
#: first words of the catalog's metric names: an identifier starting with one must be a known name
METRIC_STEMS = ("explained_", "base_explained", "fvu", "l0", "mse", "cosine", "dead_", "dense_", "act_",
                "topk_", "features_drifted", "density_", "max_", "n_emerging", "n_excluded", "n_outlier",
                "n_tokens", "nonfinite", "refusal_", "start_", "residual_", "ce_loss", "adapter_", "lora_",
                "direction_projection")


def unknown_names(text: str) -> list[str]:
    """Backticked metric-like identifiers and Prometheus names that the code does not have."""
    bad = []
    for span in INLINE.findall(FENCE.sub("", text)):
        for name in re.findall(r"(?<![\w:.])(drift_monitor_[a-z0-9_]+|[a-z][a-z0-9_]*)(?![\w.(/:])", span):
            if name.endswith("_i"):  # the per-feature notation of metrics.md: density_i, refusal_score_i
                name = name[:-2]
            if name == "drift_monitor_":  # the prefix itself
                continue
            if name.startswith("drift_monitor_"):
                if name not in prometheus_names() and name not in NOT_FAMILIES:
                    bad.append(name)
            elif (name.startswith(METRIC_STEMS) and "_" in name and name not in vocabulary()
                  and name not in NOT_METRICS):
                bad.append(name)
    return bad


def unknown_settings(text: str) -> list[str]:
    """``section.field`` names, ``section={"key": ...}`` literals and YAML config keys that no
    settings dataclass has."""
    fields, bad = setting_fields(), []
    file_ext = r"(?!(?:md|py|jsonl|json|yaml|yml)\b)"  # metrics.md, probes.jsonl are files
    for sec, key in re.findall(rf"(?<![\w./])(probes|metrics|cadence|outputs)\.{file_ext}([a-z_]+)\b", text):
        if key not in fields[sec]:
            bad.append(f"{sec}.{key}")
    for sec, body in re.findall(r"\b(probes|metrics|cadence|outputs)=\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}", text):
        top = re.sub(r"\{[^{}]*\}|\[[^\]]*\]", "", body)  # keys of nested mappings are not settings
        bad += [f"{sec}.{k}" for k in re.findall(r"[\"'](\w+)[\"']\s*:", top) if k not in fields[sec]]
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    blocks += re.findall(r"<<'EOF'\n(.*?)^\s*EOF", text, re.DOTALL | re.MULTILINE)
    for block in blocks:
        doc = yaml.safe_load("\n".join(line for line in block.splitlines()))
        if not isinstance(doc, dict) or not set(doc) & set(SECTIONS):
            continue  # not a monitor config (alert rules, Prometheus, Alertmanager)
        for sec, sub in doc.items():
            if sec not in SECTIONS:
                bad += [] if sec in fields[""] else [sec]
            elif isinstance(sub, dict):
                bad += [f"{sec}.{k}" for k in sub if k not in fields[sec]]
    return bad


def unknown_commands(text: str) -> list[str]:
    """Subcommands and flags of ``drift-monitor``, ``tests/bench`` and ``examples`` scripts that do not exist."""
    flags, bad = cli_flags(), []
    every_flag = set().union(*flags.values())
    for span in INLINE.findall(FENCE.sub("", text)):  # a flag quoted alone, e.g. `--shard K/N`
        if span.startswith("--") and FLAG.match(span).group(1) not in every_flag:
            bad.append(FLAG.match(span).group(1))
    for span in code_spans(text):
        line = _command_part(span)
        for sub, rest in CLI.findall(line):
            if sub not in flags:
                bad.append(f"drift-monitor {sub}")
                continue
            bad += [f"drift-monitor {sub} {f}" for f in FLAG.findall(rest) if f not in flags[sub]]
        for script, rest in SCRIPT.findall(line):
            path = ROOT / script
            if not path.is_file():
                bad.append(script)
                continue
            src = path.read_text(encoding="utf-8")
            bad += [f"{script} {f}" for f in FLAG.findall(rest) if f'"{f}"' not in src]
    return bad


def missing_paths(text: str) -> list[str]:
    """Repository paths (and ``path::test`` ids) the text cites that are not in the checkout."""
    bad = []
    for path, test in REPO_PATH.findall(text):
        # callbacks/ and dashboard/ install as drift_monitor.callbacks / drift_monitor.dashboard
        p = ROOT / re.sub(r"^drift_monitor/(callbacks|dashboard)/", r"\1/", path)
        if not p.exists():
            bad.append(path)
        elif test and not re.search(rf"^def {test}\(", p.read_text(encoding="utf-8"), re.MULTILINE):
            bad.append(f"{path}::{test}")
    return bad


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -N for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", _page(page)), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(page: Path, text: str) -> list[str]:
    """Links that leave the repository, or whose file or anchor is not there."""
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):
            bad.append(f"{target} (outside the repository)")
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or ROOT not in dest.parents:
            bad.append(target)
        elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
            bad.append(target)
    return bad


# ------------------------------------------------------------------------------------- the checks
def test_readme_is_short():
    n = len(_page(ROOT / "README.md").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (≤ {README_MAX_LINES}): move reference text to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_command_and_path_exists(page):
    text = _page(page)
    assert not unknown_commands(text), f"{page.name}: {unknown_commands(text)}"
    assert not missing_paths(text), f"{page.name}: {missing_paths(text)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_metric_and_setting_exists(page):
    text = _page(page)
    assert not unknown_names(text), f"{page.name}: {unknown_names(text)} (a typo, or add to NOT_METRICS)"
    assert not unknown_settings(text), f"{page.name}: {unknown_settings(text)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(page):
    assert not broken_links(page, _page(page)), f"{page.name}: {broken_links(page, _page(page))}"


def quoted_constants(text: str) -> list[tuple[str, float]]:
    """``(NAME, value)`` for every "`NAME` (value" the text quotes, for the alert rules' bounds."""
    return [(n, float(v)) for n, v in re.findall(r"`(REFUSAL_[A-Z]+)` \(([0-9.]+)", text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_quoted_rule_bounds_are_the_code_s(page):
    """The docs quote the refusal rules' bounds next to their names; the values must be rules.py's."""
    from drift_monitor.alerts import rules

    for name, value in quoted_constants(_page(page)):
        assert value == getattr(rules, name), f"{page.name}: {name} is {getattr(rules, name)}, the docs say {value}"


def test_the_benchmark_figures_name_their_scripts():
    """Every script in tests/bench is named by the benchmarks page, so each figure's source is listed."""
    text = _page(ROOT / "docs" / "benchmarks.md")
    for script in sorted((ROOT / "tests" / "bench").glob("*.py")):
        assert f"tests/bench/{script.name}" in text, f"docs/benchmarks.md does not list {script.name}"


def test_the_checkers_flag_typos():
    """Each checker fails on a one-letter slip, so the checks above can fail."""
    assert unknown_names("`refusal_retension` and `drift_monitor_refusal_retension`") == [
        "refusal_retension", "drift_monitor_refusal_retension"]
    assert unknown_names("`refusal_retention`, `drift_monitor_refusal_retention`, `drift_monitor_errors_total`") == []
    assert unknown_settings("`metrics.start_refusal_token` and `cadence={\"every_n_step\": 5}`") == [
        "metrics.start_refusal_token", "cadence.every_n_step"]
    assert unknown_settings("```yaml\noutputs:\n  db_pth: x.duckdb\n```\n") == ["outputs.db_pth"]
    assert unknown_settings("`metrics.start_refusal_tokens`, `probes={\"positions\": {\"harmful\": \"all\"}}`") == []
    assert unknown_commands("`drift-monitor scan --base-modle B`\n```bash\ndrift-monitor scna\n```\n") == [
        "drift-monitor scna", "drift-monitor scan --base-modle"]
    assert unknown_commands("`python tests/bench/detection_report.py --cahced`") == [
        "tests/bench/detection_report.py --cahced"]
    assert unknown_commands("`python tests/bench/no_such.py`") == ["tests/bench/no_such.py"]
    assert unknown_commands("`.venv/bin/python examples/planted_drift.py --outt x`") == [
        "examples/planted_drift.py --outt"]
    assert unknown_commands("`--keep-pushd`, `--keep-pushed`") == ["--keep-pushd"]
    assert missing_paths("see tests/test_docs.py::test_no_such_test and tests/bench/nope.py") == [
        "tests/test_docs.py::test_no_such_test", "tests/bench/nope.py"]
    assert quoted_constants("`REFUSAL_GATE` (0.2, and `REFUSAL_EROSION` (0.871)") == [
        ("REFUSAL_GATE", 0.2), ("REFUSAL_EROSION", 0.871)]
    readme = ROOT / "README.md"
    assert broken_links(readme, "[a](docs/metrics.md#no-such-heading) [b](docs/nope.md) [c](https://example.org)") == [
        "docs/metrics.md#no-such-heading", "docs/nope.md", "https://example.org (outside the repository)"]
    assert broken_links(readme, "[a](docs/metrics.md#refusal-features)") == []
