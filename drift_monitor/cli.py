"""`drift-monitor` command line. Subcommands stay thin: the work lives in the library.

Why errors are caught here, and only ours: a user who mistypes a path should read one line that
names the fix, not a traceback, and the library says so by raising a
:class:`~drift_monitor.errors.DriftMonitorError`. Anything else is a bug of ours, so it keeps
its traceback (and asks for a report) instead of passing for a user error. ``--debug`` shows
the traceback of either.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from . import __version__
from .errors import ConfigError, DriftMonitorError


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

    reader = StoreReader(args.db)
    df = reader.runs()
    if df.empty:
        print(f"{args.db}: no runs yet")
    else:
        cols = [c for c in ("run_id", "name", "status", "model", "last_step", "n_snapshots", "active_alerts",
                            "pending_writes", "undelivered_notifications", "updated_at") if c in df.columns]
        print(df[cols].to_string(index=False))
        waiting = int(df["undelivered_notifications"].sum())
        if waiting:
            last = reader.notifications(undelivered=True).iloc[0]
            print(f"{waiting} alert notifications are not delivered (last error, {last.target}: {last.last_error}); "
                  "they are retried at the run's next snapshot and at its end")
    for notice in reader.spool_state().notices(args.db):
        print(notice.text)
    return 0


def _parse_saes(specs: list[str]) -> dict[str, str]:
    saes: dict[str, str] = {}
    for spec in specs:
        hook, sep, source = spec.partition("=")
        if not sep or not hook or not source:
            raise ConfigError(f"--sae {spec!r}: expected HOOK=SOURCE, e.g. --sae model.layers.12=path/to/sae_dir")
        saes[hook] = source
    return saes


def _parse_directions(specs: list[str]) -> dict[str, list[str]]:
    """``--direction HOOK=PATH`` (repeatable; several files at one hook are all loaded)."""
    directions: dict[str, list[str]] = {}
    for spec in specs:
        hook, sep, path = spec.partition("=")
        if not sep or not hook or not path:
            raise ConfigError(f"--direction {spec!r}: expected HOOK=PATH, "
                             "e.g. --direction model.layers.12=refusal.safetensors")
        directions.setdefault(hook, []).append(path)
    return directions


def _cmd_scan(args: argparse.Namespace) -> int:
    from .offline.scan import format_summary, resolve_config, scan

    flags = {"saes": _parse_saes(args.sae) or None, "directions": _parse_directions(args.direction) or None,
             "formats": args.model_format, "base_formats": args.base_format, "probes": args.probes,
             "batch_size": args.batch_size, "pushgateway_url": args.pushgateway, "device": args.device,
             "keep_pushed": True if args.keep_pushed else None,
             "show_progress": False if args.no_progress else None}
    cfg = resolve_config(args.base_model, db_path=args.db, run_name=args.run_name, checkpoints=args.checkpoints,
                         models=args.model, config=args.config,
                         overrides={k: v for k, v in flags.items() if v is not None})
    result = scan(args.base_model, cfg, checkpoints=args.checkpoints, models=args.model, dtype=args.dtype,
                  force=args.force, trust_remote_code=args.trust_remote_code, shard=args.shard)
    print(format_summary(result, result.hooks))
    for r in result.failed:
        print(f"drift-monitor: checkpoint {r.checkpoint.path} (step {r.checkpoint.step}) failed: {r.error}",
              file=sys.stderr)
    for path in result.unsaved:
        from .store.writer import replay_command

        print(f"drift-monitor: writes the store could not take are in {path}; load them with: "
              f"{replay_command(args.db, path)}", file=sys.stderr)
    return 1 if result.failed or result.unsaved else 0


def _cmd_diff_dict(args: argparse.Namespace) -> int:
    from .offline.diffdict import diff_dict, format_diff_dict
    from .offline.loading import load_pair
    from .probe.probes import ProbeSet
    from .settings import ProbeSettings

    if not args.adapter and not args.base_model:
        raise ConfigError("diff-dict compares two models: give --adapter (its base is --model with the adapter "
                          "off) or --base-model")
    if args.atoms < 1:
        raise ConfigError(f"--atoms must be at least 1, got {args.atoms}")
    tok, model, base, base_ctx = load_pair(args.model, adapter=args.adapter, base_model=args.base_model,
                                           device=args.device, dtype=args.dtype,
                                           trust_remote_code=args.trust_remote_code)
    res = diff_dict(model, base, tok, ProbeSet.resolve(args.probes), args.hook, n_atoms=args.atoms,
                    base_context=base_ctx, settings=ProbeSettings(batch_size=args.batch_size), device=args.device,
                    progress=not args.no_progress)
    print(format_diff_dict(res))
    if args.json:
        _write_json(args.json, res.to_dict())
    return 0


def _model_pair_args(p: argparse.ArgumentParser, base_use: str) -> None:
    """--model/--adapter/--base-model: a fine-tuned model and its base, as ``loading.load_pair`` takes them."""
    p.add_argument("--model", required=True, help="the fine-tuned model folder, or with --adapter the base model")
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder loaded onto --model (base = adapter off)")
    p.add_argument("--base-model", default=None, help=f"the base model folder ({base_use})")


def _run_args(p: argparse.ArgumentParser, what: str) -> None:
    """--device, --dtype, --json, --trust-remote-code, --no-progress of the offline model commands."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, metavar="FILE", help=f"also write {what} as JSON")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _write_json(path: str, data: object) -> None:
    """``--json FILE``: the results as JSON, or one line naming the option when it cannot be written."""
    import json
    from pathlib import Path

    try:
        Path(path).write_text(json.dumps(data, indent=2))
    except OSError as e:
        raise ConfigError(f"--json {path}: cannot write it ({e.strerror or e}); give a writable file path") from None


