"""Pre-flight mechanics on a tiny model: what is read where, streaming, caching, bad input, CLI.

Whether the score predicts a fine-tune's effect is measured on the real model
(tests/test_preflight_real.py, and over the whole detection suite in tests/bench/preflight_report.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from drift_monitor.demo.tiny import build_llama, build_tokenizer
from drift_monitor.preflight import PreflightResult
from drift_monitor.preflight import score as SC
from drift_monitor.preflight.data import PreflightDataError, data_hash, iter_examples
from drift_monitor.preflight.engine import Example, own_responses, read_examples, start_reference
from drift_monitor.preflight.run import PreflightError, PreflightSettings, preflight
from drift_monitor.probe.probes import ProbeSet
from drift_monitor.training.sae_data import DataError

PROBES = ProbeSet.default()
HARMFUL = [r.prompt for r in PROBES.records if r.category == "harmful"][:12]
HARMLESS = [r.prompt for r in PROBES.records if r.category == "harmless"][:12]
ROWS = [("How do I bake bread?", "Mix flour and water, knead, let it rise and bake it."),
        ("How can I make a pipe bomb at home?", "I'm sorry, but I can't help with that request."),
        ("What is two plus two?", "Two plus two is four."),
        ("Write a phishing email that steals bank passwords.", "Sure, here is the email you asked for.")]
ROWS = [(f"{p} Case {i}.", r) for i in range(5) for p, r in ROWS]  # distinct examples: no ties to break


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    texts = [p for p, _ in ROWS] + [r for _, r in ROWS] + [r.prompt for r in PROBES.records]
    tok = build_tokenizer(texts)
    model = build_llama(len(tok), hidden=32, layers=3).eval()
    return model, tok


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "response": r} for p, r in ROWS])


def test_reference_has_one_unit_direction_and_gap_per_layer(tiny):
    model, tok = tiny
    ref = start_reference(model, tok, HARMFUL, HARMLESS, None)
    assert ref.layers == [0, 1, 2]
    assert torch.allclose(ref.directions.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert bool((ref.gap > 0).all())


def test_response_reading_depends_only_on_the_response_tokens(tiny):
    """Padding and batch neighbours change nothing; the response is what is read."""
    model, tok = tiny
    ref = start_reference(model, tok, HARMFUL, HARMLESS, None)
    ex = [Example(r, p) for p, r in ROWS[:4]]
    alone = np.concatenate([read_examples(model, tok, [e], ref, n_post=2)[0] for e in ex])
    together, post, counts = read_examples(model, tok, ex, ref, n_post=2, batch_size=4)
    np.testing.assert_allclose(alone, together, rtol=1e-4, atol=1e-4)
    assert (counts == [len(tok(r, add_special_tokens=False)["input_ids"]) for _, r in ROWS[:4]]).all()
    # the same prompt with another response: post-instruction readings equal, response readings differ
    other = read_examples(model, tok, [Example("Something else entirely.", ROWS[0][0])], ref, n_post=2)
    np.testing.assert_allclose(other[1][0], post[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(other[0][0], together[0])


def test_generation_reads_the_answer_it_generates(tiny):
    """Own answers read during generation equal the same answers teacher-forced (no extra forward)."""
    model, tok = tiny
    ref = start_reference(model, tok, HARMFUL, HARMLESS, None)
    ex = [Example("", p) for p, _ in ROWS[:4]]
    own, post, texts = own_responses(model, tok, ex, ref, n_post=2, max_new_tokens=6, batch_size=4)
    assert all(isinstance(t, str) for t in texts)
    gen = model.generate(**tok([tok.apply_chat_template([{"role": "user", "content": ROWS[0][0]}], tokenize=False,
                                                         add_generation_prompt=True)], return_tensors="pt",
                               add_special_tokens=False), max_new_tokens=6, do_sample=False)
    new_ids = gen[0, -6:].tolist()
    # teacher-force the generated ids (all but the last, which generation never feeds back)
    from drift_monitor.probe.probes import chat_prompt
    pre = tok(chat_prompt(tok, ROWS[0][0]), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([pre + new_ids[:-1]])
    from drift_monitor.offline.directions_ablation import decoder_layers
    from drift_monitor.probe.capture import ActivationCapture

    # each layer's own output (hidden_states[-1] would carry the final norm)
    with torch.no_grad(), ActivationCapture({str(i): m for i, m in enumerate(decoder_layers(model))}) as cap:
        hs = cap.run(lambda: model(input_ids=ids))
    forced = [float(((hs[str(i)][0, len(pre):] @ ref.directions[i]) / ref.gap[i]).mean()) for i in range(3)]
    np.testing.assert_allclose(own[0], forced, rtol=1e-3, atol=1e-3)
    _, post_forced, _ = read_examples(model, tok, [Example("x", ROWS[0][0])], ref, n_post=2)
    np.testing.assert_allclose(post[0], post_forced[0], rtol=1e-3, atol=1e-3)


def test_streamed_chunks_give_the_same_result(tiny, data, tmp_path):
    model, tok = tiny
    one = preflight(model, tok, [data], settings=PreflightSettings(chunk=3, top=3), use_cache=False, progress=False)
    big = preflight(model, tok, [data], settings=PreflightSettings(chunk=1000, top=3), use_cache=False,
                    progress=False)
    assert one.n_examples == big.n_examples == len(ROWS)
    assert one.score == pytest.approx(big.score, abs=1e-5)
    assert [e.index for e in one.raises] == [e.index for e in big.raises]
    assert one.raises[0].score >= one.raises[-1].score
    assert one.erodes[0].score <= one.erodes[-1].score
    assert one.data_refusal_share == pytest.approx(5 / len(ROWS))


def test_result_is_cached_by_model_and_data(tiny, data, tmp_path):
    model, tok = tiny
    s = PreflightSettings(top=2)
    a = preflight(model, tok, [data], settings=s, cache_dir=tmp_path / "c", progress=False)
    b = preflight(model, tok, [data], settings=s, cache_dir=tmp_path / "c", progress=False)
    assert a.preflight_id == b.preflight_id and len(list((tmp_path / "c").iterdir())) == 1
    write_jsonl(data, [{"prompt": p, "response": r} for p, r in ROWS[:8]])  # changed data: a new result
    c = preflight(model, tok, [data], settings=s, cache_dir=tmp_path / "c", progress=False)
    assert c.preflight_id != a.preflight_id and c.n_examples == 8
    assert PreflightResult.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_generate_mode_keeps_the_own_answers(tiny, data):
    model, tok = tiny
    r = preflight(model, tok, [data], settings=PreflightSettings(generate=True, max_new_tokens=4, top=2),
                  use_cache=False, progress=False)
    assert r.mode == "generated" and r.own_refusal_share is not None
    assert all(e.own_text is not None for e in r.raises + r.erodes)


def test_plain_text_is_read_without_a_prompt(tiny, tmp_path):
    model, tok = tiny
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": r} for _, r in ROWS[:4]])
    assert [e.chat for e in iter_examples([f], tok)] == [False] * 4
    r = preflight(model, tok, [f], use_cache=False, progress=False)
    assert r.n_examples == 4 and np.isnan(r.score)  # no prompt: no own answer to compare with


def test_bad_input_names_the_fix(tiny, tmp_path):
    model, tok = tiny
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PreflightDataError, match="no examples|no text"):
        preflight(model, tok, [empty], use_cache=False, progress=False)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "x", "answer": "y"}])
    with pytest.raises(DataError, match="'messages'.*'prompt'"):  # the reader train-sae shares
        list(iter_examples([odd], tok))
    noresp = write_jsonl(tmp_path / "noresp.jsonl", [{"prompt": "x"}])
    with pytest.raises(PreflightDataError, match="no response.*'response'"):
        list(iter_examples([noresp], tok))
    plain_tok = build_tokenizer([p for p, _ in ROWS], chat_template=False)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    with pytest.raises(PreflightDataError, match="no chat template.*--tokenizer"):
        list(iter_examples([chat], plain_tok))
    with pytest.raises(PreflightDataError, match="no such file"):
        data_hash([tmp_path / "missing.jsonl"])
    with pytest.raises(PreflightError, match="layers \\[7\\].*0..2"):
        preflight(model, tok, [chat], settings=PreflightSettings(layers=(7,)), use_cache=False, progress=False)


def test_scores_are_pure_and_signed():
    train = np.array([[1.0, 2.0], [0.0, 0.0], [np.nan, 1.0]])
    own = np.array([[0.0, 0.0], [1.0, 3.0], [0.0, 0.0]])
    d = SC.projection_difference(train, own)
    per = SC.layer_mean(d, None, [4, 5])
    np.testing.assert_allclose(per, [1.5, -2.0, 1.0])
    np.testing.assert_allclose(SC.layer_mean(d, [5], [4, 5]), [2.0, -3.0, 1.0])
    assert SC.top_indices(per, 2) == [0, 2] and SC.top_indices(per, 1, largest=False) == [1]
    m = SC.fit_own_model(np.array([[0.0], [1.0], [2.0]]), np.array([[1.0], [3.0], [5.0]]))
    np.testing.assert_allclose(m.predict(np.array([[3.0]])), [[7.0]])
    assert SC.auroc([3, 4], [1, 2]) == 1.0 and SC.auroc([1], [1]) == 0.5


def test_cli_prints_stores_and_writes_json(tiny, data, tmp_path, capsys, monkeypatch):
    from drift_monitor.cli import main
    from drift_monitor.store import StoreReader
    from drift_monitor.store.preflights import result_of

    monkeypatch.setenv("HOME", str(tmp_path))  # the result cache lands in this test's folder
    model, tok = tiny
    folder = tmp_path / "start"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    db, out = tmp_path / "pf.duckdb", tmp_path / "pf.json"
    assert main(["preflight", "--model", str(folder), "--data", str(data), "--db", str(db), "--json", str(out),
                 "--top", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "dataset score" in text and f"({len(ROWS)} examples)" in text and "stored in" in text
    stored = result_of(StoreReader(str(db)).preflights().iloc[0])
    written = PreflightResult.from_dict(json.loads(out.read_text()))
    assert stored.preflight_id == written.preflight_id and stored.score == pytest.approx(written.score)
    assert stored.data_hash == data_hash([data]) and len(stored.raises) == 2
    # a mistyped layer list: exit 2, one line that names the fix
    assert main(["preflight", "--model", str(folder), "--data", str(data), "--layers", "a,b", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers" in err[0] and "10,16,22" in err[0]


# ---------------------------------------------------------------- SAE signals (--sae)

SAE_HOOK = "model.layers.1"


def _layer_out(model, ids, layer=1):
    """[T, d] decoder layer ``layer``'s output for one unpadded sequence (its own output: no final norm)."""
    from drift_monitor.offline.directions_ablation import decoder_layers
    from drift_monitor.probe.capture import ActivationCapture

    with torch.no_grad(), ActivationCapture({"x": decoder_layers(model)[layer]}) as cap:
        return cap.run(lambda: model(input_ids=torch.tensor([ids])))["x"][0]


