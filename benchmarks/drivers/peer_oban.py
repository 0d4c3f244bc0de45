"""Benchmark driver for oban (Python), public API only; needs Python >= 3.12. See _proto.py."""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, HERE)
import _peer  # noqa: E402
import _proto  # noqa: E402

from oban import Oban, job  # noqa: E402
from oban.schema import install  # noqa: E402


@job(queue="bench")
def bench(n: int) -> None:
    _proto.record(n)


async def amain(a) -> None:
    if a.command == "info":
        _proto.emit({
            "system": "oban", "version": version("oban"), "driver": f"psycopg {version('psycopg')}",
            "pending_sql": "SELECT count(*) FROM oban_jobs WHERE state IN ('available', 'executing', 'scheduled', 'retryable')",
            "verify_sql": ("SELECT count(*) FILTER (WHERE state = 'completed'),"
                           " count(*) FILTER (WHERE state <> 'completed'), count(*) FROM oban_jobs"),
        })
        return
    if a.command == "setup":
        _peer.reset_public_schema(a.dsn)
    pool = await Oban.create_pool(a.dsn)
    try:
        if a.command == "setup":
            await install(pool)
            return
        if a.command == "worker":
            oban = Oban(pool=pool, queues={"bench": a.concurrency})

            async def start():
                await oban.start()

            async def stop():
                await oban.stop()

            await _peer.serve_worker(start, stop, a.out)
            return
        async with Oban(pool=pool) as oban:
            async def single(i: int):
                await oban.enqueue(bench.new(i))

            async def many(ns: list[int]):
                await oban.enqueue_many([bench.new(i) for i in ns])

            if a.command == "load":
                for lo in range(0, a.n, 10_000):
                    await many(list(range(lo, min(a.n, lo + 10_000))))
            elif a.command == "enqueue":
                _proto.emit(await _peer.timed_enqueue(a.mode, a.n, a.batch, single, many, {
                    "single": "Oban.enqueue(job) (1 job/txn)",
                    "batch": f"Oban.enqueue_many({a.batch} jobs)",
                    "bulk": "Oban.enqueue_many(all jobs)",
                }))
            elif a.command == "produce":
                await _peer.paced_async(a.rate, a.seconds, single, a.out)
    finally:
        await pool.close()
    if a.command == "load":
        import psycopg

        with psycopg.connect(a.dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE oban_jobs")


if __name__ == "__main__":
    asyncio.run(amain(_proto.parser().parse_args()))
