"""Enqueue at its edges: every path writes the same row, and bad input is refused, typed,
before any SQL; a bulk load is bounded in memory and fails cleanly."""

from __future__ import annotations

import datetime as dt
import json
import tracemalloc
from decimal import Decimal
from fractions import Fraction
from typing import Any, Iterator, Optional

import anyio
import pytest
import sqlalchemy.exc
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from sa_jobs import (ConfigurationError, InvalidArgsError, Job, Unique, Worker, enqueue_many, install, wait_for,
                     wait_for_async)
from sa_jobs import _validate
from sa_jobs._url import sqlalchemy_url
from sa_jobs.schema import DEFAULT_SCHEMA

from .helpers import jobs_sql, q


class EdgeTagged(Job, kind="edge_tagged", queue="edges", priority=2, max_attempts=3, tags=("kind-tag",)):
    pass


class EdgeByCustomer(Job, kind="edge_by_customer", partition_by=("customer",)):
    pass


class EdgeUnique(Job, kind="edge_unique", unique=Unique(by=("n",)), tags=("kind-tag",)):
    pass


_ROW = "SELECT kind, queue, args, state, priority, max_attempts, tags, meta, partition_key, unique_key, scheduled_at FROM {jobs}"
_RUN_AT = dt.datetime(2031, 3, 30, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def _rows(database_url: str, schema: str) -> list[tuple[Any, ...]]:
    return q(database_url, jobs_sql(schema, _ROW + " ORDER BY id"))


def _by_every_path(engine: Any, database_url: str, schema: str, kind: type[Job], args: dict[str, Any],
                   **options: Any) -> list[tuple[Any, ...]]:
    """The row each enqueue path writes for ``kind(**args).options(**options)``; the table is
    emptied between paths (a unique kind's second row would be a duplicate)."""
    bulk = {k: v for k, v in options.items() if k in ("queue", "priority", "max_attempts", "run_at", "tags")}
    paths = [
        lambda s: s.add(kind(**args).options(**options)),
        lambda s: s.add_all([kind(**args).options(**options)]),
        lambda s: enqueue_many(s, [kind(**args).options(**options)]),
        lambda s: enqueue_many(s, kind, [args], **bulk),
    ]
    rows = []
    for path in paths:
        with Session(engine) as session, session.begin():
            path(session)
        rows += _rows(database_url, schema)
        q(database_url, jobs_sql(schema, "DELETE FROM {jobs}"))

    async def in_async_session() -> None:
        aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema})
        try:
            async with AsyncSession(aengine) as session, session.begin():
                session.add(kind(**args).options(**options))
        finally:
            await aengine.dispose()

    anyio.run(in_async_session)
    rows += _rows(database_url, schema)
    return rows


@pytest.mark.parametrize("kind, args, options", [
    (EdgeTagged, {"n": 1}, {}),
    (EdgeTagged, {"n": 1}, {"tags": []}),
    (EdgeTagged, {"n": 1}, {"queue": "other", "priority": -4, "max_attempts": 1, "tags": ["a b", "c"], "run_at": _RUN_AT}),
    (EdgeByCustomer, {"customer": "é\t1", "n": 2}, {"priority": 5}),
    (EdgeUnique, {"n": 3}, {"tags": [], "queue": "u"}),
], ids=["defaults", "no-tags", "every-option", "partitioned", "unique-no-tags"])
def test_every_enqueue_path_writes_the_same_row(engine, database_url, schema, kind, args, options):
    """enqueue_many(session, [rows]) read a row's tags as ``row.tags or the kind's``: a job
    given ``options(tags=[])`` to drop its kind's tags kept them on that path alone."""
    rows = _by_every_path(engine, database_url, schema, kind, args, **options)
    assert len(rows) == 5
    # scheduled_at is the database's now() unless run_at sets it, so it differs by transaction.
    compared = [_hashable(row if "run_at" in options else row[:-1]) for row in rows]
    assert compared == [compared[0]] * 5, rows
    if "tags" in options:
        assert rows[0][6] == list(options["tags"])


def _hashable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for v in row)


class _OffsetLess(dt.tzinfo):
    """A tzinfo that knows no offset: Python counts such a datetime as naive."""

    def utcoffset(self, when: Optional[dt.datetime]) -> None:
        return None

    def dst(self, when: Optional[dt.datetime]) -> None:
        return None


