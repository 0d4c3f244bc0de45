"""Workers as real OS processes: claim races, SIGKILL mid-job, exactly-once effects, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from sqlalchemy.orm import Session

from sa_jobs import enqueue_many

from .conftest import start_worker_process
from .helpers import jobs_sql, q, states, wait_for
from .jobs_core import CoreNoop, CoreSlow, CoreTransactional, effects_ddl

FAST = ["--lease", "2", "--maintenance-interval", "0.2", "--poll-interval", "0.2"]


@pytest.fixture
def effects(database_url, schema):
    q(database_url, effects_ddl(schema))
    os.environ["SA_JOBS_DATABASE_URL"] = database_url


def stop(procs: list[subprocess.Popen[bytes]], sig: int = signal.SIGTERM, timeout: float = 20) -> list[int]:
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def output(p: subprocess.Popen[bytes]) -> str:
    return p.stdout.read().decode(errors="replace") if p.stdout else ""


def wait_running(database_url: str, schema: str, n: int, timeout: float = 20) -> bool:
    return wait_for(lambda: states(database_url, schema).get("running", 0) >= n, timeout)


def test_eight_processes_claim_each_job_once(engine, database_url, schema, effects):
    with Session(engine) as session, session.begin():
        enqueue_many(session, (CoreNoop(n=i) for i in range(4_000)))
    procs = [start_worker_process(database_url, schema, "tests.jobs_core", "--concurrency", "8", *FAST) for _ in range(8)]
    try:
        assert wait_for(lambda: states(database_url, schema) == {"completed": 4_000}, 120, 0.25), states(database_url, schema)
    finally:
        codes = stop(procs)
    assert codes == [0] * 8, [output(p) for p in procs]
    # From the table: every job ran exactly one attempt.
    assert q(database_url, jobs_sql(schema, "SELECT min(attempt), max(attempt), count(*) FROM {jobs}")) == [(1, 1, 4_000)]
    # From the handlers' side effects: one per job, none twice, spread over processes.
    total, distinct, pids = q(database_url, jobs_sql(schema, "SELECT count(*), count(DISTINCT job_id), count(DISTINCT worker_pid) FROM {effects}"))[0]
    assert (total, distinct) == (4_000, 4_000)
    assert pids >= 2


def test_sigkill_mid_job_is_rescued_after_lease_and_completed(engine, database_url, schema, effects):
    with Session(engine) as session, session.begin():
        session.add_all([CoreSlow(seconds=1.5) for _ in range(4)])
    victim = start_worker_process(database_url, schema, "tests.jobs_core", *FAST)
    try:
        assert wait_running(database_url, schema, 4)
        victim.kill()
        victim.wait(10)
        killed_at = time.monotonic()
        assert states(database_url, schema) == {"running": 4}
        rescuer = start_worker_process(database_url, schema, "tests.jobs_core", *FAST)
        try:
            assert wait_for(lambda: states(database_url, schema) == {"completed": 4}, 30), states(database_url, schema)
            # Lease 2 s + rescue within 0.2 s + 1.5 s run, with slack for process start.
            assert time.monotonic() - killed_at < 15
        finally:
            assert stop([rescuer]) == [0]
    finally:
        if victim.poll() is None:
            victim.kill()
    rows = q(database_url, jobs_sql(schema, "SELECT attempt, errors->0->>'error' FROM {jobs}"))
    assert all(attempt == 2 and err.startswith("LeaseExpired") for attempt, err in rows), rows
    # The killed attempt never reached its effect (it sleeps first); the rescue did.
    assert q(database_url, jobs_sql(schema, "SELECT count(*), count(DISTINCT job_id) FROM {effects}")) == [(4, 4)]


def test_transactional_completion_effect_exactly_once_across_sigkill(engine, database_url, schema, effects):
    with Session(engine) as session, session.begin():
        session.add_all([CoreTransactional(seconds=5.0) for _ in range(3)])
        session.add_all([CoreTransactional() for _ in range(50)])
    victim = start_worker_process(database_url, schema, "tests.jobs_core", *FAST)
    try:
        # Kill while the slow jobs are inside their transaction, effects written but uncommitted,
        # and once every fast job has completed: a fast one still in flight at the kill would
        # rightly be retried too, and the count below would not say which were which (it
        # read 6 once on a loaded machine).
        slow_running_fast_done = jobs_sql(
            schema,
            "SELECT count(*) FILTER (WHERE state = 'running' AND args ? 'seconds'),"
            " count(*) FILTER (WHERE state = 'completed' AND NOT args ? 'seconds') FROM {jobs}",
        )
        assert wait_for(lambda: q(database_url, slow_running_fast_done)[0] == (3, 50), 20), q(database_url, slow_running_fast_done)
        time.sleep(0.5)
        victim.kill()
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
    survivor = start_worker_process(database_url, schema, "tests.jobs_core", *FAST)
    try:
        assert wait_for(lambda: states(database_url, schema) == {"completed": 53}, 40), states(database_url, schema)
    finally:
        assert stop([survivor]) == [0]
    assert q(database_url, jobs_sql(schema, "SELECT count(*), count(DISTINCT job_id) FROM {effects}")) == [(53, 53)]
    retried = q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE attempt = 2"))[0][0]
    assert retried == 3


def test_sigterm_drains_running_jobs_and_stops_claiming(engine, database_url, schema, effects):
    with Session(engine) as session, session.begin():
        session.add_all([CoreSlow(seconds=1.0) for _ in range(3)])
    worker = start_worker_process(database_url, schema, "tests.jobs_core", "--concurrency", "3", *FAST)
    try:
        assert wait_running(database_url, schema, 3)
        with Session(engine) as session, session.begin():
            session.add_all([CoreSlow(seconds=0.1) for _ in range(5)])
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, output(worker)
    finally:
        if worker.poll() is None:
            worker.kill()
    # The three running jobs finished inside the grace period; nothing was claimed after it.
    assert states(database_url, schema) == {"completed": 3, "available": 5}
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {effects}"))[0][0] == 3


def test_sighup_drains_like_sigterm(engine, database_url, schema, effects):
    """A closed terminal or ssh session sends SIGHUP; Python's default for it ends the
    process at once, mid-job, leaving its jobs running until their lease expires."""
    with Session(engine) as session, session.begin():
        session.add_all([CoreSlow(seconds=1.0) for _ in range(2)])
    worker = start_worker_process(database_url, schema, "tests.jobs_core", "--concurrency", "2", "--lease", "30",
                                  "--maintenance-interval", "0.2", "--poll-interval", "0.2")
    try:
        assert wait_running(database_url, schema, 2)
        worker.send_signal(signal.SIGHUP)
        assert worker.wait(15) == 0, output(worker)
    finally:
        if worker.poll() is None:
            worker.kill()
    # It read {'running': 2} now and then on a loaded machine, the worker's log empty: the
    # completer's drain returned while its loop was writing (test_worker.py,
    # test_completer_drain_waits_for_the_write_in_flight). The states and the log say which
    # it was if it fails again.
    found = states(database_url, schema)
    assert found == {"completed": 2}, (found, output(worker))
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {effects}"))[0][0] == 2


def _sigterm_past_grace(database_url: str, schema: str, running: int, *, exit_within: float) -> str:
    """Start a worker with a 0.5 s grace, SIGTERM it once ``running`` jobs run, check that
    it exits 0 within ``exit_within`` seconds of the signal, and return its output."""
    worker = start_worker_process(
        database_url, schema, "tests.jobs_core", "--shutdown-grace", "0.5", "--lease", "30",
        "--maintenance-interval", "0.2", "--poll-interval", "0.2",
    )
    try:
        assert wait_running(database_url, schema, running)
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0, output(worker)
        assert time.monotonic() - signalled < exit_within
    finally:
        if worker.poll() is None:
            worker.kill()
    return output(worker)


def test_sigterm_past_grace_releases_jobs_at_once(engine, database_url, schema, effects):
    with Session(engine) as session, session.begin():
        session.add_all([CoreSlow(seconds=30) for _ in range(2)])
    _sigterm_past_grace(database_url, schema, 2, exit_within=0.5 + 1.5)
    # Released, not left running until the 30 s lease expires; the attempt is refunded.
    assert q(database_url, jobs_sql(schema, "SELECT state, attempt, lease_expires_at FROM {jobs}")) == [("available", 0, None)] * 2


def test_sigterm_past_grace_exits_with_a_sync_handler_still_in_its_thread(engine, database_url, schema, effects):
    """A thread cannot be interrupted; the process exit must not wait for it (Python joins
    its threads at exit: the worker exited only when the handler returned)."""
    with Session(engine) as session, session.begin():
        session.add(CoreNoop(sleep=60))
    logged = _sigterm_past_grace(database_url, schema, 1, exit_within=0.5 + 2.5)
    assert "exiting with 1 sync handler(s) still running" in logged
    assert q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs}")) == [("available", 0)]


def _second_signal_exits_now(database_url: str, schema: str) -> None:
    """SIGINT a worker (60 s grace) running one job, check it is still draining, SIGINT it
    again and check it exits 0 within 5 s, its job released."""
    worker = start_worker_process(database_url, schema, "tests.jobs_core", "--shutdown-grace", "60", *FAST)
    try:
        assert wait_running(database_url, schema, 1)
        worker.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert worker.poll() is None  # still draining
        worker.send_signal(signal.SIGINT)
        assert worker.wait(5) == 0, output(worker)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert states(database_url, schema) == {"available": 1}


def test_second_signal_exits_now(engine, database_url, schema, effects):
    with Session(engine) as session, session.begin():
        session.add(CoreSlow(seconds=30))
    _second_signal_exits_now(database_url, schema)


def test_second_signal_exits_now_with_a_sync_handler_still_running(engine, database_url, schema, effects):
    """A released sync handler's thread cannot be stopped; the process must not wait for it."""
    with Session(engine) as session, session.begin():
        session.add(CoreNoop(sleep=60))
    _second_signal_exits_now(database_url, schema)


