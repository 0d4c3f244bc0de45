"""R3 fencing: a worker paused past its lease changes nothing when it wakes up.

Worker A claims a job; A is SIGSTOPped past its lease; B (which was stopped until now)
rescues and re-claims it and completes it; A gets SIGCONT. Every UPDATE on the jobs
table is audited with the client port of the backend that made it, and A's ports are
known (psutil), so "A's complete/fail/heartbeat change 0 rows" is checked directly:
no audited change after B's claim comes from A. Effects A wrote in the job's own
Session must have rolled back. Hypothesis randomises the handler mode, where A is
frozen and when it is resumed (while B still runs the job, or after B finished).
"""

from __future__ import annotations

import signal
import time

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from .rel_jobs import RelFence
from .support import WorkerProc, enable_audit, scale, wait_for

LEASE = 1.5
ARGS = ["--lease", str(LEASE), "--maintenance-interval", "0.1", "--poll-interval", "0.1", "--concurrency", "2"]


def test_paused_worker_is_fenced_off(db, rel_url, rel_schema, rel_engine, workers):
    enable_audit(rel_url, rel_schema)
    a = WorkerProc(rel_url, rel_schema, *ARGS)
    b = WorkerProc(rel_url, rel_schema, *ARGS)
    workers += [a, b]
    # Let B finish starting (schema check, connections), then freeze it: A claims alone.
    assert wait_for(lambda: len(b.ports()) >= 3, 30), b.output()
    b.signal(signal.SIGSTOP)
    roles = {"active": a, "standby": b}
    outcomes: list[str] = []

    @settings(max_examples=scale(1, 60), deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(
        mode=st.sampled_from(["tx", "plain", "fail"]),
        pre=st.floats(0.0, 0.5),
        inner=st.floats(0.3, 1.0),
        stop_frac=st.floats(0.0, 0.9),
        resume_while_b_runs=st.booleans(),
    )
    @example(mode="tx", pre=0.1, inner=0.8, stop_frac=0.6, resume_while_b_runs=True)
    @example(mode="plain", pre=0.5, inner=0.5, stop_frac=0.2, resume_while_b_runs=False)
    @example(mode="fail", pre=0.2, inner=0.6, stop_frac=0.5, resume_while_b_runs=True)
    def scenario(mode: str, pre: float, inner: float, stop_frac: float, resume_while_b_runs: bool) -> None:
        x, y = roles["active"], roles["standby"]
        with Session(rel_engine) as session, session.begin():
            job = RelFence(mode=mode, pre=pre, inner=inner)
            session.add(job)
            session.flush()
            job_id = job.id
        assert wait_for(lambda: db.q("SELECT state FROM {jobs} WHERE id = %s", (job_id,))[0][0] == "running", 20)
        time.sleep(stop_frac * (pre + inner))
        x.signal(signal.SIGSTOP)
        row = db.q("SELECT state, claim_token, attempt FROM {jobs} WHERE id = %s", (job_id,))[0]
        if row[0] != "running":  # finished before the freeze: nothing to fence this time
            x.signal(signal.SIGCONT)
            outcomes.append("finished-before-stop")
            return
        x_token = row[1]
        assert row[2] == 1
        y.signal(signal.SIGCONT)

        def y_claimed() -> bool:
            return db.one("SELECT count(*) FROM {audit} WHERE job_id = %s AND new_token IS DISTINCT FROM old_token"
                          " AND new_state = 'running' AND new_token <> %s", (job_id, x_token)) > 0

        if not wait_for(y_claimed, LEASE + 10):
            # Frozen between its completion UPDATE and COMMIT, A holds the row lock: the
            # rescuer skips the row (SKIP LOCKED). Legitimate: A's token was still valid.
            locked = db.one("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                            " WHERE c.relname = 'jobs' AND l.granted AND l.mode = 'RowExclusiveLock'")
            x.signal(signal.SIGCONT)
            assert locked, "B never re-claimed a job whose lease had expired"
            assert wait_for(lambda: db.states().get("running", 0) == 0, 10)
            assert db.q("SELECT state, attempt FROM {jobs} WHERE id = %s", (job_id,)) == [("completed", 1)]
            outcomes.append("a-held-commit")
            roles["active"], roles["standby"] = x, y
            y.signal(signal.SIGSTOP)
            return
        claim_seq, y_token = db.q("SELECT seq, new_token FROM {audit} WHERE job_id = %s AND new_state = 'running'"
                                  " AND new_token <> %s ORDER BY seq LIMIT 1", (job_id, x_token))[0]
        if not resume_while_b_runs:
            assert wait_for(lambda: db.q("SELECT state FROM {jobs} WHERE id = %s", (job_id,))[0][0] == "completed", 20)
        x_ports = x.ports()
        x.signal(signal.SIGCONT)
        # A's timers all expired while it was frozen: its handler, heartbeat and completer
        # act at once. Give them ample time to do damage, then look for any.
        time.sleep(LEASE + 0.5)
        assert wait_for(lambda: db.q("SELECT state FROM {jobs} WHERE id = %s", (job_id,))[0][0] == "completed", 20)
        x_ports |= x.ports()
        stale = db.q("SELECT seq, old_state, new_state, client_port FROM {audit} WHERE job_id = %s AND seq > %s"
                     " AND client_port = ANY(%s)", (job_id, claim_seq, sorted(x_ports)))
        assert stale == [], f"the fenced-off worker changed rows: {stale}"
        after = db.q("SELECT DISTINCT old_token FROM {audit} WHERE job_id = %s AND seq > %s", (job_id, claim_seq))
        assert after in ([], [(y_token,)]), after
        state, attempt, result, errors, lease = db.q(
            "SELECT state, attempt, result, errors, lease_expires_at FROM {jobs} WHERE id = %s", (job_id,))[0]
        assert (state, attempt, lease) == ("completed", 2, None)
        assert [e["error"].split(":")[0] for e in errors] == ["LeaseExpired"], errors
        assert result == {"pid": y.pid, "attempt": 2}
        if mode == "tx":  # A's Session effect rolled back; B's committed with the completion
            assert db.q("SELECT worker_pid FROM {effects} WHERE job_id = %s", (job_id,)) == [(y.pid,)]
        assert x.alive() and y.alive(), x.output() + y.output()
        outcomes.append(f"fenced-{mode}-{'early' if resume_while_b_runs else 'late'}")
        roles["active"], roles["standby"] = y, x
        x.signal(signal.SIGSTOP)

    scenario()
    roles["standby"].signal(signal.SIGCONT)
    assert a.stop() == 0 and b.stop() == 0
    assert any(o.startswith("fenced") for o in outcomes), outcomes
    print("R3 outcomes:", outcomes)
