"""Job kinds for the control tests that need real worker processes (cancel).

Handlers record what happened in ``<schema>.effects`` (tests/jobs_core.py), with the
database's clock, so a test can tell from outside when a handler started and when it
saw its cancellation.
"""

from __future__ import annotations

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

