"""One job per transaction, layer by layer: where a single enqueue's time goes.

    python benchmarks/experiments/enqueue_layers.py [--n 1500] [--rounds 2]

On a private cluster (benchmarks/cluster.py), times N one-row transactions through each
layer an ``add`` + commit goes through, from the bare driver up: psycopg autocommit INSERT
into a one-index table; the same into sa_jobs.jobs (its indexes and NOTIFY trigger);
BEGIN / INSERT ... RETURNING / COMMIT on psycopg, with and without the trigger; SQLAlchemy
Core ``engine.begin()`` + ``insert()``; and the ORM (``Session`` + ``add`` + commit of a
sa-jobs kind). Prints jobs/s, wall and client CPU (``time.process_time``) per transaction.
The layers' differences say what the server, the round trips, SQLAlchemy Core and the ORM
each cost; ``orm_baseline.py`` compares the ORM layer with a bare mapped class.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402
from sqlalchemy import create_engine, insert  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.drivers import sajobs as driver  # noqa: E402
from benchmarks.kinds import BenchNoop  # noqa: E402
from sa_jobs import Job  # noqa: E402
from sa_jobs._url import sqlalchemy_url  # noqa: E402


def timed(n: int, one: Callable[[int], object]) -> str:
    one(-1)  # warm: connection, prepared statements, SQLAlchemy's compiled cache
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        one(i)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return f"{n / wall:>7,.0f}/s  wall {wall / n * 1e6:5.0f} µs  client CPU {cpu / n * 1e6:5.0f} µs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with Cluster() as cluster:
        dsn = cluster.create_database("layers")
        driver.setup(dsn)
        engine = create_engine(sqlalchemy_url(dsn))
        conn = psycopg.connect(dsn, autocommit=True)
        conn.execute("CREATE TABLE plain_jobs (id bigserial PRIMARY KEY, args jsonb)")
        job_insert = "INSERT INTO sa_jobs.jobs (kind, queue, args) VALUES ('bench_noop', 'bench', %s::jsonb)"

        def in_transaction(i: int) -> None:
            with conn.transaction():
                conn.execute(job_insert + " RETURNING id", (f'{{"n": {i}}}',))

        def core(i: int) -> None:
            with engine.begin() as c:
                c.execute(insert(Job.__table__).values(kind="bench_noop", queue="bench", args={"n": i}))

        def orm(i: int) -> None:
            with Session(engine) as s, s.begin():
                s.add(BenchNoop(n=i))

        print(cluster.describe()["version"])
        for r in range(a.rounds):
            print(f"round {r + 1}")
            print("  psycopg, autocommit INSERT, one-index table  ", timed(a.n, lambda i: conn.execute(
                "INSERT INTO plain_jobs (args) VALUES (%s::jsonb)", (f'{{"n": {i}}}',))))
            print("  psycopg, autocommit INSERT into sa_jobs.jobs ", timed(a.n, lambda i: conn.execute(
                job_insert, (f'{{"n": {i}}}',))))
            print("  psycopg, BEGIN / INSERT RETURNING / COMMIT   ", timed(a.n, in_transaction))
            conn.execute("ALTER TABLE sa_jobs.jobs DISABLE TRIGGER jobs_notify_inserted")
            print("  the same without the NOTIFY trigger          ", timed(a.n, in_transaction))
            conn.execute("ALTER TABLE sa_jobs.jobs ENABLE TRIGGER jobs_notify_inserted")
            print("  SQLAlchemy Core, engine.begin() + insert()   ", timed(a.n, core))
            print("  SQLAlchemy ORM, Session + add + commit       ", timed(a.n, orm))
        conn.close()
        engine.dispose()


if __name__ == "__main__":
    main()
