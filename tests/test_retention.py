"""Retention: the leader prunes finished rows per state after their age, in bounded batches."""

from __future__ import annotations

import datetime as dt
import statistics
import threading
import time

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from sa_jobs import ConfigurationError, Job, JobContext, Worker
from sa_jobs._url import to_conninfo
from sa_jobs.maintenance.pruner import Pruner, count_statement, delete_statement, prune, retention_ages
from sa_jobs.queries import Queries

from .helpers import LoopErrors, jobs_sql, q, run_worker_until


class RetNoop(Job, kind="ret_noop", queue="ret"):
    pass


@RetNoop.handler
def ret_noop(ctx: JobContext) -> None:
    return None


def _seed(database_url: str, schema: str, state: str, n: int, finished_ago: str | None, created_ago: str = "0") -> None:
    q(database_url, jobs_sql(
        schema,
        "INSERT INTO {jobs} (kind, state, finished_at, created_at)"
        " SELECT 'ret_seed', %s, now() - %s::interval, now() - %s::interval FROM generate_series(1, %s)"
        if finished_ago is not None else
        "INSERT INTO {jobs} (kind, state, created_at) SELECT 'ret_seed', %s, now() - %s::interval FROM generate_series(1, %s)",
    ), (state, finished_ago, created_ago, n) if finished_ago is not None else (state, created_ago, n))


def _counts(database_url: str, schema: str) -> dict[str, int]:
    return dict(q(database_url, jobs_sql(schema, "SELECT state, count(*) FROM {jobs} GROUP BY state")))


def test_worker_prunes_each_state_after_its_age_and_never_unfinished_rows(database_url, schema):
    _seed(database_url, schema, "completed", 450, "2 hours")
    _seed(database_url, schema, "completed", 7, "10 minutes")
    _seed(database_url, schema, "cancelled", 30, "2 hours")
    _seed(database_url, schema, "dead", 40, "2 hours")  # dead is kept for a day
    _seed(database_url, schema, "dead", 5, "3 days")
    _seed(database_url, schema, "available", 20, None, "30 days")
    _seed(database_url, schema, "scheduled", 10, None, "30 days")
    # Old unfinished rows, even with a stale finished_at, are outside the prune predicate.
    _seed(database_url, schema, "retryable", 3, "30 days", "30 days")
    # Not due, so the scheduler leaves them where they are.
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET scheduled_at = now() + interval '1 day'"
                                     " WHERE state IN ('scheduled', 'retryable')"))
    pruner = Pruner(completed=dt.timedelta(hours=1), cancelled=dt.timedelta(hours=1), dead=dt.timedelta(days=1),
                    batch=100, interval=0.1)
    expected = {"completed": 7, "dead": 40, "available": 20, "scheduled": 10, "retryable": 3}
    run_worker_until(database_url, schema, [RetNoop], lambda: _counts(database_url, schema) == expected,
                     timeout=30, maintenance=[pruner])
    assert _counts(database_url, schema) == expected
    assert pruner.deleted == {"completed": 450, "cancelled": 30, "dead": 5}


def test_one_run_is_bounded_and_skips_locked_rows(database_url, schema):
    _seed(database_url, schema, "completed", 100, "2 days")
    pruner = Pruner(completed=dt.timedelta(days=1), cancelled=None, dead=None, batch=10, max_batches=3, interval=0)
    holder = psycopg.connect(to_conninfo(database_url))
    try:
        # An operator's transaction holds the oldest row: pruning skips it instead of waiting.
        held = holder.execute(jobs_sql(schema, "SELECT id FROM {jobs} ORDER BY finished_at, id LIMIT 1 FOR UPDATE")).fetchone()[0]

        async def main() -> float:
            async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
                started = time.monotonic()
                with anyio.fail_after(10):
                    await pruner.run_once(conn, Queries.for_schema(schema))
                return time.monotonic() - started

        elapsed = anyio.run(main)
        assert pruner.deleted == {"completed": 30} and elapsed < 5
        assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE id = %s"), (held,)) == [(1,)]
    finally:
        holder.rollback()
        holder.close()
    assert _counts(database_url, schema) == {"completed": 70}


