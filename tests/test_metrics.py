"""Metrics against real PostgreSQL and real workers: exact counts, bounded labels, depth.

The promtool checks (metrics lint, alert rules and their unit tests, dashboard PromQL)
skip only when the Debian ``prometheus`` package is not installed.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import anyio
import psycopg
import pytest
from psycopg import sql
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sa_jobs import ConfigurationError, Periodic, PeriodicJobs, Pruner
from sa_jobs._url import to_conninfo
from sa_jobs.events import MAINTENANCE_HOOKS, hook
from sa_jobs.model import registered_kinds
from sa_jobs.metrics import (
    DEPTH_STATES,
    PrometheusObserver,
    QueueDepthCollector,
    depth_query,
    make_asgi_app,
    start_metrics_server,
)

from .conftest import REPO_ROOT, worker_command
from .helpers import jobs_sql, q, run_worker_until, wait_for
from .metrics_jobs import QUEUE, SECRET, MetricsDoomed, MetricsFenced, MetricsFlaky, MetricsOk, MetricsSlow, MetricsUnique

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "examples" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "examples" / "grafana" / "sa-jobs-dashboard.json"
KINDS = [MetricsOk, MetricsFlaky, MetricsDoomed, MetricsSlow]

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (apt-get install prometheus)"
)


def _unfinished(database_url: str, schema: str) -> int:
    return q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state NOT IN ('completed', 'dead')"))[0][0]


def _value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def _run_mix(database_url: str, schema: str, engine: Engine, observer: PrometheusObserver) -> None:
    """5 ok, 3 flaky (1 retry each), 2 doomed, 1 timed out (its only attempt: dead); run until all are final."""
    with Session(engine) as s, s.begin():
        s.add_all([MetricsOk() for _ in range(5)] + [MetricsFlaky(fail_times=1) for _ in range(3)]
                  + [MetricsDoomed() for _ in range(2)] + [MetricsSlow()])
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0,
                     observer=observer, concurrency=4, heartbeat_interval=0.2)
    assert _unfinished(database_url, schema) == 0


def test_worker_run_moves_each_metric_by_the_exact_amount(database_url: str, schema: str, engine: Engine) -> None:
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    _run_mix(database_url, schema, engine, observer)
    fin = "sa_jobs_jobs_finished_total"
    assert _value(reg, fin, queue=QUEUE, kind="metrics_ok", outcome="completed") == 5
    assert _value(reg, fin, queue=QUEUE, kind="metrics_flaky", outcome="retried") == 3
    assert _value(reg, fin, queue=QUEUE, kind="metrics_flaky", outcome="completed") == 3
    assert _value(reg, fin, queue=QUEUE, kind="metrics_doomed", outcome="dead") == 2
    # Its only attempt timed out, so the job is dead: counted as dead, not as timed_out.
    assert _value(reg, fin, queue=QUEUE, kind="metrics_slow", outcome="dead") == 1
    assert _value(reg, fin, queue=QUEUE, kind="metrics_slow", outcome="timed_out") == 0
    total = sum(s.value for f in reg.collect() if f.name == "sa_jobs_jobs_finished" for s in f.samples
                if s.name == fin)
    assert total == 14  # 11 jobs, 3 of them ran twice: nothing else was counted
    # One claim per attempt, one wait observation per started attempt.
    assert _value(reg, "sa_jobs_jobs_claimed_total", queue=QUEUE) == 14
    assert _value(reg, "sa_jobs_claim_batch_size_sum", queue=QUEUE) == 14
    assert _value(reg, "sa_jobs_claims_total", queue=QUEUE) == _value(reg, "sa_jobs_claim_duration_seconds_count", queue=QUEUE) >= 1
    assert _value(reg, "sa_jobs_job_queue_wait_seconds_count", queue=QUEUE) == 14
    # Run duration per kind; the timed-out attempt ran at least its 0.2 s timeout.
    assert _value(reg, "sa_jobs_job_run_duration_seconds_count", queue=QUEUE, kind="metrics_flaky") == 6
    assert _value(reg, "sa_jobs_job_run_duration_seconds_count", queue=QUEUE, kind="metrics_slow") == 1
    assert _value(reg, "sa_jobs_job_run_duration_seconds_sum", queue=QUEUE, kind="metrics_slow") >= 0.2
    assert _value(reg, "sa_jobs_job_run_duration_seconds_bucket", queue=QUEUE, kind="metrics_slow", le="0.1") == 0
    # End to end only for final outcomes: 8 completed, 3 dead (retries are not the end).
    assert _value(reg, "sa_jobs_job_end_to_end_seconds_count", queue=QUEUE, outcome="completed") == 8
    assert _value(reg, "sa_jobs_job_end_to_end_seconds_count", queue=QUEUE, outcome="dead") == 3
    assert _value(reg, "sa_jobs_job_end_to_end_seconds_count", queue=QUEUE, outcome="retried") == 0
    # Gauges after the drain: nothing in flight, all 4 slots free, this worker led.
    assert _value(reg, "sa_jobs_jobs_in_flight", queue=QUEUE) == 0
    assert _value(reg, "sa_jobs_worker_slots", queue=QUEUE) == 4
    assert _value(reg, "sa_jobs_worker_slots_free", queue=QUEUE) == 4
    assert _value(reg, "sa_jobs_worker_last_heartbeat_timestamp_seconds") > time.time() - 60
    assert _value(reg, "sa_jobs_jobs_rescued_total") == 0
    assert _value(reg, "sa_jobs_worker_loop_errors_total", component="producer") == 0
    # Each flaky failure went to retryable and was made available once by the scheduler.
    assert _value(reg, "sa_jobs_jobs_promoted_total") == 3
    for service in ("rescuer", "scheduler"):
        assert _value(reg, "sa_jobs_maintenance_duration_seconds_count", service=service) >= 1
        assert _value(reg, "sa_jobs_maintenance_last_run_timestamp_seconds", service=service) > time.time() - 60


def test_the_dead_series_of_a_served_queues_kinds_exist_before_the_first_dead_job(
        database_url: str, schema: str, engine: Engine) -> None:
    """``increase()`` cannot see a series' first sample: one that first appears at 1 never
    fired SaJobsDeadJobsRising, so the first job of a kind to die after each worker start
    went unalerted (a doomed job fails in milliseconds, between two scrapes). The dead
    series of the kinds whose queue a worker serves exist at 0 from its first claim."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    fin = "sa_jobs_jobs_finished_total"
    seen: list[float | None] = []

    def first_scrape_then_doom() -> bool:
        if not seen:
            if reg.get_sample_value("sa_jobs_claims_total", {"queue": QUEUE}) is None:
                return False  # no claim yet
            seen.append(reg.get_sample_value(fin, {"queue": QUEUE, "kind": "metrics_doomed", "outcome": "dead"}))
            with Session(engine) as s, s.begin():
                s.add(MetricsDoomed())
        return _unfinished(database_url, schema) == 0 and _value(reg, fin, queue=QUEUE, kind="metrics_doomed", outcome="dead") == 1

    run_worker_until(database_url, schema, KINDS, first_scrape_then_doom, observer=observer, concurrency=2)
    assert seen == [0.0], seen
    assert _value(reg, fin, queue=QUEUE, kind="metrics_doomed", outcome="dead") == 1
    # Only the dead outcome, only for kinds of the queues served: no other series is minted.
    assert reg.get_sample_value(fin, {"queue": QUEUE, "kind": "metrics_ok", "outcome": "completed"}) is None
    assert reg.get_sample_value(fin, {"queue": "q", "kind": "metrics_doomed", "outcome": "dead"}) is None


