"""Worker shutdown at awkward moments, in-process against real PostgreSQL: outcomes that
cannot be written before the stop, the app cancelling the worker, connections left behind."""

from __future__ import annotations

import time

import anyio
import psycopg
from sqlalchemy.orm import Session

from sa_jobs import Job, JobContext, Worker
from sa_jobs._url import to_conninfo
from sa_jobs.events import NullObserver

from .helpers import jobs_sql, q


class SdQuick(Job, kind="sd_quick", queue="sd"):
    pass


SD_GO: list[bool] = []


@SdQuick.handler
async def sd_quick(ctx: JobContext) -> str:
    while not SD_GO:  # returns once the test holds its row locked
        await anyio.sleep(0.01)
    return "done"


class Finished(NullObserver):
    def __init__(self) -> None:
        self.started = 0
        self.finished: list[str] = []

    def job_started(self, queue: str, kind: str, wait_seconds: float) -> None:
        self.started += 1

    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None:
        self.finished.append(outcome)


def add(engine, *jobs: Job) -> list[int]:
    with Session(engine) as session, session.begin():
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def test_an_outcome_left_unwritten_at_the_stop_is_reported_as_lease_lost(engine, database_url, schema):
    """The job's row is locked by another transaction through the whole drain: its
    completion waits (kept) until the drain gives up, and the worker stops with the row
    still 'running' (rescued after its lease). The attempt was never reported: started
    and never finished, the in-flight gauge stuck at 1 for an embedded worker's app. It
    counts as lease_lost, as an outcome whose write changed no row does, never as
    completed (the row is not)."""
    SD_GO.clear()
    [job_id] = add(engine, SdQuick())
    observer = Finished()
    sql = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    with psycopg.connect(to_conninfo(database_url)) as locker:

        async def main() -> float:
            worker = Worker(database_url, kinds=[SdQuick], schema=schema, lease=2, poll_interval=0.2,
                            maintenance_interval=0.1, shutdown_grace=30, observer=observer)
            async with worker:
                with anyio.fail_after(10):
                    while observer.started == 0:
                        await anyio.sleep(0.01)
                assert locker.execute(sql, (job_id,)).fetchone() == ("running",)
                SD_GO.append(True)
                with anyio.fail_after(10):
                    while worker.completer is None or not worker.completer.awaiting():
                        await anyio.sleep(0.01)
                stopping = time.monotonic()
            return time.monotonic() - stopping

        took = anyio.run(main)
        locker.rollback()
    assert took < 10  # the drain's bound (max(2, lease / 2)) and the services' stop
    assert q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,)) == [("running",)]
    assert observer.finished == ["lease_lost"]
