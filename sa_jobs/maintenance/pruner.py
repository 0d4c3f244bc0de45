"""Retention: delete finished jobs (completed, cancelled, dead) once they are old enough.

``Pruner(completed=timedelta(days=7), dead=timedelta(days=30))`` is a leader-only
maintenance service (``Worker(maintenance=[Pruner(...)])`` or ``SA_JOBS_MAINTENANCE``);
:func:`prune` does the same once, for ``sa-jobs prune``.

Each batch is one autocommit statement that locks at most ``batch`` finished rows
(``FOR UPDATE SKIP LOCKED``, so a row an operator is replaying is skipped, not waited
for), found oldest first through ``jobs_state_finished_idx (state, finished_at) WHERE
state IN ('completed', 'cancelled', 'dead')`` (schema v13: a batch reads its own state's
range, never the old rows of a state kept longer); no statement ever holds more than one
batch of row locks, and unfinished rows are outside its predicate, so they are never touched.

A batch's size adapts to how long it takes (slow disks, many indexes, TOASTed args, an
app's ``ON DELETE`` foreign key): one that hits its statement timeout is retried at half
the size, and sizes grow back after quick batches. At a fixed size, a batch slower than
the maintainer's deadline failed every tick (and leadership), and pruning never progressed.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any, Callable, Mapping, Optional

import anyio
import psycopg
from psycopg import sql

from .. import _validate
from ..errors import ConfigurationError
from ..events import hook
from ..schema import JOBS_TABLE
from ..states import FINISHED_STATES
from .leader import TickBudget

log = logging.getLogger("sa_jobs.maintenance")

DEFAULT_BATCH = 5000
# The longest a run prunes in one maintenance tick (it finishes the batch it started; the
# rest goes on at the next tick). The pruner runs last in a tick, but the next tick's
# rescue and promotion wait for it: on a backlog, half of the tick's deadline (7.5 s with
# a 30 s lease) kept a lone worker from promoting due jobs for that long, every tick.
TICK_SHARE = 0.5
# The longest retention age: ``now() - age`` must stay a timestamp (PostgreSQL's start at
# 4713 BC), or every run fails in the database. Longer means forever: that is ``None``.
MAX_AGE = dt.timedelta(days=365 * 1000)

_DELETE = (
    "WITH doomed AS MATERIALIZED ("
    " SELECT id FROM {jobs} WHERE state = %(state)s AND finished_at < now() - make_interval(secs => %(age)s)"
    " ORDER BY finished_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    " DELETE FROM {jobs} AS j USING doomed WHERE j.id = doomed.id AND j.state = %(state)s"
)
# A Pruner's own batches end on the server after half the maintainer's statement deadline
# (see Pruner.bind_tick): a batch cancelled by the client's deadline instead failed the
# tick, and psycopg closed the connection (and with it the leader lock) cancelling it.
_LIMIT_BATCH_TIME = "SELECT set_config('statement_timeout', %(ms)s, false)"
_UNLIMIT_BATCH_TIME = "RESET statement_timeout"  # back to the session's own (the maintainer's)
_STATEMENT_TIMEOUT = "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'"
_COUNT = "SELECT count(*) FROM {jobs} WHERE state = %(state)s AND finished_at < now() - make_interval(secs => %(age)s)"


def delete_statement(schema: str, state: Optional[str] = None, limit: Optional[int] = None) -> sql.Composed:
    """One batch's DELETE. Given a ``state`` and a ``limit``, the statement names them (its
    ``%(state)s`` and ``%(limit)s`` parameters are then unused), as the Pruner and
    :func:`prune` run it. With them parameters, a generic plan (the plan cache's choice for
    a statement prepared after 5 runs, or ``plan_cache_mode = force_generic_plan``) could
    not use the partial index for ``state = $1``, and guessed ``LIMIT $3`` at a tenth of
    the rows, so hash-joined a seq scan of the table: each batch read every row of its
    state (870 ms at 700k rows instead of 25 ms), at any batch size."""
    jobs = sql.Identifier(_validate.schema_name(schema), JOBS_TABLE)
    if state is None or limit is None:
        return sql.SQL(_DELETE).format(jobs=jobs)
    if state not in FINISHED_STATES:
        raise ConfigurationError(f"cannot prune state {state!r}")
    text = _DELETE.replace("%(state)s", "{state}").replace("%(limit)s", "{limit}")
    return sql.SQL(text).format(jobs=jobs, state=sql.Literal(state), limit=sql.Literal(_check_batch(limit)))


def count_statement(schema: str) -> sql.Composed:
    return sql.SQL(_COUNT).format(jobs=sql.Identifier(_validate.schema_name(schema), JOBS_TABLE))


def _seconds(value: Any, what: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif type(value) in (int, float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past any float: no timestamp or interval holds it
            raise ConfigurationError(f"{what} is out of range: {value!r}") from None
    else:
        raise ConfigurationError(f"{what} must be a timedelta (or seconds), not {value!r}")
    if not seconds >= 0:
        raise ConfigurationError(f"{what} must not be negative, not {value!r}")
    return seconds


MAX_BATCH = 1_000_000  # rows per DELETE at most: each batch's row locks last its transaction


def _check_batch(batch: object) -> int:
    if type(batch) is not int or not 1 <= batch <= MAX_BATCH:
        raise ConfigurationError(f"batch must be an int in 1..{MAX_BATCH}, not {batch!r}")
    return batch


def smaller(batch: int) -> int:
    """The size to retry a batch at after it ran out of time."""
    return max(1, batch // 2)


def resized(size: int, batch: int, seconds: float, rows: int, target: float = TICK_SHARE) -> int:
    """The next batch's size after a batch of ``size`` deleted ``rows`` in ``seconds``:
    half after one slower than ``target`` (the Pruner's: :data:`TICK_SHARE`, as a batch
    ties up the tick it runs in), double (up to the configured ``batch``) after a full one
    under a quarter of that."""
    if seconds > target:
        return smaller(size)
    if rows >= size and seconds < target / 4:
        return min(batch, size * 2)
    return size


def retention_ages(ages: Mapping[str, Any]) -> dict[str, float]:
    """Validate {state: age}; only finished states can be pruned."""
    result: dict[str, float] = {}
    for state, age in ages.items():
        if state not in FINISHED_STATES:
            raise ConfigurationError(
                f"cannot prune state {state!r}: only finished states ({', '.join(FINISHED_STATES)}) are pruned"
            )
        seconds = _seconds(age, state)
        if seconds is not None:
            if seconds > MAX_AGE.total_seconds():
                raise ConfigurationError(
                    f"{state} must be at most {MAX_AGE.days} days, not {age!r}; use None to keep a state forever"
                )
            result[state] = seconds
    return result


class Pruner:
    """Leader-only retention service. ``None`` keeps a state forever.

    Every ``interval`` seconds it deletes, per state, rows finished longer ago than that
    state's age, in batches of ``batch``, at most ``max_batches`` per state per run (the
    rest waits for the next run, so one run never holds the maintenance loop for long).
    A run also stops starting batches after ``TICK_SHARE`` seconds of a maintenance
    tick and goes on at the next tick, so a backlog never delays rescue and promotion.
    ``batch`` is the largest size: a state's batches shrink while they run long (see
    :func:`resized`) or past half the maintainer's statement timeout (then cancelled by
    the server and retried at half the size at the next tick), and grow back after.
    """

    name = "pruner"
    leader_only = True

    def __init__(
        self,
        *,
        completed: Optional[dt.timedelta] = dt.timedelta(days=7),
        cancelled: Optional[dt.timedelta] = dt.timedelta(days=7),
        dead: Optional[dt.timedelta] = dt.timedelta(days=30),
        batch: int = DEFAULT_BATCH,
        max_batches: int = 20,
        interval: float = 60.0,
    ) -> None:
        self.ages = retention_ages({"completed": completed, "cancelled": cancelled, "dead": dead})
        self.batch = _check_batch(batch)
        if type(max_batches) is not int or max_batches < 1:
            raise ConfigurationError(f"max_batches must be a positive int, not {max_batches!r}")
        self.max_batches = max_batches
        interval_s = _seconds(interval, "interval")
        if interval_s is None or interval_s == float("inf"):  # inf: pruned once, never again
            raise ConfigurationError(f"interval must be a finite number of seconds, not {interval!r}")
        self.interval = interval_s
        self._next_run = 0.0
        self.deleted: dict[str, int] = {s: 0 for s in self.ages}  # totals since start
        self._statements: dict[str, dict[tuple[str, int], str]] = {}  # {schema: {(state, size): statement}}
        self._first = 0  # the state a run starts with: see run_once
        self.sizes: dict[str, int] = {s: self.batch for s in self.ages}  # each state's next batch size
        self._time_limit: Optional[float] = None  # seconds a batch may run: see bind_tick
        self._pruned = hook(None, "pruned")

    def bind_observer(self, observer: Any) -> None:
        self._pruned = hook(observer, "pruned")

    def bind_tick(self, interval: float, timeout: float) -> None:
        """The maintainer's deadline per round trip (its statement timeout): a batch may run
        half of it, ended by the server, which leaves the connection (and the leader lock)
        usable; the other half is room for the round trip itself."""
        self._time_limit = timeout / 2

    async def run_once(self, conn: Any, queries: Any) -> None:
        if time.monotonic() < self._next_run:
            return
        statements = self._statements.setdefault(queries.schema, {})
        if self._time_limit is not None:
            await conn.execute(_LIMIT_BATCH_TIME, {"ms": str(max(1, int(self._time_limit * 1000)))})
        done = await self._run(conn, queries.schema, statements)
        if self._time_limit is not None:
            await conn.execute(_UNLIMIT_BATCH_TIME)  # the services after this one: their own
        if done:
            self._next_run = time.monotonic() + self.interval

    async def _run(self, conn: Any, schema: str, statements: dict[tuple[str, int], str]) -> bool:
        """One run's batches; whether it got through every state (else it goes on at the
        next tick, not in ``interval``)."""
        budget = TickBudget(cap=TICK_SHARE)
        # A run cut short goes on at the next tick with the state after the one it was
        # pruning: starting with the first each time, a backlog of that state longer than
        # a tick's share kept every later state from being pruned at all.
        states = list(self.ages.items())
        for i in range(len(states)):
            n = (self._first + i) % len(states)
            state, age = states[n]
            for _ in range(self.max_batches):
                size = self.sizes[state]
                started = anyio.current_time()
                try:
                    stmt = statements.get((state, size))
                    if stmt is None:  # a few sizes per state: the batch, its halves
                        stmt = statements[state, size] = delete_statement(schema, state, size).as_string()
                    cur = await conn.execute(stmt, {"age": age})
                except psycopg.errors.QueryCanceled:  # its statement timeout: nothing was deleted
                    self.sizes[state] = smaller(size)
                    log.warning("pruner: a batch of %d %s job(s) ran out of time; the next is of %d",
                                size, state, self.sizes[state])
                    # The same state first at the next tick, at the smaller size; one that
                    # cannot delete even one row (a lock an ON DELETE cascade waits for) the
                    # last, so that it holds back no other state.
                    self._first = n if size > 1 else (n + 1) % len(states)
                    return False
                seconds = anyio.current_time() - started
                self.deleted[state] += cur.rowcount
                if cur.rowcount:
                    self._pruned(state, cur.rowcount)
                    log.info("pruned %d %s job(s)", cur.rowcount, state)
                self.sizes[state] = resized(size, self.batch, seconds, cur.rowcount)
                if cur.rowcount < size:
                    break
                if budget.spent(seconds):
                    self._first = (n + 1) % len(states)
                    return False  # out of this tick's time
        return True


def _count(conn: Any, statement: sql.Composable, params: Mapping[str, Any]) -> int:
    row = conn.execute(statement, params).fetchone()
    return int(row[0]) if row else 0


def prune(
    conninfo: str,
    schema: str,
    ages: Mapping[str, Any],
    *,
    batch: int = DEFAULT_BATCH,
    progress: Optional[Callable[[int, int], None]] = None,
    dry_run: bool = False,
    counts: Optional[dict[str, int]] = None,
) -> dict[str, int]:
    """Delete finished jobs older than ``ages[state]`` now, batch by batch (each batch its
    own transaction); returns {state: rows deleted} (or, with ``dry_run``, rows that would be).

    ``progress(done, total)`` is called after each batch. ``counts``, if given, is the dict
    the deletions are counted in as each batch commits (and is returned): a caller whose
    run was cut short (Ctrl-C raised from ``progress``) can still say what each state lost.
    Under a ``statement_timeout`` (the role's, the URL's options), a batch that runs out
    of it is retried at half the size, and later batches keep to half the timeout; before,
    the run failed at the first such batch, and so did every run after it.
    """
    import psycopg

    checked = retention_ages(ages)
    _check_batch(batch)
    count = count_statement(schema)
    result: dict[str, int] = {} if counts is None else counts
    with psycopg.connect(conninfo, autocommit=True) as conn:
        totals = {s: _count(conn, count, {"state": s, "age": a}) for s, a in checked.items()}
        if dry_run:
            return totals
        total, done = sum(totals.values()), 0
        limit = _count(conn, sql.SQL(_STATEMENT_TIMEOUT), {}) / 1000  # seconds; 0: none
        if progress is not None:
            progress(0, total)
        for state, age in checked.items():
            result[state] = 0
            size = batch
            while True:
                started = time.monotonic()
                try:
                    cur = conn.execute(delete_statement(schema, state, size), {"age": age})
                except psycopg.errors.QueryCanceled:
                    # Rolled back. Its statement timeout (not an operator's cancel): again, smaller.
                    if not limit or size == 1 or time.monotonic() - started < limit * 0.9:
                        raise
                    size = smaller(size)
                    continue
                result[state] += cur.rowcount
                done += cur.rowcount
                if progress is not None:
                    progress(done, max(total, done))
                if cur.rowcount < size:
                    break
                if limit:
                    size = resized(size, batch, time.monotonic() - started, cur.rowcount, target=limit / 2)
    if progress is not None and done < total:
        # Done, with fewer rows than counted: another pruner (the leader's) deleted the
        # rest meanwhile. The bar stayed at "6/10 60%", as if the run had stopped short.
        progress(done, done)
    return result
