"""Helpers for testing code that enqueues and handles jobs, and a pytest plugin.

Use it from a conftest: ``pytest_plugins = ["sa_jobs.testing"]``. The fixtures give each
test the queue in a Postgres schema of its own, on ``SA_JOBS_TEST_DATABASE_URL`` or an
embedded server:

- ``sa_jobs_database_url``: the server (session scope; an embedded one runs with
  ``fsync`` and ``full_page_writes`` off, as its data is deleted after the session);
- ``sa_jobs_schema``: a fresh installed schema, dropped after the test with all it holds;
- ``sa_jobs_engine``: an Engine mapping ``sa_jobs`` to that schema.

Helpers: :func:`perform` (run a handler now, no worker), :func:`drain` (a real worker until
nothing is claimable), :func:`enqueued` / :func:`assert_enqueued` / :func:`refute_enqueued`,
and :func:`inline` (jobs run right after each commit, by a real worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import datetime as dt
import inspect
import json
import os
import sys
import uuid
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import anyio
from sqlalchemy import Boolean, Column, DateTime, Integer, Interval, MetaData, Table, Text, event, func, select, type_coerce
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection
from sqlalchemy.exc import UnboundExecutionError
from sqlalchemy.orm import Session

from . import _validate, schema as schema_mod
from ._url import sqlalchemy_url, twin_engine
from .admin import check_state, refuse_async_session
from .errors import ConfigurationError, UnknownKindError
from .model import Job, is_async_handler, job_table
from .schema import DEFAULT_SCHEMA, QUEUES_TABLE
from .unique import ENQUEUED_INFO_KEY, note_enqueued

__all__ = ["assert_enqueued", "drain", "enqueued", "inline", "perform", "refute_enqueued"]


# ---- perform: the handler alone -----------------------------------------------------


class _TestJob:
    """Stands in for the worker's claim record: enough for a JobContext."""

    def __init__(self, kind: str, queue: str, args: dict[str, Any], attempt: int, max_attempts: int, job_id: int) -> None:
        self.id, self.kind, self.queue, self.args = job_id, kind, queue, args
        self.attempt, self.max_attempts = attempt, max_attempts
        self.token = uuid.uuid4()
        self.lease_lost = self.completing = self.completed_in_tx = self.in_transaction = False
        self.cancel_reason: Optional[str] = None
        self.progress_json: Optional[str] = None
        self.reported = False
        self.progress: list[str] = []
        self.tx_result: Any = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    def complete_with(self, result: Any) -> None:
        """A transaction completed the job: ``result`` is the job's, not the handler's return."""
        self.completed_in_tx, self.tx_result = True, result


def _check_result(result: Any) -> None:
    """As JobContext.transaction() does before its Session opens: plain JSON only."""
    if result is not None:
        _validate.json_value(result)


class _TestRuntime:
    """The worker as a JobContext sees it, with transactions that simply commit."""

    def __init__(self, engine: Any, schema: str) -> None:
        self._engine, self.schema, self.worker_id = engine, schema, "sa_jobs.testing"

    def sync_engine(self) -> Any:
        from .worker.context import refuse_autocommit_engine

        if self._engine is None:
            raise ConfigurationError("perform(..., engine=...) is needed for ctx.transaction()")
        # As a worker refuses it when built: perform() committed through it and passed.
        refuse_autocommit_engine(self._engine, "perform(..., engine=)")
        return self._engine

    def async_engine(self) -> Any:
        return _async_twin(self.sync_engine())

    def nudge_heartbeat(self) -> None:
        pass


