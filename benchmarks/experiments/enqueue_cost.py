"""Round trips, statements and client CPU per enqueued job, for the driver's own loops.

    python benchmarks/experiments/enqueue_cost.py                    # private cluster, all modes
    python benchmarks/experiments/enqueue_cost.py --dsn postgresql://postgres@127.0.0.1:5432/test
    python benchmarks/experiments/enqueue_cost.py --mode batch --profile 25

The loops are the ones in ``benchmarks/drivers/sajobs.py`` (``Session(engine)`` +
``s.begin()`` per transaction). Round trips are counted client side (every
``psycopg.Connection.wait`` is one send + wait for the server); the statements are
counted on the server side too (``log_statement = all`` on a scratch database, read back
from the private cluster's log). CPU is ``time.process_time`` of this process only, as
the median of ``--reps`` runs, so it is comparable on a busy machine; wall-clock rates are
printed but depend on the disk and the load.
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

# Note: a wait on psycopg's rollback generator on an idle connection (the pool's reset on
# return after a commit) sends nothing; the server-side count shows what was really sent.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks.drivers import sajobs as driver  # noqa: E402
from benchmarks.kinds import BenchNoop  # noqa: E402
from sa_jobs import enqueue_many  # noqa: E402
from sa_jobs._url import sqlalchemy_url  # noqa: E402

WAITS: collections.Counter[str] = collections.Counter()
_orig_wait = psycopg.Connection.wait


def _counting_wait(self, gen, *a, **kw):  # noqa: ANN001
    WAITS[getattr(getattr(gen, "gi_code", None), "co_name", type(gen).__name__)] += 1
    return _orig_wait(self, gen, *a, **kw)


def run(engine, mode: str, n: int, batch: int) -> None:
    if mode.startswith("raw_"):
        return run_raw(engine, mode, n, batch)
    if mode == "single":
        for i in range(n):
            with Session(engine) as s, s.begin():
                s.add(BenchNoop(n=i))
    elif mode == "batch":
        for lo in range(0, n, batch):
            with Session(engine) as s, s.begin():
                s.add_all([BenchNoop(n=i) for i in range(lo, min(n, lo + batch))])
    elif mode == "bulk":
        with Session(engine) as s, s.begin():
            enqueue_many(s, BenchNoop, ({"n": i} for i in range(n)))


# The same table through plain psycopg, for what the table and the machine allow without
# SQLAlchemy: one connection from the engine's pool, the same transactions per job.
_RAW_INSERT = "INSERT INTO sa_jobs.jobs (kind, queue, args) VALUES ('bench_noop', 'bench', %s::jsonb) RETURNING id"
_RAW_BATCH = ("INSERT INTO sa_jobs.jobs (kind, queue, args) SELECT 'bench_noop', 'bench', a"
              " FROM unnest(%s::jsonb[]) WITH ORDINALITY AS u(a, o) ORDER BY o RETURNING id")


def run_raw(engine, mode: str, n: int, batch: int) -> None:  # noqa: ANN001
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        if mode == "raw_single":  # BEGIN, INSERT ... RETURNING id, COMMIT: as a Session does
            for i in range(n):
                conn.execute(_RAW_INSERT, (f'{{"n":{i}}}',)).fetchone()
                conn.commit()
        elif mode == "raw_batch":  # one INSERT of `batch` rows from arrays, ids back in order
            for lo in range(0, n, batch):
                conn.execute(_RAW_BATCH, ([f'{{"n":{i}}}' for i in range(lo, min(n, lo + batch))],)).fetchall()
                conn.commit()
        elif mode == "raw_bulk":  # COPY of the three columns, one transaction
            with conn.cursor() as cur, cur.copy("COPY sa_jobs.jobs (kind, queue, args) FROM STDIN") as copy:
                for lo in range(0, n, 2000):
                    copy.write("".join(f'bench_noop\tbench\t{{"n":{i}}}\n' for i in range(lo, min(n, lo + 2000))))
            conn.commit()
    finally:
        raw.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", help="use this database (its sa_jobs schema is reinstalled!) instead of a private cluster")
    ap.add_argument("--mode", default="single,batch,bulk",
                    help="comma list of single, batch, bulk (the driver's loops) and raw_single, raw_batch,"
                         " raw_bulk (the same table through plain psycopg)")
    ap.add_argument("--n", type=int, default=0, help="jobs per run (default: 500 single, 10000 batch, 50000 bulk)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", type=int, default=0, help="print the top N cProfile lines of one extra run")
    a = ap.parse_args()
    cluster = None
    if a.dsn:
        dsn = a.dsn
    else:
        from benchmarks.cluster import Cluster

        cluster = Cluster().start()
        dsn = cluster.create_database("enqueue_cost")
    try:
        driver.setup(dsn)
        engine = create_engine(sqlalchemy_url(dsn))
        with Session(engine) as s, s.begin():  # warm the pool and the mapper, as the driver does
            s.add(BenchNoop(n=-1))
        for mode in a.mode.split(","):
            n = a.n or {"single": 500, "batch": 10_000, "bulk": 50_000}[mode.removeprefix("raw_")]
            # Round trips, counted client side on one run.
            psycopg.Connection.wait = _counting_wait
            WAITS.clear()
            if cluster is not None:
                stmts = _server_statements(cluster, dsn, lambda: run(engine, mode, n, 1000))
            else:
                stmts = None
                run(engine, mode, n, 1000)
            psycopg.Connection.wait = _orig_wait
            total = sum(WAITS.values())
            print(f"\n== {mode}, n={n}: {total / n:.3f} round trips/job ({total} total): "
                  + ", ".join(f"{k} {v}" for k, v in WAITS.most_common()))
            if stmts is not None:
                print(f"   server saw {sum(stmts.values()) / n:.3f} statements/job: "
                      + ", ".join(f"{k!r} {v}" for k, v in stmts.most_common(8)))
            cpu, rate = [], []
            for _ in range(a.reps):
                c0, t0 = time.process_time(), time.perf_counter()
                run(engine, mode, n, 1000)
                cpu.append((time.process_time() - c0) / n * 1e6)
                rate.append(n / (time.perf_counter() - t0))
            print(f"   client CPU {statistics.median(cpu):.1f} us/job (median of {a.reps}: "
                  f"{', '.join(f'{x:.1f}' for x in cpu)}); {statistics.median(rate):,.0f} jobs/s (wall, noisy)")
            if a.profile:
                p = cProfile.Profile(time.process_time)  # CPU, not wall: the waits drop out
                p.enable()
                run(engine, mode, n, 1000)
                p.disable()
                b = io.StringIO()
                pstats.Stats(p, stream=b).sort_stats("tottime").print_stats(a.profile)
                print(b.getvalue()[b.getvalue().find("ncalls") - 2:])
        engine.dispose()
    finally:
        if cluster is not None:
            cluster.stop()


def _server_statements(cluster, dsn: str, fn) -> collections.Counter[str]:  # noqa: ANN001
    """Run ``fn`` with log_statement=all on the private cluster; count the logged statements
    by their first words."""
    log = Path(cluster._tmp) / "server.log"  # noqa: SLF001 - the experiment's own cluster
    with psycopg.connect(cluster.url(), autocommit=True) as c:
        c.execute("ALTER SYSTEM SET log_statement = 'all'")
        c.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)  # a reload reaches the pooled connections at their next statement
    start = log.stat().st_size
    try:
        fn()
    finally:
        with psycopg.connect(cluster.url(), autocommit=True) as c:
            c.execute("ALTER SYSTEM RESET log_statement")
            c.execute("SELECT pg_reload_conf()")
    counts: collections.Counter[str] = collections.Counter()
    with log.open(errors="replace") as f:
        f.seek(start)
        for line in f:
            if "LOG:  statement: " in line or "LOG:  execute " in line:
                body = line.split("statement: ", 1)[-1] if "statement: " in line else line.split("execute ", 1)[-1].split(":", 1)[-1]
                if not body.lstrip().startswith(("ALTER SYSTEM", "SELECT pg_reload_conf")):  # our own
                    counts[" ".join(body.split()[:3])[:40]] += 1
    return counts


if __name__ == "__main__":
    main()
