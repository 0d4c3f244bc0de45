"""Unique jobs: enforced by the unique partial index, safe in the caller's transaction."""

from __future__ import annotations

import datetime as dt
import threading

import anyio
import pytest
from sqlalchemy import create_engine, func, inspect, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from sa_jobs import ConfigurationError, Job, JobContext, Snooze, Unique, constant_backoff, enqueue_many
from sa_jobs._url import sqlalchemy_url
from sa_jobs.schema import DEFAULT_SCHEMA

from .helpers import jobs_sql, q, run_worker_until, wait_for


class UqDigest(Job, kind="uq_digest", queue="uq", unique=Unique(by=("user_id",))):
    pass


class UqHourly(Job, kind="uq_hourly", unique=Unique(by=("user_id",), period=dt.timedelta(hours=1))):
    pass


class UqReplace(Job, kind="uq_replace", unique=Unique(by=("user_id",), on_conflict="replace")):
    pass


class UqReplaceByCustomer(Job, kind="uq_replace_customer", partition_by=("customer",),
                          unique=Unique(by=("order",), on_conflict="replace")):
    pass


class UqByQueue(Job, kind="uq_by_queue", unique=Unique(by=(), by_queue=True)):
    pass


class UqHourlyByQueue(Job, kind="uq_hourly_by_queue", unique=Unique(by=(), by_queue=True, period=dt.timedelta(hours=1))):
    pass


class UqPlain(Job, kind="uq_plain"):
    pass


def _state_and_args(session, job_id):
    """The job's row as the session's transaction reads it (not its object)."""
    table = UqReplace.__table__
    return session.execute(select(table.c.state, table.c.args).where(table.c.id == job_id)).one()


def _rows(database_url, schema, kind):
    return q(database_url, jobs_sql(schema, "SELECT id, args, state, unique_key FROM {jobs} WHERE kind = %s ORDER BY id"), (kind,))


