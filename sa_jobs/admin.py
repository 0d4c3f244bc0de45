"""Operator actions on job rows, through the caller's Session (sync) or Connection.

Async users call them with ``await session.run_sync(lambda s: retry(s, job_id))``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from sqlalchemy import BigInteger, Text, any_, case, cast, func, literal, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError

from . import _validate
from .errors import ConfigurationError, JobNotFoundError, real_seconds
from .model import Job, job_table
from .states import PENDING_STATES, STATUS_WORDS

_jobs = job_table()

REPLAYABLE_STATES = ("dead", "cancelled", "completed", "retryable", "scheduled")


def refuse_async_session(session: Any, name: str) -> None:
    """ConfigurationError for an AsyncSession or AsyncConnection where a sync one is needed.
    Its execute() is a coroutine: a read failed with a bare AttributeError or TypeError on
    it, and a write (``pause_queue``, ``set_queue_limits``) returned having done nothing,
    with only a "never awaited" warning to say so."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if isinstance(session, (AsyncSession, AsyncConnection)):
        raise ConfigurationError(f"{name}() needs a sync Session or Connection; from an AsyncSession use"
                                 f" `await session.run_sync(lambda s: {name}(s, ...))`")


def require_asyncio(what: str) -> None:
    """ConfigurationError unless an asyncio event loop runs this code: SQLAlchemy's
    AsyncEngine (psycopg's or asyncpg's async connections) runs on asyncio only. Under
    anyio's trio backend ``what`` failed with psycopg's bare "no running event loop" and
    never-awaited coroutine warnings."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigurationError(
            f"{what} needs an asyncio event loop (SQLAlchemy's AsyncEngine runs on asyncio);"
            " run it with asyncio.run() or anyio.run(..., backend='asyncio'), not trio") from None


def _refuse_engine_kind(engine: Any, name: str, *, async_: bool) -> None:
    """ConfigurationError for an engine of the other kind (or no engine): ``wait_for`` given
    an AsyncEngine failed with AsyncContextNotStarted and a never-awaited coroutine,
    ``wait_for_async`` given a sync Engine with SQLAlchemy's ArgumentError, and either given
    a URL string with an AttributeError."""
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    if async_ and not isinstance(engine, (AsyncEngine, AsyncConnection)):
        hint = "; call wait_for() with it" if isinstance(engine, (Engine, Connection)) else ""
        raise ConfigurationError(f"{name}() takes an AsyncEngine (create_async_engine()), not"
                                 f" {type(engine).__name__}{hint}")
    if not async_ and not isinstance(engine, (Engine, Connection)):
        hint = "; from async code, await wait_for_async() with it" if isinstance(
            engine, (AsyncEngine, AsyncConnection)) else ""
        raise ConfigurationError(f"{name}() takes an Engine (create_engine()), not {type(engine).__name__}{hint}")


def retry(session: Any, job_id: int) -> int:
    """Make a finished (dead, cancelled, completed) or waiting job available now.

    A replay of a dead job grants exactly one more attempt (``max_attempts`` becomes
    ``attempt + 1``); other states keep their budget, with at least one attempt left. A
    completed job's result is cleared (``errors`` keeps the history). Returns the job's id; raises :class:`JobNotFoundError` if no job
    with that id is in a replayable state (a running job cannot be retried), or if it is
    a unique job whose key another job holds now (retrying it would make a duplicate), or
    one that gave its key up when it ended (the key is no longer known).
    The caller's transaction stays usable either way.

    A job cancelled while its sync handler ran, which ignores ``ctx.cancelled``, may still
    run in its thread: its worker starts the retry once that call has returned, but another
    worker may run it at once, beside it (docs/core.md, "A thread cannot be interrupted").
    """
    refuse_async_session(session, "retry")
    check_job_id(job_id)
    ids = retry_many(session, [job_id])
    if not ids:
        holder = _key_holder(session, job_id)
        if holder is not None:
            raise JobNotFoundError(
                f"job {job_id} cannot be retried: its unique key ({holder[1]!r}) is held by job {holder[0]}"
                f" ({holder[2]}); retrying it would make a duplicate, retry it once that job has finished"
            )
        gave_up = select(_jobs.c.id).where(_jobs.c.id == job_id, _jobs.c.state.in_(REPLAYABLE_STATES), _GAVE_UP_ITS_KEY)
        if session.execute(gave_up).first() is not None:
            raise JobNotFoundError(
                f"job {job_id} cannot be retried: it gave up its unique key (it ended while another job held"
                " it), so a retry could not tell a duplicate; enqueue the job again instead"
            )
        raise JobNotFoundError(f"no job {job_id} in a replayable state ({', '.join(REPLAYABLE_STATES)})")
    return ids[0]


def retry_many(session: Any, job_ids: Iterable[int]) -> Sequence[int]:
    """:func:`retry` for many ids in one statement; returns the ids that were replayed.

    Ids not in a replayable state, and unique jobs whose key another job holds now, are
    skipped (not in the result), never an error for the whole batch.
    """
    refuse_async_session(session, "retry_many")
    ids = _job_ids(job_ids)
    if not ids:
        return []
    try:
        replayed = _retry_rows(session, ids)
    except _KeyTaken:
        # Another transaction took a key between the check and the UPDATE, or two of
        # ``ids`` share one free key: go row by row, skipping those the index refuses.
        replayed = []
        for job_id in ids:
            try:
                replayed.extend(_retry_rows(session, [job_id]))
            except _KeyTaken:
                pass
    if replayed:
        # The workers only wake on INSERT; a replay makes rows claimable without one.
        _execute(session, select(func.pg_notify(literal(_channel(session)), "")))
    return replayed


def _id_in(ids: Iterable[int]) -> Any:
    """``id = ANY(:ids)``: the ids as one bigint[] parameter. ``IN`` binds one parameter per
    id, and PostgreSQL's protocol refuses a statement with more than 65535 of them."""
    return _jobs.c.id == any_(literal(list(ids), ARRAY(BigInteger)))


class _KeyTaken(Exception):
    """The UPDATE hit ``jobs_unique_idx``; its savepoint was rolled back."""


# Another row (``_HOLDER``) holding the key of the row being retried: same kind and key,
# in one of its own unique states (what puts a row in jobs_unique_idx).
_HOLDER = _jobs.alias("holder")
_HOLDS_ITS_KEY = (
    _HOLDER.c.kind == _jobs.c.kind,
    _HOLDER.c.unique_key == _jobs.c.unique_key,
    _HOLDER.c.id != _jobs.c.id,
    _HOLDER.c.state == _HOLDER.c.unique_states.any_(),
)
# A retried row enters the index again if 'available' is one of its unique states.
_ENTERS_INDEX = literal("available") == _jobs.c.unique_states.any_()


def _key_held() -> Any:
    """EXISTS another row holding this row's unique key."""
    return select(literal(1)).select_from(_HOLDER).where(*_HOLDS_ITS_KEY).exists()


def gives_up_its_key(state: str) -> Any:
    """True for a row that would hold its unique key again in ``state`` (one of its unique
    states) while another row holds that key: the unique index would refuse the write, so
    such a row ends without its key (a transactional completion; cancel_many, the
    completer and the rescuer do the same). False, not NULL, for a row without unique states."""
    return func.coalesce(literal(state) == _jobs.c.unique_states.any_(), False) & _key_held()


