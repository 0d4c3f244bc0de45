"""A handler cancelled while its transaction's statement runs: the statement ends too.

An async handler is cancelled through its anyio scope: psycopg answers with a cancel
request, which anyio cancelled in turn, so psycopg closed the connection and the server ran
the statement on (``SELECT pg_sleep(30)``: 30 s, the rows an UPDATE locked held all along).
A sync handler's statement, in a thread nothing interrupts, ran on alike. Cancelled by
cancel(), its timeout, a lost lease or a stop past the grace period, the statement must
end on the server at once, and the transaction's effects must not commit.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import anyio
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import text
from sqlalchemy.orm import Session

from sa_jobs import Job, JobContext, Worker, cancel
from sa_jobs._url import to_conninfo

from .helpers import FAST, jobs_sql, q, wait_for

TAG = "sa_jobs_test_query_cancel"
STARTED: dict[int, float] = {}
ENDED_WITH: dict[int, str] = {}


def _marks(schema: str) -> str:
    return sql.Identifier(schema, "marks").as_string()


def _statements(schema: str, write: bool) -> list[str]:
    update = [f"UPDATE {_marks(schema)} SET note = 'handler' WHERE id = 1"] if write else []
    return [*update, f"SELECT pg_sleep(30) /* {TAG} {schema} */"]


class QAsync(Job, kind="qc_async", queue="qc", max_attempts=1):
    pass


class QAsyncTimed(Job, kind="qc_async_timed", queue="qc", max_attempts=1, timeout=1.0):
    pass


class QSync(Job, kind="qc_sync", queue="qc", max_attempts=1):
    pass


class QSyncTimed(Job, kind="qc_sync_timed", queue="qc", max_attempts=1, timeout=1.0):
    pass


class QAfter(Job, kind="qc_after", queue="qc", max_attempts=1):
    pass


async def q_async(ctx: JobContext, write: bool) -> None:
    async with ctx.async_transaction() as session:
        for statement in _statements(ctx.schema, write):
            STARTED[ctx.id] = time.monotonic()
            await session.execute(text(statement))


def q_sync(ctx: JobContext, write: bool) -> None:
    try:
        with ctx.transaction() as session:
            for statement in _statements(ctx.schema, write):
                STARTED[ctx.id] = time.monotonic()
                session.execute(text(statement))
    except BaseException as exc:
        ENDED_WITH[ctx.id] = type(exc).__name__
        raise


QAsync.handler(q_async)
QAsyncTimed.handler(q_async)
QSync.handler(q_sync)
QSyncTimed.handler(q_sync)


@QAfter.handler
async def q_after(ctx: JobContext) -> str:
    async with ctx.async_transaction(result="after") as session:
        await session.execute(text(f"UPDATE {_marks(ctx.schema)} SET note = 'after' WHERE id = 2"))
    return "after"


KINDS = [QAsync, QAsyncTimed, QSync, QSyncTimed, QAfter]


def _sleeping(database_url: str, schema: str) -> int:
    """Backends running this test's pg_sleep (or idle in its transaction)."""
    return q(database_url, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND state <> 'idle'"
             " AND pid <> pg_backend_pid()", (f"%pg_sleep(30) /* {TAG} {schema} */%",))[0][0]


def _row_is_free(database_url: str, schema: str) -> bool:
    """Row 1 of marks can be locked at once: no transaction of a handler holds it."""
    with psycopg.connect(to_conninfo(database_url)) as conn:
        conn.execute("SET lock_timeout = '100ms'")
        try:
            conn.execute(f"SELECT 1 FROM {_marks(schema)} WHERE id = 1 FOR UPDATE")
        except psycopg.errors.LockNotAvailable:
            return False
        return True


