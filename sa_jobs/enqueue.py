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
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from psycopg import sql

from . import _validate
from .errors import ConfigurationError
from .model import Job, KindOptions, _check_attempts, _check_priority
from .schema import DEFAULT_SCHEMA, JOBS_TABLE

_COLUMNS = ("kind", "queue", "args", "state", "priority", "max_attempts", "tags", "meta", "scheduled_at")


def _schema_of(session: Any) -> str:
    bind = session.connection() if hasattr(session, "connection") else session
    translate = (bind.get_execution_options() or {}).get("schema_translate_map") or {}
    return _validate.schema_name(translate.get(DEFAULT_SCHEMA, DEFAULT_SCHEMA))


def _driver_connection(session: Any) -> Any:
    conn = session.connection() if hasattr(session, "connection") else session
    driver = conn.connection.driver_connection
    if not hasattr(driver, "cursor") or type(driver).__name__ == "AsyncConnection":
        raise ConfigurationError(
            "enqueue_many needs a sync Session or Connection on psycopg; from an AsyncSession use"
            " `await session.run_sync(lambda s: s.add_all(jobs))`"
        )
    return driver


def _row_of(job: Job) -> tuple[Any, ...]:
    options = type(job).__sa_jobs_options__
    if options is None:
        raise ConfigurationError(f"{job!r} is not an instance of a job kind")
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
        list(d.get("tags") or options.tags),
        json.dumps(d.get("meta") or {}),
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
    if run_at is not None and (not isinstance(run_at, dt.datetime) or run_at.tzinfo is None):
        raise ConfigurationError("run_at must be a timezone-aware datetime")
    state = "scheduled" if run_at is not None else "available"
    tag_list = list(tags if tags is not None else options.tags)
    for item in args:
        text = _validate.encode_payload(item, max_bytes=options.max_args_bytes)[1]
        yield (
            options.kind, queue, text, state,
            priority, max_attempts, tag_list, "{}", run_at,
        )


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
    Every args dict is validated as JSON before the COPY starts streaming it; an invalid
    one raises and, since the COPY runs in the caller's transaction, nothing is kept
    once that transaction rolls back. Returns the number of rows written.
    """
    if isinstance(jobs, type):
        if not issubclass(jobs, Job) or jobs.__sa_jobs_options__ is None:
            raise ConfigurationError(f"{jobs!r} is not a job kind")
        if args is None:
            raise ConfigurationError("enqueue_many(session, Kind, args): args is missing")
        rows: Iterable[tuple[Any, ...]] = _rows_of_args(
            jobs.__sa_jobs_options__, args, queue, priority, max_attempts, run_at, tags
        )
    else:
        if args is not None or any(v is not None for v in (queue, priority, max_attempts, run_at, tags)):
            raise ConfigurationError("options and args go with enqueue_many(session, Kind, args, ...)")
        rows = (_row_of(job) for job in jobs)
    driver = _driver_connection(session)
    table = sql.Identifier(_schema_of(session), JOBS_TABLE)
    # Rows without a schedule leave scheduled_at to its DEFAULT now() (the database
    # clock); COPY cannot say DEFAULT per row, so scheduled rows go in a second COPY.
    scheduled: list[tuple[Any, ...]] = []
    count = 0
    with driver.cursor() as cur:
        with cur.copy(_copy_statement(table, _COLUMNS[:-1])) as copy:
            for row in rows:
                if row[-1] is None:
                    copy.write_row(row[:-1])
                    count += 1
                else:
                    scheduled.append(row)
        if scheduled:
            with cur.copy(_copy_statement(table, _COLUMNS)) as copy:
                for row in scheduled:
                    copy.write_row(row)
            count += len(scheduled)
    return count


def _copy_statement(table: sql.Identifier, columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("COPY {} ({}) FROM STDIN").format(table, sql.SQL(", ").join(map(sql.Identifier, columns)))
