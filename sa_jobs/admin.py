"""Operator actions on job rows, through the caller's Session (sync) or Connection.

Async users call them with ``await session.run_sync(lambda s: retry(s, job_id))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from sqlalchemy import func, literal, select, update

from .errors import JobNotFoundError
from .model import Job
from .states import PENDING_STATES, STATUS_WORDS

_jobs = Job.__table__

REPLAYABLE_STATES = ("dead", "cancelled", "completed", "retryable", "scheduled")


def retry(session: Any, job_id: int) -> int:
    """Make a finished (dead, cancelled, completed) or waiting job available now.

    A replay grants exactly one more attempt: ``max_attempts`` becomes at least
    ``attempt + 1``. Returns the job's id; raises :class:`JobNotFoundError` if no job
    with that id is in a replayable state (a running job cannot be retried).
    """
    if type(job_id) is not int or job_id < 1:
        raise JobNotFoundError(f"job ids are positive integers, not {job_id!r}")
    ids = retry_many(session, [job_id])
    if not ids:
        raise JobNotFoundError(f"no job {job_id} in a replayable state ({', '.join(REPLAYABLE_STATES)})")
    return ids[0]


def retry_many(session: Any, job_ids: Iterable[int]) -> Sequence[int]:
    """:func:`retry` for many ids in one statement; returns the ids that were replayed."""
    ids = [int(i) for i in job_ids]
    if not ids:
        return []
    stmt = (
        update(_jobs)
        .where(_jobs.c.id.in_(ids), _jobs.c.state.in_(REPLAYABLE_STATES))
        .values(
            state="available",
            scheduled_at=func.now(),
            finished_at=None,
            max_attempts=func.greatest(_jobs.c.max_attempts, _jobs.c.attempt + 1),
        )
        .returning(_jobs.c.id)
    )
    replayed = [row[0] for row in session.execute(stmt)]
    if replayed:
        # The workers only wake on INSERT; a replay makes rows claimable without one.
        session.execute(select(func.pg_notify(literal(_channel(session)), "")))
    return replayed


def _schema(session: Any) -> str:
    from .schema import DEFAULT_SCHEMA

    bind = session.get_bind() if hasattr(session, "get_bind") else session
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
    NOTIFY (or at its next heartbeat) to cancel the handler: async handlers are
    cancelled, sync handlers see ``ctx.cancelled``. Raises :class:`JobNotFoundError` if
    the job does not exist or has already finished.
    """
    if type(job_id) is not int or job_id < 1:
        raise JobNotFoundError(f"job ids are positive integers, not {job_id!r}")
    done = cancel_many(session, [job_id])
    if not done:
        raise JobNotFoundError(f"no job {job_id} in a cancellable state ({', '.join(CANCELLABLE_STATES)})")
    return done[job_id]


def cancel_many(session: Any, job_ids: Iterable[int]) -> dict[int, str]:
    """:func:`cancel` for many ids in one statement; returns {id: previous state}."""
    from .queries import cancel_channel_name

    ids = [int(i) for i in job_ids]
    if not ids:
        return {}
    target = (
        select(_jobs.c.id, _jobs.c.state)
        .where(_jobs.c.id.in_(ids), _jobs.c.state.in_(CANCELLABLE_STATES))
        .with_for_update()
        .cte("target")
    )
    stmt = (
        update(_jobs)
        .where(_jobs.c.id == target.c.id)
        .values(state="cancelled", finished_at=func.now(), lease_expires_at=None)
        .returning(_jobs.c.id, target.c.state)
    )
    previous = {row[0]: row[1] for row in session.execute(stmt)}
    channel = cancel_channel_name(_schema(session))
    for job_id, state in previous.items():
        if state == "running":
            session.execute(select(func.pg_notify(literal(channel), literal(str(job_id)))))
    return previous


