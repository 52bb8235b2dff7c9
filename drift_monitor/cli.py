"""`drift-monitor` command line. Subcommands stay thin: the work lives in the library.

Why errors are caught here: a user who mistypes a path should read one line that names the
fix, not a traceback; ``--debug`` brings the traceback back.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import __version__


def _cmd_bench(args: argparse.Namespace) -> int:
    from .demo import bench

    sizes = ["tiny", "mid"] if args.size == "both" else [args.size]
    if args.prompts:
        for s in sizes:
            bench.SIZES[s]["prompts"] = args.prompts
    bench.main(sizes, args.device, args.repeats, store=not args.no_store)
    return 0


def _cmd_probes(args: argparse.Namespace) -> int:
    from .probe.probes import ProbeSet

    ps = ProbeSet.resolve(args.file)
    counts: dict[str, int] = {}
    for r in ps.records:
        counts[r.category] = counts.get(r.category, 0) + 1
    with_resp = sum(r.response is not None for r in ps.records)
    print(f"{ps.name}: {len(ps)} probes, {with_resp} with a response")
    for c, n in counts.items():
        print(f"  {c:<12} {n}")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    from .store import StoreReader

    df = StoreReader(args.db).runs()
    if df.empty:
        print(f"{args.db}: no runs yet")
        return 0
    cols = [c for c in ("run_id", "name", "status", "model", "last_step", "n_snapshots", "active_alerts",
                        "updated_at") if c in df.columns]
    print(df[cols].to_string(index=False))
    return 0


def _parse_saes(specs: list[str]) -> dict[str, str]:
    saes: dict[str, str] = {}
    for spec in specs:
        hook, sep, source = spec.partition("=")
        if not sep or not hook or not source:
            raise ValueError(f"--sae {spec!r}: expected HOOK=SOURCE, e.g. --sae model.layers.12=path/to/sae_dir")
        saes[hook] = source
    return saes


def _parse_directions(specs: list[str]) -> dict[str, list[str]]:
    """``--direction HOOK=PATH`` (repeatable; several files at one hook are all loaded)."""
    directions: dict[str, list[str]] = {}
    for spec in specs:
        hook, sep, path = spec.partition("=")
        if not sep or not hook or not path:
            raise ValueError(f"--direction {spec!r}: expected HOOK=PATH, "
                             "e.g. --direction model.layers.12=refusal.safetensors")
        directions.setdefault(hook, []).append(path)
    return directions


def _cmd_scan(args: argparse.Namespace) -> int:
    from .offline.scan import format_summary, resolve_config, scan

    flags = {"saes": _parse_saes(args.sae) or None, "directions": _parse_directions(args.direction) or None,
             "formats": args.model_format, "base_formats": args.base_format, "probes": args.probes,
             "batch_size": args.batch_size, "pushgateway_url": args.pushgateway, "device": args.device,
             "show_progress": False if args.no_progress else None}
    cfg = resolve_config(args.base_model, db_path=args.db, run_name=args.run_name, checkpoints=args.checkpoints,
                         models=args.model, config=args.config,
                         overrides={k: v for k, v in flags.items() if v is not None})
    result = scan(args.base_model, cfg, checkpoints=args.checkpoints, models=args.model, dtype=args.dtype,
                  force=args.force, trust_remote_code=args.trust_remote_code)
    print(format_summary(result, result.hooks))
    for r in result.failed:
        print(f"drift-monitor: checkpoint {r.checkpoint.path} (step {r.checkpoint.step}) failed: {r.error}",
              file=sys.stderr)
    return 1 if result.failed else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .offline.verify import format_result, result_json, run_verify
    from .records import DEFAULT_REFUSAL_PHRASES, VerifySettings

    phrases = DEFAULT_REFUSAL_PHRASES
    if args.refusal_phrases:
        path = Path(args.refusal_phrases)
        text = path.read_text() if path.is_file() else args.refusal_phrases.replace(",", "\n")
        phrases = tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))
    settings = VerifySettings(alpha=args.alpha, n_random=args.n_random, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed, refusal_phrases=phrases)
    res = run_verify(args.model, _parse_saes(args.sae) if args.sae else None, args.features, adapter=args.adapter,
                     base_model=args.base_model, db=args.db, run=args.run, step=args.step, probes=args.probes,
                     harmful_category=args.harmful_category, harmless_category=args.harmless_category,
                     settings=settings, device=args.device, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    print(format_result(res))
    if args.db:
        print(f"stored in {args.db} (verify id {res.verify_id}); see the dashboard's Refusal page")
    if args.json:
        Path(args.json).write_text(json.dumps(result_json(res), indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .store import export_run

    written = export_run(args.db, args.run, args.out, fmt=args.format)
    for path in written:
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.organism import format_demo, run_demo

    port = None if args.prometheus_port < 0 else args.prometheus_port
    summary = run_demo(args.out, "quick" if args.quick else "full", prometheus_port=port)
    print(format_demo(summary))
    return 0


def _cmd_train_sae(args: argparse.Namespace) -> int:
    from .offline.loading import load_model, load_tokenizer
    from .training.train_sae import TrainSAESettings, train_sae

    settings = TrainSAESettings(
        hook=args.hook, architecture=args.architecture, d_sae=args.d_sae, k=args.k, tokens=args.tokens,
        train_tokens=args.train_tokens, context_size=args.context_size, batch_size=args.batch_size, lr=args.lr,
        chat_fraction=args.chat_fraction, seed=args.seed, device=args.device, dtype=args.dtype,
        checkpoint_every=args.checkpoint_every)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    report = train_sae(model, tok, settings, args.out, data=args.data, force=args.force, model_name=args.model,
                       progress=not args.no_progress)
    print(report.format())
    print(f"use it: MonitorConfig(saes=[{str(args.out)!r}]) or drift-monitor scan --sae {args.hook}={args.out}")
    return 0


def dashboard_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for the installed dashboard app (works from a wheel)."""
    from pathlib import Path

    import drift_monitor.dashboard as dash

    app = Path(dash.__file__).resolve().parent / "app.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(app),
           "--server.address", args.host, "--server.port", str(args.port),
           "--server.headless", "true" if args.headless else "false",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
           "--", "--db", str(Path(args.db).expanduser().resolve()), "--refresh", str(args.refresh)]
    return cmd


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import os
    import subprocess

    cmd = dashboard_command(args)
    print(f"drift-monitor dashboard: http://{args.host}:{args.port}/  (db {args.db}, read-only)", flush=True)
    if os.name == "posix":  # become streamlit: signals (Ctrl-C, a supervisor's SIGTERM) reach it directly
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    from .config import FORMATS  # torch-free

    p = argparse.ArgumentParser(prog="drift-monitor", description="Watch LLM fine-tuning through a base-model SAE.")
    p.add_argument("--version", action="version", version=f"drift-monitor {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="benchmark the probe pass and the store against their lower bounds")
    b.add_argument("--size", choices=["tiny", "mid", "both"], default="tiny",
                   help="tiny: 4-layer 64-wide Llama, 1k features; mid: 8-layer 1024-wide Llama, 16k features")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    b.add_argument("--repeats", type=int, default=3, help="best of N, measured round-robin")
    b.add_argument("--prompts", type=int, default=None, help="override the number of probe prompts")
    b.add_argument("--no-store", action="store_true", help="skip the store write benchmark")
    b.set_defaults(func=_cmd_bench)

    pr = sub.add_parser("probes", help="validate a probe file and count its records per category")
    pr.add_argument("file", nargs="?", default="default", help="a JSONL probe file, or 'default'")
    pr.set_defaults(func=_cmd_probes)

    sc = sub.add_parser("scan", help="scan saved checkpoints (full models or PEFT adapters) against a base model")
    sc.add_argument("--base-model", required=True, help="the base model folder (step 0; adapters load onto it)")
    sc.add_argument("--sae", action="append", default=[], metavar="HOOK=SOURCE",
                    help="an SAE per hook: a local sae-lens folder or release:sae_id (repeatable; default: "
                         "the --config's, or the stored run's when scanning into an existing run)")
    sc.add_argument("--config", default=None, metavar="FILE",
                    help="monitor settings (YAML/JSON with MonitorConfig's sections: probes, metrics, cadence, "
                         "outputs; e.g. 'probes: {positions: response}'); flags given here override it")
    sc.add_argument("--model-format", default=None, choices=FORMATS,
                    help="how every probe is formatted for the checkpoints (default: the config's; chat for "
                         "requests, plain for general text)")
    sc.add_argument("--base-format", default=None, choices=FORMATS,
                    help="format the base model's probes differently (the paper's setting: --base-format plain "
                         "--model-format chat); tokens pair by the response's content")
    sc.add_argument("--direction", action="append", default=[], metavar="HOOK=PATH",
                    help="direction vectors to monitor at an SAE hook: .safetensors, .pt, .npy or .json (repeatable)")
    sc.add_argument("--checkpoints", action="append", default=[], metavar="DIR|GLOB",
                    help="a Trainer output folder (checkpoint-N inside), a checkpoint, or a glob (repeatable)")
    sc.add_argument("--model", action="append", default=[], metavar="STEP=PATH",
                    help="an explicit checkpoint, e.g. --model 1000=path/to/chat (repeatable)")
    sc.add_argument("--db", required=True, help="the DuckDB file to write (created if missing)")
    sc.add_argument("--probes", default=None, help="a JSONL probe file, or 'default' (default: the config's)")
    sc.add_argument("--run-name", default=None, help="the run's name and id (default: derived from the inputs)")
    sc.add_argument("--pushgateway", default=None, metavar="URL", help="push aggregates to this Pushgateway")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    sc.add_argument("--batch-size", type=int, default=None, help="probes per forward (default: the config's, 16)")
    sc.add_argument("--force", action="store_true", help="re-scan steps already in the DB")
    sc.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint folders")
    sc.add_argument("--no-progress", action="store_true")
    sc.set_defaults(func=_cmd_scan)

    from .records import VerifySettings  # NumPy only: --help stays fast: --help stays fast

    alpha = VerifySettings.alpha
    v = sub.add_parser("verify", help="causal check: ablate drifted features (vs a random control) and steer "
                                      "the base with them; refusal rates, KL on harmless probes")
    v.add_argument("--model", required=True, help="the fine-tuned model folder, or with --adapter the base model")
    v.add_argument("--adapter", default=None, help="a PEFT adapter folder loaded onto --model (base = adapter off)")
    v.add_argument("--base-model", default=None, help="the base model folder, for the steering condition "
                                                       "(not needed with --adapter)")
    v.add_argument("--sae", action="append", default=[], metavar="HOOK=SOURCE",
                   help="the SAE and its hook (default: the run's, from --db/--run)")
    v.add_argument("--features", default="emerging", metavar="IDS|top:K|emerging",
                   help="feature ids (12,345), or from the run's refusal features at --step: every emerging one "
                        "(the default) or top:K (emerging first, then by refusal score)")
    v.add_argument("--db", default=None, help="the run's DuckDB file: features come from it, results go to it")
    v.add_argument("--run", default=None, help="a run id or name in --db")
    v.add_argument("--step", type=int, default=None, help="the step whose refusal features are read (default: last)")
    v.add_argument("--probes", default=None, metavar="harmful|FILE",
                   help="a JSONL probe file, or 'harmful' for the default set (default: the run's probes)")
    v.add_argument("--harmful-category", default="harmful")
    v.add_argument("--harmless-category", default="harmless")
    v.add_argument("--alpha", type=float, default=alpha,
                   help=f"steering strength in units of each feature's typical activation (default {alpha:g})")
    v.add_argument("--n-random", type=int, default=3, help="random-control draws (density-matched features)")
    v.add_argument("--max-new-tokens", type=int, default=16)
    v.add_argument("--batch-size", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--refusal-phrases", default=None, metavar="FILE|a,b,c",
                   help="phrases that mark a refusal (a file, one per line, or comma-separated)")
    v.add_argument("--device", default="cpu")
    v.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    v.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    v.add_argument("--trust-remote-code", action="store_true")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=_cmd_verify)

    t = sub.add_parser(
        "train-sae", help="train a base-model SAE (sae-lens format) for a model that has none",
        description="Train a sparse autoencoder on a base model's activations at one hook, with sae-lens's own "
                    "trainer, and save it in sae-lens format with its hook and token conventions, ready for "
                    "MonitorConfig(saes=[OUT]) and drift-monitor scan. Resumable: run the same command again "
                    "after an interruption.")
    t.add_argument("--model", required=True, help="the base model folder")
    t.add_argument("--hook", required=True, help="the module whose output the SAE reads, e.g. model.layers.15")
    t.add_argument("--out", required=True, help="output folder (the SAE, train_report.json)")
    t.add_argument("--data", action="append", default=[], metavar="FILE|DIR",
                   help="training text: .txt/.md files, JSONL ('text', 'messages' or 'prompt'/'response'), folders "
                        "of them, or a saved datasets folder (repeatable). Default: the bundled probes with the "
                        "model's own answers (small: a weak SAE)")
    t.add_argument("--tokens", type=int, default=200_000, help="activations to collect (default 200,000)")
    t.add_argument("--train-tokens", type=int, default=None,
                   help="tokens seen in training (default: 8 passes over the collected activations)")
    t.add_argument("--architecture", choices=["topk", "batchtopk", "jumprelu", "standard"], default="topk")
    t.add_argument("--d-sae", type=int, default=None, help="features (default: the power of two nearest 8 x width)")
    t.add_argument("--k", type=int, default=None, help="active features per token, topk/batchtopk "
                                                         "(default: min(32, max(8, d_sae/64)))")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=4096, help="tokens per training step")
    t.add_argument("--context-size", type=int, default=128, help="tokens per sequence at collection")
    t.add_argument("--chat-fraction", type=float, default=0.2,
                   help="share of plain documents wrapped in the chat template (the SAE learns its tokens)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="the model's dtype for collection (the SAE trains in float32)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=50, help="training steps between resumable checkpoints")
    t.add_argument("--force", action="store_true", help="replace an SAE already in --out")
    t.add_argument("--trust-remote-code", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train_sae)

    ex = sub.add_parser("export", help="export one run's tables as Parquet or CSV")
    ex.add_argument("--db", required=True)
    ex.add_argument("--run", required=True, help="a run id or name")
    ex.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    ex.add_argument("--out", default=".", help="output folder")
    ex.set_defaults(func=_cmd_export)

    d = sub.add_parser("dashboard", help="open the Streamlit dashboard on a drift-monitor DuckDB file (read-only)")
    d.add_argument("--db", required=True, help="the DuckDB file (it may not exist yet: the page says so)")
    d.add_argument("--port", type=int, default=8501)
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    d.add_argument("--refresh", type=float, default=5.0, help="live refresh interval in seconds")
    d.add_argument("--headless", action="store_true", help="do not open a browser")
    d.set_defaults(func=_cmd_dashboard)

    dm = sub.add_parser("demo", help="the refusal model organism: build it (cached), fine-tune it monitored, "
                                     "scan a control run, summarise")
    dm.add_argument("--out", default="runs/demo", help="output folder (drift.duckdb, checkpoints, summary.json)")
    dm.add_argument("--quick", action="store_true", help="the small CI size (about a minute on 2 cores)")
    dm.add_argument("--prometheus-port", type=int, default=-1, help="serve /metrics on this port (-1: off)")
    dm.set_defaults(func=_cmd_demo)

    r = sub.add_parser("runs", help="list the runs in a drift-monitor DuckDB file")
    r.add_argument("--db", required=True)
    r.set_defaults(func=_cmd_runs)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("drift-monitor: interrupted; what was stored is whole, and rerunning the same command finishes "
              "the job", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug or not _is_user_error(e):
            raise
        print(f"drift-monitor: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: BaseException) -> bool:
    """Errors whose message already says what to fix: shown as one line, without a traceback."""
    if isinstance(e, (ValueError, KeyError, FileNotFoundError, OSError)):
        return True
    store = sys.modules.get("drift_monitor.store")  # only loaded if a command used the store
    return store is not None and isinstance(e, store.StoreError)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
