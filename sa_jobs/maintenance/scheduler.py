"""Promotes scheduled and retryable jobs whose time has come to available, and wakes workers."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg

from ..events import hook
from ..queries import Queries
from .leader import TickBudget


class Scheduler:
    name = "scheduler"
    leader_only = False  # concurrent-safe: must not wait on a leader that may be frozen

    def __init__(self, *, batch: int = 5000) -> None:
        self._batch = batch
        self._promoted = hook(None, "promoted")

    def bind_observer(self, observer: Any) -> None:
        self._promoted = hook(observer, "promoted")

    async def run_once(self, conn: Any, queries: Queries) -> None:
        promoted, limit = 0, self._batch
        budget = TickBudget()
        while True:
            started = anyio.current_time()
            try:
                cur = await conn.execute(queries.promote_due, {"limit": limit})
            except psycopg.errors.UniqueViolation:
                # Two due jobs of one unique key in one batch (the statement checks each
                # against other rows, not against the batch), or a job took the key
                # concurrently: one job per statement from here, so each sees the last.
                if limit == 1:
                    raise
                limit = 1
                continue
            promoted += cur.rowcount
            if cur.rowcount < limit or budget.spent(anyio.current_time() - started):
                break  # done, or the rest at the next tick
        if promoted:
            self._promoted(promoted)
            await conn.execute(queries.notify)
