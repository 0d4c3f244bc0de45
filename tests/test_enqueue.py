"""Enqueue through the caller's own Session: atomic with business rows, batched, typed errors."""

from __future__ import annotations

import datetime as dt
import math
import uuid

import warnings

import pytest
from sqlalchemy import Integer, String, event, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sa_jobs import (
    ConfigurationError,
    InvalidArgsError,
    InvalidIdentifierError,
    Job,
    Unique,
    enqueue_many,
    schema as _unused,  # noqa: F401 - the module must import
)
from sa_jobs import _validate
from sa_jobs._url import sqlalchemy_url
from sa_jobs.schema import DEFAULT_SCHEMA

from .helpers import jobs_sql, q


class _Base(DeclarativeBase):
    pass


class Order(_Base):
    # Lives beside the queue so the test schema's translate map applies to it too.
    __tablename__ = "test_orders"
    __table_args__ = {"schema": DEFAULT_SCHEMA}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    total: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(String(50), default="")


class EnqSendReceipt(Job, kind="enq_send_receipt", queue="emails", max_attempts=5, priority=3):
    pass


class EnqPlain(Job, kind="enq_plain"):  # every option at the table's default
    pass


class EnqByCustomer(Job, kind="enq_by_customer", partition_by=("customer",)):
    pass


@pytest.fixture
def orders(engine):
    _Base.metadata.create_all(engine)
    yield
    _Base.metadata.drop_all(engine)


def test_job_commits_with_business_row(engine, orders, database_url, schema):
    with Session(engine) as session, session.begin():
        order = Order(total=42)
        session.add(order)
        session.flush()
        session.add(EnqSendReceipt(order_id=order.id))
    with Session(engine) as session:
        job = session.scalars(select(EnqSendReceipt)).one()
        assert job.args == {"order_id": session.scalars(select(Order.id)).one()}
        assert (job.kind, job.queue, job.state, job.priority, job.max_attempts, job.attempt) == (
            "enq_send_receipt", "emails", "available", 3, 5, 0,
        )
        assert job.created_at is not None and job.scheduled_at is not None


def test_rollback_leaves_neither_row(engine, orders):
    with Session(engine) as session:
        with session.begin():
            order = Order(total=1)
            session.add(order)
            session.flush()
            session.add(EnqSendReceipt(order_id=order.id))
            session.flush()
            session.rollback()
    with pytest.raises(RuntimeError):
        with Session(engine) as session, session.begin():
            session.add(Order(total=2))
            session.add(EnqSendReceipt(order_id=2))
            raise RuntimeError("business logic failed")
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 0
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_savepoint_rollback_drops_only_its_job(engine, orders):
    with Session(engine) as session, session.begin():
        session.add(EnqSendReceipt(order_id=1))
        with pytest.raises(ValueError):
            with session.begin_nested():
                session.add(EnqSendReceipt(order_id=2))
                session.flush()
                raise ValueError
    with Session(engine) as session:
        assert [j.args["order_id"] for j in session.scalars(select(EnqSendReceipt))] == [1]


def test_add_all_of_10k_is_batched(engine):
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if statement.lstrip().upper().startswith("INSERT"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        with Session(engine) as session, session.begin():
            jobs = [EnqSendReceipt(order_id=i) for i in range(10_000)]
            session.add_all(jobs)
            session.flush()
            assert all(job.id is not None for job in jobs)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    # insertmanyvalues sends ~1000 rows per statement; one INSERT per row would be 10k.
    assert 1 <= len(statements) <= 20, len(statements)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(EnqSendReceipt)) == 10_000


