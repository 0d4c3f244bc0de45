"""SQLAlchemy's other bulk paths: each writes the row ``session.add`` would, or is refused
with a ConfigurationError before anything is written, never a wrong row."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any, Callable

import anyio

import pytest
from sqlalchemy import Integer, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, scoped_session, sessionmaker

from sa_jobs import ConfigurationError, Job, JobContext, Unique, Worker
from sa_jobs._url import sqlalchemy_url
from sa_jobs.schema import DEFAULT_SCHEMA

from .helpers import FAST, LoopErrors, jobs_sql, q, wait_for


class BpEmail(Job, kind="bp_email", queue="emails", priority=3, max_attempts=5, tags=("mail",),
              partition_by=("user_id",)):
    pass


class BpUnique(Job, kind="bp_unique", queue="uq", unique=Unique(by=("user_id",))):
    pass


class BpHourly(Job, kind="bp_hourly", unique=Unique(by=("user_id",), period=dt.timedelta(hours=1))):
    pass


class _Base(DeclarativeBase):
    pass


class BpOther(_Base):
    __tablename__ = "test_bp_other"
    __table_args__ = {"schema": DEFAULT_SCHEMA}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


_COLUMNS = "kind, queue, priority, max_attempts, tags, args, partition_key, unique_key, state"


def _rows(database_url: str, schema: str) -> list[tuple[Any, ...]]:
    return q(database_url, jobs_sql(schema, f"SELECT {_COLUMNS} FROM {{jobs}} ORDER BY id"))


def _assert_refused(error: pytest.ExceptionInfo[ConfigurationError]) -> None:
    message = str(error.value)
    assert "add_all" in message and "enqueue_many" in message, message


def _still_usable(session: Session) -> None:
    """The caller's transaction goes on after the refusal: a job added the usual way commits."""
    session.add(BpEmail(user_id=99))


# The row of _still_usable's job: the kind's queue, priority, attempts, tags, partition key.
USUAL_ROW = ("bp_email", "emails", 3, 5, ["mail"], {"user_id": 99}, "99", None, "available")


ORM_INSERTS: dict[str, Callable[[Session], Any]] = {
    "insert(Kind), dicts": lambda s: s.execute(insert(BpEmail), [{"args": {"user_id": 1}}, {"args": {"user_id": 2}}]),
    "insert(Kind).values()": lambda s: s.execute(insert(BpEmail).values(args={"user_id": 1})),
    "insert(Kind).returning(Kind), dicts": lambda s: s.scalars(
        insert(BpEmail).returning(BpEmail), [{"args": {"user_id": 1}}]).all(),
    "insert(Job), dicts with kind": lambda s: s.execute(insert(Job), [{"kind": "bp_email", "args": {"user_id": 1}}]),
    "insert(unique Kind), duplicate dicts": lambda s: s.execute(
        insert(BpUnique), [{"args": {"user_id": 1}}, {"args": {"user_id": 1}}]),
    "postgresql insert(Kind) ON CONFLICT": lambda s: s.execute(
        pg_insert(BpUnique).on_conflict_do_nothing(), [{"args": {"user_id": 1}}]),
    "select(Kind).from_statement(insert(Kind))": lambda s: s.scalars(
        select(BpEmail).from_statement(insert(BpEmail).values(args={"user_id": 1}).returning(BpEmail))).all(),
}


@pytest.mark.parametrize("how", list(ORM_INSERTS))
def test_an_orm_insert_of_a_kind_is_refused_before_anything_is_written(engine, database_url, schema, how):
    # Before: rows written with the table's queue 'default' (no worker of "emails" ever
    # ran them), no partition or unique key (duplicates written), args unchecked.
    with Session(engine) as session, session.begin():
        with pytest.raises(ConfigurationError) as error:
            ORM_INSERTS[how](session)
        _assert_refused(error)
        _still_usable(session)
    assert _rows(database_url, schema) == [USUAL_ROW]


