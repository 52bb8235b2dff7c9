"""Shared pieces of the dashboard views: the DB path, the reader, the sidebar, and
:func:`render_page`, the one preamble every page runs (header, DB checks, run and hook pickers,
store problems as messages, live refresh).

Navigation lives in ``app.py`` (``st.navigation``: one URL per view); each file in ``views/`` is a
page script whose body receives a :class:`PageContext`. Links between views carry the run as
``?run=ID`` (:func:`pick_run` reads it, :func:`open_run` switches page with it).

Safety rules every page follows: the DB is read through :class:`StoreReader` only (read-only,
opened per query and closed again, so a training run keeps writing); every query is a
parameterised reader method; labels are shown as plain text (no ``unsafe_allow_html``).
Two controls write, each through :class:`~drift_monitor.store.Store` and each saying so where
it is (:func:`offer_write`): acknowledging an alert and importing feature labels. ``--read-only``
turns both off, for a dashboard served to others.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import pandas as pd
import streamlit as st

from drift_monitor import catalog
from drift_monitor.alerts import SEVERITIES
from drift_monitor.records import is_adapter_hook
from drift_monitor.store import (
    SchemaVersionError,
    StoreEmpty,
    StoreError,
    StoreLocked,
    StoreNotFound,
    StoreReader,
)
from drift_monitor.store.dataset import is_dataset

DB_ENV = "DRIFT_MONITOR_DB"

#: Metrics shown on the runs table: the lead metric of each run-detail panel (drift_monitor.catalog).
KEY_METRICS: tuple[str, ...] = tuple(group[0] for group in catalog.panels().values() if group)


def _cli_args() -> argparse.Namespace:
    """``--db PATH --refresh S --read-only`` after ``--`` on the streamlit command line
    (``drift-monitor dashboard`` passes them; unknown arguments are ignored)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--db", default=None)
    p.add_argument("--refresh", default="5")
    p.add_argument("--read-only", action="store_true")
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def db_path() -> str | None:
    """``--db`` after ``--`` on the streamlit command line, else $DRIFT_MONITOR_DB, else the session's."""
    if st.session_state.get("db_path"):
        return str(st.session_state["db_path"])
    return _cli_args().db or os.environ.get(DB_ENV) or None


def read_only() -> bool:
    """``--read-only`` on the command line (or the session's ``read_only``, as tests set it): the
    controls that write to the DB are not offered. Always for an exported Parquet dataset
    (store.dataset): an archive takes no writes, whatever the flags say."""
    path = db_path()
    if path and is_dataset(path):
        return True
    if "read_only" in st.session_state:
        return bool(st.session_state["read_only"])
    return bool(_cli_args().read_only)


def default_refresh() -> float:
    """``--refresh`` seconds from the command line (at least 1; default 5)."""
    try:
        return max(1.0, float(_cli_args().refresh or 5))
    except ValueError:
        return 5.0


def reader() -> StoreReader:
    path = db_path()
    assert path is not None
    return StoreReader(path, retries=50, retry_timeout_s=5.0)


# --------------------------------------------------------------------------------------------
# The frame around every view: the sidebar (once, in app.py) and render_page (each page file)
# --------------------------------------------------------------------------------------------

def sidebar() -> None:
    """The controls under the page menu, the same on every view (app.py calls it before ``pg.run()``).

    ``?live=0`` in the URL opens the dashboard with live refresh off (e.g. for a screenshot).
    """
    with st.sidebar:
        live = st.toggle("Live refresh", value=st.query_params.get("live", "1") != "0", key="live")
        st.toggle("Pause", value=False, key="paused", disabled=not live)
        st.number_input("Refresh every (s)", min_value=1.0, max_value=3600.0, value=default_refresh(),
                        step=1.0, key="refresh_s")
        if read_only():
            st.caption(f"Database: {db_path() or '(none)'} (read-only: acknowledging alerts and importing "
                       "labels are off)")
        else:
            st.caption(f"Database: {db_path() or '(none)'}. Pages read it; two controls write to it: "
                       "Acknowledge (Alerts) and Import labels (Features). `--read-only` turns them off.")


