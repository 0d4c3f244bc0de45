"""Handler control flow and operator actions: snooze, cancel (queued and running), status."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import threading
import time
from typing import Any

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from sa_jobs import (
    Cancel,
    ConfigurationError,
    Job,
    JobContext,
    JobNotFoundError,
    Snooze,
    Unique,
    cancel,
    cancel_many,
    constant_backoff,
    job_status,
    retry,
    retry_many,
)
from sa_jobs.admin import delete_many, show_job

from .helpers import FinishedOutcomes, jobs_sql, q, run_worker_until, states, wait_for

STARTED: dict[int, float] = {}


class CSnooze(Job, kind="c_snooze", queue="c", max_attempts=1):
    pass


@CSnooze.handler
async def c_snooze(ctx: JobContext, times: int) -> int:
    if ctx.attempt == 1 and STARTED.setdefault(ctx.id, 0) < times:
        STARTED[ctx.id] += 1
        raise Snooze(0.2)
    return int(STARTED[ctx.id])


class CCancelSelf(Job, kind="c_cancel_self", queue="c"):
    pass


@CCancelSelf.handler
async def c_cancel_self(ctx: JobContext) -> None:
    raise Cancel("the order was refunded meanwhile")


class CLongAsync(Job, kind="c_long_async", queue="c"):
    pass


@CLongAsync.handler
async def c_long_async(ctx: JobContext) -> None:
    STARTED[ctx.id] = time.monotonic()
    await anyio.sleep(60)


class CLongSync(Job, kind="c_long_sync", queue="c"):
    pass


SYNC_SAW_CANCEL = threading.Event()


@CLongSync.handler
def c_long_sync(ctx: JobContext) -> None:
    STARTED[ctx.id] = time.monotonic()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ctx.cancelled:
            SYNC_SAW_CANCEL.set()
            return
        time.sleep(0.01)


class CFail(Job, kind="c_fail", queue="c", max_attempts=2, backoff=constant_backoff(0.01)):
    pass


@CFail.handler
async def c_fail(ctx: JobContext) -> None:
    raise ValueError("card declined: insufficient funds\nsecond line with internals")


ALL = [CSnooze, CCancelSelf, CLongAsync, CLongSync, CFail]


def add(engine, *jobs: Job) -> list[int]:
    with Session(engine) as session, session.begin():
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def row(database_url, schema, job_id, cols="state, attempt, max_attempts"):
    return q(database_url, jobs_sql(schema, "SELECT " + cols + " FROM {jobs} WHERE id = %s"), (job_id,))[0]


def test_snooze_reschedules_without_spending_an_attempt(engine, database_url, schema):
    (job_id,) = add(engine, CSnooze(times=2))
    started = time.monotonic()
    run_worker_until(database_url, schema, ALL, lambda: row(database_url, schema, job_id)[0] == "completed")
    assert time.monotonic() - started >= 0.4  # two snoozes of 0.2 s
    assert row(database_url, schema, job_id, "state, attempt, result, errors") == ("completed", 1, 2, [])


class CSnoozeNow(Job, kind="c_snooze_now", queue="c_now", max_attempts=1):
    pass


@CSnoozeNow.handler
async def c_snooze_now(ctx: JobContext, times: int) -> int:
    if STARTED.setdefault(ctx.id, 0) < times:
        STARTED[ctx.id] += 1
        raise Snooze(0)
    return int(STARTED[ctx.id])


def test_a_snooze_of_zero_seconds_runs_the_job_again_at_once(engine, database_url, schema):
    """Snooze(0) left the job 'scheduled': it waited for a maintenance tick to promote it
    (and the promotion's NOTIFY, or the next poll) before it ran again. Both are a minute
    away here; the job must still run three times in a few seconds."""
    STARTED.clear()  # job ids restart in each test's schema
    (job_id,) = add(engine, CSnoozeNow(times=2))
    observer = FinishedOutcomes()
    outcomes = observer.outcomes

    started = time.monotonic()
    run_worker_until(database_url, schema, [CSnoozeNow], lambda: row(database_url, schema, job_id)[0] == "completed",
                     timeout=20, poll_interval=60, maintenance_interval=60, observer=observer)
    assert row(database_url, schema, job_id, "state, attempt, result, errors") == ("completed", 1, 2, [])
    assert outcomes == ["snoozed", "snoozed", "completed"]
    assert time.monotonic() - started < 10


def test_handler_cancel_ends_cancelled_without_retry(engine, database_url, schema):
    (job_id,) = add(engine, CCancelSelf())
    run_worker_until(database_url, schema, ALL, lambda: row(database_url, schema, job_id)[0] == "cancelled")
    state, attempt, errors = row(database_url, schema, job_id, "state, attempt, errors")
    assert (state, attempt) == ("cancelled", 1)
    assert errors[0]["error"] == "Cancel: the order was refunded meanwhile"


def test_cancel_queued_job(engine, database_url, schema):
    (job_id,) = add(engine, CLongAsync())
    with Session(engine) as session, session.begin():
        assert cancel(session, job_id) == "available"
    assert row(database_url, schema, job_id)[0] == "cancelled"
    with Session(engine) as session, session.begin():
        with pytest.raises(JobNotFoundError):
            cancel(session, job_id)  # already finished
        with pytest.raises(JobNotFoundError):
            cancel(session, 10**12)
        assert retry(session, job_id) == job_id  # a cancelled job can be replayed
    assert row(database_url, schema, job_id)[0] == "available"


def test_cancel_of_a_running_job_whose_key_another_job_took_gives_the_key_up(engine, database_url, schema):
    """A kind unique while waiting and once cancelled, not while running: a new job can
    take the key while one runs. cancel() of the running one raised IntegrityError (the
    unique index refused 'cancelled' on the held key), so it could not be cancelled at
    all; as the completer does for a handler's Cancel, it now ends cancelled and gives up
    its key."""
    insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, claim_token, lease_expires_at, unique_key,"
                              " unique_states) VALUES ('c_key', 'c_none', %s, CASE WHEN %s = 'running' THEN"
                              " gen_random_uuid() END, CASE WHEN %s = 'running' THEN now() + interval '1 hour' END,"
                              " 'k1', ARRAY['available', 'retryable', 'cancelled']) RETURNING id")
    running = q(database_url, insert, ("running",) * 3)[0][0]
    holder = q(database_url, insert, ("available",) * 3)[0][0]
    with Session(engine) as session, session.begin():
        assert cancel(session, running) == "running"
    rows = dict((r[0], r[1:]) for r in q(database_url, jobs_sql(schema, "SELECT id, state, unique_key FROM {jobs}")))
    assert rows == {running: ("cancelled", None), holder: ("available", "k1")}
    with Session(engine) as session, session.begin():  # the holder keeps its key, and its cancel its key
        assert cancel(session, holder) == "available"
    assert q(database_url, jobs_sql(schema, "SELECT unique_key FROM {jobs} WHERE id = %s"), (holder,)) == [("k1",)]


def test_retry_refuses_a_unique_job_that_gave_its_key_up(engine, database_url, schema):
    """A job that ended while another job held its key gives the key up (unique_key NULL:
    a cancel, as here, or a completion through the completer or ctx.transaction()). retry()
    then checked no key at all: the job went back to available without one, beside the
    job holding its key, a duplicate the unique index could no longer see (and another
    enqueue of the key was let in beside it). Its key is not known any more: it is refused
    as a job whose key is held (retry() names why, retry_many() skips it)."""
    insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, claim_token, lease_expires_at, unique_key,"
                              " unique_states) VALUES ('c_key', 'c_none', %s, CASE WHEN %s = 'running' THEN"
                              " gen_random_uuid() END, CASE WHEN %s = 'running' THEN now() + interval '1 hour' END,"
                              " 'k1', ARRAY['available', 'retryable', 'cancelled']) RETURNING id")
    running = q(database_url, insert, ("running",) * 3)[0][0]
    holder = q(database_url, insert, ("available",) * 3)[0][0]
    (other,) = add(engine, CLongAsync())
    _finish(database_url, schema, other, "cancelled")
    with Session(engine) as session, session.begin():
        assert cancel(session, running) == "running"
    assert _keys(database_url, schema)[running] == ("cancelled", None)
    with Session(engine) as session, session.begin():
        with pytest.raises(JobNotFoundError, match=rf"job {running} cannot be retried: it gave up its unique key"):
            retry(session, running)
        assert list(retry_many(session, [running, other])) == [other]
    assert _keys(database_url, schema)[running] == ("cancelled", None)
    assert row(database_url, schema, holder)[0] == "available"


def _keyed(database_url, schema, state, states, key="k2"):
    """A row of kind c_key in ``state`` with ``key``, unique in ``states``."""
    insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, scheduled_at, unique_key, unique_states)"
                              " VALUES ('c_key', 'c_none', %s, now() + interval '1 hour', %s, %s) RETURNING id")
    return q(database_url, insert, (state, key, list(states)))[0][0]


def _keys(database_url, schema):
    return dict((r[0], r[1:]) for r in q(database_url, jobs_sql(schema, "SELECT id, state, unique_key FROM {jobs}")))


def test_cancel_many_of_two_waiting_jobs_sharing_a_free_key_keeps_it_on_one(engine, database_url, schema):
    """Unique while available, running or cancelled: a retryable job and a scheduled one
    can share the key (neither holds it). cancel_many of both raised IntegrityError (each
    checked only the rows outside the statement, so both kept the key into 'cancelled');
    now both are cancelled and all but one give the key up."""
    states_ = ("available", "running", "cancelled")
    retrying = _keyed(database_url, schema, "retryable", states_)
    delayed = _keyed(database_url, schema, "scheduled", states_)
    with Session(engine) as session, session.begin():
        assert cancel_many(session, [delayed, retrying]) == {retrying: "retryable", delayed: "scheduled"}
    assert _keys(database_url, schema) == {retrying: ("cancelled", "k2"), delayed: ("cancelled", None)}
    # The row holding the key keeps it, whatever the ids' order.
    q(database_url, jobs_sql(schema, "DELETE FROM {jobs}"))
    waiting = _keyed(database_url, schema, "scheduled", states_)
    holder = _keyed(database_url, schema, "available", states_)
    other = _keyed(database_url, schema, "available", states_, key="k3")
    with Session(engine) as session, session.begin():
        assert set(cancel_many(session, [holder, waiting, other])) == {holder, waiting, other}
    assert _keys(database_url, schema) == {holder: ("cancelled", "k2"), waiting: ("cancelled", None),
                                           other: ("cancelled", "k3")}


def test_concurrent_cancels_of_two_jobs_sharing_a_free_key_both_succeed(engine, database_url, schema):
    """Two operators cancel one each of two jobs sharing a key neither holds: the second
    cancel waited on the first's uncommitted key, then failed with IntegrityError when it
    committed. It now sees the committed holder and gives its key up."""
    states_ = ("available", "running", "cancelled")
    first = _keyed(database_url, schema, "retryable", states_)
    second = _keyed(database_url, schema, "scheduled", states_)
    outcome: dict[str, object] = {}

    def cancel_second() -> None:
        try:
            with Session(engine) as session, session.begin():
                outcome["second"] = cancel(session, second)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["second"] = exc

    with Session(engine) as session, session.begin():
        assert cancel(session, first) == "retryable"
        thread = threading.Thread(target=cancel_second)
        thread.start()
        blocked = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                   " AND cardinality(pg_blocking_pids(pid)) > 0")
        assert wait_for(lambda: q(database_url, blocked)[0][0] > 0, 10), "the second cancel did not wait"
    thread.join(10)
    assert outcome == {"second": "scheduled"}
    assert _keys(database_url, schema) == {first: ("cancelled", "k2"), second: ("cancelled", None)}


class CUnique(Job, kind="c_unique", queue="c", unique=Unique(by=("key",))):
    pass


def _finish(database_url, schema, job_id, state="dead"):
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = %s, attempt = 1, finished_at = now() WHERE id = %s"),
      (state, job_id))


def test_retry_skips_a_unique_job_whose_key_is_held_again(engine, database_url, schema):
    (old,) = add(engine, CUnique(key="k"))
    _finish(database_url, schema, old)
    (holder,) = add(engine, CUnique(key="k"))  # the dead job no longer holds the key
    (other,) = add(engine, CLongAsync())
    _finish(database_url, schema, other, "cancelled")
    assert holder != old
    with Session(engine) as session, session.begin():
        with pytest.raises(JobNotFoundError, match=rf"unique key.*held by job {holder}"):
            retry(session, old)
        # The caller's transaction is still usable, and one blocked row skips only itself.
        assert list(retry_many(session, [old, other])) == [other]
    assert row(database_url, schema, old)[0] == "dead"
    assert row(database_url, schema, holder)[0] == "available"
    assert row(database_url, schema, other)[0] == "available"
    # Once the holder is finished, the key is free and the old job can be retried.
    _finish(database_url, schema, holder, "completed")
    with Session(engine) as session, session.begin():
        assert retry(session, old) == old
    assert row(database_url, schema, old)[0] == "available"


def test_can_retry_is_false_while_retry_would_refuse_the_job(engine, database_url, schema):
    """can_retry is what a status page offers a retry button for: it was True for a dead
    unique job whose key another job holds (and for one that gave its key up), whose
    retry() raises JobNotFoundError, so the button failed every time it was pressed."""
    (old,) = add(engine, CUnique(key="k"))
    _finish(database_url, schema, old)
    (holder,) = add(engine, CUnique(key="k"))
    with Session(engine) as session:
        assert job_status(session, old).can_retry is False
    _finish(database_url, schema, holder, "completed")  # the key is free again
    with Session(engine) as session:
        assert job_status(session, old).can_retry is True
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET unique_key = NULL WHERE id = %s"), (old,))  # gave it up
    with Session(engine) as session:
        assert job_status(session, old).can_retry is False
        with pytest.raises(JobNotFoundError):
            retry(session, old)


def test_retry_many_of_two_finished_jobs_with_one_unique_key_retries_one(engine, database_url, schema):
    # Neither row holds the key before the UPDATE, so the check passes for both and the
    # index refuses the second: the savepoint turns that into a skip, not a failed transaction.
    (first,) = add(engine, CUnique(key="twin"))
    _finish(database_url, schema, first)
    (second,) = add(engine, CUnique(key="twin"))
    _finish(database_url, schema, second)
    (other,) = add(engine, CLongAsync())
    _finish(database_url, schema, other)
    with Session(engine) as session, session.begin():
        done = sorted(retry_many(session, [first, second, other]))
        assert done == [first, other]
        with pytest.raises(JobNotFoundError, match="unique key"):
            retry(session, second)
        assert cancel(session, other) == "available"  # the transaction still works
    assert [row(database_url, schema, i)[0] for i in (first, second, other)] == ["available", "dead", "cancelled"]


@pytest.mark.parametrize("bad", [
    lambda i: i + 0.9, lambda i: float(i), lambda i: True, lambda i: f"{i}.5", lambda i: "one", lambda i: None,
    lambda i: str(i).encode(), lambda i: [i],
], ids=["fraction", "whole-float", "bool", "fraction-string", "word", "none", "bytes", "list"])
def test_bulk_actions_refuse_ids_that_are_not_integers(engine, database_url, schema, bad):
    job_id, other = add(engine, CLongAsync(), CLongAsync())
    _finish(database_url, schema, other, "cancelled")
    with Session(engine) as session, session.begin():
        for action in (cancel_many, retry_many, delete_many):
            with pytest.raises(JobNotFoundError, match="integer"):
                action(session, [other, bad(job_id)])
    assert row(database_url, schema, job_id)[0] == "available"  # nothing ran: refused before any SQL
    assert row(database_url, schema, other)[0] == "cancelled"
    with Session(engine) as session, session.begin():
        assert cancel_many(session, [str(job_id)]) == {job_id: "available"}  # decimal strings are ids
        assert list(retry_many(session, [f" {job_id} "])) == [job_id]


@pytest.mark.parametrize("kind", [CLongAsync, CLongSync], ids=["async", "sync"])
def test_cancel_running_job_stops_its_handler(engine, database_url, schema, kind):
    # Job ids restart in each test's schema: a stale entry would let the cancel below come
    # before the handler started, and a job cancelled before it starts never runs.
    STARTED.clear()
    (job_id,) = add(engine, kind())
    cancelled_at: list[float] = []

    def done() -> bool:
        state = row(database_url, schema, job_id)[0]
        if state == "running" and job_id in STARTED and not cancelled_at:
            with Session(engine) as session, session.begin():
                assert cancel(session, job_id) == "running"
            cancelled_at.append(time.monotonic())
        return bool(cancelled_at) and states(database_url, schema) == {"cancelled": 1} and not _running_in(worker_ref)

    worker_ref: list = []

    async def main() -> None:
        from sa_jobs import Worker

        from .helpers import FAST

        async with Worker(database_url, kinds=ALL, schema=schema, **{**FAST, "lease": 30.0}) as worker:
            worker_ref.append(worker)
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(done):
                    await anyio.sleep(0.05)
            stopped = time.monotonic()
        assert stopped - cancelled_at[0] < 5  # via NOTIFY, long before the 30 s lease

    anyio.run(main)
    assert row(database_url, schema, job_id, "state, attempt, lease_expires_at") == ("cancelled", 1, None)
    if kind is CLongSync:
        # The worker stops waiting for a cancelled sync handler at once (its thread cannot
        # be interrupted); the thread sees ctx.cancelled at its next check, which on a busy
        # machine can come after the worker has shut down. It returns only if it saw it.
        assert SYNC_SAW_CANCEL.wait(10)


def test_a_job_cancelled_while_it_waits_in_the_inbox_never_starts(engine, database_url, schema):
    """The cancel notice can arrive between the claim and a runner taking the job: the
    worker then skips the job instead of starting a handler whose row is already final."""
    STARTED.clear()  # job ids restart in each test's schema
    finished: list[str] = []
    worker_ref: list = []
    ids: list[int] = []

    class CancelAfterClaim:
        def slots(self, queue: str, in_flight: int, limit: int) -> None:
            # Called right after the claimed jobs reach the inbox, before any runner runs.
            if in_flight and not worker_ref[1:]:
                with Session(engine) as session, session.begin():
                    assert cancel(session, ids[0]) == "running"
                # What the notifier does on the notice: read the row, hand it to the worker.
                read_at = time.monotonic()
                worker_ref[0]._settle_claims([ids[0]], [row(database_url, schema, ids[0], "id, state, claim_token")],
                                             read_at)
                worker_ref.append("cancelled")

        def job_finished(self, queue, kind, outcome, run_seconds, since_enqueue_seconds) -> None:
            finished.append(outcome)

    async def main() -> None:
        from sa_jobs import Worker

        from .helpers import FAST

        async with Worker(database_url, kinds=ALL, schema=schema, observer=CancelAfterClaim(),
                          **{**FAST, "lease": 30.0}) as worker:
            worker_ref.append(worker)
            ids.extend(add(engine, CLongAsync()))  # enqueued once the hook can see the worker
            with anyio.fail_after(20):
                while not finished:
                    await anyio.sleep(0.02)

    anyio.run(main)
    assert worker_ref[1:] == ["cancelled"]
    assert finished == ["cancelled"]
    assert ids[0] not in STARTED  # the handler never ran
    assert row(database_url, schema, ids[0], "state, attempt") == ("cancelled", 1)


class CSwallowCancel(Job, kind="c_swallow_cancel", queue="c"):
    pass


@CSwallowCancel.handler
async def c_swallow_cancel(ctx: JobContext) -> str:
    STARTED[ctx.id] = time.monotonic()
    try:
        await anyio.sleep(60)
    except BaseException:  # noqa: BLE001 - a handler that swallows its cancellation
        return "finished anyway"
    return "slept"


def test_a_running_job_cancelled_by_the_user_ends_cancelled_even_if_its_handler_returns(engine, database_url, schema):
    """cancel() of a running job whose handler catches the cancellation and returns a
    value: the job ends cancelled, its result not stored, and the attempt counts as
    cancelled, not completed."""
    STARTED.clear()  # job ids restart in each test's schema
    observer = FinishedOutcomes()
    finished = observer.outcomes

    async def main() -> None:
        from sa_jobs import Worker

        from .helpers import FAST

        async with Worker(database_url, kinds=[CSwallowCancel], schema=schema, observer=observer,
                          **{**FAST, "lease": 30.0}):
            (job_id,) = await anyio.to_thread.run_sync(add, engine, CSwallowCancel())
            with anyio.fail_after(20):
                while job_id not in STARTED:
                    await anyio.sleep(0.02)
                with Session(engine) as session, session.begin():
                    assert cancel(session, job_id) == "running"
                while not finished:
                    await anyio.sleep(0.02)
        assert row(database_url, schema, job_id, "state, result, lease_expires_at") == ("cancelled", None, None)

    anyio.run(main)
    assert finished == ["cancelled"]


def _running_in(worker_ref: list) -> bool:
    return bool(worker_ref) and bool(worker_ref[0].running_jobs())


def test_job_status_speaks_the_status_page_words(engine, database_url, schema):
    queued, failing = add(engine, CLongAsync().options(queue="nobody"), CFail())
    with Session(engine) as session:
        status = job_status(session, queued)
        assert (status.status, status.error, status.can_retry) == ("queued", None, False)
    run_worker_until(database_url, schema, ALL, lambda: row(database_url, schema, failing)[0] == "dead")
    with Session(engine) as session:
        status = job_status(session, failing)
        assert (status.status, status.state, status.attempt, status.can_retry) == ("failed", "dead", 2, True)
        assert status.error == "ValueError: card declined: insufficient funds"
        with pytest.raises(JobNotFoundError):
            job_status(session, 10**12)


def test_every_admin_call_from_an_async_session_says_to_use_run_sync(engine, database_url, schema):
    """pause_queue() and set_queue_limits() given an AsyncSession returned having done
    nothing (their execute() was a coroutine never awaited): the queue ran on, unpaused.
    The reads and the job actions failed with bare TypeErrors. Each now says how to call
    it, before any statement; through run_sync the pause is made."""
    from sa_jobs import QueueLimits, cancel, cancel_many, pause_queue, paused_queues, queue_limits, resume_queue
    from sa_jobs import retry, retry_many, set_queue_limits

    from .helpers import refused_in_an_async_session

    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    calls = {
        "pause_queue": lambda s: pause_queue(s, "nobody"), "resume_queue": lambda s: resume_queue(s, "nobody"),
        "set_queue_limits": lambda s: set_queue_limits(s, "nobody", QueueLimits(concurrency=1)),
        "queue_limits": lambda s: queue_limits(s, "nobody"), "paused_queues": paused_queues,
        "cancel": lambda s: cancel(s, job_id), "cancel_many": lambda s: cancel_many(s, [job_id]),
        "retry": lambda s: retry(s, job_id), "retry_many": lambda s: retry_many(s, [job_id]),
        "job_status": lambda s: job_status(s, job_id),
    }

    async def then(session) -> None:
        assert (await session.run_sync(job_status, job_id)).status == "queued"
        await session.run_sync(lambda s: pause_queue(s, "nobody"))
        await session.commit()

    refused_in_an_async_session(database_url, schema, calls, then)
    with Session(engine) as session:
        assert paused_queues(session) == ["nobody"]
        assert job_status(session, job_id).status == "queued"


@pytest.mark.parametrize("bad", ["abc", "7", True, 1.5, 2**63, -(2**63) - 1, 10**30])
def test_job_status_of_an_id_no_job_can_have_is_not_found_and_the_session_goes_on(engine, bad):
    """An id no job can have (not an int, or past bigint) reached SQL: a str or a bool
    failed to compare with bigint (ProgrammingError), an int past 2**63 raised DataError,
    and either aborted the caller's transaction; the docs promise JobNotFoundError."""
    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    with Session(engine) as session, session.begin():
        with pytest.raises(JobNotFoundError):
            job_status(session, bad)
        assert job_status(session, job_id).status == "queued"  # the transaction is still usable


@pytest.mark.parametrize("big", [2**63, 10**30])
def test_actions_on_ids_past_bigint_find_nothing_and_the_session_goes_on(engine, big):
    """cancel/retry/delete of an int past bigint raised DataError (bigint out of range) and
    aborted the caller's transaction, where an id of no job finds nothing."""
    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    with Session(engine) as session, session.begin():
        for action in (cancel, retry):
            with pytest.raises(JobNotFoundError):
                action(session, big)
        assert cancel_many(session, [big, str(big)]) == {}
        assert list(retry_many(session, [big])) == []
        assert list(delete_many(session, [big])) == []
        assert cancel_many(session, [job_id, big]) == {job_id: "available"}
        # Ids no job can have (0, negative) find nothing in every bulk action alike:
        # delete_many raised JobNotFoundError where cancel_many and retry_many skip them.
        for action in (cancel_many, retry_many, delete_many):
            assert not action(session, [0, -5]), action


def test_snooze_bounds():
    with pytest.raises(ConfigurationError):
        Snooze(-1)


@pytest.mark.parametrize("bad", ["5", True, None, decimal.Decimal("sNaN"), dt.datetime(2030, 1, 1), float("nan"),
                                 dt.timedelta(seconds=-1), dt.timedelta(days=400)])
def test_snooze_of_no_duration_is_a_configuration_error(bad):
    """Snooze("5") and Snooze(True) were taken for 5 s and 1 s; None or a datetime raised a
    bare TypeError, a signalling NaN decimal's ValueError (delay= refuses them all)."""
    with pytest.raises(ConfigurationError, match="snooze"):
        Snooze(bad)


class CSnoozeTimedelta(Job, kind="c_snooze_timedelta", queue="c", max_attempts=1):
    pass


@CSnoozeTimedelta.handler
def c_snooze_timedelta(ctx: JobContext) -> int:
    if STARTED.setdefault(ctx.id, 0) < 1:
        STARTED[ctx.id] += 1
        raise Snooze(dt.timedelta(seconds=0.2))
    return ctx.attempt


def test_snooze_takes_a_timedelta(engine, database_url, schema):
    """As delay= does. Snooze(timedelta(...)) raised TypeError in the handler: the attempt
    was spent as a failure (dead at max_attempts=1) instead of snoozed."""
    (job_id,) = add(engine, CSnoozeTimedelta())
    run_worker_until(database_url, schema, [CSnoozeTimedelta],
                     lambda: row(database_url, schema, job_id)[0] in ("completed", "dead"))
    assert row(database_url, schema, job_id, "state, attempt, result, errors") == ("completed", 1, 1, [])
    assert Snooze(dt.timedelta(minutes=2)).seconds == 120.0


class CProgress(Job, kind="c_progress", queue="c"):
    pass


@CProgress.handler
async def c_progress(ctx: JobContext, steps: int) -> str:
    for i in range(1, steps + 1):
        ctx.set_progress(100 * i / steps, f"step {i} of {steps}")
        await anyio.sleep(0.4)
    return "exported"


def test_progress_is_visible_while_running_and_wait_for_returns_the_result(engine, database_url, schema):
    from sa_jobs import wait_for

    (job_id,) = add(engine, CProgress(steps=5))
    seen: list = []

    def done() -> bool:
        with Session(engine) as session:
            status = job_status(session, job_id)
        if status.status == "running" and status.progress:
            seen.append(status.progress["percent"])
        return status.status == "done"

    run_worker_until(database_url, schema, ALL + [CProgress], done, lease=30.0)
    # Written by heartbeats (within ~1 s of each report), so intermediate values show up.
    assert seen and 0 < min(seen) < 100, seen
    final = wait_for(engine, job_id, timeout=5)
    assert (final.status, final.result) == ("done", "exported")


class CProgressLast(Job, kind="c_progress_last", queue="c"):
    pass


@CProgressLast.handler
async def c_progress_last(ctx: JobContext, fail: bool) -> None:
    ctx.set_progress(80, "uploading")
    if fail:
        raise RuntimeError("upload refused")


@pytest.mark.parametrize("fail", [False, True], ids=["completed", "dead"])
def test_a_progress_report_just_before_the_end_is_kept(engine, database_url, schema, fail):
    """Heartbeats write progress at most about once a second: a report just before the
    handler returned (or raised) was lost, and the finished job showed no progress (a
    failed job's last progress is what its status page shows)."""
    (job_id,) = add(engine, CProgressLast(fail=fail).options(max_attempts=1))

    def finished() -> bool:
        with Session(engine) as session:
            return job_status(session, job_id).status in ("done", "failed")

    run_worker_until(database_url, schema, ALL + [CProgressLast], finished, lease=30.0)
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert status.status == ("failed" if fail else "done"), status
    assert status.progress == {"percent": 80, "message": "uploading"}, status


class CProgressTx(Job, kind="c_progress_tx", queue="c"):
    pass


@CProgressTx.handler
async def c_progress_tx(ctx: JobContext, in_block: bool) -> None:
    if not in_block:
        ctx.set_progress(80, "uploading")
    async with ctx.async_transaction(result="uploaded") as session:
        if in_block:
            ctx.set_progress(80, "uploading")
        await session.execute(text("SELECT 1"))


class CProgressSyncTx(Job, kind="c_progress_sync_tx", queue="c"):
    pass


@CProgressSyncTx.handler
def c_progress_sync_tx(ctx: JobContext, in_block: bool) -> None:
    if not in_block:
        ctx.set_progress(80, "uploading")
    with ctx.transaction(result="uploaded") as session:
        if in_block:
            ctx.set_progress(80, "uploading")
        session.execute(text("SELECT 1"))


@pytest.mark.parametrize("kind", [CProgressTx, CProgressSyncTx], ids=["async", "sync"])
@pytest.mark.parametrize("in_block", [False, True], ids=["before", "inside"])
def test_a_progress_report_is_kept_by_a_transactional_completion(engine, database_url, schema, kind, in_block):
    """The README says a report is written "with the job's outcome, if that comes first":
    a job completed by ctx.transaction() / ctx.async_transaction() dropped a report the
    next heartbeat had not written yet, and its status page showed no progress."""
    (job_id,) = add(engine, kind(in_block=in_block))

    def finished() -> bool:
        with Session(engine) as session:
            return job_status(session, job_id).status == "done"

    run_worker_until(database_url, schema, ALL + [kind], finished, lease=30.0)
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert (status.status, status.result) == ("done", "uploaded"), status
    assert status.progress == {"percent": 80, "message": "uploading"}, status


# ---- progress belongs to the attempt that reported it ------------------------------
#
# A job retried (after a failure, a lost lease or an admin replay) or released at shutdown
# showed the previous run's progress (80% "uploading") while it waited and while its next
# attempt ran, until that attempt's first report.

PROGRESS_GO = threading.Event()  # attempt 2 may report
PROGRESS_END = threading.Event()  # attempt 2 may return


class CProgressRetry(Job, kind="c_progress_retry", queue="c", max_attempts=2, backoff=constant_backoff(1.0)):
    pass


@CProgressRetry.handler
async def c_progress_retry(ctx: JobContext) -> str:
    if ctx.attempt == 1:
        ctx.set_progress(80, "uploading")
        raise RuntimeError("upload refused")
    while not PROGRESS_GO.is_set():
        await anyio.sleep(0.02)
    ctx.set_progress(10, "uploading again")
    while not PROGRESS_END.is_set():
        await anyio.sleep(0.02)
    return "uploaded"


def test_a_retried_job_shows_no_progress_until_its_new_attempt_reports(engine, database_url, schema):
    PROGRESS_GO.clear()
    PROGRESS_END.clear()
    (job_id,) = add(engine, CProgressRetry())
    waiting: list = []  # progress seen while it waited for attempt 2
    before_report: list = []  # progress seen while attempt 2 ran before reporting
    after_report: list = []

    def done() -> bool:
        with Session(engine) as session:
            status = job_status(session, job_id)
        if status.state in ("retryable", "available") and status.attempt == 1:
            waiting.append(status.progress)
        elif status.state == "running" and status.attempt == 2 and not PROGRESS_GO.is_set():
            before_report.append(status.progress)
            if len(before_report) >= 3:
                PROGRESS_GO.set()
        elif status.state == "running" and status.attempt == 2 and status.progress is not None:
            after_report.append(status.progress)
            PROGRESS_END.set()
        return status.status == "done"

    try:
        run_worker_until(database_url, schema, ALL + [CProgressRetry], done, lease=30.0)
    finally:
        PROGRESS_GO.set()
        PROGRESS_END.set()
    assert waiting and all(p is None for p in waiting), waiting
    assert before_report and all(p is None for p in before_report), before_report
    assert after_report and after_report[0] == {"percent": 10, "message": "uploading again"}, after_report
    with Session(engine) as session:
        final = job_status(session, job_id)
    # A completed job keeps its last attempt's progress.
    assert (final.status, final.attempt, final.result) == ("done", 2, "uploaded")
    assert final.progress == {"percent": 10, "message": "uploading again"}, final


def test_a_dead_job_replayed_by_an_admin_shows_no_progress_while_it_waits(engine, database_url, schema):
    (job_id,) = add(engine, CProgressLast(fail=True).options(max_attempts=1))

    def finished() -> bool:
        with Session(engine) as session:
            return job_status(session, job_id).status == "failed"

    run_worker_until(database_url, schema, ALL + [CProgressLast], finished, lease=30.0)
    with Session(engine) as session, session.begin():
        assert job_status(session, job_id).progress == {"percent": 80, "message": "uploading"}
        retry(session, job_id)
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert (status.status, status.attempt, status.progress) == ("queued", 1, None), status


def test_a_replayed_completed_job_shows_no_result_of_its_earlier_run(engine, database_url, schema):
    """retry() of a completed job kept its result: the replay showed it while queued, and
    once the replay ended dead job_status said "failed" with the earlier run's result."""
    (job_id,) = add(engine, CLongAsync())
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', attempt = 1, finished_at = now(),"
                                     " result = '{{\"rows\": 3}}' WHERE id = %s"), (job_id,))
    with Session(engine) as session, session.begin():
        assert job_status(session, job_id).result == {"rows": 3}
        retry(session, job_id)
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert (status.status, status.result) == ("queued", None), status
    # The replay fails for good: a failed job has no result.
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'dead', attempt = 2, finished_at = now()"
                                     " WHERE id = %s"), (job_id,))
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert (status.status, status.result) == ("failed", None), status


