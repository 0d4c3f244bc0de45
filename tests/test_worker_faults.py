"""Faults inside a worker that must cost at most a log line: text PostgreSQL cannot store
in an error or a progress message, observer hooks that raise, a COMMIT of
``ctx.transaction()`` that fails. Each test failed before its fix (session 9's bug hunt)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from sa_jobs import Job, JobContext, Unique
from sa_jobs.events import NullObserver

from .helpers import jobs_sql, q, run_worker_until, until


class FaultRaises(Job, kind="wf_raises", queue="wf", max_attempts=2):
    pass


# Args cannot hold NUL or a lone surrogate (refused at construction): handlers make them.
_UNSTORABLE = {"nul": "nul \x00 inside", "surrogate": "lone \ud800 surrogate"}


@FaultRaises.handler
async def wf_raises(ctx: JobContext, message: str) -> None:
    raise RuntimeError(_UNSTORABLE[message])


class FaultProgress(Job, kind="wf_progress", queue="wf"):
    pass


@FaultProgress.handler
async def wf_progress(ctx: JobContext, message: str) -> str:
    import anyio

    ctx.set_progress(50, _UNSTORABLE[message])

    await anyio.sleep(1.0)  # several beats (lease 1 s: every 0.25 s) while the job runs
    return "done"


class FaultOk(Job, kind="wf_ok", queue="wf"):
    pass


@FaultOk.handler
async def wf_ok(ctx: JobContext, n: int) -> int:
    import anyio

    await anyio.sleep(0.6)
    return n


class FaultRetryTx(Job, kind="wf_retry_tx", queue="wf", max_attempts=3):
    pass


@FaultRetryTx.handler
def wf_retry_tx(ctx: JobContext, table: str) -> None:
    # The first transaction's COMMIT fails (a deferred unique constraint); the handler
    # waits longer than the lease, as a retry loop with backoff might, and tries again.
    try:
        with ctx.transaction() as session:
            session.execute(text(f"INSERT INTO public.{table} VALUES (1), (1)"))
    except Exception:  # noqa: BLE001 - the failure the test provokes
        pass
    time.sleep(1.6)
    with ctx.transaction() as session:
        session.execute(text(f"INSERT INTO public.{table} VALUES (2)"))


KINDS = [FaultRaises, FaultProgress, FaultOk, FaultRetryTx]
FAST = dict(lease=1.0, maintenance_interval=0.1, poll_interval=0.2, concurrency=4)


def _add(engine, *jobs: Job) -> list[int]:
    with Session(engine) as session, session.begin():
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def _rows(database_url: str, schema: str, what: str) -> list[tuple]:
    return q(database_url, jobs_sql(schema, f"SELECT {what} FROM {{jobs}} ORDER BY id"))


def _unfinished(database_url: str, schema: str) -> int:
    return q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state NOT IN ('completed', 'dead')"))[0][0]


@pytest.mark.parametrize("bad", sorted(_UNSTORABLE))
def test_an_error_text_postgresql_cannot_store_is_recorded_escaped(engine, database_url, schema, bad):
    """Before: the failure's UPDATE was refused (22P05) and dropped; the job sat running
    until its lease expired, and its real error was lost."""
    _add(engine, FaultRaises(message=bad))
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0, **FAST)
    ((state, attempt, errors),) = _rows(database_url, schema, "state, attempt, errors")
    assert (state, attempt) == ("dead", 2)
    assert [e["error"].split(":")[0] for e in errors] == ["RuntimeError", "RuntimeError"]  # no LeaseExpired
    assert "\x00" not in errors[0]["error"] and ("\\x00" in errors[0]["error"] or "\\ud800" in errors[0]["error"])


def test_a_progress_message_postgresql_cannot_store_breaks_no_heartbeat(engine, database_url, schema):
    """Before: every beat of the worker failed from then on, and after one lease every job
    it ran was cancelled as lost and run again."""
    ids = _add(engine, FaultProgress(message="nul"), FaultOk(n=1), FaultOk(n=2))
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0, **FAST)
    rows = _rows(database_url, schema, "id, state, attempt, progress")
    assert [(r[0], r[1], r[2]) for r in rows] == [(i, "completed", 1) for i in ids]
    assert rows[0][3] == {"percent": 50, "message": "nul \\x00 inside", "attempt": 1}


class _Broken(NullObserver):
    def claimed(self, queue: str, count: int, seconds: float) -> None:
        raise RuntimeError("metrics backend down")

    def job_finished(self, *args: object) -> None:
        raise RuntimeError("metrics backend down")

    def job_started(self, *args: object) -> None:
        raise RuntimeError("metrics backend down")


def test_observer_hooks_that_raise_cost_no_job(engine, database_url, schema, caplog):
    """Before: a raise in claimed() left the claimed rows running until their lease
    expired (every claim, so jobs went dead without running); one in job_finished()
    tore the worker down."""
    ids = _add(engine, *(FaultOk(n=i) for i in range(6)))
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0,
                     observer=_Broken(), **FAST)
    assert _rows(database_url, schema, "id, state, attempt") == [(i, "completed", 1) for i in ids]
    assert "observer hook claimed failed" in caplog.text and "observer hook job_finished failed" in caplog.text


def test_a_failed_commit_in_ctx_transaction_keeps_the_job_heartbeating(engine, database_url, schema):
    """Before: the failed COMMIT left the job marked as completing, so the heartbeat skipped
    it; the handler's second transaction, one lease later, was refused (LeaseLostError)
    and the job ran again."""
    table = "wf_" + uuid.uuid4().hex[:12]
    q(database_url, f"CREATE TABLE public.{table} (id int, CONSTRAINT {table}_u UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)")
    try:
        _add(engine, FaultRetryTx(table=table))
        run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0, **FAST)
        assert _rows(database_url, schema, "state, attempt") == [("completed", 1)]
        assert q(database_url, f"SELECT id FROM public.{table}") == [(2,)]
    finally:
        q(database_url, f"DROP TABLE IF EXISTS public.{table}")


class FaultResume(Job, kind="wf_resume", queue="wf_resume"):
    pass


RESUMED_RAN: list[int] = []


@FaultResume.handler
async def wf_resume(ctx: JobContext, n: int) -> None:
    RESUMED_RAN.append(n)


def test_a_timed_out_claim_from_the_start_keeps_the_resumed_rows(engine, database_url, schema):
    """A claim can run two statements: resumed past the last batch, then from the start of
    the queue. Before, one deadline bounded both, so when the second ran out of time (as it
    may while the xmin horizon is held) the rows the first had committed never reached a
    runner and sat running until their lease expired. The second statement is slowed here
    (pg_sleep once any job has been claimed) past the statement deadline."""
    import dataclasses

    import anyio

    from sa_jobs import Worker

    RESUMED_RAN.clear()
    _add(engine, FaultResume(n=0).options(priority=1), FaultResume(n=1).options(priority=1),
         FaultResume(n=2).options(priority=2))

    async def main() -> None:
        worker = Worker(database_url, kinds=[FaultResume], schema=schema, concurrency=4, max_claim=2, lease=30,
                        poll_interval=0.2, maintenance_interval=0.2, statement_timeout=1.0)
        slow = worker._queries.claim.replace(
            "scheduled_at <= now()",
            "scheduled_at <= now() AND (SELECT pg_sleep(CASE WHEN EXISTS (SELECT 1 FROM \"" + schema + "\".jobs"
            " WHERE attempted_at IS NOT NULL) THEN 3 ELSE 0 END)::text) = ''", 1)
        # The resumed statement takes 0.6 s: a deadline over the whole claim then runs out
        # inside the second statement, before the server's own statement_timeout does.
        slow_after = worker._queries.claim_after.replace(
            "scheduled_at <= now()", "scheduled_at <= now() AND (SELECT pg_sleep(0.6)::text) = ''", 1)
        assert slow != worker._queries.claim and slow_after != worker._queries.claim_after
        worker._queries = dataclasses.replace(worker._queries, claim=slow, claim_after=slow_after)
        async with worker:
            with anyio.move_on_after(8):
                while _unfinished(database_url, schema):
                    await anyio.sleep(0.1)

    anyio.run(main)
    assert sorted(RESUMED_RAN) == [0, 1, 2]
    assert _rows(database_url, schema, "state, attempt") == [("completed", 1)] * 3


class FaultHeld(Job, kind="wf_held", queue="wf_held"):
    pass


HELD_TOLD: dict[str, object] = {}


@FaultHeld.handler
async def wf_held(ctx: JobContext, seconds: float) -> None:
    import anyio

    try:
        await anyio.sleep(seconds)
    finally:  # cancelled when the worker presumes its lease lost
        HELD_TOLD.setdefault("at", time.monotonic())
        HELD_TOLD.setdefault("lease_lost", ctx.lease_lost)


def test_a_handler_is_told_its_lease_is_lost_when_it_runs_out_not_a_beat_later(engine, database_url, schema):
    """Beats that do not extend a lease (here: its row is locked by another session, which
    beats once waited on and now skip) must not let a handler run on past its lease, which
    the rescuer may already have handed to another worker.

    The loss was only noticed when a beat *failed* more than a lease after the last good
    one: with lease 2 s (beats every 0.5 s, each bounded by 1 s) at about 3 s, a second
    after the lease had run out on the server."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo

    HELD_TOLD.clear()
    lease = 2.0
    _add(engine, FaultHeld(seconds=60))

    async def main() -> float:
        async with Worker(database_url, kinds=[FaultHeld], schema=schema, lease=lease, poll_interval=0.2,
                          maintenance_interval=0.1, shutdown_grace=0) as worker:
            with anyio.fail_after(10):
                while not worker.running_jobs():
                    await anyio.sleep(0.02)
            job_id = worker.running_jobs()[0].id
            with psycopg.connect(to_conninfo(database_url)) as locker:
                locker.execute(jobs_sql(schema, "SELECT 1 FROM {jobs} WHERE id = %s FOR UPDATE"), (job_id,))
                locked_at = time.monotonic()  # no beat lands after this
                with anyio.fail_after(10):
                    while "at" not in HELD_TOLD:
                        await anyio.sleep(0.02)
                locker.rollback()
            return locked_at

    locked_at = anyio.run(main)
    assert HELD_TOLD["lease_lost"] is True
    late = float(HELD_TOLD["at"]) - locked_at  # type: ignore[arg-type]
    assert late < lease + 0.35, f"told {late:.2f}s after the last beat could land (lease {lease}s)"