def test_duplicate_returns_existing_job_without_poisoning_the_transaction(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        first = UqDigest(user_id=1, note="a")
        session.add(first)
        session.flush()
        assert first.id is not None and not first.was_duplicate
        second = UqDigest(user_id=1, note="b")
        session.add(second)
        session.flush()  # no IntegrityError: the transaction stays usable
        assert second.was_duplicate and second.id == first.id and second.args == {"user_id": 1, "note": "a"}
        other = UqDigest(user_id=2)
        session.add(other)
        session.flush()
        assert not other.was_duplicate and other.id != first.id
        assert session.scalar(select(func.count()).select_from(UqDigest)) == 2
    rows = _rows(database_url, schema, "uq_digest")
    assert [r[1]["user_id"] for r in rows] == [1, 2]
    # A later transaction sees the committed key too.
    with Session(engine) as session, session.begin():
        again = UqDigest(user_id=1)
        session.add(again)
        session.flush()
        assert again.was_duplicate and again.state == "available"
    assert len(_rows(database_url, schema, "uq_digest")) == 2


def test_key_frees_when_the_job_leaves_its_states(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(UqDigest(user_id=5))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE kind = 'uq_digest'"))
    with Session(engine) as session, session.begin():
        job = UqDigest(user_id=5)
        session.add(job)
    assert not job.was_duplicate
    assert [r[2] for r in _rows(database_url, schema, "uq_digest")] == ["completed", "available"]


def test_add_all_mixes_unique_and_plain_rows(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(UqDigest(user_id=1))
        session.flush()
        batch = [UqPlain(n=1), UqDigest(user_id=1), UqDigest(user_id=2), UqPlain(n=2), UqDigest(user_id=2)]
        session.add_all(batch)
        session.flush()
        assert [j.was_duplicate for j in batch] == [False, True, False, False, True]
        assert batch[2].id == batch[4].id
    assert len(_rows(database_url, schema, "uq_digest")) == 2
    assert len(_rows(database_url, schema, "uq_plain")) == 2


def test_rollback_discards_the_unique_row(engine, database_url, schema):
    with Session(engine) as session:
        with session.begin():
            session.add(UqDigest(user_id=9))
            session.flush()
            session.rollback()
    assert _rows(database_url, schema, "uq_digest") == []
    with Session(engine) as session, session.begin():
        job = UqDigest(user_id=9)
        session.add(job)
    assert not job.was_duplicate


# A rollback undoes the hook's INSERT. The objects the hook attached in the rolled-back
# scope (transaction or savepoint) must become transient again, as SQLAlchemy makes a plain
# job it inserted there, with the caller's values back: re-adding them enqueues them anew.


def test_rollback_then_re_add_inserts_the_job(engine, database_url, schema):
    with Session(engine) as session:
        job = UqDigest(user_id=9, note="retry")
        session.add(job)
        session.flush()
        assert job.id is not None
        session.rollback()
        assert inspect(job).transient
        assert job.args == {"user_id": 9, "note": "retry"} and not job.was_duplicate
        session.add(job)  # the usual retry after a failed commit
        session.commit()
        assert inspect(job).persistent and not job.was_duplicate
        job_id = job.id
    rows = _rows(database_url, schema, "uq_digest")
    assert [(r[0], r[1]) for r in rows] == [(job_id, {"user_id": 9, "note": "retry"})]


def test_savepoint_rollback_then_re_add_in_the_outer_transaction(engine, database_url, schema):
    with Session(engine) as session:
        with session.begin():
            kept = UqDigest(user_id=1)
            session.add(kept)
            session.flush()
            job = UqDigest(user_id=2)
            with pytest.raises(RuntimeError):
                with session.begin_nested():
                    session.add(job)
                    session.flush()
                    raise RuntimeError("undo the savepoint")
            assert inspect(job).transient and inspect(kept).persistent  # only the savepoint's scope
            session.add(job)
        assert inspect(job).persistent and not job.was_duplicate
        ids = {kept.id, job.id}
    rows = _rows(database_url, schema, "uq_digest")
    assert len(rows) == 2 and {r[0] for r in rows} == ids
    assert sorted(r[1]["user_id"] for r in rows) == [1, 2]


def test_released_savepoint_is_undone_by_the_outer_rollback(engine, database_url, schema):
    with Session(engine) as session:
        job = UqDigest(user_id=3)
        with session.begin_nested():
            session.add(job)
        session.rollback()
        assert inspect(job).transient
        session.add(job)
        session.commit()
        assert not job.was_duplicate
    assert len(_rows(database_url, schema, "uq_digest")) == 1


def test_rollback_leaves_committed_jobs_alone(engine, database_url, schema):
    with Session(engine) as session:
        done = UqDigest(user_id=1)
        session.add(done)
        session.commit()
        done_id = done.id
        undone = UqDigest(user_id=2)
        session.add(undone)
        session.flush()
        session.rollback()
        assert inspect(done).persistent and done.id == done_id and not done.was_duplicate
        assert inspect(undone).transient
        session.add_all([done, undone])  # done: already there, nothing to write
        session.commit()
        assert not undone.was_duplicate and undone.id != done_id
    assert sorted(r[1]["user_id"] for r in _rows(database_url, schema, "uq_digest")) == [1, 2]


def test_rolled_back_duplicate_is_evaluated_again(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        held = UqDigest(user_id=4, note="held")
        session.add(held)
        session.flush()
        held_id = held.id
    with Session(engine) as session:
        dup = UqDigest(user_id=4, note="mine")
        session.add(dup)
        session.flush()
        assert dup.was_duplicate and dup.id == held_id and dup.args["note"] == "held"
        session.rollback()
        # The caller's own job again, not the one it was a duplicate of.
        assert inspect(dup).transient and not dup.was_duplicate
        assert dup.args == {"user_id": 4, "note": "mine"}
        session.add(dup)
        session.commit()
        assert dup.was_duplicate and dup.id == held_id and dup.args["note"] == "held"
    rows = _rows(database_url, schema, "uq_digest")
    assert [(r[0], r[1]) for r in rows] == [(held_id, {"user_id": 4, "note": "held"})]


def test_rollback_of_a_duplicate_within_the_same_flush(engine, database_url, schema):
    with Session(engine) as session:
        a, b = UqDigest(user_id=5, note="a"), UqDigest(user_id=5, note="b")
        session.add_all([a, b])
        session.flush()
        assert b.was_duplicate and b.id == a.id
        session.rollback()
        assert inspect(a).transient and inspect(b).transient and b.args["note"] == "b"
        session.add(b)  # only b this time: it is no duplicate now
        session.commit()
        assert not b.was_duplicate
        b_id = b.id
    rows = _rows(database_url, schema, "uq_digest")
    assert [(r[0], r[1]["note"]) for r in rows] == [(b_id, "b")]


def test_rolled_back_replace_is_replayed(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(UqReplace(user_id=1, v=1))
    with Session(engine) as session:
        job = UqReplace(user_id=1, v=2)
        session.add(job)
        session.flush()
        assert job.was_replaced
        session.rollback()
        assert inspect(job).transient and not job.was_replaced and not job.was_duplicate
        assert _rows(database_url, schema, "uq_replace")[0][1] == {"user_id": 1, "v": 1}
        session.add(job)
        session.commit()
        assert job.was_replaced and job.args == {"user_id": 1, "v": 2}
    rows = _rows(database_url, schema, "uq_replace")
    assert [r[1] for r in rows] == [{"user_id": 1, "v": 2}]


def test_async_session_rollback_then_re_add(database_url, schema):
    async def main() -> tuple[bool, bool, bool]:
        engine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema}
        )
        try:
            async with AsyncSession(engine) as session:
                job = UqDigest(user_id=6)
                session.add(job)
                await session.flush()
                await session.rollback()
                transient = inspect(job).transient
                session.add(job)
                await session.commit()
                return transient, inspect(job).persistent, job.was_duplicate
        finally:
            await engine.dispose()

    assert anyio.run(main) == (True, True, False)
    assert len(_rows(database_url, schema, "uq_digest")) == 1


def test_unique_jobs_added_by_an_apps_own_before_flush_listener(engine, database_url, schema):
    """A listener registered after sa-jobs' hook (an app enqueueing a job for each changed
    row, say) adds its jobs after the hook has looked at session.new: they went to the
    ORM's plain INSERT, with the key the object carries (no period bucket). The second
    transaction raised IntegrityError (jobs_unique_idx) for UqDigest, and UqHourly's rows
    held a key without its bucket, which the jobs enqueued the usual way never meet."""
    from sqlalchemy import event

    def enqueue_for_plain_rows(session, flush_context, instances):
        if any(isinstance(o, UqPlain) for o in session.new):
            session.add_all([UqDigest(user_id=1), UqHourly(user_id=1), UqDigest(user_id=1)])

    event.listen(Session, "before_flush", enqueue_for_plain_rows)
    try:
        for _ in range(2):
            with Session(engine) as session, session.begin():
                session.add(UqPlain(n=1))
    finally:
        event.remove(Session, "before_flush", enqueue_for_plain_rows)
    with Session(engine) as session, session.begin():
        hourly = UqHourly(user_id=1)
        session.add(hourly)
        session.flush()
        assert hourly.was_duplicate
    assert len(_rows(database_url, schema, "uq_digest")) == 1
    (_, _, _, key), = _rows(database_url, schema, "uq_hourly")
    assert ":" in key  # the period's bucket, computed by the database


def test_period_bucket_uses_the_database_clock(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        a, b = UqHourly(user_id=1), UqHourly(user_id=1)
        session.add_all([a, b])
        session.flush()
        assert b.was_duplicate and a.id == b.id
        bucket = session.scalar(select(func.floor(func.extract("epoch", func.now()) / 3600)))
        assert a.unique_key.endswith(":" + str(int(bucket)))
    # A row from an earlier hour does not hold this hour's key.
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET unique_key = split_part(unique_key, ':', 1) || ':1' WHERE kind = 'uq_hourly'"))
    with Session(engine) as session, session.begin():
        c = UqHourly(user_id=1)
        session.add(c)
    assert not c.was_duplicate


def test_replace_rewrites_a_waiting_job_but_not_a_running_one(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(UqReplace(user_id=1, v=1))
    with Session(engine) as session, session.begin():
        job = UqReplace(user_id=1, v=2).options(priority=5, delay=dt.timedelta(minutes=10))
        session.add(job)
        session.flush()
        assert job.was_duplicate and job.was_replaced
        assert (job.args, job.priority, job.state) == ({"user_id": 1, "v": 2}, 5, "scheduled")
    rows = _rows(database_url, schema, "uq_replace")
    assert len(rows) == 1 and rows[0][1] == {"user_id": 1, "v": 2}
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'running', claim_token = gen_random_uuid(),"
                                      " lease_expires_at = now() + interval '1 minute'"))
    with Session(engine) as session, session.begin():
        job = UqReplace(user_id=1, v=3)
        session.add(job)
        session.flush()
        assert job.was_duplicate and not job.was_replaced and job.args["v"] == 2 and job.state == "running"


def test_replace_updates_the_replaced_jobs_object_already_in_the_session(engine, database_url, schema):
    """The hook's UPDATE bypasses the unit of work: the object of the replaced row that the
    session already held (the first of two in one flush, or one loaded by a query) kept the
    old args, and a select in the same transaction returned it with them ({"v": 1} while the
    row held {"v": 2})."""
    with Session(engine) as session, session.begin():
        first, second = UqReplace(user_id=1, v=1), UqReplace(user_id=1, v=2).options(priority=4)
        session.add_all([first, second])
        session.flush()
        assert second.was_replaced and second.id == first.id
        assert (first.args, first.priority) == ({"user_id": 1, "v": 2}, 4)
        assert session.scalars(select(UqReplace)).one().args == {"user_id": 1, "v": 2}
    with Session(engine) as session, session.begin():
        loaded = session.scalars(select(UqReplace)).one()
        loaded.max_attempts = 9  # a pending change of the caller's is kept, and flushed after
        session.add(UqReplace(user_id=1, v=3).options(max_attempts=2, tags=["t"]))
        session.flush()
        assert (loaded.args, loaded.tags, loaded.max_attempts) == ({"user_id": 1, "v": 3}, ["t"], 9)
        with session.begin_nested() as savepoint:
            session.add(UqReplace(user_id=1, v=4))
            session.flush()
            assert loaded.args == {"user_id": 1, "v": 4}
            savepoint.rollback()
        assert loaded.args == {"user_id": 1, "v": 3}  # the savepoint's rewrite is undone
    assert q(database_url, jobs_sql(schema, "SELECT args, tags, max_attempts FROM {jobs}")) == [
        ({"user_id": 1, "v": 3}, ["t"], 9)]


def test_replace_moves_the_partition_key_with_the_args(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(UqReplaceByCustomer(order=1, customer="a"))
    with Session(engine) as session, session.begin():
        job = UqReplaceByCustomer(order=1, customer="b")
        session.add(job)
        session.flush()
        assert job.was_replaced and job.partition_key == '"b"'
    with Session(engine) as session, session.begin():
        assert enqueue_many(session, UqReplaceByCustomer, [{"order": 1, "customer": "c"}]) == 1
    rows = q(database_url, jobs_sql(schema, "SELECT args->>'customer', partition_key FROM {jobs} WHERE kind = %s"),
             ("uq_replace_customer",))
    assert rows == [("c", '"c"')]


def test_by_queue_keys_per_queue(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        jobs = [UqByQueue(x=1), UqByQueue(x=2).options(queue="b"), UqByQueue(x=3), UqByQueue(x=4).options(queue="b")]
        session.add_all(jobs)
    assert [j.was_duplicate for j in jobs] == [False, False, True, True]


def test_options_queue_after_flush_keeps_the_period_bucket(engine, database_url, schema):
    """options(queue=) recomputed the key as at construction, without the period's bucket
    (which the database adds at INSERT): on a row already written, the UPDATE dropped it,
    and a job of the same key in the same hour was no longer a duplicate."""
    with Session(engine) as session, session.begin():
        job = UqHourly(user_id=1)
        session.add(job)
        session.flush()
        job.options(queue="elsewhere")
        moved = UqByQueue(x=1)
        session.add(moved)
        session.flush()
        moved.options(queue="b")  # by_queue: the key follows the queue
        hourly = UqHourlyByQueue()
        session.add(hourly)
        session.flush()
        hourly.options(queue="b")  # ... and keeps its bucket
    with Session(engine) as session, session.begin():
        again, on_b, on_default = UqHourly(user_id=1), UqByQueue(x=2).options(queue="b"), UqByQueue(x=3)
        hourly_b, hourly_default = UqHourlyByQueue().options(queue="b"), UqHourlyByQueue()
        session.add_all([again, on_b, on_default, hourly_b, hourly_default])
        session.flush()
        assert (again.was_duplicate, on_b.was_duplicate, on_default.was_duplicate) == (True, True, False)
        assert (hourly_b.was_duplicate, hourly_default.was_duplicate) == (True, False)
    (_, _, _, key), = _rows(database_url, schema, "uq_hourly")
    assert ":" in key


def test_async_session(database_url, schema):
    async def main() -> tuple[bool, bool, int, int]:
        engine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema}
        )
        try:
            async with AsyncSession(engine) as session, session.begin():
                a, b = UqDigest(user_id=3), UqDigest(user_id=3)
                session.add(a)
                await session.flush()
                session.add(b)
                await session.flush()
                return a.was_duplicate, b.was_duplicate, a.id, b.id
        finally:
            await engine.dispose()

    a_dup, b_dup, a_id, b_id = anyio.run(main)
    assert (a_dup, b_dup) == (False, True) and a_id == b_id
    assert len(_rows(database_url, schema, "uq_digest")) == 1


def test_options_queue_of_an_expired_job_in_a_session(engine, database_url, schema):
    """`.options(queue=)` of a stored by_queue job expired by a commit read its key and args
    after setting the queue: the lazy load autoflushed the queue without the key, which the
    flush refused as an edit that leaves the key stale. Moving to the queue the job is on
    already (whose history, unloaded, looks changed) flushes too."""
    with Session(engine) as session:
        job, same = UqHourlyByQueue(), UqByQueue(x=1)
        session.add_all([job, same])
        session.commit()
        job.options(queue="b")
        same.options(queue="default")
        session.commit()
        assert (job.queue, same.queue) == ("b", "default")
        again = UqHourlyByQueue().options(queue="b")
        session.add(again)
        session.flush()
        assert again.was_duplicate and again.id == job.id and ":" in job.unique_key


@pytest.mark.parametrize("kind, autoflush", [(UqByQueue, True), (UqHourlyByQueue, False)])
def test_options_queue_of_an_expired_job_in_an_async_session(database_url, schema, kind, autoflush):
    """A stored job of a by_queue kind, expired by `await session.commit()`
    (expire_on_commit): `.options(queue=)` read its unique key and args to move the key,
    a lazy load that an AsyncSession cannot do outside the flush (MissingGreenlet; with
    autoflush, the load's autoflush refused the queue as a stale-key edit first). The key
    is moved at flush instead, where the session loads what it needs."""
    async def main() -> tuple[str, str]:
        engine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema}
        )
        try:
            async with AsyncSession(engine, autoflush=autoflush) as session:
                job = kind(x=1) if kind is UqByQueue else kind()
                session.add(job)
                await session.commit()  # expires every attribute of job
                job.options(queue="b", priority=2)
                await session.commit()
                on_b = (kind(x=1) if kind is UqByQueue else kind()).options(queue="b")
                on_default = kind(x=1) if kind is UqByQueue else kind()
                session.add_all([on_b, on_default])
                await session.flush()
                assert on_b.was_duplicate and on_b.id == inspect(job).identity[0] and on_b.priority == 2
                assert not on_default.was_duplicate
                await session.commit()
                await session.refresh(job)
                return job.queue, job.unique_key
        finally:
            await engine.dispose()

    queue, key = anyio.run(main)
    assert queue == "b"
    assert (":" in key) == (kind is UqHourlyByQueue)  # a period's bucket stays


def test_enqueue_many_skips_duplicates_in_bulk(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(UqDigest(user_id=0))
        session.flush()
        written = enqueue_many(session, UqDigest, [{"user_id": i % 50} for i in range(200)])
        assert written == 49  # user 0 existed; each other user once
        written = enqueue_many(session, [UqDigest(user_id=100), UqPlain(n=1), UqDigest(user_id=100), UqPlain(n=2)])
        assert written == 3
    assert len(_rows(database_url, schema, "uq_digest")) == 51
    assert len(_rows(database_url, schema, "uq_plain")) == 2


def test_enqueue_many_replace_bulk(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        enqueue_many(session, UqReplace, [{"user_id": 1, "v": 1}])
        written = enqueue_many(session, UqReplace, [{"user_id": 1, "v": 2}, {"user_id": 1, "v": 3}, {"user_id": 2, "v": 1}])
        assert written == 2  # one replaced, one inserted
    rows = _rows(database_url, schema, "uq_replace")
    assert sorted((r[1]["user_id"], r[1]["v"]) for r in rows) == [(1, 3), (2, 1)]


def test_invalid_unique_declarations():
    with pytest.raises(ConfigurationError):
        Unique(states=("done",))
    with pytest.raises(ConfigurationError):
        Unique(by="user_id")
    with pytest.raises(ConfigurationError):
        Unique(on_conflict="ignore")
    with pytest.raises(ConfigurationError):
        Unique(period=dt.timedelta(milliseconds=5))
    with pytest.raises(ConfigurationError, match="whole seconds"):  # was cut to buckets of 1 s
        Unique(period=dt.timedelta(seconds=1.5))
    assert Unique(period=dt.timedelta(minutes=1.5)).period_seconds == 90


@pytest.mark.parametrize("states", [("running",), ("scheduled", "running"), ("running", "retryable", "completed")])
def test_states_that_hold_the_key_running_but_not_available_are_refused(states):
    """A claim moves a job from available to running with no look at its key: with
    running among its states and available not, two jobs of one key both waited
    available (not in the unique index), and the claim that took them (or one of them
    while the other ran) failed on jobs_unique_idx. It failed every claim of the queue,
    for good: no job of that queue, of any kind, ran again. Refused at declaration; one
    job at a time per key is a partition limit (partition_by=, partition_concurrency=1)."""
    with pytest.raises(ConfigurationError, match="available.*partition_by"):
        Unique(by=("user_id",), states=states)
    assert Unique(states=("available", "running")).states == ("available", "running")


def _deadlocks(database_url: str) -> int:
    return q(database_url, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")[0][0]


@pytest.mark.parametrize("kind", [UqDigest, UqReplace])
def test_64_concurrent_sessions_insert_one_row(database_url, schema, kind):
    """64 threads, 64 connections, 64 transactions enqueue the same key at the same time
    (for a replace kind, 63 of them rewrite the one row in turn)."""
    n = 64
    engine = create_engine(sqlalchemy_url(database_url), poolclass=NullPool).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: schema}
    )
    barrier = threading.Barrier(n, timeout=60)
    results: list[tuple[bool, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    before = _deadlocks(database_url)

    def enqueue_one(i: int) -> None:
        try:
            with Session(engine) as session:
                session.connection()  # connect (and BEGIN) before the race starts
                barrier.wait()
                job = kind(user_id=42, thread=i)
                session.add(job)
                session.flush()
                session.commit()
                with lock:
                    results.append((job.was_duplicate, job.id))
        except BaseException as exc:  # pragma: no cover - reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=enqueue_one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine.dispose()
    assert errors == []
    assert len(results) == n
    assert sum(1 for dup, _ in results if not dup) == 1
    assert len({job_id for _, job_id in results}) == 1
    assert len(_rows(database_url, schema, kind.kind_options().kind)) == 1
    assert _deadlocks(database_url) == before


@pytest.mark.parametrize("kind", [UqDigest, UqReplace])
def test_concurrent_bulk_enqueues_in_opposite_orders_do_not_deadlock(database_url, schema, kind):
    """enqueue_many sorts by key, so overlapping batches lock keys in one order (a replace
    kind's rewrites of the waiting jobs too)."""
    engine = create_engine(sqlalchemy_url(database_url), poolclass=NullPool).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: schema}
    )
    keys = list(range(300))
    barrier = threading.Barrier(4, timeout=30)
    errors: list[BaseException] = []
    before = _deadlocks(database_url)

    def load(order: list[int]) -> None:
        try:
            with Session(engine) as session, session.begin():
                session.connection()
                barrier.wait()
                enqueue_many(session, kind, [{"user_id": k} for k in order])
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(o,)) for o in (keys, keys[::-1], keys[::2] + keys[1::2], keys[::-1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    engine.dispose()
    assert errors == []
    assert len(_rows(database_url, schema, kind.kind_options().kind)) == 300
    assert _deadlocks(database_url) == before


# The key is free while the job runs ('running' is not one of its states).
HOLDER_ENGINE: list = []


class UqFreeWhileRunning(Job, kind="uq_free_while_running", queue="uq_run", max_attempts=3,
                         backoff=constant_backoff(0.05),
                         unique=Unique(by=("user_id",), states=("available", "scheduled", "retryable", "completed"))):
    pass


@UqFreeWhileRunning.handler
def uq_free_while_running(ctx: JobContext, user_id: int, then: str) -> str:
    # Another job takes the key meanwhile; it waits in a queue this worker does not serve.
    with Session(HOLDER_ENGINE[0]) as session, session.begin():
        session.add(UqFreeWhileRunning(user_id=user_id, then="wait").options(queue="uq_elsewhere"))
    if then == "raise":
        raise ValueError("card declined")
    if then == "snooze":
        raise Snooze(60)
    return "sent"


class UqFreeWhileRunningTx(Job, kind="uq_free_while_running_tx", queue="uq_run", max_attempts=3,
                           backoff=constant_backoff(0.05),
                           unique=Unique(by=("user_id",), states=("available", "scheduled", "retryable", "completed"))):
    pass


class UqTxNote(Job, kind="uq_tx_note", queue="uq_elsewhere"):
    pass


@UqFreeWhileRunningTx.handler
async def uq_free_while_running_tx(ctx: JobContext, user_id: int, then: str) -> None:
    def take_key() -> None:
        with Session(HOLDER_ENGINE[0]) as session, session.begin():
            session.add(UqFreeWhileRunningTx(user_id=user_id, then="wait").options(queue="uq_elsewhere"))

    await anyio.to_thread.run_sync(take_key)
    if then == "transaction":
        def complete() -> None:
            with ctx.transaction(result="sent") as session:
                session.add(UqTxNote())

        await anyio.to_thread.run_sync(complete)
    else:
        async with ctx.async_transaction(result="sent") as session:
            session.add(UqTxNote())


@pytest.mark.parametrize("then", ["transaction", "async_transaction"])
def test_a_transactional_completion_on_a_key_taken_while_the_job_ran_is_kept(engine, database_url, schema, then):
    """As a returned result (below), a completion through ctx.transaction() whose key
    another job took meanwhile is kept and gives the key up. The unique index refused the
    completion's UPDATE inside the handler's transaction: its work was rolled back, the
    attempt failed with IntegrityError, and the retry ended the job dead."""
    HOLDER_ENGINE[:] = [engine]
    with Session(engine) as session, session.begin():
        session.add(UqFreeWhileRunningTx(user_id=7, then=then))

    def first() -> tuple:
        return q(database_url, jobs_sql(schema, "SELECT state, result, unique_key, errors FROM {jobs} WHERE id = 1"))[0]

    run_worker_until(database_url, schema, [UqFreeWhileRunningTx], lambda: first()[0] in ("completed", "dead"),
                     timeout=20, lease=10.0)
    assert first() == ("completed", "sent", None, [])
    assert q(database_url, jobs_sql(schema, "SELECT id, state, unique_key IS NOT NULL FROM {jobs}"
                                             " WHERE id <> 1 AND kind = 'uq_free_while_running_tx'")) == [(2, "available", True)]
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE kind = 'uq_tx_note'")) == [(1,)]


@pytest.mark.parametrize("then", ["return", "raise", "snooze"])
def test_an_outcome_on_a_key_taken_while_the_job_ran_is_written(engine, database_url, schema, then):
    """The unique index refuses the outcome's state (completed, or retryable for a retry):
    the completer used to drop it, so the job sat running until its lease ran out, its
    result or error lost, and was then rescued. Now a finished job keeps its outcome and
    gives up the key; one that would run again ends dead, naming the holder."""
    HOLDER_ENGINE[:] = [engine]
    with Session(engine) as session, session.begin():
        session.add(UqFreeWhileRunning(user_id=7, then=then))

    def first() -> tuple:
        return q(database_url, jobs_sql(schema, "SELECT state, result, unique_key, errors FROM {jobs} WHERE id = 1"))[0]

    run_worker_until(database_url, schema, [UqFreeWhileRunning], lambda: first()[0] in ("completed", "dead"),
                     timeout=20, lease=10.0)
    state, result, unique_key, errors = first()
    holder = q(database_url, jobs_sql(schema, "SELECT id, state, queue, unique_key IS NOT NULL FROM {jobs} WHERE id <> 1"))
    assert holder == [(2, "available", "uq_elsewhere", True)]
    if then == "return":
        assert (state, result, unique_key) == ("completed", "sent", None)
    else:
        assert state == "dead", errors
        assert unique_key is not None  # dead is not one of its states: it keeps the key
        # Its own reason first: a snooze is not a release at shutdown.
        assert errors[-1]["error"].startswith("ValueError: card declined" if then == "raise" else "snoozed for 60.0s")
        assert "not run again: job 2 holds its unique key" in errors[-1]["error"]


class UqSnoozeNow(Job, kind="uq_snooze_now", queue="uq_run", unique=Unique(by=("user_id",), states=("available",))):
    pass


@UqSnoozeNow.handler
def uq_snooze_now(ctx: JobContext, user_id: int) -> None:
    with Session(HOLDER_ENGINE[0]) as session, session.begin():
        session.add(UqSnoozeNow(user_id=user_id).options(queue="uq_elsewhere"))
    raise Snooze(0)


def test_a_snooze_of_no_delay_on_a_key_taken_while_the_job_ran_waits_for_the_key(engine, database_url, schema):
    """A snooze of no delay makes its job available at once, but not a unique job whose
    key 'available' would hold (and 'scheduled' would not) while another job holds it: the
    index refused the write and the job ended dead. It waits, scheduled, as the promotion
    of a snoozed job does."""
    HOLDER_ENGINE[:] = [engine]
    with Session(engine) as session, session.begin():
        session.add(UqSnoozeNow(user_id=7))

    def first() -> tuple:
        return q(database_url, jobs_sql(schema, "SELECT state, attempt, errors FROM {jobs} WHERE id = 1"))[0]

    run_worker_until(database_url, schema, [UqSnoozeNow], lambda: first()[0] not in ("available", "running"),
                     timeout=20, lease=10.0)
    assert first() == ("scheduled", 0, [])
    holder = q(database_url, jobs_sql(schema, "SELECT id, state, queue FROM {jobs} WHERE id <> 1"))
    assert holder == [(2, "available", "uq_elsewhere")]


def test_a_batch_with_one_refused_outcome_is_written_in_halves(database_url, schema):
    """One outcome the unique index refuses (its key taken while the job ran) made the
    completer write the rest of its batch one statement per outcome: 2,000 round trips for
    a full batch, logged at ERROR. It now writes the refused batch by halves: here 64
    outcomes in 14 statements (the batch, two halves at each of six levels, and the
    refused outcome's own write), every one of them written."""
    import time

    from sa_jobs._connection import ManagedConnection
    from sa_jobs._url import to_conninfo
    from sa_jobs.events import NullObserver
    from sa_jobs.queries import Queries
    from sa_jobs.worker._job import ClaimedJob, Outcome
    from sa_jobs.worker.completer import Completer

    running = ("INSERT INTO {jobs} (kind, queue, state, attempt, claim_token, lease_expires_at, unique_key, unique_states)"
               " SELECT 'k', 'q', 'running', 1, gen_random_uuid(), now() + interval '1 hour', %s, %s"
               " FROM generate_series(1, %s) RETURNING id, claim_token")
    states = ["available", "completed"]  # leaves 'running' out: another job may take the key meanwhile
    rows = q(database_url, jobs_sql(schema, running), (None, None, 40))
    rows += q(database_url, jobs_sql(schema, running), ("k1", states, 1))
    rows += q(database_url, jobs_sql(schema, running), (None, None, 23))
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, unique_key, unique_states)"
                                     " VALUES ('k', 'q', 'k1', %s)"), (states,))  # takes the key
    now = time.monotonic()
    outcomes = [Outcome(ClaimedJob(id=i, token=t, kind="k", queue="q", args={}, attempt=1, max_attempts=3, priority=0,
                                   wait_seconds=0.0, created_epoch=0.0, claimed_at=now, last_lease_ok=now),
                        "complete", result_json='"ok"') for i, t in rows]

    class Counting(Completer):
        statements = 0

        async def _write(self, conn, batch):  # type: ignore[no-untyped-def]
            Counting.statements += 1
            return await super()._write(conn, batch)

    async def main() -> None:
        conn = ManagedConnection(to_conninfo(database_url), "completer", timeout=10)
        completer = Counting(conn, Queries.for_schema(schema), NullObserver())
        for outcome in outcomes:
            completer.submit(outcome)
        assert await completer.flush()
        await conn.close()

    anyio.run(main)
    assert Counting.statements <= 1 + 2 * 6 + 1, Counting.statements  # one by one: 1 + 64 + 1
    assert q(database_url, jobs_sql(schema, "SELECT state, count(*), count(*) FILTER (WHERE result = '\"ok\"')"
                                            " FROM {jobs} WHERE id = ANY(%s) GROUP BY 1"), ([i for i, _ in rows],)) == [
        ("completed", 64, 64)]


