"""sa_jobs.testing: perform, drain, assert_enqueued, inline, and the pytest fixtures."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import Integer, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sa_jobs import (ConfigurationError, InvalidArgsError, Job, JobContext, Snooze, Unique, UnknownKindError, constant_backoff,
                     enqueue_many)
from sa_jobs.schema import DEFAULT_SCHEMA
from sa_jobs.testing import assert_enqueued, drain, enqueued, inline, perform, refute_enqueued


class _Base(DeclarativeBase):
    pass


class Credit(_Base):
    __tablename__ = "testing_credits"
    __table_args__ = {"schema": DEFAULT_SCHEMA}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(Integer)


class GrantCredit(Job, kind="th_grant_credit", queue="th", max_attempts=2, backoff=constant_backoff(0.01)):
    pass


@GrantCredit.handler
def grant_credit(ctx: JobContext, account: int, amount: int) -> int:
    if amount < 0:
        raise ValueError("negative credit")
    with ctx.transaction() as session:
        session.add(Credit(account=account, amount=amount))
    return amount


class GrantOnce(Job, kind="th_grant_once", queue="th", unique=Unique(by=("account",))):
    pass


@GrantOnce.handler
def grant_once(ctx: JobContext, account: int, amount: int) -> int:
    return grant_credit(ctx, account, amount)


class Double(Job, kind="th_double", queue="th"):
    pass


@Double.handler
async def double(ctx: JobContext, x: int) -> int:
    return 2 * x


class NoHandler(Job, kind="th_no_handler", queue="th"):
    pass


@pytest.fixture
def credits(sa_jobs_engine):
    _Base.metadata.create_all(sa_jobs_engine)
    yield
    _Base.metadata.drop_all(sa_jobs_engine)


def test_plugin_fixtures_give_an_installed_isolated_schema(sa_jobs_engine, sa_jobs_schema):
    assert sa_jobs_engine.get_execution_options()["schema_translate_map"] == {DEFAULT_SCHEMA: sa_jobs_schema}
    with Session(sa_jobs_engine) as session:
        assert session.scalars(select(Job)).all() == []


def test_the_plugins_own_server_skips_disk_flushes_and_a_given_one_is_left_alone(sa_jobs_database_url):
    """The embedded server the plugin starts is the session's alone and deleted after it:
    fsync and full-page writes off. A server given by URL keeps its settings."""
    import os

    import psycopg

    from sa_jobs._url import to_conninfo

    with psycopg.connect(to_conninfo(sa_jobs_database_url)) as conn:
        settings = conn.execute("SELECT current_setting('fsync'), current_setting('full_page_writes'),"
                                " (SELECT source FROM pg_settings WHERE name = 'fsync')").fetchone()
    if os.environ.get("SA_JOBS_TEST_DATABASE_URL", "").strip():
        pytest.skip("a server given by URL: its settings are its own")
    assert settings == ("off", "off", "configuration file")


def test_perform_runs_the_handler_without_a_worker(sa_jobs_engine, credits):
    assert perform(Double(x=21)) == 42
    # Completed by ctx.transaction(): a worker stores its result= (None), not the return value.
    assert perform(GrantCredit(account=1, amount=5), engine=sa_jobs_engine) is None
    with Session(sa_jobs_engine) as session:
        assert session.scalars(select(Credit.amount)).all() == [5]
    with pytest.raises(ValueError, match="negative credit"):
        perform(GrantCredit(account=1, amount=-1), engine=sa_jobs_engine)
    with pytest.raises(ConfigurationError):
        perform(NoHandler())


class ReturnsASet(Job, kind="th_returns_a_set", queue="th"):
    pass


@ReturnsASet.handler
def returns_a_set(ctx: JobContext) -> object:
    return {"ids": {1, 2}}


def test_perform_refuses_a_result_a_worker_could_not_store():
    """A worker ends such a job dead (its result is not JSON); a unit test must not pass."""
    with pytest.raises(InvalidArgsError, match="result"):
        perform(ReturnsASet())


def test_assert_enqueued_and_refute(sa_jobs_engine):
    with Session(sa_jobs_engine) as session, session.begin():
        session.add_all([GrantCredit(account=1, amount=5), GrantCredit(account=2, amount=7), Double(x=1)])
    with Session(sa_jobs_engine) as session:
        assert len(assert_enqueued(session, GrantCredit, count=2)) == 2
        assert_enqueued(session, GrantCredit, args={"account": 2})
        refute_enqueued(session, GrantCredit, args={"account": 3})
        assert [j.kind for j in enqueued(session)] == ["th_grant_credit", "th_grant_credit", "th_double"]
        with pytest.raises(AssertionError, match="expected GrantCredit"):
            assert_enqueued(session, GrantCredit, args={"account": 3})
        with pytest.raises(AssertionError):
            assert_enqueued(session, Double, count=2)


def test_enqueued_checks_its_states(sa_jobs_engine):
    """A misspelt state matched nothing, and a str ("dead") was read letter by letter: both
    found no job, so a refute-style check passed whatever the queue held."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(GrantCredit(account=1, amount=5))
    with Session(sa_jobs_engine) as session:
        with pytest.raises(ConfigurationError, match="invalid state 'avialable'"):
            enqueued(session, states=("avialable",))
        assert [j.args for j in enqueued(session, states="available")] == [{"account": 1, "amount": 5}]


def test_the_enqueued_helpers_from_an_async_session_say_to_use_run_sync(sa_jobs_engine):
    """Given an AsyncSession, enqueued() and assert_enqueued() failed with "'coroutine'
    object is not iterable" (and a "never awaited" warning)."""
    import warnings

    import anyio
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from sa_jobs._url import sqlalchemy_url

    async def main() -> None:
        aengine = create_async_engine(sqlalchemy_url(sa_jobs_engine, async_=True)).execution_options(
            **sa_jobs_engine.get_execution_options())
        try:
            async with AsyncSession(aengine) as session:
                async with session.begin():
                    session.add(Double(x=1))
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    for helper in (enqueued, assert_enqueued, refute_enqueued):
                        with pytest.raises(ConfigurationError, match=f"{helper.__name__}.*run_sync"):
                            helper(session, Double)
                assert len(await session.run_sync(lambda s: assert_enqueued(s, Double, args={"x": 1}))) == 1
        finally:
            await aengine.dispose()

    anyio.run(main)


class SlowRetry(Job, kind="th_slow_retry", queue="th", max_attempts=2, backoff=constant_backoff(0.3)):
    pass


@SlowRetry.handler
def slow_retry(ctx: JobContext) -> None:
    raise ValueError("always")


