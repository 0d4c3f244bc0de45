"""LISTENs on the schema's insert channel and wakes the producers.

Polling stays the fallback, so a lost notification only costs latency. The connection is
checked with a bounded ``SELECT 1`` between waits; a half-open socket fails that check
and is replaced, and every (re)connect wakes the producers once, for whatever was
inserted while nobody listened, and looks up the jobs the worker holds, for cancels
announced meanwhile (the heartbeat would find them only a quarter of the lease later).

A cancel notice names a job, not a run of it, and comes at no fixed time against the
worker's claims (another connection): a job cancelled and retried at once could be
claimed again before the notice was heard. The notifier therefore reads the rows of the
held jobs it names and hands them to the worker, which judges each claim against its row
(``settle``): one whose row is cancelled, or waiting again, under it was cancelled (a
cancel and a retry in one transaction leave the row available, never read cancelled);
one whose row another claim holds now has ended too; one made after the read is left be.

A notice can also come while a claim is in flight, its jobs not held yet: the notifier
tells the worker of every cancel notice as it takes it (``heard``), and of every connect
(``heard(None)``: notices may have been missed meanwhile), and the worker checks the jobs
of a claim that was in flight then (Worker._recheck_claimed).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable, Optional, Sequence

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
        settle: Callable[[Sequence[int], Sequence[tuple[int, str, Optional[uuid.UUID]]], float], None],
        held: Callable[[], Sequence[int]] = tuple,
        heard: Callable[[Optional[int]], None] = lambda job_id: None,
        *,
        health_interval: float = 5.0,
    ) -> None:
        self._q = queries
        self._observer = observer
        self._wake = wake
        self._settle = settle
        self._held = held
        self._heard = heard
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
                    self._heard(None)  # a claim in flight may hold jobs of cancels not heard
                    self._wake()
                    await self._catch_up_cancels(conn)
                    while True:
                        heard = False
                        cancelled: list[int] = []
                        # Ends after each packet of notifications (all of it: none is
                        # lost), so that the jobs a cancel names are looked up at once:
                        # no query runs on the connection while notifies() waits.
                        async for note in conn.notifies(timeout=self._health_interval, stop_after=1):
                            heard = True
                            if note.channel == self._q.cancel_channel:
                                if note.payload.isdigit():
                                    cancelled.append(int(note.payload))
                                    self._heard(cancelled[-1])
                            else:
                                self._wake()
                        if cancelled:
                            await self._cancel_held(conn, set(cancelled) & set(self._held()))
                        if heard:  # the connection answers: no health check needed yet
                            continue
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
        await self._cancel_held(conn, set(self._held()))

    async def _cancel_held(self, conn, ids: set[int]) -> None:  # type: ignore[no-untyped-def]
        """Read the rows (state, claim token) of held jobs (``ids``) and hand them to the
        worker with the moment the read began (monotonic): only claims it made before
        then can be judged by them."""
        if not ids:
            return
        read_at = time.monotonic()
        with anyio.fail_after(max(1.0, self._health_interval / 2)):
            cur = await conn.execute(self._q.claims_of, {"ids": sorted(ids)})
            rows = await cur.fetchall()
        self._settle(sorted(ids), [(r[0], r[1], r[2]) for r in rows], read_at)
