"""Where a limited drain's server time goes: one contended drain per variant, with
pg_stat_statements (track = all, so the claim function's inner statements show too).

    python benchmarks/experiments/limit_claim_profile.py [--variants none,partition] [--n 20000] [--completed 0]

On a private cluster (benchmarks/cluster.py) started with pg_stat_statements preloaded,
runs the limits benchmark's drain (4 worker processes x 100 slots) once per variant and
prints the statements by total server time: calls, rows, total ms and ms per call, and
per job the buffers each statement read and dirtied and the WAL it wrote (which, unlike
its time, do not move with the host's load). For the claim function, the queue-row
lock's statement shows how long claimers waited for each other, and the claim statement
how long one held the lock; "us per job" is the statement's total time over the drain's
jobs (wall time: waits count). One run: for where
the time goes, not for throughput (that is ``python -m benchmarks.limits``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402

from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.runner import System, drain_once  # noqa: E402

TOP = """
SELECT calls, rows, round(total_exec_time::numeric, 1), round((total_exec_time / calls)::numeric, 3),
       round((total_exec_time * 1000 / %s)::numeric, 1),
       round((shared_blks_hit + shared_blks_read)::numeric / %s, 2), round(shared_blks_dirtied::numeric / %s, 3),
       round(wal_bytes / %s, 0),
       CASE WHEN query LIKE '%%(priority, scheduled_at, id) >%%' THEN 'resumed: ' ELSE '' END
       || left(regexp_replace(query, '\\s+', ' ', 'g'), 80)
FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = current_database() AND query NOT LIKE 'VACUUM%%' AND query NOT LIKE 'INSERT INTO sa_jobs.jobs%%'
ORDER BY total_exec_time DESC LIMIT %s
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="none,partition")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--completed", type=int, default=0, help="finished rows loaded before the drain")
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()
    settings = ("shared_preload_libraries=pg_stat_statements", "pg_stat_statements.track=all")
    with Cluster(extra_settings=settings) as cluster:
        for v in a.variants.split(","):
            system = System(f"sa-jobs limits={v}", "sajobs_limits", sys.executable, variant=v)
            system.dsn = cluster.create_database("profile_" + v.replace("-", "_"))
            with psycopg.connect(system.dsn, autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
            system.info = system.run_json("info")
            r = drain_once(cluster, system, workers=4, concurrency=100, n=a.n, completed=a.completed)
            with psycopg.connect(system.dsn, autocommit=True) as conn:
                rows = conn.execute(TOP, (a.n, a.n, a.n, a.n, a.top)).fetchall()
                vac = conn.execute("SELECT autovacuum_count, n_tup_hot_upd, n_tup_upd FROM pg_stat_user_tables"
                                   " WHERE relid = 'sa_jobs.jobs'::regclass").fetchone()
            print(f"\n{v}: {r['jobs_per_s']:,.0f} jobs/s, server / client CPU {r['server_cpu_us_per_job']:.0f} /"
                  f" {r['client_cpu_us_per_job']:.0f} us/job; autovacuums {vac[0]}, HOT updates {vac[1]:,} of {vac[2]:,}")
            print("calls | rows | total ms | ms/call | us per job | buffers per job | dirtied per job | WAL bytes per job"
                  " | statement")
            for row in rows:
                print(" | ".join(str(x) for x in row))


if __name__ == "__main__":
    main()