class CProgressStuck(Job, kind="c_progress_stuck", queue="c"):
    pass


@CProgressStuck.handler
async def c_progress_stuck(ctx: JobContext) -> None:
    ctx.set_progress(80, "uploading")
    await anyio.sleep(60)


def test_a_job_released_at_shutdown_shows_no_progress_of_the_interrupted_run(engine, database_url, schema):
    """A release refunds the attempt, so the next run has the same attempt number: the
    release itself drops the interrupted run's report (its handler starts over)."""
    (job_id,) = add(engine, CProgressStuck())

    def reported() -> bool:
        return row(database_url, schema, job_id, "progress")[0] is not None

    run_worker_until(database_url, schema, ALL + [CProgressStuck], reported, lease=30.0, shutdown_grace=0.1)
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert (status.state, status.attempt, status.progress) == ("available", 0, None), status


SNOOZE_GO = threading.Event()
SNOOZE_RUNS: dict[str, int] = {}


class CProgressSnooze(Job, kind="c_progress_snooze", queue="c", max_attempts=1):
    pass


@CProgressSnooze.handler
async def c_progress_snooze(ctx: JobContext) -> str:
    SNOOZE_RUNS[ctx.id] = SNOOZE_RUNS.get(ctx.id, 0) + 1
    if SNOOZE_RUNS[ctx.id] == 1:
        ctx.set_progress(50, "half exported")
        raise Snooze(1.0)
    while not SNOOZE_GO.is_set():
        await anyio.sleep(0.02)
    return "exported"


