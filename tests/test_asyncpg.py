"""An async app whose engine is ``create_async_engine("postgresql+asyncpg://...")``.

docs/core.md says such an app may enqueue, administer and test its jobs through its own
asyncpg engine and sessions; sa-jobs' own connections are psycopg's whatever the URL
names. Each test here goes through asyncpg's dialect (its errors, its codecs), on a real
server.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from typing import Any, Awaitable, Callable

import anyio
import pytest

pytest.importorskip("asyncpg")

from sqlalchemy import select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine  # noqa: E402

from sa_jobs import (  # noqa: E402
    ConfigurationError, Job, JobContext, Unique, enqueue_many, wait_for_async,
)
from sa_jobs._url import to_conninfo  # noqa: E402
from sa_jobs.schema import DEFAULT_SCHEMA  # noqa: E402

from .helpers import jobs_sql, q  # noqa: E402


def asyncpg_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def with_engine(database_url: str, schema: str, body: Callable[[AsyncEngine], Awaitable[Any]], **options: Any) -> Any:
    """``await body(engine)`` with an asyncpg AsyncEngine mapping the queue to ``schema``."""

    async def main() -> Any:
        engine = create_async_engine(asyncpg_url(database_url)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema}, **options)
        try:
            return await body(engine)
        finally:
            await engine.dispose()

    return anyio.run(main)


class ApgPlain(Job, kind="apg_plain"):
    pass


async def add(engine: AsyncEngine, *jobs: Job) -> list[int]:
    async with AsyncSession(engine) as session, session.begin():
        session.add_all(jobs)
        await session.flush()
        return [j.id for j in jobs]


@pytest.mark.parametrize("autocommit", [False, True])
def test_wait_for_async_on_asyncpg_times_out_while_the_jobs_table_is_locked(database_url, schema, autocommit):
    """Before: asyncpg reports the read's statement_timeout as SQLAlchemy's plain DBAPIError
    (its dialect maps query_canceled to no OperationalError), which wait_for_async let out
    instead of the TimeoutError it promises."""
    import psycopg
    from psycopg import sql as psql

    async def body(engine: AsyncEngine) -> float:
        (job_id,) = await add(engine, ApgPlain(n=1).options(queue="nobody"))
        locker = await psycopg.AsyncConnection.connect(to_conninfo(database_url))
        try:
            await locker.execute(psql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                psql.Identifier(schema, "jobs")))
            started = time.monotonic()
            with anyio.fail_after(20), pytest.raises(TimeoutError, match=f"job {job_id}"):
                await wait_for_async(engine, job_id, timeout=0.3)
            return time.monotonic() - started
        finally:
            await locker.rollback()
            await locker.close()

    options = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    assert with_engine(database_url, schema, body, **options) < 3


def test_enqueue_many_in_an_asyncpg_sessions_run_sync_is_refused_with_a_configuration_error(database_url, schema):
    """Before: an AttributeError ('Connection' object has no attribute 'autocommit'): the
    COPY needs psycopg's connection, and asyncpg's passed for one. Now the ConfigurationError
    that names the way that works, and the caller's transaction goes on."""

    async def body(engine: AsyncEngine) -> None:
        async with AsyncSession(engine) as session, session.begin():
            for jobs, args in (([ApgPlain(n=1)], None), (ApgPlain, [{"n": 1}])):
                with pytest.raises(ConfigurationError, match="add_all"):
                    await session.run_sync(lambda s: enqueue_many(s, jobs, args))  # noqa: B023
            async with engine.connect() as conn:
                with pytest.raises(ConfigurationError, match="add_all"):
                    await conn.run_sync(lambda c: enqueue_many(c, ApgPlain, [{"n": 1}]))
            await session.run_sync(lambda s: s.add_all([ApgPlain(n=2)]))

    with_engine(database_url, schema, body)
    assert q(database_url, jobs_sql(schema, "SELECT args FROM {jobs}")) == [({"n": 2},)]


class ApgSyncTx(Job, kind="apg_sync_tx", queue="apg_sync"):
    pass


@ApgSyncTx.handler
def apg_sync_tx(ctx: JobContext, n: int) -> None:
    with ctx.transaction(result=n) as session:
        session.execute(text("SELECT 1"))


