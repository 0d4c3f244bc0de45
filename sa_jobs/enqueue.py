"""Bulk enqueue: many jobs in few statements, inside the caller's transaction.

``session.add_all(jobs)`` already batches (SQLAlchemy's insertmanyvalues) and returns
ids. :func:`enqueue_many` skips the ORM for loads of 100k rows: one executemany INSERT
without RETURNING, on the session's connection, so it still commits with the caller.
"""

from __future__ import annotations

from typing import Any, Iterable

from sqlalchemy import insert

from . import _validate
from .errors import ConfigurationError
from .model import Job

_jobs = Job.__table__


def job_values(job: Job) -> dict[str, Any]:
    """The INSERT parameters of an unsaved job row."""
    if job.__sa_jobs_options__ is None:
        raise ConfigurationError("not a job kind instance")
    scheduled = job.__dict__.get("scheduled_at")
    if scheduled is not None and not hasattr(scheduled, "tzinfo"):
        raise ConfigurationError("enqueue_many takes run_at= schedules, not delay= (use session.add for those)")
    values = {
        "kind": job.__sa_jobs_options__.kind,
        "queue": job.queue,
        "args": job.args,
        "state": job.state,
        "priority": job.priority,
        "max_attempts": job.max_attempts,
        "tags": job.tags,
        "meta": job.meta,
    }
    if scheduled is not None:
        values["scheduled_at"] = scheduled
    return values


def enqueue_many(session: Any, jobs: Iterable[Job], *, chunk: int = 5000) -> int:
    """Insert ``jobs`` through ``session`` (Session or Connection) in chunks; returns the count."""
    count = 0
    buffer: list[dict[str, Any]] = []
    immediate: list[dict[str, Any]] = []
    for job in jobs:
        values = job_values(job)
        (buffer if "scheduled_at" in values else immediate).append(values)
        if len(immediate) >= chunk:
            session.execute(insert(_jobs), immediate)
            count += len(immediate)
            immediate = []
    for group in (immediate, buffer):
        for i in range(0, len(group), chunk):
            session.execute(insert(_jobs), group[i : i + chunk])
            count += len(group[i : i + chunk])
    return count


def validate_queue(name: str) -> str:
    return _validate.queue_name(name)