@dataclass(frozen=True)
class PageContext:
    """What :func:`render_page` hands a page body: the reader, the DB path (for the two pages that
    write through :class:`Store`: labels, acknowledgements) and whether they may, and the picked
    run and hook."""

    reader: StoreReader
    db: str
    run: pd.Series | None = None  #: the runs row (``StoreReader.runs()``) when the page picks a run
    hook: str | None = None
    read_only: bool = False  #: ``--read-only``: the page offers no control that writes

    @property
    def run_id(self) -> str:
        assert self.run is not None
        return str(self.run["run_id"])

    def write_path(self, run_id: str | None = None) -> str:
        """The store file a write for ``run_id`` (default: the picked run) goes to: the store
        itself, or, over many files (a store directory), the file that holds the run."""
        from drift_monitor.store.many import is_many, locate

        if not is_many(self.db):
            return self.db
        return locate(self.reader.runs(), run_id or self.run_id)[0]

    def offer_write(self, action: str, table: str) -> bool:
        """Whether the page may show the control that does ``action``; a caption says either way
        what it writes where (the DB file and table), or that ``--read-only`` turned it off."""
        if self.read_only:
            why = "a Parquet dataset is read-only" if is_dataset(self.db) else \
                "this dashboard was started with --read-only"
            st.caption(f"{action} is off: {why}.")
            return False
        st.caption(f"{action} writes to {self.db} (table {table}).")
        return True


def render_page(title: str, body: Callable[[PageContext], None], *, key: str | None = None,
                hook: bool = False) -> None:
    """Show one view: its header, then the shared preamble and ``body``, live-refreshed.

    The preamble: no DB path given -> a hint; open the :class:`StoreReader`; with ``key`` (the key
    prefix of the page's widgets) a run picker (``?run=ID`` in the URL preselects that run), with
    ``hook=True`` also a hook picker; nothing to pick -> a message and ``body`` is not called.
    Store problems become one clear message on the page, never a traceback. Live refresh re-runs
    the preamble and the body every N seconds (``st.fragment(run_every=...)``) unless the sidebar
    turns it off or pauses it.
    """
    st.header(title)

    def frame() -> None:
        _frame(body, key, hook)

    if st.session_state.get("live", True) and not st.session_state.get("paused", False):
        interval = float(st.session_state.get("refresh_s") or default_refresh())
        st.fragment(frame, run_every=interval)()
    else:
        frame()


def _frame(body: Callable[[PageContext], None], key: str | None, hook: bool) -> None:
    path = db_path()
    if not path:
        st.info("No database given. Start the dashboard with `drift-monitor dashboard --db PATH` "
                "or `streamlit run dashboard/app.py -- --db PATH`.")
        return
    try:
        r = reader()
        run, picked_hook = None, None
        if key is not None:
            top = st.container()  # the run's active alerts, above its pickers: filled once the run is known
            run = pick_run(r, key=f"{key}_run")
            if run is None:
                return
            with top:
                alert_banner(r, str(run["run_id"]))
            if hook:
                picked_hook = pick_hook(r, run["run_id"], key=f"{key}_hook")
                if picked_hook is None:
                    return
        body(PageContext(r, path, run, picked_hook, read_only=read_only()))
    except StoreEmpty:
        st.info(f"The database {path} holds no drift-monitor data yet. It fills in once a run writes "
                "its first snapshot; this page refreshes itself in live mode.")
    except StoreNotFound:
        st.error(f"No drift-monitor database at {path}: the file does not exist. Check the --db path "
                 "(a training run creates it with its first snapshot).")
    except SchemaVersionError as exc:
        st.error(f"This database was written with another schema version (found {exc.found}, this "
                 f"dashboard reads version {exc.expected}). {exc}")
    except StoreLocked:
        st.warning("The database is busy (a writer holds it); showing it again at the next refresh.")
    except StoreError as exc:
        st.error(f"Cannot read the database: {exc}")
    except duckdb.Error as exc:  # e.g. a damaged file: a message, not a traceback
        st.error(f"Cannot read the database {path}: {type(exc).__name__}: {exc}")


#: The alert banner's icon (tests tell the banner from an error message by it).
ALERT_ICON = ":material/notifications_active:"
#: The look of each alert severity: its banner box and its colour in charts. The severities and
#: their rank are the alerts' (:data:`drift_monitor.alerts.SEVERITIES`); a severity added there
#: without a look here fails at import, not on the first such alert.
_LOOK: dict[str, tuple[Callable[..., object], str]] = {
    "info": (st.info, "#4c78a8"), "warning": (st.warning, "#f58518"), "critical": (st.error, "#e45756")}
#: Alert severities, worst first: the banner's order and the Alerts page's filter.
SEVERITIES_WORST_FIRST: tuple[str, ...] = tuple(reversed(SEVERITIES))
#: Chart colour per severity (the run detail's alert markers).
SEVERITY_COLOURS: dict[str, str] = {sev: _LOOK[sev][1] for sev in SEVERITIES}
#: Banner order and look: the worst active severity decides (st.error / st.warning / st.info).
_BANNERS: tuple[tuple[str, Callable[..., object]], ...] = tuple((sev, _LOOK[sev][0]) for sev in SEVERITIES_WORST_FIRST)