def test_stale_worker_cannot_complete_and_its_session_effects_roll_back(engine, database_url, schema, effects):
    """SIGSTOP a worker inside a transactional job past its lease; another completes it."""
    with Session(engine) as session, session.begin():
        session.add(CoreTransactional(seconds=2.0))
    stale = start_worker_process(database_url, schema, "tests.jobs_core", "--lease", "1", "--maintenance-interval", "0.1")
    fresh = None
    try:
        assert wait_running(database_url, schema, 1)
        time.sleep(0.3)  # inside the handler's transaction now: effect inserted, not committed
        stale.send_signal(signal.SIGSTOP)
        fresh = start_worker_process(database_url, schema, "tests.jobs_core", "--lease", "1", "--maintenance-interval", "0.1")
        assert wait_for(lambda: states(database_url, schema) == {"completed": 1}, 30), states(database_url, schema)
        stale.send_signal(signal.SIGCONT)
        time.sleep(3.0)  # the stale handler wakes, tries to commit its completion, and is fenced off
        assert stale.poll() is None, "a fenced-off worker must keep running"
    finally:
        stale.send_signal(signal.SIGCONT)
        stop([p for p in (stale, fresh) if p is not None])
    rows = q(database_url, jobs_sql(schema, "SELECT worker_pid FROM {effects}"))
    assert rows == [(fresh.pid,)]
    assert q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs}")) == [("completed", 2)]