def test_progress_survives_a_snooze_which_spends_no_attempt(engine, database_url, schema):
    """A snooze refunds its attempt: the run after it is the same attempt, and the
    snoozed run's report stays on show while it waits and until the next run reports."""
    SNOOZE_GO.clear()
    SNOOZE_RUNS.clear()
    (job_id,) = add(engine, CProgressSnooze())
    snoozed: list = []
    rerun: list = []

    def done() -> bool:
        with Session(engine) as session:
            status = job_status(session, job_id)
        if status.state == "scheduled":
            snoozed.append((status.attempt, status.progress))
        elif status.state == "running" and SNOOZE_RUNS.get(job_id) == 2 and status.attempt == 1:
            rerun.append(status.progress)
            if len(rerun) >= 3:
                SNOOZE_GO.set()
        return status.status == "done"

    try:
        run_worker_until(database_url, schema, ALL + [CProgressSnooze], done, lease=30.0)
    finally:
        SNOOZE_GO.set()
    half = {"percent": 50, "message": "half exported"}
    assert snoozed and all(s == (0, half) for s in snoozed), snoozed
    assert rerun and all(p == half for p in rerun), rerun
    with Session(engine) as session:
        assert job_status(session, job_id).progress == half


@pytest.mark.parametrize(
    "state, attempt, tag, shown",
    [
        ("retryable", 1, 1, False),  # failed, or its lease was rescued: the next run is attempt 2
        ("available", 1, 1, False),  # promoted, or replayed by an admin
        ("scheduled", 0, 1, True),  # snoozed: the next run is attempt 1 again
        ("available", 0, 1, True),  # snoozed, then promoted
        ("running", 2, 1, False),  # attempt 2 has not reported yet
        ("running", 2, 2, True),
        ("completed", 2, 2, True),
        ("completed", 2, 1, False),  # attempt 2 finished without a report
        ("dead", 3, 3, True),
        ("cancelled", 1, 1, True),  # cancelled while it waited for its retry
        ("cancelled", 0, 1, True),  # cancelled while snoozed
        ("retryable", 1, None, True),  # written before reports named their attempt
        ("running", 2, None, True),
    ],
)
def test_job_status_shows_the_progress_of_the_current_attempt_only(engine, database_url, schema, state, attempt, tag,
                                                                     shown):
    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    report = {"percent": 80, "message": "uploading", **({} if tag is None else {"attempt": tag})}
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = %s, attempt = %s, progress = %s::jsonb,"
                                     " claim_token = CASE WHEN %s = 'running' THEN gen_random_uuid() END,"
                                     " lease_expires_at = CASE WHEN %s = 'running' THEN now() + interval '1 hour' END,"
                                     " finished_at = CASE WHEN %s IN ('completed', 'dead', 'cancelled') THEN now() END"
                                     " WHERE id = %s"),
      (state, attempt, json.dumps(report), state, state, state, job_id))
    with Session(engine) as session:
        status = job_status(session, job_id)
        shown_row = show_job(session, job_id)
    assert status.progress == ({"percent": 80, "message": "uploading"} if shown else None), status
    assert shown_row["progress"] == (report if shown else None), shown_row