def _setup(engine: Any, database_url: str, schema: str, job: Job) -> int:
    STARTED.clear()
    ENDED_WITH.clear()
    q(database_url, f"CREATE TABLE {_marks(schema)} (id int PRIMARY KEY, note text)")
    q(database_url, f"INSERT INTO {_marks(schema)} VALUES (1, 'before'), (2, 'before')")
    with Session(engine) as session, session.begin():
        session.add(job)
        session.flush()
        return job.id


def _run(database_url: str, schema: str, job_id: int, interrupt: Callable[[Worker], Any], *,
         inside: bool = True, **options: Any) -> tuple[float, Worker]:
    """Run a worker until ``job_id``'s pg_sleep runs; ``interrupt`` it (in a thread, given the
    worker, or after the worker's stop when ``inside`` is false); return how long the
    sleeping statement then ran on, and the worker."""
    took: list[float] = []

    def sleeping() -> bool:
        return job_id in STARTED and bool(_sleeping(database_url, schema))

    def ends() -> None:
        assert wait_for(lambda: not _sleeping(database_url, schema), 10), "the handler's statement still runs on the server"
        took.append(time.monotonic() - took.pop())

    async def main() -> Worker:
        settings = {**FAST, "lease": 30.0, **options}
        async with Worker(database_url, kinds=KINDS, schema=schema, **settings) as worker:
            with anyio.fail_after(10):
                while not await anyio.to_thread.run_sync(sleeping):
                    await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(interrupt, worker)
            took.append(time.monotonic())
            if inside:
                await anyio.to_thread.run_sync(ends)
        if not inside:
            await anyio.to_thread.run_sync(ends)
        return worker

    worker = anyio.run(main)
    return took[0], worker


def _cancel(engine: Any, job_id: int) -> Callable[[Worker], None]:
    def interrupt(worker: Worker) -> None:
        with Session(engine) as session, session.begin():
            assert cancel(session, job_id) == "running"
    return interrupt


def _state(database_url: str, schema: str, job_id: int) -> str:
    return q(database_url, jobs_sql(schema, "SELECT state FROM {jobs} WHERE id = %s"), (job_id,))[0][0]


def _note(database_url: str, schema: str) -> str:
    return q(database_url, f"SELECT note FROM {_marks(schema)} WHERE id = 1")[0][0]


@pytest.mark.parametrize("kind", [QAsync, QSync], ids=["async", "sync"])
@pytest.mark.parametrize("write", [False, True], ids=["sleep", "update-then-sleep"])
def test_cancel_of_a_running_job_cancels_its_transactions_statement_on_the_server(engine, database_url, schema,
                                                                                  kind, write):
    """cancel() of a job whose handler waits on ``SELECT pg_sleep(30)`` in its transaction:
    the statement ended only after its 30 s, the UPDATE's row lock held all along."""
    job_id = _setup(engine, database_url, schema, kind(write=write))
    ran_on, _ = _run(database_url, schema, job_id, _cancel(engine, job_id))
    assert ran_on < 2.0
    assert _row_is_free(database_url, schema)
    assert _note(database_url, schema) == "before"  # the transaction did not commit
    assert _state(database_url, schema, job_id) == "cancelled"
    if kind is QSync:  # the abandoned thread's statement failed: it returns, its transaction rolled back
        assert wait_for(lambda: job_id in ENDED_WITH, 5) and ENDED_WITH[job_id] == "OperationalError", ENDED_WITH


@pytest.mark.parametrize("kind", [QAsyncTimed, QSyncTimed], ids=["async", "sync"])
def test_a_timed_out_handlers_statement_ends_with_its_timeout(engine, database_url, schema, kind):
    job_id = _setup(engine, database_url, schema, kind(write=True))
    ran_on, _ = _run(database_url, schema, job_id, lambda worker: None)
    assert ran_on < 1.0 + 2.0  # the timeout of 1 s, then at once
    assert _row_is_free(database_url, schema)
    assert _note(database_url, schema) == "before"
    assert wait_for(lambda: _state(database_url, schema, job_id) == "dead", 5)


