"""Bulk enqueue: many jobs in one COPY, inside the caller's transaction.

``session.add_all(jobs)`` already batches (SQLAlchemy's insertmanyvalues) and returns ids.
:func:`enqueue_many` is for loads of 100k rows: it streams ``COPY ... FROM STDIN`` on the
session's own connection, so the jobs still commit or roll back with the caller, and the
insert trigger still wakes the workers once. Pass job rows, or a kind and plain arg dicts
to skip building ORM objects at all.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import abc
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

import psycopg
from psycopg import sql
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import instance_state

from . import _validate
from .errors import ConfigurationError
from .model import (
    _SERVER_DEFAULT_MAX_ATTEMPTS, Job, KindOptions, _check_attempts, _check_priority, _check_run_at, _check_tags,
)
from .schema import DEFAULT_SCHEMA, JOBS_TABLE
from .unique import key_sql, note_enqueued

_COLUMNS = ("kind", "queue", "args", "state", "priority", "max_attempts", "tags", "meta", "partition_key", "scheduled_at")


def _sa_connection(session: Any) -> Any:
    """The SQLAlchemy Connection of ``session`` (a Session, or a Connection itself), in a
    transaction SQLAlchemy knows of. A Connection's ``.connection`` is its DBAPI connection,
    not a method (calling it raised TypeError); and one that had begun nothing did not
    know the COPY, run past it on the driver, had begun a transaction: its commit() did
    nothing and the rows were rolled back when it closed."""
    from sqlalchemy.engine import Connection

    if isinstance(session, Connection):
        if not session.in_transaction():
            session.begin()  # as its own first statement would (autobegin)
        return session
    from .model import Job

    # Where the Session writes jobs: one with per-mapper ``binds`` has no single bind, and
    # a plain ``connection()`` raised UnboundExecutionError where ``add_all`` worked.
    return session.connection(bind_arguments={"mapper": Job})


def _schema_of(session: Any) -> str:
    bind = _sa_connection(session)
    translate = (bind.get_execution_options() or {}).get("schema_translate_map") or {}
    return _validate.schema_name(translate.get(DEFAULT_SCHEMA, DEFAULT_SCHEMA))


_ASYNC_ONLY = (
    "enqueue_many needs a sync Session or Connection on psycopg; from an AsyncSession use"
    " `await session.run_sync(lambda s: s.add_all(jobs))`"
)


def _driver_connection(session: Any) -> Any:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    # Checked first: AsyncSession.connection() is a coroutine (an AttributeError on it,
    # and a "never awaited" warning), AsyncConnection.connection raises InvalidRequestError.
    if isinstance(session, (AsyncSession, AsyncConnection)):
        raise ConfigurationError(_ASYNC_ONLY)
    conn = _sa_connection(session)
    driver = conn.connection.driver_connection
    if isinstance(driver, psycopg.AsyncConnection):
        raise ConfigurationError(_ASYNC_ONLY)
    if not isinstance(driver, psycopg.Connection):
        # Another driver's (asyncpg's, in an AsyncSession's run_sync): the COPY and its
        # savepoint are psycopg's, and they failed with an AttributeError on its connection.
        raise ConfigurationError(
            f"enqueue_many streams a COPY through psycopg 3, not {conn.dialect.driver}: add the jobs with"
            " session.add_all(jobs) (or [Kind(**a) for a in args]) instead, which batches them too")
    return driver


def _kind_of_row(job: Job) -> KindOptions:
    if not isinstance(job, Job):  # a dict of args, None: an AttributeError on its type
        raise ConfigurationError(f"enqueue_many takes jobs, not a {type(job).__name__}"
                                 " (arg dicts go with enqueue_many(session, Kind, args))")
    options = type(job).__sa_jobs_options__
    if options is None:
        raise ConfigurationError(f"{job!r} is not an instance of a job kind")
    state = instance_state(job)
    if state.key is not None or state.session is not None:
        # A stored job was copied, state and all (a completed one's copy never ran), or
        # once expired raised KeyError; one added to a session was written twice, by the
        # COPY and again at its flush.
        raise ConfigurationError(
            f"enqueue_many writes new jobs, and {job!r} is " + ("stored already" if state.key is not None
                                                                  else "added to a session, which writes it at flush")
            + ": pass jobs no session holds (retry() replays a finished job)")
    return options


def _row_of(job: Job) -> tuple[Any, ...]:
    options = _kind_of_row(job)
    # As the flush does: args assigned since construction are checked, and the partition
    # key follows the final args (COPY wrote NaN's "invalid input syntax for type json" and
    # the first args' key).
    job._check_assigned_args(options)
    if options.partition_by:
        job._derive_partition_key(options)
    d = job.__dict__
    scheduled = d.get("scheduled_at")
    if scheduled is not None and not isinstance(scheduled, dt.datetime):
        raise ConfigurationError("enqueue_many takes run_at= schedules, not delay= (use session.add for those)")
    return (
        options.kind,
        d.get("queue") or options.queue,
        json.dumps(d["args"], separators=(",", ":")),
        d.get("state") or ("scheduled" if scheduled is not None else "available"),
        d.get("priority", options.priority),
        d.get("max_attempts", options.max_attempts),
        list(d["tags"] if d.get("tags") is not None else options.tags),  # tags=[] drops the kind's
        json.dumps(d.get("meta") or {}),
        d.get("partition_key"),
        scheduled,
    )


def _rows_of_args(
    options: KindOptions,
    args: Iterable[Mapping[str, Any]],
    queue: Optional[str],
    priority: Optional[int],
    max_attempts: Optional[int],
    run_at: Optional[dt.datetime],
    tags: Optional[Sequence[str]],
) -> Iterable[tuple[Any, ...]]:
    queue = _validate.queue_name(queue) if queue is not None else options.queue
    priority = _check_priority(priority) if priority is not None else options.priority
    max_attempts = _check_attempts(max_attempts) if max_attempts is not None else options.max_attempts
    if run_at is not None:
        _check_run_at(run_at)
    state = "scheduled" if run_at is not None else "available"
    tag_list = _check_tags(tags) if tags is not None else list(options.tags)
    for item in args:
        value, text = _validate.encode_payload(item, max_bytes=options.max_args_bytes)
        yield (
            options.kind, queue, text, state,
            priority, max_attempts, tag_list, "{}", options.partition_key_of(value), run_at,
        )


_SIMPLE_TAG = re.compile(r"[A-Za-z0-9_.:-]+")
# The table's column defaults (sa_jobs/schema.py), as the fast lane compares them.
_DEFAULT_QUEUE = "default"
_DEFAULT_PRIORITY = 0
_DEFAULT_MAX_ATTEMPTS = _SERVER_DEFAULT_MAX_ATTEMPTS


def _copy_args_as_text(
    session: Any,
    options: KindOptions,
    args: Iterable[Mapping[str, Any]],
    queue: Optional[str],
    priority: Optional[int],
    max_attempts: Optional[int],
    tags: Optional[Sequence[str]],
) -> Optional[int]:
    """The bulk path's fast lane: COPY text lines rendered here, in chunks.

    Every column but the args (and a partition key) is the same for the whole call, so
    each line is a constant prefix and suffix around the args' JSON; psycopg's per-row
    adaptation (half of the client's time per row) is skipped. Columns whose value is
    the table's default for the whole call (state, priority, max_attempts, tags, meta,
    partition_key) are left out of the COPY, so the server does not parse them per row.
    Kind and queue are validated names (no tab, newline or backslash), JSON text never
    holds a raw control character, so the only escaping COPY's text format needs is
    doubling backslashes. Returns None (use the general path) when a tag would need
    array quoting.
    """
    queue = _validate.queue_name(queue) if queue is not None else options.queue
    priority = _check_priority(priority) if priority is not None else options.priority
    max_attempts = _check_attempts(max_attempts) if max_attempts is not None else options.max_attempts
    tag_list = _check_tags(tags) if tags is not None else list(options.tags)
    if any(_SIMPLE_TAG.fullmatch(t) is None or t.upper() == "NULL" for t in tag_list):
        return None
    # (column, its text) for the columns before args, and for those after it.
    head = [("kind", options.kind)]
    if queue != _DEFAULT_QUEUE:
        head.append(("queue", queue))
    tail = []
    if priority != _DEFAULT_PRIORITY:
        tail.append(("priority", str(priority)))
    if max_attempts != _DEFAULT_MAX_ATTEMPTS:
        tail.append(("max_attempts", str(max_attempts)))
    if tag_list:
        tail.append(("tags", "{" + ",".join(tag_list) + "}"))
    columns = [c for c, _ in head] + ["args"] + [c for c, _ in tail]
    prefix = "".join(v + "\t" for _, v in head)
    suffix = "".join("\t" + v for _, v in tail)
    partitioned = bool(options.partition_by)
    if partitioned:
        columns.append("partition_key")
    else:
        suffix += "\n"
    table = sql.Identifier(_schema_of(session), JOBS_TABLE)
    encode = _validate.encode_payload
    max_bytes = options.max_args_bytes

    def line(item: Any) -> str:
        value, text = encode(item, max_bytes=max_bytes)
        if "\\" in text:
            text = text.replace("\\", "\\\\")
        if partitioned:
            key = options.partition_key_of(value)
            assert key is not None  # partitioned: the kind names its partition_by args
            return prefix + text + suffix + "\t" + _copy_text(key) + "\n"
        return prefix + text + suffix

    statement = _copy_statement(table, columns)
    count = 0
    with _driver_connection(session).cursor() as cur:
        # The caller's items are read between COPYs (see _batches), and encoded inside one,
        # in chunks the server inserts while the next is encoded: encoded before the COPY,
        # the client's work and the server's took turns (a third of the rate lost).
        for batch in _batches(args, _unsized):
            with cur.copy(statement) as copy:
                for lo in range(0, len(batch), _CHUNK_ROWS):
                    copy.write("".join([line(item) for item in batch[lo:lo + _CHUNK_ROWS]]))
            count += len(batch)
    return count


def _unsized(item: Any) -> int:
    """An args mapping, not yet encoded, counts only as a row (see _BATCH_ROWS)."""
    return 0


# Lines encoded and sent to a COPY at a time.
_CHUNK_ROWS = 2000


# Rows go in COPYs of bounded batches, the caller's iterable pulled between them, never
# inside one: a COPY holds the connection's lock, so a generator reading through the
# session (rows streamed with yield_per, a lazy load, a query per row) waited for that
# lock for ever, in the same thread. A new COPY per batch costs a round trip and a
# statement: batches of 1,000 rows cost a 50,000-job enqueue_many about a quarter of its
# rate (53k/s against 72k/s with 10,000 and 69k/s in one COPY, same run), so batches are
# large, and bounded in bytes for the memory they hold.
_BATCH_ROWS = 10_000
_BATCH_BYTES = 1 << 20

_T = TypeVar("_T")


def _batches(items: Iterable[_T], size_of: Callable[[_T], int]) -> Iterator[list[_T]]:
    """``items`` in lists of at most ``_BATCH_ROWS``, or about ``_BATCH_BYTES`` by ``size_of``."""
    batch: list[_T] = []
    size = 0
    for item in items:
        batch.append(item)
        size += size_of(item)
        if len(batch) >= _BATCH_ROWS or size >= _BATCH_BYTES:
            yield batch
            # Emptied, not replaced: the caller's loop still holds it (written by now) while
            # the next batch is built, and two batches were held at once.
            batch.clear()
            size = 0
    if batch:
        yield batch


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(value: str) -> str:
    """One field in COPY's text format (a partition key is any string without NUL)."""
    return value.translate(_COPY_ESCAPES)