def test_a_unique_by_name_the_args_lack_is_refused_before_any_row(engine, database_url, schema):
    """``Unique(by=("user_id",))`` with args lacking ``user_id`` (a typo, ``user=``) left the
    name out of the key: every such job shared one key, and all but the first were dropped
    as duplicates without a word. Refused at construction, as ``partition_by`` is."""
    with pytest.raises(ConfigurationError, match="user_id"):
        UqDigest(user=1)
    with Session(engine) as session, session.begin():
        with pytest.raises(ConfigurationError, match="user_id"):
            enqueue_many(session, UqDigest, [{"user_id": 1}, {"user": 2}])
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(0,)]
    assert UqDigest(user_id=None).unique_key != UqDigest(user_id=1).unique_key  # None is a value


class UqByPoint(Job, kind="uq_by_point", unique=Unique(by=("at",))):
    pass


@pytest.mark.parametrize("first, then", [
    (-0.0, 0.0),  # numeric has no negative zero
    (1e16, 10**16),  # 1e+16 is stored as the number 10000000000000000, read back as an int
    ([2.5e20, {"y": -0.0}], [250000000000000000000, {"y": 0.0}]),
])
def test_args_stored_alike_share_one_key_on_every_path(engine, database_url, schema, first, then):
    """jsonb stores numbers as numeric: ``-0.0`` is stored (and read by the worker) as
    ``0.0``, ``1e16`` as the int ``10000000000000000``. The key hashed Python's JSON text
    of the args, so two jobs whose stored args (and a worker's handler call) are the same
    held two keys, both enqueued, by session.add and enqueue_many alike."""
    with Session(engine) as session, session.begin():
        session.add(UqByPoint(at=first))
    with Session(engine) as session, session.begin():
        again = UqByPoint(at=then)
        session.add(again)
        session.flush()
        assert again.was_duplicate
        assert enqueue_many(session, UqByPoint, [{"at": then}, {"at": first}]) == 0
        assert enqueue_many(session, [UqByPoint(at=then), UqByPoint(at=first)]) == 0
    rows = _rows(database_url, schema, "uq_by_point")
    assert len(rows) == 1
    with Session(engine) as session, session.begin():
        stored = session.get(UqByPoint, rows[0][0])
        assert stored.args == {"at": then}  # as a worker reads it
        assert UqByPoint(**stored.args).unique_key == stored.unique_key