@pytest.mark.parametrize("kind", [QAsync, QSync], ids=["async", "sync"])
def test_a_statement_of_a_job_whose_lease_is_lost_ends_and_rolls_back(engine, database_url, schema, kind):
    """Fencing: the handler's effects in its own transaction roll back when its claim is
    lost, and the statement it was running does not hold the row for the new claim."""
    job_id = _setup(engine, database_url, schema, kind(write=True))

    def steal(worker: Worker) -> None:
        q(database_url, jobs_sql(schema, "UPDATE {jobs} SET claim_token = gen_random_uuid() WHERE id = %s"), (job_id,))

    ran_on, _ = _run(database_url, schema, job_id, steal, lease=2.0)
    assert ran_on < 0.5 + 2.0  # the next heartbeat (a quarter of the lease), then at once
    assert _row_is_free(database_url, schema)
    assert _note(database_url, schema) == "before"
    assert _state(database_url, schema, job_id) == "running"  # the other claim's


@pytest.mark.parametrize("kind", [QAsync, QSync], ids=["async", "sync"])
def test_a_stop_past_the_grace_period_ends_the_handlers_statement(engine, database_url, schema, kind):
    job_id = _setup(engine, database_url, schema, kind(write=True))
    ran_on, _ = _run(database_url, schema, job_id, lambda worker: worker.request_stop(), inside=False,
                     shutdown_grace=0.2)
    assert ran_on < 0.2 + 2.5
    assert _row_is_free(database_url, schema)
    assert _note(database_url, schema) == "before"
    assert _state(database_url, schema, job_id) == "available"  # given back


def test_the_pool_gives_the_next_transaction_a_clean_connection(engine, database_url, schema):
    """After a cancelled statement the worker's next ctx.async_transaction() works, and the
    connection of the cancelled one went back to the pool clean, or was discarded."""
    job_id = _setup(engine, database_url, schema, QAsync(write=True))
    seen: dict[str, Any] = {}

    def cancel_then_more(worker: Worker) -> None:
        _cancel(engine, job_id)(worker)
        with Session(engine) as session, session.begin():
            after = QAfter()
            session.add(after)
            session.flush()
            seen["after"] = after.id
        assert wait_for(lambda: _state(database_url, schema, seen["after"]) == "completed", 10)
        seen["checked_out"] = worker.async_engine().sync_engine.pool.checkedout()

    _run(database_url, schema, job_id, cancel_then_more)
    assert seen["checked_out"] == 0
    assert q(database_url, f"SELECT id, note FROM {_marks(schema)} ORDER BY id") == [(1, "before"), (2, "after")]
    assert q(database_url, "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%%'"
             " AND query LIKE %s", (f"%{TAG} {schema}%",)) == [(0,)]


class QAsyncIdle(Job, kind="qc_async_idle", queue="qc_idle", max_attempts=1):
    pass


@QAsyncIdle.handler
async def q_async_idle(ctx: JobContext) -> None:
    async with ctx.async_transaction() as session:
        await session.execute(text(_statements(ctx.schema, True)[0]))
        STARTED[ctx.id] = time.monotonic()
        await anyio.sleep(30)


def test_a_cancelled_async_handler_idle_in_its_transaction_releases_its_locks(engine, database_url, schema):
    """No statement in flight: the transaction ends at once all the same (no cancel is sent)."""
    job_id = _setup(engine, database_url, schema, QAsyncIdle())
    took: list[float] = []

    async def main() -> None:
        async with Worker(database_url, kinds=[QAsyncIdle], schema=schema, **{**FAST, "lease": 30.0}):
            with anyio.fail_after(10):
                while job_id not in STARTED:
                    await anyio.sleep(0.05)
            assert not await anyio.to_thread.run_sync(_row_is_free, database_url, schema)
            await anyio.to_thread.run_sync(lambda: _cancel(engine, job_id)(None))  # type: ignore[arg-type]
            started = time.monotonic()
            assert await anyio.to_thread.run_sync(lambda: wait_for(lambda: _row_is_free(database_url, schema), 5))
            took.append(time.monotonic() - started)

    anyio.run(main)
    assert took[0] < 2.0
    assert _note(database_url, schema) == "before"
    assert _state(database_url, schema, job_id) == "cancelled"