class _TestContext:
    """A JobContext whose transaction() commits without fencing (there is no claim)."""

    def __new__(cls, job: _TestJob, runtime: _TestRuntime) -> Any:
        from .worker.context import JobContext

        class Context(JobContext):
            __slots__ = ()

            @contextlib.contextmanager
            def transaction(self, result: Any = None):  # type: ignore[override]
                from .worker.context import _ON_THE_LOOP, one_completing_transaction, refuse_second_completion

                if _in_event_loop():  # as a worker refuses it, so that a test sees it too
                    raise ConfigurationError(_ON_THE_LOOP)
                refuse_second_completion(job.completed_in_tx)  # as a worker does
                _check_result(result)
                engine = runtime.sync_engine()
                # perform(engine=an AsyncEngine): a plain engine on its database (a Session
                # of the AsyncEngine failed with AsyncContextNotStarted).
                plain = _plain_twin(engine) if _loop_bound(engine) else engine
                try:
                    with one_completing_transaction(job):
                        with Session(plain) as session, session.begin():
                            yield session
                        job.complete_with(result)  # before another may open
                finally:
                    if plain is not engine:
                        plain.dispose()

            @contextlib.asynccontextmanager
            async def async_transaction(self, result: Any = None):  # type: ignore[override]
                from sqlalchemy.ext.asyncio import AsyncSession

                from .admin import require_asyncio
                from .worker.context import one_completing_transaction, refuse_second_completion

                refuse_second_completion(job.completed_in_tx)
                _check_result(result)
                require_asyncio("ctx.async_transaction()")
                with one_completing_transaction(job):
                    engine = runtime.async_engine()
                    try:
                        async with AsyncSession(engine) as session, session.begin():
                            yield session
                    finally:
                        await engine.dispose()
                    job.complete_with(result)  # before another may open

        return Context(job, runtime)  # type: ignore[arg-type]


def perform(job: Job, *, engine: Any = None, attempt: int = 1) -> Any:
    """Run ``job``'s handler now, in this thread, and return its result.

    No worker and no claim: a unit test of the handler's logic. Exceptions propagate,
    and a return value a worker could not store as the job's JSON result raises
    :class:`~sa_jobs.InvalidArgsError` (a worker would end the job dead). The result is
    the one a worker would store: ``ctx.transaction(result=...)``'s, if one committed.
    ``ctx.transaction()`` commits on ``engine`` (required only if the handler uses it).
    Async handlers run on a fresh event loop; call :func:`perform_async` from async tests.
    """
    handler, ctx, args = _prepare(job, engine, attempt)
    if is_async_handler(handler):
        if _in_event_loop():  # anyio.run() would fail with a message naming neither
            raise ConfigurationError(f"perform(): {type(job).__name__}'s handler is async and an event loop"
                                     " runs in this thread; use await perform_async(job)")
        return _result(ctx, anyio.run(lambda: handler(ctx, **args)))
    returned = handler(ctx, **args)
    if inspect.iscoroutine(returned):  # an async handler behind a plain decorator: a worker awaits it
        if _in_event_loop():
            returned.close()
            raise ConfigurationError(f"perform(): {type(job).__name__}'s handler returned a coroutine and an event"
                                     " loop runs in this thread; use await perform_async(job)")
        returned = anyio.run(lambda: returned)
    return _result(ctx, returned)


async def perform_async(job: Job, *, engine: Any = None, attempt: int = 1) -> Any:
    """:func:`perform` from inside an event loop."""
    handler, ctx, args = _prepare(job, engine, attempt)
    if is_async_handler(handler):
        return _result(ctx, await handler(ctx, **args))
    returned = await anyio.to_thread.run_sync(lambda: handler(ctx, **args))
    if inspect.iscoroutine(returned):  # as in perform()
        returned = await returned
    return _result(ctx, returned)


def _result(ctx: Any, returned: Any) -> Any:
    """The job's result as a worker stores it: a completing transaction's ``result=``
    (the handler's return value is then not stored), else what the handler returned."""
    if ctx._job.completed_in_tx:
        return _storable(ctx._job.tx_result)
    return _storable(returned)


