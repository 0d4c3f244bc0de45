"""R14: Hypothesis over failure sequences, run by a real worker on a real server.

Attempts never exceed max_attempts; every retry's backoff is inside its jitter bounds
(read from an audit trigger: scheduled_at - now() of the failing UPDATE); exhausted
jobs end dead with every error and a traceback; a replay adds exactly one attempt.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from sa_jobs import retry
from sa_jobs.retry import backoff_bounds

from ..helpers import run_worker_until
from .rel_jobs import PLAN_BACKOFF, RelPlan
from .support import enable_audit, scale

steps = st.sampled_from(["ok", "fail", "fail", "discard"])
job_specs = st.lists(st.tuples(st.lists(steps, max_size=6), st.integers(1, 5)), min_size=1, max_size=6)


def expected(plan: list[str], max_attempts: int) -> tuple[str, int]:
    for k in range(1, max_attempts + 1):
        step = plan[k - 1] if k <= len(plan) else "fail"
        if step == "ok":
            return "completed", k
        if step == "discard" or k == max_attempts:
            return "dead", k
    raise AssertionError("unreachable")


def test_failure_sequences(db, rel_url, rel_schema, rel_engine):
    enable_audit(rel_url, rel_schema)

    def terminal() -> bool:
        return db.one("SELECT count(*) FROM {jobs} WHERE state NOT IN ('completed', 'dead')") == 0

    @settings(max_examples=scale(8, 200), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(specs=job_specs)
    def scenario(specs: list[tuple[list[str], int]]) -> None:
        with Session(rel_engine) as session, session.begin():
            jobs = [RelPlan(plan=plan).options(max_attempts=m) for plan, m in specs]
            session.add_all(jobs)
            session.flush()
            ids = [j.id for j in jobs]
        run_worker_until(rel_url, rel_schema, [RelPlan], terminal, timeout=60)
        assert terminal()
        rows = {r[0]: r[1:] for r in db.q("SELECT id, state, attempt, max_attempts, errors FROM {jobs} WHERE id = ANY(%s)", (ids,))}
        for job_id, (plan, m) in zip(ids, specs):
            state, attempt, max_attempts, errors = rows[job_id]
            assert (state, attempt) == expected(plan, m), (plan, m, rows[job_id])
            assert attempt <= max_attempts
            assert len(errors) == attempt - (state == "completed")
            if state == "dead":
                last = errors[-1]
                assert last["attempt"] == attempt
                assert last["error"].startswith(("ValueError: planned failure", "Discard: discarded"))
                assert "rel_plan" in last["traceback"] and "Traceback" in last["traceback"]
        for attempt, delay in db.q("SELECT new_attempt, sched_delay FROM {audit} WHERE new_state = 'retryable'"
                                   " AND job_id = ANY(%s)", (ids,)):
            low, high = backoff_bounds(attempt, **PLAN_BACKOFF)
            assert low - 1e-3 <= delay <= high + 1e-3, (attempt, delay, low, high)
        # Replay every dead job once: exactly one more attempt.
        # Replay the jobs that died of exhaustion (attempt == max_attempts); early deaths
        # (Discard) are covered by the test below.
        dead = {i: (rows[i][1], plan) for i, (plan, _) in zip(ids, specs)
                if rows[i][0] == "dead" and rows[i][1] == rows[i][2]}
        if dead:
            with Session(rel_engine) as session, session.begin():
                for job_id in dead:
                    retry(session, job_id)
            run_worker_until(rel_url, rel_schema, [RelPlan], terminal, timeout=60)
            for job_id, (old, plan) in dead.items():
                state, attempt = db.q("SELECT state, attempt FROM {jobs} WHERE id = %s", (job_id,))[0]
                step = plan[old] if old < len(plan) else "fail"
                assert attempt == old + 1, (job_id, old, state, attempt)
                assert state == ("completed" if step == "ok" else "dead"), (plan, old, state)

    scenario()


def test_replay_of_discarded_job_adds_exactly_one_attempt(db, rel_url, rel_schema, rel_engine):
    with Session(rel_engine) as session, session.begin():
        job = RelPlan(plan=["discard"]).options(max_attempts=3)
        session.add(job)
        session.flush()
        job_id = job.id

    def terminal() -> bool:
        return db.one("SELECT state FROM {jobs} WHERE id = %s", (job_id,)) in ("dead", "completed")

    run_worker_until(rel_url, rel_schema, [RelPlan], terminal, timeout=30)
    assert db.q("SELECT state, attempt FROM {jobs} WHERE id = %s", (job_id,)) == [("dead", 1)]
    with Session(rel_engine) as session, session.begin():
        retry(session, job_id)
    run_worker_until(rel_url, rel_schema, [RelPlan], terminal, timeout=30)
    assert db.q("SELECT state, attempt FROM {jobs} WHERE id = %s", (job_id,)) == [("dead", 2)]
