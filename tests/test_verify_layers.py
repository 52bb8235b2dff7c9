"""The causal check across layers (drift_monitor/offline/verify.py verify_sites,
drift_monitor/offline/directions_ablation.py): several hooks ablated together, the random
control matched per hook, the refusal direction removed at every layer, and their storage.

On a float64 tiny Llama with one ReLU SAE per hook, against formulas written out here.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations
from drift_monitor.offline.directions_ablation import (
    ablate_directions,
    decoder_layers,
    hook_layer,
    post_instruction_tokens,
    post_mask,
    random_directions,
    refusal_directions,
    resolve_layers,
)
from drift_monitor.offline.interventions import VerifyError, intervene
from drift_monitor.offline.verify import (
    Site,
    density_matched,
    feature_activity,
    format_result,
    generate_texts,
    verify,
    verify_sites,
)
from drift_monitor.offline.verify_run import parse_site_specs
from drift_monitor.probe.generate import formatted
from drift_monitor.records import VerifySettings

H0, H1 = "model.layers.0", "model.layers.1"
TEXTS = ["how do i bake bread ?", "tell me how to fix a bike .", "how do i steal a car ?",
         "explain how to make a poison .", "i cannot help with that .", "sure . here is how"]
HARMFUL, HARMLESS = TEXTS[2:4] + TEXTS[4:5], TEXTS[:2] + TEXTS[5:]


@pytest.fixture(scope="module")
def tiny():
    tok = build_tokenizer(TEXTS)
    model = build_llama(len(tok), hidden=32, layers=3, seed=3)
    saes = {h: build_sae(32, 128, calibrate=collect_activations(model, tok, TEXTS, h), target_density=0.1,
                         seed=4 + i).double() for i, h in enumerate((H0, H1))}
    return tok, model.double(), saes


def _outputs(model, tok, texts, ctx=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every decoder layer's output (seen by hooks registered after any intervention's) and the mask."""
    enc = tok(formatted(tok, texts), padding=True, return_tensors="pt", add_special_tokens=False)
    seen: dict[int, torch.Tensor] = {}
    layers = model.model.layers
    with ctx() if ctx else torch.no_grad():
        hs = [m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o if torch.is_tensor(o) else o[0]))
              for k, m in enumerate(layers)]
        try:
            with torch.no_grad():
                model(**enc, use_cache=False)
        finally:
            for h in hs:
                h.remove()
    return [seen[k] for k in range(len(layers))], enc["attention_mask"]


def _ablated_by_hand(sae, x: torch.Tensor, feats: list[int]) -> torch.Tensor:
    with torch.no_grad():
        codes = sae.encode(x)
        return x - codes[..., feats] @ sae.W_dec[feats]


def _fired(sae, x: torch.Tensor, n: int = 3) -> list[int]:
    with torch.no_grad():
        return torch.argsort(-(sae.encode(x) > 0).sum((0, 1)))[:n].tolist()


def test_ablating_two_sites_edits_both_outputs_as_each_site_alone(tiny):
    tok, model, saes = tiny
    xs, _ = _outputs(model, tok, TEXTS)
    f0, f1 = _fired(saes[H0], xs[0]), _fired(saes[H1], xs[1])

    def both():
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(intervene(model, H0, saes[H0], ablate=f0))
        stack.enter_context(intervene(model, H1, saes[H1], ablate=f1))
        return stack

    joint, _ = _outputs(model, tok, TEXTS, both)
    only0, _ = _outputs(model, tok, TEXTS, lambda: intervene(model, H0, saes[H0], ablate=f0))
    # site 0: exactly its own ablation; site 1: its ablation of what it receives once site 0 is edited
    torch.testing.assert_close(joint[0], _ablated_by_hand(saes[H0], xs[0], f0), atol=1e-7, rtol=0)
    torch.testing.assert_close(joint[1], _ablated_by_hand(saes[H1], only0[1], f1), atol=1e-7, rtol=0)
    assert not torch.allclose(only0[1], xs[1]) and not torch.allclose(joint[1], only0[1])


