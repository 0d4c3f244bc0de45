"""What the worker reports as it runs: the seam between the hot path and metrics.

The worker calls these hooks; :mod:`sa_jobs.metrics` implements them with
prometheus-client. The default does nothing, so a worker without metrics pays a call.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Protocol

from .errors import ConfigurationError

log = logging.getLogger("sa_jobs.worker")

# Run outcomes, as reported to observers (a bounded set: safe as a metric label).
OUTCOMES = ("completed", "retried", "dead", "cancelled", "snoozed", "timed_out", "released", "lease_lost")


class WorkerObserver(Protocol):
    def claimed(self, queue: str, count: int, seconds: float) -> None: ...
    def job_started(self, queue: str, kind: str, wait_seconds: float) -> None: ...
    # Once the attempt's outcome is written (an outcome the fence refused: "lease_lost",
    # or "cancelled" if cancel() ended the job under this claim).
    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None: ...
    def slots(self, queue: str, in_flight: int, limit: int) -> None: ...
    def rescued(self, count: int) -> None: ...
    def loop_error(self, component: str) -> None: ...
    def heartbeat_ok(self) -> None: ...
    def leader(self, is_leader: bool) -> None: ...  # on each change of this worker's leadership


# Maintenance hooks, added after the ones above: an observer written against the older
# protocol may lack them, so callers look them up with :func:`hook` (a missing one is a
# no-op) instead of calling them directly.
#
#   promoted(count)                  scheduled/retryable jobs made available
#   pruned(state, count)             finished rows deleted by retention, per state
#   periodic_enqueued(name, count)   jobs enqueued for a periodic declaration's slots
#   maintenance_ran(service, seconds) one run of a maintenance service that succeeded
#   horizon_held(seconds)            how long the xmin horizon has been held (0: moving)
#   rescued_dead(queue, kind, count) jobs that ended dead past their attempt's verdict: rescued
#                                    ones whose lost attempt was their last, and a retry the
#                                    completer ended dead (another job took its unique key)
MAINTENANCE_HOOKS = ("promoted", "pruned", "periodic_enqueued", "maintenance_ran", "horizon_held", "rescued_dead")

# Lifecycle hooks, optional as those above:
#
#   worker_started()       a run of the worker starts its services
#   worker_stopped(asked)  that run ended: ``asked`` if it stopped as asked (shutdown,
#                          request_stop, leaving ``async with``), not on an error of its own
LIFECYCLE_HOOKS = ("worker_started", "worker_stopped")


def hook(observer: Any, name: str) -> Callable[..., None]:
    """``observer``'s hook ``name``, or a function that does nothing if it has none.

    A hook that raises is logged and ignored: a broken metric must not stop maintenance
    (nor cost this worker its leadership)."""
    found = getattr(observer, name, None)
    if not callable(found):
        return _ignore

    def call(*args: Any) -> None:
        try:
            found(*args)
        except Exception:  # noqa: BLE001 - the observer is not the maintainer's business
            log.exception("observer hook %s failed", name)

    return call


def _ignore(*_args: Any) -> None:
    return None


# The hooks of WorkerObserver above.
CORE_HOOKS = ("claimed", "job_started", "job_finished", "slots", "rescued", "loop_error", "heartbeat_ok", "leader")


class GuardedObserver:
    """``observer`` with every hook called through :func:`hook`: one that raises is logged
    and ignored. The worker calls hooks between steps that must not be torn apart (after a
    claim committed, before its jobs reach the runners; after a handler returned, before
    its outcome is queued): a broken metric must cost a log line, never a job or the worker."""

    def __init__(self, observer: Any) -> None:
        self.wrapped = observer
        for name in CORE_HOOKS + MAINTENANCE_HOOKS + LIFECYCLE_HOOKS:
            # The worker calls hooks without awaiting: an async one made a coroutine that
            # never ran (its metrics silently missing, a "never awaited" warning per call).
            if inspect.iscoroutinefunction(getattr(observer, name, None)):
                raise ConfigurationError(
                    f"observer hook {name}() is async: hooks are called, not awaited, on the worker's"
                    " event loop; make it a plain method that returns at once")
            setattr(self, name, hook(observer, name))

    def __getattr__(self, name: str) -> Any:  # anything else the observer offers
        return getattr(self.wrapped, name)


class NullObserver:
    """Does nothing: the worker's default when metrics are off."""

    def claimed(self, queue: str, count: int, seconds: float) -> None:
        pass

    def job_started(self, queue: str, kind: str, wait_seconds: float) -> None:
        pass

    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None:
        pass

    def slots(self, queue: str, in_flight: int, limit: int) -> None:
        pass

    def rescued(self, count: int) -> None:
        pass

    def loop_error(self, component: str) -> None:
        pass

    def heartbeat_ok(self) -> None:
        pass

    def leader(self, is_leader: bool) -> None:
        pass
