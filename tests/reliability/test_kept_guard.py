"""The kept outcomes' claims (Heartbeat._guard_kept) under network faults of their session.

A job whose handler returned while an app's transaction held its row locked past the
lease keeps its outcome in the worker, and the rescue passes over it only while the
worker's ``lease-guard`` session holds the job's advisory lock. These tests take that
session away (cut, or half-open through the proxy) while the app's lock lasts, and watch
from a straight connection who holds the claim meanwhile. The lease keepers queued on
the row are ended too, so that the claim is all that stands between the job and the
rescue; the app's transaction lets the lease run out under its lock and then commits,
and the rescue runs the moment it does, as any worker's tick may.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

import anyio
import psycopg
import pytest

from sa_jobs import Job, JobContext, Worker
from sa_jobs.queries import Queries

from .proxy import Proxy

RUNS: list[tuple[int, int]] = []
GO: list[bool] = []


class RelKept(Job, kind="rel_kept", queue="rel_kept"):
    pass


@RelKept.handler
async def rel_kept(ctx: JobContext) -> int:
    RUNS.append((ctx.id, ctx.attempt))
    while ctx.attempt == 1 and not GO:  # returns once the test holds its row locked
        await anyio.sleep(0.01)
    return ctx.attempt


def _add_kept_job(db: Any) -> int:
    [(job_id,)] = db.q("INSERT INTO {jobs} (kind, queue, args) VALUES ('rel_kept', 'rel_kept', %s) RETURNING id",
                       ("{}",))
    return job_id


async def _keep_behind_lock(db: Any, worker: Any, locker: Any, job_id: int) -> None:
    """Once the handler runs, lock its row in ``locker``'s transaction and let the handler
    return: its outcome is then kept (the completer waits for the row)."""
    with anyio.fail_after(10):
        while not RUNS:
            await anyio.sleep(0.01)
    assert locker.execute(db._sql("SELECT state FROM {jobs} WHERE id = %s FOR UPDATE"),
                          (job_id,)).fetchone() == ("running",)
    GO.append(True)
    with anyio.fail_after(10):
        while not (worker.completer and worker.completer.awaiting()):
            await anyio.sleep(0.01)


class ClaimWatch(threading.Thread):
    """Samples, every 20 ms on a straight connection, which session holds the job's claim:
    the longest stretch no session held it once the fault began."""

    def __init__(self, url: str, schema: str, job_id: int) -> None:
        super().__init__(daemon=True)
        self._conn = psycopg.connect(url, autocommit=True)
        self._params = (f"{schema}_jobs_inserted", job_id)
        self.holder: Optional[int] = None
        self.longest_gap = 0.0
        self._gap_from: Optional[float] = None
        self.stopped = threading.Event()

    def sample(self) -> Optional[int]:
        row = self._conn.execute(
            "SELECT l.pid FROM pg_locks AS l WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
            " AND l.classid = hashtext('sa_jobs.kept.' || %s)::oid AND l.objid = %s::oid", self._params).fetchone()
        return None if row is None else row[0]

    def run(self) -> None:
        while not self.stopped.is_set():
            self.holder = self.sample()
            now = time.monotonic()
            if self.holder is None:
                self._gap_from = self._gap_from or now
                self.longest_gap = max(self.longest_gap, now - self._gap_from)
            else:
                self._gap_from = None
            time.sleep(0.02)
        self._conn.close()


@pytest.mark.parametrize("fault", ["cut", "half-open"])
def test_a_kept_claim_survives_the_loss_of_its_session(db, cluster, rel_url, rel_schema, fault):
    """``cut``: the proxy closes the guard's connection (the server ends the session at
    once, its claims with it). ``half-open``: the proxy drops every byte both ways, the
    server's session lives on, idle, holding the claims until its idle limit (a lease)
    ends it; the worker's alive check on it hangs until its deadline."""
    RUNS.clear()
    GO.clear()
    lease = 4.0
    job_id = _add_kept_job(db)
    rescue = Queries.for_schema(rel_schema).rescue_expired
    proxy = Proxy(cluster.port)
    watch = ClaimWatch(rel_url, rel_schema, job_id)
    rescued: list[tuple[Any, ...]] = []
    try:
        with psycopg.connect(rel_url) as locker, psycopg.connect(rel_url, autocommit=True) as admin:

            async def main() -> None:
                async with Worker(cluster.url_via(proxy.port), kinds=[RelKept], schema=rel_schema, lease=lease,
                                  poll_interval=0.2, maintenance_interval=0.2, shutdown_grace=5) as worker:
                    await _keep_behind_lock(db, worker, locker, job_id)
                    with anyio.fail_after(10):
                        while not watch.sample():
                            await anyio.sleep(0.01)
                    # The lease keepers queued on the row would extend the lease as the lock goes.
                    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                  " WHERE application_name = 'sa_jobs:lease-keeper'")
                    watch.start()
                    faulted = time.monotonic()
                    if fault == "cut":
                        assert proxy.cut_all("sa_jobs:lease-guard") == 1
                    else:
                        assert len(proxy.blackhole("sa_jobs:lease-guard")) == 1
                    # Past the lease (the half-open session's idle limit), and a claim held again.
                    while time.monotonic() - faulted < lease + 1.5 or watch.holder is None:
                        assert time.monotonic() - faulted < 3 * lease, "the claim was not held again"
                        await anyio.sleep(0.05)
                    locker.execute(db._sql("UPDATE {jobs} SET lease_expires_at = now() - interval '1 second'"
                                           " WHERE id = %s"), (job_id,))  # the lease ran out under the lock ...
                    locker.commit()  # ... which goes
                    rescued.extend(admin.execute(rescue, {"limit": 100}).fetchall())
                    with anyio.fail_after(15):
                        while db.states() != {"completed": 1}:
                            await anyio.sleep(0.05)

            anyio.run(main)
    finally:
        watch.stopped.set()
        proxy.close()
    print(f"\n{fault}: the claim was held by no session for at most {watch.longest_gap:.2f} s")
    assert rescued == [], "the rescuer re-drove a job whose live worker held its outcome"
    assert db.q("SELECT state, attempt FROM {jobs}") == [("completed", 1)]
    assert RUNS == [(job_id, 1)]
    # A claim a live worker holds is never let go for longer than it takes to reconnect.
    assert watch.longest_gap < 0.5, watch.longest_gap


