"""Job kinds for the metrics tests, run in-process and by ``sa-jobs worker`` subprocesses.

Each kind has a known outcome so tests can assert exact metric deltas: ``metrics_ok``
completes, ``metrics_flaky`` fails ``fail_times`` attempts then completes,
``metrics_doomed`` dies on its only attempt, ``metrics_slow`` times out once.
"""

from __future__ import annotations

import anyio

from sa_jobs import Job, JobContext, Unique, constant_backoff

QUEUE = "metrics"
# Error text the handlers raise: it must never show up in a label or the exposition.
SECRET = "metrics-secret-7f3a"


class MetricsOk(Job, kind="metrics_ok", queue=QUEUE):
    pass


@MetricsOk.handler
async def metrics_ok(ctx: JobContext, sleep: float = 0.0) -> None:
    if sleep:
        await anyio.sleep(sleep)


class MetricsFlaky(Job, kind="metrics_flaky", queue=QUEUE, max_attempts=3, backoff=constant_backoff(0.05)):
    pass


@MetricsFlaky.handler
async def metrics_flaky(ctx: JobContext, fail_times: int = 1) -> None:
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"flaky attempt {ctx.attempt} {SECRET}")


class MetricsDoomed(Job, kind="metrics_doomed", queue=QUEUE, max_attempts=1):
    pass


@MetricsDoomed.handler
def metrics_doomed(ctx: JobContext) -> None:
    raise ValueError(f"always fails {SECRET}")


class MetricsSlow(Job, kind="metrics_slow", queue=QUEUE, max_attempts=1, timeout=0.2):
    pass


@MetricsSlow.handler
async def metrics_slow(ctx: JobContext) -> None:
    await anyio.sleep(30)


class MetricsUnique(Job, kind="metrics_unique", queue=QUEUE, max_attempts=3, unique=Unique(by=(), states=("scheduled", "available", "retryable"))):
    """One waiting job of the kind at a time (a running one frees the key); ``fail_after``
    seconds, then fails (0: completes)."""


@MetricsUnique.handler
async def metrics_unique(ctx: JobContext, fail_after: float = 0.0) -> None:
    if fail_after:
        await anyio.sleep(fail_after)
        raise RuntimeError(f"unique attempt failed {SECRET}")


class MetricsFenced(Job, kind="metrics_fenced", queue=QUEUE, max_attempts=1):
    """Its row is taken over while it runs (as a worker that re-claimed it after a lost
    lease would), then it returns: its completion is fenced off, the row left as is."""


@MetricsFenced.handler
def metrics_fenced(ctx: JobContext, conninfo: str) -> int:
    import psycopg
    from psycopg import sql

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("UPDATE {} SET claim_token = gen_random_uuid(), lease_owner = 'other:1',"
                             " lease_expires_at = now() + interval '1 hour' WHERE id = %s")
                     .format(sql.Identifier(ctx.schema, "jobs")), [ctx.id])
    return 1