def test_drain_waits_for_a_retry_due_within_its_lookahead(sa_jobs_engine):
    """drain() once returned while the first attempt's backoff was still running (CI at
    4151d1a: a 10 ms backoff left a job retryable instead of dead)."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(SlowRetry())
    assert drain(sa_jobs_engine, kinds=[SlowRetry]) == {"dead": 1}


def test_drain_runs_everything_with_a_real_worker(sa_jobs_engine, credits):
    with Session(sa_jobs_engine) as session, session.begin():
        session.add_all([GrantCredit(account=i, amount=i) for i in range(1, 6)] + [GrantCredit(account=9, amount=-1)])
    counts = drain(sa_jobs_engine, kinds=[GrantCredit])
    assert counts == {"completed": 5, "dead": 1}
    with Session(sa_jobs_engine) as session:
        assert sorted(session.scalars(select(Credit.amount))) == [1, 2, 3, 4, 5]


class Elsewhere(Job, kind="th_elsewhere", queue="th_elsewhere"):
    pass


@Elsewhere.handler
def elsewhere(ctx: JobContext) -> None:
    pass


class SnoozeForever(Job, kind="th_snooze_forever", queue="th"):
    pass


@SnoozeForever.handler
def snooze_forever(ctx: JobContext) -> None:
    raise Snooze(0)


def test_drain_of_some_kinds_ignores_jobs_of_queues_it_does_not_serve(sa_jobs_engine, credits):
    """busy() counted every due job of the table: one waiting in another queue (another
    kind's) kept drain(kinds=[...]) and inline(kinds=[...]) polling until the timeout."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add_all([GrantCredit(account=1, amount=10), Elsewhere()])
    started = time.monotonic()
    assert drain(sa_jobs_engine, kinds=[GrantCredit], timeout=10) == {"completed": 1, "available": 1}
    with inline(sa_jobs_engine, kinds=[GrantCredit], timeout=10):
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(GrantCredit(account=2, amount=20))
    assert time.monotonic() - started < 8
    assert_ran(sa_jobs_engine, GrantCredit, [10, 20])


def test_drain_times_out_with_a_plain_timeout_error(sa_jobs_engine):
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(SnoozeForever())
    with pytest.raises(TimeoutError, match="still due or running after 1s"):
        drain(sa_jobs_engine, kinds=[SnoozeForever], timeout=1)


def test_drain_with_a_zero_timeout_looks_once(sa_jobs_engine):
    """A cancel scope of 0 s cancelled drain()'s first look: an empty queue raised
    TimeoutError saying its jobs were still due. A NaN timeout is refused up front."""
    import math

    assert drain(sa_jobs_engine, kinds=[Double], timeout=0) == {}
    assert drain(sa_jobs_engine, kinds=[Double], timeout=-1) == {}
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(SnoozeForever())
    with pytest.raises(TimeoutError, match="still due or running after 0s"):
        drain(sa_jobs_engine, kinds=[SnoozeForever], timeout=0)
    with pytest.raises(ValueError, match="timeout is NaN"):
        drain(sa_jobs_engine, kinds=[SnoozeForever], timeout=math.nan)


def assert_ran(engine, kind, amounts: list[int]) -> None:
    """The credits written so far are ``amounts``, and no ``kind`` job is left queued."""
    with Session(engine) as session:
        assert sorted(session.scalars(select(Credit.amount))) == amounts
        refute_enqueued(session, kind)


def test_inline_runs_jobs_right_after_commit(sa_jobs_engine, credits):
    with inline(sa_jobs_engine, kinds=[GrantCredit]):
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(GrantCredit(account=3, amount=30))
        assert_ran(sa_jobs_engine, GrantCredit, [30])
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(GrantCredit(account=4, amount=40))  # outside the block: stays queued
    with Session(sa_jobs_engine) as session:
        assert_enqueued(session, GrantCredit, args={"account": 4}, count=1)


def test_inline_sees_unique_jobs_and_bulk_enqueues(sa_jobs_engine, credits):
    # Unique rows are inserted by their own flush hook and leave session.new; enqueue_many
    # COPYs past the unit of work. A commit with only those still runs them inline.
    with inline(sa_jobs_engine, kinds=[GrantCredit, GrantOnce]):
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(GrantOnce(account=5, amount=50))
        assert_ran(sa_jobs_engine, GrantOnce, [50])
        with Session(sa_jobs_engine) as session, session.begin():
            enqueue_many(session, GrantCredit, [{"account": 6, "amount": 60}, {"account": 7, "amount": 70}])
        assert_ran(sa_jobs_engine, GrantCredit, [50, 60, 70])
        # A rolled-back enqueue leaves no mark behind for the session's next commit.
        with Session(sa_jobs_engine) as session:
            with session.begin():
                session.add(GrantOnce(account=8, amount=80))
                session.flush()
                session.rollback()
            with session.begin():
                pass
            assert "sa_jobs.enqueued" not in session.info


def test_inline_works_with_sessions_bound_per_mapper(sa_jobs_engine, credits):
    """A Session with ``binds={...}`` has no single bind: inline's plain get_bind() raised
    UnboundExecutionError and failed every flush of such a session inside the block."""
    with inline(sa_jobs_engine, kinds=[GrantCredit]):
        with Session(binds={Job: sa_jobs_engine, Credit: sa_jobs_engine}) as session, session.begin():
            session.add(Credit(account=9, amount=90))  # a flush without jobs too
            session.flush()
            session.add(GrantCredit(account=1, amount=10))
        assert_ran(sa_jobs_engine, GrantCredit, [10, 90])


def test_inline_a_rolled_back_savepoint_keeps_the_outer_transactions_jobs(sa_jobs_engine, credits):
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    with inline(sa_jobs_engine, kinds=[GrantCredit]):
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(GrantCredit(account=1, amount=10))
            with pytest.raises(DBAPIError):
                with session.begin_nested():  # flushes the job first, then fails and rolls back
                    session.execute(text("SELECT 1/0"))
        assert_ran(sa_jobs_engine, GrantCredit, [10])
        # A released savepoint is no commit either: its jobs run when the outer one commits.
        with Session(sa_jobs_engine) as session, session.begin():
            with session.begin_nested():
                session.add(GrantCredit(account=2, amount=20))
            assert "sa_jobs.enqueued" in session.info
        assert_ran(sa_jobs_engine, GrantCredit, [10, 20])
        # The outermost rollback still clears the mark, also with a savepoint open.
        with Session(sa_jobs_engine) as session:
            session.begin()
            session.add(GrantCredit(account=3, amount=30))
            session.begin_nested()
            session.flush()
            session.rollback()
            assert "sa_jobs.enqueued" not in session.info
        assert_ran(sa_jobs_engine, GrantCredit, [10, 20])


FAILING_TEST = '''
from sqlalchemy import select
from sqlalchemy.orm import Session

from sa_jobs import Job


def test_fails_with_a_session_left_open(sa_jobs_engine, sa_jobs_schema):
    with open("schema.txt", "w") as f:
        f.write(sa_jobs_schema)
    session = Session(sa_jobs_engine)  # not closed: the failure's traceback keeps it alive
    session.execute(select(Job)).all()
    assert False, "the test's own failure"
'''


def test_the_schema_fixture_tears_down_after_a_test_that_failed_holding_a_transaction(database_url, tmp_path):
    """A failed test's traceback (kept by pytest) holds its open Session, whose transaction
    holds a lock on the schema's jobs table: the fixture's DROP waited for it forever, and
    the test run hung in teardown instead of reporting the failure."""
    import os
    import subprocess
    import sys

    from .conftest import REPO_ROOT
    from .helpers import q

    (tmp_path / "conftest.py").write_text('pytest_plugins = ["sa_jobs.testing"]\n')
    (tmp_path / "test_left_open.py").write_text(FAILING_TEST)
    env = {**os.environ, "SA_JOBS_TEST_DATABASE_URL": database_url, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_left_open.py"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        from psycopg import sql

        q(database_url, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier((tmp_path / "schema.txt").read_text())))
        pytest.fail("the run hung in the schema fixture's teardown")
    assert proc.returncode == 1 and "1 failed in" in out and "at teardown" not in out, out
    schema = (tmp_path / "schema.txt").read_text()
    assert q(database_url, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(0,)]


APP_TABLE_TEST = '''
from sqlalchemy import text


def test_keeps_an_app_table_in_the_schema(sa_jobs_engine, sa_jobs_schema):
    with open("schema.txt", "w") as f:
        f.write(sa_jobs_schema)
    with sa_jobs_engine.begin() as conn:  # the test's own table beside the queue's, not dropped
        conn.execute(text(f'CREATE TABLE "{sa_jobs_schema}".orders (id int)'))
'''


def test_the_schema_fixture_drops_the_schema_with_the_tables_a_test_left_in_it(database_url, tmp_path):
    """The teardown dropped the queue's objects and then the schema only if it was empty:
    a test that created a table of its own in its schema left the schema behind, one
    more t_* schema in the test database per such test and run."""
    import os
    import subprocess
    import sys

    from .conftest import REPO_ROOT
    from .helpers import q

    (tmp_path / "conftest.py").write_text('pytest_plugins = ["sa_jobs.testing"]\n')
    (tmp_path / "test_app_table.py").write_text(APP_TABLE_TEST)
    env = {**os.environ, "SA_JOBS_TEST_DATABASE_URL": database_url, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_app_table.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    schema = (tmp_path / "schema.txt").read_text()
    left = q(database_url, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,))
    if left != [(0,)]:
        from psycopg import sql

        q(database_url, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    assert left == [(0,)], f"schema {schema} was left behind"


def test_nested_inline_blocks_of_two_engines_each_run_their_own_jobs(sa_jobs_engine, credits):
    """The outer block's after_commit took the session's enqueued mark before asking
    whether the session was its engine's, so the inner block's jobs never ran."""
    from sqlalchemy import create_engine

    other = create_engine(sa_jobs_engine.url).execution_options(**sa_jobs_engine.get_execution_options())
    try:
        with inline(sa_jobs_engine, kinds=[GrantCredit]), inline(other, kinds=[GrantCredit]):
            with Session(other) as session, session.begin():
                session.add(GrantCredit(account=1, amount=10))
            assert_ran(sa_jobs_engine, GrantCredit, [10])
            with Session(sa_jobs_engine) as session, session.begin():
                session.add(GrantCredit(account=2, amount=20))
            assert_ran(sa_jobs_engine, GrantCredit, [10, 20])
    finally:
        other.dispose()


def test_inline_and_drain_from_async_code_with_an_async_engine(sa_jobs_engine, credits):
    """An AsyncSession's commit under inline(async_engine) ran drain() inside the caller's
    event loop: the commit raised "Already running asyncio in this thread" (after committing),
    and drain() itself could not be called from an async test."""
    import anyio
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from sa_jobs._url import sqlalchemy_url

    async_engine = create_async_engine(sqlalchemy_url(sa_jobs_engine, async_=True)).execution_options(
        **sa_jobs_engine.get_execution_options())

    async def main() -> None:
        try:
            with inline(async_engine, kinds=[GrantCredit]):
                async with AsyncSession(async_engine) as session, session.begin():
                    session.add(GrantCredit(account=1, amount=10))
                assert_ran(sa_jobs_engine, GrantCredit, [10])
            async with AsyncSession(async_engine) as session, session.begin():
                session.add(GrantCredit(account=2, amount=20))
            assert drain(async_engine, kinds=[GrantCredit]) == {"completed": 2}
            assert_ran(sa_jobs_engine, GrantCredit, [10, 20])
        finally:
            await async_engine.dispose()

    anyio.run(main)


def test_drain_from_a_trio_test(sa_jobs_engine, credits):
    import trio

    with Session(sa_jobs_engine) as session, session.begin():
        session.add(GrantCredit(account=3, amount=30))

    async def main() -> dict[str, int]:
        return drain(sa_jobs_engine, kinds=[GrantCredit])

    assert trio.run(main) == {"completed": 1}


def test_drain_says_which_jobs_it_had_no_handler_for(sa_jobs_engine):
    """A job of a kind without a handler, in a queue the drain served, came back as a
    count, ``{"retryable": 1}``: the test saw neither the kind nor why it did not run."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add_all([NoHandler(), Double(x=1)])
    with pytest.raises(UnknownKindError, match=r"th_no_handler.*kinds=") as raised:
        drain(sa_jobs_engine, kinds=[Double])
    assert "th_double" not in str(raised.value).split("no handler")[1].split(";")[0]
    with Session(sa_jobs_engine) as session:  # as a worker left them: the attempt is spent
        assert {k: s for k, s in session.execute(select(Job.kind, Job.state))} == {"th_no_handler": "retryable", "th_double": "completed"}


def test_drain_returns_when_only_paused_queues_hold_jobs(sa_jobs_engine):
    """busy() counted a paused queue's jobs as due: no worker claims them, so drain() (and
    every commit under inline()) waited for its timeout and raised TimeoutError."""
    from sa_jobs import pause_queue

    with Session(sa_jobs_engine) as session, session.begin():
        pause_queue(session, "th")
        session.add(Double(x=1))
    assert drain(sa_jobs_engine, kinds=[Double], timeout=5) == {"available": 1}


_APP: dict[str, object] = {}


class Fanout(Job, kind="th_fanout", queue="th"):
    pass


@Fanout.handler
def fanout(ctx: JobContext, accounts: list[int]) -> int:
    # The app's own Session, as code shared with request handlers would do; the job is
    # still running when it commits.
    with Session(_APP["engine"]) as session, session.begin():
        session.add_all([GrantCredit(account=a, amount=a) for a in accounts])
    return len(accounts)


def test_inline_runs_the_jobs_a_handler_enqueues_without_a_drain_inside_the_drain(sa_jobs_engine, credits):
    """A handler's own commit of new jobs started a second drain() inside the first one's
    worker; it waited for the handler's job, still running, until its timeout, and the
    TimeoutError failed the handler (the test's commit raised it too)."""
    _APP["engine"] = sa_jobs_engine
    with inline(sa_jobs_engine, kinds=[Fanout, GrantCredit], timeout=5):
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(Fanout(accounts=[1, 2]))
    assert_ran(sa_jobs_engine, GrantCredit, [1, 2])
    with Session(sa_jobs_engine) as session:
        assert session.scalars(select(Fanout.result)).all() == [2]


def test_assert_enqueued_shows_the_waiting_jobs_and_compares_each_arg_whole(sa_jobs_engine):
    """The failure listed counts by kind only ({'th_grant_credit': 1}), not the args that
    differed; and jsonb containment let ``args={"accounts": [1]}`` match a job for
    accounts [1, 2, 3] (and [3, 1, 1] too): a wrong fan-out passed the test."""
    import datetime as dt

    with Session(sa_jobs_engine) as session, session.begin():
        session.add_all([GrantCredit(account=1, amount=5), Fanout(accounts=[1, 2, 3])])
    with Session(sa_jobs_engine) as session:
        with pytest.raises(AssertionError, match=r"th_grant_credit\(\{.*'account': 1"):
            assert_enqueued(session, GrantCredit, args={"account": 2})
        refute_enqueued(session, Fanout, args={"accounts": [1]})
        refute_enqueued(session, Fanout, args={"accounts": [3, 1, 1]})
        assert_enqueued(session, Fanout, args={"accounts": [1, 2, 3]}, count=1)
        assert_enqueued(session, GrantCredit, args={"account": 1}, count=1)  # other keys: any value
        with pytest.raises(InvalidArgsError, match="datetime"):  # as Job() would: args are plain JSON
            assert_enqueued(session, GrantCredit, args={"at": dt.datetime.now(dt.timezone.utc)})


_SEEN: list[object] = []


class Appends(Job, kind="th_appends", queue="th"):
    pass


@Appends.handler
def appends(ctx: JobContext, accounts: list[int]) -> list[int]:
    _SEEN.append(accounts)
    return accounts + [4]


def test_perform_passes_args_as_a_worker_does(sa_jobs_engine):
    """A worker's handler gets the args back from jsonb (a tuple is a list); perform()
    passed the objects given to the job, so ``accounts + [4]`` passed perform() and
    failed in every worker."""
    assert perform(Appends(accounts=(1, 2, 3))) == [1, 2, 3, 4]
    job = Appends(accounts=[1])
    perform(job)
    assert _SEEN[-1] is not job.args["accounts"]


@pytest.mark.parametrize("change", ["nan", "set", "int-key", "over-the-cap"])
def test_perform_refuses_args_changed_in_place_as_the_flush_does(sa_jobs_engine, change):
    """perform() passed a job's args through json.dumps() unchecked: changed in place
    after construction, a NaN reached the handler (no worker ever sees one: the flush
    refuses the job), an int key came in as the string "1", a set failed with a bare
    TypeError, and args over the kind's cap ran. Checked as a flush checks them."""
    job = Appends(accounts=[1])
    if change == "nan":
        job.args["accounts"].append(float("nan"))
    elif change == "set":
        job.args["accounts"] = {1}
    elif change == "int-key":
        job.args[1] = 2
    else:
        job.args["accounts"] = [1e308] * 1000  # 7 KB as Python writes it, 310 KB as jsonb does
    _SEEN.clear()
    with pytest.raises(InvalidArgsError):
        perform(job)
    assert _SEEN == []
    with pytest.raises(InvalidArgsError):  # what enqueueing it does
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(job)


@pytest.mark.parametrize("mode", ["create_savepoint", "conditional_savepoint"])
def test_inline_says_so_when_a_commit_left_an_outer_transaction_open(sa_jobs_engine, mode):
    """The common "each test in one rolled-back transaction" setup binds the Session to a
    Connection already in a transaction: the app's commit commits nothing, the worker
    cannot see the jobs, and inline() silently ran none of them."""
    with sa_jobs_engine.connect() as conn:
        outer = conn.begin()
        with inline(sa_jobs_engine, kinds=[Double], timeout=5):
            session = Session(bind=conn, join_transaction_mode=mode)
            session.add(Double(x=1))
            with pytest.raises(ConfigurationError, match="outer transaction.*perform"):
                session.commit()
            session.close()
            with Session(bind=conn, join_transaction_mode=mode) as session:
                session.add(Double(x=2))
                session.flush()
                session.rollback()  # no jobs committed: nothing to say
                session.commit()
        if outer.is_active:  # rollback_only (conditional_savepoint here) rolled it back already
            outer.rollback()


def test_drain_with_scheduled_leaves_other_queues_schedules_alone(sa_jobs_engine):
    """with_scheduled=True made every scheduled job of the table due, also those of queues
    the drain does not serve: a test's later look at another kind's delayed job found it
    due now, not in an hour."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add_all([Double(x=1).options(delay=3600), Elsewhere().options(delay=3600)])
    assert drain(sa_jobs_engine, kinds=[Double], with_scheduled=True) == {"completed": 1, "scheduled": 1}
    with Session(sa_jobs_engine) as session:
        later = session.scalar(select(Elsewhere.scheduled_at - Elsewhere.created_at))
    assert later.total_seconds() > 3000


class CompletesInTx(Job, kind="th_completes_in_tx", queue="th"):
    pass


@CompletesInTx.handler
def completes_in_tx(ctx: JobContext, account: int) -> None:
    with ctx.transaction(result={"granted": account}) as session:
        session.add(Credit(account=account, amount=1))


def test_perform_returns_the_result_a_transaction_completed_the_job_with(sa_jobs_engine, credits):
    """A worker stores ``ctx.transaction(result=...)`` as the job's result (the handler's
    return value is not stored); perform() returned the handler's None."""
    assert perform(CompletesInTx(account=7), engine=sa_jobs_engine) == {"granted": 7}
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(CompletesInTx(account=8))
    drain(sa_jobs_engine, kinds=[CompletesInTx])
    with Session(sa_jobs_engine) as session:
        assert session.scalars(select(CompletesInTx.result)).all() == [{"granted": 8}]


def test_perform_of_an_async_handler_from_async_code_says_to_await_perform_async():
    """anyio.run() inside the test's event loop failed with "Already running asyncio in
    this thread", which named neither perform() nor what to call instead."""
    import anyio

    from sa_jobs.testing import perform_async

    async def main() -> int:
        with pytest.raises(ConfigurationError, match="perform_async"):
            perform(Double(x=2))
        return await perform_async(Double(x=2))

    assert anyio.run(main) == 4


def test_drain_returns_when_a_rate_limited_queue_must_wait_past_its_lookahead(sa_jobs_engine):
    """As a paused queue's: the second job of a queue limited to one a week cannot be
    claimed before the next window (none ends during the test), and drain() polled for
    it until its TimeoutError."""
    import datetime as dt

    from sa_jobs import QueueLimits, set_queue_limits

    with Session(sa_jobs_engine) as session, session.begin():
        set_queue_limits(session, "th", QueueLimits(rate=(1, dt.timedelta(days=7))))
        session.add_all([Double(x=1), Double(x=2)])
    assert drain(sa_jobs_engine, kinds=[Double], timeout=5) == {"completed": 1, "available": 1}


def test_drain_returns_when_a_rate_limit_lengthened_mid_window_holds_the_queue(sa_jobs_engine):
    """A rate of 1/1s made 1/7d: the claim counts the 1-s window's claim against the week
    (the row's window is later than the week's start: schema v11 counts a row whose window
    is the same or later), so the second job waits for the next week. drain() took the queue
    as held only when the row's window was exactly the week's, and polled for that job
    until its TimeoutError."""
    import datetime as dt

    from sa_jobs import QueueLimits, set_queue_limits

    with Session(sa_jobs_engine) as session, session.begin():
        set_queue_limits(session, "th", QueueLimits(rate=(1, dt.timedelta(seconds=1))))
        session.add(Double(x=1))
    assert drain(sa_jobs_engine, kinds=[Double], timeout=5) == {"completed": 1}
    with Session(sa_jobs_engine) as session, session.begin():
        set_queue_limits(session, "th", QueueLimits(rate=(1, dt.timedelta(days=7))))
        session.add(Double(x=2))
    assert drain(sa_jobs_engine, kinds=[Double], timeout=5) == {"completed": 1, "available": 1}


# ---- the test engine's own options, behind both transactions ----------------------------

class _AppBase(DeclarativeBase):
    pass


class AppCredit(_AppBase):
    """A table of the app's own schema, which tests map elsewhere (schema_translate_map)."""

    __tablename__ = "testing_app_credits"
    __table_args__ = {"schema": "th_app"}
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    amount: Mapped[int] = mapped_column(Integer)


class AppGrantAsync(Job, kind="th_app_grant_async", queue="th_app", max_attempts=1):
    pass


@AppGrantAsync.handler
async def app_grant_async(ctx: JobContext, amount: int) -> None:
    async with ctx.async_transaction() as session:
        session.add(AppCredit(amount=amount))


class AppGrantSync(Job, kind="th_app_grant_sync", queue="th_app", max_attempts=1):
    pass


@AppGrantSync.handler
def app_grant_sync(ctx: JobContext, amount: int) -> None:
    with ctx.transaction() as session:
        session.add(AppCredit(amount=amount))


@pytest.fixture
def app_engine(sa_jobs_engine, sa_jobs_schema):
    """The test engine mapping the app's schema too, with the app's table in it."""
    engine = sa_jobs_engine.execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema, "th_app": sa_jobs_schema})
    _AppBase.metadata.create_all(engine)
    yield engine
    _AppBase.metadata.drop_all(engine)


