"""Measure what sa-jobs metrics cost.

``drain``: enqueue N no-op jobs, drain them with an in-process Worker, with the
PrometheusObserver on and with the NullObserver (off), alternating, R rounds each; prints
throughput median/min/max and the overhead of the medians.

``depth``: load a queue table with 1M rows (mostly completed, then a 1M available
backlog) and time the QueueDepthCollector query against a naive GROUP BY over the table.

    python benchmarks/metrics_overhead.py drain --database-url postgresql://postgres@127.0.0.1:5432/test
    python benchmarks/metrics_overhead.py depth --database-url postgresql://postgres@127.0.0.1:5432/test

Each run uses (and drops) its own schema. Numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any, Optional

import anyio
import psycopg
from prometheus_client import CollectorRegistry
from psycopg import sql

from sa_jobs import Job, JobContext, Worker, schema as schema_mod
from sa_jobs._url import to_conninfo
from sa_jobs.metrics import PrometheusObserver, QueueDepthCollector, depth_query
from sa_jobs.events import NullObserver


class BenchMetricsNoop(Job, kind="bench_metrics_noop", queue="bench_metrics"):
    pass


@BenchMetricsNoop.handler
async def bench_metrics_noop(ctx: JobContext) -> None:
    return None


def _exec(url: str, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(to_conninfo(url), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def _load(url: str, schema: str, n: int) -> None:
    _exec(url, sql.SQL(
        "INSERT INTO {} (kind, queue) SELECT 'bench_metrics_noop', 'bench_metrics' FROM generate_series(1, %s)"
    ).format(sql.Identifier(schema, "jobs")), (n,))
    _exec(url, sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(schema, "jobs")))


def _drain_once(url: str, schema: str, n: int, metrics: bool, concurrency: int) -> float:
    _exec(url, sql.SQL("TRUNCATE {}").format(sql.Identifier(schema, "jobs")))
    _load(url, schema, n)
    observer: Any = PrometheusObserver(CollectorRegistry()) if metrics else NullObserver()
    # Two EXISTS probes on the partial indexes: polling must not compete with the drain.
    left_sql = sql.SQL(
        "SELECT (EXISTS (SELECT 1 FROM {jobs} WHERE state = 'available')"
        " OR EXISTS (SELECT 1 FROM {jobs} WHERE state = 'running' AND lease_expires_at > '-infinity'))::int"
    ).format(jobs=sql.Identifier(schema, "jobs"))

    async def main() -> float:
        async with Worker(url, kinds=[BenchMetricsNoop], schema=schema, concurrency=concurrency,
                          poll_interval=0.05, observer=observer) as worker:
            started = time.perf_counter()
            async with await psycopg.AsyncConnection.connect(to_conninfo(url), autocommit=True) as conn:
                while True:
                    left = (await (await conn.execute(left_sql)).fetchone())[0]
                    if left == 0:
                        elapsed = time.perf_counter() - started
                        break
                    await anyio.sleep(0.02)
            worker.request_stop()
        return elapsed

    return n / anyio.run(main)


def observer_cost_us(n: int = 200_000, batch: int = 100) -> float:
    """CPU microseconds the PrometheusObserver adds per job (claim share + start + finish + slots)."""
    obs = PrometheusObserver(CollectorRegistry())
    started = time.perf_counter()
    for i in range(n):
        if i % batch == 0:
            obs.claimed("q", batch, 0.001)
            obs.slots("q", batch, batch)
        obs.job_started("q", "bench_metrics_noop", 0.01)
        obs.job_finished("q", "bench_metrics_noop", "completed", 0.002, 0.05)
    return (time.perf_counter() - started) * 1e6 / n


def drain(url: str, n: int, rounds: int, concurrency: int) -> None:
    schema = "bench_" + uuid.uuid4().hex[:8]
    schema_mod.install(url, schema)
    try:
        _drain_once(url, schema, min(n, 2000), True, concurrency)  # warm-up
        results: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)  # alternate against drift
            for metrics in order:
                results[metrics].append(_drain_once(url, schema, n, metrics, concurrency))
                print(f"round {r + 1} metrics={'on' if metrics else 'off'}: {results[metrics][-1]:,.0f} jobs/s", flush=True)
        for metrics in (False, True):
            v = results[metrics]
            print(f"metrics {'on ' if metrics else 'off'}: median {statistics.median(v):,.0f}"
                  f"  min {min(v):,.0f}  max {max(v):,.0f} jobs/s over {len(v)} runs of {n}")
        off, on = statistics.median(results[False]), statistics.median(results[True])
        print(f"overhead (median off vs on): {100 * (off - on) / off:+.2f}%")
        cost = statistics.median(observer_cost_us() for _ in range(5))
        print(f"observer CPU per job: {cost:.2f} us = {100 * cost * off / 1e6:.2f}% of a job's budget at {off:,.0f} jobs/s")
    finally:
        schema_mod.uninstall(url, schema)


def _time(url: str, query: str, repeat: int) -> tuple[float, float, float]:
    with psycopg.connect(to_conninfo(url), autocommit=True) as conn:
        conn.execute(query).fetchall()  # warm the cache
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            conn.execute(query).fetchall()
            times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def depth(url: str, rows: int, repeat: int, explain: bool) -> None:
    schema = "bench_" + uuid.uuid4().hex[:8]
    schema_mod.install(url, schema)
    jobs = sql.Identifier(schema, "jobs")
    naive = sql.SQL("SELECT queue, state, count(*) FROM {} GROUP BY queue, state").format(jobs).as_string()
    ours = depth_query(schema)
    try:
        # Scenario 1: a healthy queue with a long history: 1M completed, a few live jobs.
        _exec(url, sql.SQL(
            "INSERT INTO {} (kind, queue, state, finished_at, attempt)"
            " SELECT 'k' || (i %% 20), 'q' || (i %% 4), 'completed', now(), 1 FROM generate_series(1, %s) i"
        ).format(jobs), (rows,))
        _exec(url, sql.SQL(
            "INSERT INTO {} (kind, queue, state) SELECT 'k' || (i %% 20), 'q' || (i %% 4),"
            " (ARRAY['available','scheduled','retryable','dead'])[1 + i %% 4] FROM generate_series(1, %s) i"
        ).format(jobs), (2000,))
        _exec(url, sql.SQL("VACUUM ANALYZE {}").format(jobs))
        for name, query in (("naive GROUP BY", naive), ("sa-jobs depth", ours)):
            med, lo, hi = _time(url, query, repeat)
            print(f"[{rows:,} completed + 2,000 live] {name}: median {med * 1000:.1f} ms (min {lo * 1000:.1f}, max {hi * 1000:.1f})")
        if explain:
            for row in _exec(url, "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + ours):
                print("   ", row[0])
        # Scenario 2: the worst case for us, a 1M available backlog (O(live rows)).
        _exec(url, sql.SQL("TRUNCATE {}").format(jobs))
        _exec(url, sql.SQL(
            "INSERT INTO {} (kind, queue) SELECT 'k' || (i %% 20), 'q' || (i %% 4) FROM generate_series(1, %s) i"
        ).format(jobs), (rows,))
        _exec(url, sql.SQL("VACUUM ANALYZE {}").format(jobs))
        for name, query in (("naive GROUP BY", naive), ("sa-jobs depth", ours)):
            med, lo, hi = _time(url, query, repeat)
            print(f"[{rows:,} available backlog] {name}: median {med * 1000:.1f} ms (min {lo * 1000:.1f}, max {hi * 1000:.1f})")
        # A scrape between TTL refreshes costs no query at all.
        collector = QueueDepthCollector(url, schema, ttl=60)
        list(collector.collect())
        t = time.perf_counter()
        for _ in range(100):
            list(collector.collect())
        print(f"cached scrape (within TTL): {(time.perf_counter() - t) * 1e6 / 100:.0f} us, queries run: {collector.queries}")
        collector.close()
    finally:
        schema_mod.uninstall(url, schema)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drain")
    d.add_argument("--database-url", required=True)
    d.add_argument("--jobs", type=int, default=20_000)
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--concurrency", type=int, default=100)
    q = sub.add_parser("depth")
    q.add_argument("--database-url", required=True)
    q.add_argument("--rows", type=int, default=1_000_000)
    q.add_argument("--repeat", type=int, default=5)
    q.add_argument("--explain", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "drain":
        drain(args.database_url, args.jobs, args.rounds, args.concurrency)
    else:
        depth(args.database_url, args.rows, args.repeat, args.explain)


if __name__ == "__main__":
    main()
