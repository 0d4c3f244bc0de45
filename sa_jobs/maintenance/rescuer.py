"""Returns jobs whose lease expired (their worker died) to retryable, or dead when exhausted."""

from __future__ import annotations

from typing import Any

from ..queries import Queries
from ..events import WorkerObserver


class Rescuer:
    name = "rescuer"
    leader_only = False  # concurrent-safe: must not wait on a leader that may be frozen

    def __init__(self, observer: WorkerObserver, *, batch: int = 1000) -> None:
        self._observer = observer
        self._batch = batch

    async def run_once(self, conn: Any, queries: Queries) -> None:
        while True:
            cur = await conn.execute(queries.rescue_expired, {"limit": self._batch})
            rows = await cur.fetchall()
            if rows:
                self._observer.rescued(len(rows))
            if len(rows) < self._batch:
                return