def _inserts_during(engine, fn) -> list[str]:  # noqa: ANN001
    statements: list[str] = []

    def grab(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if statement.lstrip().upper().startswith("INSERT"):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", grab)
    try:
        fn()
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    return statements


def _insert_columns(statement: str) -> list[str]:
    return [c.strip() for c in statement.split("(", 1)[1].split(")", 1)[0].split(",")]


def test_insert_carries_only_the_columns_a_row_sets(engine):
    def enqueue() -> None:
        with Session(engine) as session, session.begin():
            session.add(EnqPlain(n=1))
            session.flush()
            session.add_all([EnqPlain(n=i) for i in range(3)])
            session.flush()
            session.add(EnqSendReceipt(order_id=1))
            session.flush()
            session.add(EnqByCustomer(customer="acme"))

    inserts = _inserts_during(engine, enqueue)
    # No explicit NULLs for the lease, unique and partition columns, no defaults sent.
    assert [_insert_columns(s) for s in inserts] == [
        ["kind", "args"], ["kind", "args"], ["kind", "queue", "args", "priority", "max_attempts"],
        ["kind", "args", "partition_key"],
    ]


def test_unset_columns_take_the_table_defaults_and_set_ones_are_written(engine):
    with Session(engine) as session, session.begin():
        explicit_none = EnqPlain(n=3)
        explicit_none.lease_owner = None  # an explicit None is still written, as NULL
        session.add_all([EnqPlain(n=1), EnqPlain(n=2).options(partition_key="k"), explicit_none,
                         EnqByCustomer(customer=7)])
    with Session(engine) as session:
        rows = session.execute(
            select(Job.kind, Job.partition_key, Job.lease_owner, Job.claim_token, Job.unique_key, Job.unique_states,
                   Job.state, Job.queue, Job.priority, Job.max_attempts, Job.attempt, Job.tags, Job.meta, Job.errors)
            .order_by(Job.id)
        ).all()
    defaults = (None, None, None, None, "available", "default", 0, 20, 0, [], {}, [])
    assert rows == [
        ("enq_plain", None, *defaults), ("enq_plain", "k", *defaults), ("enq_plain", None, *defaults),
        ("enq_by_customer", "7", *defaults),
    ]


def test_flush_fetches_ids_and_leaves_the_rest_to_the_database(engine):
    with Session(engine) as session, session.begin():
        jobs = [EnqSendReceipt(order_id=i) for i in range(3)]
        session.add_all(jobs)
        session.add(single := EnqPlain(n=1))
        session.flush()
        assert all(type(j.id) is int for j in [*jobs, single])
        # repr shows only what is loaded: it never queries (an AsyncSession could not).
        assert _inserts_during(engine, lambda: repr(jobs[0])) == []
        assert repr(jobs[0]) == f"<EnqSendReceipt id={jobs[0].id} state=? attempt=?>"
        # The database's values load on first access (or with session.refresh).
        assert (jobs[0].state, jobs[0].attempt, jobs[0].queue, jobs[0].priority, jobs[0].tags) == (
            "available", 0, "emails", 3, [])
        session.refresh(single)
        assert (single.state, single.queue, single.max_attempts) == ("available", "default", 20)
        assert single.created_at is not None and single.scheduled_at is not None
        assert repr(single) == f"<EnqPlain id={single.id} state=available attempt=0>"


def test_enqueue_many_bulk_path(engine):
    with Session(engine) as session, session.begin():
        n = enqueue_many(session, (EnqSendReceipt(order_id=i) for i in range(20_000)))
    assert n == 20_000
    with Session(engine) as session:
        assert session.scalar(select(func.count()).where(EnqSendReceipt.state == "available")) == 20_000


def test_enqueue_many_through_a_session_with_per_mapper_binds(engine):
    """A Session that binds its mappers one by one (``binds={Job: engine}``, as multi-database
    apps do) has no single bind: enqueue_many's ``session.connection()`` raised
    UnboundExecutionError where ``session.add_all`` worked."""
    from sa_jobs import Job

    with Session(binds={Job: engine}) as session, session.begin():
        assert enqueue_many(session, (EnqSendReceipt(order_id=i) for i in range(3))) == 3
        assert enqueue_many(session, EnqSendReceipt, [{"order_id": 3}]) == 1
    with Session(engine) as session:
        assert sorted(a["order_id"] for a in session.scalars(select(EnqSendReceipt.args))) == [0, 1, 2, 3]


def test_async_session_path(database_url, schema):
    import anyio

    async def main() -> list[dict]:
        engine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema}
        )
        try:
            async with AsyncSession(engine) as session, session.begin():
                session.add_all([EnqSendReceipt(order_id=1), EnqSendReceipt(order_id=2)])
            async with AsyncSession(engine) as session:
                rows = (await session.scalars(select(EnqSendReceipt).order_by(EnqSendReceipt.id))).all()
                return [r.args for r in rows]
        finally:
            await engine.dispose()

    assert anyio.run(main) == [{"order_id": 1}, {"order_id": 2}]


