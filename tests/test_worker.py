"""The worker, in-process against real PostgreSQL: run, retry, dead, replay, timeout, fencing."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import functools
import inspect
import json
import math
import threading
import time
import uuid
from typing import Any, Awaitable, Callable

import anyio
import sys
import psycopg
from psycopg import sql
import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from sa_jobs import (
    ConfigurationError,
    Discard,
    InvalidArgsError,
    Job,
    JobContext,
    JobNotFoundError,
    SchemaVersionError,
    Worker,
    constant_backoff,
    retry,
)
from sa_jobs._url import to_conninfo
from sa_jobs.queries import Queries
from sa_jobs.events import NullObserver
from sa_jobs.retry import backoff_bounds, exponential_backoff
from sa_jobs.worker._job import HandlerThread
from sa_jobs.worker.worker import UNKNOWN_KIND_BACKOFF_BASE
from sa_jobs.testing import perform, perform_async

from .helpers import FAST, LoopErrors, jobs_sql, q, run_worker_until, states

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

CALLS: dict[str, list[int]] = {}


class WFlaky(Job, kind="w_flaky", queue="w", max_attempts=3, backoff=constant_backoff(0.05)):
    pass


@WFlaky.handler
async def w_flaky(ctx: JobContext, fail_times: int) -> dict:
    CALLS.setdefault("flaky", []).append(ctx.attempt)
    if ctx.attempt <= fail_times:
        raise RuntimeError(f"failure {ctx.attempt} with secret-ish detail")
    return {"ok": True, "attempt": ctx.attempt}


class WSync(Job, kind="w_sync", queue="w"):
    pass


@WSync.handler
def w_sync(ctx: JobContext, a: int, b: int) -> int:
    return a + b


class WTimeout(Job, kind="w_timeout", queue="w", timeout=0.3, max_attempts=2, backoff=constant_backoff(0.05)):
    pass


@WTimeout.handler
async def w_timeout(ctx: JobContext, seconds: float) -> None:
    await anyio.sleep(seconds)


class WSyncTimeout(Job, kind="w_sync_timeout", queue="w", timeout=0.3, max_attempts=1):
    pass


@WSyncTimeout.handler
def w_sync_timeout(ctx: JobContext) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        ctx.raise_if_cancelled()
        time.sleep(0.01)


class WDiscard(Job, kind="w_discard", queue="w", max_attempts=10):
    pass


@WDiscard.handler
async def w_discard(ctx: JobContext) -> None:
    raise Discard("the input can never succeed")


class WBackoff(Job, kind="w_backoff", queue="w", max_attempts=5, backoff=constant_backoff(30)):
    pass


@WBackoff.handler
async def w_backoff(ctx: JobContext) -> None:
    raise ValueError("try later")


class WBadResult(Job, kind="w_bad_result", queue="w", max_attempts=3):
    pass


@WBadResult.handler
async def w_bad_result(ctx: JobContext) -> object:
    return object()


ALL = [WFlaky, WSync, WTimeout, WSyncTimeout, WDiscard, WBackoff, WBadResult]


def add(engine, *jobs: Job) -> list[int]:
    with Session(engine) as session, session.begin():
        session.add_all(jobs)
        session.flush()
        return [j.id for j in jobs]


def job_row(engine, job_id: int) -> Job:
    with Session(engine) as session:
        return session.get(Job, job_id)


def finished(engine, ids: list[int], states_=("completed", "dead")):
    def check() -> bool:
        with Session(engine) as session:
            rows = session.execute(select(Job.state).where(Job.id.in_(ids))).scalars().all()
            return len(rows) == len(ids) and all(s in states_ for s in rows)

    return check


def test_runs_once_and_stores_result(engine, database_url, schema):
    ids = add(engine, WSync(a=2, b=3), WFlaky(fail_times=0))
    run_worker_until(database_url, schema, ALL, finished(engine, ids))
    sync_job, flaky = job_row(engine, ids[0]), job_row(engine, ids[1])
    assert (sync_job.state, sync_job.attempt, sync_job.result) == ("completed", 1, 5)
    assert (flaky.state, flaky.attempt, flaky.result) == ("completed", 1, {"ok": True, "attempt": 1})
    assert sync_job.finished_at is not None and sync_job.lease_owner is not None


def test_retry_then_success_records_each_error(engine, database_url, schema):
    (job_id,) = add(engine, WFlaky(fail_times=2))
    run_worker_until(database_url, schema, ALL, finished(engine, [job_id]))
    job = job_row(engine, job_id)
    assert (job.state, job.attempt) == ("completed", 3)
    assert [e["attempt"] for e in job.errors] == [1, 2]
    assert all("RuntimeError: failure" in e["error"] and "Traceback" in e["traceback"] and e["at"] for e in job.errors)


def test_dead_after_max_attempts_then_replay_adds_one_attempt(engine, database_url, schema):
    (job_id,) = add(engine, WFlaky(fail_times=99))
    run_worker_until(database_url, schema, ALL, finished(engine, [job_id]))
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, job.max_attempts) == ("dead", 3, 3)
    assert len(job.errors) == 3 and job.finished_at is not None

    with Session(engine) as session, session.begin():
        assert retry(session, job_id) == job_id
    job = job_row(engine, job_id)
    assert (job.state, job.max_attempts, job.finished_at) == ("available", 4, None)
    run_worker_until(database_url, schema, ALL, finished(engine, [job_id]))
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, len(job.errors)) == ("dead", 4, 4)

    with Session(engine) as session, session.begin():
        with pytest.raises(JobNotFoundError):
            retry(session, 10**12)


def test_backoff_is_scheduled_on_database_clock(engine, database_url, schema):
    (job_id,) = add(engine, WBackoff())
    run_worker_until(
        database_url, schema, ALL,
        lambda: job_row(engine, job_id).state == "retryable",
    )
    (delay,) = q(database_url, jobs_sql(schema, "SELECT extract(epoch FROM scheduled_at - attempted_at) FROM {jobs} WHERE id = %s"), (job_id,))[0]
    assert 29.9 <= float(delay) <= 30.5
    assert job_row(engine, job_id).attempt == 1


class WHugeBackoff(Job, kind="w_huge_backoff", queue="w", max_attempts=3, backoff=lambda attempt: 10.0 ** 14):
    pass


@WHugeBackoff.handler
async def w_huge_backoff(ctx: JobContext) -> None:
    raise ValueError("try much later")


def test_an_uncapped_backoff_is_capped_and_the_failure_recorded(engine, database_url, schema):
    """A policy of 1e14 s named a time PostgreSQL refuses: the completer dropped the
    failure, the job sat running until its lease ran out and was rescued as LeaseExpired."""
    (job_id,) = add(engine, WHugeBackoff())
    run_worker_until(database_url, schema, [WHugeBackoff], lambda: job_row(engine, job_id).state == "retryable",
                     timeout=10)
    job = job_row(engine, job_id)
    assert (job.state, job.attempt) == ("retryable", 1)
    assert [e["error"] for e in job.errors] == ["ValueError: try much later"]
    (delay,) = q(database_url, jobs_sql(schema, "SELECT extract(epoch FROM scheduled_at - attempted_at) FROM {jobs} WHERE id = %s"), (job_id,))[0]
    assert 365 * 24 * 3600 < float(delay) <= 367 * 24 * 3600


async def _async_policy(attempt: int) -> float:
    return 0.05


def test_an_async_backoff_policy_is_refused_at_the_class_statement():
    """The worker calls a policy on its loop, never awaiting it: float(coroutine) failed at
    every retry, logged, and the default backoff applied instead of the kind's own."""
    with pytest.raises(ConfigurationError, match="not async"):
        class WAsyncBackoff(Job, kind="w_async_backoff", backoff=_async_policy):  # noqa: F841
            pass
    with pytest.raises(ConfigurationError, match="not async"):
        class WAsyncBackoffChild(WFlaky, kind="w_async_backoff_child", backoff=functools.partial(_async_policy)):  # noqa: F841
            pass


def test_exponential_backoff_bounds():
    for attempt in (1, 2, 5, 10, 100, 10**6):
        low, high = backoff_bounds(attempt)
        for _ in range(50):
            assert low <= exponential_backoff(attempt) <= high
    assert backoff_bounds(1) == (0.9, 1.1)
    assert backoff_bounds(10**6)[1] <= 24 * 3600 * 1.1


def test_timeout_async_and_sync(engine, database_url, schema):
    ids = add(engine, WTimeout(seconds=10), WSyncTimeout())
    started = time.monotonic()
    run_worker_until(database_url, schema, ALL, finished(engine, ids))
    assert time.monotonic() - started < 8
    async_job, sync_job = job_row(engine, ids[0]), job_row(engine, ids[1])
    assert (async_job.state, async_job.attempt) == ("dead", 2)
    assert all(e["error"].startswith("TimeoutError") for e in async_job.errors)
    assert sync_job.state == "dead" and sync_job.errors[0]["error"].startswith("TimeoutError")



class WTimeoutConverted(Job, kind="w_timeout_converted", queue="w", timeout=0.3, max_attempts=2,
                        backoff=constant_backoff(0.05)):
    pass


@WTimeoutConverted.handler
async def w_timeout_converted(ctx: JobContext) -> None:
    try:
        await anyio.sleep(10)
    except anyio.get_cancelled_exc_class():
        # What a client library may do when cancelled mid-request: raise its own error.
        raise ConnectionResetError("connection closed while a request was in flight") from None


def test_a_timeout_the_handler_turns_into_another_error_is_recorded_as_a_timeout(engine, database_url, schema):
    """A handler past its timeout is cancelled; one that answers the cancellation with an
    error of its own (a client library closing its connection) was recorded as that error,
    an ordinary failure (outcome retried, then dead), with no word of the timeout: the
    operator saw 'ConnectionResetError' and looked for a network fault."""
    (job_id,) = add(engine, WTimeoutConverted())
    outcomes = Outcomes()
    run_worker_until(database_url, schema, [WTimeoutConverted], finished(engine, [job_id]), observer=outcomes)
    job = job_row(engine, job_id)
    assert (job.state, job.attempt) == ("dead", 2)
    assert [e["error"] for e in job.errors] == [
        f"TimeoutError: job {job_id} (w_timeout_converted) ran longer than its timeout of 0.3s"] * 2
    assert all("ConnectionResetError: connection closed" in e["traceback"] for e in job.errors)
    assert outcomes.seen == [("w_timeout_converted", "timed_out"), ("w_timeout_converted", "dead")]


class WTimeoutSwallowed(Job, kind="w_timeout_swallowed", queue="w", timeout=0.3, max_attempts=2,
                        backoff=constant_backoff(0.05)):
    pass


@WTimeoutSwallowed.handler
async def w_timeout_swallowed(ctx: JobContext, catch_all: bool) -> str:
    try:
        await anyio.sleep(10)
    except BaseException if catch_all else anyio.get_cancelled_exc_class():  # noqa: B036 - what handlers do
        return "finished anyway"  # swallows its cancellation and returns a value
    return "slept"


@pytest.mark.parametrize("catch_all", [False, True], ids=["cancelled-exc", "base-exception"])
def test_a_timed_out_handler_that_swallows_its_cancellation_is_recorded_as_a_timeout(engine, database_url, schema,
                                                                                     catch_all):
    """A handler past its timeout that caught the cancellation and returned a value was
    stored as completed, its result kept: the timeout was lost, and with it the retry."""
    (job_id,) = add(engine, WTimeoutSwallowed(catch_all=catch_all))
    outcomes = Outcomes()
    run_worker_until(database_url, schema, [WTimeoutSwallowed], finished(engine, [job_id]), observer=outcomes)
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, job.result) == ("dead", 2, None)
    assert [e["error"] for e in job.errors] == [
        f"TimeoutError: job {job_id} (w_timeout_swallowed) ran longer than its timeout of 0.3s"] * 2
    assert outcomes.seen == [("w_timeout_swallowed", "timed_out"), ("w_timeout_swallowed", "dead")]


class WReplyAtDeadline(Job, kind="w_reply_at_deadline", queue="w", timeout=0.5, max_attempts=1):
    pass


@WReplyAtDeadline.handler
async def w_reply_at_deadline(ctx: JobContext) -> str:
    return await _answer_while_the_loop_is_busy(lambda reply: reply.set_result("replied"))


async def _answer_while_the_loop_is_busy(settle: Callable[[asyncio.Future], None]) -> Any:
    """Await a reply that ``settle`` gives well within a 0.5 s timeout, while other work
    holds the event loop past the deadline."""
    loop = asyncio.get_running_loop()
    reply = loop.create_future()
    loop.call_later(0.2, settle, reply)
    loop.call_later(0.1, time.sleep, 0.7)
    return await reply


def _hold_the_loop_past_a_1s_deadline(ctx: JobContext) -> None:
    """From a sync handler's thread: the event loop is busy past the deadline, while the
    handler itself is done (returns or raises) within it."""
    ctx._worker._loop.call_soon_threadsafe(time.sleep, 1.5)
    time.sleep(0.1)


class WSyncReturnsAtDeadline(Job, kind="w_sync_returns_at_deadline", queue="w", timeout=1.0, max_attempts=1):
    pass


@WSyncReturnsAtDeadline.handler
def w_sync_returns_at_deadline(ctx: JobContext) -> str:
    _hold_the_loop_past_a_1s_deadline(ctx)
    return "done"  # returned well within the timeout


@pytest.mark.parametrize("kind", [WReplyAtDeadline, WSyncReturnsAtDeadline], ids=["async", "sync"])
def test_a_handler_that_returned_before_its_cancellation_reached_it_completes(engine, database_url, schema, kind):
    """A handler whose last await (an async one's reply, a sync one's thread) completed
    within its timeout, while the event loop was busy past the deadline: the loop then runs
    both, and anyio does not cancel a task whose awaited result is in. The handler returns
    its result, never cancelled; it was recorded as a timeout (and retried: its work done
    twice)."""
    (job_id,) = add(engine, kind())
    outcomes = Outcomes()
    run_worker_until(database_url, schema, [kind], finished(engine, [job_id]), observer=outcomes)
    job = job_row(engine, job_id)
    assert (job.state, job.errors) == ("completed", [])
    assert outcomes.seen == [(kind.kind_options().kind, "completed")]


class WErrorAtDeadline(Job, kind="w_error_at_deadline", queue="w", timeout=0.5, max_attempts=1):
    pass


@WErrorAtDeadline.handler
async def w_error_at_deadline(ctx: JobContext) -> str:
    return await _answer_while_the_loop_is_busy(lambda reply: reply.set_exception(ConnectionResetError("the peer hung up")))


class WSyncRaisesAtDeadline(Job, kind="w_sync_raises_at_deadline", queue="w", timeout=1.0, max_attempts=1):
    pass


@WSyncRaisesAtDeadline.handler
def w_sync_raises_at_deadline(ctx: JobContext) -> str:
    _hold_the_loop_past_a_1s_deadline(ctx)
    raise ConnectionResetError("the peer hung up")  # well within the timeout


@pytest.mark.parametrize("kind", [WErrorAtDeadline, WSyncRaisesAtDeadline], ids=["async", "sync"])
def test_a_handler_that_failed_before_its_cancellation_reached_it_keeps_its_error(engine, database_url, schema, kind):
    """As above, with an error of its own in time instead of a result: it was recorded as
    a timeout (any error counted as the handler's answer to the cancellation), which hid
    the real failure behind "ran longer than its timeout"."""
    (job_id,) = add(engine, kind())
    outcomes = Outcomes()
    run_worker_until(database_url, schema, [kind], finished(engine, [job_id]), observer=outcomes)
    job = job_row(engine, job_id)
    assert job.state == "dead"
    assert [e["error"] for e in job.errors] == ["ConnectionResetError: the peer hung up"]
    assert outcomes.seen == [(kind.kind_options().kind, "dead")]