def test_counters_go_on_across_a_restart_and_match_the_table(database_url: str, schema: str, engine: Engine) -> None:
    """One observer, two worker runs in one process (as an app restarting its worker): the
    counters go on from where they were, and equal what the table says happened: retries,
    dead jobs, and running jobs cancelled (a job cancelled while it waits ran no attempt:
    in no counter)."""
    from sa_jobs import cancel

    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    with Session(engine) as s, s.begin():
        s.add_all([MetricsOk() for _ in range(5)] + [MetricsFlaky(fail_times=2) for _ in range(3)]
                  + [MetricsDoomed() for _ in range(2)] + [MetricsOk(sleep=30) for _ in range(2)]
                  + [MetricsOk().options(delay=3600)])
    count = "SELECT count(*) FROM {jobs} WHERE state = %s"

    def cancel_when_running() -> bool:
        running = [r[0] for r in q(database_url, jobs_sql(schema, "SELECT id FROM {jobs} WHERE state IN ('running', 'scheduled')"))]
        if len(running) == 3 and _unfinished(database_url, schema) == 3:
            with Session(engine) as s, s.begin():
                for job_id in running:
                    cancel(s, job_id)
        return (q(database_url, jobs_sql(schema, count), ("cancelled",))[0][0] == 3
                and _value(reg, "sa_jobs_jobs_finished_total", queue=QUEUE, kind="metrics_ok", outcome="cancelled") == 2)

    run_worker_until(database_url, schema, KINDS, cancel_when_running, observer=observer, concurrency=4)
    first = _value(reg, "sa_jobs_jobs_finished_total", queue=QUEUE, kind="metrics_ok", outcome="completed")
    assert first == 5
    with Session(engine) as s, s.begin():
        s.add_all([MetricsOk() for _ in range(3)])
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 3,
                     observer=observer, concurrency=4)

    def truth(sql_text: str, *params: Any) -> int:
        return int(q(database_url, jobs_sql(schema, sql_text), params)[0][0] or 0)

    fin = "sa_jobs_jobs_finished_total"
    for kind in ("metrics_ok", "metrics_flaky"):
        assert _value(reg, fin, queue=QUEUE, kind=kind, outcome="completed") == truth(
            "SELECT count(*) FROM {jobs} WHERE state = 'completed' AND kind = %s", kind)
    assert _value(reg, fin, queue=QUEUE, kind="metrics_ok", outcome="completed") == 8
    assert _value(reg, fin, queue=QUEUE, kind="metrics_flaky", outcome="retried") == truth(
        "SELECT sum(attempt - 1) FROM {jobs} WHERE kind = 'metrics_flaky'") == 6
    assert _value(reg, fin, queue=QUEUE, kind="metrics_doomed", outcome="dead") == truth(count, "dead") == 2
    assert _value(reg, fin, queue=QUEUE, kind="metrics_ok", outcome="cancelled") == truth(
        "SELECT count(*) FROM {jobs} WHERE state = 'cancelled' AND attempt > 0") == 2
    assert _value(reg, "sa_jobs_jobs_claimed_total", queue=QUEUE) == truth("SELECT sum(attempt) FROM {jobs}")
    assert _value(reg, "sa_jobs_jobs_in_flight", queue=QUEUE) == 0


def test_heartbeat_age_reads_zero_once_the_worker_stopped_on_purpose(database_url: str, schema: str) -> None:
    """The heartbeat age is computed at scrape time: once a worker stopped gracefully in a
    process that goes on serving metrics (an app that embeds it), it grew for good and
    SaJobsNoHeartbeat fired, though a stopped worker holds no lease to lose. It reads 0
    until the next run starts, which measures from its own start."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    age = "sa_jobs_worker_heartbeat_age_seconds"
    beat = "sa_jobs_worker_last_heartbeat_timestamp_seconds"
    for _ in range(2):  # a stop, then a new run of a worker on the same observer
        before = _value(reg, beat)
        run_worker_until(database_url, schema, KINDS, lambda: _value(reg, beat) > before,
                         observer=observer, heartbeat_interval=0.2)
        assert _value(reg, beat) > before
        assert _value(reg, age) == 0.0

    started = time.monotonic()
    observer.worker_started()
    observer.worker_started()  # a second worker on the same observer, still running after
    observer.worker_stopped(True)  # the first stopped
    assert wait_for(lambda: _value(reg, age) > 0.0, 5)
    observer.worker_stopped(False)  # a run that ended on an error of its own: an alarm
    assert wait_for(lambda: _value(reg, age) > 0.0, 5)
    assert _value(reg, age) <= time.monotonic() - started + 0.01


def test_heartbeat_age_reads_zero_before_any_worker_runs(database_url: str, schema: str) -> None:
    """An app that creates the observer (at import, as docs/metrics.md shows) and runs its
    worker only on some replicas, or later, held no lease, yet its age grew from the
    observer's creation and SaJobsNoHeartbeat fired on every replica without a worker.
    It reads 0 until a run starts, then counts from that run's start."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    age = "sa_jobs_worker_heartbeat_age_seconds"
    time.sleep(0.3)
    assert _value(reg, age) == 0.0
    running: list[float] = []

    def done() -> bool:
        running.append(_value(reg, age))
        return len(running) > 1 and running[-1] > 0  # the run's own age counts

    run_worker_until(database_url, schema, KINDS, done, observer=observer, heartbeat_interval=5, lease=30)
    assert 0 < running[-1] < 5, running
    assert _value(reg, age) == 0.0  # stopped as asked


def test_labels_stay_bounded_and_error_text_never_leaks(database_url: str, schema: str, engine: Engine) -> None:
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    stray = "metrics_undeclared_" + uuid.uuid4().hex[:8]  # a row whose kind no code declares
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, max_attempts) VALUES (%s, %s, 1)"), (stray, QUEUE))
    _run_mix(database_url, schema, engine, observer)
    text = generate_latest(reg).decode()
    assert stray not in text and SECRET not in text
    assert _value(reg, "sa_jobs_jobs_finished_total", queue=QUEUE, kind="other", outcome="dead") == 1
    ids = {str(r[0]) for r in q(database_url, jobs_sql(schema, "SELECT id FROM {jobs}"))}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= {"queue", "kind", "outcome", "component", "service", "le"}, sample
            # Declared kinds only (the dead series of its queue's kinds start at 0), and
            # counts only for the kinds this worker ran.
            assert sample.labels.get("kind", "other") in {"other", *registered_kinds()}
            if sample.value and sample.name == "sa_jobs_jobs_finished_total":
                assert sample.labels["kind"] in {"other", "metrics_ok", "metrics_flaky", "metrics_doomed", "metrics_slow"}
            assert not ids & set(sample.labels.values())