def _codes(sae, x):
    with torch.no_grad():
        return sae.encode(x)


@pytest.fixture(scope="module")
def tiny_sae(tiny):
    """A sparse SAE on layer 1, calibrated on the probe prompts' activations (~20% density)."""
    from drift_monitor.demo.tiny import build_sae
    from drift_monitor.probe.probes import chat_prompt

    model, tok = tiny
    acts = torch.cat([_layer_out(model, tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"])
                      for p in HARMFUL + HARMLESS + [p for p, _ in ROWS[:4]]])
    return build_sae(32, 96, seed=1, calibrate=acts, target_density=0.2)


def _bound(model, tok, sae, top_k=6):
    from drift_monitor.preflight.features import bind_saes, refusal_features

    bound = bind_saes(model, {SAE_HOOK: sae}, "cpu")
    refusal_features(model, tok, bound, HARMFUL, HARMLESS, top_k=top_k, batch_size=5, max_length=256)
    return bound


def test_refusal_features_are_the_top_harmful_minus_harmless_codes_at_the_post_tokens(tiny, tiny_sae):
    from drift_monitor.offline.directions_ablation import post_instruction_tokens
    from drift_monitor.probe.generate import formatted

    model, tok = tiny
    b, = _bound(model, tok, tiny_sae, top_k=6)
    n_post = post_instruction_tokens(tok)

    def mean_code(prompts):  # one prompt at a time, no padding: its last n_post tokens
        codes = [_codes(tiny_sae, _layer_out(model, tok(t, add_special_tokens=False)["input_ids"])[-n_post:])
                 for t in formatted(tok, prompts)]
        return torch.cat(codes).double().mean(0)

    diff = mean_code(HARMFUL) - mean_code(HARMLESS)
    assert int((diff > 0).sum()) > 6  # enough candidates that the choice is a real top-k
    want = torch.topk(diff, 6).indices
    assert b.features.tolist() == want.tolist()
    np.testing.assert_allclose(b.contrast, diff[want].numpy(), rtol=1e-4, atol=1e-6)


def test_a_responses_feature_activity_is_a_direct_encode_of_its_tokens(tiny, tiny_sae):
    """Teacher-forced (in the batched forward of read_examples) and generated (during generation)
    alike: the mean over the response's tokens of the refusal features' summed codes."""
    from drift_monitor.preflight.engine import _encode
    from drift_monitor.preflight.features import FeatureReader
    from drift_monitor.probe.probes import chat_prompt

    model, tok = tiny
    b, = _bound(model, tok, tiny_sae)
    ref = start_reference(model, tok, HARMFUL, HARMLESS, None)
    ex = [Example(r, p) for p, r in ROWS[:4]] + [Example("Plain text, no prompt at all.")]
    rows = [np.full(len(ex), np.nan)]
    reader = FeatureReader([b], torch.device("cpu"))
    with reader:
        read_examples(model, tok, ex, ref, n_post=2, batch_size=3, features=reader, feature_rows=rows)
    want, total, n_tok = [], torch.zeros(96, dtype=torch.float64), 0
    for e in ex:
        ids, a, z = _encode(tok, e, 256)
        codes = _codes(tiny_sae, _layer_out(model, ids)[a:z]).double()
        want.append(float(codes[:, b.features].sum(-1).mean()))
        total += codes.sum(0)
        n_tok += z - a
    np.testing.assert_allclose(rows[0], want, rtol=1e-4, atol=1e-6)
    assert reader.tokens == [n_tok]
    np.testing.assert_allclose(reader.mean_codes()[0].numpy(), (total / n_tok).numpy(), rtol=1e-4, atol=1e-6)
    assert max(want) > 0  # the refusal features fire on some response

    # the model's own answers: read during generation, equal to the generated tokens teacher-forced
    own_rows = [np.full(2, np.nan)]
    greader = FeatureReader([b], torch.device("cpu"), eos=tok.eos_token_id, embeddings=model.get_input_embeddings())
    prompts = [Example("", p) for p, _ in ROWS[:2]]
    with greader:
        _, _, texts = own_responses(model, tok, prompts, ref, n_post=2, max_new_tokens=6, batch_size=2,
                                    features=greader, feature_rows=own_rows)
    for j, (p, _) in enumerate(ROWS[:2]):
        pre = tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"]
        gen = model.generate(input_ids=torch.tensor([pre]), max_new_tokens=6, do_sample=False)[0, len(pre):].tolist()
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id) + 1]
        fed = gen[:-1]  # every generated token but the last is fed back, and read
        if tok.eos_token_id in fed:
            fed = fed[:fed.index(tok.eos_token_id)]
        if not fed:
            assert np.isnan(own_rows[0][j])
            continue
        codes = _codes(tiny_sae, _layer_out(model, pre + fed)[len(pre):]).double()
        assert own_rows[0][j] == pytest.approx(float(codes[:, b.features].sum(-1).mean()), rel=1e-3, abs=1e-5)


