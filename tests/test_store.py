"""Store (docs/design.md §5): round trip, idempotent re-write, crash safety, lock tolerance, errors.

Crash and lock behaviour is tested with real processes (tests/store_worker.py): DuckDB locks
are per process, so threads could not show them.
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from store_fixtures import CATEGORIES, HOOK, make_snapshot

from drift_monitor import store as st
from drift_monitor.records import ALL, Alert, ConditionResult, VerifyResult, VerifySettings

WORKER = Path(__file__).parent / "store_worker.py"
HOOK2 = "blocks.9.hook_resid_post"
BY = {
    "drift": lambda s: s.drift,
    "abs_drift": lambda s: np.abs(s.drift),
    "log_density_ratio": lambda s: s.log_density_ratio,
    "abs_log_density_ratio": lambda s: np.abs(s.log_density_ratio),
}


def _alive(stats) -> np.ndarray:
    return (np.asarray(stats.count) > 0) | (np.asarray(stats.base_count) > 0)


def _top_numpy(score: np.ndarray, alive: np.ndarray, k: int) -> list[int]:
    """Reference ranking: largest first among stored (alive), non-NaN features."""
    ids = np.flatnonzero(alive & ~np.isnan(score))
    return ids[np.argsort(-score[ids], kind="stable")][:k].tolist()


def _start(tmp_path: Path, **kw) -> tuple[st.Store, st.StoreReader, str]:
    db = tmp_path / "runs.duckdb"
    s = st.Store(db, **kw)
    run_id = s.start_run("it's a \"run\"; DROP TABLE runs; --", model="tiny-gpt2", config={"lr": 1e-4}, probe_hash="p1")
    return s, st.StoreReader(db), run_id


# --------------------------------------------------------------------------------------------
# 1. Round trip
# --------------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    s, r, run_id = _start(tmp_path)
    snap = make_snapshot(5, hooks=(HOOK, HOOK2), seed=1)
    alerts = [
        Alert("ev_drop", "warning", 5, HOOK, "EV fell", value=0.61, threshold=0.7),
        Alert("refusal_emerging", "critical", 5, HOOK2, "new refusal features"),  # NaN value
    ]
    assert s.write(snap, alerts) == "committed"

    # runs: untrusted name stored verbatim, config as JSON
    runs = r.runs()
    assert len(runs) == 1
    row = runs.iloc[0]
    assert (row.run_id, row["name"], row.status, row.model) == (
        run_id, "it's a \"run\"; DROP TABLE runs; --", "running", "tiny-gpt2")
    assert row.last_step == 5 and row.n_snapshots == 1 and row.active_alerts == 2
    assert '"lr"' in row.config_json
    assert r.hooks(run_id) == sorted([HOOK, HOOK2]) and r.steps(run_id) == [5]
    assert r.schema_version() == st.SCHEMA_VERSION

    # metrics: every scalar back, NaN as NaN
    ms = r.metric_series(run_id)
    got = {(h, n): v for h, n, v in zip(ms.hook, ms.name, ms.value)}
    want = snap.scalars()
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert (math.isnan(v) and math.isnan(got[key])) or got[key] == v, key
    assert set(r.metric_series(run_id, hook=HOOK, names=["l0"]).name) == {"l0"}

    for hook in (HOOK, HOOK2):
        h = snap.hooks[hook]
        # feature table: only alive features, values bit-equal (float32 widened exactly)
        for cat in (*CATEGORIES, ALL):
            stats = h.features[cat]
            ft = r.feature_table(run_id, 5, hook, category=cat)
            alive = _alive(stats)
            assert ft.feature.tolist() == np.flatnonzero(alive).tolist()
            for col in ("density", "mean_act", "max_act", "drift", "log_density_ratio", "count", "base_count"):
                np.testing.assert_array_equal(ft[col].to_numpy(),
                                              np.asarray(getattr(stats, col))[alive].astype(ft[col].dtype))
        assert len(r.feature_table(run_id, 5, hook, category=None)) == sum(_alive(f).sum() for f in h.features.values())

        # top features, ranked in SQL, against a NumPy argsort
        for by, fn in BY.items():
            for cat in ("harmful", ALL):
                stats = h.features[cat]
                top = r.top_features(run_id, 5, hook, by=by, k=15, category=cat)
                assert top.feature.tolist() == _top_numpy(fn(stats), _alive(stats), 15), (hook, by, cat)
                np.testing.assert_array_equal(top.score.to_numpy(), fn(stats)[top.feature.to_numpy()])

        # refusal features: top 200 by score (non-NaN) plus every emerging one, with global ranks
        ref = h.refusal
        score = ref.refusal_score
        order = np.flatnonzero(~np.isnan(score))
        order = order[np.argsort(-score[order], kind="stable")]
        rf = r.refusal_features(run_id, hook)
        assert set(rf.feature) == set(order[:200].tolist()) | set(ref.emerging)
        rank = {int(f): i + 1 for i, f in enumerate(order)}
        for f, rk, em, hd in zip(rf.feature, rf["rank"], rf.emerging, rf.harmful_drift):
            assert (pd.isna(rk) and math.isnan(score[f])) or rk == rank[f]
            assert em == (f in ref.emerging) and hd == ref.harmful_drift[f]
        k10 = r.refusal_features(run_id, hook, steps=[5], k=10)
        assert set(k10.feature) == set(order[:10].tolist()) | set(ref.emerging)
        top_ref = r.top_features(run_id, 5, hook, by="refusal_score", k=10)
        assert top_ref.feature.tolist() == order[:10].tolist()

    # alerts: both back, NaN value kept, then resolved in place (no duplicate) and acknowledged
    al = r.alerts(run_id=run_id).set_index("rule")
    assert set(al.index) == {"ev_drop", "refusal_emerging"}
    assert al.loc["ev_drop", "value"] == 0.61 and math.isnan(al.loc["refusal_emerging", "value"])
    assert (al.status == "active").all() and not al.acknowledged.any()
    s.write(make_snapshot(6, hooks=(HOOK, HOOK2), seed=2),
            [Alert("ev_drop", "warning", 6, HOOK, "EV back", value=0.8, threshold=0.7, status="resolved")])
    al = r.alerts(run_id=run_id).set_index("rule")
    assert len(al) == 2
    assert al.loc["ev_drop", "status"] == "resolved" and al.loc["ev_drop", "resolved_step"] == 6
    s.acknowledge_alert(al.loc["refusal_emerging", "alert_id"])
    assert bool(r.alerts(status="active", severity="critical").acknowledged.iloc[0])
    assert r.runs().iloc[0].active_alerts == 1 and r.runs().iloc[0].unacknowledged_alerts == 0
    with pytest.raises(KeyError):
        s.acknowledge_alert("no-such-alert")

    # trajectory over the two steps, labels joined in, run finished
    f = int(np.flatnonzero(_alive(snap.hooks[HOOK].features[ALL]))[0])
    traj = r.feature_trajectory(run_id, HOOK, f)
    assert traj.step.tolist()[0] == 5 and traj.drift.iloc[0] == snap.hooks[HOOK].features[ALL].drift[f]
    s.import_labels(HOOK, {f: "cats", f + 1: "dogs"}, source="manual")
    s.import_labels(HOOK, pd.DataFrame({"feature": [f], "label": ["felines"]}), source="autointerp")
    labels = r.labels(HOOK)
    assert labels.set_index("feature").loc[f, ["label", "source"]].tolist() == ["felines", "autointerp"]
    assert len(labels) == 2
    assert r.feature_table(run_id, 5, HOOK).set_index("feature").loc[f, "label"] == "felines"
    s.finish_run("finished")
    assert r.runs().iloc[0].status == "finished"


def test_store_dead_features_keeps_every_row(tmp_path):
    s, r, run_id = _start(tmp_path, store_dead_features=True)
    snap = make_snapshot(1, d_sae=256, seed=3)
    s.write(snap)
    ft = r.feature_table(run_id, 1, HOOK)
    assert ft.feature.tolist() == list(range(256))
    snaps = r.snapshots(run_id)
    assert snaps.n_feature_rows.iloc[0] == 256 * (len(CATEGORIES) + 1)


# --------------------------------------------------------------------------------------------
# 2. Idempotent re-write
# --------------------------------------------------------------------------------------------


def _counts(db: Path, run_id: str, step: int) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {
            t: con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ? AND step = ?", [run_id, step]).fetchall()[0][0]
            for t in ("snapshots", "metrics", "feature_stats", "refusal_features", "alerts")
        }
    finally:
        con.close()


def test_rewrite_replaces(tmp_path):
    s, r, run_id = _start(tmp_path)
    alert = Alert("ev_drop", "warning", 7, HOOK, "first", value=0.5)
    first, second = make_snapshot(7, seed=10, dead_frac=0.1), make_snapshot(7, seed=11, dead_frac=0.4)
    s.write(first, [alert])
    s.write(make_snapshot(8, seed=12))  # a neighbour that must survive
    before8 = _counts(s.path, run_id, 8)
    alert2 = Alert("ev_drop", "critical", 7, HOOK, "second", value=0.4)
    assert s.write(second, [alert2]) == "committed"

    c = _counts(s.path, run_id, 7)
    h = second.hooks[HOOK]
    assert c["snapshots"] == 1 and c["metrics"] == len(h.metrics) and c["alerts"] == 1
    assert c["feature_stats"] == sum(_alive(f).sum() for f in h.features.values())
    ft = r.feature_table(run_id, 7, HOOK)
    np.testing.assert_array_equal(ft.drift.to_numpy(), h.features[ALL].drift[_alive(h.features[ALL])])
    ms = r.metric_series(run_id, names=["l0"])
    assert ms.set_index("step").loc[7, "value"] == h.metrics["l0"]
    al = r.alerts(run_id=run_id).iloc[0]
    assert (al.message, al.severity) == ("second", "critical")
    assert _counts(s.path, run_id, 8) == before8

    # resuming the run keeps its creation time and sets it running again
    created = r.runs().iloc[0].created_at
    s.finish_run("failed")
    assert st.Store(s.path).start_run(run_id=run_id) == run_id
    row = r.runs().iloc[0]
    assert row.status == "running" and row.created_at == created and row.model == "tiny-gpt2"


# --------------------------------------------------------------------------------------------
# 3. A writer killed with SIGKILL leaves whole snapshots only
# --------------------------------------------------------------------------------------------


def _check_whole(db: Path) -> dict[int, int]:
    """Every snapshot complete, nothing orphaned, no mix of two writes; returns {step: seq}."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        bad = con.execute(
            """SELECT s.step, s.hook, s.n_feature_rows, s.n_metrics, s.n_refusal_rows,
                      (SELECT count(*) FROM feature_stats f
                        WHERE f.run_id = s.run_id AND f.step = s.step AND f.hook = s.hook),
                      (SELECT count(*) FROM metrics m
                        WHERE m.run_id = s.run_id AND m.step = s.step AND m.hook = s.hook),
                      (SELECT count(*) FROM refusal_features x
                        WHERE x.run_id = s.run_id AND x.step = s.step AND x.hook = s.hook)
               FROM snapshots s"""
        ).fetchall()
        for step, _hook, nf, nm, nr, cf, cm, cr in bad:
            assert (cf, cm, cr) == (nf, nm, nr), f"step {step}: rows {(cf, cm, cr)} != recorded {(nf, nm, nr)}"
        for table in ("feature_stats", "metrics", "refusal_features"):
            orphans = con.execute(
                f"SELECT count(*) FROM {table} t ANTI JOIN snapshots s USING (run_id, step, hook)"
            ).fetchall()[0][0]
            assert orphans == 0, f"{orphans} {table} rows without a snapshot"
        seqs = dict(con.execute("SELECT step, value FROM metrics WHERE name = 'seq'").fetchall())
        mixed = con.execute(
            "SELECT f.step, min(f.max_act), max(f.max_act) FROM feature_stats f GROUP BY f.step"
        ).fetchall()
        for step, lo, hi in mixed:
            assert lo == hi == seqs[step], f"step {step} mixes writes {lo}..{hi} (metrics say {seqs[step]})"
        return {int(k): int(v) for k, v in seqs.items()}
    finally:
        con.close()


