"""Schema versions against a real Postgres: guard at worker start, v1 -> v2 upgrade, drift."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Iterator

import anyio
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from sa_jobs import Job, Worker
from sa_jobs import schema as schema_mod
from sa_jobs.drift import check_drift
from sa_jobs.errors import InvalidIdentifierError, SchemaVersionError
from sa_jobs.maintenance.pruner import delete_statement
from sa_jobs.periodic import Periodic, PeriodicJobs
from sa_jobs.queries import Queries

from .conftest import REPO_ROOT, new_schema_name, pg_bin, worker_command
from .helpers import LoopErrors, until, wait_for

EXAMPLE_APP = REPO_ROOT / "examples" / "alembic_app"


def run_sql(url: str, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    """A throwaway database for this module: CREATE INDEX CONCURRENTLY waits out every older
    transaction in its database, so other suites' long transactions must not be in ours."""
    name = "sa_jobs_t_" + uuid.uuid4().hex[:12]
    run_sql(database_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    run_sql(database_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_schema(db: str) -> Iterator[str]:
    """A schema name with nothing installed yet; whatever the test installs is dropped."""
    name = new_schema_name()
    yield name
    run_sql(db, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def installed(db: str, fresh_schema: str) -> str:
    schema_mod.install(db, fresh_schema)
    return fresh_schema


def insert_jobs(url: str, schema: str, n: int = 300) -> None:
    """Jobs in every state, through plain SQL so the test does not depend on the model."""
    jobs = sql.Identifier(schema, "jobs")
    run_sql(url, sql.SQL(
        "INSERT INTO {} (kind, queue, args, state, attempt, finished_at, claim_token, lease_expires_at, tags)"
        " SELECT 'k' || (mod(i, 3)), 'q' || (mod(i, 2)), jsonb_build_object('i', i),"
        "  (ARRAY['available','scheduled','running','completed','retryable','dead','cancelled'])[1 + mod(i, 7)],"
        "  mod(i, 4),"
        "  CASE WHEN mod(i, 7) IN (3, 5, 6) THEN now() - make_interval(secs => i) END,"
        "  CASE WHEN mod(i, 7) = 2 THEN gen_random_uuid() END,"
        "  CASE WHEN mod(i, 7) = 2 THEN now() + interval '30 seconds' END,"
        "  ARRAY['t' || i]"
        " FROM generate_series(1, %s) AS i"
    ).format(jobs), (n,))


def job_rows(url: str, schema: str) -> list[dict[str, Any]]:
    rows = run_sql(url, sql.SQL("SELECT to_jsonb(j) - 'progress' - 'unique_key' - 'unique_states' - 'partition_key' FROM {} j ORDER BY id").format(sql.Identifier(schema, "jobs")))
    return [r[0] for r in rows]


def run_worker(url: str, schema: str) -> subprocess.CompletedProcess[str]:
    """The real ``sa-jobs worker`` start-up, with the example shop's job kind."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(EXAMPLE_APP)])}
    return subprocess.run(
        worker_command(url, schema, "shop.models"), cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=60,
    )


# ---- the version guard -------------------------------------------------------------


def test_worker_refuses_an_older_schema_and_names_the_command(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema, to_version=1)
    with pytest.raises(SchemaVersionError, match=f"sa-jobs migrate --schema {fresh_schema}"):
        schema_mod.check_version(db, fresh_schema)
    proc = run_worker(db, fresh_schema)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert f"run `sa-jobs migrate --schema {fresh_schema}` or `alembic upgrade heads`" in proc.stderr


def test_worker_refuses_a_newer_schema(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema)
    run_sql(db, sql.SQL("INSERT INTO {} (version, description) VALUES (%s, 'from the future')").format(
        sql.Identifier(fresh_schema, "schema_version")), (schema_mod.LATEST_VERSION + 1,))
    proc = run_worker(db, fresh_schema)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "newer than this sa-jobs knows" in proc.stderr and "refusing to start" in proc.stderr
    with pytest.raises(SchemaVersionError, match="newer"):
        schema_mod.install(db, fresh_schema)
    assert "newer than this sa-jobs knows" in check_drift(db, fresh_schema)[0]


class DowngradedTick(Job, kind="downgraded_tick", queue="downgraded_q"):
    """Fired by a worker whose schema is then downgraded under it (never claimed here)."""


@DowngradedTick.handler
def downgraded_tick(ctx: Any) -> None:
    return None


def test_a_worker_whose_schema_is_downgraded_under_it_says_why_once(db: str, fresh_schema: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A rollback run with this release's workers still up (``alembic downgrade sa_jobs@-1``):
    each maintenance tick then fails on what the older schema lacks. The first failure
    names the versions, once, at ERROR; the next ones are one line each. Each tick logged
    a WARNING with a traceback that named only the missing column (reproduced with two
    worker processes: 31 tracebacks in 10 s at a 0.5 s interval)."""
    schema_mod.install(db, fresh_schema)
    # Below version 14, whose periodic.schedule the leader's firing writes (version 15's
    # downgrade takes away only what the worker never uses: it runs on as before).
    below = 13
    errors = LoopErrors()
    fired = sql.SQL("SELECT count(*) FROM {} WHERE kind = 'downgraded_tick'").format(sql.Identifier(fresh_schema, "jobs"))

    def downgrade() -> None:
        with psycopg.connect(db, autocommit=True) as conn, conn.transaction():
            for version in range(schema_mod.LATEST_VERSION, below, -1):
                for stmt in schema_mod.downgrade_statements(version, fresh_schema):
                    conn.execute(stmt)

    async def main() -> None:
        periodic = PeriodicJobs([Periodic("* * * * * *", DowngradedTick, name="downgraded_tick")])
        async with Worker(db, kinds=[DowngradedTick], queues={"other": 1}, schema=fresh_schema, observer=errors,
                          maintenance=[periodic], lease=2.0, poll_interval=0.2, maintenance_interval=0.1):
            await until_in_thread(lambda: run_sql(db, fired)[0][0] >= 1)
            await anyio.to_thread.run_sync(downgrade)
            await until(lambda: errors.seen.count("maintenance") >= 5)

    with caplog.at_level(logging.INFO, logger="sa_jobs"):
        anyio.run(main)
    failures = [r for r in caplog.records if r.name == "sa_jobs.maintenance" and r.levelno >= logging.WARNING]
    assert len(failures) >= 5
    assert [r.levelno for r in failures] == [logging.ERROR] + [logging.WARNING] * (len(failures) - 1)
    assert failures[0].getMessage() == (
        f"maintenance failed (UndefinedColumn (SQLSTATE 42703)): the sa-jobs schema {fresh_schema!r} is now at"
        f" version {below} and this sa-jobs runs on version {schema_mod.LATEST_VERSION}; it was migrated while"
        f" this worker ran, and this worker's maintenance fails until the schema and the release match again"
        f" (restart it with the release of version {below}, or migrate back to {schema_mod.LATEST_VERSION})")
    assert [r for r in failures if r.exc_info] == []


def test_a_worker_on_a_newer_schema_that_admits_it_does_not_blame_a_migration_for_a_missing_object(
        db: str, fresh_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """A worker of this release on a newer schema whose floor admits it (it started there
    with one WARNING): such a version keeps everything this release uses, so a missing
    object there is not the migration's doing. The ERROR said the schema "was migrated
    while this worker ran" and that maintenance fails "until the schema and the release
    match again (restart it with the release of version N+1, or migrate back to N)":
    neither true (it started on that version, and the version admits it). It says the
    schema lacks something the version promised, and how to check it, once."""
    schema_mod.install(db, fresh_schema)
    newer = schema_mod.LATEST_VERSION + 1
    run_sql(db, sql.SQL("INSERT INTO {} (version, description, runs_from) VALUES (%s, 'a newer release', %s)").format(
        sql.Identifier(fresh_schema, "schema_version")), (newer, schema_mod.LATEST_VERSION))
    errors = LoopErrors()
    fired = sql.SQL("SELECT count(*) FROM {} WHERE kind = 'downgraded_tick'").format(sql.Identifier(fresh_schema, "jobs"))

    async def main() -> None:
        periodic = PeriodicJobs([Periodic("* * * * * *", DowngradedTick, name="downgraded_tick")])
        async with Worker(db, kinds=[DowngradedTick], queues={"other": 1}, schema=fresh_schema, observer=errors,
                          maintenance=[periodic], lease=2.0, poll_interval=0.2, maintenance_interval=0.1):
            await until_in_thread(lambda: run_sql(db, fired)[0][0] >= 1)
            # A hand change (or a faulty newer migration): what the leader's firing writes.
            await anyio.to_thread.run_sync(run_sql, db, sql.SQL("ALTER TABLE {} DROP COLUMN schedule").format(
                sql.Identifier(fresh_schema, "periodic")))
            await until(lambda: errors.seen.count("maintenance") >= 3)

    with caplog.at_level(logging.INFO, logger="sa_jobs"):
        anyio.run(main)
    failures = [r for r in caplog.records if r.name == "sa_jobs.maintenance" and r.levelno >= logging.WARNING]
    assert len(failures) >= 3
    assert [r.levelno for r in failures] == [logging.ERROR] + [logging.WARNING] * (len(failures) - 1)
    assert failures[0].getMessage() == (
        f"maintenance failed (UndefinedColumn (SQLSTATE 42703)): the sa-jobs schema {fresh_schema!r} is at version"
        f" {newer}, which lets releases of version {schema_mod.LATEST_VERSION} and later run on it, but it lacks"
        f" something this release's maintenance uses (see the traceback), which that version promises to keep:"
        f" it was changed by hand or by a faulty migration, and this worker's maintenance fails until it is"
        f" repaired (a release that knows version {newer} can check it: `sa-jobs check --schema {fresh_schema}`)")
    # The missing object is named once, in the first failure's traceback.
    assert failures[0].exc_info and 'column "schedule"' in str(failures[0].exc_info[1])
    assert [r for r in failures[1:] if r.exc_info] == []


def test_a_worker_whose_schema_is_uninstalled_under_it_says_so_once(db: str, fresh_schema: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """``sa-jobs uninstall`` with a worker still up: the version read after the failed
    tick is 0, which the message gave as a version to run ("restart it with the release of
    version 0"). It says the schema is gone, once at ERROR, then one line per tick."""
    schema_mod.install(db, fresh_schema)
    errors = LoopErrors()
    fired = sql.SQL("SELECT count(*) FROM {} WHERE kind = 'downgraded_tick'").format(sql.Identifier(fresh_schema, "jobs"))

    async def main() -> None:
        periodic = PeriodicJobs([Periodic("* * * * * *", DowngradedTick, name="downgraded_tick")])
        async with Worker(db, kinds=[DowngradedTick], queues={"other": 1}, schema=fresh_schema, observer=errors,
                          maintenance=[periodic], lease=2.0, poll_interval=0.2, maintenance_interval=0.1):
            await until_in_thread(lambda: run_sql(db, fired)[0][0] >= 1)
            await anyio.to_thread.run_sync(schema_mod.uninstall, db, fresh_schema)
            await until(lambda: errors.seen.count("maintenance") >= 3)

    with caplog.at_level(logging.INFO, logger="sa_jobs"):
        anyio.run(main)
    failures = [r for r in caplog.records if r.name == "sa_jobs.maintenance" and r.levelno >= logging.WARNING]
    assert len(failures) >= 3
    assert [r.levelno for r in failures] == [logging.ERROR] + [logging.WARNING] * (len(failures) - 1)
    assert failures[0].getMessage() == (
        f"maintenance failed (UndefinedTable (SQLSTATE 42P01)): the sa-jobs schema {fresh_schema!r} is no longer"
        f" installed; it was removed while this worker ran, and this worker's maintenance fails until it is"
        f" installed again (stop this worker, or install version {schema_mod.LATEST_VERSION})")
    assert [r for r in failures if r.exc_info] == []


async def until_in_thread(check: Any, within: float = 10) -> None:
    """:func:`until` for a check that blocks (a query): polled in a thread."""
    with anyio.fail_after(within):
        while not await anyio.to_thread.run_sync(check):
            await anyio.sleep(0.05)


# ---- upgrades ----------------------------------------------------------------------


# sha256 (first 16 hex digits) of each released version's up, concurrent and down DDL.
RELEASED_DDL = {1: "e492cd917392231c", 2: "b854f3bd5c7647c0", 3: "873901e8e7d8fc06", 4: "de5862bdcba22fca",
                5: "f18c6ac3842f7bc4", 6: "4437b63ff3e2a494", 7: "5a6019fbe3810826",
                8: "de414af1ca925522", 9: "a3a3eeb95fd75b50", 10: "a8a29dbb859a3d58",
                11: "b7280b6e6d9f8591", 12: "ef615aa0cc9f790b", 13: "d0992d79e9a056b8",
                14: "9a16ac80d416bfdc", 15: "19002abfb351be01"}


@pytest.mark.parametrize("version", sorted(RELEASED_DDL))
def test_a_released_version_keeps_its_ddl(version: int) -> None:
    """Databases installed at a version must keep matching it (``sa-jobs check``, the
    downgrade path): a change to released DDL belongs in a new version, with the old
    text kept for the old one (sa_jobs.schema._claim_function takes the version)."""
    text = "\n".join(schema_mod.upgrade_statements(version) + schema_mod.concurrent_statements(version)
                     + schema_mod.downgrade_statements(version))
    assert hashlib.sha256(text.encode()).hexdigest()[:16] == RELEASED_DDL[version]


def test_every_concurrent_statement_can_be_rerun() -> None:
    for m in schema_mod.MIGRATIONS:
        for stmt in schema_mod.concurrent_statements(m.version, "q"):
            assert ("CONCURRENTLY IF NOT EXISTS" in stmt or stmt.startswith("DROP INDEX CONCURRENTLY IF EXISTS")
                    or stmt.startswith("DO $sa_jobs$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_index")), stmt


def test_fresh_install_reaches_latest_without_drift(db: str, fresh_schema: str) -> None:
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == []
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION  # idempotent


def test_upgrade_from_v1_with_jobs_loses_nothing(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema, to_version=1)
    insert_jobs(db, fresh_schema)
    before = job_rows(db, fresh_schema)
    assert len(before) == 300

    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION

    assert job_rows(db, fresh_schema) == before
    valid = run_sql(db, "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                    (f"{fresh_schema}.{schema_mod.STATE_FINISHED_INDEX}",))
    assert valid == [(True,)]
    assert check_drift(db, fresh_schema) == []
    # The identity sequence carried over: a new job gets the next id, not a duplicate.
    insert_jobs(db, fresh_schema, 1)
    assert job_rows(db, fresh_schema)[-1]["id"] == before[-1]["id"] + 1


def test_install_heals_a_crash_between_the_two_phases(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema)
    # Version 13 recorded, index never built: what a crash before CONCURRENTLY leaves.
    run_sql(db, sql.SQL("DROP INDEX {}").format(sql.Identifier(fresh_schema, schema_mod.STATE_FINISHED_INDEX)))
    assert any(schema_mod.STATE_FINISHED_INDEX in line and "missing" in line for line in check_drift(db, fresh_schema))
    schema_mod.install(db, fresh_schema)
    assert check_drift(db, fresh_schema) == []


def test_install_heals_a_version_whose_index_a_later_version_replaced(db: str, fresh_schema: str) -> None:
    """Version 4 builds jobs_partition_idx and jobs_running_partition_idx; version 8 drops
    the latter. A missing v4 index re-runs v4's statements, which rebuild the dropped one
    too: v8's must then run again and drop it, and an install with nothing missing must
    rebuild neither."""
    schema_mod.install(db, fresh_schema)
    index = sql.Identifier(fresh_schema, schema_mod.PARTITION_INDEX)
    run_sql(db, sql.SQL("DROP INDEX {}").format(index))
    schema_mod.install(db, fresh_schema)
    assert check_drift(db, fresh_schema) == []
    # A leftover of the replaced indexes (a crash between v8's build and its drops).
    run_sql(db, sql.SQL("CREATE INDEX {} ON {} (lease_expires_at) WHERE state = 'running'").format(
        sql.Identifier(schema_mod.LEASE_INDEX), sql.Identifier(fresh_schema, "jobs")))
    assert any(schema_mod.LEASE_INDEX in line for line in check_drift(db, fresh_schema))
    schema_mod.install(db, fresh_schema)
    assert check_drift(db, fresh_schema) == []


def test_a_rerun_rebuilds_an_index_whose_concurrent_build_was_killed(db: str, fresh_schema: str) -> None:
    """An upgrade whose CREATE INDEX CONCURRENTLY dies in the server (a terminated
    backend, a statement_timeout, a restart) leaves an invalid index of that name, which
    IF NOT EXISTS skips: the re-run must rebuild it, not report success while unique
    enqueues fail for want of a valid arbiter index."""
    schema_mod.install(db, fresh_schema, to_version=2)
    insert_jobs(db, fresh_schema, 50)
    # A repeatable-read snapshot: every concurrent build waits for it to end.
    with psycopg.connect(db) as holder:
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")
        installer = subprocess.Popen(
            [sys.executable, "-c", "import sys; from sa_jobs import schema; schema.install(sys.argv[1], sys.argv[2])",
             db, fresh_schema], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        building = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()" \
                   " AND query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock'"
        assert wait_for(lambda: bool(run_sql(db, building)), timeout=30), installer.communicate()
        run_sql(db, "SELECT pg_terminate_backend(pid) FROM (" + building + ") b")
        assert installer.wait(timeout=30) != 0
    index = f"{fresh_schema}.{schema_mod.UNIQUE_INDEX}"
    invalid = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)"
    assert run_sql(db, invalid, (index,)) == [(False,)]  # what the killed build left

    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION

    assert run_sql(db, invalid, (index,)) == [(True,)]
    assert check_drift(db, fresh_schema) == []
    run_sql(db, sql.SQL("INSERT INTO {} (kind, unique_key, unique_states) VALUES ('k', 'once', '{{available}}')"
                        " ON CONFLICT (kind, unique_key) WHERE " + schema_mod.UNIQUE_PREDICATE + " DO NOTHING"
                        ).format(sql.Identifier(fresh_schema, "jobs")))


def test_an_upgrade_past_version_8_does_not_build_the_indexes_it_drops() -> None:
    """Version 4 builds jobs_running_partition_idx and version 8 drops it: an install
    that goes from below 4 to 8 must not read the table to build it for nothing."""
    built = f'IF NOT EXISTS "{schema_mod.RUNNING_PARTITION_INDEX}"'
    assert built in schema_mod.install_sql(to_version=7)
    assert built not in schema_mod.install_sql()
    assert built not in schema_mod.install_sql(from_version=3)
    assert any(built in s for s in schema_mod.concurrent_statements(4))
    assert not any(built in s for s in schema_mod.concurrent_statements(4, upto=8))
    assert any(schema_mod.PARTITION_INDEX in s for s in schema_mod.concurrent_statements(4, upto=8))


def test_uninstall_leaves_out_the_index_rebuilds_of_a_downgrade() -> None:
    """Stepping down from 8 rebuilds the two indexes v8 replaced; uninstall, which drops
    the table a few steps later, must not read the table to build them."""
    rebuilt = {schema_mod.LEASE_INDEX, schema_mod.RUNNING_PARTITION_INDEX}
    down = schema_mod.downgrade_statements(8)
    assert {n for n in rebuilt if any(s.startswith("CREATE INDEX") and f'"{n}"' in s for s in down)} == rebuilt
    assert not any("CREATE" in s for s in schema_mod.downgrade_statements(8, rebuild_indexes=False))
    assert [s for s in down if not s.startswith("CREATE")] == schema_mod.downgrade_statements(8, rebuild_indexes=False)


def test_uninstall_builds_no_index(db: str, fresh_schema: str) -> None:
    """End to end: an event trigger (this module's own database) logs every CREATE INDEX
    that uninstall() runs; stepping down through v8 must not rebuild anything."""
    schema_mod.install(db, fresh_schema)
    run_sql(db, "CREATE TABLE public.index_builds (object text)")
    run_sql(db, "CREATE FUNCTION public.log_index_builds() RETURNS event_trigger LANGUAGE plpgsql AS $$"
                " BEGIN INSERT INTO public.index_builds SELECT object_identity FROM pg_event_trigger_ddl_commands();"
                " END $$")
    run_sql(db, "CREATE EVENT TRIGGER log_index_builds ON ddl_command_end WHEN TAG IN ('CREATE INDEX')"
                " EXECUTE FUNCTION public.log_index_builds()")
    try:
        run_sql(db, sql.SQL("CREATE INDEX probe_idx ON {} (id)").format(sql.Identifier(fresh_schema, "jobs")))
        assert run_sql(db, "SELECT count(*) FROM public.index_builds") == [(1,)]  # the trigger sees builds
        schema_mod.uninstall(db, fresh_schema)
        assert run_sql(db, "SELECT object FROM public.index_builds") == [(f"{fresh_schema}.probe_idx",)]
    finally:
        run_sql(db, "DROP EVENT TRIGGER IF EXISTS log_index_builds")
        run_sql(db, "DROP FUNCTION IF EXISTS public.log_index_builds()")
        run_sql(db, "DROP TABLE IF EXISTS public.index_builds")


def test_a_failed_build_of_the_running_index_keeps_the_indexes_it_replaces(db: str, fresh_schema: str) -> None:
    """A killed CREATE INDEX CONCURRENTLY leaves an invalid index, which IF NOT EXISTS
    skips on the re-run: version 8 must stop there rather than drop the two indexes it
    replaces and leave the rescuer and the limit counts with no valid index."""
    schema_mod.install(db, fresh_schema, to_version=7)
    jobs = sql.Identifier(fresh_schema, "jobs")
    run_sql(db, sql.SQL("INSERT INTO {} (kind) VALUES ('k'), ('k')").format(jobs))
    # What a failed build leaves: an invalid index of that name (here, a unique one that
    # met a duplicate).
    with pytest.raises(psycopg.errors.UniqueViolation):
        run_sql(db, sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (kind)").format(
            sql.Identifier(schema_mod.RUNNING_INDEX), jobs))
    # The statements as `migrate --sql` and `alembic upgrade --sql` emit them: no drop first.
    with pytest.raises(psycopg.errors.RaiseException, match="missing or invalid"):
        with psycopg.connect(db, autocommit=True) as conn:
            for stmt in schema_mod.concurrent_statements(8, fresh_schema):
                conn.execute(stmt)
    names = {r[0] for r in run_sql(db, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (fresh_schema,))}
    assert {schema_mod.LEASE_INDEX, schema_mod.RUNNING_PARTITION_INDEX} <= names
    # install() drops the invalid index and builds it again before the drops.
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == []


def test_upgrade_from_v7_keeps_running_jobs_counted(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema, to_version=7)
    run_sql(db, sql.SQL("INSERT INTO {} (kind, queue, partition_key, state, claim_token, lease_expires_at, attempt)"
                        " SELECT 'k', 'q', 'key' || (g % 3), 'running', gen_random_uuid(),"
                        " now() - interval '1 minute', 1 FROM generate_series(1, 30) g"
                        ).format(sql.Identifier(fresh_schema, "jobs")))
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == []
    names = {r[0] for r in run_sql(db, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (fresh_schema,))}
    assert schema_mod.RUNNING_INDEX in names
    assert not names & {schema_mod.LEASE_INDEX, schema_mod.RUNNING_PARTITION_INDEX}
    # The rescuer reads the new index: the 30 expired leases are found and re-driven.
    rescued = run_sql(db, Queries.for_schema(fresh_schema).rescue_expired, {"limit": 100})
    assert len(rescued) == 30


def test_upgrade_from_v9_indexes_resting_jobs_by_state_and_kind(db: str, fresh_schema: str) -> None:
    """v10 replaces (kind, state) over every row with (state, kind) over resting states:
    after the upgrade a lookup of dead jobs by kind reads the new index, and only it."""
    schema_mod.install(db, fresh_schema, to_version=9)
    insert_jobs(db, fresh_schema, 700)
    before = job_rows(db, fresh_schema)
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert job_rows(db, fresh_schema) == before
    assert check_drift(db, fresh_schema) == []
    names = {r[0] for r in run_sql(db, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (fresh_schema,))}
    assert schema_mod.STATE_KIND_INDEX in names and schema_mod.KIND_STATE_INDEX not in names
    jobs = sql.Identifier(fresh_schema, "jobs")
    with psycopg.connect(db, autocommit=True) as conn, conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(r[0] for r in conn.execute(sql.SQL(
            "EXPLAIN SELECT id FROM {} WHERE state = 'dead' AND kind = 'k1'").format(jobs)).fetchall())
        assert schema_mod.STATE_KIND_INDEX in plan, plan
        # Every resting row is in it: 4 of the 7 states, 100 rows each.
        resting = conn.execute(sql.SQL(
            "SELECT count(*) FROM {} WHERE state IN ('scheduled', 'retryable', 'cancelled', 'dead')").format(jobs)).fetchone()
        assert resting == (400,)


def test_upgrade_from_v12_indexes_finished_jobs_by_state(db: str, fresh_schema: str) -> None:
    """v13 replaces (finished_at) over finished rows with (state, finished_at): after the
    upgrade a pruning batch of completed jobs reads its own range, not the older dead rows
    first; a crash between the build and the drop (both indexes there) heals on re-run."""
    schema_mod.install(db, fresh_schema, to_version=12)
    jobs = sql.Identifier(fresh_schema, "jobs")
    run_sql(db, sql.SQL("INSERT INTO {} (kind, state, finished_at) SELECT 'k', 'dead', now() - interval '400 days'"
                        " FROM generate_series(1, 3000)").format(jobs))
    run_sql(db, sql.SQL("INSERT INTO {} (kind, state, finished_at) SELECT 'k', 'completed', now() - interval '9 days'"
                        " FROM generate_series(1, 20)").format(jobs))
    before = job_rows(db, fresh_schema)
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert job_rows(db, fresh_schema) == before
    assert check_drift(db, fresh_schema) == []

    def names() -> set[str]:
        return {r[0] for r in run_sql(db, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (fresh_schema,))}

    assert schema_mod.STATE_FINISHED_INDEX in names() and schema_mod.FINISHED_INDEX not in names()
    run_sql(db, sql.SQL("ANALYZE {}").format(jobs))
    with psycopg.connect(db, autocommit=True) as conn, conn.transaction(force_rollback=True):
        (plan,) = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + delete_statement(fresh_schema).as_string(),
                               {"state": "completed", "age": 86400.0, "limit": 5}).fetchone()
    text = json.dumps(plan)
    assert schema_mod.STATE_FINISHED_INDEX in text and '"Rows Removed by Filter": 3000' not in text, text
    # A crash after the build, before the drop: the old index is back as drift, and a re-run drops it.
    for stmt in schema_mod.downgrade_statements(13, fresh_schema)[:1]:
        run_sql(db, stmt)
    assert {schema_mod.STATE_FINISHED_INDEX, schema_mod.FINISHED_INDEX} <= names()
    assert any(schema_mod.FINISHED_INDEX in line for line in check_drift(db, fresh_schema))
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == [] and schema_mod.FINISHED_INDEX not in names()
    # And back down: v12's index is rebuilt, v13's dropped.
    with psycopg.connect(db, autocommit=True) as conn, conn.transaction():
        for version in range(schema_mod.LATEST_VERSION, 12, -1):
            for stmt in schema_mod.downgrade_statements(version, fresh_schema):
                conn.execute(stmt)
    assert schema_mod.FINISHED_INDEX in names() and schema_mod.STATE_FINISHED_INDEX not in names()
    assert check_drift(db, fresh_schema)[1:] == []


def test_a_failed_build_of_the_state_finished_index_keeps_the_finished_index(db: str, fresh_schema: str) -> None:
    """As for v8: a killed build leaves an invalid jobs_state_finished_idx; v13's statements
    stop before dropping jobs_finished_idx, and install() rebuilds it, then drops the old."""
    schema_mod.install(db, fresh_schema, to_version=12)
    jobs = sql.Identifier(fresh_schema, "jobs")
    run_sql(db, sql.SQL("INSERT INTO {} (kind) VALUES ('k'), ('k')").format(jobs))
    with pytest.raises(psycopg.errors.UniqueViolation):
        run_sql(db, sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (kind)").format(
            sql.Identifier(schema_mod.STATE_FINISHED_INDEX), jobs))
    with pytest.raises(psycopg.errors.RaiseException, match="missing or invalid"):
        with psycopg.connect(db, autocommit=True) as conn:
            for stmt in schema_mod.concurrent_statements(13, fresh_schema):
                conn.execute(stmt)
    names = {r[0] for r in run_sql(db, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (fresh_schema,))}
    assert schema_mod.FINISHED_INDEX in names
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == []


def test_migrate_sql_output_applies_to_the_same_schema(db: str, fresh_schema: str) -> None:
    script = schema_mod.install_sql(fresh_schema)
    assert script.index("COMMIT;") < script.index("CREATE INDEX CONCURRENTLY")
    with psycopg.connect(db, autocommit=True) as conn:
        # One statement per call: CONCURRENTLY refuses the implicit transaction of a
        # multi-statement string, just as it would in psql's single-transaction mode.
        for stmt in script.split(";\n"):
            if stmt.strip():
                conn.execute(stmt)
    assert schema_mod.installed_version(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == []


def _migrate_sql(schema: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sa_jobs", "migrate", "--sql", "--schema", schema, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def _psql(url: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url],
                          input=script, capture_output=True, text=True, timeout=60)


def test_migrate_sql_upgrades_an_installed_schema_from_its_version(db: str, fresh_schema: str) -> None:
    """``sa-jobs migrate --sql`` printed a fresh install only: applied by hand to an
    installed schema it failed at its CREATE TABLE (or, without ON_ERROR_STOP, changed
    nothing while psql went on), so a team that applies SQL by hand could not upgrade.
    ``--from-version N`` prints versions N+1 to the latest, behind a check that the
    schema is at N: applied to one at another version it stops before any change."""
    schema_mod.install(db, fresh_schema, to_version=3)
    insert_jobs(db, fresh_schema, 70)
    before = job_rows(db, fresh_schema)

    wrong = _migrate_sql(fresh_schema, "--from-version", "4")
    assert wrong.returncode == 0, wrong.stderr
    refused = _psql(db, wrong.stdout)
    assert refused.returncode != 0 and "is at sa-jobs version 3, not 4" in refused.stderr, refused.stderr
    assert schema_mod.installed_version(db, fresh_schema) == 3

    script = _migrate_sql(fresh_schema, "--from-version", "3")
    assert script.returncode == 0, script.stderr
    assert "jobs_running_partition_idx\" ON" not in script.stdout  # version 8 drops it
    applied = _psql(db, script.stdout)
    assert applied.returncode == 0, applied.stderr
    assert schema_mod.installed_version(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == []
    assert job_rows(db, fresh_schema) == before
    assert _psql(db, _migrate_sql(fresh_schema, "--from-version", str(schema_mod.LATEST_VERSION)).stdout).returncode == 0

    beyond = _migrate_sql(fresh_schema, "--from-version", str(schema_mod.LATEST_VERSION + 1))
    assert beyond.returncode == 2 and "Traceback" not in beyond.stderr, beyond.stderr
    assert "sa-jobs knows schema versions up to" in beyond.stderr


def test_downgrade_steps_back_cleanly(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema)
    with psycopg.connect(db, autocommit=True) as conn, conn.transaction():
        for stmt in schema_mod.downgrade_statements(schema_mod.LATEST_VERSION, fresh_schema):
            conn.execute(stmt)
    below = schema_mod.LATEST_VERSION - 1
    assert schema_mod.installed_version(db, fresh_schema) == below
    assert check_drift(db, fresh_schema) == [
        f"schema {fresh_schema!r} is at sa-jobs version {below}, this sa-jobs expects {schema_mod.LATEST_VERSION};"
        f" run `sa-jobs migrate --schema {fresh_schema}` or `alembic upgrade heads`"
    ]
    schema_mod.uninstall(db, fresh_schema)
    assert run_sql(db, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (fresh_schema,)) == []


def test_uninstall_waits_for_an_installer_that_holds_the_lock(db: str, fresh_schema: str) -> None:
    """uninstall() takes the installers' lock, so it never drops objects from under an
    install or upgrade in progress."""
    schema_mod.install(db, fresh_schema)
    waiting = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
               " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    with psycopg.connect(db) as installer:  # a transaction open, as an installer's is
        installer.execute(schema_mod.lock_statement(fresh_schema))
        done = threading.Event()
        thread = threading.Thread(target=lambda: (schema_mod.uninstall(db, fresh_schema), done.set()))
        thread.start()
        deadline = time.monotonic() + 10
        while run_sql(db, waiting) != [(1,)] and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not done.is_set(), "uninstall did not wait for the installer's lock"
        assert run_sql(db, waiting) == [(1,)]
        installer.rollback()
    thread.join(10)
    assert done.is_set()
    assert schema_mod.installed_version(db, fresh_schema) == 0


def test_uninstall_keeps_a_schema_shared_with_app_tables(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema)
    run_sql(db, sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(fresh_schema, "orders")))
    schema_mod.uninstall(db, fresh_schema)
    tables = run_sql(db, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (fresh_schema,))
    assert tables == [("orders",)]


# ---- drift -------------------------------------------------------------------------


HAND_CHANGES: dict[str, tuple[str, str]] = {
    # name: (SQL with {s} for the quoted schema, the object the drift line must name)
    "dropped index": ("DROP INDEX {s}.jobs_claim_idx", "index jobs_claim_idx is missing"),
    "changed predicate": (
        "DROP INDEX {s}.jobs_running_idx; CREATE INDEX jobs_running_idx ON {s}.jobs (queue, partition_key, lease_expires_at)",
        "index jobs_running_idx differs",
    ),
    "extra index": ("CREATE INDEX mine ON {s}.jobs (kind)", "index mine is not part of the sa-jobs schema"),
    "disabled trigger": ("ALTER TABLE {s}.jobs DISABLE TRIGGER jobs_notify_inserted", "trigger jobs_notify_inserted differs"),
    "retyped column": ("ALTER TABLE {s}.jobs ALTER COLUMN priority TYPE integer", "column jobs.priority differs"),
    "dropped column": ("ALTER TABLE {s}.jobs DROP COLUMN progress", "column jobs.progress is missing"),
    "dropped check": ("ALTER TABLE {s}.jobs DROP CONSTRAINT jobs_state_check", "constraint jobs_state_check is missing"),
    # The other tables the worker reads: the claim's queue settings, the periodic slots.
    "dropped queue column": ("ALTER TABLE {s}.queues DROP COLUMN paused", "column queues.paused is missing"),
    "periodic column nullable": (
        "ALTER TABLE {s}.periodic ALTER COLUMN last_slot DROP NOT NULL", "column periodic.last_slot differs"),
    "silenced function": (
        "CREATE OR REPLACE FUNCTION {s}.notify_jobs_inserted() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RETURN NULL; END $$",
        "function notify_jobs_inserted() differs",
    ),
    # A setting, which the function's text does not show.
    "function setting": (
        "ALTER FUNCTION {s}.claim_limited(text, integer, uuid, text, double precision, integer,"
        " smallint, timestamptz, bigint)"
        " RESET plan_cache_mode",
        "function claim_limited(p_queue text",
    ),
}


@pytest.mark.parametrize("change", sorted(HAND_CHANGES))
def test_drift_names_each_hand_made_change(db: str, installed: str, change: str) -> None:
    assert check_drift(db, installed) == []
    statement, expected = HAND_CHANGES[change]
    run_sql(db, statement.format(s=sql.Identifier(installed).as_string()))
    lines = check_drift(db, installed)
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_drift_reports_a_missing_schema_and_rejects_bad_names(db: str, fresh_schema: str) -> None:
    assert check_drift(db, fresh_schema) == [
        f"schema {fresh_schema!r} has no sa-jobs schema installed;"
        f" run `sa-jobs migrate --schema {fresh_schema}` or `alembic upgrade heads`"
    ]
    with pytest.raises(InvalidIdentifierError):
        check_drift(db, 'x"; DROP SCHEMA public; --')


@pytest.mark.parametrize("name", ["information_schema", "pg_jobs", "pg_temp"])
def test_a_system_schema_name_is_refused_before_any_sql(db: str, name: str) -> None:
    """``information_schema`` passed the name check and a superuser's migrate installed the
    queue there, where pg_dump never looks: every job was left out of the backups without
    a word. ``pg_*`` names failed later, as the server's error (or, for ``pg_temp``, read
    the session's temporary schema)."""
    with pytest.raises(InvalidIdentifierError, match="system schema"):
        schema_mod.install(db, name)
    with pytest.raises(InvalidIdentifierError, match="system schema"):
        check_drift(db, name)
    assert run_sql(db, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                       " WHERE n.nspname = 'information_schema' AND c.relname = 'jobs'") == [(0,)]


def test_drift_leaves_no_scratch_schema_behind(db: str, installed: str) -> None:
    check_drift(db, installed)
    assert run_sql(db, "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sa\\_jobs\\_drift\\_%'") == []


def test_a_reserved_word_schema_is_quoted_everywhere(db: str) -> None:
    """``user`` only works if every statement quotes it; drift must agree with itself too."""
    assert schema_mod.install(db, "user") == schema_mod.LATEST_VERSION
    insert_jobs(db, "user", 5)
    assert check_drift(db, "user") == []
    schema_mod.uninstall(db, "user")
    assert schema_mod.installed_version(db, "user") == 0


def test_check_command_exits_1_on_drift_and_0_without(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sa_jobs", "check", "--database-url", db, "--schema", fresh_schema],
            capture_output=True, text=True, timeout=60,
        )

    clean = check()
    assert clean.returncode == 0 and "no drift" in clean.stdout, clean.stdout + clean.stderr
    run_sql(db, sql.SQL("DROP INDEX {}").format(sql.Identifier(fresh_schema, "jobs_claim_idx")))
    drifted = check()
    assert drifted.returncode == 1 and "jobs_claim_idx" in drifted.stdout, drifted.stdout + drifted.stderr


@pytest.mark.parametrize("second", ["install 4", "uninstall"])
def test_an_installer_coming_in_during_an_index_build_waits_for_it(db: str, fresh_schema: str, second: str) -> None:
    """While one installer builds an index CONCURRENTLY (here v3's, which a crash between
    the phases left unbuilt), a newer release's installer upgrading to v4 alters the table
    (or an uninstall drops it): it waited for the build's table lock, the build waited for
    its transaction to end, and PostgreSQL failed one of the two with "deadlock detected"."""
    schema_mod.install(db, fresh_schema, to_version=3)
    run_sql(db, sql.SQL("DROP INDEX {}").format(sql.Identifier(fresh_schema, schema_mod.UNIQUE_INDEX)))

    def installer(name: str, call: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", f"import sys; from sa_jobs import schema; schema.{call}", db, fresh_schema],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "PGAPPNAME": f"{fresh_schema}_{name}"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def query_of(name: str) -> str:
        rows = run_sql(db, "SELECT coalesce(wait_event_type, '') || ' ' || query FROM pg_stat_activity"
                           " WHERE application_name = %s", (f"{fresh_schema}_{name}",))
        return rows[0][0] if rows else ""

    calls = {"install 3": "install(sys.argv[1], sys.argv[2], to_version=3)",
             "install 4": "install(sys.argv[1], sys.argv[2], to_version=4)", "uninstall": "uninstall(sys.argv[1], sys.argv[2])"}
    installers: dict[str, subprocess.Popen[str]] = {}
    try:
        # An enqueue in flight, which the concurrent build waits for.
        with psycopg.connect(db) as writer:
            writer.execute(sql.SQL("INSERT INTO {} (kind) VALUES ('k')").format(sql.Identifier(fresh_schema, "jobs")))
            installers["install 3"] = installer("3", calls["install 3"])
            assert wait_for(lambda: query_of("3").startswith("Lock CREATE UNIQUE INDEX CONCURRENTLY"), 30), query_of("3")
            installers[second] = installer("2nd", calls[second])
            # Waiting in its DDL transaction, or polling for its turn outside any.
            assert wait_for(lambda: query_of("2nd").startswith("Lock ") or "pg_try_advisory_lock" in query_of("2nd"),
                            30), query_of("2nd")
            writer.commit()
        outputs = {v: p.communicate(timeout=60)[0] for v, p in installers.items()}
    finally:
        for p in installers.values():
            if p.poll() is None:
                p.kill()
    assert {v: p.returncode for v, p in installers.items()} == {"install 3": 0, second: 0}, outputs
    assert schema_mod.installed_version(db, fresh_schema) == (4 if second == "install 4" else 0)
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION
    assert check_drift(db, fresh_schema) == []


# ---- DDL behind a long transaction: bounded lock waits, not a stalled queue -----------

# What a claim may wait behind an upgrade's pending ACCESS EXCLUSIVE lock: the default
# lock_timeout (2 s) and some slack; without one it waited for as long as the blocker lived.
CLAIM_STALL_BOUND = 5.0


def _hold_jobs_table(url: str, schema: str) -> psycopg.Connection[Any]:
    """A session in an open transaction that read the jobs table (a report, a long
    handler): it holds ACCESS SHARE, which an ALTER TABLE waits for."""
    conn = psycopg.connect(url)
    conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "jobs")))
    return conn


def _ddl_waiting(url: str, schema: str) -> bool:
    return bool(run_sql(url, "SELECT 1 FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock'"
                             " AND relation = to_regclass(%s)", (sql.Identifier(schema, "jobs").as_string(),)))


def _claim_seconds(url: str, schema: str) -> float:
    """How long a claim-like statement takes (inf: still waiting after the bound and more)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{int(CLAIM_STALL_BOUND * 3000)}ms",))
        started = time.monotonic()
        try:
            conn.execute(sql.SQL("SELECT id FROM {} WHERE state = 'available' ORDER BY id LIMIT 1"
                                 " FOR UPDATE SKIP LOCKED").format(sql.Identifier(schema, "jobs")))
        except psycopg.errors.QueryCanceled:
            return float("inf")
        return time.monotonic() - started


def test_an_upgrade_behind_a_long_transaction_does_not_stall_claims(db: str, fresh_schema: str) -> None:
    """v3 alters the jobs table (ACCESS EXCLUSIVE). Behind an open transaction that read
    the table, the ALTER waited, and every claim queued behind it for as long as that
    transaction lived: the whole queue stalled. Now the upgrade's lock waits are short and
    retried, so a claim waits at most one of them, and the upgrade gets through once the
    blocker is gone."""
    schema_mod.install(db, fresh_schema, to_version=2)
    insert_jobs(db, fresh_schema, 20)
    blocker = _hold_jobs_table(db, fresh_schema)
    result: dict[str, Any] = {}

    def upgrade() -> None:
        try:
            result["version"] = schema_mod.install(db, fresh_schema, to_version=3)
        except Exception as exc:  # noqa: BLE001 - asserted below
            result["error"] = exc

    thread = threading.Thread(target=upgrade)
    thread.start()
    try:
        assert wait_for(lambda: _ddl_waiting(db, fresh_schema), timeout=10)
        stalled = _claim_seconds(db, fresh_schema)
    finally:
        blocker.close()
        thread.join(timeout=60)
    assert stalled < CLAIM_STALL_BOUND, f"a claim waited {stalled:.1f}s behind the upgrade"
    assert result == {"version": 3}
    assert check_drift(db, fresh_schema) == [f"schema {fresh_schema!r} is at sa-jobs version 3, this sa-jobs expects"
                                             f" {schema_mod.LATEST_VERSION}; run `sa-jobs migrate --schema"
                                             f" {fresh_schema}` or `alembic upgrade heads`"]


def test_an_upgrade_that_never_gets_its_lock_fails_naming_the_blocker(db: str, fresh_schema: str) -> None:
    from sa_jobs.errors import SchemaLockTimeoutError

    schema_mod.install(db, fresh_schema, to_version=2)
    blocker = _hold_jobs_table(db, fresh_schema)
    try:
        started = time.monotonic()
        with pytest.raises(SchemaLockTimeoutError) as caught:
            schema_mod.install(db, fresh_schema, to_version=3, lock_timeout=0.2, lock_retries=2)
        elapsed = time.monotonic() - started
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert elapsed < 5, elapsed
    assert caught.value.blockers == [pid]
    assert f"pid {pid}" in str(caught.value) and "lock_timeout" in str(caught.value)
    assert schema_mod.installed_version(db, fresh_schema) == 2  # nothing half-applied
    assert schema_mod.install(db, fresh_schema) == schema_mod.LATEST_VERSION


def test_an_upgrade_without_a_lock_timeout_waits_for_the_blocker(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema, to_version=2)
    blocker = _hold_jobs_table(db, fresh_schema)
    timer = threading.Timer(1.0, blocker.close)
    timer.start()
    started = time.monotonic()
    try:
        assert schema_mod.install(db, fresh_schema, to_version=3, lock_timeout=None) == 3
    finally:
        timer.join()
    assert time.monotonic() - started >= 1.0


def test_no_lock_timeout_of_its_own_leaves_the_sessions_and_does_not_retry(db: str, fresh_schema: str) -> None:
    """lock_timeout=0 (no limit of sa-jobs' own) under a URL whose options set one: the
    session's ended the wait and the upgrade was retried five times, then failed saying
    it had waited "5 waits of Nones". The session's timeout now ends it, once, as before."""
    from sa_jobs.errors import SchemaLockTimeoutError

    schema_mod.install(db, fresh_schema, to_version=2)
    blocker = _hold_jobs_table(db, fresh_schema)
    sep = "&" if "?" in db else "?"
    try:
        started = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable):
            schema_mod.install(db + sep + "options=-c%20lock_timeout%3D200", fresh_schema, to_version=3, lock_timeout=0)
        assert time.monotonic() - started < 1.5  # one wait of 0.2 s, no retries with pauses
    except SchemaLockTimeoutError as exc:  # pragma: no cover - the defect
        pytest.fail(f"retried and gave up: {exc}")
    finally:
        blocker.close()
    assert schema_mod.installed_version(db, fresh_schema) == 2


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "2s", True])
def test_a_bad_lock_timeout_is_refused(db: str, fresh_schema: str, bad: Any) -> None:
    from sa_jobs.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        schema_mod.install(db, fresh_schema, lock_timeout=bad)
    with pytest.raises(ConfigurationError):
        schema_mod.install(db, fresh_schema, lock_retries=-1)


def test_migrate_command_takes_a_lock_timeout_and_names_the_blocker(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema, to_version=2)
    blocker = _hold_jobs_table(db, fresh_schema)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sa_jobs", "migrate", "--database-url", db, "--schema", fresh_schema,
             "--lock-timeout", "0.2", "--lock-retries", "1"],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=60)
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert proc.returncode == 2 and f"pid {pid}" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert schema_mod.installed_version(db, fresh_schema) == 2