@pytest.mark.parametrize("run_at", [
    dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-5))),  # year 10000 in UTC
    dt.datetime(9999, 6, 1, tzinfo=dt.timezone.utc),
    dt.datetime.min.replace(tzinfo=dt.timezone(dt.timedelta(hours=5))),  # 1 BC in UTC
    dt.datetime.min.replace(tzinfo=dt.timezone.utc),
    dt.datetime(2030, 1, 1, tzinfo=_OffsetLess()),
], ids=["year-10000", "year-9999", "year-0", "datetime.min", "no-offset"])
def test_a_run_at_python_cannot_read_back_is_refused(engine, database_url, schema, run_at):
    """run_at had no bounds: datetime.max at -05:00 (year 10000 in UTC) or datetime.min at
    +05:00 (1 BC) wrote a row no one could read back (psycopg "timestamp too large (after
    year 10K)" / "too small (before year 1)", in every listing of the queue), and near
    either end it depended on the reader's TimeZone. A tzinfo without an offset passed as
    aware and was written as the server's local time."""
    with pytest.raises(ConfigurationError, match="run_at"):
        EdgeTagged(n=1).options(run_at=run_at)
    with pytest.raises(ConfigurationError, match="run_at"):
        with Session(engine) as session, session.begin():
            enqueue_many(session, EdgeTagged, [{"n": 1}], run_at=run_at)
    assert _rows(database_url, schema) == []
    far = dt.datetime(9998, 12, 31, tzinfo=dt.timezone(dt.timedelta(hours=-12)))  # still fits
    with Session(engine) as session, session.begin():
        session.add(EdgeTagged(n=1).options(run_at=far))
    with Session(engine) as session:
        assert session.scalars(select(EdgeTagged.scheduled_at)).one() == far


@pytest.mark.parametrize("delay", [dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc), dt.date(2030, 1, 1), "5", True])
def test_a_delay_of_another_type_is_a_configuration_error(delay):
    """A datetime given as ``delay=`` (meaning run_at) raised a bare TypeError from
    float(); a string or a bool was taken as a number of seconds."""
    with pytest.raises(ConfigurationError, match="delay"):
        EdgeTagged(n=1).options(delay=delay)


