"""Job kinds the core tests run, in-process and in worker subprocesses.

Handlers record their side effects in ``<schema>.effects`` (job_id, attempt, worker_pid)
so tests can count executions from the database, not from the worker's word.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import anyio
import psycopg
from psycopg import sql
from sqlalchemy import text

from sa_jobs import Job, JobContext, constant_backoff
from sa_jobs._url import to_conninfo

_lock = threading.Lock()
_shared: dict[str, psycopg.Connection[Any]] = {}


def effects_ddl(schema: str) -> str:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (job_id bigint NOT NULL, attempt int NOT NULL,"
        " worker_pid int NOT NULL, note text, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ).format(sql.Identifier(schema, "effects")).as_string()


def _conn() -> psycopg.Connection[Any]:
    # One connection per process (psycopg serialises threads on it): eight worker
    # processes must not exhaust the server's max_connections.
    with _lock:
        conn = _shared.get("conn")
        if conn is None or conn.closed:
            conn = psycopg.connect(to_conninfo(os.environ["SA_JOBS_DATABASE_URL"]), autocommit=True)
            _shared["conn"] = conn
        return conn


def record_effect(ctx: JobContext, note: str | None = None) -> None:
    _conn().execute(
        sql.SQL("INSERT INTO {} (job_id, attempt, worker_pid, note) VALUES (%s, %s, %s, %s)").format(
            sql.Identifier(ctx.schema, "effects")
        ),
        (ctx.id, ctx.attempt, os.getpid(), note),
    )


class CoreNoop(Job, kind="core_noop", queue="core"):
    """Records one effect per execution."""


@CoreNoop.handler
def core_noop(ctx: JobContext, n: int = 0, sleep: float = 0.0) -> int:
    if sleep:
        time.sleep(sleep)
    record_effect(ctx)
    return n


class CoreSlow(Job, kind="core_slow", queue="core", max_attempts=5):
    """Sleeps (async), then records an effect: a job to kill a worker in the middle of."""


@CoreSlow.handler
async def core_slow(ctx: JobContext, seconds: float) -> None:
    await anyio.sleep(seconds)
    await anyio.to_thread.run_sync(record_effect, ctx)


class CoreTransactional(Job, kind="core_transactional", queue="core", max_attempts=5, backoff=constant_backoff(0.05)):
    """Writes its effect in the job's own transaction: exactly once, even across crashes."""


@CoreTransactional.handler
async def core_transactional(ctx: JobContext, seconds: float = 0.0) -> None:
    async with ctx.async_transaction() as session:
        insert = sql.SQL("INSERT INTO {} (job_id, attempt, worker_pid, note) VALUES (:j, :a, :p, :n)")
        await session.execute(
            text(insert.format(sql.Identifier(ctx.schema, "effects")).as_string()),
            {"j": ctx.id, "a": ctx.attempt, "p": os.getpid(), "n": "tx"},
        )
        if seconds:
            await anyio.sleep(seconds)