ROUNDS = 5


def test_sigkill_leaves_whole_snapshots(tmp_path):
    db = tmp_path / "killed.duckdb"
    rng = random.Random(1234)
    for round_ in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), "write", str(db), "65536", str(100 * round_)],
            stdout=subprocess.PIPE, text=True,
        )
        committed: dict[int, int] = {}
        times = []
        try:
            assert proc.stdout.readline().strip() == "started"
            while len(committed) < 3:
                line = proc.stdout.readline()
                assert line, "worker died"
                outcome, step, seq = line.split()
                assert outcome == "committed"
                committed[int(step)] = int(seq)
                times.append(time.monotonic())
            # Somewhere inside the next write; stratified over the rounds so the kills cover
            # the whole write (build, delete, inserts, commit, checkpoint on close) every time.
            interval = (times[-1] - times[0]) / (len(times) - 1)
            time.sleep(interval * (round_ + rng.random()) / ROUNDS)
        finally:
            proc.kill()  # SIGKILL
            out, _ = proc.communicate()
        for line in out.splitlines():  # writes that returned before the kill
            _, step, seq = line.split()
            committed[int(step)] = int(seq)
        stored = _check_whole(db)
        for step, seq in committed.items():  # a committed write is durable
            assert stored[step] >= seq, f"step {step}: committed write {seq} lost (have {stored[step]})"
    # the store is writable again after the crashes, and still whole
    s = st.Store(db, run_id="killed-run")
    assert s.write(make_snapshot(999, d_sae=64)) == "committed"
    r = st.StoreReader(db)
    assert 999 in r.steps("killed-run")


