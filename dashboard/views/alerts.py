"""Alerts: active and resolved, filtered by severity and rule; acknowledge (Store.acknowledge_alert),
unless the dashboard runs with ``--read-only``. Below them, the webhook notifications of the alerts
(drift_monitor.notify) with their delivery state, undelivered ones first and called out."""

from __future__ import annotations

import streamlit as st

from drift_monitor.dashboard.common import SEVERITIES_WORST_FIRST, PageContext, render_page
from drift_monitor.store import Store


def acknowledge(db: str, alert_id: str) -> str:
    with Store(db, retry_timeout_s=5.0) as s:
        return s.acknowledge_alert(alert_id)


def body(ctx: PageContext) -> None:
    r = ctx.reader
    runs = r.runs()
    names = dict(zip(runs["run_id"], runs["name"].fillna(""))) if not runs.empty else {}
    c1, c2, c3, c4 = st.columns(4)
    run = c1.selectbox("Run", ["(all runs)", *names], key="al_run",
                       format_func=lambda i: i if i == "(all runs)" else f"{names.get(i) or i}")
    status = c2.selectbox("Status", ["active", "resolved", "(all)"], key="al_status")
    sev = c3.multiselect("Severity", list(SEVERITIES_WORST_FIRST), default=list(SEVERITIES_WORST_FIRST), key="al_sev")
    df = r.alerts(run_id=None if run == "(all runs)" else run, status=None if status == "(all)" else status)
    rules = sorted(df["rule"].dropna().unique().tolist()) if not df.empty else []
    rule = c4.multiselect("Rule", rules, key="al_rule", placeholder="every rule")
    if not df.empty:
        df = df[df["severity"].isin(sev)]
        if rule:
            df = df[df["rule"].isin(rule)]
    if df.empty:
        st.info("No alerts match.")
    else:
        cols = ["severity", "rule", "run_id", "step", "hook", "status", "acknowledged", "value", "threshold",
                "message", "resolved_step", "alert_id"]
        st.dataframe(df[cols], hide_index=True, width="stretch")
    notifications(r, None if run == "(all runs)" else run)
    open_ = df[(df["status"] == "active") & ~df["acknowledged"].fillna(False).astype(bool)] if not df.empty else df
    if not open_.empty:
        st.subheader("Acknowledge")
        if not ctx.offer_write("Acknowledging an alert", "alerts"):
            return
        labels = {a: f"{s} · {ru} · step {stp} · {h}" for a, s, ru, stp, h in
                  zip(open_["alert_id"], open_["severity"], open_["rule"], open_["step"], open_["hook"])}
        aid = st.selectbox("Alert", list(labels), format_func=labels.get, key="al_ack_id")
        if st.button("Acknowledge", key="al_ack"):
            rid = str(open_.loc[open_["alert_id"] == aid, "run_id"].iloc[0])
            outcome = acknowledge(*r.alert_file(aid, rid))  # over many files: the file holding the alert
            if outcome == "committed":
                st.success(f"Acknowledged {labels[aid]}.")
            else:
                st.warning("The database was busy; the acknowledgement is queued and applied with the next write.")


def notifications(r, run: str | None) -> None:
    """The notifications of ``run`` (None: every run): an undelivered one is an error to see."""
    df = r.notifications(run_id=run)
    if df.empty:
        return
    st.subheader("Notifications")
    waiting = df[df["notified_at"].isna()]
    if len(waiting):
        last = waiting.iloc[0]
        st.warning(f"{len(waiting)} alert notifications not delivered (last error, {last['target']}: "
                 f"{last['last_error']}). They are retried at every snapshot and at the end of the run.")
    df = df.assign(delivered=df["notified_at"].notna()).sort_values(["delivered", "step"], ascending=[True, False])
    st.dataframe(df[["delivered", "target", "event", "severity", "rule", "run_id", "step", "hook", "notified_at",
                     "attempts", "last_error"]], hide_index=True, width="stretch", key="al_notifications")


if __name__ == "__main__":  # st.navigation runs this file as the page (dashboard/app.py)
    render_page("Alerts", body)