def test_an_orm_insert_through_an_async_session_is_refused(database_url, schema):
    async def main() -> None:
        engine = create_async_engine(sqlalchemy_url(database_url, async_=True))
        engine = engine.execution_options(schema_translate_map={DEFAULT_SCHEMA: schema})
        try:
            async with AsyncSession(engine) as session, session.begin():
                with pytest.raises(ConfigurationError) as error:
                    await session.execute(insert(BpEmail), [{"args": {"user_id": 1}}])
                _assert_refused(error)
                session.add(BpEmail(user_id=99))
        finally:
            await engine.dispose()

    anyio.run(main)
    assert _rows(database_url, schema) == [USUAL_ROW]


@pytest.mark.parametrize("target", [BpEmail, BpUnique, Job, "mapper"])
def test_bulk_insert_mappings_of_a_kind_is_refused(engine, database_url, schema, target):
    # SQLAlchemy runs no event for it: before, it wrote queue 'default' and no keys.
    mapper = BpEmail.__mapper__ if target == "mapper" else target
    with Session(engine) as session, session.begin():
        with pytest.raises(ConfigurationError) as error:
            session.bulk_insert_mappings(mapper, [{"kind": "bp_email", "args": {"user_id": 1}}] * 2)
        _assert_refused(error)
        _still_usable(session)
    assert _rows(database_url, schema) == [USUAL_ROW]


def test_bulk_insert_mappings_through_a_scoped_session_is_refused(engine, database_url, schema):
    session = scoped_session(sessionmaker(engine))
    try:
        with pytest.raises(ConfigurationError):
            session.bulk_insert_mappings(BpEmail, [{"args": {"user_id": 1}}])
        session.rollback()
    finally:
        session.remove()
    assert _rows(database_url, schema) == []


def test_bulk_save_objects_of_a_unique_duplicate_is_refused_not_an_integrity_error(engine, database_url, schema):
    # Before: a plain INSERT without ON CONFLICT, so IntegrityError in the caller's transaction.
    with Session(engine) as session, session.begin():
        session.add(BpUnique(user_id=1))
        session.flush()
        with pytest.raises(ConfigurationError) as error:
            session.bulk_save_objects([BpUnique(user_id=2), BpUnique(user_id=1)])
        _assert_refused(error)
        again = BpUnique(user_id=1)
        session.add(again)
        session.flush()
        assert again.was_duplicate
    assert [r[5] for r in _rows(database_url, schema)] == [{"user_id": 1}]


def test_bulk_save_objects_of_a_period_kind_is_refused_not_a_key_without_its_bucket(engine, database_url, schema):
    # Before: the row's key lacked the period bucket, so it met no key of the kind: a
    # duplicate in the same hour was written silently.
    with Session(engine) as session, session.begin():
        session.add(BpHourly(user_id=1))
        session.flush()
        with pytest.raises(ConfigurationError) as error:
            session.bulk_save_objects([BpHourly(user_id=1)])
        _assert_refused(error)
    rows = _rows(database_url, schema)
    assert len(rows) == 1 and ":" in rows[0][7]


def test_bulk_save_objects_of_a_delayed_job_is_refused_before_the_driver_sees_it(engine, database_url, schema):
    # Before: psycopg's "cannot adapt type 'BinaryExpression'" (the delay is SQL, now() +
    # interval, which a bulk INSERT sends as a parameter), and the transaction was lost.
    with Session(engine) as session, session.begin():
        with pytest.raises(ConfigurationError) as error:
            session.bulk_save_objects([BpEmail(user_id=1), BpEmail(user_id=2).options(delay=60)])
        _assert_refused(error)
        _still_usable(session)
    assert _rows(database_url, schema) == [USUAL_ROW]


def test_bulk_save_objects_of_plain_kinds_writes_the_rows_add_all_writes(engine, database_url, schema):
    def build() -> list[Job]:
        return [BpEmail(user_id=1), BpEmail(user_id=2).options(queue="other", priority=-1, tags=["x"]),
                BpEmail(user_id=3).options(run_at=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))]

    with Session(engine) as session, session.begin():
        session.add_all(build())
    by_add_all = _rows(database_url, schema)
    q(database_url, jobs_sql(schema, "DELETE FROM {jobs}"))
    with Session(engine) as session, session.begin():
        session.bulk_save_objects(build())
    assert _rows(database_url, schema) == by_add_all
    assert [r[1] for r in by_add_all] == ["emails", "other", "emails"]
    assert by_add_all[2][8] == "scheduled"


