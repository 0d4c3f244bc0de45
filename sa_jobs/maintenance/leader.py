"""The maintenance loop, and leader election by a session advisory lock.

Services that are safe to run concurrently (rescuing expired leases, promoting due jobs:
both claim their rows with SKIP LOCKED and re-check state) run on EVERY worker. A leader
that is frozen (SIGSTOP, a long GC pause, a partition that keeps its socket open) still
holds its advisory lock, so nothing that re-drives jobs may depend on it. Services that
must run once per cluster set ``leader_only`` and run on the lock holder.
The lock lives as long as the maintainer's connection: a leader that dies or is cut off
loses it with its backend, and the next worker to try takes over within one interval. A
leader cut off without a word (its host gone, a partition) loses its backend when the
server's TCP keepalive gives up, about 25 s (set per session: see ``_connection``). A
leader that is frozen (SIGSTOP, ``docker pause``, a debugger) keeps its socket alive, so
the maintainer's session also ends once idle for longer than a live maintainer ever
leaves it (:func:`idle_limit`): before, a frozen leader kept the lock for as long as it
stayed frozen, and no worker fired a periodic slot or pruned meanwhile.
Maintenance grows by adding a :class:`MaintenanceService`, not by editing this loop.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, Sequence

import anyio
import psycopg

from ..errors import ConfigurationError
from ..queries import Queries
from ..schema import LATEST_VERSION, VersionRecord, admits_this_release, read_record_async
from .._connection import ManagedConnection, describe, is_transient
from ..events import WorkerObserver, hook

log = logging.getLogger("sa_jobs.maintenance")

# What a statement meets on a schema of another version than the one it was written for.
_MISSING_OBJECT = (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedFunction)


# When the running maintenance tick's planned time ends (anyio.current_time()): a tick is
# planned to take at most the maintainer's timeout. Outside a tick, no plan.
_TICK_ENDS: ContextVar[float] = ContextVar("sa_jobs_tick_ends", default=math.inf)


class TickBudget:
    """A service's share of the maintenance tick: half the time the tick has left of its
    plan (the maintainer's timeout) when the service starts, or of an enclosing deadline.
    A service that works in batches stops starting new ones once the next would overrun
    it, and goes on at the next tick: the next tick's rescue and promotion wait for this
    one (a 500,000-job promotion took 9 s and, when the whole tick ran under one deadline,
    failed it). A tick already past its plan (high latency) leaves each service one batch.
    ``cap`` (seconds) bounds the share further, for background work that must not delay
    the next tick's rescue and promotion; outside a tick and a deadline only ``cap``
    limits it."""

    def __init__(self, cap: float = math.inf) -> None:
        now = anyio.current_time()
        ends = min(_TICK_ENDS.get(), anyio.current_effective_deadline())
        self._until = now + min(cap, (ends - now) / 2)

    def spent(self, batch_seconds: float) -> bool:
        """Whether one more batch that takes about ``batch_seconds`` would overrun it."""
        return anyio.current_time() + batch_seconds > self._until


class StatementDeadlines:
    """The maintainer's connection as a service sees it: each round trip the service makes
    through it (a statement, an ``executemany``, a transaction's BEGIN and COMMIT, a
    pipeline's fetch or Sync) must end within ``timeout`` of its start, or the service's
    scope fails with TimeoutError. The deadline exists to find a half-open socket (peer
    gone, no RST), which stalls one round trip for good; it bounded the whole tick before,
    and at +500 ms round-trip latency a tick of 4-5 round trips outlived a 2 s timeout
    every time: every tick failed, dropped leadership and its connection, and leader-only
    services never ran. Anything else is passed to the connection as it is, bounded by the
    scope from the last round trip."""

    def __init__(self, conn: Any, scope: anyio.CancelScope, timeout: float) -> None:
        self._conn = conn
        self._scope = scope
        self._timeout = timeout

    def alive(self) -> None:
        """A round trip starts or ended: the next one has ``timeout`` from now. A deadline
        already reached stays (its cancellation may be pending, delivered at the next await):
        moved, the scope would swallow that cancellation instead of raising TimeoutError."""
        if not self._scope.cancel_called:
            self._scope.deadline = anyio.current_time() + self._timeout

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.alive()
        cur = await self._conn.execute(*args, **kwargs)
        self.alive()
        return cur

    def cursor(self, *args: Any, **kwargs: Any) -> "_BoundedCursor":
        return _BoundedCursor(self._conn.cursor(*args, **kwargs), self)

    @asynccontextmanager
    async def transaction(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        self.alive()
        async with self._conn.transaction(*args, **kwargs) as tx:
            self.alive()
            yield tx
            self.alive()  # COMMIT
        self.alive()

    @asynccontextmanager
    async def pipeline(self) -> AsyncIterator["_BoundedPipeline"]:
        """Pipeline mode: statements are sent without waiting; the round trips are a
        cursor's fetch, :meth:`_BoundedPipeline.sync` and the Sync at the block's end."""
        self.alive()
        async with self._conn.pipeline() as pipeline:
            yield _BoundedPipeline(pipeline, self)
            self.alive()  # the Sync and its results
        self.alive()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _BoundedPipeline:
    """A pipeline of :class:`StatementDeadlines`: its ``sync()`` is a round trip."""

    def __init__(self, pipeline: Any, conn: StatementDeadlines) -> None:
        self._pipeline = pipeline
        self._conn = conn

    async def sync(self) -> None:
        self._conn.alive()
        await self._pipeline.sync()
        self._conn.alive()


class _BoundedCursor:
    """A cursor of :class:`StatementDeadlines`: its statements and fetches are round trips."""

    def __init__(self, cur: Any, conn: StatementDeadlines) -> None:
        self._cur = cur
        self._conn = conn

    async def __aenter__(self) -> "_BoundedCursor":
        await self._cur.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._cur.__aexit__(*exc)

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._cur, name)
        if name not in ("execute", "executemany", "fetchone", "fetchmany", "fetchall", "scroll"):
            return found

        async def bounded(*args: Any, **kwargs: Any) -> Any:
            self._conn.alive()
            result = await found(*args, **kwargs)
            self._conn.alive()
            return result

        return bounded


async def run_batches(conn: Any, statement: str, batch: int, done: Callable[[Any], Awaitable[int]]) -> None:
    """Run ``statement`` (at most ``%(limit)s`` rows per run) until a run comes back short
    or the service's share of the tick is spent; ``done(cursor)`` handles a run's result
    and returns how many rows it moved.

    The rescue and the promotion check each unique job against other rows, not against
    the rest of their batch: on a UniqueViolation (two jobs of one key in one batch, or a
    key taken meanwhile) they go on one row per statement, so each row sees the last. One
    row can still collide with a row committed while it ran (another worker promoting a
    job of the same key, an enqueue): that run waits for the next tick, which sees the
    winner, instead of failing the tick (and, for the leader, its leadership)."""
    limit, budget = batch, TickBudget()
    while True:
        started = anyio.current_time()
        try:
            cur = await conn.execute(statement, {"limit": limit})
        except psycopg.errors.UniqueViolation as exc:
            if limit == 1:
                log.warning("a unique key was taken while this run wrote a job of it; the rest waits for the"
                            " next tick (%s)", describe(exc))
                return
            limit = 1
            continue
        if await done(cur) < limit or budget.spent(anyio.current_time() - started):
            return  # done, or the rest at the next tick


async def run_one_at_a_time(conn: Any, ids_statement: str, statement: str, batch: int,
                            done: Callable[[Any], Awaitable[int]], left: set[int]) -> None:
    """After a run of ``statement`` waited on another transaction past its own lock_timeout
    (LockNotAvailable: a unique key that transaction inserted and has not committed, see
    queries._rescue_statement): the rows ``ids_statement`` names (at most ``batch``), one
    per statement, so that only those that wait (or collide) are left for a later tick,
    within the service's share of the tick. ``left``: the rows left by the last such run,
    tried last (each wait costs the lock_timeout), and replaced by this run's."""
    budget = TickBudget()
    cur = await conn.execute(ids_statement, {"limit": batch})
    ids = sorted((row[0] for row in await cur.fetchall()), key=lambda row_id: row_id in left)  # stable
    left.clear()
    for row_id in ids:
        if budget.spent(0.0):
            break
        try:
            await done(await conn.execute(statement, {"limit": 1, "ids": [row_id]}))
        except (psycopg.errors.LockNotAvailable, psycopg.errors.UniqueViolation):
            left.add(row_id)


class MaintenanceService(Protocol):
    """A task of the maintenance loop. It may also define ``bind_observer(observer)``:
    the maintainer calls it once, so the service can report what it did (metrics); and
    ``bind_tick(interval, timeout)``, called once with the loop's pause and tick deadline
    (periodic jobs derive from them how late a slot may fire and still count as on time).
    ``run_once`` gets the maintainer's autocommit connection as a :class:`StatementDeadlines`:
    each round trip through it has the tick's timeout, not the service as a whole."""

    name: str
    leader_only: bool

    async def run_once(self, conn: Any, queries: Queries) -> None: ...


async def run_batches_around_waits(conn: Any, statement: str, ids_statement: str, one_statement: str, batch: int,
                                   done: Callable[[Any], Awaitable[int]], left: set[int], waiting: str) -> None:
    """:func:`run_batches` of ``statement``; if a run waited on another transaction past
    its lock_timeout, :func:`run_one_at_a_time` instead (``ids_statement`` names the rows,
    ``one_statement`` moves one), logging how many rows are ``left`` waiting: ``waiting``
    takes that number (``"rescuer: %d expired job(s) ..."``)."""
    try:
        await run_batches(conn, statement, batch, done)
    except psycopg.errors.LockNotAvailable:
        await run_one_at_a_time(conn, ids_statement, one_statement, batch, done, left)
        if left:
            log.warning(waiting, len(left))


def maintenance_services(given: Any, where: str) -> list[Any]:
    """``given`` (a list of maintenance services, or one alone) as a list, each checked to
    be one: ``name``, ``leader_only`` and ``run_once``. Unchecked, a Periodic declaration
    given in place of ``PeriodicJobs([...])`` failed every tick with AttributeError after
    taking the leader lock (dropping it and the connection each second), and never fired."""
    from ..periodic import Periodic  # it imports this module

    services = [given] if hasattr(given, "run_once") else given
    if isinstance(services, (str, bytes)) or not hasattr(services, "__iter__"):
        raise ConfigurationError(f"{where} takes a list of maintenance services, not {given!r}")
    checked = list(services)
    for service in checked:
        if not all(hasattr(service, a) for a in ("name", "leader_only", "run_once")):
            hint = ""
            if isinstance(service, Periodic):
                hint = "; give Periodic declarations in PeriodicJobs([...])"
            raise ConfigurationError(
                f"{where} holds {service!r}, which is not a maintenance service (name, leader_only, async run_once)"
                + hint)
    return checked


# The least idle time after which the server ends a maintainer's session (see idle_limit).
MIN_IDLE_LIMIT = 10.0

# Set on each maintainer session (both are settable by any role). idle_session_timeout
# exists since PostgreSQL 14; before it only a session frozen inside a transaction ends.
_IDLE_LIMITS = ("SELECT set_config('idle_in_transaction_session_timeout', %(ms)s, false),"
                " set_config('idle_session_timeout', %(ms)s, false)")
_IDLE_IN_TRANSACTION_LIMIT = "SELECT set_config('idle_in_transaction_session_timeout', %(ms)s, false)"


def idle_limit(interval: float, timeout: float) -> float:
    """How long the maintainer's session may stay idle before the server ends it (and with
    it the leader lock). A live maintainer sends a statement at least every ``interval``
    (the pause between ticks) plus a tick's own work between round trips; ``timeout`` is
    what a round trip itself may take, kept as room for a slow event loop, and the floor
    keeps a short interval from costing a busy leader its leadership. A frozen leader's
    lock then passes within this limit plus the next worker's interval: 16 s with the
    defaults, within the periodic grace (two ticks), so no on-time slot is missed."""
    return max(MIN_IDLE_LIMIT, interval + timeout)


class Maintainer:
    def __init__(
        self,
        conninfo: str,
        queries: Queries,
        observer: WorkerObserver,
        services: Sequence[MaintenanceService],
        *,
        interval: float = 1.0,
        timeout: float = 10.0,
    ) -> None:
        self._conn = ManagedConnection(conninfo, "maintainer", timeout=timeout, on_connect=self._limit_idle)
        self.idle_limit = idle_limit(interval, timeout)
        self._q = queries
        self._observer = observer
        self._services = services
        self._interval = interval
        self.is_leader = False
        self._reported_version: int | None = None  # a schema version met mid-run, logged once
        self._lock_conn: Any = None  # the connection whose session holds the leader lock
        self._stop = anyio.Event()
        self.stopped = anyio.Event()
        self._ran = hook(observer, "maintenance_ran")
        for service in services:
            bind = getattr(service, "bind_observer", None)
            if callable(bind):
                bind(observer)
            bind_tick = getattr(service, "bind_tick", None)
            if callable(bind_tick):
                bind_tick(interval, timeout)

    async def _limit_idle(self, conn: Any) -> None:
        """Have the server end this session once idle past :attr:`idle_limit`: a frozen
        leader's socket stays up (its kernel answers TCP keepalives), so only the server's
        idle timeout frees the leader lock it holds."""
        statement = _IDLE_LIMITS if conn.info.server_version >= 140000 else _IDLE_IN_TRANSACTION_LIMIT
        with anyio.fail_after(self._conn.timeout):
            # At most the setting's own maximum (INT_MAX ms, 24.8 days): an interval that
            # long would otherwise fail every connection with InvalidParameterValue.
            ms = min(2**31 - 1, max(1, int(self.idle_limit * 1000)))
            try:
                await conn.execute(statement, {"ms": str(ms)})
            except (psycopg.errors.UndefinedObject, psycopg.errors.CantChangeRuntimeParam,
                    psycopg.errors.InsufficientPrivilege) as exc:
                # A server (or a PostgreSQL look-alike) without these settings: maintenance
                # goes on without the bound; failing here would stop it on every connect.
                log.warning("maintainer: cannot bound its idle session (%s); a frozen leader keeps the leader"
                            " lock for as long as it stays frozen", describe(exc))

    async def run(self) -> None:
        try:
            while not self._stop.is_set():
                await self.tick()
                with anyio.move_on_after(self._interval):
                    await self._stop.wait()
        finally:
            self._set_leader(False)
            await self._conn.close()
            self.stopped.set()

    def request_stop(self) -> None:
        """End the loop after the tick in flight, if any: a tick cancelled mid-statement
        made psycopg warn, at a plain shutdown, that it closed the connection while
        cancelling the query ("query cancellation interrupted")."""
        self._stop.set()

    async def tick(self) -> None:
        try:
            conn = await self._conn.get()
            await self._tick(conn)
        except Exception as exc:  # noqa: BLE001 - retried next tick on a fresh connection
            self._observer.loop_error("maintenance")
            self._set_leader(False)
            await self._conn.discard()
            record = await self._schema_moved(exc)
            moved = None if record is None else record.version
            if record is not None and admits_this_release(record) and moved != self._reported_version:
                # A newer version that admits this release keeps all it uses: what is missing
                # was taken away otherwise, and only the traceback names it.
                self._reported_version = moved
                log.error("maintenance failed (%s): the sa-jobs schema %r is at version %d, which lets releases"
                          " of version %d and later run on it, but it lacks something this release's"
                          " maintenance uses (see the traceback), which that version promises to keep: it was"
                          " changed by hand or by a faulty migration, and this worker's maintenance fails until"
                          " it is repaired (a release that knows version %d can check it: `sa-jobs check"
                          " --schema %s`)", describe(exc), self._q.schema, record.version, record.runs_from,
                          record.version, self._q.schema, exc_info=True)
            elif moved == 0 and moved != self._reported_version:
                # Uninstalled (sa-jobs uninstall, a downgrade past version 1): no release runs on it.
                self._reported_version = moved
                log.error("maintenance failed (%s): the sa-jobs schema %r is no longer installed; it was removed"
                          " while this worker ran, and this worker's maintenance fails until it is installed"
                          " again (stop this worker, or install version %d)", describe(exc), self._q.schema,
                          LATEST_VERSION)
            elif moved is not None and moved != self._reported_version:
                self._reported_version = moved
                log.error("maintenance failed (%s): the sa-jobs schema %r is now at version %d and this sa-jobs"
                          " runs on version %d; it was migrated while this worker ran, and this worker's"
                          " maintenance fails until the schema and the release match again (restart it with"
                          " the release of version %d, or migrate back to %d)", describe(exc), self._q.schema,
                          moved, LATEST_VERSION, moved, LATEST_VERSION)
            else:
                log.warning("maintenance failed (%s); leadership dropped until reconnected", describe(exc),
                            exc_info=moved is None and not is_transient(exc))

    async def _schema_moved(self, exc: Exception) -> VersionRecord | None:
        """The installed schema version and its floor, when ``exc`` is a missing table, column
        or function and the version is not this release's: a schema migrated under the running
        worker (a rollback's downgrade, a newer release's upgrade), or a newer one this release
        runs on (its floor admits it). The worker checks the version only at start; each tick
        then failed with a traceback naming only the missing object."""
        if not isinstance(exc, _MISSING_OBJECT):
            return None
        try:
            with anyio.fail_after(self._conn.timeout):
                record = await read_record_async(await self._conn.get(), self._q.schema)
        except Exception:  # noqa: BLE001 - the failure itself is logged by the caller
            await self._conn.discard()
            return None
        return None if record.version == LATEST_VERSION else record

    async def _tick(self, conn: Any) -> None:
        """One pass of the services. Each round trip has its own deadline (the timeout: see
        :class:`StatementDeadlines`); the tick as a whole is planned to take as long, which
        only the services' :class:`TickBudget` heeds."""
        plan = _TICK_ENDS.set(anyio.current_time() + self._conn.timeout)
        try:
            if self.is_leader and conn is not self._lock_conn:
                # The session that took the lock is gone (a service swallowed the error of a
                # session the server ended) and get() opened a new one, without the lock.
                self._set_leader(False)
            if not self.is_leader:
                with self._conn.deadline():
                    cur = await conn.execute(self._q.try_leader_lock)
                    self._set_leader(bool((await cur.fetchone())[0]))
                self._lock_conn = conn if self.is_leader else None
            for service in self._services:
                if self.is_leader or not service.leader_only:
                    started = time.perf_counter()
                    with self._conn.deadline() as scope:
                        await service.run_once(StatementDeadlines(conn, scope, self._conn.timeout), self._q)
                    if scope.cancelled_caught:  # its deadline, whatever the clock says now
                        raise TimeoutError(f"maintenance service {service.name!r} timed out")
                    self._ran(service.name, time.perf_counter() - started)
        finally:
            _TICK_ENDS.reset(plan)

    def _set_leader(self, value: bool) -> None:
        """Changes only reach the observer: workers of a process may share one, and the
        one that did not lead said so at each tick, over the leader's word."""
        if value == self.is_leader:
            return
        log.info("this worker is %s the leader", "now" if value else "no longer")
        self.is_leader = value
        self._observer.leader(value)
