"""A worker module (``sa-jobs worker tests.jobs_periodic_freeze``) whose every-second
schedule's factory stops its own process (SIGSTOP) once the file named by
``SA_JOBS_TEST_FREEZE_AT`` exists: a leader frozen in the middle of a firing, its periodic
row locked and its transaction open."""

from __future__ import annotations

import os
import signal

from sa_jobs import Job, JobContext
from sa_jobs.periodic import Periodic


class FrozenTick(Job, kind="frozen_tick", queue="periodic_q"):
    pass


@FrozenTick.handler
def frozen_tick(ctx: JobContext, **args: object) -> None:
    return None


def _build() -> FrozenTick:
    marker = os.environ.get("SA_JOBS_TEST_FREEZE_AT")
    if marker and os.path.exists(marker):
        os.remove(marker)
        os.kill(os.getpid(), signal.SIGSTOP)
    return FrozenTick()


SA_JOBS_PERIODIC = [Periodic("* * * * * *", _build, name="freezing", catch_up=True)]