@dataclass(frozen=True)
class JobStatus:
    """What a user-facing status page shows about one job."""

    id: int
    status: str  # queued | running | done | failed | cancelled
    state: str  # the row's exact state
    attempt: int
    max_attempts: int
    error: Optional[str]  # the last error's first line, at most 200 characters
    can_retry: bool  # whether retry() would accept it (dead or cancelled)
    result: Any
    progress: Any = None


def job_status(session: Any, job_id: int) -> JobStatus:
    """The status of job ``job_id`` in a status page's words (seed 002)."""
    row = session.execute(
        select(_jobs.c.id, _jobs.c.state, _jobs.c.attempt, _jobs.c.max_attempts, _jobs.c.errors, _jobs.c.result,
               _jobs.c.progress)
        .where(_jobs.c.id == job_id)
    ).one_or_none()
    if row is None:
        raise JobNotFoundError(f"no job {job_id}")
    error = None
    if row.errors and row.state in ("dead", "retryable", "cancelled"):
        error = str(row.errors[-1].get("error", "")).splitlines()[0][:200] if row.errors[-1].get("error") else None
    return JobStatus(
        id=row.id, status=STATUS_WORDS[row.state], state=row.state, attempt=row.attempt,
        max_attempts=row.max_attempts, error=error, can_retry=row.state in ("dead", "cancelled"), result=row.result,
        progress=row.progress,
    )


FINAL_STATUSES = ("done", "failed", "cancelled")


def wait_for(engine: Any, job_id: int, timeout: float = 30.0) -> JobStatus:
    """Block until job ``job_id`` is done, failed (dead) or cancelled; its final status.

    Polls with a gentle backoff (20 ms growing to 500 ms). Raises ``TimeoutError``.
    """
    import time

    from sqlalchemy.orm import Session

    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        with Session(engine) as session:
            status = job_status(session, job_id)
        if status.status in FINAL_STATUSES:
            return status
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} is still {status.state} after {timeout}s")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(0.5, pause * 1.5)


async def wait_for_async(engine: Any, job_id: int, timeout: float = 30.0) -> JobStatus:
    """:func:`wait_for` for an ``AsyncEngine``, without blocking the event loop."""
    import anyio
    from sqlalchemy.ext.asyncio import AsyncSession

    pause = 0.02
    with anyio.fail_after(timeout):
        while True:
            async with AsyncSession(engine) as session:
                status = await session.run_sync(job_status, job_id)
            if status.status in FINAL_STATUSES:
                return status
            await anyio.sleep(pause)
            pause = min(0.5, pause * 1.5)


def _queues_table(session: Any) -> Any:
    from sqlalchemy import Boolean, Column, DateTime, MetaData, Table, Text

    from .schema import DEFAULT_SCHEMA, QUEUES_TABLE

    return Table(
        QUEUES_TABLE, MetaData(), Column("name", Text, primary_key=True), Column("paused", Boolean),
        Column("updated_at", DateTime(timezone=True)), schema=DEFAULT_SCHEMA,
    )


def set_queue_paused(session: Any, queue: str, paused: bool) -> None:
    """Pause (or resume) ``queue`` for every worker of the cluster; persisted in the queues table.

    Paused workers finish what they run and claim nothing more from it until resumed.
    """
    from sqlalchemy.dialects.postgresql import insert

    from . import _validate

    _validate.queue_name(queue)
    table = _queues_table(session)
    stmt = insert(table).values(name=queue, paused=paused, updated_at=func.now())
    session.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"paused": paused, "updated_at": func.now()}))
    if not paused:
        session.execute(select(func.pg_notify(literal(_channel(session)), "")))


def pause_queue(session: Any, queue: str) -> None:
    set_queue_paused(session, queue, True)


def resume_queue(session: Any, queue: str) -> None:
    set_queue_paused(session, queue, False)


def paused_queues(session: Any) -> list[str]:
    table = _queues_table(session)
    return list(session.scalars(select(table.c.name).where(table.c.paused).order_by(table.c.name)))