def app_credits(engine) -> list[int]:
    with Session(engine) as session:
        return sorted(session.scalars(select(AppCredit.amount)))


def test_drain_runs_ctx_async_transaction_on_the_engines_schema_map(app_engine):
    """drain(engine) handed ``engine`` to ctx.transaction(), but ctx.async_transaction()
    ran on an engine made from the URL mapping only sa_jobs: an async handler's write to
    the app's table went to the unmapped schema (relation "th_app..." does not exist,
    or the real schema's table), and the job failed where its sync twin completed."""
    with Session(app_engine) as session, session.begin():
        session.add_all([AppGrantSync(amount=1), AppGrantAsync(amount=2)])
    assert drain(app_engine, kinds=[AppGrantSync, AppGrantAsync]) == {"completed": 2}
    assert app_credits(app_engine) == [1, 2]


def test_perform_with_an_async_engine_runs_both_transactions(app_engine):
    """perform(job, engine=an AsyncEngine) (an async app's tests have only that one):
    a sync handler's ctx.transaction() opened a Session on it and failed with SQLAlchemy's
    AsyncContextNotStarted and a never-awaited coroutine. Both transactions now run on
    its database, with its schema map; ctx.async_transaction() under trio (whose event
    loop no AsyncEngine runs on) is a ConfigurationError, not psycopg's "no running event
    loop"."""
    import anyio
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs._url import sqlalchemy_url
    from sa_jobs.testing import perform_async

    def async_app():  # type: ignore[no-untyped-def]
        return create_async_engine(sqlalchemy_url(app_engine, async_=True)).execution_options(
            **app_engine.get_execution_options())

    engine = async_app()
    assert perform(AppGrantSync(amount=1), engine=engine) is None
    assert perform(AppGrantAsync(amount=2), engine=engine) is None

    async def main() -> None:
        engine = async_app()
        try:
            assert await perform_async(AppGrantSync(amount=3), engine=engine) is None
            assert await perform_async(AppGrantAsync(amount=4), engine=engine) is None
        finally:
            await engine.dispose()

    anyio.run(main)
    assert app_credits(app_engine) == [1, 2, 3, 4]

    pytest.importorskip("trio")

    async def under_trio() -> None:
        with pytest.raises(ConfigurationError, match="ctx.async_transaction.*asyncio.*not trio"):
            await perform_async(AppGrantAsync(amount=5), engine=app_engine)

    anyio.run(under_trio, backend="trio")
    assert app_credits(app_engine) == [1, 2, 3, 4]