# --------------------------------------------------------------------------------------------
# 4. A process holding the file delays writes but loses none
# --------------------------------------------------------------------------------------------


def _hold(db: Path, seconds: float | None, mode: str) -> subprocess.Popen:
    """Another process opens ``db`` (``mode`` 'ro' or 'rw') for ``seconds``, or until
    :func:`_release` when ``seconds`` is None (a hold longer than any retry budget)."""
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "hold", str(db), "stdin" if seconds is None else str(seconds), mode],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc: subprocess.Popen) -> None:
    proc.communicate("release\n", timeout=30)
    assert proc.returncode == 0


def test_reader_holding_file_delays_write(tmp_path):
    s, r, run_id = _start(tmp_path, retry_timeout_s=8.0)
    proc = _hold(s.path, 1.5, "ro")
    t0 = time.monotonic()
    assert s.write(make_snapshot(1, seed=1)) == "committed"  # waited for the holder
    waited = time.monotonic() - t0
    _release(proc)
    assert waited > 0.5, f"write did not wait for the holder ({waited:.2f}s)"
    assert s.pending() == 0 and not s.spool.pending()
    assert r.steps(run_id) == [1]


def test_reader_retries_while_writer_holds_file(tmp_path):
    s, r, run_id = _start(tmp_path)
    s.write(make_snapshot(1))
    proc = _hold(s.path, 1.0, "rw")
    t0 = time.monotonic()
    assert r.steps(run_id) == [1]  # retried until the read-write holder let go
    assert time.monotonic() - t0 > 0.3
    _release(proc)


