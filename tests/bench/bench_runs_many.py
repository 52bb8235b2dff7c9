"""``drift-monitor runs`` and ``StoreReader.runs()`` over a store directory of many run files,
against one file holding the same runs.

    python tests/bench/bench_runs_many.py [--files 200] [--snapshots 1] [--d-sae 4096] [--dir DIR]
                                          [--repeats 3]

Builds (once; reused if ``--dir`` exists) ``DIR/store/`` with one run per file and
``DIR/one.duckdb`` with the same runs, through :func:`bench_dashboard.build` (rows generated in
SQL). Then times, best of ``--repeats``:

* ``runs()`` cold: the first call of a process (store.routing's per-file facts not read yet);
* ``runs()`` warm: a later call (every file unchanged: nothing is opened);
* ``runs()`` after one file changed (a live run: that file is read again);
* ``metric_series`` of one run (routed to its file);
* ``drift-monitor runs --db``: a whole CLI process (always cold);

each also for the single file, and the ratio directory / file.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_dashboard import HOOK, build, build_files

from drift_monitor.store import StoreReader
from drift_monitor.store.routing import FILE_FACTS


def _best(fn, repeats: int, before=None) -> float:
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def _cli(db: Path) -> None:
    subprocess.run([sys.executable, "-m", "drift_monitor.cli", "runs", "--db", str(db)], check=True,
                   stdout=subprocess.DEVNULL)


def _touch(db: Path) -> None:
    """Change one file as a live run's next write would (a new mtime)."""
    f = sorted(db.glob("*.duckdb"))[0] if db.is_dir() else db
    os.utime(f)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--snapshots", type=int, default=1)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--dir", default=None, help="reuse (or build) the stores here")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="dm-bench-runs-"))
    many, one = root / "store", root / "one.duckdb"
    if not many.exists():
        build_files(many, args.files, args.files, args.snapshots, args.d_sae, 1)
    if not one.exists():
        build(one, args.files, args.snapshots, args.d_sae, 1)
    rid = "run-001"
    results: dict[str, tuple[float, float]] = {}
    print(f"{'':<28} {'directory s':>12} {'one file s':>11} {'ratio':>7}   ({args.files} runs; best of "
          f"{args.repeats})")
    for name, fn, before in (
        ("runs() cold", lambda r: r.runs(), FILE_FACTS.clear),
        ("runs() warm", lambda r: r.runs(), None),
        ("runs() after a file changed", lambda r: r.runs(), "touch"),
        ("metric_series (one run)", lambda r: r.metric_series(rid, hook=HOOK), None),
        ("drift-monitor runs (CLI)", None, None),
    ):
        pair = []
        for db in (many, one):
            r = StoreReader(db)
            r.runs()  # warm, unless ``before`` clears
            call = (lambda db=db: _cli(db)) if fn is None else (lambda r=r, fn=fn: fn(r))
            prep = (lambda db=db: _touch(db)) if before == "touch" else before
            pair.append(_best(call, args.repeats, prep))
        results[name] = (pair[0], pair[1])
        print(f"{name:<28} {pair[0]:>12.3f} {pair[1]:>11.3f} {pair[0] / pair[1]:>7.1f}", flush=True)
    return results


if __name__ == "__main__":
    main()