# ---- the test engine's connect_args, kept by every engine the helpers make from it --------

class SeeMarkerSync(Job, kind="th_marker_sync", queue="th_marker", max_attempts=1):
    pass


# What each handler's session saw (drain() runs the worker in this process).
SEEN_MARKERS: dict[str, object] = {}


@SeeMarkerSync.handler
def see_marker_sync(ctx: JobContext) -> None:
    from sqlalchemy import text

    with ctx.transaction() as session:
        SEEN_MARKERS["sync"] = session.scalar(text("SELECT current_setting('th.marker', true)"))


class SeeMarkerAsync(Job, kind="th_marker_async", queue="th_marker", max_attempts=1):
    pass


@SeeMarkerAsync.handler
async def see_marker_async(ctx: JobContext) -> None:
    from sqlalchemy import text

    async with ctx.async_transaction() as session:
        SEEN_MARKERS["async"] = await session.scalar(text("SELECT current_setting('th.marker', true)"))


MARKER_ARGS = {"options": "-c th.marker=kept"}


def _drain_sees_the_marker(job_engine, drain_engine) -> None:  # type: ignore[no-untyped-def]
    """Enqueue one sync and one async marker job through ``job_engine``, drain them through
    ``drain_engine``: both handlers saw the session setting ``th.marker = 'kept'``."""
    with Session(job_engine) as session, session.begin():
        session.add_all([SeeMarkerSync(), SeeMarkerAsync()])
    SEEN_MARKERS.clear()
    assert drain(drain_engine, kinds=[SeeMarkerSync, SeeMarkerAsync]) == {"completed": 2}
    assert SEEN_MARKERS == {"sync": "kept", "async": "kept"}


