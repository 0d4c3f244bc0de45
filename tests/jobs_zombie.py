"""A sync kind whose handler outlives its timeout (it ignores ctx.cancelled), for worker processes."""

from __future__ import annotations

import time

from sa_jobs import Job, JobContext


class ZombieSleep(Job, kind="zombie_sleep", queue="zombie", timeout=0.3, max_attempts=1):
    pass


@ZombieSleep.handler
def zombie_sleep(ctx: JobContext, seconds: float) -> None:
    time.sleep(seconds)  # a thread cannot be interrupted
