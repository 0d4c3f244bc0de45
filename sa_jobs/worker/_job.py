"""The worker's in-memory record of one claimed job, and the outcome it ends with."""

from __future__ import annotations

import asyncio
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import anyio


@dataclass(eq=False)
class ClaimedJob:
    id: int
    token: uuid.UUID
    kind: str
    queue: str
    args: dict[str, Any]
    attempt: int
    max_attempts: int
    priority: int
    wait_seconds: float
    created_epoch: float
    claimed_at: float  # monotonic, when the claim returned
    last_lease_ok: float  # monotonic: the lease is known to last until this + lease (when the claim or last good beat was sent)
    scope: Optional[anyio.CancelScope] = None
    lease_lost: bool = False
    releasing: bool = False
    completing: bool = False  # a transactional completion is writing (or wrote) the row
    completed_in_tx: bool = False
    in_transaction: bool = False  # a ctx.transaction() (or async one) of the handler's is open
    cancel_reason: Optional[str] = None
    cancelled_by_user: bool = False  # cancelled through cancel(): the row already says so
    progress_json: Optional[str] = None  # reported, not yet written by a heartbeat
    reported: bool = False  # this run reported progress (a release drops it from the row)
    thread: Optional["HandlerThread"] = None  # the call of a sync handler, once started
    ended: bool = False  # the runner has its outcome: what the handler (or its thread) does now is no part of it
    run_over: Optional[anyio.Event] = None  # set once its runner is done with it, for a later claim that waits (made by it)
    task_exit: Optional[BaseException] = None  # a task the handler started raised SystemExit (as this)
    bad_result: Optional[BaseException] = None  # ctx.transaction(result=...) refused its result (as this)
    # Called on cancel: each cancels on the server the statement of a sync ctx.transaction()
    # open in the handler's thread (context._ServerStatement), which nothing else interrupts.
    # (Made by the first such transaction: most jobs open none.)
    stop_statements: Optional[set[Callable[[], None]]] = None

    @property
    def cancelled(self) -> bool:
        return self.cancel_reason is not None

    def cancel(self, reason: str) -> None:
        """Ask the handler to stop; async handlers are cancelled, sync ones see ``ctx.cancelled``."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.scope is not None:
            self.scope.cancel()
        for stop in tuple(self.stop_statements or ()):
            stop()


class HandlerThread:
    """A sync handler's call in a worker thread, which a timeout or cancellation abandons
    (a thread cannot be interrupted): :meth:`returned` waits until it really returns."""

    def __init__(self, loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> None:
        self._loop, self._call = loop, call
        self._lock = threading.Lock()
        self.started = False  # a thread has begun the call
        self.done = False
        self.taken = False  # the runner has the call's outcome (it may await a coroutine the call returned)
        self._returned: Optional[anyio.Event] = None  # made only for an abandoned call

    def give_up_if_unstarted(self) -> bool:
        """For a call abandoned before a thread began it: it never runs (True), and counts
        as returned. Abandoned that early (a timeout shorter than the thread's start, a
        cancel or release in that instant), anyio never calls it, or calls it later if a
        thread took it up as it was abandoned; either way the runner waited for a return
        that never came, its slot lost for the run (and the next run of the Worker)."""
        with self._lock:
            if not self.started:
                self.done = True
            return not self.started

    def __call__(self) -> Any:
        with self._lock:
            if self.done:  # given up before it began (give_up_if_unstarted): the attempt is over
                return None
            self.started = True
        try:
            return self._call()
        finally:
            with self._lock:
                self.done = True
                event, loop = self._returned, self._loop
            if event is not None:
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:  # the loop closed: nobody waits any more
                    pass

    async def returned(self) -> None:
        with self._lock:
            if self.done:
                return
            # The loop of this wait: a later run of the worker (on a new loop) waits for a
            # thread an earlier run left behind.
            self._loop = asyncio.get_running_loop()
            self._returned = event = anyio.Event()
        await event.wait()


@dataclass(eq=False)
class Outcome:
    """What the completer writes for a job: complete, finish (in ``target``) or release."""

    job: ClaimedJob
    action: str  # "complete" | "finish" | "release"
    result_json: Optional[str] = None
    target: str = ""  # for "finish": retryable | dead | cancelled | scheduled (snooze)
    error_json: Optional[str] = None
    delay: float = 0.0
    # For the observer's job_finished, called once the completer wrote it (a completion
    # the fence refused was no completion): the runner's label and times, and whether the
    # write changed the row.
    label: str = ""
    run_seconds: float = 0.0
    since_enqueue: float = 0.0
    landed: bool = False
    waited: bool = False  # kept unwritten: its write waited on another transaction (its job keeps its lease)

    @property
    def dead(self) -> bool:
        return self.target == "dead"