def test_bulk_save_objects_checks_args_assigned_after_construction(engine, database_url, schema):
    """bulk_save_objects runs no before_flush: args assigned after construction were written
    unchecked (NaN failed it with DataError, losing the transaction), with the partition key
    of the first args. Checked, and keyed, as the flush does, before anything is written."""
    from sa_jobs import InvalidArgsError

    bad, moved = BpEmail(user_id=1), BpEmail(user_id=1)
    bad.args = {"user_id": float("nan")}
    moved.args = {"user_id": 2}
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidArgsError):
            session.bulk_save_objects([moved, bad])
        session.bulk_save_objects([moved])
    assert q(database_url, jobs_sql(schema, "SELECT args, partition_key FROM {jobs}")) == [({"user_id": 2}, "2")]


def test_merge_of_a_new_job_writes_the_row_add_writes(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.merge(BpEmail(user_id=99))
        first = session.merge(BpUnique(user_id=1))
        session.flush()
        again = session.merge(BpUnique(user_id=1))
        session.flush()
        assert again.was_duplicate and again.id == first.id
    rows = _rows(database_url, schema)
    assert rows[0] == USUAL_ROW
    assert [(r[0], r[1], r[5]) for r in rows[1:]] == [("bp_unique", "uq", {"user_id": 1})]


def test_a_core_insert_of_the_table_is_the_escape_hatch_and_writes_only_what_it_is_given(engine, database_url, schema):
    table = Job.__table__
    with Session(engine) as session, session.begin():
        session.execute(insert(table), [{"kind": "bp_email", "args": {"user_id": 1}}])
        loaded = session.scalars(select(BpEmail).from_statement(
            insert(table).values(kind="bp_email", queue="emails", args={"user_id": 2}).returning(*table.c))).all()
        assert [job.args for job in loaded] == [{"user_id": 2}]
    assert [(r[1], r[6]) for r in _rows(database_url, schema)] == [("default", None), ("emails", None)]


def test_orm_inserts_and_bulk_methods_of_other_models_are_untouched(engine):
    BpOther.metadata.create_all(engine)
    try:
        with Session(engine) as session, session.begin():
            session.execute(insert(BpOther), [{"id": 1, "n": 1}, {"id": 2, "n": 2}])
            session.bulk_insert_mappings(BpOther, [{"id": 3, "n": 3}])
            session.bulk_save_objects([BpOther(id=4, n=4)])
            session.execute(insert(BpOther).values(id=5, n=5))
            assert session.scalars(select(BpOther.n).order_by(BpOther.id)).all() == [1, 2, 3, 4, 5]
    finally:
        BpOther.metadata.drop_all(engine)


class BpByQueue(Job, kind="bp_by_queue", unique=Unique(by=("user_id",), by_queue=True)):
    pass


ORM_KEY_UPDATES: dict[str, Callable[[Session, int], Any]] = {
    "update(unique Kind).values(args=)": lambda s, i: s.execute(
        update(BpUnique).where(BpUnique.id == i).values(args={"user_id": 2})),
    "update(partitioned Kind).values({'args': })": lambda s, i: s.execute(
        update(BpEmail).where(BpEmail.id == i).values({"args": {"user_id": 2}})),
    "update(Job).values(Job.args=)": lambda s, i: s.execute(update(Job).where(Job.id == i).values({Job.args: {}})),
    "update(unique Kind), dicts by id": lambda s, i: s.execute(update(BpUnique), [{"id": i, "args": {"user_id": 2}}]),
    "update(unique Kind).values(kind=)": lambda s, i: s.execute(
        update(BpUnique).where(BpUnique.id == i).values(kind="bp_email")),
    "update(by_queue Kind).values(queue=)": lambda s, i: s.execute(
        update(BpByQueue).where(BpByQueue.id == i).values(queue="other")),
    "update(unique Kind).ordered_values(args)": lambda s, i: s.execute(
        update(BpUnique).where(BpUnique.id == i).ordered_values((BpUnique.args, {"user_id": 2}))),
}


@pytest.mark.parametrize("how", list(ORM_KEY_UPDATES))
def test_an_orm_update_of_what_a_key_derives_from_is_refused(engine, database_url, schema, how):
    """`update(BpUnique).values(args={"user_id": 2})` left the row's unique key (and a
    partitioned kind's partition key) as computed from the old args: BpUnique(user_id=2)
    was then no duplicate of it, and BpUnique(user_id=1) was refused as a duplicate of a
    job for user 2. No SQL can recompute the keys (a hash of canonical JSON in Python)."""
    with Session(engine) as session, session.begin():
        job = {"update(partitioned Kind).values({'args': })": BpEmail(user_id=1),
               "update(by_queue Kind).values(queue=)": BpByQueue(user_id=1)}.get(how, BpUnique(user_id=1))
        session.add(job)
        session.flush()
        job_id = job.id
    before = _rows(database_url, schema)
    with Session(engine) as session, session.begin():
        with pytest.raises(ConfigurationError) as error:
            ORM_KEY_UPDATES[how](session, job_id)
        message = str(error.value)
        assert "key" in message and "cancel" in message and "update(Job.__table__)" in message, message
        _still_usable(session)
    assert _rows(database_url, schema) == [*before, USUAL_ROW]


def test_orm_updates_of_other_columns_and_core_updates_are_untouched(engine, database_url, schema):
    """Updates that no key derives from go through, as does the low-level Core path."""
    with Session(engine) as session, session.begin():
        unique, plain = BpUnique(user_id=1), BpEmail(user_id=1)
        session.add_all([unique, plain])
        session.flush()
        unique_id, plain_id = unique.id, plain.id
    with Session(engine) as session, session.begin():
        session.execute(update(BpUnique).where(BpUnique.id == unique_id).values(priority=7, queue="uq2"))
        session.execute(update(Job).where(Job.id == plain_id).values(priority=9))
        session.execute(update(Job.__table__).where(Job.__table__.c.id == plain_id).values(args={"user_id": 5}))
    rows = q(database_url, jobs_sql(schema, "SELECT queue, priority, args FROM {jobs} ORDER BY id"))
    assert rows == [("uq2", 7, {"user_id": 1}), ("emails", 9, {"user_id": 5})]


# ---- the unit of work: ORM edits of job objects ------------------------------------------

class BpPlain(Job, kind="bp_plain"):
    pass


def _stored(engine, job: Job) -> int:
    with Session(engine) as session, session.begin():
        session.add(job)
        session.flush()
        return job.id


def _expired(job: Job) -> Job:
    from sqlalchemy import inspect

    inspect(job).session.expire(job)
    return job


def _set_args(job: Job) -> None:
    job.args = {"user_id": 2}


def _flag_in_place(job: Job) -> None:
    from sqlalchemy.orm.attributes import flag_modified

    job.args["user_id"] = 2
    flag_modified(job, "args")


ORM_KEY_EDITS: dict[str, tuple[type[Job], Callable[[Job], Any]]] = {
    "unique job.args =": (BpUnique, _set_args),
    "partitioned job.args =": (BpEmail, _set_args),
    "unique job.args[...] = with flag_modified": (BpUnique, _flag_in_place),
    "unique job.kind =": (BpUnique, lambda job: setattr(job, "kind", "bp_email")),
    "plain job.kind = a unique kind": (BpPlain, lambda job: setattr(job, "kind", "bp_unique")),
    "by_queue job.queue =": (BpByQueue, lambda job: setattr(job, "queue", "other")),
    "by_queue job.options(queue=), then job.queue =": (
        BpByQueue, lambda job: setattr(job.options(queue="other"), "queue", "third")),
    # options(queue=) of an expired job moves its key at flush, for the queue it set only:
    "expired by_queue job.queue =": (BpByQueue, lambda job: setattr(_expired(job), "queue", "other")),
    "expired by_queue job.options(queue=), then job.queue =": (
        BpByQueue, lambda job: setattr(_expired(job).options(queue="other"), "queue", "third")),
}


@pytest.mark.parametrize("how", list(ORM_KEY_EDITS))
def test_an_orm_edit_of_what_a_stored_jobs_key_derives_from_is_refused_at_flush(engine, database_url, schema, how):
    """`job.args = {...}; session.commit()` of a loaded job kept the unique and partition keys
    of its old args, as the ORM UPDATE did: a job of the new args was no duplicate of it,
    one of the old args was. Refused at flush, before anything is sent; the transaction
    goes on once the edit is undone (session.expire)."""
    kind, edit = ORM_KEY_EDITS[how]
    job_id = _stored(engine, kind(user_id=1))
    before = _rows(database_url, schema)
    with Session(engine) as session, session.begin():
        job = session.get(kind, job_id)
        edit(job)
        with pytest.raises(ConfigurationError) as error:
            session.flush()
        message = str(error.value)
        assert "key" in message and f"job {job_id}" in message, message
        assert (".options(queue=" in message) if "queue" in how else ("cancel" in message), message
        session.expire(job)
        _still_usable(session)
    assert _rows(database_url, schema) == [*before, USUAL_ROW]


def test_args_edited_on_a_stored_job_of_a_plain_kind_are_checked_at_flush(engine, database_url, schema):
    """Args are checked as JSON at construction; set on a loaded job they reached the
    database unchecked: NaN failed the flush with DataError and lost the caller's
    transaction. Now InvalidArgsError, before the flush begins."""
    from sa_jobs import InvalidArgsError

    job_id = _stored(engine, BpPlain(user_id=1))
    with Session(engine) as session, session.begin():
        job = session.get(BpPlain, job_id)
        job.args = {"user_id": float("nan")}
        with pytest.raises(InvalidArgsError):
            session.flush()
        job.args = {"user_id": 2}
        _still_usable(session)
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs} ORDER BY id")) == [
        ({"user_id": 2},), ({"user_id": 99},)]


