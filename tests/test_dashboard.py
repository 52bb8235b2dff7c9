"""The Streamlit dashboard (dashboard/, installed as drift_monitor.dashboard).

Every page runs under ``streamlit.testing.v1.AppTest`` on a fixture DB written through the
Store API, and what it shows is compared with the DB. The app is ``dashboard/app.py``, which
registers the views with ``st.navigation``; a test opens a view with ``AppTest.switch_page`` (its
page script). Store problems (missing file, empty DB, older schema) must be a message on the
page, never a traceback. A writer process keeps writing while the page refreshes, and a real
headless Chromium renders the served app and follows its navigation. The command itself
(headless by default, ``--read-only``, the warning off loopback) is tests/test_dashboard_cli.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pytest
from servers import free_port, stop
from store_fixtures import HOOK, make_snapshot
from streamlit.testing.v1 import AppTest  # a required dependency: a plain import, never a skip

from drift_monitor.dashboard.app import PAGES as VIEWS
from drift_monitor.dashboard.common import ALERT_ICON
from drift_monitor.records import Alert
from drift_monitor.store import Store, StoreReader, create_schema

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "dashboard" / "app.py")
PAGES = ["Runs", "Run detail", "Features", "Refusal", "Alerts", "Compare", "Adapter", "Directions", "Residual",
         "Pre-flight"]
#: View title -> its page script (relative to app.py), as app.py registers it with st.navigation.
PAGE_FILES = {title: path for path, title, _ in VIEWS}
#: View title -> the header its page shows.
HEADERS = {"Runs": "Runs", "Run detail": "Run detail", "Features": "Features", "Refusal": "Refusal features",
           "Alerts": "Alerts", "Compare": "Compare runs", "Adapter": "Adapter signals", "Directions": "Directions",
           "Residual": "Residual", "Pre-flight": "Pre-flight"}
STEPS = [0, 10, 20, 30]
ARTIFACTS = REPO / "test-artifacts"


def _write_run(db: Path, run_id: str, name: str, offset: int) -> None:
    s = Store(db, run_id=run_id)
    s.start_run(name=name, model="tiny-llama")
    for i, step in enumerate(STEPS):
        snap = make_snapshot(step, d_sae=256, seed=offset + i)
        for h in snap.hooks.values():
            h.metrics.update(act_cosine=0.99 - 0.01 * i - offset / 1000, act_relative_mse=0.1 * i,
                             features_drifted_ratio=0.05 * i, topk_jaccard=0.8 - 0.05 * i, density_js=0.02 * i,
                             base_explained_variance=0.9)
        alerts = []
        if step == 20:
            alerts = [Alert(rule="ev_drop", severity="warning", step=step, hook=HOOK,
                            message="explained variance dropped", value=0.5, threshold=0.1)]
        if step == 30:
            alerts = [Alert(rule="nonfinite", severity="critical", step=step, hook=HOOK,
                            message="<b>NaN</b> activations", value=0.2, threshold=0.0)]
        s.write(snap, alerts=alerts)
    s.close()


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dash") / "drift.duckdb"
    _write_run(path, "alpha-id", "alpha", 0)
    _write_run(path, "beta-id", "beta", 100)
    with Store(path) as s:
        s.import_labels(HOOK, {1: "<script>alert(1)</script> refuses", 2: "cats"}, source="test")
    return path


def app(db_path, page: str, read_only: bool | None = None, **query: str) -> AppTest:
    """The app opened on one view (its title), as a visit to that view's URL with ``query``;
    ``read_only`` as ``drift-monitor dashboard --read-only`` sets it (None: the command line's)."""
    at = AppTest.from_file(APP, default_timeout=30)
    if db_path is not None:
        at.session_state["db_path"] = str(db_path)
    if read_only is not None:
        at.session_state["read_only"] = read_only
    at.query_params.update(query)
    at.switch_page(PAGE_FILES[page]).run()
    return at


def header(at: AppTest) -> str:
    return at.header[0].value


def no_errors(at: AppTest) -> None:
    """No exception and no error message (a run view's alert banner, st.error for a critical alert,
    is the run's state, not the page's)."""
    assert not at.exception, [e.value for e in at.exception]
    errors = [e for e in at.error if e.icon != ALERT_ICON]
    assert not errors, [e.value for e in errors]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


# --------------------------------------------------------------------------------------------
# Pages on the fixture DB
# --------------------------------------------------------------------------------------------


def test_runs_page_matches_db(db):
    at = app(db, "Runs")
    no_errors(at)
    shown = at.dataframe[0].value.set_index("run_id")
    runs = StoreReader(db).runs().set_index("run_id")
    assert set(shown.index) == {"alpha-id", "beta-id"}
    for rid in shown.index:
        assert shown.loc[rid, "last_step"] == runs.loc[rid, "last_step"] == 30
        assert shown.loc[rid, "status"] == runs.loc[rid, "status"]
        assert shown.loc[rid, "active_alerts"] == runs.loc[rid, "active_alerts"] == 2
    # sparkline = the metric's values over steps (one hook: mean over hooks = the value)
    series = StoreReader(db).metric_series("alpha-id", names=["act_cosine"])
    assert list(shown.loc["alpha-id", "act_cosine"]) == pytest.approx(series["value"].tolist())


def test_run_detail_shows_metrics_and_alert_markers(db):
    at = app(db, "Run detail")
    no_errors(at)
    rid = at.selectbox(key="detail_run").value
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["last step"] == "30"
    ev = StoreReader(db).metric_series(rid, hook=HOOK, names=["explained_variance"])
    assert metrics["explained variance"] == f"{ev[ev.step == 30].value.iloc[0]:.4f}"
    specs = charts(at)
    # EV (current vs base), activation cosine, activation relative MSE, drifted ratio, jaccard, density JS: one
    # scale per chart (the fixture has no residual or CE-loss metrics: those panels are a caption)
    assert len(specs) == 6
    assert all(s["layer"][1]["mark"]["type"] == "rule" for s in specs)  # alert markers on each chart
    # switching hook / run works
    at.selectbox(key="detail_run").set_value("beta-id").run()
    no_errors(at)
    assert {m.label: m.value for m in at.metric}["active alerts"] == "2"


def test_features_page_top_table_trajectory_and_labels(db):
    at = app(db, "Features")
    no_errors(at)
    rid = at.selectbox(key="feat_run").value
    assert at.selectbox(key="feat_step").value == 30
    top = at.dataframe[0].value
    want = StoreReader(db).top_features(rid, 30, HOOK, by="drift", k=25)
    assert top["feature"].tolist() == want["feature"].tolist()
    specs = charts(at)
    scatter = specs[0]
    assert scatter["encoding"]["x"]["scale"]["type"] == "log" and scatter["encoding"]["y"]["scale"]["type"] == "log"
    assert {t["field"] for t in scatter["encoding"]["tooltip"]} >= {"feature", "label", "drift"}
    assert len(specs) == 2  # scatter + trajectory of the top feature
    # a labelled feature: the label is shown as plain text (never HTML)
    at.number_input(key="feat_id").set_value(1).run()
    no_errors(at)
    assert "Label: <script>alert(1)</script> refuses" in [t.value for t in at.text]
    # sortable by another ranking, another step
    at.selectbox(key="feat_by").set_value("abs_log_density_ratio").run()
    at.selectbox(key="feat_step").set_value(10).run()
    no_errors(at)
    want = StoreReader(db).top_features(rid, 10, HOOK, by="abs_log_density_ratio", k=25)
    assert at.dataframe[0].value["feature"].tolist() == want["feature"].tolist()


def test_refusal_page_heatmap_and_table(db):
    at = app(db, "Refusal")
    no_errors(at)
    rid = at.selectbox(key="ref_run").value
    spec = charts(at)[0]
    assert spec["mark"]["type"] == "rect" and spec["encoding"]["color"]["field"] == "refusal_score"
    shown = at.dataframe[0].value
    want = StoreReader(db).refusal_features(rid, HOOK, steps=[30], k=10)
    assert shown["feature"].tolist() == want["feature"].tolist()
    assert shown["harmful_drift"].tolist() == pytest.approx(want["harmful_drift"].tolist())


def test_alerts_page_filters_and_acknowledges(tmp_path):
    db = tmp_path / "alerts.duckdb"
    _write_run(db, "alpha-id", "alpha", 0)
    at = app(db, "Alerts")
    no_errors(at)
    shown = at.dataframe[0].value
    assert sorted(shown["rule"]) == ["ev_drop", "nonfinite"]
    at.multiselect(key="al_sev").set_value(["critical"]).run()
    assert at.dataframe[0].value["rule"].tolist() == ["nonfinite"]
    at.multiselect(key="al_sev").set_value(["critical", "warning", "info"]).run()
    at.multiselect(key="al_rule").set_value(["ev_drop"]).run()
    assert at.dataframe[0].value["rule"].tolist() == ["ev_drop"]
    aid = at.selectbox(key="al_ack_id").value
    at.button(key="al_ack").click().run()
    no_errors(at)
    assert at.success
    stored = StoreReader(db).alerts().set_index("alert_id")
    assert bool(stored.loc[aid, "acknowledged"]) is True
    assert stored["acknowledged"].sum() == 1


def test_compare_page_overlays_runs(db):
    at = app(db, "Compare")
    no_errors(at)
    assert sorted(at.multiselect(key="cmp_runs").value) == ["alpha-id", "beta-id"]
    at.selectbox(key="cmp_metric").set_value("act_cosine").run()
    no_errors(at)
    spec = charts(at)[0]
    assert spec["encoding"]["color"]["field"] == "run_name"
    last = at.dataframe[0].value.set_index("run_id")["value"]
    r = StoreReader(db)
    for rid in ("alpha-id", "beta-id"):
        s = r.metric_series(rid, hook=HOOK, names=["act_cosine"])
        assert last[rid] == pytest.approx(s[s.step == 30].value.iloc[0])


def test_pause_toggle_and_interval(db):
    at = app(db, "Runs")
    at.toggle(key="paused").set_value(True).run()
    at.number_input(key="refresh_s").set_value(2.0).run()
    no_errors(at)
    assert at.dataframe[0].value.shape[0] == 2


# --------------------------------------------------------------------------------------------
# Navigation: st.navigation in app.py (one URL per view); links carry the run as ?run=ID
# --------------------------------------------------------------------------------------------


def test_every_view_is_registered_with_st_navigation(db):
    assert [title for _, title, _ in VIEWS] == ["Runs", "Run detail", "Features", "Refusal", "Directions", "Residual",
                                                "Adapter", "Alerts", "Compare", "Pre-flight"]
    assert sorted(PAGE_FILES) == sorted(PAGES) == sorted(HEADERS)  # every view is tested here
    files = [(Path(APP).parent / path).resolve() for path in PAGE_FILES.values()]
    assert all(f.is_file() for f in files) and len({f.stem for f in files}) == len(files)  # URL = the file's name
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["db_path"] = str(db)
    at.run()
    no_errors(at)
    assert header(at) == "Runs"  # the default view, served at /
    # after a run, switch_page resolves through st.navigation's registry: an unregistered file raises
    for title, path in PAGE_FILES.items():
        at.switch_page(path).run()
        no_errors(at)
        assert header(at) == HEADERS[title], title
        assert at.toggle(key="live") and at.number_input(key="refresh_s")  # the shared sidebar on every view
    with pytest.raises(ValueError, match="navigation page"):
        at.switch_page("common.py")


def test_runs_table_row_opens_the_run_detail(db):
    at = app(db, "Runs")
    no_errors(at)
    rid = at.dataframe[0].value["run_id"].iloc[1]
    at.session_state["runs_table"] = {"selection": {"rows": [1], "columns": [], "cells": []}}  # a click on row 2
    at.run()
    no_errors(at)
    assert header(at) == "Run detail"
    assert at.selectbox(key="detail_run").value == rid
    assert at.query_params == {"run": rid}  # the URL names the run: /run_detail?run=ID
    assert {m.label: m.value for m in at.metric}["last step"] == "30"


@pytest.mark.parametrize("page,key", [("Run detail", "detail_run"), ("Features", "feat_run"), ("Refusal", "ref_run"),
                                      ("Directions", "dir_run"), ("Residual", "res_run"), ("Adapter", "adp_run")])
def test_run_in_the_url_selects_the_run(db, page, key):
    first = StoreReader(db).runs()["run_id"].iloc[0]
    other = "alpha-id" if first == "beta-id" else "beta-id"
    at = app(db, page, run=other)  # /<view>?run=ID: a link or a bookmark
    no_errors(at)
    assert at.selectbox(key=key).value == other
    at = app(db, page, run="no-such-run")  # an unknown id: the first run, and the URL says which
    no_errors(at)
    assert at.selectbox(key=key).value == first and at.query_params == {"run": first}


def test_run_picker_updates_the_url_and_new_links_win(db):
    at = app(db, "Features", run="alpha-id")
    at.selectbox(key="feat_run").set_value("beta-id").run()
    no_errors(at)
    assert at.selectbox(key="feat_run").value == "beta-id" and at.query_params["run"] == "beta-id"
    at.run()  # the picker's choice stays (the old link does not come back)
    assert at.selectbox(key="feat_run").value == "beta-id"
    at.query_params["run"] = "alpha-id"  # a new link to this view
    at.run()
    assert at.selectbox(key="feat_run").value == "alpha-id"
    # a view opened from the menu (no ?run=) starts on the run in focus, not on the first run
    assert StoreReader(db).runs()["run_id"].iloc[0] != "alpha-id"
    at.query_params.clear()
    at.switch_page(PAGE_FILES["Run detail"]).run()
    no_errors(at)
    assert at.selectbox(key="detail_run").value == "alpha-id" and at.query_params == {"run": "alpha-id"}


def test_old_page_links_open_their_view_once(db):
    # ?page=Run+detail (links from before st.navigation); the other parameters stay
    at = AppTest.from_file(APP, default_timeout=30)
    at.session_state["db_path"] = str(db)
    at.query_params.update(page="Run detail", live="0")
    at.run()
    no_errors(at)
    assert header(at) == "Run detail" and "page" not in at.query_params and at.query_params["live"] == "0"
    assert at.toggle(key="live").value is False
    at.run()
    assert header(at) == "Run detail"
    # st.session_state["page"] before the first run (tests/bench, test_directions); a URL name works too
    for asked in ("Features", "features"):
        at = AppTest.from_file(APP, default_timeout=30)
        at.session_state["db_path"] = str(db)
        at.session_state["page"] = asked
        at.run()
        no_errors(at)
        assert header(at) == "Features"
        at.switch_page(PAGE_FILES["Runs"]).run()  # the request does not stick
        assert header(at) == "Runs"


# --------------------------------------------------------------------------------------------
# Labels import
# --------------------------------------------------------------------------------------------


def test_parse_and_import_neuronpedia_labels(tmp_path, db):
    from drift_monitor.dashboard.views.features import import_labels, parse_labels

    neuronpedia = json.dumps([
        {"modelId": "m", "layer": "6-res", "index": "5", "description": " says no", "explanationModelName": "x"},
        {"modelId": "m", "layer": "6-res", "index": "7", "description": "<img src=x onerror=alert(1)>"},
    ]).encode()
    assert parse_labels(neuronpedia, "export.json").to_dict("list") == {
        "feature": [5, 7], "label": [" says no", "<img src=x onerror=alert(1)>"]}
    assert parse_labels(b'{"3": "three", "4": "four"}', "m.json").to_dict("list") == {
        "feature": [3, 4], "label": ["three", "four"]}
    assert parse_labels(b"index,explanation\n9,nine\n10,ten\n", "e.csv").to_dict("list") == {
        "feature": [9, 10], "label": ["nine", "ten"]}
    with pytest.raises(ValueError):
        parse_labels(b"a,b\n1,2\n", "bad.csv")
    target = tmp_path / "labels.duckdb"
    shutil.copy(db, target)
    assert import_labels(str(target), HOOK, neuronpedia, "export.json") == 2
    labels = StoreReader(target).labels(HOOK).set_index("feature")
    assert labels.loc[7, "label"] == "<img src=x onerror=alert(1)>" and labels.loc[7, "source"] == "neuronpedia"
    assert labels.loc[1, "label"].startswith("<script>")  # earlier labels kept


# --------------------------------------------------------------------------------------------
# Store problems: a message, never a traceback
# --------------------------------------------------------------------------------------------


def _empty_db(path: Path) -> Path:
    duckdb.connect(str(path)).close()
    return path


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a database\n" * 1000)
    return path


def _old_schema_db(path: Path) -> Path:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '0')")
    con.execute("CREATE TABLE runs (run_id VARCHAR)")
    con.close()
    return path


