"""The worker: claims jobs in batches, runs them on anyio, and reports their outcomes.

Structure (every task belongs to a task group the worker owns)::

    services: notifier, heartbeat, completer, maintainer (leader only work)
      runners: `concurrency` long-lived tasks per queue, fed by a memory stream
        producers: one per queue; claims up to its free slots in ONE statement

Shutdown cancels the producers first (no claims after the signal), lets runners finish
within the grace period, then cancels what is left and releases those jobs, flushes the
completer, and only then stops the services.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import functools
import inspect
import json
import logging
import math
import numbers
import os
import socket
import sys
import threading
import time
import traceback
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import anyio

if sys.version_info < (3, 11):  # anyio depends on the backport there
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

from .. import _validate, schema as schema_mod
from .._url import database_url_from_env, to_conninfo, twin_engine
from ..errors import (Cancel, ConfigurationError, Discard, InvalidArgsError, JobControl, Snooze, UnknownKindError,
                      real_seconds)
from ..maintenance.horizon import HorizonWatch
from ..maintenance.leader import Maintainer, maintenance_services
from ..maintenance.rescuer import Rescuer
from ..maintenance.scheduler import Scheduler
from ..model import Job, KindOptions, is_async_handler, registered_kinds
from ..states import PENDING_STATES
from .._claim_sql import HEAD_MIN_WINDOW
from ..queries import Queries
from ..retry import MAX_DELAY_SECONDS, BackoffPolicy, exponential_backoff
from .._connection import ManagedConnection, describe, is_stale_plan, is_transient
from ._job import ClaimedJob, HandlerThread, Outcome
from ._task_guard import HANDLER_JOB, install as guard_tasks, uninstall as unguard_tasks
from .completer import LOCK_WAIT, Completer
from .context import (JobContext, _Cancelled, _from_cancellation, cancellation_pending as _cancellation_pending,
                      check_app_engine, watch_interrupted_statements)
from ..events import GuardedObserver, NullObserver, WorkerObserver, hook
from ._inbox import JobInbox
from .heartbeat import Heartbeat, guard_idle_limit
from .notifier import Notifier

log = logging.getLogger("sa_jobs.worker")

MAX_TRACEBACK_CHARS = 16_000
# First retry delay of a job whose kind this worker has no handler for (the default policy,
# exponential_backoff, from a longer base: 15 s, 30 s, 1 min, ...). Typically a rolling deploy:
# newer workers know the kind; the default's 1 s, 2 s would spend a small max_attempts
# before they come up. Oban and Sidekiq retry an unresolvable worker from about 15 s too.
UNKNOWN_KIND_BACKOFF_BASE = 15.0

# How long a stopping worker waits for a maintenance tick in flight to end on its own.
MAINTAINER_STOP_WAIT = 2.0
# How long the end of a stop (writing the outcomes held, the maintenance tick) may take once
# release_running() hurried it (sa-jobs worker's second signal). Against a database that
# does not answer, the drain waits up to half the lease otherwise (a 60 s lease: 32 s after
# a second SIGTERM that promised to exit now); a reachable one takes milliseconds.
HURRIED_STOP = 2.0
_unknown_kind_backoff: BackoffPolicy = functools.partial(exponential_backoff, base=UNKNOWN_KIND_BACKOFF_BASE)
# Under a backlog, how long a plain claim may resume past its previous batch before one
# reads the queue from its start again: the longest a job behind that point (a more
# urgent one, a rescued one) waits for it. See Worker._claim_resuming.
RESCAN_INTERVAL = 0.25
# The same while the xmin horizon is held, when every claim also resumes (the claim from
# the start then costs in proportion to the jobs claimed since the horizon stopped).
HELD_RESCAN_INTERVAL = 2.0
# ... or longer, up to HELD_RESCAN_MAX: claims from the start of one queue take at most
# this share of its producer's time, since their cost grows as long as the horizon is held.
HELD_RESCAN_SHARE = 0.02
HELD_RESCAN_MAX = 30.0
# How many waiting jobs a partition-limited claim reads, and locks, before its skip scan,
# per job it asks for (at least 16). Limits that do not bind need no more than the batch;
# when busy keys leave the batch short, the skip scan looks at every key. A window of twice
# the batch cost a non-binding drain about 6 points (benchmarks/RESULTS.md, schema v6).
PARTITION_HEAD_WINDOW = 1
# Seconds a connect may take before it fails (libpq's connect_timeout), as the services' do.
CONNECT_TIMEOUT = 5

ResumeKey = tuple[int, Any, int]  # (priority, scheduled_at, id): the claim order


def held_rescan_interval(rescan_seconds: float) -> float:
    """Seconds between claims from the start of a queue while the horizon is held."""
    return min(HELD_RESCAN_MAX, max(HELD_RESCAN_INTERVAL, rescan_seconds / HELD_RESCAN_SHARE))


def next_resume_point(
    *, held: bool, last: Optional[ResumeKey], count: int, limit: int, previous: Optional[ResumeKey], from_start: bool,
) -> Optional[ResumeKey]:
    """Where the next plain claim of a queue may start, after one that took ``count`` jobs,
    the greatest of them ``last`` (the caller may leave it None when ``held`` is false
    and the batch was short: it is not needed then).

    With a moving horizon, only after a full batch (a short one means the queue was read
    to its end). While it is held, after any batch that took jobs; a claim from the start
    that came back short took everything it could see, so it never moves the point back
    to the older jobs it found behind it.
    """
    if not held:
        return last if count == limit else None
    if last is None:
        return previous
    if from_start and count < limit and previous is not None:
        return max(last, previous)
    return last


@dataclass(eq=False)
class _CancelWatch:
    """The cancel notices the listener took while one claim was in flight: ``ids``, or
    ``everything`` when it (re)connected meanwhile (notices may have been missed)."""

    ids: set[int] = field(default_factory=set)
    everything: bool = False


@dataclass(frozen=True)
class _KindRuntime:
    cls: type[Job]
    options: KindOptions
    handler: Any
    is_async: bool
    signature: inspect.Signature


@dataclass(eq=False)
class _Queue:
    name: str
    limit: int
    inbox: JobInbox
    limiter: anyio.CapacityLimiter
    busy: int = 0  # claimed and not yet finished (running or waiting in the stream)
    # Outcomes with the completer, not yet written: in flight for the observer, which
    # hears of them once written (the count it is given after a claim includes them).
    writing: int = 0
    # Jobs whose abandoned sync handler's thread still runs (Worker._outlive) and whose
    # outcome is not written yet: counted in busy (the slot) and in writing alike, once in flight.
    outliving_unwritten: set[ClaimedJob] = field(default_factory=set)
    # Keyed by claim, not by job id: after a lost lease the same job can be claimed again
    # by this very worker while the stale attempt is still winding down, and the two
    # records must not overwrite each other.
    running: dict[tuple[int, uuid.UUID], ClaimedJob] = field(default_factory=dict)
    wake: anyio.Event = field(default_factory=anyio.Event)
    slot_freed: anyio.Event = field(default_factory=anyio.Event)
    # Cluster-wide limits, as last read from the queues table: a limited queue is claimed
    # through the serialized claim (the plain claim refuses it, so a stale view here can
    # delay a claim but never exceed a limit).
    limited: bool = False
    rate_period: Optional[float] = None
    # The last empty claim was stopped by the rate (the window full), as last read.
    rate_spent: bool = False
    paused: bool = False  # paused cluster-wide (pause_queue), as last seen: for the log
    # Set while this worker alone is told not to claim from the queue; set on resume.
    local_pause: Optional[anyio.Event] = None
    # Where the next plain claim may resume: (priority, scheduled_at, id) of the last row
    # of this worker's previous claim when that claim was full, and when the last claim
    # that scanned from the start of the queue ran (monotonic). See Worker._claim_resuming.
    resume_after: Optional[ResumeKey] = None
    scanned_from_start_at: float = 0.0
    rescan_seconds: float = 0.0  # how long that last claim from the start took


def _seconds(name: str, value: Any, *, zero: bool = False, infinite: bool = False,
             least: float = 0.0, most: float = math.inf) -> float:
    """A duration option as a float, or ConfigurationError: NaN passed every comparison (a
    heartbeat every NaN seconds), an infinite lease or tick never came round, and a
    statement timeout under a millisecond reached the server as 0, which means none."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
    seconds = real_seconds(value)
    if seconds == math.inf and infinite:
        return seconds
    if not (least <= seconds <= most and seconds < math.inf and (seconds > 0 or zero)):
        if least:
            rule = f"from {least:g} to {most:.0f} seconds"
        elif most < math.inf:
            rule = ("0" if zero else "more than 0") + f" and at most {most:.0f} seconds"
        else:
            rule = ("0 or more" if zero else "more than 0") + (" seconds (or inf)" if infinite else ", finite seconds")
        raise ConfigurationError(f"{name} must be {rule}, not {value!r}")
    return seconds


