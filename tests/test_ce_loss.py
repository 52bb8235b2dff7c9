"""CE-loss transfer checked against sae-lens's own evaluation on the same model, SAE and tokens.

sae-lens's ``get_recons_loss`` runs on a TransformerLens-style model (``model(tokens,
return_type="both", loss_per_token=True)`` and ``run_with_hooks``). ``Hooked`` gives our
Hugging Face model that surface with plain torch hooks and TransformerLens's own per-token loss,
so the splice, the zero ablation and the loss are sae-lens's and TransformerLens's code, not
ours; ``ignore_tokens=[bos]`` is the convention our splice keeps at position 0.
"""

from __future__ import annotations

import pytest
import torch

from drift_monitor import ProbeSet
from drift_monitor.demo.tiny import build_llama, build_sae, build_tokenizer, collect_activations
from drift_monitor.probe.ce import CEBatch, ce_losses, token_losses

HOOK = "model.layers.1"


class Hooked:
    """The HookedRootModule surface sae-lens's get_recons_loss uses, over a HF causal LM."""

    def __init__(self, model):
        self.model = model

    def __call__(self, tokens, return_type="both", loss_per_token=True, **_):
        import transformer_lens.utils as tl

        logits = self.model(input_ids=tokens).logits
        return logits, tl.lm_cross_entropy_loss(logits, tokens, per_token=loss_per_token)

    def run_with_hooks(self, tokens, fwd_hooks=(), **kw):
        modules = dict(self.model.named_modules())
        handles = [modules[name].register_forward_hook(lambda _m, _i, out, fn=fn: fn(out, None))
                   for name, fn in fwd_hooks]
        try:
            return self(tokens, **kw)
        finally:
            for h in handles:
                h.remove()


@pytest.fixture(scope="module")
def world():
    texts = [r.prompt for r in ProbeSet.default().records if r.category == "general"]
    tok = build_tokenizer(texts, chat_template=False)
    model = build_llama(len(tok), hidden=48, layers=3, seed=3).double()  # float64: the score divides differences
    acts = collect_activations(model, tok, texts, HOOK).float()
    sae = build_sae(48, 256, calibrate=acts, target_density=0.05, seed=4).double()
    # equal-length rows (sae-lens's batches have no padding), BOS first and nowhere else
    ids = [tok(t)["input_ids"] for t in texts]
    width = min(len(i) for i in ids)
    batch = torch.tensor([i[:width] for i in ids if len(i) >= width])
    assert (batch[:, 1:] != tok.bos_token_id).all() and (batch[:, 0] == tok.bos_token_id).all()
    return tok, model, sae, batch


def test_ce_losses_equal_sae_lens_evaluation(world):
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    tok, model, sae, batch = world
    ref = get_recons_loss(sae, Hooked(model), ActivationScaler(), batch, compute_kl=False, compute_ce_loss=True,
                          ignore_tokens=[tok.bos_token_id], hook_name=HOOK)
    ours = ce_losses(model, [CEBatch(batch, torch.ones_like(batch))], {HOOK: sae}, torch.device("cpu"))[HOOK]
    assert ours.n_tokens == batch.numel() - batch.shape[0]
    assert ours.clean == pytest.approx(float(ref["ce_loss_without_sae"].mean()), abs=1e-4)
    assert ours.spliced == pytest.approx(float(ref["ce_loss_with_sae"].mean()), abs=1e-4)
    assert ours.zero == pytest.approx(float(ref["ce_loss_with_ablation"].mean()), abs=1e-4)
    score = (ref["ce_loss_with_ablation"].mean() - ref["ce_loss_with_sae"].mean()) / \
        (ref["ce_loss_with_ablation"].mean() - ref["ce_loss_without_sae"].mean())
    assert ours.score == pytest.approx(float(score), abs=1e-4)


def test_padding_is_not_a_token(world):
    """Right padding changes nothing: the padded rows' CE equals the unpadded rows'."""
    _, model, _, batch = world
    padded = torch.cat([batch, torch.zeros(batch.shape[0], 3, dtype=batch.dtype)], 1)
    mask = torch.cat([torch.ones_like(batch), torch.zeros(batch.shape[0], 3, dtype=batch.dtype)], 1)
    with torch.no_grad():
        a = token_losses(model(input_ids=batch).logits, batch, torch.ones_like(batch)).sum()
        b = token_losses(model(input_ids=padded, attention_mask=mask).logits, padded, mask).sum()
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_the_monitor_measures_them_at_their_cadence(world, tmp_path):
    """At the base and at steps divisible by every_n_steps × ce_every_n_snapshots; the same
    numbers as ce_losses on the general probes' batches."""
    from drift_monitor import DriftMonitor, MonitorConfig
    from drift_monitor.probe.ce import ce_batches

    tok, model, sae, _ = world
    probes = ProbeSet.default().filter(["general", "harmless"])
    cfg = MonitorConfig(saes={HOOK: sae}, probes={"source": probes, "batch_size": 4},
                        cadence={"every_n_steps": 5, "ce_every_n_snapshots": 2}, baseline_cache_dir=str(tmp_path),
                        outputs={"show_progress": False})
    mon = DriftMonitor(cfg, tok)
    base = mon.baseline(model).hooks[HOOK].metrics
    general = [r.prompt for r in probes.records if r.category == "general"]
    want = ce_losses(model, ce_batches(general, tok, 4, 128), {HOOK: sae}, torch.device("cpu"))[HOOK].metrics()
    assert {k: base[k] for k in want} == pytest.approx(want, abs=1e-9)
    assert "ce_loss_score" not in mon.snapshot(model, step=5).hooks[HOOK].metrics
    at10 = mon.snapshot(model, step=10).hooks[HOOK].metrics
    assert at10["ce_loss_delta"] == pytest.approx(want["ce_loss_delta"], abs=1e-9)