def test_discard_and_bad_result_go_dead_without_retries(engine, database_url, schema):
    ids = add(engine, WDiscard(), WBadResult())
    run_worker_until(database_url, schema, ALL, finished(engine, ids))
    discard, bad = job_row(engine, ids[0]), job_row(engine, ids[1])
    assert (discard.state, discard.attempt) == ("dead", 1)
    assert discard.errors[0]["error"] == "Discard: the input can never succeed"
    assert (bad.state, bad.attempt) == ("dead", 1)
    assert "InvalidArgsError" in bad.errors[0]["error"]


DEEP_RUNS: list[int] = []


class WDeepResult(Job, kind="w_deep_result", queue="w", max_attempts=3, backoff=constant_backoff(0.05)):
    pass


@WDeepResult.handler
async def w_deep_result(ctx: JobContext) -> object:
    DEEP_RUNS.append(ctx.attempt)
    return _deep(5000)  # PostgreSQL's jsonb takes it; Python's recursion limit does not


def test_a_result_nested_too_deeply_goes_dead_without_retries(engine, database_url, schema):
    """It raised RecursionError from the result check, which the worker took for a failure
    around the handler: retried, running the handler (and its effects) on every attempt."""
    DEEP_RUNS.clear()
    (job_id,) = add(engine, WDeepResult())
    run_worker_until(database_url, schema, [WDeepResult], finished(engine, [job_id]), timeout=10)
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, DEEP_RUNS) == ("dead", 1, [1])
    assert job.errors[0]["error"] == "InvalidArgsError: result: nested too deeply to write as JSON (over 256 levels of lists and dicts)"
    with pytest.raises(InvalidArgsError, match="nested too deeply"):  # the same at enqueue
        WSync(a=1, b=_deep(5000))


def _deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_args_not_matching_signature_go_dead(engine, database_url, schema):
    (job_id,) = add(engine, WSync(a=1, c=2))
    run_worker_until(database_url, schema, ALL, finished(engine, [job_id]))
    job = job_row(engine, job_id)
    assert (job.state, job.attempt) == ("dead", 1)
    assert "do not match handler signature" in job.errors[0]["error"]


class WNewKind(Job, kind="w_new_kind", queue="w", max_attempts=3):
    """A kind new code enqueues while workers that predate it still serve its queue."""


@WNewKind.handler
async def w_new_kind(ctx: JobContext, n: int) -> int:
    return 2 * n


class Outcomes(NullObserver):
    """A worker observer that records each finished attempt's (kind, outcome)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None:
        self.seen.append((kind, outcome))


def _backoff_elapses(database_url: str, schema: str, job_id: int) -> None:
    """Make a retryable job due now: the backoff moved forward rather than waited out."""
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET scheduled_at = now() WHERE id = %s AND state = 'retryable'"),
      (job_id,))


def test_unknown_kind_is_retried_until_a_worker_that_knows_it_runs_it(engine, database_url, schema):
    """A rolling deploy: new code enqueues a new kind; an old worker serving the queue claims
    it first. It used to end dead at once (UnknownKindError), lost until an operator replayed
    it; it is retried with backoff instead, and a worker that knows the kind runs it."""
    (new_id,) = add(engine, WNewKind(n=21))
    (good,) = add(engine, WSync(a=1, b=1))
    seen = Outcomes()
    old = run_worker_until(database_url, schema, ALL, finished(engine, [new_id, good], ("retryable", "completed")),
                           timeout=10, observer=seen)
    job = job_row(engine, new_id)
    assert (job.state, job.attempt) == ("retryable", 1)
    (error,) = job.errors
    assert error["error"].startswith("UnknownKindError: no handler for kind 'w_new_kind'"), error
    assert (error["attempt"], error["worker"]) == (1, old.worker_id)
    assert ("w_new_kind", "retried") in seen.seen and ("w_new_kind", "dead") not in seen.seen
    # The default policy's shape, with a first delay long enough for the deploy to go on.
    low, high = backoff_bounds(1, base=UNKNOWN_KIND_BACKOFF_BASE)
    ((wait,),) = q(database_url, jobs_sql(schema, "SELECT extract(epoch FROM scheduled_at - attempted_at)::float8"
                                                  " FROM {jobs} WHERE id = %s"), (new_id,))
    assert low <= wait <= high + 2, (low, wait, high)
    _backoff_elapses(database_url, schema, new_id)
    run_worker_until(database_url, schema, [WNewKind], finished(engine, [new_id]), timeout=10)
    job = job_row(engine, new_id)
    assert (job.state, job.attempt, job.result, len(job.errors)) == ("completed", 2, 42, 1)


def test_unknown_kind_goes_dead_once_its_attempts_are_exhausted(engine, database_url, schema):
    """A kind no worker knows (the ORM cannot load its rows either: raw SQL here)."""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, args, max_attempts)"
                                     " VALUES ('os.system', 'w', '{{\"cmd\": \"rm -rf /\"}}', 2)"))
    (bad_id,) = q(database_url, jobs_sql(schema, "SELECT id FROM {jobs} WHERE kind = 'os.system'"))[0]

    def all_in(*wanted: str):
        return lambda: {s for (s,) in q(database_url, jobs_sql(schema, "SELECT state FROM {jobs}"))} <= set(wanted)

    goods = add(engine, WSync(a=1, b=1))
    run_worker_until(database_url, schema, ALL, all_in("retryable", "completed"), timeout=10)
    assert q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs} WHERE id = %s"), (bad_id,)) == [("retryable", 1)]
    _backoff_elapses(database_url, schema, bad_id)
    goods += add(engine, WSync(a=2, b=2))
    seen = Outcomes()
    run_worker_until(database_url, schema, ALL, all_in("dead", "completed"), timeout=10, observer=seen)
    rows = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
    assert rows == {bad_id: "dead", goods[0]: "completed", goods[1]: "completed"}  # the worker kept running
    ((attempt, errors),) = q(database_url, jobs_sql(schema, "SELECT attempt, errors FROM {jobs} WHERE id = %s"), (bad_id,))
    assert attempt == 2 and [e["attempt"] for e in errors] == [1, 2]
    assert all(e["error"].startswith("UnknownKindError: no handler for kind 'os.system'") for e in errors), errors
    assert ("os.system", "dead") in seen.seen


def test_a_worker_fault_around_the_last_attempt_is_counted_dead(engine, database_url, schema, monkeypatch):
    """A bug in the worker around a handler costs the job one attempt; on its last attempt
    the job ends dead, and the outcome the metrics count must say so (it said retried)."""
    from sa_jobs.worker.worker import Worker as WorkerClass

    async def broken(self, q, job):  # noqa: ANN001 - stands in for Worker._execute
        raise RuntimeError("injected: the worker failed around the handler")

    monkeypatch.setattr(WorkerClass, "_execute", broken)
    (last,) = add(engine, WSync(a=1, b=1).options(max_attempts=1))
    (more,) = add(engine, WSync(a=2, b=2).options(max_attempts=3))
    seen = Outcomes()
    run_worker_until(database_url, schema, ALL, finished(engine, [last, more], ("dead", "retryable")),
                     timeout=10, observer=seen)
    assert (job_row(engine, last).state, job_row(engine, more).state) == ("dead", "retryable")
    assert sorted(seen.seen) == [("w_sync", "dead"), ("w_sync", "retried")], seen.seen


def test_heartbeat_keeps_a_long_job_from_being_rescued(engine, database_url, schema):
    from .jobs_core import CoreSlow, effects_ddl

    q(database_url, effects_ddl(schema))
    import os

    os.environ["SA_JOBS_DATABASE_URL"] = database_url
    (job_id,) = add(engine, CoreSlow(seconds=3.5))
    run_worker_until(database_url, schema, [CoreSlow], finished(engine, [job_id]), lease=1.0, timeout=20)
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, job.errors) == ("completed", 1, [])
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {effects}"))[0][0] == 1


def test_scheduled_job_waits_for_its_time(engine, database_url, schema):
    (job_id,) = add(engine, WSync(a=1, b=2).options(delay=1.0))
    started = time.monotonic()
    run_worker_until(database_url, schema, ALL, finished(engine, [job_id]))
    assert time.monotonic() - started >= 0.9
    assert job_row(engine, job_id).state == "completed"


def test_stale_token_changes_nothing(engine, database_url, schema):
    """Fencing: once a lease is taken over, the old claim's complete/fail/heartbeat are no-ops."""
    (job_id,) = add(engine, WSync(a=1, b=1).options(queue="fence"))
    queries = Queries.for_schema(schema)
    old, new = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        claim = {"queue": "fence", "limit": 10, "owner": "A", "lease": 0.2}
        assert len(conn.execute(queries.claim, {**claim, "token": old}).fetchall()) == 1
        time.sleep(0.3)
        assert [r[:3] for r in conn.execute(queries.rescue_expired, {"limit": 10})] == [(job_id, "retryable", "fence")]
        conn.execute(queries.promote_due, {"limit": 10})
        assert len(conn.execute(queries.claim, {**claim, "token": new, "owner": "B", "lease": 30}).fetchall()) == 1
        ids_old = {"ids": [job_id], "tokens": [old]}
        assert conn.execute(queries.heartbeat_many, {**ids_old, "progress": [None], "lease": 30}).fetchall() == []
        assert conn.execute(queries.complete_many, {**ids_old, "results": ["1"], "progress": [None]}).fetchall() == []
        err = json.dumps({"error": "stale"})
        for target in ("dead", "retryable", "cancelled", "scheduled"):
            finish = {**ids_old, "targets": [target], "errors": [err], "delays": [0.0], "progress": [None]}
            assert conn.execute(queries.finish_many, finish).fetchall() == []
        assert conn.execute(queries.release_many, {**ids_old, "reported": [True]}).fetchall() == []
        assert conn.execute(queries.complete_many, {"ids": [job_id], "tokens": [new], "results": ["2"],
                                                   "progress": [None]}).fetchall() == [(job_id,)]
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, job.result, job.lease_owner) == ("completed", 2, 2, "B")
    assert [e["error"].split(":")[0] for e in job.errors] == ["LeaseExpired"]


def test_claim_never_returns_more_than_limit_and_orders_by_priority(engine, database_url, schema):
    add(engine, *[WSync(a=i, b=0).options(queue="order", priority=p) for i, p in enumerate([5, 1, 3, 1, 0, 9])])
    queries = Queries.for_schema(schema)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        rows = conn.execute(queries.claim, {"queue": "order", "limit": 3, "token": uuid.uuid4(), "owner": "x", "lease": 30}).fetchall()
    assert len(rows) == 3
    assert sorted(r[6] for r in rows) == [0, 1, 1]


def test_worker_refuses_missing_or_newer_schema(database_url):
    class Dummy(Job, kind="w_dummy"):
        pass

    Dummy.handler(lambda ctx: None)

    async def start(schema_name: str) -> None:
        async with Worker(database_url, kinds=[Dummy], schema=schema_name):
            pass

    with pytest.raises(SchemaVersionError, match="sa-jobs migrate"):
        anyio.run(start, "t_never_installed")


def test_worker_configuration_errors(database_url):
    with pytest.raises(ConfigurationError):
        Worker("mysql://root@localhost/test", kinds=[WSync])
    with pytest.raises(ConfigurationError):
        Worker("not a url at all", kinds=[WSync])
    with pytest.raises(ConfigurationError):
        Worker(database_url, kinds=[WSync], queues={"bad queue": 1})
    with pytest.raises(ConfigurationError):
        Worker(database_url, kinds=[WSync], concurrency=0)
    with pytest.raises(ConfigurationError):
        Worker(database_url, kinds=[WSync], schema="Robert'); DROP TABLE students;--")
    with pytest.raises(ConfigurationError):
        Worker(database_url, kinds=[object])  # type: ignore[list-item]


@pytest.mark.parametrize("option, value", [
    ("lease", math.inf), ("lease", "30"), ("lease", True), ("lease", 1e13), ("poll_interval", math.inf),
    ("maintenance_interval", math.inf), ("maintenance_interval", math.nan),
    ("heartbeat_interval", math.nan), ("heartbeat_interval", -1), ("heartbeat_interval", 0),
    ("completion_interval", -0.5), ("completion_interval", math.nan),
    ("statement_timeout", -1), ("statement_timeout", math.nan), ("statement_timeout", math.inf),
    ("statement_timeout", 0.0004), ("statement_timeout", 3e6),
    ("shutdown_grace", math.nan), ("shutdown_grace", -1),
    ("max_claim", 0), ("max_claim", -3), ("max_claim", 2.5),
])
def test_worker_refuses_a_duration_or_batch_it_cannot_run_with(database_url, option, value):
    """Each was taken as given: a heartbeat every NaN seconds, a maintenance tick (the
    rescuer's) that never came, a statement timeout under a millisecond that the server
    read as none, max_claim=0 that claimed nothing for ever."""
    with pytest.raises(ConfigurationError, match=option):
        Worker(database_url, kinds=[WSync], **{option: value})


def test_a_lease_past_the_databases_timestamps_is_refused(engine, database_url, schema):
    """The claim writes now() + lease: with a lease of 1e13 s (past PostgreSQL's last
    timestamp, 294276 AD) every claim failed with "timestamp out of range" and the worker
    ran nothing. A lease is at most a year (366 days, as a retry's delay), which runs."""
    with engine.connect() as conn, pytest.raises(Exception, match="out of range"):
        conn.exec_driver_sql("SELECT now() + make_interval(secs => 1e13::float8)")
    with pytest.raises(ConfigurationError, match="lease must be more than 0 and at most 31622400 seconds"):
        Worker(database_url, kinds=[WSync], lease=1e13)
    (job_id,) = add(engine, WSync(a=1, b=2))
    run_worker_until(database_url, schema, [WSync], finished(engine, [job_id]), lease=366 * 24 * 3600.0,
                     heartbeat_interval=1.0, timeout=20)
    assert job_row(engine, job_id).state == "completed"


def test_worker_duration_options_it_can_run_with(database_url):
    worker = Worker(database_url, kinds=[WSync], lease=2, heartbeat_interval=0.5, completion_interval=0,
                    statement_timeout=0.001, shutdown_grace=math.inf, max_claim=1)
    assert (worker.lease, worker.statement_timeout, worker.shutdown_grace) == (2.0, 0.001, math.inf)


class WHog(Job, kind="w_hog", queue="w"):
    pass


@WHog.handler
def w_hog(ctx: JobContext, seconds: float) -> int:
    # Pure-Python CPU work holding the GIL as much as the interpreter lets it.
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += sum(range(1000))
    return 1


def test_cpu_bound_sync_handler_does_not_starve_heartbeats(engine, database_url, schema):
    (job_id,) = add(engine, WHog(seconds=3.5))
    run_worker_until(database_url, schema, [WHog], finished(engine, [job_id]), lease=1.0, timeout=20)
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, job.errors) == ("completed", 1, [])


