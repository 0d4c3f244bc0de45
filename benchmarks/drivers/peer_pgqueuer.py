"""Benchmark driver for pgqueuer (--variant asyncpg|psycopg), public API only. See _proto.py."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402
import _proto  # noqa: E402

from pgqueuer import QueueManager  # noqa: E402
from pgqueuer.queries import Queries  # noqa: E402

ENTRY = "bench"


async def connect(dsn: str, variant: str):
    if variant == "psycopg":
        import psycopg
        from pgqueuer.db import PsycopgDriver

        return PsycopgDriver(await psycopg.AsyncConnection.connect(dsn, autocommit=True))
    import asyncpg
    from pgqueuer.db import AsyncpgDriver

    return AsyncpgDriver(await asyncpg.connect(dsn))


async def amain(a) -> None:
    variant = a.variant or "asyncpg"
    if a.command == "setup":
        _peer.reset_public_schema(a.dsn)
        await Queries(await connect(a.dsn, variant)).install()
        return
    if a.command == "info":
        _proto.emit({
            "system": f"pgqueuer ({variant})", "version": version("pgqueuer"),
            "driver": f"{variant} {version(variant)}",
            "pending_sql": "SELECT count(*) FROM pgqueuer",
            "verify_sql": ("SELECT (SELECT count(DISTINCT job_id) FROM pgqueuer_log WHERE status = 'successful'),"
                           " (SELECT count(*) FROM pgqueuer) + (SELECT count(*) FROM pgqueuer_log"
                           "  WHERE status IN ('exception', 'canceled', 'failed')),"
                           " (SELECT count(DISTINCT job_id) FROM pgqueuer_log)"),
        })
        return
    q = Queries(await connect(a.dsn, variant))

    async def single(i: int):
        await q.enqueue(ENTRY, str(i).encode())

    async def many(ns: list[int]):
        await q.enqueue([ENTRY] * len(ns), [str(i).encode() for i in ns], [0] * len(ns))

    if a.command == "load":
        for lo in range(0, a.n, 10_000):
            await many(list(range(lo, min(a.n, lo + 10_000))))
        await q.driver.execute("VACUUM ANALYZE pgqueuer")
    elif a.command == "enqueue":
        _proto.emit(await _peer.timed_enqueue(a.mode, a.n, a.batch, single, many, {
            "single": "Queries.enqueue(entrypoint, payload) (1 job/txn)",
            "batch": f"Queries.enqueue(lists of {a.batch})",
            "bulk": "Queries.enqueue(lists of all jobs)",
        }))
    elif a.command == "produce":
        await _peer.paced_async(a.rate, a.seconds, single, a.out)
    elif a.command == "worker":
        qm = QueueManager(Queries(await connect(a.dsn, variant)))

        @qm.entrypoint(ENTRY)
        async def bench(job) -> None:
            _proto.record(int(job.payload))

        task: list[asyncio.Task] = []

        async def start():
            # batch_size = the per-process concurrency (pgqueuer's default is 10)
            task.append(asyncio.create_task(qm.run(batch_size=a.concurrency,
                                                   log_aggregation_interval=timedelta(0))))

        async def stop():
            qm.shutdown.set()
            await task[0]

        await _peer.serve_worker(start, stop, a.out)


if __name__ == "__main__":
    asyncio.run(amain(_proto.parser().parse_args()))