class CProgressBool(Job, kind="c_progress_bool", queue="c"):
    pass


@CProgressBool.handler
def c_progress_bool(ctx: JobContext) -> None:
    ctx.set_progress(True)


def test_progress_percent_must_be_a_number_not_a_bool(engine):
    """``True`` passed the 0..100 check (bool is an int) and was stored as "percent": true."""
    from sa_jobs.testing import perform

    with pytest.raises(ValueError, match="0..100"):
        perform(CProgressBool(), engine=engine)


@pytest.mark.parametrize("state, shown", [("retryable", True), ("available", True), ("running", True),
                                          ("scheduled", True), ("completed", False)])
def test_job_status_keeps_the_last_error_until_the_job_completes(engine, database_url, schema, state, shown):
    """The error was shown while the job was 'retryable' only: gone once the scheduler made
    its retry available (or the retry ran), back if that failed too, so a status page's
    message flickered. A completed job shows none, its earlier failures being history."""
    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = %s, attempt = 1, errors = %s::jsonb"
                             " , lease_expires_at = CASE WHEN %s = 'running' THEN now() + interval '1 hour' END"
                             " , claim_token = CASE WHEN %s = 'running' THEN gen_random_uuid() END"
                             " , finished_at = CASE WHEN %s = 'completed' THEN now() END WHERE id = %s"),
      (state, '[{"attempt": 1, "error": "ValueError: card declined\\nat line 3"}]', state, state, state, job_id))
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert status.state == state
    assert status.error == ("ValueError: card declined" if shown else None)


@pytest.mark.parametrize("ended, shown", [("completed", False), ("cancelled", False), ("dead", True)])
def test_a_replayed_job_shows_the_error_of_its_last_attempt_only(engine, database_url, schema, ended, shown):
    """Attempt 1 failed, attempt 2 completed (or was cancelled by an operator, which
    records no error) and the job was replayed with retry(): its status showed "queued"
    with attempt 1's error, the failure of an attempt two runs back, as if the last one
    had failed. A waiting job shows the error of its last attempt, a running one that of
    the attempt before it; a replayed dead job still shows why it died."""
    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    errors = [{"attempt": 1, "error": "ValueError: card declined"}]
    if ended == "dead":
        errors.append({"attempt": 2, "error": "ValueError: card expired"})
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = %s, attempt = 2, errors = %s::jsonb,"
                                     " finished_at = now() WHERE id = %s"), (ended, json.dumps(errors), job_id))
    with Session(engine) as session, session.begin():
        assert retry(session, job_id) == job_id
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert (status.status, status.error) == ("queued", "ValueError: card expired" if shown else None)
    # Its run is attempt 3, and the attempt before it (2) did not fail.
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'running', attempt = 3, claim_token = gen_random_uuid(),"
                                     " lease_expires_at = now() + interval '1 hour' WHERE id = %s"), (job_id,))
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert (status.status, status.error) == ("running", "ValueError: card expired" if shown else None)



class CSecretDefault(Job, kind="c_secret_default", queue="c"):
    pass


@CSecretDefault.handler
def c_secret_default(ctx: JobContext, report_id: int, *, api_key: str = "sk_live_hunt19_secret") -> None:
    pass


def test_an_args_mismatch_error_names_the_parameters_not_their_defaults(engine, database_url, schema):
    """Args that do not match the handler end the job dead with the handler's signature
    in the error, which job_status shows a user as the short error: it carried the
    parameters' default values (an API key a handler took as a default, say) and their
    annotations. It names the parameters only."""
    (job_id,) = add(engine, CSecretDefault(report=1))
    run_worker_until(database_url, schema, [CSecretDefault], lambda: row(database_url, schema, job_id)[0] == "dead",
                     timeout=20)
    errors = row(database_url, schema, job_id, "errors")[0]
    with Session(engine) as session:
        status = job_status(session, job_id)
    assert status.error is not None and "sk_live" not in json.dumps(errors), errors
    assert status.error.startswith("TypeError: args ['report'] do not match handler signature"
                                   " (ctx, report_id, *, api_key=...)"), status.error


RUNS: dict[str, int] = {}


class CBadTxResult(Job, kind="c_bad_tx_result", queue="c", max_attempts=3, backoff=constant_backoff(0.01)):
    pass


@CBadTxResult.handler
def c_bad_tx_result(ctx: JobContext, how: str) -> None:
    RUNS[ctx.idempotency_key] = RUNS.get(ctx.idempotency_key, 0) + 1  # an effect outside the database (an email sent)
    with ctx.transaction(result={"score": float("nan")} if how == "nan" else {"at": dt.date(2024, 1, 1)}):
        pass


class CBadAsyncTxResult(Job, kind="c_bad_async_tx_result", queue="c", max_attempts=3, backoff=constant_backoff(0.01)):
    pass


@CBadAsyncTxResult.handler
async def c_bad_async_tx_result(ctx: JobContext, how: str) -> None:
    RUNS[ctx.idempotency_key] = RUNS.get(ctx.idempotency_key, 0) + 1
    async with ctx.async_transaction(result={"score": float("nan")} if how == "nan" else {"at": dt.date(2024, 1, 1)}):
        pass


@pytest.mark.parametrize("kind", [CBadTxResult, CBadAsyncTxResult], ids=["sync", "async"])
@pytest.mark.parametrize("how", ["nan", "date"])
def test_a_result_given_to_a_transaction_that_is_not_json_ends_the_job_dead(engine, database_url, schema, kind, how):
    """A returned result that is not JSON ends the job dead (retrying returns the same
    value). The same result given as ctx.transaction(result=...) failed the attempt as
    an error of the handler's, retried up to max_attempts (20 by default, over days),
    running the handler's work before the transaction again each time."""
    (job_id,) = add(engine, kind(how=how))
    run_worker_until(database_url, schema, [kind], lambda: row(database_url, schema, job_id)[0] in ("dead", "completed"),
                     timeout=20)
    state, attempt, errors = row(database_url, schema, job_id, "state, attempt, errors")
    assert (state, attempt, RUNS[f"sa_jobs:{schema}:{job_id}"]) == ("dead", 1, 1), errors
    assert errors[-1]["error"].startswith("InvalidArgsError: result"), errors


def test_wait_for_refuses_a_timeout_that_is_not_a_number(engine):
    """None failed with a bare TypeError from the clock's arithmetic, naming neither."""
    from sa_jobs import wait_for

    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        wait_for(engine, 1, timeout=None)  # type: ignore[arg-type]


def test_wait_for_times_out_on_a_job_nobody_runs(engine):
    from sa_jobs import wait_for

    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        wait_for(engine, job_id, timeout=0.5)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_wait_for_on_an_engine_whose_pool_has_no_free_connection_raises_its_timeout(engine, database_url, schema,
                                                                                   flavour):
    """Every pooled connection is checked out (the app's other threads or tasks hold
    them): the wait's read waits for one up to the pool's timeout. That raised
    SQLAlchemy's own TimeoutError, which an ``except TimeoutError`` does not catch, after
    the pool's timeout however short the wait's. Within the wait's time a read that got
    no connection is tried again; past it, the wait raises TimeoutError."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for as wait_for_job, wait_for_async
    from sa_jobs._url import sqlalchemy_url

    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    pool = dict(pool_size=1, max_overflow=0, pool_timeout=0.2)
    if flavour == "sync":
        waiting = create_engine(engine.url, **pool).execution_options(schema_translate_map={"sa_jobs": schema})
        held = waiting.connect()
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError, match="no connection"):
                wait_for_job(waiting, job_id, timeout=1.0)
            took = time.monotonic() - started
        finally:
            held.close()
            waiting.dispose()
    else:
        async def main() -> float:
            aengine = create_async_engine(sqlalchemy_url(database_url, async_=True), **pool).execution_options(
                schema_translate_map={"sa_jobs": schema})
            aheld = await aengine.connect()
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError, match="no connection"):
                    await wait_for_async(aengine, job_id, timeout=1.0)
                return time.monotonic() - started
            finally:
                await aheld.close()
                await aengine.dispose()

        took = anyio.run(main)
    assert 1.0 <= took < 2.0, took  # read again until the deadline, then raised


@pytest.mark.parametrize("flavour", ["sync", "async", "sync-autocommit", "async-autocommit"])
def test_wait_for_timeout_holds_while_the_jobs_table_is_locked(engine, database_url, schema, flavour):
    """A read of the job that the server does not answer (the table locked by a migration,
    a VACUUM FULL or a LOCK TABLE; a server under a pile-up) held wait_for past its
    timeout, for as long as the lock was held: the deadline was only checked between reads.
    On an AUTOCOMMIT engine the read's transaction-local statement_timeout ended with the
    statement that set it, and the wait still hung for as long as the lock was held."""
    import psycopg
    from psycopg import sql as psql
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for, wait_for_async
    from sa_jobs._url import sqlalchemy_url

    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    locker = psycopg.connect(database_url)
    locker.execute(psql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(psql.Identifier(schema, "jobs")))
    # The lock goes away after 20 s whatever happens, so a failing run ends.
    release = threading.Timer(20, locker.rollback)
    try:
        release.start()
        started = time.monotonic()
        options = {"isolation_level": "AUTOCOMMIT"} if flavour.endswith("autocommit") else {}
        if flavour.startswith("sync"):
            # An engine of its own, not engine.execution_options(isolation_level=...): on the
            # SQLAlchemy 2.0.30 floor that fails on an engine with options already set.
            sync_engine = create_engine(engine.url, **options).execution_options(schema_translate_map={"sa_jobs": schema})
            try:
                with pytest.raises(TimeoutError, match=f"job {job_id}"):
                    wait_for(sync_engine, job_id, timeout=0.5)
            finally:
                sync_engine.dispose()
        else:
            async def main() -> None:
                aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
                    schema_translate_map={"sa_jobs": schema}, **options)
                try:
                    with pytest.raises(TimeoutError, match=f"job {job_id}"):
                        await wait_for_async(aengine, job_id, timeout=0.5)
                finally:
                    await aengine.dispose()

            anyio.run(main)
        elapsed = time.monotonic() - started
    finally:
        release.cancel()
        locker.rollback()
        locker.close()
    assert elapsed < 3, f"wait_for(timeout=0.5) returned after {elapsed:.1f}s"


def test_wait_for_without_a_deadline_and_with_a_timeout_that_is_not_a_number(engine, database_url, schema):
    """timeout=math.inf waits as long as it takes (each read then has no statement
    timeout); a NaN timeout, which no clock ever passes, waited for ever: it is refused."""
    import math

    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for, wait_for_async
    from sa_jobs._url import sqlalchemy_url

    (done_id,) = add(engine, CLongAsync())
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE id = %s"),
      (done_id,))
    assert wait_for(engine, done_id, timeout=math.inf).status == "done"
    with pytest.raises(ValueError, match="timeout"):
        wait_for(engine, done_id, timeout=math.nan)

    async def main() -> None:
        aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={"sa_jobs": schema})
        try:
            assert (await wait_for_async(aengine, done_id, timeout=math.inf)).status == "done"
            with pytest.raises(ValueError, match="timeout"):
                await wait_for_async(aengine, done_id, timeout=math.nan)
        finally:
            await aengine.dispose()

    anyio.run(main)


def test_wait_for_async_with_a_zero_timeout_returns_a_finished_job(engine, database_url, schema):
    """Like wait_for: one look at the job before the deadline counts. A cancel scope around
    the whole wait raised a bare TimeoutError for a job that had long completed."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for, wait_for_async
    from sa_jobs._url import sqlalchemy_url

    done_id, queued_id = add(engine, CLongAsync(), CLongAsync().options(queue="nobody"))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now(),"
                                     " result = '{{\"rows\": 3}}' WHERE id = %s"), (done_id,))

    async def main() -> None:
        aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={"sa_jobs": schema})
        try:
            for timeout in (0, -1):
                status = await wait_for_async(aengine, done_id, timeout=timeout)
                assert (status.status, status.result) == ("done", {"rows": 3})
                assert status == wait_for(engine, done_id, timeout=timeout)
            with pytest.raises(TimeoutError, match=f"job {queued_id} is still available"):
                await wait_for_async(aengine, queued_id, timeout=0)
        finally:
            await aengine.dispose()

    anyio.run(main)