def test_a_job_that_finishes_during_a_beat_is_not_called_lost(database_url, schema):
    """The beat's UPDATE misses a job whose completion landed meanwhile; that job is done,
    not taken over, and must not be reported (or cancelled) as a lost lease. A job still
    running when the beat answers without it is lost: the control case."""
    import time as _time
    import uuid as _uuid

    import psycopg

    from sa_jobs._url import to_conninfo
    from sa_jobs.events import NullObserver
    from sa_jobs.queries import Queries
    from sa_jobs.worker._job import ClaimedJob
    from sa_jobs.worker.heartbeat import Heartbeat, ManagedConnection

    queries = Queries.for_schema(schema)
    conninfo = to_conninfo(database_url)
    token = _uuid.uuid4()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) VALUES ('k', 'hb'), ('k', 'hb')"))
        ids = [r[0] for r in conn.execute(queries.claim, {"queue": "hb", "limit": 2, "token": token, "owner": "w",
                                                          "lease": 30}).fetchall()]
        # Both complete (as the completer would) before the beat's UPDATE reaches them.
        conn.execute(jobs_sql(schema, "UPDATE {jobs} SET state = 'completed' WHERE id = ANY(%s)"), (ids,))
    now = _time.monotonic()
    finished, running = (
        ClaimedJob(id=i, token=token, kind="k", queue="hb", args={}, attempt=1, max_attempts=5, priority=0,
                   wait_seconds=0.0, created_epoch=0.0, claimed_at=now, last_lease_ok=now)
        for i in ids
    )
    calls = []

    def running_jobs():
        calls.append(1)
        return [finished, running] if len(calls) == 1 else [running]  # `finished` left meanwhile

    async def beat() -> None:
        conn = ManagedConnection(conninfo, "heartbeat", timeout=5)
        try:
            await Heartbeat(conn, queries, NullObserver(), running_jobs, lease=30, interval=1).beat()
        finally:
            await conn.close()

    anyio.run(beat)
    assert not finished.lease_lost and not finished.cancelled
    assert running.lease_lost and running.cancelled


class WBacklog(Job, kind="w_backlog", queue="resume"):
    pass


@WBacklog.handler
async def w_backlog(ctx: JobContext, n: int) -> None:
    await anyio.sleep(0.005)


def test_an_urgent_job_behind_the_resume_point_is_claimed_while_the_backlog_drains(engine, database_url, schema):
    # Under a backlog, claims resume past the previous batch; a job that sorts before that
    # point (more urgent here; rescued or released jobs alike) must still be claimed by
    # the periodic claim from the start, not only once the backlog is gone.
    from sa_jobs import enqueue_many

    with Session(engine) as session, session.begin():
        enqueue_many(session, WBacklog, [{"n": i} for i in range(5000)])
    completed = jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state = 'completed'")
    pending = jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state IN ('available', 'running')")
    urgent: list[int] = []

    def done() -> bool:
        if not urgent and q(database_url, completed)[0][0] >= 300:
            with Session(engine) as session, session.begin():
                job = WBacklog(n=-1).options(priority=-5)
                session.add(job)
                session.flush()
                urgent.append(job.id)
        return bool(urgent) and q(database_url, pending)[0][0] == 0

    run_worker_until(database_url, schema, [WBacklog], done, timeout=60, queues={"resume": 20}, max_claim=20)
    assert states(database_url, schema) == {"completed": 5001}
    (later,) = q(database_url, jobs_sql(schema,
        "SELECT count(*) FROM {jobs} WHERE attempted_at > (SELECT attempted_at FROM {jobs} WHERE id = %s)"),
        (urgent[0],))[0]
    assert later >= 500, f"only {later} backlog jobs were claimed after the urgent one"


def test_a_failed_claim_from_the_start_keeps_the_resumed_jobs(engine, database_url, schema):
    # A producer claim can be two statements (resumed, then from the start); when the
    # second fails, the first one's jobs are already committed as running and must still
    # reach the runners, not wait out their lease.
    from sa_jobs.worker.worker import _Queue

    ids = add(engine, *[WBacklog(n=i).options(queue="split") for i in range(5)])
    worker = Worker(database_url, kinds=[WBacklog], schema=schema, queues={"split": 10})
    queries = Queries.for_schema(schema)

    class FailsFromTheStart:
        """The real connection, except that the claim from the start fails."""

        def __init__(self, conn: psycopg.AsyncConnection) -> None:
            self.conn = conn

        async def execute(self, statement, params=None, **kw):
            if statement == queries.claim:
                raise psycopg.OperationalError("connection cut (test)")
            return await self.conn.execute(statement, params, **kw)

    async def main() -> list:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            q = _Queue("split", 10, None, anyio.CapacityLimiter(10))  # type: ignore[arg-type]
            q.resume_after, q.scanned_from_start_at = (0, "-infinity", 0), time.monotonic()
            params = {"queue": "split", "limit": 10, "token": uuid.uuid4(), "owner": "w", "lease": 30}
            return await worker._claim_resuming(q, FailsFromTheStart(conn), params, lambda: anyio.fail_after(10),
                                                worker._queries.claim, worker._queries.claim_after, flagged=False)

    rows = anyio.run(main)
    assert sorted(r[0] for r in rows) == ids  # 5 of the 10 asked for: short, then the failure
    assert states(database_url, schema) == {"running": 5}

    async def nothing_resumed() -> None:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            q = _Queue("split", 10, None, anyio.CapacityLimiter(10))  # type: ignore[arg-type]
            params = {"queue": "split", "limit": 10, "token": uuid.uuid4(), "owner": "w", "lease": 30}
            await worker._claim_resuming(q, FailsFromTheStart(conn), params, lambda: anyio.fail_after(10),
                                         worker._queries.claim, worker._queries.claim_after, flagged=False)

    with pytest.raises(psycopg.OperationalError):  # nothing claimed: the error is the caller's
        anyio.run(nothing_resumed)


def test_a_worker_under_trio_is_a_configuration_error(database_url, schema):
    """psycopg's async connections need asyncio: under trio every service's connect failed
    with "no running event loop", logged as a lost connection and retried for ever, and
    the worker ran nothing without saying why."""
    pytest.importorskip("trio")

    async def main() -> None:
        with anyio.fail_after(10), pytest.raises(ConfigurationError, match="asyncio"):
            async with Worker(database_url, kinds=[WSync], schema=schema, **FAST):
                await anyio.sleep(0.5)

    anyio.run(main, backend="trio")


def test_an_exception_raised_in_the_worker_block_comes_out_as_raised(database_url, schema):
    """Not wrapped in the ExceptionGroup of the worker's task group: ``except KeyError``
    around ``async with Worker(...)`` catches the KeyError its body raised."""

    async def main() -> None:
        with pytest.raises(KeyError, match="mine") as raised:
            async with Worker(database_url, kinds=ALL, schema=schema, **FAST):
                raise KeyError("mine")
        assert raised.type is KeyError

    anyio.run(main)


# ---- maintenance and unique keys ---------------------------------------------------------

_UQ_ROW = ("INSERT INTO {jobs} (kind, queue, state, attempt, max_attempts, scheduled_at, claim_token,"
           " lease_expires_at, unique_key, unique_states) VALUES (%s, 'mq', %s, %s, %s, now() - interval '1 second',"
           " CASE WHEN %s = 'running' THEN gen_random_uuid() END,"
           " CASE WHEN %s = 'running' THEN now() - interval '1 second' END, %s, %s) RETURNING id")


def _uq_row(database_url, schema, state, key, unique_states, *, kind="mk", attempt=1, max_attempts=3) -> int:
    return q(database_url, jobs_sql(schema, _UQ_ROW),
             (kind, state, attempt, max_attempts, state, state, key, list(unique_states)))[0][0]


def _run_service(database_url, schema, service) -> None:
    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            with anyio.fail_after(10):
                await service.run_once(conn, Queries.for_schema(schema))

    anyio.run(main)


def test_rescue_of_a_job_whose_unique_key_another_job_holds_does_not_wedge_maintenance(database_url, schema):
    """A kind unique while waiting but not while running ("one pending job per key") lets a
    new job take the key while the old one runs. When the old one's worker dies, it cannot
    go back to retryable (that would make a duplicate). Before, the rescue UPDATE raised
    UniqueViolation on every tick of every worker: no expired lease was rescued again, and
    promotion (later in the same tick) stopped for every job."""
    from sa_jobs.maintenance.rescuer import Rescuer
    from sa_jobs.events import NullObserver

    waiting = ("scheduled", "available", "retryable")
    lost = _uq_row(database_url, schema, "running", "k1", waiting)
    holder = _uq_row(database_url, schema, "available", "k1", waiting)
    other = _uq_row(database_url, schema, "running", "k2", waiting)  # same batch, key free
    # Two expired jobs of one key and nobody else holding it: only one may go back.
    twin_a = _uq_row(database_url, schema, "running", "k3", waiting)
    twin_b = _uq_row(database_url, schema, "running", "k3", waiting)
    _run_service(database_url, schema, Rescuer(NullObserver()))
    rows = {r[0]: r[1:] for r in q(database_url, jobs_sql(
        schema, "SELECT id, state, finished_at IS NOT NULL, errors -> -1 ->> 'error' FROM {jobs}"))}
    assert rows[holder][0] == "available"
    assert rows[other][:2] == ("retryable", False)
    assert rows[lost][:2] == ("dead", True)
    assert rows[lost][2].startswith("LeaseExpired") and f"job {holder} holds its unique key" in rows[lost][2]
    assert sorted(rows[t][0] for t in (twin_a, twin_b)) == ["dead", "retryable"]
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state = 'running'")) == [(0,)]


def test_rescue_of_a_job_whose_key_is_held_and_whose_states_hold_dead_and_cancelled_too(database_url, schema):
    """A kind unique in every state but running: the lost job cannot go back (retryable
    holds the key), nor end dead or cancelled on it (both hold it too). The completer
    gives such a job's key up (see Completer._write_superseded); the rescue wrote it
    cancelled with its key, the unique index refused it one row per statement too, and
    every rescue (and the promotion after it) failed on every tick of every worker."""
    from sa_jobs.maintenance.rescuer import Rescuer
    from sa_jobs.events import NullObserver

    all_but_running = ("scheduled", "available", "retryable", "completed", "dead", "cancelled")
    lost = _uq_row(database_url, schema, "running", "k1", all_but_running)
    holder = _uq_row(database_url, schema, "available", "k1", all_but_running)
    other = _uq_row(database_url, schema, "running", "k2", all_but_running)
    _run_service(database_url, schema, Rescuer(NullObserver()))
    rows = {r[0]: r[1:] for r in q(database_url, jobs_sql(
        schema, "SELECT id, state, unique_key, errors -> -1 ->> 'error' FROM {jobs}"))}
    assert rows[holder][:2] == ("available", "k1")
    assert rows[other][:2] == ("retryable", "k2")
    assert rows[lost][:2] == ("cancelled", None)  # ended, its key given up to the holder
    assert f"job {holder} holds its unique key" in rows[lost][2]


def test_promotion_of_a_job_whose_unique_key_another_job_holds_waits_and_does_not_wedge(database_url, schema):
    """A kind unique while available or running (not while scheduled or retryable): a due
    job whose key another job holds would make a duplicate if promoted. Before, the promote
    UPDATE raised UniqueViolation on every tick of every worker and no job of any kind was
    promoted again. Now it waits (stays scheduled) until the key is free."""
    from sa_jobs.maintenance.scheduler import Scheduler

    ready = ("available", "running")
    blocked = _uq_row(database_url, schema, "scheduled", "k1", ready)
    holder = _uq_row(database_url, schema, "available", "k1", ready)
    free = _uq_row(database_url, schema, "retryable", "k2", ready)
    plain = _uq_row(database_url, schema, "scheduled", None, ready)
    twins = [_uq_row(database_url, schema, "scheduled", "k3", ready) for _ in range(2)]

    def state_of() -> dict[int, str]:
        return dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))

    _run_service(database_url, schema, Scheduler())
    after = state_of()
    assert (after[blocked], after[holder], after[free], after[plain]) == ("scheduled", "available", "available", "available")
    assert sorted(after[t] for t in twins) == ["available", "scheduled"]
    # The holder finishes: the waiting job is promoted on the next run.
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE id = %s"), (holder,))
    _run_service(database_url, schema, Scheduler())
    assert state_of()[blocked] == "available"


def test_a_unique_key_taken_during_a_one_row_promotion_waits_for_the_next_tick(database_url, schema, caplog):
    """After a UniqueViolation the promotion goes on one row per statement; a row can still
    collide with one committed while it ran (two workers promoting two due jobs of one key
    at once, an enqueue). That raised out of the service: the tick failed, the connection
    was dropped and, on the leader, leadership with it, until the next tick. Now the run
    stops there and the next tick goes on. The race is played by a trigger that refuses
    the update of one job with the unique_violation the index would raise."""
    from sa_jobs.maintenance.scheduler import Scheduler

    early = [_uq_row(database_url, schema, "scheduled", None, ("available",)) for _ in range(3)]
    racing = _uq_row(database_url, schema, "scheduled", None, ("available",))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET scheduled_at = now() - interval '1 second' WHERE id = %s"),
      (racing,))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET scheduled_at = now() - interval '1 minute' WHERE id = ANY(%s)"),
      (early,))
    q(database_url, sql.SQL(
        "CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " RAISE unique_violation USING MESSAGE = 'duplicate key (test)'; END $$").format(
            fn=sql.Identifier(schema, "refuse")))
    q(database_url, sql.SQL("CREATE TRIGGER refuse BEFORE UPDATE ON {jobs} FOR EACH ROW WHEN (OLD.id = {id})"
                            " EXECUTE FUNCTION {fn}()").format(
        jobs=sql.Identifier(schema, "jobs"), id=sql.Literal(racing), fn=sql.Identifier(schema, "refuse")))

    def state_of() -> dict[int, str]:
        return dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))

    _run_service(database_url, schema, Scheduler())  # raised UniqueViolation before
    assert [state_of()[i] for i in early + [racing]] == ["available"] * 3 + ["scheduled"]
    assert "a unique key was taken while this run wrote a job of it" in caplog.text
    q(database_url, sql.SQL("DROP TRIGGER refuse ON {}").format(sql.Identifier(schema, "jobs")))
    _run_service(database_url, schema, Scheduler())  # the next tick
    assert state_of()[racing] == "available"


def test_a_leader_whose_session_died_inside_a_service_does_not_stay_leader_on_a_new_one(database_url, schema):
    """The leader lock lives as long as the maintainer's session. A leader-only service
    that logs and goes on after a failed statement (best effort, as a user's cleanup may)
    can swallow the error of a session the server ended (pg_terminate_backend, a failover);
    the tick then ends normally. Before, the next tick reconnected and, still "leader",
    ran leader-only services on a session without the lock, while another worker took the
    lock too: two leaders, for good. Now leadership is tied to the session that took it."""
    from sa_jobs.events import NullObserver
    from sa_jobs.maintenance.leader import Maintainer

    runs: list[tuple[str, bool]] = []  # (maintainer, did its session hold the leader lock)

    class BestEffort:
        name, leader_only = "best_effort", True

        def __init__(self, who: str, end_session: bool) -> None:
            self.who, self.end_session = who, end_session

        async def run_once(self, conn, queries) -> None:
            try:
                if self.end_session:  # the server ends this session mid-task
                    self.end_session = False
                    await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
                cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                                         " AND pid = pg_backend_pid() AND granted)")
                runs.append((self.who, (await cur.fetchone())[0]))
            except psycopg.Error:
                pass  # best effort: retried next run

    queries, conninfo = Queries.for_schema(schema), to_conninfo(database_url)
    a = Maintainer(conninfo, queries, NullObserver(), [BestEffort("a", end_session=True)], interval=0.02)
    b = Maintainer(conninfo, queries, NullObserver(), [BestEffort("b", end_session=False)], interval=0.02)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await a.tick()  # a takes the lock, and its session ends inside the service
            assert a.is_leader and runs == []
            tg.start_soon(b.run)
            with anyio.fail_after(10):
                while not b.is_leader:  # a's lock went with its session: b takes over
                    await anyio.sleep(0.01)
            tg.start_soon(a.run)
            with anyio.fail_after(10):
                while len([r for r in runs if r[0] == "b"]) < 5 or len(runs) < 10:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)
    assert all(held for _, held in runs), runs  # leader-only work only on the lock's session
    assert {who for who, _ in runs} == {"b"}