class UqReplaceRunning(Job, kind="uq_replace_running", queue="uq_run",
                       unique=Unique(by=("user_id",), on_conflict="replace")):
    pass


REPLACE_RUNNING = threading.Event()


@UqReplaceRunning.handler
def uq_replace_running(ctx: JobContext, user_id: int, v: int) -> int:
    REPLACE_RUNNING.wait(10)
    return v


@pytest.mark.parametrize("path", ["add", "enqueue_many"])
def test_a_replace_that_meets_a_running_job_leaves_its_row_unlocked(engine, database_url, schema, path):
    """``INSERT ... ON CONFLICT DO UPDATE ... WHERE <waiting>`` locks the conflicting row
    even where the WHERE keeps it from being updated: a replace that met a running job
    held that job's row locked until the enqueuing transaction ended, and the worker's
    heartbeats, its completion and a rescue of the job all waited for it (past the lease,
    the job was given up and run again)."""
    import time

    REPLACE_RUNNING.clear()
    with Session(engine) as session, session.begin():
        session.add(UqReplaceRunning(user_id=1, v=1))

    def state() -> str:
        return q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = 1"))[0][0]

    done: list[tuple] = []

    def enqueue_while_it_runs() -> None:
        assert wait_for(lambda: state() == "running", 10)
        with Session(engine) as session, session.begin():
            if path == "add":
                again = UqReplaceRunning(user_id=1, v=2)
                session.add(again)
                session.flush()
                assert again.was_duplicate and not again.was_replaced and again.id == 1
            else:
                assert enqueue_many(session, UqReplaceRunning, [{"user_id": 1, "v": 2}]) == 0
            REPLACE_RUNNING.set()  # the handler returns; its completion must not wait for us
            started = time.monotonic()
            wait_for(lambda: state() == "completed", 5)
            done.append((state(), round(time.monotonic() - started) < 5))

    thread = threading.Thread(target=enqueue_while_it_runs)
    thread.start()
    try:
        run_worker_until(database_url, schema, [UqReplaceRunning], lambda: bool(done), timeout=30, lease=10.0)
    finally:
        REPLACE_RUNNING.set()
        thread.join()
    assert done == [("completed", True)]
    assert q(database_url, jobs_sql(schema, "SELECT id, state, args, result FROM {jobs}")) == [
        (1, "completed", {"user_id": 1, "v": 1}, 1)]


