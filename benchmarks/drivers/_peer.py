"""Shared scaffolding for the peers' drivers (stdlib + psycopg, which every peer venv has)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _proto  # noqa: E402


def reset_public_schema(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")


async def timed_enqueue(mode: str, n: int, batch: int, single: Callable[[int], Awaitable[Any]],
                        many: Callable[[list[int]], Awaitable[Any]], api: dict[str, str]) -> dict:
    await single(-1)  # warm up connections / prepared statements
    _proto.timed_mark("timing")
    started = time.perf_counter()
    cpu0 = time.process_time()
    if mode == "single":
        for i in range(n):
            await single(i)
    elif mode == "batch":
        for lo in range(0, n, batch):
            await many(list(range(lo, min(n, lo + batch))))
    elif mode == "bulk":
        await many(list(range(n)))
    else:
        raise SystemExit(f"unknown mode {mode}")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu0
    _proto.timed_mark("timed")
    return {"n": n, "seconds": seconds, "client_cpu_seconds": cpu, "api": api[mode]}


async def paced_async(rate: float, seconds: float, single: Callable[[int], Awaitable[Any]], out: str) -> None:
    await single(-1)
    rows = []
    interval = 1.0 / rate
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        t_call = time.time()
        await single(i)
        rows.append((i, t_call, time.time()))
    _proto.write_produced(out, rows)


async def serve_worker(start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]], out: str) -> None:
    """ready / go / stop around a peer's worker: ``start`` returns once it runs in a task."""
    _proto.say("ready")
    await asyncio.to_thread(_proto.wait_for, "go")
    _proto.start_progress()
    await start()
    await asyncio.to_thread(_proto.wait_for, "stop")
    await stop()
    _proto.finish_worker(out)