def test_a_service_past_its_deadline_fails_the_tick_even_if_a_round_trip_ends_after_it(database_url, schema):
    """Each round trip of a maintenance service moves its deadline (StatementDeadlines).
    A deadline reached while its cancellation waits to be delivered (here behind a shield;
    in life, a reply that lands as the timer fires) must not be moved: the scope would then
    swallow the cancellation at the next await, and the service end early as if it had
    finished, the tick counted as a success."""
    from sa_jobs.maintenance.leader import Maintainer

    reached: list[str] = []

    class Stalls:
        name, leader_only = "stalls", False

        async def run_once(self, conn, queries) -> None:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.4)  # past the 0.2 s deadline: its cancellation waits
            await conn.execute("SELECT 1")
            reached.append("after")

    observer = LoopErrors()
    maintainer = Maintainer(to_conninfo(database_url), Queries.for_schema(schema), observer, [Stalls()],
                            interval=0.01, timeout=0.2)

    async def main() -> None:
        try:
            await maintainer.tick()
        finally:
            await maintainer._conn.close()

    anyio.run(main)
    assert reached == [] and observer.seen == ["maintenance"], (reached, observer.seen)


def test_a_promotion_backlog_longer_than_a_tick_is_spread_over_ticks(database_url, schema):
    """The maintenance tick runs under the statement deadline. A scheduler that promoted
    a backlog in one go outlived it: the tick failed, leadership was dropped and the
    connection discarded, every tick. Now each service stops between batches when its
    share of the tick is spent, and the rest goes at the next tick."""
    from sa_jobs.maintenance.leader import Maintainer
    from sa_jobs.maintenance.scheduler import Scheduler

    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, scheduled_at)"
                                     " SELECT 'w_backlog', 'elsewhere', 'scheduled', now() - interval '1 minute'"
                                     " FROM generate_series(1, 100000)"))

    observer = LoopErrors()
    maintainer = Maintainer(to_conninfo(database_url), Queries.for_schema(schema), observer,
                            [Scheduler(batch=200)], interval=0.01, timeout=0.5)

    def waiting() -> int:
        return q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state = 'scheduled'"))[0][0]

    async def main() -> int:
        ticks = 0
        with anyio.fail_after(120):
            while await anyio.to_thread.run_sync(waiting):
                await maintainer.tick()
                ticks += 1
                assert maintainer.is_leader and observer.seen == [], observer.seen
        return ticks

    ticks = anyio.run(main)
    assert ticks > 1  # it did take several ticks: the deadline was in play
    assert states(database_url, schema) == {"available": 100000}


# ---- handlers that are not plain functions -----------------------------------------------

class WObjHandler(Job, kind="w_obj_handler", queue="w", max_attempts=1):
    pass


class WPartialObjHandler(Job, kind="w_partial_obj_handler", queue="w", max_attempts=1):
    pass


class _AsyncHandler:
    """A class-based handler (e.g. one holding its dependencies) with an async __call__."""

    def __init__(self, bonus: int) -> None:
        self.bonus = bonus

    async def __call__(self, ctx: JobContext, n: int, extra: int = 0) -> int:
        await anyio.sleep(0)
        return n + self.bonus + extra


WObjHandler.handler(_AsyncHandler(100))
WPartialObjHandler.handler(functools.partial(_AsyncHandler(1000), extra=5))


def test_a_callable_object_with_an_async_call_runs_on_the_loop(engine, database_url, schema):
    """Before, only ``async def`` functions were seen as async: the object was called in a
    thread, its coroutine never awaited, and the job ended dead ("result is a coroutine")."""
    ids = add(engine, WObjHandler(n=1), WPartialObjHandler(n=2))
    run_worker_until(database_url, schema, [WObjHandler, WPartialObjHandler], finished(engine, ids), timeout=15)
    assert [(job_row(engine, i).state, job_row(engine, i).result) for i in ids] == [("completed", 101), ("completed", 1007)]
    assert perform(WObjHandler(n=3)) == 103


def test_a_handler_object_without_a_context_parameter_is_a_configuration_error():
    class NoCtx:
        def __call__(self, **args: int) -> None: ...

    for handler in (NoCtx(), functools.partial(NoCtx())):
        with pytest.raises(ConfigurationError, match="JobContext as its first argument"):
            WObjHandler.handler(handler)


def test_a_generator_handler_is_a_configuration_error():
    """Calling one runs none of its body: each job ended dead at once, "result is a
    generator", its work never done."""

    def gen(ctx: JobContext, n: int) -> Any:
        yield n

    async def agen(ctx: JobContext, n: int) -> Any:
        yield n

    for handler in (gen, agen):
        with pytest.raises(ConfigurationError, match="generator function"):
            WObjHandler.handler(handler)
    with pytest.raises(ConfigurationError, match="no signature"):
        WObjHandler.handler(dict)  # a builtin type without a signature: a bare ValueError
    assert WObjHandler.__sa_jobs_handler__ is not None and not inspect.isgeneratorfunction(WObjHandler.__sa_jobs_handler__)


# ---- embedded in an app: cancelled from outside ---------------------------------------------

class WHang(Job, kind="w_hang", queue="hang"):
    pass


HANG_STARTED: list[int] = []


@WHang.handler
async def w_hang(ctx: JobContext) -> None:
    HANG_STARTED.append(ctx.id)
    await anyio.sleep_forever()


class WQuick(Job, kind="w_quick", queue="hang"):
    pass


@WQuick.handler
async def w_quick(ctx: JobContext) -> str:
    return "done"



def _released_at_once(database_url: str, schema: str, job_id: int, took: float) -> None:
    """The stop took well under its 60 s grace, and the running job was given back with its
    attempt refunded."""
    assert took < 10  # not the 60 s grace
    row = q(database_url, jobs_sql(schema, "SELECT state, attempt, lease_expires_at FROM {jobs} WHERE id = %s"), (job_id,))
    assert row == [("available", 0, None)]

@pytest.mark.parametrize("how", ["async_with", "run"])
def test_a_worker_cancelled_with_its_app_releases_running_jobs_at_once(engine, database_url, schema, how):
    """An app's task group cancelled (asyncio.run's Ctrl-C, a lifespan torn down by
    cancellation, a move_on_after around the worker) cancelled every task of the worker
    at once, completer included: the running job was neither finished nor released and
    sat 'running' until its lease expired, then was rescued with the attempt spent. Now
    the worker is shielded from the outside cancellation and shuts down at once: running
    jobs are released (attempt refunded), with no wait for the shutdown grace."""
    HANG_STARTED.clear()
    [job_id] = add(engine, WHang())

    async def main() -> float:
        worker = Worker(database_url, kinds=[WHang], schema=schema, lease=30, poll_interval=0.2, shutdown_grace=60)
        async with anyio.create_task_group() as tg:
            if how == "run":
                tg.start_soon(worker.run)
            else:
                async def app() -> None:
                    async with worker:
                        await anyio.sleep_forever()
                tg.start_soon(app)
            with anyio.fail_after(10):
                while not HANG_STARTED:
                    await anyio.sleep(0.01)
            started = time.monotonic()
            tg.cancel_scope.cancel()
        return time.monotonic() - started

    _released_at_once(database_url, schema, job_id, anyio.run(main))


@pytest.mark.parametrize("how", ["async_with", "run"])
def test_a_worker_cancelled_with_its_app_during_its_graceful_stop_releases_running_jobs_at_once(
        engine, database_url, schema, how):
    """The app leaves the block (or asks run() to stop) and the worker waits for its running
    jobs, up to its grace period; then the app is cancelled (a second Ctrl-C, a shutdown
    deadline of its own). The graceful stop ran shielded, so the cancellation waited the
    whole grace (for ever with ``shutdown_grace=math.inf``), where core.md says a cancelled
    app's worker shuts down at once, releasing its running jobs."""
    HANG_STARTED.clear()
    [job_id] = add(engine, WHang())

    async def main() -> float:
        worker = Worker(database_url, kinds=[WHang], schema=schema, lease=30, poll_interval=0.2, shutdown_grace=60)
        stopping = anyio.Event()
        async with anyio.create_task_group() as tg:
            async def app() -> None:
                if how == "run":
                    await worker.run()
                else:
                    async with worker:
                        await stopping.wait()
            tg.start_soon(app)
            with anyio.fail_after(10):
                while not HANG_STARTED:
                    await anyio.sleep(0.01)
            if how == "run":
                worker.request_stop()
            stopping.set()
            await anyio.sleep(0.3)  # the graceful stop waits for the hanging handler
            assert q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,)) == [("running",)]
            started = time.monotonic()
            tg.cancel_scope.cancel()
        return time.monotonic() - started

    _released_at_once(database_url, schema, job_id, anyio.run(main))


def test_a_worker_cancelled_with_its_app_writes_the_outcomes_it_holds(engine, database_url, schema):
    """A job whose handler returned, its completion waiting in the completer's batch,
    was left 'running' by a cancellation and later run again; it is written now."""
    [job_id] = add(engine, WQuick())

    async def main() -> None:
        worker = Worker(database_url, kinds=[WQuick], schema=schema, lease=30, poll_interval=0.2,
                        completion_interval=60)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(10):
                while worker.completer is None or worker.completer.pending == 0:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()

    anyio.run(main)
    row = q(database_url, jobs_sql(schema, "SELECT state, result FROM {jobs} WHERE id = %s"), (job_id,))
    assert row == [("completed", "done")]


def test_one_worker_started_and_stopped_again_runs_jobs_each_time(engine, database_url, schema):
    """An app whose lifespan is entered again (a test client per test) re-enters the same
    Worker. Before, the second run kept the first one's state (stopping, its events set or
    bound to a closed loop): it started, claimed nothing and said nothing."""
    worker = Worker(database_url, kinds=[WQuick], schema=schema, **FAST)

    async def one_run() -> None:
        [job_id] = add(engine, WQuick())
        async with worker:
            with anyio.fail_after(10):
                while job_row(engine, job_id).state != "completed":
                    await anyio.sleep(0.02)

    async def twice_in_one_loop() -> None:
        await one_run()
        await one_run()

    anyio.run(one_run)
    anyio.run(one_run)  # a new event loop, as a new test client's
    anyio.run(twice_in_one_loop)

    async def entered_twice_at_once() -> None:
        async with worker:
            with pytest.raises(ConfigurationError, match="running already"):
                async with worker:
                    pass
        await one_run()  # the refused entry left the worker usable

    anyio.run(entered_twice_at_once)


def test_request_stop_and_release_running_from_another_thread(engine, database_url, schema):
    """A sync app runs the worker in a background thread and stops it from its own
    shutdown hook. Before, request_stop() raised "no running event loop" in the calling
    thread after marking the worker stopping, and run() never returned."""
    import threading

    HANG_STARTED.clear()
    [job_id] = add(engine, WHang())
    worker = Worker(database_url, kinds=[WHang], schema=schema, lease=30, poll_interval=0.2, shutdown_grace=60)
    errors: list[BaseException] = []

    def call_from_this_thread(call) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    async def app() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(10):
                while not HANG_STARTED:
                    await anyio.sleep(0.01)
            for call in (worker.request_stop, worker.release_running):
                thread = threading.Thread(target=call_from_this_thread, args=(call,))
                thread.start()
                await anyio.to_thread.run_sync(thread.join)
        # tg exits once run() has returned

    # The app's loop in a thread of its own, so that a run that never ends fails the
    # test instead of hanging it (not after the 60 s grace either).
    app_thread = threading.Thread(target=anyio.run, args=(app,), daemon=True)
    app_thread.start()
    app_thread.join(20)
    assert not app_thread.is_alive(), f"request_stop() from another thread did not stop the worker: {errors!r}"
    assert errors == []
    row = q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs} WHERE id = %s"), (job_id,))
    assert row == [("available", 0)]


# A sync handler that ignores ctx.cancelled: its thread outlives the attempt's timeout.
STUCK = {"running": 0, "peak": 0, "entered": 0}
STUCK_LOCK = threading.Lock()
STUCK_RELEASE = threading.Event()


class WStuckSync(Job, kind="w_stuck_sync", queue="stuck", timeout=0.2, max_attempts=1):
    pass


@WStuckSync.handler
def w_stuck_sync(ctx: JobContext) -> None:
    with STUCK_LOCK:
        STUCK["running"] += 1
        STUCK["entered"] += 1
        STUCK["peak"] = max(STUCK["peak"], STUCK["running"])
    try:
        STUCK_RELEASE.wait(30)
    finally:
        with STUCK_LOCK:
            STUCK["running"] -= 1


def test_a_timed_out_sync_handler_holds_its_slot_until_its_thread_returns(engine, database_url, schema):
    """A thread cannot be interrupted: the worker gives up on it at the timeout (the row
    ends at once), but runs no more sync handlers of the queue at once than its concurrency."""
    STUCK.update(running=0, peak=0, entered=0)
    STUCK_RELEASE.clear()
    ids = add(engine, *(WStuckSync() for _ in range(3)))

    def first_timed_out_and_next_had_time() -> bool:
        rows = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
        if rows[ids[0]] != "dead":
            return False
        # The row ended while its thread still runs; give the worker time to start the
        # next job, which it did at once when the slot was freed with the timeout.
        return STUCK["entered"] > 1 or time.monotonic() > first_dead.setdefault("at", time.monotonic()) + 2

    first_dead: dict[str, float] = {}

    async def main() -> None:
        async with Worker(database_url, kinds=[WStuckSync], schema=schema, queues={"stuck": 1}, **FAST):
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(first_timed_out_and_next_had_time):
                    await anyio.sleep(0.05)
            assert STUCK["running"] == 1 and STUCK["peak"] == 1, STUCK
            STUCK_RELEASE.set()  # the threads return: the next jobs run, one at a time
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(finished(engine, ids)):
                    await anyio.sleep(0.05)

    try:
        anyio.run(main)
    finally:
        STUCK_RELEASE.set()
    assert STUCK["peak"] == 1 and STUCK["entered"] == 3, STUCK
    assert [job_row(engine, i).state for i in ids] == ["dead", "completed", "completed"]


class WUnstartedSync(Job, kind="w_unstarted_sync", queue="unstarted", timeout=1e-6, max_attempts=1):
    """Times out before its thread can begin the call."""


@WUnstartedSync.handler
def w_unstarted_sync(ctx: JobContext) -> None:
    return None


