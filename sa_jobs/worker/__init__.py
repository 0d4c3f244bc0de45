"""The anyio worker and what handlers see of it."""

from .context import JobContext
from ..events import NullObserver, WorkerObserver
from .worker import Worker

__all__ = ["JobContext", "NullObserver", "Worker", "WorkerObserver"]
