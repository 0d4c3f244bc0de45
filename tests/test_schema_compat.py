"""A release on a schema a newer release migrated: it runs when the schema's recorded floor
(``schema_version.runs_from``, version 15 on) admits it, and changes nothing there.

A "newer release" is faked by what its migration would leave behind: a row for version
``LATEST + 1`` in the version table (with the floor it declares), and objects this release
does not know (a column, a table) or no longer finds (an index it dropped).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from typing import Any, Iterator

import anyio
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from sa_jobs import Job, JobContext, Worker
from sa_jobs import schema as schema_mod
from sa_jobs._url import sqlalchemy_url
from sa_jobs.drift import check_drift
from sa_jobs.errors import SchemaVersionError

from .conftest import REPO_ROOT, new_schema_name
from .helpers import FAST

LATEST = schema_mod.LATEST_VERSION
FUTURE = LATEST + 1
# The first version that records its floor; releases from it on read it.
FLOOR_RECORDED_FROM = 15


def run_sql(url: str, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def db(database_url: str) -> Iterator[str]:
    """A database of this module's own: CREATE INDEX CONCURRENTLY waits out every older
    transaction in its database, other suites' included."""
    name = "sa_jobs_c_" + uuid.uuid4().hex[:12]
    run_sql(database_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    run_sql(database_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_schema(db: str) -> Iterator[str]:
    name = new_schema_name()
    yield name
    run_sql(db, sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def migrate_as_a_newer_release(url: str, schema: str, runs_from: int | None) -> None:
    """What a newer release's migration leaves: an index of this release's dropped, a
    column and a table added, and its version recorded with the floor it declares."""
    run_sql(url, sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, schema_mod.STATE_FINISHED_INDEX)))
    run_sql(url, sql.SQL("ALTER TABLE {} ADD COLUMN future_note text").format(sql.Identifier(schema, "jobs")))
    run_sql(url, sql.SQL("CREATE TABLE {} (id integer PRIMARY KEY)").format(sql.Identifier(schema, "future_things")))
    run_sql(url, sql.SQL("INSERT INTO {} (version, description, runs_from) VALUES (%s, 'a newer release', %s)").format(
        sql.Identifier(schema, "schema_version")), (FUTURE, runs_from))


def catalog(url: str, schema: str) -> dict[str, list[tuple[Any, ...]]]:
    """The schema's objects with their oids (a re-created one shows), definitions and the
    version rows: what an installer must leave as it found it."""
    queries = {
        "relations": "SELECT c.oid::bigint, c.relname, c.relkind::text FROM pg_class c"
                     " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s ORDER BY 2",
        "columns": "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a"
                   " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
                   " WHERE n.nspname = %(s)s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY 1, 2",
        "constraints": "SELECT r.conname, pg_get_constraintdef(r.oid) FROM pg_constraint r"
                       " JOIN pg_namespace n ON n.oid = r.connamespace WHERE n.nspname = %(s)s ORDER BY 1",
        "indexes": "SELECT i.relname, x.indisvalid FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
                   " JOIN pg_namespace n ON n.oid = i.relnamespace WHERE n.nspname = %(s)s ORDER BY 1",
        "functions": "SELECT p.oid::bigint, p.proname, p.prosrc, p.proconfig FROM pg_proc p"
                     " JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(s)s ORDER BY 2",
        "triggers": "SELECT t.tgname, t.tgenabled::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s AND NOT t.tgisinternal",
    }
    found = {kind: run_sql(url, query, {"s": schema}) for kind, query in queries.items()}
    found["versions"] = run_sql(url, sql.SQL("SELECT version, description, installed_at, runs_from FROM {}"
                                             " ORDER BY version").format(sql.Identifier(schema, "schema_version")))
    return found


def admitted_line(schema: str) -> str:
    return (f"the sa-jobs schema {schema!r} is at version {FUTURE}, newer than this sa-jobs knows ({LATEST}),"
            f" and lets releases of version {LATEST} and later run on it: running on it (a newer release migrated"
            f" it; finish rolling that release out)")


def sa_jobs_cli(url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sa_jobs", *argv, "--database-url", url], cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=60)


# ---- the floors the migrations declare -------------------------------------------------


def test_each_version_declares_a_floor_no_lower_than_the_previous_ones() -> None:
    """A release older than a version's floor cannot run on the versions after it either:
    what broke it is still there. So floors never fall, and none is above its version."""
    floors = [m.floor for m in schema_mod.MIGRATIONS]
    assert floors == sorted(floors)
    assert all(m.floor <= m.version for m in schema_mod.MIGRATIONS)
    assert [m.version for m in schema_mod.MIGRATIONS if m.runs_from is not None] == list(
        range(FLOOR_RECORDED_FROM, LATEST + 1))
    # Version 15 only adds a nullable column to the version table: version 14's releases may run on it.
    assert schema_mod.migration(FLOOR_RECORDED_FROM).floor == FLOOR_RECORDED_FROM - 1


def test_the_record_reads_the_floor_of_the_newest_version(db: str, fresh_schema: str) -> None:
    """Before version 15 nothing is recorded (the column does not exist): a version's floor is
    itself. From 15 on, the newest row's floor; a row without one admits no older release."""
    assert schema_mod.installed_record(db, fresh_schema) == (0, 0)
    schema_mod.install(db, fresh_schema, to_version=FLOOR_RECORDED_FROM - 1)
    assert schema_mod.installed_record(db, fresh_schema) == (FLOOR_RECORDED_FROM - 1, FLOOR_RECORDED_FROM - 1)
    schema_mod.install(db, fresh_schema)
    assert schema_mod.installed_record(db, fresh_schema) == (LATEST, schema_mod.migration(LATEST).floor)
    assert run_sql(db, sql.SQL("SELECT version, runs_from FROM {} WHERE version >= %s ORDER BY 1").format(
        sql.Identifier(fresh_schema, "schema_version")), (FLOOR_RECORDED_FROM - 1,)) == [
        (FLOOR_RECORDED_FROM - 1, None), *((m.version, m.floor) for m in schema_mod.MIGRATIONS[FLOOR_RECORDED_FROM - 1:])]
    run_sql(db, sql.SQL("INSERT INTO {} (version, description) VALUES (%s, 'no floor')").format(
        sql.Identifier(fresh_schema, "schema_version")), (FUTURE,))
    assert schema_mod.installed_record(db, fresh_schema) == (FUTURE, FUTURE)


def test_the_version_table_refuses_a_floor_above_its_version(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema)
    with pytest.raises(psycopg.errors.CheckViolation):
        run_sql(db, sql.SQL("INSERT INTO {} (version, description, runs_from) VALUES (%s, 'bad', %s)").format(
            sql.Identifier(fresh_schema, "schema_version")), (FUTURE, FUTURE + 1))


# ---- a newer schema that admits this release -------------------------------------------


def test_the_version_check_runs_on_a_newer_schema_that_admits_this_release(
        db: str, fresh_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    schema_mod.install(db, fresh_schema)
    migrate_as_a_newer_release(db, fresh_schema, runs_from=LATEST)
    with caplog.at_level(logging.INFO, logger="sa_jobs"):
        assert schema_mod.check_version(db, fresh_schema) == FUTURE
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, admitted_line(fresh_schema))]
    # A release older than the floor is refused as before.
    with pytest.raises(SchemaVersionError, match="refusing to start"):
        schema_mod.require_version(FUTURE, fresh_schema, runs_from=LATEST + 1)


def test_install_and_migrate_change_nothing_on_a_newer_schema_that_admits_them(
        db: str, fresh_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """An app of the previous release that calls install() at start-up, or its deploy's
    ``sa-jobs migrate``: they succeed and leave the newer schema as it is. Building this
    release's indexes would put back the one the newer version dropped."""
    schema_mod.install(db, fresh_schema)
    migrate_as_a_newer_release(db, fresh_schema, runs_from=LATEST)
    before = catalog(db, fresh_schema)

    with caplog.at_level(logging.INFO, logger="sa_jobs"):
        assert schema_mod.install(db, fresh_schema) == FUTURE
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, admitted_line(fresh_schema))]
    assert schema_mod.install(db, fresh_schema, to_version=3) == FUTURE
    migrate = sa_jobs_cli(db, "migrate", "--schema", fresh_schema)
    assert migrate.returncode == 0, migrate.stderr
    assert migrate.stdout == f"sa-jobs schema {fresh_schema!r} is at version {FUTURE}\n"
    assert admitted_line(fresh_schema) in migrate.stderr and "Traceback" not in migrate.stderr

    assert catalog(db, fresh_schema) == before