def test_a_sync_handler_cut_short_before_its_thread_began_frees_its_slot(engine, database_url, schema):
    """A sync handler's attempt that ends before a thread begins the call (a timeout shorter
    than the thread's start; a cancel or a release in that instant) is never run, and its
    slot is free at once. The runner waited for that thread to return, which never came:
    the one-slot queue ran nothing more (1 job dead, 2 left available), and the stop left a
    'running' thread behind that the Worker's next run would have kept a slot for."""
    ids = add(engine, *(WUnstartedSync() for _ in range(3)))

    async def main() -> tuple[int, int]:
        async with Worker(database_url, kinds=[WUnstartedSync], schema=schema, queues={"unstarted": 1},
                          shutdown_grace=0.5, **FAST) as worker:
            with anyio.move_on_after(10):
                while not await anyio.to_thread.run_sync(finished(engine, ids)):
                    await anyio.sleep(0.05)
            busy = worker._queues["unstarted"].busy
        return busy, worker._threads_left_behind()

    busy, left_behind = anyio.run(main)
    assert [job_row(engine, i).state for i in ids] == ["dead"] * 3
    assert (busy, left_behind) == (0, 0)
    assert all("ran longer than its timeout" in job_row(engine, i).errors[-1]["error"] for i in ids)


def test_a_handler_thread_given_up_before_it_began_never_runs_the_call():
    """The race behind the test above, without timing: anyio may still hand a call it
    abandoned to a thread that had taken it up; a call given up before it began returns at
    once, and one already begun is waited for."""
    calls: list[str] = []
    loop = asyncio.new_event_loop()
    try:
        unstarted = HandlerThread(loop, lambda: calls.append("unstarted"))
        assert unstarted.give_up_if_unstarted() and unstarted.done
        assert unstarted() is None and calls == []

        began, release = threading.Event(), threading.Event()
        started = HandlerThread(loop, lambda: (began.set(), release.wait(5), calls.append("started")))
        thread = threading.Thread(target=started)
        thread.start()
        assert began.wait(5)
        assert not started.give_up_if_unstarted() and not started.done
        release.set()
        thread.join(5)
        assert started.done and calls == ["started"]
    finally:
        loop.close()


def test_a_stop_leaves_an_abandoned_sync_handler_behind_after_the_grace(engine, database_url, schema):
    """The slot an abandoned thread holds does not keep a stopping worker past its grace."""
    STUCK.update(running=0, peak=0, entered=0)
    STUCK_RELEASE.clear()
    ids = add(engine, WStuckSync())

    async def main() -> float:
        async with Worker(database_url, kinds=[WStuckSync], schema=schema, queues={"stuck": 1},
                          shutdown_grace=0.5, **FAST) as worker:
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(finished(engine, ids)):
                    await anyio.sleep(0.05)
            assert STUCK["running"] == 1, STUCK
            stopping = time.monotonic()
            worker.request_stop()
        assert worker._threads_left_behind() == 1  # what `sa-jobs worker` exits past
        return time.monotonic() - stopping

    try:
        assert anyio.run(main) < 5
        assert STUCK["running"] == 1  # left behind, still running
    finally:
        STUCK_RELEASE.set()
    assert job_row(engine, ids[0]).state == "dead"



@pytest.mark.parametrize("new_loop", [False, True], ids=["same-loop", "new-loop"])
def test_the_next_run_keeps_the_slot_of_a_thread_the_last_stop_left_behind(engine, database_url, schema, new_loop):
    """A stop past the grace leaves a timed-out sync handler's thread running; the same
    Worker run again (an app's restart loop) started afresh, every slot free, and ran a
    second handler of its one-slot queue beside the thread."""
    STUCK.update(running=0, peak=0, entered=0)
    STUCK_RELEASE.clear()
    first = add(engine, WStuckSync())
    worker = Worker(database_url, kinds=[WStuckSync], schema=schema, queues={"stuck": 1}, shutdown_grace=0.2, **FAST)

    async def first_run() -> None:
        async with worker:
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(finished(engine, first)):
                    await anyio.sleep(0.05)
        assert worker._threads_left_behind() == 1

    async def second_run() -> None:
        ids = add(engine, WStuckSync())
        async with worker:
            waited = time.monotonic()
            with anyio.fail_after(20):  # the next job had time to start, or (wrongly) did
                while STUCK["entered"] == 1 and time.monotonic() < waited + 2:
                    await anyio.sleep(0.05)
            assert (STUCK["entered"], STUCK["running"]) == (1, 1), STUCK
            STUCK_RELEASE.set()  # the old thread returns: its slot is free, the job runs
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(finished(engine, ids)):
                    await anyio.sleep(0.05)
        assert job_row(engine, ids[0]).state == "completed"

    async def both() -> None:
        await first_run()
        await second_run()

    try:
        if new_loop:
            anyio.run(first_run)
            anyio.run(second_run)
        else:
            anyio.run(both)
    finally:
        STUCK_RELEASE.set()
    assert STUCK["peak"] == 1 and STUCK["entered"] == 2, STUCK


def test_a_run_stopped_before_it_began_does_not_wait_for_a_thread_an_earlier_run_left_behind(engine, database_url,
                                                                                              schema):
    """The slot a left-behind thread keeps is held while the run claims: a run stopped before
    it began still ends at once (docs/core.md), not after its grace (30 s here)."""
    STUCK.update(running=0, peak=0, entered=0)
    STUCK_RELEASE.clear()
    ids = add(engine, WStuckSync())
    worker = Worker(database_url, kinds=[WStuckSync], schema=schema, queues={"stuck": 1}, shutdown_grace=30, **FAST)

    async def first_run() -> None:
        async with worker:
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(finished(engine, ids)):
                    await anyio.sleep(0.05)
            worker.release_running()  # a hurried stop: the thread is left behind at once

    try:
        anyio.run(first_run)
        assert worker._threads_left_behind() == 1
        worker.request_stop()  # before the next run: it claims nothing and ends at once
        began = time.monotonic()
        anyio.run(worker.run)
        assert time.monotonic() - began < 5
        assert STUCK["running"] == 1 and worker._threads_left_behind() == 1
    finally:
        STUCK_RELEASE.set()


def test_the_in_flight_gauge_counts_the_slot_an_abandoned_sync_handler_keeps(engine, database_url, schema):
    """The slot a timed-out sync handler's thread keeps is no free slot: once its failure
    was written the gauges read 0 in flight and 1 slot free, while the worker claimed
    nothing (its only slot taken) until the thread returned."""
    from prometheus_client import CollectorRegistry

    from sa_jobs.metrics import PrometheusObserver

    STUCK.update(running=0, peak=0, entered=0)
    STUCK_RELEASE.clear()
    ids = add(engine, *(WStuckSync() for _ in range(2)))
    reg = CollectorRegistry()

    def gauge(name: str) -> float | None:
        return reg.get_sample_value(name, {"queue": "stuck"})

    async def main() -> None:
        async with Worker(database_url, kinds=[WStuckSync], schema=schema, queues={"stuck": 1},
                          observer=PrometheusObserver(reg), shutdown_grace=1, **FAST):
            with anyio.fail_after(20):  # read on the loop: never between the observer's calls
                while reg.get_sample_value("sa_jobs_jobs_finished_total",
                                           {"queue": "stuck", "kind": "w_stuck_sync", "outcome": "dead"}) != 1:
                    await anyio.sleep(0.02)
            assert STUCK["running"] == 1, STUCK
            assert (gauge("sa_jobs_jobs_in_flight"), gauge("sa_jobs_worker_slots_free")) == (1, 0)
            STUCK_RELEASE.set()
            with anyio.fail_after(20):
                while not await anyio.to_thread.run_sync(finished(engine, ids)):
                    await anyio.sleep(0.05)
                while gauge("sa_jobs_jobs_in_flight") != 0:
                    await anyio.sleep(0.02)
            assert gauge("sa_jobs_worker_slots_free") == 1

    try:
        anyio.run(main)
    finally:
        STUCK_RELEASE.set()
    assert STUCK["peak"] == 1 and STUCK["entered"] == 2, STUCK


class WHugeResult(Job, kind="w_huge_result", queue="w", max_attempts=3, backoff=constant_backoff(0.05)):
    pass


HUGE_RESULT_RUNS: list[int] = []


@WHugeResult.handler
async def w_huge_result(ctx: JobContext) -> str:
    HUGE_RESULT_RUNS.append(ctx.attempt)
    return "x" * (2**28)  # one byte past the longest string jsonb holds (2**28 - 1 bytes)


def test_a_result_over_the_cap_ends_the_job_dead_with_the_reason(engine, database_url, schema):
    """A result that is JSON but larger than one write can take (here past 256 MB, which
    jsonb cannot hold at all) was handed to the completer: its flush outran the deadline,
    was kept and retried with every outcome that finished meanwhile, the job ran out its
    lease, was rescued and run again, and ended dead after its last attempt with
    'LeaseExpired' (attempt 3, 3 runs). It now ends dead at once, saying why."""
    with Session(engine) as session, session.begin():
        session.add(WHugeResult())
    HUGE_RESULT_RUNS.clear()

    def finished() -> bool:
        return q(database_url, jobs_sql(schema, "SELECT state FROM {jobs}"))[0][0] in ("dead", "completed")

    # A 10 s lease: encoding 256 MB of JSON holds the event loop for a second or more, and
    # on a loaded machine past the suite's 2 s lease, which is then (rightly) rescued and
    # run again: a second attempt that is not what this test is about.
    run_worker_until(database_url, schema, [WHugeResult], finished, timeout=60, lease=10.0)
    state, attempt, errors, result = q(database_url, jobs_sql(schema, "SELECT state, attempt, errors, result FROM {jobs}"))[0]
    assert (state, attempt, HUGE_RESULT_RUNS) == ("dead", 1, [1])
    assert result is None
    assert "result" in errors[-1]["error"] and "LeaseExpired" not in errors[-1]["error"], errors[-1]["error"]


class WWideResult(Job, kind="w_wide_result", queue="w", max_attempts=3, backoff=constant_backoff(0.05)):
    pass


@WWideResult.handler
async def w_wide_result(ctx: JobContext) -> list[float]:
    return [1e308] * 55_000  # 385 KB as Python writes it; 17 MB as jsonb writes it back


def test_a_result_over_the_cap_as_jsonb_writes_it_ends_the_job_dead(engine, database_url, schema):
    """The 16 MB result cap measured Python's JSON, where 1e308 is 6 bytes: jsonb stores
    numeric and writes it back as 309 digits, so a result 44 times the cap was stored, for
    every ``job_status()`` and ``jobs show`` to read. Numbers count as jsonb writes them."""
    with Session(engine) as session, session.begin():
        session.add(WWideResult())

    def finished() -> bool:
        return q(database_url, jobs_sql(schema, "SELECT state FROM {jobs}"))[0][0] in ("dead", "completed")

    run_worker_until(database_url, schema, [WWideResult], finished, timeout=30)
    state, attempt, stored, error = q(database_url, jobs_sql(
        schema, "SELECT state, attempt, octet_length(result::text), errors->-1->>'error' FROM {jobs}"))[0]
    assert (state, attempt, stored) == ("dead", 1, None), (state, attempt, stored)
    assert "result is 17050" in error and "over the cap of 16777216" in error, error


class WLargeResult(Job, kind="w_large_result", queue="w"):
    pass


def _claimed_by_hand(engine, database_url: str, schema: str, n: int) -> list:
    """``n`` WLargeResult jobs marked running under one claim token, as a worker holds them:
    what a Completer is handed, without a worker."""
    from sa_jobs.worker._job import ClaimedJob

    with Session(engine) as session, session.begin():
        session.add_all([WLargeResult() for _ in range(n)])
    token = uuid.uuid4()
    ids = [r[0] for r in q(database_url, jobs_sql(
        schema, "UPDATE {jobs} SET state = 'running', attempt = 1, claim_token = %s,"
                " lease_expires_at = now() + interval '1 hour' RETURNING id"), (token,))]
    now = time.monotonic()
    return [ClaimedJob(id=i, token=token, kind="w_large_result", queue="w", args={}, attempt=1, max_attempts=20,
                       priority=0, wait_seconds=0, created_epoch=0, claimed_at=now, last_lease_ok=now) for i in ids]


def test_large_results_finishing_together_do_not_wedge_the_completer(engine, database_url, schema):
    """Each result was fine alone, but a flush wrote every pending outcome in one
    statement: eight results of 12 MB took longer than the completer's deadline (lease/2,
    at least 2 s), and the batch was kept and retried whole, with whatever finished
    meanwhile, for ever: no outcome of the worker landed again and every job ran out its
    lease (run by a worker with lease=2: attempt 9 of every job after 30 s, none completed)."""
    from sa_jobs._connection import ManagedConnection
    from sa_jobs.events import NullObserver
    from sa_jobs.worker._job import Outcome
    from sa_jobs.worker.completer import Completer

    jobs = _claimed_by_hand(engine, database_url, schema, 8)
    result = json.dumps(list(range(1_500_000)))  # 12 MB of JSON, slower to write than a string

    async def main() -> bool:
        conn = ManagedConnection(to_conninfo(database_url), "completer", timeout=2.0)
        completer = Completer(conn, Queries.for_schema(schema), NullObserver())
        for job in jobs:
            completer.submit(Outcome(job, "complete", result_json=result))
        try:
            return await completer.drain(timeout=40)
        finally:
            await conn.discard()

    assert anyio.run(main)
    assert q(database_url, jobs_sql(schema, "SELECT state, count(*) FROM {jobs} GROUP BY 1")) == [("completed", 8)]


def test_a_write_slower_than_the_completers_deadline_lands_on_a_later_try(engine, database_url, schema):
    """A server that takes 3 s to write an outcome, under a completer whose deadline is 2 s
    (a short lease, or a loaded host writing a large result): every try was cut off at the
    same deadline and retried with it, so the outcome never landed and the finished job ran
    out its lease and ran again (this test's own slow result write failed so under a load
    average of 6). A try after a timed-out one gets twice the time, up to four times."""
    from sa_jobs._connection import ManagedConnection
    from sa_jobs.worker._job import Outcome
    from sa_jobs.worker.completer import Completer

    (job,) = _claimed_by_hand(engine, database_url, schema, 1)
    q(database_url, sql.SQL(
        "CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS"
        " 'BEGIN PERFORM pg_sleep(3); RETURN NEW; END';"
        " CREATE TRIGGER slow_write BEFORE UPDATE ON {jobs} FOR EACH ROW"
        " WHEN (NEW.state = 'completed') EXECUTE FUNCTION {fn}()").format(
        fn=sql.Identifier(schema, "slow_write"), jobs=sql.Identifier(schema, "jobs")))

    async def main() -> bool:
        conn = ManagedConnection(to_conninfo(database_url), "completer", timeout=2.0)
        completer = Completer(conn, Queries.for_schema(schema), NullObserver())
        completer.submit(Outcome(job, "complete", result_json="1"))
        try:
            landed = await completer.drain(timeout=20)
            # Once it landed, the connection's statement_timeout is the deadline's again.
            cur = await (await conn.get()).execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("2s",)
            return landed
        finally:
            await conn.discard()

    assert anyio.run(main)
    assert q(database_url, jobs_sql(schema, "SELECT state, result FROM {jobs}")) == [("completed", 1)]


