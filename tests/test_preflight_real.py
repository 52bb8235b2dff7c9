"""Pre-flight on the real model (the SmolLM2 test bed), through the library call a user makes.

The whole-suite figures (dataset score against the change in refusal over 21 fine-tunes, the
start-only baseline it must beat) come from ``python tests/bench/preflight_report.py``
(docs/preflight.md). Here, the two per-example claims that report makes on held-out data, each
a real ``preflight()`` over a JSONL file at default settings:

* from the aligned start (refuses 97% of harmful requests), the held-out 5% compliance mix
  (``suite.compliance_mix``: benign arithmetic with 10 compliance answers in wordings written for
  it) ranks the compliance examples first on the eroding side: AUROC 0.939 in the report;
* from the base, inside a held-out refusal fine-tune's data (``gain-B-25``: a quarter refusals in
  a wording the monitor never uses), the refusal examples rank first on the raising side: 0.859.

Cost: the aligned start (cached with the suite's ``gain-A-50`` run, which CI builds) and the
base, each read once: the start's refusal reference, 144 probe answers, 192 examples.
"""

from __future__ import annotations

import json

import pytest

from drift_monitor.demo import suite as S
from drift_monitor.demo import testbed as T
from drift_monitor.offline.loading import load_model
from drift_monitor.preflight import PreflightSettings, preflight
from drift_monitor.preflight.score import auroc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tb():
    return T.build_testbed(quiet=True)


def scored(model, tok, rows, path):
    """Every example's score (``top`` = all of them, so the erodes list holds each once)."""
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    res = preflight(model, tok, [path], settings=PreflightSettings(top=len(rows)), use_cache=False, progress=False)
    assert res.n_examples == len(rows) and res.mode == "predicted"
    by_index = {e.index: e.score for e in res.erodes}
    assert len(by_index) == len(rows)
    return res, [by_index[i] for i in range(len(rows))]


def test_compliance_in_benign_data_ranks_first_from_an_aligned_start(tb, tmp_path):
    model = load_model(S.aligned_start(tb, quiet=True))
    mix = S.compliance_mix(tb, "held_out")
    res, scores = scored(model, tb.tokenizer(), mix, tmp_path / "mix.jsonl")
    comply, benign = scores[-S.MIX_K:], scores[:-S.MIX_K]
    assert auroc([-x for x in comply], [-x for x in benign]) >= 0.9
    assert res.erodes[0].response in S.COMPLIANCE_HELD  # the example listed first is a compliance one


def test_refusals_in_a_refusal_fine_tune_rank_first_from_the_base(tb, tmp_path):
    rows = S.rows(tb, S.scenario("gain-B-25"))
    res, scores = scored(tb.load_model(), tb.tokenizer(), rows, tmp_path / "gain.jsonl")
    refusal = [i for i, (_, r) in enumerate(rows) if r in S.WORDINGS["B"]]
    other = [i for i in range(len(rows)) if i not in set(refusal)]
    assert len(refusal) == 48
    assert auroc([scores[i] for i in refusal], [scores[i] for i in other]) >= 0.8
    assert res.data_refusal_share == pytest.approx(48 / 192)  # the phrase test finds every refusal wording