def test_a_flush_and_a_bulk_call_replacing_the_same_keys_do_not_deadlock(database_url, schema, monkeypatch):
    """A flush of replace jobs and an enqueue_many of the same keys: the bulk call inserts
    its new keys, then rewrites the waiting holders of the others; the flush took each key
    in turn (insert, else rewrite), so with key a held by a waiting job and key b free, it
    rewrote a and waited for the bulk call's b while the bulk call waited for its a: a
    deadlock, one of the two transactions lost. The docs promise one flush or one bulk call
    never deadlocks with another."""
    from sa_jobs import enqueue as enqueue_mod

    engine = create_engine(sqlalchemy_url(database_url), poolclass=NullPool).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: schema})
    unique = UqReplace.kind_options().unique
    # a sorts before b in both paths' keyed order; a is held by a waiting job, b is free.
    a, b = sorted(range(2), key=lambda u: unique.base_key("uq_replace", "default", {"user_id": u}))
    with Session(engine) as session, session.begin():
        session.add(UqReplace(user_id=a, v=0))
    before = _deadlocks(database_url)
    paused, resume = threading.Event(), threading.Event()
    statement = enqueue_mod._statement

    def pausing(text, table):
        if text == enqueue_mod._UNIQUE_REPLACE and threading.current_thread().name == "bulk":
            paused.set()  # the bulk call has inserted b, and has yet to rewrite a's holder
            resume.wait(30)
        return statement(text, table)

    monkeypatch.setattr(enqueue_mod, "_statement", pausing)
    errors: list[BaseException] = []

    def bulk() -> None:
        try:
            with Session(engine) as session, session.begin():
                enqueue_many(session, UqReplace, [{"user_id": a, "v": 2}, {"user_id": b, "v": 2}])
        except BaseException as exc:  # reported below
            errors.append(exc)

    def flush() -> None:
        try:
            with Session(engine) as session, session.begin():
                session.connection().exec_driver_sql("SET application_name = 'uq_flush'")
                session.add_all([UqReplace(user_id=a, v=1), UqReplace(user_id=b, v=1)])
                session.flush()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=bulk, name="bulk")]
    threads[0].start()
    assert paused.wait(30)
    threads.append(threading.Thread(target=flush, name="flush"))
    threads[1].start()
    # The flush waits for the bulk call's uncommitted row b.
    assert wait_for(lambda: q(database_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'uq_flush'"
                              " AND wait_event_type = 'Lock'")[0][0] == 1, 30)
    resume.set()
    for t in threads:
        t.join(60)
    engine.dispose()
    assert errors == []
    assert _deadlocks(database_url) == before
    rows = _rows(database_url, schema, "uq_replace")
    assert sorted(r[1]["user_id"] for r in rows) == [0, 1]


