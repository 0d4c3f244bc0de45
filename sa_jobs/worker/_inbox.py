"""Hands claimed jobs to a queue's runner tasks, waking as few of them as the work needs.

A memory stream hands every item to a different parked task: one task wake-up per job,
even for handlers that finish without ever awaiting. Here a batch wakes ONE idle runner;
a runner that takes a job wakes the next only while jobs remain. Fast handlers are then
drained by a few runners in a row, and slow ones still fan out to every free runner
(each taken job passes the baton on before its handler starts).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Optional

import anyio

from ._job import ClaimedJob


class JobInbox:
    def __init__(self) -> None:
        self._jobs: deque[ClaimedJob] = deque()
        self._idle: deque[anyio.Event] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    def waiting(self) -> list[ClaimedJob]:
        """The jobs claimed and not yet taken by a runner."""
        return list(self._jobs)

    def put_many(self, jobs: Iterable[ClaimedJob]) -> None:
        self._jobs.extend(jobs)
        if self._jobs:
            self._wake_one()

    def close(self) -> None:
        """No more jobs will come: runners drain what is left, then stop."""
        self._closed = True
        while self._idle:
            self._idle.popleft().set()

    def take_nowait(self) -> Optional[ClaimedJob]:
        if not self._jobs:
            return None
        job = self._jobs.popleft()
        if self._jobs:
            self._wake_one()  # pass the baton: someone else may run the next one meanwhile
        return job

    async def take(self) -> Optional[ClaimedJob]:
        """The next job, waiting if need be; None once closed and empty."""
        while True:
            job = self.take_nowait()
            if job is not None or self._closed:
                return job
            parked = anyio.Event()
            self._idle.append(parked)
            await parked.wait()

    def _wake_one(self) -> None:
        while self._idle:
            parked = self._idle.popleft()
            if not parked.is_set():
                parked.set()
                return