def test_a_merge_of_a_detached_job_with_other_args_is_refused_at_flush(engine, database_url, schema):
    job_id = _stored(engine, BpUnique(user_id=1))
    with Session(engine) as session:
        detached = session.get(BpUnique, job_id)
    detached.args = {"user_id": 2}
    before = _rows(database_url, schema)
    with Session(engine) as session, session.begin():
        merged = session.merge(detached)
        with pytest.raises(ConfigurationError):
            session.flush()
        session.expunge(merged)
    assert _rows(database_url, schema) == before


def test_options_queue_moves_a_stored_by_queue_key_and_other_edits_flush(engine, database_url, schema):
    """The supported ways: `.options(queue=)` recomputes a by_queue key (keeping a period's
    bucket); columns no key derives from, and args of a kind without keys, update as usual."""
    unique_id = _stored(engine, BpByQueue(user_id=1))
    plain_id = _stored(engine, BpPlain(user_id=1))
    with Session(engine) as session, session.begin():
        session.get(BpByQueue, unique_id).options(queue="other", priority=4)
        plain = session.get(BpPlain, plain_id)
        plain.args = {"user_id": 2}
        plain.queue = "elsewhere"
    with Session(engine) as session, session.begin():
        moved, stayed = BpByQueue(user_id=1).options(queue="other"), BpByQueue(user_id=1)
        session.add_all([moved, stayed])
        session.flush()
        assert moved.was_duplicate and moved.id == unique_id and moved.priority == 4
        assert not stayed.was_duplicate
    assert q(database_url, jobs_sql(schema, "SELECT args, queue FROM {jobs} WHERE id = %s"), (plain_id,)) == [
        ({"user_id": 2}, "elsewhere")]


