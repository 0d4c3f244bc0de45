"""Job states and run outcomes: a leaf module every layer may import.

The lifecycle follows the peers (River, Oban):
``scheduled -> available -> running -> completed | retryable | dead | cancelled``,
and ``retryable`` returns to ``available`` once its backoff is due.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    SCHEDULED = "scheduled"
    """Waiting for ``scheduled_at``; the leader promotes it when due."""
    AVAILABLE = "available"
    """Ready to be claimed (the claim index covers only this state)."""
    RUNNING = "running"
    """Claimed by a worker that holds a lease on it."""
    COMPLETED = "completed"
    RETRYABLE = "retryable"
    """Failed an attempt; becomes available again at ``scheduled_at``."""
    DEAD = "dead"
    """Exhausted its attempts or failed permanently; replayable."""
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


ALL_STATES: tuple[str, ...] = tuple(s.value for s in JobState)
FINISHED_STATES: tuple[str, ...] = ("completed", "dead", "cancelled")
PENDING_STATES: tuple[str, ...] = ("scheduled", "available", "retryable")

# The words of the seeds and of user-facing status pages, by state.
STATUS_WORDS: dict[str, str] = {
    "scheduled": "queued",
    "available": "queued",
    "retryable": "queued",
    "running": "running",
    "completed": "done",
    "dead": "failed",
    "cancelled": "cancelled",
}
