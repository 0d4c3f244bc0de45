"""SystemExit in a task a handler started fails that handler's attempt, not the worker.

asyncio re-raises SystemExit (and KeyboardInterrupt) out of the event loop from the step
of whichever task raised it. A handler catches its own (worker.py), but a task it started,
a child of its own task group or a bare ``asyncio.create_task``, is run by the loop itself:
its ``sys.exit()`` ended the whole worker, its claimed jobs left running until their leases
ran out. While a worker runs, the loop's task factory wraps the coroutine of every task
created under a handler (``HANDLER_JOB`` is set: contextvars follow into its tasks) so
that SystemExit leaves it as :class:`TaskExitError`, noted on the job. KeyboardInterrupt
passes: it cannot be told from a real Ctrl-C, which must stop the worker.
"""

from __future__ import annotations

import asyncio
import contextvars
import weakref
from typing import Any, Coroutine, Optional

from ._job import ClaimedJob

# A weak reference: a task the handler started may outlive its job (a client's pool task).
HANDLER_JOB: contextvars.ContextVar[Optional["weakref.ref[ClaimedJob]"]] = contextvars.ContextVar(
    "sa_jobs_handler_job", default=None)


class TaskExitError(RuntimeError):
    """A task a handler started raised SystemExit (its cause)."""


class TaskGuard:
    """The loop's task factory while workers run on it; the one it replaced makes the tasks."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous
        self.users = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        job = HANDLER_JOB.get()
        if job is not None and asyncio.iscoroutine(coro):
            coro = _guarded(coro, job)
        if self.previous is None:
            return asyncio.Task(coro, loop=loop, **kwargs)
        return self.previous(loop, coro, **kwargs)


async def _guarded(coro: Coroutine[Any, Any, Any], job_ref: "weakref.ref[ClaimedJob]") -> Any:
    try:
        return await coro
    except SystemExit as exc:
        job = job_ref()
        name = "a job" if job is None else f"job {job.id} ({job.kind})"
        error = TaskExitError(f"a task started by the handler of {name} raised SystemExit({exc.code!r});"
                              " a worker does not exit for a handler")
        if job is not None and job.task_exit is None:
            job.task_exit = error
        raise error from exc


def install(loop: asyncio.AbstractEventLoop) -> TaskGuard:
    """Guard the loop's tasks (one guard for every worker on the loop)."""
    current = loop.get_task_factory()
    guard = current if isinstance(current, TaskGuard) else TaskGuard(current)
    if guard is not current:
        loop.set_task_factory(guard)
    guard.users += 1
    return guard


def uninstall(loop: asyncio.AbstractEventLoop, guard: TaskGuard) -> None:
    """Give the loop its own factory back once no worker runs on it (unless the app set one since)."""
    guard.users -= 1
    if guard.users == 0 and loop.get_task_factory() is guard:
        loop.set_task_factory(guard.previous)