class UqCentury(Job, kind="uq_century", unique=Unique(by=("user_id",), period=dt.timedelta(days=36525))):
    pass


class UqPlainNote(Job, kind="uq_plain_note"):
    pass


def test_a_period_past_a_32_bit_count_of_seconds_is_enqueued_on_every_path(engine, database_url, schema):
    """A period over 2**31 - 1 seconds (68 years) passed Unique() but its seconds were bound
    as an INTEGER at flush: session.add() failed with DataError "integer out of range",
    losing the caller's whole transaction, where enqueue_many (bigint) wrote the job. Both
    bind it as bigint now, and give one key."""
    with Session(engine) as session, session.begin():
        session.add(UqPlainNote())
        session.add(UqCentury(user_id=1))
    with Session(engine) as session, session.begin():
        duplicate = UqCentury(user_id=1)
        session.add(duplicate)
        session.flush()
        assert duplicate.was_duplicate
        enqueue_many(session, UqCentury, [{"user_id": 1}, {"user_id": 2}])
    rows = q(database_url, jobs_sql(schema, "SELECT kind, args->>'user_id', unique_key FROM {jobs} ORDER BY kind, 2"))
    assert [r[:2] for r in rows] == [("uq_century", "1"), ("uq_century", "2"), ("uq_plain_note", None)], rows
    assert rows[0][2].endswith(":0") and rows[1][2].endswith(":0"), rows


