"""`drift-monitor dashboard` itself (docs/dashboard.md, docs/reliability.md): it serves with nothing on standard
input, ``--read-only`` takes away the controls that write (and normal mode says what they write
where), and binding off loopback warns on stderr.

The served tests run the installed console script, as a user or a service manager would, with a
fresh $HOME: that is Streamlit's first run, when a non-headless server asks for an e-mail address
on standard input and, reading /dev/null, never serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import free_port, stop, wait_ready
from store_fixtures import HOOK
from test_dashboard import APP, _write_run, app, no_errors

from drift_monitor.cli import build_parser, dashboard_command, is_loopback
from drift_monitor.store import Store, StoreReader

streamlit_testing = pytest.importorskip("streamlit.testing.v1")  # streamlit is a hard dependency
AppTest = streamlit_testing.AppTest
COMMAND = Path(sys.executable).parent / "drift-monitor"  # the console script pip installed


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dash_cli") / "drift.duckdb"
    _write_run(path, "alpha-id", "alpha", 0)  # two active alerts, none acknowledged
    with Store(path) as s:
        s.import_labels(HOOK, {1: "refuses"}, source="test")
    return path


def _serve(db: Path, tmp_path: Path, *flags: str, env: dict[str, str] | None = None):
    """The real command, stdin from /dev/null, a fresh $HOME; stdout and stderr to files."""
    assert COMMAND.is_file(), f"{COMMAND} is missing: pip install -e . (scripts/install.sh) installs it"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([str(COMMAND), "dashboard", "--db", str(db), *flags], stdin=subprocess.DEVNULL,
                                stdout=o, stderr=e, env={**os.environ, "HOME": str(home), **(env or {})})
    return proc, out, err


# --------------------------------------------------------------------------------------------
# Served: headless by default, --open, the warning off loopback
# --------------------------------------------------------------------------------------------


def test_dashboard_serves_with_stdin_from_dev_null(db, tmp_path):
    port = free_port()
    proc, out, err = _serve(db, tmp_path, "--port", str(port))
    try:
        wait_ready(f"http://127.0.0.1:{port}/_stcore/health", proc, err, timeout=60)
        assert proc.poll() is None
    finally:
        stop(proc)
    printed = out.read_text()
    assert f"http://127.0.0.1:{port}/" in printed and "--read-only turns them off" in printed
    assert "Email" not in printed + err.read_text()  # no first-run prompt
    assert "not loopback" not in err.read_text()  # 127.0.0.1: no warning


def test_open_opens_a_browser_and_still_never_reads_stdin(db, tmp_path):
    """``--open``: Streamlit runs its platform opener (xdg-open on Linux; a recording stand-in on PATH
    here) on the dashboard's URL, and still serves with stdin from /dev/null on a first run."""
    bin_dir, opened = tmp_path / "bin", tmp_path / "opened.txt"
    bin_dir.mkdir()
    (bin_dir / "xdg-open").write_text(f'#!/bin/sh\necho "$@" >> {opened}\n')
    (bin_dir / "xdg-open").chmod(0o755)
    port = free_port()
    proc, _, err = _serve(db, tmp_path, "--port", str(port), "--open",
                          env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    try:
        wait_ready(f"http://127.0.0.1:{port}/_stcore/health", proc, err, timeout=60)
        deadline = time.monotonic() + 30
        while not opened.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop(proc)
    assert opened.read_text().split() == [f"http://127.0.0.1:{port}"]


@pytest.mark.parametrize("flags,can,fix", [
    ((), "read the runs and acknowledge alerts or import labels", "use --read-only or a reverse proxy"),
    (("--read-only",), "read the runs;", "put a reverse proxy with authentication in front"),
])
def test_non_loopback_host_warns_on_stderr(db, tmp_path, flags, can, fix):
    port = free_port()
    proc, _, err = _serve(db, tmp_path, "--host", "0.0.0.0", "--port", str(port), *flags)
    try:
        deadline = time.monotonic() + 30
        while "warning" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop(proc)  # the warning comes before Streamlit starts: no need to serve on 0.0.0.0 for long
    lines = [ln for ln in err.read_text().splitlines() if "warning" in ln]
    assert len(lines) == 1, err.read_text()
    assert "0.0.0.0, which is not loopback: it serves without authentication" in lines[0]
    assert f"anyone who can reach port {port} can {can}" in lines[0] and fix in lines[0]


def test_is_loopback():
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "no-such-host.invalid"):
        assert not is_loopback(host), host