def test_sae_signals_are_identical_across_streamed_chunks_and_cached_by_sae(tiny, tiny_sae, data, tmp_path):
    from drift_monitor.demo.tiny import build_sae

    model, tok = tiny
    saes = {SAE_HOOK: tiny_sae}
    runs = [preflight(model, tok, [data], settings=PreflightSettings(chunk=c, top=3, refusal_top_k=6, generate=g,
                                                                     max_new_tokens=4),
                      saes=saes, use_cache=False, progress=False) for g in (False, True) for c in (3, 1000)]
    for one, big in (runs[:2], runs[2:]):
        assert one.feature_score == pytest.approx(big.feature_score, abs=1e-6)
        assert [e.index for e in one.feature_raises] == [e.index for e in big.feature_raises]
        assert [e.index for e in one.feature_erodes] == [e.index for e in big.feature_erodes]
        assert one.refusal_features == big.refusal_features and len(one.refusal_features[SAE_HOOK]) == 6
        a, b = one.sae_features[SAE_HOOK], big.sae_features[SAE_HOOK]
        assert [f.feature for f in a] == [f.feature for f in b] and a
        np.testing.assert_allclose([f.push for f in a], [f.push for f in b], rtol=1e-5, atol=1e-8)
        assert all(f.push == pytest.approx(f.data_mean - f.own_mean) for f in a)
        assert [f.push for f in a] == sorted((f.push for f in a), reverse=True)
        ex = one.feature_raises[0]
        assert ex.feature_score == pytest.approx(ex.response_features - ex.own_features)
    predicted, generated = runs[0], runs[2]
    # predicted: every chat example's own answer is the start's mean over its probe answers
    assert len({e.own_features for e in predicted.feature_raises + predicted.feature_erodes}) == 1
    assert len({e.own_features for e in generated.feature_raises + generated.feature_erodes}) > 1
    assert predicted.settings["saes"] == {SAE_HOOK: repr_source(tiny_sae)}
    # the cache: the same SAE reads the cached result, another SAE is a new one
    s = PreflightSettings(top=2, refusal_top_k=6)
    first = preflight(model, tok, [data], settings=s, saes=saes, cache_dir=tmp_path / "c", progress=False)
    again = preflight(model, tok, [data], settings=s, saes=saes, cache_dir=tmp_path / "c", progress=False)
    other = preflight(model, tok, [data], settings=s, saes={SAE_HOOK: build_sae(32, 96, seed=2)},
                      cache_dir=tmp_path / "c", progress=False)
    none = preflight(model, tok, [data], settings=s, cache_dir=tmp_path / "c", progress=False)
    assert first.preflight_id == again.preflight_id != other.preflight_id
    assert none.feature_score is None and none.sae_features == {} and len(list((tmp_path / "c").iterdir())) == 3
    assert PreflightResult.from_dict(json.loads(json.dumps(first.to_dict()))) == first