def test_a_worker_refuses_an_async_dialects_sync_engine_as_engine(database_url, schema):
    """Before: ``engine=app_engine.sync_engine`` (an asyncpg AsyncEngine's) or
    ``create_engine("postgresql+asyncpg://...")`` was taken as a sync Engine, and every
    ctx.transaction() failed with SQLAlchemy's MissingGreenlet (the driver runs only inside
    an AsyncEngine's greenlets), the jobs retried until dead. Refused when the worker is
    built, naming async_engine=."""
    from sqlalchemy import create_engine

    from sa_jobs import Worker

    app = create_async_engine(asyncpg_url(database_url))
    plain = create_engine(asyncpg_url(database_url))
    try:
        for given in (app.sync_engine, plain):
            with pytest.raises(ConfigurationError, match="engine= .*asyncpg.*async_engine="):
                Worker(database_url, kinds=[ApgSyncTx], schema=schema, engine=given)
        Worker(database_url, kinds=[ApgSyncTx], schema=schema, async_engine=app)  # its place
    finally:
        plain.dispose()


def test_the_testing_helpers_take_an_asyncpg_engines_sync_engine(database_url, schema):
    """Before: perform(engine=app_engine.sync_engine) (of an asyncpg AsyncEngine) failed in
    ctx.transaction() with SQLAlchemy's MissingGreenlet, and drain() or a commit under
    inline() of it with the same from their own queries (the driver runs only inside an
    AsyncEngine's greenlets). They now use a plain engine on its database, as for the
    AsyncEngine itself."""
    from sa_jobs import testing

    async def body(engine: AsyncEngine) -> None:
        sync = engine.sync_engine
        assert await testing.perform_async(ApgSyncTx(n=3), engine=sync) == 3
        await add(engine, ApgSyncTx(n=4))
        assert testing.drain(sync, kinds=[ApgSyncTx]) == {"completed": 1}
        with testing.inline(sync, kinds=[ApgSyncTx]):
            async with AsyncSession(engine) as session, session.begin():
                session.add(ApgSyncTx(n=5))
        async with AsyncSession(engine) as session:
            rows = (await session.execute(select(ApgSyncTx.state, ApgSyncTx.result).order_by(ApgSyncTx.id))).all()
        assert [tuple(r) for r in rows] == [("completed", 4), ("completed", 5)]

    with_engine(database_url, schema, body)
    assert testing.perform(ApgSyncTx(n=6), engine=create_async_engine(asyncpg_url(database_url)).sync_engine) == 6


# What ApgSeeSetting's handler saw of the session setting apg.marker.
SEEN: dict[str, Any] = {}


class ApgSeeSetting(Job, kind="apg_see_setting"):
    pass


@ApgSeeSetting.handler
async def apg_see_setting(ctx: JobContext) -> None:
    async with ctx.async_transaction() as session:
        SEEN["async"] = await session.scalar(text("SELECT current_setting('apg.marker', true)"))


def test_sa_jobs_connections_keep_an_asyncpg_engines_connect_args(database_url, schema):
    """Before: an asyncpg engine's ``connect_args`` (its database, password, server_settings,
    ssl mode) were dropped from every connection sa-jobs made from the engine (the worker's
    own, drain()'s twins, install(engine)), as asyncpg's names mean nothing to psycopg: an
    app whose engine names its database there had Worker(engine) and drain() connect to the
    URL's alone. They are translated to libpq's (database to dbname, server_settings to
    options, ssl's mode to sslmode)."""
    import psycopg

    from sa_jobs import testing
    from sa_jobs._url import connect_args

    url = make_url(asyncpg_url(database_url))

    async def body() -> None:
        engine = create_async_engine(
            url.set(database="apg_no_such_database"),
            connect_args={"database": url.database, "server_settings": {"apg.marker": "kept it\\ all"},
                          "timeout": 4.5, "ssl": "prefer", "command_timeout": 30}).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema})
        try:
            assert connect_args(engine) == {"dbname": url.database, "options": r"-c apg.marker=kept\ it\\\ all",
                                            "connect_timeout": 5, "sslmode": "prefer"}
            with psycopg.connect(to_conninfo(engine), autocommit=True) as conn:
                assert conn.execute("SELECT current_setting('apg.marker', true)").fetchone() == ("kept it\\ all",)
            await add(engine, ApgSeeSetting())
            SEEN.clear()
            assert testing.drain(engine, kinds=[ApgSeeSetting], timeout=10) == {"completed": 1}
            assert SEEN == {"async": "kept it\\ all"}
        finally:
            await engine.dispose()

    anyio.run(body)
    # asyncpg's ssl=True is its verify-full against the system's CAs; an SSLContext has no libpq form.
    import ssl

    from psycopg import pq

    system = {"sslrootcert": "system"} if pq.version() >= 160000 else {}
    for given, expected in ((True, {"sslmode": "verify-full", **system}), (ssl.create_default_context(), {})):
        engine = create_async_engine(url, connect_args={"ssl": given, "server_settings": {}})
        assert connect_args(engine) == expected


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async"])
def test_a_worker_built_from_an_engine_gives_handlers_its_connect_args(database_url, schema, driver):
    """Before: Worker(app_engine) connected its own connections with the engine's
    connect_args, but made ctx.transaction()'s and ctx.async_transaction()'s engines from
    its URL alone: with the database named in connect_args, every handler's transaction
    went to the URL's (here none), and the jobs were retried until dead."""
    from sa_jobs import Worker

    url = make_url(database_url).set(drivername=f"postgresql+{driver}")
    given = ({"database": url.database, "server_settings": {"apg.marker": "kept"}} if driver == "asyncpg"
             else {"dbname": url.database, "options": "-c apg.marker=kept"})

    async def body() -> None:
        engine = create_async_engine(url.set(database="apg_no_such_database"), connect_args=given).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema})
        try:
            ids = await add(engine, ApgSeeSetting(), ApgSyncTx(n=1))
            SEEN.clear()
            async with Worker(engine, kinds=[ApgSeeSetting, ApgSyncTx], schema=schema, poll_interval=0.05,
                              shutdown_grace=2):
                for job_id in ids:
                    with anyio.fail_after(10):
                        assert (await wait_for_async(engine, job_id, timeout=5)).status == "done"
            assert SEEN == {"async": "kept"}
        finally:
            await engine.dispose()

    anyio.run(body)