def test_drain_keeps_the_engines_connect_args(sa_jobs_database_url, sa_jobs_schema):
    """drain() made ctx.async_transaction()'s engine from ``engine.url`` alone: the engine's
    ``connect_args`` (a search_path or role in ``options``, sslmode, connect_timeout, a
    password given there) were gone, and an async handler ran on another session setup."""
    from sqlalchemy import create_engine

    from sa_jobs._url import sqlalchemy_url

    engine = create_engine(sqlalchemy_url(sa_jobs_database_url), connect_args=MARKER_ARGS).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    try:
        _drain_sees_the_marker(engine, engine)
    finally:
        engine.dispose()


def test_drain_of_an_async_engine_keeps_its_connect_args(sa_jobs_database_url, sa_jobs_schema):
    """drain(async_engine) runs on a plain twin of it, made from its URL alone."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs._url import sqlalchemy_url

    async_engine = create_async_engine(sqlalchemy_url(sa_jobs_database_url, async_=True),
                                       connect_args=MARKER_ARGS).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    plain = create_engine(sqlalchemy_url(sa_jobs_database_url)).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    try:
        _drain_sees_the_marker(plain, async_engine)
    finally:
        plain.dispose()


def test_raw_connections_from_an_engine_keep_its_connect_args(sa_jobs_database_url):
    """install(engine), Worker(engine)'s own connections and drain()'s worker connect with
    psycopg from the engine's conninfo: its libpq connect_args belong in it, its driver-only
    ones (autocommit, prepare_threshold) do not."""
    import psycopg
    from sqlalchemy import create_engine

    from sa_jobs._url import sqlalchemy_url, to_conninfo

    engine = create_engine(sqlalchemy_url(sa_jobs_database_url),
                           connect_args={**MARKER_ARGS, "connect_timeout": 7, "prepare_threshold": None})
    with psycopg.connect(to_conninfo(engine), autocommit=True) as conn:
        assert conn.execute("SELECT current_setting('th.marker', true)").fetchone() == ("kept",)
        assert conn.info.get_parameters()["connect_timeout"] == "7"
    engine.dispose()


def test_drains_worker_connects_where_the_engine_does(sa_jobs_database_url, sa_jobs_schema):
    """drain() gave its worker ``engine.url`` as text: the worker's own connections (claims,
    completions, heartbeats) went where the URL alone points. An app whose engine names its
    database in ``connect_args`` (a placeholder URL filled from a secrets store) had its
    drain() connect elsewhere, and fail."""
    from sqlalchemy import create_engine, make_url

    from sa_jobs._url import sqlalchemy_url

    url = make_url(sqlalchemy_url(sa_jobs_database_url))
    engine = create_engine(url.set(database="th_no_such_database"),
                           connect_args={"dbname": url.database, **MARKER_ARGS}).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    try:
        with Session(engine) as session, session.begin():
            session.add_all([SeeMarkerSync(), SeeMarkerAsync()])
        SEEN_MARKERS.clear()
        assert drain(engine, kinds=[SeeMarkerSync, SeeMarkerAsync], timeout=10) == {"completed": 2}
        assert SEEN_MARKERS == {"sync": "kept", "async": "kept"}
    finally:
        engine.dispose()


# ---- the test engine's creator and event listeners, kept by its twins (hunt18twins) ------


def _marker_event(engine, event_name: str) -> None:
    """A listener setting ``th.marker`` on each new connection of ``engine``, as an app's
    does (a role, a search_path): on the connection ("connect") or in its parameters
    ("do_connect", which SQLAlchemy recommends over a creator)."""
    from sqlalchemy import event

    target = getattr(engine, "sync_engine", engine)
    if event_name == "connect":
        def on_connect(dbapi_connection, connection_record):  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("SET th.marker = 'kept'")
            cursor.close()
            # Committed, as SQLAlchemy's docs have it: else the SET is in the transaction
            # the pool's reset (or the dialect's first-connect rollback) rolls back, and
            # whether a handler saw it hung on which connection of the pool it was given.
            dbapi_connection.commit()
        event.listen(target, "connect", on_connect)
    else:
        def on_do_connect(dialect, conn_rec, cargs, cparams):  # type: ignore[no-untyped-def]
            cparams["options"] = "-c th.marker=kept"
        event.listen(target, "do_connect", on_do_connect)


@pytest.mark.parametrize("event_name", ["connect", "do_connect"])
def test_drain_keeps_the_engines_connect_events(sa_jobs_database_url, sa_jobs_schema, event_name):
    """drain()'s engine for ctx.async_transaction() was made from the engine's URL and
    connect_args only: a listener the app set up each connection with (SET ROLE, a
    search_path, a GUC) did not run there, and an async handler ran as someone else."""
    from sqlalchemy import create_engine

    from sa_jobs._url import sqlalchemy_url

    base = create_engine(sqlalchemy_url(sa_jobs_database_url))
    engine = base.execution_options(schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    _marker_event(engine, event_name)
    try:
        _drain_sees_the_marker(engine, engine)
    finally:
        base.dispose()


@pytest.mark.parametrize("event_name", ["connect", "do_connect"])
def test_drain_of_an_async_engine_keeps_its_connect_events(sa_jobs_database_url, sa_jobs_schema, event_name):
    """drain(async_engine)'s plain twin, and the async twin made from that, lost them too."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs._url import sqlalchemy_url

    async_engine = create_async_engine(sqlalchemy_url(sa_jobs_database_url, async_=True)).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    _marker_event(async_engine, event_name)
    job_engine = _plain_engine(sa_jobs_database_url, sa_jobs_schema)
    try:
        _drain_sees_the_marker(job_engine, async_engine)
    finally:
        job_engine.dispose()