def test_a_completion_refused_by_a_key_whose_holder_then_leaves_its_states_is_written_later(engine, database_url,
                                                                                            schema):
    """A running job whose unique states leave 'running' out finishes while another job of
    its key waits (available, holding it); the index refuses the completion. The completer
    then looks the holder up, to end the job without its key, but by then the holder was
    claimed (running: holding it no more): no holder found, and the outcome was dropped
    ("dropping the complete outcome"), the job left running until its lease ran out, and
    the rescuer ended it dead once the other job completed and held the key again
    (tests/test_worker_faults.py::test_a_completion_waiting_on_another_transaction_keeps_its_lease,
    now and then). The key being free again, the outcome is kept and written."""
    from sa_jobs._connection import ManagedConnection
    from sa_jobs.worker._job import ClaimedJob, Outcome
    from sa_jobs.worker.completer import Completer

    queries = Queries.for_schema(schema)
    token = uuid.uuid4()
    insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, attempt, claim_token, lease_expires_at,"
                              " attempted_at, unique_key, unique_states) VALUES ('w_key', 'w', %s, %s, %s, %s,"
                              " now(), 'k', ARRAY['available', 'completed']) RETURNING id")
    (mine,) = q(database_url, insert, ("running", 1, token, dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)))[0]
    (holder,) = q(database_url, insert, ("available", 0, None, None))[0]
    claimed = jobs_sql(schema, "UPDATE {jobs} SET state = 'running', attempt = 1, claim_token = gen_random_uuid(),"
                               " lease_expires_at = now() + interval '1 hour' WHERE id = %s")

    class ClaimedBeforeTheLookUp:
        """The completer's connection; the holder is claimed just before the holder look-up."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        async def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
            if statement == queries.unique_holder:
                q(database_url, claimed, (holder,))
            return await self._conn.execute(statement, params, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    class Managed(ManagedConnection):
        async def get(self) -> Any:
            return ClaimedBeforeTheLookUp(await super().get())

    async def main() -> bool:
        conn = Managed(to_conninfo(database_url), "completer", timeout=5.0)
        completer = Completer(conn, queries, NullObserver())
        now = time.monotonic()
        job = ClaimedJob(id=mine, token=token, kind="w_key", queue="w", args={}, attempt=1, max_attempts=1,
                         priority=0, wait_seconds=0, created_epoch=0, claimed_at=now, last_lease_ok=now)
        completer.submit(Outcome(job, "complete", result_json="7"))
        try:
            return await completer.drain(timeout=10)
        finally:
            await conn.discard()

    assert anyio.run(main)
    rows = dict((r[0], r[1:]) for r in q(database_url, jobs_sql(schema, "SELECT id, state, result, unique_key FROM {jobs}")))
    assert rows == {mine: ("completed", 7, "k"), holder: ("running", None, "k")}


def _rows_locked_by_another_transaction(engine: Any, database_url: str, schema: str, n: int) -> tuple[list[Any], Any]:
    """``n`` jobs claimed by hand, and an open transaction holding their rows (FOR UPDATE),
    so that a completer's write of them waits until it ends."""
    jobs = _claimed_by_hand(engine, database_url, schema, n)
    blocker = psycopg.connect(database_url, autocommit=False)
    blocker.execute(jobs_sql(schema, "SELECT id FROM {jobs} FOR UPDATE"))
    return jobs, blocker


def _beside_a_running_completer(database_url: str, schema: str, jobs: list[Any], blocker: Any,
                                body: Callable[[Any, Any], Awaitable[None]]) -> None:
    """Submit a completion for each of ``jobs`` to a completer on a connection of its own,
    run its loop, and run ``body(completer, task_group)`` beside it; then cancel the loop
    (as the worker cancels its services after the drain) and close ``blocker``."""
    from sa_jobs._connection import ManagedConnection
    from sa_jobs.events import NullObserver
    from sa_jobs.worker._job import Outcome
    from sa_jobs.worker.completer import Completer

    async def main() -> None:
        conn = ManagedConnection(to_conninfo(database_url), "completer", timeout=30.0)
        completer = Completer(conn, Queries.for_schema(schema), NullObserver())
        for job in jobs:
            completer.submit(Outcome(job, "complete"))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(completer.run)
                await body(completer, tg)
                tg.cancel_scope.cancel()
        finally:
            await conn.discard()

    try:
        anyio.run(main)
    finally:
        blocker.close()


def test_completer_drain_waits_for_the_write_in_flight(engine, database_url, schema):
    """At shutdown the worker drains the completer, then cancels it. drain() looked only at
    the outcomes still pending: a batch the completer's own loop had taken and was writing
    was pending no more, so drain() returned at once, the write was cancelled, and the
    worker exited 0 with its finished jobs left running, logging nothing (SIGTERM and SIGHUP
    drains read {'running': 3} now and then on a loaded machine)."""
    jobs, blocker = _rows_locked_by_another_transaction(engine, database_url, schema, 3)
    observed: dict[str, object] = {}

    def writing() -> bool:
        return bool(q(database_url, "SELECT count(*) FROM pg_stat_activity"
                                    " WHERE wait_event_type = 'Lock' AND position(%s in query) > 0",
                      (schema,))[0][0])

    async def body(completer: Any, tg: Any) -> None:
        while not await anyio.to_thread.run_sync(writing):
            await anyio.sleep(0.02)
        # The loop's write is in flight and nothing is pending; end the block later.
        tg.start_soon(anyio.to_thread.run_sync, blocker.rollback)
        observed["drained"] = await completer.drain(timeout=10)
        observed["states"] = await anyio.to_thread.run_sync(
            q, database_url, jobs_sql(schema, "SELECT state, count(*) FROM {jobs} GROUP BY 1"))

    _beside_a_running_completer(database_url, schema, jobs, blocker, body)
    assert observed == {"drained": True, "states": [("completed", 3)]}


def test_a_drain_that_times_out_during_the_write_in_flight_counts_its_outcomes(engine, database_url, schema):
    """Found by review14: when the shutdown drain timed out while the completer's loop was
    writing a batch, the worker logged "0 outcome(s) could not be written": the batch was
    pending no more while it was written. ``unwritten`` counts it."""
    jobs, blocker = _rows_locked_by_another_transaction(engine, database_url, schema, 3)
    observed: dict[str, object] = {}

    async def body(completer: Any, tg: Any) -> None:
        with anyio.fail_after(20):
            while completer.pending:
                await anyio.sleep(0.01)
        observed["drained"] = await completer.drain(timeout=0.5)  # the row locks outlast it
        observed["pending"], observed["unwritten"] = completer.pending, completer.unwritten
        await anyio.to_thread.run_sync(blocker.rollback)
        with anyio.fail_after(20):
            while completer.unwritten:
                await anyio.sleep(0.01)

    _beside_a_running_completer(database_url, schema, jobs, blocker, body)
    assert observed == {"drained": False, "pending": 0, "unwritten": 3}
    assert q(database_url, jobs_sql(schema, "SELECT state, count(*) FROM {jobs} GROUP BY 1")) == [("completed", 3)]


def test_an_outcome_put_back_by_a_failed_part_is_counted_once_when_written(engine, database_url, schema):
    """Found by review17: a batch the database refused is written in parts; a part that
    then failed transiently (here: its row locked past the statement's deadline) was put
    back to be written later, yet the flush counted it with the rest of the batch: its
    job_finished (as lease_lost, being unwritten) and its on_written, then again once it
    landed (completed). The worker's in-flight count of outcomes went one below zero."""
    from sa_jobs._connection import ManagedConnection
    from sa_jobs.worker._job import Outcome
    from sa_jobs.worker.completer import Completer

    refused, kept = _claimed_by_hand(engine, database_url, schema, 2)
    blocker = psycopg.connect(database_url, autocommit=False)
    finished: list[tuple[int, str]] = []
    written: list[int] = []

    class Observer(NullObserver):
        def job_finished(self, queue: str, kind: str, outcome: str, run: float, since: float) -> None:
            finished.append((len(written), outcome))

        def loop_error(self, component: str) -> None:
            # The whole batch was refused: now lock the row of the outcome that was fine,
            # so its part waits on it (no row was locked while the batch was written).
            blocker.execute(jobs_sql(schema, "SELECT id FROM {jobs} WHERE id = %s FOR UPDATE"), (kept.id,))

    async def main() -> None:
        conn = ManagedConnection(to_conninfo(database_url), "completer", timeout=1.0)
        completer = Completer(conn, Queries.for_schema(schema), Observer(),
                              on_written=lambda batch: written.extend(o.job.id for o in batch))
        # A JSON text jsonb cannot store: the batch is refused, and this outcome alone.
        completer.submit(Outcome(refused, "complete", result_json='"\\u0000"', label="completed"))
        completer.submit(Outcome(kept, "complete", result_json="1", label="completed"))
        try:
            await completer.flush()  # the refused one dropped; the other put back
            assert completer.pending == 1
            await anyio.to_thread.run_sync(blocker.rollback)
            assert await completer.drain(timeout=10)
        finally:
            await conn.discard()

    try:
        anyio.run(main)
    finally:
        blocker.close()
    assert q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs} ORDER BY id")) == [
        (refused.id, "running"), (kept.id, "completed")]
    assert sorted(written) == [refused.id, kept.id], written
    assert [outcome for _, outcome in finished] == ["lease_lost", "completed"], finished


# ---- the app's own engines behind ctx.transaction() ------------------------------------------

class WFollowUp(Job, kind="w_follow_up", queue="engines"):
    pass


@WFollowUp.handler
async def w_follow_up(ctx: JobContext, by: str) -> str:
    return by


class WEnqueuesSync(Job, kind="w_enqueues_sync", queue="engines"):
    pass


@WEnqueuesSync.handler
def w_enqueues_sync(ctx: JobContext) -> None:
    with ctx.transaction() as session:
        session.add(WFollowUp(by="sync"))


class WEnqueuesAsync(Job, kind="w_enqueues_async", queue="engines"):
    pass


@WEnqueuesAsync.handler
async def w_enqueues_async(ctx: JobContext) -> None:
    async with ctx.async_transaction() as session:
        session.add(WFollowUp(by="async"))