# ---- what already worked through asyncpg, kept so ------------------------------------------


class ApgUnique(Job, kind="apg_unique", unique=Unique(by=("k",), period=dt.timedelta(hours=1))):
    pass


class ApgReplace(Job, kind="apg_replace", unique=Unique(by=("k",), on_conflict="replace")):
    pass


ROUND_TRIP = {"n": 1, "big": 10**30, "neg": -2**63, "u": "héllo ☃ \u2028", "nested": {"a": [1, {"b": None}], "f": 0.1},
              "e": 1e16, "empty": {"": []}, "t": True}


def test_enqueue_through_an_asyncpg_session(database_url, schema):
    """add/add_all with options, JSON round trips, unique kinds (return, period, replace,
    two of one key in a flush) in a non-default schema, read back through asyncpg."""

    async def body(engine: AsyncEngine) -> None:
        run_at = dt.datetime(2100, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
        async with AsyncSession(engine) as session, session.begin():
            plain = ApgPlain(**ROUND_TRIP)
            session.add(plain)
            session.add_all([ApgPlain(n=2).options(queue="q2", priority=5, tags=["a"], max_attempts=3,
                                                   delay=dt.timedelta(seconds=30), meta={"m": 1}),
                             ApgPlain(n=3).options(run_at=run_at)])
            first, twin = ApgUnique(k=1, x=1), ApgUnique(k=1, x=2)
            session.add_all([first, twin])
            await session.flush()
            assert (first.was_duplicate, twin.was_duplicate, twin.id) == (False, True, first.id)
            assert ":" in first.unique_key  # the period's bucket, on the database clock
            first_id = first.id
        async with AsyncSession(engine) as session, session.begin():
            again = ApgUnique(k=1, x=3)
            session.add(again)
            await session.flush()
            assert (again.was_duplicate, again.id, again.args) == (True, first_id, {"k": 1, "x": 1})
        for x in (1, 2):
            async with AsyncSession(engine) as session, session.begin():
                replaced = ApgReplace(k=1, x=x)
                session.add(replaced)
                await session.flush()
                replace_seen = (replaced.was_replaced, replaced.args)
        assert replace_seen == (True, {"k": 1, "x": 2})
        async with AsyncSession(engine) as session:
            rows = (await session.execute(select(ApgPlain.args, ApgPlain.queue, ApgPlain.priority, ApgPlain.tags,
                                                 ApgPlain.max_attempts, ApgPlain.state, ApgPlain.meta,
                                                 ApgPlain.scheduled_at).order_by(ApgPlain.id))).all()
        stored = {**ROUND_TRIP, "e": 10**16}  # jsonb's numeric: an integral float of 1e16 comes back an int
        assert rows[0].args == stored and rows[0].state == "available"
        assert rows[1][1:7] == ("q2", 5, ["a"], 3, "scheduled", {"m": 1})
        assert rows[2].scheduled_at == run_at and rows[2].state == "scheduled"

    with_engine(database_url, schema, body)
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs}")) == [(5,)]


