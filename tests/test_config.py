"""MonitorConfig in sections: construction, the old flat keys (deprecated, still loading), files,
stored runs, and a table of bad settings each refused with one message naming the setting."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from drift_monitor.config import (
    CadenceSettings,
    ConfigDeprecationWarning,
    ConfigError,
    MetricSettings,
    MonitorConfig,
    ProbeSettings,
)

SAES = {"model.layers.1": "some/dir"}


def test_sections_from_dataclasses_and_mappings_are_the_same():
    a = MonitorConfig(saes=SAES, probes=ProbeSettings(source="p.jsonl", positions={"harmful": "prompt_end"}),
                      metrics=MetricSettings(refusal_top_k=5), cadence=CadenceSettings(every_n_steps=7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the sectioned spelling never warns
        b = MonitorConfig(saes=SAES, probes={"source": "p.jsonl", "positions": {"harmful": "prompt_end"}},
                          metrics={"refusal_top_k": 5}, cadence={"every_n_steps": 7})
        c = MonitorConfig(saes=SAES, probes="p.jsonl")  # the shorthand for probes.source
    assert a == b
    assert c.probes.source == "p.jsonl" and c.probes.batch_size == ProbeSettings().batch_size
    assert a.cadence.every_n_steps == 7 and a.probes.selector_for("harmful") == "prompt_end"
    assert a.probes.selector_for("x") == "all" and a.metrics.refusal_top_k == 5


def test_flat_keys_still_load_with_a_deprecation_warning_naming_the_section(tmp_path):
    with pytest.warns(ConfigDeprecationWarning, match=r"every_n_steps → cadence\.every_n_steps"):
        cfg = MonitorConfig(saes=SAES, every_n_steps=7, refusal_top_k=3, db_path="x.duckdb")
    assert (cfg.cadence.every_n_steps, cfg.metrics.refusal_top_k, cfg.outputs.db_path) == (7, 3, "x.duckdb")
    with pytest.warns(ConfigDeprecationWarning, match=r"MonitorConfig\.every_n_steps is deprecated"):
        assert cfg.every_n_steps == 7  # flat reads too
    p = tmp_path / "c.yaml"
    p.write_text("saes:\n  model.layers.1: some/dir\nevery_n_steps: 7\npositions:\n  harmful: prompt_end\n")
    with pytest.warns(ConfigDeprecationWarning, match=str(p)):
        old = MonitorConfig.from_file(p)
    p.write_text("saes:\n  model.layers.1: some/dir\ncadence:\n  every_n_steps: 7\n"
                 "probes:\n  positions:\n    harmful: prompt_end\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = MonitorConfig.from_file(p)
    assert old == new


def test_round_trip_through_a_stored_dict_and_a_json_file(tmp_path):
    cfg = MonitorConfig(saes=SAES, probes={"source": "p.jsonl", "formats": {"harmful": "dialogue"}},
                        metrics={"refusal_contrast": True}, outputs={"db_path": "a.duckdb", "run_name": "r"})
    d = cfg.to_dict()
    assert set(d) >= {"probes", "metrics", "cadence", "outputs"} and d["metrics"]["refusal_contrast"] is True
    assert MonitorConfig.from_dict(json.loads(json.dumps(d))) == cfg
    stored = MonitorConfig.stored_settings(d)
    assert "db_path" not in stored and "run_name" not in stored  # they belong to one process
    assert stored["refusal_contrast"] is True and stored["probes"] == "p.jsonl"
    # a run stored before the sections (flat) rebuilds the same settings
    flat = {"saes": SAES, "probes": "p.jsonl", "formats": {"harmful": "dialogue"}, "refusal_contrast": True,
            "db_path": "a.duckdb", "some_setting_of_an_older_version": 1}
    assert {k: v for k, v in MonitorConfig.stored_settings(flat).items()} == \
        {k: v for k, v in stored.items() if k in flat}


def test_unknown_settings_name_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean 'every_n_steps'"):
        MonitorConfig.from_dict({"saes": SAES, "every_n_step": 5})
    with pytest.raises(ConfigError, match=r"cadence section.*did you mean 'every_n_steps'"):
        MonitorConfig(saes=SAES, cadence={"every_n_step": 5})
    with pytest.raises(ConfigError, match="saes is empty"):
        MonitorConfig(saes={})


BAD = [  # (section, setting, value, words in the message)
    ("cadence", "every_n_steps", 0, "integer >= 1"),
    ("cadence", "every_n_steps", True, "integer >= 1"),  # a bool is not an int
    ("cadence", "every_n_steps", 2.0, "integer >= 1"),
    ("cadence", "adapter_signals", 1, "True, False, 'auto'"),
    ("cadence", "adapter_every_n_steps", -3, "integer >= 1 or None"),
    ("cadence", "snapshot_on_save", "yes", "True or False"),
    ("metrics", "refusal_top_k", -1, "integer >= 1"),
    ("metrics", "refusal_z_threshold", math.nan, "finite number"),
    ("metrics", "refusal_min_rel_score", math.inf, "finite number"),
    ("metrics", "drift_ratio", 1.0, "> 1"),
    ("metrics", "dense_density", 1.5, "<= 1"),
    ("metrics", "refusal_max_base_density", 0, "> 0"),
    ("metrics", "refusal_positions", "first", "'response', 'last', 'selected'"),
    ("metrics", "harmful_category", "all", "aggregate"),
    ("metrics", "refusal_response", "  ", "non-empty string"),
    ("probes", "batch_size", 0, "integer >= 1"),
    ("probes", "outlier_factor", 1, "> 1"),
    ("probes", "positions", "last", "unknown value 'last'"),
    ("probes", "formats", {"harmful": "markdown"}, "unknown value 'markdown'"),
    ("probes", "include_bos", 1, "True or False"),
    ("outputs", "prometheus_port", 70000, "<= 65535"),
    ("outputs", "prometheus_port", -5, ">= 0"),
    ("outputs", "show_progress", "no", "True or False"),
    (None, "sae_chunk_mb", 0, "> 0"),
    (None, "early_stop", "sometimes", "True, False, 'auto'"),
    (None, "sae_dtype", "float8", "'float32'"),
]


@pytest.mark.parametrize("section,name,value,words", BAD, ids=[f"{s or 'top'}.{n}={v!r}" for s, n, v, _ in BAD])
def test_bad_settings_are_refused_naming_the_setting(section, name, value, words):
    kw = {section: {name: value}} if section else {name: value}
    with pytest.raises(ConfigError) as e:
        MonitorConfig(saes=SAES, **kw)
    msg = str(e.value)
    assert f"{section + '.' if section else ''}{name}" in msg and words in msg and "\n" not in msg
    with pytest.raises(ConfigError):  # the same check through the old flat spelling
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigDeprecationWarning)
            MonitorConfig(saes=SAES, **{name: value})


def test_invalid_yaml_and_json_name_the_file_and_line(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("saes:\n  a: b\ncadence:\n every_n_steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        MonitorConfig.from_file(y)
    j = tmp_path / "bad.json"
    j.write_text('{"saes": {"a": "b"},}')
    with pytest.raises(ConfigError, match=r"bad\.json:1: invalid JSON"):
        MonitorConfig.from_file(j)
