"""R6: long jobs keep their lease; a worker whose heartbeats fail gives its jobs up.

- ``test_r6_long_jobs_are_never_reclaimed``: an async job sleeping 10x the lease and a
  CPU-bound *sync* handler burning 10x the lease in pure Python (holding the GIL in
  slices, so the heartbeat competes with it) on a healthy worker, while a second worker
  is ready to take over anything whose lease expires. Neither job is ever re-claimed:
  one claim each in the audit trail, no sample ever sees its lease expired, attempt 1
  completes, the handlers were never told the lease was lost.
- ``test_r6_failed_heartbeats_cancel_the_handler``: the same two kinds on a worker behind
  the proxy; once a heartbeat has landed, every ``sa_jobs:heartbeat`` connection of that
  worker is blackholed (new ones too). After the lease L without a successful beat the
  worker must cancel both handlers and tell them the lease is lost (the async handler is
  cancelled, its ``finally`` records ``lease_lost=True cancelled=True``; the sync handler
  sees ``ctx.cancelled`` and stops); the rescuer re-drives the job once, attempt 2
  completes, and nothing the lost attempt did after the loss reached the row.
  The same worker may re-claim the job (its producer connection is healthy) before its
  failing heartbeat notices the loss; the worker keys running jobs by claim (id, token),
  so both attempts are tracked and attempt 1 is still told and cancelled (this was a
  library bug found by this test: runs were keyed by job id only).
- ``test_r6_heartbeat_tells_a_stale_attempt_beside_its_reclaim``: the heartbeat half of the
  same situation, driven directly. The heartbeat now answers by claim (id, token); it
  answered by job id, which counted a stale attempt alive beside its re-claim (a library
  bug this test found).
"""

from __future__ import annotations

import re

from sqlalchemy.orm import Session

from .proxy import Proxy
from .rel_jobs import RelLong, RelLongSync
from .support import Sampler, WorkerProc, enable_audit, wait_for

NOTE = re.compile(r"lease_lost=(True|False) cancelled=(True|False) ran=([0-9.]+)")


def _args(lease: float, interval: float) -> list[str]:
    return ["--lease", str(lease), "--maintenance-interval", str(interval), "--poll-interval", str(interval),
            "--shutdown-grace", "1"]


def _note(db, job_id: int, attempt: int):
    rows = db.q("SELECT note, at FROM {effects} WHERE job_id = %s AND attempt = %s", (job_id, attempt))
    if not rows:
        return None
    assert len(rows) == 1, rows
    lost, cancelled, ran = NOTE.fullmatch(rows[0][0]).groups()
    return lost == "True", cancelled == "True", float(ran), rows[0][1]


def _beats(db, ids: list[int]) -> int:
    return db.one("SELECT count(*) FROM {audit} WHERE job_id = ANY(%s) AND old_state = 'running'"
                  " AND new_state = 'running'", (ids,))


def test_r6_long_jobs_are_never_reclaimed(db, rel_url, rel_schema, rel_engine, workers):
    lease = 1.5
    long = 10 * lease
    enable_audit(rel_url, rel_schema)
    # Two workers: whichever claims a job, the other would re-drive it if its lease expired.
    ws = [WorkerProc(rel_url, rel_schema, "--queue", "r6=4", *_args(lease, 0.2)) for _ in range(2)]
    workers += ws
    with Session(rel_engine) as session, session.begin():
        jobs = [RelLong(seconds=long).options(queue="r6"), RelLongSync(seconds=long).options(queue="r6")]
        session.add_all(jobs)
        session.flush()
        ids = [j.id for j in jobs]
    sampler = Sampler(lambda: db.one(
        "SELECT count(*) FROM {jobs} WHERE state = 'running' AND lease_expires_at < now()"), every=0.2)
    sampler.start()
    try:
        assert wait_for(lambda: db.one("SELECT count(*) FROM {jobs} WHERE state = 'completed'") == 2, long + 60), \
            (db.states(), [w.output() for w in ws])
    finally:
        samples = sampler.stop()
    assert max(samples) == 0, "a long job's lease expired while its worker was healthy"
    ran = []
    for j in ids:
        assert db.q("SELECT state, attempt, errors FROM {jobs} WHERE id = %s", (j,)) == [("completed", 1, [])]
        claims = db.one("SELECT count(*) FROM {audit} WHERE job_id = %s AND new_state = 'running'"
                        " AND old_state IS DISTINCT FROM 'running'", (j,))
        assert claims == 1, f"job {j} claimed {claims} times"
        lease_lost, cancelled, secs, _ = _note(db, j, 1)
        assert not lease_lost and not cancelled and secs >= long - 0.1, (j, _note(db, j, 1))
        assert _note(db, j, 2) is None
        ran.append(secs)
    assert all(w.alive() for w in ws)
    print(f"\nR6a: lease {lease}s: async sleep ran {ran[0]:.1f}s, sync CPU handler ran {ran[1]:.1f}s on attempt 1,"
          f" {_beats(db, ids)} lease extensions, 1 claim each, 0 expired leases in {len(samples)} samples")