class FaultPlan(Job, kind="wf_plan", queue="wf_plan"):
    pass


@FaultPlan.handler
async def wf_plan(ctx: JobContext, n: int) -> int:
    return n


class _Errors(NullObserver):
    def __init__(self) -> None:
        self.errors: list[str] = []

    def loop_error(self, component: str) -> None:
        self.errors.append(component)


def test_a_claim_function_whose_result_type_changed_is_claimed_again_at_once(engine, database_url, schema, caplog):
    """A schema upgrade that changes the claim function's result columns (v12 did) under a
    running worker: its connection holds the claim prepared for the old function, and
    PostgreSQL refuses to run it again ("cached plan must not change result type", 0A000).
    Before, the producer logged that at WARNING with a traceback, counted a loop error and
    backed off before reconnecting. Here the function is swapped for one returning an
    extra column (the old one renamed, so the claim still works) between two claims."""
    import logging

    import anyio

    from sa_jobs import QueueLimits, Worker, set_queue_limits

    with Session(engine) as session, session.begin():
        set_queue_limits(session, "wf_plan", QueueLimits(concurrency=10))
    first = _add(engine, FaultPlan(n=1))
    observer = _Errors()
    caplog.set_level(logging.INFO, logger="sa_jobs")

    async def main() -> None:
        async with Worker(database_url, kinds=[FaultPlan], schema=schema, lease=30, poll_interval=0.1,
                          maintenance_interval=0.2, observer=observer):
            with anyio.fail_after(10):
                while _unfinished(database_url, schema):
                    await anyio.sleep(0.05)
            args, result = q(database_url, (
                "SELECT pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid) FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname = 'claim_limited'"
            ), (schema,))[0]
            count = len(args.split(","))
            q(database_url, f'ALTER FUNCTION "{schema}".claim_limited({args}) RENAME TO claim_limited_old')
            q(database_url, f'CREATE FUNCTION "{schema}".claim_limited({args}) RETURNS {result[:-1]}, probe integer)'
                            f' LANGUAGE sql AS $$ SELECT f.*, 0 FROM "{schema}".claim_limited_old('
                            + ", ".join(f"${i}" for i in range(1, count + 1)) + ") f $$")
            _add(engine, FaultPlan(n=2))
            with anyio.fail_after(10):
                while _unfinished(database_url, schema):
                    await anyio.sleep(0.05)

    anyio.run(main)
    assert _rows(database_url, schema, "id, state, attempt")[0] == (first[0], "completed", 1)
    assert [r[1:] for r in _rows(database_url, schema, "id, state, attempt")] == [("completed", 1)] * 2
    assert observer.errors == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "claiming again on a new connection" in caplog.text  # the old plan was met, once
    assert caplog.text.count("claiming again") == 1


class FaultSlowClaim(Job, kind="wf_slow_claim", queue="wf_slow_claim"):
    pass


SLOW_CLAIM_TOLD: dict[str, object] = {}


@FaultSlowClaim.handler
async def wf_slow_claim(ctx: JobContext, seconds: float) -> None:
    import anyio

    try:
        await anyio.sleep(seconds)
    finally:  # cancelled when the worker presumes its lease lost
        SLOW_CLAIM_TOLD.setdefault("at", time.time())
        SLOW_CLAIM_TOLD.setdefault("lease_lost", ctx.lease_lost)