def test_admin_calls_through_an_asyncpg_session_and_connection(database_url, schema):
    """job_status, cancel/retry (one and many, a unique key held by another job), the queue
    settings, through run_sync of an asyncpg AsyncSession, AsyncConnection and an
    AUTOCOMMIT engine's session."""
    from sa_jobs import (
        JobNotFoundError, QueueLimits, cancel, cancel_many, job_status, pause_queue, paused_queues, queue_limits,
        resume_queue, retry, retry_many, set_queue_limits,
    )

    async def body(engine: AsyncEngine) -> None:
        a, b = await add(engine, ApgPlain(n=1), ApgPlain(n=2))
        (held,) = await add(engine, ApgUnique(k=9))
        async with AsyncSession(engine) as session, session.begin():
            assert (await session.run_sync(job_status, a)).status == "queued"
            assert await session.run_sync(lambda s: cancel(s, a)) == "available"
            assert await session.run_sync(lambda s: cancel_many(s, [b, held, 10**6])) == {b: "available",
                                                                                       held: "available"}
            assert await session.run_sync(lambda s: retry(s, a)) == a
            await session.run_sync(lambda s: pause_queue(s, "q2"))
            await session.run_sync(lambda s: set_queue_limits(s, "q2", QueueLimits(concurrency=3)))
        (holder,) = await add(engine, ApgUnique(k=9))  # the cancelled job gave its key up
        async with engine.connect() as conn:
            assert await conn.run_sync(paused_queues) == ["q2"]
            assert (await conn.run_sync(lambda c: queue_limits(c, "q2"))).concurrency == 3
            with pytest.raises(JobNotFoundError, match=f"held by job {holder}"):
                await conn.run_sync(lambda c: retry(c, held))
            assert await conn.run_sync(lambda c: retry_many(c, [b, held])) == [b]
            await conn.run_sync(lambda c: resume_queue(c, "q2"))
            await conn.commit()
        # A new engine: SQLAlchemy 2.0.30 refuses isolation_level on an optioned engine.
        autocommit = create_async_engine(asyncpg_url(database_url), isolation_level="AUTOCOMMIT").execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema})
        try:
            async with AsyncSession(autocommit) as session:
                assert await session.run_sync(lambda s: cancel(s, b)) == "available"
                assert await session.run_sync(paused_queues) == []
        finally:
            await autocommit.dispose()
        assert (await wait_for_async(engine, b, timeout=1)).status == "cancelled"

    with_engine(database_url, schema, body)


class ApgCtx(Job, kind="apg_ctx", queue="apg_ctx", max_attempts=1):
    pass


@ApgCtx.handler
async def apg_ctx(ctx: JobContext, n: int, fail: bool = False) -> None:
    async with ctx.async_transaction(result={"n": n, "u": "☃"}) as session:
        session.add_all([ApgPlain(by=n), ApgUnique(k=n), ApgUnique(k=n)])
        ctx.set_progress(50, "half")
        if fail:
            raise RuntimeError("rolled back")


class ApgLong(Job, kind="apg_long", max_attempts=1):
    pass


@ApgLong.handler
async def apg_long(ctx: JobContext) -> None:
    await anyio.sleep(30)


def test_a_worker_from_an_asyncpg_url_with_the_apps_asyncpg_engine(database_url, schema):
    """A worker whose URL names asyncpg, handing its handlers the app's asyncpg AsyncEngine:
    ctx.async_transaction() commits the handler's jobs (unique ones too) with the completion,
    or none of them; a cancel through an asyncpg session reaches a running handler."""
    from sa_jobs import Worker, cancel, job_status

    async def body(engine: AsyncEngine) -> None:
        done, failed, long = await add(engine, ApgCtx(n=1), ApgCtx(n=2, fail=True), ApgLong())
        async with Worker(asyncpg_url(database_url), kinds=[ApgCtx, ApgLong], schema=schema, async_engine=engine,
                          poll_interval=0.05, shutdown_grace=2):
            with anyio.fail_after(10):
                status = await wait_for_async(engine, done, timeout=8)
                assert (status.status, status.result, status.progress) == ("done", {"n": 1, "u": "☃"},
                                                                            {"percent": 50, "message": "half"})
                assert (await wait_for_async(engine, failed, timeout=8)).error == "RuntimeError: rolled back"
                while True:
                    async with AsyncSession(engine) as session:
                        if (await session.run_sync(job_status, long)).state == "running":
                            break
                    await anyio.sleep(0.02)
                async with AsyncSession(engine) as session, session.begin():
                    assert await session.run_sync(lambda s: cancel(s, long)) == "running"
                assert (await wait_for_async(engine, long, timeout=8)).status == "cancelled"
        async with AsyncSession(engine) as session:
            rows = (await session.execute(select(Job.kind, Job.args).where(Job.kind != "apg_ctx")
                                          .where(Job.kind != "apg_long").order_by(Job.id))).all()
        assert sorted(tuple(r) for r in rows) == [("apg_plain", {"by": 1}), ("apg_unique", {"k": 1})]

    with_engine(database_url, schema, body)


