"""What each limited claim statement costs on one connection, without contention.

    python benchmarks/experiments/claim_cost.py [--rounds 40] [--block 10]

On a private cluster, one table holds a backlog per queue (100,000 jobs each over 100
partition keys) and about 400 running jobs per queue, as in benchmarks.limits' drains.
Each mode claims 50 jobs per call and commits; the batch claimed 8 calls earlier is then
completed, so the running set stays steady. Modes run in interleaved blocks; the figure
is the median time of the claim call (execute + fetch, commit excluded), in µs:

- ``plain``: the plain claim from the start of the queue (sa_jobs.queries).
- ``limited``: the claim function on a queue with a concurrency limit (CLAIM_LIMITED).
- ``partition``: the claim function on a queue with a partition limit (head claim).
- ``all``: the claim function with all three limits (v9's counted head claim).
- ``head-text``: the partition head statement run directly, without the function.
- ``head-no-busy``: the same with the per-key counts replaced by none (diagnostic only:
  it does not enforce the limit).
- ``head-saop``: the head statement counting the window's keys in one grouped read
  (``partition_key = ANY(<the window's keys>)``) instead of one count per key.
- ``head-grouped``: v9's counted head statement (every running job of the queue, grouped
  by key) on a queue with a partition limit only.

Statements run directly use ``plan_cache_mode = force_generic_plan``, as the function does.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from benchmarks.cluster import Cluster  # noqa: E402
from sa_jobs import _claim_sql as c, schema as schema_mod  # noqa: E402
from sa_jobs.queries import Queries  # noqa: E402

QUEUES = {"plain": None, "limited": "concurrency = 100000", "partition": "partition_concurrency = 10000",
          "all": "concurrency = 100000, partition_concurrency = 10000, rate_limit = 10000000, rate_period = '1 second'",
          "head-text": "partition_concurrency = 10000", "head-no-busy": "partition_concurrency = 10000",
          "head-saop": "partition_concurrency = 10000", "head-grouped": "partition_concurrency = 10000"}
SAOP_BUSY = (" busy AS MATERIALIZED (SELECT partition_key AS key, count(*) AS n FROM {jobs}"
             "  WHERE state = 'running' AND queue = %(queue)s AND partition_key = ANY(ARRAY("
             "  SELECT DISTINCT partition_key FROM head WHERE partition_key IS NOT NULL)) GROUP BY partition_key),")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--modes", default=",".join(QUEUES))
    a = ap.parse_args()
    modes = a.modes.split(",")
    with Cluster() as cluster:
        dsn = cluster.create_database("claim_cost")
        schema_mod.install(dsn, "sa_jobs")
        queries = Queries.for_schema("sa_jobs")
        jobs, queues = sql.Identifier("sa_jobs", "jobs"), sql.Identifier("sa_jobs", "queues")

        def text(template: str) -> sql.Composed:
            return sql.SQL(template).format(jobs=jobs, queues=queues)

        head = text(c.CLAIM_PARTITIONED_HEAD)
        no_busy = text(c.CLAIM_PARTITIONED_HEAD.replace(
            c._HEAD_BUSY, " busy AS MATERIALIZED (SELECT NULL::text AS key, 0::bigint AS n WHERE false),"))
        direct = {"head-text": head, "head-no-busy": no_busy,
                  "head-saop": text(c.CLAIM_PARTITIONED_HEAD.replace(c._HEAD_BUSY, SAOP_BUSY)),
                  "head-grouped": text(c.CLAIM_PARTITIONED_HEAD_COUNTED)}
        with psycopg.connect(dsn, autocommit=True) as conn:
            for mode in modes:
                conn.execute(text("INSERT INTO {jobs} (kind, queue, args, partition_key) SELECT 'k', %s, '{{}}',"
                                  " 'key' || (g %% 100) FROM generate_series(1, 100000) g"), (mode,))
                if QUEUES[mode]:
                    conn.execute(sql.SQL("INSERT INTO {} (name) VALUES (%s)").format(queues), (mode,))
                    conn.execute(sql.SQL("UPDATE {} SET " + QUEUES[mode] + " WHERE name = %s").format(queues), (mode,))
            conn.execute(text("VACUUM ANALYZE {jobs}"))
            done = text("UPDATE {jobs} SET state = 'completed', finished_at = now(), lease_expires_at = NULL"
                        " WHERE id = ANY(%s)")
            running: dict[str, list[list[int]]] = {m: [] for m in modes}
            times: dict[str, list[float]] = {m: [] for m in modes}

            def claim(mode: str) -> tuple[list[int], float]:
                p = {"queue": mode, "limit": 50, "token": uuid.uuid4(), "owner": "x", "lease": 300.0, "scan": 50}
                with conn.transaction():
                    if mode in direct:  # as the function runs them
                        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
                        conn.execute("SET LOCAL enable_seqscan = off")
                    started = time.perf_counter()
                    if mode == "plain":
                        rows = conn.execute(queries.claim, p, prepare=True).fetchall()
                    elif mode in direct:
                        rows = conn.execute(direct[mode], p, prepare=True).fetchall()
                    else:
                        rows = conn.execute(queries.claim_limited, p, prepare=True).fetchall()
                    elapsed = time.perf_counter() - started
                assert len(rows) == 50, (mode, len(rows))
                return [r[0] for r in rows], elapsed

            for mode in modes:  # ~400 running per queue, and every statement planned
                for _ in range(8):
                    running[mode].append(claim(mode)[0])
            for _ in range(a.rounds):
                for mode in modes:
                    for _ in range(a.block):
                        ids, elapsed = claim(mode)
                        times[mode].append(elapsed)
                        running[mode].append(ids)
                        conn.execute(done, (running[mode].pop(0),), prepare=True)
    base = statistics.median(times[modes[0]])
    print(f"| mode | claim of 50, median µs ({a.rounds * a.block} calls) | vs {modes[0]} |\n|---|---|---|")
    for mode in modes:
        med = statistics.median(times[mode])
        print(f"| {mode} | {med * 1e6:,.0f} | {med / base - 1:+.0%} |")


if __name__ == "__main__":
    main()