def test_a_state_behind_a_backlog_longer_than_a_tick_is_pruned_too(database_url, schema):
    """A run that spends its share of the tick stops and goes on at the next tick. It went
    on with the first state (completed) every time: while completed rows came in faster
    than one share deleted them, cancelled and dead rows were never pruned. Deletes are
    slowed here (a trigger) so that each run is cut short after a batch or two."""
    _seed(database_url, schema, "completed", 30, "2 days")
    _seed(database_url, schema, "dead", 1, "60 days")
    q(database_url, jobs_sql(schema, "CREATE FUNCTION {schema_}.slow_delete() RETURNS trigger LANGUAGE plpgsql AS"
                                     " $$ BEGIN PERFORM pg_sleep(0.2); RETURN OLD; END $$".replace("{schema_}", f'"{schema}"')))
    q(database_url, jobs_sql(schema, "CREATE TRIGGER slow_delete BEFORE DELETE ON {jobs} FOR EACH ROW"
                                     f' EXECUTE FUNCTION "{schema}".slow_delete()'))
    pruner = Pruner(completed=dt.timedelta(days=1), cancelled=dt.timedelta(days=1), dead=dt.timedelta(days=30),
                    batch=1, max_batches=100, interval=0)

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            for _ in range(3):
                with anyio.fail_after(1.0):  # a tick's deadline: each run's share is about 0.5 s
                    await pruner.run_once(conn, Queries.for_schema(schema))

    anyio.run(main)
    assert 0 < pruner.deleted["completed"] < 30  # the backlog outlived the runs
    assert pruner.deleted["dead"] == 1 and _counts(database_url, schema).get("dead") is None


def test_prune_function_reports_progress(database_url, schema):
    _seed(database_url, schema, "dead", 25, "40 days")
    _seed(database_url, schema, "completed", 12, "8 days")
    _seed(database_url, schema, "completed", 4, "1 day")
    calls: list[tuple[int, int]] = []
    conninfo = to_conninfo(database_url)
    ages = {"completed": dt.timedelta(days=7), "dead": dt.timedelta(days=30)}
    assert prune(conninfo, schema, ages, dry_run=True) == {"completed": 12, "dead": 25}
    result = prune(conninfo, schema, ages, batch=10, progress=lambda d, t: calls.append((d, t)))
    assert result == {"completed": 12, "dead": 25}
    assert calls[0] == (0, 37) and calls[-1] == (37, 37) and len(calls) >= 5
    assert _counts(database_url, schema) == {"completed": 4}


def test_prune_uses_the_finished_index(database_url, schema):
    _seed(database_url, schema, "available", 2000, None)
    _seed(database_url, schema, "completed", 2000, "10 days")
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        stmt = delete_statement(schema).as_string()
        plan = conn.execute("EXPLAIN " + stmt, {"state": "completed", "age": 86400.0, "limit": 100}).fetchall()
    assert "jobs_state_finished_idx" in "\n".join(r[0] for r in plan)


def _plan(conn: psycopg.Connection, statement: str, params: dict) -> dict:
    """The executed plan's top node (rolled back: EXPLAIN ANALYZE of the DELETE deletes)."""
    with conn.transaction(force_rollback=True):
        (plan_json,) = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, params).fetchone()
    return plan_json[0]["Plan"]


def _removed_by_filter(plan: dict) -> int:
    return plan.get("Rows Removed by Filter", 0) + sum(_removed_by_filter(p) for p in plan.get("Plans", []))