def _terminate_then_complete(database_url: str, schema: str, app: str, job_id: int) -> threading.Thread:
    """A thread that ends the server session of the wait's idle pooled connection (named
    ``app``) between two of its reads, then completes the job once that session is gone."""
    from sa_jobs._url import to_conninfo

    def run() -> None:
        import psycopg

        deadline = time.monotonic() + 10
        with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
            while time.monotonic() < deadline:
                pids = [r[0] for r in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'idle'", (app,))]
                if pids:
                    conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
                    while conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)).fetchall():
                        time.sleep(0.01)
                    break
                time.sleep(0.01)
            conn.execute(jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now(),"
                                          " result = '7' WHERE id = %s"), (job_id,))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_wait_for_goes_on_when_its_connection_is_lost_between_reads(engine, database_url, schema, flavour):
    """The wait reads the job every 20-500 ms through the engine's pool, for as long as its
    timeout. The pooled connection it read through was cut between two reads (a server
    restart, a failover, pg_terminate_backend, an idle timeout of a proxy): the next read
    raised OperationalError out of the wait, though the job completed a moment later and
    the pool reconnects at the next checkout. A lost connection is read through again,
    within the wait's timeout."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for, wait_for_async
    from sa_jobs._url import sqlalchemy_url

    (job_id,) = add(engine, CLongAsync().options(queue="nobody"))
    app = "sa_jobs_wait_" + uuid.uuid4().hex[:8]
    thread = _terminate_then_complete(database_url, schema, app, job_id)
    if flavour == "sync":
        waiting = create_engine(engine.url, connect_args={"application_name": app}).execution_options(
            schema_translate_map={"sa_jobs": schema})
        try:
            status = wait_for(waiting, job_id, timeout=15)
        finally:
            waiting.dispose()
    else:
        async def main():
            aengine = create_async_engine(sqlalchemy_url(database_url, async_=True),
                                          connect_args={"application_name": app}).execution_options(
                schema_translate_map={"sa_jobs": schema})
            try:
                return await wait_for_async(aengine, job_id, timeout=15)
            finally:
                await aengine.dispose()

        status = anyio.run(main)
    thread.join(10)
    assert (status.status, status.result) == ("done", 7)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_wait_for_goes_on_when_its_first_connection_ends_during_its_set_up(engine, database_url, schema, flavour):
    """The server ends the wait's first session at its first statement (an administrator's
    command, a restart), before anything was read: the wait reads through another. (CI
    once saw this end the wait with AdminShutdown: the session ended during an async
    engine's first-connect set-up, where SQLAlchemy does not flag the error as a lost
    connection. This test's timing gets the flagged path; the 57P01 rule in
    admin._read_again covers the other.)"""
    import psycopg
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for as wait_for_job, wait_for_async
    from sa_jobs._url import sqlalchemy_url, to_conninfo

    conninfo = to_conninfo(database_url)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, args, state, finished_at, result)"
                                      " VALUES ('c_long_async', 'nobody', jsonb_build_object(), 'completed', now(), '7')"))
        (job_id,) = conn.execute(jobs_sql(schema, "SELECT max(id) FROM {jobs}")).fetchone()
    ended: list[int] = []

    def end_the_first_session(pid: int) -> None:
        """The server ends the first session made, as its first statement is sent."""
        if ended:
            return
        ended.append(pid)
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                time.sleep(0.01)

    class EndedAtFirstStatement(psycopg.Cursor):
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            end_the_first_session(self.connection.info.backend_pid)
            return super().execute(*args, **kwargs)

    class AsyncEndedAtFirstStatement(psycopg.AsyncCursor):
        async def execute(self, *args: Any, **kwargs: Any) -> Any:
            await anyio.to_thread.run_sync(end_the_first_session, self.connection.info.backend_pid)
            return await super().execute(*args, **kwargs)

    if flavour == "sync":
        waiting = create_engine(
            sqlalchemy_url(database_url),
            creator=lambda: psycopg.connect(conninfo, cursor_factory=EndedAtFirstStatement),
        ).execution_options(schema_translate_map={"sa_jobs": schema})
        try:
            status = wait_for_job(waiting, job_id, timeout=10)
        finally:
            waiting.dispose()
    else:
        async def main() -> Any:
            aengine = create_async_engine(
                sqlalchemy_url(database_url, async_=True),
                async_creator=lambda: psycopg.AsyncConnection.connect(conninfo, cursor_factory=AsyncEndedAtFirstStatement),
            ).execution_options(schema_translate_map={"sa_jobs": schema})
            try:
                return await wait_for_async(aengine, job_id, timeout=10)
            finally:
                await aengine.dispose()

        status = anyio.run(main)
    assert len(ended) == 1  # the first session was ended, and the wait read through another
    assert (status.status, status.result) == ("done", 7)


def test_wait_for_with_no_time_left_reads_through_a_connection_lost_before_it(engine, database_url, schema):
    """A wait reads the job at least once, even with timeout=0: when that read met a
    pooled connection the server had ended meanwhile, it is read once more."""
    import uuid

    import psycopg
    from sqlalchemy import create_engine

    from sa_jobs import wait_for as wait_for_job
    from sa_jobs._url import to_conninfo

    (job_id,) = add(engine, CLongAsync())
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE id = %s"),
      (job_id,))
    app = "sa_jobs_wait_" + uuid.uuid4().hex[:8]
    waiting = create_engine(engine.url, connect_args={"application_name": app}).execution_options(
        schema_translate_map={"sa_jobs": schema})
    try:
        assert wait_for_job(waiting, job_id, timeout=0).status == "done"  # the pool keeps its connection
        with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
            pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))]
            assert pids
            conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
            assert wait_for(lambda: not conn.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)",
                                                     (pids,)).fetchall(), 10)
        assert wait_for_job(waiting, job_id, timeout=0).status == "done"
    finally:
        waiting.dispose()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_wait_for_on_a_connection_in_a_transaction_leaves_its_statement_timeout_be(engine, database_url, schema,
                                                                                    flavour):
    """Each read sets a transaction-local statement_timeout of the time left (at least
    1 s). Given a Connection in a transaction (the caller's), the wait joined that
    transaction, and the setting outlived the wait: the caller's next statements in it
    were cancelled after a second or so (QueryCanceled), as if the wait's deadline were
    theirs."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for, wait_for_async
    from sa_jobs._url import sqlalchemy_url

    (job_id,) = add(engine, CLongAsync())
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE id = %s"),
      (job_id,))
    show = text("SELECT current_setting('statement_timeout')")
    if flavour == "sync":
        with engine.connect() as conn:
            conn.execute(text("SET LOCAL statement_timeout = '45s'"))
            assert wait_for(conn, job_id, timeout=2).status == "done"
            assert conn.in_transaction() and conn.execute(show).scalar_one() == "45s"
            conn.execute(text("SELECT pg_sleep(1.1)"))  # a statement of the caller's, longer than a read's bound
    else:
        async def main() -> None:
            aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
                schema_translate_map={"sa_jobs": schema})
            try:
                async with aengine.connect() as conn:
                    await conn.execute(text("SET LOCAL statement_timeout = '45s'"))
                    assert (await wait_for_async(conn, job_id, timeout=2)).status == "done"
                    assert conn.in_transaction() and (await conn.execute(show)).scalar_one() == "45s"
                    await conn.execute(text("SELECT pg_sleep(1.1)"))
            finally:
                await aengine.dispose()

        anyio.run(main)



def test_pause_is_cluster_wide_and_resume_wakes_workers(engine, database_url, schema):
    from sa_jobs import pause_queue, paused_queues, resume_queue

    with Session(engine) as session, session.begin():
        pause_queue(session, "c")
    ids = add(engine, *[CFail().options(max_attempts=1) for _ in range(3)])
    run_worker_until(database_url, schema, ALL, lambda: False, timeout=1.5)
    assert states(database_url, schema) == {"available": 3}  # a paused queue claims nothing
    with Session(engine) as session:
        assert paused_queues(session) == ["c"]
    with Session(engine) as session, session.begin():
        resume_queue(session, "c")
    run_worker_until(database_url, schema, ALL, lambda: states(database_url, schema) == {"dead": 3})
    assert states(database_url, schema) == {"dead": 3}
    with Session(engine) as session:
        assert paused_queues(session) == []
    assert len(ids) == 3


def _notes(database_url: str, schema: str, job_id: int) -> list[tuple[str, object]]:
    return q(database_url, jobs_sql(schema, "SELECT note, at FROM {effects} WHERE job_id = %s ORDER BY at"), (job_id,))


def test_a_cancel_sent_while_the_listener_was_down_reaches_the_handler_when_it_reconnects(engine, database_url, schema):
    """A cancel's NOTIFY reaches only the workers listening when it commits. One sent while
    a worker's listener connection was down (terminated, a network blip) was found only by
    the next heartbeat, lease/4 later (7.5 s with the default lease), although the listener
    was back within 0.1 s: the handler ran on that long. On reconnecting, the listener now
    looks up the jobs the worker holds, as it wakes the producers for missed inserts."""
    import os
    import signal

    import psutil
    from sqlalchemy import text

    from .conftest import start_worker_process
    from .jobs_control import CtlLong
    from .jobs_core import effects_ddl

    q(database_url, effects_ddl(schema))
    os.environ["SA_JOBS_DATABASE_URL"] = database_url
    since = q(database_url, "SELECT now()")[0][0]
    # A lease of 120 s: the first heartbeat (which would find the cancel too) is 30 s after
    # the claim, far past the 3 s this test allows.
    worker = start_worker_process(database_url, schema, "tests.jobs_control", "--lease", "120", "--shutdown-grace", "1")
    try:
        (job_id,) = add(engine, CtlLong())
        assert wait_for(lambda: bool(_notes(database_url, schema, job_id)), 30)
        claimed = time.monotonic()
        ports = [c.laddr.port for c in psutil.Process(worker.pid).net_connections(kind="tcp") if c.laddr]
        # Over TCP, the worker's listener is the one on its ports; over a Unix socket (the
        # embedded server) the one started since the worker was (client_port -1).
        mine = "client_port = ANY(:ports)" if ports else "client_port = -1 AND backend_start >= :since"
        with Session(engine) as session, session.begin():
            cancel_many(session, [10**12])  # compiles the statement, so that the cancel below is quick
            # The worker's listener (other tests' workers may share the database) is told to
            # go and the cancel commits a few ms later: the listener's backend exits without
            # passing the NOTIFY on, and the worker reconnects 0.1 s after noticing.
            (gone,) = session.execute(text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = 'sa_jobs:listener' AND " + mine), {"ports": ports, "since": since}).one()
            assert gone == 1
            assert cancel(session, job_id) == "running"
        sent = time.monotonic()
        assert wait_for(lambda: len(_notes(database_url, schema, job_id)) == 2, 15)
        seen = time.monotonic() - sent
        assert [note for note, _ in _notes(database_url, schema, job_id)] == ["started", "cancelled"]
        assert seen < 3, f"the handler was cancelled {seen:.1f} s after the cancel"
        assert time.monotonic() - claimed < 25, "too slow to tell the listener from the first heartbeat"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
    assert row(database_url, schema, job_id, "state, attempt") == ("cancelled", 1)


def test_a_cancel_announced_while_the_listener_runs_a_query_is_not_lost(database_url, schema):
    """The listener runs queries between its waits (the health check every 5 s; on every
    connect the look-up of cancels it missed). psycopg before 3.2.4 dropped a notification
    that arrived during a query on the connection (psycopg issue #962), which pyproject.toml
    allowed (>=3.2.3): such a cancel reached the handler only at the next heartbeat."""
    from sa_jobs._url import to_conninfo
    from sa_jobs.events import NullObserver
    from sa_jobs.queries import Queries, cancel_channel_name
    from sa_jobs.worker.notifier import Notifier

    cancelled: list[tuple[int, object]] = []
    # A job this worker holds, cancelled: the worker acts on a notice only once it has
    # read the row cancelled under its claim.
    ((job_id, token),) = q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state, attempt, claim_token)"
                                                          " VALUES ('k', 'cancelled', 1, gen_random_uuid())"
                                                          " RETURNING id, claim_token"))
    notices: list[int] = []

    def held() -> list[int]:
        if not notices:  # at the connect's look-up of missed cancels, not at the notice's
            notices.append(job_id)
            # Committed before the look-up is sent: the listener's backend passes the
            # notification on at once, so it reaches the client during the look-up.
            q(database_url, "SELECT pg_notify(%s, %s)", (cancel_channel_name(schema), str(job_id)))
            return [10**12]
        return [job_id]

    async def main() -> None:
        notifier = Notifier(to_conninfo(database_url), Queries.for_schema(schema), NullObserver(), lambda: None,
                            lambda ids, rows, read_at: cancelled.extend((r[0], r[2]) for r in rows if r[1] == "cancelled"),
                            held)
        async with anyio.create_task_group() as tg:
            tg.start_soon(notifier.run)
            with anyio.move_on_after(3):
                while not cancelled:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert cancelled == [(job_id, token)]


