"""Job kinds of the limit tests: each handler keeps a gauge of how many run at once.

``<schema>.gauge`` holds, per key ('*' for the queue, else the partition key), the number
of handlers running now and the highest number seen. The handler's run lies strictly
inside the claim..completion window the limit counts, so a peak above the limit is a
real violation, whatever the process or thread that ran it.
"""

from __future__ import annotations

import time

from psycopg import sql

from sa_jobs import Job, JobContext

from .jobs_core import _conn


def gauge_ddl(schema: str) -> str:
    return sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, n int NOT NULL, peak int NOT NULL)"
    ).format(sql.Identifier(schema, "gauge")).as_string()


def _enter(schema: str, key: str) -> None:
    _conn().execute(
        sql.SQL("INSERT INTO {g} (key, n, peak) VALUES (%s, 1, 1) ON CONFLICT (key) DO UPDATE"
                " SET n = {g}.n + 1, peak = greatest({g}.peak, {g}.n + 1)").format(g=sql.Identifier(schema, "gauge")),
        (key,),
    )


def _leave(schema: str, key: str) -> None:
    _conn().execute(sql.SQL("UPDATE {} SET n = n - 1 WHERE key = %s").format(sql.Identifier(schema, "gauge")), (key,))


def _gauged(ctx: JobContext, keys: list[str], seconds: float) -> None:
    for key in keys:
        _enter(ctx.schema, key)
    try:
        time.sleep(seconds)
    finally:
        for key in keys:
            _leave(ctx.schema, key)


class LimitedWork(Job, kind="lim_work", queue="lim"):
    pass


@LimitedWork.handler
def limited_work(ctx: JobContext, seconds: float = 0.1, i: int = 0) -> None:
    _gauged(ctx, ["*"], seconds)


class CustomerWork(Job, kind="lim_customer", queue="limp", partition_by=("customer",)):
    pass


@CustomerWork.handler
def customer_work(ctx: JobContext, customer: str, seconds: float = 0.1, i: int = 0) -> None:
    _gauged(ctx, ["limp", customer], seconds)


class RatedWork(Job, kind="lim_rated", queue="limr"):
    pass


@RatedWork.handler
def rated_work(ctx: JobContext, i: int = 0) -> None:
    return None


class TxWork(Job, kind="lim_tx", queue="limtx"):
    """Completes through ``ctx.transaction()``: its outcome is not the completer's."""


@TxWork.handler
def tx_work(ctx: JobContext, i: int = 0) -> None:
    with ctx.transaction():
        pass
