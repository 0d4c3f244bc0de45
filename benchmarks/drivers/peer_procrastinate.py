"""Benchmark driver for procrastinate, public API only. See _proto.py."""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402
import _proto  # noqa: E402

import procrastinate  # noqa: E402

A = _proto.parser().parse_args()
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=A.dsn))


@app.task(name="bench", queue="bench")
async def bench(n: int) -> None:
    _proto.record(n)


async def amain(a) -> None:
    if a.command == "setup":
        _peer.reset_public_schema(a.dsn)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        return
    if a.command == "info":
        _proto.emit({
            "system": "procrastinate", "version": version("procrastinate"), "driver": f"psycopg {version('psycopg')}",
            "pending_sql": "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
            "verify_sql": ("SELECT count(*) FILTER (WHERE status = 'succeeded'),"
                           " count(*) FILTER (WHERE status <> 'succeeded'), count(*) FROM procrastinate_jobs"),
        })
        return
    async with app.open_async():
        async def single(i: int):
            await bench.defer_async(n=i)

        async def many(ns: list[int]):
            await bench.batch_defer_async(*({"n": i} for i in ns))

        if a.command == "load":
            for lo in range(0, a.n, 10_000):
                await many(list(range(lo, min(a.n, lo + 10_000))))
        elif a.command == "enqueue":
            _proto.emit(await _peer.timed_enqueue(a.mode, a.n, a.batch, single, many, {
                "single": "task.defer_async(n=i) (1 job/txn)",
                "batch": f"task.batch_defer_async({a.batch} jobs)",
                "bulk": "task.batch_defer_async(all jobs)",
            }))
        elif a.command == "produce":
            await _peer.paced_async(a.rate, a.seconds, single, a.out)
        elif a.command == "worker":
            task: list[asyncio.Task] = []

            async def start():
                task.append(asyncio.create_task(app.run_worker_async(
                    queues=["bench"], concurrency=a.concurrency, install_signal_handlers=False)))

            async def stop():
                task[0].cancel()  # procrastinate 3: cancellation is its graceful stop
                try:
                    await task[0]
                except asyncio.CancelledError:
                    pass

            await _peer.serve_worker(start, stop, a.out)
    if a.command == "load":
        import psycopg

        with psycopg.connect(a.dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE procrastinate_jobs")


if __name__ == "__main__":
    asyncio.run(amain(A))