def test_a_local_pause_and_resume_from_another_thread(engine, database_url, schema):
    """A sync app runs the worker's loop in one thread and pauses a queue from another (an
    admin request). pause() and resume() touched the loop's objects from the caller's thread:
    resume() set the producer's asyncio event there, which is not thread-safe (asyncio's
    debug mode raises RuntimeError; otherwise the producer woke whenever the loop next
    happened to). They now run on the worker's loop, as request_stop() does."""
    import asyncio

    from sa_jobs import Worker

    from .helpers import FAST

    seen: list[object] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with Worker(database_url, kinds=ALL, schema=schema, **FAST) as worker:
            def admin() -> None:
                try:
                    worker.pause("c")
                    (job_id,) = add(engine, CSnooze(times=0))
                    time.sleep(0.5)
                    seen.append(row(database_url, schema, job_id)[0])
                    seen.append(worker.paused())
                    # Debug mode checks that the loop is touched from its own thread only
                    # (on for this call only: it slows a whole worker down to a crawl).
                    loop.set_debug(True)
                    try:
                        worker.resume("c")
                    finally:
                        loop.set_debug(False)
                    seen.append(worker.paused())
                    seen.append(wait_for(lambda: row(database_url, schema, job_id)[0] == "completed", 10))
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    seen.append(exc)

            thread = threading.Thread(target=admin)
            thread.start()
            while thread.is_alive():
                await anyio.sleep(0.05)

    # In a daemon thread: before the fix the producer's wake-up was lost with the RuntimeError,
    # and the worker could not stop.
    runner = threading.Thread(target=anyio.run, args=(main,), daemon=True)
    runner.start()
    runner.join(30)
    assert seen == ["available", ["c"], [], True]
    assert not runner.is_alive()


def test_a_worker_logs_when_it_finds_its_queue_paused_and_resumed(engine, database_url, schema, caplog):
    """A cluster-wide pause left no trace in the worker's log: it claimed nothing and said
    nothing, while a limit on the queue is logged when the worker first sees it. An operator
    looking at an idle worker had to think of `sa-jobs queues`."""
    import logging

    from sa_jobs import pause_queue, resume_queue

    caplog.set_level(logging.INFO, logger="sa_jobs.worker")
    with Session(engine) as session, session.begin():
        pause_queue(session, "c")
    add(engine, CSnooze(times=0))
    resumed: list[float] = []

    def done() -> bool:
        if not resumed and any("cluster-wide" in r.getMessage() for r in caplog.records):
            time.sleep(0.5)  # a few more claims of the paused queue: said once
            with Session(engine) as session, session.begin():
                resume_queue(session, "c")
            resumed.append(time.monotonic())
        return states(database_url, schema) == {"completed": 1}

    run_worker_until(database_url, schema, ALL, done, timeout=10)
    said = [r.getMessage() for r in caplog.records if "cluster-wide" in r.getMessage()]
    assert len(said) == 2 and "queue 'c' is paused cluster-wide" in said[0], said
    assert "queue 'c' is no longer paused" in said[1], said


def test_wait_for_given_the_other_kind_of_engine_or_run_under_trio_is_a_configuration_error(engine, database_url, schema):
    """wait_for(async_engine) failed with SQLAlchemy's AsyncContextNotStarted (and a
    never-awaited coroutine), wait_for_async(engine) with its ArgumentError, a URL string
    with an AttributeError, and wait_for_async under anyio's trio backend with psycopg's
    bare "no running event loop": each is a ConfigurationError saying what to call."""
    pytest.importorskip("trio")
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for, wait_for_async
    from sa_jobs._url import sqlalchemy_url

    (job_id,) = add(engine, CLongAsync())
    aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
        schema_translate_map={"sa_jobs": schema})
    with pytest.raises(ConfigurationError, match="takes an Engine .*not AsyncEngine; from async code, await wait_for_async"):
        wait_for(aengine, job_id, timeout=0.1)
    with pytest.raises(ConfigurationError, match=r"wait_for\(\) takes an Engine .*not str"):
        wait_for(database_url, job_id, timeout=0.1)

    async def main() -> None:
        with pytest.raises(ConfigurationError, match=r"takes an AsyncEngine .*not (Option)?Engine; call wait_for\(\)"):
            await wait_for_async(engine, job_id, timeout=0.1)
        with pytest.raises(ConfigurationError, match="needs an asyncio event loop.*not trio"):
            await wait_for_async(aengine, job_id, timeout=0.1)

    anyio.run(main, backend="trio")
    anyio.run(aengine.dispose)


class CProgressFromOwnThread(Job, kind="c_progress_own_thread", queue="c", max_attempts=1):
    pass


@CProgressFromOwnThread.handler
def c_progress_own_thread(ctx: JobContext) -> str:
    errors: list[str] = []

    def report() -> None:  # a thread of the handler's own (a download pool, say)
        try:
            ctx.set_progress(50, "half")
        except Exception as exc:  # noqa: BLE001 - handed back as the result
            errors.append(repr(exc))

    thread = threading.Thread(target=report)
    thread.start()
    thread.join()
    time.sleep(0.5)  # room for the nudged heartbeat to write the report
    return ";".join(errors) or "ok"


def test_progress_from_a_thread_of_the_handlers_own(engine, database_url, schema):
    """anyio refuses from_thread in a thread it did not start, and set_progress then set the
    loop's event from that thread: under asyncio's debug mode the heartbeat's wake-up was
    lost, its task stuck for good, and the worker never stopped."""
    from sa_jobs import Worker

    from .helpers import FAST

    (job_id,) = add(engine, CProgressFromOwnThread())

    async def main() -> None:
        async with Worker(database_url, kinds=[CProgressFromOwnThread], schema=schema, **FAST):
            with anyio.move_on_after(10):
                while row(database_url, schema, job_id)[0] == "available" or \
                        row(database_url, schema, job_id)[0] == "running":
                    await anyio.sleep(0.05)

    runner = threading.Thread(target=anyio.run, args=(main,), kwargs={"backend_options": {"debug": True}}, daemon=True)
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "the worker did not stop"
    assert row(database_url, schema, job_id, "state, result, progress->>'message'") == ("completed", "ok", "half")


class CRestart(Job, kind="c_restart", queue="c_restart"):
    pass


RESTART_RUNS: dict[int, list[str]] = {}


@CRestart.handler
async def c_restart(ctx: JobContext) -> None:
    runs = RESTART_RUNS.setdefault(ctx.id, [])
    runs.append(f"started {ctx.attempt}")
    try:
        await anyio.sleep(60)
    finally:
        runs.append(f"ended {ctx.attempt}")


async def _a_restart_job_running(engine) -> int:  # type: ignore[no-untyped-def]
    """Enqueue a CRestart job and wait until its first attempt runs (under a worker)."""
    (job_id,) = await anyio.to_thread.run_sync(add, engine, CRestart())
    with anyio.fail_after(20):
        while RESTART_RUNS.get(job_id) != ["started 1"]:
            await anyio.sleep(0.02)
    return job_id


def test_a_running_job_cancelled_and_retried_in_one_transaction_stops_its_old_run(engine, database_url, schema):
    """"Restart this job": cancel() of a running job and retry() of it in one transaction.
    The cancel's notice reached the worker once the row was available again (the retry), so
    the notifier, which acted only on a row it read cancelled, let the old handler run on
    until the next heartbeat (a quarter of the lease: 30 s here), side by side with the
    retry's run of the same job, claimed meanwhile."""
    from sa_jobs import Worker

    from .helpers import FAST

    RESTART_RUNS.clear()  # job ids restart in each test's schema
    observer = FinishedOutcomes()
    finished = observer.outcomes

    async def main() -> None:
        async with Worker(database_url, kinds=[CRestart], schema=schema, observer=observer,
                          **{**FAST, "lease": 120.0, "shutdown_grace": 0}):
            job_id = await _a_restart_job_running(engine)

            def restart() -> None:
                with Session(engine) as session, session.begin():
                    assert cancel(session, job_id) == "running"
                    assert retry(session, job_id) == job_id

            await anyio.to_thread.run_sync(restart)
            with anyio.move_on_after(5):
                while "ended 1" not in RESTART_RUNS[job_id] or "started 2" not in RESTART_RUNS[job_id]:
                    await anyio.sleep(0.02)
            runs = list(RESTART_RUNS[job_id])
            assert "ended 1" in runs, f"the cancelled run still runs 5 s after the restart: {runs}"
            assert "started 2" in runs and "ended 2" not in runs, runs  # the retry's run goes on
            # Cancelled when its row was read available under its claim; lost when the retry
            # was claimed first (the retry's NOTIFY wakes the producers too).
            assert finished in (["cancelled"], ["lease_lost"])
            assert row(database_url, schema, job_id, "state, attempt") == ("running", 2)

    anyio.run(main)


@pytest.mark.parametrize("how", ["cancelled_and_deleted", "claimed_by_another"])
def test_a_cancel_notice_for_a_held_job_whose_row_has_moved_on_stops_its_handler(engine, database_url, schema, how):
    """The notice of a cancel reaches the worker after the row has moved on past
    'cancelled': deleted in the cancel's transaction (cancel, then delete), or cancelled,
    retried and claimed by another worker before this one read it. The claim this worker
    holds is over either way; the handler ran on until the next heartbeat (30 s here)."""
    from sa_jobs import Worker
    from sa_jobs.queries import cancel_channel_name

    from .helpers import FAST

    RESTART_RUNS.clear()  # job ids restart in each test's schema
    observer = FinishedOutcomes()
    finished = observer.outcomes

    async def main() -> None:
        async with Worker(database_url, kinds=[CRestart], schema=schema, observer=observer,
                          **{**FAST, "lease": 120.0}):
            job_id = await _a_restart_job_running(engine)

            def move_on() -> None:
                with Session(engine) as session, session.begin():
                    if how == "cancelled_and_deleted":
                        assert cancel(session, job_id) == "running"
                        assert delete_many(session, [job_id]) == [job_id]
                if how == "claimed_by_another":  # what another worker's claim of the retried job leaves
                    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET claim_token = gen_random_uuid() WHERE id = %s"),
                      (job_id,))
                    q(database_url, "SELECT pg_notify(%s, %s)", (cancel_channel_name(schema), str(job_id)))  # the cancel's

            await anyio.to_thread.run_sync(move_on)
            with anyio.move_on_after(5):
                while not finished:
                    await anyio.sleep(0.02)
            assert RESTART_RUNS[job_id] == ["started 1", "ended 1"], "the handler still runs 5 s after the notice"
            assert finished == ["lease_lost"]
            if how == "claimed_by_another":  # the other claim's row is left as it is
                assert row(database_url, schema, job_id, "state, attempt") == ("running", 1)

    anyio.run(main)