def _cmd_replay(args: argparse.Namespace) -> int:
    from .store.replay import replay

    r = replay(args.db, args.dump, timeout_s=args.timeout)
    print(r.summary(args.db))
    return 0 if r.waiting == 0 else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .offline.verify import format_result, result_json, run_verify
    from .records import DEFAULT_REFUSAL_PHRASES, VerifySettings

    phrases = DEFAULT_REFUSAL_PHRASES
    if args.refusal_phrases:
        path = Path(args.refusal_phrases)
        text = path.read_text() if path.is_file() else args.refusal_phrases.replace(",", "\n")
        phrases = tuple(ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#"))
    settings = VerifySettings(alpha=args.alpha, n_random=args.n_random, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed, refusal_phrases=phrases,
                              direction_ablation=not args.no_direction_ablation)
    res = run_verify(args.model, _parse_saes(args.sae) if args.sae else None, args.features or ["emerging"],
                     adapter=args.adapter, direction_layers=args.direction_layers,
                     base_model=args.base_model, db=args.db, run=args.run, step=args.step, probes=args.probes,
                     harmful_category=args.harmful_category, harmless_category=args.harmless_category,
                     settings=settings, device=args.device, dtype=args.dtype,
                     trust_remote_code=args.trust_remote_code, progress=not args.no_progress)
    print(format_result(res))
    if args.db:
        print(f"stored in {args.db} (verify id {res.verify_id}); see the dashboard's Refusal page")
    if args.json:
        _write_json(args.json, result_json(res))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .store.merge import merge

    runs = merge(args.sources, args.into)
    print(f"{args.into}: {len(runs)} runs merged ({', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .store import export_run
    from .store.dataset import is_dataset
    from .store.merge import export_dataset

    if args.run is None:
        if is_dataset(args.db):
            raise ConfigError(f"--db {args.db} is a Parquet dataset already: give --run to export one run's tables")
        if args.format != "parquet":
            raise ConfigError("export without --run writes a Parquet dataset of every run: use --format parquet, "
                              "or give --run for one run's CSV files")
        written = export_dataset([args.db], args.out)
    else:
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


def dashboard_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for the installed dashboard app (works from a wheel).

    Why headless unless ``--open``: a non-headless Streamlit asks for an e-mail address on its first
    run and waits on standard input for it, so under nohup or a service manager it never serves.
    ``--open`` lets Streamlit open a browser, with that prompt turned off.
    """
    from pathlib import Path

    import drift_monitor.dashboard as dash

    from .store.dataset import is_remote

    app = Path(dash.__file__).resolve().parent / "app.py"
    db = args.db if is_remote(args.db) else str(Path(args.db).expanduser().resolve())  # s3://... stays a URL
    cmd = [sys.executable, "-m", "streamlit", "run", str(app),
           "--server.address", args.host, "--server.port", str(args.port),
           "--server.headless", "false" if args.open else "true", "--server.showEmailPrompt", "false",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
           "--", "--db", db, "--refresh", str(args.refresh)]
    return cmd + (["--read-only"] if args.read_only else [])


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) binds this machine's loopback only; a name that does
    not resolve counts as not loopback (the warning errs on the loud side)."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from .store.dataset import is_dataset

    args.read_only = args.read_only or is_dataset(args.db)  # an exported dataset takes no writes
    cmd = dashboard_command(args)
    if args.headless:
        print("drift-monitor dashboard: note: --headless is the default now and is ignored (--open opens a "
              "browser)", file=sys.stderr)
    if not is_loopback(args.host):
        can = "read the runs" if args.read_only else "read the runs and acknowledge alerts or import labels"
        fix = "put a reverse proxy with authentication in front" if args.read_only else \
            "use --read-only or a reverse proxy with authentication"
        print(f"drift-monitor dashboard: warning: bound to {args.host}, which is not loopback: it serves without "
              f"authentication; anyone who can reach port {args.port} can {can}; {fix}", file=sys.stderr)
    writes = "read-only" if args.read_only else \
        "acknowledging alerts and importing labels write to it; --read-only turns them off"
    print(f"drift-monitor dashboard: http://{args.host}:{args.port}/  (db {args.db}; {writes})", flush=True)
    sys.stderr.flush()
    if os.name == "posix":  # become streamlit: signals (Ctrl-C, a supervisor's SIGTERM) reach it directly
        os.execv(cmd[0], cmd)
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    from .config import FORMATS  # torch-free

    p = argparse.ArgumentParser(prog="drift-monitor", description="Watch LLM fine-tuning through a base-model SAE.")
    p.add_argument("--version", action="version", version=f"drift-monitor {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "bench", help="benchmark the probe pass and the store against their lower bounds",
        description="Time the probe pass (forward + SAE encode + statistics) and a store write on a built-in "
                    "tiny or mid-size model, and compare them with their lower bounds (a bare forward and "
                    "encode; a bare DuckDB insert). Nothing is downloaded.")
    b.add_argument("--size", choices=["tiny", "mid", "both"], default="tiny",
                   help="tiny: 4-layer 64-wide Llama, 1k features; mid: 8-layer 1024-wide Llama, 16k features")
    b.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    b.add_argument("--repeats", type=int, default=3, help="best of N, measured round-robin")
    b.add_argument("--prompts", type=int, default=None, help="override the number of probe prompts")
    b.add_argument("--no-store", action="store_true", help="skip the store write benchmark")
    b.set_defaults(func=_cmd_bench)

    pr = sub.add_parser(
        "probes", help="validate a probe file and count its records per category",
        description="Check a JSONL probe file (one {id, category, prompt, response?} object per line; "
                    "'all' is a reserved category) and print its probes per category. Errors name the file "
                    "and line.")
    pr.add_argument("file", nargs="?", default="default", help="a JSONL probe file, or 'default'")
    pr.set_defaults(func=_cmd_probes)

    sc = sub.add_parser(
        "scan", help="scan saved checkpoints (full models or PEFT adapters) against a base model",
        description="Measure saved checkpoints (full models or PEFT adapters) against the base model through "
                    "its SAE, as the training callback would have, and store snapshots and alerts in --db. "
                    "Resumable: steps already stored are skipped unless --force.")
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
    sc.add_argument("--db", required=True, help="the DuckDB file to write (created if missing), or a store "
                                                 "directory: the run then writes DIR/<run>.duckdb")
    sc.add_argument("--probes", default=None, help="a JSONL probe file, or 'default' (default: the config's)")
    sc.add_argument("--run-name", default=None, help="the run's name and id (default: derived from the inputs)")
    sc.add_argument("--pushgateway", default=None, metavar="URL",
                    help="push aggregates to this Pushgateway (its group is deleted at the end)")
    sc.add_argument("--keep-pushed", action="store_true", help="keep the run's Pushgateway group after the scan")
    sc.add_argument("--device", default="cpu")
    sc.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    sc.add_argument("--batch-size", type=int, default=None, help="probes per forward (default: the config's, 16)")
    sc.add_argument("--force", action="store_true", help="re-scan steps already in the DB")
    sc.add_argument("--shard", default=None, metavar="K/N",
                    help="scan every N-th checkpoint from the K-th into DIR/<run>.shard-K-of-N.duckdb (--db a "
                         "directory); N shards read as one run. Default under torchrun: RANK+1/WORLD_SIZE")
    sc.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint folders")
    sc.add_argument("--no-progress", action="store_true")
    sc.set_defaults(func=_cmd_scan)

    from .records import VerifySettings  # NumPy only: --help stays fast

    alpha = VerifySettings.alpha
    v = sub.add_parser(
        "verify", help="causal check: ablate drifted features (vs a random control) and steer "
                       "the base with them; refusal rates, KL on harmless probes",
        description="Causal check of drifted SAE features: ablate them in the fine-tuned model (against a "
                    "density-matched random control) and add them to the base model, then compare refusal "
                    "rates on harmful prompts and the KL on harmless ones. Features come from --features "
                    "or from a run's refusal features in --db; results are stored there too.")
    _model_pair_args(v, "for the steering condition; not needed with --adapter")
    v.add_argument("--sae", action="append", default=[], metavar="HOOK=SOURCE",
                   help="an SAE and its hook, repeatable: several hooks are checked together (default: the "
                        "run's SAEs, from --db/--run)")
    v.add_argument("--features", action="append", default=[], metavar="[HOOK:]IDS|top:K|emerging",
                   help="feature ids (12,345; one hook), or from the run's refusal features at --step: every "
                        "emerging one (the default, at every hook) or top:K per hook (emerging first, then by "
                        "refusal score). HOOK:SPEC (repeatable) gives one hook its own spec, e.g. "
                        "--features model.layers.6:12,345 --features model.layers.15:7")
    v.add_argument("--no-direction-ablation", action="store_true",
                   help="skip the reference conditions: the run's refusal direction (and a random one) removed "
                        "at every layer of --direction-layers")
    v.add_argument("--direction-layers", default="all", metavar="all|hooks|0,5,10",
                   help="decoder layers whose output loses the refusal direction: all (Arditi et al.; the "
                        "default), hooks (the checked hooks' layers) or indices")
    v.add_argument("--db", default=None, help="the run's DuckDB file (or a store directory): features come from "
                                              "it, results go to the run's file")
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
    _run_args(v, "the results")
    v.set_defaults(func=_cmd_verify)

    dd = sub.add_parser(
        "diff-dict", help="a small dictionary of what a fine-tune changed at a hook (real difference vectors)",
        description="Pair the fine-tuned and the base model's activations token by token on the probes, and "
                    "pick, ITDA-style, the few real difference vectors that explain most of the change; each "
                    "atom is read by its probes, its source token and the logit lens.")
    _model_pair_args(dd, "not needed with --adapter")
    dd.add_argument("--hook", required=True, help="the module whose output is compared, e.g. model.layers.12")
    dd.add_argument("--probes", default="default", help="a JSONL probe file, or 'default'")
    dd.add_argument("--atoms", type=int, default=8, help="most atoms to pick (fewer when the change is explained)")
    dd.add_argument("--batch-size", type=int, default=16)
    _run_args(dd, "the atoms")
    dd.set_defaults(func=_cmd_diff_dict)

    t = sub.add_parser(
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
    t.add_argument("--max-memory-gb", type=float, default=None,
                   help="past this, the activations (tokens x width x 4 bytes x hooks) are kept on disk in "
                        "OUT/.partial and read from there in training (default: a quarter of RAM)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=50, help="training steps between resumable checkpoints")
    t.add_argument("--force", action="store_true", help="replace an SAE already in --out")
    t.add_argument("--trust-remote-code", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_train_sae)

    ex = sub.add_parser(
        "export", help="export one run's tables as Parquet or CSV, or every run as a Parquet dataset",
        description="With --run: write that run's rows of every table (runs, snapshots, metrics, feature_stats, "
                    "refusal_features, alerts, residual_directions) to --out as Parquet or CSV files, one per "
                    "table. Without --run: every run of --db as a hive-partitioned Parquet dataset, "
                    "OUT/table=<table>/run=<run id>/*.parquet, that DuckDB, pandas or Spark read directly.")
    ex.add_argument("--db", required=True, help="a DuckDB file, a store directory or a glob of files (or, with "
                                                "--run, an exported Parquet dataset)")
    ex.add_argument("--run", default=None, help="a run id or name (omit: every run, as a dataset)")
    ex.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    ex.add_argument("--out", default=".", help="output folder (for a dataset: a new or empty one)")
    ex.set_defaults(func=_cmd_export)

    mg = sub.add_parser(
        "merge", help="copy the runs of several stores into one file, or into a store directory",
        description="Copy every run of the SOURCE stores (files, store directories or globs) into --into: a "
                    "new DuckDB file, or a directory (one file per run). Run ids two sources share stay apart "
                    "(<file stem>/<id>), as every reader shows them.")
    mg.add_argument("sources", nargs="+", metavar="SOURCE", help="a DuckDB file, a store directory or a glob")
    mg.add_argument("--into", required=True, metavar="FILE|DIR/", help="a new DuckDB file, or a directory")
    mg.set_defaults(func=_cmd_merge)

    d = sub.add_parser(
        "dashboard", help="serve the Streamlit dashboard on a drift-monitor DuckDB file",
        description="Serve the Streamlit dashboard on a drift-monitor DuckDB file: runs, metrics, features, "
                    "refusal, alerts. Headless: it never waits on standard input (--open also opens a browser). "
                    "Two controls write to the file (acknowledging an alert, importing feature labels); "
                    "--read-only turns them off.")
    d.add_argument("--db", required=True, help="the DuckDB file (it may not exist yet: the page says so), a store "
                                               "directory or a glob: every run of every file; or an exported "
                                               "Parquet dataset (a folder, s3://...), read-only")
    d.add_argument("--port", type=int, default=8501)
    d.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                       "any other address serves without authentication)")
    d.add_argument("--refresh", type=float, default=5.0, help="live refresh interval in seconds")
    d.add_argument("--read-only", action="store_true",
                   help="offer no control that writes (alert acknowledgements, label import)")
    d.add_argument("--open", action="store_true", help="open a browser on the dashboard")
    d.add_argument("--headless", action="store_true", help="deprecated: headless is the default; ignored")
    d.set_defaults(func=_cmd_dashboard)

    dm = sub.add_parser(
        "demo", help="the refusal model organism: build it (cached), fine-tune it monitored, "
                     "scan a control run, summarise",
        description="Build the refusal model organism (cached), fine-tune it with the monitor on, scan a "
                    "control run, and summarise what was detected; everything lands in --out.")
    dm.add_argument("--out", default="runs/demo", help="output folder (drift.duckdb, checkpoints, summary.json)")
    dm.add_argument("--quick", action="store_true", help="the small CI size (about a minute on 2 cores)")
    dm.add_argument("--prometheus-port", type=int, default=-1, help="serve /metrics on this port (-1: off)")
    dm.set_defaults(func=_cmd_demo)

    r = sub.add_parser("runs", help="list the runs in a drift-monitor DuckDB file",
                       description="List the runs in a drift-monitor DuckDB file: status, model, last step, "
                                   "snapshots and active alerts.")
    r.add_argument("--db", required=True, help="a DuckDB file, a store directory, a glob of files, or an exported "
                                               "Parquet dataset (a folder, s3://..., gs://..., https://...)")
    r.set_defaults(func=_cmd_runs)

    rp = sub.add_parser("replay", help="load writes a run could not store (a dump file, or the spool) into its DB",
                        description="Load the writes a run could not store — the .unsaved.zip file its log names, "
                                    "or the DB's spool — into the DuckDB file, each exactly once. Exit 0 when "
                                    "nothing waits any more, 1 when writes still wait.")
    rp.add_argument("dump", nargs="?", help="the .unsaved.zip file the run's log names (omit: apply the spool)")
    rp.add_argument("--db", required=True, help="the DuckDB file to load into")
    rp.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a busy database")
    rp.set_defaults(func=_cmd_replay)
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
    except DriftMonitorError as e:  # ours: the message names the fix (a setting, a path, a file given)
        if args.debug:
            traceback.print_exc()
        message = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
        print(f"drift-monitor: error: {message}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - not ValueError/OSError as "user errors": they hide our bugs
        traceback.print_exc()
        print("drift-monitor: internal error (a bug in drift-monitor, not in your input); please report "
              "this with the traceback above", file=sys.stderr)
        return 1




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