def _storable(result: Any) -> Any:
    """``result`` as a worker's row gives it back (InvalidArgsError if a worker could not
    store it): jsonb has no tuple and keeps numbers as numeric, so the handler's own
    objects compared equal where the stored result did not (a tuple for a list)."""
    if result is None:
        return None
    _validate.json_text(result)  # the worker's check: plain JSON, within MAX_RESULT_BYTES
    return _validate.as_stored(result)


def _prepare(job: Job, engine: Any, attempt: int) -> tuple[Any, Any, dict[str, Any]]:
    cls = type(job)
    options = cls.__sa_jobs_options__
    if options is None or cls.__sa_jobs_handler__ is None:
        raise ConfigurationError(f"{cls.__name__} has no handler registered")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        # A worker's attempts count from 1; 0 or "2" reached the handler as ctx.attempt.
        raise ConfigurationError(f"perform(): attempt is an int from 1, not {attempt!r}")
    job = _loaded(job, engine)
    schema = DEFAULT_SCHEMA
    if engine is not None:
        schema = (engine.get_execution_options().get("schema_translate_map") or {}).get(DEFAULT_SCHEMA, DEFAULT_SCHEMA)
    # Checked as a flush checks them: changed in place since construction, a NaN reached
    # the handler (no worker ever sees one), an int key came as a str, a set raised a bare
    # TypeError. Then as a worker reads them back from jsonb: lists for tuples, numbers as
    # numeric gives them back, and copies, not the caller's objects.
    checked = _validate.json_payload(job.args if job.args is not None else {}, max_bytes=options.max_args_bytes)
    args = json.loads(json.dumps(checked), parse_float=_validate.jsonb_number)
    record = _TestJob(options.kind, job.__dict__.get("queue") or options.queue, args, attempt,
                      job.__dict__.get("max_attempts") or options.max_attempts, job.__dict__.get("id") or 0)
    return cls.__sa_jobs_handler__, _TestContext(record, _TestRuntime(engine, schema)), dict(args)


def _loaded(job: Job, engine: Any) -> Job:
    """``job`` with its columns readable. A job committed by a Session that is now closed
    was expired by the commit and then detached: reading its args raised SQLAlchemy's
    DetachedInstanceError. It is loaded again from ``engine``, the stored row (its
    queue and max_attempts too, which the expired object no longer held)."""
    state = sa_inspect(job)
    if not (state.detached and state.expired_attributes and state.identity):
        return job
    job_id = state.identity[0]
    if engine is None:
        raise ConfigurationError(
            f"perform(): {type(job).__name__} job {job_id} is detached from its closed Session,"
            " and that Session's commit expired its args: pass engine= to load it, or perform() it before"
            " closing the Session (or with expire_on_commit=False)")
    plain = _plain_twin(engine) if _loop_bound(engine) else engine
    try:
        with Session(plain, expire_on_commit=False) as session:
            stored = session.get(type(job), job_id)
    finally:
        if plain is not engine:
            plain.dispose()
    if stored is None:
        raise ConfigurationError(f"perform(): {type(job).__name__} job {job_id} is no longer stored")
    return stored


# ---- what is in the queue ------------------------------------------------------------


# A kind to match: its class (its subkinds too, as select() gives them) or its name.
KindLike = Union[type[Job], str]


