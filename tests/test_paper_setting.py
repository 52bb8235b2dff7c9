"""The paper's own setting (docs/paper.md): the base reads the plain dialogue transcript, the chat
model its chat template; response tokens are paired by content; the paper's per-token metrics.

The reference here is written from the paper's formulas, one prompt at a time, sharing no
code with the monitor: per response token, |A ∩ B| / k with k = min(L0, L0⁰, 100), the
Jaccard, the per-token FVU ‖x − x̂‖² / ‖x − mean_d(x)‖², and the mean paired feature drift.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drift_monitor import DriftMonitor, MonitorConfig, ProbeError, ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer

HOOK_LAYER = 1
HOOK = f"model.layers.{HOOK_LAYER}"


@pytest.fixture(scope="module")
def pair():
    recs = []
    for i in range(8):
        recs.append({"id": f"h{i}", "category": "harmful", "prompt": f"how do i hurt thing number {i} ?",
                     "response": "i cannot help with that ." if i % 2 else "sure , first get ready ."})
        recs.append({"id": f"s{i}", "category": "harmless", "prompt": f"how do i bake bread number {i} ?",
                     "response": "sure , first " + "mix and wait . " * (1 + i % 3)})
    ps = ProbeSet.from_records(recs, name="pairs")
    tok = build_tokenizer([r["prompt"] + " " + r["response"] for r in recs] + ["User : Assistant :"])
    torch.manual_seed(0)
    base = build_llama(len(tok), hidden=32, layers=3, heads=4).double()
    chat = build_llama(len(tok), hidden=32, layers=3, heads=4).double()
    with torch.no_grad():
        chat.load_state_dict(base.state_dict())
        for p in chat.parameters():
            p.add_(0.15 * torch.randn_like(p) * p.std().clamp_min(1e-3))
    return ps, tok, base, chat


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[HOOK_LAYER + 1][0]


def _reference(ps, tok, base, chat, sae, k_max=100):
    """One prompt at a time: the base on "User: ...\\nAssistant: response", the chat model on its
    template; the response's tokens are the last len(response tokens) of each sequence."""
    rows = {"overlap": [], "jaccard": [], "fvu": [], "fvu0": [], "cos": [], "d": [], "f": [], "f0": []}
    for r in ps.records:
        resp = tok(r.response, add_special_tokens=False)["input_ids"]
        base_ids = tok(f"User: {r.prompt}\nAssistant: {r.response}")["input_ids"]
        msgs = [{"role": "user", "content": r.prompt}, {"role": "assistant", "content": r.response}]
        chat_ids = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        assert base_ids[-len(resp):] == resp and chat_ids[-len(resp):] == resp
        x = _hidden(chat, chat_ids)[-len(resp):]
        x0 = _hidden(base, base_ids)[-len(resp):]
        with torch.no_grad():
            f, f0 = sae.encode(x), sae.encode(x0)
            xh, xh0 = sae.decode(f), sae.decode(f0)
        for t in range(len(resp)):
            a, b = f[t].numpy(), f0[t].numpy()
            L, L0 = int((a > 0).sum()), int((b > 0).sum())
            k = min(L, L0, k_max)
            if k == 0:
                rows["overlap"].append(float(L == 0 and L0 == 0))
                rows["jaccard"].append(float(L == 0 and L0 == 0))
            else:
                A = set(np.argsort(-a, kind="stable")[:k].tolist())
                B = set(np.argsort(-b, kind="stable")[:k].tolist())
                rows["overlap"].append(len(A & B) / k)
                rows["jaccard"].append(len(A & B) / len(A | B))
            for key, xx, hh in (("fvu", x[t], xh[t]), ("fvu0", x0[t], xh0[t])):
                v = xx.numpy()
                rows[key].append(float(((v - hh.numpy()) ** 2).sum() / ((v - v.mean()) ** 2).sum()))
            u, w = x[t].numpy(), x0[t].numpy()
            rows["cos"].append(float(u @ w / np.linalg.norm(u) / np.linalg.norm(w)))
            rows["f"].append(a)
            rows["f0"].append(b)
    return {"topk_overlap": np.mean(rows["overlap"]), "topk_jaccard": np.mean(rows["jaccard"]),
            "fvu_token_mean": np.mean(rows["fvu"]), "base_fvu_token_mean": np.mean(rows["fvu0"]),
            "act_cosine": np.mean(rows["cos"]), "drift": np.mean(np.stack(rows["f"]) - np.stack(rows["f0"]), 0),
            "n": len(rows["cos"])}


def _config(ps, sae, tmp_path, **probes):
    return MonitorConfig(saes={HOOK: sae}, baseline_cache_dir=str(tmp_path),
                         probes={"source": ps, "positions": "response", "formats": "chat", "outlier_factor": None,
                                 "batch_size": 3, **probes},
                         outputs={"show_progress": False})