def alert_banner(r: StoreReader, run_id: str, limit: int = 5) -> None:
    """The run's active alerts, first on every run view: one box in the colour of the worst
    severity, each alert on a line (worst first, newest first), or a calm line when none is active.
    Why first: the dashboard is read for what is wrong now; a chart below explains it."""
    active = r.alerts(run_id=run_id, status="active")
    if active.empty:
        st.success("No active alerts for this run.", icon=":material/check_circle:")
        return
    order = {sev: i for i, (sev, _) in enumerate(_BANNERS)}
    active = active.assign(_o=active["severity"].map(order).fillna(len(order))).sort_values(
        ["_o", "step"], ascending=[True, False], kind="stable")
    counts = active["severity"].value_counts()
    head = ", ".join(f"{int(counts[sev])} {sev}" for sev, _ in _BANNERS if sev in counts)
    lines = [f"- **{plain(a.rule)}** ({plain(a.severity)}) at {plain(a.hook or '-')}, step {int(a.step)}: "
             f"{plain(a.message)}" + (" (acknowledged)" if pd.notna(a.acknowledged) and bool(a.acknowledged) else "")
             for a in active.head(limit).itertuples()]
    if len(active) > limit:
        lines.append(f"- and {len(active) - limit} more (Alerts page)")
    show = next((fn for sev, fn in _BANNERS if sev in counts), st.warning)
    show(f"**{len(active)} active alert{'s' if len(active) != 1 else ''}** ({head})\n" + "\n".join(lines),
         icon=ALERT_ICON)


def plain(text: object) -> str:
    """Text from a run or its data (an alert message, a dataset path, a model name) as plain text
    inside markdown: no markup, links or HTML of its own."""
    return "".join("\\" + c if c in "\\`*_[]<>#|~$" else c for c in str(text or "")).replace("\n", " ")


# --------------------------------------------------------------------------------------------
# Pickers and links between views
# --------------------------------------------------------------------------------------------

#: The run-detail page, as ``st.switch_page`` / ``st.page_link`` name it (relative to app.py).
RUN_DETAIL = "views/run_detail.py"
#: Session key of the run last picked on any view.
FOCUS_KEY = "_run_in_focus"


def open_run(page: str, run_id: str) -> None:
    """Switch to ``page`` (a file under views/) showing ``run_id``: the URL becomes ``/<page>?run=ID``."""
    st.switch_page(page, query_params={"run": run_id})


def pick_run(r: StoreReader, key: str = "run"):
    """A run selector; returns the selected runs row (a Series) or None when there are no runs.

    ``?run=ID`` in the URL (a link from another view, a bookmark) selects that run once; the
    selection is written back to ``?run=``, so the address bar always names the run shown. A
    view opened from the menu starts on the run last picked on any view (the run in focus).
    """
    runs = r.runs()
    if runs.empty:
        st.info("No runs in this database yet.")
        return None
    ids = runs["run_id"].tolist()
    names = dict(zip(runs["run_id"], runs["name"].fillna("")))
    state, linked, seen = st.session_state, st.query_params.get("run"), f"_{key}_linked"
    if linked in ids and state.get(seen) != linked:
        state[key] = linked  # a new link: it wins over the picker's earlier choice
    elif state.get(key) not in ids and state.get(FOCUS_KEY) in ids:
        state[key] = state[FOCUS_KEY]
    if state.get(key) not in ids:
        state.pop(key, None)
    rid = st.selectbox("Run", ids, key=key, format_func=lambda i: f"{names.get(i) or i} ({i})")
    state[seen] = state[FOCUS_KEY] = rid
    if linked != rid:
        st.query_params["run"] = rid
    return runs[runs["run_id"] == rid].iloc[0]


def pick_hook(r: StoreReader, run_id: str, key: str = "hook") -> str | None:
    """A selector over the run's SAE hooks (adapter-signal hooks have no feature tables: the
    Adapter page shows them)."""
    every = r.hooks(run_id)
    hooks = [h for h in every if not is_adapter_hook(h)]
    if not hooks:
        st.info("This run has adapter signals only (see the Adapter page)." if every else
                "This run has no snapshots yet.")
        return None
    if st.session_state.get(key) not in hooks:
        st.session_state.pop(key, None)
    return st.selectbox("Hook", hooks, key=key)