# A row of a unique kind that gave its key up (unique_key NULL, its states kept): it ended
# while another job held the key (cancel_many, the completer, the rescuer, a transactional
# completion). Available again it would hold that key, which is no longer known: a retry
# made it a keyless duplicate of the job holding it, which no unique check saw again.
_GAVE_UP_ITS_KEY = _jobs.c.unique_key.is_(None) & _jobs.c.unique_states.isnot(None) & func.coalesce(
    _ENTERS_INDEX, False)


def _retry_refused() -> Any:
    """True for a row that retry() refuses whatever its state: a unique row whose key
    another row holds (it must not enter the index again), or one that gave its key up."""
    enters_index = _jobs.c.unique_key.isnot(None) & func.coalesce(_ENTERS_INDEX, False)
    return (enters_index & _key_held()) | _GAVE_UP_ITS_KEY


def _retry_rows(session: Any, ids: list[int]) -> list[int]:
    stmt = (
        update(_jobs)
        .where(_id_in(ids), _jobs.c.state.in_(REPLAYABLE_STATES), ~_retry_refused())
        .values(
            state="available",
            scheduled_at=func.now(),
            finished_at=None,
            # The replay's outcome is its own: a completed job's result stayed on show while
            # the replay waited, and with its "failed" status once the replay ended dead.
            result=None,
            # A dead job gets exactly one more attempt (also one discarded early); others
            # keep their budget, raised if needed so that at least one attempt is left.
            max_attempts=case(
                (_jobs.c.state == "dead", _jobs.c.attempt + 1),
                else_=func.greatest(_jobs.c.max_attempts, _jobs.c.attempt + 1),
            ),
        )
        .returning(_jobs.c.id)
    )
    # A savepoint, so that a key taken concurrently leaves the caller's transaction usable.
    # (Session.begin_nested flushes first: errors of the caller's own pending objects
    # surface here, outside the try.)
    savepoint = _savepoint(session)
    try:
        with savepoint:
            return [row[0] for row in session.execute(stmt)]
    except IntegrityError as exc:
        if _unique_index_violation(exc):
            raise _KeyTaken() from exc
        raise


def _savepoint(session: Any) -> Any:
    """A savepoint for one statement of the caller's transaction; none on a connection in
    autocommit (an AUTOCOMMIT engine, or the driver's own autocommit), where the statement
    is a transaction of its own and a failed one leaves nothing to roll back. There the
    SAVEPOINT failed ("can only be used in transaction blocks"): cancel() and retry()
    through an operator's AUTOCOMMIT engine raised psycopg's InternalError."""
    from contextlib import nullcontext

    from sqlalchemy.orm import Session

    connection = session.connection(bind_arguments={"bind": _jobs_bind(session)}) if isinstance(
        session, Session) else session
    if getattr(connection.connection.dbapi_connection, "autocommit", False) is True:
        if isinstance(session, Session):
            session.flush()  # as begin_nested() would: the caller's pending objects first
        return nullcontext()
    return session.begin_nested()


def _unique_index_violation(exc: Exception) -> bool:
    from .schema import UNIQUE_INDEX

    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) != "23505":
        return False
    diag = getattr(orig, "diag", None)
    return getattr(diag, "constraint_name", None) in (None, UNIQUE_INDEX)


def _key_holder(session: Any, job_id: int) -> Optional[tuple[int, str, str]]:
    """(id, unique key, state) of the job holding the key ``job_id`` would need to be retried."""
    stmt = (
        select(_HOLDER.c.id, _HOLDER.c.unique_key, _HOLDER.c.state)
        .where(_jobs.c.id == job_id, _jobs.c.state.in_(REPLAYABLE_STATES), _ENTERS_INDEX, *_HOLDS_ITS_KEY)
        .limit(1)
    )
    found = session.execute(stmt).first()
    return None if found is None else (found[0], found[1], found[2])


def _job_ids(job_ids: Iterable[Any]) -> list[int]:
    """Ids for the bulk actions: ints (not bools) or decimal strings of ints, else
    :class:`JobNotFoundError` before any SQL (``int(1.9)`` would act on job 1)."""
    if isinstance(job_ids, (str, bytes)):
        raise JobNotFoundError(f"expected a collection of job ids (integers), not {job_ids!r}")
    ids = []
    for value in job_ids:
        if isinstance(value, str) and (parsed := _validate.decimal_integer(value)) is not None:
            number = parsed
        elif isinstance(value, int) and not isinstance(value, bool):
            number = int(value)
        else:
            raise JobNotFoundError(f"job ids are integers, not {value!r}")
        if -MAX_JOB_ID - 1 <= number <= MAX_JOB_ID:  # past bigint no job matches (nor can SQL bind it)
            ids.append(number)
    return ids


def _jobs_bind(session: Any) -> Any:
    """The engine or connection where ``session`` writes jobs: a Session's bind for the
    Job mapper (a Session with per-mapper ``binds`` has no single bind, and its plain
    ``get_bind()`` raised UnboundExecutionError), or the Connection itself."""
    from sqlalchemy.orm import Session

    return session.get_bind(mapper=Job) if isinstance(session, Session) else session


def _execute(session: Any, statement: Any) -> Any:
    """``session.execute(statement)`` for a statement that names no jobs table (a NOTIFY,
    the queues table), sent where the jobs are: a Session with per-mapper ``binds`` could
    not place it, and cancel() of a running job, pause_queue() and the other queue
    settings failed with UnboundExecutionError (rolling back the caller's transaction)."""
    from sqlalchemy.orm import Session

    if isinstance(session, Session):
        # The bind, not mapper=Job: an INSERT with Job's mapper reads as an ORM enqueue.
        return session.execute(statement, bind_arguments={"bind": _jobs_bind(session)})
    return session.execute(statement)


def _schema(session: Any) -> str:
    from .schema import DEFAULT_SCHEMA

    bind = _jobs_bind(session)
    translate = (bind.get_execution_options() or {}).get("schema_translate_map") or {}
    return translate.get(DEFAULT_SCHEMA, DEFAULT_SCHEMA)


def _channel(session: Any) -> str:
    from .schema import channel_name

    return channel_name(_schema(session))


CANCELLABLE_STATES = (*PENDING_STATES, "running")


def cancel(session: Any, job_id: int) -> str:
    """Cancel a queued or running job; returns the state it was in.

    A queued job simply becomes ``cancelled``. A running job becomes ``cancelled`` at once
    too (its worker's later writes are fenced off), and its worker is told through
    NOTIFY (missed while its listener was down: when it reconnects, or at its next
    heartbeat) to cancel the handler: async handlers are
    cancelled, sync handlers see ``ctx.cancelled``. Raises :class:`JobNotFoundError` if
    the job does not exist or has already finished.
    """
    refuse_async_session(session, "cancel")
    check_job_id(job_id)
    done = cancel_many(session, [job_id])
    if not done:
        raise JobNotFoundError(f"no job {job_id} in a cancellable state ({', '.join(CANCELLABLE_STATES)})")
    return done[job_id]