def test_a_batch_does_not_walk_past_a_kept_states_old_rows(database_url, schema):
    """Dead jobs kept for good (``dead=None``), or much longer than completed ones, are
    the oldest finished rows. The pruner's batch of completed rows (and the dry run's
    count) read the finished rows in ``finished_at`` order through jobs_finished_idx
    (finished_at) and filtered the state: each batch walked past every old dead row, a
    cost of O(rows kept), not O(batch). On (state, finished_at) it reads its own rows."""
    _seed(database_url, schema, "dead", 50_000, "400 days")
    _seed(database_url, schema, "completed", 30, "10 days")
    _seed(database_url, schema, "completed", 30, "1 hour")
    q(database_url, jobs_sql(schema, "VACUUM ANALYZE {jobs}"))
    params = {"state": "completed", "age": 86400.0, "limit": 10}
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        delete = _plan(conn, delete_statement(schema).as_string(), params)
        count = _plan(conn, count_statement(schema).as_string(), params)
    for plan in (count, delete):
        blocks = plan["Shared Hit Blocks"] + plan.get("Shared Read Blocks", 0)
        assert _removed_by_filter(plan) <= 100 and blocks <= 60, (blocks, _removed_by_filter(plan), plan)
    assert prune(to_conninfo(database_url), schema, {"completed": dt.timedelta(days=1)}, dry_run=True) \
        == {"completed": 30}


def test_invalid_retention_settings():
    with pytest.raises(ConfigurationError, match="only finished states"):
        retention_ages({"running": dt.timedelta(days=1)})
    with pytest.raises(ConfigurationError):
        Pruner(completed=dt.timedelta(days=-1))
    with pytest.raises(ConfigurationError):
        Pruner(completed="7d")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        Pruner(batch=0)
    assert Pruner.leader_only is True


def test_ages_beyond_the_timestamp_range_are_refused_up_front(database_url, schema):
    """An age meaning "practically forever" (timedelta.max, 10,000 years, inf) was accepted,
    then every run failed in the database (now() - age: DatetimeFieldOverflow): the
    leader's maintenance tick raised each second, dropping leadership, and no state (nor a
    leader-only service after the pruner) ran again. ``sa-jobs prune --older-than`` with
    such an age printed a traceback. Now a ConfigurationError at construction (or a usage
    error), and the largest accepted age runs."""
    from sa_jobs.admin import parse_age
    from sa_jobs.maintenance.pruner import MAX_AGE

    for age in (dt.timedelta.max, dt.timedelta(days=365 * 10_000), float("inf"), 1e15):
        with pytest.raises(ConfigurationError, match="keep a state forever"):
            Pruner(dead=age)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            prune(to_conninfo(database_url), schema, {"dead": age})
    for text in ("9999999d", "99999999999999w", "9" * 400):
        with pytest.raises(ConfigurationError):
            parse_age(text)
    _seed(database_url, schema, "dead", 3, "2 days")
    pruner = Pruner(completed=MAX_AGE, cancelled=None, dead=dt.timedelta(days=1), interval=0)

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            await pruner.run_once(conn, Queries.for_schema(schema))

    anyio.run(main)
    assert pruner.deleted == {"completed": 0, "dead": 3}
    assert prune(to_conninfo(database_url), schema, {"completed": MAX_AGE}, dry_run=True) == {"completed": 0}