def test_an_in_place_change_of_args_is_not_saved(engine, database_url, schema):
    """args is plain JSONB, not a MutableDict: as for any SQLAlchemy JSON column, changing
    the dict in place is not seen by the unit of work, so nothing is written (nor a stale key)."""
    job_id = _stored(engine, BpUnique(user_id=1))
    with Session(engine) as session, session.begin():
        session.get(BpUnique, job_id).args["user_id"] = 2
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs}")) == [({"user_id": 1},)]


@pytest.mark.parametrize("edit", ["assign", "in place"])
def test_a_new_jobs_args_changed_before_its_flush_take_their_partition_key(engine, database_url, schema, edit):
    """A unique key is computed at flush from the row's final args; the partition key was
    computed only in __init__, so `job = Kind(user_id=1); job.args = {"user_id": 2}` wrote
    partition key "1" for a job of user 2 (counted against user 1's limit)."""
    job = BpEmail(user_id=1)
    if edit == "assign":
        job.args = {"user_id": 2}
    else:
        job.args["user_id"] = 2
    given = BpEmail(user_id=3).options(partition_key="mine")
    given.args = {"user_id": 4}
    with Session(engine) as session, session.begin():
        session.add_all([job, given])
    assert q(database_url, jobs_sql(schema, "SELECT args, partition_key FROM {jobs} ORDER BY id")) == [
        ({"user_id": 2}, "2"), ({"user_id": 4}, "mine")]


