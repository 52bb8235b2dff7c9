"""`drift-monitor train-sae` with several hooks: the N-hook run's wall time against its budget, same run.

    python tests/bench/bench_train_sae_hooks.py [--hooks 4] [--tokens 20000] [--hidden 32] [--repeats 3]

On the tests' tiny model (``tests/train_fixtures.py``'s builders: a word-level tokenizer over the
probe set and a Llama of hidden 32, here with one layer per hook), it measures, best of
``--repeats``:

* ``collect(1)``: the collection stage for the deepest hook alone (tokenising + the activation
  pass stopped after that layer + the massive-norm split), as ``train_sae`` runs it;
* ``train(1)``: a one-hook ``train_sae`` run's wall time minus ``collect(1)`` (training,
  evaluation, saving);
* ``wall(N)``: an N-hook ``train_sae`` run (one activation pass, N SAEs), in memory and spilled
  to disk (``max_memory_gb=0``);

Each repeat measures all four in turn (a loaded machine's drift hits them alike); each figure is
the best over the repeats. It prints ``ratio = wall(N) / (1.3 × collect(1) + N × train(1))``: at
most 1 means that N hooks cost one collection (30% slack for the wider capture) plus N
trainings, never N collections.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from pathlib import Path

import torch


def build(hidden: int, layers: int, seed: int = 0):
    """The tiny model and tokenizer of tests/train_fixtures.py (``world``), with ``layers`` layers,
    and plain documents made of probe prompts (a few hundred tokens each)."""
    from drift_monitor import ProbeSet
    from drift_monitor.demo.tiny import build_llama, build_tokenizer
    from drift_monitor.training.sae_data import Document

    prompts = [r.prompt for r in ProbeSet.default().records]
    tok = build_tokenizer(prompts + ["Sure , here is how .", "I cannot help with that .", "Here you go ."])
    model = build_llama(len(tok), hidden=hidden, layers=layers, heads=4, seed=seed)
    model.eval()
    rng = random.Random(seed)
    docs = [Document(" ".join(rng.sample(prompts, 12))) for _ in range(600)]
    return model, tok, docs


def collect_once(model, tok, docs, settings) -> float:
    """Seconds of train_sae's collection stage for ``settings.hooks`` (no saving, no training)."""
    from drift_monitor.training.collect import collect_activations, tokenize_documents
    from drift_monitor.training.sae_data import mix_chat

    t0 = time.perf_counter()
    d = mix_chat(docs, settings.chat_fraction, settings.seed)
    random.Random(settings.seed).shuffle(d)
    seqs = tokenize_documents(d, tok, settings.context_size)
    collect_activations(model, tok, seqs, list(settings.hooks), max_tokens=settings.tokens,
                        holdout_fraction=settings.holdout_fraction, outlier_factor=settings.outlier_factor,
                        progress=False)
    return time.perf_counter() - t0


def run_once(model, tok, docs, settings, root: Path) -> float:
    from drift_monitor.training.train_sae import train_sae

    t0 = time.perf_counter()
    train_sae(model, tok, settings, root, documents=docs, force=True, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hooks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--train-tokens", type=int, default=None, help="default: 8 passes over the activations")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    from drift_monitor.training.train_sae import TrainSAESettings

    model, tok, docs = build(args.hidden, args.hooks)
    hooks = [f"model.layers.{i}" for i in range(args.hooks)]
    common = dict(tokens=args.tokens, train_tokens=args.train_tokens, batch_size=args.batch_size,
                  checkpoint_every=10**6)
    one = TrainSAESettings(hook=hooks[-1], **common)  # the deepest: the collection's worst case
    many = TrainSAESettings(hooks=hooks, **common)
    spilled = TrainSAESettings(hooks=hooks, max_memory_gb=0.0, **common)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_once(model, tok, docs, one, root / "warm")  # imports, allocator, sae-lens
        rounds = []  # interleaved, so that a neighbour's load drifting over time hits every figure alike
        for _ in range(args.repeats):
            rounds.append((collect_once(model, tok, docs, one), run_once(model, tok, docs, one, root / "one"),
                           run_once(model, tok, docs, many, root / "many"),
                           run_once(model, tok, docs, spilled, root / "spilled")))
        c1, w1, wn, ws = (min(r[i] for r in rounds) for i in range(4))
    t1 = w1 - c1
    budget = 1.3 * c1 + args.hooks * t1
    print(f"tiny Llama hidden {args.hidden}, {args.hooks} layers; {args.tokens:,} tokens, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}; best of {args.repeats}")
    print(f"  collect(1)          {c1:8.3f} s")
    print(f"  train(1)            {t1:8.3f} s   (one-hook run {w1:.3f} s)")
    print(f"  wall({args.hooks}) in memory  {wn:8.3f} s")
    print(f"  wall({args.hooks}) spilled    {ws:8.3f} s   ({ws / wn:.2f} x in memory)")
    print(f"  budget 1.3 x collect(1) + {args.hooks} x train(1) = {budget:.3f} s")
    print(f"ratio wall({args.hooks}) / budget = {wn / budget:.2f} in memory, {ws / budget:.2f} spilled (goal <= 1)")


if __name__ == "__main__":
    main()
