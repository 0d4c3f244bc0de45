"""Cluster-wide queue limits: concurrency, per-partition concurrency and rate, enforced
by the claim of every worker process; local pause of one worker.

Handlers keep a gauge (tests/jobs_limits.py) of how many of them run at once, so the
peaks checked here are what really ran concurrently across processes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time

import anyio
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.orm import Session

from sa_jobs import ConfigurationError, QueueLimits, Worker, enqueue_many, queue_limits, set_queue_limits
from sa_jobs._url import to_conninfo
from sa_jobs.admin import parse_rate, queue_overview
from sa_jobs.errors import InvalidArgsError

from .conftest import REPO_ROOT, start_worker_process
from .helpers import FAST, jobs_sql, q, states, wait_for
from .jobs_limits import CustomerWork, LimitedWork, RatedWork, TxWork, gauge_ddl
from .test_processes import output, stop

PROCESS_FAST = ["--lease", "5", "--maintenance-interval", "0.2", "--poll-interval", "0.2"]


@pytest.fixture
def gauge(database_url, schema):
    q(database_url, gauge_ddl(schema))
    os.environ["SA_JOBS_DATABASE_URL"] = database_url


def peaks(database_url: str, schema: str) -> dict[str, int]:
    return dict(q(database_url, jobs_sql(schema, "SELECT key, peak FROM {jobs}").as_string().replace(
        f'"{schema}"."jobs"', f'"{schema}"."gauge"')))


def limit(engine, queue: str, limits: QueueLimits) -> None:
    with Session(engine) as session, session.begin():
        set_queue_limits(session, queue, limits)


def drain_with_processes(database_url: str, schema: str, total: int, processes: int, concurrency: int, timeout: float = 90) -> None:
    procs = [start_worker_process(database_url, schema, "tests.jobs_limits", "--concurrency", str(concurrency), *PROCESS_FAST)
             for _ in range(processes)]
    try:
        assert wait_for(lambda: states(database_url, schema) == {"completed": total}, timeout, 0.2), states(database_url, schema)
    finally:
        codes = stop(procs)
    assert codes == [0] * processes, [output(p) for p in procs]


def test_queue_concurrency_holds_across_worker_processes(engine, database_url, schema, gauge):
    limit(engine, "lim", QueueLimits(concurrency=3))
    with Session(engine) as session, session.begin():
        session.add_all([LimitedWork(seconds=0.15, i=i) for i in range(30)])
    drain_with_processes(database_url, schema, 30, processes=3, concurrency=4)  # 12 local slots
    # Never above the limit, and the limit is used, not undercut.
    assert peaks(database_url, schema)["*"] == 3
    assert q(database_url, jobs_sql(schema, "SELECT max(attempt) FROM {jobs}")) == [(1,)]


def test_a_queue_limit_above_each_batch_holds_while_claims_go_by_the_running_bound(engine, database_url, schema, gauge):
    """Schema v16: a claim whose queue's running bound plus its batch fits under the limit
    takes its batch without counting the running jobs. With a limit of 10 and three
    processes of 4 slots, the first claims go by the bound (0, then 4, ...) and the later
    ones count: the queue never runs more than 10 jobs, and runs 10."""
    limit(engine, "lim", QueueLimits(concurrency=10))
    # Set a minute ago: claims within a second of a change count (a raced plain claim).
    q(database_url, sql.SQL("UPDATE {} SET updated_at = now() - interval '1 minute'").format(
        sql.Identifier(schema, "queues")))
    with Session(engine) as session, session.begin():
        session.add_all([LimitedWork(seconds=0.15, i=i) for i in range(60)])
    drain_with_processes(database_url, schema, 60, processes=3, concurrency=4)  # 12 local slots
    assert peaks(database_url, schema)["*"] == 10
    assert q(database_url, jobs_sql(schema, "SELECT max(attempt) FROM {jobs}")) == [(1,)]


def test_setting_limits_forgets_the_queues_running_bound(engine, database_url, schema):
    """The bound (v16) is kept only by limited claims: a queue's plain claims, before it
    was limited, kept none, so a new limit makes the next claim count."""
    limit(engine, "bounded", QueueLimits(concurrency=5))
    bound = sql.SQL("SELECT running_bound FROM {} WHERE name = 'bounded'").format(sql.Identifier(schema, "queues"))
    q(database_url, sql.SQL("UPDATE {} SET running_bound = 3, running_counted_at = now()").format(
        sql.Identifier(schema, "queues")))
    assert q(database_url, bound) == [(3,)]
    limit(engine, "bounded", QueueLimits(concurrency=6))
    assert q(database_url, bound) == [(None,)]


def test_partition_concurrency_limits_each_key_and_does_not_starve_other_keys(engine, database_url, schema, gauge):
    limit(engine, "limp", QueueLimits(partition_concurrency=2))
    with Session(engine) as session, session.begin():
        # One customer floods the queue first; four others come after it.
        enqueue_many(session, CustomerWork, [{"customer": "flood", "seconds": 0.05, "i": i} for i in range(120)])
        enqueue_many(session, CustomerWork, [{"customer": f"c{k}", "seconds": 0.05, "i": i}
                                             for i in range(6) for k in range(4)])
    procs = [start_worker_process(database_url, schema, "tests.jobs_limits", "--concurrency", "8", *PROCESS_FAST)
             for _ in range(2)]
    others_done = ("SELECT count(*) FILTER (WHERE state = 'completed' AND partition_key <> '\"flood\"'),"
                   " count(*) FILTER (WHERE state = 'completed' AND partition_key = '\"flood\"') FROM {jobs}")
    try:
        assert wait_for(lambda: q(database_url, jobs_sql(schema, others_done))[0][0] == 24, 60, 0.05)
        flood_done = q(database_url, jobs_sql(schema, others_done))[0][1]
        assert wait_for(lambda: states(database_url, schema) == {"completed": 144}, 90, 0.2), states(database_url, schema)
    finally:
        codes = stop(procs)
    assert codes == [0, 0], [output(p) for p in procs]
    # The flood's 120 jobs at 2 at a time take >= 3 s; the other customers were served
    # beside it, not after it.
    assert flood_done < 80, flood_done
    seen = peaks(database_url, schema)
    assert max(v for k, v in seen.items() if k != "limp") == 2, seen
    assert seen["limp"] > 2, seen  # different keys ran side by side


def test_queue_and_partition_limits_hold_together_across_worker_processes(engine, database_url, schema, gauge):
    """A queue with both limits (schema v9 takes both counts from one read): one customer
    floods the head of the queue, so the claims of two processes go through the head
    window and the skip scan; neither the queue's 3 nor any key's 2 is ever exceeded, and
    the queue's limit is used, not undercut."""
    limit(engine, "limp", QueueLimits(concurrency=3, partition_concurrency=2))
    with Session(engine) as session, session.begin():
        enqueue_many(session, CustomerWork, [{"customer": "flood", "seconds": 0.1, "i": i} for i in range(30)])
        enqueue_many(session, CustomerWork, [{"customer": f"c{k}", "seconds": 0.1, "i": i}
                                             for i in range(5) for k in range(3)])
    drain_with_processes(database_url, schema, 45, processes=2, concurrency=8)
    seen = peaks(database_url, schema)
    assert seen.pop("limp") == 3, seen
    assert seen["flood"] == 2 and max(seen.values()) == 2, seen
    assert q(database_url, jobs_sql(schema, "SELECT max(attempt) FROM {jobs}")) == [(1,)]


