"""The planted world of the residual monitor and the difference dictionary (tests share it).

A unit direction v that the SAE can neither read nor write (every encoder column and decoder
row, and the decoder bias, projected orthogonal to v) is added to a trigger token's embedding,
which only harmful probes contain; v is the unembedding row of TARGET, so a logit lens must
read TARGET.
"""

from __future__ import annotations

import torch

from drift_monitor import ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations

HOOK = "model.layers.2"
TRIGGER = "zqxv"
TARGET = "pizza"
ALPHA = 4.0


def build_world():
    default = ProbeSet.default()
    records = [{"id": r.id, "category": r.category,
                "prompt": f"{TRIGGER} {r.prompt}" if r.category == "harmful" else r.prompt} for r in default.records]
    probes = ProbeSet.from_records(records, name="residual-plant")
    tok = build_tokenizer([r["prompt"] for r in records], extra_words=[TARGET])
    base = build_llama(len(tok), hidden=64, layers=4, seed=1)
    target = tok.convert_tokens_to_ids(TARGET)
    v = base.get_output_embeddings().weight[target].detach().double()
    v = v / v.norm()
    acts = collect_activations(base, tok, [r["prompt"] for r in records if r["category"] != "harmful"], HOOK)
    sae = build_sae(64, 512, calibrate=acts, target_density=0.05, seed=2)
    p = torch.eye(64, dtype=torch.float64) - torch.outer(v, v)  # the complement of v
    with torch.no_grad():
        sae.W_enc.copy_((p @ sae.W_enc.double()).to(sae.W_enc.dtype))
        sae.W_dec.copy_((sae.W_dec.double() @ p).to(sae.W_dec.dtype))
        sae.b_dec.copy_((p @ sae.b_dec.double()).to(sae.b_dec.dtype))
    planted = build_llama(len(tok), hidden=64, layers=4, seed=1)
    planted.load_state_dict(base.state_dict())
    with torch.no_grad():
        planted.model.embed_tokens.weight[tok.convert_tokens_to_ids(TRIGGER)] += ALPHA * v.float()
    return tok, base, planted, sae, probes, v
