"""LISTENs on the schema's insert channel and wakes the producers.

Polling stays the fallback, so a lost notification only costs latency. The connection is
checked with a bounded ``SELECT 1`` between waits; a half-open socket fails that check
and is replaced, and every (re)connect wakes the producers once, for whatever was
inserted while nobody listened, and looks up the jobs the worker holds, for cancels
announced meanwhile (the heartbeat would find them only a quarter of the lease later).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import anyio

from ..queries import Queries
from .._connection import ManagedConnection, describe, is_transient
from ..events import WorkerObserver

log = logging.getLogger("sa_jobs.worker")


class Notifier:
    def __init__(
        self,
        conninfo: str,
        queries: Queries,
        observer: WorkerObserver,
        wake: Callable[[], None],
        cancel: Callable[[int], None],
        held: Callable[[], Sequence[int]] = tuple,
        *,
        health_interval: float = 5.0,
    ) -> None:
        self._q = queries
        self._observer = observer
        self._wake = wake
        self._cancel = cancel
        self._held = held
        self._health_interval = health_interval
        self._conn = ManagedConnection(conninfo, "listener", on_connect=self._listen)
        self.listening = False

    async def _listen(self, conn) -> None:  # type: ignore[no-untyped-def]
        await conn.execute(self._q.listen)
        await conn.execute(self._q.listen_cancel)

    async def run(self) -> None:
        try:
            while True:
                try:
                    conn = await self._conn.get()
                    self.listening = True
                    self._wake()
                    await self._catch_up_cancels(conn)
                    while True:
                        async for note in conn.notifies(timeout=self._health_interval):
                            if note.channel == self._q.cancel_channel:
                                if note.payload.isdigit():
                                    self._cancel(int(note.payload))
                            else:
                                self._wake()
                        with anyio.fail_after(max(1.0, self._health_interval / 2)):
                            await conn.execute("SELECT 1")
                except Exception as exc:  # noqa: BLE001 - polling covers for us meanwhile
                    self.listening = False
                    self._observer.loop_error("notifier")
                    log.warning("listener connection lost (%s); reconnecting", describe(exc), exc_info=not is_transient(exc))
                    await self._conn.discard()
                    await anyio.sleep(0.1)
        finally:
            self.listening = False
            await self._conn.close()

    async def _catch_up_cancels(self, conn) -> None:  # type: ignore[no-untyped-def]
        """Cancel the held jobs whose rows were cancelled while nobody listened. Run once
        LISTEN is in place: a cancel committed after this read is heard as a NOTIFY."""
        ids = sorted(set(self._held()))
        if not ids:
            return
        with anyio.fail_after(max(1.0, self._health_interval / 2)):
            cur = await conn.execute(self._q.states_of, {"ids": ids})
            rows = await cur.fetchall()
        for job_id, state in rows:
            if state == "cancelled":
                self._cancel(job_id)
