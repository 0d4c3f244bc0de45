"""Promotes scheduled and retryable jobs whose time has come to available, and wakes workers."""

from __future__ import annotations

from typing import Any

from ..events import hook
from ..queries import Queries
from .leader import run_batches


class Scheduler:
    name = "scheduler"
    leader_only = False  # concurrent-safe: must not wait on a leader that may be frozen

    def __init__(self, *, batch: int = 5000) -> None:
        self._batch = batch
        self._promoted = hook(None, "promoted")

    def bind_observer(self, observer: Any) -> None:
        self._promoted = hook(observer, "promoted")

    async def run_once(self, conn: Any, queries: Queries) -> None:
        promoted = 0

        async def done(cur: Any) -> int:
            nonlocal promoted
            promoted += cur.rowcount
            return int(cur.rowcount)

        await run_batches(conn, queries.promote_due, self._batch, done)
        if promoted:
            self._promoted(promoted)
            await conn.execute(queries.notify)