def test_a_delay_of_a_real_number_or_timedelta_is_taken(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        for delay in (60, 60.0, Decimal("60"), dt.timedelta(minutes=1)):
            session.add(EdgeTagged(n=1).options(delay=delay))
    seconds = q(database_url, jobs_sql(schema, "SELECT extract(epoch FROM scheduled_at - created_at)::int FROM {jobs}"))
    assert seconds == [(60,)] * 4


@pytest.mark.parametrize("key", ["lone \ud800", "\udfff"])
def test_a_partition_key_utf8_cannot_hold_is_refused_at_options(engine, database_url, schema, key):
    """A lone surrogate passed options(partition_key=...) and failed the caller's whole
    transaction at flush with psycopg's UnicodeEncodeError."""
    with pytest.raises(InvalidArgsError, match="partition key"):
        EdgeTagged(n=1).options(partition_key=key)


@pytest.mark.parametrize("cap", [0, -1, True, "big", 1.5, 2**28, 10**12])
def test_a_bad_max_args_bytes_is_refused_at_declaration(cap):
    """Was accepted: every job of the kind then failed at construction, with a TypeError
    ('>' not supported) or 'over the cap of True'."""
    with pytest.raises(ConfigurationError, match="max_args_bytes"):
        class Capped(Job, kind=f"edge_capped_{type(cap).__name__}_{cap!s}".replace("-", "m").replace(".", "_"),
                     max_args_bytes=cap):
            pass


_MANY = 25_000  # more than two of enqueue_many's batches (enqueue._BATCH_ROWS)


def _peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("form", ["args-run_at", "args-quoted-tags", "rows", "rows-run_at"])
def test_enqueue_many_of_a_generator_holds_a_bounded_amount_in_memory(engine, database_url, schema, form):
    """A generator of rows was streamed only by the fast lane: with run_at= every row was
    kept for a second COPY, and job rows were listed first, so memory grew with the load
    (300-350 bytes a row: a million rows, 300 MB and more)."""
    pad = "p" * 100

    def rows() -> Iterator[Any]:
        for i in range(_MANY):
            if form.startswith("rows"):
                job = EdgeTagged(n=i, pad=pad)
                yield job.options(run_at=_RUN_AT) if form == "rows-run_at" else job
            else:
                yield {"n": i, "pad": pad}

    extra: dict[str, Any] = {"args-run_at": {"run_at": _RUN_AT}, "args-quoted-tags": {"tags": ["a b"]}}.get(form, {})

    def load() -> None:
        with Session(engine) as session, session.begin():
            if form.startswith("rows"):
                assert enqueue_many(session, rows()) == _MANY
            else:
                assert enqueue_many(session, EdgeTagged, rows(), **extra) == _MANY

    # Bounded by a batch (at most 10,000 rows or 1 MiB of COPY text: about 3.5 MB here at
    # its fullest), whatever the count: 2.5 batches' rows held at once would pass 8 MB.
    assert _peak_bytes(load) < 6_000_000
    (count, states), = q(database_url, jobs_sql(schema, "SELECT count(*), array_agg(DISTINCT state) FROM {jobs}"))
    assert count == _MANY
    assert states == (["scheduled"] if "run_at" in form else ["available"])


def test_enqueue_many_rows_without_a_schedule_take_the_transactions_now(engine, database_url, schema):
    """Scheduled and unscheduled rows in one call: the unscheduled ones are due at the
    transaction's now(), as the table's DEFAULT would make them."""
    with Session(engine) as session, session.begin():
        session.execute(text("SELECT pg_sleep(0.05)"))
        enqueue_many(session, [EdgeTagged(n=1), EdgeTagged(n=2).options(run_at=_RUN_AT), EdgeTagged(n=3)])
    rows = q(database_url, jobs_sql(schema, "SELECT state, scheduled_at = created_at, scheduled_at FROM {jobs}"
                                            " ORDER BY (args->>'n')::int"))
    assert [r[:2] for r in rows] == [("available", True), ("scheduled", False), ("available", True)]
    assert rows[1][2] == _RUN_AT


@pytest.mark.parametrize("form", ["text", "general", "rows"])
def test_enqueue_many_on_a_lost_connection_raises_sqlalchemys_error_and_rolls_back_cleanly(engine, database_url, form):
    """The connection dropping mid-COPY raised psycopg's own OperationalError (which an
    app's ``except sqlalchemy.exc.OperationalError`` retry missed), and SQLAlchemy, not
    told, then failed the caller's rollback too ("the connection is lost")."""
    with Session(engine) as session:
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()

        def rows() -> Iterator[Any]:
            for i in range(10_000):
                if i == 5_000:
                    q(database_url, "SELECT pg_terminate_backend(%s)", (pid,))
                yield EdgeTagged(n=i) if form == "rows" else {"n": i}

        with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
            if form == "rows":
                enqueue_many(session, rows())
            else:
                enqueue_many(session, EdgeTagged, rows(), **({"tags": ["a b"]} if form == "general" else {}))
        assert raised.value.connection_invalidated
        session.rollback()  # clean: the transaction is gone with its connection
        assert session.execute(text("SELECT 1")).scalar_one() == 1  # and the session goes on


def test_enqueue_many_in_a_rolled_back_savepoint_keeps_only_the_outer_rows(engine, database_url, schema):
    with Session(engine) as session, session.begin():
        enqueue_many(session, EdgeTagged, [{"n": 1}])
        with pytest.raises(_Abandon):
            with session.begin_nested():
                for form in ("text", "general", "rows", "unique"):
                    if form == "rows":
                        enqueue_many(session, [EdgeTagged(n=2)])
                    elif form == "unique":
                        enqueue_many(session, EdgeUnique, [{"n": 2}])
                    else:
                        enqueue_many(session, EdgeTagged, [{"n": 2}], **({"tags": ["a b"]} if form == "general" else {}))
                raise _Abandon
        enqueue_many(session, [EdgeUnique(n=3)])
    assert q(database_url, jobs_sql(schema, "SELECT kind, args FROM {jobs} ORDER BY id")) == [
        ("edge_tagged", {"n": 1}), ("edge_unique", {"n": 3})]


class _Abandon(Exception):
    pass



def test_enqueue_many_cancelled_by_the_server_leaves_the_callers_transaction_usable(engine, database_url, schema):
    """A server-side error mid-COPY (here a cancel) is SQLAlchemy's error type as for the
    caller's own statements; the call's rows are gone, the caller's earlier ones commit."""
    import threading

    with Session(engine) as session, session.begin():
        enqueue_many(session, [EdgeTagged(n=-1)])
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        started, done = threading.Event(), threading.Event()

        def rows() -> Iterator[dict[str, int]]:
            for i in range(2_000_000):
                if i == 5_000:
                    started.set()
                yield {"n": i}

        def cancel() -> None:
            # The rows go in COPYs of batches: a cancel that lands between two, on an idle
            # backend, does nothing, so it is sent until one lands in a COPY.
            started.wait(30)
            while not done.wait(0.02):
                q(database_url, "SELECT pg_cancel_backend(%s)", (pid,))

        canceller = threading.Thread(target=cancel, daemon=True)
        canceller.start()
        try:
            with pytest.raises(sqlalchemy.exc.OperationalError, match="cancel") as raised:
                enqueue_many(session, EdgeTagged, rows())
        finally:
            done.set()
            canceller.join(10)
        assert not raised.value.connection_invalidated
        enqueue_many(session, EdgeTagged, [{"n": -2}])
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs} ORDER BY id")) == [({"n": -1},), ({"n": -2},)]