class QSyncBetween(Job, kind="qc_sync_between", queue="qc_between", max_attempts=1):
    pass


@QSyncBetween.handler
def q_sync_between(ctx: JobContext) -> None:
    """Between its statements the handler is busy in Python, not polling ctx.cancelled."""
    first, sleep = _statements(ctx.schema, True)
    try:
        with ctx.transaction() as session:
            session.execute(text(first))
            STARTED[ctx.id] = time.monotonic()
            time.sleep(1.0)
            session.execute(text(sleep))
    except BaseException as exc:
        ENDED_WITH[ctx.id] = type(exc).__name__
        raise


def test_a_sync_handler_cancelled_between_statements_starts_no_more_of_them(engine, database_url, schema):
    """A sync handler cancelled while busy in Python between two statements of its
    transaction then ran the next one, ``pg_sleep(30)``, to its end: its row locks held
    30 s more for a transaction whose completion would be refused."""
    job_id = _setup(engine, database_url, schema, QSyncBetween())
    took: list[float] = []

    async def main() -> None:
        async with Worker(database_url, kinds=[QSyncBetween], schema=schema, **{**FAST, "lease": 30.0}):
            with anyio.fail_after(10):
                while job_id not in STARTED:
                    await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(lambda: _cancel(engine, job_id)(None))  # type: ignore[arg-type]
            started = time.monotonic()
            assert await anyio.to_thread.run_sync(lambda: wait_for(lambda: _row_is_free(database_url, schema), 10))
            took.append(time.monotonic() - started)

    anyio.run(main)
    assert took[0] < 1.0 + 2.0  # the rest of its Python work, then no statement
    assert _note(database_url, schema) == "before"
    assert _state(database_url, schema, job_id) == "cancelled"
    assert wait_for(lambda: job_id in ENDED_WITH, 5) and ENDED_WITH[job_id] == "_Cancelled", ENDED_WITH


class QAsyncOwnDeadline(Job, kind="qc_async_own_deadline", queue="qc_own", max_attempts=1):
    pass


@QAsyncOwnDeadline.handler
async def q_async_own_deadline(ctx: JobContext) -> None:
    """A deadline of the handler's own around its statement (its TimeoutError fails the attempt)."""
    async with ctx.async_transaction() as session:
        first, sleep = _statements(ctx.schema, True)
        await session.execute(text(first))
        STARTED[ctx.id] = time.monotonic()
        with anyio.fail_after(0.5):
            await session.execute(text(sleep))


def _seconds_to_dead_and_ended(worker_url: str, database_url: str, schema: str, kind: type[Job], job_id: int,
                               engines: Callable[[], dict[str, Any]] = dict) -> float:
    """Run a worker (on ``worker_url``, with the engines ``engines()`` makes on its loop) until
    ``job_id``'s handler started: how long from then until the job is dead and its
    statement no longer runs on the server."""
    took: list[float] = []

    async def main() -> None:
        async with Worker(worker_url, kinds=[kind], schema=schema, **{**FAST, "lease": 30.0}, **engines()):
            with anyio.fail_after(10):
                while job_id not in STARTED:
                    await anyio.sleep(0.05)
            started = time.monotonic()
            assert await anyio.to_thread.run_sync(lambda: wait_for(lambda: _state(database_url, schema, job_id) == "dead", 10))
            assert await anyio.to_thread.run_sync(lambda: wait_for(lambda: not _sleeping(database_url, schema), 10))
            took.append(time.monotonic() - started)

    anyio.run(main)
    return took[0]


