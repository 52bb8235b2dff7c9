"""``drift-monitor dashboard``: serve the Streamlit dashboard on a store."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = subparsers.add_parser(
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
    return d


def run(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from ..store.dataset import is_dataset

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


def dashboard_command(args: argparse.Namespace) -> list[str]:
    """The ``streamlit run`` command line for the installed dashboard app (works from a wheel).

    Why headless unless ``--open``: a non-headless Streamlit asks for an e-mail address on its first
    run and waits on standard input for it, so under nohup or a service manager it never serves.
    ``--open`` lets Streamlit open a browser, with that prompt turned off.
    """
    from pathlib import Path

    import drift_monitor.dashboard as dash

    from ..store.dataset import is_remote

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
