"""R11: the completion write fails right after handlers return.

- The worker's completer connection is terminated by the handler itself just before it
  returns: the completion must be retried (with backoff, on a new connection) and land
  on attempt 1, with no re-run.
- The completer can never reach the server (every connection it opens is blackholed by
  the proxy): the outcome never lands, so the job must become claimable again once its
  lease expires (L), be rescued within R and finish elsewhere: never stuck.
- A completer connection goes half-open while it is established: completions must
  still land on a fresh connection instead of waiting forever on the dead socket.
"""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from sa_jobs import enqueue_many

from .proxy import Proxy
from .rel_jobs import RelCutCompleter, RelWork
from .support import WorkerProc, wait_for

LEASE = 2.0
R = 0.2


def test_completion_cut_after_handler_is_retried_and_lands(db, rel_url, rel_schema, rel_engine, workers):
    with Session(rel_engine) as session, session.begin():
        enqueue_many(session, RelCutCompleter, [{"cut": i % 10 == 0} for i in range(300)])
    w = WorkerProc(rel_url, rel_schema, "--concurrency", "4", "--lease", "10", "--maintenance-interval", str(R),
                   "--poll-interval", "0.2")
    workers.append(w)
    assert wait_for(lambda: db.states() == {"completed": 300}, 60), db.states()
    assert w.alive(), w.output()
    # Every completion landed on the first attempt: retried, not rescued; no re-run.
    assert db.q("SELECT min(attempt), max(attempt) FROM {jobs}") == [(1, 1)]
    assert db.q("SELECT count(*), count(DISTINCT job_id) FROM {effects}") == [(300, 300)]
    assert w.stop() == 0
    retries = w.output().count("completer: writing")
    cuts = db.one("SELECT count(*) FROM {effects} WHERE note = 'cut=1'")
    assert cuts >= 2 and retries >= 1, (cuts, w.output())
    print(f"R11a: {cuts} completer connections terminated -> {retries} logged completion retries, 0 re-runs")


def test_completion_that_never_lands_is_reclaimable_after_lease(db, cluster, rel_url, rel_schema, rel_engine, workers):
    proxy = Proxy(cluster.port)
    try:
        # Every connection A's completer opens is blackholed: outcomes never land.
        proxy.blackhole_new = lambda c: c.app == "sa_jobs:completer"
        a = WorkerProc(cluster.url_via(proxy.port), rel_schema, "--concurrency", "5", "--lease", str(LEASE),
                       "--maintenance-interval", str(R), "--poll-interval", "0.2", effects_url=rel_url)
        workers.append(a)
        with Session(rel_engine) as session, session.begin():
            session.add_all([RelWork(ms=100) for _ in range(5)])
        assert wait_for(lambda: db.one("SELECT count(*) FROM {effects}") == 5, 30)
        # A may not claim again (its producer is cut off too): B must pick the jobs up.
        proxy.blackhole_new = lambda c: c.app in ("sa_jobs:completer", "sa_jobs:producer")
        proxy.blackhole("sa_jobs:producer")
        b = WorkerProc(rel_url, rel_schema, "--concurrency", "5", "--lease", str(LEASE),
                       "--maintenance-interval", str(R), "--poll-interval", "0.2")
        workers.append(b)
        assert wait_for(lambda: db.states() == {"completed": 5}, 40), db.states()
        rows = db.q("SELECT j.attempt, extract(epoch FROM j.attempted_at - e.at), e2.worker_pid FROM {jobs} j"
                    " JOIN {effects} e ON e.job_id = j.id AND e.attempt = 1"
                    " JOIN {effects} e2 ON e2.job_id = j.id AND e2.attempt = 2")
        assert len(rows) == 5
        for attempt, gap, pid in rows:
            assert attempt == 2 and pid == b.pid
            # Claimable again only after the lease ran out (measured from the end of the
            # handler, so a little under L), and not stuck: B's start-up is in the gap.
            assert LEASE - 0.5 <= gap <= LEASE + R + 15, gap
        assert a.alive(), a.output()
        print(f"R11b: re-claimed {sorted(round(float(g), 2) for _, g, _ in rows)} s after the handler returned"
              f" (L={LEASE}, R={R}, includes B's start-up)")
    finally:
        proxy.close()


def test_half_open_completer_connection_is_replaced(db, cluster, rel_url, rel_schema, rel_engine, workers):
    proxy = Proxy(cluster.port)
    try:
        a = WorkerProc(cluster.url_via(proxy.port), rel_schema, "--concurrency", "4", "--lease", str(LEASE),
                       "--maintenance-interval", str(R), "--poll-interval", "0.2", effects_url=rel_url)
        workers.append(a)
        with Session(rel_engine) as session, session.begin():
            session.add_all([RelWork(ms=10) for _ in range(4)])
        assert wait_for(lambda: db.states() == {"completed": 4}, 30), db.states()
        assert proxy.blackhole("sa_jobs:completer")  # the established socket goes silent
        with Session(rel_engine) as session, session.begin():
            session.add_all([RelWork(ms=10).options(max_attempts=50) for _ in range(20)])
        # A alone: the new jobs must complete (on attempt 1, or after a rescue), within a
        # bound that allows the lease, a rescue and a reconnect.
        done = wait_for(lambda: db.states() == {"completed": 24}, 2 * LEASE + 8)
        assert done, (db.states(), db.q("SELECT max(attempt) FROM {jobs}"))
    finally:
        proxy.close()


def _set_read_only(cluster, on: bool) -> None:
    """The whole cluster refuses writes (``default_transaction_read_only``, reloaded: it
    reaches the sessions already open), as a primary demoted to a standby does (SQLSTATE
    25006). This connection sets it off for itself, so it can set it back."""
    import psycopg

    with psycopg.connect(cluster.url, autocommit=True, options="-c default_transaction_read_only=off") as conn:
        if on:
            conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        else:
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
        conn.execute("SELECT pg_reload_conf()")


def test_completion_refused_by_a_read_only_server_is_kept_until_it_lands(db, cluster, rel_url, rel_schema,
                                                                         rel_engine, workers):
    # The handlers' side effects go on a connection that ignores the read-only window.
    effects = rel_url + "?options=-c%20default_transaction_read_only%3Doff"
    w = WorkerProc(rel_url, rel_schema, "--concurrency", "4", "--lease", "30", "--maintenance-interval", str(R),
                   "--poll-interval", "0.2", effects_url=effects)
    workers.append(w)
    with Session(rel_engine) as session, session.begin():
        session.add_all([RelWork(ms=800) for _ in range(4)])
    assert wait_for(lambda: db.states() == {"running": 4}, 30), db.states()
    try:
        _set_read_only(cluster, True)
        # The handlers return while the server refuses every write: their completions fail.
        assert wait_for(lambda: db.one("SELECT count(*) FROM {effects}") == 4, 10)
        time.sleep(1.5)  # a few completer retries meet the read-only server
        assert db.states() == {"running": 4}
    finally:
        _set_read_only(cluster, False)
    # Kept and retried, they land on attempt 1 well inside the 30 s lease: dropped, the
    # jobs sat running until it ran out and ran again.
    assert wait_for(lambda: db.states() == {"completed": 4}, 10), (db.states(), w.output()[-3000:])
    assert db.q("SELECT max(attempt) FROM {jobs}") == [(1,)]
    assert db.q("SELECT count(*) FROM {effects}") == [(4,)]
    assert w.alive(), w.output()
    assert "dropping" not in w.output(), w.output()