def test_r6_failed_heartbeats_cancel_the_handler(db, cluster, rel_url, rel_schema, rel_engine, workers):
    lease = 1.5
    enable_audit(rel_url, rel_schema)
    proxy = Proxy(cluster.port)
    try:
        w = WorkerProc(cluster.url_via(proxy.port), rel_schema, "--queue", "r6=4", *_args(lease, 0.05),
                       effects_url=rel_url)
        workers.append(w)
        with Session(rel_engine) as session, session.begin():
            jobs = [RelLong(seconds=120, later=0.2).options(queue="r6"),
                    RelLongSync(seconds=120, later=0.2).options(queue="r6")]
            session.add_all(jobs)
            session.flush()
            ids = [j.id for j in jobs]
        # Both run and have had their leases extended at least once.
        assert wait_for(lambda: db.one("SELECT count(DISTINCT job_id) FROM {audit} WHERE job_id = ANY(%s)"
                                       " AND old_state = 'running' AND new_state = 'running'", (ids,)) == 2, 60), w.output()
        tokens = dict(db.q("SELECT id, claim_token FROM {jobs} WHERE id = ANY(%s)", (ids,)))
        proxy.blackhole_new = lambda c: c.app == "sa_jobs:heartbeat"
        assert proxy.blackhole("sa_jobs:heartbeat"), proxy.live()
        cut_at = db.one("SELECT clock_timestamp()")
        last_ok = db.one("SELECT max(at) FROM {audit} WHERE job_id = ANY(%s) AND old_state = 'running'"
                         " AND new_state = 'running'", (ids,))
        # Both lost handlers stop and say why, long before their 120 s.
        told = wait_for(lambda: all(_note(db, j, 1) for j in ids), lease + 6)
        reclaimed = db.q("SELECT a.job_id, a.client_port FROM {audit} a WHERE a.job_id = ANY(%s)"
                         " AND a.new_state = 'running' AND a.new_attempt = 2", (ids,))
        assert told, (f"lost handlers still running {lease + 6}s after the blackhole; attempt 2 claimed"
                      f" by the same worker meanwhile: {reclaimed}, worker ports {sorted(w.ports())}")
        lost = {j: _note(db, j, 1) for j in ids}
        for j, (lease_lost, cancelled, ran, at) in lost.items():
            assert lease_lost and cancelled and ran < 60, (j, lost[j])
        # The lost attempt is re-driven by the rescuer; attempt 2 (0.2 s) completes.
        assert wait_for(lambda: db.one("SELECT count(*) FROM {jobs} WHERE id = ANY(%s) AND state = 'completed'",
                                       (ids,)) == 2, 40), (db.states(), w.output())
        delays = []
        for j in ids:
            state, attempt, errors = db.q("SELECT state, attempt, errors FROM {jobs} WHERE id = %s", (j,))[0]
            assert (state, attempt) == ("completed", 2)
            assert [e["error"].split(":")[0] for e in errors] == ["LeaseExpired"], errors
            # While attempt 1 held the row, the only change after the cut was the rescue.
            after = db.q("SELECT old_state, new_state FROM {audit} WHERE job_id = %s AND old_token = %s"
                         " AND old_state = 'running' AND at > %s", (j, tokens[j], cut_at))
            assert after == [("running", "retryable")], after
            delays.append((lost[j][3] - last_ok).total_seconds())
        assert all(0 < d < lease + 6 for d in delays), delays
        assert w.alive(), w.output()
        print(f"\nR6b: lease {lease}s: handlers stopped {', '.join(f'{d:.2f}s' for d in delays)} (async, sync)"
              f" after the last landed beat, lease_lost=True cancelled=True, re-driven once, attempt 2 completed")
    finally:
        proxy.close()


def test_r6_heartbeat_tells_a_stale_attempt_beside_its_reclaim(db, rel_url, rel_schema):
    """The heartbeat half of the same situation, driven directly and deterministically: one
    job row held by claim t2 (attempt 2), and this worker still running attempt 1 (claim
    t1) of the same job beside it. A successful beat must extend attempt 2 and tell
    attempt 1 its lease is lost; the row answers by (id, token), not by id."""
    import time as _time
    import uuid as _uuid

    import anyio

    from sa_jobs.queries import Queries
    from sa_jobs.worker import heartbeat as hb_mod
    from sa_jobs.worker._job import ClaimedJob

    try:  # the observer protocol's home moved between releases
        from sa_jobs.events import NullObserver
    except ImportError:
        from sa_jobs.worker.events import NullObserver
    ManagedConnection, Heartbeat = hb_mod.ManagedConnection, hb_mod.Heartbeat

    q = Queries.for_schema(rel_schema)
    job_id = db.one("INSERT INTO {jobs} (kind, queue, attempt) VALUES ('rel_long', 'rel', 1) RETURNING id")
    t1, t2 = _uuid.uuid4(), _uuid.uuid4()
    import psycopg

    with psycopg.connect(rel_url, autocommit=True) as conn:
        assert len(conn.execute(q.claim, {"queue": "rel", "limit": 1, "token": t2, "owner": "w", "lease": 30}).fetchall()) == 1
    now = _time.monotonic()

    def attempt(token, n: int) -> ClaimedJob:
        return ClaimedJob(id=job_id, token=token, kind="rel_long", queue="rel", args={}, attempt=n, max_attempts=5,
                          priority=0, wait_seconds=0.0, created_epoch=0.0, claimed_at=now, last_lease_ok=now)

    stale, current = attempt(t1, 1), attempt(t2, 2)

    async def beat() -> None:
        conn = ManagedConnection(rel_url, "heartbeat", timeout=5)
        try:
            await Heartbeat(conn, q, NullObserver(), lambda: [stale, current], lease=30, interval=1).beat()
        finally:
            await conn.close()

    anyio.run(beat)
    assert not current.lease_lost and not current.cancelled
    assert stale.lease_lost and stale.cancelled, "the stale attempt was counted alive by its job id"