class CompatJob(Job, kind="compat_job", queue="compat"):
    """Enqueued and run by this release on a schema a newer release migrated."""


@CompatJob.handler
def compat_job(ctx: JobContext, n: int = 0) -> int:
    return n * 2


def test_a_worker_starts_on_a_newer_schema_that_admits_it_and_completes_jobs(
        db: str, fresh_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    schema_mod.install(db, fresh_schema)
    migrate_as_a_newer_release(db, fresh_schema, runs_from=LATEST)
    engine = create_engine(sqlalchemy_url(db)).execution_options(schema_translate_map={"sa_jobs": fresh_schema})
    with Session(engine) as session, session.begin():
        session.add_all([CompatJob(n=i) for i in range(5)])
    engine.dispose()
    jobs = sql.Identifier(fresh_schema, "jobs")

    async def main() -> None:
        async with Worker(db, kinds=[CompatJob], queues={"compat": 2}, schema=fresh_schema, **FAST):
            with anyio.fail_after(20):
                while run_sql(db, sql.SQL("SELECT count(*) FROM {} WHERE state = 'completed'").format(jobs))[0][0] < 5:
                    await anyio.sleep(0.05)

    with caplog.at_level(logging.INFO, logger="sa_jobs"):
        anyio.run(main)
    assert sorted(r[0] for r in run_sql(db, sql.SQL("SELECT result FROM {}").format(jobs))) == [0, 2, 4, 6, 8]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [admitted_line(fresh_schema)]


def test_operator_commands_run_on_a_newer_schema_that_admits_them(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema)
    migrate_as_a_newer_release(db, fresh_schema, runs_from=LATEST)
    pause = sa_jobs_cli(db, "queues", "pause", "compat", "--schema", fresh_schema)
    assert pause.returncode == 0, pause.stderr
    listed = sa_jobs_cli(db, "queues", "--schema", fresh_schema)
    assert listed.returncode == 0 and "compat" in listed.stdout, listed.stderr
    assert admitted_line(fresh_schema) in listed.stderr and "Traceback" not in listed.stderr


def test_drift_of_a_newer_schema_that_admits_this_release_says_who_can_check_it(db: str, fresh_schema: str) -> None:
    """This release cannot tell the newer release's objects from hand-made changes: it says
    the schema is newer, that it runs on it, and which release can check it (exit 1: not checked)."""
    schema_mod.install(db, fresh_schema)
    migrate_as_a_newer_release(db, fresh_schema, runs_from=LATEST)
    expected = (f"schema {fresh_schema!r} is at sa-jobs version {FUTURE}, newer than this sa-jobs knows ({LATEST});"
                f" it lets this release run on it (releases of version {LATEST} and later), but only a release"
                f" that knows version {FUTURE} can check it for drift")
    assert check_drift(db, fresh_schema) == [expected]
    proc = sa_jobs_cli(db, "check", "--schema", fresh_schema)
    assert proc.returncode == 1 and proc.stdout == expected + "\n", proc.stdout + proc.stderr


# ---- a newer schema that does not -------------------------------------------------------


@pytest.mark.parametrize("runs_from", [FUTURE, None])
def test_a_newer_schema_that_does_not_admit_this_release_is_refused_and_left_alone(
        db: str, fresh_schema: str, runs_from: int | None) -> None:
    schema_mod.install(db, fresh_schema)
    migrate_as_a_newer_release(db, fresh_schema, runs_from=runs_from)
    before = catalog(db, fresh_schema)
    refusal = (f"the sa-jobs schema {fresh_schema!r} is at version {FUTURE}, newer than this sa-jobs knows ({LATEST});"
               " refusing to start so an older deploy cannot corrupt newer tables")
    with pytest.raises(SchemaVersionError) as raised:
        schema_mod.check_version(db, fresh_schema)
    assert str(raised.value) == refusal

    async def start() -> None:
        async with Worker(db, kinds=[CompatJob], queues={"compat": 1}, schema=fresh_schema, **FAST):
            pass

    with pytest.raises(SchemaVersionError, match="refusing to start"):
        anyio.run(start)
    with pytest.raises(SchemaVersionError, match="upgrade sa-jobs instead of migrating down by accident"):
        schema_mod.install(db, fresh_schema)
    listed = sa_jobs_cli(db, "queues", "--schema", fresh_schema)
    assert listed.returncode == 2 and listed.stderr.strip().splitlines()[-1] == f"sa-jobs: {refusal}", listed.stderr
    assert "newer than this sa-jobs knows" in check_drift(db, fresh_schema)[0]
    assert catalog(db, fresh_schema) == before


# ---- version 15 up and down --------------------------------------------------------------


def test_version_15_upgrades_and_downgrades_with_jobs_in_place(db: str, fresh_schema: str) -> None:
    schema_mod.install(db, fresh_schema, to_version=FLOOR_RECORDED_FROM - 1)
    engine = create_engine(sqlalchemy_url(db)).execution_options(schema_translate_map={"sa_jobs": fresh_schema})
    with Session(engine) as session, session.begin():
        session.add_all([CompatJob(n=i) for i in range(20)])
    engine.dispose()
    jobs = sql.SQL("SELECT to_jsonb(j) FROM {} j ORDER BY id").format(sql.Identifier(fresh_schema, "jobs"))
    before = run_sql(db, jobs)

    assert schema_mod.install(db, fresh_schema) == LATEST
    assert check_drift(db, fresh_schema) == []
    assert run_sql(db, jobs) == before

    with psycopg.connect(db, autocommit=True) as conn, conn.transaction():
        for version in range(LATEST, FLOOR_RECORDED_FROM - 1, -1):
            for stmt in schema_mod.downgrade_statements(version, fresh_schema):
                conn.execute(stmt)
    assert schema_mod.installed_record(db, fresh_schema) == (FLOOR_RECORDED_FROM - 1, FLOOR_RECORDED_FROM - 1)
    assert run_sql(db, "SELECT count(*) FROM information_schema.columns WHERE table_schema = %s"
                       " AND table_name = 'schema_version' AND column_name = 'runs_from'", (fresh_schema,)) == [(0,)]
    assert run_sql(db, jobs) == before
    assert schema_mod.install(db, fresh_schema) == LATEST
    assert check_drift(db, fresh_schema) == []


# ---- version 16 down, with limited queues in use ------------------------------------------


def test_version_16_downgrades_to_exactly_version_15_with_limited_queues_in_use(db: str, fresh_schema: str) -> None:
    """Queues with concurrency and partition limits whose claims kept a running bound: the
    downgrade puts back version 15's claim function and columns exactly (as a fresh version
    15 has them), keeps the jobs and the limits, and the previous version's check is clean."""
    from sa_jobs.admin import QueueLimits, set_queue_limits

    schema_mod.install(db, fresh_schema, to_version=16)
    engine = create_engine(sqlalchemy_url(db)).execution_options(schema_translate_map={"sa_jobs": fresh_schema})
    with Session(engine) as session, session.begin():
        set_queue_limits(session, "compat", QueueLimits(concurrency=5, partition_concurrency=2))
        set_queue_limits(session, "compat_c", QueueLimits(concurrency=3))
        session.add_all([CompatJob(n=i).options(partition_key=f"k{i % 4}") for i in range(20)])
        session.add_all([CompatJob(n=i).options(queue="compat_c") for i in range(10)])
    engine.dispose()
    claim = sql.SQL("SELECT count(*) FROM {}(%s, 2, gen_random_uuid(), 'w', 60.0, 50)").format(
        sql.Identifier(fresh_schema, schema_mod.CLAIM_FUNCTION))
    assert [run_sql(db, claim, (q,))[0][0] for q in ("compat", "compat_c")] == [2, 2]
    queues = sql.SQL("SELECT name, concurrency, partition_concurrency FROM {} ORDER BY 1").format(
        sql.Identifier(fresh_schema, "queues"))
    assert run_sql(db, sql.SQL("SELECT count(*) FROM {} WHERE running_bound = 2").format(
        sql.Identifier(fresh_schema, "queues"))) == [(2,)]
    jobs = sql.SQL("SELECT to_jsonb(j) FROM {} j ORDER BY id").format(sql.Identifier(fresh_schema, "jobs"))
    before, limits = run_sql(db, jobs), run_sql(db, queues)

    with psycopg.connect(db, autocommit=True) as conn, conn.transaction():
        for stmt in schema_mod.downgrade_statements(16, fresh_schema):
            conn.execute(stmt)

    reference = new_schema_name()
    try:
        schema_mod.install(db, reference, to_version=15)

        def shape(schema: str) -> dict[str, list[tuple[Any, ...]]]:
            found = catalog(db, schema)
            found["versions"] = [row[:2] + row[3:] for row in found["versions"]]  # installed_at aside
            found["relations"] = [row[1:] for row in found["relations"]]  # oids aside
            found["functions"] = [(name, src.replace(schema, "S"), config) for _, name, src, config in found["functions"]]
            return found

        assert shape(fresh_schema) == shape(reference)
    finally:
        run_sql(db, sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(reference)))
    assert schema_mod.installed_record(db, fresh_schema) == (15, 14)
    assert run_sql(db, jobs) == before and run_sql(db, queues) == limits
    # The function version 15 had claims under the limits still (it counts the 2 running).
    assert run_sql(db, claim, ("compat_c",)) == [(1,)]
