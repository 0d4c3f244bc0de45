"""Time per claim batch of a limited queue, one claimer, no contention.

    python benchmarks/experiments/limit_claim_cost.py [--jobs 20000] [--batch 25] [--reps 3]

On a private cluster (benchmarks/cluster.py), drains a queue by claim-then-complete
transactions of --batch jobs on one connection (both with synchronous_commit off, so fsync
does not hide the statements' cost), for each limits variant of the limits benchmark:
the plain claim (none), keyed rows without a limit (keys-only: what the partition indexes
cost), the claim function with a queue limit (concurrency) and with a partition limit
(partition). Reports the median time per batch and per job, variants interleaved per
repetition. Isolates the claim statement from the worker's own costs.
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

from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.drivers import sajobs_limits as driver  # noqa: E402

VARIANTS = ("none", "keys-only", "concurrency", "partition", "partition-auto-plans", "concurrency-auto-plans")


def drain(dsn: str, variant: str, batch: int) -> tuple[float, int, int]:
    limited = variant.startswith(("concurrency", "partition"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        jobs = batches = 0
        started = time.perf_counter()
        while True:
            with conn.transaction():
                if limited:
                    rows = conn.execute("SELECT id FROM sa_jobs.claim_limited('bench', %s, %s, 'x', 30, %s)",
                                        (batch, uuid.uuid4(), max(16, 2 * batch)), prepare=True).fetchall()
                else:
                    rows = conn.execute(
                        "UPDATE sa_jobs.jobs SET state = 'running', attempt = attempt + 1, attempted_at = now(),"
                        " claim_token = %s, lease_owner = 'x', lease_expires_at = now() + interval '30 s'"
                        " WHERE id = ANY(ARRAY(SELECT id FROM sa_jobs.jobs WHERE state = 'available'"
                        " AND queue = 'bench' AND scheduled_at <= now() ORDER BY queue, priority, scheduled_at, id"
                        " LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING id", (uuid.uuid4(), batch), prepare=True).fetchall()
                if not rows:
                    break
                conn.execute("UPDATE sa_jobs.jobs SET state = 'completed', finished_at = now() WHERE id = ANY(%s)",
                             ([r[0] for r in rows],), prepare=True)
            jobs += len(rows)
            batches += 1
        return time.perf_counter() - started, jobs, batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    per_batch: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with Cluster() as cluster:
        print(cluster.describe().get("version", ""), file=sys.stderr)
        for rep in range(a.reps):
            for v in VARIANTS:
                dsn = cluster.create_database(f"claim_cost_{v.replace('-', '_')}_{rep}")
                driver.setup(dsn, v)
                driver.load(dsn, a.jobs, 0, v)
                seconds, jobs, batches = drain(dsn, v, a.batch)
                if jobs != a.jobs:
                    raise SystemExit(f"{v}: drained {jobs} of {a.jobs}")
                per_batch[v].append(seconds / batches)
    base = statistics.median(per_batch["none"])
    print(f"| variant ({a.jobs:,} jobs, batch {a.batch}, {a.reps} reps) | µs per batch, median (min-max) | µs per job | vs none |")
    print("|---|---|---|---|")
    for v, xs in per_batch.items():
        m = statistics.median(xs)
        print(f"| {v} | {m * 1e6:,.0f} ({min(xs) * 1e6:,.0f}-{max(xs) * 1e6:,.0f}) | {m * 1e6 / a.batch:.1f} | {m / base - 1:+.0%} |")


if __name__ == "__main__":
    main()