def test_a_job_whose_last_attempt_lost_its_lease_counts_as_dead(database_url: str, schema: str) -> None:
    """A job that kills its workers ends dead in the rescuer, not in a worker: it must show
    in sa_jobs_jobs_finished_total{outcome="dead"} all the same (the dead-jobs alert)."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    orphan = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, attempt, max_attempts, claim_token,"
                              " lease_owner, lease_expires_at, attempted_at)"
                              " SELECT %s, %s, 'running', %s, 3, gen_random_uuid(), 'gone:1', now() - interval '1 minute',"
                              " now() - interval '2 minutes' FROM generate_series(1, %s)")
    q(database_url, orphan, ("metrics_ok", QUEUE, 3, 2))      # last attempt lost: dead
    q(database_url, orphan, ("no_such_kind", QUEUE, 3, 1))    # likewise, a kind nobody declares
    q(database_url, orphan, ("metrics_ok", QUEUE, 1, 1))      # attempts left: retried, then completed
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0,
                     observer=observer, maintenance_interval=0.1)
    states = q(database_url, jobs_sql(schema, "SELECT kind, state, attempt FROM {jobs} ORDER BY kind, state"))
    assert states == [("metrics_ok", "completed", 2), ("metrics_ok", "dead", 3), ("metrics_ok", "dead", 3),
                      ("no_such_kind", "dead", 3)]
    fin = "sa_jobs_jobs_finished_total"
    assert _value(reg, "sa_jobs_jobs_rescued_total") == 4
    assert _value(reg, fin, queue=QUEUE, kind="metrics_ok", outcome="dead") == 2
    assert _value(reg, fin, queue=QUEUE, kind="other", outcome="dead") == 1  # labels stay bounded
    assert _value(reg, fin, queue=QUEUE, kind="metrics_ok", outcome="completed") == 1
    # Run time and end-to-end are observed only for attempts a worker ran to their end:
    # the rescue creates no (empty) series of its own for them.
    assert reg.get_sample_value("sa_jobs_job_end_to_end_seconds_count", {"queue": QUEUE, "outcome": "dead"}) is None
    assert reg.get_sample_value("sa_jobs_job_run_duration_seconds_count", {"queue": QUEUE, "kind": "other"}) is None


def test_a_retry_that_ends_dead_on_a_taken_unique_key_counts_as_dead(database_url: str, schema: str, engine: Engine) -> None:
    """A unique job does not hold its key while it runs: another job of the key may be
    enqueued meanwhile, and a failed attempt then cannot go back to retryable. The
    completer ends it dead (Completer._write_superseded), as the rescuer would, but the
    metrics said "retried" and no dead: SaJobsDeadJobsRising missed it."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    with Session(engine) as s, s.begin():
        s.add(MetricsUnique(fail_after=1.0))
    first = jobs_sql(schema, "SELECT state FROM {jobs} WHERE kind = 'metrics_unique' ORDER BY id LIMIT 1")
    enqueued: list[bool] = []

    def done() -> bool:
        state = q(database_url, first)[0][0]
        if not enqueued and state == "running":
            with Session(engine) as s, s.begin():  # while the first runs: its key is free
                s.add(MetricsUnique().options(delay=3600))  # holds it while scheduled
            enqueued.append(True)
        return bool(enqueued) and state not in ("running", "available")

    run_worker_until(database_url, schema, [*KINDS, MetricsUnique], done, observer=observer)
    states = q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs} ORDER BY id"))
    assert states == [("dead", 1), ("scheduled", 0)]
    fin = "sa_jobs_jobs_finished_total"
    assert _value(reg, fin, queue=QUEUE, kind="metrics_unique", outcome="dead") == 1


def test_a_completion_the_fence_refused_is_not_counted_completed(database_url: str, schema: str, engine: Engine) -> None:
    """The runner counted the handler's verdict before the completer wrote it: a completion
    that changed no row (the lease lost, the job re-claimed by another worker) still counted
    in sa_jobs_jobs_finished_total{outcome="completed"}, a job completed twice in the sum of
    the workers' counts. It counts as lease_lost; completed counts rows the worker completed."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    with Session(engine) as s, s.begin():
        s.add_all([MetricsFenced(conninfo=to_conninfo(database_url)), MetricsOk(), MetricsOk()])
    fin = "sa_jobs_jobs_finished_total"

    def counted() -> bool:
        return sum(_value(reg, fin, queue=QUEUE, kind=kind, outcome=outcome) for kind in ("metrics_fenced", "metrics_ok")
                   for outcome in ("completed", "lease_lost")) >= 3

    # No heartbeat during the run: it would find the row taken and cancel the handler first.
    run_worker_until(database_url, schema, [*KINDS, MetricsFenced], counted, observer=observer, lease=30.0,
                     heartbeat_interval=10.0)
    assert q(database_url, jobs_sql(schema, "SELECT kind, state, lease_owner FROM {jobs} ORDER BY id"))[0] == (
        "metrics_fenced", "running", "other:1")
    assert _value(reg, fin, queue=QUEUE, kind="metrics_fenced", outcome="completed") == 0
    assert _value(reg, fin, queue=QUEUE, kind="metrics_fenced", outcome="lease_lost") == 1
    assert _value(reg, fin, queue=QUEUE, kind="metrics_ok", outcome="completed") == 2
    assert _value(reg, "sa_jobs_job_end_to_end_seconds_count", queue=QUEUE, outcome="completed") == 2
    assert _value(reg, "sa_jobs_jobs_in_flight", queue=QUEUE) == 0


def test_end_to_end_counts_every_final_outcome_whatever_the_clocks(database_url: str, schema: str) -> None:
    """created_at is the database's clock, the end the worker's: on a worker whose clock is
    behind (or for a job finished within the skew, milliseconds on a fast queue) the
    difference is negative, and the observation was dropped: the histogram's count fell
    short of the jobs finished. It is observed as 0."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, created_at) VALUES"
                                     " ('metrics_ok', %s, now() + interval '1 minute'), ('metrics_ok', %s, now())"),
      (QUEUE, QUEUE))
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0, observer=observer)
    assert _value(reg, "sa_jobs_jobs_finished_total", queue=QUEUE, kind="metrics_ok", outcome="completed") == 2
    assert _value(reg, "sa_jobs_job_end_to_end_seconds_count", queue=QUEUE, outcome="completed") == 2


def test_pruner_and_periodic_report_exactly_what_they_wrote(database_url: str, schema: str) -> None:
    """Retention and cron are leader-only and silent otherwise: their counters must match
    the rows they deleted and inserted, per state and per declaration."""
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    finished = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, attempt, finished_at)"
                                " SELECT 'metrics_ok', %s, %s, 1, now() - interval '2 hours' FROM generate_series(1, %s)")
    q(database_url, finished, (QUEUE, "completed", 7))
    q(database_url, finished, (QUEUE, "dead", 3))
    q(database_url, finished, (QUEUE, "cancelled", 2))
    hour = dt.timedelta(hours=1)
    pruner = Pruner(completed=hour, dead=hour, cancelled=None, interval=0.2, batch=5)
    every_second = Periodic("* * * * * *", MetricsOk, name="metrics_tick")
    periodic_jobs = jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE unique_key IS NOT NULL AND kind = 'metrics_ok'")
    run_worker_until(database_url, schema, KINDS, lambda: q(database_url, periodic_jobs)[0][0] >= 2,
                     observer=observer, maintenance=[pruner, PeriodicJobs([every_second])], maintenance_interval=0.1)
    left = dict(q(database_url, jobs_sql(schema, "SELECT state, count(*) FROM {jobs} WHERE finished_at < now() - interval '1 hour'"
                                                 " GROUP BY state")))
    assert left == {"cancelled": 2}  # completed and dead pruned; cancelled kept (no age)
    assert _value(reg, "sa_jobs_jobs_pruned_total", state="completed") == 7
    assert _value(reg, "sa_jobs_jobs_pruned_total", state="dead") == 3
    # No age for cancelled rows: the pruner never ran that state, so it has no series.
    assert reg.get_sample_value("sa_jobs_jobs_pruned_total", {"state": "cancelled"}) is None
    fired = q(database_url, periodic_jobs)[0][0]
    assert fired >= 2 and _value(reg, "sa_jobs_periodic_jobs_enqueued_total", periodic="metrics_tick") == fired
    for service in ("pruner", "periodic"):
        assert _value(reg, "sa_jobs_maintenance_duration_seconds_count", service=service) >= 1
    assert _value(reg, "sa_jobs_worker_is_leader") == 0  # dropped when the worker stopped