def test_writer_spools_while_rw_holder_and_applies_in_order(tmp_path):
    s, r, run_id = _start(tmp_path, retry_timeout_s=0.3)
    s.write(make_snapshot(1, seed=1))
    proc = _hold(s.path, None, "rw")
    try:
        assert s.write(make_snapshot(2, seed=2)) == "spooled"
        assert s.write(make_snapshot(2, seed=3)) == "spooled"  # newer copy of step 2: must win
        s.finish_run("finished")
        assert s.pending() == 3 and len(list(s.spool.dir.glob("*.zip"))) == 3
        with pytest.raises(st.StoreLocked):
            st.StoreReader(s.path, retries=3, retry_timeout_s=0.2).runs()
        assert s.flush_spool(timeout_s=0.1) == 0  # still held: nothing applied, nothing lost
    finally:
        _release(proc)
    assert s.write(make_snapshot(3, seed=4)) == "committed"  # applies the spool first
    assert s.pending() == 0
    assert r.steps(run_id) == [1, 2, 3]
    want = make_snapshot(2, seed=3).hooks[HOOK].metrics["l0"]
    assert r.metric_series(run_id, names=["l0"]).set_index("step").loc[2, "value"] == want
    assert r.runs().iloc[0].status == "finished"


def test_per_step_check_lists_the_spool_only_while_writes_may_wait(tmp_path, monkeypatch):
    """The callback asks ``may_wait()`` at every training step: once the spool was seen empty it
    answers without listing the folder (a network round trip on NFS); a spooled write, or a
    Store opened where an earlier one left writes, makes it list again."""
    s, r, run_id = _start(tmp_path, retry_timeout_s=0.3)
    s.write(make_snapshot(1, seed=1))
    listings = []
    real = s.spool.pending
    monkeypatch.setattr(s.spool, "pending", lambda: listings.append(1) or real())
    assert not s.may_wait() and not listings
    proc = _hold(s.path, None, "rw")
    try:
        assert s.write(make_snapshot(2, seed=2)) == "spooled"
    finally:
        _release(proc)
    assert s.may_wait()
    later = st.Store(s.path, retry_timeout_s=0.3)  # a new process on the same file: unknown until listed
    assert later.may_wait() and later.pending() == 1
    assert s.flush_spool(timeout_s=5) == 1 and s.pending() == 0
    assert not s.may_wait() and later.may_wait()  # each process knows only its own last listing
    assert later.pending() == 0 and not later.may_wait()
    assert r.steps(run_id) == [1, 2]