def test_a_handlers_own_deadline_around_its_statement_ends_the_statement(engine, database_url, schema):
    """``anyio.fail_after()`` of the handler's own around a statement of its transaction:
    the attempt failed with TimeoutError, but the statement ran on to its end on the server,
    the transaction's row locks held all along."""
    job_id = _setup(engine, database_url, schema, QAsyncOwnDeadline())
    took = _seconds_to_dead_and_ended(database_url, database_url, schema, QAsyncOwnDeadline, job_id)
    assert took < 0.5 + 2.0
    assert _row_is_free(database_url, schema)
    assert _note(database_url, schema) == "before"


# A TCP proxy to PostgreSQL, in a process of its own, whose cancel requests reach the server
# DELAY seconds late (a cancel request is a connection of its own: a TCP handshake and a
# backend's fork more than the statement's own path, more on a remote server, up to the
# connect timeout when the server cannot be reached). The other bytes pass at once.
_SLOW_CANCEL_PROXY = """
import socket, struct, sys, threading, time
host, port, delay, drop_abandoned = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
print(listener.getsockname()[1], flush=True)
def pump(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def upstream():
    if host.startswith("/"):  # a Unix socket directory (the embedded server's)
        server = socket.socket(socket.AF_UNIX)
        server.connect("%s/.s.PGSQL.%d" % (host, port))
        return server
    return socket.create_connection((host, port))
def serve(client):
    with client, upstream() as server:
        first = client.recv(65536)
        if len(first) >= 8 and struct.unpack("!II", first[:8]) == (16, 80877102):  # CancelRequest
            time.sleep(delay)
            if drop_abandoned:
                client.setblocking(False)
                try:
                    if client.recv(1, socket.MSG_PEEK) == b"":
                        return  # its sender hung up first: as if its connect had not completed
                except BlockingIOError:
                    pass
                client.setblocking(True)
        server.sendall(first)
        back = threading.Thread(target=pump, args=(server, client), daemon=True)
        back.start()
        pump(client, server)
        back.join()
while True:
    client, _ = listener.accept()
    threading.Thread(target=serve, args=(client,), daemon=True).start()
"""


