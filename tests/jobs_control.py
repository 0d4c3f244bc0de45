"""Job kinds for the control tests that need real worker processes (cancel, pause).

Handlers record what happened in ``<schema>.effects`` (tests/jobs_core.py), with the
database's clock, so a test can tell from outside when a handler started and when it
saw its cancellation.
"""

from __future__ import annotations

import time

import anyio

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


class CtlLongSync(Job, kind="ctl_long_sync", queue="ctl"):
    """The sync twin: polls ``ctx.cancelled`` and notes when it sees it."""


@CtlLongSync.handler
def ctl_long_sync(ctx: JobContext, seconds: float = 120.0) -> None:
    record_effect(ctx, "started")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ctx.cancelled:
            record_effect(ctx, "cancelled")
            return
        time.sleep(0.01)


class CtlQuick(Job, kind="ctl_quick", queue="ctl"):
    """Notes one effect per run."""


@CtlQuick.handler
def ctl_quick(ctx: JobContext) -> None:
    record_effect(ctx, "ran")


class CtlBrief(Job, kind="ctl_brief", queue="ctl", max_attempts=3):
    """Sleeps briefly (async), then notes that it ran: a job to cancel as it completes."""


@CtlBrief.handler
async def ctl_brief(ctx: JobContext, seconds: float = 0.01) -> int:
    await anyio.sleep(seconds)
    await anyio.to_thread.run_sync(record_effect, ctx, "ran")
    return ctx.id
