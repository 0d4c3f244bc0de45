"""``JobContext``: what a handler receives besides its args."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import selectors
import threading
import time
import weakref
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Optional, cast

import anyio
import psycopg
from psycopg import pq
from sqlalchemy import case, event, func, select, update
from sqlalchemy.orm import Session

from .. import _validate
from ..admin import gives_up_its_key
from ..errors import ConfigurationError, InvalidArgsError, LeaseLostError, StatementInterruptedError
from ..model import job_table
from ..schema import DEFAULT_SCHEMA

if TYPE_CHECKING:
    from sqlalchemy.engine import CursorResult
    from sqlalchemy.ext.asyncio import AsyncSession

    from ._job import ClaimedJob
    from .worker import Worker

log = logging.getLogger("sa_jobs.worker")

_jobs = job_table()

# How long a cancelled handler's transaction waits for its cancel request to be sent (over a
# connection of its own: milliseconds, unless the server cannot be reached).
CANCEL_REQUEST_WAIT = 2.0

# Why ctx.transaction() refuses an engine (or connection) that commits each statement.
_AUTOCOMMIT = (
    "ctx.transaction() commits a handler's effects with its job's completion, or neither; under"
    " AUTOCOMMIT each statement commits on its own, so the effects would stay even when the"
    " completion is refused (lease lost, job cancelled)"
)


# Why ctx.transaction() refuses to run on the worker's event loop (an async handler).
# A second completing transaction found the row completed, not running: it rolled back
# as "lease lost", raised into a job already finished, where nothing showed it.
_COMPLETED_ALREADY = (
    "this job was already completed by an earlier ctx.transaction() (or ctx.async_transaction()):"
    " each completes the job, so only one can commit. Do the whole unit of work in one, last in the handler"
)


_OPEN_ALREADY = (
    "another ctx.transaction() (or ctx.async_transaction()) of this job is open (in a task or thread"
    " of the handler's): each completes the job, so only one can commit. Do the whole unit of work in one"
)

# Test-and-set of a job's open completing transaction: a sync handler's threads may race.
_OPENING = threading.Lock()


def refuse_second_completion(completed: bool) -> None:
    if completed:
        raise ConfigurationError(_COMPLETED_ALREADY)


@contextmanager
def one_completing_transaction(job: Any) -> Iterator[None]:
    """Hold ``job``'s one completing transaction for the block, or raise ConfigurationError
    before it runs. Refused only once the first had completed, a second opened while the
    first was open (the handler's tasks or threads, a batch each) ran its block; then one
    committed the completion, and the other's effects rolled back as a lost lease (perform()
    committed both): a batch silently dropped. A failed one frees it (a handler may retry)."""
    with _OPENING:
        refuse_second_completion(job.completed_in_tx)
        if job.in_transaction:
            raise ConfigurationError(_OPEN_ALREADY)
        job.in_transaction = True
    try:
        yield
    finally:
        job.in_transaction = False


_ON_THE_LOOP = (
    "ctx.transaction() was called on the worker's event loop (an async handler): its sync Session"
    " would block the loop for the whole transaction, and with it the worker's heartbeats, claims,"
    " timeouts and other jobs (a lock wait past the lease let another worker run them again). Use"
    " `async with ctx.async_transaction() as session:`, or run the sync block with anyio.to_thread.run_sync"
)


def check_app_engine(engine: Any, param: str) -> None:
    """A worker's ``engine=`` (a sync ``Engine``) or ``async_engine=`` (an ``AsyncEngine``)
    of PostgreSQL, refused when the worker is built otherwise: swapped (an AsyncEngine as
    ``engine=``), every attempt of a handler using ``ctx.transaction()`` failed with
    SQLAlchemy's AsyncContextNotStarted and a never-awaited coroutine (a sync Engine as
    ``async_engine=``: ArgumentError), the jobs retried until dead; a URL string raised an
    AttributeError."""
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

    want, other, swap = ((Engine, AsyncEngine, "async_engine") if param == "engine"
                         else (AsyncEngine, Engine, "engine"))
    if not isinstance(engine, want):
        hint = (f"; pass it as {swap}=" if isinstance(engine, other)
                else "; a URL goes in the worker's first argument")
        raise ConfigurationError(
            f"{param}= takes a SQLAlchemy {want.__name__} (create_{'async_' if want is AsyncEngine else ''}engine()),"
            f" not {type(engine).__name__}{hint}")
    if engine.dialect.name != "postgresql":
        raise ConfigurationError(f"{param}= must be a PostgreSQL engine, not {engine.dialect.name!r}:"
                                 " ctx.transaction() completes the job in the queue's database")
    if want is Engine and engine.dialect.is_async:
        # An AsyncEngine's sync_engine, or create_engine() of an async driver: its driver
        # runs only in an AsyncEngine's greenlets, and every ctx.transaction() failed
        # with MissingGreenlet, the jobs retried until dead.
        raise ConfigurationError(
            f"engine= takes a sync driver's Engine, not one of {engine.dialect.driver} (an async driver): pass"
            " the AsyncEngine as async_engine=, and a postgresql+psycopg:// Engine (or none) as engine=")
    refuse_autocommit_engine(engine, param)


def refuse_autocommit_engine(engine: Any, param: str) -> None:
    """A worker's ``engine=`` / ``async_engine=`` set to AUTOCOMMIT, refused when the worker
    is built (as SQLAlchemy reads it: the engine's execution option, else the level it
    set on connect)."""
    sync = getattr(engine, "sync_engine", engine)
    level = engine.get_execution_options().get("isolation_level") or getattr(
        sync.dialect, "_on_connect_isolation_level", None)
    if level == "AUTOCOMMIT":
        raise ConfigurationError(f"{_AUTOCOMMIT}: pass {param}= an engine without isolation_level='AUTOCOMMIT'"
                                 " (engine.execution_options(isolation_level='READ COMMITTED') of it, say)")


def _refuse_autocommit_connection(connection: Any) -> None:
    """The same for a connection in autocommit some other way (the driver's own
    ``connect_args={"autocommit": True}``): checked before the handler writes anything."""
    if getattr(connection.connection.dbapi_connection, "autocommit", False) is True:
        raise ConfigurationError(f"{_AUTOCOMMIT}: the worker's engine hands out connections in autocommit mode")


def cancellation_pending() -> bool:
    """Whether the current task is being cancelled: by a cancel scope around it (anyio's
    -inf deadline), or by ``task.cancel()`` (Python 3.11+ counts the requests)."""
    if anyio.current_effective_deadline() == -math.inf:
        return True
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return cancelling is not None and cancelling() > 0


def _from_cancellation(exc: BaseException) -> bool:
    """``exc`` was raised by (or while handling) a cancellation: a CancelledError in its chain."""
    seen: Optional[BaseException] = exc
    for _ in range(16):  # a chain is short; a cycle is not followed for ever
        if seen is None:
            return False
        if isinstance(seen, asyncio.CancelledError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@functools.lru_cache(maxsize=None)
def _nonblocking_cancel() -> bool:
    return bool(psycopg.capabilities.has_cancel_safe())  # libpq 17 or later


def _cancel_key(pgconn: Any) -> Any:
    """What cancels ``pgconn``'s statement, even once it is closed: a cancel connection
    (libpq 17+), else the cancel key of an older libpq."""
    return pgconn.cancel_conn() if _nonblocking_cancel() else pgconn.get_cancel()


def _send_cancel(key: Any, timeout: float) -> None:
    """Send the cancel request of ``key`` (:func:`_cancel_key`) and wait for the server to
    take it, for at most ``timeout`` seconds. A cancel connection is polled, its socket
    waited on without the GIL: the blocking PQcancel() of psycopg's C implementation held
    the GIL until the server answered, and the worker's event loop, its heartbeats and
    every handler stood still meanwhile (a remote server's round trips; against one that
    cannot be reached, the connect timeout). An older libpq has only that one."""
    if not hasattr(key, "poll"):
        key.cancel()
        return
    deadline = time.monotonic() + timeout
    key.start()
    try:
        with selectors.DefaultSelector() as selector:
            while True:
                status = key.poll()
                if status == pq.PollingStatus.OK:
                    return
                if status == pq.PollingStatus.FAILED:
                    raise psycopg.OperationalError(key.get_error_message())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the cancel request was not answered within {timeout} s")
                sock = key.socket
                selector.register(sock, selectors.EVENT_READ if status == pq.PollingStatus.READING
                                  else selectors.EVENT_WRITE)
                try:
                    selector.select(left)
                finally:
                    selector.unregister(sock)
    finally:
        key.finish()


# A sync handler's ctx.transaction() Session: statements of session.execute() and of a
# flush check, first, that its job is not cancelled (``info[_CANCEL_CHECK]``). Listened on
# once, on this class: per Session, two event.listen() calls cost ~18 µs per transaction,
# and SQLAlchemy 2.0.30 refuses a listener on a Connection of an option engine (the
# worker's, mapping its schema).
_CANCEL_CHECK = "sa_jobs.cancel_check"


class _JobSession(Session):
    pass


def _check_cancel(session: Session) -> None:
    check = session.info.get(_CANCEL_CHECK)
    if check is not None:
        check()


event.listen(_JobSession, "do_orm_execute", lambda state: _check_cancel(state.session))
event.listen(_JobSession, "before_flush", lambda session, context, instances: _check_cancel(session))


# SQLAlchemy Connections whose statement a cancellation interrupted (SQLAlchemy then
# invalidated them): a handler that caught its own deadline (``anyio.move_on_after()``)
# left no cancellation for its block's exit to see, and its statement ran on.
_INTERRUPTED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _note_interrupted(context: Any) -> None:
    """``handle_error`` of the worker's async engine: an exit exception (a cancellation) out
    of a statement, as SQLAlchemy sees it (it invalidates the connection for it)."""
    if context.connection is not None and not isinstance(context.original_exception, Exception):
        _INTERRUPTED.add(context.connection)


def watch_interrupted_statements(engine: Any) -> None:
    """Note, on ``engine`` (the worker's async one: made from its URL, or the app's own
    ``async_engine=``), the statements a cancellation interrupted. Once per engine: an
    app's engine may serve several workers, or runs of one."""
    target = getattr(engine, "sync_engine", engine)
    if not event.contains(target, "handle_error", _note_interrupted):
        event.listen(target, "handle_error", _note_interrupted)