def test_the_apps_own_engines_write_to_the_workers_schema(engine, database_url, schema):
    """``Worker(engine=..., async_engine=...)`` with the app's engines (its pool settings)
    and a schema of its own: jobs a handler enqueued in ``ctx.transaction()`` went to the
    default ``sa_jobs`` schema (or failed where it does not exist), since only the engines
    the worker creates mapped the schema; a worker of ``schema`` never saw them. The
    app's own schema_translate_map entries are kept."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs._url import sqlalchemy_url

    app_map = {"reports": "reports_v2"}  # the app's own mapping, for its own tables
    app_engine = create_engine(sqlalchemy_url(database_url), pool_size=2).execution_options(schema_translate_map=app_map)
    app_async = create_async_engine(sqlalchemy_url(database_url, async_=True), pool_size=2)
    try:
        worker = Worker(database_url, kinds=[WFollowUp, WEnqueuesSync, WEnqueuesAsync], schema=schema,
                        engine=app_engine, async_engine=app_async, **FAST)
        assert worker.sync_engine().get_execution_options()["schema_translate_map"] == {**app_map, "sa_jobs": schema}
        add(engine, WEnqueuesSync(), WEnqueuesAsync())

        def follow_ups_done() -> bool:
            return q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE kind = 'w_follow_up'"
                                                    " AND state = 'completed'"))[0][0] == 2

        async def main() -> None:
            async with worker:
                with anyio.move_on_after(15):
                    while not await anyio.to_thread.run_sync(follow_ups_done):
                        await anyio.sleep(0.05)

        anyio.run(main)
        rows = q(database_url, jobs_sql(schema, "SELECT kind, state, result FROM {jobs} ORDER BY kind, result"))
        assert rows == [("w_enqueues_async", "completed", None), ("w_enqueues_sync", "completed", None),
                        ("w_follow_up", "completed", "async"), ("w_follow_up", "completed", "sync")]
    finally:
        app_engine.dispose()
        anyio.run(app_async.dispose)


class WNote(Job, kind="w_note", queue="w_elsewhere"):
    pass


class WFencedTx(Job, kind="w_fenced_tx", queue="w_tx", max_attempts=1):
    pass


@WFencedTx.handler
def w_fenced_tx(ctx: JobContext, url: str) -> None:
    with ctx.transaction() as session:
        session.add(WNote())
        session.flush()
        # Another worker takes the job over meanwhile: the completion below is refused.
        with psycopg.connect(to_conninfo(url), autocommit=True) as conn:
            conn.execute(jobs_sql(ctx.schema, "UPDATE {jobs} SET claim_token = gen_random_uuid() WHERE id = %s"),
                         (ctx.id,))


def test_a_transactional_completion_refuses_an_autocommit_engine(engine, database_url, schema):
    """On an AUTOCOMMIT engine ctx.transaction() committed each statement on its own: a
    handler's effects stayed although its completion was fenced off. Such an engine is a
    ConfigurationError when the worker is built; one in autocommit by other means (the
    driver's connect_args) fails the attempt before the handler writes anything."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs._url import sqlalchemy_url

    url = sqlalchemy_url(database_url)
    refused = [("engine", create_engine(url, isolation_level="AUTOCOMMIT")),
               ("engine", create_engine(url).execution_options(isolation_level="AUTOCOMMIT")),
               ("async_engine", create_async_engine(sqlalchemy_url(database_url, async_=True),
                                                    isolation_level="AUTOCOMMIT"))]
    for param, app in refused:
        with pytest.raises(ConfigurationError, match=f"AUTOCOMMIT.*pass {param}="):
            Worker(database_url, kinds=[WFencedTx], schema=schema, **{param: app})
    # Set back on the engine the app passes: accepted.
    Worker(database_url, kinds=[WFencedTx], schema=schema,
           engine=create_engine(url, isolation_level="AUTOCOMMIT").execution_options(isolation_level="READ COMMITTED"))

    driver_autocommit = create_engine(url, connect_args={"autocommit": True})
    try:
        (job_id,) = add(engine, WFencedTx(url=database_url))
        run_worker_until(database_url, schema, [WFencedTx], lambda: job_row(engine, job_id).state == "dead",
                         timeout=15, engine=driver_autocommit)
    finally:
        driver_autocommit.dispose()
    errors = job_row(engine, job_id).errors
    assert errors[0]["error"].startswith("ConfigurationError: ctx.transaction() commits"), errors
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE kind = 'w_note'")) == [(0,)]


def test_the_apps_engines_of_the_wrong_kind_are_refused_when_the_worker_is_built(database_url, schema):
    """An AsyncEngine passed as ``engine=`` (or a sync Engine as ``async_engine=``) was
    accepted: every attempt of a handler using ctx.transaction() then failed with
    SQLAlchemy's AsyncContextNotStarted (and a never-awaited coroutine), retried until
    dead; a URL string raised an AttributeError. A ConfigurationError names the swap."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs._url import sqlalchemy_url

    sync_app = create_engine(sqlalchemy_url(database_url))
    async_app = create_async_engine(sqlalchemy_url(database_url, async_=True))
    cases = [("engine", async_app, "engine= takes a SQLAlchemy Engine .*not AsyncEngine; pass it as async_engine="),
             ("async_engine", sync_app, "async_engine= takes a SQLAlchemy AsyncEngine .*not Engine; pass it as engine="),
             ("engine", database_url, "engine= takes a SQLAlchemy Engine .*not str"),
             ("engine", create_engine("sqlite://"), "PostgreSQL engine, not 'sqlite'")]
    for param, given, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            Worker(database_url, kinds=[WFencedTx], schema=schema, **{param: given})
    worker = Worker(database_url, kinds=[WFencedTx], schema=schema, engine=sync_app, async_engine=async_app)
    assert worker.sync_engine().pool is sync_app.pool and worker.async_engine().sync_engine.pool is async_app.sync_engine.pool


class WSyncTxOnTheLoop(Job, kind="w_sync_tx_on_the_loop", queue="w_tx", max_attempts=1):
    pass


@WSyncTxOnTheLoop.handler
async def w_sync_tx_on_the_loop(ctx: JobContext, seconds: float) -> None:
    with ctx.transaction() as session:
        session.add(WNote())
        session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


def test_ctx_transaction_in_an_async_handler_is_refused_before_it_blocks_the_loop(engine, database_url, schema):
    """An async handler's ``with ctx.transaction()`` ran a sync Session on the worker's event
    loop: for the whole transaction (here 3 s of a lock wait, past the 2 s lease) no
    heartbeat, claim, timeout or other job of the worker ran. It is refused before the
    Session opens, naming ctx.async_transaction(); perform_async() refuses it alike, so a
    unit test sees what the worker would do."""
    from sa_jobs.testing import perform_async

    (job_id,) = add(engine, WSyncTxOnTheLoop(seconds=3))
    started = time.monotonic()
    run_worker_until(database_url, schema, [WSyncTxOnTheLoop], lambda: job_row(engine, job_id).state == "dead",
                     timeout=15)
    assert time.monotonic() - started < 2.5
    errors = job_row(engine, job_id).errors
    assert errors[0]["error"].startswith("ConfigurationError: ctx.transaction() was called on the worker's event loop"), errors
    assert "ctx.async_transaction()" in errors[0]["error"]
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE kind = 'w_note'")) == [(0,)]

    async def unit_test() -> None:
        with pytest.raises(ConfigurationError, match="async_transaction"):
            await perform_async(WSyncTxOnTheLoop(seconds=0), engine=engine)

    anyio.run(unit_test)


POOL_ENTERED = {"n": 0}
POOL_LOCK = threading.Lock()


def _entered_and_wait_for(n: int) -> None:
    """Count this handler in, then wait (at most 10 s) until ``n`` handlers are in."""
    with POOL_LOCK:
        POOL_ENTERED["n"] += 1
    deadline = time.monotonic() + 10
    while POOL_ENTERED["n"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {POOL_ENTERED['n']} of {n} handlers got into their transaction")
        time.sleep(0.01)


class WPoolSync(Job, kind="w_pool_sync", queue="w_pool", max_attempts=1):
    pass


@WPoolSync.handler
def w_pool_sync(ctx: JobContext, n: int) -> None:
    with ctx.transaction() as session:
        session.execute(select(1))
        _entered_and_wait_for(n)


class WPoolAsync(Job, kind="w_pool_async", queue="w_pool", max_attempts=1):
    pass


@WPoolAsync.handler
async def w_pool_async(ctx: JobContext, n: int) -> None:
    async with ctx.async_transaction() as session:
        await session.execute(select(1))
        with POOL_LOCK:
            POOL_ENTERED["n"] += 1
        with anyio.fail_after(10):
            while POOL_ENTERED["n"] < n:
                await anyio.sleep(0.01)


@pytest.mark.parametrize("kind", [WPoolSync, WPoolAsync], ids=["transaction", "async_transaction"])
def test_every_handler_of_a_busy_worker_gets_a_transaction_at_once(engine, database_url, schema, kind):
    """The engines the worker creates had SQLAlchemy's default pool (5 + 10 overflow): above
    15 handlers at once, the next ctx.transaction() waited for a connection (30 s, then
    an error) while the others held theirs. The pool is sized to the worker's concurrency."""
    POOL_ENTERED["n"] = 0
    n = 20
    ids = add(engine, *[kind(n=n) for _ in range(n)])
    run_worker_until(database_url, schema, [kind], finished(engine, ids), timeout=40, queues={"w_pool": n})
    rows = q(database_url, jobs_sql(schema, "SELECT state, errors FROM {jobs} ORDER BY id"))
    assert [state for state, _ in rows] == ["completed"] * n, [e[0]["error"] for _, e in rows if e][:3]


# ---- starting inside an app: the schema check ------------------------------------------------

def _in_app_thread(main, limit: float = 20) -> list:
    """Run ``main`` on an event loop in a daemon thread: what it returned or raised, or
    nothing if it did not end within ``limit`` (a hang fails the test instead of hanging it)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(anyio.run(main))
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    return outcome


def _start_within(worker: Worker, seconds: float) -> float:
    """Enter ``worker`` under the app's own deadline; how long until the app got control back."""
    started = time.monotonic()

    async def main() -> None:
        with anyio.move_on_after(seconds):
            async with worker:
                await anyio.sleep_forever()

    assert _in_app_thread(main) == [None], "the app's deadline did not reach a starting worker"
    return time.monotonic() - started


@pytest.mark.parametrize("deadline", [0, 0.02, 0.1])
@pytest.mark.parametrize("cancelled_by", ["anyio", "asyncio"])
def test_a_worker_whose_start_is_cancelled_stops_instead_of_running_on(engine, database_url, schema, deadline,
                                                                        cancelled_by):
    """An app cancelled while it enters the worker (Ctrl-C during startup, a startup
    deadline; an anyio scope or asyncio's own timeout): anyio's ``TaskGroup.start()``
    waits for a task whose start was cancelled, and the worker's serve task is shielded,
    so the app hung for good while the worker ran on and claimed jobs. A cancelled start
    now stops it."""
    [job_id] = add(engine, WQuick())
    worker = Worker(database_url, kinds=[WQuick], schema=schema, check_schema=False, **FAST)
    if cancelled_by == "anyio":
        took = _start_within(worker, deadline)
    else:
        import asyncio

        async def startup() -> None:
            async with worker:
                await asyncio.sleep(60)

        async def app() -> None:  # asyncio's own cancellation, as its timeouts and Ctrl-C send it
            task = asyncio.get_running_loop().create_task(startup())
            await asyncio.sleep(deadline)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        started = time.monotonic()
        assert _in_app_thread(app) == [None], "asyncio's timeout did not reach a starting worker"
        took = time.monotonic() - started
    assert took < 5
    [(state,)] = q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,))
    assert state in ("available", "completed")  # never left claimed


def test_a_start_waiting_on_a_locked_schema_version_yields_to_the_apps_cancellation(database_url, schema):
    """The schema check ran in a thread that a cancellation does not interrupt: while a
    migration held the version table, an app's startup deadline, or Ctrl-C, waited for the
    migration's end (here 8 s) instead of returning."""
    release = threading.Event()
    locked = threading.Event()

    def migration() -> None:
        with psycopg.connect(to_conninfo(database_url)) as conn:
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(schema, "schema_version")))
            locked.set()
            release.wait(8)

    holder = threading.Thread(target=migration)
    holder.start()
    try:
        assert locked.wait(10)
        took = _start_within(Worker(database_url, kinds=[WQuick], schema=schema, **FAST), 0.5)
    finally:
        release.set()
        holder.join()
    assert took < 3, f"the app got control back after {took:.1f}s"


def test_a_server_that_never_answers_fails_the_start_in_bounded_time(database_url):
    """A server that accepts the connection and never answers (a stuck server, a pooler
    out of backends): the schema check connected without a timeout and the app's startup
    hung for good, past its own deadline too. Now the connect times out like the worker's
    own connections do (5 s) and the error says so."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        try:
            while True:
                accepted.append(listener.accept()[0])
        except OSError:
            pass  # closed by the test

    threading.Thread(target=accept, daemon=True).start()
    url = f"postgresql://nobody@127.0.0.1:{listener.getsockname()[1]}/nothing"
    try:
        took = _start_within(Worker(url, kinds=[WQuick], **FAST), 1)
        assert took < 3, f"the app got control back after {took:.1f}s"

        async def start() -> None:
            async with Worker(url, kinds=[WQuick], **FAST):
                pass

        [error] = _in_app_thread(start) or [None]
        assert isinstance(error, psycopg.OperationalError) and "timeout" in str(error), error
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg2", "postgres", "postgresql+psycopg"])
def test_an_apps_url_for_another_postgres_driver_runs_the_worker(engine, database_url, schema, driver):
    """An async app's settings hold ``postgresql+asyncpg://...`` (or psycopg2's form): the
    worker refused it with "sa-jobs needs PostgreSQL", for a PostgreSQL URL. The URL only
    locates the database; the worker connects with psycopg 3 whatever the driver named."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url).set(drivername=driver).render_as_string(hide_password=False)
    [job_id] = add(engine, WQuick())
    run_worker_until(url, schema, [WQuick], lambda: job_row(engine, job_id).state == "completed", timeout=15)
    assert job_row(engine, job_id).state == "completed"


def test_mixing_sqlalchemys_two_multi_host_forms_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="multihost") as info:
        to_conninfo("postgresql://app:s3cr3t@/app?host=a:5432&host=b:5433&port=5432")
    assert "s3cr3t" not in str(info.value)


def test_a_url_option_libpq_does_not_know_is_a_configuration_error():
    """asyncpg's ``?ssl=require`` (libpq's is ``sslmode``) raised psycopg's ProgrammingError
    from ``Worker()``, not the ConfigurationError the other URL mistakes raise."""
    with pytest.raises(ConfigurationError, match='"ssl"'):
        Worker("postgresql+asyncpg://app:s3cr3t@db.internal/app?ssl=require", kinds=[WQuick])


_SYNC_APP = """
import asyncio, atexit, sys, threading, time
from sa_jobs import Job, Worker

class Slow(Job, kind="w_sync_app_slow", queue="sync_app"):
    pass

@Slow.handler
def slow(ctx):
    print("started", flush=True)
    time.sleep(0.5)

worker = Worker(sys.argv[1], kinds=[Slow], schema=sys.argv[2], concurrency=4, poll_interval=0.1, shutdown_grace=10)
thread = threading.Thread(target=asyncio.run, args=(worker.run(),), daemon=True)
thread.start()
atexit.register(lambda: (worker.request_stop(), thread.join()))
time.sleep(float(sys.argv[3]))
"""