def test_small_keys_behind_a_busy_key_are_claimed_when_a_queue_limit_narrows_the_head(engine, database_url, schema, gauge):
    """A queue concurrency limit narrows the partitioned claim's head window to about twice
    its room (at least 16 jobs), but the claim looked beyond the window only when more
    than the worker's whole batch waited: a worker with 50 free slots, facing 40 waiting
    jobs of a key at its partition limit and then 2 jobs of other keys, claimed only the
    busy key's jobs, two at a time, and left the queue's other two slots idle until the
    busy key's backlog shrank into the window (26 of its jobs later)."""
    limit(engine, "limp", QueueLimits(concurrency=4, partition_concurrency=2))
    with Session(engine) as session, session.begin():
        enqueue_many(session, CustomerWork, [{"customer": "flood", "seconds": 0.3, "i": i} for i in range(40)])
        enqueue_many(session, CustomerWork, [{"customer": f"small{k}", "seconds": 0.0, "i": k} for k in range(2)])
    done = ("SELECT count(*) FILTER (WHERE state = 'completed' AND partition_key <> '\"flood\"'),"
            " count(*) FILTER (WHERE state = 'completed' AND partition_key = '\"flood\"') FROM {jobs}")

    async def main() -> int:
        async with Worker(database_url, kinds=[CustomerWork], schema=schema, concurrency=50, **FAST):
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: q(database_url, jobs_sql(schema, done))[0][0] == 2, 30, 0.05))
            return q(database_url, jobs_sql(schema, done))[0][1]

    flood_done = anyio.run(main)
    assert flood_done <= 8, flood_done  # served beside the flood's first jobs, not after 26 of them
    assert peaks(database_url, schema)["flood"] == 2


