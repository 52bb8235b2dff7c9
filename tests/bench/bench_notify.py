"""Step time with alert notifications to a receiver that hangs, against no notifications, in one run.

    python tests/bench/bench_notify.py [--steps 60] [--work-ms 20] [--hang-s 30] [--event-every 1]

Each "training step" is a fixed NumPy workload (``--work-ms``, standing in for the optimizer
step) followed by :meth:`RunRecorder.record` of a snapshot into a real store, with the ev_drop
alert raised or resolved every ``--event-every`` steps (1, the default, is the worst case: every
step hands a notification over and writes its delivery state; real runs raise alerts rarely). Three
configurations, interleaved step by step (in rotating order) so that machine noise hits them alike:

* ``none``: no ``outputs.notify``;
* ``hang``: one webhook target on a loopback receiver that holds every request for
  ``--hang-s`` seconds (timeout 30 s, the default retries);
* ``ok``: one target on a loopback receiver that answers at once.

Prints the median step time of each and the ratios hang/none and ok/none (1.0: notifications
cost the step nothing), and the time ``finish()`` took (the end of the run waits for pending
notifications, at most drift_monitor.notify.FINISH_WAIT_S).
"""

from __future__ import annotations

import argparse
import http.server
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from drift_monitor.config import MonitorConfig
from drift_monitor.recorder import RunRecorder
from drift_monitor.records import HookResult, Snapshot

HOOK = "model.layers.3"


def receiver(hang_s: float) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(hang_s)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/hook"


def snap(step: int, firing: bool) -> Snapshot:
    m = {"explained_variance": 0.75, "base_explained_variance": 0.76, "features_drifted_ratio": 0.05,
         "explained_variance_delta": -0.3 if firing else -0.01, "nonfinite_fraction": 0.0}
    return Snapshot(step=step, hooks={HOOK: HookResult(hook=HOOK, d_sae=8, metrics=m, features={})}, probe_hash="p",
                    n_tokens=100, is_base=step == 0)


def work(ms: float) -> None:
    a = np.random.default_rng(0).random((256, 256))
    t0 = time.perf_counter()
    while (time.perf_counter() - t0) * 1e3 < ms:
        a = np.tanh(a @ a * 1e-3)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work-ms", type=float, default=20.0)
    ap.add_argument("--hang-s", type=float, default=30.0)
    ap.add_argument("--event-every", type=int, default=1, help="steps between alert events (raise, then resolve)")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    hang_srv, hang_url = receiver(args.hang_s)
    ok_srv, ok_url = receiver(0.0)
    times: dict[str, list[float]] = {"none": [], "hang": [], "ok": []}
    finish: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        recs = {}
        for name, url in (("none", None), ("hang", hang_url), ("ok", ok_url)):
            notify = [{"url": url, "timeout_s": 30}] if url else []
            cfg = MonitorConfig(saes={HOOK: "x"}, outputs={"db_path": str(Path(tmp) / f"{name}.duckdb"),
                                                            "notify": notify, "show_progress": False})
            recs[name] = RunRecorder.open(cfg, probe_hash="p", run_id=name, watch=False)
            recs[name].record(snap(0, False))
        for step in range(1, args.steps + 1):
            names = list(recs)
            for name in names[step % 3:] + names[:step % 3]:  # each goes first as often: no order bias
                rec = recs[name]
                t0 = time.perf_counter()
                work(args.work_ms)
                rec.record(snap(step, firing=(step // args.event_every) % 2 == 1))
                times[name].append(time.perf_counter() - t0)
        for name, rec in recs.items():
            t0 = time.perf_counter()
            rec.finish()
            finish[name] = time.perf_counter() - t0
    hang_srv.shutdown()
    ok_srv.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.steps} steps of {args.work_ms:g} ms work + record(), an alert event every {args.event_every} steps")
    for k in times:
        print(f"  {k:5s} median step {med[k] * 1e3:7.2f} ms   finish() {finish[k]:6.2f} s")
    out = {"hang/none": med["hang"] / med["none"], "ok/none": med["ok"] / med["none"],
           "hang/ok": med["hang"] / med["ok"]}
    print(f"step time ratio hang/none = {out['hang/none']:.3f}, ok/none = {out['ok/none']:.3f}, "
          f"hang/ok = {out['hang/ok']:.3f} (receiver hanging {args.hang_s:g} s per request)")
    return out


if __name__ == "__main__":
    main()
