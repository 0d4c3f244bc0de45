"""Promotes scheduled and retryable jobs whose time has come to available, and wakes workers."""

from __future__ import annotations

from typing import Any

from ..queries import Queries


class Scheduler:
    name = "scheduler"
    leader_only = False  # concurrent-safe: must not wait on a leader that may be frozen

    def __init__(self, *, batch: int = 5000) -> None:
        self._batch = batch

    async def run_once(self, conn: Any, queries: Queries) -> None:
        promoted = 0
        while True:
            cur = await conn.execute(queries.promote_due, {"limit": self._batch})
            promoted += cur.rowcount
            if cur.rowcount < self._batch:
                break
        if promoted:
            await conn.execute(queries.notify)