@pytest.mark.slow
def test_prune_one_million_rows(database_url, schema):
    """Measurement for docs/queue-control.md: 1M rows (900k completed + 50k dead to prune,
    50k available to keep) pruned in batches of 5000 while a claimer keeps claiming."""
    t0 = time.monotonic()
    _seed(database_url, schema, "completed", 900_000, "10 days")
    _seed(database_url, schema, "dead", 50_000, "40 days")
    _seed(database_url, schema, "available", 50_000, None)
    q(database_url, jobs_sql(schema, "VACUUM ANALYZE {jobs}"))
    seeded = time.monotonic() - t0
    conninfo = to_conninfo(database_url)
    stop = threading.Event()
    claim_latencies: list[float] = []

    def claimer() -> None:
        # The claim's shape (SKIP LOCKED on available rows), rolled back each time.
        with psycopg.connect(conninfo) as conn:
            stmt = jobs_sql(schema, "SELECT id FROM {jobs} WHERE state = 'available' ORDER BY queue, priority,"
                                    " scheduled_at, id LIMIT 10 FOR UPDATE SKIP LOCKED")
            while not stop.is_set():
                started = time.perf_counter()
                conn.execute(stmt).fetchall()
                conn.rollback()
                claim_latencies.append(time.perf_counter() - started)
                time.sleep(0.01)

    thread = threading.Thread(target=claimer)
    thread.start()
    batch_times: list[float] = []
    started = time.monotonic()
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            for state, age in (("completed", 7 * 86400.0), ("dead", 30 * 86400.0)):
                stmt = delete_statement(schema, state, 5000)  # as the pruner runs it
                while True:
                    t = time.perf_counter()
                    n = conn.execute(stmt, {"age": age}).rowcount
                    batch_times.append(time.perf_counter() - t)
                    if n < 5000:
                        break
    finally:
        total = time.monotonic() - started
        stop.set()
        thread.join(30)
    assert _counts(database_url, schema) == {"available": 50_000}
    batch_times.sort()
    claim_latencies.sort()
    print(
        f"\nseed 1M rows: {seeded:.1f}s; pruned 950000 rows in {len(batch_times)} batches of 5000:"
        f" total {total:.1f}s, {950_000 / total:.0f} rows/s;"
        f" batch p50 {statistics.median(batch_times) * 1000:.0f} ms,"
        f" p95 {batch_times[int(len(batch_times) * 0.95)] * 1000:.0f} ms, max {batch_times[-1] * 1000:.0f} ms;"
        f" concurrent claims: {len(claim_latencies)}, p50 {statistics.median(claim_latencies) * 1000:.1f} ms,"
        f" max {claim_latencies[-1] * 1000:.1f} ms"
    )


def test_a_pruning_backlog_does_not_hold_back_promotion(database_url, schema):
    """Maintenance services run one after another in a tick, the pruner last; on a backlog
    it took half of what was left of the tick's deadline (the statement timeout: 7.5 s
    of 15 s with a 30 s lease) on every tick, so a lone worker promoted a due job, and
    rescued an expired lease, only that often. Deletes are slowed here (a trigger)."""
    _seed(database_url, schema, "completed", 200, "2 days")
    q(database_url, jobs_sql(schema, "CREATE FUNCTION {schema_}.slow_delete() RETURNS trigger LANGUAGE plpgsql AS"
                                     " $$ BEGIN PERFORM pg_sleep(0.1); RETURN OLD; END $$".replace("{schema_}", f'"{schema}"')))
    q(database_url, jobs_sql(schema, "CREATE TRIGGER slow_delete BEFORE DELETE ON {jobs} FOR EACH ROW"
                                     f' EXECUTE FUNCTION "{schema}".slow_delete()'))
    pruner = Pruner(completed=dt.timedelta(days=1), cancelled=None, dead=None, batch=1, max_batches=1000, interval=0)

    def ran() -> bool:
        return q(database_url, jobs_sql(
            schema, "SELECT count(*) FROM {jobs} WHERE kind = 'ret_noop' AND state = 'completed'"))[0][0] == 1

    async def main() -> None:
        async with Worker(database_url, kinds=[RetNoop], schema=schema, lease=30, poll_interval=0.1,
                          maintenance_interval=0.1, maintenance=[pruner]):
            with anyio.fail_after(10):
                while not pruner.deleted["completed"]:  # the leader is pruning
                    await anyio.sleep(0.02)
            q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, scheduled_at)"
                                             " VALUES ('ret_noop', 'ret', 'scheduled', now() + interval '0.5 s')"))
            with anyio.fail_after(15):
                while not await anyio.to_thread.run_sync(ran):
                    await anyio.sleep(0.05)

    anyio.run(main)
    assert 0 < pruner.deleted["completed"] < 200  # still pruning when the job came due
    late = q(database_url, jobs_sql(schema, "SELECT extract(epoch FROM attempted_at - scheduled_at)::float8"
                                            " FROM {jobs} WHERE kind = 'ret_noop'"))[0][0]
    assert late < 2.0, f"a due job waited {late:.2f}s behind the pruner"