def test_spool_flushed_after_long_read_only_hold(tmp_path):
    s, r, run_id = _start(tmp_path, retry_timeout_s=0.5)
    s.write(make_snapshot(1, seed=1))
    proc = _hold(s.path, None, "ro")
    try:
        assert s.write(make_snapshot(2, seed=2), [Alert("ev_drop", "warning", 2, HOOK, "x")]) == "spooled"
        assert s.import_labels(HOOK, {1: "one"}) == "spooled"
        assert len(list(s.spool.dir.glob("*.zip"))) == 2
        assert r.steps(run_id) == [1]  # readers share the file with the holder meanwhile
    finally:
        _release(proc)
    assert s.flush_spool() == 2
    assert list(s.spool.dir.glob("*.zip")) == []
    assert r.steps(run_id) == [1, 2]
    assert len(r.alerts(run_id=run_id)) == 1 and r.labels(HOOK).label.tolist() == ["one"]


def test_spool_replay_is_exactly_once(tmp_path):
    """A process killed between a spooled write's commit and the file's delete re-finds the
    file; replaying it must not overwrite newer data."""
    s, r, run_id = _start(tmp_path, retry_timeout_s=0.2)
    proc = _hold(s.path, None, "rw")
    try:
        assert s.write(make_snapshot(4, seed=1)) == "spooled"
    finally:
        _release(proc)
    (spooled,) = s.spool.pending()
    saved = tmp_path / "saved.zip"
    shutil.copy(spooled, saved)
    assert s.flush_spool() == 1
    s.write(make_snapshot(4, seed=2))  # newer copy of the same step
    shutil.copy(saved, spooled)  # the "undeleted" spool file
    s.flush_spool()
    assert s.pending() == 0 and not (s.spool.dir / "failed").exists()  # skipped, not rejected
    want = make_snapshot(4, seed=2).hooks[HOOK].metrics["l0"]
    assert r.metric_series(run_id, names=["l0"]).value.tolist() == [want]


def test_corrupt_spool_file_is_quarantined_not_blocking(tmp_path):
    s, r, run_id = _start(tmp_path)
    s.spool.dir.mkdir()
    (s.spool.dir / "00000000000000000001-junk.zip").write_bytes(b"not a zip")
    assert s.write(make_snapshot(1)) == "committed"
    assert s.pending() == 0 and (s.spool.dir / "failed" / "00000000000000000001-junk.zip").exists()
    assert r.steps(run_id) == [1]


# --------------------------------------------------------------------------------------------
# 5. Reader errors name the problem
# --------------------------------------------------------------------------------------------


