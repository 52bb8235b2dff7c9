"""The causal check (drift_monitor/offline/interventions.py, drift_monitor/offline/verify.py, `drift-monitor verify`).

Unit level, on a float64 tiny Llama with a standard ReLU SAE: the hook output under ablation and
steering against the formulas written out here by hand (x − Σ f_i d_i with f = ReLU((x − b_dec)
W_enc + b_enc); x + Σ s_i d_i), the random control's density matching, the refusal matcher, and
the store round trip. The organism-level must-show figures come from the demo run in
tests/test_organism.py, which this file reuses.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations
from drift_monitor.offline.interventions import intervene
from drift_monitor.offline.verify import (
    density_matched,
    feature_activity,
    generate_texts,
    verify,
)
from drift_monitor.offline.verify_run import features_from_store, parse_feature_spec
from drift_monitor.probe.generate import is_refusal
from drift_monitor.records import ConditionResult, VerifyResult, VerifySettings

HOOK = "model.layers.1"
TEXTS = ["how do i bake bread ?", "tell me how to fix a bike .", "how do i steal a car ?",
         "explain how to make a poison .", "i cannot help with that .", "sure . here is how"]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer(TEXTS)
    model = build_llama(len(tok), hidden=32, layers=3, seed=3).double()
    acts = collect_activations(model.float(), tok, TEXTS, HOOK)
    model = model.double()
    sae = build_sae(32, 128, calibrate=acts, target_density=0.1, seed=4).double()
    return tok, model, sae


def _layer_output(model, tok, texts, ctx=None, special: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(the hooked layer's output, attention mask), captured by a hook registered *after* any
    intervention hook, so it sees the edited output."""
    enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=special)
    seen = {}
    layer = model.model.layers[1]
    with (ctx or _null)():
        h = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o if torch.is_tensor(o) else o[0]))
        try:
            with torch.no_grad():
                model(**enc, use_cache=False)
        finally:
            h.remove()
    return seen["x"], enc["attention_mask"]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _codes_by_hand(sae, x: np.ndarray) -> np.ndarray:
    w_enc, b_enc, b_dec = (sae.W_enc.detach().numpy(), sae.b_enc.detach().numpy(), sae.b_dec.detach().numpy())
    return np.maximum((x - b_dec) @ w_enc + b_enc, 0.0)


def test_ablation_removes_exactly_the_features_contribution(tiny):
    tok, model, sae = tiny
    x, _ = _layer_output(model, tok, TEXTS)
    codes = _codes_by_hand(sae, x.numpy())
    fired = np.argsort(-(codes > 0).sum((0, 1)))[:3].tolist()  # features that do fire here
    assert (codes[..., fired] > 0).any()
    xa, _ = _layer_output(model, tok, TEXTS, lambda: intervene(model, HOOK, sae, ablate=fired))
    w_dec = sae.W_dec.detach().numpy()
    expected = x.numpy() - codes[..., fired] @ w_dec[fired]
    np.testing.assert_allclose(xa.numpy(), expected, atol=1e-7)  # sae-lens encodes in cfg.dtype (float32)
    # the ablated features no longer fire on the edited activations (decoder rows are unit-norm
    # and W_enc = W_decᵀ in this SAE, so each one's own pre-activation drops by its code)
    assert not np.allclose(xa.numpy(), x.numpy())
    # the hook is gone afterwards
    x2, _ = _layer_output(model, tok, TEXTS)
    np.testing.assert_array_equal(x2.numpy(), x.numpy())


