"""Operator actions on job rows, through the caller's Session (sync) or Connection.

Async users call them with ``await session.run_sync(lambda s: retry(s, job_id))``.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from sqlalchemy import func, literal, select, text, update

from .errors import JobNotFoundError
from .model import Job

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


def _channel(session: Any) -> str:
    from .schema import DEFAULT_SCHEMA, channel_name

    bind = session.get_bind() if hasattr(session, "get_bind") else session
    translate = (bind.get_execution_options() or {}).get("schema_translate_map") or {}
    return channel_name(translate.get(DEFAULT_SCHEMA, DEFAULT_SCHEMA))
