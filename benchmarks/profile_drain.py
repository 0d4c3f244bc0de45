"""Where sa-jobs' drain spends its time: one in-process Worker under cProfile on a private cluster.

    python -m benchmarks.profile_drain --n 20000 --concurrency 100 [--completed 100000] [--top 30]

Prints server vs client CPU per job and the top client functions (tottime and cumulative).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import anyio
import psycopg

from .cluster import Cluster
from .drivers import _proto


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--completed", type=int, default=0, help="completed rows in the table before the drain")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    from sa_jobs import Worker
    from .drivers import sajobs as driver
    from .kinds import BenchNoop

    with Cluster(extra_settings=("shared_preload_libraries=pg_stat_statements",)) as cluster:
        dsn = cluster.create_database("profile")
        driver.setup(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        driver.load(dsn, a.n, a.completed)
        prof = cProfile.Profile()

        async def run() -> float:
            async with Worker(dsn, kinds=[BenchNoop], queues={"bench": a.concurrency}):
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    while True:
                        await anyio.sleep(0.01)
                        cur = await conn.execute("SELECT count(*) FROM sa_jobs.jobs WHERE state IN ('available', 'running')")
                        if (await cur.fetchone())[0] == 0:
                            cpu.append(cluster.cpu_seconds())  # while the worker's backends live
                            return time.perf_counter()

        cpu: list[float] = []
        s0, c0, t0 = cluster.cpu_seconds(), time.process_time(), time.perf_counter()
        prof.enable()
        t1 = anyio.run(run)
        prof.disable()
        s1, c1 = cpu[0], time.process_time()
        with psycopg.connect(dsn, autocommit=True) as conn:
            stmts = conn.execute(
                "SELECT calls, rows, total_exec_time, shared_blks_hit + shared_blks_read, left(regexp_replace(query, '\\s+', ' ', 'g'), 90)"
                " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8").fetchall()
    print(f"{a.n} jobs, C={a.concurrency}: {a.n / (t1 - t0):,.0f} jobs/s (under cProfile);"
          f" server CPU {(s1 - s0) / a.n * 1e6:.0f} µs/job, client CPU {(c1 - c0) / a.n * 1e6:.0f} µs/job"
          f" (handled {_proto.handled()})")
    print("\nserver statements (pg_stat_statements): calls, rows, total ms, ms/call, buffers/row, query")
    for calls, rows, total, blks, query in stmts:
        print(f"  {calls:6d} {rows:7d} {total:9.1f} {total / max(calls, 1):7.3f} {blks / max(rows, 1):8.1f}  {query}")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(a.top)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