def test_enqueue_many_refuses_an_async_session_or_connection_with_a_configuration_error(database_url, schema):
    """Before: an AttributeError on the unawaited coroutine of AsyncSession.connection()
    (with a "never awaited" warning), or SQLAlchemy's InvalidRequestError for an
    AsyncConnection, instead of the ConfigurationError that names the way that works."""
    import warnings

    import anyio

    async def main() -> None:
        engine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema}
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no coroutine left unawaited
                async with AsyncSession(engine) as session, session.begin():
                    for rows in ([EnqPlain(n=1)], EnqPlain):
                        with pytest.raises(ConfigurationError, match="run_sync"):
                            enqueue_many(session, rows, None if isinstance(rows, list) else [{"n": 1}])
                    session.add(EnqPlain(n=2))  # the session is still usable
                async with engine.connect() as conn:
                    with pytest.raises(ConfigurationError, match="run_sync"):
                        enqueue_many(conn, EnqPlain, [{"n": 1}])
        finally:
            await engine.dispose()

    anyio.run(main)
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs}")) == [({"n": 2},)]


def test_delay_is_measured_on_the_database_clock(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        session.add(EnqSendReceipt(order_id=1).options(delay=dt.timedelta(minutes=5)))
    (state, seconds), = q(database_url, jobs_sql(schema, "SELECT state, extract(epoch FROM scheduled_at - created_at) FROM {jobs}"))
    assert state == "scheduled"
    assert 299.9 <= float(seconds) <= 300.1


def test_options_override_defaults(engine):
    with Session(engine) as session, session.begin():
        session.add(EnqSendReceipt(order_id=1).options(queue="vip", priority=-5, max_attempts=2, tags=["a"], meta={"k": 1}))
    with Session(engine) as session:
        job = session.scalars(select(EnqSendReceipt)).one()
        assert (job.queue, job.priority, job.max_attempts, job.tags, job.meta) == ("vip", -5, 2, ["a"], {"k": 1})


@pytest.mark.parametrize(
    "args",
    [
        {"when": dt.datetime.now()},
        {"blob": b"\x80\x04pickle"},
        {"s": {1, 2}},
        {"x": math.nan},
        {"x": math.inf},
        {"nested": {1: "int key"}},
        {"obj": object()},
        {"text": "nul \x00 inside"},
        {"nested": {"key\x00": 1}},
        {"text": "lone \ud800 surrogate"},
        {"nested": {"key \udfff": 1}},
        {"huge": 10**5000},
    ],
)
def test_unserialisable_args_fail_at_construction(engine, args):
    with pytest.raises(InvalidArgsError):
        EnqSendReceipt(**args)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_args_over_cap_rejected():
    class Small(Job, kind="enq_small", max_args_bytes=100):
        pass

    Small(x="a" * 50)
    with pytest.raises(InvalidArgsError, match="over the cap"):
        Small(x="a" * 200)


@pytest.mark.parametrize("bad", ["", "has space", "semi;colon", "quote'", 'dq"', "x" * 64, "%s", "$1", "é", "a\x00b"])
def test_bad_queue_names(bad):
    with pytest.raises(InvalidIdentifierError):
        EnqSendReceipt(order_id=1).options(queue=bad)


def test_bad_kind_declarations():
    with pytest.raises(InvalidIdentifierError):
        class Bad(Job, kind="os.system; drop"):  # noqa: F841
            pass
    with pytest.raises(ConfigurationError):
        class BadAttempts(Job, kind="enq_bad_attempts", max_attempts=0):  # noqa: F841
            pass


def test_a_mistyped_kind_option_is_named():
    """``class K(Job, max_attempt=5)`` failed with SQLAlchemy's "K.__init_subclass__() takes
    no keyword arguments", naming neither the keyword nor the option meant, and left K
    mapped under its kind, so the corrected class only warned ("Reassigning polymorphic
    association"). It is refused before anything is mapped, naming the option."""
    from sa_jobs import registered_kinds

    with pytest.raises(ConfigurationError, match=r"max_attempt\b.*max_attempts"):
        class Typo(Job, kind="enq_typo", max_attempt=5):  # noqa: F841
            pass
    with pytest.raises(ConfigurationError, match="partition_by"):
        class Typo2(Job, kind="enq_typo2", partition=["customer"]):  # noqa: F841
            pass
    assert "enq_typo" not in registered_kinds() and "enq_typo2" not in registered_kinds()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Reassigning polymorphic association"

        class Fixed(Job, kind="enq_typo", max_attempts=5):
            pass
    assert registered_kinds()["enq_typo"] is Fixed and Fixed.kind_options().max_attempts == 5

    class Flavoured:  # an app's mixin with class keywords of its own still gets them
        def __init_subclass__(cls, flavor: str = "", **kw: object) -> None:
            cls.flavor = flavor
            super().__init_subclass__(**kw)

    class WithMixin(Job, Flavoured, kind="enq_flavoured", flavor="mint"):
        pass
    assert WithMixin.flavor == "mint"


def test_a_kind_name_declared_twice_is_refused():
    """Two classes of one kind name: SQLAlchemy only warned ("Reassigning polymorphic
    association"), and the second class took the kind over in silence: the first one's
    rows loaded as the second class, and a worker that finds its kinds (kinds=None) saw
    the second, without the first's handler, and never ran that kind's jobs."""
    from sa_jobs import registered_kinds

    class First(Job, kind="enq_twice"):
        pass

    with pytest.raises(ConfigurationError, match="enq_twice"):
        class Second(Job, kind="enq_twice"):  # noqa: F841
            pass
    assert registered_kinds()["enq_twice"] is First


def test_bad_options():
    job = EnqSendReceipt(order_id=1)
    with pytest.raises(ConfigurationError):
        job.options(priority=10**6)
    with pytest.raises(ConfigurationError):
        job.options(delay=-1)
    with pytest.raises(ConfigurationError):
        job.options(run_at=dt.datetime(2030, 1, 1))  # naive
    with pytest.raises(ConfigurationError):
        job.options(delay=1, run_at=dt.datetime.now(dt.timezone.utc))


@pytest.mark.parametrize("delay", [1e12, 1e13, 1e15, math.inf, dt.timedelta.max])
def test_a_delay_past_the_year_9999_is_refused_at_options(engine, database_url, schema, delay):
    """Past Python's datetime range: 1e12 s wrote a row whose scheduled_at (year 33715)
    psycopg cannot read back ("timestamp too large (after year 10K)"), 1e13 s failed the
    caller's transaction at flush (PostgreSQL "timestamp out of range"), and 1e15 s or
    inf raised a bare OverflowError from timedelta."""
    with pytest.raises(ConfigurationError, match="delay"):
        EnqSendReceipt(order_id=1).options(delay=delay)
    with Session(engine) as session, session.begin():  # a long delay that fits still works
        session.add(EnqSendReceipt(order_id=1).options(delay=dt.timedelta(days=365 * 1000)))
    (year,), = q(database_url, jobs_sql(schema, "SELECT extract(year FROM scheduled_at)::int FROM {jobs}"))
    assert year >= 3000


def test_enqueue_many_from_plain_args_with_options(engine):
    run_at = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    with Session(engine) as session, session.begin():
        assert enqueue_many(session, EnqSendReceipt, ({"order_id": i} for i in range(1000))) == 1000
        assert enqueue_many(session, EnqSendReceipt, [{"order_id": -1}], queue="later", priority=7, run_at=run_at) == 1
        assert enqueue_many(session, [EnqSendReceipt(order_id=-2).options(run_at=run_at, queue="later")]) == 1
    with Session(engine) as session:
        rows = session.execute(
            select(EnqSendReceipt.queue, EnqSendReceipt.state, EnqSendReceipt.priority, EnqSendReceipt.max_attempts,
                   func.count()).group_by(EnqSendReceipt.queue, EnqSendReceipt.state, EnqSendReceipt.priority,
                                          EnqSendReceipt.max_attempts).order_by(EnqSendReceipt.queue)
        ).all()
        assert rows == [("emails", "available", 3, 5, 1000), ("later", "scheduled", 3, 5, 1), ("later", "scheduled", 7, 5, 1)]
        assert {j.scheduled_at for j in session.scalars(select(EnqSendReceipt).where(EnqSendReceipt.queue == "later"))} == {run_at}


def test_enqueue_many_bad_row_keeps_nothing(engine):
    def rows():
        yield {"order_id": 1}
        yield {"order_id": object()}

    with pytest.raises(InvalidArgsError):
        with Session(engine) as session, session.begin():
            enqueue_many(session, EnqSendReceipt, rows())
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


class EnqUnique(Job, kind="enq_unique", unique=Unique(by=("n",))):
    pass


class _CallerRolledBack(Exception):
    pass


@pytest.mark.parametrize("lane", ["text", "general", "unique", "rows"])
def test_enqueue_many_as_the_first_statement_rolls_back_with_the_caller(engine, lane):
    """enqueue_many as the first statement of the caller's transaction (nothing flushed
    before it) opened its savepoint with psycopg's ``transaction()`` on a connection that
    was not in a transaction yet: psycopg then ran BEGIN ... COMMIT around the COPY, and
    the jobs were committed on the spot, whatever the caller did next."""
    run_at = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    with pytest.raises(_CallerRolledBack):
        with Session(engine) as session, session.begin():
            if lane == "text":
                enqueue_many(session, EnqSendReceipt, [{"order_id": 1}])
            elif lane == "general":
                enqueue_many(session, EnqSendReceipt, [{"order_id": 1}], run_at=run_at)
            elif lane == "unique":
                enqueue_many(session, EnqUnique, [{"n": 1}])
            else:
                enqueue_many(session, [EnqSendReceipt(order_id=1)])
            raise _CallerRolledBack()
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    with Session(engine) as session:  # and a plain rollback, without a session.begin() block
        enqueue_many(session, [EnqSendReceipt(order_id=2)])
        session.rollback()
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


@pytest.mark.parametrize("lane", ["text", "general"])
@pytest.mark.parametrize("bad", [math.nan, "lone \ud800", object()])
def test_enqueue_many_bad_row_leaves_the_callers_transaction_usable(engine, orders, lane, bad):
    """A bad row fails mid-COPY; the caller catches the error and commits its other writes.
    Without a savepoint the COPY's failure aborted the transaction, and the COMMIT that
    followed rolled everything back without a word."""
    extra = {} if lane == "text" else {"run_at": dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)}
    with Session(engine) as session, session.begin():
        session.add(Order(id=1, total=42))
        session.flush()
        with pytest.raises(InvalidArgsError):
            enqueue_many(session, EnqSendReceipt, [{"order_id": 1}, {"order_id": bad}], **extra)
        session.add(Order(id=2, total=43))
        assert enqueue_many(session, EnqSendReceipt, [{"order_id": 3}], **extra) == 1
    with Session(engine) as session:
        assert session.scalars(select(Order.id).order_by(Order.id)).all() == [1, 2]
        assert [j.args for j in session.scalars(select(EnqSendReceipt))] == [{"order_id": 3}]