def test_two_workers_sharing_an_observer_report_the_leader_they_have(database_url: str, schema: str) -> None:
    """Workers of one process may share an observer (docs/metrics.md). The one that is not
    the leader reported "not leader" at each of its ticks: the gauge read 0 while the
    other led, and SaJobsNoLeader fired on a healthy process. It reads 1 while any of
    them leads, and 0 once the leader stopped."""
    from sa_jobs import Worker

    from .helpers import FAST

    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    readings: list[float] = []

    async def main() -> None:
        async with Worker(database_url, kinds=KINDS, schema=schema, observer=observer, **FAST) as first:
            async with Worker(database_url, kinds=KINDS, schema=schema, observer=observer, **FAST) as second:
                workers = (first, second)
                with anyio.fail_after(10):
                    while not any(w.maintainer and w.maintainer.is_leader for w in workers):
                        await anyio.sleep(0.05)
                for _ in range(10):  # many ticks of both maintainers (every 0.1 s)
                    await anyio.sleep(0.1)
                    readings.append(_value(reg, "sa_jobs_worker_is_leader"))
                assert sum(bool(w.maintainer and w.maintainer.is_leader) for w in workers) == 1

    anyio.run(main)
    assert readings == [1.0] * 10
    assert _value(reg, "sa_jobs_worker_is_leader") == 0


def test_observer_without_maintenance_hooks_still_runs_maintenance(database_url: str, schema: str, engine: Engine) -> None:
    """A WorkerObserver written before the maintenance hooks existed keeps working."""
    calls: list[str] = []

    class OldObserver:
        def __getattr__(self, name: str) -> Any:
            if name in MAINTENANCE_HOOKS:
                raise AttributeError(name)
            return lambda *args: calls.append(name)

    with Session(engine) as s, s.begin():
        s.add(MetricsFlaky(fail_times=1))
    run_worker_until(database_url, schema, KINDS, lambda: _unfinished(database_url, schema) == 0, observer=OldObserver())
    # The retry was promoted by the scheduler (which looked for a hook and found none)
    # and the job completed on its second attempt; the observer's other hooks were used.
    assert q(database_url, jobs_sql(schema, "SELECT state, attempt FROM {jobs}")) == [("completed", 2)]
    assert "claimed" in calls and "job_finished" in calls


def test_a_maintenance_hook_that_raises_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def promoted(self, count: int) -> None:
            raise RuntimeError("metrics backend down")

    hook(Broken(), "promoted")(3)  # must not raise into the maintenance loop
    assert "observer hook promoted failed" in caplog.text and "metrics backend down" in caplog.text


def test_observer_unknown_outcome_and_component_map_to_other() -> None:
    reg = CollectorRegistry()
    obs = PrometheusObserver(reg)
    obs.job_finished("q", "metrics_ok", "exploded", 0.1, 1.0)
    obs.loop_error("something-new")
    assert _value(reg, "sa_jobs_jobs_finished_total", queue="q", kind="metrics_ok", outcome="other") == 1
    assert _value(reg, "sa_jobs_worker_loop_errors_total", component="other") == 1
    obs.leader(True)
    assert _value(reg, "sa_jobs_worker_is_leader") == 1
    obs.leader(False)
    assert _value(reg, "sa_jobs_worker_is_leader") == 0


def test_a_job_of_an_unknown_kind_does_not_walk_every_declared_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    """During a rolling deploy a queue fills with a kind this worker has no class for: each
    of its attempts rebuilt the set of every declared kind (about 1 ms per job with 2,000
    kinds, on the event loop that claims and completes). The lookup must stay O(1), and a
    kind declared later must still get its own label."""
    import sa_jobs.model as model

    calls = [0]
    real = model.registered_kinds

    def counting() -> dict[str, Any]:
        calls[0] += 1
        return real()

    monkeypatch.setattr(model, "registered_kinds", counting)
    reg = CollectorRegistry()
    obs = PrometheusObserver(reg)
    for _ in range(1000):
        obs.job_finished("q", "metrics_not_declared_here", "retried", 0.1, 1.0)
    assert _value(reg, "sa_jobs_jobs_finished_total", queue="q", kind="other", outcome="retried") == 1000
    assert calls[0] <= 1, calls[0]

    from sa_jobs import Job

    class MetricsLateKind(Job, kind="metrics_late_kind", queue="q"):  # declared after the observer
        pass

    obs.job_finished("q", "metrics_late_kind", "completed", 0.1, 1.0)
    assert _value(reg, "sa_jobs_jobs_finished_total", queue="q", kind="metrics_late_kind", outcome="completed") == 1
    obs.job_finished("q", "Job", "completed", 0.1, 1.0)  # the base class maps no kind
    assert _value(reg, "sa_jobs_jobs_finished_total", queue="q", kind="other", outcome="completed") == 1


# ---- queue depth ---------------------------------------------------------------------

def _seed_depth(database_url: str, schema: str) -> None:
    sql_rows = [
        "INSERT INTO {jobs} (kind, queue, scheduled_at) VALUES ('k1', 'q1', now() - interval '100 seconds'),"
        " ('k1', 'q1', now()), ('k2', 'q1', now())",
        "INSERT INTO {jobs} (kind, queue, state, scheduled_at) VALUES ('k1', 'q2', 'scheduled', now() + interval '1 hour'),"
        " ('k1', 'q2', 'scheduled', now() + interval '1 hour'), ('k2', 'q2', 'retryable', now() + interval '1 hour')",
        "INSERT INTO {jobs} (kind, queue, state, claim_token, lease_expires_at, attempt)"
        " VALUES ('k1', 'q1', 'running', gen_random_uuid(), now() + interval '1 minute', 1)",
        "INSERT INTO {jobs} (kind, queue, state, finished_at) SELECT 'k' || (i %% 3), 'q2', 'dead', now()"
        " FROM generate_series(1, 4) i",
        "INSERT INTO {jobs} (kind, queue, state, finished_at) SELECT 'k1', 'q1', 'completed', now()"
        " FROM generate_series(1, 5) i",
    ]
    for stmt in sql_rows:
        q(database_url, jobs_sql(schema, stmt), ())


def _depth(collector: QueueDepthCollector) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for family in collector.collect():
        for s in family.samples:
            out[(s.name, *(s.labels[k] for k in sorted(s.labels)))] = s.value
    return out


def test_depth_counts_live_states_and_oldest_age_with_ttl(database_url: str, schema: str) -> None:
    _seed_depth(database_url, schema)
    now = [1000.0]
    collector = QueueDepthCollector(database_url, schema, ttl=30, clock=lambda: now[0])
    try:
        d = _depth(collector)
        n = "sa_jobs_queue_jobs"
        assert d[(n, "q1", "available")] == 3
        assert d[(n, "q1", "running")] == 1
        assert d[(n, "q2", "scheduled")] == 2
        assert d[(n, "q2", "retryable")] == 1
        assert d[(n, "q2", "dead")] == 4
        assert d[(n, "q2", "available")] == 0  # every (known queue, state) pair is present
        assert not any(k[0] == n and k[2] in ("completed", "cancelled") for k in d)
        assert 99 <= d[("sa_jobs_queue_oldest_available_age_seconds", "q1")] < 130
        assert d[("sa_jobs_queue_oldest_available_age_seconds", "q2")] == 0
        assert collector.queries == 1
        # Within the TTL a scrape is served from the snapshot, without a query.
        q(database_url, jobs_sql(schema, "DELETE FROM {jobs} WHERE queue = 'q1'"))
        now[0] += 29
        assert _depth(collector)[(n, "q1", "available")] == 3 and collector.queries == 1
        assert _depth(collector)[("sa_jobs_queue_depth_snapshot_age_seconds",)] == 29
        # After it, a drained queue reports zeros rather than vanishing.
        now[0] += 2
        d = _depth(collector)
        assert collector.queries == 2
        assert all(d[(n, "q1", state)] == 0 for state in DEPTH_STATES)
        assert d[("sa_jobs_queue_oldest_available_age_seconds", "q1")] == 0
    finally:
        collector.close()


