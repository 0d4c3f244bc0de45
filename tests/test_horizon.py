"""A held xmin horizon: the worker notices it and stops stepping over every claimed job.

An open REPEATABLE READ transaction keeps every version it might see, so each job claimed
meanwhile leaves an entry in jobs_claim_idx that no one may remove. A claim that reads the
queue from its start steps over all of them; while the horizon is held the worker resumes
past its previous batch instead, and reads from the start only every few seconds. These
tests hold a real snapshot on the test database and run a real worker against it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from sqlalchemy.orm import Session

from sa_jobs import Job, JobContext, QueueLimits, Worker, set_queue_limits
from sa_jobs._url import to_conninfo
from sa_jobs.events import NullObserver
from sa_jobs.maintenance.horizon import HorizonWatch
from sa_jobs.maintenance.leader import Maintainer
from sa_jobs.maintenance.scheduler import Scheduler
from sa_jobs.metrics import PrometheusObserver
from sa_jobs.queries import Queries
from sa_jobs.worker.worker import (
    HELD_RESCAN_INTERVAL,
    HELD_RESCAN_MAX,
    HELD_RESCAN_SHARE,
    held_rescan_interval,
    next_resume_point,
)

from .helpers import FAST, jobs_sql, q


class HorizonNoop(Job, kind="horizon_noop", queue="horizon"):
    pass


@HorizonNoop.handler
async def horizon_noop(ctx: JobContext) -> None:
    return None


def _pin(database_url: str, schema: str) -> psycopg.Connection[Any]:
    """A session holding a REPEATABLE READ snapshot (and so the xmin horizon) until closed."""
    conn = psycopg.connect(to_conninfo(database_url))
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    conn.execute(jobs_sql(schema, "SELECT count(*) FROM {jobs}")).fetchone()
    return conn


def test_horizon_watch_sees_a_held_snapshot_and_its_release(database_url: str, schema: str) -> None:
    watch = HorizonWatch(held_after=0.3)
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    watch.bind_observer(observer)

    def gauge() -> float:
        value = registry.get_sample_value("sa_jobs_xmin_horizon_held_seconds")
        assert value is not None
        return value

    seen: list[bool] = []
    write = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, finished_at) VALUES ('x', 'h', 'completed', now())")

    async def ticks(n: int) -> None:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            for _ in range(n):
                q(database_url, write)  # new xids: without them a still horizon holds nothing back
                await watch.run_once(conn, Queries.for_schema(schema))
                seen.append(watch.held)
                await anyio.sleep(0.1)

    anyio.run(ticks, 8)
    assert not any(seen), "no snapshot was held, yet the horizon counted as held"
    pin = _pin(database_url, schema)
    try:
        # A fresh watch: on a shared server another client's transaction may have been
        # oldest at the end of the first ticks, and would count as held from the first tick.
        watch = HorizonWatch(held_after=0.3)
        watch.bind_observer(observer)
        seen.clear()
        anyio.run(ticks, 8)
        assert not seen[0] and seen[-1], seen  # held once the same xid stayed oldest 0.3 s
        assert watch.held_for() > 0.3 and gauge() > 0.3
    finally:
        pin.close()
    seen.clear()
    anyio.run(ticks, 2)
    assert seen == [False, False] and watch.held_for() == 0.0 and gauge() == 0.0


def test_a_watch_that_cannot_read_the_horizon_steps_aside_and_maintenance_goes_on(database_url: str, schema: str) -> None:
    """A server without the views, or a role refused them: the watch disables itself on
    the error and the services after it in the same tick still run on that connection."""
    watch = HorizonWatch(held_after=0.0)
    watch.statement = "SELECT x FROM sa_jobs_no_such_view_for_the_watch"  # UndefinedTable, as on such a server
    retry = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, attempt, scheduled_at)"
                             " VALUES ('horizon_noop', 'horizon', 'retryable', 1, now() - interval '1 s') RETURNING id")
    job_id = q(database_url, retry)[0][0]
    maintainer = Maintainer(to_conninfo(database_url), Queries.for_schema(schema), NullObserver(), [watch, Scheduler()],
                            interval=0.05)

    async def a_few_ticks() -> None:
        with anyio.move_on_after(0.5):
            await maintainer.run()  # closes its connection when cancelled

    anyio.run(a_few_ticks)
    assert watch.disabled and not watch.held
    state = q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,))[0][0]
    assert state == "available"  # the scheduler ran after the watch failed, in the same ticks


def test_held_rescans_come_every_interval_and_back_off_when_slow_up_to_a_cap() -> None:
    assert held_rescan_interval(0.0) == HELD_RESCAN_INTERVAL
    assert held_rescan_interval(HELD_RESCAN_INTERVAL * HELD_RESCAN_SHARE / 2) == HELD_RESCAN_INTERVAL
    assert held_rescan_interval(0.2) == pytest.approx(0.2 / HELD_RESCAN_SHARE)
    assert held_rescan_interval(15.0) == HELD_RESCAN_MAX  # e.g. one claim that ran into statement_timeout


def test_resume_point_rules() -> None:
    a, b, c = (0, 1.0, 10), (0, 2.0, 20), (0, 3.0, 30)
    old = (-1, 0.5, 5)  # behind every other key: a more urgent job

    def after(claimed: list, **kw: object) -> object:
        return next_resume_point(last=max(claimed) if claimed else None, count=len(claimed), limit=3, **kw)

    # Moving horizon: only a full batch moves the point; a short one clears it.
    assert after([a, c, b], held=False, previous=None, from_start=True) == c
    assert after([a, b], held=False, previous=c, from_start=False) is None
    # Held: any batch that took jobs moves it, an empty one keeps it.
    assert after([a, b], held=True, previous=None, from_start=False) == b
    assert after([], held=True, previous=b, from_start=True) == b
    # Held, a short claim from the start that found only a job behind the point: that
    # claim took everything it could see, so the point stays where it was.
    assert after([old], held=True, previous=c, from_start=True) == c
    # ... but a full one may have left jobs between its last row and the old point.
    assert after([old, a, b], held=True, previous=c, from_start=True) == b


def _claim_index_reads(database_url: str, schema: str) -> tuple[int, int]:
    """(scans, index entries read) of this schema's jobs_claim_idx, as counted so far."""
    rows = q(database_url, "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes"
                           " WHERE schemaname = %s AND indexrelname = 'jobs_claim_idx'", (schema,))
    return rows[0][0], rows[0][1]