def test_verify_sites_matches_random_sets_per_site_and_stores_a_combined_label(tiny, tmp_path):
    tok, model, saes = tiny
    xs, _ = _outputs(model, tok, TEXTS)
    f0, f1 = _fired(saes[H0], xs[0], 2), _fired(saes[H1], xs[1], 3)
    word = generate_texts(model, tok, HARMFUL[:1], VerifySettings(max_new_tokens=4))[0].split()[0]
    s = VerifySettings(max_new_tokens=4, batch_size=4, n_random=2, refusal_phrases=(word,), seed=5)
    sites = [Site(H0, saes[H0], tuple(f0)), Site(H1, saes[H1], tuple(f1))]
    res = verify_sites(model, tok, sites, HARMFUL, HARMLESS, base_model=model, settings=s, progress=False,
                       run_id="r1", step=3)
    assert [c.condition for c in res.conditions] == ["fine_tuned", "ablated", "random", "random", "base",
                                                     "steered_base"]
    assert res.hook == f"{H0}+{H1}" and res.site_features == {H0: f0, H1: f1} and res.hooks == [H0, H1]
    assert res.rows("ablated")[0].by_hook == {H0: f0, H1: f1} and res.features == f0 + f1
    assert len(res.steer_scales) == 5

    # the random draws: per site, the density-matched sets the same rng sequence gives
    rng = random.Random(s.seed)
    dens = {h: feature_activity(model, tok, saes[h], h, HARMFUL + HARMLESS, s)[0] for h in (H0, H1)}
    for row in res.rows("random"):
        want = {h: density_matched(f, dens[h], s.random_pool, rng) for h, f in ((H0, f0), (H1, f1))}
        assert row.by_hook == want
        assert len(row.by_hook[H0]) == 2 and len(row.by_hook[H1]) == 3
        assert not set(row.by_hook[H0]) & set(f0) and not set(row.by_hook[H1]) & set(f1)

    # the ablated condition is the two-site ablation: its KL is that of both hooks at once
    text = format_result(res)
    assert f"{H0} {f0} + {H1} {f1}" in text and "density-matched random features removed (control)" in text

    from drift_monitor.store import Store, StoreReader

    db = tmp_path / "v.duckdb"
    Store(db, run_id="r1").write_verification(res)
    reader = StoreReader(db)
    for h in (H0, H1, f"{H0}+{H1}"):  # the dashboard asks by one hook: a check over both is at each
        got = reader.verifications(run_id="r1", hook=h)
        assert got["condition"].tolist() == [c.condition for c in res.conditions], h
    assert reader.verifications(run_id="r1", hook="model.layers.2").empty
    got = reader.verifications(run_id="r1")
    assert got["features"].iloc[1] == f"{H0}:{','.join(map(str, f0))} {H1}:{','.join(map(str, f1))}"
    summary = json.loads(got["summary_json"].iloc[0])
    assert summary["hooks"] == [H0, H1] and summary["site_features"] == {H0: f0, H1: f1}


def test_one_hook_is_unchanged(tiny):
    tok, model, saes = tiny
    s = VerifySettings(max_new_tokens=2, batch_size=4, n_random=1)
    res = verify(model, tok, saes[H1], H1, [5, 17], HARMFUL, HARMLESS, settings=s, progress=False)
    assert res.hook == H1 and res.site_features == {} and res.direction_layers == []
    assert all(c.by_hook == {} for c in res.conditions)
    assert [c.condition for c in res.conditions] == ["fine_tuned", "ablated", "random"]


def test_post_mask_takes_the_last_real_tokens_on_either_padding_side():
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    left = right.flip(-1)
    want_r = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(post_mask(right, 2), want_r)
    assert torch.equal(post_mask(left, 2), torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool))
    assert torch.equal(post_mask(torch.tensor([[1, 0, 0]]), 4), torch.tensor([[True, False, False]]))


def test_post_instruction_tokens_are_the_probe_batchs_prompt_end(tiny):
    """The template's text after the user's words, as ProbeBatch.post reads it (prompt_end)."""
    from drift_monitor.probe.probes import ProbeRecord, tokenize_probe

    tok = tiny[0]
    n = post_instruction_tokens(tok)
    for text in TEXTS:
        item = tokenize_probe(tok, ProbeRecord("p", "harmful", text), 256)
        assert item.prompt_len - item.content[1] == n
    assert post_instruction_tokens(build_tokenizer(TEXTS, chat_template=False)) == 4


def _directions_by_hand(model, tok, n_post: int) -> torch.Tensor:
    means = []
    for prompts in (HARMFUL, HARMLESS):
        outs, mask = _outputs(model, tok, prompts)
        post = post_mask(mask, n_post)
        means.append(torch.stack([o[post].mean(0) for o in outs]))
    r = means[0] - means[1]
    return r / r.norm(dim=-1, keepdim=True)