@pytest.mark.parametrize("path", ["merge", "make_transient", "assigned"])
def test_a_partition_key_given_stays_whatever_object_carries_it(engine, database_url, schema, path):
    """A key given (options(partition_key=)) stays at flush, which takes the key from the
    args only for a job whose key is still the one its args gave: the merge copy of a new
    job, a stored job made transient and re-added (docs/core.md: "makes a new job of its
    values"), or a key assigned to the attribute had theirs replaced by the args' key."""
    from sqlalchemy.orm import make_transient

    with Session(engine) as session, session.begin():
        if path == "merge":
            session.merge(BpEmail(user_id=1).options(partition_key="vip"))
        elif path == "make_transient":
            job = session.get(BpEmail, _stored(engine, BpEmail(user_id=1).options(partition_key="vip")))
            session.expunge(job)
            make_transient(job)
            job.id = None
            session.add(job)
        else:
            job = BpEmail(user_id=1)
            job.partition_key = "vip"
            session.add(job)
    assert {row[0] for row in q(database_url, jobs_sql(schema, "SELECT partition_key FROM {jobs}"))} == {"vip"}


def test_a_transient_copy_of_a_stored_unique_job_is_enqueued_as_a_new_job(engine, database_url, schema):
    """make_transient(job) and re-add: a unique kind goes through the flush hook, which
    computes the key from the copy's args (a duplicate of the stored job, or a new job)."""
    from sqlalchemy.orm import make_transient

    job_id = _stored(engine, BpUnique(user_id=1))
    with Session(engine) as session, session.begin():
        same, other = session.get(BpUnique, job_id), None
        session.expunge(same)
        make_transient(same)
        session.add(same)
        session.flush()
        assert same.was_duplicate and same.id == job_id
        other = BpUnique(user_id=3)
        session.add(other)
        session.flush()
        session.expunge(other)
        make_transient(other)
        other.args = {"user_id": 2}
        session.add(other)
        session.flush()
        assert not other.was_duplicate and other.id != job_id
    keys = q(database_url, jobs_sql(schema, "SELECT args, unique_key FROM {jobs} ORDER BY id"))
    assert [k[0] for k in keys] == [{"user_id": 1}, {"user_id": 3}, {"user_id": 2}]
    assert len({k[1] for k in keys}) == 3


def test_a_new_job_whose_args_lost_its_partition_arg_is_refused_at_flush(engine, database_url, schema):
    job = BpEmail(user_id=1)
    job.args = {"other": 1}
    with Session(engine) as session, session.begin():
        session.add(job)
        with pytest.raises(ConfigurationError, match="partitioned by"):
            session.flush()
        session.expunge(job)
        _still_usable(session)
    assert _rows(database_url, schema) == [USUAL_ROW]


class BpSmall(Job, kind="bp_small", max_args_bytes=64):
    pass


