"""Returns jobs whose lease expired (their worker died) to retryable, or dead when exhausted."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import psycopg

from ..queries import Queries
from ..events import WorkerObserver, hook
from .leader import TickBudget


class Rescuer:
    name = "rescuer"
    leader_only = False  # concurrent-safe: must not wait on a leader that may be frozen

    def __init__(self, observer: WorkerObserver, *, batch: int = 1000) -> None:
        self._observer = observer
        self._dead = hook(observer, "rescued_dead")
        self._batch = batch

    async def run_once(self, conn: Any, queries: Queries) -> None:
        limit = self._batch
        budget = TickBudget()
        while True:
            started = anyio.current_time()
            try:
                cur = await conn.execute(queries.rescue_expired, {"limit": limit})
            except psycopg.errors.UniqueViolation:
                # Two jobs of one batch went back to one unique key (the statement checks
                # each against other rows, not against the batch), or a job took the key
                # concurrently: one job per statement from here, so each sees the last.
                if limit == 1:
                    raise
                limit = 1
                continue
            rows = await cur.fetchall()
            if rows:
                self._observer.rescued(len(rows))
                # A lost last attempt ends the job here, not in a worker: count it as the
                # dead outcome a worker would have, so a poison job that kills its
                # workers shows in the same series as any other job that died.
                for (queue, kind), n in Counter((r[2], r[3]) for r in rows if r[1] == "dead").items():
                    self._dead(queue, kind, n)
            if len(rows) < limit or budget.spent(anyio.current_time() - started):
                return  # done, or the rest at the next tick
