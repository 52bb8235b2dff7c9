"""Alert notifications (drift_monitor.notify) through the recorder, to a real loopback receiver,
with a real store: one message per raised or resolved alert, delivery state stored and shown,
retried after failures, never sent twice after a resume, and never in the training step's way."""

from __future__ import annotations

import logging
import threading
import time

import pandas as pd
import pytest
from servers import WebhookReceiver, free_port, http_get

from drift_monitor.config import MonitorConfig
from drift_monitor.notify import Notifier, NotifyError, WebhookTarget
from drift_monitor.recorder import RunRecorder
from drift_monitor.records import Alert, HookResult, Snapshot
from drift_monitor.store import StoreReader, alert_id

HOOK = "model.layers.3"
CALM = {"explained_variance": 0.75, "base_explained_variance": 0.76, "explained_variance_delta": -0.01,
        "features_drifted_ratio": 0.05, "nonfinite_fraction": 0.0, "n_tokens": 100.0}


def snap(step: int, is_base: bool = False, **metrics) -> Snapshot:
    m = dict(CALM, **metrics)
    return Snapshot(step=step, hooks={HOOK: HookResult(hook=HOOK, d_sae=8, metrics=m, features={})}, probe_hash="p",
                    n_tokens=100, is_base=is_base)


DROP = {"explained_variance_delta": -0.3}  # ev_drop (warning) fires


def config(tmp_path, targets, **outputs) -> MonitorConfig:
    outputs = {"db_path": str(tmp_path / "drift.duckdb"), "notify": targets, "show_progress": False, **outputs}
    return MonitorConfig(saes={HOOK: "x"}, outputs=outputs)


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_one_message_per_raised_and_resolved_alert_with_the_token_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DM_TEST_TOKEN", "s3cret-token")
    with WebhookReceiver() as rx, WebhookReceiver() as slack:
        cfg = config(tmp_path, [
            {"url": rx.url + "/hook", "headers": {"Authorization": "Bearer ${DM_TEST_TOKEN}"}, "name": "team"},
            {"url": slack.url + "/services/T0/B0", "min_severity": "critical", "format": "slack"}])
        rec = RunRecorder.open(cfg, probe_hash="p", run_id="r1", run_name="sft-1", watch=False)
        rec.record(snap(0, is_base=True))
        rec.record(snap(10, **DROP))  # raised
        rec.record(snap(20, **DROP))  # still firing: no new event
        rec.record(snap(30, nonfinite_fraction=0.5))  # ev_drop resolves; nonfinite (critical) raised
        rec.finish()
    got = [(b["event"], b["rule"], b["step"]) for b in rx.bodies()]
    assert sorted(got) == [("raised", "ev_drop", 10), ("raised", "nonfinite_activations", 30),
                           ("resolved", "ev_drop", 30)]
    first = next(r for r in rx.received if r["body"]["step"] == 10)
    assert first["path"] == "/hook" and first["headers"]["Authorization"] == "Bearer s3cret-token"
    b = first["body"]
    assert (b["run"], b["run_name"], b["severity"], b["hook"]) == ("r1", "sft-1", "warning", HOOK)
    assert b["alert_id"] == alert_id("r1", Alert("ev_drop", "warning", 10, HOOK, "", status="active"))
    assert "ev_drop" in b["text"] and "sft-1" in b["text"]
    # the critical-only Slack target got the critical alert alone, as {"text": ...}
    (s,) = slack.bodies()
    assert set(s) == {"text"} and "nonfinite_activations" in s["text"] and "CRITICAL" in s["text"]

    reader = StoreReader(tmp_path / "drift.duckdb")
    df = reader.notifications("r1")
    assert len(df) == 4 and df.notified_at.notna().all() and (df.attempts == 1).all() and df.last_error.isna().all()
    assert sorted(df.target) == ["127.0.0.1:" + slack.url.rsplit(":", 1)[1], "team", "team", "team"]
    runs = reader.runs()
    assert runs.undelivered_notifications.tolist() == [0]
    # the token is nowhere in the store: the run's configuration keeps the template
    config_json = runs.config_json.iloc[0]
    assert "s3cret-token" not in config_json and "${DM_TEST_TOKEN}" in config_json
    assert not df.astype(str).apply(lambda c: c.str.contains("s3cret-token")).any().any()