@pytest.mark.parametrize("page", PAGES)
def test_store_problems_are_messages(tmp_path, page):
    cases = {
        "missing": (tmp_path / "nope.duckdb", "error", "does not exist"),
        "empty": (_empty_db(tmp_path / "empty.duckdb"), "info", "no drift-monitor data yet"),
        "old": (_old_schema_db(tmp_path / "old.duckdb"), "error", "schema version"),
        "none": (None, "info", "No database given"),
        "not duckdb": (_garbage(tmp_path / "garbage.duckdb"), "error", "Cannot read the database"),
    }
    for what, (path, kind, text) in cases.items():
        at = app(path, page)
        assert not at.exception, (what, [e.value for e in at.exception])
        msgs = [m.value for m in getattr(at, kind)]
        assert any(text in m for m in msgs), (what, msgs)
    # an empty store (schema, no runs yet) is an info too
    fresh = tmp_path / "fresh.duckdb"
    con = duckdb.connect(str(fresh))
    create_schema(con)  # the schema, no rows
    con.close()
    at = app(fresh, page)
    assert not at.exception and not at.error
    assert at.info


# --------------------------------------------------------------------------------------------
# Live: a writer keeps writing while the page refreshes
# --------------------------------------------------------------------------------------------


def test_pages_refresh_while_a_writer_writes(tmp_path):
    """Pages keep refreshing while a writer process keeps writing: no page error, no write lost.
    Counts, not a clock, end the test, so a loaded machine makes it slower, not flaky."""
    db = tmp_path / "live.duckdb"
    stop_file = tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, str(REPO / "tests" / "dashboard_writer.py"), str(db), str(stop_file),
                               "180", "2048"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "started"
        ats = {p: app(db, p) for p in ("Runs", "Run detail", "Features")}
        seen_steps, refreshes = set(), 0
        deadline = time.monotonic() + 170
        while writer.poll() is None and time.monotonic() < deadline:
            for page, at in ats.items():
                at.run()
                refreshes += 1
                assert not at.exception, (page, [e.value for e in at.exception])
                assert not at.error, (page, [e.value for e in at.error])
                if page == "Runs" and at.dataframe:
                    seen_steps.add(int(at.dataframe[0].value["last_step"].iloc[0]))
            if refreshes >= 24 and seen_steps and max(seen_steps) >= 20:
                break
            time.sleep(0.5)
        stop_file.touch()
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, err
    n = int(out.split()[-1])
    assert n >= 20 and refreshes >= 24, (n, refreshes)
    assert len(seen_steps) > 3  # the page saw the run grow
    r = StoreReader(db)
    assert r.steps("live-run") == list(range(1, n + 1))  # no write lost
    assert int(r.runs().set_index("run_id").loc["live-run", "n_snapshots"]) == n
    at = app(db, "Runs")
    assert int(at.dataframe[0].value["last_step"].iloc[0]) == n


