"""Subprocess helper for tests/test_store.py (not a test module).

    python tests/store_worker.py write DB D_SAE BASE_STEP   # loop writing snapshots until killed
    python tests/store_worker.py hold DB SECONDS|stdin ro|rw  # open DB, print "held", wait, exit

``write`` prints ``committed <step> <seq>`` after every write that returned, so the test knows
what must be durable; every feature row of write ``seq`` has ``max_act == seq``, so the test
can tell two writes of the same step apart. Steps cycle over four values, so most writes
*replace* an earlier copy: a kill can land in the DELETE as well as in the INSERT.

The store is imported without the package ``__init__`` (no torch): the worker starts fast, and
it asserts that importing the store did not import torch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_loop(db: str, d_sae: int, base_step: int) -> None:
    from store_fixtures import import_store_only, make_snapshot

    store = import_store_only()
    assert "torch" not in sys.modules, "drift_monitor.store imported torch"
    if os.environ.get("STORE_WORKER_NO_TRANSACTION") == "1":  # to check the test can fail
        store.writer.transaction = lambda con: contextlib.nullcontext()
    snap = make_snapshot(0, d_sae=d_sae, dead_frac=0.0, seed=base_step)
    s = store.Store(db, run_id="killed-run", retry_timeout_s=10.0)
    s.start_run("killed run")
    print("started", flush=True)
    seq = 0
    while True:
        seq += 1
        snap.step = base_step + seq % 4
        for result in snap.hooks.values():
            result.metrics["seq"] = float(seq)
            for stats in result.features.values():
                stats.max_act[:] = seq
        outcome = s.write(snap)
        print(f"{outcome} {snap.step} {seq}", flush=True)


def hold(db: str, seconds: str, mode: str) -> None:
    """Hold the file for ``seconds``, or with ``seconds == "stdin"`` until a line arrives on
    stdin: the test then decides when to release, so no timing race can end the hold early."""
    import duckdb

    con = duckdb.connect(db, read_only=(mode == "ro"))
    con.execute("SELECT 1").fetchall()
    print("held", flush=True)
    if seconds == "stdin":
        sys.stdin.readline()
    else:
        time.sleep(float(seconds))
    con.close()
    print("released", flush=True)


if __name__ == "__main__":
    cmd, db = sys.argv[1], sys.argv[2]
    if cmd == "write":
        write_loop(db, int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "hold":
        hold(db, sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