def test_a_failed_delivery_is_stored_shown_and_retried_at_the_next_snapshot(tmp_path):
    with WebhookReceiver(fail=1) as rx:
        cfg = config(tmp_path, [{"url": rx.url, "retries": 0}], prometheus_port=0)
        rec = RunRecorder.open(cfg, probe_hash="p", run_id="r2", watch=False)
        rec.record(snap(0, is_base=True))
        rec.record(snap(10, **DROP))
        assert rec.notifier.drain(20)
        rec.record(snap(11, **DROP))  # writes the failed state, and queues the notification again
        reader = StoreReader(tmp_path / "drift.duckdb")
        (row,) = reader.notifications("r2").itertuples()
        assert row.attempts == 1 and "500" in row.last_error and pd.isna(row.notified_at)
        assert reader.runs().undelivered_notifications.tolist() == [1]
        metrics = http_get(f"http://127.0.0.1:{rec.prometheus_port}/metrics")
        assert "drift_monitor_notifications_failed_total 1.0" in metrics
        rec.finish()
        assert len(rx.bodies()) == 1  # delivered once, by the retry
    (row,) = reader.notifications("r2").itertuples()
    assert row.attempts == 2 and pd.isna(row.last_error) and not pd.isna(row.notified_at)
    assert reader.runs().undelivered_notifications.tolist() == [0]


def test_a_resumed_run_never_sends_an_event_twice_and_delivers_what_was_left(tmp_path):
    with WebhookReceiver() as rx:
        cfg = config(tmp_path, [{"url": rx.url, "retries": 0}])
        rec = RunRecorder.open(cfg, probe_hash="p", run_id="r3", watch=False)
        rec.record(snap(0, is_base=True))
        checkpoint = rec.alert_state()  # the checkpoint a resume starts from: before step 10
        rec.record(snap(10, **DROP))
        assert rec.notifier.drain(20)
        rx.fail = 100  # the receiver goes down: the resolution at 20 cannot be delivered
        rec.record(snap(20))
        assert rec.notifier.drain(20)
        rec.record(snap(21))  # writes the failed state
        rec.notifier.close()  # the process dies here, unfinished
        assert [b["event"] for b in rx.bodies()] == ["raised"]

        rx.fail = 0
        again = RunRecorder.open(cfg, probe_hash="p", run_id="r3", alert_state=checkpoint, watch=False)
        again.record(snap(10, **DROP))  # re-raises the same alert (same id): already delivered
        again.record(snap(20))  # the same resolution: delivered once, now
        again.finish()
    assert sorted((b["event"], b["step"]) for b in rx.bodies()) == [("raised", 10), ("resolved", 20)]
    df = StoreReader(tmp_path / "drift.duckdb").notifications("r3")
    assert len(df) == 2 and df.notified_at.notna().all()


def test_a_hanging_receiver_never_holds_up_a_snapshot(tmp_path):
    hang = threading.Event()
    with WebhookReceiver(hang=hang) as rx:
        cfg = config(tmp_path, [{"url": rx.url, "timeout_s": 120, "retries": 0}])
        rec = RunRecorder.open(cfg, probe_hash="p", run_id="r4", watch=False)
        rec.record(snap(0, is_base=True))
        rec.record(snap(10, **DROP))
        # record() has returned, and no request has been answered: it did not wait for one
        (n,) = rec.notifier.notifications()
        assert n.attempts == 0 and n.notified_at is None
        wait_for(lambda: rx.in_flight == 1)  # the thread's request is held by the receiver
        assert rx.bodies() == []
        hang.set()
        rec.finish()
    assert len(rx.bodies()) == 1


def test_a_full_queue_leaves_notifications_pending_instead_of_blocking():
    hang = threading.Event()
    with WebhookReceiver(hang=hang) as rx:
        n = Notifier([WebhookTarget(rx.url, timeout_s=60, retries=0)], "r5", alert_id=alert_id, max_queue=1)
        try:
            wait_for(n._ready.is_set)
            made = n.submit([Alert(f"rule{i}", "warning", 10, HOOK, "m") for i in range(3)])
            assert len(made) == 3  # submit returned although the receiver holds the first
            wait_for(lambda: rx.in_flight == 1)
            full = [x for x in n.notifications() if x.last_error and "queue full" in x.last_error]
            assert len(full) >= 1 and n.pending() == 3
            hang.set()
            assert n.drain(20)
            for _ in range(3):  # the next snapshots: each retries what the queue (of 1) did not take
                n.retry_pending()
                assert n.drain(20)
            assert n.pending() == 0
        finally:
            n.close()
    assert sorted(b["rule"] for b in rx.bodies()) == ["rule0", "rule1", "rule2"]