@pytest.mark.parametrize("delay", [0, 0.0, dt.timedelta(0)])
def test_a_zero_delay_enqueues_a_job_that_is_due_now(engine, database_url, schema, delay):
    """delay=0 (say max(0, deadline - now)) made the job 'scheduled' at now(): no worker
    claims a scheduled job, so it waited for the next maintenance tick to promote it."""
    with Session(engine) as session, session.begin():
        session.add(EdgeTagged(n=1).options(delay=delay))
    assert q(database_url, jobs_sql(schema, "SELECT state, scheduled_at = created_at FROM {jobs}")) == [("available", True)]


class EdgeNumbers(Job, kind="edge_numbers"):
    pass


@EdgeNumbers.handler
def edge_numbers(ctx: Any, **args: Any) -> dict[str, str]:
    return {name: repr(value) for name, value in args.items()}


_NUMBERS = {"big": 1e16, "huge": 1.5e300, "neg_zero": -0.0, "tiny": 1e-7, "whole": 123.0, "half": 0.5,
            "nested": [2e20, {"x": -1e17}], "int": 10**20, "sub": 5e-324}


def test_perform_passes_numbers_as_a_worker_reads_them_from_jsonb(engine, database_url, schema):
    """jsonb keeps numbers as numeric: 1e16 reads back as the int 10000000000000000 and
    -0.0 as 0.0, but perform() round-tripped args through Python's json, where they stay
    floats: a handler's unit test passed on values a worker never hands it."""
    from sa_jobs.testing import perform

    with Session(engine) as session, session.begin():
        session.add(EdgeNumbers(**_NUMBERS))
    (stored,), = q(database_url, jobs_sql(schema, "SELECT args FROM {jobs}"))
    assert perform(EdgeNumbers(**_NUMBERS)) == {name: repr(value) for name, value in stored.items()}


def test_enqueue_many_through_a_connection_writes_in_its_transaction(engine, database_url, schema):
    """enqueue_many's docstring takes "a sync Session or Connection": a Connection failed
    with TypeError ('_ConnectionFairy' object is not callable, from ``session.connection()``);
    and on a Connection that had begun nothing, SQLAlchemy did not know the COPY had begun
    a transaction, so its commit() did nothing and the rows were rolled back at close."""
    with engine.begin() as conn:
        assert enqueue_many(conn, EdgeTagged, [{"n": 1}]) == 1
        assert enqueue_many(conn, [EdgeTagged(n=2), EdgeUnique(n=2)]) == 2
    with engine.connect() as conn:
        assert enqueue_many(conn, EdgeTagged, [{"n": 3}]) == 1
        conn.commit()
    with engine.connect() as conn:
        assert enqueue_many(conn, EdgeTagged, [{"n": 4}]) == 1
        conn.rollback()
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs} ORDER BY id")) == [
        ({"n": 1},), ({"n": 2},), ({"n": 2},), ({"n": 3},)]


class EdgeDeep(Job, kind="edge_deep", max_attempts=1):
    pass


