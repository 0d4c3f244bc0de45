"""Batches outcomes: one UPDATE per action per flush, never one round trip per job.

Runners hand outcomes over without waiting; the completer writes whatever accumulated
after a short interval (or at once when the batch is full). A failed write keeps the
outcomes and retries with backoff: a completion that never lands leaves the job running
until its lease expires, when it is rescued and re-run (at-least-once, never stuck). An
outcome whose row another transaction holds locked (or whose unique key another
transaction has inserted) is kept and retried the same way, while the rest of its batch
is written around it; while the worker lives, its job keeps its lease (see
:meth:`Completer.awaiting`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional

import anyio
import psycopg

from .. import _validate
from ..queries import Queries
from ..states import FINISHED_STATES
from .._connection import ManagedConnection, describe, is_transient
from ._job import ClaimedJob, Outcome
from .heartbeat import lease_params
from ..events import WorkerObserver, hook

log = logging.getLogger("sa_jobs.worker")

# The results one flush writes at most, in characters of JSON: one result at the cap
# (_validate.MAX_RESULT_BYTES) writes in about half a second, well within the deadline.
RESULT_CHARS_PER_FLUSH = _validate.MAX_RESULT_BYTES
# How long a flush waits for a row lock another transaction holds (the completer
# connection's lock_timeout) before it writes around the locked rows (see _write).
LOCK_WAIT = 0.5


def _waited(exc: BaseException) -> bool:
    """A write that ran out of the connection's lock_timeout (LOCK_WAIT) on another
    transaction: one that holds a row lock the usual flush met, or, even around row locks,
    one that inserted a unique key the outcome's state would take (the index waits for it
    to end). The batch is split, as for a refusal, so only such outcomes wait (and are
    kept): retried whole as a transient failure, the batch waited on it every time, and no
    outcome of the worker landed while that transaction lasted."""
    return isinstance(exc, psycopg.errors.LockNotAvailable)


class _RowLocked(Exception):
    """A superseded outcome's row was locked by another transaction: kept, written later."""


class _KeyFreed(Exception):
    """No job holds the key that refused an outcome any more (the holder left its states,
    claimed say, between the refusal and the look-up): kept, written again later."""


