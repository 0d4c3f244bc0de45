"""sa-jobs: durable background jobs on PostgreSQL, as SQLAlchemy mapped models.

Declare a kind, enqueue it in your own transaction, run a worker::

    class SendReceipt(Job, kind="send_receipt", queue="emails"):
        pass

    @SendReceipt.handler
    async def send_receipt(ctx: JobContext, order_id: int) -> None: ...

    with Session(engine) as session, session.begin():
        session.add(SendReceipt(order_id=42))
"""

# First: Ctrl-C while the sa-jobs command imports what follows is one line, not a traceback
# (in that command's process only; see _cli_start).
from . import _cli_start

_cli_start.guard()

from .admin import (
    JobStatus,
    QueueLimits,
    cancel,
    cancel_many,
    job_status,
    pause_queue,
    paused_queues,
    queue_limits,
    resume_queue,
    retry,
    retry_many,
    set_queue_limits,
    wait_for,
    wait_for_async,
)
from .enqueue import enqueue_many
from .errors import (
    Cancel,
    ConfigurationError,
    Discard,
    EmbeddedServerError,
    InvalidArgsError,
    InvalidIdentifierError,
    JobNotFoundError,
    LeaseLostError,
    SaJobsError,
    SchemaLockTimeoutError,
    SchemaVersionError,
    Snooze,
    StatementInterruptedError,
    UnknownKindError,
)
from .model import Job, KindOptions, registered_kinds
from .periodic import Periodic, PeriodicJobs
from .retry import constant_backoff, exponential_backoff
from .schema import install, uninstall
from .states import JobState
from .unique import Unique
from .worker import JobContext, Worker, WorkerObserver
from .maintenance.pruner import Pruner  # after .worker: maintenance imports worker pieces

__version__ = "0.1.0"

__all__ = [
    "Cancel",
    "ConfigurationError",
    "Discard",
    "EmbeddedServerError",
    "InvalidArgsError",
    "InvalidIdentifierError",
    "Job",
    "JobContext",
    "JobNotFoundError",
    "JobStatus",
    "JobState",
    "KindOptions",
    "LeaseLostError",
    "Periodic",
    "PeriodicJobs",
    "Pruner",
    "QueueLimits",
    "SaJobsError",
    "SchemaLockTimeoutError",
    "SchemaVersionError",
    "Snooze",
    "StatementInterruptedError",
    "UnknownKindError",
    "Unique",
    "Worker",
    "WorkerObserver",
    "cancel",
    "cancel_many",
    "constant_backoff",
    "enqueue_many",
    "exponential_backoff",
    "install",
    "job_status",
    "pause_queue",
    "paused_queues",
    "queue_limits",
    "registered_kinds",
    "resume_queue",
    "retry",
    "retry_many",
    "set_queue_limits",
    "uninstall",
    "wait_for",
    "wait_for_async",
]