def test_the_testing_helpers_with_an_asyncpg_engine(database_url, schema):
    """perform_async, drain, inline (an AsyncSession's commit) and assert_enqueued through
    run_sync, given the app's asyncpg AsyncEngine."""
    from sa_jobs import testing

    async def body(engine: AsyncEngine) -> None:
        assert await testing.perform_async(ApgCtx(n=5), engine=engine) == {"n": 5, "u": "☃"}
        async with AsyncSession(engine) as session, session.begin():
            session.add(ApgSyncTx(n=7))
            await session.flush()
            found = await session.run_sync(lambda s: testing.assert_enqueued(s, ApgSyncTx, args={"n": 7}, count=1))
            assert found[0].args == {"n": 7}
            await session.run_sync(lambda s: testing.refute_enqueued(s, ApgSyncTx, args={"n": 8}))
        assert testing.drain(engine, kinds=[ApgSyncTx]) == {"available": 2, "completed": 1}  # perform's jobs wait
        with testing.inline(engine, kinds=[ApgSyncTx, ApgCtx]):
            async with AsyncSession(engine) as session, session.begin():
                session.add(ApgCtx(n=6))
        async with AsyncSession(engine) as session:
            states = dict((await session.execute(select(Job.kind, Job.state).where(Job.kind == "apg_ctx"))).all())
        assert states == {"apg_ctx": "completed"}

    with_engine(database_url, schema, body)


# ---- Alembic with an async env.py on asyncpg (alembic's "async" template) --------------------


ASYNC_ENV = '''def run_migrations_online() -> None:
    import asyncio

    from sqlalchemy.ext.asyncio import create_async_engine

    def run(connection) -> None:
        context.configure(connection=connection, **CONFIGURE_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()

    async def main() -> None:
        engine = create_async_engine(os.environ["DATABASE_URL"], poolclass=pool.NullPool)
        async with engine.connect() as connection:
            await connection.run_sync(run)
        await engine.dispose()

    asyncio.run(main())
'''


@pytest.fixture
def async_app(tmp_path, database_url):
    """The example Alembic app with an async env.py, its DATABASE_URL an asyncpg one of a
    database of its own."""
    import uuid

    from psycopg import sql

    from .test_alembic import EXAMPLE_APP, App, run_sql

    dest = tmp_path / "alembic_app"
    shutil.copytree(EXAMPLE_APP, dest, ignore=shutil.ignore_patterns("__pycache__"))
    env = dest / "migrations" / "env.py"
    source = env.read_text()
    start = source.index("def run_migrations_online")
    end = source.index("\n\nif context.is_offline_mode()")
    env.write_text(source[:start] + ASYNC_ENV + source[end:])
    name = "sa_jobs_apg_" + uuid.uuid4().hex[:12]
    run_sql(database_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield App(dest, asyncpg_url(make_url(database_url).set(database=name).render_as_string(hide_password=False)))
    finally:
        run_sql(database_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_alembic_on_asyncpg_retries_a_lock_wait_then_names_the_blocker(async_app):
    """Before: on asyncpg a revision's lock_timeout arrived as SQLAlchemy's plain DBAPIError,
    which the retry loop did not know for a lock timeout (it looked for psycopg's
    LockNotAvailable): the upgrade failed at the first wait, with no retry and no
    SchemaLockTimeoutError naming the blocking session."""
    import psycopg

    from sa_jobs import schema as schema_mod
    from sa_jobs.drift import check_drift

    plain = make_url(async_app.url).set(drivername="postgresql").render_as_string(hide_password=False)
    async_app.alembic("upgrade", "sa_jobs_0002")
    blocker = psycopg.connect(plain)
    blocker.execute("SELECT count(*) FROM sa_jobs.jobs")
    try:
        proc = async_app.alembic("-x", "sa_jobs_lock_timeout=0.2", "-x", "sa_jobs_lock_retries=1",
                                 "upgrade", "sa_jobs_0003", ok=False)
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert proc.returncode != 0
    assert "SchemaLockTimeoutError" in proc.stderr and f"pid {pid}" in proc.stderr, proc.stderr
    assert "gave up after 2 waits" in proc.stderr, proc.stderr  # the first one retried
    assert schema_mod.installed_version(plain, "sa_jobs") == 2
    async_app.alembic("upgrade", "heads")
    assert check_drift(plain, "sa_jobs") == []