def test_a_slow_claim_does_not_stretch_the_lease_the_worker_counts_on(engine, database_url, schema):
    """The claim sets the lease from when its statement starts (now()); the worker counted
    it from when the rows came back. A claim that took 1 s (a long scan, a busy server)
    let a handler whose beats then failed run on a second past its lease, which the
    rescuer may already have handed to another worker. Here the claim sleeps 1 s and no
    beat lands (each sleeps until the server's statement_timeout cancels it)."""
    import dataclasses

    import anyio

    from sa_jobs import Worker

    SLOW_CLAIM_TOLD.clear()
    lease = 2.0
    _add(engine, FaultSlowClaim(seconds=60))

    async def main() -> float:
        worker = Worker(database_url, kinds=[FaultSlowClaim], schema=schema, lease=lease, poll_interval=0.2,
                        maintenance_interval=0.1, shutdown_grace=0)
        queries = worker._queries
        slow = queries.claim.replace("scheduled_at <= now()", "scheduled_at <= now() AND (SELECT pg_sleep(1.0)::text) = ''", 1)
        stuck = queries.heartbeat_many.replace(" WHERE ", " WHERE (SELECT pg_sleep(30)::text) = '' AND ", 1)
        assert slow != queries.claim and stuck != queries.heartbeat_many
        worker._queries = dataclasses.replace(queries, claim=slow, heartbeat_many=stuck)
        async with worker:
            with anyio.fail_after(10):
                while not worker.running_jobs():
                    await anyio.sleep(0.01)
            # No beat extends it: this is the lease the database holds the worker to.
            expires = _rows(database_url, schema, "extract(epoch FROM lease_expires_at)::float8")[0][0]
            with anyio.fail_after(10):
                while "at" not in SLOW_CLAIM_TOLD:
                    await anyio.sleep(0.02)
        return expires

    expires = anyio.run(main)
    assert SLOW_CLAIM_TOLD["lease_lost"] is True
    late = float(SLOW_CLAIM_TOLD["at"]) - expires  # type: ignore[arg-type]
    assert late < 0.35, f"told {late:.2f}s after the lease ran out in the database (lease {lease}s)"


class FaultNeighbour(Job, kind="wf_neighbour", queue="wf_neighbour"):
    pass


@FaultNeighbour.handler
async def wf_neighbour(ctx: JobContext, seconds: float) -> int:
    import anyio

    await anyio.sleep(seconds)
    return ctx.attempt


def _run_two_with_a_lock_taken(database_url: str, schema: str, lease: float, lock: Callable[[], None]) -> None:
    """A worker runs two FaultNeighbour jobs; once both run, ``lock()`` (in a thread) takes
    and holds a lock on one; then wait (15 s at most) until one job alone is unfinished
    (the cancelled one counts as unfinished)."""
    import anyio

    from sa_jobs import Worker

    async def main() -> None:
        async with Worker(database_url, kinds=[FaultNeighbour], schema=schema, lease=lease, poll_interval=0.2,
                          maintenance_interval=0.1, shutdown_grace=0) as worker:
            with anyio.fail_after(10):
                while len(worker.running_jobs()) < 2:
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(lock)
            with anyio.move_on_after(15):
                while _unfinished(database_url, schema) > 1:
                    await anyio.sleep(0.1)

    anyio.run(main)


def test_a_row_lock_on_one_running_job_costs_no_other_job_its_lease(engine, database_url, schema):
    """cancel() of a running job in a transaction the caller keeps open (it goes on with
    its own work before committing, as the docs allow) holds that job's row lock. The
    worker's one heartbeat statement for all of its jobs waited on that lock, so no lease
    of the worker was extended: every other job it ran was presumed lost and re-run by
    the rescuer (attempt 2, a LeaseExpired error), though nothing was wrong with it."""
    from sa_jobs import cancel

    lease = 2.0
    locked_id, other_id = _add(engine, FaultNeighbour(seconds=60), FaultNeighbour(seconds=5))

    def cancel_and_linger() -> None:
        with Session(engine) as session, session.begin():
            assert cancel(session, locked_id) == "running"
            time.sleep(2 * lease)  # the caller's own work, before its commit

    _run_two_with_a_lock_taken(database_url, schema, lease, cancel_and_linger)
    rows = dict((r[0], r[1:]) for r in _rows(database_url, schema, "id, state, attempt, jsonb_array_length(errors)"))
    assert rows[locked_id] == ("cancelled", 1, 0)
    assert rows[other_id] == ("completed", 1, 0), "the other job lost its lease to a lock on a row not its own"


def test_a_row_lock_on_one_finished_job_holds_back_no_other_outcome(engine, database_url, schema):
    """The same lock (a cancel() not yet committed) on a job whose handler then returns:
    the completer's one statement per batch waited on that row until its deadline, and was
    retried whole, waiting again, for as long as the lock lasted. No other outcome of the
    worker landed meanwhile, and those jobs, no longer heartbeated once finished, ran out
    their leases and were re-run by the rescuer."""
    from sa_jobs import cancel

    lease = 2.0
    locked_id, other_id = _add(engine, FaultNeighbour(seconds=1.0), FaultNeighbour(seconds=1.5))
    landed: dict[str, float] = {}

    def cancel_and_linger() -> None:
        with Session(engine) as session, session.begin():
            assert cancel(session, locked_id) == "running"
            deadline = time.monotonic() + 3 * lease  # the caller's own work, before its commit
            while time.monotonic() < deadline:
                state = q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (other_id,))
                if state[0][0] == "completed":
                    landed.setdefault("other", time.monotonic())
                time.sleep(0.05)

    _run_two_with_a_lock_taken(database_url, schema, lease, cancel_and_linger)
    rows = dict((r[0], r[1:]) for r in _rows(database_url, schema, "id, state, attempt, jsonb_array_length(errors)"))
    assert rows[locked_id] == ("cancelled", 1, 0)  # its completion, written after the commit, is fenced off
    assert rows[other_id] == ("completed", 1, 0), "the other job's outcome waited behind a lock on a row not its own"
    assert "other" in landed, "the other job's outcome landed only once the lock was gone"


class FaultRestart(Job, kind="wf_restart", queue="wf_restart", max_attempts=2):
    pass


RESTART_RUNS: dict[int, str] = {}


@FaultRestart.handler
async def wf_restart(ctx: JobContext) -> int:
    import anyio

    RESTART_RUNS[ctx.attempt] = "started"
    await anyio.sleep(60 if ctx.attempt == 1 else 2.0)  # the first run is cancelled
    RESTART_RUNS[ctx.attempt] = "returned"
    return ctx.attempt


def test_a_late_cancel_notice_does_not_cancel_the_retry_of_the_job_it_named(engine, database_url, schema):
    """A job cancelled while running and retried at once ("restart"): the worker hears of
    the cancel through a NOTIFY on its listener connection, which comes at no fixed time
    against its claims on another connection. A notice heard once the retry was claimed
    cancelled the retry's handler (the notice names the job, not the run), and the worker
    wrote nothing, taking the row for final: it stayed running until its lease ran out,
    and the rescuer ended it dead ("LeaseExpired: the worker stopped heartbeating") with
    its one attempt left spent, without a run. Here the notice is sent again by hand, as
    it would arrive late."""
    import anyio

    from sa_jobs import Worker, cancel, retry
    from sa_jobs.queries import cancel_channel_name

    RESTART_RUNS.clear()
    (job_id,) = _add(engine, FaultRestart())

    async def main() -> None:
        async with Worker(database_url, kinds=[FaultRestart], schema=schema, lease=2.0, poll_interval=0.2,
                          maintenance_interval=0.1, shutdown_grace=0) as worker:
            with anyio.fail_after(10):
                while 1 not in RESTART_RUNS:
                    await anyio.sleep(0.02)
            with Session(engine) as session, session.begin():
                assert cancel(session, job_id) == "running"
            with anyio.fail_after(10):
                while worker.running_jobs():
                    await anyio.sleep(0.02)
            with Session(engine) as session, session.begin():
                retry(session, job_id)
            with anyio.fail_after(10):
                while 2 not in RESTART_RUNS:
                    await anyio.sleep(0.02)
            q(database_url, "SELECT pg_notify(%s, %s)", (cancel_channel_name(schema), str(job_id)))
            with anyio.move_on_after(10):
                while _unfinished(database_url, schema):
                    await anyio.sleep(0.1)

    anyio.run(main)
    assert _rows(database_url, schema, "state, attempt, jsonb_array_length(errors)") == [("completed", 2, 0)]
    assert RESTART_RUNS == {1: "started", 2: "returned"}


