"""Job kinds for the control tests that need real worker processes (cancel).

Handlers record what happened in ``<schema>.effects`` (tests/jobs_core.py), with the
database's clock, so a test can tell from outside when a handler started and when it
saw its cancellation.
"""

from __future__ import annotations

from typing import Any

import os
import random
import time

import anyio
from psycopg import sql
from sqlalchemy import text

from sa_jobs import Job, JobContext

from .jobs_core import record_effect


class CtlLong(Job, kind="ctl_long", queue="ctl"):
    """Runs until cancelled; notes 'started', then 'cancelled' when its scope is cancelled."""


@CtlLong.handler
async def ctl_long(ctx: JobContext, seconds: float = 120.0) -> None:
    await anyio.to_thread.run_sync(record_effect, ctx, "started")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(record_effect, ctx, "cancelled")
        raise



def _tx_effect(ctx: JobContext) -> Any:
    insert = sql.SQL("INSERT INTO {} (job_id, attempt, worker_pid, note) VALUES (:j, :a, :p, 'tx')")
    return text(insert.format(sql.Identifier(ctx.schema, "effects")).as_string()), {
        "j": ctx.id, "a": ctx.attempt, "p": os.getpid()}


class CtlRaceSync(Job, kind="ctl_race_sync", queue="ctl_race"):
    """A sync handler that never looks at ctx.cancelled: works a while, then writes its
    effect in the job's own transaction (which a cancel meanwhile must roll back)."""


@CtlRaceSync.handler
def ctl_race_sync(ctx: JobContext) -> int:
    time.sleep(random.uniform(0, 0.05))
    with ctx.transaction(result=ctx.id) as session:
        session.execute(*_tx_effect(ctx))
        time.sleep(random.uniform(0, 0.01))
    return ctx.id


class CtlRaceAsync(Job, kind="ctl_race_async", queue="ctl_race"):
    """The async twin; its scope is cancelled by a cancel, in or out of its transaction."""


@CtlRaceAsync.handler
async def ctl_race_async(ctx: JobContext) -> int:
    await anyio.sleep(random.uniform(0, 0.05))
    async with ctx.async_transaction(result=ctx.id) as session:
        await session.execute(*_tx_effect(ctx))
        await anyio.sleep(random.uniform(0, 0.01))
    return ctx.id


class CtlRacePlain(Job, kind="ctl_race_plain", queue="ctl_race"):
    """Returns its result for the completer to write (no transaction of its own)."""


@CtlRacePlain.handler
async def ctl_race_plain(ctx: JobContext) -> int:
    await anyio.sleep(random.uniform(0, 0.05))
    return ctx.id