def test_a_heartbeat_that_finds_its_job_cancelled_under_another_claim_presumes_its_lease_lost(engine, database_url,
                                                                                              schema):
    """A job this worker no longer holds (its lease ran out, another worker claimed it) and
    that was cancelled under that other claim: the heartbeat read 'cancelled' and ended the
    stale attempt as cancelled by the user, with ``ctx.lease_lost`` false, and counted a
    second 'cancelled' for the job. The notifier checks the claim; the heartbeat now does."""
    from sa_jobs import Worker

    from .helpers import FAST

    RESTART_RUNS.clear()  # job ids restart in each test's schema
    observer = FinishedOutcomes()
    finished = observer.outcomes

    async def main() -> None:
        async with Worker(database_url, kinds=[CRestart], schema=schema, observer=observer, **FAST):
            job_id = await _a_restart_job_running(engine)
            # What another worker's claim and a cancel under it leave; no notice reaches this
            # worker (it was sent while its listener was down, say).
            await anyio.to_thread.run_sync(q, database_url, jobs_sql(
                schema, "UPDATE {jobs} SET claim_token = gen_random_uuid(), state = 'cancelled', lease_expires_at = NULL,"
                " finished_at = now() WHERE id = %s"), (job_id,))
            with anyio.fail_after(10):
                while not finished:
                    await anyio.sleep(0.02)
        assert finished == ["lease_lost"]

    anyio.run(main)


def test_a_local_pause_of_a_worker_that_is_not_running_is_refused(engine, database_url, schema):
    """pause() of a worker whose run has ended returned as if it had paused the queue, and
    paused() listed it, but the next run of the worker (an app's lifespan entered again)
    claimed from it: each run starts afresh. It is refused, as before the first run."""
    from sa_jobs import ConfigurationError, Worker

    from .helpers import FAST

    worker = Worker(database_url, kinds=[CSnooze], schema=schema, **FAST)
    with pytest.raises(ConfigurationError, match="not started yet"):
        worker.pause("c")
    (job_id,) = add(engine, CSnooze(times=0))

    async def main() -> None:
        async with worker:
            worker.pause("c")
            assert worker.paused() == ["c"]
        for action in (worker.pause, worker.resume):
            with pytest.raises(ConfigurationError, match="not running"):
                action("c")
        assert worker.paused() == []
        async with worker:  # a new run: nothing paused, and it says so
            assert worker.paused() == []
            with anyio.fail_after(10):
                while row(database_url, schema, job_id)[0] != "completed":
                    await anyio.sleep(0.05)

    anyio.run(main)


def test_cancels_racing_two_worker_processes_leave_each_job_completed_once_or_cancelled_without_effects(
        engine, database_url, schema):
    """cancel_many() of jobs while two worker processes claim and finish them: sync handlers
    that never look at ctx.cancelled and async ones, writing their effect in the job's own
    transaction, and plain ones whose result the completer writes. Whatever each cancel met
    (waiting, claimed, running, in its transaction, returned, written), a job ends completed
    with its result and exactly one effect, or cancelled with neither; none runs twice."""
    import os
    import random
    import signal

    from .conftest import start_worker_process
    from .jobs_control import CtlRaceAsync, CtlRacePlain, CtlRaceSync
    from .jobs_core import effects_ddl

    q(database_url, effects_ddl(schema))
    os.environ["SA_JOBS_DATABASE_URL"] = database_url
    kinds = (CtlRaceSync, CtlRaceAsync, CtlRacePlain)
    ids = add(engine, *[kinds[i % 3]() for i in range(600)])
    workers = [start_worker_process(database_url, schema, "tests.jobs_control", "--concurrency", "8",
                                    "--shutdown-grace", "5") for _ in range(2)]
    seen: dict[str, int] = {}
    try:
        rng = random.Random(7)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            left = q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs} WHERE state NOT IN"
                                                    " ('completed', 'cancelled') ORDER BY id"))
            if not left:
                break
            running = [i for i, state in left if state == "running"]
            # Mostly running ones: those are the races (a waiting job's cancel is one UPDATE).
            pool = running if running and rng.random() < 0.8 else [i for i, _ in left]
            with Session(engine) as session, session.begin():
                for state in cancel_many(session, rng.sample(pool, min(len(pool), rng.randint(1, 4)))).values():
                    seen[state] = seen.get(state, 0) + 1
            time.sleep(rng.uniform(0, 0.02))
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.communicate(timeout=30)
    rows = q(database_url, jobs_sql(schema, "SELECT j.id, j.state, j.attempt, j.result, j.finished_at IS NOT NULL,"
                                            " j.lease_expires_at, (SELECT count(*) FROM {effects} e WHERE e.job_id = j.id)"
                                            " FROM {jobs} j ORDER BY j.id"))
    assert len(rows) == len(ids)
    assert seen.get("running", 0) > 20, seen  # the race was run: running jobs were cancelled
    bad = [r for r in rows if not (
        (r[1] == "completed" and r[3] == r[0] and r[6] == (0 if r[0] % 3 == 0 else 1) or
         r[1] == "cancelled" and r[3] is None and r[6] == 0)
        and r[2] <= 1 and r[4] and r[5] is None)]
    # Plain jobs (kinds[i % 3] with i = id - 1: ids 3, 6, ...) write no effect of their own.
    assert not bad, bad[:10]


def test_cancel_and_queue_settings_through_a_session_with_per_mapper_binds(engine, database_url, schema):
    """An app whose Session binds its mappers to engines one by one (``binds={Job: engine,
    ...}``, as multi-database apps do) has no single bind. cancel() of a running job sends
    its NOTIFY, and pause_queue() and the other queue settings write a table that is not
    Job's: each statement naming no jobs table failed with UnboundExecutionError, rolling
    back the caller's transaction (the running job was not cancelled at all)."""
    from sa_jobs import QueueLimits, Worker, pause_queue, paused_queues, queue_limits, resume_queue, set_queue_limits
    from sa_jobs.admin import queue_overview

    from .helpers import FAST

    STARTED.clear()  # job ids restart in each test's schema

    def multi_bind() -> Session:
        return Session(binds={Job: engine})

    async def main() -> None:
        async with Worker(database_url, kinds=[CLongAsync], schema=schema, **{**FAST, "lease": 120.0}) as worker:
            (job_id,) = await anyio.to_thread.run_sync(add, engine, CLongAsync())
            with anyio.fail_after(20):
                while job_id not in STARTED:
                    await anyio.sleep(0.02)

            def cancel_it() -> None:
                with multi_bind() as session, session.begin():
                    assert cancel(session, job_id) == "running"

            await anyio.to_thread.run_sync(cancel_it)
            with anyio.fail_after(5):  # told by the NOTIFY, not by a heartbeat 30 s later
                while worker.running_jobs():
                    await anyio.sleep(0.02)
        assert row(database_url, schema, job_id)[0] == "cancelled"

    anyio.run(main)
    with multi_bind() as session, session.begin():
        pause_queue(session, "c")
        set_queue_limits(session, "c", QueueLimits(concurrency=2))
    with multi_bind() as session:
        assert paused_queues(session) == ["c"]
        assert queue_limits(session, "c") == QueueLimits(concurrency=2)
        assert [(r["queue"], r["paused"], r["concurrency"]) for r in queue_overview(session)] == [("c", True, 2)]
    with multi_bind() as session, session.begin():
        resume_queue(session, "c")
    with Session(engine) as session:
        assert paused_queues(session) == []


@pytest.mark.parametrize("through", ["session", "connection"])
def test_cancel_and_retry_through_an_autocommit_engine(engine, database_url, schema, through, request):
    """An operator's script on an AUTOCOMMIT engine (each statement its own transaction):
    cancel() and retry() wrap their UPDATE in a savepoint, and a SAVEPOINT outside a
    transaction block failed with psycopg's InternalError. There the statement needs none;
    a key taken concurrently fails only that statement, and the retry of one row still
    skips only itself."""
    from sqlalchemy import create_engine

    # An engine of its own, not engine.execution_options(isolation_level=...): on the
    # SQLAlchemy 2.0.30 floor that fails on an engine with options already set.
    autocommit = create_engine(engine.url, isolation_level="AUTOCOMMIT").execution_options(
        schema_translate_map=engine.get_execution_options()["schema_translate_map"])
    request.addfinalizer(autocommit.dispose)
    (job_id,) = add(engine, CLongAsync())
    (first,) = add(engine, CUnique(key="twin"))
    _finish(database_url, schema, first)
    (second,) = add(engine, CUnique(key="twin"))
    _finish(database_url, schema, second)

    def act(call):  # type: ignore[no-untyped-def]
        if through == "session":
            with Session(autocommit) as session:
                return call(session)
        with autocommit.connect() as connection:
            return call(connection)

    assert act(lambda s: cancel(s, job_id)) == "available"
    assert row(database_url, schema, job_id)[0] == "cancelled"
    assert act(lambda s: retry(s, job_id)) == job_id
    assert row(database_url, schema, job_id)[0] == "available"
    # Both finished jobs of one key: the second's UPDATE fails alone, and is skipped.
    assert act(lambda s: sorted(retry_many(s, [first, second, job_id]))) == [first]
    assert [row(database_url, schema, i)[0] for i in (first, second)] == ["available", "dead"]
    assert act(lambda s: cancel_many(s, [first, second, job_id])) == {first: "available", job_id: "available"}


def test_a_cancel_heard_between_the_claim_and_the_inbox_stops_the_job_at_once(engine, database_url, schema):
    """A cancel committed right after the claim committed, its notice heard before the
    claimed jobs reached the worker's inbox: the listener looked the job up among the jobs
    the worker held, did not find it, and dropped the notice. The handler ran on until
    the next heartbeat (30 s here). The claim now checks the notices heard while it ran."""
    from sa_jobs import Worker

    STARTED.clear()  # job ids restart in each test's schema
    observer = FinishedOutcomes()
    cancelled_at: list[float] = []

    def cancel_now(job_id: int) -> None:
        with Session(engine) as session, session.begin():
            assert cancel(session, job_id) == "running"

    async def main() -> None:
        worker = Worker(database_url, kinds=ALL, schema=schema, observer=observer, lease=120,
                        poll_interval=0.2, maintenance_interval=0.1)
        heard = anyio.Event()
        claim, held = worker._claim, worker._held_ids

        def held_ids() -> list[int]:
            if cancelled_at:  # the listener looks up the jobs held as it takes the notice
                heard.set()
            return held()

        async def claim_then_cancel(*args):  # type: ignore[no-untyped-def]
            jobs = await claim(*args)
            if jobs and not cancelled_at:
                # The claim committed; its jobs are not in the inbox yet.
                cancelled_at.append(time.monotonic())
                await anyio.to_thread.run_sync(cancel_now, jobs[0].id)
                with anyio.fail_after(10):
                    await heard.wait()  # the listener has taken the notice
            return jobs

        worker._claim, worker._held_ids = claim_then_cancel, held_ids  # type: ignore[method-assign]
        async with worker:
            with anyio.fail_after(10):
                while worker.notifier is None or not worker.notifier.listening:
                    await anyio.sleep(0.01)
            await anyio.to_thread.run_sync(add, engine, CLongAsync())
            with anyio.fail_after(20):
                while not observer.outcomes:
                    await anyio.sleep(0.02)
            ended = time.monotonic()
        assert ended - cancelled_at[0] < 3, f"the job ended {ended - cancelled_at[0]:.1f} s after its cancel"

    anyio.run(main)
    assert observer.outcomes == ["cancelled"]
    assert states(database_url, schema) == {"cancelled": 1}


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_wait_for_on_a_server_that_never_answers_ends_near_its_deadline(engine, flavour):
    """The wait's reads were bounded on the server (statement_timeout), but connecting was
    not: on a host that takes the connection and never answers (packets dropped after
    the handshake, a hung proxy), a wait of 1 s connected for as long as the driver's
    default connect timeout (psycopg: 130 s). Here the kernel completes the handshake of
    a listener that never accepts, so nothing ever answers."""
    import socket

    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs import wait_for, wait_for_async

    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    port = listener.getsockname()[1]
    url = make_url(engine.url).set(host="127.0.0.1", port=port, query={})
    outcome: list[BaseException | None] = []
    started = time.monotonic()
    try:
        if flavour == "sync":
            silent = create_engine(url)

            def run() -> None:
                try:
                    wait_for(silent, 1, timeout=1)
                    outcome.append(None)
                except BaseException as exc:  # noqa: BLE001 - looked at below
                    outcome.append(exc)

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            thread.join(15)
        else:
            async def main() -> None:
                silent = create_async_engine(url.set(drivername="postgresql+psycopg_async"))
                try:
                    with anyio.move_on_after(15):
                        try:
                            await wait_for_async(silent, 1, timeout=1)
                            outcome.append(None)
                        except Exception as exc:  # noqa: BLE001 - looked at below
                            outcome.append(exc)
                finally:
                    await silent.dispose()

            anyio.run(main)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert outcome and outcome[0] is not None, f"the wait was still connecting after {time.monotonic() - started:.0f}s"
    assert elapsed < 5, f"a wait of 1 s ended after {elapsed:.1f}s"