def test_command_line_flags(db, capsys):
    parse = build_parser().parse_args
    cmd = dashboard_command(parse(["dashboard", "--db", str(db)]))
    import drift_monitor.dashboard as dash

    app_file = Path(cmd[cmd.index("run") + 1])
    assert app_file == Path(dash.__file__).resolve().parent / "app.py" and app_file.exists()
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--db") + 1] == str(db.resolve())
    assert cmd[cmd.index("--server.headless") + 1] == "true"  # the default: never a prompt on stdin
    assert cmd[cmd.index("--server.showEmailPrompt") + 1] == "false"
    assert "--read-only" not in cmd
    opened = dashboard_command(parse(["dashboard", "--db", str(db), "--open", "--read-only"]))
    assert opened[opened.index("--server.headless") + 1] == "false"
    assert opened[opened.index("--server.showEmailPrompt") + 1] == "false"
    assert opened[opened.index("--") + 1:][-1] == "--read-only"  # passed to the app, after --
    assert dashboard_command(parse(["dashboard", "--db", str(db), "--headless"])) == cmd  # old scripts still work
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dashboard", "--help"])
    assert capsys.readouterr().out.split("\n\n")[1].startswith("Serve the Streamlit dashboard")


# --------------------------------------------------------------------------------------------
# --read-only in the app: no control that writes; normal mode says what it writes where
# --------------------------------------------------------------------------------------------


def _captions(at) -> list[str]:
    return [c.value for c in at.caption]


def test_read_only_offers_no_acknowledge_and_no_label_import(db):
    at = app(db, "Alerts", read_only=True)
    no_errors(at)
    assert sorted(at.dataframe[0].value["rule"]) == ["ev_drop", "nonfinite"]  # reading still works
    assert "al_ack" not in [b.key for b in at.button] and "al_ack_id" not in [s.key for s in at.selectbox]
    assert "Acknowledging an alert is off: this dashboard was started with --read-only." in _captions(at)
    assert any("read-only: acknowledging alerts and importing labels are off" in c for c in _captions(at))
    at = app(db, "Features", read_only=True)
    no_errors(at)
    assert not at.get("file_uploader") and "labels_import" not in [b.key for b in at.button]
    assert "Importing labels is off: this dashboard was started with --read-only." in _captions(at)
    assert "1 labels stored for " + HOOK + "." in _captions(at)  # what is stored is still shown
    assert not StoreReader(db).alerts()["acknowledged"].fillna(False).astype(bool).any()


def test_normal_mode_says_what_it_writes_where(db):
    at = app(db, "Alerts", read_only=False)
    no_errors(at)
    assert f"Acknowledging an alert writes to {db} (table alerts)." in _captions(at)
    assert "al_ack" in [b.key for b in at.button]
    assert any("two controls write to it: Acknowledge (Alerts) and Import labels (Features)" in c
               for c in _captions(at))
    at = app(db, "Features", read_only=False)
    no_errors(at)
    assert f"Importing labels writes to {db} (table feature_labels)." in _captions(at)
    assert len(at.get("file_uploader")) == 1


def test_read_only_reaches_the_app_from_the_command_line(db, monkeypatch):
    """The app reads ``--read-only`` where ``drift-monitor dashboard --read-only`` puts it: after
    ``--`` on the streamlit command line (Streamlit makes that the script's sys.argv)."""
    for flags, offered in (([], True), (["--read-only"], False)):
        cmd = dashboard_command(build_parser().parse_args(["dashboard", "--db", str(db), *flags]))
        monkeypatch.setattr(sys, "argv", [APP, *cmd[cmd.index("--") + 1:]])
        at = app(None, "Alerts")  # no session overrides: the DB path and the mode come from argv
        no_errors(at)
        assert ("al_ack" in [b.key for b in at.button]) is offered