def enqueued(session: Any, kind: Optional[KindLike] = None, *, args: Optional[Mapping[str, Any]] = None,
             queue: Optional[str] = None, states: Sequence[str] = ("available", "scheduled")) -> list[Job]:
    """Jobs waiting in the queue, optionally of ``kind``, with each of ``args``.

    ``kind`` is a kind's class (its subkinds' jobs included, as ``select(Kind)`` gives
    them) or a kind's name, which matches that kind alone.
    ``args`` may name some of a job's args (the others may hold anything), and each one
    named must equal the job's whole: ``{"ids": [1]}`` does not match ids ``[1, 2]``.
    ``states`` are job states (one may be given as a str); a misspelt one raises
    ConfigurationError, where it matched nothing and the helper found no job.
    """
    refuse_async_session(session, "enqueued")
    states = [check_state(s) for s in ((states,) if isinstance(states, str) else states)]
    target = _kind_class(kind)
    stmt = select(target).where(target.state.in_(states)).order_by(target.id)
    if isinstance(kind, str):
        stmt = stmt.where(target.kind == kind)
    if queue is not None:
        stmt = stmt.where(target.queue == queue)
    if args is not None:
        # Plain JSON, as Job() requires (a datetime is refused here too, not failing the query).
        for key, value in _validate.json_payload(args).items():
            stmt = stmt.where(target.args[key] == type_coerce(value, JSONB))
    return list(session.scalars(stmt))


def _kind_class(kind: Optional[KindLike]) -> type[Job]:
    """The class to select for ``kind``: Job itself for a name (selecting the name's own
    class, where one is declared, would also match its subkinds' jobs)."""
    if kind is None or isinstance(kind, str):
        return Job
    if isinstance(kind, type) and issubclass(kind, Job):
        return kind
    # select() of anything else failed with SQLAlchemy's "Textual column expression".
    raise ConfigurationError(f"a job kind's class or name is needed, not {kind!r}")


def _kind_name(kind: Optional[KindLike]) -> str:
    return "job" if kind is None else kind if isinstance(kind, str) else kind.__name__


def assert_enqueued(session: Any, kind: Optional[KindLike] = None, *, args: Optional[Mapping[str, Any]] = None,
                    queue: Optional[str] = None, count: Optional[int] = None) -> list[Job]:
    """Fail unless matching jobs are waiting (exactly ``count`` of them, if given); the
    failure lists the jobs that are waiting. ``args`` as in :func:`enqueued`."""
    refuse_async_session(session, "assert_enqueued")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        # "1" failed as "expected 1 ×, found 1"; True counted as 1.
        raise ConfigurationError(f"assert_enqueued(): count is an int from 0, not {count!r}")
    found = enqueued(session, kind, args=args, queue=queue)
    what = _described(kind, args, queue)
    if count is None:
        assert found, f"expected {what} to be enqueued; the queue holds {_summary(session)}"
    else:
        assert len(found) == count, f"expected {count} × {what}, found {len(found)}; the queue holds {_summary(session)}"
    return found


def refute_enqueued(session: Any, kind: Optional[KindLike] = None, *, args: Optional[Mapping[str, Any]] = None,
                    queue: Optional[str] = None) -> None:
    refuse_async_session(session, "refute_enqueued")
    found = enqueued(session, kind, args=args, queue=queue)
    if found:
        lines = "\n".join(f"  {j.kind}({j.args!r}, queue={j.queue!r})" for j in found[:SUMMARY_JOBS])
        more = f"\n  ... and {len(found) - SUMMARY_JOBS} more" if len(found) > SUMMARY_JOBS else ""
        raise AssertionError(f"expected no {_described(kind, args, queue)} enqueued; found {len(found)}:\n{lines}{more}")


def _described(kind: Optional[KindLike], args: Optional[Mapping[str, Any]], queue: Optional[str]) -> str:
    return f"{_kind_name(kind)}(args ⊇ {dict(args or {})!r}, queue={queue!r})"


# How many waiting jobs a failed assert_enqueued() lists.
SUMMARY_JOBS = 20


def _summary(session: Any) -> str:
    """The waiting jobs, with their args: what a failed assertion's reader compares against."""
    waiting = Job.state.in_(("available", "scheduled"))
    rows = session.execute(select(Job.kind, Job.queue, Job.args).where(waiting).order_by(Job.id).limit(SUMMARY_JOBS)).all()
    if not rows:
        return "no waiting jobs"
    lines = [f"  {kind}({args!r}, queue={queue!r})" for kind, queue, args in rows]
    total = session.scalar(select(func.count()).select_from(Job).where(waiting))
    if total > len(rows):
        lines.append(f"  ... and {total - len(rows)} more")
    return f"{total} waiting job(s):\n" + "\n".join(lines)