@EdgeDeep.handler
def edge_deep(ctx: Any, d: Any) -> int:
    depth = 0
    while isinstance(d, list):
        d, depth = d[0] if d else None, depth + 1
    return depth


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def _in_a_new_thread(fn: Any) -> Any:
    """``fn()`` on a fresh thread's stack: the shallowest an app's call can be."""
    import threading

    out: list[Any] = []

    def run() -> None:
        try:
            out.append((fn(), None))
        except BaseException as exc:  # re-raised on the caller's thread
            out.append((None, exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    value, error = out[0]
    if error is not None:
        raise error
    return value


def _deepest_accepted() -> int:
    for levels in range(1000, 0, -1):
        try:
            EdgeDeep(d=_nested(levels))
        except InvalidArgsError:
            continue
        return levels
    raise AssertionError("no depth accepted")


def test_args_nested_as_deep_as_accepted_are_written_and_read_back_by_a_worker(engine, database_url, schema):
    """The nesting args may have was Python's recursion limit less the caller's stack:
    args accepted on a shallow stack failed the flush of session.add with a raw
    RecursionError (psycopg's json.dumps runs deeper), and enqueue_many wrote them; a
    worker could not decode them when it claimed them (a RecursionError in the claim),
    so the job and every other job of its claim batch sat running until their leases
    expired, each time. A fixed cap refuses them, typed, on any stack."""
    from .helpers import run_worker_until, states

    levels = _in_a_new_thread(_deepest_accepted)

    def add() -> None:
        with Session(engine) as session, session.begin():
            session.add(EdgeDeep(d=_nested(levels)))

    _in_a_new_thread(add)
    with Session(engine) as session, session.begin():
        assert enqueue_many(session, EdgeDeep, [{"d": _nested(levels)}]) == 1
        assert enqueue_many(session, EdgeDeep, [{"d": [1]}]) == 1
    run_worker_until(database_url, schema, [EdgeDeep], lambda: states(database_url, schema).get("completed") == 3,
                     timeout=8)
    assert q(database_url, jobs_sql(schema, "SELECT state, result FROM {jobs} ORDER BY id")) == [
        ("completed", levels), ("completed", levels), ("completed", 1)]
    with pytest.raises(InvalidArgsError, match="nested"):
        _in_a_new_thread(lambda: EdgeDeep(d=_nested(levels + 1)))


class EdgeByPair(Job, kind="edge_by_pair", partition_by=("customer", "region")):
    pass


@pytest.mark.parametrize("kind", [EdgeByCustomer, EdgeByPair])
def test_args_stored_alike_take_one_partition_key_on_every_path(engine, database_url, schema, kind):
    """jsonb stores ``-0.0`` as ``0.0`` and ``1e16`` as the int ``10000000000000000``, and a
    worker reads them so; the partition key was the JSON text of the values as given, so
    jobs with the same stored args counted against two keys of a partition limit."""
    alike = [{"customer": -0.0, "region": [1e16]}, {"customer": 0.0, "region": [10**16]}]
    with Session(engine) as session, session.begin():
        session.add_all([kind(**args) for args in alike])
        enqueue_many(session, kind, alike)
        enqueue_many(session, [kind(**args) for args in alike])
    rows = q(database_url, jobs_sql(schema, "SELECT args, partition_key FROM {jobs}"))
    assert len(rows) == 6 and {args["customer"] for args, _ in rows} == {0.0}
    assert {key for _, key in rows} == {"0.0" if kind is EdgeByCustomer else "[0.0,[10000000000000000]]"}


@pytest.mark.parametrize("call, error", [
    (lambda s: enqueue_many(s, EdgeTagged, {"n": 1}), ConfigurationError),  # one dict, not a list of them
    (lambda s: enqueue_many(s, EdgeTagged, [{"n": 1}, 5]), InvalidArgsError),
    (lambda s: enqueue_many(s, EdgeTagged, [{"n": 1}, "n"]), InvalidArgsError),
    (lambda s: enqueue_many(s, EdgeTagged, [[("n", 1)]]), InvalidArgsError),  # pairs, not a mapping
    (lambda s: enqueue_many(s, EdgeUnique, [{"n": 1}, None]), InvalidArgsError),
    (lambda s: enqueue_many(s, EdgeTagged(n=1)), ConfigurationError),  # one job, not a list of them
    (lambda s: enqueue_many(s, [EdgeTagged(n=1), {"n": 2}]), ConfigurationError),  # a dict, not a job
    (lambda s: enqueue_many(s, [EdgeUnique(n=1), None]), ConfigurationError),
    (lambda s: s.add(EdgeTagged(n=1).options(meta=5)), InvalidArgsError),
    (lambda s: s.add(EdgeTagged(n=1).options(meta=[("a", 1)])), InvalidArgsError),
    (lambda s: enqueue_many(s, None), ConfigurationError),  # no iterable: the builtins' TypeError
    (lambda s: enqueue_many(s, 5), ConfigurationError),
    (lambda s: enqueue_many(s, EdgeTagged, 5), ConfigurationError),
    (lambda s: enqueue_many(s, EdgeUnique, 5), ConfigurationError),
], ids=["one-dict", "int-args", "str-args", "pairs-args", "none-args-unique", "one-job", "dict-job", "none-job",
        "int-meta", "pairs-meta", "none-jobs", "int-jobs", "int-args-list", "int-args-list-unique"])
def test_enqueue_many_of_what_is_no_job_or_args_is_refused_typed(engine, database_url, schema, call, error):
    """An item that is no mapping (or no job) raised the builtins' TypeError, ValueError
    ("dictionary update sequence element #0 has length 1" for one dict passed as the list
    of args) or AttributeError; a list of pairs was taken as args. Refused with sa-jobs'
    typed errors, nothing of the call written, the caller's transaction usable."""
    with Session(engine) as session, session.begin():
        session.add(EdgeTagged(n=0))
        with pytest.raises(error):
            call(session)
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs}")) == [({"n": 0},)]


@pytest.mark.parametrize("how", ["loaded", "expired", "pending", "detached"])
def test_enqueue_many_of_a_job_a_session_holds_is_refused(engine, database_url, schema, how):
    """``enqueue_many`` writes new jobs. A stored one was copied, state and all (a completed
    job's copy was written completed, and never ran), or once expired by a commit raised
    "args must be a mapping ..., not NoneType"; one added to the session was written twice,
    by the COPY and again at flush. Refused, typed, nothing of the call written."""
    with Session(engine) as session, session.begin():
        session.add(EdgeTagged(n=1))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now()"))
    with Session(engine) as session:
        if how == "pending":
            job = EdgeTagged(n=2)
            session.add(job)
        else:
            job = session.scalars(select(EdgeTagged)).one()
            if how == "expired":
                session.commit()
            elif how == "detached":
                session.expunge(job)
        with pytest.raises(ConfigurationError, match="enqueue_many"):
            enqueue_many(session, [EdgeTagged(n=3), job])
        session.commit()
    expected = [("edge_tagged", {"n": 1}, "completed")] + ([("edge_tagged", {"n": 2}, "available")] if how == "pending" else [])
    assert q(database_url, jobs_sql(schema, "SELECT kind, args, state FROM {jobs} ORDER BY id")) == expected


class EdgeCustomInit(Job, kind="edge_custom_init", queue="edges", priority=2, partition_by=("customer",)):
    def __init__(self, customer: str) -> None:
        super().__init__(customer=customer.lower())


class _NoSuperMixin:
    def __init__(self, customer: str) -> None:
        self.args = {"customer": customer}  # type: ignore[attr-defined]


def test_a_kind_whose_init_skips_jobs_is_refused_at_construction(engine, database_url, schema):
    """A kind's own ``__init__`` (or a mixin's before Job) that set ``self.args`` without
    ``super().__init__(**args)`` built a job without its kind's queue, priority or partition
    key: ``session.add`` wrote it to the table's queue 'default', where no worker of the
    kind's queue looks, and ``enqueue_many`` without its partition key. Refused where it is
    built; one that calls ``super().__init__`` writes the kind's row on every path."""

    class EdgeNoSuper(Job, kind="edge_no_super", queue="edges", priority=2, partition_by=("customer",)):
        def __init__(self, customer: str) -> None:
            self.args = {"customer": customer}

    class EdgeNoSuperMixin(_NoSuperMixin, Job, kind="edge_no_super_mixin", queue="edges"):
        pass

    class EdgeNoSuperChild(EdgeNoSuper, kind="edge_no_super_child"):
        pass

    for kind in (EdgeNoSuper, EdgeNoSuperMixin, EdgeNoSuperChild):
        with pytest.raises(ConfigurationError, match=r"super\(\).__init__"):
            kind("ACME")
    with Session(engine) as session, session.begin():
        session.add(EdgeCustomInit("ACME"))
        enqueue_many(session, [EdgeCustomInit("Beta")])
    assert q(database_url, jobs_sql(schema, "SELECT kind, queue, priority, args, partition_key FROM {jobs} ORDER BY partition_key")) == [
        ("edge_custom_init", "edges", 2, {"customer": "acme"}, '"acme"'),
        ("edge_custom_init", "edges", 2, {"customer": "beta"}, '"beta"'),
    ]


@pytest.mark.parametrize("how", ["assigned", "changed-in-place"])
@pytest.mark.parametrize("path", ["add", "enqueue_many", "bulk_save_objects"])
def test_meta_assigned_or_changed_on_a_new_job_is_checked_before_anything_is_sent(engine, database_url, schema,
                                                                                  how, path):
    """``options(meta=)`` checks meta as JSON, but meta set on the attribute, or changed in
    place after ``options()``, reached the INSERT unchecked: NaN failed the flush with
    DataError and lost the caller's whole transaction. Checked where args are, before
    anything is sent: InvalidArgsError, the transaction usable."""
    job = EdgeTagged(n=1)
    if how == "assigned":
        job.meta = {"a": float("nan")}
    else:
        meta: dict[str, Any] = {"a": 1}
        job.options(meta=meta)
        meta["a"] = float("nan")
    with Session(engine) as session, session.begin():
        session.add(EdgeTagged(n=0))
        session.flush()
        with pytest.raises(InvalidArgsError, match="meta"):
            if path == "add":
                session.add(job)
                session.flush()
            elif path == "enqueue_many":
                enqueue_many(session, [job])
            else:
                session.bulk_save_objects([job])
        if path == "add":
            session.expunge(job)
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs}")) == [({"n": 0},)]