@pytest.fixture
def slow_cancel_url(database_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """``database_url`` through a proxy whose cancel requests arrive ``request.param`` s late
    (or ``(seconds, True)``: late, and not at all when their sender hung up meanwhile)."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    # The embedded server listens on a Unix socket only, named in the query (?host=/dir).
    query = dict(url.query)
    socket_dir, socket_port = query.pop("host", None), query.pop("port", None)
    host = socket_dir if isinstance(socket_dir, str) and socket_dir.startswith("/") else (url.host or "127.0.0.1")
    upstream_port = int(socket_port) if isinstance(socket_port, str) else (url.port or 5432)
    delay_and_drop = (request.param[0], int(request.param[1])) if isinstance(request.param, tuple) else (request.param, 0)
    proxy = subprocess.Popen([sys.executable, "-c", _SLOW_CANCEL_PROXY, host, str(upstream_port),
                              *map(str, delay_and_drop)], stdout=subprocess.PIPE, text=True)
    try:
        assert proxy.stdout is not None
        port = int(proxy.stdout.readline())
        # Plain text, so that the proxy reads the request (libpq 17's cancel connection
        # negotiates encryption first, as the connection it cancels did).
        yield url.set(host="127.0.0.1", port=port, query={**query, "sslmode": "disable", "gssencmode": "disable"}
                      ).render_as_string(hide_password=False)
    finally:
        proxy.kill()
        proxy.wait()


class QAsyncOwnMoveOn(Job, kind="qc_async_own_move_on", queue="qc_own", max_attempts=1):
    pass


@QAsyncOwnMoveOn.handler
async def q_async_own_move_on(ctx: JobContext, then_query: bool) -> str:
    """A deadline of the handler's own that it catches (``move_on_after``), inside its
    transaction, and then carries on as if nothing happened (another statement, or none)."""
    try:
        async with ctx.async_transaction(result="done") as session:
            first, sleep = _statements(ctx.schema, True)
            await session.execute(text(first))
            STARTED[ctx.id] = time.monotonic()
            with anyio.move_on_after(0.5):
                await session.execute(text(sleep))
            if then_query:
                await session.execute(text("SELECT 1"))
    except BaseException as exc:
        ENDED_WITH[ctx.id] = f"{type(exc).__name__}: {exc}"
        raise
    return "done"


@pytest.mark.parametrize("slow_cancel_url", [(1.0, True)], indirect=True)
@pytest.mark.parametrize("then_query", [False, True], ids=["returns", "queries-on"])
def test_a_handlers_own_caught_deadline_around_its_statement_ends_the_statement_and_fails(
        slow_cancel_url, engine, database_url, schema, then_query):
    """``anyio.move_on_after()`` of the handler's own around a statement of its transaction,
    the handler carrying on: psycopg closed the connection when its cancel request was
    cancelled, and no cancellation reached the block's exit, so the statement ran on to its
    end on the server, its row locks held. The attempt must fail clearly (its effects did
    not commit) and the statement end at once. psycopg's own cancel request, interrupted, got
    out only when its connect was quick enough (on localhost, often): the proxy drops it, as a
    remote server's slower connect would."""
    job_id = _setup(engine, database_url, schema, QAsyncOwnMoveOn(then_query=then_query))
    took = _seconds_to_dead_and_ended(slow_cancel_url, database_url, schema, QAsyncOwnMoveOn, job_id)
    assert ENDED_WITH[job_id].startswith("StatementInterruptedError: "), ENDED_WITH
    assert took < 0.5 + 1.0 + 2.0, took  # the proxy's delay
    assert _row_is_free(database_url, schema)
    assert _note(database_url, schema) == "before"


@pytest.mark.parametrize("slow_cancel_url", [(1.0, True)], indirect=True)
def test_a_handlers_own_caught_deadline_ends_the_statement_on_the_apps_psycopg_async_engine(
        slow_cancel_url, engine, database_url, schema):
    """As above, through ``Worker(async_engine=)`` of the app's own psycopg engine, which
    core.md says is served alike (only another driver's statements are left to it): the
    worker noted interrupted statements on the engines it made only, so the block went on to
    its completion, failed with an unexplained error, and the statement ran on to its end."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    app_url = make_url(slow_cancel_url).set(drivername="postgresql+psycopg")
    job_id = _setup(engine, database_url, schema, QAsyncOwnMoveOn(then_query=False))
    took = _seconds_to_dead_and_ended(database_url, database_url, schema, QAsyncOwnMoveOn, job_id,
                                      lambda: {"async_engine": create_async_engine(app_url)})
    assert ENDED_WITH[job_id].startswith("StatementInterruptedError: "), ENDED_WITH
    assert took < 0.5 + 1.0 + 2.0, took  # the proxy's delay
    assert _row_is_free(database_url, schema)
    assert _note(database_url, schema) == "before"


@pytest.mark.parametrize("slow_cancel_url", [1.5], indirect=True)
def test_a_slow_cancel_request_does_not_stall_the_worker(slow_cancel_url, database_url, schema, engine):
    """The cancel request of a cancelled sync handler's statement held the GIL until the
    server answered it (psycopg's C implementation of PQcancel): the worker's event loop,
    its heartbeats and every handler stood still for as long, up to the connect timeout
    (minutes) against a server that cannot be reached."""
    job_id = _setup(engine, database_url, schema, QSync(write=False))
    gaps: list[float] = []

    async def main() -> None:
        async with Worker(slow_cancel_url, kinds=KINDS, schema=schema, **{**FAST, "lease": 30.0}):
            with anyio.fail_after(10):
                while not await anyio.to_thread.run_sync(lambda: job_id in STARTED and bool(_sleeping(database_url, schema))):
                    await anyio.sleep(0.05)
            async with anyio.create_task_group() as tg:
                async def tick() -> None:
                    last = anyio.current_time()
                    while True:
                        await anyio.sleep(0.01)
                        now = anyio.current_time()
                        gaps.append(now - last)
                        last = now

                tg.start_soon(tick)
                await anyio.to_thread.run_sync(lambda: _cancel(engine, job_id)(None))  # type: ignore[arg-type]
                assert await anyio.to_thread.run_sync(lambda: wait_for(lambda: not _sleeping(database_url, schema), 10))
                tg.cancel_scope.cancel()

    anyio.run(main)
    assert _state(database_url, schema, job_id) == "cancelled"
    assert max(gaps) < 0.5, f"the event loop stood still for {max(gaps):.2f} s"


class QRaceFirst(Job, kind="qc_race_first", queue="qc_race", max_attempts=1):
    pass


class QRaceNext(Job, kind="qc_race_next", queue="qc_race", max_attempts=1):
    pass


@QRaceFirst.handler
def q_race_first(ctx: JobContext) -> None:
    with ctx.transaction() as session:
        STARTED[ctx.id] = time.monotonic()
        session.execute(text(f"SELECT pg_sleep(0.5) /* {TAG} {ctx.schema} race */"))  # ends before the cancel lands
        session.execute(text("SELECT 1"))  # refused: the job is cancelled


@QRaceNext.handler
def q_race_next(ctx: JobContext, first: int) -> str:
    assert wait_for(lambda: first in STARTED, 10)  # the first job's transaction has the pool's connection
    try:
        with ctx.transaction(result="next") as session:
            session.execute(text("SELECT pg_sleep(1.5)"))
    except BaseException as exc:
        ENDED_WITH[ctx.id] = type(exc).__name__
        raise
    return "next"


@pytest.mark.parametrize("slow_cancel_url", [0.8], indirect=True)
def test_a_late_cancel_request_does_not_cancel_the_next_transaction_on_the_connection(slow_cancel_url, database_url,
                                                                                      schema, engine):
    """A cancelled sync handler's statement that ended on its own before the cancel request
    reached the server: its transaction gave the connection back to the pool at once, the
    next job's transaction took it, and the cancel request, landing then, cancelled that
    job's statement (QueryCanceled: an innocent job failed, its attempt spent)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    STARTED.clear()
    ENDED_WITH.clear()
    app_engine = create_engine(make_url(slow_cancel_url).set(drivername="postgresql+psycopg"), pool_size=1, max_overflow=0)
    with Session(engine) as session, session.begin():
        first = QRaceFirst()
        session.add(first)
        session.flush()
        following = QRaceNext(first=first.id)
        session.add(following)
        session.flush()
        first_id, next_id = first.id, following.id

    def racing() -> bool:
        return first_id in STARTED and bool(q(database_url, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s"
                                              " AND state = 'active' AND pid <> pg_backend_pid()",
                                              (f"%{TAG} {schema} race%",))[0][0])

    async def main() -> None:
        async with Worker(slow_cancel_url, kinds=[QRaceFirst, QRaceNext], schema=schema, concurrency=2,
                          engine=app_engine, **{**FAST, "lease": 30.0}):
            assert await anyio.to_thread.run_sync(lambda: wait_for(racing, 10))
            await anyio.to_thread.run_sync(lambda: _cancel(engine, first_id)(None))  # type: ignore[arg-type]
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: _state(database_url, schema, next_id) in ("completed", "dead"), 10))

    try:
        anyio.run(main)
    finally:
        app_engine.dispose()
    assert _state(database_url, schema, first_id) == "cancelled"
    assert _state(database_url, schema, next_id) == "completed", ENDED_WITH