def test_direction_ablation_removes_each_layers_refusal_direction(tiny):
    tok, model, _ = tiny
    s = VerifySettings(batch_size=2)
    layers = resolve_layers(model, None)
    assert layers == [0, 1, 2] and len(decoder_layers(model)) == 3 and hook_layer(model, H1) == 1
    r_hat = refusal_directions(model, tok, HARMFUL, HARMLESS, s, layers)
    torch.testing.assert_close(r_hat, _directions_by_hand(model, tok, post_instruction_tokens(tok)),
                               atol=1e-10, rtol=0)
    plain, mask = _outputs(model, tok, TEXTS)
    m = mask.bool()
    assert all(float((o[m] @ r_hat[i]).abs().max()) > 1e-3 for i, o in enumerate(plain))
    cut, _ = _outputs(model, tok, TEXTS, lambda: ablate_directions(model, layers, r_hat))
    for i, o in enumerate(cut):  # every layer output: no component on its own direction
        assert float((o[m] @ r_hat[i]).abs().max()) < 1e-9
    # the control: random unit directions, reproducible, removed the same way
    rnd = random_directions(3, 32, seed=0)
    torch.testing.assert_close(rnd.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(rnd, random_directions(3, 32, seed=0)) and not torch.equal(rnd, random_directions(3, 32, 1))
    cut_r, _ = _outputs(model, tok, TEXTS, lambda: ablate_directions(model, layers, rnd))
    for i, o in enumerate(cut_r):
        assert float((o[m] @ rnd[i]).abs().max()) < 1e-9
    # a chosen subset of layers: the others are untouched; the hooks are gone afterwards
    only1, _ = _outputs(model, tok, TEXTS, lambda: ablate_directions(model, [1], r_hat[1:2]))
    torch.testing.assert_close(only1[0], plain[0], atol=0, rtol=0)
    assert float((only1[1][m] @ r_hat[1]).abs().max()) < 1e-9
    after, _ = _outputs(model, tok, TEXTS)
    torch.testing.assert_close(after[2], plain[2], atol=0, rtol=0)
    with pytest.raises(VerifyError, match="decoder layers 0..2"):
        resolve_layers(model, [3])


def test_verify_runs_the_direction_conditions_and_reports_them(tiny):
    tok, model, saes = tiny
    s = VerifySettings(max_new_tokens=3, batch_size=4, n_random=1, direction_ablation=True, direction_layers=(0, 2))
    res = verify(model, tok, saes[H1], H1, [5, 17], HARMFUL, HARMLESS, settings=s, progress=False)
    assert [c.condition for c in res.conditions] == ["fine_tuned", "ablated", "random", "direction_ablated",
                                                     "random_direction_ablated"]
    assert res.direction_layers == [0, 2]
    assert res.rows("direction_ablated")[0].kl_harmless > 0 and res.rows("random_direction_ablated")[0].seed == 0
    text = format_result(res)
    assert "refusal direction removed at every chosen layer (reference)" in text
    assert "a random direction per layer removed (control)" in text and "layers 0,2" in text
    assert "verdict (on the features)" in text


def test_feature_specs_per_hook():
    hooks = [H0, H1]
    assert parse_site_specs("emerging", hooks) == {H0: ("emerging", 0), H1: ("emerging", 0)}
    assert parse_site_specs(["top:3"], hooks) == {H0: ("top", 3), H1: ("top", 3)}
    assert parse_site_specs("1,2", [H1]) == {H1: [1, 2]}
    assert parse_site_specs([f"{H0}:1,2", f"{H1}:top:2"], hooks) == {H0: [1, 2], H1: ("top", 2)}
    assert parse_site_specs([f"{H1}:7"], hooks) == {H1: [7]}  # only the named hooks are checked
    assert parse_site_specs([f"{H1}:7", "emerging"], hooks) == {H0: ("emerging", 0), H1: [7]}
    assert parse_site_specs([f"{H0}:7", "1,2"], hooks) == {H0: [7], H1: [1, 2]}  # ids for the one left
    with pytest.raises(VerifyError, match="write HOOK:IDS"):
        parse_site_specs("1,2", hooks)
    with pytest.raises(VerifyError, match="no SAE at hook"):
        parse_site_specs(["model.layers.9:1"], hooks)
    with pytest.raises(VerifyError, match="one spec for every hook"):
        parse_site_specs(["1", "2"], [H0])


def test_cli_takes_several_saes_and_feature_specs(tmp_path, capsys):
    from drift_monitor.cli import main

    assert main(["verify", "--model", str(tmp_path), "--sae", f"{H0}=a", "--sae", f"{H1}=b",
                 "--features", "1,2"]) == 2
    assert "write HOOK:IDS" in capsys.readouterr().err
    assert main(["verify", "--model", str(tmp_path), "--sae", f"{H0}=a", "--features", f"{H0}:top:2"]) == 2
    assert "needs --db and --run" in capsys.readouterr().err
    assert main(["verify", "--model", str(tmp_path), "--sae", f"{H0}=a", "--features", "1",
                 "--direction-layers", "x"]) == 2
    assert "--direction-layers 'x'" in capsys.readouterr().err


def test_the_runs_saes_are_every_folder_named_by_its_hook(tmp_path):
    """A run configured with several SAE folders: each folder's cfg.json names its hook, so
    ``verify --db --run`` checks every monitored hook without --sae."""
    from drift_monitor.offline.verify_run import _run_saes

    for name, hook in (("a", H0), ("b", H1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cfg.json").write_text(json.dumps({"metadata": {"hook_name": hook}}))
    got = _run_saes({"saes": [str(tmp_path / "a"), str(tmp_path / "b")]}, None, None)
    assert got == {H0: str(tmp_path / "a"), H1: str(tmp_path / "b")}
