"""Benchmark driver for chancy (AsyncExecutor, default plugins), public API only. See _proto.py."""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402
import _proto  # noqa: E402

from chancy import Chancy, Job, Queue, Worker  # noqa: E402


async def bench(n: int) -> None:
    _proto.record(n)


def job(i: int) -> Job:
    return Job.from_func(bench, queue="bench", kwargs={"n": i})


async def amain(a) -> None:
    if a.command == "setup":
        _peer.reset_public_schema(a.dsn)
        async with Chancy(a.dsn) as chancy:
            await chancy.migrate()
            await chancy.declare(Queue("bench", concurrency=10, executor=Chancy.Executor.Async), upsert=True)
        return
    if a.command == "info":
        _proto.emit({
            "system": "chancy", "version": version("chancy"), "driver": f"psycopg {version('psycopg')}",
            "pending_sql": "SELECT count(*) FROM chancy_jobs WHERE state NOT IN ('succeeded', 'failed')",
            "verify_sql": ("SELECT count(*) FILTER (WHERE state = 'succeeded'),"
                           " count(*) FILTER (WHERE state <> 'succeeded'), count(*) FROM chancy_jobs"),
        })
        return
    async with Chancy(a.dsn) as chancy:
        async def single(i: int):
            await chancy.push(job(i))

        async def many(ns: list[int]):
            async for _ in chancy.push_many([job(i) for i in ns], batch_size=len(ns)):
                pass

        if a.command == "load":
            for lo in range(0, a.n, 10_000):
                await many(list(range(lo, min(a.n, lo + 10_000))))
        elif a.command == "enqueue":
            _proto.emit(await _peer.timed_enqueue(a.mode, a.n, a.batch, single, many, {
                "single": "Chancy.push(job) (1 job/txn)",
                "batch": f"Chancy.push_many({a.batch} jobs)",
                "bulk": "Chancy.push_many(all jobs, batch_size=all)",
            }))
        elif a.command == "produce":
            await _peer.paced_async(a.rate, a.seconds, single, a.out)
        elif a.command == "worker":
            await chancy.declare(Queue("bench", concurrency=a.concurrency, executor=Chancy.Executor.Async,
                                       polling_interval=1), upsert=True)
            w: list[Worker] = []

            async def start():
                w.append(Worker(chancy, register_signal_handlers=False))
                await w[0].start()

            async def stop():
                await w[0].stop()

            await _peer.serve_worker(start, stop, a.out)
    if a.command == "load":
        import psycopg

        with psycopg.connect(a.dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE chancy_jobs")


if __name__ == "__main__":
    asyncio.run(amain(_proto.parser().parse_args()))
