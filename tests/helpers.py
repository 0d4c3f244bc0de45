"""Shared test helpers: run an in-process worker until the database says we are done."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import anyio
import psycopg
from psycopg import sql

from sa_jobs import Job, Worker
from sa_jobs._url import to_conninfo
from sa_jobs.events import NullObserver

FAST = dict(lease=2.0, poll_interval=0.2, maintenance_interval=0.1)


def q(database_url: str, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def jobs_sql(schema: str, rest: str) -> sql.Composed:
    """``SELECT ... FROM <schema>.jobs ...`` with the schema quoted."""
    return sql.SQL(rest).format(jobs=sql.Identifier(schema, "jobs"), effects=sql.Identifier(schema, "effects"))


def states(database_url: str, schema: str) -> dict[str, int]:
    rows = q(database_url, jobs_sql(schema, "SELECT state, count(*) FROM {jobs} GROUP BY state"))
    return {state: n for state, n in rows}


async def until(check: Callable[[], Any], within: float = 10) -> None:
    """In async code: wait (polling every 10 ms, at most ``within`` seconds, then
    TimeoutError) until ``check()`` is true."""
    with anyio.fail_after(within):
        while not check():
            await anyio.sleep(0.01)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def run_worker_until(
    database_url: str,
    schema: str,
    kinds: Iterable[type[Job]],
    done: Callable[[], bool],
    *,
    timeout: float = 30.0,
    **options: Any,
) -> Worker:
    """Run a Worker in this process until ``done()`` (checked in a thread) or ``timeout``."""
    settings = {**FAST, **options}

    async def main() -> Worker:
        async with Worker(database_url, kinds=list(kinds), schema=schema, **settings) as worker:
            with anyio.move_on_after(timeout):
                while not await anyio.to_thread.run_sync(done):
                    await anyio.sleep(0.05)
        return worker

    return anyio.run(main)


class FinishedOutcomes(NullObserver):
    """A worker observer that records each finished attempt's outcome (``.outcomes``)."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None:
        self.outcomes.append(outcome)


class LoopErrors(NullObserver):
    """A worker observer that records the components whose loop failed (``.seen``)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def loop_error(self, component: str) -> None:
        self.seen.append(component)


def refused_in_an_async_session(database_url: str, schema: str, calls: dict[str, Callable[[Any], Any]],
                                then: Callable[[Any], Any]) -> None:
    """Each of ``calls`` (by the function's name) given an AsyncSession raises the
    ConfigurationError that names run_sync, with no "never awaited" warning; then
    ``await then(session)`` in the same session (the way that works)."""
    import warnings

    import pytest
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from sa_jobs import ConfigurationError
    from sa_jobs._url import sqlalchemy_url

    async def main() -> None:
        aengine = create_async_engine(sqlalchemy_url(database_url, async_=True)).execution_options(
            schema_translate_map={"sa_jobs": schema})
        try:
            async with AsyncSession(aengine) as session:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    for name, call in calls.items():
                        with pytest.raises(ConfigurationError, match=rf"^{name}\(\) needs a sync Session.*run_sync"):
                            call(session)
                await then(session)
        finally:
            await aengine.dispose()

    anyio.run(main)