PROGRESS_SEEN = threading.Event()


class CProgressBurst(Job, kind="c_progress_burst", queue="c"):
    pass


@CProgressBurst.handler
def c_progress_burst(ctx: JobContext, calls: int) -> None:
    for i in range(1, calls + 1):
        ctx.set_progress(100 * i / calls, f"row {i}")
    # The last report reaches the row while the job runs (by a heartbeat, not the outcome).
    PROGRESS_SEEN.wait(20)


def test_progress_reports_of_a_sync_handler_wake_the_loop_once_per_beat(engine, database_url, schema, monkeypatch):
    """Each ctx.set_progress() of a sync handler scheduled a wake-up of the event loop
    (call_soon_threadsafe, about 35 µs each), though one already on its way, or a beat
    already due, writes the latest report anyway. Counted: the heartbeat's nudges."""
    from sa_jobs.worker.heartbeat import Heartbeat

    nudges: list[int] = []
    nudge = Heartbeat.nudge

    def counted(self: Heartbeat) -> None:
        nudges.append(1)
        nudge(self)

    monkeypatch.setattr(Heartbeat, "nudge", counted)
    PROGRESS_SEEN.clear()
    (job_id,) = add(engine, CProgressBurst(calls=2000))

    def last_report_written() -> bool:
        progress = row(database_url, schema, job_id, "progress")[0]
        if progress and progress["message"] == "row 2000":
            PROGRESS_SEEN.set()
        return row(database_url, schema, job_id)[0] == "completed"

    run_worker_until(database_url, schema, [CProgressBurst], last_report_written, lease=30.0)
    assert PROGRESS_SEEN.is_set() and row(database_url, schema, job_id)[0] == "completed"
    assert row(database_url, schema, job_id, "progress")[0]["percent"] == 100
    # One per beat the burst met (a beat waits for its nudge's gap, then writes): a few, not 2000.
    assert 1 <= len(nudges) <= 20, len(nudges)


class CDeafSync(Job, kind="c_deaf_sync", queue="c_deaf"):
    """A sync handler that never polls ctx.cancelled: it runs until the test lets it go."""


DEAF_RUNS: dict[int, list[str]] = {}
DEAF_GO = threading.Event()


async def _first_call_started(engine, kind) -> int:  # type: ignore[no-untyped-def]
    """Enqueue a job of ``kind``; its id once its handler's first call has started."""
    (job_id,) = await anyio.to_thread.run_sync(add, engine, kind())
    with anyio.fail_after(20):
        while DEAF_RUNS.get(job_id) != ["started 1"]:
            await anyio.sleep(0.02)
    return job_id


async def _second_attempt_claimed_not_started(database_url: str, schema: str, job_id: int) -> None:
    """The job's second attempt is claimed (its row running under a new claim), and does
    not start within 1.5 s while the first call still runs."""
    with anyio.fail_after(10):
        while row(database_url, schema, job_id, "state, attempt") != ("running", 2):
            await anyio.sleep(0.02)
    with anyio.move_on_after(1.5):
        while len(DEAF_RUNS[job_id]) == 1:
            await anyio.sleep(0.02)
    assert DEAF_RUNS[job_id] == ["started 1"], f"two copies of the job ran at once: {DEAF_RUNS[job_id]}"


@CDeafSync.handler
def c_deaf_sync(ctx: JobContext) -> None:
    runs = DEAF_RUNS.setdefault(ctx.id, [])
    runs.append(f"started {ctx.attempt}")
    try:
        DEAF_GO.wait(30)
    finally:
        runs.append(f"ended {ctx.attempt}")


@pytest.mark.parametrize("how", ["two_transactions", "one_transaction", "retry_many"])
def test_a_retry_of_a_cancelled_sync_job_does_not_run_beside_its_abandoned_thread(engine, database_url, schema, how):
    """cancel() of a running job whose sync handler ignores ctx.cancelled, then retry() of it:
    the row was cancelled at once, so the retry made it available and a second slot of the
    same worker claimed it and ran the handler again while the first call still ran in its
    thread: two copies of the job at once."""
    from sa_jobs import Worker

    from .helpers import FAST

    DEAF_RUNS.clear()
    DEAF_GO.clear()

    async def main() -> None:
        async with Worker(database_url, kinds=[CDeafSync], schema=schema, queues={"c_deaf": 2},
                          **{**FAST, "lease": 120.0, "shutdown_grace": 5}):
            try:
                job_id = await _first_call_started(engine, CDeafSync)

                def cancel_then_retry() -> None:
                    if how == "one_transaction":
                        with Session(engine) as session, session.begin():
                            assert cancel(session, job_id) == "running"
                            assert retry(session, job_id) == job_id
                        return
                    with Session(engine) as session, session.begin():
                        assert cancel(session, job_id) == "running"
                    with Session(engine) as session, session.begin():
                        if how == "retry_many":
                            assert list(retry_many(session, [job_id])) == [job_id]
                        else:
                            assert retry(session, job_id) == job_id

                await anyio.to_thread.run_sync(cancel_then_retry)
                await _second_attempt_claimed_not_started(database_url, schema, job_id)
                DEAF_GO.set()  # the first call returns: the retry's attempt runs now
                with anyio.fail_after(10):
                    while row(database_url, schema, job_id, "state, attempt")[0] != "completed":
                        await anyio.sleep(0.02)
                assert DEAF_RUNS[job_id] == ["started 1", "ended 1", "started 2", "ended 2"]
            finally:
                DEAF_GO.set()

    anyio.run(main)


@pytest.mark.parametrize("how", ["cancelled_again", "worker_stops"])
def test_a_retry_waiting_for_its_abandoned_thread_can_be_cancelled_or_released(engine, database_url, schema, how):
    """The retry's attempt that waits for the abandoned call of its job (above) is a claim
    like any other: a cancel() ends it without starting the handler, and a stop releases it
    to run later; neither waits for the old thread."""
    from sa_jobs import Worker

    from .helpers import FAST

    DEAF_RUNS.clear()
    DEAF_GO.clear()
    observer = FinishedOutcomes()

    async def main() -> None:
        try:
            async with Worker(database_url, kinds=[CDeafSync], schema=schema, queues={"c_deaf": 2}, observer=observer,
                              **{**FAST, "lease": 120.0, "shutdown_grace": 0.2}):
                job_id = await _first_call_started(engine, CDeafSync)

                def cancel_then_retry() -> None:
                    with Session(engine) as session, session.begin():
                        assert cancel(session, job_id) == "running"
                    with Session(engine) as session, session.begin():
                        assert retry(session, job_id) == job_id

                await anyio.to_thread.run_sync(cancel_then_retry)
                with anyio.fail_after(10):
                    while row(database_url, schema, job_id, "state, attempt") != ("running", 2):
                        await anyio.sleep(0.02)
                if how == "cancelled_again":
                    def cancel_it() -> None:
                        with Session(engine) as session, session.begin():
                            assert cancel(session, job_id) == "running"

                    await anyio.to_thread.run_sync(cancel_it)
                    with anyio.fail_after(10):
                        while observer.outcomes != ["cancelled", "cancelled"]:
                            await anyio.sleep(0.02)
            # The stop did not wait for the old thread (grace 0.2 s) nor start the retry's run.
            assert DEAF_RUNS[job_id] == ["started 1"]
            expected = ("cancelled", 2) if how == "cancelled_again" else ("available", 1)
            assert row(database_url, schema, job_id, "state, attempt") == expected
        finally:
            DEAF_GO.set()

    anyio.run(main)


class CSlowUnwind(Job, kind="c_slow_unwind", queue="c_deaf"):
    """An async handler whose cleanup, shielded from the cancellation, takes until the test lets it go."""


class CDeafTimeout(Job, kind="c_deaf_timeout", queue="c_deaf", timeout=0.3, max_attempts=2,
                   backoff=constant_backoff(0)):
    """A sync handler past its timeout, retried at once, that never polls ctx.cancelled."""


@CSlowUnwind.handler
async def c_slow_unwind(ctx: JobContext) -> None:
    runs = DEAF_RUNS.setdefault(ctx.id, [])
    runs.append(f"started {ctx.attempt}")
    try:
        await anyio.sleep(30 if not DEAF_GO.is_set() else 0)
    finally:
        with anyio.CancelScope(shield=True):
            while not DEAF_GO.is_set():
                await anyio.sleep(0.02)
        runs.append(f"ended {ctx.attempt}")


CDeafTimeout.handler(c_deaf_sync)


@pytest.mark.parametrize("kind", [CSlowUnwind, CDeafTimeout], ids=["async_unwinding", "sync_timed_out"])
def test_an_attempt_cut_short_still_running_keeps_its_next_attempt_waiting(engine, database_url, schema, kind):
    """Neighbours of the cancel-then-retry case: an async handler cancelled (and retried)
    while its shielded cleanup runs, and a sync handler past its timeout whose retry is due
    at once. The row ended at once both times and a second slot of the worker ran the next
    attempt beside the first."""
    from sa_jobs import Worker

    from .helpers import FAST

    DEAF_RUNS.clear()
    DEAF_GO.clear()

    async def main() -> None:
        async with Worker(database_url, kinds=[kind], schema=schema, queues={"c_deaf": 2},
                          **{**FAST, "lease": 120.0, "shutdown_grace": 5}):
            try:
                job_id = await _first_call_started(engine, kind)
                if kind is CSlowUnwind:
                    def cancel_then_retry() -> None:
                        with Session(engine) as session, session.begin():
                            assert cancel(session, job_id) == "running"
                        with Session(engine) as session, session.begin():
                            assert retry(session, job_id) == job_id

                    await anyio.to_thread.run_sync(cancel_then_retry)
                await _second_attempt_claimed_not_started(database_url, schema, job_id)
                DEAF_GO.set()
                with anyio.fail_after(10):
                    while row(database_url, schema, job_id, "state")[0] not in ("completed", "dead"):
                        await anyio.sleep(0.02)
                assert DEAF_RUNS[job_id][:3] == ["started 1", "ended 1", "started 2"]
            finally:
                DEAF_GO.set()

    anyio.run(main)


@pytest.mark.xfail(strict=True, reason="known limit (docs/core.md): a thread another worker abandoned is not"
                                       " visible in the row, so another worker runs the retry beside it")
def test_a_retry_of_a_cancelled_sync_job_on_another_worker_runs_beside_its_abandoned_thread(engine, database_url,
                                                                                          schema):
    """The same cancel() then retry() with two workers of one slot each: the worker whose
    thread runs on has no free slot, and the other claims and runs the retry at once."""
    from sa_jobs import Worker

    from .helpers import FAST

    DEAF_RUNS.clear()
    DEAF_GO.clear()
    options = dict(kinds=[CDeafSync], schema=schema, queues={"c_deaf": 1}, **{**FAST, "lease": 120.0,
                                                                               "shutdown_grace": 5})

    async def main() -> None:
        async with Worker(database_url, **options), Worker(database_url, **options):  # type: ignore[arg-type]
            try:
                job_id = await _first_call_started(engine, CDeafSync)

                def cancel_then_retry() -> None:
                    with Session(engine) as session, session.begin():
                        assert cancel(session, job_id) == "running"
                        assert retry(session, job_id) == job_id

                await anyio.to_thread.run_sync(cancel_then_retry)
                with anyio.move_on_after(3):
                    while len(DEAF_RUNS[job_id]) == 1:
                        await anyio.sleep(0.02)
                assert DEAF_RUNS[job_id] == ["started 1"], f"two copies of the job ran at once: {DEAF_RUNS[job_id]}"
            finally:
                DEAF_GO.set()

    anyio.run(main)