def test_a_kept_outcome_whose_claim_could_not_be_held_is_fenced_off_after_the_rescue(db, cluster, rel_url,
                                                                                     rel_schema):
    """The other side: the worker cannot open the claims' session at all (every new
    lease-guard and lease-keeper connection is blackholed, as a server at max_connections
    or a firewall would refuse them), so nothing holds the kept job once its lease ran out
    under the app's lock: the rescue re-drives it, as designed for a worker that cannot
    say it lives. The kept outcome of the first attempt, written once the lock went, must
    change nothing (fenced by its claim token): the job ends with the second attempt's
    result, never the first's over it."""
    RUNS.clear()
    GO.clear()
    lease = 2.0
    job_id = _add_kept_job(db)
    rescue = Queries.for_schema(rel_schema).rescue_expired
    proxy = Proxy(cluster.port)
    proxy.blackhole_new = lambda c: c.app in ("sa_jobs:lease-guard", "sa_jobs:lease-keeper")
    rescued: list[tuple[Any, ...]] = []
    try:
        with psycopg.connect(rel_url) as locker, psycopg.connect(rel_url, autocommit=True) as admin:

            async def main() -> None:
                async with Worker(cluster.url_via(proxy.port), kinds=[RelKept], schema=rel_schema, lease=lease,
                                  poll_interval=0.2, maintenance_interval=0.2, shutdown_grace=5) as worker:
                    await _keep_behind_lock(db, worker, locker, job_id)
                    with anyio.fail_after(10):  # the worker tries to hold its claim, and cannot
                        while not proxy.live("sa_jobs:lease-guard"):
                            await anyio.sleep(0.01)
                    assert not ClaimWatch(rel_url, rel_schema, job_id).sample()
                    locker.execute(db._sql("UPDATE {jobs} SET lease_expires_at = now() - interval '1 second'"
                                           " WHERE id = %s"), (job_id,))
                    locker.commit()
                    rescued.extend(admin.execute(rescue, {"limit": 100}).fetchall())
                    with anyio.fail_after(20):
                        while db.states() != {"completed": 1} or worker.completer.awaiting():
                            await anyio.sleep(0.05)

            anyio.run(main)
    finally:
        proxy.close()
    assert [row[:2] for row in rescued] == [(job_id, "retryable")]
    assert RUNS == [(job_id, 1), (job_id, 2)]
    assert db.q("SELECT state, attempt, result FROM {jobs}") == [("completed", 2, 2)]


def test_a_guard_whose_statements_keep_failing_backs_off(db, cluster, rel_schema, caplog):
    """Every statement of the claims' session fails (here EXECUTE on pg_try_advisory_lock is
    revoked from the worker's role; a lock table that is full, "out of shared memory",
    alike) while an outcome is kept: the guard dropped its connection and opened a new
    one at every round, 20 times a second, each with its failed statement and a warning,
    for as long as the outcome was kept. It retries at once, then backs off."""
    import logging
    import uuid

    from psycopg import sql

    RUNS.clear()
    GO.clear()
    role = "kg_" + uuid.uuid4().hex[:8]
    ident = {"schema": sql.Identifier(rel_schema), "role": sql.Identifier(role)}
    revoke = sql.SQL("REVOKE EXECUTE ON FUNCTION pg_try_advisory_lock(integer, integer) FROM PUBLIC")
    grant = sql.SQL("GRANT EXECUTE ON FUNCTION pg_try_advisory_lock(integer, integer) TO PUBLIC")
    job_id = _add_kept_job(db)
    failures: list[float] = []
    with psycopg.connect(cluster.url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {role} LOGIN").format(**ident))
        admin.execute(sql.SQL("GRANT USAGE ON SCHEMA {schema} TO {role}").format(**ident))
        admin.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}")
                      .format(**ident))
        admin.execute(revoke)
        try:
            with psycopg.connect(cluster.url) as locker:

                async def main() -> None:
                    async with Worker(f"postgresql://{role}@127.0.0.1:{cluster.port}/postgres", kinds=[RelKept],
                                      schema=rel_schema, lease=4.0, poll_interval=0.2, maintenance_interval=0.2,
                                      shutdown_grace=0) as worker:
                        await _keep_behind_lock(db, worker, locker, job_id)
                        with caplog.at_level(logging.WARNING, logger="sa_jobs.worker"):
                            caplog.clear()
                            await anyio.sleep(3.0)  # the window the failed tries are counted in
                            failures.extend(r.created for r in caplog.records
                                            if "kept outcome(s) failed" in r.getMessage())
                    locker.rollback()

                anyio.run(main)
        finally:
            admin.execute(grant)
            admin.execute(sql.SQL("DROP OWNED BY {role}").format(**ident))
            admin.execute(sql.SQL("DROP ROLE {role}").format(**ident))
    print(f"\nguard failures in 3 s: {len(failures)}")
    assert failures, "the guard's statement did not fail: the test is void"
    assert len(failures) <= 10, f"{len(failures)} failed tries (a new connection each) in 3 s"