def _hold_key_then(engine, kind, change):
    """Commit a job of user 1, then in one transaction ``change`` it and add another job of
    the same key; the (v, state) of the kind's rows, and the new object's flags."""
    with Session(engine) as session, session.begin():
        session.add(kind(user_id=1, v="old"))
    with Session(engine) as session, session.begin():
        old = session.scalars(select(kind)).one()
        change(session, old)
        new = kind(user_id=1, v="new")
        session.add(new)
        session.flush()
        flags = (new.was_duplicate, new.was_replaced, inspect(new).persistent)
    return flags


def _delete(session, old):
    session.delete(old)


def _cancel(session, old):
    old.state = "cancelled"


def _complete(session, old):
    old.state = "completed"


@pytest.mark.parametrize("kind", [UqDigest, UqReplace])
@pytest.mark.parametrize("change", [_delete, _cancel, _complete])
def test_a_job_added_in_the_flush_that_frees_its_key_is_enqueued(engine, database_url, schema, kind, change):
    """session.delete(old) (or old.state = 'cancelled') and session.add(new) of the same
    key, flushed together: the hook inserted before the unit of work wrote anything, so
    old still held the key, new was taken for its duplicate, and the flush then deleted
    (or finished) old. No job was left to run: the rows were [] (or only old's)."""
    flags = _hold_key_then(engine, kind, change)
    rows = sorted((r[1]["v"], r[2]) for r in _rows(database_url, schema, kind.kind_options().kind))
    expected = [("new", "available")] + ([] if change is _delete else [("old", "cancelled" if change is _cancel else "completed")])
    assert rows == sorted(expected)
    assert flags == (False, False, True)


def _reprioritize(session, old):
    old.priority = 5


def _postpone(session, old):
    old.state = "scheduled"


@pytest.mark.parametrize("change", [_reprioritize, _postpone])
def test_a_job_added_in_the_flush_that_changes_its_keys_holder_but_keeps_it_is_a_duplicate(engine, database_url,
                                                                                             schema, change):
    """The other side: a change of the holder that keeps it in its states (scheduled is
    one) leaves the new job a duplicate of it, flushed in the same transaction."""
    flags = _hold_key_then(engine, UqDigest, change)
    rows = _rows(database_url, schema, "uq_digest")
    assert [r[1]["v"] for r in rows] == ["old"]
    assert flags[0] is True


def test_a_job_put_aside_for_its_freed_key_rolls_back_and_re_adds(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(UqDigest(user_id=1, v="old"))
    with Session(engine) as session:
        old = session.scalars(select(UqDigest)).one()
        session.delete(old)
        new = UqDigest(user_id=1, v="new")
        session.add(new)
        session.flush()
        assert new.id is not None and not new.was_duplicate
        session.rollback()
        assert inspect(new).transient and new.args == {"user_id": 1, "v": "new"}
        session.add(new)
        session.commit()
        assert new.was_duplicate  # old is back, and holds the key
    assert [r[1]["v"] for r in _rows(database_url, schema, "uq_digest")] == ["old"]


def test_a_job_added_in_the_flush_that_frees_its_key_in_an_async_session(database_url, schema):
    async def main() -> tuple[bool, int]:
        engine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema})
        try:
            async with AsyncSession(engine) as session, session.begin():
                session.add(UqDigest(user_id=1, v="old"))
            async with AsyncSession(engine) as session, session.begin():
                old = (await session.scalars(select(UqDigest))).one()
                await session.delete(old)
                new = UqDigest(user_id=1, v="new")
                session.add(new)
                await session.flush()
                return new.was_duplicate, new.id
        finally:
            await engine.dispose()

    duplicate, new_id = anyio.run(main)
    assert not duplicate
    assert [(r[0], r[1]["v"]) for r in _rows(database_url, schema, "uq_digest")] == [(new_id, "new")]


class UqHeldWhileAvailable(Job, kind="uq_held_while_available", queue="uq",
                           unique=Unique(by=("user_id",), states=("available", "running"))):
    pass


class UqReplaceHeldWhileAvailable(Job, kind="uq_replace_held_while_available", queue="uq",
                                  unique=Unique(by=("user_id",), states=("available", "running"),
                                                on_conflict="replace")):
    pass


@pytest.mark.parametrize("kind", [UqHeldWhileAvailable, UqReplaceHeldWhileAvailable])
@pytest.mark.parametrize("scheduled_first", [True, False])
def test_a_batch_row_outside_its_unique_states_is_no_duplicate_on_every_path(engine, database_url, schema, kind,
                                                                             scheduled_first):
    """A row scheduled for later holds no key when its kind's states leave 'scheduled' out
    (the index does not cover it): session.add of it and of an available row of the same
    key wrote both, but enqueue_many deduplicated the batch by key first and dropped one
    of them (the available job, with the scheduled row first: nothing ran until later)."""
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)

    def batch():
        jobs = [kind(user_id=1, v="scheduled").options(run_at=later), kind(user_id=1, v="available")]
        return jobs if scheduled_first else jobs[::-1]

    name = kind.kind_options().kind
    with Session(engine) as session, session.begin():
        session.add_all(batch())
    by_add = sorted((r[1]["v"], r[2]) for r in _rows(database_url, schema, name))
    assert by_add == [("available", "available"), ("scheduled", "scheduled")]
    q(database_url, jobs_sql(schema, "DELETE FROM {jobs}"))
    with Session(engine) as session, session.begin():
        written = enqueue_many(session, batch())
    assert sorted((r[1]["v"], r[2]) for r in _rows(database_url, schema, name)) == by_add
    assert written == 2
    # Against a held key: the available row meets the holder, the scheduled one goes in.
    with Session(engine) as session, session.begin():
        written = enqueue_many(session, batch())
    rows = sorted((r[1]["v"], r[2]) for r in _rows(database_url, schema, name))
    assert rows == [("available", "available"), ("scheduled", "scheduled"), ("scheduled", "scheduled")]
    # The scheduled row, and (replace) the holder rewritten with the available row's values.
    assert written == (2 if kind is UqReplaceHeldWhileAvailable else 1)