def enqueue_many(
    session: Any,
    jobs: Union[Iterable[Job], type[Job]],
    args: Optional[Iterable[Mapping[str, Any]]] = None,
    *,
    queue: Optional[str] = None,
    priority: Optional[int] = None,
    max_attempts: Optional[int] = None,
    run_at: Optional[dt.datetime] = None,
    tags: Optional[Sequence[str]] = None,
) -> int:
    """COPY jobs into the queue through ``session`` (a sync Session or Connection).

    ``enqueue_many(session, [SendReceipt(order_id=1), ...])`` or, faster,
    ``enqueue_many(session, SendReceipt, [{"order_id": 1}, ...], queue="bulk")``.
    Each args dict is validated as JSON as it is streamed; an invalid one raises
    :class:`InvalidArgsError` and nothing of the call is written: the COPYs run in a
    savepoint of the caller's transaction, which stays usable (its other writes commit
    if the caller goes on). Returns the number of rows written.
    """
    driver = _driver_connection(session)
    try:
        _join_callers_transaction(driver)
        # A COPY that fails mid-stream aborts the transaction it runs in; without the savepoint
        # the caller, having caught the error, would COMMIT a failed transaction, which
        # PostgreSQL answers with a ROLLBACK of everything, silently.
        # Autoflush off while the caller's iterable runs: a query of its would flush the
        # Session's pending rows inside the savepoint, whose rollback (a bad row later)
        # discarded them while the Session took them for written.
        with driver.transaction(), (session.no_autoflush if isinstance(session, Session) else nullcontext()):
            return _enqueue_many(session, jobs, args, queue=queue, priority=priority, max_attempts=max_attempts,
                                 run_at=run_at, tags=tags)
    except psycopg.Error as exc:
        raise _as_sqlalchemy_error(session, driver, exc) from exc