def _in_a_session_within(seconds: float, engine: Any, database_url: str, body: Any) -> Any:
    """``body(session)`` in a transaction of its own, in a daemon thread, failed if it has
    not returned within ``seconds``. A client-side deadlock cannot be interrupted: its
    backend is terminated (its locks held up the schema's teardown), and the thread, which
    nothing else touches, left behind."""
    import threading

    box: dict[str, Any] = {}

    def run() -> None:
        try:
            with Session(engine) as session, session.begin():
                box["pid"] = session.connection().connection.driver_connection.info.backend_pid
                box["value"] = body(session)
        except BaseException as exc:  # handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        q(database_url, "SELECT pg_terminate_backend(%s)", (box["pid"],))
        pytest.fail(f"enqueue_many did not return within {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.parametrize("form", ["args", "args-run_at", "args-unique", "jobs", "jobs-unique"])
@pytest.mark.parametrize("source", ["streamed", "query-per-row"])
def test_enqueue_many_of_a_generator_that_reads_through_the_session(engine, database_url, schema, form, source):
    """The 100k-row use: jobs for rows streamed from a table (``yield_per``), or a query
    (a lazy load) per row. The generator was pulled inside the COPY, which holds the
    connection's lock: its first statement on the session waited for that lock, for ever
    (the whole process hung in enqueue_many). Pulled between COPYs of bounded batches."""
    with Session(engine) as session, session.begin():
        session.add_all([EdgeTagged(n=i) for i in range(5)])
    kind: type[Job] = EdgeUnique if form.endswith("unique") else EdgeByCustomer

    def body(session: Session) -> int:
        def gen() -> Iterator[Any]:
            if source == "streamed":
                stored = session.scalars(select(EdgeTagged).order_by(EdgeTagged.id).execution_options(yield_per=2))
                numbers: Iterator[Any] = (job.args["n"] for job in stored)
            else:
                numbers = (session.scalar(select(text(str(i)))) for i in range(5))
            for n in numbers:
                args = {"n": n, "customer": f"c{n}"}
                yield kind(**args) if form.startswith("jobs") else args

        if form.startswith("jobs"):
            return enqueue_many(session, gen())
        return enqueue_many(session, kind, gen(), **({"run_at": _RUN_AT} if form == "args-run_at" else {}))

    assert _in_a_session_within(20, engine, database_url, body) == 5
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE kind = %s"),
             (kind.kind_options().kind,)) == [(5,)]


