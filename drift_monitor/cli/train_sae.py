"""``drift-monitor train-sae``: a base-model SAE for a model that has none."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..training.settings import ARCHITECTURES
    from ..training.settings import TrainSAESettings as D  # the defaults' one home (torch-free)

    t = subparsers.add_parser(
        "train-sae", help="train a base-model SAE (sae-lens format) for a model that has none",
        description="Train a sparse autoencoder on a base model's activations at each --hook, with sae-lens's "
                    "own trainer, and save it in sae-lens format with its hook and token conventions, ready for "
                    "MonitorConfig(saes=[OUT]) and drift-monitor scan. Several hooks share one activation pass; "
                    "then OUT/<hook>/ is each SAE. The first 5% of the collected sequences are held out for the "
                    "report. Resumable: run the same command again after an interruption.")
    t.add_argument("--model", required=True, help="the base model folder")
    t.add_argument("--hook", required=True, action="append",
                   help="the module whose output the SAE reads, e.g. model.layers.15; repeat it or give a comma "
                        "list (model.layers.6,model.layers.10) for one SAE per hook from one activation pass; "
                        "auto[:N]: N (4) decoder layers spread from a third of the depth to the last but one")
    t.add_argument("--out", required=True,
                   help="output folder: the SAE and train_report.json; with several hooks, one SAE folder per "
                        "hook (OUT/model.layers.6/ ...) and a summary OUT/train_report.json")
    t.add_argument("--data", action="append", default=[], metavar="FILE|DIR",
                   help="training text: .txt/.md files, JSONL ('text', 'messages' or 'prompt'/'response'), folders "
                        "of them, or a saved datasets folder (repeatable). Default: the bundled probes with the "
                        "model's own answers (small: a weak SAE)")
    t.add_argument("--tokens", type=int, default=D.tokens, help=f"activations to collect (default {D.tokens:,})")
    t.add_argument("--train-tokens", type=int, default=None,
                   help="tokens seen in training (default: 8 passes over the collected activations)")
    t.add_argument("--architecture", choices=list(ARCHITECTURES), default=D.architecture)
    t.add_argument("--d-sae", type=int, default=None, help="features (default: the power of two nearest 8 x width)")
    t.add_argument("--k", type=int, default=None, help="active features per token, topk/batchtopk "
                                                         "(default: min(32, max(8, d_sae/64)))")
    t.add_argument("--lr", type=float, default=D.lr)
    t.add_argument("--batch-size", type=int, default=D.batch_size, help="tokens per training step")
    t.add_argument("--context-size", type=int, default=D.context_size, help="tokens per sequence at collection")
    t.add_argument("--chat-fraction", type=float, default=D.chat_fraction,
                   help="share of plain documents wrapped in the chat template (the SAE learns its tokens)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype for collection (the SAE trains in float32)")
    t.add_argument("--max-memory-gb", type=float, default=None,
                   help="past this, the activations (tokens x width x 4 bytes x hooks) are kept on disk in "
                        "OUT/.partial and read from there in training (default: a quarter of RAM)")
    t.add_argument("--seed", type=int, default=D.seed)
    t.add_argument("--checkpoint-every", type=int, default=D.checkpoint_every,
                   help="training steps between resumable checkpoints")
    t.add_argument("--force", action="store_true", help="replace an SAE already in --out")
    t.add_argument("--trust-remote-code", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    return t


def run(args: argparse.Namespace) -> int:
    from ..offline.loading import load_model, load_tokenizer
    from ..training.train_sae import TrainSAESettings, train_sae

    settings = TrainSAESettings(
        hooks=args.hook, max_memory_gb=args.max_memory_gb, architecture=args.architecture, d_sae=args.d_sae,
        k=args.k, tokens=args.tokens,
        train_tokens=args.train_tokens, context_size=args.context_size, batch_size=args.batch_size, lr=args.lr,
        chat_fraction=args.chat_fraction, seed=args.seed, device=args.device, dtype=args.dtype,
        checkpoint_every=args.checkpoint_every)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code, what="--model")
    model = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                       what="--model")
    report = train_sae(model, tok, settings, args.out, data=args.data, force=args.force, model_name=args.model,
                       progress=not args.no_progress)
    print(report.format())
    saes = [(r.hook, r.out) for r in getattr(report, "reports", [report])]
    print(f"use it: MonitorConfig(saes={[o for _, o in saes]!r}) or drift-monitor scan "
          + " ".join(f"--sae {h}={o}" for h, o in saes))
    return 0
