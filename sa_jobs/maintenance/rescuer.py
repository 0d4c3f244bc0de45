"""Returns jobs whose lease expired (their worker died) to retryable, or dead when exhausted."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ..queries import Queries
from ..events import WorkerObserver, hook
from .leader import run_batches_around_waits


class Rescuer:
    name = "rescuer"
    leader_only = False  # concurrent-safe: must not wait on a leader that may be frozen

    def __init__(self, observer: WorkerObserver, *, batch: int = 1000) -> None:
        self._observer = observer
        self._dead = hook(observer, "rescued_dead")
        self._batch = batch
        self._left: set[int] = set()  # expired jobs left waiting on another transaction at the last try

    async def run_once(self, conn: Any, queries: Queries) -> None:
        # A job that waits on another transaction past the rescue's lock_timeout (a unique
        # job whose key that transaction inserted: see queries._rescue_statement).
        await run_batches_around_waits(
            conn, queries.rescue_expired, queries.expired_ids, queries.rescue_expired_ids, self._batch, self._rescued,
            self._left, "rescuer: %d expired job(s) wait on another transaction (a unique key it has inserted and"
                        " not committed); rescued once it ends")

    async def _rescued(self, cur: Any) -> int:
        rows = await cur.fetchall()
        if rows:
            self._observer.rescued(len(rows))
            # A lost last attempt ends the job here, not in a worker: count it as the
            # dead outcome a worker would have, so a poison job that kills its
            # workers shows in the same series as any other job that died.
            for (queue, kind), n in Counter((r[2], r[3]) for r in rows if r[1] == "dead").items():
                self._dead(queue, kind, n)
        return len(rows)