class QSyncLateCompletion(Job, kind="qc_sync_late_completion", queue="qc_late", max_attempts=1, timeout=0.5):
    pass


@QSyncLateCompletion.handler
def q_sync_late_completion(ctx: JobContext) -> None:
    """Writes, then stays busy in Python past its timeout (seeing it, not raising), then
    leaves its block: the completion is the transaction's only statement after the cancel."""
    first, _ = _statements(ctx.schema, True)
    try:
        with ctx.transaction(result="late") as session:
            session.execute(text(first))
            STARTED[ctx.id] = time.monotonic()
            assert wait_for(lambda: ctx.cancelled, 10)
    except BaseException as exc:
        ENDED_WITH[ctx.id] = type(exc).__name__
        raise
    ENDED_WITH[ctx.id] = "returned"


def test_a_timed_out_sync_handler_cannot_commit_its_completion_after_the_timeout(engine, database_url, schema):
    """The attempt of a sync handler past its timeout has failed (counted timed_out, its
    failure handed to the completer), but its thread ran on and left its ctx.transaction()
    block: the completion, the only statement after the cancel (the session held nothing
    to flush), was exempt from the cancel check, found the row still 'running' under its
    token (the completer had not written the failure yet) and committed the handler's
    effects and 'completed'; the failure was then fenced off."""
    job_id = _setup(engine, database_url, schema, QSyncLateCompletion())

    async def main() -> None:
        # The completer writes the timeout's failure after 1.5 s: the thread is done by then.
        async with Worker(database_url, kinds=[QSyncLateCompletion], schema=schema, completion_interval=1.5,
                          **{**FAST, "lease": 30.0}):
            assert await anyio.to_thread.run_sync(lambda: wait_for(lambda: job_id in ENDED_WITH, 10))
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: _state(database_url, schema, job_id) != "running", 10))

    anyio.run(main)
    assert ENDED_WITH[job_id] == "_Cancelled"
    assert _note(database_url, schema) == "before"
    assert _state(database_url, schema, job_id) == "dead"