def cancel_many(session: Any, job_ids: Iterable[int]) -> dict[int, str]:
    """:func:`cancel` for many ids in one statement; returns {id: previous state}.

    Jobs of one unique key end holding it at most once between them: one that would hold
    it again as ``cancelled`` gives it up if a job outside the statement holds it, or if
    another job of the statement keeps it (the first one that holds it now, else the
    lowest id)."""
    refuse_async_session(session, "cancel_many")
    from .queries import cancel_channel_name

    ids = _job_ids(job_ids)
    if not ids:
        return {}
    previous: dict[int, str] = {}
    for attempt in range(_CANCEL_ATTEMPTS):
        try:
            previous = _cancel_rows(session, ids)
            break
        except _KeyTaken as taken:
            # Another transaction committed a job of one of these keys into a state that
            # holds it while this UPDATE ran (a cancel of a sibling, an enqueue): the
            # index refused the second holder. The statement again, with a new snapshot,
            # sees it and gives the key up.
            if attempt == _CANCEL_ATTEMPTS - 1:
                assert taken.__cause__ is not None
                raise taken.__cause__ from None  # the IntegrityError
    running = [job_id for job_id, state in previous.items() if state == "running"]
    if running:
        # One statement for all of them: one per job was a round trip each (20,000 running
        # jobs cancelled took 8.9 s where as many waiting ones took 2.2 s).
        job_id = func.unnest(literal(running, ARRAY(BigInteger))).column_valued("id")
        channel = literal(cancel_channel_name(_schema(session)))
        _execute(session, select(func.pg_notify(channel, cast(job_id, Text))))
    return previous


# Each retry follows a commit of another transaction that took one of the keys: a handful
# of keys taken one after the other at the same moment.
_CANCEL_ATTEMPTS = 5


def _cancel_rows(session: Any, ids: list[int]) -> dict[int, str]:
    keeps_as_cancelled = func.coalesce(literal("cancelled") == _jobs.c.unique_states.any_(), False)
    target = (
        select(_jobs.c.id, _jobs.c.state, _jobs.c.kind, _jobs.c.unique_key,
               keeps_as_cancelled.label("keeps"),
               func.coalesce(_jobs.c.state == _jobs.c.unique_states.any_(), False).label("holds"))
        .where(_id_in(ids), _jobs.c.state.in_(CANCELLABLE_STATES))
        .with_for_update()
        .cte("target")
    )
    # Among the jobs of one key that would hold it as cancelled, the first keeps it: one
    # that holds it now, then the lowest id. (A window function, not an EXISTS over the
    # siblings per row: no quadratic scan of a large batch.)
    ranked = select(
        target.c.id, target.c.state,
        func.row_number().over(partition_by=(target.c.kind, target.c.unique_key, target.c.keeps),
                               order_by=(target.c.holds.desc(), target.c.id)).label("rank"),
    ).cte("ranked")
    # A job whose key another took meanwhile (a running one, its states leaving 'running'
    # out) would hold it again once cancelled if 'cancelled' is one of its states: the
    # unique index refused the cancel. As the completer does, it gives its key up. So
    # does one whose key a sibling in this statement keeps: two waiting jobs can share a
    # key that neither holds now (their states leave theirs out), and cancelling both
    # made two holders. A sibling that holds the key now but not as cancelled frees it:
    # only holders outside the statement count.
    outside = _HOLDER.c.id.notin_(select(target.c.id).scalar_subquery())
    held_outside = select(literal(1)).select_from(_HOLDER).where(*_HOLDS_ITS_KEY, outside).exists()
    gives_up = keeps_as_cancelled & (held_outside | (ranked.c.rank > 1))
    stmt = (
        update(_jobs)
        .where(_jobs.c.id == ranked.c.id)
        .values(state="cancelled", finished_at=func.now(), lease_expires_at=None,
                unique_key=case((gives_up, None), else_=_jobs.c.unique_key))
        .returning(_jobs.c.id, ranked.c.state)
    )
    # A savepoint, so that a key taken concurrently leaves the caller's transaction usable.
    savepoint = _savepoint(session)
    try:
        with savepoint:
            return {row[0]: row[1] for row in session.execute(stmt)}
    except IntegrityError as exc:
        if _unique_index_violation(exc):
            raise _KeyTaken() from exc
        raise


@dataclass(frozen=True)
class JobStatus:
    """What a user-facing status page shows about one job."""

    id: int
    status: str  # queued | running | done | failed | cancelled
    state: str  # the row's exact state
    attempt: int
    max_attempts: int
    # The last failure's first line, at most 200 characters, until the job completes: a
    # job waiting for its retry, or running it, shows why the attempt before failed.
    error: Optional[str]
    # It ended dead or cancelled, and retry() would take it now (not a unique job whose key
    # another job holds, or that gave its key up): what a status page offers a retry for
    # (retry() accepts more states).
    can_retry: bool
    result: Any
    progress: Any = None  # {"percent", "message"} reported by the current attempt (current_progress)


def current_progress(state: str, attempt: int, progress: Any) -> Any:
    """The stored ``progress`` if the job's current attempt reported it, else None.

    A report names its attempt (``ctx.set_progress``), and the row keeps the last one
    across retries: the claim cannot reset it (the limited claim is frozen DDL). The
    current attempt is the row's ``attempt`` while it runs or once it has finished, and
    the one it will run next, ``attempt + 1``, while it waits (a claim increments it). A
    snooze refunds its attempt, so the run after it is the same attempt and the snoozed
    run's report stays current. A report that names no attempt (from a version before
    reports did) counts as current: hiding it would blank every such job's progress
    after an upgrade, where showing it only keeps the old behaviour for rows in flight.
    """
    if not isinstance(progress, dict):
        return progress
    tag = progress.get("attempt")
    if not isinstance(tag, int) or isinstance(tag, bool):
        return progress
    current = attempt + 1 if state in PENDING_STATES else attempt
    return progress if tag >= current else None


def _last_attempt_failed(state: str, attempt: int, last: Any) -> bool:
    """Whether the last error recorded (``last``) is that of the attempt a status shows it
    for: a waiting job's last attempt (``attempt``; a snooze refunds its own), a running
    one's attempt before. A job replayed after it completed, or after an operator's
    cancel() (which records no error), showed the failure of an attempt before those, as if
    its last attempt had failed. An error that names no attempt (or a finished job's) is
    shown, as before."""
    tag = last.get("attempt") if isinstance(last, dict) else None
    if state not in (*PENDING_STATES, "running") or not isinstance(tag, int) or isinstance(tag, bool):
        return True
    return tag >= (attempt - 1 if state == "running" else attempt)