_BAD_NEW_ARGS: dict[str, tuple[type[Job], dict[str, Any]]] = {
    "NaN, plain kind": (BpPlain, {"user_id": float("nan")}),
    "NaN, partitioned kind": (BpEmail, {"user_id": float("nan")}),
    "NaN, unique kind": (BpUnique, {"user_id": float("nan")}),
    "a datetime": (BpPlain, {"user_id": 1, "at": dt.datetime(2026, 1, 1)}),
    "a set, unique kind": (BpUnique, {"user_id": 1, "ids": {1, 2}}),
    "a set, partitioned kind": (BpEmail, {"user_id": {1, 2}}),
    "over the kind's max_args_bytes": (BpSmall, {"user_id": 1, "text": "x" * 100}),
    "None": (BpPlain, None),  # type: ignore[dict-item]
}


@pytest.mark.parametrize("how", list(_BAD_NEW_ARGS))
def test_args_assigned_to_a_new_job_are_checked_at_flush(engine, database_url, schema, how):
    """Job.__init__ checks its args; `job.args = {...}` after it reached the INSERT unchecked:
    NaN failed the flush with DataError (a datetime or a set with TypeError, from the driver
    or the key's hash), losing the caller's transaction, and args over the kind's cap were
    written. Now InvalidArgsError, before the flush begins."""
    from sa_jobs import InvalidArgsError

    kind, args = _BAD_NEW_ARGS[how]
    job = kind(user_id=1)
    job.args = args
    with Session(engine) as session, session.begin():
        session.add(job)
        with pytest.raises(InvalidArgsError):
            session.flush()
        session.expunge(job)
        _still_usable(session)
    assert _rows(database_url, schema) == [USUAL_ROW]


def test_args_assigned_to_a_new_job_as_a_mapping_are_written_as_a_dict(engine, database_url, schema):
    """A read-only mapping is args __init__ takes (as a dict); assigned, the driver could not
    write it."""
    from types import MappingProxyType

    plain, unique = BpPlain(user_id=1), BpUnique(user_id=1)
    plain.args = MappingProxyType({"user_id": 2})  # type: ignore[assignment]
    unique.args = MappingProxyType({"user_id": 3})  # type: ignore[assignment]
    with Session(engine) as session, session.begin():
        session.add_all([plain, unique])
    assert q(database_url, jobs_sql(schema, "SELECT kind, args FROM {jobs} ORDER BY kind")) == [
        ("bp_plain", {"user_id": 2}), ("bp_unique", {"user_id": 3})]


def test_args_of_a_unique_job_added_while_the_flush_prepares_are_checked(engine, database_url, schema):
    """A unique job an app's before_flush listener adds is inserted at once (see
    unique._added_during_flush): its args are checked first."""
    from sqlalchemy import event

    from sa_jobs import InvalidArgsError

    with Session(engine) as session, session.begin():
        def add_job(session: Session, flush_context: Any, instances: Any) -> None:
            job = BpUnique(user_id=1)
            job.args = {"user_id": float("nan")}
            session.add(job)

        event.listen(session, "before_flush", add_job)
        session.add(BpEmail(user_id=98))
        with pytest.raises(InvalidArgsError):
            session.flush()
        event.remove(session, "before_flush", add_job)
        session.expunge_all()
        _still_usable(session)
    assert _rows(database_url, schema) == [USUAL_ROW]


@pytest.mark.parametrize("kind", [BpEmail, BpUnique])
def test_enqueue_many_of_job_objects_checks_args_assigned_after_construction(engine, database_url, schema, kind):
    """enqueue_many(session, [jobs]) wrote args assigned after construction unchecked (NaN
    failed the COPY with DataError, a set raised a bare TypeError), and a partitioned job
    kept the key of its first args. Checked, and keyed, as the flush does."""
    from sa_jobs import InvalidArgsError, enqueue_many

    bad = kind(user_id=1)
    bad.args = {"user_id": float("nan")}
    moved = kind(user_id=1)
    moved.args = {"user_id": 2}
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidArgsError):
            enqueue_many(session, [bad])
        assert enqueue_many(session, [moved]) == 1
    assert q(database_url, jobs_sql(schema, "SELECT args, partition_key FROM {jobs}")) == [
        ({"user_id": 2}, "2" if kind is BpEmail else None)]


# ---- session.delete() of a job a worker is running ---------------------------------------

class BpSleepy(Job, kind="bp_sleepy", queue="bp_sleepy"):
    pass


_RELEASE = threading.Event()