_INTERRUPTED_MESSAGE = (
    "a statement of ctx.async_transaction() was interrupted by a cancel scope inside the block"
    " (anyio.move_on_after() or the like, caught by the handler): the driver closed the connection,"
    " so the transaction is lost and nothing of it commits (its statement is cancelled on the server)."
    " Put such a deadline around the whole transaction, or let its error propagate"
)


class _ServerStatement:
    """Cancels on the server the statement a job's transaction has running there.

    psycopg answers a cancelled await with a cancel request, but anyio cancels every await
    in a cancelled scope, that request's too: psycopg then closed the connection, and the
    server ran the statement to its end (``SELECT pg_sleep(30)``: 30 s, an UPDATE's row
    locks held all along) after its job was cancelled, timed out, lost its lease or was
    given back. A sync handler's statement, in a thread nothing interrupts, ran on alike.
    The cancel key is taken as the transaction begins: it outlives the closed connection.
    Drivers other than psycopg 3 (no ``pgconn``) are left as they are.
    """

    __slots__ = ("_connection", "_pgconn", "_key", "_sender", "_lock")

    def __init__(self, connection: Any) -> None:  # the transaction's (sync) SQLAlchemy Connection
        self._connection = connection
        _INTERRUPTED.discard(connection)
        self._pgconn: Any = getattr(connection.connection.driver_connection, "pgconn", None)
        self._key: Any = None if self._pgconn is None else _cancel_key(self._pgconn)
        self._sender: Optional[threading.Thread] = None  # stop_in_background()'s
        self._lock = threading.Lock()  # stop_in_background() (the loop) against settle() (the handler's thread)

    @property
    def interrupted(self) -> bool:
        """A cancellation interrupted a statement of this transaction (caught or not)."""
        return self._connection in _INTERRUPTED

    def _running(self, *, closed_too: bool) -> bool:
        """A statement is in flight, or (``closed_too``) may be: psycopg gave the connection up."""
        if self._key is None:
            return False
        if self._pgconn.status != pq.ConnStatus.OK:
            return closed_too
        return bool(self._pgconn.transaction_status == pq.TransactionStatus.ACTIVE)

    def _take_key(self) -> Any:
        """The cancel key, for one request: none other is sent (a cancel connection serves once)."""
        key, self._key = self._key, None
        return key

    @staticmethod
    def _cancel(key: Any) -> None:
        try:
            _send_cancel(key, CANCEL_REQUEST_WAIT)
        except Exception as exc:  # noqa: BLE001 - unreachable: nothing more to do from here
            log.warning("could not cancel a cancelled handler's statement on the server: %s", type(exc).__name__)

    async def stop(self, exc: BaseException) -> None:
        """After the handler's block raised ``exc``: cancel what is left running (the block's
        own cancellation does not cancel this). psycopg gives a connection up when a
        cancellation, the worker's or the handler's own (``anyio.fail_after()`` around a
        statement: its TimeoutError), interrupts its cancel request; a connection closed
        for another reason (the server or the network gone) had no statement left running.
        A cancellation the handler caught was seen by :func:`_note_interrupted`."""
        if self._running(closed_too=cancellation_pending() or _from_cancellation(exc) or self.interrupted):
            with anyio.move_on_after(CANCEL_REQUEST_WAIT, shield=True):  # its own thread: the app's
                await anyio.to_thread.run_sync(  # use of the default limiter cannot delay it
                    self._cancel, self._take_key(), abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))

    def stop_in_background(self) -> None:
        """From the event loop, when a sync handler's job is cancelled: a thread sends it."""
        with self._lock:
            if self._running(closed_too=False):
                self._sender = threading.Thread(target=self._cancel, args=(self._take_key(),),
                                                name="sa_jobs-cancel-statement", daemon=True)
                self._sender.start()

    def settle(self) -> None:
        """In the handler's thread, once its transaction ended and before its connection goes
        back to the pool: no cancel request starts from now, and one on its way is waited
        for (at most CANCEL_REQUEST_WAIT). A statement that ended on its own as the request
        was sent left the request to land on the connection's next user, the transaction of
        another job, whose statement it cancelled."""
        with self._lock:
            self._take_key()  # the loop's stop_in_background() sends nothing from now
            sender = self._sender
        if sender is not None:
            sender.join(CANCEL_REQUEST_WAIT)