def test_depth_reports_paused_queues_so_the_waiting_alert_can_leave_them_out(database_url: str, schema: str) -> None:
    """A queue paused on purpose (``sa-jobs queues pause``) keeps its due jobs waiting, and
    SaJobsOldestAvailableJobTooOld paged for it ("workers down, saturated or stuck"): no
    metric said the queue was paused. ``sa_jobs_queue_paused`` does, per known queue."""
    _seed_depth(database_url, schema)
    queues = sql.Identifier(schema, "queues")
    q(database_url, sql.SQL("INSERT INTO {} (name, paused) VALUES ('q1', true), ('q3', true), ('q4', false)").format(queues))
    now = [0.0]
    collector = QueueDepthCollector(database_url, schema, ttl=5, clock=lambda: now[0])
    try:
        d = _depth(collector)
        assert d[("sa_jobs_queue_paused", "q1")] == 1
        assert d[("sa_jobs_queue_paused", "q2")] == 0
        assert d[("sa_jobs_queue_paused", "q3")] == 1  # paused before its first job
        assert d[("sa_jobs_queue_jobs", "q1", "available")] == 3  # the jobs still count
        q(database_url, sql.SQL("UPDATE {} SET paused = false WHERE name = 'q1'").format(queues))
        now[0] += 10
        d = _depth(collector)
        assert d[("sa_jobs_queue_paused", "q1")] == 0 and d[("sa_jobs_queue_paused", "q3")] == 1
    finally:
        collector.close()


def test_depth_forgets_a_queue_with_no_rows_and_no_settings_row(database_url: str, schema: str) -> None:
    """A queue once seen reported zeros for ever, after its last row was pruned or deleted
    too: an app that names queues per tenant or per run grew /metrics (five series a queue)
    without bound. A queue with no live or dead row and no queues-table row keeps reporting
    zeros for ``forget_after`` (dashboards and delta() see it drain to 0), then its series
    go. A queue with a settings row (paused or not: limits, a resume) is known: it stays."""
    _seed_depth(database_url, schema)
    queues = sql.Identifier(schema, "queues")
    q(database_url, sql.SQL("INSERT INTO {} (name, paused) VALUES ('q1', false), ('q4', false)").format(queues))
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) SELECT 'k1', 'tenant-' || i"
                                     " FROM generate_series(1, 3) i"))
    now = [0.0]
    collector = QueueDepthCollector(database_url, schema, ttl=5, forget_after=60, clock=lambda: now[0])

    def queues_reported() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for family in collector.collect():
            for s in family.samples:
                if "queue" in s.labels:
                    found.setdefault(s.name, set()).add(s.labels["queue"])
        return found

    tenants = {"tenant-1", "tenant-2", "tenant-3"}
    try:
        assert all(names == {"q1", "q2", "q4"} | tenants for names in queues_reported().values()), queues_reported()
        # Every row of q1, q2 (dead ones too) and the tenants' goes: q1 and q4 have settings rows.
        q(database_url, jobs_sql(schema, "DELETE FROM {jobs}"))
        now[0] += 10
        d = _depth(collector)
        assert all(d[("sa_jobs_queue_jobs", name, state)] == 0 for name in tenants | {"q2"} for state in DEPTH_STATES)
        now[0] += 55  # 65 s since the tenants' rows were last seen
        assert all(names == {"q1", "q4"} for names in queues_reported().values()), queues_reported()
        # A forgotten queue that gets a job again is reported again.
        q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) VALUES ('k1', 'tenant-2')"))
        now[0] += 10
        assert all(names == {"q1", "q4", "tenant-2"} for names in queues_reported().values()), queues_reported()
        assert _depth(collector)[("sa_jobs_queue_jobs", "tenant-2", "available")] == 1
    finally:
        collector.close()


def test_depth_query_reads_indexes_not_history(database_url: str, schema: str) -> None:
    """50k completed rows must not be visited: no sequential scan, few buffers."""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, finished_at)"
                                     " SELECT 'k' || (i %% 7), 'q', 'completed', now() FROM generate_series(1, 50000) i"), ())
    _seed_depth(database_url, schema)
    q(database_url, jobs_sql(schema, "VACUUM ANALYZE {jobs}"))
    plan = q(database_url, "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + depth_query(schema))[0][0][0]

    def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    all_nodes = list(nodes(plan["Plan"]))
    # The queues table holds a row per queue given a pause or limits: reading it all is fine.
    assert not [n for n in all_nodes if n["Node Type"] == "Seq Scan" and n.get("Relation Name") != "queues"], \
        json.dumps(plan)[:2000]
    table_pages = q(database_url, "SELECT relpages FROM pg_class WHERE oid = %s::regclass",
                    (f'"{schema}".jobs',))[0][0]
    touched = plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]
    assert touched < 150 < table_pages, (touched, table_pages)


def test_depth_on_a_million_row_table_is_exact_indexed_and_bounded(database_url: str, schema: str) -> None:
    """1,000,000 rows: 900,000 completed (history) and a backlog of 100,000 available. A
    scrape counts the backlog exactly, from the claim index (no sequential scan of the
    table), in well under its 2 s timeout; under a timeout too short for it, the scrape
    still answers at once, with the error counter moved and no made-up numbers."""
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, scheduled_at, finished_at)"
                                     " SELECT 'k' || (i %% 20), 'q' || (i %% 4),"
                                     " CASE WHEN i %% 10 = 0 THEN 'available' ELSE 'completed' END,"
                                     " now() - interval '1 minute', CASE WHEN i %% 10 = 0 THEN NULL ELSE now() END"
                                     " FROM generate_series(1, 1000000) i"), ())
    q(database_url, jobs_sql(schema, "VACUUM ANALYZE {jobs}"))
    plan = q(database_url, "EXPLAIN (FORMAT JSON) " + depth_query(schema))[0][0][0]

    def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield node
        for child in node.get("Plans", []):
            yield from nodes(child)

    scans = [n for n in nodes(plan["Plan"]) if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == "jobs"]
    assert not scans, json.dumps(plan)[:2000]
    collector = QueueDepthCollector(database_url, schema)
    try:
        started = time.monotonic()
        d = _depth(collector)
        took = time.monotonic() - started
        assert sum(d.get(("sa_jobs_queue_jobs", f"q{i}", "available"), 0) for i in range(4)) == 100_000
        assert d[("sa_jobs_queue_depth_query_errors_total",)] == 0
        assert took < 1.0, took
    finally:
        collector.close()
    hurried = QueueDepthCollector(database_url, schema, statement_timeout=0.001)
    try:
        started = time.monotonic()
        d = _depth(hurried)
        assert time.monotonic() - started < 1.0
        assert d[("sa_jobs_queue_depth_query_errors_total",)] == 1
        assert not any(k[0] == "sa_jobs_queue_jobs" for k in d)  # no snapshot yet: no made-up zeros
    finally:
        hurried.close()


