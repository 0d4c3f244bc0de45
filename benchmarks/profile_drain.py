"""Where sa-jobs' drain spends its time: one in-process Worker under cProfile on a private cluster.

    python -m benchmarks.profile_drain --n 20000 --concurrency 100 [--top 30]

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
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    from sa_jobs import Worker
    from .drivers import sajobs as driver
    from .kinds import BenchNoop

    with Cluster() as cluster:
        dsn = cluster.create_database("profile")
        driver.setup(dsn)
        driver.load(dsn, a.n, 0)
        prof = cProfile.Profile()

        async def run() -> float:
            async with Worker(dsn, kinds=[BenchNoop], queues={"bench": a.concurrency}):
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    while True:
                        await anyio.sleep(0.01)
                        cur = await conn.execute("SELECT count(*) FROM sa_jobs.jobs WHERE state <> 'completed'")
                        if (await cur.fetchone())[0] == 0:
                            return time.perf_counter()

        s0, c0, t0 = cluster.cpu_seconds(), time.process_time(), time.perf_counter()
        prof.enable()
        t1 = anyio.run(run)
        prof.disable()
        s1, c1 = cluster.cpu_seconds(), time.process_time()
    print(f"{a.n} jobs, C={a.concurrency}: {a.n / (t1 - t0):,.0f} jobs/s (under cProfile);"
          f" server CPU {(s1 - s0) / a.n * 1e6:.0f} µs/job, client CPU {(c1 - c0) / a.n * 1e6:.0f} µs/job"
          f" (handled {len(_proto.HANDLED)})")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(key).print_stats(a.top)
        print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
