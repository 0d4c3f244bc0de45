"""Promotes scheduled and retryable jobs whose time has come to available, and wakes workers."""

from __future__ import annotations

from typing import Any

from ..events import hook
from ..queries import Queries
from .leader import run_batches_around_waits


class Scheduler:
    name = "scheduler"
    leader_only = False  # concurrent-safe: must not wait on a leader that may be frozen

    def __init__(self, *, batch: int = 5000) -> None:
        self._batch = batch
        self._promoted = hook(None, "promoted")
        self._left: set[int] = set()  # due jobs left waiting on another transaction at the last try

    def bind_observer(self, observer: Any) -> None:
        self._promoted = hook(observer, "promoted")

    async def run_once(self, conn: Any, queries: Queries) -> None:
        promoted = 0

        async def done(cur: Any) -> int:
            nonlocal promoted
            promoted += cur.rowcount
            return int(cur.rowcount)

        # A job that waits on another transaction (queries._promote_statement).
        await run_batches_around_waits(
            conn, queries.promote_due, queries.due_ids, queries.promote_due_ids, self._batch, done, self._left,
            "scheduler: %d due job(s) wait on another transaction (a unique key it has inserted and not committed);"
            " promoted once it ends")
        if promoted:
            self._promoted(promoted)
            await conn.execute(queries.notify)
