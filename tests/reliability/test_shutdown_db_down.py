"""Shutdown while the database cannot be reached."""

from __future__ import annotations

import signal
import time

from sqlalchemy.orm import Session

from sa_jobs.worker.worker import HURRIED_STOP

from .proxy import Proxy
from .rel_jobs import RelLong
from .support import WorkerProc, wait_for


def test_a_second_signal_exits_promptly_while_the_database_is_down(db, cluster, rel_url, rel_schema, rel_engine, workers):
    """The database stops answering mid-run; SIGTERM, then a second one ("send again to
    release jobs and exit now"). The released jobs' outcomes cannot be written, and the
    stop waited for them up to half the lease, then for the maintenance tick: 32 s with a
    60 s lease. After a second signal it gives them HURRIED_STOP (2 s). The rows stay
    running, their attempt spent, and are rescued after the lease: nothing is lost."""
    proxy = Proxy(cluster.port)
    try:
        with Session(rel_engine) as session, session.begin():
            session.add_all([RelLong(seconds=60) for _ in range(2)])
        w = WorkerProc(cluster.url_via(proxy.port), rel_schema, "--concurrency", "2", "--lease", "60",
                       "--shutdown-grace", "30", "--maintenance-interval", "0.2", "--poll-interval", "0.2",
                       effects_url=rel_url, log_level="INFO")
        workers.append(w)
        assert wait_for(lambda: db.states().get("running", 0) == 2, 30), db.states()
        proxy.blackhole_new = lambda c: True  # the database stops answering, new connections too
        for c in proxy.live():
            c.blackhole()
        w.signal(signal.SIGTERM)
        assert wait_for(lambda: "draining for up to" in w.output(), 5), w.output()
        time.sleep(0.5)
        second = time.monotonic()
        w.signal(signal.SIGTERM)
        assert wait_for(lambda: not w.alive(), 30), w.output()
        assert w.proc.returncode == 0, w.output()
        took = time.monotonic() - second
        assert took < HURRIED_STOP + 3, (took, w.output())
        assert "2 outcome(s) could not be written" in w.output()
        assert db.q("SELECT state, attempt FROM {jobs}") == [("running", 1)] * 2
    finally:
        proxy.close()