class QSyncLateAsyncCompletion(Job, kind="qc_sync_late_async_completion", queue="qc_late", max_attempts=1, timeout=0.5):
    pass


@QSyncLateAsyncCompletion.handler
def q_sync_late_async_completion(ctx: JobContext) -> None:
    """Past its timeout, the thread runs its unit of work as ctx.async_transaction() on the
    worker's loop (anyio.from_thread.run: the thread is anyio's)."""
    first, _ = _statements(ctx.schema, True)

    async def unit() -> None:
        async with ctx.async_transaction(result="late") as session:
            await session.execute(text(first))

    STARTED[ctx.id] = time.monotonic()
    assert wait_for(lambda: ctx.cancelled, 10)
    try:
        anyio.from_thread.run(unit)
    except BaseException as exc:
        ENDED_WITH[ctx.id] = type(exc).__name__
        raise
    ENDED_WITH[ctx.id] = "returned"


def test_a_timed_out_sync_handler_cannot_commit_a_completion_through_the_loop(engine, database_url, schema):
    """As above, through ctx.async_transaction() run on the worker's loop from the thread:
    no cancel scope of the job is around it there, and nothing checked the job."""
    job_id = _setup(engine, database_url, schema, QSyncLateAsyncCompletion())

    async def main() -> None:
        async with Worker(database_url, kinds=[QSyncLateAsyncCompletion], schema=schema, completion_interval=1.5,
                          **{**FAST, "lease": 30.0}):
            assert await anyio.to_thread.run_sync(lambda: wait_for(lambda: job_id in ENDED_WITH, 10))
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: _state(database_url, schema, job_id) != "running", 10))

    anyio.run(main)
    assert _note(database_url, schema) == "before"
    assert _state(database_url, schema, job_id) == "dead"
    assert ENDED_WITH[job_id] == "_Cancelled"
