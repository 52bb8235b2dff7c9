"""drift-monitor dashboard.

    streamlit run dashboard/app.py -- --db drift.duckdb [--refresh 5]
    drift-monitor dashboard --db drift.duckdb [--port 8501] [--host 127.0.0.1]

Reads the DuckDB store read-only through :class:`~drift_monitor.store.StoreReader`, which opens
the file per query and closes it again, so a training run keeps writing while the page is open.

This file is the router: ``st.navigation`` registers every view once, with its own URL (``/`` for
Runs, ``/run_detail``, ``/features``, ...: the page file's name), and the sidebar menu; then the
shared sidebar controls (:func:`common.sidebar`), then the chosen page's script runs. Each page
script calls :func:`common.render_page`, the preamble they share. Links between views carry the
run in the URL (``/run_detail?run=ID``).

Why the page scripts sit in ``views/`` and not ``pages/``: Streamlit treats a ``pages/`` folder
beside the main script as its older folder-based navigation and would run a page file alone
(no menu, no sidebar) on a new server's first request for it.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from drift_monitor.dashboard import common

#: The views in menu order: (page script relative to this file, title, icon). The URL of each is
#: the script's name (the first one is served at ``/``).
PAGES = (
    ("views/runs.py", "Runs", ":material/table_rows:"),
    ("views/run_detail.py", "Run detail", ":material/monitoring:"),
    ("views/features.py", "Features", ":material/scatter_plot:"),
    ("views/refusal.py", "Refusal", ":material/block:"),
    ("views/directions.py", "Directions", ":material/explore:"),
    ("views/residual.py", "Residual", ":material/blur_on:"),
    ("views/adapter.py", "Adapter", ":material/tune:"),
    ("views/alerts.py", "Alerts", ":material/notifications:"),
    ("views/compare.py", "Compare", ":material/compare_arrows:"),
    ("views/preflight.py", "Pre-flight", ":material/flight_takeoff:"),
)


def open_requested(views: dict[str, st.Page], current: st.Page) -> None:
    """Old-style view requests open that view once: ``?page=Run+detail`` (links and bookmarks from
    before ``st.navigation``) or ``st.session_state["page"]`` set before the first run (AppTest,
    tests/bench). ``views``: every page by its title and by its URL name; the other query
    parameters are kept."""
    asked = st.query_params.get("page") or st.session_state.pop("page", None)
    if not asked:
        return
    st.query_params.pop("page", None)
    target = views.get(asked)
    if target is not None and target.title != current.title:
        st.switch_page(target, query_params=st.query_params.to_dict())


def main() -> None:
    pages = [st.Page(path, title=title, icon=icon, default=i == 0) for i, (path, title, icon) in enumerate(PAGES)]
    pg = st.navigation(pages, expanded=True)
    st.set_page_config(page_title=f"{pg.title} · drift-monitor", layout="wide")
    views = {name: page for (path, title, _), page in zip(PAGES, pages) for name in (title, Path(path).stem)}
    open_requested(views, pg)
    common.sidebar()
    pg.run()


if __name__ == "__main__":  # streamlit runs this file as __main__; importing it only reads PAGES
    main()