@pytest.mark.parametrize("limits", [QueueLimits(), QueueLimits(concurrency=10_000),
                                    QueueLimits(partition_concurrency=10_000)], ids=["plain", "concurrency", "partition"])
def test_claims_resume_while_the_horizon_is_held_and_nothing_waits_behind(
        database_url: str, schema: str, engine: Any, limits: QueueLimits) -> None:
    """With a snapshot held, a steady stream is claimed through resumed claims: the claim
    index is read far less than "every claim steps over every job claimed since the pin";
    a more urgent job and an overdue one, both behind the resume point, still run within
    one rescan interval; every job completes once. The same for a queue with a limit
    (claimed through the schema's claim function, which resumes since schema v12; jobs
    keyed for the partition limit)."""
    insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, priority, scheduled_at, partition_key)"
                              " SELECT 'horizon_noop', 'horizon', %s, now() - %s * interval '1 s',"
                              " 'k' || (g %% 10) FROM generate_series(1, %s) g")
    with Session(engine) as session, session.begin():
        set_queue_limits(session, "horizon", limits)
    stop = threading.Event()

    def steady() -> None:  # 40 jobs every 50 ms, in their own transactions: new xids
        while not stop.is_set():
            q(database_url, insert, (0, 0, 40))
            time.sleep(0.05)

    result: dict[str, Any] = {}

    async def aq(*args: Any) -> list[tuple[Any, ...]]:  # off the worker's event loop
        return await anyio.to_thread.run_sync(lambda: q(database_url, *args))

    async def main() -> None:
        worker = Worker(database_url, kinds=[HorizonNoop], schema=schema, queues={"horizon": 50}, **FAST)
        worker.horizon.held_after = 0.5
        pin = _pin(database_url, schema)
        feeder = threading.Thread(target=steady)
        try:
            async with worker:
                feeder.start()
                with anyio.fail_after(20):
                    while not worker.horizon.held:
                        await anyio.sleep(0.05)
                await anyio.sleep(2.5)  # jobs claimed since the pin pile up behind the head
                dead_entries = (await aq(jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state <> 'available'")))[0][0]
                scans0, read0 = await anyio.to_thread.run_sync(_claim_index_reads, database_url, schema)
                # Behind any resume point: a more urgent job, and one overdue by an hour.
                urgent = (await aq(jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, priority) VALUES"
                                                          " ('horizon_noop', 'horizon', -5) RETURNING id")))[0][0]
                overdue = (await aq(jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, scheduled_at) VALUES"
                                                           " ('horizon_noop', 'horizon', now() - interval '1 hour') RETURNING id")))[0][0]
                inserted = time.monotonic()
                waits = {}
                with anyio.fail_after(HELD_RESCAN_INTERVAL + 5):
                    while len(waits) < 2:
                        for job_id in (urgent, overdue):
                            done = await aq(jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,))
                            if job_id not in waits and done[0][0] == "completed":
                                waits[job_id] = time.monotonic() - inserted
                        await anyio.sleep(0.05)
                await anyio.sleep(1.0)
                scans1, read1 = await anyio.to_thread.run_sync(_claim_index_reads, database_url, schema)
                result.update(held=worker.horizon.held, dead=dead_entries, scans=scans1 - scans0, read=read1 - read0,
                              waits=sorted(waits.values()))
                stop.set()
                feeder.join()
                with anyio.fail_after(30):
                    while (await aq(jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state <> 'completed'")))[0][0]:
                        await anyio.sleep(0.1)
                pin.close()
                with anyio.fail_after(5):  # the worker goes back to claims from the start
                    q(database_url, insert, (0, 0, 1))  # a new xid: the horizon moves on
                    while worker.horizon.held:
                        await anyio.sleep(0.05)
        finally:
            stop.set()
            pin.close()

    anyio.run(main)
    assert result["held"]
    assert result["scans"] > 10, result
    # Before: every scan read every entry left since the pin (>= dead). Now most scans
    # start past their previous batch; the rescans (one per worker and interval) still
    # read them all.
    per_scan = result["read"] / result["scans"]
    assert per_scan < result["dead"] / 4, result
    assert max(result["waits"]) <= HELD_RESCAN_INTERVAL + 2, result
    rows = q(database_url, jobs_sql(schema, "SELECT count(*), count(*) FILTER (WHERE attempt = 1) FROM {jobs}"))
    assert rows[0][0] == rows[0][1]  # every job ran exactly once