def job_status(session: Any, job_id: int) -> JobStatus:
    """The status of job ``job_id`` in a status page's words (seed 002); from an
    AsyncSession, ``await session.run_sync(job_status, job_id)``.

    An id no job can have (not an int, below 1 or past bigint) raises
    :class:`JobNotFoundError` before any SQL: it reached the query as a ProgrammingError
    or DataError that aborted the caller's transaction."""
    refuse_async_session(session, "job_status")
    check_job_id(job_id)
    row = session.execute(
        select(_jobs.c.id, _jobs.c.state, _jobs.c.attempt, _jobs.c.max_attempts, _jobs.c.errors, _jobs.c.result,
               _jobs.c.progress, _retry_refused().label("retry_refused"))
        .where(_jobs.c.id == job_id)
    ).one_or_none()
    if row is None:
        raise JobNotFoundError(f"no job {job_id}")
    error = None
    # Not only while 'retryable': the error vanished when the scheduler made the retry
    # available, and came back if that retry failed (a status page's message flickered).
    if row.errors and row.state != "completed" and _last_attempt_failed(row.state, row.attempt, row.errors[-1]):
        error = str(row.errors[-1].get("error", "")).splitlines()[0][:200] if row.errors[-1].get("error") else None
    progress = current_progress(row.state, row.attempt, row.progress)
    if isinstance(progress, dict):  # the attempt is the status's own
        progress = {k: v for k, v in progress.items() if k != "attempt"}
    return JobStatus(
        id=row.id, status=STATUS_WORDS[row.state], state=row.state, attempt=row.attempt,
        max_attempts=row.max_attempts, error=error,
        can_retry=row.state in ("dead", "cancelled") and not row.retry_refused, result=row.result, progress=progress,
    )


FINAL_STATUSES = ("done", "failed", "cancelled")

# The least time one read of a wait is given, however little of the timeout is left: a
# wait reads the job at least once (a finished job is returned even with timeout=0), and
# that read needs a moment, while a read the server does not answer must not hold the
# wait much past its deadline.
MIN_READ_SECONDS = 1.0
# How long past its server-side bound a read waits for the server's own word (a cancelled
# statement) before the wait gives its connection up as silent (see _SilentHostGuard).
SILENT_HOST_GRACE = 0.5