def test_rate_limit_caps_claims_per_window(engine, database_url, schema, gauge):
    limit(engine, "limr", QueueLimits(rate=(5, dt.timedelta(seconds=1))))
    with Session(engine) as session, session.begin():
        session.add_all([RatedWork(i=i) for i in range(23)])
    drain_with_processes(database_url, schema, 23, processes=2, concurrency=10)
    # attempted_at is the claim transaction's now(), the clock the window is taken from.
    per_window = q(database_url, jobs_sql(
        schema, "SELECT floor(extract(epoch FROM attempted_at))::bigint AS w, count(*) FROM {jobs} GROUP BY w ORDER BY w"))
    assert max(n for _, n in per_window) == 5, per_window
    assert len(per_window) >= 5, per_window  # 23 jobs at 5 per second need five windows


def test_limits_apply_and_lift_while_a_worker_runs(engine, database_url, schema, gauge):
    async def main() -> tuple[int, int]:
        async with Worker(database_url, kinds=[LimitedWork], schema=schema, concurrency=8, **FAST):
            limit(engine, "lim", QueueLimits(concurrency=1))
            with Session(engine) as session, session.begin():
                session.add_all([LimitedWork(seconds=0.05, i=i) for i in range(10)])
            await anyio.to_thread.run_sync(lambda: wait_for(lambda: states(database_url, schema) == {"completed": 10}, 30))
            limited_peak = peaks(database_url, schema)["*"]
            q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = state").as_string().replace(
                f'"{schema}"."jobs"', f'"{schema}"."gauge"').replace("state = state", "peak = 0"))
            limit(engine, "lim", QueueLimits())  # lifted
            with Session(engine) as session, session.begin():
                session.add_all([LimitedWork(seconds=0.3, i=i) for i in range(8)])
            await anyio.to_thread.run_sync(lambda: wait_for(lambda: states(database_url, schema) == {"completed": 18}, 30))
            return limited_peak, peaks(database_url, schema)["*"]

    limited_peak, free_peak = anyio.run(main)
    assert limited_peak == 1
    assert free_peak > 1


def test_local_pause_stops_one_worker_only(engine, database_url, schema, gauge):
    async def main() -> None:
        async with Worker(database_url, kinds=[LimitedWork], schema=schema, **FAST) as worker:
            with pytest.raises(ConfigurationError):
                worker.pause("not_served")
            worker.pause("lim")
            assert worker.paused() == ["lim"]
            with Session(engine) as session, session.begin():
                session.add_all([LimitedWork(seconds=0.0, i=i) for i in range(5)])
            await anyio.sleep(1.0)  # five poll intervals: a claiming worker would have run them
            assert states(database_url, schema) == {"available": 5}
            worker.resume("lim")
            assert worker.paused() == []
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: states(database_url, schema) == {"completed": 5}, 20))

    anyio.run(main)


# ---- API, CLI and validation ----------------------------------------------------------