class FaultStaggered(Job, kind="wf_staggered", queue="wf_staggered"):
    pass


STAGGERED_TOLD: dict[int, tuple[float, bool]] = {}


@FaultStaggered.handler
async def wf_staggered(ctx: JobContext) -> None:
    import anyio

    try:
        await anyio.sleep(60)
    finally:  # cancelled when the worker presumes its lease lost
        STAGGERED_TOLD.setdefault(ctx.id, (time.time(), ctx.lease_lost))


def test_each_handler_is_told_its_lease_is_lost_by_the_time_it_runs_out(engine, database_url, schema):
    """No beat lands (each hangs until the server's statement_timeout cancels it). The
    watchdog looked at the leases every lease/20 (1.5 s with the default 30 s lease): a
    handler learnt of its loss up to that long after its lease had run out in the
    database, while the rescuer could already have handed its job to another worker.
    Jobs claimed at different moments each run out at their own time; each is told then
    (here within 0.1 s, where the watchdog's look every 0.3 s missed most)."""
    import dataclasses

    import anyio

    from sa_jobs import Worker

    STAGGERED_TOLD.clear()
    lease = 6.0

    async def main() -> dict[int, float]:
        worker = Worker(database_url, kinds=[FaultStaggered], schema=schema, lease=lease, poll_interval=0.05,
                        maintenance_interval=0.1, shutdown_grace=0)
        queries = worker._queries
        stuck = queries.heartbeat_many.replace(" WHERE ", " WHERE (SELECT pg_sleep(30)::text) = '' AND ", 1)
        assert stuck != queries.heartbeat_many
        worker._queries = dataclasses.replace(queries, heartbeat_many=stuck)
        async with worker:
            for _ in range(4):  # claimed about 0.13 s apart
                _add(engine, FaultStaggered())
                await anyio.sleep(0.13)
            with anyio.fail_after(5):
                while len(worker.running_jobs()) < 4:
                    await anyio.sleep(0.01)
            # No beat extends them: these are the leases the database holds the worker to.
            expires = dict(_rows(database_url, schema, "id, extract(epoch FROM lease_expires_at)::float8"))
            with anyio.fail_after(2 * lease):
                while len(STAGGERED_TOLD) < 4:
                    await anyio.sleep(0.02)
        return expires

    expires = anyio.run(main)
    assert all(lost for _, lost in STAGGERED_TOLD.values())
    late = {job_id: round(STAGGERED_TOLD[job_id][0] - at, 3) for job_id, at in expires.items()}
    assert max(late.values()) < 0.1, f"told this long after each lease ran out in the database: {late}"


class FaultUniqueDone(Job, kind="wf_unique_done", queue="wf_unique_done",
                      unique=Unique(by=("n",), states=("available", "scheduled", "retryable", "completed"))):
    pass


@FaultUniqueDone.handler
async def wf_unique_done(ctx: JobContext, n: int, seconds: float) -> int:
    import anyio

    await anyio.sleep(seconds)
    return n


def test_a_completion_waiting_on_a_uniquely_keyed_insert_holds_back_no_other_outcome(engine, database_url, schema):
    """A unique job whose key 'completed' holds (and 'running' does not) finishes while an
    app's open transaction has enqueued another job of that key: its completion waits on
    that transaction (the unique index cannot tell yet whether the key is taken). With
    the whole batch: no other outcome of the worker landed while the transaction lasted,
    and those jobs ran out their leases and ran again."""
    import anyio

    from sa_jobs import Worker

    lease = 4.0
    keyed_id, other_id = _add(engine, FaultUniqueDone(n=1, seconds=1.0), FaultNeighbour(seconds=1.5))

    def enqueue_and_linger() -> None:
        with Session(engine) as session, session.begin():
            session.add(FaultUniqueDone(n=1, seconds=0.0))
            session.flush()
            time.sleep(2 * lease)  # the caller's own work, before its commit

    async def main() -> None:
        async with Worker(database_url, kinds=[FaultUniqueDone, FaultNeighbour], schema=schema, lease=lease,
                          poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=0) as worker:
            with anyio.fail_after(10):
                while len(worker.running_jobs()) < 2:
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(enqueue_and_linger)
            with anyio.move_on_after(15):
                while _unfinished(database_url, schema):
                    await anyio.sleep(0.1)

    anyio.run(main)
    rows = dict((r[0], r[1:]) for r in _rows(database_url, schema, "id, state, attempt, jsonb_array_length(errors)"))
    assert rows[other_id] == ("completed", 1, 0), "the other job's outcome waited behind another job's unique key"
    assert rows[keyed_id] == ("completed", 1, 0)


def test_a_completion_waiting_on_another_transaction_keeps_its_lease(engine, database_url, schema):
    """A job whose handler finished and whose outcome waits on another transaction (here an
    app's uncommitted insert of its unique key) belongs to a live worker: its lease is kept
    until the outcome lands. Before, the heartbeat left it out once its handler returned:
    the lease ran out under a lock longer than it, and once the app committed the rescuer
    could re-drive the job (LeaseExpired, "the worker stopped heartbeating") before the
    completer's retry, backing off, wrote it: a second run (CI: attempt 2), or dead if the
    app's job held the key by then."""
    import anyio

    from sa_jobs import Worker

    lease = 2.0
    (keyed_id,) = _add(engine, FaultUniqueDone(n=1, seconds=0.3))
    lease_left = jobs_sql(schema, "SELECT state, extract(epoch FROM lease_expires_at - now()) FROM {jobs} WHERE id = %s")
    seen: list[tuple[str, float]] = []

    def enqueue_and_linger() -> None:
        with Session(engine) as session, session.begin():
            session.add(FaultUniqueDone(n=1, seconds=0.0))
            session.flush()
            ends = time.monotonic() + 2.5 * lease  # the caller's own work, before its commit
            while time.monotonic() < ends:
                seen.append(q(database_url, lease_left, (keyed_id,))[0])
                time.sleep(0.1)

    async def main() -> None:
        async with Worker(database_url, kinds=[FaultUniqueDone], schema=schema, lease=lease,
                          poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=0) as worker:
            with anyio.fail_after(10):
                while not worker.running_jobs():
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(enqueue_and_linger)
            with anyio.move_on_after(10):
                while _unfinished(database_url, schema):
                    await anyio.sleep(0.1)

    anyio.run(main)
    assert {state for state, _ in seen} == {"running"}, seen  # its completion waited throughout
    expired = [left for _, left in seen if left <= 0]
    assert not expired, f"the live worker let the lease run out while the outcome waited: {seen}"
    rows = dict((r[0], r[1:]) for r in _rows(database_url, schema, "id, state, attempt, jsonb_array_length(errors)"))
    assert rows[keyed_id] == ("completed", 1, 0)