def test_a_pruner_interval_or_age_out_of_range_is_a_configuration_error():
    """``interval=None`` failed an assert (AssertionError, or nothing under -O: then a
    TypeError at the first run); an int age too large for a float raised OverflowError;
    an infinite interval pruned once and never again."""
    for kw in ({"interval": None}, {"interval": float("inf")}, {"interval": 10**400}, {"completed": 10**400},
               {"dead": -(10**400)}):
        with pytest.raises(ConfigurationError):
            Pruner(**kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        retention_ages({"dead": 10**400})
    assert Pruner(interval=0).interval == 0.0


def _slow_deletes(database_url: str, schema: str, seconds: float) -> None:
    """Each deleted row costs ``seconds`` (a trigger): a batch's time is its size times that."""
    q(database_url, jobs_sql(schema, "CREATE FUNCTION {schema_}.slow_delete() RETURNS trigger LANGUAGE plpgsql AS"
                                     f" $$ BEGIN PERFORM pg_sleep({seconds}); RETURN OLD; END $$"
                                     .replace("{schema_}", f'"{schema}"')))
    q(database_url, jobs_sql(schema, "CREATE TRIGGER slow_delete BEFORE DELETE ON {jobs} FOR EACH ROW"
                                     f' EXECUTE FUNCTION "{schema}".slow_delete()'))


class _Leadership(LoopErrors):
    def __init__(self) -> None:
        super().__init__()
        self.changes: list[bool] = []

    def leader(self, is_leader: bool) -> None:
        self.changes.append(is_leader)


def test_a_batch_slower_than_the_statement_timeout_is_halved_until_it_fits(database_url, schema):
    """A batch that ran past the maintainer's deadline (the statement timeout: 2 s here)
    failed the tick, dropped leadership and the connection, and the next tick tried the
    same batch size again: pruning never progressed. Each deleted row costs 50 ms here,
    so a batch of 100 takes 5 s; the pruner must shrink its batch and keep leading."""
    _seed(database_url, schema, "completed", 200, "2 days")
    _slow_deletes(database_url, schema, 0.05)
    observer = _Leadership()
    pruner = Pruner(completed=dt.timedelta(days=1), cancelled=None, dead=None, batch=100, interval=0)
    run_worker_until(database_url, schema, [RetNoop], lambda: pruner.deleted["completed"] >= 30, timeout=30,
                     maintenance=[pruner], observer=observer, lease=4.0)
    assert pruner.deleted["completed"] >= 30
    # Led from the first tick until the worker stopped (its last change), never failing a tick.
    assert "maintenance" not in observer.seen and observer.changes == [True, False]


def test_prune_command_halves_a_batch_that_outlives_the_statement_timeout(database_url, schema):
    """``sa-jobs prune`` under a statement_timeout (a role's setting, the URL's options)
    failed at its first batch slower than that, every time it was run."""
    _seed(database_url, schema, "completed", 40, "2 days")
    _slow_deletes(database_url, schema, 0.05)  # a batch of 40: 2 s
    conninfo = make_conninfo(to_conninfo(database_url), options="-c statement_timeout=500")
    result = prune(conninfo, schema, {"completed": dt.timedelta(days=1)}, batch=40)
    assert result == {"completed": 40} and _counts(database_url, schema) == {}


def _generic_plan(conn: psycopg.Connection, statement: str) -> str:
    """The plan of ``statement`` prepared, under ``plan_cache_mode = force_generic_plan``:
    what every run gets once a prepared statement's generic plan is chosen."""
    text = statement.replace("%(state)s", "$1").replace("%(age)s", "$2").replace("%(limit)s", "$3")
    conn.execute("SET plan_cache_mode = force_generic_plan")
    conn.execute("PREPARE prune_batch(text, float8, int) AS " + text)
    try:
        return "\n".join(r[0] for r in conn.execute("EXPLAIN EXECUTE prune_batch('completed', 86400, 100)"))
    finally:
        conn.execute("DEALLOCATE prune_batch")
        conn.execute("RESET plan_cache_mode")


def test_a_batch_reads_the_finished_index_in_a_generic_plan_too(database_url, schema):
    """The state and the batch size were parameters. A generic plan (the plan cache's choice
    for a statement prepared after 5 runs, or ``plan_cache_mode = force_generic_plan``)
    cannot use the partial index for ``state = $1`` (it proves nothing about ``state IN
    (...)``), and guesses ``LIMIT $3`` at a tenth of the rows, so it hash-joined a seq scan
    of the table: each batch read every row of its state (650-870 ms a batch at 700k rows
    instead of 25 ms), at any batch size. The statements the pruner runs name both."""
    _seed(database_url, schema, "available", 2000, None)
    _seed(database_url, schema, "completed", 20000, "10 days")
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        assert "jobs_state_finished_idx" not in _generic_plan(conn, delete_statement(schema).as_string())
        for state in ("completed", "cancelled", "dead"):  # the last two have no rows here
            plan = _generic_plan(conn, delete_statement(schema, state, 100).as_string(conn))
            assert "Seq Scan" not in plan and (state != "completed" or "jobs_state_finished_idx" in plan), plan


@pytest.mark.slow
def test_the_pruner_service_on_one_million_rows_under_concurrent_completions(database_url, schema):
    """Measurement: the Pruner itself (its statements, prepared by psycopg after 5 runs, its
    adaptive sizes, its tick share) on 1M rows (900k completed + 50k dead to prune, 50k
    available), while a thread completes available jobs (fresh finished rows, kept) every
    10 ms, under ``plan_cache_mode = force_generic_plan`` (the worst plan cache choice)."""
    _seed(database_url, schema, "completed", 900_000, "10 days")
    _seed(database_url, schema, "dead", 50_000, "40 days")
    _seed(database_url, schema, "available", 50_000, None)
    q(database_url, jobs_sql(schema, "VACUUM ANALYZE {jobs}"))
    conninfo = to_conninfo(database_url)
    stop = threading.Event()
    completed_fresh: list[int] = []

    def completer() -> None:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            stmt = jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE id IN"
                                    " (SELECT id FROM {jobs} WHERE state = 'available' LIMIT 20 FOR UPDATE SKIP LOCKED)")
            while not stop.is_set():
                completed_fresh.append(conn.execute(stmt).rowcount)
                time.sleep(0.01)

    class Timed:
        def __init__(self, conn: psycopg.AsyncConnection) -> None:
            self.conn, self.times = conn, []

        async def execute(self, *args, **kwargs):
            started = time.perf_counter()
            cur = await self.conn.execute(*args, **kwargs)
            self.times.append(time.perf_counter() - started)
            return cur

    pruner = Pruner(completed=dt.timedelta(days=7), cancelled=None, dead=dt.timedelta(days=30), interval=0)
    pruner.bind_tick(0.1, 15.0)
    thread = threading.Thread(target=completer)
    thread.start()
    runs = 0
    started = time.monotonic()

    async def main() -> Timed:
        nonlocal runs
        options = "-c plan_cache_mode=force_generic_plan"
        async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True, options=options) as conn:
            timed = Timed(conn)
            with anyio.fail_after(300):
                while sum(pruner.deleted.values()) < 950_000:
                    with anyio.fail_after(15):  # a tick's deadline
                        await pruner.run_once(timed, Queries.for_schema(schema))
                    runs += 1
            return timed

    try:
        timed = anyio.run(main)
    finally:
        total = time.monotonic() - started
        stop.set()
        thread.join(30)
    assert pruner.deleted == {"completed": 900_000, "dead": 50_000}
    assert _counts(database_url, schema) == {"available": 50_000 - sum(completed_fresh),
                                             "completed": sum(completed_fresh)}
    batches = sorted(t for t in timed.times if t > 0.002)  # not the set_config/RESET round trips
    print(f"\npruner: 950000 rows in {runs} runs, {len(timed.times)} statements, total {total:.1f}s;"
          f" batch p50 {statistics.median(batches) * 1000:.0f} ms, max {batches[-1] * 1000:.0f} ms;"
          f" {sum(completed_fresh)} jobs completed meanwhile (kept); sizes {pruner.sizes}")
    assert batches[-1] < 2.0  # no batch near a seq scan of the table