@pytest.mark.parametrize("db", ["drift.duckdb", "runs/"], ids=["store-file", "store-directory"])
def test_an_unreachable_receiver_at_start_up_is_a_warning_and_the_alert_waits(tmp_path, caplog, db):
    port = free_port()  # nothing listens there
    cfg = config(tmp_path, [{"url": f"http://127.0.0.1:{port}/hook", "retries": 0}], db_path=str(tmp_path / db))
    with caplog.at_level(logging.WARNING, logger="drift_monitor.notify"):
        rec = RunRecorder.open(cfg, probe_hash="p", run_id="r6", watch=False)
        rec.record(snap(0, is_base=True))
        rec.record(snap(10, **DROP))
        rec.finish()
    assert any("not reachable now" in r.getMessage() for r in caplog.records)
    reader = StoreReader(tmp_path / db)
    (row,) = reader.notifications("r6").itertuples()
    assert row.attempts >= 2 and "Connection refused" in row.last_error  # tried, then retried at the end
    assert reader.runs().undelivered_notifications.tolist() == [1]


@pytest.mark.parametrize("target, fix", [
    ({"url": "alerts.example/hook"}, "malformed URL"),
    ({"url": "ftp://alerts.example/hook"}, "http:// or https://"),
    ({"url": "http://alerts.example:99999/hook"}, "port"),
    ({"url": "http://alerts.example/hook", "min_severity": "high"}, "use one of info, warning, critical"),
    ({"url": "http://alerts.example/hook", "headers": {"Authorization": "Bearer ${DM_UNSET_TOKEN_VAR}"}},
     "export it in the job's environment"),
    ({"url": "${DM_UNSET_URL_VAR}"}, "DM_UNSET_URL_VAR, which is not set"),
    ({"url": "http://alerts.example/hook", "severity": "info"}, "unknown key 'severity'"),
    ({"url": "http://alerts.example/hook", "format": "teams"}, "use one of json, slack"),
])
def test_bad_targets_are_one_line_errors_naming_the_fix(target, fix, monkeypatch):
    monkeypatch.delenv("DM_UNSET_TOKEN_VAR", raising=False)
    monkeypatch.delenv("DM_UNSET_URL_VAR", raising=False)
    with pytest.raises(NotifyError) as e:
        MonitorConfig(saes={HOOK: "x"}, outputs={"notify": [target]})
    assert fix in str(e.value) and "\n" not in str(e.value)


def test_the_stored_configuration_keeps_templates_and_redacts_literal_headers(monkeypatch):
    monkeypatch.setenv("DM_TEST_TOKEN", "s3cret-token")
    cfg = MonitorConfig(saes={HOOK: "x"}, outputs={"notify": [
        {"url": "http://127.0.0.1:1/h", "headers": {"Authorization": "Bearer ${DM_TEST_TOKEN}", "X-Key": "literal"}}]})
    (t,) = cfg.to_dict()["outputs"]["notify"]
    assert t["headers"] == {"Authorization": "Bearer ${DM_TEST_TOKEN}", "X-Key": "<redacted>"}
    assert "literal" not in repr(cfg.outputs.notify) and "s3cret" not in repr(cfg.outputs.notify)
    # per process: a stored run's configuration is rebuilt without it (its variables may be unset there)
    assert "notify" not in MonitorConfig.stored_settings(cfg.to_dict())


def test_a_notification_is_one_row_of_the_store_table():
    import dataclasses

    from drift_monitor.notify import Notification
    from drift_monitor.store import NOTIFICATION_COLUMNS

    assert tuple(f.name for f in dataclasses.fields(Notification)) == NOTIFICATION_COLUMNS


def test_an_undelivered_notification_shows_in_runs_and_on_the_dashboard(tmp_path, capsys):
    from test_dashboard import app, no_errors

    from drift_monitor.cli import main

    cfg = config(tmp_path, [{"url": f"http://127.0.0.1:{free_port()}/hook", "retries": 0, "name": "oncall"}])
    rec = RunRecorder.open(cfg, probe_hash="p", run_id="r7", watch=False)
    rec.record(snap(0, is_base=True))
    rec.record(snap(10, **DROP))
    rec.finish()
    db = str(tmp_path / "drift.duckdb")
    assert main(["runs", "--db", db]) == 0
    out = capsys.readouterr().out
    assert "undelivered_notifications" in out
    assert "1 alert notifications are not delivered (last error, oncall: URLError" in out

    at = app(db, "Alerts")
    no_errors(at)
    assert any("1 alert notifications not delivered" in w.value and "oncall" in w.value for w in at.warning)
    shown = next(d.value for d in at.dataframe if "attempts" in d.value.columns)
    assert shown[["target", "event", "rule"]].values.tolist() == [["oncall", "raised", "ev_drop"]]
    assert not shown["delivered"].iloc[0]
    runs = app(db, "Runs")
    no_errors(runs)
    assert runs.dataframe[0].value["undelivered_notifications"].tolist() == [1]