# ---- drain and inline: the real worker -------------------------------------------------


# How far ahead drain() looks for retries and scheduled jobs still to run: a job whose
# backoff ends a moment after its failure is written is not left behind as retryable.
DRAIN_LOOKAHEAD = 1.0

# Set while drain()'s worker runs, in its handlers too (threads and greenlets inherit it): a
# handler's own commit of new jobs under inline() leaves them to that drain. A drain started
# there waited for the handler's job, still running, until its timeout.
_draining: contextvars.ContextVar[bool] = contextvars.ContextVar("sa_jobs.testing.draining", default=False)


def drain(engine: Any, *, kinds: Optional[Sequence[type[Job]]] = None, queues: Optional[Sequence[str]] = None,
          timeout: float = 30.0, with_scheduled: bool = False) -> dict[str, int]:
    """Run a real worker on ``engine``'s database until nothing is claimable; job counts by state.

    Retries and scheduled jobs due within ``DRAIN_LOOKAHEAD`` seconds are waited for (a
    short ``backoff`` in tests), later ones stay as they are; ``with_scheduled=True``
    makes the served queues' future scheduled jobs due first. Jobs of paused queues, and of
    queues whose rate limit allows no claim until after that lookahead, are left waiting.

    The worker claims by queue: a job of the served queues whose kind has no handler here
    (not in ``kinds``) fails its attempt as with any worker, and drain() then raises
    :class:`~sa_jobs.UnknownKindError` naming those jobs.

    ``engine`` may be an AsyncEngine, and drain() may be called from async code (an async
    test, or an AsyncSession's commit under :func:`inline`): the worker then runs in a
    thread of its own, and the caller's event loop waits for it.
    """
    # No clock passes NaN (anyio refused it once the worker had started), and a str or None
    # failed with a TypeError from inside the started worker.
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
        shown = "NaN" if timeout != timeout else repr(timeout)
        raise ConfigurationError(f"drain(): timeout is {shown}; give seconds, or math.inf to wait without a deadline")
    if _loop_bound(engine):
        # An AsyncEngine: its pool belongs to the caller's event loop, and its sync_engine
        # works only inside that loop's greenlets. A plain engine on the same URL instead.
        plain = _plain_twin(engine)
        try:
            return drain(plain, kinds=kinds, queues=queues, timeout=timeout, with_scheduled=with_scheduled)
        finally:
            plain.dispose()
    if _in_event_loop():
        # anyio.run() refuses to start in a thread whose event loop is running.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sa_jobs.drain") as pool:
            return pool.submit(drain, engine, kinds=kinds, queues=queues, timeout=timeout,
                               with_scheduled=with_scheduled).result()
    from .worker import Worker

    schema = (engine.get_execution_options().get("schema_translate_map") or {}).get(DEFAULT_SCHEMA, DEFAULT_SCHEMA)

    def make_due(served: list[str]) -> None:
        # The served queues' only: another queue's delayed job is no business of this drain.
        with Session(engine) as session, session.begin():
            session.execute(job_table().update().where(Job.state == "scheduled", Job.queue.in_(served))
                            .values(scheduled_at=func.now()))

    def busy(served: list[str]) -> bool:
        # Only the worker's queues: a job waiting in a queue it does not serve (another
        # kind's, in a test that drains one kind) is never claimed, and counting it kept
        # drain() (and every commit under inline()) polling until its timeout.
        # A held queue's running jobs still count: its waiting ones only are left behind.
        with Session(engine) as session:
            claimable = set(served) - _held_queues(session)
            return bool(session.scalar(
                select(func.count()).select_from(Job).where(
                    Job.queue.in_(served),
                    (Job.state == "running")
                    | (Job.queue.in_(claimable)
                       & ((Job.state == "available")
                          | ((Job.state.in_(("scheduled", "retryable")))
                             & (Job.scheduled_at <= func.now() + dt.timedelta(seconds=DRAIN_LOOKAHEAD))))),
                )
            ))

    ran: dict[str, Any] = {}

    async def run() -> None:
        # ctx.async_transaction()'s engine, with ``engine``'s options as ctx.transaction()
        # has them: the worker's own maps only sa_jobs, and an async handler's effects on
        # the app's tables that the test engine maps elsewhere (schema_translate_map) went
        # to the unmapped schema. Made here: its connections belong to this loop.
        async_engine = _async_twin(engine)
        try:
            await _drain_with(async_engine)
        finally:
            await async_engine.dispose()

    async def _drain_with(async_engine: Any) -> None:
        # The engine itself, not its URL: its connect_args reach the worker's own connections.
        async with Worker(engine, kinds=kinds, queues=queues, schema=schema, lease=10.0, poll_interval=0.05,
                          maintenance_interval=0.05, shutdown_grace=5.0, engine=engine,
                          async_engine=async_engine) as worker:
            served = list(worker.queues)
            ran.update(worker_id=worker.worker_id, kinds=sorted(worker._kinds))
            if with_scheduled:
                await anyio.to_thread.run_sync(make_due, served)
            # A deadline checked after each look, not a cancel scope: the scope cancelled the
            # first look itself when ``timeout`` was 0 (or shorter than a look), and drain()
            # of an empty queue said its jobs were still due. (Nor fail_after: raised inside
            # the worker's block, the TimeoutError came out wrapped in an ExceptionGroup.)
            deadline = anyio.current_time() + timeout
            while await anyio.to_thread.run_sync(busy, served) or worker.running_jobs():
                if anyio.current_time() >= deadline:
                    ran["timed_out"] = True
                    break
                await anyio.sleep(min(0.02, max(0.0, deadline - anyio.current_time())))
        if ran.get("timed_out"):
            raise TimeoutError(f"drain(): jobs of queues {served} were still due or running after {timeout}s")

    token = _draining.set(True)
    try:
        anyio.run(run)
    finally:
        _draining.reset(token)
    with Session(engine) as session:
        _raise_for_unknown_kinds(session, ran["worker_id"], ran["kinds"])
        return {state: n for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state))}