def test_the_sync_app_recipe_stops_the_worker_at_exit_with_no_job_left_running(engine, database_url, schema):
    """docs/core.md's recipe for a sync app (a daemon thread, request_stop() and join from
    atexit): the process exits and every job it claimed is finished or given back."""
    import os
    import subprocess
    import sys

    from .conftest import REPO_ROOT

    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) SELECT 'w_sync_app_slow', 'sync_app'"
                                     " FROM generate_series(1, 12)"))
    proc = subprocess.run([sys.executable, "-c", _SYNC_APP, database_url, schema, "0.8"], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "started" in proc.stdout
    assert states(database_url, schema).get("running", 0) == 0, states(database_url, schema)


class WStopMidTick(Job, kind="w_stop_mid_tick", queue="w_stop_mid_tick"):
    pass


@WStopMidTick.handler
async def w_stop_mid_tick(ctx: JobContext) -> None:
    pass


def test_a_stop_lets_the_maintenance_tick_in_flight_end(database_url, schema, caplog):
    """A stop cancelled the maintainer mid-statement: the tick's work was cut off, and now
    and then psycopg warned "query cancellation interrupted (CancelledError): closing
    connection" at a plain shutdown (2 of 20 runs of a worker-faults test read it). The
    worker now asks the maintainer to stop and waits for its tick to end."""
    import logging

    mid_query = threading.Event()
    ended: list[bool] = []

    class SlowTick:
        name, leader_only = "slow_tick", False

        async def run_once(self, conn, queries) -> None:
            mid_query.set()
            await conn.execute("SELECT pg_sleep(0.5)")
            ended.append(True)

    caplog.set_level(logging.WARNING)

    async def main() -> None:
        async with Worker(database_url, kinds=[WStopMidTick], schema=schema, maintenance_interval=0.05,
                          maintenance=[SlowTick()]):
            while not mid_query.is_set():
                await anyio.sleep(0.01)

    anyio.run(main)
    assert ended == [True]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_the_worker_connections_keep_the_options_of_the_url(database_url):
    """The service connections passed their statement_timeout as ``options=``, which
    replaced the URL's own (a role, a search_path, -c settings): the worker ran without
    what its URL asked for."""
    from urllib.parse import quote

    from sa_jobs._connection import ManagedConnection

    sep = "&" if "?" in database_url else "?"
    url = f"{database_url}{sep}options={quote('-c work_mem=7MB -c application_name=ignored')}"

    async def main() -> tuple[str, str]:
        conn = ManagedConnection(to_conninfo(url), "producer", timeout=3.0)
        try:
            live = await conn.get()
            work_mem = (await (await live.execute("SHOW work_mem")).fetchone())[0]
            timeout = (await (await live.execute("SHOW statement_timeout")).fetchone())[0]
            return work_mem, timeout
        finally:
            await conn.close()

    assert anyio.run(main) == ("7MB", "3s")


def test_an_observer_with_an_async_hook_is_refused(database_url):
    """The worker calls hooks without awaiting them: an async job_finished made a coroutine
    that never ran, so its metrics were silently missing (a "never awaited" warning each)."""

    class AsyncObserver:
        def claimed(self, queue: str, count: int, seconds: float) -> None:
            pass

        async def job_finished(self, queue: str, kind: str, outcome: str, run: float, since: float) -> None:
            pass

    with pytest.raises(ConfigurationError, match=r"observer hook job_finished\(\) is async"):
        Worker(database_url, kinds=[WSync], observer=AsyncObserver())  # type: ignore[arg-type]


class WSyncExit(Job, kind="w_sync_exit", queue="w", max_attempts=2, backoff=constant_backoff(0.05)):
    pass


@WSyncExit.handler
def w_sync_exit(ctx: JobContext) -> None:
    raise SystemExit(3)  # sys.exit(3), as a CLI's main() or argparse's usage error calls it


class WAsyncExit(Job, kind="w_async_exit", queue="w", max_attempts=2, backoff=constant_backoff(0.05)):
    pass


@WAsyncExit.handler
async def w_async_exit(ctx: JobContext) -> None:
    raise SystemExit(4)


def test_a_handler_calling_sys_exit_fails_its_attempt_not_the_worker(engine, database_url, schema):
    """SystemExit left the event loop: the worker was gone, its claimed jobs (the sibling
    too) left running until their leases ran out, for the job to crash the next worker."""
    ids = add(engine, WSyncExit(), WAsyncExit(), WSync(a=1, b=2))
    run_worker_until(database_url, schema, [WSyncExit, WAsyncExit, WSync], finished(engine, ids), timeout=15)
    sync_exit, async_exit, sibling = (job_row(engine, i) for i in ids)
    assert (sync_exit.state, sync_exit.attempt) == ("dead", 2)
    assert [e["error"] for e in sync_exit.errors] == ["SystemExit: 3"] * 2
    assert (async_exit.state, async_exit.attempt) == ("dead", 2)
    assert [e["error"] for e in async_exit.errors] == ["SystemExit: 4"] * 2
    assert (sibling.state, sibling.result) == ("completed", 3)


class WDecimalTimeout(Job, kind="w_decimal_timeout", queue="w", timeout=decimal.Decimal("5"),
                      max_attempts=2, backoff=constant_backoff(0.05)):
    pass


@WDecimalTimeout.handler
async def w_decimal_timeout(ctx: JobContext) -> int:
    return 7


class WTimedeltaTimeout(Job, kind="w_timedelta_timeout", queue="w", timeout=dt.timedelta(seconds=0.3),
                        max_attempts=1):
    pass


@WTimedeltaTimeout.handler
async def w_timedelta_timeout(ctx: JobContext) -> None:
    await anyio.sleep(5)


def test_a_timeout_given_as_a_decimal_or_a_timedelta_runs(engine, database_url, schema):
    """timeout=Decimal("5") was accepted, and every attempt then failed around the handler
    (float + Decimal: TypeError), the handler never run; timeout=timedelta(...) raised a bare
    TypeError at the class statement, where delay= takes one."""
    assert WDecimalTimeout.kind_options().timeout == 5.0
    assert WTimedeltaTimeout.kind_options().timeout == 0.3
    ids = add(engine, WDecimalTimeout(), WTimedeltaTimeout())
    run_worker_until(database_url, schema, [WDecimalTimeout, WTimedeltaTimeout], finished(engine, ids), timeout=15)
    decimal_job, timedelta_job = (job_row(engine, i) for i in ids)
    assert (decimal_job.state, decimal_job.attempt, decimal_job.result) == ("completed", 1, 7)
    assert timedelta_job.state == "dead"
    assert "ran longer than its timeout of 0.3s" in timedelta_job.errors[0]["error"]


@pytest.mark.parametrize("option, value", [
    ("timeout", "5"), ("timeout", True), ("timeout", 0), ("timeout", -1.0), ("timeout", math.nan),
    ("timeout", math.inf), ("timeout", decimal.Decimal("NaN")),
    ("timeout", dt.timedelta(0)), ("timeout", 10**400),
    ("tags", None), ("partition_by", None), ("partition_by", 5),
])
def test_a_kind_option_of_the_wrong_type_is_a_configuration_error(option, value):
    """Each raised a bare TypeError (or decimal's InvalidOperation) at the class statement,
    or (timeout=True) was taken for one second."""
    with pytest.raises(ConfigurationError, match=option):
        type("WBadOption", (Job,), {}, kind="w_bad_option", **{option: value})


def _logged(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator as apps write them: a plain wrapper, whatever ``fn`` is."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


WRAPPED_RUNS: list[int] = []


class WWrappedAsync(Job, kind="w_wrapped_async", queue="w", max_attempts=2, backoff=constant_backoff(0.05)):
    pass


@WWrappedAsync.handler
@_logged
async def w_wrapped_async(ctx: JobContext, n: int) -> int:
    await anyio.sleep(0)
    WRAPPED_RUNS.append(n)
    return 2 * n


class WWrappedTimeout(Job, kind="w_wrapped_timeout", queue="w", max_attempts=1, timeout=0.3):
    pass


@WWrappedTimeout.handler
@_logged
async def w_wrapped_timeout(ctx: JobContext) -> None:
    await anyio.sleep(5)


def test_an_async_handler_behind_a_plain_decorator_is_awaited(engine, database_url, schema):
    """A plain wrapper is no coroutine function: the worker ran it in a thread, which gave
    back the coroutine unstarted; the job ended dead at once ("result is a coroutine") with
    its handler never run. The awaitable a sync handler returns is awaited on the loop, under
    the kind's timeout."""
    WRAPPED_RUNS.clear()
    ids = add(engine, WWrappedAsync(n=21), WWrappedTimeout())
    run_worker_until(database_url, schema, [WWrappedAsync, WWrappedTimeout], finished(engine, ids), timeout=15)
    wrapped, timed = (job_row(engine, i) for i in ids)
    assert (wrapped.state, wrapped.attempt, wrapped.result, WRAPPED_RUNS) == ("completed", 1, 42, [21])
    assert timed.state == "dead"
    assert "ran longer than its timeout of 0.3s" in timed.errors[0]["error"]
    assert perform(WWrappedAsync(n=4)) == 8  # the test helper runs it as a worker does
    assert anyio.run(perform_async, WWrappedAsync(n=5)) == 10


class WTimedeltaBackoff(Job, kind="w_timedelta_backoff", queue="w", max_attempts=3,
                        backoff=constant_backoff(dt.timedelta(minutes=10))):
    pass


class WTimedeltaPolicy(WTimedeltaBackoff, kind="w_timedelta_policy", backoff=lambda n: dt.timedelta(minutes=5 * n)):
    """A policy of its own that gives a timedelta, as delay= and Snooze take one."""


@WTimedeltaBackoff.handler
async def w_timedelta_backoff(ctx: JobContext) -> None:
    raise ValueError("later")


def test_constant_backoff_takes_a_timedelta_and_refuses_no_duration(engine, database_url, schema):
    """constant_backoff(timedelta(minutes=10)) was taken, and the worker, failing float() of
    it at each retry, fell back to the default backoff (1 s, 2 s, ...); -1, NaN, a string or
    a bool were taken the same way."""
    ids = add(engine, WTimedeltaBackoff(), WTimedeltaPolicy())
    run_worker_until(database_url, schema, [WTimedeltaBackoff],
                     lambda: all(job_row(engine, i).state == "retryable" for i in ids), timeout=10)
    delays = q(database_url, jobs_sql(schema, "SELECT extract(epoch FROM scheduled_at - attempted_at) FROM {jobs}"
                                              " ORDER BY id"))
    assert [round(float(d)) for (d,) in delays] == [600, 300]
    for bad in (-1, math.nan, "5", True, None, dt.timedelta(days=400)):
        with pytest.raises(ConfigurationError, match="constant_backoff"):
            constant_backoff(bad)


class _UnprintableDiscard(Discard):
    """An exception whose __str__ fails (its __init__ skipped the base's, as apps' do)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __str__(self) -> str:
        return str(self.message)  # type: ignore[attr-defined]


UNPRINTABLE_RUNS: list[int] = []


class WUnprintable(Job, kind="w_unprintable", queue="w", max_attempts=3, backoff=constant_backoff(0.05)):
    pass


@WUnprintable.handler
async def w_unprintable(ctx: JobContext) -> None:
    UNPRINTABLE_RUNS.append(ctx.attempt)
    raise _UnprintableDiscard(5)


def test_an_error_whose_str_fails_keeps_its_outcome(engine, database_url, schema):
    """Recording it raised from its __str__: the worker "failed around the handler", so a
    Discard (or a Cancel) was retried to its last attempt, each recorded as the __str__'s
    AttributeError."""
    UNPRINTABLE_RUNS.clear()
    (job_id,) = add(engine, WUnprintable())
    run_worker_until(database_url, schema, [WUnprintable], finished(engine, [job_id]), timeout=10)
    job = job_row(engine, job_id)
    assert (job.state, job.attempt, UNPRINTABLE_RUNS) == ("dead", 1, [1])
    assert [e["error"] for e in job.errors] == ["_UnprintableDiscard: <exception str() failed>"]


class WStrayCancel(Job, kind="w_stray_cancel", queue="w", max_attempts=2, backoff=constant_backoff(0.05)):
    pass


@WStrayCancel.handler
async def w_stray_cancel(ctx: JobContext) -> None:
    task = asyncio.ensure_future(asyncio.sleep(10))
    await asyncio.sleep(0)
    task.cancel()  # as a client library does with a request of its own
    await task  # CancelledError, though nobody cancelled the handler


class WSyncStrayCancel(Job, kind="w_sync_stray_cancel", queue="w", max_attempts=1):
    pass


@WSyncStrayCancel.handler
def w_sync_stray_cancel(ctx: JobContext) -> None:
    raise asyncio.CancelledError()  # a future of its own, cancelled


class WSlowOk(Job, kind="w_slow_ok", queue="w"):
    pass


@WSlowOk.handler
async def w_slow_ok(ctx: JobContext, n: int) -> int:
    await anyio.sleep(0.3)
    return n


def test_a_cancelled_error_of_the_handlers_own_fails_its_attempt(engine, database_url, schema):
    """It ended the runner as if the worker were cancelled, which stopped the whole worker
    without a word: every claimed job (the siblings too) stayed running until its lease ran
    out, and worker.run() went on waiting, serving nothing."""
    ids = add(engine, WStrayCancel(), WSyncStrayCancel(), *[WSlowOk(n=i) for i in range(4)])
    run_worker_until(database_url, schema, [WStrayCancel, WSyncStrayCancel, WSlowOk], finished(engine, ids),
                     timeout=10)
    rows = q(database_url, jobs_sql(schema, "SELECT kind, state, attempt, errors->0->>'error' FROM {jobs} ORDER BY id"))
    assert rows == [("w_stray_cancel", "dead", 2, "CancelledError: "),
                    ("w_sync_stray_cancel", "dead", 1, "CancelledError: ")] + [("w_slow_ok", "completed", 1, None)] * 4


async def _exits(code: int) -> None:
    await anyio.sleep(0)
    raise SystemExit(code)


class WGroupChildExit(Job, kind="w_group_child_exit", queue="w", max_attempts=1):
    pass


@WGroupChildExit.handler
async def w_group_child_exit(ctx: JobContext) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_exits, 5)  # a task of the handler's own calls sys.exit(5)
        await anyio.sleep(5)


class WTaskExit(Job, kind="w_task_exit", queue="w", max_attempts=1):
    pass


@WTaskExit.handler
async def w_task_exit(ctx: JobContext) -> int:
    task = asyncio.create_task(_exits(6))  # never awaited: the handler returns without it
    await anyio.sleep(0.2)
    assert task.done()
    return 1


class WGroupExit(Job, kind="w_group_exit", queue="w", max_attempts=1):
    pass


@WGroupExit.handler
async def w_group_exit(ctx: JobContext) -> None:
    raise BaseExceptionGroup("the handler's own", [SystemExit(7), ValueError("and this")])


def test_sys_exit_in_a_task_the_handler_started_fails_its_attempt_not_the_worker(engine, database_url, schema):
    """asyncio re-raises SystemExit out of the event loop from the step of the task that
    raised it: a handler's task group child (or a bare asyncio task) calling sys.exit()
    ended the whole worker, its claimed jobs left running until their leases ran out; a
    BaseExceptionGroup holding it, raised by the handler, ended the worker's task groups."""
    ids = add(engine, WGroupChildExit(), WTaskExit(), WGroupExit(), *[WSync(a=i, b=1) for i in range(3)])
    run_worker_until(database_url, schema, [WGroupChildExit, WTaskExit, WGroupExit, WSync], finished(engine, ids),
                     timeout=15)
    group_child, task, group = (job_row(engine, i) for i in ids[:3])
    assert group_child.state == "dead"
    assert "SystemExit: 5" in group_child.errors[0]["traceback"]
    assert task.state == "dead" and task.result is None
    assert "SystemExit: 6" in task.errors[0]["traceback"]
    assert group.state == "dead"
    assert "SystemExit: 7" in group.errors[0]["traceback"]
    assert [job_row(engine, i).result for i in ids[3:]] == [1, 2, 3]


async def _interrupts() -> None:
    await anyio.sleep(0)
    raise KeyboardInterrupt  # as Python raises a Ctrl-C in whatever code runs


class WTaskInterrupt(Job, kind="w_task_interrupt", queue="w"):
    pass


@WTaskInterrupt.handler
async def w_task_interrupt(ctx: JobContext) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(_interrupts)
        await anyio.sleep(5)


def test_a_keyboard_interrupt_in_a_handlers_task_still_stops_the_worker(engine, database_url, schema):
    """Only SystemExit is a handler's failure: a KeyboardInterrupt cannot be told from a
    real Ctrl-C, which must stop the worker, not fail the job."""
    (job_id,) = add(engine, WTaskInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_worker_until(database_url, schema, [WTaskInterrupt], lambda: False, timeout=15)
    job = job_row(engine, job_id)
    # Not failed. (Nor released: the interrupt tears the worker's task groups down; its
    # lease runs out and the rescuer gives the job back, as after a crash.)
    assert (job.state, job.errors) == ("running", [])


def test_outcomes_written_before_a_stop_cut_a_split_batch_short_count_as_written(engine, database_url, schema):
    """The database refused a batch (one bad outcome), and the completer wrote it in parts;
    the stop's drain ran out while a later part was being written. The outcomes of the
    parts already written had landed (their rows completed), but the stop reported every
    outcome of the batch as lease_lost, as if none had been written."""
    from sa_jobs._connection import ManagedConnection
    from sa_jobs.worker._job import Outcome
    from sa_jobs.worker.completer import Completer

    queries = Queries.for_schema(schema)
    good, bad = _claimed_by_hand(engine, database_url, schema, 2)

    class SlowOnTheBadPart:
        """The completer's connection; the part holding the bad outcome is slow (pg_sleep)."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        async def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
            if statement == queries.flush_outcomes and params["c_ids"] == [bad.id]:
                await self._conn.execute("SELECT pg_sleep(30)")
            return await self._conn.execute(statement, params, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    class Managed(ManagedConnection):
        async def get(self) -> Any:
            return SlowOnTheBadPart(await super().get())

    class Labels(NullObserver):
        def __init__(self) -> None:
            self.labels: dict[int, str] = {}

        def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since: float) -> None:
            self.labels[len(self.labels)] = outcome

    observer = Labels()

    async def main() -> None:
        conn = Managed(to_conninfo(database_url), "completer", timeout=60.0)
        completer = Completer(conn, queries, observer)
        completer.submit(Outcome(good, "complete", result_json="1", label="completed"))
        completer.submit(Outcome(bad, "complete", result_json="not json", label="completed"))  # refused: 22P02
        try:
            assert await completer.drain(timeout=3) is False  # True, with an outcome unwritten
            assert completer.unwritten == 1  # the bad outcome; the good one landed
            completer.abandon()
        finally:
            await conn.discard()

    anyio.run(main)
    rows = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
    assert rows == {good.id: "completed", bad.id: "running"}
    assert sorted(observer.labels.values()) == ["completed", "lease_lost"]


def test_an_outcome_whose_write_landed_but_whose_reply_was_lost_counts_as_written(engine, database_url, schema):
    """A flush committed, then its connection failed before the reply came (a reset, a
    deadline): the completer retried the batch, as it must, and the fence refused each
    outcome, its row no longer running: the first try had written it. Each completed job
    was counted lease_lost, as if another worker had taken it over. Only this claim's own
    write completes its row under its token: read so, the outcome counts as written."""
    from sa_jobs._connection import ManagedConnection
    from sa_jobs.worker._job import Outcome
    from sa_jobs.worker.completer import Completer

    queries = Queries.for_schema(schema)
    jobs = _claimed_by_hand(engine, database_url, schema, 2)
    lost: list[bool] = []

    class ReplyLostOnce:
        """The completer's connection: the first flush is written, and its reply lost."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        async def execute(self, statement: Any, params: Any = None, **kw: Any) -> Any:
            cur = await self._conn.execute(statement, params, **kw)
            if statement == queries.flush_outcomes and not lost:
                lost.append(True)
                await self._conn.close()
                raise psycopg.OperationalError("the connection was lost before the reply")
            return cur

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    class Managed(ManagedConnection):
        async def get(self) -> Any:
            return ReplyLostOnce(await super().get())

    class Labels(NullObserver):
        def __init__(self) -> None:
            self.labels: list[str] = []

        def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since: float) -> None:
            self.labels.append(outcome)

    observer = Labels()

    async def main() -> bool:
        conn = Managed(to_conninfo(database_url), "completer", timeout=10.0)
        completer = Completer(conn, queries, observer)
        completer.submit(Outcome(jobs[0], "complete", result_json="1", label="completed"))
        completer.submit(Outcome(jobs[1], "complete", result_json="2", label="completed"))
        try:
            return await completer.drain(timeout=10)
        finally:
            await conn.discard()

    assert anyio.run(main)
    assert lost == [True]
    assert dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}"))) == {
        jobs[0].id: "completed", jobs[1].id: "completed"}
    assert observer.labels == ["completed", "completed"]