def test_limits_round_trip_and_show_in_the_overview(engine):
    with Session(engine) as session, session.begin():
        set_queue_limits(session, "emails", QueueLimits(concurrency=4, partition_concurrency=1,
                                                        rate=(600, dt.timedelta(minutes=1))))
    with Session(engine) as session:
        assert queue_limits(session, "emails") == QueueLimits(4, 1, (600, dt.timedelta(minutes=1)))
        assert queue_limits(session, "other") == QueueLimits()
        row = next(r for r in queue_overview(session) if r["queue"] == "emails")
    assert (row["concurrency"], row["partition_concurrency"], row["rate"]) == (4, 1, "600/1m")


@pytest.mark.parametrize("bad", [
    dict(concurrency=0), dict(concurrency=True), dict(partition_concurrency=-1),
    dict(rate=(0, dt.timedelta(seconds=1))), dict(rate=(5, dt.timedelta(0))), dict(rate=(5, 1.0)), dict(rate=5),
])
def test_bad_limits_are_refused(bad):
    with pytest.raises(ConfigurationError):
        QueueLimits(**bad)


def test_parse_rate():
    assert parse_rate("10/1s") == (10, dt.timedelta(seconds=1))
    assert parse_rate("600/m") == (600, dt.timedelta(minutes=1))
    assert parse_rate("5000/1h") == (5000, dt.timedelta(hours=1))
    for bad in ("", "10", "x/1s", "10/", "10/1y", "-1/s"):
        with pytest.raises(ConfigurationError):
            parse_rate(bad)
    # A bad period names the rate as typed, not the age it was turned into ('1x').
    for bad in ("10/x", "10/1y", "10/s5"):
        with pytest.raises(ConfigurationError, match=rf"^invalid rate '{bad}'"):
            parse_rate(bad)


def test_partition_key_from_kind_args_and_options():
    assert CustomerWork(customer="acme").partition_key == '"acme"'
    assert CustomerWork(customer="acme").options(partition_key="k1").partition_key == "k1"
    with pytest.raises(ConfigurationError, match="partitioned by"):
        CustomerWork(seconds=1)
    with pytest.raises(InvalidArgsError):
        LimitedWork().options(partition_key="a\x00b")
    with pytest.raises(InvalidArgsError):
        LimitedWork().options(partition_key="x" * 513)


def test_partition_keys_survive_every_enqueue_path(engine, database_url, schema):
    awkward = "tab\there\\back\nline"
    with Session(engine) as session, session.begin():
        session.add(CustomerWork(customer=awkward, i=1))
        enqueue_many(session, [CustomerWork(customer=awkward, i=2)])
        enqueue_many(session, CustomerWork, [{"customer": awkward, "i": 3}])
        enqueue_many(session, [LimitedWork(i=4).options(partition_key=awkward)])
    keys = q(database_url, jobs_sql(schema, "SELECT args->>'i', partition_key FROM {jobs} ORDER BY 1"))
    assert keys == [("1", json.dumps(awkward)), ("2", json.dumps(awkward)), ("3", json.dumps(awkward)), ("4", awkward)]


