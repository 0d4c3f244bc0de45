"""Extends the leases of running jobs, and cancels the ones this worker has lost.

Jobs whose handlers ended and whose outcomes the completer keeps because their writes
waited on another transaction (``awaiting``) keep their leases too: the claim is this
live worker's until the outcome lands, however long that transaction lasts. Nothing runs
for them to be cancelled, and an outcome fenced off meanwhile changes nothing, so they
are never presumed lost here. Neither the beat nor the completer can extend a lease through
another transaction's row lock, so a lock held past the lease let the rescuer take the row
the moment it was released, before the kept outcome's retry: the finished job ran again.
The keeper therefore waits for such a lock (``_keep_awaiting``): queued on the row, it
extends the lease as the lock goes, before any SKIP LOCKED rescuer can take the row. One
statement per session waits, so each kept outcome's job is waited for on a connection of
its own (up to MAX_KEEPERS at once), opened while its outcome waits. Beyond those, and in
the moment a keeper queues again after its statement_timeout, the rescue itself passes
over a kept outcome's job: the worker holds an advisory lock per such job on one
connection (``_guard_kept``), for as long as the outcome is kept and the worker lives.

One fenced UPDATE per beat covers every running job. A job missing from its result was
taken over (its lease expired and another worker claimed it): its handler is cancelled
and told the lease is lost. The beat skips a row another transaction holds locked rather
than wait for it with every other job's lease; that job's lease is not extended then. If beats fail for longer than the lease, the jobs are
presumed lost the same way, because the rescuer may already have re-driven them.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Iterable, Optional, Sequence

import anyio
import psycopg

from ..queries import Queries
from .._connection import ManagedConnection, describe, is_transient
from ._job import ClaimedJob
from .context import CANCEL_REQUEST_WAIT, _cancel_key, _send_cancel
from ..events import WorkerObserver

log = logging.getLogger("sa_jobs.worker")

# Kept outcomes' jobs whose row locks the lease keeper waits for at once, each on its own
# connection (a session waits for one lock at a time). Beyond these, a job waits its turn.
MAX_KEEPERS = 8

# Kept outcomes whose claims the lease guard holds at once (an advisory lock each, in the
# server's shared lock table: about 6,400 entries with the defaults, for every session of
# the server). Beyond these a kept outcome is at-least-once as any other: the rescue may
# re-drive its job after its lease, and the outcome's late write is fenced off.
MAX_KEPT_CLAIMS = 1000


def guard_idle_limit(lease: float) -> Callable[[psycopg.AsyncConnection[Any]], Any]:
    """An ``on_connect`` that has the server end the kept claims' session (the rescue then
    takes their jobs) once it sits idle for a lease: a frozen worker's socket stays up
    (its kernel answers TCP keepalives), and its claims would outlive it for good. A live
    one sends a statement every heartbeat interval while it holds claims (_guard_kept)."""

    async def limit(conn: psycopg.AsyncConnection[Any]) -> None:
        if conn.info.server_version < 140000:  # no idle_session_timeout before PostgreSQL 14
            return
        try:
            await conn.execute("SELECT set_config('idle_session_timeout', %(ms)s, false)",
                               {"ms": str(min(2**31 - 1, max(1, int(lease * 1000))))})
        except (psycopg.errors.UndefinedObject, psycopg.errors.CantChangeRuntimeParam,
                psycopg.errors.InsufficientPrivilege) as exc:
            log.warning("heartbeat: cannot bound the idle session of the kept claims (%s)", describe(exc))

    return limit


async def _cancel_on_server(key: Any) -> None:
    """Cancel a lease keeper's statement the stop (or its deadline) cancelled, on the
    server. psycopg's own cancel request, on the task's cancellation, was cancelled in its
    turn ("query cancellation interrupted") and the connection closed under it: the
    statement stayed queued on the row until the server's statement_timeout, and when the
    app's lock went meanwhile it extended the lease of a job no worker held any more (the
    rescue passed over it for a lease more). Its own thread, shielded, bounded."""

    def send() -> None:
        try:
            _send_cancel(key, CANCEL_REQUEST_WAIT)
        except Exception as exc:  # noqa: BLE001 - the server's statement_timeout ends it still
            log.warning("heartbeat: could not cancel a lease keeper's statement (%s)", describe(exc))

    with anyio.move_on_after(CANCEL_REQUEST_WAIT, shield=True):
        await anyio.to_thread.run_sync(send, abandon_on_cancel=True, limiter=anyio.CapacityLimiter(1))


def lease_params(jobs: Sequence[ClaimedJob], progress: Sequence[Optional[str]], lease: float) -> dict[str, Any]:
    """The parameters of ``Queries.heartbeat_many``: extend ``jobs``' leases, fenced by
    their claim tokens, writing each one's ``progress`` (None: unchanged)."""
    return {"ids": [j.id for j in jobs], "tokens": [j.token for j in jobs], "progress": list(progress), "lease": lease}