def _as_sqlalchemy_error(session: Any, driver: Any, exc: Exception) -> Exception:
    """A driver error of the COPY as SQLAlchemy raises it for the caller's own statements.

    The COPY runs on the driver connection, past SQLAlchemy: a lost connection raised
    psycopg's OperationalError, which an app's ``except sqlalchemy.exc.OperationalError``
    missed, and SQLAlchemy, not told the connection was gone, failed the caller's
    ``rollback()`` too. It is invalidated here as SQLAlchemy does on a disconnect, so the
    rollback ends the transaction cleanly and the Session goes on with a new connection.
    """
    from sqlalchemy.exc import DBAPIError

    conn = _sa_connection(session)
    dialect = conn.dialect
    lost = bool(dialect.is_disconnect(exc, driver, None))
    if lost and not conn.invalidated:
        conn.invalidate(exc)
    return DBAPIError.instance("enqueue_many (COPY)", None, exc, dialect.loaded_dbapi.Error,
                               connection_invalidated=lost, dialect=dialect)


def _join_callers_transaction(driver: Any) -> None:
    """Make sure the caller's transaction has begun on the server, so that
    ``driver.transaction()`` is a savepoint inside it.

    The DBAPI begins a transaction lazily, at its first statement, so a Session whose
    transaction has run nothing yet holds an idle connection; on an idle connection
    psycopg's ``transaction()`` is an outer BEGIN ... COMMIT, and the jobs were committed
    on the spot, whatever the caller did next (a rollback kept them). A statement run
    the DBAPI's way begins the transaction as the caller's own first statement would,
    with its isolation level. An autocommit connection has no transaction to join: there
    the call is one transaction of its own.
    """
    from psycopg import pq

    if not driver.autocommit and driver.info.transaction_status == pq.TransactionStatus.IDLE:
        driver.execute("SELECT 1")