def _loop_bound(engine: Any) -> bool:
    """Whether ``engine`` works only inside an AsyncEngine's greenlets: an AsyncEngine, or
    an Engine of an async driver (an asyncpg AsyncEngine's ``sync_engine``), whose
    Sessions failed with MissingGreenlet in perform(), drain() and inline()."""
    return hasattr(engine, "sync_engine") or bool(getattr(getattr(engine, "dialect", None), "is_async", False))


def _plain_twin(engine: Any) -> Any:
    """A sync Engine on an AsyncEngine's database with its execution options, connecting
    as it does (:func:`~sa_jobs._url.twin_engine`): the AsyncEngine's pool belongs to its
    event loop, and its sync_engine works only inside that loop's greenlets."""
    return twin_engine(engine).execution_options(**engine.get_execution_options())


def _async_twin(engine: Any) -> Any:
    """An AsyncEngine on ``engine``'s database with its execution options (schema maps,
    isolation level), connecting as it does, for code that must not share ``engine``'s
    pool or event loop."""
    return twin_engine(engine, async_=True).execution_options(**engine.get_execution_options())


def _raise_for_unknown_kinds(session: Session, worker_id: str, kinds: list[str]) -> None:
    """Raise UnknownKindError if the drain's worker failed jobs for want of their handler."""
    rows = session.execute(
        select(Job.id, Job.kind, Job.state)
        .where(Job.kind.notin_(kinds), Job.errors[-1]["worker"].astext == worker_id)
        .order_by(Job.id)
    ).all()
    if rows:
        jobs = ", ".join(f"{kind} (id {id_}, now {state})" for id_, kind, state in rows)
        raise UnknownKindError(
            f"drain(): no handler for jobs of the queues it served: {jobs}; it ran kinds={kinds}."
            " Pass their kinds to drain(kinds=...) (or inline()), or import the module registering their handlers"
        )