def test_reader_errors(tmp_path):
    missing = tmp_path / "nope.duckdb"
    with pytest.raises(st.StoreNotFound, match="nope.duckdb"):
        st.StoreReader(missing).runs()
    assert not missing.exists()  # a reader never creates the file

    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    with pytest.raises(st.StoreEmpty, match="empty.duckdb.*no drift-monitor data"):
        st.StoreReader(empty).runs()
    assert issubclass(st.StoreEmpty, st.StoreNotFound)

    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(b"hello" * 1000)
    with pytest.raises(st.StoreError, match="not a DuckDB database"):
        st.StoreReader(junk).runs()

    s, r, run_id = _start(tmp_path)
    s.write(make_snapshot(1))
    con = duckdb.connect(str(s.path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(st.SchemaVersionError,
                       match=rf"version 99 in the file.*reads version {st.SCHEMA_VERSION}.*upgrade") as e:
        r.metric_series(run_id)
    assert (e.value.found, e.value.expected) == ("99", st.SCHEMA_VERSION)
    assert r.schema_version() == 99
    with pytest.raises(st.SchemaVersionError):
        s.write(make_snapshot(2))

    with pytest.raises(ValueError, match="unknown ranking"):
        st.StoreReader(tmp_path / "runs.duckdb").top_features(run_id, 1, HOOK, by="nonsense")
    with pytest.raises(ValueError, match="start_run"):
        st.Store(tmp_path / "x.duckdb").write(make_snapshot(1))


def test_store_module_does_not_import_torch():
    # the plain import the dashboard uses: the package __init__ must stay lazy too
    code = "import sys, drift_monitor.store; assert 'torch' not in sys.modules, 'store imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_snapshot_is_rejected_before_anything_is_written(tmp_path):
    s, r, run_id = _start(tmp_path)
    snap = make_snapshot(1, d_sae=128)
    snap.hooks[HOOK].features["harmful"].drift = np.zeros(127)
    with pytest.raises(ValueError, match=r"'harmful' drift: expected shape \(128,\)"):
        s.write(snap)
    assert r.steps(run_id) == [] and s.pending() == 0


# --------------------------------------------------------------------------------------------
# 6. Schema migrations: an older file is upgraded by the writer, read as it is by readers
# --------------------------------------------------------------------------------------------


def _version_1_file(db: Path) -> None:
    """A genuine version-1 file: the version-1 DDL (no ``verifications`` table), version row 1,
    and a run with a snapshot row, a metric, an alert and a label written in plain SQL."""
    assert not any("verifications" in ddl for ddl in st.schema.V1_DDL)
    con = duckdb.connect(str(db))
    for ddl in st.schema.V1_DDL:
        con.execute(ddl)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO runs (run_id, name, status, last_step) VALUES ('old', 'old run', 'finished', 3)")
    con.execute("INSERT INTO snapshots (run_id, step, hook, n_tokens, d_sae) VALUES ('old', 3, ?, 100, 64)", [HOOK])
    con.execute("INSERT INTO metrics VALUES ('old', 3, ?, 'l0', 12.5), ('old', 3, ?, 'ev', 'NaN')", [HOOK, HOOK])
    con.execute("INSERT INTO alerts (alert_id, run_id, step, hook, rule, severity, status, acknowledged) "
                "VALUES ('a1', 'old', 3, ?, 'ev_drop', 'warning', 'active', false)", [HOOK])
    con.execute("INSERT INTO feature_labels VALUES (?, 7, 'cats', 'manual')", [HOOK])
    con.close()


def _tables(db: Path) -> set[str]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    finally:
        con.close()


def _check_old_rows(r: st.StoreReader) -> None:
    runs = r.runs()
    assert runs.run_id.tolist() == ["old"] and runs.iloc[0]["name"] == "old run" and runs.iloc[0].last_step == 3
    assert r.steps("old") == [3] and r.hooks("old") == [HOOK]
    ms = r.metric_series("old").set_index("name").value
    assert ms["l0"] == 12.5 and math.isnan(ms["ev"])
    assert r.alerts(run_id="old").alert_id.tolist() == ["a1"]
    assert r.labels(HOOK).label.tolist() == ["cats"]


def test_version_1_file_is_migrated_by_the_writer(tmp_path):
    db = tmp_path / "v1.duckdb"
    _version_1_file(db)

    # readers cannot migrate: they read the v1 file as it is, later tables empty, nothing changed
    r = st.StoreReader(db)
    assert st.SCHEMA_VERSION == 5 and r.schema_version() == 1
    _check_old_rows(r)
    assert r.verifications().empty and list(r.verifications().columns) == list(st.VERIFICATION_COLUMNS)
    assert r.residual_directions("old").empty
    assert r.notifications("old").empty and r.runs().undelivered_notifications.tolist() == [0]
    assert not {"verifications", "residual_directions", "notifications", "preflight"} & _tables(db) \
        and r.schema_version() == 1

    # the writer migrates on open: table added, version bumped, earlier rows intact
    s = st.Store(db, run_id="old")
    res = VerifyResult("h", [1], [ConditionResult("fine_tuned", [], 1.0, 0, 0, 1, 1)], VerifySettings(), [1.0],
                       run_id="old", step=3)
    assert s.write_verification(res) == "committed"
    assert r.schema_version() == st.SCHEMA_VERSION
    assert {"verifications", "residual_directions", "notifications", "preflight"} <= _tables(db)
    assert r.verifications(run_id="old").verify_id.tolist() == [res.verify_id]
    _check_old_rows(r)
    assert s.write(make_snapshot(4, d_sae=64)) == "committed"  # and takes new snapshots
    assert r.steps("old") == [3, 4]


def test_schema_versions_the_writer_cannot_migrate_name_the_fix(tmp_path):
    db = tmp_path / "v0.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '0')")
    con.close()
    with pytest.raises(st.SchemaVersionError, match="version 0 in the file.*re-create the store"):
        st.Store(db, run_id="r").start_run()
    with pytest.raises(st.SchemaVersionError, match="re-create the store"):
        st.StoreReader(db).runs()
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(st.SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(st.SchemaVersionError, match="upgrade drift-monitor"):
        st.Store(db, run_id="r").start_run()
    assert _tables(db) == {"meta"}  # neither refusal touched the file