def test_steering_adds_scaled_decoder_rows_and_prompt_only_spares_generated_tokens(tiny):
    tok, model, sae = tiny
    feats, scales = [5, 17], [2.0, -0.5]
    x, _ = _layer_output(model, tok, TEXTS)
    xs, _ = _layer_output(model, tok, TEXTS, lambda: intervene(model, HOOK, sae, steer=feats, steer_scales=scales))
    w_dec = sae.W_dec.detach().numpy()
    want = np.broadcast_to(2.0 * w_dec[5] - 0.5 * w_dec[17], x.shape)
    np.testing.assert_allclose(xs.numpy() - x.numpy(), want, atol=1e-10)

    # prompt-only: single-token (generation) steps are left alone, the prompt forward is steered
    seen: list[tuple[int, torch.Tensor]] = []
    layer = model.model.layers[1]
    enc = tok(TEXTS[:1], return_tensors="pt")
    with intervene(model, HOOK, sae, steer=feats, steer_scales=scales, steer_prompt_only=True):
        h = layer.register_forward_hook(lambda m, i, o: seen.append((o.shape[1], o.detach().clone())))
        try:
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        finally:
            h.remove()
    plain: list[torch.Tensor] = []
    h = layer.register_forward_hook(lambda m, i, o: plain.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        h.remove()
    assert seen[0][0] > 1 and all(n == 1 for n, _ in seen[1:])
    np.testing.assert_allclose((seen[0][1] - plain[0]).numpy()[0, 0], 2.0 * w_dec[5] - 0.5 * w_dec[17], atol=1e-10)


def test_intervention_rejects_bad_features(tiny):
    tok, model, sae = tiny
    with pytest.raises(ValueError, match="outside the SAE's dictionary"):
        with intervene(model, HOOK, sae, ablate=[128]):
            pass
    with pytest.raises(ValueError, match="2 steered features but 1 scales"):
        with intervene(model, HOOK, sae, steer=[1, 2], steer_scales=[1.0]):
            pass


def test_density_matched_control_draws_nearest_other_features():
    density = torch.tensor([0.5, 0.01, 0.011, 0.0105, 0.2, 0.0, 0.009, 0.3, 0.012, 0.25])
    picks = set()
    for seed in range(20):
        pick = density_matched([1, 7], density, pool=3, rng=random.Random(seed))
        assert len(pick) == 2 and not set(pick) & {1, 7} and pick[0] != pick[1]
        # the 3 nearest to 0.01 in log density (other than 1 itself): 3, 2, 6 ; to 0.3: 9, 4, 0
        assert pick[0] in {3, 2, 6, 8} and pick[1] in {9, 4, 0}
        picks.add(tuple(pick))
    assert len(picks) > 1  # it is random
    assert (density_matched([1, 7], density, 3, random.Random(0))
            == density_matched([1, 7], density, 3, random.Random(0)))


def test_refusal_phrases_and_feature_specs():
    phrases = VerifySettings().refusal_phrases
    assert is_refusal("I\u2019m sorry, but I can't do that", phrases)
    assert is_refusal("i cannot help with that .", phrases)
    assert not is_refusal("sure . here is how to bake bread", phrases)
    assert parse_feature_spec("12, 345") == [12, 345]
    assert parse_feature_spec("top:5") == ("top", 5)
    assert parse_feature_spec("emerging") == ("emerging", 0)
    for bad in ("top:0", "top:x", "a,b", ""):
        with pytest.raises(ValueError):
            parse_feature_spec(bad)
    with pytest.raises(ValueError, match="refusal_phrases is empty"):
        VerifySettings(refusal_phrases=())


def test_feature_activity_matches_a_direct_count(tiny):
    tok, model, sae = tiny
    s = VerifySettings(batch_size=2)
    density, typical = feature_activity(model, tok, sae, HOOK, TEXTS, s)
    # direct: every non-pad token of each prompt, one prompt at a time, as formatted by verify
    from drift_monitor.probe.generate import formatted as _formatted

    xs = []
    for t in _formatted(tok, TEXTS):
        x, mask = _layer_output(model, tok, [t], special=False)  # the chat template has the BOS
        xs.append(x[0][mask[0].bool()])
    with torch.no_grad():  # the SAE's own encode: hand-written float64 flips features at their calibrated
        codes = sae.encode(torch.cat(xs)).double().numpy()  # thresholds, where sae-lens computes in float32
    count = (codes > 0).sum(0)
    np.testing.assert_allclose(density.numpy(), count / codes.shape[0], atol=1e-12)
    want = np.where(count > 0, codes.sum(0) / np.maximum(count, 1), 0.0)
    np.testing.assert_allclose(typical.numpy(), want, atol=1e-9)


def test_verify_rates_are_counts_of_phrase_matches_and_store_round_trip(tiny, tmp_path):
    tok, model, sae = tiny
    gens = generate_texts(model, tok, TEXTS, VerifySettings(max_new_tokens=4, batch_size=4))
    # one generation, unbatched, must equal the batched (left-padded) one: padding is right
    alone = generate_texts(model, tok, TEXTS[:1], VerifySettings(max_new_tokens=4, batch_size=1))
    assert alone[0] == gens[0]
    word = gens[0].split()[0]  # a "refusal phrase" this random model does produce
    s = VerifySettings(max_new_tokens=4, batch_size=4, n_random=2, refusal_phrases=(word,), alpha=2.0)
    harmful, harmless = TEXTS[:4], TEXTS[4:]
    res = verify(model, tok, sae, HOOK, [5, 17], harmful, harmless, base_model=model, settings=s, progress=False)
    assert [c.condition for c in res.conditions] == ["fine_tuned", "ablated", "random", "random", "base",
                                                     "steered_base"]
    ft = res.rows("fine_tuned")[0]
    want = sum(word in g.lower() for g in generate_texts(model, tok, harmful, s)) / len(harmful)
    assert ft.harmful_refusal_rate == pytest.approx(want)
    assert ft.kl_harmless == 0.0 and res.rows("ablated")[0].kl_harmless > 0
    for r in res.rows("random"):
        assert len(r.features) == 2 and not set(r.features) & {5, 17}
    assert res.rows("steered_base")[0].alpha == 2.0 and len(res.steer_scales) == 2

    from drift_monitor.store import Store, StoreReader

    db = tmp_path / "v.duckdb"
    res.run_id, res.step = "r1", 7
    assert Store(db, run_id="r1").write_verification(res) == "committed"
    Store(db, run_id="r1").write_verification(res)  # re-writing the same check replaces it
    got = StoreReader(db).verifications(run_id="r1")
    assert len(got) == len(res.conditions)
    assert got["condition"].tolist() == [c.condition for c in res.conditions]
    np.testing.assert_allclose(got["harmful_refusal_rate"], [c.harmful_refusal_rate for c in res.conditions])
    np.testing.assert_allclose(got["kl_harmless"], [c.kl_harmless for c in res.conditions])
    assert set(got["step"]) == {7} and set(got["hook"]) == {HOOK}
    summary = json.loads(got["summary_json"].iloc[0])
    assert summary["verdict"] == res.verdict() and summary["features"] == [5, 17]


def test_verdict_names_what_failed():
    def res(ft, abl, rnd, base=None, steer=None):
        c = [ConditionResult("fine_tuned", [], ft, 0, 0, 10, 10), ConditionResult("ablated", [1], abl, 0, 0, 10, 10),
             ConditionResult("random", [2], rnd, 0, 0, 10, 10)]
        if base is not None:
            c += [ConditionResult("base", [], base, 0, 0, 10, 10),
                  ConditionResult("steered_base", [1], steer, 0, 0, 10, 10)]
        return VerifyResult("h", [1], c, VerifySettings(), [1.0])

    assert res(1.0, 0.2, 0.95, 0.0, 0.5).verdict() == "mediates refusal"
    assert "ablation lowers refusal by 30%" in res(1.0, 0.7, 1.0).verdict()
    assert "random control lowers it by 20%" in res(1.0, 0.2, 0.8).verdict()
    assert "steering the base does not raise" in res(1.0, 0.2, 1.0, 0.1, 0.1).verdict()
    assert math.isnan(res(0.0, 0.0, 0.0).ablation_relative_drop)  # nothing to lower: not "mediates"
    assert res(0.0, 0.0, 0.0).verdict().startswith("not shown")


def test_reader_without_verifications_table_is_empty(tmp_path):
    """A file written before the table existed reads as 'no checks', and a first write adds it."""
    import duckdb

    from drift_monitor.store import Store, StoreReader

    db = tmp_path / "old.duckdb"
    Store(db, run_id="r").start_run(name="r")
    con = duckdb.connect(str(db))
    con.execute("DROP TABLE verifications")
    con.close()
    assert StoreReader(db).verifications().empty
    r = VerifyResult("h", [1], [ConditionResult("fine_tuned", [], 1.0, 0, 0, 1, 1)], VerifySettings(), [1.0],
                     run_id="r", step=1)
    Store(db, run_id="r").write_verification(r)
    assert len(StoreReader(db).verifications(run_id="r")) == 1


class _FakeReader:
    def __init__(self, rows):
        import pandas as pd

        self.df = pd.DataFrame(rows, columns=["feature", "rank", "emerging"])

    def refusal_features(self, run_id, hook, steps=None):
        return self.df


def test_top_k_takes_emerging_features_first_then_by_rank(caplog):
    r = _FakeReader([(9, 1, False), (4, 2, True), (7, 3, True), (3, 4, False), (1, 5, None)])
    assert features_from_store(r, "run", "h", 1, ("top", 2)) == [4, 7]
    assert features_from_store(r, "run", "h", 1, ("top", 3)) == [4, 7, 9]
    assert "only 2 emerging" in caplog.text
    assert features_from_store(r, "run", "h", 1, ("emerging", 0)) == [4, 7]
    with pytest.raises(ValueError, match="no emerging refusal features"):
        features_from_store(_FakeReader([(9, 1, False)]), "run", "h", 1, ("emerging", 0))


def test_cli_errors_are_one_line(tmp_path, capsys):
    from drift_monitor.cli import main

    assert main(["verify", "--model", str(tmp_path), "--sae", "h=x", "--features", "top:3"]) == 2
    assert "needs --db and --run" in capsys.readouterr().err
    assert main(["verify", "--model", str(tmp_path), "--features", "1,2", "--db", str(tmp_path / "x.duckdb")]) == 2
    assert "--db needs --run" in capsys.readouterr().err



def test_the_run_sae_is_found_when_the_run_stored_a_list_of_sae_folders():
    """MonitorConfig(saes=[folder]) stores a list (the SAE names its hook); verify pairs it with
    the run's one probe hook (adapter hooks aside), and asks for --sae when it cannot."""
    from drift_monitor.offline.verify_run import _run_saes

    class Reader:
        def __init__(self, hooks):
            self._hooks = hooks

        def hooks(self, run_id):
            return self._hooks

    assert _run_saes({"saes": ["sae/"]}, Reader(["model.layers.15", "adapter", "adapter:q"]), "r") == {
        "model.layers.15": "sae/"}
    assert _run_saes({"saes": ["a/", "b/"]}, Reader(["h1", "h2"]), "r") == {}
    assert _run_saes({"saes": {"h": "sae/"}}, None, None) == {"h": "sae/"}