def test_enqueue_many_tags_are_checked_as_options_checks_them(engine):
    for bad in ("urgent", [5]):
        with pytest.raises(ConfigurationError, match="tags must be a sequence of strings"):
            with Session(engine) as session, session.begin():
                enqueue_many(session, EnqSendReceipt, [{"order_id": 1}], tags=bad)
        with pytest.raises(ConfigurationError, match="tags must be a sequence of strings"):
            EnqSendReceipt(order_id=1).options(tags=bad)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_tags_postgresql_cannot_store_are_refused_at_construction(engine):
    """A tag holding NUL (or a lone surrogate) passed construction and failed the INSERT,
    so the caller's whole transaction failed at flush (and a periodic declaration with
    such a tag failed at every slot); kinds declared with tags="x" split it into letters."""
    for bad in (["ok", "a\x00b"], ["\ud800"]):
        with pytest.raises(ConfigurationError, match="NUL or lone surrogates"):
            EnqSendReceipt(order_id=1).options(tags=bad)
        with pytest.raises(ConfigurationError, match="NUL or lone surrogates"):
            with Session(engine) as session, session.begin():
                enqueue_many(session, EnqSendReceipt, [{"order_id": 1}], tags=bad)
    for bad in ("urgent", ["a\x00b"]):
        with pytest.raises(ConfigurationError, match="tags must"):
            class BadTags(Job, kind=f"bad_tags_{len(bad)}", tags=bad):  # noqa: F841
                pass
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0