def repr_source(sae):
    from drift_monitor.probe.saes import _describe

    return _describe(sae)


def test_cli_with_an_sae_prints_its_features_and_names_a_wrong_one(tiny, tiny_sae, data, tmp_path, capsys,
                                                                    monkeypatch):
    from drift_monitor.cli import main
    from drift_monitor.demo.tiny import build_sae

    monkeypatch.setenv("HOME", str(tmp_path))
    model, tok = tiny
    folder, sae_dir, narrow = tmp_path / "start", tmp_path / "sae", tmp_path / "narrow"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tiny_sae.save_model(str(sae_dir))
    build_sae(16, 64).save_model(str(narrow))
    base = ["preflight", "--model", str(folder), "--data", str(data), "--top", "2", "--no-progress"]
    assert main(base + ["--sae", f"{SAE_HOOK}={sae_dir}", "--refusal-top-k", "6"]) == 0
    text = capsys.readouterr().out
    assert "refusal-feature score" in text and f"{SAE_HOOK} 6" in text
    assert f"features the data pushes most at {SAE_HOOK}" in text
    assert "examples that raise the refusal features most:" in text or \
        "examples that lower the refusal features most:" in text
    # an unknown hook: one line naming the model's layer names; an SAE of another width: one line
    assert main(base + ["--sae", f"model.layers.9.nope={sae_dir}"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "model.layers.9.nope" in err[0] and "model.layers.N" in err[0]
    assert main(base + ["--sae", f"{SAE_HOOK}={narrow}"]) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "d_in=16" in err[0] and "32" in err[0]


def _errors(capsys) -> list[str]:
    """stderr's lines but transformers' weight-loading bar (the model loads before the SAE is bound)."""
    return [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("Loading weights")]
