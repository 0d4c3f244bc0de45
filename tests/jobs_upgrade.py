"""Job kinds for tests/test_rolling_upgrade.py, run by two releases at once: the previous
release's workers and this one's import this file (a copy, outside the repository, so that
``sa_jobs`` comes from each release's own tree). Handlers record each execution in
``<schema>.effects`` with the release that ran it, so the test counts from the database."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg
from psycopg import sql

from sa_jobs import Job, JobContext, constant_backoff
from sa_jobs import schema as _schema
from sa_jobs._url import to_conninfo
from sa_jobs.periodic import Periodic

RELEASE = _schema.LATEST_VERSION  # the schema version this release's code knows
_conn: Any = None


def effects_ddl(schema: str) -> sql.Composed:
    return sql.SQL("CREATE TABLE {} (job_id bigint NOT NULL, kind text NOT NULL, attempt int NOT NULL,"
                   " pid int NOT NULL, release int NOT NULL, note text NOT NULL,"
                   " at timestamptz NOT NULL DEFAULT clock_timestamp())").format(sql.Identifier(schema, "effects"))


def record(ctx: JobContext, note: str) -> None:
    global _conn
    if _conn is None or _conn.closed:
        _conn = psycopg.connect(to_conninfo(os.environ["SA_JOBS_DATABASE_URL"]), autocommit=True)
    _conn.execute(sql.SQL("INSERT INTO {} (job_id, kind, attempt, pid, release, note) VALUES (%s, %s, %s, %s, %s, %s)")
                  .format(sql.Identifier(ctx.schema, "effects")),
                  (ctx.id, ctx.kind, ctx.attempt, os.getpid(), RELEASE, note))


class UpgNoop(Job, kind="upg_noop", queue="upg"):
    """One effect per execution; ``sleep`` longer than the lease needs heartbeats."""


@UpgNoop.handler
def upg_noop(ctx: JobContext, n: int = 0, sleep: float = 0.0) -> None:
    if sleep:
        time.sleep(sleep)
    record(ctx, "done")


class UpgFlaky(Job, kind="upg_flaky", queue="upg", max_attempts=3, backoff=constant_backoff(0.3)):
    """Fails its first attempt: a retry to schedule, across the upgrade."""


@UpgFlaky.handler
def upg_flaky(ctx: JobContext, n: int = 0) -> None:
    record(ctx, "try")
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails on purpose")


class UpgLimited(Job, kind="upg_limited", queue="upg_limited"):
    """Runs in a queue with a concurrency limit (the test sets 2): its start and end are recorded."""


@UpgLimited.handler
def upg_limited(ctx: JobContext, n: int = 0) -> None:
    record(ctx, "start")
    time.sleep(0.1)
    record(ctx, "end")


class UpgPartitioned(Job, kind="upg_partitioned", queue="upg_part", partition_by=("key",)):
    """Runs in a queue with a concurrency and a partition limit (by ``key``): its start and end are recorded."""


@UpgPartitioned.handler
def upg_partitioned(ctx: JobContext, key: str = "", sleep: float = 0.2) -> None:
    record(ctx, "start")
    time.sleep(sleep)
    record(ctx, "end")


class UpgTick(Job, kind="upg_tick", queue="upg"):
    """Fired every second by the maintenance leader, whichever release it runs."""


@UpgTick.handler
def upg_tick(ctx: JobContext, **args: Any) -> None:
    record(ctx, "done")


SA_JOBS_PERIODIC = [Periodic("* * * * * *", UpgTick, name="upg_every_second")]


def produce(url: str, schema: str) -> None:
    """Enqueue about 20 jobs a second until killed (``python jobs_upgrade.py URL SCHEMA``):
    an app of one release, enqueueing with its own code throughout the upgrade."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from sa_jobs._url import sqlalchemy_url

    engine = create_engine(sqlalchemy_url(url)).execution_options(schema_translate_map={"sa_jobs": schema})
    n = 0
    while True:
        with Session(engine) as session, session.begin():
            for _ in range(4):
                n += 1
                kind = UpgFlaky if n % 10 == 0 else UpgLimited if n % 5 == 0 else UpgNoop
                session.add(kind(n=n))
        print(f"enqueued {n}", flush=True)
        time.sleep(0.2)


def relimit(url: str, schema: str) -> int:
    """A queue's limit removed and set again within a second, with this release's
    set_queue_limits, while a plain claim started jobs in between (the queue unlimited),
    then a limited claim: the jobs of queue ``relimit`` running after it (the limit is 3)."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from sa_jobs._url import sqlalchemy_url
    from sa_jobs.admin import QueueLimits, set_queue_limits

    engine = create_engine(sqlalchemy_url(url)).execution_options(schema_translate_map={"sa_jobs": schema})
    jobs = sql.Identifier(schema, "jobs")
    claim = sql.SQL("SELECT count(*) FROM {}('relimit', %s, gen_random_uuid(), 'relimit', 60.0, 50)").format(
        sql.Identifier(schema, "claim_limited"))

    def limit(limits: QueueLimits) -> None:
        with Session(engine) as session, session.begin():
            set_queue_limits(session, "relimit", limits)

    with psycopg.connect(to_conninfo(url), autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (kind, queue, args) SELECT 'upg_noop', 'relimit', '{{}}'"
                             " FROM generate_series(1, 20)").format(jobs))
        limit(QueueLimits(concurrency=3))
        assert conn.execute(claim, (1,)).fetchone()[0] == 1  # counted: 0 running, 1 taken
        limit(QueueLimits())
        # What a plain claim does while the queue has no limit.
        conn.execute(sql.SQL("UPDATE {0} SET state = 'running', attempt = 1, claim_token = gen_random_uuid(),"
                             " lease_owner = 'plain', lease_expires_at = now() + interval '60 s'"
                             " WHERE id IN (SELECT id FROM {0} WHERE queue = 'relimit' AND state = 'available'"
                             " ORDER BY id LIMIT 5)").format(jobs))
        limit(QueueLimits(concurrency=3))
        conn.execute(claim, (2,))
        running = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE queue = 'relimit' AND state = 'running'")
                               .format(jobs)).fetchone()[0]
    engine.dispose()
    return int(running)


if __name__ == "__main__":
    import sys

    produce(sys.argv[1], sys.argv[2])
