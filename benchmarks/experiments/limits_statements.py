"""Where a limited drain's server time goes: pg_stat_statements (with statements inside
the claim function tracked) over one drain per variant of benchmarks.limits.

    python benchmarks/experiments/limits_statements.py --variants none,partition,all --n 100000

Prints, per variant, the top statements by total execution time with calls and rows per
call, so a claim's batch size (rows / calls of the claim) and each statement's share show.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402

from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.runner import System, drain_once  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="none,partition,all")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--top", type=int, default=8)
    a = ap.parse_args()
    settings = ("shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=all")
    with Cluster(extra_settings=settings) as cluster:
        for v in a.variants.split(","):
            s = System(f"sa-jobs limits={v}", "sajobs_limits", sys.executable, variant=v)
            s.dsn = cluster.create_database("stmts_" + v.replace("-", "_"))
            with psycopg.connect(s.dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            s.info = s.run_json("info")
            s.run("setup")
            with psycopg.connect(s.dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_statements_reset()")
            r = drain_once(cluster, s, workers=a.workers, concurrency=a.concurrency, n=a.n)
            with psycopg.connect(s.dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT total_exec_time, calls, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)"
                    " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    " AND query NOT ILIKE '%%pg_stat_statements%%' AND query NOT ILIKE 'INSERT INTO%%generate_series%%'"
                    " ORDER BY total_exec_time DESC LIMIT %s", (a.top,)).fetchall()
                vac = conn.execute("SELECT autovacuum_count, autoanalyze_count, n_tup_hot_upd, n_tup_upd"
                                   " FROM pg_stat_user_tables WHERE relid = 'sa_jobs.jobs'::regclass").fetchone()
                wal = conn.execute("SELECT wal_records, wal_bytes FROM pg_stat_wal").fetchone()
            print(f"\n## {v}: {r['jobs_per_s']:,.0f} jobs/s, server {r['server_cpu_us_per_job']:.0f} µs/job,"
                  f" client {r['client_cpu_us_per_job']:.0f} µs/job; autovacuum {vac[0]}, autoanalyze {vac[1]},"
                  f" HOT updates {vac[2]:,} of {vac[3]:,}; cluster WAL so far {wal[0]:,} records, {int(wal[1]):,} bytes")
            print("| µs per job | calls | rows/call | statement |\n|---|---|---|---|")
            for total_ms, calls, nrows, query in rows:
                print(f"| {total_ms * 1000 / a.n:.1f} | {calls:,} | {nrows / max(calls, 1):.1f} | `{query}` |")


if __name__ == "__main__":
    main()