def _plain_engine(database_url: str, schema: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    from sa_jobs._url import sqlalchemy_url

    return create_engine(sqlalchemy_url(database_url)).execution_options(schema_translate_map={DEFAULT_SCHEMA: schema})


def test_perform_with_an_async_creator_keeps_it(sa_jobs_database_url, sa_jobs_schema):
    """perform(job, engine=an AsyncEngine made with ``async_creator=``): the AsyncEngine
    ctx.async_transaction() runs on was made from the URL alone, so the creator's
    connection setup was skipped; a sync handler's plain twin cannot call an async
    creator, and now says so instead of connecting some other way."""
    import psycopg
    from sqlalchemy.ext.asyncio import create_async_engine

    from sa_jobs._url import sqlalchemy_url, to_conninfo

    conninfo = to_conninfo(sa_jobs_database_url)

    async def async_creator():  # type: ignore[no-untyped-def]
        return await psycopg.AsyncConnection.connect(conninfo, options="-c th.marker=kept")

    engine = create_async_engine(sqlalchemy_url(sa_jobs_database_url, async_=True),
                                 async_creator=async_creator).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    SEEN_MARKERS.clear()
    assert perform(SeeMarkerAsync(), engine=engine) is None
    assert SEEN_MARKERS == {"async": "kept"}
    with pytest.raises(ConfigurationError, match="creator.*do_connect"):
        perform(SeeMarkerSync(), engine=engine)
    assert "sync" not in SEEN_MARKERS


def test_perform_with_a_creator_an_async_twin_cannot_use(sa_jobs_database_url, sa_jobs_schema):
    """perform(async handler, engine=an Engine made with ``creator=``): its async twin was
    made from the URL and ran the handler's transaction on a connection the creator never
    set up. A sync creator gives no async connection: a ConfigurationError now says so,
    and the sync handler runs on the engine itself, creator and all."""
    import psycopg
    from sqlalchemy import create_engine

    from sa_jobs._url import sqlalchemy_url, to_conninfo

    conninfo = to_conninfo(sa_jobs_database_url)
    engine = create_engine(sqlalchemy_url(sa_jobs_database_url),
                           creator=lambda: psycopg.connect(conninfo, options="-c th.marker=kept")).execution_options(
        schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema})
    try:
        SEEN_MARKERS.clear()
        assert perform(SeeMarkerSync(), engine=engine) is None
        with pytest.raises(ConfigurationError, match="creator.*do_connect"):
            perform(SeeMarkerAsync(), engine=engine)
        assert SEEN_MARKERS == {"sync": "kept"}
    finally:
        engine.dispose()


def test_worker_of_an_engine_keeps_its_connect_args_and_events(sa_jobs_database_url, sa_jobs_schema):
    """Worker(engine) without ``engine=``: the engines behind ctx.transaction() and
    ctx.async_transaction() were made from ``engine.url`` alone, without its connect_args
    or listeners (its own psycopg connections keep the connect_args, see above)."""
    from sqlalchemy import create_engine

    from .helpers import run_worker_until

    url = make_url_of(sa_jobs_database_url)
    engine = create_engine(url.set(database="th_no_such_database"), connect_args={"dbname": url.database})
    _marker_event(engine, "connect")
    job_engine = _plain_engine(sa_jobs_database_url, sa_jobs_schema)
    try:
        with Session(job_engine) as session, session.begin():
            session.add_all([SeeMarkerSync(), SeeMarkerAsync()])
        SEEN_MARKERS.clear()
        run_worker_until(engine, sa_jobs_schema, [SeeMarkerSync, SeeMarkerAsync], lambda: len(SEEN_MARKERS) == 2,
                         timeout=15)
        assert SEEN_MARKERS == {"sync": "kept", "async": "kept"}
    finally:
        job_engine.dispose()
        engine.dispose()


def test_worker_of_an_autocommit_engine_still_runs_transactions(sa_jobs_database_url, sa_jobs_schema):
    """Worker(engine) of an app engine made with ``isolation_level="AUTOCOMMIT"`` (its own
    reads), no ``engine=``: the engines behind ctx.transaction() and ctx.async_transaction()
    took that level with the engine's other settings, and every attempt failed with
    ConfigurationError (a connection in autocommit mode), where they ran before."""
    from sqlalchemy import create_engine

    from .helpers import run_worker_until, states

    engine = create_engine(make_url_of(sa_jobs_database_url), isolation_level="AUTOCOMMIT")
    job_engine = _plain_engine(sa_jobs_database_url, sa_jobs_schema)
    try:
        with Session(job_engine) as session, session.begin():
            session.add_all([SeeMarkerSync(), SeeMarkerAsync()])
        SEEN_MARKERS.clear()
        run_worker_until(engine, sa_jobs_schema, [SeeMarkerSync, SeeMarkerAsync],
                         lambda: states(sa_jobs_database_url, sa_jobs_schema).get("completed") == 2
                         or "dead" in states(sa_jobs_database_url, sa_jobs_schema), timeout=15)
        assert states(sa_jobs_database_url, sa_jobs_schema) == {"completed": 2}
    finally:
        job_engine.dispose()
        engine.dispose()


