"""Real servers and processes for tests: find binaries (fail, never skip), free loopback ports,
start/stop, poll, and a one-thread context for references compared with 1-thread workers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"`{binary}` is not on PATH: run `bash scripts/install.sh --test` "
                    f"(installs the Debian packages prometheus, prometheus-pushgateway and prometheus-alertmanager)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            http_get(url, timeout=1)
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    pytest.fail(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


class single_thread:
    """Run an in-process reference with one torch thread, as the worker processes do."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)


def start_prometheus(tmp_path: Path, scrape_configs: str, extra: str = "") -> tuple[subprocess.Popen, str, Path]:
    """A real Prometheus server scraping every second with ``scrape_configs`` (YAML, indented under
    the key), ready: (process, base URL, log). ``extra``: more top-level YAML (rule_files,
    alerting). Stop it with :func:`stop`."""
    binary = need("prometheus")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n" + extra + "scrape_configs:\n"
                   + scrape_configs)
    log = tmp_path / "prometheus.log"
    proc = start([binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log)
    return _ready(proc, f"http://127.0.0.1:{port}", log)


def start_alertmanager(tmp_path: Path, webhook_url: str) -> tuple[subprocess.Popen, str, Path]:
    """A real Alertmanager (Debian's prometheus-alertmanager) routing every alert, at once and
    with resolutions, to ``webhook_url``; ready: (process, base URL, log). Stop it with :func:`stop`."""
    binary = need("prometheus-alertmanager")
    port = free_port()
    cfg = tmp_path / "alertmanager.yml"
    cfg.write_text("route:\n  receiver: hook\n  group_by: [alertname, run, hook]\n  group_wait: 1s\n"
                   "  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n"
                   f"    webhook_configs:\n      - url: {webhook_url}\n        send_resolved: true\n")
    log = tmp_path / "alertmanager.log"
    proc = start([binary, f"--config.file={cfg}", f"--storage.path={tmp_path / 'am'}",
                  f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn"], log)
    return _ready(proc, f"http://127.0.0.1:{port}", log)


def prom_query(base: str, promql: str, want: int, timeout: float = 30.0) -> list[dict]:
    """Poll Prometheus's query API until ``promql`` returns ``want`` series (or time runs out)."""
    import json
    import urllib.parse

    query = urllib.parse.urlencode({"query": promql})
    deadline, result = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        body = json.loads(http_get(f"{base}/api/v1/query?{query}"))
        assert body["status"] == "success", body
        result = body["data"]["result"]
        if len(result) == want:
            break
        time.sleep(0.25)
    return result


class WebhookReceiver:
    """A real HTTP receiver on 127.0.0.1 that records every POST (path, headers, JSON body).

    ``fail``: answer this many requests with HTTP 500 first. ``hang``: an Event the handler
    waits on before answering (set it to let requests through; ``in_flight`` counts requests
    received and not yet answered). Use as a context manager; ``url`` is its base URL.
    """

    def __init__(self, fail: int = 0, hang: object | None = None):
        import http.server
        import json
        import threading

        self.received: list[dict] = []
        self.fail = fail
        self.hang = hang
        self.in_flight = 0
        self.lock = threading.Lock()
        me = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with me.lock:
                    me.in_flight += 1
                try:
                    if me.hang is not None:
                        me.hang.wait(60)
                    with me.lock:
                        failing = me.fail > 0
                        me.fail -= failing
                        if not failing:
                            me.received.append({"path": self.path, "headers": dict(self.headers),
                                                "body": json.loads(data)})
                    self.send_response(500 if failing else 200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    with me.lock:
                        me.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.hang is not None:
            self.hang.set()
        self.server.shutdown()
        self.server.server_close()

    def bodies(self) -> list[dict]:
        with self.lock:
            return [r["body"] for r in self.received]


def _ready(proc: subprocess.Popen, base: str, log: Path) -> tuple[subprocess.Popen, str, Path]:
    """Wait for a started server's /-/ready; stop it if it never gets there."""
    try:
        wait_ready(f"{base}/-/ready", proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, base, log
