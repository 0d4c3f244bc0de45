"""The maintenance loop, and leader election by a session advisory lock.

Services that are safe to run concurrently (rescuing expired leases, promoting due jobs:
both claim their rows with SKIP LOCKED and re-check state) run on EVERY worker. A leader
that is frozen (SIGSTOP, a long GC pause, a partition that keeps its socket open) still
holds its advisory lock, so nothing that re-drives jobs may depend on it. Services that
must run once per cluster set ``leader_only`` and run on the lock holder.
The lock lives as long as the maintainer's connection: a leader that dies or is cut off
loses it with its backend, and the next worker to try takes over within one interval.
Maintenance grows by adding a :class:`MaintenanceService`, not by editing this loop.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

import anyio
import psycopg

from ..queries import Queries
from .._connection import ManagedConnection, describe, is_transient
from ..events import WorkerObserver, hook

log = logging.getLogger("sa_jobs.maintenance")


class TickBudget:
    """A service's share of the maintenance tick: half the time the tick has left when the
    service starts. A service that works in batches stops starting new ones once the next
    would overrun it, and goes on at the next tick: a tick that outlived its deadline
    failed, dropped leadership and began again (a 500,000-job promotion took 9 s against
    a 5 s deadline). ``cap`` (seconds) bounds the share further, for background work that
    must not delay the next tick's rescue and promotion; outside a deadline only ``cap``
    limits it."""

    def __init__(self, cap: float = math.inf) -> None:
        now = anyio.current_time()
        self._until = now + min(cap, (anyio.current_effective_deadline() - now) / 2)

    def spent(self, batch_seconds: float) -> bool:
        """Whether one more batch that takes about ``batch_seconds`` would overrun it."""
        return anyio.current_time() + batch_seconds > self._until


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


class MaintenanceService(Protocol):
    """A task of the maintenance loop. It may also define ``bind_observer(observer)``:
    the maintainer calls it once, so the service can report what it did (metrics); and
    ``bind_tick(interval, timeout)``, called once with the loop's pause and tick deadline
    (periodic jobs derive from them how late a slot may fire and still count as on time)."""

    name: str
    leader_only: bool

    async def run_once(self, conn: Any, queries: Queries) -> None: ...


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
        self._conn = ManagedConnection(conninfo, "maintainer", timeout=timeout)
        self._q = queries
        self._observer = observer
        self._services = services
        self._interval = interval
        self.is_leader = False
        self._lock_conn: Any = None  # the connection whose session holds the leader lock
        self._ran = hook(observer, "maintenance_ran")
        for service in services:
            bind = getattr(service, "bind_observer", None)
            if callable(bind):
                bind(observer)
            bind_tick = getattr(service, "bind_tick", None)
            if callable(bind_tick):
                bind_tick(interval, timeout)

    async def run(self) -> None:
        try:
            while True:
                await self.tick()
                await anyio.sleep(self._interval)
        finally:
            self._set_leader(False)
            await self._conn.close()

    async def tick(self) -> None:
        try:
            conn = await self._conn.get()
            with self._conn.deadline():
                await self._tick(conn)
        except Exception as exc:  # noqa: BLE001 - retried next tick on a fresh connection
            self._observer.loop_error("maintenance")
            log.warning("maintenance failed (%s); leadership dropped until reconnected", describe(exc),
                        exc_info=not is_transient(exc))
            self._set_leader(False)
            await self._conn.discard()

    async def _tick(self, conn: Any) -> None:
        if self.is_leader and conn is not self._lock_conn:
            # The session that took the lock is gone (a service swallowed the error of a
            # session the server ended) and get() opened a new one, without the lock.
            self._set_leader(False)
        if not self.is_leader:
            cur = await conn.execute(self._q.try_leader_lock)
            self._set_leader(bool((await cur.fetchone())[0]))
            self._lock_conn = conn if self.is_leader else None
        for service in self._services:
            if self.is_leader or not service.leader_only:
                started = time.perf_counter()
                await service.run_once(conn, self._q)
                self._ran(service.name, time.perf_counter() - started)

    def _set_leader(self, value: bool) -> None:
        if value != self.is_leader:
            log.info("this worker is %s the leader", "now" if value else "no longer")
        self.is_leader = value
        self._observer.leader(value)