class Worker:
    """Runs job handlers for a set of kinds and queues.

    Embed it (``async with Worker(url, kinds=[...]):``) or run it until stopped
    (``await worker.run()``, or ``sa-jobs worker``). Times are in seconds; every
    comparison against a job's timestamps happens in SQL on the database clock.
    """

    def __init__(
        self,
        database_url: Optional[str] = None,
        *,
        kinds: Optional[Iterable[type[Job]]] = None,
        queues: Union[Mapping[str, int], Sequence[str], None] = None,
        concurrency: int = 10,
        schema: str = schema_mod.DEFAULT_SCHEMA,
        lease: float = 30.0,
        heartbeat_interval: Optional[float] = None,
        poll_interval: float = 1.0,
        maintenance_interval: float = 1.0,
        completion_interval: float = 0.005,
        max_claim: int = 500,
        shutdown_grace: float = 30.0,
        statement_timeout: Optional[float] = None,
        maintenance: Sequence[Any] = (),
        observer: Optional[WorkerObserver] = None,
        engine: Any = None,
        async_engine: Any = None,
        worker_id: Optional[str] = None,
        check_schema: bool = True,
    ) -> None:
        url = database_url or database_url_from_env()
        if url is None:
            raise ConfigurationError(
                "no database URL: pass one, or set SA_JOBS_DATABASE_URL (sa-jobs demo starts an embedded server)"
            )
        self._url = url
        self._conninfo = to_conninfo(url)
        self.schema = _validate.schema_name(schema)
        self._queries = Queries.for_schema(self.schema)
        if type(concurrency) is not int or concurrency < 1:
            raise ConfigurationError(f"concurrency must be a positive int, not {concurrency!r}")
        if type(max_claim) is not int or max_claim < 1:  # 0 claimed nothing, for ever
            raise ConfigurationError(f"max_claim must be a positive int, not {max_claim!r}")
        # At most a year, as a retry's delay: the claim writes now() + lease, which past
        # PostgreSQL's timestamps (a lease of 1e13 s) failed every claim, the worker idle.
        self.lease = _seconds("lease", lease, most=MAX_DELAY_SECONDS)
        self._heartbeat_interval = (self.lease / 4 if heartbeat_interval is None
                                    else _seconds("heartbeat_interval", heartbeat_interval))
        if self._heartbeat_interval >= self.lease:
            raise ConfigurationError("heartbeat_interval must be shorter than the lease")
        self._poll_interval = _seconds("poll_interval", poll_interval)
        # Never infinite: the rescuer and the scheduler run on this tick.
        self._maintenance_interval = _seconds("maintenance_interval", maintenance_interval)
        self.horizon = HorizonWatch()
        self._completion_interval = _seconds("completion_interval", completion_interval, zero=True)
        self._max_claim = max_claim
        self.shutdown_grace = _seconds("shutdown_grace", shutdown_grace, zero=True, infinite=True)
        # Every service statement is bounded; well inside the lease so that a stuck
        # connection is replaced before the jobs it serves are presumed lost.
        self.statement_timeout = (max(2.0, min(30.0, self.lease / 2)) if statement_timeout is None
                                  else _seconds("statement_timeout", statement_timeout,
                                                     least=0.001, most=2_147_483.0))  # the server's int ms
        # Guarded: the worker calls hooks where a raise would strand claimed jobs.
        self._observer: WorkerObserver = NullObserver() if observer is None else GuardedObserver(observer)  # type: ignore[assignment]
        # The app's own engines (its pool settings) map this worker's schema too: jobs a
        # handler enqueues in ctx.transaction() went to the default schema's table.
        for given, param in ((engine, "engine"), (async_engine, "async_engine")):
            if given is not None:
                check_app_engine(given, param)
        self._engine = None if engine is None else self._in_schema(engine)
        self._async_engine = None if async_engine is None else self._in_schema(async_engine)
        if self._async_engine is not None:
            # As on the engine the worker makes: a statement of ctx.async_transaction() that a
            # handler's own caught cancel scope interrupted was not seen on the app's engine,
            # so its block went on to commit, failed with an unexplained error, and the
            # statement ran on to its end on the server, its locks held.
            watch_interrupted_statements(self._async_engine)
        self._owns_engines: list[Any] = []
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._check_schema = check_schema
        # Extra maintenance services (plugins: periodic jobs, pruning, ...), each with
        # ``name``, ``leader_only`` and ``async run_once(conn, queries)``.
        self._extra_maintenance = maintenance_services(maintenance, "maintenance=")

        self._kinds = self._resolve_kinds(kinds)
        self._queue_limits = self._resolve_queues(queues, concurrency)
        self._running = False  # between __aenter__ and the end of __aexit__
        # A stop asked for while no run was in progress (before the first, between two):
        # the next run starts stopped (see request_stop). Kept apart from the run state,
        # which each run makes afresh.
        self._stop_pending = False
        self._pending_lock = threading.Lock()  # a stop from another thread as a run begins
        self._loop: Optional[asyncio.AbstractEventLoop] = None  # the running loop, and its thread
        self._loop_thread = 0
        self._nudge_pending = False  # a handler thread's heartbeat nudge is on its way to the loop
        self._new_run_state()

    def _new_run_state(self) -> None:
        """What one run (one ``async with``) of the worker uses, fresh.

        A second run of the same Worker (an app's lifespan entered again, as test clients
        do) kept the first run's state: stopping, its events set (or bound to a closed
        event loop), so it started, claimed nothing and said nothing.
        """
        self._queues: dict[str, _Queue] = {}
        self._tg: Optional[anyio.abc.TaskGroup] = None
        self._producers_scope: Optional[anyio.CancelScope] = None
        self._started = anyio.Event()
        self._runners_done = anyio.Event()
        self._done = anyio.Event()
        self._stop_requested = anyio.Event()
        self._stopping = False
        self._releasing = False
        self._outliving: set[anyio.CancelScope] = set()  # runners waiting on an abandoned thread
        # The claims of each job id this run's runners hold, oldest first, each until its
        # runner is done with it (its abandoned thread returned too): a later claim of the
        # job waits for the earlier ones before its handler starts (Worker._after_earlier_runs).
        self._runs_of: dict[int, list[ClaimedJob]] = {}
        # Abandoned threads (and their queues) a stop did not wait for: kept while they run,
        # since the next run of this Worker keeps their slots (Worker._hold_left_behind).
        self._left_behind: list[tuple[str, HandlerThread]] = [
            (queue, thread) for queue, thread in getattr(self, "_left_behind", ()) if not thread.done]
        self.completer: Optional[Completer] = None
        self.maintainer: Optional[Maintainer] = None
        self.notifier: Optional[Notifier] = None
        self._heartbeat: Optional[Heartbeat] = None
        self._serve_scope: Optional[anyio.CancelScope] = None
        self._start_abandoned = False
        self._hurried = False  # release_running() was called: the end of the stop is bounded by HURRIED_STOP
        self._end_scope: Optional[anyio.CancelScope] = None  # the end of the stop (drain, maintenance tick)
        self._claims: set[anyio.CancelScope] = set()  # the (shielded) claims in flight
        self._cancel_watches: set[_CancelWatch] = set()  # one per claim in flight, until its jobs are held
        self._snoozed_now = 0  # Snooze(0) outcomes not yet written (see _completions_written)

    # ---- configuration -----------------------------------------------------------

    @staticmethod
    def _resolve_kinds(kinds: Optional[Iterable[type[Job]]]) -> dict[str, _KindRuntime]:
        if kinds is None:
            candidates = [c for c in registered_kinds().values() if c.__sa_jobs_handler__ is not None]
        elif isinstance(kinds, (type, str)):
            # One kind for the list: a class failed with "'DeclarativeAttributeIntercept' object
            # is not iterable", and a name was read letter by letter ("'s' is not a job kind").
            example = kinds.__name__ if isinstance(kinds, type) else "SendEmail"
            raise ConfigurationError(f"kinds is a list of job kind classes: kinds=[{example}], not {kinds!r}")
        else:
            candidates = list(kinds)
        for cls in candidates:
            if not (isinstance(cls, type) and issubclass(cls, Job)) or cls.__sa_jobs_options__ is None:
                raise ConfigurationError(f"{cls!r} is not a job kind (a subclass of sa_jobs.Job)")
        if kinds is not None:
            from sqlalchemy import inspect as sa_inspect

            # A kind listed stands for its subkinds too, as select(Parent) does: a child
            # takes its parent's queue and handler, and a worker listing the parent alone
            # claimed the child's jobs there and failed them with UnknownKindError.
            candidates = [m.class_ for cls in candidates for m in sa_inspect(cls).self_and_descendants
                          if not m.class_.__sa_jobs_abstract__]  # a base of kinds (its own are listed)
        resolved: dict[str, _KindRuntime] = {}
        for cls in candidates:
            options, handler = cls.__sa_jobs_options__, cls.__sa_jobs_handler__
            assert options is not None, "checked above; a subkind of a kind has options"
            if handler is None:
                raise UnknownKindError(f"job kind {options.kind!r} has no handler; decorate one with @{cls.__name__}.handler")
            resolved[options.kind] = _KindRuntime(
                cls=cls,
                options=options,
                handler=handler,
                is_async=is_async_handler(handler),
                signature=inspect.signature(handler),
            )
        if not resolved:
            raise ConfigurationError("the worker has no job kinds with handlers; import the module that declares them")
        return resolved

    def _resolve_queues(self, queues: Union[Mapping[str, int], Sequence[str], None], concurrency: int) -> dict[str, int]:
        if queues is None:
            names = sorted({k.options.queue for k in self._kinds.values()})
            return {n: concurrency for n in names}
        if isinstance(queues, str):
            raise ConfigurationError("queues must be a list of names or a mapping of name to concurrency")
        if isinstance(queues, Mapping):
            items = list(queues.items())
        else:
            items = [(q, concurrency) for q in queues]
        result: dict[str, int] = {}
        for name, limit in items:
            _validate.queue_name(name)
            if type(limit) is not int or limit < 1:
                raise ConfigurationError(f"queue {name!r}: concurrency must be a positive int, not {limit!r}")
            result[name] = limit
        if not result:
            raise ConfigurationError("the worker has no queues")
        return result

    @property
    def queues(self) -> dict[str, int]:
        return dict(self._queue_limits)

    def _pool_options(self) -> dict[str, Any]:
        """Pool settings of the engines this worker creates: one connection per handler
        that may run at once. SQLAlchemy's default (5 + 10 overflow) made the 16th
        concurrent ctx.transaction() wait for a connection (30 s, then an error) while
        the others held theirs. Connections open on demand, so a quiet worker opens few."""
        return {"pool_pre_ping": True, "pool_size": max(5, sum(self._queue_limits.values())), "max_overflow": 10}

    def sync_engine(self) -> Any:
        """The SQLAlchemy Engine behind ``ctx.transaction()`` (created on first use)."""
        if self._engine is None:
            # Worker(engine): connecting as that engine does (its connect_args, creator,
            # listeners); made from its URL alone, handlers ran as someone else.
            root = twin_engine(self._url, transactions=True, **self._pool_options())
            self._owns_engines.append(root)
            self._engine = self._in_schema(root)
        return self._engine

    def async_engine(self) -> Any:
        """The AsyncEngine behind ``ctx.async_transaction()`` (created on first use)."""
        if self._async_engine is None:
            root = twin_engine(self._url, async_=True, transactions=True, **self._pool_options())
            watch_interrupted_statements(root)
            self._owns_engines.append(root)
            self._async_engine = self._in_schema(root)
        return self._async_engine

    def nudge_heartbeat(self) -> None:
        """Beat early: there is progress to write. From any thread: a handler's own thread
        set the loop's event directly (from_thread.run_sync refuses threads anyio did not
        start), which in asyncio's debug mode lost the heartbeat's wake-up, the heartbeat
        task then stuck for good (leases lost, the worker unable to stop)."""
        heartbeat, loop = self._heartbeat, self._loop
        if heartbeat is None:
            return
        if loop is None or threading.get_ident() == self._loop_thread:
            heartbeat.nudge()
            return
        # A nudge on its way, or one the heartbeat has yet to act on, is followed by a beat
        # that writes the latest report (it reads the reports after it takes the nudge): a
        # sync handler reporting in a loop woke the event loop at each call (~35 µs each).
        if self._nudge_pending or heartbeat.nudged:
            return
        self._nudge_pending = True
        try:
            loop.call_soon_threadsafe(self._nudge_on_loop, heartbeat)
        except RuntimeError:  # the loop closed: the run, and this job's attempt, are over
            self._nudge_pending = False

    def _nudge_on_loop(self, heartbeat: Heartbeat) -> None:
        heartbeat.nudge()
        self._nudge_pending = False  # after: a report meanwhile is the nudged beat's to write

    def _in_schema(self, engine: Any) -> Any:
        """Map the ``sa_jobs`` schema of mapped tables to this worker's schema, as apps do,
        keeping the engine's other mappings (an app's engine may map its own tables)."""
        if self.schema == schema_mod.DEFAULT_SCHEMA:
            return engine
        current = engine.get_execution_options().get("schema_translate_map") or {}
        return engine.execution_options(schema_translate_map={**current, schema_mod.DEFAULT_SCHEMA: self.schema})

    def running_jobs(self) -> list[ClaimedJob]:
        return [j for q in self._queues.values() for j in q.running.values()]

    # ---- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> "Worker":
        _require_asyncio()
        if self._running:
            raise ConfigurationError(f"worker {self.worker_id} is running already; one Worker runs once at a time")
        with self._pending_lock:
            self._new_run_state()  # nothing of the last run carries over, but a stop asked for since
            self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
            self._nudge_pending = False  # one the last run's loop closed on never ran
            self._running = True
            pending, self._stop_pending = self._stop_pending, False
        if pending:
            log.info("worker %s: a stop was asked for before this run began", self.worker_id)
            self._request_stop()
        try:
            if self._check_schema:
                await self._check_schema_version()
            self._tg = anyio.create_task_group()
            await self._tg.__aenter__()
        except BaseException:
            self._end_unstarted_run()
            raise
        # Not TaskGroup.start(): a start cancelled by the app (its deadline, Ctrl-C; asyncio's
        # own cancellation included) made it wait for the serve task, which is shielded,
        # and the app hung for good while the worker ran on and claimed jobs.
        self._tg.start_soon(self._serve)
        try:
            await self._started.wait()
        except BaseException:  # cancelled, or the serve task failed
            self._start_abandoned = True  # a serve task that has not begun never does
            if self._serve_scope is not None:  # it has: stop it as a cancelled app's worker stops
                with anyio.CancelScope(shield=True):
                    await self.shutdown(0)
            self._tg.cancel_scope.cancel()
            try:
                await self._tg.__aexit__(None, None, None)
            finally:
                self._end_unstarted_run()
            raise
        return self

    def _end_unstarted_run(self) -> None:
        """End a run whose start failed or was cancelled. A shutdown() called meanwhile
        waited for runners and a serve task that never began: the grace period, then for good."""
        self._runners_done.set()
        self._done.set()
        self._running = False

    async def _check_schema_version(self) -> None:
        """On the loop, not in a thread: a cancellation of the app's startup (its deadline,
        Ctrl-C) waited for that thread, for good against a server that never answers or for
        as long as a migration held the version table. The connect is bounded as the
        services' are."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name="sa_jobs:worker",
        ) as conn:
            record = await schema_mod.read_record_async(conn, self.schema)
            schema_mod.require_version(record.version, self.schema, runs_from=record.runs_from)

    async def __aexit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> Optional[bool]:
        assert self._tg is not None
        cancelled: Optional[BaseException] = None  # the app's cancellation, come during the grace period
        unwrapped = False  # the block's own exception, taken out of the task group's
        suppressed: Optional[bool] = None
        try:
            if exc is not None and not isinstance(exc, Exception):
                # Left by a cancellation (the app's task group, asyncio.run's Ctrl-C) or
                # another BaseException: the app wants out now, so no grace period; running
                # jobs are released at once (their attempt refunded).
                with anyio.CancelScope(shield=True):
                    await self.shutdown(0)
            else:
                try:
                    # Not shielded: the app cancelled during the grace period (a second
                    # Ctrl-C, a shutdown deadline of its own) wants out now too. Shielded,
                    # its cancellation waited the whole grace, for ever with an infinite one.
                    await self.shutdown()
                except BaseException as exc_in_grace:
                    cancelled = exc_in_grace
                    with anyio.CancelScope(shield=True):
                        await self.shutdown(0)
                    # The task group sees it as if the block had raised it.
                    exc_type, exc, tb = type(cancelled), cancelled, cancelled.__traceback__
        finally:
            try:
                suppressed = await self._tg.__aexit__(exc_type, exc, tb)
            except BaseExceptionGroup as group:
                # The task group wraps the block's own exception in a group; when nothing
                # else failed, give it back as raised, so ``except KeyError`` around the
                # ``async with`` catches the KeyError its body raised.
                if exc is None or group.split(lambda e: e is exc)[1] is not None:
                    raise
                unwrapped = True
            finally:
                self._running = False
        if unwrapped or (cancelled is not None and not suppressed):  # the block's own is the caller's to re-raise
            assert exc is not None
            raise exc
        return suppressed

    async def run(self) -> None:
        """Run until :meth:`request_stop` (or a cancellation), then shut down gracefully.

        A Worker runs again after a run ended (one run at a time). A stop asked for while
        no run is in progress applies to the next one, which then claims nothing and returns."""
        async with self:
            await self._stop_requested.wait()

    def request_stop(self) -> None:
        """Stop claiming now (synchronously: no claim starts after this returns), then let
        :meth:`run` drain and shut down. Safe from any thread (an app's shutdown hook).

        Asked while no run is in progress (before the first, between two: a sync app's exit
        hook come before its thread's run began, or between two runs of a restart loop), the
        stop applies to the next run, which claims nothing and ends at once (run() returns;
        ``async with`` runs its block with a worker already stopping). One run uses it up.
        Dropped with the ended run's state, it let the next run() run on, the app's join
        waiting for good."""
        self._stop(self._request_stop)

    def _request_stop(self) -> None:
        self._stop_claiming()
        self._stop_requested.set()

    def _stop(self, fn: Callable[[], None]) -> None:
        """Stop the run in progress with ``fn``; with none to reach, stop the next one (also
        when a run begins, in another thread, as this finds none: it stops that one)."""
        while not self._on_loop(fn):
            with self._pending_lock:
                loop = self._loop
                if not self._running or loop is None or loop.is_closed():
                    self._stop_pending = True
                    return

    def _on_loop(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` on the worker's event loop, in the run in progress, and wait for it;
        False (``fn`` not run) if there is no run to reach, or it ended before ``fn`` ran.

        Called from another thread (a sync app running the worker in a background thread
        and stopping it at exit), request_stop() raised "no running event loop" from the
        cancel scope after marking the worker stopping, and the run never ended.
        """
        loop = self._loop
        if not self._running or loop is None:
            return False  # the next run starts afresh: fn would change nothing of it
        if threading.get_ident() == self._loop_thread:
            fn()
            return True
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def call() -> None:
            if not done.set_running_or_notify_cancel():  # given up: the run had ended
                return
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
                done.set_exception(exc)
            else:
                done.set_result(None)

        try:
            loop.call_soon_threadsafe(call)
        except RuntimeError:  # the loop closed: the run is over
            return False
        while True:
            try:
                done.result(timeout=0.05)
                return True
            except concurrent.futures.TimeoutError:
                # The run ended before the call could run: given up, unless it runs now.
                if not self._running and done.cancel():
                    return False

    def _stop_claiming(self) -> None:
        if not self._stopping:
            self._stopping = True
            log.info("worker %s: shutting down (grace %.1fs)", self.worker_id, self.shutdown_grace)
            if self._producers_scope is not None:
                self._producers_scope.cancel()

    async def shutdown(self, grace: Optional[float] = None) -> None:
        """Stop claiming, let running jobs finish within ``grace``, release the rest."""
        grace = self.shutdown_grace if grace is None else _seconds("grace", grace, zero=True, infinite=True)
        if not self._running:  # waited for a run that never came (the grace, then for good)
            self._stop(self._request_stop)  # kept for the next run, as request_stop() keeps it
            return
        self._stop_requested.set()
        self._stop_claiming()
        with anyio.move_on_after(grace):
            await self._runners_done.wait()
        if not self._runners_done.is_set():
            self._on_loop(self._release_running)
        await self._done.wait()

    def release_running(self) -> None:
        """Stop at once: claim nothing more, cancel every running handler and give its job
        back to the queue (:meth:`run` then returns). Alone, it left the worker claiming:
        every job it claimed after was given back at once, over and over, and ran nowhere
        else while this worker held it. The stop writes the outcomes it holds for at most
        ``HURRIED_STOP`` seconds more (the caller wants out now: sa-jobs worker's second
        signal), not up to half the lease, and gives up a claim that the database has not
        answered by then. Safe from any thread; with no run in progress, the next run is
        stopped, as by :meth:`request_stop`."""
        self._stop(self._hurry)

    def _hurry(self) -> None:
        self._hurried = True
        self._stop_claiming()
        self._stop_requested.set()
        self._release_running()
        loop = self._loop
        if loop is None:
            return
        for scope in (self._end_scope, *self._claims):  # bound what is left of the stop
            if scope is not None:
                scope.deadline = min(scope.deadline, loop.time() + HURRIED_STOP)

    def _release_running(self) -> None:
        self._releasing = True
        for job in self.running_jobs():
            if job.thread is not None and job.thread.done and not job.thread.taken:
                # Its sync handler's thread has returned; the runner takes its outcome at
                # the loop's next step. Cancelling that wait dropped the outcome, and the
                # finished job was given back to run again.
                continue
            job.releasing = True
            job.cancel("worker shutting down")
        for scope in self._outliving:
            scope.cancel()

    async def _serve(self) -> None:
        # Shielded from a cancellation of the app around the worker: it would cancel every
        # service at once, completer included, and leave running jobs (and outcomes not
        # yet written) 'running' until their lease expired. __aexit__ stops the worker
        # instead (shutdown(), which ends this scope), as does a start the app cancelled.
        if self._start_abandoned:
            return
        try:
            with anyio.CancelScope(shield=True) as self._serve_scope:
                await self._serve_shielded()
        finally:  # also when it failed before its services began: shutdown() waits for this
            self._runners_done.set()
            self._done.set()

    async def _serve_shielded(self) -> None:
        claim_conn = ManagedConnection(self._conninfo, "producer", timeout=self.statement_timeout)
        # A flush waits for a row lock at most LOCK_WAIT, then writes around it (Completer._write).
        complete_conn = ManagedConnection(self._conninfo, "completer", timeout=self.statement_timeout,
                                          lock_timeout=min(LOCK_WAIT, self.statement_timeout / 2))
        beat_conn = ManagedConnection(self._conninfo, "heartbeat", timeout=self.statement_timeout)
        def keep_conn() -> ManagedConnection:
            """A lease keeper's: one per outcome waiting on another transaction, while it waits
            (Heartbeat._keep_awaiting)."""
            return ManagedConnection(self._conninfo, "lease-keeper", timeout=self.statement_timeout)

        self.completer = Completer(complete_conn, self._queries, self._observer, interval=self._completion_interval,
                                   on_written=self._completions_written, lease=self.lease)
        heartbeat = self._heartbeat = Heartbeat(
            beat_conn, self._queries, self._observer, self.running_jobs,
            lease=self.lease, interval=self._heartbeat_interval, awaiting=self.completer.awaiting, keeper=keep_conn,
            guard=ManagedConnection(self._conninfo, "lease-guard", timeout=self.statement_timeout,
                                    on_connect=guard_idle_limit(self.lease)),
        )
        self.notifier = Notifier(self._conninfo, self._queries, self._observer, self._wake_all, self._settle_claims,
                                 self._held_ids, self._heard_cancel)
        self.maintainer = Maintainer(
            self._conninfo, self._queries, self._observer,
            [Rescuer(self._observer), Scheduler(), self.horizon, *self._extra_maintenance],
            interval=self._maintenance_interval,
            timeout=self.statement_timeout,
        )
        for name, limit in self._queue_limits.items():
            self._queues[name] = _Queue(name, limit, JobInbox(), anyio.CapacityLimiter(limit))
        claim_lock = anyio.Lock()
        hook(self._observer, "worker_started")()
        ended_well = False
        assert self._loop is not None
        task_guard = guard_tasks(self._loop)
        try:
            async with anyio.create_task_group() as services:
                services.start_soon(self.notifier.run)
                services.start_soon(heartbeat.run)
                services.start_soon(self.completer.run)
                services.start_soon(self.maintainer.run)
                async with anyio.create_task_group() as runners:
                    for q in self._queues.values():
                        for _ in range(q.limit):
                            runners.start_soon(self._runner, q)
                    async with anyio.create_task_group() as producers:
                        self._producers_scope = producers.cancel_scope
                        if self._stopping:
                            producers.cancel_scope.cancel()
                        for name, thread in self._left_behind:
                            held = self._queues.get(name)
                            if held is not None and not thread.done:
                                held.busy += 1  # before the producers' first claim
                                producers.start_soon(self._hold_left_behind, held, thread)
                        for q in self._queues.values():
                            producers.start_soon(self._producer, q, claim_conn, claim_lock)
                        self._started.set()
                    for q in self._queues.values():
                        q.inbox.close()
                self._runners_done.set()
                with anyio.CancelScope(shield=True):
                    with anyio.CancelScope() as self._end_scope:
                        if self._hurried:
                            self._end_scope.deadline = anyio.current_time() + HURRIED_STOP
                        await self.completer.drain(timeout=max(2.0, self.lease / 2))
                        # Let a maintenance tick in flight end between statements (ticks take
                        # milliseconds; a long one is cancelled after the wait).
                        self.maintainer.request_stop()
                        with anyio.move_on_after(MAINTAINER_STOP_WAIT):
                            await self.maintainer.stopped.wait()
                    if self.completer.unwritten:
                        log.error("worker %s: %d outcome(s) could not be written; their jobs will be rescued after the lease",
                                  self.worker_id, self.completer.unwritten)
                services.cancel_scope.cancel()
            ended_well = True
        finally:
            unguard_tasks(self._loop, task_guard)
            self._runners_done.set()
            self.completer.abandon()  # what the drain could not write (the services are stopped)
            with anyio.CancelScope(shield=True):
                for conn in (claim_conn, complete_conn, beat_conn):
                    await conn.close()
                await heartbeat.close()
                for engine in self._owns_engines:  # the root engines this worker created
                    result = engine.dispose()
                    if inspect.isawaitable(result):
                        await result
            self._done.set()
            log.info("worker %s: stopped", self.worker_id)
            # Asked to stop, and stopped: its heartbeat age is no alarm (metrics reads 0).
            hook(self._observer, "worker_stopped")(self._stopping and ended_well)

    def _wake_all(self) -> None:
        for q in self._queues.values():
            q.wake.set()

    # ---- claiming ----------------------------------------------------------------

    async def _producer(self, q: _Queue, conn: ManagedConnection, lock: anyio.Lock) -> None:
        failures = 0
        while True:
            if q.local_pause is not None:
                await q.local_pause.wait()
                continue
            free = q.limit - q.busy
            if free <= 0:
                await q.slot_freed.wait()
                q.slot_freed = anyio.Event()
                continue
            want = min(free, self._max_claim)
            q.wake = anyio.Event()  # a NOTIFY during the claim must wake the next wait
            try:
                async with lock:
                    if self._stopping:  # decided while we waited for the lock or a slot
                        return
                    # Not shielded: connecting claims nothing, and a stop must be able to
                    # interrupt a reconnect loop while the database is unreachable.
                    live = await conn.get()
                    # Stopped or paused while we connected: no claim starts after
                    # request_stop() or pause() returns.
                    if self._stopping:
                        return
                    if q.local_pause is not None:
                        continue
                    watch = _CancelWatch()  # the cancel notices taken until its jobs are held
                    self._cancel_watches.add(watch)
                    try:
                        # Shielded: a claim the server executed must reach us, or its jobs
                        # would sit running until their lease expired.
                        with anyio.CancelScope(shield=True) as claiming:
                            self._claims.add(claiming)
                            try:
                                jobs = await self._claim(q, live, want, conn.deadline)
                            finally:
                                self._claims.discard(claiming)
                        if claiming.cancelled_caught:
                            # Given up by a hurried stop (release_running()): the database did
                            # not answer. Jobs it claimed there are rescued after their lease.
                            log.warning("worker %s: a claim on queue %r the database did not answer is given up",
                                        self.worker_id, q.name)
                            await conn.discard()
                            return
                        # Held from here (no await between): a cancel notice taken from now
                        # on finds the jobs; one taken before is in the watch.
                        q.busy += len(jobs)
                        q.inbox.put_many(jobs)
                        self._report_slots(q)
                    finally:
                        self._cancel_watches.discard(watch)
                    await self._recheck_claimed(live, conn, jobs, watch)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - back off and retry; never exit the worker
                if failures == 0 and is_stale_plan(exc):
                    # A schema upgrade changed the claim function's result columns: the
                    # statement failed as a whole (nothing claimed). Claim again at once on
                    # a new connection; only a second failure in a row is an error.
                    failures += 1
                    log.info("worker %s: the claim of queue %r was prepared for a function a schema upgrade"
                             " replaced (%s); claiming again on a new connection", self.worker_id, q.name,
                             describe(exc))
                    await conn.discard()
                    continue
                failures += 1
                self._observer.loop_error("producer")
                log.warning("claim on queue %r failed (%s); reconnecting", q.name, describe(exc),
                            exc_info=not is_transient(exc))
                await conn.discard()
                await anyio.sleep(min(5.0, 0.05 * 2 ** min(failures, 7)))
                continue
            if self._stopping:
                return
            if len(jobs) < want:
                with anyio.move_on_after(self._idle_wait(q, len(jobs))):
                    await q.wake.wait()

    def _heard_cancel(self, job_id: Optional[int]) -> None:
        """The listener took a cancel notice of ``job_id`` (None: it connected, and may have
        missed some): noted for the claims in flight, whose jobs it cannot find yet."""
        for watch in self._cancel_watches:
            if job_id is None:
                watch.everything = True
            else:
                watch.ids.add(job_id)

    async def _recheck_claimed(self, live: Any, conn: ManagedConnection, jobs: list[ClaimedJob],
                               watch: _CancelWatch) -> None:
        """Judge the jobs of a claim by their rows, as the listener does on a notice, if a
        cancel notice of theirs was taken while the claim was in flight (the commit of the
        claim and the notice race): the listener, not finding them held, dropped it, and the
        handler ran until the next heartbeat (a quarter of the lease). Read once the jobs
        are held, so that their claim is older than the read; a notice taken since finds
        them. Failing, the heartbeat is asked to beat soon: it finds a cancelled job too."""
        ids = sorted({j.id for j in jobs if watch.everything or j.id in watch.ids})
        if not ids:
            return
        read_at = time.monotonic()
        try:
            with anyio.CancelScope(shield=True) as reading:  # bounded by the deadline and a hurried stop
                self._claims.add(reading)
                try:
                    with conn.deadline():
                        rows = await (await live.execute(self._queries.claims_of, {"ids": ids})).fetchall()
                finally:
                    self._claims.discard(reading)
            if reading.cancelled_caught:
                raise TimeoutError("given up by the stop")
        except Exception as exc:  # noqa: BLE001 - the claim stands; the heartbeat checks the rows
            log.warning("claim on queue %r: reading the rows of %d job(s) cancelled meanwhile failed (%s)",
                        jobs[0].queue, len(ids), describe(exc))
            await conn.discard()
            self.nudge_heartbeat()
            return
        self._settle_claims(ids, [(r[0], r[1], r[2]) for r in rows], read_at)

    def _idle_wait(self, q: _Queue, claimed: int) -> float:
        """How long a producer that got less than it asked for (``claimed`` jobs) waits for
        a wake-up. When the rate may have cut the claim short, until the next window
        opens. Not after an empty claim the rate did not stop (no jobs, the concurrency
        limits, a pause): that woke an idle queue's producer every period (a thousand
        claims a second at 1/1ms), where an enqueue's NOTIFY or a completion wakes it."""
        if q.rate_period and (claimed or q.rate_spent):
            return min(self._poll_interval, q.rate_period - time.time() % q.rate_period + 0.001)
        return self._poll_interval

    async def _claim(self, q: _Queue, conn: Any, limit: int, deadline: Callable[[], Any]) -> list[ClaimedJob]:
        """Claim up to ``limit`` jobs. ``deadline()`` bounds each statement on its own: a claim
        may run two, and a timeout of the second must not lose the rows the first committed."""
        token = uuid.uuid4()
        started = time.perf_counter()
        # The claim sets each lease from when its statement starts (now()), not from when
        # its rows come back: a slow claim (a long scan, a busy server) would otherwise
        # let the heartbeat's watchdog count on a lease that runs out that much later than
        # the database's, past which the rescuer may hand the job to another worker.
        sent = time.monotonic()
        params: dict[str, Any] = {"queue": q.name, "limit": limit, "token": token, "owner": self.worker_id,
                                  "lease": self.lease}
        if q.limited:
            # The function reads a head window of min(scan, max(16, 2 x room)) jobs and,
            # when they leave the batch short and more wait, skip-scans every key (and the
            # first ``scan`` jobs for unkeyed ones): see sa_jobs._claim_sql.
            params["scan"] = max(HEAD_MIN_WINDOW, PARTITION_HEAD_WINDOW * limit)  # the function's smallest window
            params.update(after_priority=None, after_scheduled=None, after_id=None)
            rows = await self._claim_resuming(q, conn, params, deadline, self._queries.claim_limited,
                                              self._queries.claim_limited, flagged=True)
        else:
            rows = await self._claim_resuming(q, conn, params, deadline, self._queries.claim,
                                              self._queries.claim_after, flagged=False)
        if not rows:  # empty, paused, at a limit, or its limits changed since we looked
            with deadline():
                await self._read_settings(q, conn)
        elif q.paused:  # a claim that returns jobs was not paused
            self._note_paused(q, False)
        elapsed = time.perf_counter() - started
        self._observer.claimed(q.name, len(rows), elapsed)
        now = time.monotonic()
        return [
            ClaimedJob(
                id=r[0], token=token, kind=r[1], queue=r[2], args=r[3], attempt=r[4],
                max_attempts=r[5], priority=r[6], wait_seconds=r[7] or 0.0, created_epoch=r[8] or 0.0,
                claimed_at=now, last_lease_ok=sent,
            )
            for r in rows
        ]

    async def _claim_resuming(self, q: _Queue, conn: Any, params: dict[str, Any], deadline: Callable[[], Any],
                              from_start_sql: str, after_sql: str, *, flagged: bool) -> list[Any]:
        """A claim (plain, or a limited queue's function); under a backlog it resumes where
        this worker's last one ended. ``flagged``: the rows end with whether a claim may
        resume past them (the claim function's ``resumable``: a partitioned claim leaves
        the jobs of keys at their limit waiting, and must not resume past those).

        Each claimed job leaves a dead entry at the head of jobs_claim_idx until VACUUM
        (for good while an old snapshot pins them), and a claim from the start of the
        queue steps over every one: over a long drain the claim would slow down in
        proportion to the jobs claimed so far. After a full batch, the next claim starts
        past its last row instead. Rows can appear behind that point (a more urgent job,
        a rescued or released one, one a rolled-back claim skipped), so a claim scans from
        the start at least every ``RESCAN_INTERVAL`` seconds, and at once whenever a
        resumed claim comes back short: a short claim always means the queue was read
        from its start, and no job waits behind the resume point longer than that.

        While the xmin horizon is held (:class:`~sa_jobs.maintenance.horizon.HorizonWatch`)
        the dead entries cannot go away, and a claim from the start reads every job
        claimed since. Then the claim resumes after every batch that returned rows, full
        or short, and reads from the start only every ``HELD_RESCAN_INTERVAL`` seconds, or
        less often when that claim grows slow (at most ``HELD_RESCAN_SHARE`` of this
        queue's producer time, and at least every ``HELD_RESCAN_MAX`` seconds): a job that
        lands behind the resume point waits that long while the horizon is held.
        """
        now = time.monotonic()
        held = self.horizon.held
        every = held_rescan_interval(q.rescan_seconds) if held else RESCAN_INTERVAL
        rows: list[Any] = []
        after = q.resume_after
        resumed = False
        if after is not None and now - q.scanned_from_start_at < every:
            resumed = True
            at = {**params, "after_priority": after[0], "after_scheduled": after[1], "after_id": after[2]}
            with deadline():
                rows = await (await conn.execute(after_sql, at, prepare=True)).fetchall()
        limit = params["limit"]
        from_start = len(rows) < limit and not (resumed and held)
        if from_start and resumed and (self._stopping or q.local_pause is not None):
            # request_stop() or pause() returned while the resumed claim ran: no claim
            # starts after they return. The resumed rows are claimed: they run.
            from_start = False
        if from_start:
            q.scanned_from_start_at = now
            rest = {**params, "limit": limit - len(rows)}
            started = time.monotonic()
            try:
                with deadline():  # a TimeoutError here is caught below, with the resumed rows kept
                    rows += await (await conn.execute(from_start_sql, rest, prepare=True)).fetchall()
            except Exception as exc:  # noqa: BLE001 - the resumed rows are claimed: run them
                # A claim from the start that times out while the horizon is held must
                # not be retried every HELD_RESCAN_INTERVAL: its time counts too.
                q.rescan_seconds = time.monotonic() - started
                if not rows:
                    raise
                # Raising would strand the committed resumed claim until its lease ran
                # out; the next claim meets the broken connection and reconnects.
                log.warning("claim on queue %r failed after %d jobs were claimed (%s)", q.name, len(rows),
                            describe(exc))
                q.resume_after = None
                return rows
            q.rescan_seconds = time.monotonic() - started
        # Claim order is (priority, scheduled_at, id); RETURNING's order is not.
        count = len(rows)
        past = [r for r in rows if r[10]] if flagged else rows
        last = max((r[6], r[9], r[0]) for r in past) if past and (held or count == limit) else None
        q.resume_after = next_resume_point(held=held, last=last, count=count, limit=limit, previous=after,
                                           from_start=from_start)
        return rows

    async def _read_settings(self, q: _Queue, conn: Any) -> None:
        row = await (await conn.execute(self._queries.queue_settings, {"queue": q.name}, prepare=True)).fetchone()
        self._note_paused(q, bool(row and row[0]))
        limited = bool(row and row[1])
        if limited != q.limited:
            log.info("worker %s: queue %r is %s", self.worker_id, q.name, "limited" if limited else "no longer limited")
            q.wake.set()  # claim again at once, through the other path
        q.limited = limited
        q.rate_period = row[3] if limited and row else None
        q.rate_spent = bool(limited and row and row[4])
        if limited and row and row[5]:
            # A newer window opened between the claim and this read: claim in it now.
            q.wake.set()

    def _note_paused(self, q: _Queue, paused: bool) -> None:
        """Log a cluster-wide pause (and its end) when this worker first sees it: a paused
        queue's worker otherwise claims nothing and says nothing."""
        if paused != q.paused:
            q.paused = paused
            if paused:
                log.info("worker %s: queue %r is paused cluster-wide; claiming nothing from it until it is resumed",
                         self.worker_id, q.name)
            else:
                log.info("worker %s: queue %r is no longer paused cluster-wide", self.worker_id, q.name)

    def _report_slots(self, q: _Queue) -> None:
        """The observer's in-flight count, from the worker's own: claimed jobs not yet
        finished, and the slots abandoned sync handlers' threads keep (Worker._outlive)."""
        self._observer.slots(q.name, q.busy + q.writing - len(q.outliving_unwritten), q.limit)

    def _completions_written(self, batch: list[Outcome]) -> None:
        for outcome in batch:
            written = self._queues.get(outcome.job.queue)
            if written is not None:
                written.writing -= 1
                if outcome.job in written.outliving_unwritten:
                    # Counted finished (job_finished): its thread still keeps the slot.
                    written.outliving_unwritten.discard(outcome.job)
                    self._report_slots(written)
        # A limited queue's room is counted from running rows: a batch of completions
        # just landed, so limited producers may find room again.
        for q in self._queues.values():
            if q.limited:
                q.wake.set()
        # A snooze of no delay made its job available (queries._FINISH), and no NOTIFY
        # says so: claim it again now, not at the next poll. (Counted, so that the batches
        # without one are not read through.)
        if self._snoozed_now:
            for outcome in batch:
                if outcome.target == "scheduled" and outcome.delay <= 0:
                    self._snoozed_now -= 1
                    snoozed = self._queues.get(outcome.job.queue)
                    if snoozed is not None:
                        snoozed.wake.set()

    # ---- local pause ---------------------------------------------------------------

    def pause(self, queue: str) -> None:
        """Stop claiming from ``queue`` in this worker only (running jobs finish); see
        :func:`sa_jobs.pause_queue` for every worker of the cluster. Safe from any thread."""
        self._local_queue(queue)
        self._on_loop(functools.partial(self._pause, queue))

    def _pause(self, queue: str) -> None:
        q = self._local_queue(queue)
        if q.local_pause is None:
            q.local_pause = anyio.Event()
            log.info("worker %s: queue %r paused locally", self.worker_id, queue)

    def resume(self, queue: str) -> None:
        """Claim from ``queue`` again after :meth:`pause`. Safe from any thread: the event
        the producer waits on is set on the worker's loop (setting it from another thread
        is not thread-safe, and the producer's wake-up could be lost)."""
        self._local_queue(queue)
        self._on_loop(functools.partial(self._resume, queue))

    def _resume(self, queue: str) -> None:
        q = self._local_queue(queue)
        event, q.local_pause = q.local_pause, None
        if event is not None:
            event.set()
            log.info("worker %s: queue %r resumed locally", self.worker_id, queue)

    def paused(self) -> list[str]:
        """The queues this worker has paused locally (none once its run has ended)."""
        if not self._running:
            return []
        return sorted(name for name, q in self._queues.items() if q.local_pause is not None)

    def _local_queue(self, queue: str) -> _Queue:
        _validate.queue_name(queue)
        if queue not in self._queue_limits:
            raise ConfigurationError(f"worker {self.worker_id} does not serve queue {queue!r}: {sorted(self._queue_limits)}")
        q = self._queues.get(queue)
        if q is None:
            raise ConfigurationError("the worker is not started yet: pause queues once it runs")
        if not self._running:
            # Its run has ended: the pause would be listed by paused() and forgotten by the
            # next run (each run starts afresh), which claimed from the queue.
            raise ConfigurationError(f"worker {self.worker_id} is not running: pause queues while it runs")
        return q

    # ---- running -----------------------------------------------------------------

    async def _runner(self, q: _Queue) -> None:
        streak = 0
        while True:
            streak += 1
            if streak % 32 == 0:
                # Handlers that never await would otherwise keep heartbeat and completer
                # off the loop for a whole batch. Before taking a job, never while holding one.
                await anyio.lowlevel.checkpoint()
            job = q.inbox.take_nowait()
            if job is None:
                job = await q.inbox.take()
                if job is None:
                    return
            q.running[job.id, job.token] = job
            outcome: Optional[Outcome] = None
            outlived = False
            runs = self._runs_of.get(job.id)
            if runs is None:  # the common case: no other claim of the job here (no Event made per job)
                runs = self._runs_of[job.id] = [job]
                earlier: tuple[ClaimedJob, ...] = ()
            else:
                earlier = tuple(runs)
                runs.append(job)
            try:
                try:
                    outcome, label = await self._execute(q, job, earlier)
                except Exception as exc:  # noqa: BLE001 - a bug here must cost one attempt, not the worker
                    log.exception("job %s: the worker failed around its handler", job.id)
                    outcome = self._failure(job, exc, exponential_backoff)
                    label = "dead" if outcome.dead else "retried"
                finally:
                    q.running.pop((job.id, job.token), None)
                    job.ended = True
                run_seconds = time.monotonic() - job.claimed_at
                since_enqueue = max(0.0, time.time() - job.created_epoch) if job.created_epoch else 0.0
                if outcome is not None:  # reported once written (Completer._finished)
                    assert self.completer is not None
                    outcome.label, outcome.run_seconds, outcome.since_enqueue = label, run_seconds, since_enqueue
                    q.writing += 1
                    self.completer.submit(outcome)
                else:
                    self._observer.job_finished(q.name, job.kind, label, run_seconds, since_enqueue)
                if job.thread is not None and not job.thread.done and not job.thread.give_up_if_unstarted():
                    outlived = True
                    await self._outlive(q, job, job.thread, label, unwritten=outcome is not None)
            finally:
                runs.remove(job)
                if not runs:
                    del self._runs_of[job.id]
                if job.run_over is not None:
                    job.run_over.set()
                q.busy -= 1
                q.slot_freed.set()
                if outlived:
                    self._report_slots(q)  # the slot is free at last
                if outcome is None and q.limited:
                    # The row already ended without the completer (ctx.transaction()'s
                    # commit, cancel(), a rescue): no write of its will wake the producer
                    # (_completions_written), and the room it freed waited for the poll.
                    q.wake.set()

    async def _outlive(self, q: _Queue, job: ClaimedJob, thread: HandlerThread, label: str, *, unwritten: bool) -> None:
        """Keep the slot of a job whose sync handler was abandoned (timed out, cancelled,
        lease lost) until its thread returns: the row has ended, but the thread runs on, and
        freeing the slot let the worker run more handlers of the queue than its concurrency
        (anyio gives the limiter's token back on abandon too). A stop past the grace period
        leaves the thread behind. The slot counts as in flight meanwhile: once its outcome
        was written (counted finished), the gauges read a free slot the worker did not have."""
        if unwritten:  # its outcome, just handed to the completer
            q.outliving_unwritten.add(job)
        self._report_slots(q)
        log.warning("job %s (%s): its sync handler still runs after the attempt ended (%s); its slot in"
                    " queue %r stays taken until it returns", job.id, job.kind, label, q.name)
        try:
            await self._thread_returned(thread)
        finally:
            q.outliving_unwritten.discard(job)
        if not thread.done:
            log.warning("job %s (%s): the worker stops; its sync handler is left running in its thread", job.id, job.kind)
            self._left_behind.append((q.name, thread))

    async def _thread_returned(self, thread: HandlerThread) -> None:
        """Wait for an abandoned thread to return, until a stop past the grace (or a hurried
        one) gives up on it (_release_running)."""
        with anyio.CancelScope() as scope:
            self._outliving.add(scope)
            if self._releasing:
                scope.cancel()
            try:
                await thread.returned()
            finally:
                self._outliving.discard(scope)

    async def _hold_left_behind(self, q: _Queue, thread: HandlerThread) -> None:
        """Keep, in this run, the slot of a thread an earlier run's stop left behind (its
        ``busy`` taken as the run began): a run started afresh ran a queue's full
        concurrency of handlers beside it. Held while the run claims: among the producers,
        it ends with them at a stop (the earlier run waited out its grace for the thread)."""
        log.warning("worker %s: a sync handler an earlier run left behind still runs; its slot in queue %r"
                    " stays taken until it returns", self.worker_id, q.name)
        try:
            self._report_slots(q)
            await self._thread_returned(thread)
        finally:
            q.busy -= 1
            q.slot_freed.set()
            self._report_slots(q)

    def _threads_left_behind(self) -> int:
        """Abandoned sync handlers left behind by stops (this run's or earlier ones'), still running."""
        return sum(not thread.done for _, thread in self._left_behind)

    async def _after_earlier_runs(self, job: ClaimedJob, earlier: Sequence[ClaimedJob]) -> None:
        """Wait until this worker's earlier runs of ``job`` have ended: a run cut short whose
        sync handler's thread runs on (cancel() then retry(), a timeout, a lost lease), or
        whose async handler is still unwinding, while its row, ended at once, was made
        available and claimed again here. Started at once, the job ran twice side by side
        in one worker. A cancel, a lost lease or a release ends the wait (_execute's
        checks follow); the lease is kept meanwhile (the job is running here)."""
        runs = self._runs_of.get(job.id, ())
        earlier = [run for run in earlier if run in runs]
        if not earlier:
            return
        log.warning("job %s (%s): an earlier run of it in this worker has not returned yet (its sync handler's"
                    " thread runs on); this attempt starts once it has", job.id, job.kind)
        with anyio.CancelScope() as scope:
            job.scope = scope
            if job.cancelled:
                scope.cancel()
            for run in earlier:
                if run.run_over is None:
                    run.run_over = anyio.Event()
                if run in self._runs_of.get(job.id, ()):
                    await run.run_over.wait()
        job.scope = None

    async def _execute(self, q: _Queue, job: ClaimedJob,
                       earlier: Sequence[ClaimedJob] = ()) -> tuple[Optional[Outcome], str]:
        for check in range(2):  # before and after waiting for earlier runs of the job
            if check:
                await self._after_earlier_runs(job, earlier)
            if job.cancelled_by_user:  # cancelled while it waited in the inbox: never start it
                return None, "cancelled"
            if job.lease_lost:  # its row is another claim's now (_settle_claims): never start it
                return None, "lease_lost"
            if self._releasing or job.releasing:
                return Outcome(job, "release"), "released"
        runtime = self._kinds.get(job.kind)
        if runtime is None:
            # Retried, not dead: workers claim by queue, so during a rolling deploy an older
            # worker claims the kinds only newer code knows; a worker that knows it runs it.
            exc = UnknownKindError(
                f"no handler for kind {job.kind!r} in worker {self.worker_id}; known kinds: {sorted(self._kinds)}"
            )
            outcome = self._failure(job, exc, _unknown_kind_backoff)
            return outcome, "dead" if outcome.dead else "retried"
        self._observer.job_started(q.name, job.kind, job.wait_seconds)
        ctx = JobContext(job, self)
        result: Any = None
        error: Optional[BaseException] = None
        watch: Optional[_DeadlineWatch] = None
        interrupted = True  # unless the handler ended with no cancellation raised out of it (below)
        with anyio.CancelScope() as scope:
            job.scope = scope
            if runtime.options.timeout is not None:
                scope.deadline = anyio.current_time() + runtime.options.timeout
            running_as = HANDLER_JOB.set(weakref.ref(job))  # the tasks the handler starts are guarded (_task_guard)
            requests = _cancel_requests()
            try:
                if runtime.is_async:
                    call = runtime.handler(ctx, **job.args)
                    if (runtime.options.timeout is not None or _UNCOUNTED_CANCELS) and hasattr(call, "__await__"):
                        call = watch = _DeadlineWatch(call, scope)
                    result = await call
                else:
                    assert self._loop is not None
                    job.thread = HandlerThread(self._loop, functools.partial(runtime.handler, ctx, **job.args))
                    result = await anyio.to_thread.run_sync(job.thread, abandon_on_cancel=True, limiter=q.limiter)
                    job.thread.taken = True
                    if inspect.iscoroutine(result) and self._releasing and not job.releasing:
                        # The release passed the job over as its thread returned (see
                        # _release_running): this coroutine is no outcome, and is not started.
                        job.releasing = True
                        job.cancel("worker shutting down")
                    if inspect.iscoroutine(result):
                        # An async handler behind a plain decorator (functools.wraps of a
                        # sync wrapper is no coroutine function): the thread gave back its
                        # coroutine unstarted, and the job ended dead, never run, as a
                        # result that is not JSON. Awaited here, under the same deadline.
                        if runtime.options.timeout is not None or _UNCOUNTED_CANCELS:
                            result = watch = _DeadlineWatch(result, scope)
                        result = await result
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a handler's failure is data
                # SystemExit too: sys.exit() in a handler (a CLI's main() it calls, argparse's
                # usage error) left the event loop, the worker gone with its claimed jobs
                # still running until their leases ran out, to crash the next worker; in a
                # plain thread it ends only the thread. It fails this attempt instead.
                error = exc
            except BaseExceptionGroup as group:
                # sys.exit() in a task of the handler's own task group (older anyio releases
                # collect the SystemExit in it, _task_guard's error aside): the group, not an
                # Exception, ended the worker. With a KeyboardInterrupt in it (a Ctrl-C's,
                # for all the worker can tell) it still stops the worker.
                if group.split((Exception, SystemExit))[1] is not None:
                    raise
                error = group
            except anyio.get_cancelled_exc_class() as exc:
                if scope.cancel_called or _cancellation_pending():
                    raise  # ours (timeout, cancel, lease) or the worker's: the scope or its caller takes it
                # The handler's own: a task it awaited was cancelled by someone else. Raised
                # on, it ended this runner as if cancelled, which stopped the whole worker
                # without a word: its claimed jobs stayed running until their leases ran
                # out, and worker.run() went on waiting, serving nothing.
                error = exc
            finally:
                HANDLER_JOB.reset(running_as)
            # A cancellation reached the handler: it was thrown into the handler (which
            # answered it with an error of its own, or swallowed it), counted by the task.
            # A handler whose await completed in the loop step that cancelled the scope is
            # sent no cancellation (anyio does not cancel a task whose result is in): it
            # ran to its end, and its return (or raise) stands, a release's too.
            # ctx.raise_if_cancelled() answers the release as well.
            interrupted = (scope.cancelled_caught or (watch is not None and watch.reached)
                           or _cancel_requests() > requests or isinstance(error, _Cancelled)
                           or (error is not None and _from_cancellation(error)))
        job.scope = None
        if job.completed_in_tx:
            if error is not None:
                # Its ctx.transaction() committed the completion: the rest of the handler
                # failed (a second completing transaction, say) with no row to record it on.
                # Where, not the message: an error's text may carry job data (never logged).
                where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
                log.warning("job %s (%s): its handler raised %s%s after ctx.transaction() completed the job;"
                            " the job stays completed", job.id, job.kind, type(error).__name__,
                            "".join(f" at {f.filename}:{f.lineno}" for f in where))
            return None, "completed"
        if job.cancelled_by_user:
            return None, "cancelled"  # cancel() already wrote the row's final state
        if job.lease_lost:
            return None, "lease_lost"  # the job belongs to another attempt now
        if job.releasing and interrupted:
            return Outcome(job, "release"), "released"
        # Only the deadline cancels the scope without a reason on the job. A handler may
        # answer that cancellation with an error of its own (a client closing its
        # connection mid-request), or swallow it and return: the attempt still timed out,
        # and says so (with the handler's error as its cause); a value returned after the
        # cancellation is not a result. A control signal (Snooze, Cancel, Discard) is the
        # handler's decision and stands. A handler the cancellation never reached returned
        # in time (its awaited result or error, or its thread's, was in when the deadline
        # came; a busy event loop ran both at once): its result, or its error, stands.
        # Reached means the scope caught the cancellation, or the async handler's awaitable
        # was thrown it (its own error in answer to it); a sync handler's thread never is.
        deadline_hit = scope.cancel_called and not job.cancelled
        reached = scope.cancelled_caught or (watch is not None and watch.reached)
        if deadline_hit and reached and not isinstance(error, JobControl):
            job.cancel("timed out")
            too_long = TimeoutError(f"job {job.id} ({job.kind}) ran longer than its timeout of {runtime.options.timeout}s")
            too_long.__cause__ = error
            outcome = self._failure(job, too_long, runtime.options.backoff)
            return outcome, "dead" if outcome.dead else "timed_out"
        if error is None and job.task_exit is not None:
            error = job.task_exit  # a task it started called sys.exit(); the handler went on
        if error is not None:
            if isinstance(error, _Cancelled) and job.cancel_reason == "timed out":
                outcome = self._failure(job, TimeoutError(str(error)), runtime.options.backoff)
                return outcome, "dead" if outcome.dead else "timed_out"
            if isinstance(error, Snooze):
                if error.seconds <= 0:
                    self._snoozed_now += 1
                return Outcome(job, "finish", target="scheduled", delay=error.seconds), "snoozed"
            if isinstance(error, Cancel):
                return Outcome(job, "finish", target="cancelled", error_json=self._error_json(job, error)), "cancelled"
            mismatch = isinstance(error, TypeError) and error is not job.bad_result and not _binds(
                runtime.signature, ctx, job.args)
            permanent = isinstance(error, Discard) or error is job.bad_result or mismatch
            if mismatch:
                error = TypeError(f"args {sorted(job.args)} do not match handler signature"
                                  f" {_parameters_of(runtime.signature)}: {error}")
            outcome = self._failure(job, error, runtime.options.backoff, permanent=permanent)
            return outcome, "dead" if outcome.dead else "retried"
        try:
            result_json = None if result is None else _validate.json_text(result)
        except InvalidArgsError as exc:
            return self._failure(job, exc, runtime.options.backoff, permanent=True), "dead"
        return Outcome(job, "complete", result_json=result_json), "completed"

    def _failure(
        self, job: ClaimedJob, exc: BaseException, policy: BackoffPolicy, *, permanent: bool = False
    ) -> Outcome:
        dead = permanent or job.attempt >= job.max_attempts
        delay = 0.0
        if not dead:
            try:
                wait = policy(job.attempt)
                # A timedelta as delay= and Snooze take one: float() of it failed, and
                # every retry fell back to the default backoff.
                delay = wait.total_seconds() if isinstance(wait, dt.timedelta) else float(wait)
                if not math.isfinite(delay) or delay < 0:
                    raise ValueError(delay)
            except Exception:  # noqa: BLE001 - a broken policy must not lose the job
                log.exception("backoff policy of %s failed; using the default", job.kind)
                delay = exponential_backoff(job.attempt)
            if delay > MAX_DELAY_SECONDS:
                # An uncapped policy (``lambda n: 10 ** n``) soon names a time PostgreSQL
                # refuses ("timestamp out of range"): the failure was dropped, the job sat
                # running until its lease ran out and was re-run at once as LeaseExpired.
                log.warning("backoff policy of %s returned %.0fs; capped at %.0fs", job.kind, delay, MAX_DELAY_SECONDS)
                delay = MAX_DELAY_SECONDS
        # Logged without the message: exception text may carry secrets; it is on the row.
        log.info("job %s (%s) attempt %d/%d failed with %s%s", job.id, job.kind, job.attempt,
                 job.max_attempts, type(exc).__name__, "; dead" if dead else "")
        return Outcome(job, "finish", target="dead" if dead else "retryable",
                       error_json=self._error_json(job, exc), delay=delay)

    def _error_json(self, job: ClaimedJob, exc: BaseException) -> str:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if len(tb) > MAX_TRACEBACK_CHARS:
            tb = tb[: MAX_TRACEBACK_CHARS // 2] + "\n...\n" + tb[-MAX_TRACEBACK_CHARS // 2 :]
        try:
            text = str(exc)
        except Exception:  # noqa: BLE001 - as traceback words it; raised, the job's outcome
            # was lost (the worker failed "around" it): a Discard or Cancel was retried,
            # and the error recorded was the __str__'s own
            text = "<exception str() failed>"
        message = f"{type(exc).__name__}: {text}"
        return json.dumps({"attempt": job.attempt, "error": _validate.pg_text(message[:4000]), "traceback": _validate.pg_text(tb),
                           "worker": self.worker_id})

    def _held_ids(self) -> list[int]:
        """The ids of the jobs this worker holds: running, or claimed and waiting for a runner."""
        return [j.id for q in self._queues.values() for j in (*q.running.values(), *q.inbox.waiting())]

    def _settle_claims(self, ids: Sequence[int], rows: Sequence[tuple[int, str, Optional[uuid.UUID]]],
                       read_at: float) -> None:
        """Judge the claims this worker holds of jobs ``ids`` by their rows (id, state,
        claim token), read by the notifier after a cancel notice (or on reconnecting) in a
        statement begun at ``read_at`` (monotonic).

        A row cancelled under the claim, or waiting again under it (cancelled and retried,
        in one transaction or before the notice was heard: a retry keeps the token until
        the next claim), ends the claim as cancelled. A row another claim holds, or none,
        ends it as lost. Reading only rows cancelled, the notifier let a job cancelled and
        retried run on until the next heartbeat (a quarter of the lease), side by side with
        the retry's run. A claim made after the read began (its row may not show it), or
        completing in ``ctx.transaction()`` (its row completed under it), is left be."""
        found = {job_id: (state, token) for job_id, state, token in rows}
        wanted = set(ids)
        running = {id(j) for j in self.running_jobs()}
        waiting = [j for q in self._queues.values() for j in q.inbox.waiting()]
        for job in self.running_jobs() + waiting:
            if job.id not in wanted or job.completing or job.lease_lost or job.claimed_at >= read_at:
                continue
            state, token = found.get(job.id, (None, None))
            if token == job.token and state == "running":
                continue
            if token == job.token and state in ("cancelled", *PENDING_STATES):
                job.cancelled_by_user = True
                job.cancel("cancelled")
                continue
            why = "its row was deleted" if state is None else "another claim holds its row now"
            log.warning("job %s: %s; cancelling its %s", job.id, why,
                        "handler" if id(job) in running else "claim before it starts")
            job.lease_lost = True
            job.cancel("lease lost: " + why)


class _DeadlineWatch:
    """An async handler's awaitable, passed through unchanged, noting whether a cancellation
    reached it once its scope was cancelled (``reached``). Its timeout is then told apart from
    a handler whose last await completed before that cancellation could be delivered (the
    event loop, busy past the deadline, ran its reply and the deadline together): anyio does
    not cancel a task whose awaited result is in, so that handler returned its result, and
    did not time out. Used only for kinds with a timeout (one Python call per suspension),
    and on Python 3.10 for every async handler: with no ``Task.cancelling()`` to count the
    requests, it alone tells a handler the release's cancellation reached (which swallowed
    it and returned, or raised an error of its own outside the ``except``) from one that
    ended in the loop step of the release; a swallowed release wrote the handler's partial
    return as the job's result."""

    __slots__ = ("_it", "_scope", "reached")

    def __init__(self, awaitable: Any, scope: anyio.CancelScope) -> None:
        self._it = awaitable.__await__()
        self._scope = scope
        self.reached = False

    def __await__(self) -> "_DeadlineWatch":
        return self

    def __iter__(self) -> "_DeadlineWatch":
        return self

    def __next__(self) -> Any:
        return self._it.send(None)

    def send(self, value: Any) -> Any:
        return self._it.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if val is None else val
        if self._scope.cancel_called and (
                isinstance(exc, asyncio.CancelledError)
                or (isinstance(exc, type) and issubclass(exc, asyncio.CancelledError))):
            self.reached = True
        if val is None and tb is None:
            return self._it.throw(typ)
        return self._it.throw(typ, val, tb)  # pragma: no cover - the legacy signature

    def close(self) -> None:
        self._it.close()


# Python 3.10: a task does not count the cancellations requested of it (_cancel_requests).
_UNCOUNTED_CANCELS = not hasattr(asyncio.Task, "cancelling")


def _cancel_requests() -> int:
    """The cancellations requested of the current task and not yet taken back (0 before
    Python 3.11, which does not count them)."""
    cancelling = getattr(asyncio.current_task(), "cancelling", None)
    return 0 if cancelling is None else cancelling()


def _require_asyncio() -> None:
    """psycopg's async connections run on asyncio only. Under another anyio backend (trio)
    every connect raised "no running event loop", which each service logged as a lost
    connection and retried for ever: the worker ran and did nothing."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise ConfigurationError(
            "the worker needs an asyncio event loop (psycopg's async connections run on asyncio);"
            " run it with asyncio.run() or anyio.run(..., backend='asyncio'), not trio"
        ) from None


def _parameters_of(signature: inspect.Signature) -> str:
    """The handler's parameters as an args mismatch names them: names and kinds, without
    defaults or annotations. The signature as Python prints it carried the defaults' values
    (an API key taken as a default) into the job's errors, whose first line job_status
    shows a user."""
    parts: list[str] = []
    keyword_only = False
    for p in signature.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            keyword_only = True
            parts.append("*" + p.name)
            continue
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            keyword_only = True
            parts.append("*")
        prefix = "**" if p.kind is p.VAR_KEYWORD else ""
        parts.append(prefix + p.name + ("=..." if p.default is not p.empty else ""))
    return "(" + ", ".join(parts) + ")"


def _binds(signature: inspect.Signature, ctx: JobContext, args: Mapping[str, Any]) -> bool:
    try:
        signature.bind(ctx, **args)
    except TypeError:
        return False
    return True