def _held_queues(session: Session) -> set[str]:
    """Queues whose waiting jobs no worker claims within ``DRAIN_LOOKAHEAD``: paused, or
    with their rate window used up until later (the limited claim's rule: since schema v11
    a row whose window is later than now()'s counts too, as after a rate made 1/7d from
    1/1s, whose last second's claims count against the week)."""
    q = Table(QUEUES_TABLE, MetaData(), Column("name", Text), Column("paused", Boolean), Column("rate_limit", Integer),
              Column("rate_period", Interval), Column("rate_window_start", DateTime(timezone=True)),
              Column("rate_window_count", Integer), schema=DEFAULT_SCHEMA)
    period = func.extract("epoch", q.c.rate_period)
    window = func.to_timestamp(func.floor(func.extract("epoch", func.now()) / period) * period)
    full = ((q.c.rate_limit.is_not(None)) & (q.c.rate_window_start >= window) & (q.c.rate_window_count >= q.c.rate_limit)
            & (window + q.c.rate_period > func.now() + dt.timedelta(seconds=DRAIN_LOOKAHEAD)))
    return set(session.scalars(select(q.c.name).where(q.c.paused | full)))


def _in_event_loop() -> bool:
    """Whether an asyncio or trio event loop runs in this thread (anyio.run() would refuse)."""
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def _check_drain_options(options: Mapping[str, Any]) -> None:
    """inline()'s options are drain()'s: a misspelt one (``kind=`` for ``kinds=``) raised
    TypeError from drain() only at the block's first commit, after that commit."""
    known = [name for name, p in inspect.signature(drain).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigurationError(f"inline(): unknown option(s) {', '.join(unknown)}; it takes drain()'s: {', '.join(known)}")


@contextlib.contextmanager
def inline(engine: Any, **drain_options: Any) -> Iterator[None]:
    """Inside the block, every commit of a Session bound to ``engine`` that added jobs is
    followed by a :func:`drain`, so tests see the jobs' effects right after the commit.

    "Added jobs" covers ``session.add``, unique kinds (inserted by their own hook, outside
    the unit of work), ``session.bulk_save_objects`` and :func:`~sa_jobs.enqueue_many`
    through the Session (not a Connection's commit, nor a Core ``insert(Job.__table__)``). A commit that
    commits nothing, of a Session joined to a Connection's open transaction, raises
    :class:`~sa_jobs.ConfigurationError`: the worker could not see those jobs.
    """
    _check_drain_options(drain_options)

    def ours(session: Session) -> bool:
        # Where the session writes jobs: a session with per-mapper ``binds`` (and no
        # single bind) raised UnboundExecutionError from a plain get_bind(), failing the
        # flush of every such session in the block.
        try:
            bind = session.get_bind(mapper=Job)
        except UnboundExecutionError:
            return False
        return bind is engine or getattr(bind, "engine", None) is engine.engine

    def before_flush(session: Session, flush_context: Any, instances: Any) -> None:
        if any(isinstance(o, Job) for o in session.new) and ours(session):
            note_enqueued(session)

    # Both events also fire for a savepoint (begin_nested) being released or rolled back,
    # while that savepoint is still the session's nested transaction: only the end of the
    # outermost transaction runs the jobs (commit) or forgets them (rollback).
    def after_commit(session: Session) -> None:
        if session.in_nested_transaction():
            return
        # ours() first: the mark is the session's, not this block's, and an outer block
        # of another engine that took it left nothing for the inner block to drain.
        if ours(session) and session.info.pop(ENQUEUED_INFO_KEY, False) and not _draining.get():
            if _left_open(session):
                raise ConfigurationError(
                    "inline(): this commit left the outer transaction of the Session's Connection open"
                    " (a test's rolled-back transaction?): a worker cannot see its jobs. Run them with"
                    " perform(), or commit on a Session of the engine itself"
                )
            drain(engine, **drain_options)

    def _left_open(session: Session) -> bool:
        # A Session bound to a Connection already in a transaction joins it: its commit
        # commits nothing (or releases a savepoint), and the jobs stayed invisible to the
        # worker, which silently ran none of them.
        bind = session.get_bind(mapper=Job)
        return isinstance(bind, Connection) and bind.in_transaction()

    def after_rollback(session: Session) -> None:
        if session.in_nested_transaction():
            return
        session.info.pop(ENQUEUED_INFO_KEY, None)

    # insert=True: look at session.new before the unique hook takes its rows out of it.
    event.listen(Session, "before_flush", before_flush, insert=True)
    event.listen(Session, "after_commit", after_commit)
    event.listen(Session, "after_rollback", after_rollback)
    try:
        yield
    finally:
        event.remove(Session, "before_flush", before_flush)
        event.remove(Session, "after_commit", after_commit)
        event.remove(Session, "after_rollback", after_rollback)


# ---- pytest fixtures -------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the plugin is only loaded by pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="session")
    def sa_jobs_database_url() -> Iterator[str]:
        url = os.environ.get("SA_JOBS_TEST_DATABASE_URL", "").strip()
        if url:
            yield url
            return
        from . import embedded

        # A directory of its own in the temp dir (not pytest's tmp_path: that is private to
        # this user, 0700, and as root the server runs as an unprivileged user, which must
        # reach it); made by embedded, which then also stops it if the session is killed.
        url = embedded.start(cleanup="delete")
        _for_tests_only(url)
        yield url

    def _for_tests_only(url: str) -> None:
        """The test server of its own runs without ``fsync`` and full-page writes: its data
        is deleted at the end of the session and need not survive an OS crash, and a
        suite's commits then wait for no disk flush (a process killed, the server's own
        immediate restart, still lose nothing committed). A server given by URL is left
        as it is."""
        import psycopg

        from ._url import to_conninfo

        with psycopg.connect(to_conninfo(url), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET fsync = off")
            conn.execute("ALTER SYSTEM SET full_page_writes = off")
            conn.execute("SELECT pg_reload_conf()")

    @pytest.fixture
    def sa_jobs_schema(sa_jobs_database_url: str) -> Iterator[str]:
        name = "t_" + uuid.uuid4().hex[:12]
        schema_mod.install(sa_jobs_database_url, name)
        yield name
        _drop_schema(sa_jobs_database_url, name)

    def _drop_schema(database_url: str, name: str) -> None:
        """Drop the test's schema with whatever the test left in it (a table it created
        there, beside the queue's, to share its transactions). The schema is this test's
        alone (a random name), so nothing else is in it or holds locks in it: the sessions
        still holding locks there are ended first. A failed test's traceback (which pytest
        keeps) holds its unclosed Session and that Session's open transaction, and the DROP
        then waited for it for ever, hanging the run in teardown. One DROP ... CASCADE, not
        uninstall() first (a statement per object of every version): the suite's tests of
        uninstall() call it themselves."""
        import psycopg
        from psycopg import sql

        from ._url import to_conninfo

        with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT l.pid FROM pg_locks l"
                " JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND l.pid <> pg_backend_pid()) holders",
                (name,),
            )
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))

    @pytest.fixture
    def sa_jobs_engine(sa_jobs_database_url: str, sa_jobs_schema: str) -> Iterator[Any]:
        from sqlalchemy import create_engine

        engine = create_engine(sqlalchemy_url(sa_jobs_database_url)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: sa_jobs_schema}
        )
        yield engine
        engine.dispose()