def test_enqueue_many_text_lane_round_trips_awkward_strings(engine):
    awkward = [
        {"s": 'back\\slash "quoted" \\n not a newline'},
        {"s": "tab\there\nnewline\r\nand \\. alone", "list": [1, 2.5, None, True, "é✓"]},
        {"s": "\\", "nested": {"k\\": ["\\\\", "\t"]}},
        {"s": "\u2028 line separator, emoji 🎉, zero-width \u200b"},
    ]
    with Session(engine) as session, session.begin():
        assert enqueue_many(session, EnqSendReceipt, awkward, tags=["bulk", "v1.2:x-y"], priority=2) == len(awkward)
    with Session(engine) as session:
        rows = session.execute(select(EnqSendReceipt.args, EnqSendReceipt.tags, EnqSendReceipt.priority,
                                      EnqSendReceipt.state).order_by(EnqSendReceipt.id)).all()
    assert [r.args for r in rows] == awkward
    assert {(tuple(r.tags), r.priority, r.state) for r in rows} == {(("bulk", "v1.2:x-y"), 2, "available")}


def test_enqueue_many_text_lane_sends_only_non_default_columns(engine, database_url, schema, monkeypatch):
    import psycopg

    copies: list[str] = []
    original = psycopg.Cursor.copy

    def spy(self, statement, *a, **kw):  # noqa: ANN001 - records the COPY statements the lane sends
        copies.append(statement.as_string(self.connection))
        return original(self, statement, *a, **kw)

    monkeypatch.setattr(psycopg.Cursor, "copy", spy)
    with Session(engine) as session, session.begin():
        enqueue_many(session, EnqPlain, [{"n": 1}])
        enqueue_many(session, EnqPlain, [{"n": 2}], queue="q2", priority=-1, max_attempts=3, tags=["t"])
        enqueue_many(session, EnqByCustomer, [{"customer": "a\tb"}])
        enqueue_many(session, EnqSendReceipt, [{"order_id": 1}])
    monkeypatch.undo()
    assert [c.split("(", 1)[1].split(")", 1)[0].replace('"', "") for c in copies] == [
        "kind, args", "kind, queue, args, priority, max_attempts, tags", "kind, args, partition_key",
        "kind, queue, args, priority, max_attempts",
    ]
    rows = q(database_url, jobs_sql(schema, "SELECT kind, queue, args, state, priority, max_attempts, tags, meta,"
                                            " partition_key, errors, attempt FROM {jobs} ORDER BY id"))
    assert rows == [
        ("enq_plain", "default", {"n": 1}, "available", 0, 20, [], {}, None, [], 0),
        ("enq_plain", "q2", {"n": 2}, "available", -1, 3, ["t"], {}, None, [], 0),
        ("enq_by_customer", "default", {"customer": "a\tb"}, "available", 0, 20, [], {}, '"a\\tb"', [], 0),
        ("enq_send_receipt", "emails", {"order_id": 1}, "available", 3, 5, [], {}, None, [], 0),
    ]