def _enqueue_many(
    session: Any,
    jobs: Union[Iterable[Job], type[Job]],
    args: Optional[Iterable[Mapping[str, Any]]],
    *,
    queue: Optional[str],
    priority: Optional[int],
    max_attempts: Optional[int],
    run_at: Optional[dt.datetime],
    tags: Optional[Sequence[str]],
) -> int:
    if isinstance(jobs, Job):  # iterating it raised the builtins' TypeError
        raise ConfigurationError("enqueue_many takes an iterable of jobs: enqueue_many(session, [job])")
    if isinstance(args, Mapping):  # its keys were taken for arg dicts
        raise ConfigurationError("enqueue_many(session, Kind, args): args is an iterable of arg dicts, not one")
    # Iterating them raised the builtins' TypeError ("'NoneType' object is not iterable").
    if not isinstance(jobs, (type, abc.Iterable)):
        raise ConfigurationError(f"enqueue_many takes a job kind or an iterable of jobs, not {jobs!r}")
    if args is not None and not isinstance(args, abc.Iterable):
        raise ConfigurationError(f"enqueue_many(session, Kind, args): args is an iterable of arg dicts, not {args!r}")
    if isinstance(session, Session):  # a COPY bypasses the unit of work: tell commit watchers
        note_enqueued(session)
    unique_rows: list[tuple[KindOptions, tuple[Any, ...]]] = []
    if isinstance(jobs, type):
        if not issubclass(jobs, Job) or jobs.__sa_jobs_options__ is None or jobs.__sa_jobs_abstract__:
            raise ConfigurationError(f"{jobs!r} is not a job kind" + (" (it is abstract)" if jobs.__sa_jobs_abstract__ else ""))
        if args is None:
            raise ConfigurationError("enqueue_many(session, Kind, args): args is missing")
        options = jobs.__sa_jobs_options__
        if options.unique is None and run_at is None:
            fast = _copy_args_as_text(session, options, args, queue, priority, max_attempts, tags)
            if fast is not None:
                return fast
        rows: Iterable[tuple[Any, ...]] = _rows_of_args(options, args, queue, priority, max_attempts, run_at, tags)
        if options.unique is not None:
            unique_rows = [(options, row) for row in rows]
            rows = ()
    else:
        if args is not None or any(v is not None for v in (queue, priority, max_attempts, run_at, tags)):
            raise ConfigurationError("options and args go with enqueue_many(session, Kind, args, ...)")
        # Streamed: the rows of unique kinds are collected as they pass, and go in after.
        rows = _split_unique(jobs, unique_rows)
    driver = _driver_connection(session)
    table = sql.Identifier(_schema_of(session), JOBS_TABLE)
    count = 0
    if rows != ():
        count += _copy_rows(driver, table, rows, scheduled=run_at is not None)
    if unique_rows:
        count += _insert_unique(driver, table, unique_rows)
    return count