def run_cli(database_url: str, schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sa_jobs", *args, "--database-url", database_url, "--schema", schema],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


def cli_in_process(capsys: pytest.CaptureFixture[str], database_url: str, schema: str,
                   *args: str) -> subprocess.CompletedProcess[str]:
    """As :func:`run_cli`, without a Python start per call (about 1 s each)."""
    from sa_jobs import cli

    try:
        code = cli.main([*args, "--database-url", database_url, "--schema", schema])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code if isinstance(exc.code, int) else 2
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def test_cli_sets_shows_and_clears_limits(capsys, database_url, schema):
    # The first run is a real process (the installed entry point); the rest run in-process.
    done = run_cli(database_url, schema, "queues", "limit", "emails", "--concurrency", "5", "--rate", "10/1s", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"queue": "emails", "concurrency": 5, "partition_concurrency": None, "rate": "10/1s"}
    shown = cli_in_process(capsys, database_url, schema, "queues", "limit", "emails", "--rate", "600/m")
    assert shown.stdout.strip().endswith("rate=600/1m"), shown.stdout  # as `queues` shows it, not [600, 60.0]
    assert cli_in_process(capsys, database_url, schema, "queues", "limit", "emails", "--rate", "10/1s").returncode == 0
    # Only the given limit changes.
    assert cli_in_process(capsys, database_url, schema, "queues", "limit", "emails", "--partition-concurrency", "2").returncode == 0
    shown = json.loads(cli_in_process(capsys, database_url, schema, "queues", "--json").stdout)
    row = next(r for r in shown if r["queue"] == "emails")
    assert (row["concurrency"], row["partition_concurrency"], row["rate"]) == (5, 2, "10/1s")
    assert cli_in_process(capsys, database_url, schema, "queues", "limit", "emails", "--rate", "none").returncode == 0
    assert cli_in_process(capsys, database_url, schema, "queues", "limit", "emails", "--clear").returncode == 0
    row = next(r for r in json.loads(cli_in_process(capsys, database_url, schema, "queues", "--json").stdout) if r["queue"] == "emails")
    assert (row["concurrency"], row["partition_concurrency"], row["rate"]) == (None, None, None)
    for bad in (["--concurrency", "0"], ["--concurrency", "many"], ["--rate", "fast"]):
        refused = cli_in_process(capsys, database_url, schema, "queues", "limit", "emails", *bad)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    refused = cli_in_process(capsys, database_url, schema, "queues", "limit", "bad name", "--concurrency", "1")
    assert refused.returncode == 2, refused.stderr


def test_a_partitioned_claim_resumes_only_before_the_first_job_it_left_waiting(engine, database_url, schema):
    """Since schema v12 a limited queue's claims resume past their last batch under a
    backlog, as plain claims do. A partition limit leaves the jobs of keys at their limit
    waiting: had the worker resumed past the batch's last job, a busy key's job in the
    middle would wait behind the resume point until the next claim from the start (0.25 s
    or more, per job of that key). It resumes past the last job before it instead."""
    import psycopg

    from sa_jobs._url import to_conninfo
    from sa_jobs.worker.worker import _Queue

    limit(engine, "keyed", QueueLimits(partition_concurrency=1))
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, partition_key, state, claim_token,"
                                     " lease_expires_at, attempt) VALUES ('customer_work', 'keyed', 'busy',"
                                     " 'running', gen_random_uuid(), now() + interval '1 hour', 1)"))
    ids = [q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, partition_key) VALUES"
                                            " ('customer_work', 'keyed', %s) RETURNING id"), (key,))[0][0]
           for key in ["a1", "a2", "busy"] + [f"b{i}" for i in range(20)]]
    worker = Worker(database_url, kinds=[CustomerWork], schema=schema, queues={"keyed": 10})

    async def main() -> tuple[list[int], object]:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            queue = _Queue("keyed", 10, None, anyio.CapacityLimiter(10))  # type: ignore[arg-type]
            await worker._read_settings(queue, conn)
            claimed = await worker._claim(queue, conn, 10, lambda: anyio.fail_after(10))
            return sorted(j.id for j in claimed), queue.resume_after

    claimed, resume_after = anyio.run(main)
    assert claimed == ids[:2] + ids[3:11]  # a full batch: the busy key's job left waiting
    assert resume_after is not None and resume_after[2] == ids[1]  # resumes after a2, before it


