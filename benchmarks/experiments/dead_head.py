"""How a claim's cost grows over a long drain, per claim path, on one connection.

    python benchmarks/experiments/dead_head.py [--n 100000] [--batch 50]

Each claimed job leaves its ``available`` version's entry in jobs_claim_idx until VACUUM;
a claim that reads the queue from its start steps over all of them. The plain claim
resumes past its last batch under a backlog (docs/core.md); the limited claim function
(queue or partition limits) read from the start up to schema v12. On a private cluster,
one queue per mode holds ``--n`` waiting jobs (100 partition keys); modes claim
``--batch`` jobs in turn and complete them at once, until their queues are empty. Prints
each mode's median claim time (execute + fetch + commit, µs) per tenth of the drain.
Modes: ``plain`` (from the start every time), ``plain-resumed`` (the worker's resumed
claim), ``limited`` (concurrency limit), ``partition`` (partition limit), and, when the
schema has it, ``partition-resumed`` and ``limited-resumed`` (the function given the last
claimed job's position).
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
from sa_jobs import schema as schema_mod  # noqa: E402
from sa_jobs.queries import Queries  # noqa: E402

LIMITS = {"plain": None, "plain-resumed": None, "limited": "concurrency = 100000",
          "partition": "partition_concurrency = 10000", "limited-resumed": "concurrency = 100000",
          "partition-resumed": "partition_concurrency = 10000"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--modes", default=",".join(LIMITS))
    a = ap.parse_args()
    modes = a.modes.split(",")
    queries = Queries.for_schema("sa_jobs")
    with Cluster() as cluster:
        dsn = cluster.create_database("dead_head")
        schema_mod.install(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE sa_jobs.jobs SET (autovacuum_enabled = false)")
            for m in modes:
                if LIMITS[m]:
                    conn.execute(sql.SQL("INSERT INTO sa_jobs.queues (name) VALUES (%s)"), (m,))
                    conn.execute(sql.SQL("UPDATE sa_jobs.queues SET " + LIMITS[m] + " WHERE name = %s"), (m,))
                conn.execute("INSERT INTO sa_jobs.jobs (kind, queue, args, partition_key)"
                             " SELECT 'k', %s, '{}', CASE WHEN %s LIKE 'partition%%' THEN 'key' || (g %% 100) END"
                             " FROM generate_series(1, %s) g", (m, m, a.n))
            conn.execute("VACUUM ANALYZE sa_jobs.jobs")
        times: dict[str, list[tuple[int, float]]] = {m: [] for m in modes}
        after: dict[str, object] = {m: None for m in modes}
        done = {m: 0 for m in modes}
        with psycopg.connect(dsn) as conn:
            while any(done[m] < a.n for m in modes):
                for m in modes:
                    if done[m] >= a.n:
                        continue
                    params = {"queue": m, "limit": a.batch, "token": uuid.uuid4(), "owner": "x", "lease": 30}
                    t = time.perf_counter()
                    if m in ("plain", "plain-resumed"):
                        if m == "plain-resumed" and after[m] is not None:
                            p, s, i = after[m]  # type: ignore[misc]
                            rows = conn.execute(queries.claim_after, {**params, "after_priority": p,
                                                "after_scheduled": s, "after_id": i}, prepare=True).fetchall()
                        else:
                            rows = conn.execute(queries.claim, params, prepare=True).fetchall()
                        if rows:
                            after[m] = max((r[6], r[9], r[0]) for r in rows)
                    else:
                        at = {"after_priority": None, "after_scheduled": None, "after_id": None}
                        if m.endswith("-resumed") and after[m] is not None:
                            p, s, i = after[m]  # type: ignore[misc]
                            at = {"after_priority": p, "after_scheduled": s, "after_id": i}
                        rows = conn.execute(queries.claim_limited, {**params, **at, "scan": a.batch},
                                            prepare=True).fetchall()
                        if rows:
                            after[m] = max((r[6], r[9], r[0]) for r in rows)
                    conn.commit()
                    times[m].append((done[m], time.perf_counter() - t))
                    ids = [r[0] for r in rows]
                    if not ids:
                        raise SystemExit(f"{m}: empty claim at {done[m]} of {a.n}")
                    conn.execute("UPDATE sa_jobs.jobs SET state = 'completed', finished_at = now(),"
                                 " lease_expires_at = NULL WHERE id = ANY(%s)", (ids,))
                    conn.commit()
                    done[m] += len(ids)
        print(f"{a.n} jobs per mode, claims of {a.batch}; median claim time (µs) per tenth of the drain")
        print(f"{'mode':>18} " + " ".join(f"{d:>6}" for d in range(1, 11)) + "   all")
        for m in modes:
            row = []
            for d in range(10):
                lo, hi = a.n * d // 10, a.n * (d + 1) // 10
                row.append(statistics.median(t for n, t in times[m] if lo <= n < hi) * 1e6)
            print(f"{m:>18} " + " ".join(f"{v:6.0f}" for v in row) + f" {statistics.median(t for _, t in times[m]) * 1e6:6.0f}")


if __name__ == "__main__":
    main()