class Heartbeat:
    def __init__(
        self,
        conn: ManagedConnection,
        queries: Queries,
        observer: WorkerObserver,
        running: Callable[[], Iterable[ClaimedJob]],
        *,
        lease: float,
        interval: float,
        awaiting: Callable[[], Iterable[ClaimedJob]] = lambda: (),
        keeper: Optional[Callable[[], ManagedConnection]] = None,
        max_keepers: int = MAX_KEEPERS,
        guard: Optional[ManagedConnection] = None,
    ) -> None:
        self._conn = conn
        # Holds the kept outcomes' claims (_guard_kept): connected only while there are some.
        self._guard = guard
        # Makes a lease keeper's connection: one per kept outcome's job, opened while it waits.
        self._new_keeper = keeper
        self._max_keepers = max_keepers
        self._keeping: dict[int, ManagedConnection] = {}  # id(job): the connection waiting for it
        self._over_kept_cap = False  # more outcomes kept than MAX_KEPT_CLAIMS (warned once per crossing)
        self._q = queries
        self._observer = observer
        self._running = running
        self._awaiting = awaiting
        self._lease = lease
        self._interval = interval
        self._nudged = anyio.Event()
        self._min_gap = min(1.0, interval)

    def nudge(self) -> None:
        """Beat early (within ~1 s) because there is progress to write."""
        self._nudged.set()

    @property
    def nudged(self) -> bool:
        """A nudge the loop has yet to take: a beat follows that reads every report made
        before it was taken. Read from handler threads (one attribute read, then a flag's)."""
        return self._nudged.is_set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_leases)
            if self._new_keeper is not None:
                tg.start_soon(self._keep_awaiting)
            if self._guard is not None:
                tg.start_soon(self._guard_kept, self._guard)
            while True:
                with anyio.move_on_after(self._interval):
                    await self._nudged.wait()
                    await anyio.sleep(self._min_gap)  # coalesce a burst of progress reports
                self._nudged = anyio.Event()
                await self.beat()

    async def _watch_leases(self) -> None:
        """Presume a lease lost as it runs out, not at the next beat that fails: beats come
        an interval apart and each may hang for its whole deadline, so that beat ended up to
        a second or more past the lease, while the rescuer could already have handed the
        job to another worker. It wakes as the first lease runs out, not at a look every
        lease/20: a handler learnt of its loss up to that long (1.5 s of a 30 s lease) after
        the rescuer could have taken its job."""
        every = max(0.05, min(self._interval, self._lease / 20))  # for jobs claimed meanwhile
        while True:
            now = time.monotonic()
            wake = now + every
            for job in self._running():
                if job.completing or job.lease_lost:
                    continue
                runs_out = job.last_lease_ok + self._lease
                if now > runs_out:
                    self._lose(job, "heartbeats failed for longer than the lease")
                else:
                    wake = min(wake, runs_out)
            await anyio.sleep(wake - now + 0.001)  # just past it

    async def _keep_awaiting(self) -> None:
        """Extend the leases of the jobs whose outcomes the completer keeps (``awaiting``),
        each waiting for its row where another transaction holds it locked. The waiter
        holds the row's tuple lock, so when the locker ends, this update goes first and a
        rescuer's SKIP LOCKED passes the row by; then the lease is fresh again for the
        outcome's retry. One row per statement: a statement waiting on one row while
        holding another's lock could deadlock with the app's transaction. One job per
        connection: with one connection, a job whose lock outlasted another's was waited
        for all along (again at each statement_timeout), the other's lease ran out under
        its lock, and when that lock went the rescuer took the row: the job ran again."""
        async with anyio.create_task_group() as tg:
            while True:
                for job in self._awaiting():
                    if len(self._keeping) >= self._max_keepers:
                        break
                    if not job.lease_lost and id(job) not in self._keeping:
                        assert self._new_keeper is not None
                        self._keeping[id(job)] = self._new_keeper()
                        tg.start_soon(self._keep, job)
                await anyio.sleep(self._interval)

    async def _guard_kept(self, guard: ManagedConnection) -> None:
        """Hold, on one connection, an advisory lock per job whose outcome the completer
        keeps (``awaiting``), which the rescue passes over while it is held (queries.
        keep_claims). What let the rescuer re-drive a finished job is that its lease ran
        out under another transaction's row lock, where nothing extends it: the keepers
        queue on the locked rows, but one connection each, MAX_KEEPERS at most, and a job
        beyond them had nothing queued on its row; when the lock went, the rescuer took it
        before the completer's retry. The lock tells the rescue that a live worker holds the
        claim, for any number of jobs on one session; a worker that dies lets go with it."""
        held: set[int] = set()
        every = min(self._interval, 0.05)  # an outcome is kept well inside its lease: take it soon
        # A round trip's deadline, as a beat's: a session gone half-open is given up on well
        # inside the lease. With the statement timeout's (half the lease, plus 2 s), the
        # server's side of it, idle, ended at its idle limit (the lease) before the worker
        # gave up on it, and the claims were nobody's until the worker took them again.
        round_trip = min(guard.timeout, max(self._interval, 1.0))
        last_sent = 0.0
        # Ids another session held at the last try (the rescue's own instant, or a kept job
        # whose id shares the key): tried again after an interval, not at every round.
        refused: set[int] = set()
        retry_at = 0.0
        session: Optional[tuple[int, Any]] = None  # the guard session's (pid, backend_start)
        given_up: Optional[tuple[int, Any]] = None  # one dropped after a failure: it may live on
        # Failed tries in a row: the first is tried again at once (a session lost to a
        # restart or a cut), the next ones after a backoff. A failure that lasts (every
        # statement refused, a full lock table) had the guard open a new connection, and
        # log a warning, 20 times a second for as long as an outcome was kept.
        failures, next_try = 0, 0.0
        try:
            while True:
                now = time.monotonic()
                wanted = self._kept_claims_wanted(held)
                gone, new = held - wanted, wanted - held
                take = bool(new) and (new != refused or now >= retry_at)
                alive_due = bool(held) and now - last_sent >= min(self._interval, self._lease / 4)
                if (gone or take or alive_due) and now >= next_try:
                    try:
                        with anyio.fail_after(guard.timeout + 2.0):  # a reconnect, with its backoff
                            conn = await guard.get()
                        with anyio.fail_after(round_trip):
                            if session is None:
                                session = await self._begin_guard_session(conn, given_up)
                                given_up = None
                            last_sent = time.monotonic()
                            if not (gone or take):  # its session's idle limit is the lease
                                await conn.execute("SELECT 1")
                            if gone:
                                await conn.execute(self._q.unkeep_claims, {"ids": sorted(gone)})
                                held.difference_update(gone)
                            if take:
                                cur = await conn.execute(self._q.keep_claims, {"ids": sorted(new)})
                                taken = {row[0] for row in await cur.fetchall()}
                                held.update(taken)
                                refused, retry_at = new - taken, now + min(self._interval, 1.0)
                        failures = 0
                    except Exception as exc:  # noqa: BLE001 - its session's locks went with it
                        log.warning("heartbeat: holding the claims of %d kept outcome(s) failed (%s)",
                                    len(wanted), describe(exc))
                        failures += 1
                        next_try = time.monotonic() + (0.0 if failures == 1 else
                                                       min(self._interval, 1.0, every * 2 ** min(failures, 10)))
                        held.clear()
                        given_up, session = session or given_up, None
                        await guard.discard()
                if not held and guard.connected:
                    await guard.close()  # no connection kept for an idle worker
                    session = None
                # A session the server ended (or a cut) took the claims with it at once: an
                # alive check found that out up to an interval later, and the rescue could
                # re-drive a kept job all that while. Its socket tells, so the check is now.
                if held and await guard.heard_within(every):
                    last_sent = 0.0
                elif not held:
                    await anyio.sleep(every)
        finally:
            await guard.close()  # shielded: its locks go with its session

    def _kept_claims_wanted(self, held: set[int]) -> set[int]:
        """The kept outcomes' jobs whose claims the guard should hold: all of them, up to
        MAX_KEPT_CLAIMS (those held already first, so the set does not churn). Past the
        cap, a warning once per crossing: thousands of locks would fill the server's lock
        table, failing other sessions' locks with "out of shared memory"."""
        kept = {j.id for j in self._awaiting() if not j.lease_lost}
        if len(kept) <= MAX_KEPT_CLAIMS:
            self._over_kept_cap = False
            return kept
        if not self._over_kept_cap:
            self._over_kept_cap = True
            log.warning("heartbeat: %d outcomes kept at once; the claims of %d are held, the others' jobs may run"
                        " again once their leases end (at-least-once)", len(kept), MAX_KEPT_CLAIMS)
        still = sorted(held & kept)[:MAX_KEPT_CLAIMS]
        return set(still) | set(sorted(kept - held)[: MAX_KEPT_CLAIMS - len(still)])

    async def _begin_guard_session(self, conn: psycopg.AsyncConnection[Any],
                                   given_up: Optional[tuple[int, Any]]) -> tuple[int, Any]:
        """Learn who the new guard session is, and end the one given up on before it (its
        socket went half-open, or a round trip ran out), if it lives on: the server's side
        of a half-open session holds its claims until its idle limit, and the new session
        could take none of them meanwhile; then they were nobody's until its next try (up
        to a second), and the rescue could re-drive a kept job. Ended here, they pass to
        the new session at once. Matched by pid and start, so a reused pid is left alone."""
        cur = await conn.execute("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        me = await cur.fetchone()
        assert me is not None
        if given_up is not None:
            # From PostgreSQL 14 it waits (up to 500 ms) for the session to end, and its locks with it.
            wait = ", 500" if conn.info.server_version >= 140000 else ""
            try:
                await conn.execute("SELECT pg_terminate_backend(pid" + wait + ") FROM pg_stat_activity"
                                   " WHERE pid = %(pid)s AND backend_start = %(start)s",
                                   {"pid": given_up[0], "start": given_up[1]})
            except psycopg.errors.InsufficientPrivilege as exc:
                log.warning("heartbeat: cannot end the kept claims' former session (%s)", describe(exc))
        return me[0], me[1]

    def _waits(self, job: ClaimedJob) -> bool:
        return not job.lease_lost and any(j is job for j in self._awaiting())

    async def _keep(self, job: ClaimedJob) -> None:
        """Keep ``job``'s lease while its outcome waits, on a connection of its own, closed
        (the wait ended, or cancelled at a stop) once it waits no more."""
        keeper = self._keeping[id(job)]
        try:
            while self._waits(job):
                await self._wait_out_lock(job, keeper)
                await anyio.sleep(self._interval)
        finally:
            del self._keeping[id(job)]
            await keeper.close()  # shielded

    async def _wait_out_lock(self, job: ClaimedJob, keeper: ManagedConnection) -> None:
        params = {"id": job.id, "token": job.token, "lease": self._lease}
        while True:
            try:
                # The server's statement_timeout ends a long wait first (then it queues
                # again at once); this deadline finds a connection gone half-open.
                with anyio.fail_after(keeper.timeout + 2.0):
                    conn = await keeper.get()
                    key = _cancel_key(conn.pgconn)
                    try:
                        await conn.execute(self._q.extend_lease_waiting, params)
                    except anyio.get_cancelled_exc_class():
                        await _cancel_on_server(key)
                        raise
                return
            except psycopg.errors.QueryCanceled:
                if not self._waits(job):
                    return
            except Exception as exc:  # noqa: BLE001 - the beats go on extending it meanwhile
                log.warning("heartbeat: waiting for the row lock of job %s failed (%s)", job.id, describe(exc))
                await keeper.discard()
                return

    async def close(self) -> None:
        """Close the lease keepers' connections (a stop cancels their waits), and let go of
        the kept outcomes' claims: a stopped worker's jobs are rescued after their leases."""
        for keeper in list(self._keeping.values()):
            await keeper.close()
        if self._guard is not None:
            await self._guard.close()

    async def beat(self) -> None:
        jobs = [j for j in self._running() if not j.completing and not j.lease_lost]
        sent = [j.progress_json for j in jobs]
        # Their outcomes carry their progress. A job is named once (a batch in flight can
        # overlap the pending outcomes after a failed part); a lost claim stays lost.
        beating, handled = {id(j) for j in jobs}, len(jobs)
        for job in self._awaiting():
            if id(job) not in beating and not job.lease_lost:
                beating.add(id(job))
                jobs.append(job)
                sent.append(None)
        if not jobs:
            self._observer.heartbeat_ok()
            return
        try:
            # A beat that hangs (half-open socket, or a server that cannot be reached) must
            # not outlive the lease it protects: the reconnect is inside the deadline too.
            with anyio.fail_after(min(self._conn.timeout, max(self._interval, 1.0))):
                conn = await self._conn.get()
                # The server extends the lease from when it runs the UPDATE, which is no
                # earlier than this: the lease is known to last until sent_at + lease.
                sent_at = time.monotonic()
                cur = await conn.execute(
                    self._q.heartbeat_many,
                    lease_params(jobs, sent, self._lease),
                    prepare=True,
                )
                # By claim, not by id: this worker may hold a newer claim of the same job
                # while a stale attempt winds down; only the claim that matches is alive.
                alive = {(row[0], row[1]) for row in await cur.fetchall()}
        except Exception as exc:  # noqa: BLE001 - any failure: treat the beat as missed
            self._observer.loop_error("heartbeat")
            log.warning("heartbeat failed (%s)", describe(exc), exc_info=not is_transient(exc))
            await self._conn.discard()
            now = time.monotonic()
            for job in jobs[:handled]:  # those whose handlers run
                if now - job.last_lease_ok > self._lease:
                    self._lose(job, "heartbeats failed for longer than the lease")
            return
        self._observer.heartbeat_ok()
        # A job that finished while the beat was in flight had its outcome written (and
        # its row leave 'running') meanwhile: only jobs still running here can be lost.
        still_running = {id(j) for j in self._running()}
        missing = [j for j in jobs if (j.id, j.token) not in alive and not j.completing and id(j) in still_running]
        for job, progress in zip(jobs, sent):
            if (job.id, job.token) in alive:
                job.last_lease_ok = sent_at
                if job.progress_json is progress:  # not replaced by a newer report meanwhile
                    job.progress_json = None
        if missing:
            await self._settle_missing(conn, missing)

    async def _settle_missing(self, conn, missing: list[ClaimedJob]) -> None:  # type: ignore[no-untyped-def]
        """A job whose lease could not be extended was cancelled, or taken over; or its
        row was locked by another transaction, which the beat skips: still this claim's,
        it is left running with its lease as it was (the watchdog presumes it lost if
        the lock outlasts the lease, as the rescuer would then take it)."""
        try:
            # Bounded as the beat is: a socket that went half-open right after the beat
            # would otherwise hold the heartbeat here while every lease ran out.
            with anyio.fail_after(min(self._conn.timeout, max(self._interval, 1.0))):
                cur = await conn.execute(self._q.claims_of, {"ids": [j.id for j in missing]})
                claims: Optional[dict[int, tuple[str, uuid.UUID]]] = {
                    row[0]: (row[1], row[2]) for row in await cur.fetchall()}
        except Exception:  # noqa: BLE001 - unknown: the safe reading is "lost"
            claims = None
        for job in missing:
            claim = None if claims is None else claims.get(job.id)
            if claim == ("running", job.token):
                log.warning("job %s: its row is locked by another transaction; its lease was not extended", job.id)
            elif claim == ("cancelled", job.token):  # under another claim: taken over, then cancelled
                job.cancelled_by_user = True
                job.cancel("cancelled")
            elif claims is not None and claim is None:
                # Deleted (session.delete(job), or SQL): the attempt ends, nothing is written back.
                self._lose(job, "its row was deleted")
            else:
                self._lose(job, "the lease was taken over by another worker")

    def _lose(self, job: ClaimedJob, why: str) -> None:
        if job.lease_lost:
            return
        log.warning("job %s: lease lost (%s); cancelling its handler", job.id, why)
        job.lease_lost = True
        job.cancel("lease lost: " + why)