def test_paper_setting_equals_a_per_token_reference(pair, tmp_path):
    ps, tok, base, chat = pair
    calib = torch.cat([_hidden(base, tok(f"User: {r.prompt}\nAssistant: {r.response}")["input_ids"])
                       for r in ps.records])
    sae = build_sae(32, 128, calibrate=calib.float(), target_density=0.1).double()
    mon = DriftMonitor(_config(ps, sae, tmp_path, base_formats="dialogue"), tok)
    b = mon.baseline(base)
    snap = mon.snapshot(chat, step=1)
    ref = _reference(ps, tok, base, chat, sae)
    m = snap.hooks[HOOK].metrics
    assert snap.n_tokens == ref["n"]
    for name in ("topk_overlap", "topk_jaccard", "fvu_token_mean", "act_cosine"):
        assert m[name] == pytest.approx(ref[name], abs=1e-6), name
    assert b.hooks[HOOK].metrics["fvu_token_mean"] == pytest.approx(ref["base_fvu_token_mean"], abs=1e-6)
    np.testing.assert_allclose(snap.hooks[HOOK].features["all"].drift, ref["drift"], atol=1e-6)
    # the two settings answer different questions: shared tokens give other numbers
    shared = DriftMonitor(_config(ps, sae, tmp_path), tok)
    shared.baseline(base)
    s2 = shared.snapshot(chat, step=1).hooks[HOOK].metrics
    assert s2["topk_overlap"] != pytest.approx(m["topk_overlap"], abs=1e-6)
    assert shared.probe_hash != mon.probe_hash


def test_selectors_that_do_not_pair_across_formats_are_refused(pair, tmp_path):
    ps, tok, base, chat = pair
    sae = build_sae(32, 64).double()
    cfg = MonitorConfig(saes={HOOK: sae}, baseline_cache_dir=str(tmp_path),
                        probes={"source": ps, "positions": "prompt_end", "base_formats": "dialogue"},
                        outputs={"show_progress": False})
    with pytest.raises(ProbeError, match=r"does not pair across the formats 'dialogue' \(base\) and 'chat'.*"
                                         r"use the 'response' selector"):
        DriftMonitor(cfg, tok)


def test_real_bpe_response_pairs_by_content(tmp_path):
    """SmolLM2's BPE: after "Assistant:" the first response token carries a space (" Sure"), after
    the template's newline it does not ("Sure"): the same content, paired by its characters."""
    from transformers import AutoTokenizer

    from drift_monitor.demo.testbed import gguf_path
    from drift_monitor.probe.probes import check_paired, prepare_probes
    from drift_monitor.settings import ProbeSettings

    p = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    ps = ProbeSet.from_records([{"id": "a", "category": "harmful", "prompt": "How do I do it?",
                                 "response": "Sure, here is how."}])
    kw = dict(batch_size=1, max_length=128, positions="response")
    chat = prepare_probes(ps, tok, ProbeSettings(formats="chat", **kw))
    dia = prepare_probes(ps, tok, ProbeSettings(formats="dialogue", **kw), order=chat.order)
    check_paired(chat, dia)  # no error
    ids_c = [chat.items[0].input_ids[i] for i in chat.selected_positions(0)]
    ids_d = [dia.items[0].input_ids[i] for i in dia.selected_positions(0)]
    assert tok.decode(ids_c) == "Sure, here is how." and tok.decode(ids_d) == " Sure, here is how."
    assert ids_c[1:] == ids_d[1:] and ids_c[0] != ids_d[0]


def test_scan_cli_runs_the_paper_setting(pair, tmp_path):
    """``drift-monitor scan --base-format dialogue --model-format chat`` stores what the API's
    monitor measures in the same setting, on the same saved models."""
    import copy
    import json

    from drift_monitor.cli import main
    from drift_monitor.offline.loading import load_model
    from drift_monitor.store import StoreReader

    ps, tok, base, chat = pair
    for name, model in (("base", base), ("chat", chat)):
        copy.deepcopy(model).float().save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    sae = build_sae(32, 128, hook_name=HOOK, target_density=0.1)
    sae.save_model(str(tmp_path / "sae"))
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(r.__dict__) + "\n" for r in ps.records))
    (tmp_path / "monitor.json").write_text(json.dumps({"probes": {"positions": "response", "outlier_factor": None}}))
    db = tmp_path / "scan.duckdb"
    rc = main(["scan", "--base-model", str(tmp_path / "base"), "--model", f"1={tmp_path / 'chat'}",
               "--sae", f"{HOOK}={tmp_path / 'sae'}", "--db", str(db), "--probes", str(probes),
               "--config", str(tmp_path / "monitor.json"), "--base-format", "dialogue", "--model-format", "chat",
               "--run-name", "paper", "--no-progress"])
    assert rc == 0
    df = StoreReader(str(db)).metric_series("paper", hook=HOOK, names=["topk_overlap", "fvu_token_mean"])
    stored = {r.name: r.value for r in df[df.step == 1].itertuples()}

    cfg = MonitorConfig(saes={HOOK: str(tmp_path / "sae")}, baseline_cache_dir=str(tmp_path / "cache"),
                        probes={"source": str(probes), "positions": "response", "formats": "chat",
                                "base_formats": "dialogue", "outlier_factor": None},
                        outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    mon.baseline(load_model(str(tmp_path / "base")))
    m = mon.snapshot(load_model(str(tmp_path / "chat")), step=1).hooks[HOOK].metrics
    assert stored["topk_overlap"] == pytest.approx(m["topk_overlap"], abs=1e-6)
    assert stored["fvu_token_mean"] == pytest.approx(m["fvu_token_mean"], abs=1e-6)