def _neighbour_beside_an_open_keyed_insert(database_url: str, schema: str, states: list[str],
                                           other_id: int) -> tuple[str, int]:
    """Run a worker for job ``other_id`` (up to 6 s) while an app's open transaction has
    inserted a ``wf_unique_done`` job of key k1 (held in ``states``); its (state, attempt)."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo

    with psycopg.connect(to_conninfo(database_url)) as app:  # its transaction stays open
        app.execute(jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, args, unique_key, unique_states)"
                                     " VALUES ('wf_unique_done', 'wf_unique_done', %s, 'k1', %s)"),
                    ('{"n": 1, "seconds": 0}', states))

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultNeighbour], schema=schema, lease=4.0, poll_interval=0.2,
                              maintenance_interval=0.1, shutdown_grace=0):
                with anyio.move_on_after(6):
                    while q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"),
                            (other_id,))[0][0] != "completed":
                        await anyio.sleep(0.1)

        anyio.run(main)
        other = q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs} WHERE id = %s"), (other_id,))[0]
        app.rollback()
    return other


def test_a_rescue_waiting_on_a_uniquely_keyed_insert_holds_back_no_other_rescue(engine, database_url, schema):
    """A unique job whose worker died (its lease ran out), whose key 'retryable' holds,
    while an app's open transaction has enqueued another job of that key: rescuing it
    waits on that transaction (the unique index cannot tell yet whether the key is
    taken). The rescue is one statement for every expired job, on every worker: none was
    rescued while the transaction lasted (each tick ran into its deadline, and dropped
    leadership), so every other job of a dead worker waited too."""
    states = ["available", "scheduled", "retryable", "completed"]
    expired = ("INSERT INTO {jobs} (kind, queue, state, attempt, claim_token, lease_expires_at, args, unique_key,"
               " unique_states) VALUES (%s, %s, 'running', 1, gen_random_uuid(), now() - interval '1 second', %s, %s, %s)"
               " RETURNING id")
    (keyed_id,) = q(database_url, jobs_sql(schema, expired), ("wf_unique_done", "wf_unique_done",
                                                              '{"n": 1, "seconds": 0}', "k1", states))[0]
    (other_id,) = q(database_url, jobs_sql(schema, expired), ("wf_neighbour", "wf_neighbour", '{"seconds": 0}',
                                                              None, None))[0]
    other = _neighbour_beside_an_open_keyed_insert(database_url, schema, states, other_id)
    assert other == ("completed", 2), "no expired job was rescued while one of them waited on a unique key"


def test_a_promotion_waiting_on_a_uniquely_keyed_insert_holds_back_no_other_promotion(engine, database_url, schema):
    """The same wait in the promotion: a due unique job whose key 'available' holds, while
    an app's open transaction has enqueued another job of that key. The promotion is one
    statement for every due job, on every worker: no job of any kind became available
    while the transaction lasted (each tick ran into its deadline)."""
    states = ["available"]  # the due job does not hold its key now; once available, it would
    due = ("INSERT INTO {jobs} (kind, queue, state, scheduled_at, args, unique_key, unique_states)"
           " VALUES (%s, %s, 'scheduled', now(), %s, %s, %s) RETURNING id")
    q(database_url, jobs_sql(schema, due), ("wf_unique_done", "wf_unique_done", '{"n": 1, "seconds": 0}', "k1", states))
    (other_id,) = q(database_url, jobs_sql(schema, due), ("wf_neighbour", "wf_neighbour", '{"seconds": 0}', None, None))[0]
    other = _neighbour_beside_an_open_keyed_insert(database_url, schema, states, other_id)
    assert other == ("completed", 1), "no due job was promoted while one of them waited on a unique key"


class FaultLockedOutcome(Job, kind="wf_locked_outcome", queue="wf_locked_outcome"):
    pass


LOCKED_OUTCOME_RUNS: list[int] = []
LOCKED_OUTCOME_GO: list[bool] = []


@FaultLockedOutcome.handler
async def wf_locked_outcome(ctx: JobContext) -> int:
    import anyio

    LOCKED_OUTCOME_RUNS.append(ctx.attempt)
    while ctx.attempt == 1 and not LOCKED_OUTCOME_GO:  # returns once the test holds its row locked
        await anyio.sleep(0.01)
    return ctx.attempt


def test_an_outcome_kept_behind_a_row_lock_longer_than_the_lease_is_not_run_again(engine, database_url, schema):
    """A job's handler returned while an app's transaction held its row locked (a cancel()
    it then rolled back, a SELECT ... FOR UPDATE) for longer than the lease. The worker
    keeps the outcome and, as documented, the job its lease "however long that transaction
    lasts"; but neither the heartbeat nor the completer can extend a lease through the lock
    (they skip locked rows), so the lease ran out under it, and when the lock went the
    rescuer (SKIP LOCKED, any worker's tick) found the row free and expired before the
    completer's retry (backing off up to 1 s): the finished job ran again. Here the test
    runs the rescue itself the moment the lock goes, as a tick of any worker may."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo
    from sa_jobs.queries import Queries

    LOCKED_OUTCOME_RUNS.clear()
    LOCKED_OUTCOME_GO.clear()
    lease = 2.0
    [job_id] = _add(engine, FaultLockedOutcome())
    lock = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    rescue = Queries.for_schema(schema).rescue_expired
    rescued: list[tuple] = []

    with psycopg.connect(to_conninfo(database_url)) as locker, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as rescuer:

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultLockedOutcome], schema=schema, lease=lease,
                              poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=5) as worker:
                with anyio.fail_after(10):
                    while not LOCKED_OUTCOME_RUNS:
                        await anyio.sleep(0.01)
                assert locker.execute(lock, (job_id,)).fetchone() == ("running",)
                LOCKED_OUTCOME_GO.append(True)
                with anyio.fail_after(10):
                    while worker.completer is None or not worker.completer.awaiting():
                        await anyio.sleep(0.01)
                await anyio.sleep(1.5 * lease)  # the app's transaction outlasts the lease
                locker.rollback()  # ... and ends without changing the row
                rescued.extend(rescuer.execute(rescue, {"limit": 100}).fetchall())
                with anyio.fail_after(15):
                    while _unfinished(database_url, schema):
                        await anyio.sleep(0.05)

        anyio.run(main)
    assert rescued == [], "the rescuer re-drove a job whose live worker held its outcome"
    assert _rows(database_url, schema, "state, attempt, jsonb_array_length(errors)") == [("completed", 1, 0)]
    assert LOCKED_OUTCOME_RUNS == [1]


class FaultCancelInTx(Job, kind="wf_cancel_in_tx", queue="wf_cancel_in_tx"):
    pass


CANCEL_IN_TX: dict[str, object] = {}


@FaultCancelInTx.handler
def wf_cancel_in_tx(ctx: JobContext) -> None:
    from sa_jobs import cancel

    try:
        with ctx.transaction(result="done") as session:
            session.execute(text("SELECT 1"))
            # The app cancels the job, committed, as the block ends: its notice not yet heard.
            with Session(CANCEL_IN_TX["engine"]) as other, other.begin():  # type: ignore[arg-type]
                assert cancel(other, ctx.id) == "running"
    except BaseException as exc:
        CANCEL_IN_TX["raised"] = type(exc).__name__
        raise


