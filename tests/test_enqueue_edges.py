"""Enqueue at its edges: every path writes the same row, and bad input is refused, typed,
before any SQL; a bulk load is bounded in memory and fails cleanly."""

from __future__ import annotations

import datetime as dt
import json
import tracemalloc
from decimal import Decimal
from typing import Any, Iterator, Optional

import anyio
import pytest
import sqlalchemy.exc
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from sa_jobs import ConfigurationError, InvalidArgsError, Job, Unique, enqueue_many
from sa_jobs._url import sqlalchemy_url
from sa_jobs.schema import DEFAULT_SCHEMA

from .helpers import jobs_sql, q


class EdgeTagged(Job, kind="edge_tagged", queue="edges", priority=2, max_attempts=3, tags=("kind-tag",)):
    pass


class EdgeByCustomer(Job, kind="edge_by_customer", partition_by=("customer",)):
    pass


class EdgeUnique(Job, kind="edge_unique", unique=Unique(by=("n",)), tags=("kind-tag",)):
    pass


_ROW = "SELECT kind, queue, args, state, priority, max_attempts, tags, meta, partition_key, unique_key, scheduled_at FROM {jobs}"
_RUN_AT = dt.datetime(2031, 3, 30, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))


def _rows(database_url: str, schema: str) -> list[tuple[Any, ...]]:
    return q(database_url, jobs_sql(schema, _ROW + " ORDER BY id"))


def _by_every_path(engine: Any, database_url: str, schema: str, kind: type[Job], args: dict[str, Any],
                   **options: Any) -> list[tuple[Any, ...]]:
    """The row each enqueue path writes for ``kind(**args).options(**options)``; the table is
    emptied between paths (a unique kind's second row would be a duplicate)."""
    bulk = {k: v for k, v in options.items() if k in ("queue", "priority", "max_attempts", "run_at", "tags")}
    paths = [
        lambda s: s.add(kind(**args).options(**options)),
        lambda s: s.add_all([kind(**args).options(**options)]),
        lambda s: enqueue_many(s, [kind(**args).options(**options)]),
        lambda s: enqueue_many(s, kind, [args], **bulk),
    ]
    rows = []
    for path in paths:
        with Session(engine) as session, session.begin():
            path(session)
        rows += _rows(database_url, schema)
        q(database_url, jobs_sql(schema, "DELETE FROM {jobs}"))

    async def in_async_session() -> None:
        aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={DEFAULT_SCHEMA: schema})
        try:
            async with AsyncSession(aengine) as session, session.begin():
                session.add(kind(**args).options(**options))
        finally:
            await aengine.dispose()

    anyio.run(in_async_session)
    rows += _rows(database_url, schema)
    return rows


@pytest.mark.parametrize("kind, args, options", [
    (EdgeTagged, {"n": 1}, {}),
    (EdgeTagged, {"n": 1}, {"tags": []}),
    (EdgeTagged, {"n": 1}, {"queue": "other", "priority": -4, "max_attempts": 1, "tags": ["a b", "c"], "run_at": _RUN_AT}),
    (EdgeByCustomer, {"customer": "é\t1", "n": 2}, {"priority": 5}),
    (EdgeUnique, {"n": 3}, {"tags": [], "queue": "u"}),
], ids=["defaults", "no-tags", "every-option", "partitioned", "unique-no-tags"])
def test_every_enqueue_path_writes_the_same_row(engine, database_url, schema, kind, args, options):
    """enqueue_many(session, [rows]) read a row's tags as ``row.tags or the kind's``: a job
    given ``options(tags=[])`` to drop its kind's tags kept them on that path alone."""
    rows = _by_every_path(engine, database_url, schema, kind, args, **options)
    assert len(rows) == 5
    # scheduled_at is the database's now() unless run_at sets it, so it differs by transaction.
    compared = [_hashable(row if "run_at" in options else row[:-1]) for row in rows]
    assert compared == [compared[0]] * 5, rows
    if "tags" in options:
        assert rows[0][6] == list(options["tags"])


def _hashable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for v in row)