# --------------------------------------------------------------------------------------------
# Served app: the CLI binds 127.0.0.1; a real browser renders it
# --------------------------------------------------------------------------------------------


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"streamlit did not come up on port {port}")


def test_browser_renders_dashboard_and_refreshes_live(db, tmp_path):
    """`drift-monitor dashboard` serves the app; headless Chromium (driven over the DevTools pipe, so
    it waits in real time for Streamlit's websocket) shows the runs and the charts, a snapshot
    written while the page is open appears without a reload, and the views link to each other:
    every view has its own URL (even as the first visit to a new server), the sidebar menu
    switches views, and a click on a row of the runs table opens that run's detail."""
    from cdp import Chromium

    chromium = "/usr/bin/chromium"
    assert os.path.exists(chromium), (
        "chromium is missing: run `bash scripts/install.sh --test` (or apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)
    live_db = tmp_path / "browser.duckdb"
    shutil.copy(db, live_db)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "drift_monitor.cli", "dashboard", "--db", str(live_db), "--port", str(port),
         "--refresh", "1"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    browser = None
    try:
        _wait_healthy(port, server)
        with pytest.raises(OSError):  # bound to 127.0.0.1 only, not to the other addresses
            other = socket.gethostbyname(socket.gethostname())
            if other.startswith("127."):
                raise OSError("no non-loopback address to check")
            socket.create_connection((other, port), timeout=1).close()
        url = f"http://127.0.0.1:{port}/"
        not_stale = "!document.querySelector('[data-stale=\"true\"]')"
        charts_drawn = "document.querySelectorAll('[data-testid=\"stVegaLiteChart\"] canvas, " \
                       "[data-testid=\"stVegaLiteChart\"] svg').length >= {n}"
        metric_values = "Array.from(document.querySelectorAll('[data-testid=\"stMetricValue\"]')).map(e => e.innerText)"
        selected = "Array.from(document.querySelectorAll('[data-testid=\"stSelectbox\"] input')).map(e => e.value)"
        sidebar = "document.querySelector('[data-testid=\"stSidebar\"]').innerText"
        nav_links = "Array.from(document.querySelectorAll('[data-testid=\"stSidebarNav\"] a'))"
        headers = "Array.from(document.querySelectorAll('h2')).map(e => e.innerText)"

        # a view's own URL (a bookmark, a link), as the first visit to this server; live refresh on, every 1 s
        browser = Chromium(chromium, tmp_path / "profile-detail")
        browser.open(url + "run_detail?run=beta-id")
        browser.wait_for(charts_drawn.format(n=5) + " && " + not_stale, 60)
        assert "30" in browser.evaluate(metric_values)
        assert "beta (beta-id)" in browser.evaluate(selected)  # the run the URL names
        # the menu is app.py's st.navigation: every view, each with its own URL
        links = browser.evaluate(nav_links + ".map(a => [a.innerText.split('\\n').pop(), a.getAttribute('href')])")
        want = [[title, url + ("" if i == 0 else Path(path).stem)] for i, (path, title, _) in enumerate(VIEWS)]
        assert links == want, links
        assert "Live refresh" in browser.evaluate(sidebar)  # app.py's sidebar, though the URL was a page's
        time.sleep(1)
        browser.screenshot(ARTIFACTS / "dashboard_run_detail.png")
        dom = browser.dom()
        (ARTIFACTS / "dashboard_run_detail.html").write_text(dom)
        assert "Run detail" in dom and "stException" not in dom
        # a training run writes step 40 while the page is open: the page shows it without a reload
        for rid in ("alpha-id", "beta-id"):
            with Store(live_db, run_id=rid) as s:
                s.write(make_snapshot(40, d_sae=256, seed=7))
        browser.wait_for(metric_values + ".includes('40')", 30)
        assert "stException" not in browser.dom()
        # the sidebar menu switches the view in the same session, and the URL follows
        browser.evaluate(nav_links + ".find(a => a.innerText.endsWith('Features')).click()")
        browser.wait_for("location.pathname === '/features' && " + headers + ".includes('Features') && "
                         + charts_drawn.format(n=1) + " && " + not_stale, 60)
        assert "stException" not in browser.dom()
        browser.close()

        browser = Chromium(chromium, tmp_path / "profile-runs")
        browser.open(url + "?live=0")
        browser.wait_for("document.documentElement.outerHTML.includes('alpha-id') && "
                         "document.querySelector('[data-testid=\"stDataFrame\"]') !== null && " + not_stale, 60)
        time.sleep(1)  # let the data grid paint its canvas
        browser.screenshot(ARTIFACTS / "dashboard_runs.png")
        dom = browser.dom()
        (ARTIFACTS / "dashboard_runs.html").write_text(dom)
        assert "alpha" in dom and "beta" in dom and "Runs" in dom  # run names, the view
        assert "stException" not in dom and "Traceback" not in dom
        assert (ARTIFACTS / "dashboard_runs.png").stat().st_size > 30_000  # a blank page is ~17 kB
        # a click on alpha's row (its selection cell; the grid is a canvas: 35 px rows under a 35 px header)
        row = StoreReader(live_db).runs()["run_id"].tolist().index("alpha-id")
        grid = browser.evaluate("JSON.stringify(document.querySelector('[data-testid=\"stDataFrame\"]')"
                                ".getBoundingClientRect())")
        box = json.loads(grid)
        x, y = box["x"] + 15, box["y"] + 35 * (row + 1) + 17
        for kind in ("mousePressed", "mouseReleased"):
            browser.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})
        browser.wait_for("location.pathname === '/run_detail' && location.search === '?run=alpha-id' && "
                         + charts_drawn.format(n=5) + " && " + not_stale, 60)
        assert "alpha (alpha-id)" in browser.evaluate(selected)
        assert "40" in browser.evaluate(metric_values)
        assert "stException" not in browser.dom()
    finally:
        if browser is not None:
            browser.close()
        stop(server)