def test_depth_scrape_answers_when_the_database_does_not(database_url: str, schema: str) -> None:
    _seed_depth(database_url, schema)
    now = [0.0]
    collector = QueueDepthCollector(database_url, schema, ttl=5, statement_timeout=0.3, clock=lambda: now[0])
    try:
        assert _depth(collector)[("sa_jobs_queue_jobs", "q1", "available")] == 3
        with psycopg.connect(to_conninfo(database_url)) as locker:
            locker.execute(jobs_sql(schema, "LOCK TABLE {jobs} IN ACCESS EXCLUSIVE MODE"))
            now[0] += 10
            started = time.monotonic()
            d = _depth(collector)
            assert time.monotonic() - started < 2.0
            locker.rollback()
        assert d[("sa_jobs_queue_jobs", "q1", "available")] == 3  # the previous snapshot
        assert d[("sa_jobs_queue_depth_query_errors_total",)] == 1
        now[0] += 10
        d = _depth(collector)  # reconnects and recovers
        assert d[("sa_jobs_queue_depth_query_errors_total",)] == 1
        assert d[("sa_jobs_queue_depth_snapshot_age_seconds",)] == 0
    finally:
        collector.close()


def test_depth_query_is_never_prepared_on_the_server(database_url: str, schema: str) -> None:
    """psycopg prepares a statement on the server from its fifth run on a connection. Behind a
    transaction-mode pooler without prepared-statement support (PgBouncer before 1.21, or
    ``max_prepared_statements = 0``) the sixth scrape then ran on a server connection that
    never saw the PREPARE and failed every scrape after it."""
    _seed_depth(database_url, schema)
    now = [0.0]
    collector = QueueDepthCollector(database_url, schema, ttl=5, clock=lambda: now[0])
    try:
        for _ in range(8):
            now[0] += 10
            assert _depth(collector)[("sa_jobs_queue_jobs", "q1", "available")] == 3
        assert collector.queries == 8
        assert collector._conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
    finally:
        collector.close()


def test_depth_settings_are_scoped_to_the_query_s_transaction(database_url: str, schema: str) -> None:
    """Behind a transaction-mode pooler (PgBouncer) a session-level ``SET`` stays on the
    server connection after the pooler hands it to another client: the collector's 2 s
    timeouts and read-only mode leaked into the application's sessions. The settings
    must hold inside the depth query's transaction, and the session be left at defaults."""
    _seed_depth(database_url, schema)
    now = [0.0]
    collector = QueueDepthCollector(database_url, schema, ttl=5, statement_timeout=0.3, clock=lambda: now[0])
    try:
        assert _depth(collector)[("sa_jobs_queue_jobs", "q1", "available")] == 3
        conn = collector._conn
        defaults = q(database_url, "SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                                   " current_setting('default_transaction_read_only')")[0]
        after = conn.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                             " current_setting('default_transaction_read_only'),"
                             " current_setting('transaction_read_only')").fetchone()
        assert after == (*defaults, "off")
        # Inside the query's own transaction the settings apply: read-only, 300 ms.
        collector._query = ("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'),"
                            " current_setting('transaction_read_only'), 0")
        assert collector._rows() == [("300ms", "300ms", "on", 0)]
        collector._query = jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) VALUES ('k1', 'q1')")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            collector._rows()
        collector._query = depth_query(schema)
        # The server's timeout (not the client's deadline, 1 s later) ends a wait on a lock.
        with psycopg.connect(to_conninfo(database_url)) as locker:
            locker.execute(jobs_sql(schema, "LOCK TABLE {jobs} IN ACCESS EXCLUSIVE MODE"))
            now[0] += 10
            started = time.monotonic()
            d = _depth(collector)
            assert time.monotonic() - started < 1.0 and not collector._aborted
            locker.rollback()
        assert d[("sa_jobs_queue_depth_query_errors_total",)] == 1
    finally:
        collector.close()


def test_depth_query_reconnects_at_once_when_the_server_closed_its_idle_connection(database_url: str, schema: str) -> None:
    """The collector keeps one connection idle between queries. One the server ended
    meanwhile (a restart or failover, idle_session_timeout, a pooler or an operator
    closing idle sessions) failed the next scrape's query: an error counted, a stale
    snapshot served for another TTL, though the database answered all along."""
    _seed_depth(database_url, schema)
    now = [0.0]
    collector = QueueDepthCollector(database_url, schema, ttl=5, clock=lambda: now[0])
    try:
        assert _depth(collector)[("sa_jobs_queue_jobs", "q1", "available")] == 3
        pid = collector._conn.info.backend_pid
        q(database_url, "SELECT pg_terminate_backend(%s)", (pid,))
        assert wait_for(lambda: not q(database_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)), 10)
        q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) VALUES ('k1', 'q1')"))
        now[0] += 10
        d = _depth(collector)
        assert d[("sa_jobs_queue_depth_query_errors_total",)] == 0
        assert d[("sa_jobs_queue_jobs", "q1", "available")] == 4
        assert d[("sa_jobs_queue_depth_snapshot_age_seconds",)] == 0
    finally:
        collector.close()


def test_depth_snapshot_age_keeps_growing_while_the_query_fails(database_url: str, schema: str) -> None:
    """The age is the staleness alert's signal: a failed query keeps the old snapshot, and
    its age must count from when that snapshot was taken, not from the failed attempt."""
    _seed_depth(database_url, schema)
    now = [0.0]
    collector = QueueDepthCollector(database_url, schema, ttl=5, statement_timeout=0.3, clock=lambda: now[0])
    age = ("sa_jobs_queue_depth_snapshot_age_seconds",)
    try:
        assert _depth(collector)[age] == 0
        with psycopg.connect(to_conninfo(database_url)) as locker:
            locker.execute(jobs_sql(schema, "LOCK TABLE {jobs} IN ACCESS EXCLUSIVE MODE"))
            now[0] += 10
            d = _depth(collector)
            assert d[("sa_jobs_queue_depth_query_errors_total",)] == 1 and d[age] == 10
            now[0] += 2  # within the back-off: no new query, the age still grows
            assert _depth(collector)[age] == 12 and collector.queries == 2
            now[0] += 8
            d = _depth(collector)
            assert d[("sa_jobs_queue_depth_query_errors_total",)] == 2 and d[age] == 20
            locker.rollback()
        now[0] += 10
        d = _depth(collector)
        assert d[age] == 0 and d[("sa_jobs_queue_depth_query_errors_total",)] == 2
    finally:
        collector.close()


# ---- serving -------------------------------------------------------------------------

def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def test_metrics_server_serves_worker_and_depth_on_loopback(database_url: str, schema: str, engine: Engine) -> None:
    server = start_metrics_server(0, database_url=database_url, schema=schema, depth_ttl=0.01)
    try:
        assert server.port > 0 and server._server.server_address[0] == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        _run_mix(database_url, schema, engine, server.observer)
        text = _get(server.url)
        assert 'sa_jobs_jobs_finished_total{kind="metrics_ok",outcome="completed",queue="metrics"} 5.0' in text
        assert 'sa_jobs_queue_jobs{queue="metrics",state="dead"} 3.0' in text  # 2 doomed + 1 timed out
        assert "process_resident_memory_bytes" in text
        _promtool_lint(text)
    finally:
        server.close()
    with pytest.raises(OSError):
        _get(server.url)