def test_a_transactional_completion_refused_by_a_cancel_counts_as_cancelled(engine, database_url, schema):
    """cancel() committed while a sync handler's ctx.transaction() was open, before the
    worker heard its notice: the completion's fence refused the commit, and the worker
    took that for a lost lease (LeaseLostError into the handler, the attempt counted
    lease_lost, as if another worker had taken the job over), where the completer counts
    an outcome fenced off by a cancel under its own claim as cancelled, and the notifier
    would have. Here the notifier's look-up is slowed so that the handler always ends first."""
    import dataclasses

    import anyio

    from sa_jobs import Worker

    class Labels(NullObserver):
        def __init__(self) -> None:
            self.labels: list[str] = []

        def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since: float) -> None:
            self.labels.append(outcome)

    CANCEL_IN_TX.clear()
    CANCEL_IN_TX["engine"] = engine
    [job_id] = _add(engine, FaultCancelInTx())
    observer = Labels()

    async def main() -> None:
        worker = Worker(database_url, kinds=[FaultCancelInTx], schema=schema, lease=5, poll_interval=0.2,
                        maintenance_interval=0.1, shutdown_grace=5, observer=observer)
        queries = worker._queries
        slow = queries.claims_of.replace(" WHERE ", " WHERE (SELECT pg_sleep(2)::text) = '' AND ", 1)
        assert slow != queries.claims_of
        worker._queries = dataclasses.replace(queries, claims_of=slow)
        async with worker:
            with anyio.fail_after(15):
                while not observer.labels:
                    await anyio.sleep(0.02)

    anyio.run(main)
    assert _rows(database_url, schema, "id, state") == [(job_id, "cancelled")]
    assert observer.labels == ["cancelled"]
    assert CANCEL_IN_TX["raised"] != "LeaseLostError"


class FaultCommitAfterRelease(Job, kind="wf_commit_after_release", queue="wf_commit_after_release"):
    pass


COMMIT_AFTER_RELEASE: dict[str, object] = {}


@FaultCommitAfterRelease.handler
def wf_commit_after_release(ctx: JobContext) -> None:
    with ctx.transaction(result="done") as session:
        session.execute(text("SELECT 1"))


def test_a_transactional_completion_committed_after_the_release_counts_as_completed(engine, database_url, schema):
    """The worker was told to stop at once (release_running()) while a sync handler's
    ctx.transaction() had written its completion and not yet committed it. The release,
    written after the commit, was fenced off (the row completed under this claim), and
    the attempt counted lease_lost, as if another worker had taken the job over, though
    this attempt completed it. The handler's COMMIT is held here until the release."""
    import threading

    import anyio
    from sqlalchemy import event

    from sa_jobs import Worker

    class Labels(NullObserver):
        def __init__(self) -> None:
            self.labels: list[str] = []

        def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since: float) -> None:
            self.labels.append(outcome)

    committing, released = threading.Event(), threading.Event()

    def hold_commit(conn: Any) -> None:
        committing.set()
        released.wait(10)

    [job_id] = _add(engine, FaultCommitAfterRelease())
    observer = Labels()
    event.listen(engine, "commit", hold_commit)
    try:
        async def main() -> None:
            worker = Worker(database_url, kinds=[FaultCommitAfterRelease], schema=schema, lease=5,
                            poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=5, observer=observer,
                            engine=engine)
            async with worker:
                with anyio.fail_after(10):
                    while not committing.is_set():
                        await anyio.sleep(0.01)
                worker.release_running()
                released.set()
                with anyio.fail_after(10):
                    while not observer.labels:
                        await anyio.sleep(0.01)

        anyio.run(main)
    finally:
        event.remove(engine, "commit", hold_commit)
        released.set()
    assert _rows(database_url, schema, "id, state, attempt") == [(job_id, "completed", 1)]
    assert observer.labels == ["completed"]


class FaultLockedPair(Job, kind="wf_locked_pair", queue="wf_locked_pair"):
    pass


LOCKED_PAIR_RUNS: list[tuple[int, int]] = []
LOCKED_PAIR_GO: set[int] = set()


@FaultLockedPair.handler
async def wf_locked_pair(ctx: JobContext, n: int) -> int:
    import anyio

    LOCKED_PAIR_RUNS.append((n, ctx.attempt))
    while ctx.attempt == 1 and n not in LOCKED_PAIR_GO:  # returns once the test says so
        await anyio.sleep(0.01)
    return n


def _keepers(database_url: str, schema: str, waiting: bool = False) -> int:
    """The lease keepers' sessions whose last statement named ``schema``'s jobs (waiting on a lock)."""
    return q(database_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sa_jobs:lease-keeper'"
                           " AND position(%s in query) > 0 AND (NOT %s OR wait_event_type = 'Lock')",
             (f'"{schema}"', waiting))[0][0]


def test_two_outcomes_kept_behind_row_locks_longer_than_the_lease_are_not_run_again(engine, database_url, schema):
    """Two jobs' handlers returned while two app transactions held their rows locked, the
    first for longer than the second, both past the lease. The lease keeper waited on one
    row at a time, its statement queued on the first for as long as that lock lasted
    (re-queued at each statement_timeout), so the second job's lease was never extended
    through its lock: when that lock went, the rescuer took the row and the finished job
    ran again."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo
    from sa_jobs.queries import Queries

    LOCKED_PAIR_RUNS.clear()
    LOCKED_PAIR_GO.clear()
    lease = 2.0
    first, second = _add(engine, FaultLockedPair(n=1), FaultLockedPair(n=2))
    lock = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    rescue = Queries.for_schema(schema).rescue_expired
    rescued: list[tuple] = []

    with psycopg.connect(to_conninfo(database_url)) as locker1, psycopg.connect(to_conninfo(database_url)) as locker2, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as rescuer:

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultLockedPair], schema=schema, lease=lease, concurrency=2,
                              poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=5) as worker:
                await until(lambda: len(LOCKED_PAIR_RUNS) == 2)
                assert locker1.execute(lock, (first,)).fetchone() == ("running",)
                assert locker2.execute(lock, (second,)).fetchone() == ("running",)

                def waiting() -> set[int]:
                    return {j.id for j in worker.completer.awaiting()} if worker.completer else set()

                LOCKED_PAIR_GO.add(1)
                await until(lambda: waiting() == {first})
                await until(lambda: _keepers(database_url, schema, waiting=True) > 0)  # the keeper waits on the first row
                LOCKED_PAIR_GO.add(2)
                await until(lambda: waiting() == {first, second})
                await anyio.sleep(1.5 * lease)  # both app transactions outlast the lease
                locker2.rollback()  # the second ends first, without changing the row
                rescued.extend(rescuer.execute(rescue, {"limit": 100}).fetchall())
                await anyio.sleep(0.5 * lease)
                locker1.rollback()
                rescued.extend(rescuer.execute(rescue, {"limit": 100}).fetchall())
                await until(lambda: not _unfinished(database_url, schema), 15)
                # The keepers' connections close once their outcomes landed (the worker runs on).
                await until(lambda: _keepers(database_url, schema) == 0, 5)

        anyio.run(main)
    assert rescued == [], "the rescuer re-drove a job whose live worker held its outcome"
    assert _rows(database_url, schema, "state, attempt, result") == [("completed", 1, 1), ("completed", 1, 2)]
    assert sorted(LOCKED_PAIR_RUNS) == [(1, 1), (2, 1)]


def test_more_outcomes_kept_behind_row_locks_than_lease_keepers_are_not_run_again(engine, database_url, schema):
    """MAX_KEEPERS + 1 jobs' handlers returned while one app transaction held their rows
    locked past the lease. The lease keeper waits for each kept outcome's row lock on a
    connection of its own, at most MAX_KEEPERS at once: the job beyond them had nothing
    queued on its row, and when the transaction ended the rescuer took it at once (its
    lease long run out), before the completer's retry: the finished job ran again."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo
    from sa_jobs.queries import Queries
    from sa_jobs.worker.heartbeat import MAX_KEEPERS

    LOCKED_PAIR_RUNS.clear()
    LOCKED_PAIR_GO.clear()
    lease, many = 2.0, MAX_KEEPERS + 1
    ids = _add(engine, *(FaultLockedPair(n=n) for n in range(1, many + 1)))
    lock = jobs_sql(schema, "SELECT id FROM {jobs} WHERE id = ANY(%s) AND state = 'running' FOR UPDATE")
    rescue = Queries.for_schema(schema).rescue_expired
    rescued: list[tuple] = []

    with psycopg.connect(to_conninfo(database_url)) as locker, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as rescuer:

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultLockedPair], schema=schema, lease=lease, concurrency=many,
                              poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=5) as worker:
                await until(lambda: len(LOCKED_PAIR_RUNS) == many)
                assert len(locker.execute(lock, (ids,)).fetchall()) == many
                LOCKED_PAIR_GO.update(range(1, many + 1))
                await until(lambda: worker.completer is not None and len(worker.completer.awaiting()) == many)
                await anyio.sleep(1.5 * lease)  # the app's transaction outlasts the lease
                locker.rollback()  # ... and ends without changing the rows
                rescued.extend(rescuer.execute(rescue, {"limit": 100}).fetchall())
                await until(lambda: not _unfinished(database_url, schema), 15)
                # Nothing kept any more: the claims are let go, their connection closed.
                await until(lambda: not q(database_url, "SELECT count(*) FROM pg_stat_activity"
                                                        " WHERE application_name = 'sa_jobs:lease-guard'")[0][0], 5)

        anyio.run(main)
    assert rescued == [], "the rescuer re-drove a job whose live worker held its outcome"
    assert _rows(database_url, schema, "state, attempt") == [("completed", 1)] * many
    assert sorted(LOCKED_PAIR_RUNS) == [(n, 1) for n in range(1, many + 1)]