def test_twin_engine_connects_as_its_engine(sa_jobs_database_url):
    """twin_engine() keeps what an engine's connections are set up with beyond its URL: its
    isolation level, listeners set on it or on an option engine of it (``named=True``,
    ``retval=True`` ones too, each once), and none of SQLAlchemy's own per-dialect ones."""
    import anyio
    from sqlalchemy import create_engine, event, text

    from sa_jobs._url import sqlalchemy_url, twin_engine

    base = create_engine(sqlalchemy_url(sa_jobs_database_url), isolation_level="REPEATABLE READ")
    engine = base.execution_options(schema_translate_map={DEFAULT_SCHEMA: "elsewhere"})
    calls: list[str] = []

    @event.listens_for(engine, "connect", named=True)
    def named_connect(**kw):  # type: ignore[no-untyped-def]
        calls.append("connect")

    @event.listens_for(engine, "before_cursor_execute", retval=True)
    def rewrite(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        return statement.replace("41", "42"), parameters

    @event.listens_for(base, "before_cursor_execute")
    def seen(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        calls.append("execute")

    fresh = create_engine(sqlalchemy_url(sa_jobs_database_url), isolation_level="REPEATABLE READ")
    plain = twin_engine(engine)
    assert len(list(plain.pool.dispatch.connect)) == len(list(fresh.pool.dispatch.connect)) + 1
    with plain.connect() as conn:
        assert conn.scalar(text("SELECT 41")) == 42
        assert conn.scalar(text("SHOW transaction_isolation")) == "repeatable read"
    assert calls == ["connect", "execute", "execute"]

    async def on_async_twin() -> tuple[object, object]:
        twin = twin_engine(engine, async_=True)
        try:
            async with twin.connect() as conn:
                return await conn.scalar(text("SELECT 41")), await conn.scalar(text("SHOW transaction_isolation"))
        finally:
            await twin.dispose()

    assert anyio.run(on_async_twin) == (42, "repeatable read")
    assert calls == ["connect", "execute", "execute"] * 2
    for made in (plain, fresh, base):
        made.dispose()


def test_a_twin_fires_a_once_listener_once_for_itself_and_leaves_the_engines_own(sa_jobs_database_url):
    """A ``once=True`` listener was copied to a twin as SQLAlchemy stores it, a wrapper
    holding one "fired" flag: the twin's first connect used it up, and the app's own engine
    (a Worker(engine)'s twin connected first) never ran it, nor did later twins. Each engine
    now runs it once, as if it had been set on that engine; retval-wrapped and
    ``_once_unless_exception`` ones too."""
    import anyio
    from sqlalchemy import create_engine, event, text

    from sa_jobs._url import sqlalchemy_url, twin_engine

    engine = create_engine(sqlalchemy_url(sa_jobs_database_url))
    calls: list[str] = []
    event.listen(engine, "connect", lambda dbapi_conn, record: calls.append("connect"), once=True)
    event.listen(engine, "before_cursor_execute", lambda *args: calls.append("execute"), once=True)
    event.listen(engine, "connect", lambda dbapi_conn, record: calls.append("flaky"), _once_unless_exception=True)
    engines = [twin_engine(engine), engine, twin_engine(engine)]
    for made in engines:
        for _ in range(2):
            with made.connect() as conn:
                conn.scalar(text("SELECT 1"))
            made.dispose()  # a new connection next time: "connect" may fire again
    assert calls == ["connect", "flaky", "execute"] * 3, calls

    async def on_async_twin() -> None:
        twin = twin_engine(engine, async_=True)
        try:
            for _ in range(2):
                async with twin.connect() as conn:
                    await conn.scalar(text("SELECT 1"))
                await twin.dispose()
        finally:
            await twin.dispose()

    anyio.run(on_async_twin)
    assert calls == ["connect", "flaky", "execute"] * 4, calls
    for made in engines:
        made.dispose()


def test_a_twin_of_an_engine_whose_listeners_cannot_be_read_connects_and_says_so(
        sa_jobs_database_url, monkeypatch, caplog):
    """Listing an engine's listeners reads SQLAlchemy's event registry (there is no public
    call for it): a release that reshapes it costs the twin the listeners, with a warning,
    not every twin (drain, perform, ctx.transaction of Worker(engine))."""
    from sqlalchemy import create_engine, event, text

    from sa_jobs import _url

    engine = create_engine(_url.sqlalchemy_url(sa_jobs_database_url))
    event.listen(engine, "connect", lambda dbapi_conn, record: None)

    def reshaped(dispatch):  # type: ignore[no-untyped-def]
        raise AttributeError("'_Dispatch' object has no attribute '_event_names'")

    monkeypatch.setattr(_url, "_own_listeners", reshaped)
    with caplog.at_level("WARNING", logger="sa_jobs"):
        twin = _url.twin_engine(engine)
    with twin.connect() as conn:
        assert conn.scalar(text("SELECT 1")) == 1
    assert "could not be read" in caplog.text and "_event_names" in caplog.text
    for made in (twin, engine):
        made.dispose()


def make_url_of(database_url: str):  # type: ignore[no-untyped-def]
    from sqlalchemy import make_url

    from sa_jobs._url import sqlalchemy_url

    return make_url(sqlalchemy_url(database_url))


# ---- a user's everyday calls (hunt17testing) ---------------------------------------------


def test_perform_of_a_job_enqueued_in_a_closed_session(sa_jobs_engine):
    """``session.add(job)``, commit, close, ``perform(job)``: the commit expired the job and
    closing detached it, so perform() failed reading its args with SQLAlchemy's
    DetachedInstanceError. With ``engine=`` it now loads the stored job (its own queue too);
    without, a ConfigurationError says so."""
    job = Appends(accounts=[1, 2]).options(queue="th_other")
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(job)
    assert perform(job, engine=sa_jobs_engine) == [1, 2, 4]
    with pytest.raises(ConfigurationError, match="detached.*engine="):
        perform(job)
    with Session(sa_jobs_engine) as session, session.begin():
        session.execute(Job.__table__.delete())
    with pytest.raises(ConfigurationError, match="no longer stored"):
        perform(job, engine=sa_jobs_engine)


class Queue(Job, kind="th_queue_of", queue="th"):
    pass


@Queue.handler
def queue_of(ctx: JobContext) -> str:
    return ctx.queue


def test_perform_of_a_stored_job_sees_its_stored_queue(sa_jobs_engine):
    job = Queue().options(queue="th_other")
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(job)
    with Session(sa_jobs_engine) as session:
        stored = session.scalars(select(Queue)).one()
        session.expire(stored)  # as after a commit, with the session still open
        assert perform(stored) == "th_other"
    assert perform(job, engine=sa_jobs_engine) == "th_other"


def test_the_enqueued_helpers_take_a_kind_name(sa_jobs_engine):
    """River's and Oban's users name the kind: ``assert_enqueued(session, "th_double")``
    failed with SQLAlchemy's "Textual column expression 'th_double' should be explicitly
    declared with text()"; anything else that is not a kind is a ConfigurationError."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add_all([Double(x=1), GrantCredit(account=1, amount=1)])
    with Session(sa_jobs_engine) as session:
        assert [j.args for j in assert_enqueued(session, "th_double", args={"x": 1}, count=1)] == [{"x": 1}]
        refute_enqueued(session, "th_double", args={"x": 2})
        assert [j.kind for j in enqueued(session, "th_grant_credit")] == ["th_grant_credit"]
        with pytest.raises(AssertionError, match=r"(?s)expected th_nothing\(.*th_double\(\{'x': 1\}"):
            assert_enqueued(session, "th_nothing")
        for wrong in (Double(x=1), 42, Session):
            with pytest.raises(ConfigurationError, match="kind"):
                enqueued(session, wrong)  # type: ignore[arg-type]


def test_inline_refuses_an_unknown_drain_option_when_the_block_starts(sa_jobs_engine):
    """``inline(engine, kind=[...])`` (for kinds=) was accepted and raised TypeError from
    drain() at the first commit, after that commit had written the test's data."""
    with pytest.raises(ConfigurationError, match="kind.*kinds"):
        with inline(sa_jobs_engine, kind=[Double]):
            with Session(sa_jobs_engine) as session, session.begin():
                session.add(Double(x=1))
    with Session(sa_jobs_engine) as session:
        refute_enqueued(session)


class ReturnsTuples(Job, kind="th_returns_tuples", queue="th"):
    pass


@ReturnsTuples.handler
def returns_tuples(ctx: JobContext, in_tx: bool) -> object:
    result = {"pair": (1, 2), "big": 1e16, "ratio": 0.5}
    if in_tx:
        with ctx.transaction(result=result):
            pass
    return result


@pytest.mark.parametrize("in_tx", [False, True])
def test_perform_returns_the_result_as_a_worker_stores_it(sa_jobs_engine, in_tx):
    """A worker stores the result as jsonb and reads it back with a list for a tuple, an
    int for 1e16; perform() returned the handler's objects, so
    ``perform(job) == {"pair": (1, 2), ...}`` passed where the stored result differs."""
    expected = {"pair": [1, 2], "big": 10000000000000000, "ratio": 0.5}
    returned = perform(ReturnsTuples(in_tx=in_tx), engine=sa_jobs_engine)
    assert returned == expected and isinstance(returned["big"], int)
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(ReturnsTuples(in_tx=in_tx))
    drain(sa_jobs_engine, kinds=[ReturnsTuples])
    with Session(sa_jobs_engine) as session:
        assert session.scalars(select(ReturnsTuples.result)).all() == [expected]


def test_inline_leaves_a_failing_job_as_a_worker_does_and_delayed_jobs_scheduled(sa_jobs_engine, credits):
    """What docs/core.md says of inline(): a handler's failure raises nothing in the test,
    its attempts are spent as a worker spends them (a 10 ms backoff is within the drain's
    lookahead); a delayed job waits unless the block has with_scheduled=True."""
    with inline(sa_jobs_engine, kinds=[GrantCredit]):
        with Session(sa_jobs_engine) as session, session.begin():
            session.add_all([GrantCredit(account=1, amount=-1), GrantCredit(account=2, amount=20).options(delay=3600)])
        with Session(sa_jobs_engine) as session:
            failed = session.scalars(select(GrantCredit).where(GrantCredit.state == "dead")).one()
            assert (failed.attempt, [e["error"] for e in failed.errors]) == (2, ["ValueError: negative credit"] * 2)
            assert_enqueued(session, GrantCredit, args={"account": 2}, count=1)
    with inline(sa_jobs_engine, kinds=[GrantCredit], with_scheduled=True):
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(GrantCredit(account=3, amount=30).options(delay=3600))
    assert_ran(sa_jobs_engine, GrantCredit, [20, 30])


def test_drain_and_perform_refuse_bad_arguments_before_running_anything(sa_jobs_engine):
    """``drain(engine, kinds=Double)`` (a kind, not a list) failed with "'DeclarativeAttributeIntercept'
    object is not iterable", ``drain(timeout="5")`` with a TypeError from inside the started
    worker, and ``perform(job, attempt=0)`` (or "2") handed the handler that attempt."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(Double(x=1))
    for kinds, example in ((Double, "Double"), ("th_double", "SendEmail")):
        with pytest.raises(ConfigurationError, match=rf"kinds is a list.*kinds=\[{example}\]"):
            drain(sa_jobs_engine, kinds=kinds)  # type: ignore[arg-type]
    for timeout in ("5", None, True):
        with pytest.raises(ConfigurationError, match="timeout"):
            drain(sa_jobs_engine, kinds=[Double], timeout=timeout)  # type: ignore[arg-type]
    with Session(sa_jobs_engine) as session:
        assert_enqueued(session, Double, count=1)  # nothing ran
    for attempt in (0, -1, "2", 2.0, True):
        with pytest.raises(ConfigurationError, match="attempt"):
            perform(Double(x=1), attempt=attempt)  # type: ignore[arg-type]
    assert perform(Double(x=1), attempt=3) == 2


def test_inline_runs_jobs_written_by_bulk_save_objects(sa_jobs_engine, credits):
    """``session.bulk_save_objects([...])`` writes new jobs (docs/core.md: as add_all does)
    past the unit of work and runs no flush event: inline() saw no job in that commit and
    silently ran none of them."""
    with inline(sa_jobs_engine, kinds=[GrantCredit]):
        with Session(sa_jobs_engine) as session, session.begin():
            session.bulk_save_objects([GrantCredit(account=1, amount=10), GrantCredit(account=2, amount=20)])
    assert_ran(sa_jobs_engine, GrantCredit, [10, 20])


def test_refute_enqueued_says_what_it_refuted_and_assert_enqueued_checks_count(sa_jobs_engine):
    """refute_enqueued()'s failure said "expected no such job" without naming the kind or
    args refuted; ``assert_enqueued(count="1")`` failed saying "expected 1 ×, found 1"."""
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(Double(x=1))
    with Session(sa_jobs_engine) as session:
        with pytest.raises(AssertionError, match=r"(?s)expected no Double\(args ⊇ \{'x': 1\}, queue=None\).*th_double\(\{'x': 1\}"):
            refute_enqueued(session, Double, args={"x": 1})
        for count in ("1", -1, True, 1.0):
            with pytest.raises(ConfigurationError, match="count"):
                assert_enqueued(session, Double, count=count)  # type: ignore[arg-type]
        assert_enqueued(session, Double, count=1)


class GrantInBatches(Job, kind="th_grant_in_batches", queue="th", max_attempts=1):
    pass


@GrantInBatches.handler
def grant_in_batches(ctx: JobContext, amounts: list[int]) -> None:
    for amount in amounts:  # a transaction per batch: only the first can complete the job
        with ctx.transaction() as session:
            session.add(Credit(account=1, amount=amount))


class GrantInBatchesAsync(Job, kind="th_grant_in_batches_async", queue="th", max_attempts=1):
    pass


@GrantInBatchesAsync.handler
async def grant_in_batches_async(ctx: JobContext, amounts: list[int]) -> None:
    for amount in amounts:
        async with ctx.async_transaction() as session:
            session.add(Credit(account=1, amount=amount))


@pytest.mark.parametrize("kind", [GrantInBatches, GrantInBatchesAsync])
def test_a_second_completing_transaction_fails_in_perform_as_in_a_worker(sa_jobs_engine, credits, kind):
    """The first ctx.transaction() completes the job; a worker's second one found the row no
    longer running and rolled its effects back (LeaseLostError, "lease lost", raised into a
    job already completed, so nothing showed). perform() committed both, and a batching
    handler passed its unit test while a worker dropped every batch after the first. Both
    now refuse it before the block runs, naming the cause."""
    with pytest.raises(ConfigurationError, match="already completed.*ctx.transaction"):
        perform(kind(amounts=[1, 2]), engine=sa_jobs_engine)
    with Session(sa_jobs_engine) as session, session.begin():
        session.add(kind(amounts=[10, 20]))
    assert drain(sa_jobs_engine, kinds=[kind]) == {"completed": 1}
    with Session(sa_jobs_engine) as session:
        assert sorted(session.scalars(select(Credit.amount))) == [1, 10]


class GrantConcurrently(Job, kind="th_grant_concurrently", queue="th", max_attempts=1):
    pass


class GrantConcurrentlyAsync(Job, kind="th_grant_concurrently_async", queue="th", max_attempts=1):
    pass


BLOCKS_RAN: list[int] = []
REFUSED: list[int] = []


@GrantConcurrently.handler
def grant_concurrently(ctx: JobContext, amounts: list[int]) -> None:
    """A transaction per batch, in threads of the handler's own, open at the same time."""
    import threading

    both_in = threading.Event()

    def batch(first: bool, amount: int) -> None:
        try:
            with ctx.transaction() as session:
                BLOCKS_RAN.append(amount)
                session.add(Credit(account=1, amount=amount))
                session.flush()
                if first:
                    both_in.wait(2)
                else:
                    both_in.set()
        except ConfigurationError:
            REFUSED.append(amount)
            both_in.set()

    threads = [threading.Thread(target=batch, args=(i == 0, a)) for i, a in enumerate(amounts)]
    threads[0].start()
    time.sleep(0.3)  # the first is in its block
    threads[1].start()
    for t in threads:
        t.join()


@GrantConcurrentlyAsync.handler
async def grant_concurrently_async(ctx: JobContext, amounts: list[int]) -> None:
    """A transaction per batch, in tasks of the handler's own, open at the same time."""
    import anyio

    both_in = anyio.Event()

    async def batch(first: bool, amount: int) -> None:
        try:
            async with ctx.async_transaction() as session:
                BLOCKS_RAN.append(amount)
                session.add(Credit(account=1, amount=amount))
                await session.flush()
                if first:
                    with anyio.move_on_after(2):
                        await both_in.wait()
                else:
                    both_in.set()
        except ConfigurationError:
            REFUSED.append(amount)
            both_in.set()

    async with anyio.create_task_group() as tg:
        for i, amount in enumerate(amounts):
            tg.start_soon(batch, i == 0, amount)


@pytest.mark.parametrize("kind", [GrantConcurrently, GrantConcurrentlyAsync], ids=["threads", "tasks"])
@pytest.mark.parametrize("runner", ["perform", "drain"])
def test_a_completing_transaction_opened_while_another_is_open_is_refused_before_its_block(
        sa_jobs_engine, credits, kind, runner):
    """A handler whose tasks (or threads) each open a ctx.transaction() at once: the second is
    refused before its block runs, as one after the first is (docs/core.md). It passed the
    check (nothing had completed yet), ran its block, and then one of the two committed and
    the other's effects rolled back as a "lease lost" in a worker (perform() committed both),
    so a batch was silently dropped."""
    BLOCKS_RAN.clear()
    REFUSED.clear()
    if runner == "perform":
        perform(kind(amounts=[10, 20]), engine=sa_jobs_engine)
    else:
        with Session(sa_jobs_engine) as session, session.begin():
            session.add(kind(amounts=[10, 20]))
        assert drain(sa_jobs_engine, kinds=[kind]) == {"completed": 1}
    assert (BLOCKS_RAN, REFUSED) == ([10], [20])
    with Session(sa_jobs_engine) as session:
        assert sorted(session.scalars(select(Credit.amount))) == [10]


def test_perform_refuses_an_autocommit_engine_as_a_worker_does(sa_jobs_engine, credits):
    """A worker (and so drain()) refuses an AUTOCOMMIT engine: each statement would commit
    on its own, and the effects stay when the completion is refused. perform() committed
    through it and passed."""
    from sqlalchemy import create_engine

    # An engine of its own, not sa_jobs_engine.execution_options(isolation_level=...): on the
    # SQLAlchemy 2.0.30 floor that fails on an engine with options already set.
    autocommit = create_engine(sa_jobs_engine.url, isolation_level="AUTOCOMMIT").execution_options(
        schema_translate_map=sa_jobs_engine.get_execution_options()["schema_translate_map"])
    try:
        for job in (GrantCredit(account=1, amount=1), AppGrantAsync(amount=1)):
            with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
                perform(job, engine=autocommit)
        with pytest.raises(ConfigurationError, match="AUTOCOMMIT"):
            drain(autocommit, kinds=[GrantCredit])
    finally:
        autocommit.dispose()
    assert_ran(sa_jobs_engine, GrantCredit, [])


@pytest.mark.parametrize("kind", [GrantInBatches, GrantInBatchesAsync])
def test_a_worker_logs_the_error_its_handler_raised_after_completing_in_a_transaction(sa_jobs_engine, credits, kind,
                                                                                      caplog):
    """Found by review17: in a worker the second completing transaction's ConfigurationError
    (or any error the handler raised once its ctx.transaction() had completed the job) was
    dropped without a word: the job reads completed, and nothing said the rest of the
    handler failed. The worker logs it."""
    import logging

    with Session(sa_jobs_engine) as session, session.begin():
        session.add(kind(amounts=[10, 20]))
    with caplog.at_level(logging.WARNING, logger="sa_jobs.worker"):
        assert drain(sa_jobs_engine, kinds=[kind]) == {"completed": 1}
    logged = [r for r in caplog.records if r.name == "sa_jobs.worker" and "ConfigurationError" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert kind.__sa_jobs_options__.kind in logged[0].getMessage()
    assert "context.py:" in logged[0].getMessage()  # where it was raised, not its text
