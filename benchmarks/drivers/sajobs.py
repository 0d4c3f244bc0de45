"""Benchmark driver for sa-jobs (runs in the project's own environment). See _proto.py."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import psycopg  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

import sa_jobs  # noqa: E402
from benchmarks.drivers import _proto  # noqa: E402
from benchmarks.kinds import BenchNoop  # noqa: E402
from sa_jobs import Worker, enqueue_many, schema as schema_mod  # noqa: E402
from sa_jobs._url import sqlalchemy_url  # noqa: E402

JOBS = "sa_jobs.jobs"


def setup(dsn: str) -> None:
    schema_mod.uninstall(dsn)
    schema_mod.install(dsn)


def load(dsn: str, n: int, completed: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if completed:
            conn.execute(
                f"INSERT INTO {JOBS} (kind, queue, args, state, attempt, attempted_at, finished_at)"
                " SELECT 'bench_noop', 'bench', jsonb_build_object('n', -g), 'completed', 1, now(), now()"
                " FROM generate_series(1, %s) g", (completed,))
        if n:
            conn.execute(
                f"INSERT INTO {JOBS} (kind, queue, args)"
                " SELECT 'bench_noop', 'bench', jsonb_build_object('n', g) FROM generate_series(0, %s - 1) g", (n,))
        conn.execute(f"VACUUM ANALYZE {JOBS}")


def enqueue(dsn: str, mode: str, n: int, batch: int) -> dict:
    engine = create_engine(sqlalchemy_url(dsn))
    with Session(engine) as s, s.begin():  # warm the pool and the mapper
        s.add(BenchNoop(n=-1))
    _proto.timed_mark("timing")
    started = time.perf_counter()
    cpu0 = time.process_time()
    if mode == "single":  # session.add + commit, one job per transaction
        for i in range(n):
            with Session(engine) as s, s.begin():
                s.add(BenchNoop(n=i))
    elif mode == "batch":  # session.add_all of `batch` jobs per transaction
        for lo in range(0, n, batch):
            with Session(engine) as s, s.begin():
                s.add_all([BenchNoop(n=i) for i in range(lo, min(n, lo + batch))])
    elif mode == "bulk":  # enqueue_many(session, Kind, args): COPY, one transaction
        with Session(engine) as s, s.begin():
            enqueue_many(s, BenchNoop, ({"n": i} for i in range(n)))
    else:
        raise SystemExit(f"unknown mode {mode}")
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu0
    _proto.timed_mark("timed")
    engine.dispose()
    return {"n": n, "seconds": elapsed, "client_cpu_seconds": cpu, "api": {
        "single": "Session.add + commit (1 job/txn)",
        "batch": f"Session.add_all({batch}) + commit",
        "bulk": "sa_jobs.enqueue_many(session, Kind, args) (COPY, 1 txn)",
    }[mode]}


def produce(dsn: str, rate: float, seconds: float, out: str) -> None:
    engine = create_engine(sqlalchemy_url(dsn))
    def one(i: int) -> float:
        with Session(engine) as s, s.begin():
            s.add(BenchNoop(n=i))
        return time.time()

    one(-1)  # warm-up job, as every driver enqueues one (excluded from the figures)
    _proto.write_produced(out, _proto.paced(rate, seconds, one))
    engine.dispose()


def worker(dsn: str, concurrency: int, max_claim: int, out: str) -> None:
    w = Worker(dsn, kinds=[BenchNoop], queues={"bench": concurrency}, max_claim=max_claim or 500)
    _proto.say("ready")
    _proto.wait_for("go")
    _proto.start_progress()

    async def main() -> None:
        async with w:
            await anyio.to_thread.run_sync(_proto.wait_for, "stop")
        # leaving the block drains: running handlers finish, outcomes are flushed

    anyio.run(main)
    _proto.finish_worker(out)


def info() -> dict:
    return {
        "system": "sa-jobs",
        "version": sa_jobs.__version__,
        "driver": "psycopg " + psycopg.__version__,
        "done_sql": f"SELECT count(*) FROM {JOBS} WHERE state = 'completed'",
        "pending_sql": f"SELECT count(*) FROM {JOBS} WHERE state IN ('available', 'running', 'retryable', 'scheduled')",
        "stuck_sql": f"SELECT count(*) FROM {JOBS} WHERE state = 'running'",
        # After a drain: benchmark rows (n >= 0) that ran but are not completed or running,
        # or that did not run but are (bench_handled holds the handled n's).
        "mismatch_sql": (f"SELECT count(*) FROM {JOBS} j LEFT JOIN (SELECT DISTINCT n FROM bench_handled) h"
                         " ON h.n = (j.args->>'n')::bigint WHERE (j.args->>'n')::bigint >= 0"
                         " AND (h.n IS NOT NULL) <> (j.state IN ('completed', 'running'))"),
        "verify_sql": (f"SELECT count(*) FILTER (WHERE state = 'completed' AND attempt = 1),"
                       f" count(*) FILTER (WHERE state <> 'completed' OR attempt <> 1), count(*) FROM {JOBS}"),
    }


def main() -> None:
    a = _proto.parser().parse_args()
    if a.command == "setup":
        setup(a.dsn)
    elif a.command == "load":
        load(a.dsn, a.n, a.completed)
    elif a.command == "enqueue":
        _proto.emit(enqueue(a.dsn, a.mode, a.n, a.batch))
    elif a.command == "produce":
        produce(a.dsn, a.rate, a.seconds, a.out)
    elif a.command == "worker":
        worker(a.dsn, a.concurrency, a.max_claim, a.out)
    elif a.command == "info":
        _proto.emit(info())


if __name__ == "__main__":
    main()