def test_args_size_cap_is_exact_in_bytes():
    class Capped(Job, kind="enq_capped", max_args_bytes=40):
        pass

    # {"s":"..."} is 8 bytes around the string; the cap counts UTF-8 bytes of compact JSON.
    Capped(s="a" * 32)
    with pytest.raises(InvalidArgsError, match="41 bytes of JSON, over the cap of 40"):
        Capped(s="a" * 33)
    Capped(s="é" * 16)  # 2 bytes each
    with pytest.raises(InvalidArgsError, match="over the cap"):
        Capped(s="€" * 11)  # 3 bytes each: 41
    Capped(s="\n" * 16)  # escaped as 2 characters each
    with pytest.raises(InvalidArgsError, match="over the cap"):
        Capped(s="\x01" * 6)  # \u0001: 6 each, 44
    # The bulk path's check (it encodes every row anyway) agrees.
    assert _validate.encode_payload({"s": "é" * 16}, max_bytes=40)[1] == '{"s":"' + "é" * 16 + '"}'
    with pytest.raises(InvalidArgsError, match="41 bytes of JSON, over the cap of 40"):
        _validate.encode_payload({"s": "€" * 11}, max_bytes=40)


def test_invalid_args_name_their_path():
    with pytest.raises(InvalidArgsError, match=r"args\['a'\]\[1\]\['b'\] is nan"):
        EnqPlain(a=[0, {"b": math.nan}])
    with pytest.raises(InvalidArgsError, match=r"args\['a'\] has a key 1 that is not a string"):
        EnqPlain(a={1: 2})
    with pytest.raises(InvalidArgsError, match=r"args\['s'\]\[2\] is a set"):
        EnqPlain(s=[1, 2, {3}])


