"""Benchmark: one 131k-feature snapshot's ``Store.write`` vs a raw DuckDB insert (target ≤ 1.5×).

Run: ``python tests/bench/bench_store.py [--d-sae N] [--repeats N]``. A script, not a test.

What is timed, best of ``--repeats``, each into a fresh database file:

* ``store``: ``Store.write(snapshot)`` into a DB whose schema exists (``start_run`` done before
  timing). Everything a real write pays is inside: building the Arrow tables from the NumPy
  arrays, opening the file, the schema check, the (no-op) replacement check, the inserts of
  ``feature_stats``, ``metrics``, ``refusal_features`` and ``snapshots``, the commit and the close.
* ``raw``: ``INSERT INTO feature_stats SELECT * FROM arrow_table`` of the *same* Arrow table
  (``build_feature_stats_table``, built before timing) on an already open connection to a fresh
  DB with the same schema.
* ``raw+open/close``: the same, but opening and closing the file inside the timing, as the
  store must (it never holds the file between writes, so readers can get in).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from store_fixtures import import_store_only, make_snapshot  # noqa: E402

store = import_store_only()  # the store must not need torch; neither does this benchmark

import duckdb  # noqa: E402

CATEGORIES = ("harmful", "harmless", "general", "refusal")  # 4 categories + "all"


def _time_store(snapshot, workdir: Path, i: int) -> float:
    s = store.Store(workdir / f"store{i}.duckdb")
    s.start_run("bench")
    t0 = time.perf_counter()
    outcome = s.write(snapshot)
    dt = time.perf_counter() - t0
    assert outcome == "committed", outcome
    return dt


def _time_rewrite(snapshot, workdir: Path) -> float:
    """Re-writing the same (run, step, hook): the DELETE + INSERT replacement path."""
    s = store.Store(workdir / "rewrite.duckdb")
    s.start_run("bench")
    s.write(snapshot)
    t0 = time.perf_counter()
    s.write(snapshot)
    return time.perf_counter() - t0


def _fresh_raw_db(path: Path) -> None:
    con = duckdb.connect(str(path))
    store.create_schema(con)
    con.close()


def _time_raw(table, workdir: Path, i: int, open_close: bool) -> float:
    path = workdir / f"raw{i}{'oc' if open_close else ''}.duckdb"
    _fresh_raw_db(path)
    con = None if open_close else duckdb.connect(str(path))
    t0 = time.perf_counter()
    if open_close:
        con = duckdb.connect(str(path))
    con.register("arrow_table", table)
    con.execute("INSERT INTO feature_stats SELECT * FROM arrow_table").fetchall()
    con.unregister("arrow_table")
    if open_close:
        con.close()
    dt = time.perf_counter() - t0
    if not open_close:
        con.close()
    return dt


def _time_build(snapshot) -> float:
    t0 = time.perf_counter()
    store.build_feature_stats_table(snapshot, "bench-run")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-sae", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dead-frac", type=float, default=0.1, help="features that never fire (not stored)")
    args = ap.parse_args(argv)

    snapshot = make_snapshot(1, d_sae=args.d_sae, categories=CATEGORIES, dead_frac=args.dead_frac, seed=7)
    table = store.build_feature_stats_table(snapshot, "bench-run")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Interleaved, so a noisy neighbour slows all three alike rather than one of them.
        runs = [
            (_time_store(snapshot, work, i), _time_raw(table, work, i, False), _time_raw(table, work, i, True))
            for i in range(args.repeats)
        ]
        t_store, t_raw, t_raw_oc = (min(r[j] for r in runs) for j in range(3))
        t_rewrite = _time_rewrite(snapshot, work)
    t_build = min(_time_build(snapshot) for _ in range(args.repeats))
    res = {
        "rows": float(table.num_rows),
        "store_s": t_store,
        "raw_s": t_raw,
        "raw_open_close_s": t_raw_oc,
        "build_s": t_build,
        "rewrite_s": t_rewrite,
        "ratio": t_store / t_raw,
        "ratio_vs_open_close": t_store / t_raw_oc,
    }
    print(f"d_sae={args.d_sae}, {len(CATEGORIES)} categories + 'all', "
          f"feature_stats rows={table.num_rows} (best of {args.repeats})")
    print(f"  Store.write            {t_store * 1e3:8.1f} ms")
    print(f"    of which Arrow build {t_build * 1e3:8.1f} ms (the feature_stats table from the NumPy arrays)")
    print(f"  raw insert             {t_raw * 1e3:8.1f} ms   ratio {res['ratio']:.2f}x (target <= 1.5x)")
    print(f"  raw open+insert+close  {t_raw_oc * 1e3:8.1f} ms   ratio {res['ratio_vs_open_close']:.2f}x")
    print(f"  Store.write re-writing the same (run, step, hook): {t_rewrite * 1e3:.1f} ms (single run)")
    return res


if __name__ == "__main__":
    main()