@BpSleepy.handler
async def bp_sleepy(ctx: JobContext, n: int) -> dict:
    if n == 0:  # the follow-up job
        return {"n": n}
    deadline = time.monotonic() + 30
    while not _RELEASE.is_set() and time.monotonic() < deadline:
        await anyio.sleep(0.02)
    return {"n": n}


@pytest.mark.parametrize("noticed_by", ["heartbeat", "completion"])
def test_an_orm_delete_of_a_running_job_leaves_the_worker_running(engine, database_url, schema, caplog, noticed_by):
    """`session.delete(job)` of a job a worker runs (the admin API refuses to delete a
    running job; the ORM does not ask). The worker must end that attempt without writing
    anything back (no resurrected row), without a loop error, and go on with the next job:
    by its heartbeat (the lease cannot be extended: the handler is cancelled), or, if the
    handler returns first, by a completion that changes no row."""
    _RELEASE.clear()
    job_id = _stored(engine, BpSleepy(n=1))
    observer = LoopErrors()
    # A long lease: the heartbeat does not beat before the completion lands.
    lease = 2.0 if noticed_by == "heartbeat" else 120.0

    def scenario() -> int:
        assert wait_for(lambda: q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"),
                                  (job_id,)) == [("running",)], 15)
        with Session(engine) as session, session.begin():
            session.delete(session.get(BpSleepy, job_id))
        if noticed_by == "completion":
            _RELEASE.set()
        follow_up = _stored(engine, BpSleepy(n=0))
        assert wait_for(lambda: q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"),
                                  (follow_up,)) == [("completed",)], 20), "the worker did not go on"
        return follow_up

    async def main() -> int:
        async with Worker(database_url, kinds=[BpSleepy], queues=["bp_sleepy"], schema=schema, concurrency=1,
                          observer=observer, **{**FAST, "lease": lease}):
            return await anyio.to_thread.run_sync(scenario)

    try:
        with caplog.at_level(logging.WARNING, logger="sa_jobs"):
            follow_up = anyio.run(main)
    finally:
        _RELEASE.set()
    assert observer.seen == []
    assert q(database_url, jobs_sql(schema, "SELECT id FROM {jobs} ORDER BY id")) == [(follow_up,)]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], errors
    # The heartbeat said "the lease was taken over by another worker" of a deleted row.
    lost = [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()]
    if noticed_by == "heartbeat":
        assert len(lost) == 1 and "its row was deleted" in lost[0], lost
    else:
        assert lost == []


_IN_PLACE_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "NaN": lambda args: args.__setitem__("user_id", float("nan")),
    "nested NaN": lambda args: args["more"].append(float("inf")),
    "set": lambda args: args.__setitem__("tags", {"a", "b"}),
    "datetime": lambda args: args["more"].append(dt.datetime(2026, 1, 1)),
    "int key": lambda args: args.__setitem__("map", {1: "one"}),
}


@pytest.mark.parametrize("kind", [BpEmail, BpUnique])
@pytest.mark.parametrize("edit", list(_IN_PLACE_EDITS))
@pytest.mark.parametrize("path", ["flush", "enqueue_many"])
def test_a_new_jobs_args_changed_in_place_are_checked_before_anything_is_sent(engine, database_url, schema, kind,
                                                                                edit, path):
    """Args assigned after construction were checked at flush (and by enqueue_many), args
    changed in place not: NaN failed the INSERT (or the COPY) with DataError, a set or a
    datetime with a bare TypeError (StatementError), and the caller's transaction was lost;
    an int key was written as a string key, not the args that were checked. Each is the
    InvalidArgsError construction raises, before any SQL, the transaction still usable."""
    from sa_jobs import InvalidArgsError, enqueue_many

    job = kind(user_id=1, more=[1])
    _IN_PLACE_EDITS[edit](job.args)
    with Session(engine) as session, session.begin():
        with pytest.raises(InvalidArgsError):
            if path == "flush":
                session.add(job)
                session.flush()
            else:
                enqueue_many(session, [job])
        if path == "flush":
            session.expunge(job)
        _still_usable(session)
    assert _rows(database_url, schema) == [USUAL_ROW]
