"""drift-monitor dashboard.

    streamlit run dashboard/app.py -- --db drift.duckdb [--refresh 5]
    drift-monitor dashboard --db drift.duckdb [--port 8501] [--host 127.0.0.1]

Reads the DuckDB store read-only through :class:`~drift_monitor.store.StoreReader`, which opens
the file per query and closes it again, so a training run keeps writing while the page is open.
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st

from drift_monitor.dashboard import common
from drift_monitor.dashboard.pages import adapter, alerts, compare, directions, features, refusal, run_detail, runs

PAGES = {
    "Runs": runs.page,
    "Run detail": run_detail.page,
    "Features": features.page,
    "Refusal": refusal.page,
    "Directions": directions.page,
    "Adapter": adapter.page,
    "Alerts": alerts.page,
    "Compare": compare.page,
}


def _default_refresh() -> float:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--refresh", type=float, default=5.0)
    args, _ = p.parse_known_args(sys.argv[1:])
    return max(1.0, args.refresh)


def main() -> None:
    st.set_page_config(page_title="drift-monitor", layout="wide")
    # One registered page (this function): st.navigation stops Streamlit from also treating the
    # modules in pages/ as separate script pages; the sidebar radio picks the view.
    st.navigation([st.Page(_view, title="drift-monitor", url_path="dashboard", default=True)],
                  position="hidden").run()


def _view() -> None:
    with st.sidebar:
        st.title("drift-monitor")
        names = list(PAGES)
        asked = st.query_params.get("page")  # ?page=Run+detail opens that view
        page = st.radio("Page", names, index=names.index(asked) if asked in names else 0, key="page")
        st.divider()
        # ?live=0 in the URL opens the page with live refresh off (e.g. for a screenshot)
        live = st.toggle("Live refresh", value=st.query_params.get("live", "1") != "0", key="live")
        paused = st.toggle("Pause", value=False, key="paused", disabled=not live)
        interval = st.number_input("Refresh every (s)", min_value=1.0, max_value=3600.0,
                                   value=_default_refresh(), step=1.0, key="refresh_s")
        path = common.db_path()
        st.caption(f"Database: {path or '(none)'} (read-only)")
    body = PAGES[page]
    if live and not paused:
        st.fragment(lambda: common.show_page(body), run_every=float(interval))()
    else:
        common.show_page(body)


main()