def test_a_frozen_workers_kept_outcome_is_rescued_once_its_claim_lapses(engine, database_url, schema):
    """The other side of the kept claims (Heartbeat._guard_kept): the rescue passes over a
    kept outcome's job only while its worker lives. A frozen worker (its event loop held
    here, as SIGSTOP holds a process: its socket stays up) sends nothing; its claims'
    session ends once idle for a lease, and the job is rescued as a dead worker's is."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo
    from sa_jobs.queries import Queries

    if int(q(database_url, "SHOW server_version_num")[0][0]) < 140000:
        pytest.skip("idle_session_timeout came with PostgreSQL 14")
    LOCKED_PAIR_RUNS.clear()
    LOCKED_PAIR_GO.clear()
    lease = 2.0
    [job_id] = _add(engine, FaultLockedPair(n=1))
    lock = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    rescue = Queries.for_schema(schema).rescue_expired
    claims_held = ("SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
                   " WHERE l.locktype = 'advisory' AND a.application_name = 'sa_jobs:lease-guard'")
    rescued: list[tuple] = []

    with psycopg.connect(to_conninfo(database_url)) as locker, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as rescuer:

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultLockedPair], schema=schema, lease=lease,
                              poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=1):
                with anyio.fail_after(10):
                    while not LOCKED_PAIR_RUNS:
                        await anyio.sleep(0.01)
                assert locker.execute(lock, (job_id,)).fetchone() == ("running",)
                LOCKED_PAIR_GO.add(1)
                with anyio.fail_after(10):
                    while not q(database_url, claims_held)[0][0]:
                        await anyio.sleep(0.01)
                time.sleep(2.5 * lease)  # frozen: past the lease, and its claims' idle limit
                locker.rollback()
                rescued.extend(rescuer.execute(rescue, {"limit": 100}).fetchall())

        anyio.run(main)
    assert [row[:2] for row in rescued] == [(job_id, "retryable")]


def test_a_stop_while_the_lease_keeper_waits_on_a_row_lock_is_prompt_and_leaves_no_waiter(engine, database_url, schema):
    """A worker stopped while its lease keeper's statement waited on an app's row lock:
    the stop must not wait for that lock, and no statement of the gone worker may stay
    queued on the row (it would extend the lease once the lock goes, and hold off the
    rescue of a job no worker holds any more)."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo

    LOCKED_PAIR_RUNS.clear()
    LOCKED_PAIR_GO.clear()
    lease = 2.0
    [job_id] = _add(engine, FaultLockedPair(n=1))
    lock = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    lease_of = jobs_sql(schema, "SELECT lease_expires_at FROM {jobs} WHERE id = %s")
    stopped: list[float] = []

    with psycopg.connect(to_conninfo(database_url)) as locker:

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultLockedPair], schema=schema, lease=lease,
                              poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=1) as worker:
                with anyio.fail_after(10):
                    while not LOCKED_PAIR_RUNS:
                        await anyio.sleep(0.01)
                assert locker.execute(lock, (job_id,)).fetchone() == ("running",)
                LOCKED_PAIR_GO.add(1)
                with anyio.fail_after(10):
                    while not _keepers(database_url, schema, waiting=True):
                        await anyio.sleep(0.01)
                assert {j.id for j in worker.completer.awaiting()} == {job_id}
                stopped.append(time.monotonic())
            stopped.append(time.monotonic())

        anyio.run(main)
        assert stopped[1] - stopped[0] < 5, "the stop waited for the lock"
        deadline = time.monotonic() + 5
        while _keepers(database_url, schema):
            assert time.monotonic() < deadline, "a lease keeper's statement outlived its worker"
            time.sleep(0.05)
        before = q(database_url, lease_of, (job_id,))[0][0]
        locker.rollback()
    assert q(database_url, lease_of, (job_id,))[0][0] == before


def _claim_holder(database_url: str, schema: str, job_id: int) -> Any:
    """The (pid, query_start) of the session holding ``job_id``'s kept claim (queries._kept_key), or None."""
    rows = q(database_url, "SELECT l.pid, a.query_start FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
                           " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                           " AND l.classid = hashtext('sa_jobs.kept.' || %s)::oid AND l.objid = %s::oid",
             (f"{schema}_jobs_inserted", job_id))
    return rows[0] if rows else None