# --------------------------------------------------------------------------------------------
# Reader additions used by the pages (aggregated in SQL)
# --------------------------------------------------------------------------------------------


def test_reader_dashboard_queries(db):
    r = StoreReader(db)
    # density_scatter: base density recovered from base_count (fixture: density = count / 1000)
    sc = r.density_scatter("alpha-id", 30, HOOK, "all", limit=50)
    assert len(sc) == 50
    full = r.feature_table("alpha-id", 30, HOOK).set_index("feature")
    assert sc["base_density"].to_numpy() == pytest.approx(full.loc[sc["feature"], "base_count"].to_numpy() / 1000)
    ldr = sc["log_density_ratio"].abs()
    assert ldr.is_monotonic_decreasing and ldr.iloc[0] == pytest.approx(full["log_density_ratio"].abs().max())
    # sparklines: the last N values in step order
    sp = r.metric_sparklines(["act_cosine"], last_n=2).set_index("run_id")
    assert list(sp.loc["alpha-id", "steps"]) == [20, 30]
    series = r.metric_series("alpha-id", names=["act_cosine"])
    assert list(sp.loc["alpha-id", "values"]) == pytest.approx(series["value"].tolist()[-2:])
    # compare: one metric, several runs; names and hooks
    cmp_ = r.metric_compare(["alpha-id", "beta-id"], "topk_jaccard", hook=HOOK)
    assert sorted(cmp_["run_name"].unique()) == ["alpha", "beta"] and len(cmp_) == 2 * len(STEPS)
    assert r.metric_compare(["nope"], "topk_jaccard").empty
    assert "act_cosine" in r.metric_names("alpha-id") and r.all_hooks() == [HOOK]
    assert r.categories("alpha-id", 30, HOOK) == ["all", "general", "harmful", "harmless"]
    # parameters travel as values, never as SQL
    assert r.density_scatter("alpha-id' OR 1=1 --", 30, HOOK).empty