class JobContext:
    """A handler's view of its job: identity, attempt, cancellation and a transactional Session."""

    __slots__ = ("_job", "_worker")

    def __init__(self, job: "ClaimedJob", worker: "Worker") -> None:
        self._job = job
        self._worker = worker

    @property
    def id(self) -> int:
        return self._job.id

    @property
    def kind(self) -> str:
        return self._job.kind

    @property
    def queue(self) -> str:
        return self._job.queue

    @property
    def attempt(self) -> int:
        """1 on the first run; a retry, rescue or replay increments it."""
        return self._job.attempt

    @property
    def max_attempts(self) -> int:
        return self._job.max_attempts

    @property
    def args(self) -> dict[str, Any]:
        return self._job.args

    @property
    def schema(self) -> str:
        """The Postgres schema of the queue this job came from."""
        return self._worker.schema

    @property
    def worker_id(self) -> str:
        return self._worker.worker_id

    @property
    def idempotency_key(self) -> str:
        """A key stable across retries of this job, for effects outside the database."""
        return f"sa_jobs:{self._worker.schema}:{self._job.id}"

    @property
    def cancelled(self) -> bool:
        """True once the job should stop: lease lost, timed out, shutting down or cancelled.

        Async handlers are cancelled for them; a sync handler (running in a thread, which
        cannot be interrupted) should check this, or call :meth:`raise_if_cancelled`.
        """
        return self._job.cancelled

    @property
    def lease_lost(self) -> bool:
        return self._job.lease_lost

    def set_progress(self, percent: float, message: str = "") -> None:
        """Report progress (0-100 and a short message) for status pages.

        Cheap: it is kept in memory and written by the worker's next heartbeat (at most
        about a second later) or with the job's outcome if that comes first, never one
        statement per call. Thread-safe enough for sync handlers: the last report wins.
        The report names this attempt, so that a status page shows no earlier attempt's
        progress once the job is retried (:func:`~sa_jobs.job_status`).
        """
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"progress percent must be within 0..100, not {percent!r}")
        if not isinstance(message, str):
            raise TypeError("progress message must be a string")
        self._job.progress_json = json.dumps(
            {"percent": percent, "message": _validate.pg_text(message[:200]), "attempt": self._job.attempt}
        )
        self._job.reported = True
        self._worker.nudge_heartbeat()  # from any thread (a sync handler's, or one it started)

    def raise_if_cancelled(self) -> None:
        if self._job.lease_lost:
            raise LeaseLostError(f"job {self.id}: this worker lost its lease; another may be running it")
        if self._job.cancelled:
            raise _Cancelled(self._job.cancel_reason or "cancelled")

    # ---- transactional completion ------------------------------------------------

    def _refuse_once_ended(self) -> None:
        """No ctx.async_transaction() of an attempt that has ended cut short: no cancel scope
        of the job is around one an abandoned sync handler's thread runs on the loop
        (anyio.from_thread.run()), and its completion found the row still 'running' under
        its token until the completer wrote the attempt's failure, and committed over it."""
        if self._job.ended:
            self.raise_if_cancelled()

    def _completion(self, result: Any):
        try:
            result_value = None if result is None else _validate.json_value(result)
        except InvalidArgsError as exc:
            # Permanent, as a returned result that is not JSON: retried as the handler's
            # error, the attempt ran again with the same result up to max_attempts, the
            # handler's work before its transaction (an email sent) each time.
            self._job.bad_result = exc
            raise
        # Another job may have taken this one's unique key while it ran (its states leave
        # 'running' out); if 'completed' holds the key too, the unique index would refuse
        # the handler's whole transaction. As the completer does for a returned result
        # (Completer._write_superseded), the job keeps its outcome and gives its key up.
        unique_key = case((gives_up_its_key("completed"), None), else_=_jobs.c.unique_key)
        stmt = (
            update(_jobs)
            .where(_jobs.c.id == self._job.id, _jobs.c.claim_token == self._job.token, _jobs.c.state == "running")
            .values(state="completed", finished_at=func.now(), lease_expires_at=None, result=result_value,
                    unique_key=unique_key)
        )
        options: dict[str, Any] = {}
        if self._worker.schema != DEFAULT_SCHEMA:
            options["schema_translate_map"] = {DEFAULT_SCHEMA: self._worker.schema}
        return stmt, options

    def _with_report(self, stmt: Any) -> Any:
        """The completion, writing the progress report no heartbeat has written yet (read
        at commit: the handler may report inside the block), as the completer writes one
        with an outcome; without it the finished job showed no progress."""
        report = self._job.progress_json
        return stmt if report is None else stmt.values(progress=json.loads(report))

    def _claim_of(self) -> Any:
        """The row's (state, claim token), read when the completion's fence refused it."""
        return select(_jobs.c.state, _jobs.c.claim_token).where(_jobs.c.id == self._job.id)

    def _refused(self, claim: Any) -> None:
        """The completion's fence refused the row, whose (state, claim token) is ``claim``.
        Cancelled under this claim (a cancel() whose notice the worker has not heard yet),
        the attempt ends cancelled, as the notifier and the completer judge such a row; it
        was taken for a lost lease (LeaseLostError, counted lease_lost) as if another worker
        had taken the job over. Set from the handler's thread: the attempt's own fields."""
        job = self._job
        if claim is not None and tuple(claim) == ("cancelled", job.token):
            job.cancelled_by_user = True
            if job.cancel_reason is None:
                job.cancel_reason = "cancelled"
            raise _Cancelled(f"job {self.id}: cancelled before commit; the transaction was rolled back")
        job.lease_lost = True
        raise LeaseLostError(
            f"job {self.id}: lease lost before commit; the transaction was rolled back"
        )

    @contextmanager
    def transaction(self, result: Any = None) -> Iterator["Session"]:
        """A Session whose commit also completes this job, fenced by the claim token.

        Database effects written through it happen exactly once: either they commit with
        the job's completion, or (lease lost, error, crash) neither does. Use it last in a
        sync handler; the handler's return value is not stored (pass ``result=``).
        """
        if threading.get_ident() == getattr(self._worker, "_loop_thread", None):
            raise ConfigurationError(_ON_THE_LOOP)
        refuse_second_completion(self._job.completed_in_tx)
        stmt, options = self._completion(result)
        job = self._job
        with one_completing_transaction(job):
            yield from self._transaction(job, stmt, options)

    def _transaction(self, job: "ClaimedJob", stmt: Any, options: dict[str, Any]) -> Iterator["Session"]:
        """The body of :meth:`transaction`, once it holds the job's one completing transaction."""

        def stop_statement() -> None:  # on cancel; the completion, once begun, is the fence's to judge
            if not job.completing:
                statement.stop_in_background()

        def refuse_once_cancelled() -> None:
            """No statement starts once the job is cancelled (its completion would be refused):
            a handler busy in Python when the cancel came ran its next one (a lock wait, a long
            query) to its end, holding the transaction's locks all along."""
            if job.cancelled and not job.completing:
                self.raise_if_cancelled()

        with _JobSession(self._worker.sync_engine()) as session:
            try:
                with session.begin():
                    connection = session.connection()
                    _refuse_autocommit_connection(connection)
                    statement = _ServerStatement(connection)
                    if job.stop_statements is None:
                        job.stop_statements = set()
                    job.stop_statements.add(stop_statement)
                    try:
                        session.info[_CANCEL_CHECK] = refuse_once_cancelled
                        yield session
                        session.flush()
                        # The completion is exempt from the check (once begun, the fence
                        # judges it), so it is made here: a handler's thread that left its
                        # block after its timeout (or a release) found its row still
                        # 'running' under its token until the completer wrote the failure,
                        # and committed its effects and 'completed' over an attempt that
                        # had failed. (A clean session's flush runs no check.)
                        refuse_once_cancelled()
                        job.completing = True
                        completion = self._with_report(stmt)
                        if cast("CursorResult[Any]", session.execute(completion, execution_options=options)).rowcount != 1:
                            self._refused(session.execute(self._claim_of(), execution_options=options).first())
                    finally:
                        # Before the COMMIT or ROLLBACK, which gives the connection back to the pool.
                        job.stop_statements.discard(stop_statement)
                        session.info.pop(_CANCEL_CHECK, None)
                        statement.settle()
            except BaseException:
                # Also when the COMMIT fails: the job is not completing, and its heartbeat
                # must go on (a handler may retry its transaction).
                job.completing = False
                raise
            job.completed_in_tx = True

    @asynccontextmanager
    async def async_transaction(self, result: Any = None) -> AsyncIterator["AsyncSession"]:
        """The ``AsyncSession`` twin of :meth:`transaction`, for async handlers."""
        refuse_second_completion(self._job.completed_in_tx)
        self._refuse_once_ended()
        stmt, options = self._completion(result)
        with one_completing_transaction(self._job):
            async with self._async_transaction(stmt, options) as session:
                yield session

    @asynccontextmanager
    async def _async_transaction(self, stmt: Any, options: dict[str, Any]) -> AsyncIterator["AsyncSession"]:
        """The body of :meth:`async_transaction`, once it holds the job's one completing transaction."""
        from sqlalchemy.ext.asyncio import AsyncSession

        async with AsyncSession(self._worker.async_engine()) as session:
            try:
                async with session.begin():
                    connection = (await session.connection()).sync_connection
                    _refuse_autocommit_connection(connection)
                    statement = _ServerStatement(connection)
                    try:
                        yield session
                        if statement.interrupted:  # the handler caught it: its completion cannot commit
                            raise StatementInterruptedError(_INTERRUPTED_MESSAGE)
                        await session.flush()
                        self._refuse_once_ended()
                        self._job.completing = True
                        completion = self._with_report(stmt)
                        res = cast("CursorResult[Any]", await session.execute(completion, execution_options=options))
                        if res.rowcount != 1:
                            self._refused((await session.execute(self._claim_of(), execution_options=options)).first())
                    except BaseException as exc:
                        await statement.stop(exc)  # before the rollback, which psycopg may not get to send
                        if (statement.interrupted and isinstance(exc, Exception) and not _from_cancellation(exc)
                                and not isinstance(exc, StatementInterruptedError) and not cancellation_pending()):
                            # The next statement's PendingRollbackError says nothing of why.
                            raise StatementInterruptedError(_INTERRUPTED_MESSAGE) from exc
                        raise
            except BaseException:
                self._job.completing = False  # as in transaction(): a failed COMMIT too
                raise
            self._job.completed_in_tx = True

    def __repr__(self) -> str:
        return f"<JobContext id={self.id} kind={self.kind} attempt={self.attempt}/{self.max_attempts}>"


class _Cancelled(Exception):
    """Raised by ``raise_if_cancelled`` for timeouts, shutdown and cancellation."""