def test_a_kept_claim_whose_session_was_ended_is_taken_again_at_once(engine, database_url, schema):
    """The session holding the kept outcomes' claims (Heartbeat._guard_kept) was ended by
    the server (pg_terminate_backend here; a restart, a failover, a pooler or an admin
    alike) while an app's transaction held the job's row locked past its lease. Its locks
    went with it, but the worker learnt of it only at its next statement on that session,
    an alive check up to a heartbeat interval (a quarter of the lease) later: all that
    while, the rescue of any worker could re-drive the finished job the moment the row
    lock went. The lease keeper queued on the row is ended too (it queues again only an
    interval later), and the app's transaction lets the lease run out under its lock."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo
    from sa_jobs.queries import Queries

    LOCKED_PAIR_RUNS.clear()
    LOCKED_PAIR_GO.clear()
    lease = 8.0  # a heartbeat interval of 2 s
    [job_id] = _add(engine, FaultLockedPair(n=1))
    lock = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    run_out = jobs_sql(schema, "UPDATE {jobs} SET lease_expires_at = now() - interval '1 second' WHERE id = %s")
    rescue = Queries.for_schema(schema).rescue_expired
    rescued: list[tuple] = []

    with psycopg.connect(to_conninfo(database_url)) as locker, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as admin:

        def end_keepers_and_guard(guard_pid: int) -> None:
            """End the guard's session, and the lease keepers' queued behind the locker."""
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s"
                          " OR (application_name = 'sa_jobs:lease-keeper' AND %s = ANY(pg_blocking_pids(pid)))",
                          (guard_pid, locker.info.backend_pid))

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultLockedPair], schema=schema, lease=lease,
                              poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=5) as worker:
                await until(lambda: LOCKED_PAIR_RUNS)
                assert locker.execute(lock, (job_id,)).fetchone() == ("running",)
                LOCKED_PAIR_GO.add(1)
                await until(lambda: worker.completer is not None and worker.completer.awaiting())
                await until(lambda: _claim_holder(database_url, schema, job_id) is not None)
                await until(lambda: _keepers(database_url, schema, waiting=True) > 0)
                # Just after the guard's alive check: the next one is an interval away.
                pid, sent = _claim_holder(database_url, schema, job_id)
                await until(lambda: _claim_holder(database_url, schema, job_id)[1] != sent, 5)
                end_keepers_and_guard(pid)
                try:
                    await until(lambda: (_claim_holder(database_url, schema, job_id) or (pid,))[0] != pid, 1.0)
                except TimeoutError:
                    raise AssertionError("the kept claim was not taken again within 1 s of its session's end")
                locker.execute(run_out, (job_id,))  # the lease ran out under the app's lock ...
                locker.commit()  # ... which goes
                rescued.extend(rescuer_rows := admin.execute(rescue, {"limit": 100}).fetchall())
                assert not rescuer_rows
                await until(lambda: not _unfinished(database_url, schema), 15)

        anyio.run(main)
    assert rescued == [], "the rescuer re-drove a job whose live worker held its outcome"
    assert _rows(database_url, schema, "state, attempt, result") == [("completed", 1, 1)]
    assert LOCKED_PAIR_RUNS == [(1, 1)]


@pytest.mark.parametrize("stop", ["graceful", "cancelled"])
def test_a_worker_stopped_while_it_keeps_an_outcome_lets_its_claim_go(engine, database_url, schema, stop):
    """A worker stopped (its block left, or cancelled by the app) while an outcome waited
    behind an app's row lock: the kept claim must go with the worker, or the rescue would
    pass over the job, its lease long run out, for as long as something held it. The lease
    keeper's statement queued on the row stayed queued (psycopg's cancel of it, on the
    task's cancellation, was itself cancelled: "query cancellation interrupted", and the
    connection closed under it) until the server's statement_timeout; when the app's lock
    went meanwhile, it extended the lease of a job no worker held, and the rescue passed
    over the job for a lease more."""
    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo
    from sa_jobs.queries import Queries

    LOCKED_PAIR_RUNS.clear()
    LOCKED_PAIR_GO.clear()
    [job_id] = _add(engine, FaultLockedPair(n=1))
    lock = jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s FOR UPDATE")
    run_out = jobs_sql(schema, "UPDATE {jobs} SET lease_expires_at = now() - interval '1 second' WHERE id = %s")
    rescue = Queries.for_schema(schema).rescue_expired

    with psycopg.connect(to_conninfo(database_url)) as locker, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as rescuer:

        async def main() -> None:
            with anyio.CancelScope() as app:
                async with Worker(database_url, kinds=[FaultLockedPair], schema=schema, lease=2.0,
                                  poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=5) as worker:
                    await until(lambda: LOCKED_PAIR_RUNS)
                    assert locker.execute(lock, (job_id,)).fetchone() == ("running",)
                    LOCKED_PAIR_GO.add(1)
                    await until(lambda: worker.completer is not None and worker.completer.awaiting())
                    await until(lambda: _claim_holder(database_url, schema, job_id) is not None)
                    if stop == "cancelled":
                        app.cancel()
                        await anyio.sleep(1)  # cancelled here

        anyio.run(main)
        assert _claim_holder(database_url, schema, job_id) is None, "the stopped worker's claim lives on"
        # Nor may a lease keeper's statement stay queued on the row: it would extend the
        # lease of a job no worker holds once the lock goes, and hold off its rescue.
        assert _keepers(database_url, schema, waiting=True) == 0, "a lease keeper's statement outlived its worker"
        locker.execute(run_out, (job_id,))
        locker.commit()
        rescued = rescuer.execute(rescue, {"limit": 100}).fetchall()
    assert [row[:2] for row in rescued] == [(job_id, "retryable")]
    assert LOCKED_PAIR_RUNS == [(1, 1)]


def test_the_guard_holds_at_most_max_kept_claims_and_says_so(engine, database_url, schema, monkeypatch, caplog):
    """Every kept outcome's claim was an advisory lock of the guard's session, with no cap:
    thousands of kept outcomes (a worker of many slots behind an app's locks) would take
    thousands of entries of the server's shared lock table (about 6,400 with the defaults),
    and other sessions' locks would fail with "out of shared memory". The guard holds at
    most MAX_KEPT_CLAIMS, warns once, and every outcome still lands."""
    import logging

    import anyio
    import psycopg

    from sa_jobs import Worker
    from sa_jobs._url import to_conninfo
    from sa_jobs.worker import heartbeat

    monkeypatch.setattr(heartbeat, "MAX_KEPT_CLAIMS", 3)
    caplog.set_level(logging.WARNING, logger="sa_jobs.worker")
    LOCKED_PAIR_RUNS.clear()
    LOCKED_PAIR_GO.clear()
    many = 5
    ids = _add(engine, *(FaultLockedPair(n=n) for n in range(1, many + 1)))
    lock = jobs_sql(schema, "SELECT id FROM {jobs} WHERE id = ANY(%s) AND state = 'running' FOR UPDATE")
    guard_locks = ("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                   " WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'sa_jobs:lease-guard'")

    with psycopg.connect(to_conninfo(database_url)) as locker:

        async def main() -> None:
            async with Worker(database_url, kinds=[FaultLockedPair], schema=schema, lease=5.0, concurrency=many,
                              poll_interval=0.2, maintenance_interval=0.1, shutdown_grace=5) as worker:
                await until(lambda: len(LOCKED_PAIR_RUNS) == many)
                assert len(locker.execute(lock, (ids,)).fetchall()) == many
                LOCKED_PAIR_GO.update(range(1, many + 1))
                await until(lambda: worker.completer is not None and len(worker.completer.awaiting()) == many)
                await until(lambda: q(database_url, guard_locks)[0][0] == 3)
                await anyio.sleep(0.5)  # and no more are taken
                assert q(database_url, guard_locks)[0][0] == 3
                locker.rollback()
                await until(lambda: not _unfinished(database_url, schema), 15)

        anyio.run(main)
    assert _rows(database_url, schema, "state, attempt") == [("completed", 1)] * many
    warned = [r.getMessage() for r in caplog.records if "outcomes kept at once" in r.getMessage()]
    assert warned == ["heartbeat: 5 outcomes kept at once; the claims of 3 are held, the others' jobs may run"
                      " again once their leases end (at-least-once)"]