class Completer:
    def __init__(
        self,
        conn: ManagedConnection,
        queries: Queries,
        observer: WorkerObserver,
        *,
        interval: float = 0.005,
        max_batch: int = 2000,
        on_written: Optional[Callable[[list[Outcome]], None]] = None,
        lease: Optional[float] = None,
    ) -> None:
        self._conn = conn
        self._lease = lease  # extended for the kept outcomes' jobs after each wait (_keep_leases)
        self._q = queries
        self._observer = observer
        # A job that would have run again ends dead here (_write_superseded): its worker
        # counted the attempt "retried", so it is counted dead as the rescuer counts its own.
        self._dead = hook(observer, "rescued_dead")
        self._interval = interval
        self._max_batch = max_batch
        self._on_written = on_written
        self._pending: list[Outcome] = []
        self._batch: list[Outcome] = []  # the batch being written
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._failures = 0
        # Flushes cut off by the deadline in a row: the next try gets twice the time, up to
        # four times (the server's statement_timeout too, for that statement). Retried
        # under the same deadline, a write the server needed longer for (a large result on
        # a loaded host, a slow trigger) never landed, and its finished job ran again once
        # its lease ran out. The connection was replaced after each cut, so a half-open one
        # is not what the longer wait is spent on.
        self._timeouts = 0
        # Rows of outcomes were locked by another transaction at the last write: flushes
        # write around locks until one finds none (see _write), retrying the kept ones
        # with backoff.
        self._around_locks = False
        self._lock_retries = 0
        # One flush at a time: drain() at shutdown must wait for a batch that run() is
        # writing, or it would return while that batch could still be lost.
        self._flushing = anyio.Lock()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def unwritten(self) -> int:
        """Outcomes not yet written: pending, and those of a write in flight (pending no
        more while it runs; a drain that timed out during it reported 0), but not those of a
        batch written in parts whose parts landed before a stop cut it short."""
        if not self._batch:
            return len(self._pending)
        return len({id(o) for o in self._pending} | {id(o) for o in self._batch if not o.landed})

    def awaiting(self) -> list[ClaimedJob]:
        """The jobs whose outcomes are kept because their writes waited on another
        transaction (pending, or in the write in flight).

        Their handlers ended, and this live worker holds their claims until the outcomes
        land: the heartbeat keeps their leases. Left out, an outcome that waited longer
        than the lease (on an app's open insert of the job's unique key) let the rescuer
        re-drive the job once that transaction ended, before the retry (backing off) wrote
        it: a second run of a job that had finished (CI: attempt 2), or dead with its result
        lost, recorded as a worker that stopped heartbeating. An outcome whose writes fail
        otherwise is not kept alive so: its job is rescued, as before."""
        return [o.job for o in self._pending if o.waited] + [o.job for o in self._batch if o.waited]

    def submit(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        if self._idle.is_set():
            self._idle = anyio.Event()
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            if len(self._pending) < self._max_batch:
                await anyio.sleep(self._interval)
            self._wake = anyio.Event()
            await self.flush()
            if self._pending:
                self._wake.set()

    async def flush(self) -> bool:
        """Write every pending outcome; False (outcomes kept) if the database failed."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        if not self._pending:
            self._idle.set()
            return True
        batch, self._pending = self._take()
        self._batch = batch
        locked: list[Outcome] = []
        stretch = 2 ** min(self._timeouts, 2)
        try:
            conn = await self._conn.get()
            with anyio.fail_after(self._conn.timeout * stretch):
                if stretch > 1:
                    await self._set_statement_timeout(conn, self._conn.timeout * stretch)
                locked = await self._write(conn, batch)
                if stretch > 1:
                    await self._set_statement_timeout(conn, self._conn.timeout)
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled mid-write: keep the batch
                self._pending[:0] = batch
                self._batch = []
                raise
            self._observer.loop_error("completer")
            if not _waited(exc) or stretch > 1:  # fine after a lock wait, but not left stretched
                await self._conn.discard()
            if is_transient(exc) and not _waited(exc):
                self._pending[:0] = batch
                self._batch = []
                self._failures += 1
                if isinstance(exc, (TimeoutError, psycopg.errors.QueryCanceled)):
                    self._timeouts += 1
                log.warning("completer: writing %d outcome(s) failed (%s); retrying", len(batch), describe(exc))
                await anyio.sleep(min(2.0, 0.05 * 2 ** min(self._failures, 6)))
                return False
            # The database refused the batch itself: write it in halves, so one bad row
            # cannot hold back the rest. One that still fails alone is dropped and logged;
            # its job stays running until its lease expires and is then rescued. One that
            # still waits alone on another transaction is kept, as a locked row's is.
            log.warning("completer: batch of %d refused (%s); writing it in parts", len(batch), describe(exc))
            locked = await self._write_in_parts(batch)
        self._batch = []
        self._failures = self._timeouts = 0
        if locked:
            # Kept, not dropped: the lock may be gone at the next try (then the outcome
            # lands, or is fenced off if the locker changed the row). Their jobs are still
            # heartbeated (awaiting): a live worker's claim outlasts the lock, however long.
            self._pending.extend(locked)
        else:
            self._around_locks = False
        # Counted (and handed to on_written) only once written, fenced off or dropped: not
        # the kept ones, nor a part put back after a transient failure (_write_in_parts).
        # Counted with the batch, those were counted again when they landed.
        back = {id(o) for o in self._pending}
        batch = [o for o in batch if id(o) not in back]
        try:
            await self._note_cancelled([o for o in batch if o.label and not o.landed])
        finally:  # counted even if a stop cancels the look-up (then as lease_lost)
            for outcome in batch:  # written, fenced off, or dropped: it counts now, as what it did
                self._finished(outcome)
            if self._on_written is not None:
                self._on_written(batch)
        if not self._pending:
            self._idle.set()
        if locked:
            for outcome in locked:
                outcome.waited = True
            await self._keep_leases(locked)
            self._lock_retries += 1
            await anyio.sleep(min(1.0, 0.05 * 2 ** min(self._lock_retries, 5)))
        else:
            self._lock_retries = 0
        return True

    @staticmethod
    async def _set_statement_timeout(conn: Any, seconds: float) -> None:
        await conn.execute("SELECT set_config('statement_timeout', %(ms)s, false)",
                           {"ms": f"{max(1, int(seconds * 1000))}ms"})

    def _finished(self, outcome: Outcome) -> None:
        """Report the attempt to the observer. Counted by the runner, before the write, a
        completion the fence refused (the lease lost, the job another worker's now) still
        counted as completed; it counts as lease_lost, as one the runner saw lost does, or
        as cancelled if cancel() ended it under this claim (see _note_cancelled)."""
        if outcome.label:
            job = outcome.job
            label = outcome.label if outcome.landed else "cancelled" if job.cancelled_by_user else "lease_lost"
            self._observer.job_finished(job.queue, job.kind, label, outcome.run_seconds, outcome.since_enqueue)

    async def _note_cancelled(self, fenced: list[Outcome]) -> None:
        """Mark the jobs of outcomes the fence refused whose rows cancel() ended under their
        claim (read 'cancelled' under its token, as the heartbeat judges a row it cannot
        extend). Typically an outcome that waited on the app's cancel() transaction, which
        held the row: its attempt counted lease_lost, as if another worker had taken the
        job. The notifier, told of that cancel, did not look for a job whose handler had
        ended. An outcome whose row is completed under its claim was completed by this
        attempt (an earlier try of the write whose reply was lost, or the handler's own
        ctx.transaction() committing after a release or timeout): it counts as completed,
        where it counted a completed job as lost. Unread (the look-up failed), they count
        as lost."""
        if not fenced:
            return
        try:
            conn = await self._conn.get()
            with self._conn.deadline():
                cur = await conn.execute(self._q.claims_of, {"ids": sorted({o.job.id for o in fenced})})
                rows = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        except Exception as exc:  # noqa: BLE001 - only the label depends on it
            log.warning("completer: reading the rows of %d fenced outcome(s) failed (%s)", len(fenced), describe(exc))
            await self._conn.discard()
            return
        for outcome in fenced:
            row = rows.get(outcome.job.id)
            if row == ("cancelled", outcome.job.token):
                outcome.job.cancelled_by_user = True
            elif row == ("completed", outcome.job.token):
                # Only this claim completes its row under its token: an earlier try of this
                # write, whose reply was lost (the batch was retried), or the handler's
                # ctx.transaction() committing after its attempt was given up (released at a
                # stop, timed out): the attempt completed the job.
                outcome.landed, outcome.label = True, "completed"

    async def _keep_leases(self, kept: list[Outcome]) -> None:
        """Extend the leases of the kept outcomes' jobs (fenced by claim, as a beat is), now
        that this write's own lock on their rows has ended. The heartbeat skips a row
        another transaction holds locked, and this write held those rows through each of
        its waits (up to LOCK_WAIT each, the first ones back to back): its beats missed
        them for the whole lease. Best effort: the heartbeat covers them too."""
        if self._lease is None:
            return
        params = lease_params([o.job for o in kept], [None] * len(kept), self._lease)
        try:
            conn = await self._conn.get()
            with self._conn.deadline():
                await conn.execute(self._q.heartbeat_many, params, prepare=True)
        except Exception as exc:  # noqa: BLE001 - the heartbeat extends them too
            log.warning("completer: extending the leases of %d waiting outcome(s) failed (%s)", len(kept), describe(exc))
            await self._conn.discard()

    def _take(self) -> tuple[list[Outcome], list[Outcome]]:
        """(the next batch, what stays pending): every pending outcome, but results of at
        most RESULT_CHARS_PER_FLUSH in all (at least one outcome). A flush is one statement
        under the connection's deadline: large results finishing together made one
        statement too slow for it, and the batch, kept and retried whole with whatever
        finished meanwhile, never landed again."""
        size = 0
        for i, outcome in enumerate(self._pending):
            if outcome.result_json is not None:
                size += len(outcome.result_json)
                if size > RESULT_CHARS_PER_FLUSH and i > 0:
                    return self._pending[:i], self._pending[i:]
        return self._pending, []

    async def _write_in_parts(self, batch: list[Outcome]) -> list[Outcome]:
        """Write a batch the database refused by halves (a flush is one statement: a refused
        part wrote nothing), down to the outcomes refused alone: about 2 x log2(n)
        statements per bad outcome, where writing one by one took n (2,000 for a full batch).
        Returns the outcomes kept to be written later: their rows were locked, or they
        waited alone on another transaction (see _waited)."""
        kept: list[Outcome] = []
        half = len(batch) // 2
        parts = [batch[half:], batch[:half]] if half else [batch]  # a stack: the next part is last
        while parts:
            part = parts.pop()
            try:
                conn = await self._conn.get()
                with self._conn.deadline():
                    kept += await self._write(conn, part)
                continue
            except Exception as exc:  # noqa: BLE001
                if is_transient(exc) and not _waited(exc):
                    self._pending[:0] = part + [o for rest in reversed(parts) for o in rest]
                    await self._conn.discard()
                    return kept
                if len(part) > 1:
                    half = len(part) // 2
                    parts += [part[half:], part[:half]]
                    continue
                outcome = part[0]
                if _waited(exc):
                    kept.append(outcome)
                    continue
                if isinstance(exc, psycopg.errors.UniqueViolation):
                    try:
                        if await self._write_superseded(outcome):
                            continue
                    except Exception as again:  # noqa: BLE001 - logged below, as any refusal
                        # A key freed meanwhile: dropped, the outcome left its job running
                        # until the lease ran out, to be rescued (dead once the holder
                        # completed and held the key again), though it could now be written.
                        if isinstance(again, (_RowLocked, _KeyFreed)) or _waited(again):
                            kept.append(outcome)
                            continue
                        exc = again
                log.error("completer: dropping the %s outcome of job %s (%s)", outcome.action, outcome.job.id, describe(exc))
        return kept

    async def _write_superseded(self, outcome: Outcome) -> bool:
        """Write an outcome the unique index refused: another job took this one's key while
        it ran (its key's states leave out 'running'), and the state the outcome names
        would hold the key too. Dropping it would leave the job running until its lease
        ran out, its result or error lost. As the rescuer does, a job that would run again
        (a retry, a snooze, a release) ends dead instead, naming the holder (cancelled if
        dead holds the key too); a final state is kept. The job gives its key up if its
        final state would still hold it. False if the row is no longer ours; _KeyFreed
        if no job holds its key now (the outcome is kept and written again)."""
        job, original = outcome.job, outcome
        ended_dead = False
        conn = await self._conn.get()
        with self._conn.deadline():
            async with conn.transaction():
                row = await (await conn.execute(self._q.unique_holder, {"id": job.id, "token": job.token})).fetchone()
                if row is None:
                    return False
                if row[0] is None:
                    raise _KeyFreed()
                holder, states = row[0], list(row[1] or ())
                target = {"complete": "completed", "release": "available"}.get(outcome.action, outcome.target)
                if target not in FINISHED_STATES:
                    target = "dead" if "dead" not in states else "cancelled"
                    note = f"not run again: job {holder} holds its unique key"
                    # A release and a snooze carry no error of their own: say which it was.
                    error = json.loads(outcome.error_json) if outcome.error_json else {
                        "attempt": job.attempt, "error": "Released at shutdown" if outcome.action == "release"
                        else f"snoozed for {outcome.delay}s"}
                    error["error"] = f"{error.get('error', '')}; {note}"
                    outcome = Outcome(job, "finish", target=target, error_json=json.dumps(error))
                    ended_dead = target == "dead"
                if target in states:
                    await conn.execute(self._q.drop_unique_key, {"id": job.id, "token": job.token})
                log.warning("completer: job %s ends %s; job %s took its unique key while it ran", job.id, target, holder)
                if await self._write(conn, [outcome]):
                    raise _RowLocked()  # rolled back with the key it gave up: kept, written later
        original.landed = outcome.landed
        if ended_dead:
            self._dead(job.queue, job.kind, 1)
        return True

    def abandon(self) -> int:
        """Give up the outcomes still unwritten (the worker stops; its services are cancelled,
        and no flush runs): each counts as ``lease_lost``, since its job stays running until
        its lease runs out and another worker's rescuer takes it over. Unreported, the
        attempt started and never finished (an embedded worker's in-flight gauge stuck up
        for good). Returns how many."""
        # Once each: a stop that cancelled a batch being written in parts can leave a part
        # put back in pending while the batch still holds it. That batch also holds the
        # outcomes of the parts written before the stop: those landed (their rows ended),
        # and count as written; reported lease_lost, a completed job counted as lost.
        left = list({id(o): o for o in self._pending + self._batch}.values())
        self._pending, self._batch = [], []
        for outcome in left:
            self._finished(outcome)
        self._idle.set()
        return len(left)

    async def drain(self, timeout: float) -> bool:
        """Flush until nothing is pending or ``timeout`` passes; True if all landed.

        Each round goes through flush(), and so through its lock, even with nothing
        pending: a batch that run() has taken is pending no more while it is written, and
        returning then let the worker cancel that write and exit with its jobs running."""
        with anyio.move_on_after(timeout):
            while True:
                await self.flush()
                if not self._pending:
                    return True
        # unwritten, not pending: a flush cancelled while it wrote a refused batch in parts
        # leaves the parts not yet written in the batch, and none pending.
        return not self.unwritten and not self._flushing.locked()

    async def _write(self, conn: Any, batch: list[Outcome]) -> list[Outcome]:
        """Write ``batch``; returns the outcomes whose rows another transaction held locked
        (none were written), to be written later.

        A flush waited for such a lock with the whole batch (an app's cancel() not yet
        committed holds its job's row): it ran into its deadline and was retried whole,
        waiting again, so no outcome of the worker landed for as long as the lock lasted,
        and the jobs finished meanwhile, heartbeated no more, ran out their leases and ran
        again. A flush now waits at most LOCK_WAIT (the connection's lock_timeout), then
        writes around the locked rows, as the flushes after it do until one finds none
        (that statement costs more, so it is not the usual one). Inside a transaction
        (_write_superseded), which the lock wait aborted, the error is raised."""
        complete = [o for o in batch if o.action == "complete"]
        finish = [o for o in batch if o.action == "finish"]
        release = [o for o in batch if o.action == "release"]
        params = {
            "c_ids": [o.job.id for o in complete],
            "c_tokens": [o.job.token for o in complete],
            "c_results": [o.result_json for o in complete],
            "c_progress": [o.job.progress_json for o in complete],
            "f_ids": [o.job.id for o in finish],
            "f_tokens": [o.job.token for o in finish],
            "f_targets": [o.target for o in finish],
            "f_errors": [o.error_json for o in finish],
            "f_delays": [o.delay for o in finish],
            "f_progress": [o.job.progress_json for o in finish],
            "r_ids": [o.job.id for o in release],
            "r_tokens": [o.job.token for o in release],
            "r_reported": [o.job.reported for o in release],
            "n": len(batch),
        }
        if not self._around_locks:
            try:
                # One statement, one round trip, atomic: the batch lands or is retried as a unit.
                row = await (await conn.execute(self._q.flush_outcomes, params, prepare=True)).fetchone()
                _note_landed(batch, row[3])
                return []
            except psycopg.errors.LockNotAvailable:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                    raise
                log.warning("completer: a row of the batch is locked by another transaction; writing around it")
                self._around_locks = True
        row = await (await conn.execute(self._q.flush_outcomes_around_locks, {**params, "ids": [o.job.id for o in batch]},
                                        prepare=True)).fetchone()
        skipped = set(row[3])
        _note_landed(batch, row[4])
        return [o for o in batch if o.job.id in skipped]


def _note_landed(batch: list[Outcome], landed: Optional[list[str]]) -> None:
    """Mark the outcomes whose write changed their row: all of them when the flush named
    none (``landed`` is None: it wrote every one), else those it named ("id/token")."""
    written = None if landed is None else set(landed)
    for o in batch:
        o.landed = written is None or f"{o.job.id}/{o.job.token}" in written