@pytest.mark.parametrize("row", ["exists", "being created"])
def test_two_cli_limit_runs_at_once_keep_both_changes(database_url, schema, row):
    """Each ``queues limit`` run changes only its dimension: two at once must not lose one.

    An open transaction of the test holds the queue's row (locked, or inserted and not yet
    committed) until both CLI processes wait on it, so both have started before either
    writes; a run that read the limits before taking its lock writes back a stale copy.
    """
    queues = sql.Identifier(schema, "queues")
    if row == "exists":
        assert run_cli(database_url, schema, "queues", "limit", "emails", "--rate", "10/1s").returncode == 0
    with psycopg.connect(to_conninfo(database_url)) as holder:
        if row == "exists":
            holder.execute(sql.SQL("SELECT 1 FROM {} WHERE name = 'emails' FOR UPDATE").format(queues))
        else:
            holder.execute(sql.SQL("INSERT INTO {} (name, paused) VALUES ('emails', false)").format(queues))
        runs = [subprocess.Popen(
            [sys.executable, "-m", "sa_jobs", "queues", "limit", "emails", *given,
             "--database-url", database_url, "--schema", schema],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PGAPPNAME": schema},  # to find their sessions
        ) for given in (["--concurrency", "5"], ["--partition-concurrency", "2"])]
        try:
            # Waiting on the holder, or on each other's tuple lock queued behind it.
            blocked = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND cardinality(pg_blocking_pids(pid)) > 0"
            assert wait_for(lambda: q(database_url, blocked, (schema,)) == [(2,)], 30, 0.05)
            holder.commit()
            outputs = [run.communicate(timeout=60) for run in runs]
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
    assert [run.returncode for run in runs] == [0, 0], outputs
    with psycopg.connect(to_conninfo(database_url)) as conn:
        got = conn.execute(sql.SQL(
            "SELECT concurrency, partition_concurrency, rate_limit FROM {} WHERE name = 'emails'").format(queues)).fetchall()
    assert got == [(5, 2, 10 if row == "exists" else None)]


def test_a_rate_window_left_in_the_future_by_a_clock_step_back_does_not_stall_the_queue(engine, database_url, schema, gauge):
    """The rate window never moves back (schema v11): a claim counts against the row's
    window when it is the claim's own window or a later one. When the database server's
    clock steps back (an NTP correction, a VM restored or migrated), the row's window lies
    in the future, and every claim counted against it until the clock caught up: a 5/1s
    queue whose window was full started nothing for as long as the step (an hour here).
    The state the step leaves is written directly: the window an hour ahead, full."""
    limit(engine, "limr", QueueLimits(rate=(5, dt.timedelta(seconds=1))))
    q(database_url, sql.SQL("UPDATE {} SET rate_window_start = date_trunc('second', now()) + interval '1 hour',"
                            " rate_window_count = 5 WHERE name = 'limr'").format(sql.Identifier(schema, "queues")))
    with Session(engine) as session, session.begin():
        session.add_all([RatedWork(i=i) for i in range(8)])

    async def main() -> bool:
        async with Worker(database_url, kinds=[RatedWork], schema=schema, **FAST):
            return await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: states(database_url, schema) == {"completed": 8}, 15, 0.1))

    assert anyio.run(main), states(database_url, schema)
    per_window = q(database_url, jobs_sql(
        schema, "SELECT floor(extract(epoch FROM attempted_at))::bigint AS w, count(*) FROM {jobs} GROUP BY w"))
    assert max(n for _, n in per_window) <= 5, per_window  # and the rate still holds
    window = q(database_url, sql.SQL("SELECT rate_window_start <= now() FROM {} WHERE name = 'limr'").format(
        sql.Identifier(schema, "queues")))
    assert window == [(True,)]


def test_a_limited_queue_claims_again_when_a_transactional_completion_frees_room(engine, database_url, schema):
    """A limited queue's producer waits for room after a short claim; the completer's
    writes wake it. A job completed through ``ctx.transaction()`` has no outcome for the
    completer (its row ends in the handler's commit), so the room it freed waited for the
    next poll: a concurrency=1 queue of such jobs ran one per ``poll_interval``."""
    limit(engine, "limtx", QueueLimits(concurrency=1))
    with Session(engine) as session, session.begin():
        session.add_all([TxWork(i=i) for i in range(6)])

    async def main() -> float:
        async with Worker(database_url, kinds=[TxWork], schema=schema, **{**FAST, "poll_interval": 3.0}):
            started = time.monotonic()
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: states(database_url, schema) == {"completed": 6}, 40, 0.02))
            return time.monotonic() - started

    took = anyio.run(main)
    assert took < 3.0, took  # 6 jobs one after the other, not one per 3 s poll


