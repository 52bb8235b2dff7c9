"""Subprocess helper for tests/test_dashboard.py (not a test module).

    python tests/dashboard_writer.py DB STOP_FILE MAX_SECONDS D_SAE

Writes one snapshot per step (steps 1, 2, ...) through :class:`Store`, as a training run would
while the dashboard is open, until STOP_FILE exists (or MAX_SECONDS pass), then closes the store
(which applies any spooled write) and prints ``done <n>``: the number of writes that returned.
Stopping on a file, not a clock, keeps the test's counts independent of the machine's load.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(db: str, stop_file: str, seconds: float, d_sae: int) -> None:
    from store_fixtures import import_store_only, make_snapshot

    store = import_store_only()
    s = store.Store(db, run_id="live-run", retry_timeout_s=10.0)
    s.start_run("live run", model="tiny")
    print("started", flush=True)
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline and not Path(stop_file).exists():
        n += 1
        snap = make_snapshot(n, d_sae=d_sae, seed=n)
        s.write(snap)
        time.sleep(0.05)
    s.close()
    print(f"done {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