def test_enqueue_many_tags_needing_quotes_take_the_general_path(engine):
    with Session(engine) as session, session.begin():
        enqueue_many(session, EnqSendReceipt, [{"n": 1}], tags=["has space", "NULL", 'q"uote'])
    with Session(engine) as session:
        assert session.scalars(select(EnqSendReceipt.tags)).one() == ["has space", "NULL", 'q"uote']


@pytest.mark.parametrize("meta, message", [
    ({"x": {1}}, "meta['x'] is a set"),
    ({"x": [math.nan]}, "meta['x'][0] is nan"),
    ({1: 2}, "meta has a key 1"),
])
def test_a_bad_meta_is_named_meta_not_args(meta, message):
    """The check of options(meta=) reported the fault in the args ("args['x'] is a set"),
    sending the caller to look at arguments that were fine."""
    with pytest.raises(InvalidArgsError) as caught:
        EnqSendReceipt(order_id=1).options(meta=meta)
    assert str(caught.value).startswith(message)


def test_a_max_attempts_past_its_bound_is_refused_with_the_bound():
    """The message said "an int >= 1" of 2000000, which is one."""
    with pytest.raises(ConfigurationError, match=r"an int in 1\.\.1000000, not 2000000"):
        EnqSendReceipt(order_id=1).options(max_attempts=2_000_000)


def test_options_reschedule_a_stored_job_only_while_it_waits(engine):
    """options(run_at=) of a loaded job set state 'scheduled' whatever its state: a
    completed or dead job ran again, a running one twice (its own outcome refused)."""
    with Session(engine) as session, session.begin():
        jobs = [EnqSendReceipt(order_id=i) for i in range(5)]
        session.add_all(jobs)
        session.flush()
        ids = [j.id for j in jobs]
    with Session(engine) as session, session.begin():
        for job_id, state in zip(ids, ["completed", "dead", "running", "cancelled"]):
            lease = {"claim_token": uuid.uuid4(), "lease_expires_at": func.now()} if state == "running" else {}
            session.execute(update(Job).where(Job.id == job_id).values(state=state, **lease))
    later = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    with Session(engine) as session, session.begin():
        for job_id in ids[:4]:
            job = session.get(EnqSendReceipt, job_id, with_for_update=True)
            with pytest.raises(ConfigurationError, match=f"job {job_id} is {job.state}"):
                job.options(run_at=later)
            with pytest.raises(ConfigurationError, match="reschedules a new or waiting job"):
                job.options(delay=60)
        session.get(EnqSendReceipt, ids[4]).options(run_at=later)  # waiting: moved
    with Session(engine) as session:
        rows = session.execute(select(Job.state, Job.scheduled_at).where(Job.id.in_(ids)).order_by(Job.id)).all()
        assert [r.state for r in rows] == ["completed", "dead", "running", "cancelled", "scheduled"]
        assert rows[4].scheduled_at == later