def test_a_replace_in_the_flush_that_moves_its_keys_holder_within_its_states_sees_the_row_it_wrote(
        engine, database_url, schema):
    """old.state = 'scheduled' (still one of its unique states: it keeps its key) and a
    replace of the same key, flushed together: the replace rewrites old's row, then the
    flush writes the postponement, and the session's object is the row. Put aside for
    after the flush as if the key were freed, the replace came last: the row went back to
    'available' while the object said 'scheduled'."""
    with Session(engine) as session, session.begin():
        session.add(UqReplace(user_id=1, v="old"))
    with Session(engine) as session, session.begin():
        old = session.scalars(select(UqReplace)).one()
        old.state = "scheduled"
        new = UqReplace(user_id=1, v="new")
        session.add(new)
        session.flush()
        assert (new.was_duplicate, new.was_replaced, new.id) == (True, True, old.id)
        row = _state_and_args(session, old.id)
        assert (old.state, old.args) == tuple(row) == ("scheduled", {"user_id": 1, "v": "new"})
    assert [(r[1]["v"], r[2]) for r in _rows(database_url, schema, "uq_replace")] == [("new", "scheduled")]


def test_a_replace_put_aside_for_after_the_flush_leaves_its_holders_object_as_the_row(engine, database_url, schema):
    """The same change of an expired holder (its old state unknown, so the new job is put
    aside for after the flush): the replace rewrites the row after the flush wrote the
    change, and the object is loaded with what the replace wrote; it kept the caller's
    flushed change instead, 'scheduled' where the row said 'available'."""
    with Session(engine) as session, session.begin():
        session.add(UqReplace(user_id=1, v="old"))
    with Session(engine) as session:
        old = session.scalars(select(UqReplace)).one()
        session.commit()  # expires it
        old.state = "scheduled"
        new = UqReplace(user_id=1, v="new")
        session.add(new)
        session.flush()
        assert (new.was_duplicate, new.was_replaced, new.id) == (True, True, old.id)
        row = _state_and_args(session, old.id)
        assert (old.state, old.args) == tuple(row)
        assert row.args == {"user_id": 1, "v": "new"}
        session.commit()
    assert [r[1]["v"] for r in _rows(database_url, schema, "uq_replace")] == ["new"]


@pytest.mark.parametrize("kind, holder_state", [
    (UqDigest, "available"),
    (UqDigest, "running"),
    (UqReplace, "running"),
    pytest.param(UqReplace, "available", marks=pytest.mark.xfail(
        strict=True, raises=OperationalError,
        reason="known: a replace kind's waiting holder is rewritten in a second pass; one that"
               " finishes between the passes leaves its key to be inserted after the flush's"
               " higher keys (docs/queue-control.md, Deadlocks)")),
])
def test_a_key_freed_during_a_flush_is_taken_in_keyed_order(database_url, schema, kind, holder_state):
    """Two flushes of keys a < b. The first finds a held by a committed job and inserts b;
    the holder then finishes, and a second flush inserts a (free now) and waits for the
    first's b. The first flush used to read a's holder only in a second pass, find the key
    free, insert a after b, and wait for the second flush's a: a deadlock, one transaction
    lost. A held key is now read at once, so the first flush takes a's holder for its
    duplicate (as of its INSERT) and waits for nothing."""
    from sqlalchemy import event

    engine = create_engine(sqlalchemy_url(database_url), poolclass=NullPool).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: schema})
    options = kind.kind_options()
    a, b = sorted(range(2), key=lambda u: options.unique.base_key(options.kind, "default", {"user_id": u}))
    b_key = options.unique.base_key(options.kind, "default", {"user_id": b})
    with Session(engine) as session, session.begin():
        holder = kind(user_id=a, v=0)
        session.add(holder)
        session.flush()
        holder_id = holder.id
    if holder_state == "running":
        q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'running', attempt = 1, attempted_at = now(),"
                                         " claim_token = gen_random_uuid(), lease_owner = 'w',"
                                         " lease_expires_at = now() + interval '1 hour' WHERE id = %s"), (holder_id,))
    before = _deadlocks(database_url)
    paused, resume = threading.Event(), threading.Event()

    @event.listens_for(engine, "after_cursor_execute")
    def pause_after_b(conn, cursor, statement, parameters, context, executemany):
        if threading.current_thread().name == "first" and statement.startswith("INSERT") and b_key in str(parameters):
            paused.set()  # the first flush holds b, uncommitted
            resume.wait(30)

    errors: list[BaseException] = []
    outcome: dict[str, list[tuple[bool, int]]] = {}

    def flush(name: str) -> None:
        try:
            with Session(engine) as session, session.begin():
                session.connection().exec_driver_sql(f"SET application_name = 'uq_{name}'")
                jobs = [kind(user_id=a, v=name), kind(user_id=b, v=name)]
                session.add_all(jobs)
                session.flush()
                outcome[name] = [(j.was_duplicate, j.id) for j in jobs]
        except BaseException as exc:  # reported below
            errors.append(exc)

    first = threading.Thread(target=flush, args=("first",), name="first")
    first.start()
    try:
        assert paused.wait(30)
        # The holder finishes while the first flush holds b.
        q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE id = %s"),
          (holder_id,))
        second = threading.Thread(target=flush, args=("second",), name="second")
        second.start()
        # The second flush has inserted a, and waits for the first's b.
        assert wait_for(lambda: q(database_url, "SELECT count(*) FROM pg_stat_activity"
                                  " WHERE application_name = 'uq_second' AND wait_event_type = 'Lock'")[0][0] == 1, 30)
    finally:
        resume.set()
    first.join(60)
    second.join(60)
    engine.dispose()
    if errors:
        raise errors[0]
    assert _deadlocks(database_url) == before
    (first_a, first_b), (second_a, second_b) = outcome["first"], outcome["second"]
    assert first_a == (True, holder_id)  # a duplicate of the holder, as of its INSERT
    assert second_a[0] is False and second_b == (True, first_b[1])
    rows = {r[0]: r[1:] for r in q(database_url, jobs_sql(schema, "SELECT id, args, state FROM {jobs}"))}
    assert rows == {holder_id: ({"user_id": a, "v": 0}, "completed"),
                    # A replace kind's second flush rewrote the first's waiting b.
                    first_b[1]: ({"user_id": b, "v": "second" if kind is UqReplace else "first"}, "available"),
                    second_a[1]: ({"user_id": a, "v": "second"}, "available")}