def _copy_rows(driver: Any, table: sql.Identifier, rows: Iterable[tuple[Any, ...]], *, scheduled: bool) -> int:
    """COPY ``rows`` (every column of ``_COLUMNS``) as they stream; the number written.

    COPY cannot say DEFAULT per row, so a row without a schedule is written with the
    transaction's ``now()``, which is the value the DEFAULT gives (and the database's
    clock). It was once a second COPY for the scheduled rows, which held every one of
    them in memory until the first COPY ended: a million rows given ``run_at=``, 300 MB.
    """
    count = 0
    statement = _copy_statement(table, _COLUMNS)
    with driver.cursor() as cur:
        now = None if scheduled else cur.execute("SELECT now()").fetchone()[0]
        for batch in _batches(rows, lambda row: len(row[2])):  # the args' JSON text
            with cur.copy(statement) as copy:
                for row in batch:
                    copy.write_row(row if row[-1] is not None else (*row[:-1], now))
            count += len(batch)
    return count


def _copy_statement(table: sql.Identifier, columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN").format(table, sql.SQL(", ").join(map(sql.Identifier, columns)))


def _split_unique(jobs: Iterable[Job], unique_rows: list[tuple[KindOptions, tuple[Any, ...]]]) -> Iterable[tuple[Any, ...]]:
    """Yield the plain rows for COPY; collect the rows of unique kinds into ``unique_rows``."""
    for job in jobs:
        options = _kind_of_row(job)
        row = _row_of(job)
        if options.unique is None:
            yield row
        else:
            unique_rows.append((options, row))


# COPY cannot skip conflicts, so rows of unique kinds go in one INSERT ... SELECT FROM
# unnest(...) ON CONFLICT on the unique index, with the key's period bucket computed on
# the database clock as in the ORM path.
_UNNEST = (
    " unnest(%(kind)s::text[], %(queue)s::text[], %(args)s::text[], %(state)s::text[],"
    "  %(priority)s::smallint[], %(max_attempts)s::int[], %(tags)s::text[], %(meta)s::text[],"
    "  %(partition_key)s::text[], %(scheduled_at)s::timestamptz[], %(base)s::text[], %(period)s::bigint[],"
    "  %(states)s::text[])"
    " WITH ORDINALITY AS u(kind, queue, args, state, priority, max_attempts, tags, meta, partition_key, scheduled_at,"
    "  base, period, states, ord)"
)
_UNIQUE_INSERT = (
    "INSERT INTO {jobs} (kind, queue, args, state, priority, max_attempts, tags, meta, partition_key,"
    " scheduled_at, unique_key, unique_states)"
    " SELECT u.kind, u.queue, u.args::jsonb, u.state, u.priority, u.max_attempts,"
    " ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb)), u.meta::jsonb, u.partition_key,"
    " coalesce(u.scheduled_at, now()),"
    " " + key_sql("u.base", "u.period") + ","
    " ARRAY(SELECT jsonb_array_elements_text(u.states::jsonb))"
    " FROM" + _UNNEST + " ORDER BY u.ord"
    " ON CONFLICT (kind, unique_key) WHERE {predicate} DO NOTHING"
)
# The (kind, base key) of each row an INSERT or a replace wrote: a key is its base, or the
# base, ':' and the period's bucket (the base is hex).
_RETURNING_KEYS = " RETURNING kind, split_part(unique_key, ':', 1)"
# The job holding a row's key: ``j`` joined to ``u`` on the unique index (its predicate
# spelled out, qualified: ``u`` has a state column too).
_HELD_BY_J = (
    " j.kind = u.kind AND j.unique_key = " + key_sql("u.base", "u.period")
    + " AND j.unique_key IS NOT NULL AND j.state = ANY (j.unique_states)"
)
# A replace rewrites the waiting jobs that hold the rows' keys, locked in the batch's keyed
# order (one bulk call waits for another instead of deadlocking). Not the INSERT's
# ``DO UPDATE ... WHERE <waiting>``: that locks the conflicting row even where the WHERE
# keeps it from being updated, so a replace that met a running job held the job's row
# until the caller's transaction ended, and the worker's heartbeats and completion waited.
_UNIQUE_REPLACE = (
    "WITH u AS MATERIALIZED (SELECT * FROM" + _UNNEST + "),"
    " target AS MATERIALIZED (SELECT j.id, u.ord FROM u JOIN {jobs} AS j ON" + _HELD_BY_J
    + " WHERE j.state IN ('scheduled', 'available', 'retryable') ORDER BY u.ord FOR UPDATE OF j)"
    " UPDATE {jobs} AS j SET args = u.args::jsonb, queue = u.queue, priority = u.priority,"
    " max_attempts = u.max_attempts, scheduled_at = coalesce(u.scheduled_at, now()), state = u.state,"
    " tags = ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb)), meta = u.meta::jsonb,"
    " partition_key = u.partition_key"
    " FROM target AS t JOIN u ON u.ord = t.ord WHERE j.id = t.id"
    + _RETURNING_KEYS.replace("kind", "j.kind").replace("unique_key", "j.unique_key")
)
# The rows whose key a job holds (running or finished, once neither inserted nor replaced).
_UNIQUE_HELD = "SELECT u.kind, u.base FROM" + _UNNEST + " WHERE EXISTS (SELECT FROM {jobs} AS j WHERE" + _HELD_BY_J + ")"
# As in the ORM path: a key can leave its states between the statements; bounded.
_MAX_ROUNDS = 8


def _insert_unique(driver: Any, table: sql.Identifier, unique_rows: list[tuple[KindOptions, tuple[Any, ...]]]) -> int:
    """Insert rows of unique kinds, skipping (or replacing) held keys; the rows written."""
    by_mode: dict[str, dict[tuple[str, str], tuple[Any, ...]]] = {"return": {}, "replace": {}}
    # Rows in a state outside their kind's unique states (a scheduled row of a kind whose
    # key is held only while available or running): the index does not cover them, so
    # they hold no key, meet none, and are no duplicate of a row of the batch. Deduplicated
    # by key with the rest, the batch's available row of that key was dropped (or it was
    # the scheduled one): enqueued one by one (session.add), both went in.
    outside: list[tuple[Any, ...]] = []
    for options, row in unique_rows:
        unique = options.unique
        assert unique is not None
        args = json.loads(row[2])
        base = unique.base_key(options.kind, row[1], args)
        full = (*row, base, unique.period_seconds, json.dumps(list(unique.states)))
        if row[3] not in unique.states:
            outside.append(full)
            continue
        slot = by_mode[unique.on_conflict]
        key = (options.kind, base)
        if unique.on_conflict == "replace":
            slot[key] = full  # one statement cannot update a row twice: the last one wins
        else:
            slot.setdefault(key, full)  # the first one wins, as in the ORM path
    written = 0
    if outside:
        with driver.cursor() as cur:
            cur.execute(_statement(_UNIQUE_INSERT, table), _params(outside))
            written += cur.rowcount
    for mode, keyed in by_mode.items():
        if not keyed:
            continue
        # Sorted by key: concurrent loads of overlapping keys take their index locks in
        # one order, so they wait for each other instead of deadlocking.
        ordered = [keyed[k] for k in sorted(keyed)]
        if mode == "return":
            with driver.cursor() as cur:
                cur.execute(_statement(_UNIQUE_INSERT, table), _params(ordered))
                written += cur.rowcount
        else:
            written += _insert_or_replace(driver, table, ordered)
    return written


def _insert_or_replace(driver: Any, table: sql.Identifier, rows: list[tuple[Any, ...]]) -> int:
    """Rows of replace kinds: inserted where their key is free, else rewriting the waiting
    job that holds it; dropped where a running or finished job holds it. Rows whose key
    was freed between the statements go round again. The rows written."""
    written = 0
    with driver.cursor() as cur:
        for _ in range(_MAX_ROUNDS):
            for statement in (_UNIQUE_INSERT + _RETURNING_KEYS, _UNIQUE_REPLACE):
                done = set(map(tuple, cur.execute(_statement(statement, table), _params(rows)).fetchall()))
                written += len(done)
                rows = [r for r in rows if (r[0], r[10]) not in done]
                if not rows:
                    return written
            held = set(map(tuple, cur.execute(_statement(_UNIQUE_HELD, table), _params(rows)).fetchall()))
            rows = [r for r in rows if (r[0], r[10]) not in held]
            if not rows:
                return written
    raise ConfigurationError(  # pragma: no cover - keys flapped in and out of their states 8 times
        f"could not enqueue {len(rows)} unique job(s) of kind {rows[0][0]!r}: their keys kept changing state")


def _statement(text: str, table: sql.Identifier) -> sql.Composed:
    from .schema import UNIQUE_PREDICATE

    return sql.SQL(text).format(jobs=table, predicate=sql.SQL(UNIQUE_PREDICATE))


def _params(rows: list[tuple[Any, ...]]) -> dict[str, list[Any]]:
    cols = list(zip(*rows))
    return {
        "kind": list(cols[0]), "queue": list(cols[1]), "args": list(cols[2]), "state": list(cols[3]),
        "priority": list(cols[4]), "max_attempts": list(cols[5]),
        "tags": [json.dumps(list(t)) for t in cols[6]], "meta": list(cols[7]), "partition_key": list(cols[8]),
        "scheduled_at": list(cols[9]), "base": list(cols[10]), "period": list(cols[11]), "states": list(cols[12]),
    }