def test_a_closed_metrics_server_leaves_the_callers_registry_as_it_was(database_url: str, schema: str) -> None:
    """close() undoes start_metrics_server in a registry the caller passed (and may serve
    elsewhere): its depth collector, left registered, opened a new connection at the
    next collect of that registry that nothing would close, and a new server on the
    same registry (an app restarting its metrics) failed with prometheus-client's
    ValueError (duplicated timeseries)."""
    registry = CollectorRegistry()
    for _ in range(2):
        server = start_metrics_server(0, registry=registry, database_url=database_url, schema=schema, depth_ttl=0.01)
        assert "sa_jobs_queue_jobs" in _get(server.url)
        depth = server.depth
        assert depth is not None and depth._conn is not None
        server.close()
        assert depth._conn is None
        text = generate_latest(registry).decode()
        assert depth._conn is None, "the closed collector opened a connection"
        assert "sa_jobs_" not in text, text
    assert generate_latest(registry) == b""


def test_a_metrics_port_in_use_is_a_clear_error(database_url: str, schema: str) -> None:
    """A typed error naming the address (the CLI prints it as one line), not an OSError
    traceback; the depth collector it had registered is taken back out."""
    taken = start_metrics_server(0)
    registry = CollectorRegistry()
    try:
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{taken.port}"):
            start_metrics_server(taken.port, database_url=database_url, schema=schema, registry=registry)
        assert "sa_jobs_queue_jobs" not in generate_latest(registry).decode()
        proc = subprocess.run(
            [*worker_command(database_url, schema, "tests.metrics_jobs"), "--metrics-port", str(taken.port)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"sa-jobs: cannot serve metrics on 127.0.0.1:{taken.port}: Address already in use"], proc.stderr
    finally:
        taken.close()


def test_a_failed_metrics_server_leaves_the_registry_as_it_was() -> None:
    """A bind that fails (port taken, or no port at all) must not leave the observer's
    metrics behind in the caller's registry: the retry on another port found them there
    and failed with prometheus-client's "Duplicated timeseries"."""
    taken = start_metrics_server(0)
    registry = CollectorRegistry()
    try:
        for port in (taken.port, 70000):
            with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
                start_metrics_server(port, registry=registry)
            assert generate_latest(registry) == b""
        server = start_metrics_server(0, registry=registry)
        server.close()
    finally:
        taken.close()


def test_a_metrics_server_serves_the_observer_already_in_the_callers_registry(database_url: str, schema: str) -> None:
    """An app that made its PrometheusObserver(registry) first (as docs/metrics.md shows)
    and then served that registry with start_metrics_server got "this registry has an
    sa-jobs PrometheusObserver already: share that one", which it was doing. The server
    serves that observer, and close() leaves it registered: it is the caller's."""
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    for _ in range(2):
        server = start_metrics_server(0, registry=registry, database_url=database_url, schema=schema)
        try:
            assert server.observer is observer
            observer.claimed("q", 1, 0.01)
            assert 'sa_jobs_jobs_claimed_total{queue="q"}' in _get(server.url)
        finally:
            server.close()
        text = generate_latest(registry).decode()
        assert "sa_jobs_jobs_claimed_total" in text and "sa_jobs_queue_jobs" not in text
    assert _value(registry, "sa_jobs_jobs_claimed_total", queue="q") == 2


def test_a_second_depth_collector_on_one_registry_is_a_clear_error_that_leaves_it_as_it_was(
        database_url: str, schema: str) -> None:
    """A registry with a depth collector already (a second schema's, an app factory run
    twice on one registry): make_asgi_app and start_metrics_server failed with
    prometheus-client's bare "Duplicated timeseries", and start_metrics_server left its
    observer behind in the caller's registry, so the retry failed on that instead."""
    registry = CollectorRegistry()
    mine = QueueDepthCollector(database_url, schema)
    registry.register(mine)
    try:
        with pytest.raises(ConfigurationError, match="queue depth collector already"):
            start_metrics_server(0, registry=registry, database_url=database_url, schema=schema)
        with pytest.raises(ConfigurationError, match="queue depth collector already"):
            make_asgi_app(registry, database_url=database_url, schema=schema)
        registry.unregister(mine)
        assert generate_latest(registry) == b"", "a failed server left metrics in the registry"
        server = start_metrics_server(0, registry=registry, database_url=database_url, schema=schema)
        server.close()
    finally:
        mine.close()


def test_a_second_observer_on_one_registry_and_a_nan_ttl_are_configuration_errors(
        monkeypatch: pytest.MonkeyPatch, database_url: str, schema: str) -> None:
    """A second PrometheusObserver on a registry failed with prometheus-client's plain
    ValueError; a collector with a NaN TTL (no clock passes it) never queried; "0.0" in
    the environment was refused where "0" turned the depth query off."""
    from sa_jobs.metrics import _depth_ttl_from_env

    registry = CollectorRegistry()
    PrometheusObserver(registry)
    with pytest.raises(ConfigurationError, match="PrometheusObserver already"):
        PrometheusObserver(registry)
    for bad in (float("nan"), 0, -1.0, float("inf")):
        with pytest.raises(ConfigurationError, match="ttl must be a positive number"):
            QueueDepthCollector(database_url, schema, ttl=bad)
    for off in ("0", "0.0", "off"):
        monkeypatch.setenv("SA_JOBS_METRICS_DEPTH_TTL", off)
        assert _depth_ttl_from_env() is None
    monkeypatch.setenv("SA_JOBS_METRICS_DEPTH_TTL", "2.5")
    assert _depth_ttl_from_env() == 2.5


@pytest.mark.parametrize("ttl", ["abc", "-1", "nan", "10s", "\uff15", "1_0"])
def test_a_bad_depth_ttl_in_the_environment_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                        database_url: str, schema: str, ttl: str) -> None:
    from sa_jobs import cli

    monkeypatch.setenv("SA_JOBS_METRICS_DEPTH_TTL", ttl)
    code = cli.main(["worker", "tests.metrics_jobs", "--metrics-port", "0", "--database-url", database_url,
                     "--schema", schema])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("sa-jobs: SA_JOBS_METRICS_DEPTH_TTL must be") and "Traceback" not in err, err


def test_user_registry_and_asgi_app(database_url: str, schema: str) -> None:
    reg = CollectorRegistry()
    observer = PrometheusObserver(reg)
    observer.job_finished(QUEUE, "metrics_ok", "completed", 0.01, 0.02)
    app = make_asgi_app(reg, database_url=database_url, schema=schema)
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) VALUES ('metrics_ok', 'asgi_q')"))
    sent: list[dict[str, Any]] = []

    async def call() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}
        await app(scope, receive, send)

    anyio.run(call)
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert 'sa_jobs_jobs_finished_total{kind="metrics_ok",outcome="completed",queue="metrics"} 1.0' in body
    assert 'sa_jobs_queue_jobs{queue="asgi_q",state="available"} 1.0' in body
    assert "process_cpu_seconds_total" not in body  # only what the user's registry holds