def test_enqueue_many_whose_generator_queries_does_not_autoflush_rows_its_rollback_would_lose(engine, database_url, schema):
    """Jobs the caller added but had not flushed were autoflushed by a query of the
    generator, inside enqueue_many's savepoint: a bad row later rolled the savepoint back
    and their rows with it, while the Session took them for written, so the caller's
    commit wrote nothing of them. The generator runs with autoflush off."""
    def body(session: Session) -> None:
        session.add(EdgeTagged(n=100))  # pending, not flushed

        def gen() -> Iterator[dict[str, Any]]:
            for i in range(3):
                session.scalar(select(text("1")))
                yield {"n": i}
            yield {"n": float("nan")}

        with pytest.raises(InvalidArgsError):
            enqueue_many(session, EdgeTagged, gen())

    _in_a_session_within(20, engine, database_url, body)
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs}")) == [({"n": 100},)]


_PAST_FLOAT = [10**400, -10**400, Fraction(10**400), Decimal("sNaN")]


@pytest.mark.parametrize("seconds", _PAST_FLOAT, ids=["int", "negative-int", "fraction", "signalling-nan"])
def test_a_duration_no_float_holds_is_a_configuration_error_at_every_entry(database_url, schema, seconds):
    """float() of an int past its range raises OverflowError, of a signalling NaN
    ValueError: ``options(delay=10**400)``, ``Worker(lease=10**400)`` and
    ``install(lock_timeout=10**400)`` let them out raw, where every other bad duration is
    a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match="delay"):
        EdgeTagged(n=1).options(delay=seconds)
    if not isinstance(seconds, Decimal):  # the worker's options take real numbers only
        for option in ("lease", "poll_interval", "maintenance_interval"):
            with pytest.raises(ConfigurationError, match=option):
                Worker(database_url, kinds=[EdgeTagged], schema=schema, **{option: seconds})
    with pytest.raises(ConfigurationError, match="lock_timeout"):
        install(database_url, schema=schema, lock_timeout=seconds)


def test_a_wait_longer_than_any_float_waits_without_a_deadline(engine, database_url, schema):
    """``wait_for(timeout=10**400)`` failed with OverflowError adding it to the clock; it
    is as good as ``math.inf``, which the docs give for no deadline."""
    with Session(engine) as session, session.begin():
        job = EdgeTagged(n=1)
        session.add(job)
        session.flush()
        job_id = job.id
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now()"))
    assert wait_for(engine, job_id, timeout=10**400).state == "completed"
    anyio.run(_wait_async, database_url, schema, job_id)


async def _wait_async(database_url: str, schema: str, job_id: int) -> None:
    aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: schema})
    try:
        assert (await wait_for_async(aengine, job_id, timeout=10**400)).state == "completed"
    finally:
        await aengine.dispose()


class EdgeCapped(Job, kind="edge_capped", max_args_bytes=2000):
    pass


def _stored_bytes(database_url: str, schema: str) -> list[int]:
    """Each row's args as jsonb writes them, compact: PostgreSQL puts a space after every
    ', ' and ': ' of its own, and these args hold no strings that could contain one."""
    return [n for (n,) in q(database_url, jobs_sql(
        schema, "SELECT octet_length(replace(replace(args::text, ', ', ','), ': ', ':')) FROM {jobs} ORDER BY id"))]


def test_the_args_cap_counts_numbers_as_jsonb_writes_them(engine, database_url, schema):
    """The cap measured Python's JSON, where ``1e308`` is 6 bytes; jsonb keeps it as numeric
    and writes all 309 digits, so a kind's 256 KiB cap let through args that every claim,
    listing and ``jobs show`` read back as 11 MB (44 times the cap: 5e-324 writes 326
    characters). Numbers now count as jsonb writes them, on every enqueue path."""
    over = {"x": [1e308] * 10}  # 70 bytes as Python writes it, 3,100 as stored
    assert len(json.dumps(over, separators=(",", ":"))) < 2000
    with pytest.raises(InvalidArgsError, match="over the cap of 2000"):
        EdgeCapped(**over)
    for small in ({"x": [5e-324] * 10}, {"x": {"a": -1.5e300, "b": [1e-300] * 6}}):
        with pytest.raises(InvalidArgsError, match="over the cap"):
            EdgeCapped(**small)
    with Session(engine) as session, session.begin():
        job = EdgeCapped(x=[])
        session.add(job)
        job.args = over
        with pytest.raises(InvalidArgsError, match="over the cap of 2000"):
            session.flush()
        session.rollback()
    with pytest.raises(InvalidArgsError, match="over the cap of 2000"):
        with Session(engine) as session, session.begin():
            enqueue_many(session, EdgeCapped, [over])
    with pytest.raises(InvalidArgsError, match="over the cap of 2000"):
        with Session(engine) as session, session.begin():
            enqueue_many(session, EdgeCapped, ({"x": [1e308] * n} for n in (1, 10)))
    assert _rows(database_url, schema) == []

    fits = {"x": [1e308] * 6, "y": [1e-5, 123.25, 1e16]}  # 1,909 bytes as stored
    with Session(engine) as session, session.begin():
        session.add(EdgeCapped(**fits))
        enqueue_many(session, EdgeCapped, [fits])
    # What the cap measured is what PostgreSQL stored.
    measured = _validate._stored_bytes(fits, json.dumps(fits, separators=(",", ":")))
    assert _stored_bytes(database_url, schema) == [measured] * 2
    assert measured <= 2000


@given(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != 0 and not 1e-4 <= abs(x) < 1e16))
@settings(max_examples=3000, deadline=None)
def test_the_walks_bound_on_a_float_is_never_below_what_jsonb_writes(x):
    """The walk bounds a float's stored size from its power of ten (the exact size, written
    through Decimal, cost 2 µs a float); a bound below it would let args over the cap in."""
    written = len(format(Decimal(float.__repr__(x)), "f"))
    assert written <= _validate._jsonb_float_bound(x) <= written + 20  # over it, the size is measured


@pytest.mark.parametrize("x", [1e16, -1e16, 9.999999999999999e22, -1e23, 1e23, 1e308, -1.7976931348623157e308,
                               5e-324, -5e-324, 9.99999999999e-5, -1e-5, 2.2250738585072014e-308])
def test_the_walks_bound_holds_at_powers_of_ten(x):
    written = len(format(Decimal(float.__repr__(x)), "f"))
    assert written <= _validate._jsonb_float_bound(x) <= written + 20  # over it, the size is measured