@pytest.mark.slow  # the default run has R9's version: tests/reliability/test_network_faults.py
def test_terminated_backends_are_replaced_and_nothing_is_lost(engine, database_url, schema, effects):
    with Session(engine) as session, session.begin():
        # 3000 x 50 ms over 20 slots: at least 7.5 s of work, so the four rounds of kills
        # (0.7 s apart, once the worker's backends exist) land mid-drain however fast it claims.
        enqueue_many(session, (CoreNoop(n=i, sleep=0.05) for i in range(3000)))
    worker = start_worker_process(database_url, schema, "tests.jobs_core", "--concurrency", "20", *FAST)
    try:
        kills = 0
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and states(database_url, schema) != {"completed": 3000}:
            if kills < 4:
                # This test's workers only (their last statement names its schema): the suite
                # runs two processes, which share a server given by SA_JOBS_TEST_DATABASE_URL.
                killed = q(database_url, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                           " WHERE application_name LIKE 'sa_jobs:%%' AND pid <> pg_backend_pid()"
                           " AND position(%s in query) > 0", (schema,))[0][0]
                kills += 1 if killed else 0
            time.sleep(0.7)
        assert kills == 4
        assert states(database_url, schema) == {"completed": 3000}
        assert worker.poll() is None, output(worker)
    finally:
        assert stop([worker]) == [0]
    distinct = q(database_url, jobs_sql(schema, "SELECT count(DISTINCT job_id) FROM {effects}"))[0][0]
    assert distinct == 3000


def test_a_timed_out_sync_handlers_thread_holds_a_stop_within_the_grace_and_a_second_signal_exits(
        engine, database_url, schema):
    """The job of a sync handler past its timeout has ended (dead), but its thread sleeps on:
    a SIGTERM'd `sa-jobs worker` waits for it within its grace (60 s here), and a second
    signal exits at once, saying it left the thread behind (Python would join it at exit)."""
    from .jobs_zombie import ZombieSleep

    with Session(engine) as session, session.begin():
        session.add(ZombieSleep(seconds=60))
    worker = start_worker_process(database_url, schema, "tests.jobs_zombie", "--shutdown-grace", "60",
                                  "--lease", "30", "--poll-interval", "0.2", "--maintenance-interval", "0.2")
    try:
        assert wait_for(lambda: states(database_url, schema) == {"dead": 1}, 20), states(database_url, schema)
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert worker.poll() is None  # within the grace: the thread may yet return
        signalled = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0, output(worker)
        assert time.monotonic() - signalled < 5
    finally:
        if worker.poll() is None:
            worker.kill()
    logged = output(worker)
    assert "exiting with 1 sync handler(s) still running" in logged, logged
    assert states(database_url, schema) == {"dead": 1}