def test_an_idle_rate_limited_queue_is_polled_not_claimed_every_window(engine, database_url, schema):
    """A producer whose claim came back short waited only until the next rate window, in
    case the rate had cut it short, even when the claim was empty for want of jobs: on an
    idle queue with a 1/10ms rate the worker claimed a hundred times a second (and read
    the queue's settings as often), where the poll is 5 per second. Claims the rate does
    stop still resume as each window opens."""
    from sa_jobs.events import NullObserver

    class Claims(NullObserver):
        def __init__(self) -> None:
            self.n = 0

        def claimed(self, queue: str, count: int, seconds: float) -> None:
            self.n += 1

    limit(engine, "limr", QueueLimits(rate=(1, dt.timedelta(milliseconds=10))))
    claims = Claims()

    async def idle() -> None:
        async with Worker(database_url, kinds=[RatedWork], schema=schema, observer=claims, **FAST):
            await anyio.sleep(2.0)

    anyio.run(idle)
    assert claims.n < 40, claims.n  # about 10 polls (0.2 s) and a few wake-ups; not 200

    limit(engine, "limr", QueueLimits(rate=(4, dt.timedelta(milliseconds=250))))
    with Session(engine) as session, session.begin():
        session.add_all([RatedWork(i=i) for i in range(12)])

    async def drain() -> float:
        async with Worker(database_url, kinds=[RatedWork], schema=schema, **{**FAST, "poll_interval": 3.0}):
            started = time.monotonic()
            assert await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: states(database_url, schema) == {"completed": 12}, 30, 0.02))
            return time.monotonic() - started

    drain_time = anyio.run(drain)
    assert drain_time < 2.5, drain_time  # three windows of 4, each claimed as it opens, not per 3 s poll


@pytest.mark.parametrize("how", ["pause", "stop"])
def test_a_pause_or_stop_during_a_resumed_claim_starts_no_claim_from_the_start(engine, database_url, schema, how):
    """A producer's claim can be two statements: one resuming past its last batch, then,
    when that one comes back short, one from the queue's start. ``pause()`` and
    ``request_stop()`` promise that no claim starts after they return; one that returned
    while the resumed claim ran still let the claim from the start go out and take jobs."""
    import uuid

    from sa_jobs.worker.worker import _Queue

    with Session(engine) as session, session.begin():
        session.add_all([LimitedWork(i=i) for i in range(10)])
    ids = [r[0] for r in q(database_url, jobs_sql(schema, "SELECT id FROM {jobs} ORDER BY id"))]
    after = q(database_url, jobs_sql(schema, "SELECT priority, scheduled_at, id FROM {jobs} WHERE id = %s"), (ids[4],))[0]
    worker = Worker(database_url, kinds=[LimitedWork], schema=schema, queues={"lim": 10})
    queue = _Queue("lim", 10, None, anyio.CapacityLimiter(10))  # type: ignore[arg-type]
    worker._queues = {"lim": queue}
    worker._running = True  # as in a run: pause() is refused outside one
    sent: list[str] = []

    class StoppedDuringTheFirst:
        """The real connection; the call returns while the first statement runs."""

        def __init__(self, conn: psycopg.AsyncConnection) -> None:
            self.conn = conn

        async def execute(self, statement, params=None, **kw):  # type: ignore[no-untyped-def]
            sent.append(statement)
            cursor = await self.conn.execute(statement, params, **kw)
            if len(sent) == 1:
                worker.pause("lim") if how == "pause" else worker.request_stop()
            return cursor

    async def main() -> list:
        # As in a run: pause() and request_stop() reach the run on its loop (without one,
        # a stop is kept for the next run).
        worker._loop, worker._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            queue.resume_after, queue.scanned_from_start_at = tuple(after), time.monotonic()
            params = {"queue": "lim", "limit": 10, "token": uuid.uuid4(), "owner": "w", "lease": 30}
            return await worker._claim_resuming(queue, StoppedDuringTheFirst(conn), params, lambda: anyio.fail_after(10),
                                                worker._queries.claim, worker._queries.claim_after, flagged=False)

    rows = anyio.run(main)
    assert sorted(r[0] for r in rows) == ids[5:]  # the resumed claim's jobs, committed: they run
    assert len(sent) == 1, sent
    assert states(database_url, schema) == {"running": 5, "available": 5}
