"""Subprocess helper for tests/test_dashboard.py (not a test module).

    python tests/dashboard_writer.py DB SECONDS D_SAE

Writes one snapshot per step (steps 1, 2, ...) through :class:`Store` for SECONDS, as a
training run would while the dashboard is open, then closes the store (which applies any
spooled write) and prints ``done <n>``: the number of writes that returned.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(db: str, seconds: float, d_sae: int) -> None:
    from store_fixtures import import_store_only, make_snapshot

    store = import_store_only()
    s = store.Store(db, run_id="live-run", retry_timeout_s=10.0)
    s.start_run("live run", model="tiny")
    print("started", flush=True)
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        n += 1
        snap = make_snapshot(n, d_sae=d_sae, seed=n)
        s.write(snap)
        time.sleep(0.05)
    s.close()
    print(f"done {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