class _SilentHostGuard:
    """Ends a wait's read whose server went silent: past its bound, the read's socket is
    shut down (a duplicate of its descriptor, so a socket the driver closed and the
    system reused meanwhile is never touched), and the blocked driver call fails at once.

    The read's bound was the server's ``statement_timeout`` alone, which a server that
    never receives the read cannot enforce: a wait whose pooled connection's host stopped
    answering (packets dropped: a partition, a failed-over address, a hung proxy) waited
    for the operating system to give the connection up, 15 minutes or for ever, however
    short its timeout. A thread timer, so the same guard bounds a sync wait blocked in the
    driver and an async one whose event loop waits on the socket.

    The bound holds for each statement of the read (:meth:`step`; the first with the BEGIN
    the driver sends before it), as the server's does, not for the read as a whole: a read
    is four round trips (the BEGIN, the setting, the read, the ROLLBACK; a joined wait's
    own four), and over a link of 0.6 s round trips, every statement answered in time, the
    guard shut the healthy connection down mid-read (a caller's own, given in a
    transaction, with it) and a finished job's wait failed."""

    def __init__(self) -> None:
        import threading

        self.fired = False
        self._lock = threading.Lock()
        self._sock: Any = None
        self._timer: Any = None
        self._bound = 0.0  # seconds the server has for each statement, and the grace past it
        self._due = 0.0  # time.monotonic() past which the statement in flight is given up

    def arm(self, driver_connection: Any, seconds: float) -> None:
        import math
        import os
        import socket

        fileno = _socket_fileno(driver_connection)
        if fileno is None or not math.isfinite(seconds) or self._sock is not None:
            return
        try:
            duplicate = os.dup(fileno)
        except OSError:
            return
        try:
            sock = socket.socket(fileno=duplicate)
        except OSError:
            os.close(duplicate)
            return
        with self._lock:
            self._sock = sock
            self._bound = seconds + SILENT_HOST_GRACE
            self._due = time.monotonic() + self._bound
            self._start_timer(self._bound)

    def step(self) -> None:
        """A statement of the read is about to be sent: the server has its whole bound
        for it (the timer, set for an earlier due time, waits on when it comes)."""
        with self._lock:
            if self._sock is not None:
                self._due = time.monotonic() + self._bound

    def _start_timer(self, seconds: float) -> None:
        import threading

        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        import socket

        with self._lock:
            if self._sock is None:
                return
            left = self._due - time.monotonic()
            if left > 0:  # a later statement's bound
                self._start_timer(left)
                return
            self.fired = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def disarm(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            if self._timer is not None:
                self._timer.cancel()
            if sock is not None:
                sock.close()  # the duplicate only: the driver's socket stays as it is


def _socket_fileno(driver_connection: Any) -> Optional[int]:
    """The descriptor of a driver connection's socket (psycopg, psycopg2, asyncpg), or None."""
    try:
        if hasattr(driver_connection, "fileno"):  # psycopg 3 (sync and async), psycopg2
            return int(driver_connection.fileno())
        transport = getattr(driver_connection, "_transport", None)  # asyncpg
        sock = transport.get_extra_info("socket") if transport is not None else None
        return int(sock.fileno()) if sock is not None else None
    except Exception:  # noqa: BLE001 - closed, or a driver without one: no client-side bound
        return None


def _status_within(session: Any, job_id: int, seconds: float, timeout: float, *, joined: bool = False,
                   guard: Optional[_SilentHostGuard] = None) -> JobStatus:
    """:func:`job_status` in ``session``'s own transaction, under a ``statement_timeout``
    of ``seconds`` (at least :data:`MIN_READ_SECONDS`). A read the server does not answer
    in time (the jobs table locked by a migration, VACUUM FULL or LOCK TABLE; a server
    under a pile-up) is cancelled by the server and raises ``TimeoutError``: the deadline
    is otherwise only checked between reads, and a wait outlasted its timeout by as long
    as the lock was held. ``joined``: the transaction is the caller's (a Connection given
    in a transaction), which gets its own setting back after the read. ``guard``: armed
    with the connection, it ends the read on the client side if the server stays silent
    (its caller disarms it once the session is closed)."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    seconds = max(seconds, MIN_READ_SECONDS)
    # 0 is no timeout: a wait without a deadline (math.inf), or one past what the setting holds.
    millis = int(seconds * 1000) if seconds * 1000 < 2**31 - 1 else 0
    set_timeout = text("SELECT set_config('statement_timeout', :ms, :local)")
    # On a connection in autocommit (an AUTOCOMMIT engine, or the driver's own autocommit)
    # each statement is its own transaction, and a transaction-local setting ended with the
    # statement that made it: the read had no bound. There the setting is the session's,
    # and the connection's own value is put back after the read. In the caller's own
    # transaction the local setting outlived the wait, and cancelled the caller's next
    # statements after the wait's last bound: its value is put back too.
    pooled = session.connection().connection
    dbapi_connection = pooled.dbapi_connection
    if guard is not None and millis:
        guard.arm(pooled.driver_connection, seconds)

    def step() -> None:  # each statement has the guard's whole bound, as it has the server's
        if guard is not None:
            guard.step()

    autocommit = getattr(dbapi_connection, "autocommit", False) is True
    previous = None
    if autocommit or joined:
        previous = session.execute(text("SELECT current_setting('statement_timeout')")).scalar_one()
    failed = False  # the read failed on the server: a transaction it aborted runs nothing more
    try:
        step()
        session.execute(set_timeout, {"ms": f"{millis}ms", "local": not autocommit})
        step()
        return job_status(session, job_id)
    except DBAPIError as exc:
        failed = True
        if guard is not None and guard.fired:
            raise _silent(job_id, timeout, seconds) from None
        # Any DBAPIError: psycopg's query_canceled is an OperationalError, asyncpg's (an
        # async app's AsyncEngine) a plain DBAPIError, which once escaped the wait.
        if getattr(getattr(exc, "orig", None), "sqlstate", None) != "57014":  # query_canceled
            raise
        raise TimeoutError(
            f"job {job_id}: its status could not be read within {timeout}s (the server did not answer the read"
            f" within {millis / 1000:g}s)"
        ) from None
    finally:
        if previous is not None and (autocommit or not failed) and not getattr(dbapi_connection, "closed", False):
            step()
            session.execute(set_timeout, {"ms": previous, "local": not autocommit})
        step()  # the session's close (a ROLLBACK) is one more statement


def _silent(job_id: int, timeout: float, seconds: float) -> TimeoutError:
    return TimeoutError(f"job {job_id}: its status could not be read within {timeout}s (the server did not answer"
                        f" the read within {seconds + SILENT_HOST_GRACE:g}s; its connection was given up)")


# When a running wait's deadline passes (time.monotonic()): connections the engine opens
# meanwhile get a connect timeout of the time left. See _bound_connects.
_CONNECT_DEADLINE: ContextVar[Optional[float]] = ContextVar("sa_jobs_wait_connect_deadline", default=None)


def _connect_within(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
    """``do_connect``: inside a wait, a new connection gives up once the wait's time is
    left (at least :data:`MIN_READ_SECONDS`), or sooner if the engine says so."""
    import math
    import time

    deadline = _CONNECT_DEADLINE.get()
    if deadline is None or deadline == math.inf:
        return
    left = max(MIN_READ_SECONDS, deadline - time.monotonic())
    if dialect.driver == "asyncpg":  # float seconds, its connect()'s own keyword
        given = cparams.get("timeout")
        cparams["timeout"] = left if given is None else min(float(given), left)
        return
    # libpq's (psycopg, psycopg2): whole seconds in the connection string; 0 or none: no limit.
    given = cparams.get("connect_timeout")
    try:
        given_s = int(given) if given is not None else 0
    except (TypeError, ValueError):  # the driver's to refuse, as it would without the wait
        return
    ours = max(1, math.ceil(left))
    cparams["connect_timeout"] = ours if given_s <= 0 else min(given_s, ours)


def _bound_connects(engine: Any) -> None:
    """Have ``engine`` bound the connections it opens during a wait (once per engine):
    the wait's reads were bounded on the server, but connecting was not, and a wait on a
    host that takes connections and never answers (packets dropped, a hung proxy) ran for
    the driver's default connect timeout (psycopg: 130 s) past its deadline. The listener
    does nothing outside a wait."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    target = getattr(engine, "sync_engine", engine)  # an AsyncEngine's
    if isinstance(target, Engine) and not event.contains(target, "do_connect", _connect_within):
        event.listen(target, "do_connect", _connect_within)


def _check_timeout(timeout: float) -> float:
    """``timeout`` as float seconds. A NaN timeout, which no clock passes, waited for ever;
    ``math.inf`` is the way to. None (or a str) failed with a bare TypeError on the clock's
    arithmetic, an int past float's range with OverflowError (it is infinite here)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"wait_for: timeout must be a number of seconds (math.inf: no deadline), not {timeout!r}")
    if timeout != timeout:
        raise ValueError("wait_for: timeout is NaN; give seconds, or math.inf to wait without a deadline")
    return real_seconds(timeout)


def _read_again(exc: BaseException, seen: bool) -> bool:
    """Whether a wait's failed read is tried again (within its timeout): its connection was
    lost (SQLAlchemy invalidated it, and the pool reconnects at the next checkout), or,
    once a read has found the job, the database could not be reached (a restart, a
    failover). A wait's pooled connection cut between two reads (pg_terminate_backend, a
    proxy's idle timeout) raised OperationalError out of a wait whose job completed a
    moment later. The first read's connection errors (a wrong URL, a refused login) are
    raised as they are, but not the server's own word that it ended or cannot yet take the
    session (SQLSTATE class 57P: an administrator's command, a crash, a start-up): a new
    connection ended that way during SQLAlchemy's first-connect set-up is not flagged
    invalidated, and such a wait failed before its first read."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if not isinstance(exc, DBAPIError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    return (bool(exc.connection_invalidated) or sqlstate.startswith("57P")
            or (seen and isinstance(exc, (OperationalError, InterfaceError))))


def _unreachable(job_id: int, timeout: float, exc: BaseException) -> TimeoutError:
    """The wait's TimeoutError when its deadline passed while its reads failed (``exc``)."""
    from ._connection import describe

    return TimeoutError(f"job {job_id}: the database could not be read within {timeout}s"
                        f" ({describe(getattr(exc, 'orig', None) or exc)})")


def _joined(engine: Any) -> bool:
    """A Connection (or AsyncConnection) given in a transaction: the wait reads in the caller's."""
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

    return isinstance(engine, (Connection, AsyncConnection)) and engine.in_transaction()


def wait_for(engine: Any, job_id: int, timeout: float = 30.0) -> JobStatus:
    """Block until job ``job_id`` is done, failed (dead) or cancelled; its final status.

    Polls with a gentle backoff (20 ms growing to 500 ms). Raises ``TimeoutError``, also
    when the server does not answer a read in time (each read is bounded by the time left,
    at least :data:`MIN_READ_SECONDS`; so is each new connection the engine opens for it, by
    a connect timeout). A read the server does not answer is cancelled by the server, or,
    if its host went silent, its connection is given up :data:`SILENT_HOST_GRACE` later.
    ``timeout=math.inf`` waits without a deadline. A read that finds every connection of
    the engine's pool checked out waits for one up to the pool's ``pool_timeout`` (which
    the wait cannot shorten), then is tried again within the timeout.
    A read whose connection was lost, or, once the job has been found, that cannot reach
    the database, is tried again within the timeout. Raises :class:`JobNotFoundError` if
    there is no such job, also when it is deleted (or pruned) during the wait.
    """
    import time

    _refuse_engine_kind(engine, "wait_for", async_=False)
    timeout = _check_timeout(timeout)
    deadline = time.monotonic() + timeout
    _bound_connects(engine)
    token = _CONNECT_DEADLINE.set(deadline)
    try:
        return _wait(engine, job_id, timeout, deadline)
    finally:
        _CONNECT_DEADLINE.reset(token)


class _Polls:
    """What :func:`wait_for` and :func:`wait_for_async` decide after each read of the job,
    on their own clocks: return its final status, raise, or read again after a pause (20 ms
    growing to 500 ms)."""

    def __init__(self, job_id: int, timeout: float, deadline: float) -> None:
        self.job_id, self.timeout, self.deadline = job_id, timeout, deadline
        self.pause = 0.02
        self.seen = self.lost = False

    def failed(self, exc: Exception, now: float) -> None:
        """A read raised ``exc``: returns if it is read again, else raises."""
        from sqlalchemy.exc import TimeoutError as NoPooledConnection

        if isinstance(exc, NoPooledConnection):
            # Every connection of the engine's pool was checked out for its pool_timeout:
            # read again while the wait has time (one may be free by then). Raised as it
            # was, SQLAlchemy's own TimeoutError escaped an ``except TimeoutError``.
            if now >= self.deadline:
                raise TimeoutError(f"job {self.job_id}: no connection of the engine's pool was free"
                                   f" within {self.timeout}s") from exc
            return
        if not _read_again(exc, self.seen):
            raise exc
        # Past the deadline, a wait that has read nothing yet tries once more: its first
        # read may have met a connection the pool held from before (a restart).
        if now >= self.deadline and (self.seen or self.lost):
            raise _unreachable(self.job_id, self.timeout, exc) from exc
        self.lost = True

    def read(self, status: JobStatus, now: float) -> Optional[JobStatus]:
        """A read found ``status``: the final one, or None to read again; TimeoutError past the deadline."""
        self.seen = True
        if status.status in FINAL_STATUSES:
            return status
        if now >= self.deadline:
            raise TimeoutError(f"job {self.job_id} is still {status.state} after {self.timeout}s")
        return None

    def next_pause(self, now: float) -> float:
        pause = min(self.pause, max(0.0, self.deadline - now))
        self.pause = min(0.5, self.pause * 1.5)
        return pause


def _wait(engine: Any, job_id: int, timeout: float, deadline: float) -> JobStatus:
    import time

    from sqlalchemy.orm import Session

    polls = _Polls(job_id, timeout, deadline)
    while True:
        guard = _SilentHostGuard()
        left = deadline - time.monotonic()
        try:
            try:
                with Session(engine) as session:
                    status = _status_within(session, job_id, left, timeout, joined=_joined(engine), guard=guard)
            finally:
                guard.disarm()
        except Exception as exc:
            if guard.fired and not isinstance(exc, TimeoutError):
                raise _silent(job_id, timeout, max(left, MIN_READ_SECONDS)) from exc
            polls.failed(exc, time.monotonic())
        else:
            final = polls.read(status, time.monotonic())
            if final is not None:
                return final
        time.sleep(polls.next_pause(time.monotonic()))


async def wait_for_async(engine: Any, job_id: int, timeout: float = 30.0) -> JobStatus:
    """:func:`wait_for` for an ``AsyncEngine``, without blocking the event loop.

    As :func:`wait_for`, it reads the job at least once before the deadline counts: a
    cancel scope around the whole wait raised a bare ``TimeoutError`` for a job that had
    long finished when ``timeout`` was 0 or shorter than one round trip. Each read is
    bounded on the server, and a lost connection read through again, as in :func:`wait_for`.
    """
    import time

    import anyio

    _refuse_engine_kind(engine, "wait_for_async", async_=True)
    require_asyncio("wait_for_async()")
    timeout = _check_timeout(timeout)
    deadline = anyio.current_time() + timeout
    _bound_connects(engine)
    # The connect deadline is on time.monotonic(), which anyio's clock is not bound to be.
    token = _CONNECT_DEADLINE.set(time.monotonic() + timeout)
    try:
        return await _wait_async(engine, job_id, timeout, deadline)
    finally:
        _CONNECT_DEADLINE.reset(token)


async def _wait_async(engine: Any, job_id: int, timeout: float, deadline: float) -> JobStatus:
    import anyio
    from sqlalchemy.ext.asyncio import AsyncSession

    polls = _Polls(job_id, timeout, deadline)
    while True:
        guard = _SilentHostGuard()
        left = deadline - anyio.current_time()
        try:
            try:
                async with AsyncSession(engine) as session:
                    status = await session.run_sync(_status_within, job_id, left, timeout, joined=_joined(engine),
                                                    guard=guard)
            finally:
                guard.disarm()
        except Exception as exc:
            if guard.fired and not isinstance(exc, TimeoutError):
                raise _silent(job_id, timeout, max(left, MIN_READ_SECONDS)) from exc
            polls.failed(exc, anyio.current_time())
        else:
            final = polls.read(status, anyio.current_time())
            if final is not None:
                return final
        await anyio.sleep(polls.next_pause(anyio.current_time()))


def _queues_table(session: Any) -> Any:
    from sqlalchemy import Boolean, Column, DateTime, Integer, Interval, MetaData, Table, Text

    from .schema import DEFAULT_SCHEMA, QUEUES_TABLE

    return Table(
        QUEUES_TABLE, MetaData(), Column("name", Text, primary_key=True), Column("paused", Boolean),
        Column("updated_at", DateTime(timezone=True)), Column("concurrency", Integer),
        Column("partition_concurrency", Integer), Column("rate_limit", Integer), Column("rate_period", Interval),
        Column("running_bound", Integer),
        schema=DEFAULT_SCHEMA,
    )


def set_queue_paused(session: Any, queue: str, paused: bool) -> None:
    """Pause (or resume) ``queue`` for every worker of the cluster; persisted in the queues table.

    Paused workers finish what they run and claim nothing more from it until resumed.
    """
    refuse_async_session(session, "pause_queue" if paused else "resume_queue")
    from sqlalchemy.dialects.postgresql import insert

    _validate.queue_name(queue)
    table = _queues_table(session)
    stmt = insert(table).values(name=queue, paused=paused, updated_at=func.now())
    _execute(session, stmt.on_conflict_do_update(index_elements=["name"], set_={"paused": paused, "updated_at": func.now()}))
    if not paused:
        _execute(session, select(func.pg_notify(literal(_channel(session)), "")))


def pause_queue(session: Any, queue: str) -> None:
    set_queue_paused(session, queue, True)


def resume_queue(session: Any, queue: str) -> None:
    set_queue_paused(session, queue, False)


MAX_LIMIT = 2**31 - 1  # a queue's limits and rate count are integer columns


@dataclass(frozen=True)
class QueueLimits:
    """Cluster-wide limits of one queue, enforced by every worker's claim.

    ``concurrency``: jobs of the queue running at once across all workers;
    ``partition_concurrency``: jobs running at once per partition key (a kind's
    ``partition_by`` args, or ``.options(partition_key=...)``); ``rate``: at most
    ``rate[0]`` jobs started per ``rate[1]`` (a fixed window aligned to the epoch).
    ``None`` leaves that dimension unlimited. Per-worker ``concurrency`` still applies.
    """

    concurrency: Optional[int] = None
    partition_concurrency: Optional[int] = None
    rate: Optional[tuple[int, dt.timedelta]] = None

    def __post_init__(self) -> None:
        for name in ("concurrency", "partition_concurrency"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or not 1 <= value <= MAX_LIMIT):
                raise ConfigurationError(f"{name} must be an int from 1 to {MAX_LIMIT}, or None, not {value!r}")
        if self.rate is not None:
            if not isinstance(self.rate, tuple) or len(self.rate) != 2:
                raise ConfigurationError(f"rate must be (count, period), not {self.rate!r}")
            count, period = self.rate
            if type(count) is not int or not 1 <= count <= MAX_LIMIT:
                raise ConfigurationError(f"rate count must be an int from 1 to {MAX_LIMIT}, not {count!r}")
            if not isinstance(period, dt.timedelta) or period.total_seconds() < 0.001:
                raise ConfigurationError(f"rate period must be a timedelta of at least 1 ms, not {period!r}")

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or self.partition_concurrency is not None or self.rate is not None


def parse_rate(text: str) -> tuple[int, dt.timedelta]:
    """``"10/1s"``, ``"100/m"``, ``"5000/1h"``: a count per period (see :func:`parse_age`)."""
    count, sep, period = (text or "").partition("/")
    # ASCII digits: isdigit() passes '²', which int() refused with a ValueError.
    if not sep or not re.fullmatch(r"[0-9]+", count.strip()) or not period.strip():
        raise ConfigurationError(f"invalid rate {text!r}: use COUNT/PERIOD, such as 10/1s, 100/m or 5000/1h")
    period = period.strip()
    # A bare unit is one of it ("100/m"); ".5s" is half a second (it read as "1.5s").
    if period[:1] == ".":
        period = "0" + period
    elif period[:1] not in "0123456789":
        period = "1" + period
    try:
        age = parse_age(period)
    except ConfigurationError as exc:  # "invalid age '1x'" named neither the rate nor what was typed
        reason = str(exc).partition(": ")[2]
        if reason.startswith("use "):
            reason = "use COUNT/PERIOD, such as 10/1s, 100/m or 5000/1h"
        raise ConfigurationError(f"invalid rate {text!r}: {reason}") from None
    # The bounds QueueLimits holds a rate to, said of the text typed: `--rate 1/0s` was
    # refused as "rate period must be a timedelta of at least 1 ms, not datetime.timedelta(0)".
    if not 1 <= int(count) <= MAX_LIMIT:
        raise ConfigurationError(f"invalid rate {text!r}: the count is an integer from 1 to {MAX_LIMIT}")
    if age < dt.timedelta(milliseconds=1):
        raise ConfigurationError(f"invalid rate {text!r}: the period is at least 1 ms")
    return int(count), age


def set_queue_limits(session: Any, queue: str, limits: QueueLimits) -> None:
    """Set (replace) ``queue``'s cluster-wide limits; ``QueueLimits()`` removes them.

    Takes effect at every worker's next claim of the queue, in the caller's transaction.
    """
    refuse_async_session(session, "set_queue_limits")
    from sqlalchemy.dialects.postgresql import insert

    _validate.queue_name(queue)
    if not isinstance(limits, QueueLimits):
        raise TypeError(f"limits must be a QueueLimits, not {limits!r}")
    table = _queues_table(session)
    values = {
        "concurrency": limits.concurrency,
        "partition_concurrency": limits.partition_concurrency,
        "rate_limit": limits.rate[0] if limits.rate else None,
        "rate_period": limits.rate[1] if limits.rate else None,
        # Unknown: the next claim counts the running jobs (plain claims kept no bound).
        "running_bound": None,
        "updated_at": func.now(),
    }
    stmt = insert(table).values(name=queue, paused=False, **values)
    _execute(session, stmt.on_conflict_do_update(index_elements=["name"], set_=values))
    # Workers waiting on a queue that was limited look again at once.
    _execute(session, select(func.pg_notify(literal(_channel(session)), "")))


def queue_limits(session: Any, queue: str, *, lock: bool = False) -> QueueLimits:
    """The limits ``queue`` has now (``QueueLimits()`` when none).

    ``lock=True`` creates the queue's row if missing and locks it until the transaction
    ends, so a read-modify-write of the limits (``sa-jobs queues limit``) can't lose a
    change made at the same time by another one.
    """
    refuse_async_session(session, "queue_limits")
    from sqlalchemy.dialects.postgresql import insert

    table = _queues_table(session)
    query = select(table.c.concurrency, table.c.partition_concurrency, table.c.rate_limit, table.c.rate_period).where(
        table.c.name == _validate.queue_name(queue))
    if lock:
        # A row being inserted by another transaction makes this wait for it, then find it.
        _execute(session, insert(table).values(name=queue, paused=False).on_conflict_do_nothing(index_elements=["name"]))
        query = query.with_for_update(key_share=True)  # FOR NO KEY UPDATE, as the claim and the upsert
    row = _execute(session, query).first()
    if row is None:
        return QueueLimits()
    return QueueLimits(row[0], row[1], (row[2], row[3]) if row[2] is not None else None)


def paused_queues(session: Any) -> list[str]:
    """The queues paused cluster-wide, by name."""
    refuse_async_session(session, "paused_queues")
    table = _queues_table(session)
    return list(_execute(session, select(table.c.name).where(table.c.paused).order_by(table.c.name)).scalars())


# ---- operator queries: list, show, delete, queue overview (sa-jobs jobs/queues/dead) -------

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_AGE_DAYS = 365 * 1000  # as the Pruner's MAX_AGE


def parse_age(text: str) -> dt.timedelta:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` (or a plain number of seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "", re.ASCII)
    if match is None and re.fullmatch(r"\s*-\s*\.?\d.*", text or "", re.S):
        raise ConfigurationError(f"invalid age {text!r}: an age is 0 or more (how long ago), not negative")
    if match is None:
        raise ConfigurationError(f"invalid age {text!r}: use a number with a unit, such as 90s, 15m, 12h, 7d or 2w")
    seconds = float(match.group(1)) * _AGE_UNITS[match.group(2) or "s"]
    # now() - age must stay a timestamp (and a timedelta): refused here, not by the database.
    if seconds > _MAX_AGE_DAYS * 86400:
        raise ConfigurationError(f"invalid age {text!r}: at most {_MAX_AGE_DAYS}d")
    return dt.timedelta(seconds=seconds)


def check_state(state: str) -> str:
    from .states import ALL_STATES

    if state not in ALL_STATES:
        raise ConfigurationError(f"invalid state {state!r}: use one of {', '.join(ALL_STATES)}")
    return state


# Job ids are a bigint identity: an int past it reached SQL as a DataError (bigint out of
# range) that aborted the caller's transaction, where no job can have that id.
MAX_JOB_ID = 2**63 - 1


def check_job_id(value: Any) -> int:
    if type(value) is not int or not 1 <= value <= MAX_JOB_ID:
        raise JobNotFoundError(f"job ids are positive integers up to {MAX_JOB_ID}, not {value!r}")
    return value


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an operator command acts on; every given field must match.

    ``older_than`` / ``newer_than`` compare the job's ``created_at`` with the database clock.
    """

    ids: Sequence[int] = ()
    queues: Sequence[str] = ()
    kinds: Sequence[str] = ()
    states: Sequence[str] = ()
    older_than: Optional[Any] = None  # timedelta
    newer_than: Optional[Any] = None  # timedelta

    def __post_init__(self) -> None:
        for name in ("queues", "kinds", "states"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)):
                # Iterated, a string is its letters: queues="emails" matched queues e, m, a, ...
                raise ConfigurationError(f"JobFilter.{name} is a sequence of names, not {value!r}: use [{value!r}]")
        for i in self.ids:
            check_job_id(i)
        for name in self.queues:
            _validate.queue_name(name)
        for name in self.kinds:
            _validate.kind_name(name)
        for state in self.states:
            check_state(state)
        for name in ("older_than", "newer_than"):
            age = getattr(self, name)
            # A negative older_than matched every job (created before a moment to come); an
            # int reached SQL as an error that aborted the caller's transaction.
            if age is not None and (not isinstance(age, dt.timedelta) or age < dt.timedelta(0)):
                raise ConfigurationError(f"JobFilter.{name} is a timedelta of 0 or more (see parse_age), not {age!r}")

    @property
    def empty(self) -> bool:
        # An age of 0 is a filter too (a zero timedelta is false).
        return not (self.ids or self.queues or self.kinds or self.states) and self.older_than is None \
            and self.newer_than is None

    def where(self) -> list[Any]:
        c = _jobs.c
        clauses: list[Any] = []
        if self.ids:
            clauses.append(_id_in(self.ids))
        if self.queues:
            clauses.append(c.queue.in_(list(self.queues)))
        if self.kinds:
            clauses.append(c.kind.in_(list(self.kinds)))
        if self.states:
            clauses.append(c.state.in_(list(self.states)))
        if self.older_than is not None:
            clauses.append(c.created_at < func.now() - self.older_than)
        if self.newer_than is not None:
            clauses.append(c.created_at >= func.now() - self.newer_than)
        return clauses


LIST_COLUMNS = ("id", "kind", "queue", "state", "attempt", "max_attempts", "priority", "created_at",
                "scheduled_at", "finished_at")


MAX_LIST_LIMIT = 100_000  # rows list_jobs returns at most (they are held in memory)


def list_jobs(session: Any, where: JobFilter = JobFilter(), *, limit: int = 50) -> list[dict[str, Any]]:
    """Jobs matching ``where``, newest first, as plain dicts (plus ``error``: the last error's first line)."""
    refuse_async_session(session, "list_jobs")
    if type(limit) is not int or not 1 <= limit <= MAX_LIST_LIMIT:
        raise ConfigurationError(f"limit must be an int in 1..{MAX_LIST_LIMIT}, not {limit!r}")
    last_error = _jobs.c.errors[-1]["error"].astext
    stmt = (
        select(*(_jobs.c[name] for name in LIST_COLUMNS), last_error.label("error"))
        .where(*where.where())
        .order_by(_jobs.c.id.desc())
        .limit(limit)
    )
    rows = []
    for row in session.execute(stmt).mappings():
        item = dict(row)
        if item["error"]:
            item["error"] = item["error"].splitlines()[0][:120]
        rows.append(item)
    return rows


def show_job(session: Any, job_id: int) -> dict[str, Any]:
    """Every column of job ``job_id``; ``progress`` only if the current attempt reported it
    (:func:`current_progress`), as a status page shows it."""
    refuse_async_session(session, "show_job")
    check_job_id(job_id)
    row = session.execute(select(_jobs).where(_jobs.c.id == job_id)).mappings().one_or_none()
    if row is None:
        raise JobNotFoundError(f"no job {job_id}")
    job = dict(row)
    job["progress"] = current_progress(job["state"], job["attempt"], job["progress"])
    return job


def matching_ids(session: Any, where: JobFilter, *, limit: Optional[int] = None, after: Optional[int] = None,
                 lock: bool = False, skip_locked: bool = False) -> list[int]:
    """Ids of the jobs matching ``where``, oldest first.

    ``after``: only ids above it (a long run reads one batch after another, never the
    whole match at once). ``lock``: lock the rows (``FOR UPDATE``, ``skip_locked``: leave
    out rows another transaction holds), so that what the caller's transaction does to
    them next acts on rows that still match: a worker cannot claim them meanwhile, and one
    that changed since it was listed (claimed, replayed, finished) is left out."""
    refuse_async_session(session, "matching_ids")
    _check_count("limit", limit)
    if after is not None and (type(after) is not int):
        raise ConfigurationError(f"after must be a job id (an int), not {after!r}")
    stmt = select(_jobs.c.id).where(*where.where()).order_by(_jobs.c.id)
    if after is not None:
        stmt = stmt.where(_jobs.c.id > after)
    if limit is not None:
        stmt = stmt.limit(limit)
    if lock or skip_locked:
        stmt = stmt.with_for_update(skip_locked=skip_locked)
    return list(session.scalars(stmt))


def _check_count(name: str, value: Optional[int]) -> None:
    """A row count given by the caller: checked here, as SQL would abort the transaction."""
    if value is not None and (type(value) is not int or value < 0):
        raise ConfigurationError(f"{name} must be an int >= 0, not {value!r}")


def count_matching(session: Any, where: JobFilter, *, limit: Optional[int] = None) -> int:
    """How many jobs match ``where`` (at most ``limit``)."""
    refuse_async_session(session, "count_matching")
    _check_count("limit", limit)
    matching = select(_jobs.c.id).where(*where.where())
    if limit is not None:
        matching = matching.limit(limit)
    return int(session.scalar(select(func.count()).select_from(matching.subquery())))


DELETABLE_STATES = ("scheduled", "available", "retryable", "completed", "dead", "cancelled")


def delete_many(session: Any, job_ids: Iterable[int]) -> list[int]:
    """Delete jobs that are not running (cancel a running job first); returns the ids deleted.

    Rows another transaction holds (a worker claiming them) are skipped, not waited for.
    """
    from sqlalchemy import delete

    refuse_async_session(session, "delete_many")
    ids = _job_ids(job_ids)  # as the other bulk actions: an id no job has finds nothing
    if not ids:
        return []
    target = (
        select(_jobs.c.id).where(_id_in(ids), _jobs.c.state.in_(DELETABLE_STATES))
        .with_for_update(skip_locked=True).cte("target")
    )
    stmt = delete(_jobs).where(_jobs.c.id == target.c.id).returning(_jobs.c.id)
    return sorted(row[0] for row in session.execute(stmt))


def queue_overview(session: Any) -> list[dict[str, Any]]:
    """One row per queue (with jobs, or with settings): job count per state and paused."""
    refuse_async_session(session, "queue_overview")
    from .states import ALL_STATES

    table = _queues_table(session)
    counts: dict[str, dict[str, Any]] = {}
    for queue, state, n in session.execute(
        select(_jobs.c.queue, _jobs.c.state, func.count()).group_by(_jobs.c.queue, _jobs.c.state)
    ):
        counts.setdefault(queue, {s: 0 for s in ALL_STATES})[state] = n
    settings = {
        r.name: r for r in _execute(
            session,
            select(table.c.name, table.c.paused, table.c.concurrency, table.c.partition_concurrency,
                   table.c.rate_limit, table.c.rate_period))
    }
    rows = []
    for name in sorted(set(counts) | set(settings)):
        per_state = counts.get(name, {s: 0 for s in ALL_STATES})
        s = settings.get(name)
        rows.append({
            "queue": name, **per_state, "paused": bool(s and s.paused),
            "concurrency": s.concurrency if s else None,
            "partition_concurrency": s.partition_concurrency if s else None,
            "rate": format_rate((s.rate_limit, s.rate_period)) if s and s.rate_limit is not None else None,
        })
    return rows


def format_rate(rate: tuple[int, dt.timedelta]) -> str:
    """A rate as :func:`parse_rate` reads it: ``(10, timedelta(seconds=1))`` is ``"10/1s"``."""
    return f"{rate[0]}/{_format_period(rate[1])}"


def _format_period(period: dt.timedelta) -> str:
    seconds = period.total_seconds()
    for unit in ("w", "d", "h", "m"):
        size = _AGE_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    # Exact to the microsecond a timedelta holds: ``%g`` kept six significant digits, so
    # 1234.5678 s was shown as 1234.57s, 1.000001 s as 1s and 1234567 s as 1.23457e+06s,
    # which parse_rate (and ``--rate``) refuses.
    whole, micros = divmod(period // dt.timedelta(microseconds=1), 1_000_000)
    return f"{whole}.{micros:06d}".rstrip("0").rstrip(".") + "s"