def test_an_asgi_scrape_does_not_block_the_event_loop_on_the_depth_query(database_url: str, schema: str) -> None:
    """The ASGI app runs on the app's event loop, which also runs the Worker embedded
    beside it (the setup docs/metrics.md shows). prometheus-client's app collects
    synchronously, so a due depth query ran on that loop: while a migration's lock held the
    jobs table, every scrape past the TTL froze the loop (heartbeats, completions, the web
    app's requests) for the 2 s lock_timeout. The query now runs in a thread."""
    reg = CollectorRegistry()
    PrometheusObserver(reg)
    app = make_asgi_app(reg, database_url=database_url, schema=schema)
    sent: list[dict[str, Any]] = []

    async def scrape() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app({"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}, receive, send)

    async def main() -> float:
        gaps = [0.0]
        done = anyio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await anyio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            while len(gaps) < 3:  # the ticker is running
                await anyio.sleep(0.01)
            await scrape()
            done.set()
        return max(gaps)

    with psycopg.connect(to_conninfo(database_url)) as locker:  # a migration holding the table
        locker.execute(jobs_sql(schema, "LOCK TABLE {jobs} IN ACCESS EXCLUSIVE MODE"))
        longest = anyio.run(main)
        locker.rollback()
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:]).decode()
    assert "sa_jobs_queue_depth_query_errors_total 1.0" in body  # the query ran, and hit the lock
    assert longest < 1.0, f"the event loop stood still for {longest:.2f}s during a scrape"


def test_an_asgi_scrape_at_the_ttl_boundary_does_not_query_on_the_event_loop(database_url: str, schema: str) -> None:
    """The thread looked at the snapshot a moment before the collect on the loop did: a
    scrape that came just under the TTL (a scrape interval equal to the TTL, or dividing
    it: Prometheus scrapes on the dot) found it fresh in the thread and stale in the
    collect, which then ran the query on the event loop all the same. The clock here moves
    by 2 ms between the thread's look and the collect's."""
    reg = CollectorRegistry()
    app = make_asgi_app(reg, database_url=database_url, schema=schema, depth_ttl=10.0)
    [depth] = [c for c in reg._collector_to_names if isinstance(c, QueueDepthCollector)]
    now = {"t": 100.0}
    loop_thread: list[int] = []
    depth._clock = lambda: now["t"] + (0.002 if threading.get_ident() in loop_thread else 0.0)
    refreshed_on: list[int] = []
    refresh = depth.refresh
    depth.refresh = lambda: (refreshed_on.append(threading.get_ident()), refresh())[1]  # type: ignore[method-assign]

    async def scrape() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        loop_thread[:] = [threading.get_ident()]
        await app({"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": []}, receive, send)

    anyio.run(scrape)  # the first: the snapshot is taken (in a thread)
    assert len(refreshed_on) == 1
    now["t"] += 10.0 - 0.001  # the next scrape, a millisecond under the TTL in the thread
    anyio.run(scrape)
    assert loop_thread[0] not in refreshed_on, "the depth query ran on the event loop"


def test_scrapes_are_thread_safe_under_concurrency(database_url: str, schema: str) -> None:
    """Prometheus HTTP handlers run in threads; concurrent scrapes share one query per TTL."""
    collector = QueueDepthCollector(database_url, schema, ttl=60)
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            for _ in range(20):
                list(collector.collect())
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    collector.close()
    assert not errors and collector.queries == 1


# ---- promtool: metrics lint, alert rules, dashboard PromQL ------------------------------

def _promtool_lint(text: str) -> None:
    if shutil.which("promtool") is None:
        return
    proc = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (proc.stdout, proc.stderr)


@needs_promtool
def test_alert_rules_are_valid(tmp_path: Path) -> None:
    proc = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _strip_annotations(text: str) -> str:
    """promtool compares annotations exactly; the tests are about when alerts fire."""
    out: list[str] = []
    skip_deeper_than: int | None = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (not line.strip() or indent > skip_deeper_than):
            continue
        skip_deeper_than = None
        if line.strip() == "annotations:":
            skip_deeper_than = indent
            continue
        out.append(line)
    return "\n".join(out) + "\n"


@needs_promtool
def test_alert_rules_fire_on_the_conditions_they_describe(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on a synthetic series and not before."""
    rules = tmp_path / "alerts_without_annotations.yml"
    rules.write_text(_strip_annotations(ALERTS.read_text()))
    tests = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'sa_jobs_jobs_finished_total{job="w",instance="a",queue="q",kind="k",outcome="dead"}',
                 "values": "0 0 0 0 0 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"},
                {"series": 'sa_jobs_queue_oldest_available_age_seconds{job="w",instance="a",queue="q"}',
                 "values": "0x10 900x20"},
                # Paused on purpose: its jobs wait, and that is no alert.
                {"series": 'sa_jobs_queue_oldest_available_age_seconds{job="w",instance="a",queue="paused"}',
                 "values": "0x10 900x20"},
                {"series": 'sa_jobs_queue_paused{job="w",instance="a",queue="paused"}', "values": "1x30"},
                {"series": 'sa_jobs_queue_paused{job="w",instance="a",queue="q"}', "values": "0x30"},
                {"series": 'sa_jobs_worker_heartbeat_age_seconds{job="w",instance="a"}', "values": "1x10 200x20"},
                {"series": 'sa_jobs_worker_is_leader{job="w",instance="a"}', "values": "1x10 0x20"},
                {"series": 'sa_jobs_queue_jobs{job="w",instance="a",queue="q",state="dead"}',
                 "values": "0 0 0 0 0 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20"},
                {"series": 'up{job="sa-jobs",instance="a"}', "values": "1x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "SaJobsDeadJobsRising", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "SaJobsDeadJobsRising",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "queue": "q", "kind": "k"}}]},
                {"eval_time": "5m", "alertname": "SaJobsOldestAvailableJobTooOld", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "SaJobsOldestAvailableJobTooOld",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "queue": "q"}}]},
                {"eval_time": "5m", "alertname": "SaJobsNoHeartbeat", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "SaJobsNoHeartbeat",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "w", "instance": "a"}}]},
                {"eval_time": "5m", "alertname": "SaJobsNoLeader", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "SaJobsNoLeader",
                 "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "w"}}]},
                {"eval_time": "5m", "alertname": "SaJobsDeadLetterGrowing", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "SaJobsDeadLetterGrowing",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "queue": "q"}}]},
                {"eval_time": "25m", "alertname": "SaJobsWorkerDown", "exp_alerts": []},
            ],
        }],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(json.dumps(tests))  # JSON is YAML
    proc = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _dashboard_exprs() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", []) if t.get("expr")]
    for var in board.get("templating", {}).get("list", []):
        if var.get("query") and isinstance(var["query"], str):
            inner = re.search(r"label_values\((.*),\s*\w+\)$", var["query"])
            if inner:
                exprs.append(inner.group(1))
    return exprs


def _exposed_names(database_url: str, schema: str) -> set[str]:
    reg = CollectorRegistry()
    obs = PrometheusObserver(reg)
    reg.register(QueueDepthCollector(database_url, schema))
    obs.claimed("q", 1, 0.01)
    obs.job_started("q", "metrics_ok", 0.1)
    for outcome in ("completed", "dead", "retried"):
        obs.job_finished("q", "metrics_ok", outcome, 0.1, 0.2)
    obs.slots("q", 1, 2)
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue) VALUES ('k', 'q')"))
    return {s.name for f in reg.collect() for s in f.samples}


@needs_promtool
def test_dashboard_queries_parse_and_use_only_real_metrics(database_url: str, schema: str, tmp_path: Path) -> None:
    exprs = _dashboard_exprs()
    assert len(exprs) >= 6
    names = _exposed_names(database_url, schema)
    for expr in exprs:
        used = set(re.findall(r"\bsa_jobs_[a-z_]+", expr))
        assert used and used <= names, (expr, used - names)
    # Grafana variables replaced by valid PromQL, then parsed by promtool as recording rules.
    concrete = [e.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$queue", ".*")
                .replace("$kind", ".*") for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(concrete)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
