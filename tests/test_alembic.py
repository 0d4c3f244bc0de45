"""The ``sa_jobs`` Alembic branch, driven through the real ``alembic`` command line.

Each test copies examples/alembic_app into a temp dir and runs alembic's command line
against a throwaway database, so the app's history, env.py and alembic.ini are exactly
what a user would have. Where a test is about the process (the headline upgrade, an
error's exit and output, a race with another session) that is ``python -m alembic``;
elsewhere the same command line runs in this process (``App.alembic(cli=False)``), which
spares a Python start-up per command.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

import alembic_ext
from sa_jobs import schema as schema_mod
from sa_jobs.drift import check_drift

SA_JOBS_HEAD = f"sa_jobs_{schema_mod.LATEST_VERSION:04d}"

from .conftest import REPO_ROOT, pg_bin
from .helpers import wait_for

EXAMPLE_APP = REPO_ROOT / "examples" / "alembic_app"
APP_HEAD = "a1c0ffee0001"


def run_sql(url: str, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@contextlib.contextmanager
def _new_database(database_url: str, template: str = "template1") -> Iterator[str]:
    name = "sa_jobs_alembic_" + uuid.uuid4().hex[:12]
    run_sql(database_url, sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(template)))
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        run_sql(database_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db_url(database_url: str) -> Iterator[str]:
    with _new_database(database_url) as url:
        yield url


@pytest.fixture(scope="module")
def upgraded_template(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database the example app took to ``heads`` once, for the tests that only start there
    (their own database is a copy of it); the upgrade itself is tested on fresh databases."""
    with _new_database(database_url) as url:
        app = _copy_app(tmp_path_factory.mktemp("template"), url)
        app.alembic("upgrade", "heads")
        yield make_url(url).database


def alembic_main(argv: list[str]) -> None:
    """What ``python -m alembic ARGV`` runs, with its output on this moment's sys.stdout
    (a Config's default stdout is the one alembic was imported with)."""
    from alembic.config import CommandLine, Config

    command_line = CommandLine(prog="alembic")
    options = command_line.parser.parse_args(argv)
    toml, ini = command_line._inis_from_config(options)
    config = Config(file_=ini, toml_file=toml, ini_section=options.name, cmd_opts=options, stdout=sys.stdout)
    command_line.run_cmd(config, options)


@contextlib.contextmanager
def _logging_put_back() -> Iterator[None]:
    """The logging set-up as it was: env.py's fileConfig() replaces the root handlers,
    disables every other logger and sets levels, which would reach later tests here."""
    manager = logging.Logger.manager
    known = {name: lg for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    saved = {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for name, lg in known.items()}
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    try:
        yield
    finally:
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        for name, lg in manager.loggerDict.items():
            if not isinstance(lg, logging.Logger):
                continue
            level, handlers, propagate, disabled = saved.get(name, (logging.NOTSET, [], True, False))
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled


@contextlib.contextmanager
def _import_paths_put_back() -> Iterator[None]:
    """sys.path, and no importer cached for a relative entry while inside: a child process
    starts with neither. alembic.ini's ``prepend_sys_path = .`` puts ``.`` on sys.path for
    env.py's ``import shop``, but importlib caches one finder per entry *string*, fixed to
    the working directory at its creation. An in-process ``sa-jobs worker`` (test_admin_cli,
    in the same xdist process under ``--dist loadfile``) leaves ``.`` on sys.path with its
    finder fixed to the repository root: every later ``.`` looked there, and ``shop`` was not
    found (CI only, where those files shared a process). Outside, the caller's cache is as it
    was, not one fixed to an app's directory.

    The app's modules (``shop``) stay imported: every copy of the app has the same ones, and
    importing them again would map its job kind a second time."""
    def relative_importers() -> dict[str, Any]:
        return {entry: sys.path_importer_cache.pop(entry)
                for entry in [e for e in sys.path_importer_cache if not os.path.isabs(e)]}

    saved_path, saved_importers = list(sys.path), relative_importers()
    try:
        yield
    finally:
        sys.path[:] = saved_path
        relative_importers()
        sys.path_importer_cache.update(saved_importers)


def run_in_process(cwd: Path, env: dict[str, str], main: Callable[[list[str]], Any],
                   argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``main(argv)`` run as a child process in ``cwd`` with ``env`` would run it, in this
    process: its stdout, its stderr (an uncaught exception's traceback included) and its
    exit status, as subprocess.run() reports them. The working directory, environment,
    sys.path, the importers of its relative entries and the logging set-up are put back
    afterwards."""
    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_env = os.getcwd(), {k: os.environ.get(k) for k in env}
    code: Any = 0
    os.chdir(cwd)
    os.environ.update(env)
    try:
        with _import_paths_put_back(), _logging_put_back(), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(argv)
            except SystemExit as exc:
                code = exc.code % 256 if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return subprocess.CompletedProcess(["alembic", *argv], code, out.getvalue(), err.getvalue())


@dataclass
class App:
    """A temp copy of the example app and a way to run its ``alembic`` commands."""

    path: Path
    url: str

    def alembic(self, *args: str, ok: bool = True, cli: bool = False) -> subprocess.CompletedProcess[str]:
        """``alembic ARGS`` in the app's directory: with ``cli``, the real command line in a
        child process; else the same command line run in this process (see run_in_process),
        which saves a Python start-up per call where the test is not about the CLI itself."""
        if cli:
            env = {**os.environ, "DATABASE_URL": self.url, "PYTHONPATH": str(REPO_ROOT)}
            proc = subprocess.run(
                [sys.executable, "-m", "alembic", *args], cwd=self.path, env=env,
                capture_output=True, text=True, timeout=60,
            )
        else:
            proc = run_in_process(self.path, {"DATABASE_URL": self.url}, alembic_main, list(args))
        if ok:
            assert proc.returncode == 0, f"alembic {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def edit(self, relpath: str, old: str, new: str) -> None:
        file = self.path / relpath
        text = file.read_text()
        assert old in text, f"{relpath} no longer contains {old!r}"
        file.write_text(text.replace(old, new))

    def heads(self, cli: bool = False) -> set[str]:
        return set(re.findall(r"^(\S+) \(head\)", self.alembic("current", cli=cli).stdout, re.M))

    def autogenerate(self, cli: bool = False) -> str:
        """The body of an autogenerated revision on the app's branch (then deleted)."""
        self.alembic("revision", "--autogenerate", "-m", "probe", "--head", "shop@head", cli=cli)
        (script,) = (self.path / "migrations" / "versions").glob("*_probe.py")
        body = script.read_text()
        script.unlink()
        return body[body.index("def upgrade"):]


def _copy_app(parent: Path, url: str) -> App:
    dest = parent / "alembic_app"
    shutil.copytree(EXAMPLE_APP, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return App(dest, url)


@pytest.fixture
def app(tmp_path: Path, db_url: str) -> App:
    return _copy_app(tmp_path, db_url)


@pytest.fixture
def upgraded_app(tmp_path: Path, database_url: str, upgraded_template: str) -> Iterator[App]:
    """The app with its database already at ``heads`` (both branches)."""
    with _new_database(database_url, upgraded_template) as url:
        yield _copy_app(tmp_path, url)


def table_names(url: str, schema: str) -> set[str]:
    return {r[0] for r in run_sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}


def schema_exists(url: str, schema: str) -> bool:
    return bool(run_sql(url, "SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)))


def insert_jobs(url: str, schema: str, n: int) -> None:
    run_sql(url, sql.SQL(
        "INSERT INTO {} (kind, args, state, finished_at)"
        " SELECT 'shop.send_welcome', jsonb_build_object('customer_id', i),"
        "  CASE WHEN mod(i, 2) = 0 THEN 'completed' ELSE 'available' END,"
        "  CASE WHEN mod(i, 2) = 0 THEN now() END"
        " FROM generate_series(1, %s) AS i"
    ).format(sql.Identifier(schema, "jobs")), (n,))


def job_rows(url: str, schema: str) -> list[Any]:
    query = sql.SQL("SELECT to_jsonb(j) - 'progress' - 'unique_key' - 'unique_states' - 'partition_key' FROM {} j ORDER BY id").format(sql.Identifier(schema, "jobs"))
    return [r[0] for r in run_sql(url, query)]


# ---- no database needed -------------------------------------------------------------


def test_branch_has_one_revision_per_schema_version() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(EXAMPLE_APP / "migrations"))
    config.set_main_option("path_separator", "newline")
    config.set_main_option("version_locations", alembic_ext.version_location())
    script = ScriptDirectory.from_config(config)
    chain = list(reversed(list(script.walk_revisions("base", "sa_jobs@head"))))
    assert [rev.module.SA_JOBS_VERSION for rev in chain] == [m.version for m in schema_mod.MIGRATIONS]
    assert chain[0].down_revision is None and chain[0].branch_labels == {alembic_ext.BRANCH_LABEL}
    package, _, sub = alembic_ext.VERSIONS_RESOURCE.partition(":")
    import importlib.resources

    assert str(importlib.resources.files(package) / sub) == alembic_ext.version_location()


def test_filters_outside_an_alembic_run_hide_only_queue_tables() -> None:
    from sqlalchemy import Column, Integer, MetaData, Table

    from sa_jobs.model import Job

    app_table = Table("jobs", MetaData(), Column("id", Integer), schema="app")
    assert alembic_ext.include_object(Job.__table__, "jobs", "table", False, None) is False
    assert alembic_ext.include_object(app_table, "jobs", "table", False, None) is True
    assert alembic_ext.include_name("sa_jobs", "schema", {}) is False
    assert alembic_ext.include_name("app", "schema", {}) is True
    assert alembic_ext.include_name("jobs", "table", {"schema_name": "sa_jobs"}) is False
    assert alembic_ext.include_name("jobs", "table", {"schema_name": "app"}) is True


def test_in_process_runs_import_from_their_own_directory_after_a_worker_ran_elsewhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CI-only "No module named 'shop'" of every in-process alembic run: an in-process
    ``sa-jobs worker`` (test_admin_cli, earlier in the same xdist process) leaves ``.`` on
    sys.path, its importer fixed to the directory it ran in; the app's ``.`` looked there."""
    import importlib

    from sa_jobs import cli

    elsewhere, app_dir = tmp_path / "elsewhere", tmp_path / "app"
    elsewhere.mkdir()
    app_dir.mkdir()
    module = "probe_" + uuid.uuid4().hex[:12]
    (app_dir / f"{module}.py").write_text("")

    def import_from_dot(argv: list[str]) -> None:  # alembic.ini's prepend_sys_path = ., then env.py
        sys.path.insert(0, ".")
        importlib.import_module(module)

    saved_cwd = os.getcwd()
    with _import_paths_put_back():
        os.chdir(elsewhere)
        try:
            code = cli.main(["worker", module, "--database-url", "postgresql://nobody@127.0.0.1:1/none"])
            assert code == 2 and f"cannot import {module!r}" in capsys.readouterr().err
            stale = sys.path_importer_cache["."]
            # Python 3.10's FileFinder keeps the path as joined (".../elsewhere/."); 3.11 on, normalized.
            assert sys.path[0] == "." and os.path.normpath(getattr(stale, "path", "")) == os.getcwd()

            proc = run_in_process(app_dir, {}, import_from_dot, [])

            assert proc.returncode == 0, proc.stderr
            assert Path(sys.modules[module].__file__ or "").resolve() == (app_dir / f"{module}.py").resolve()
            assert sys.path_importer_cache["."] is stale  # the caller's, put back
        finally:
            os.chdir(saved_cwd)
            sys.modules.pop(module, None)


# ---- the real command line -------------------------------------------------------------


def test_upgrade_heads_installs_the_branch_and_autogenerate_stays_silent(app: App) -> None:
    """The whole path as a user runs it, each command a real ``alembic`` process."""
    heads = app.alembic("heads", cli=True).stdout
    assert f"{APP_HEAD} (shop) (head)" in heads and f"{SA_JOBS_HEAD} (sa_jobs) (head)" in heads

    app.alembic("upgrade", "heads", cli=True)

    assert app.heads(cli=True) == {APP_HEAD, SA_JOBS_HEAD}
    assert schema_mod.installed_version(app.url, "sa_jobs") == schema_mod.LATEST_VERSION
    assert check_drift(app.url, "sa_jobs") == []
    assert {"customers", "orders", "alembic_version"} <= table_names(app.url, "public")
    assert "No new upgrade operations detected" in app.alembic("check", cli=True).stdout
    body = app.autogenerate(cli=True)
    assert "op." not in body and "pass" in body


@pytest.mark.parametrize("include_schemas", ["True", "False"])
def test_autogenerate_ignores_the_queue_even_in_target_metadata(upgraded_app: App, include_schemas: str) -> None:
    app = upgraded_app  # at heads already: not what this test is about
    app.edit("migrations/env.py", "target_metadata = Base.metadata",
             "import sa_jobs.model\ntarget_metadata = [Base.metadata, sa_jobs.model.Base.metadata]")
    app.edit("migrations/env.py", "include_schemas=True", f"include_schemas={include_schemas}")
    app.alembic("check")
    body = app.autogenerate()
    assert "op." not in body, body


def test_without_the_filters_autogenerate_would_drop_the_queue(upgraded_app: App) -> None:
    """The control for the two tests above: their ``check`` can fail."""
    app = upgraded_app  # at heads already: not what this test is about
    app.edit("migrations/env.py", "    include_object=alembic_ext.include_object,\n", "")
    app.edit("migrations/env.py", "    include_name=alembic_ext.include_name,\n", "")
    proc = app.alembic("check", ok=False)
    assert proc.returncode != 0
    assert "sa_jobs.jobs" in proc.stdout + proc.stderr


def test_downgrade_branch_base_removes_the_queue_and_keeps_the_app(upgraded_app: App) -> None:
    app = upgraded_app  # at heads already: not what this test is about
    run_sql(app.url, "INSERT INTO customers (email) VALUES ('a@example.com')")

    app.alembic("downgrade", "sa_jobs@base")

    assert not schema_exists(app.url, "sa_jobs")
    assert app.heads() == {APP_HEAD}
    assert run_sql(app.url, "SELECT email FROM customers") == [("a@example.com",)]
    assert run_sql(app.url, "SELECT count(*) FROM pg_proc WHERE proname = 'notify_jobs_inserted'") == [(0,)]
    app.alembic("upgrade", "heads")  # and back again
    assert check_drift(app.url, "sa_jobs") == []


def test_upgrade_across_versions_keeps_every_job(app: App) -> None:
    app.alembic("upgrade", "shop@head")
    app.alembic("upgrade", "sa_jobs_0001")
    assert schema_mod.installed_version(app.url, "sa_jobs") == 1
    insert_jobs(app.url, "sa_jobs", 400)
    before = job_rows(app.url, "sa_jobs")

    app.alembic("upgrade", "heads")

    assert app.heads() == {APP_HEAD, SA_JOBS_HEAD}
    assert job_rows(app.url, "sa_jobs") == before
    assert check_drift(app.url, "sa_jobs") == []

    app.alembic("downgrade", "sa_jobs_0001")
    assert schema_mod.installed_version(app.url, "sa_jobs") == 1
    assert job_rows(app.url, "sa_jobs") == before
    assert run_sql(app.url, "SELECT to_regclass('sa_jobs.jobs_finished_idx')") == [(None,)]
    assert run_sql(app.url, "SELECT to_regclass('sa_jobs.jobs_unique_idx')") == [(None,)]


def test_schema_option_reaches_sql_validated_and_quoted(app: App) -> None:
    app.edit("alembic.ini", "# sa_jobs_schema = sa_jobs", "sa_jobs_schema = shop_queue")
    app.alembic("upgrade", "heads")
    assert not schema_exists(app.url, "sa_jobs")
    assert {"jobs", "schema_version"} <= table_names(app.url, "shop_queue")
    assert check_drift(app.url, "shop_queue") == []
    app.alembic("check")
    app.alembic("downgrade", "sa_jobs@base")
    assert not schema_exists(app.url, "shop_queue")

    bad = app.alembic("-x", 'sa_jobs_schema=q"; DROP TABLE customers; --', "upgrade", "heads", ok=False, cli=True)
    assert bad.returncode != 0 and "invalid schema name" in bad.stderr
    assert "customers" in table_names(app.url, "public")

    # A reserved word works because it only ever reaches SQL quoted.
    app.alembic("-x", "sa_jobs_schema=user", "upgrade", "heads")
    assert check_drift(app.url, "user") == []


def test_changing_the_schema_name_midway_is_a_clear_error(app: App) -> None:
    app.alembic("upgrade", "sa_jobs_0001")
    proc = app.alembic("-x", "sa_jobs_schema=elsewhere", "upgrade", "heads", ok=False)
    assert proc.returncode != 0 and "changed since the last upgrade" in proc.stderr


def test_sa_jobs_migrate_first_then_alembic_adopts_it(app: App) -> None:
    schema_mod.install(app.url, "sa_jobs", to_version=1)
    insert_jobs(app.url, "sa_jobs", 10)
    before = job_rows(app.url, "sa_jobs")

    proc = app.alembic("upgrade", "heads", cli=True)  # its log, through alembic.ini's logging set-up

    assert "already at version 1; adopting it" in proc.stderr
    assert schema_mod.installed_version(app.url, "sa_jobs") == schema_mod.LATEST_VERSION
    assert job_rows(app.url, "sa_jobs") == before
    assert check_drift(app.url, "sa_jobs") == []
    assert schema_mod.install(app.url, "sa_jobs") == schema_mod.LATEST_VERSION  # and back: migrate sees nothing to do


def test_offline_sql_applies_with_psql_and_builds_concurrently_outside_a_transaction(app: App) -> None:
    script = app.alembic("upgrade", "sa_jobs@head", "--sql").stdout
    concurrent = script.index("CREATE INDEX CONCURRENTLY IF NOT EXISTS")
    before = script[:concurrent]
    assert before.rstrip().endswith("COMMIT;"), "the CONCURRENTLY build must follow a COMMIT"
    result = subprocess.run(
        [pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", app.url],
        input=script, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert app.heads() == {SA_JOBS_HEAD}
    assert check_drift(app.url, "sa_jobs") == []


def test_rerunning_the_upgrade_rebuilds_an_index_whose_concurrent_build_was_killed(app: App) -> None:
    """A CREATE INDEX CONCURRENTLY that dies in the server leaves an invalid index, which
    IF NOT EXISTS would skip: the re-run revision must drop and rebuild it."""
    app.alembic("upgrade", "sa_jobs_0002")
    with psycopg.connect(app.url) as holder:  # a snapshot every concurrent build waits for
        holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        holder.execute("SELECT 1")
        env = {**os.environ, "DATABASE_URL": app.url, "PYTHONPATH": str(REPO_ROOT)}
        upgrade = subprocess.Popen([sys.executable, "-m", "alembic", "upgrade", "heads"], cwd=app.path, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        building = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND query LIKE 'CREATE UNIQUE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock'")
        assert wait_for(lambda: bool(run_sql(app.url, building)), timeout=30), upgrade.communicate()
        run_sql(app.url, "SELECT pg_terminate_backend(pid) FROM (" + building + ") b")
        assert upgrade.wait(timeout=30) != 0
    invalid = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('sa_jobs.jobs_unique_idx')"
    assert run_sql(app.url, invalid) == [(False,)]

    app.alembic("upgrade", "heads")

    assert run_sql(app.url, invalid) == [(True,)]
    assert check_drift(app.url, "sa_jobs") == []


@pytest.mark.parametrize("include_schemas", ["True", "False"])
def test_a_queue_in_the_apps_own_schema_is_hidden_from_autogenerate(app: App, include_schemas: str) -> None:
    """The queue installed in ``public``, next to the app's tables: autogenerate must not
    propose dropping any of its tables (``queues`` and ``periodic`` included)."""
    app.edit("alembic.ini", "# sa_jobs_schema = sa_jobs", "sa_jobs_schema = public")
    app.edit("migrations/env.py", "include_schemas=True", f"include_schemas={include_schemas}")
    app.alembic("upgrade", "heads")
    assert {"jobs", "schema_version", "queues", "periodic", "customers"} <= table_names(app.url, "public")
    proc = app.alembic("check", ok=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    body = app.autogenerate()
    assert "op." not in body, body


def test_schema_option_in_pyproject_tool_alembic_is_honoured(app: App) -> None:
    """An app configured through ``[tool.alembic]`` in pyproject.toml (Alembic >= 1.16)
    keeps its options there: ``sa_jobs_schema`` set next to ``version_locations`` was
    ignored, and the queue went to ``sa_jobs`` without a word."""
    app.edit("alembic.ini", "version_locations =\n    %(here)s/migrations/versions\n    alembic_ext:versions\n", "")
    (app.path / "pyproject.toml").write_text(
        '[tool.alembic]\n'
        'version_locations = ["%(here)s/migrations/versions", "alembic_ext:versions"]\n'
        'sa_jobs_schema = "shop_queue"\n'
    )
    app.alembic("upgrade", "heads")
    assert not schema_exists(app.url, "sa_jobs")
    assert check_drift(app.url, "shop_queue") == []
    app.alembic("check")


def _log_index_builds(url: str) -> None:
    """Record every index PostgreSQL really builds (IF NOT EXISTS skips are not logged)."""
    run_sql(url, """
        CREATE TABLE public.built_indexes (name text);
        CREATE FUNCTION public.log_index_builds() RETURNS event_trigger LANGUAGE plpgsql AS $$
        DECLARE r record;
        BEGIN
          FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE command_tag = 'CREATE INDEX' LOOP
            INSERT INTO public.built_indexes VALUES (r.object_identity);
          END LOOP;
        END $$;
        CREATE EVENT TRIGGER log_index_builds ON ddl_command_end EXECUTE FUNCTION public.log_index_builds();
    """)


def test_adopting_a_migrated_schema_builds_no_index_a_later_version_dropped(app: App) -> None:
    """A schema installed by ``sa-jobs migrate`` at the latest version, then adopted by the
    branch: adopting sa_jobs_0004 re-built jobs_running_partition_idx (a read of the
    whole jobs table) only for sa_jobs_0008 to drop it again."""
    schema_mod.install(app.url, "sa_jobs")
    insert_jobs(app.url, "sa_jobs", 10)
    _log_index_builds(app.url)

    app.alembic("upgrade", "heads")

    assert run_sql(app.url, "SELECT name FROM public.built_indexes WHERE name LIKE 'sa_jobs.%'") == []
    assert check_drift(app.url, "sa_jobs") == []


def test_downgrading_behind_a_newer_migrate_names_the_revision_to_adopt_first(app: App) -> None:
    """Alembic at sa_jobs_0006, then ``sa-jobs migrate`` (or ``install()`` at start-up) of
    this release took the schema further: the downgrade refused, telling the user to
    downgrade "with the sa-jobs release that installed it", which is this one. What
    unblocks it is recording the installed version in Alembic first."""
    app.alembic("upgrade", "sa_jobs_0006")
    schema_mod.install(app.url, "sa_jobs", to_version=9)

    proc = app.alembic("downgrade", "sa_jobs@-1", ok=False)

    assert proc.returncode != 0 and "alembic upgrade sa_jobs_0009" in proc.stderr, proc.stderr
    assert schema_mod.installed_version(app.url, "sa_jobs") == 9
    app.alembic("upgrade", "sa_jobs_0009")  # what the message says, then the downgrade works
    app.alembic("downgrade", "sa_jobs@-1")
    assert schema_mod.installed_version(app.url, "sa_jobs") == 8
    assert "sa_jobs_0008" in app.alembic("current").stdout


def test_install_at_start_up_during_an_alembic_index_build_waits_for_it(app: App) -> None:
    """Moving from ``install()`` at start-up to Alembic: a process starts (and installs)
    while ``alembic upgrade`` builds an index CONCURRENTLY (sa_jobs_0003's: sa_jobs_0002's
    is left out, as sa_jobs_0013 drops it). install() altered the table for the next
    version, waited for the build's table lock, the build waited for its transaction, and
    PostgreSQL failed the Alembic deploy with "deadlock detected"."""
    app.alembic("upgrade", "sa_jobs_0001")
    insert_jobs(app.url, "sa_jobs", 10)

    def query_of(name: str) -> str:
        rows = run_sql(app.url, "SELECT coalesce(wait_event_type, '') || ' ' || query FROM pg_stat_activity"
                                " WHERE application_name = %s", (name,))
        return rows[0][0] if rows else ""

    def start(name: str, argv: list[str]) -> subprocess.Popen[str]:
        env = {**os.environ, "DATABASE_URL": app.url, "PYTHONPATH": str(REPO_ROOT), "PGAPPNAME": name}
        return subprocess.Popen([sys.executable, *argv], cwd=app.path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        with psycopg.connect(app.url) as holder:  # a snapshot the build waits for
            holder.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            holder.execute("SELECT 1")
            procs["alembic"] = start("h_alembic", ["-m", "alembic", "upgrade", "heads"])
            assert wait_for(lambda: query_of("h_alembic").startswith("Lock CREATE UNIQUE INDEX CONCURRENTLY"), 30), \
                query_of("h_alembic")
            procs["install"] = start("h_install", [
                "-c", "import os; from sa_jobs import schema; schema.install(os.environ['DATABASE_URL'])"])
            # Waiting in its DDL transaction, or polling for its turn outside any.
            assert wait_for(lambda: query_of("h_install").startswith("Lock ")
                            or "pg_try_advisory_lock" in query_of("h_install"), 30), query_of("h_install")
            holder.commit()
        outputs = {name: p.communicate(timeout=60)[0] for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert {name: p.returncode for name, p in procs.items()} == {"alembic": 0, "install": 0}, outputs
    assert app.heads() == {APP_HEAD, SA_JOBS_HEAD}
    assert check_drift(app.url, "sa_jobs") == []


# Alembic's cookbook recipe for running migrations on the caller's connection, inside a
# transaction the caller began (application start-up, test fixtures).
CALLERS_TRANSACTION = """
import os, sys
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, make_url
url = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+psycopg")
with create_engine(url).begin() as connection:
    config = Config("alembic.ini")
    config.attributes["connection"] = connection
    command.upgrade(config, sys.argv[1])
"""


def _run_callers_transaction(argv: list[str]) -> None:
    saved_argv = sys.argv
    sys.argv = ["-c", *argv]
    try:
        exec(compile(CALLERS_TRANSACTION, "<string>", "exec"), {"__name__": "__main__"})
    finally:
        sys.argv = saved_argv


def _upgrade_in_callers_transaction(app: App, target: str, cli: bool = False) -> subprocess.CompletedProcess[str]:
    app.edit("migrations/env.py", "def run_migrations_online() -> None:\n",
             "def run_migrations_online() -> None:\n"
             "    if (connection := config.attributes.get('connection')) is not None:\n"
             "        context.configure(connection=connection, **CONFIGURE_OPTIONS)\n"
             "        with context.begin_transaction():\n"
             "            context.run_migrations()\n"
             "        return\n")
    if not cli:
        return run_in_process(app.path, {"DATABASE_URL": app.url}, _run_callers_transaction, [target])
    env = {**os.environ, "DATABASE_URL": app.url, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{app.path}"}
    return subprocess.run([sys.executable, "-c", CALLERS_TRANSACTION, target], cwd=app.path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_a_fresh_install_in_the_callers_transaction_builds_its_indexes_in_it(app: App) -> None:
    """``with engine.begin() as connection: command.upgrade(config, "heads")`` failed at
    sa_jobs_0002 with a bare AssertionError from Alembic's autocommit_block, and nothing
    was installed. The table is new and locked by that transaction: its indexes are built
    in it, as ``sa-jobs migrate`` builds a fresh install's."""
    proc = _upgrade_in_callers_transaction(app, "heads", cli=True)
    assert proc.returncode == 0, proc.stderr
    assert app.heads() == {APP_HEAD, SA_JOBS_HEAD}
    assert check_drift(app.url, "sa_jobs") == []
    app.alembic("check")


def test_an_upgrade_in_the_callers_transaction_that_needs_a_concurrent_build_says_so(app: App) -> None:
    """On a table others use, building without CONCURRENTLY would block their writes: the
    upgrade stops with an error that says why and what to do, and changes nothing."""
    app.alembic("upgrade", "sa_jobs_0007")
    insert_jobs(app.url, "sa_jobs", 10)
    proc = _upgrade_in_callers_transaction(app, "sa_jobs_0008")
    assert proc.returncode != 0
    assert "CONCURRENTLY" in proc.stderr and "engine.connect()" in proc.stderr, proc.stderr
    assert "AssertionError" not in proc.stderr
    assert schema_mod.installed_version(app.url, "sa_jobs") == 7
    app.alembic("upgrade", "heads")  # the ordinary command line still does it online
    assert check_drift(app.url, "sa_jobs") == []


def test_adopting_in_the_callers_transaction_needs_no_build(app: App) -> None:
    """A schema that ``sa-jobs migrate`` installed has every index already: adopting it in
    the caller's transaction has nothing to build, so it must not stop for the lock."""
    schema_mod.install(app.url, "sa_jobs")
    proc = _upgrade_in_callers_transaction(app, "heads")
    assert proc.returncode == 0, proc.stderr
    assert app.heads() == {APP_HEAD, SA_JOBS_HEAD}
    assert check_drift(app.url, "sa_jobs") == []


def test_a_schema_newer_than_this_release_is_not_adopted(app: App) -> None:
    """``sa-jobs migrate`` of a newer release took the schema past this one's latest
    version (here, as if that version had dropped jobs_state_finished_idx). ``install()`` of this
    release refuses such a schema; the branch adopted it, re-ran its revisions' index
    builds and put back an index the newer version had dropped."""
    schema_mod.install(app.url, "sa_jobs")
    newer = schema_mod.LATEST_VERSION + 1
    run_sql(app.url, "DROP INDEX sa_jobs.jobs_state_finished_idx")
    run_sql(app.url, "INSERT INTO sa_jobs.schema_version (version, description) VALUES (%s, 'newer')", (newer,))

    proc = app.alembic("upgrade", "heads", ok=False)

    assert proc.returncode != 0 and "newer than this sa-jobs knows" in proc.stderr, proc.stderr
    assert run_sql(app.url, "SELECT to_regclass('sa_jobs.jobs_state_finished_idx')") == [(None,)]
    assert "sa_jobs_" not in app.alembic("current").stdout


def test_a_newer_schema_that_admits_this_release_is_adopted_unchanged(app: App) -> None:
    """The previous release's ``alembic upgrade heads`` (an app's deploy, mid-roll) on a
    schema a newer release migrated additively, recording that releases of this one's
    latest version may run on it: it succeeds, records the branch's revisions and changes
    nothing in the queue's schema (this release's index builds would put back the index
    the newer version dropped)."""
    app.alembic("upgrade", "sa_jobs_0003")
    schema_mod.install(app.url, "sa_jobs")  # then sa-jobs migrate of this release, then of a newer one
    newer = schema_mod.LATEST_VERSION + 1
    run_sql(app.url, "DROP INDEX sa_jobs.jobs_state_finished_idx")
    run_sql(app.url, "INSERT INTO sa_jobs.schema_version (version, description, runs_from) VALUES (%s, 'newer', %s)",
            (newer, schema_mod.LATEST_VERSION))
    _log_index_builds(app.url)

    proc = app.alembic("upgrade", "heads", cli=True)

    assert (f"sa-jobs schema 'sa_jobs' is at version {newer}, which lets releases of version"
            f" {schema_mod.LATEST_VERSION} and later run on it; adopting it unchanged") in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert app.heads() == {APP_HEAD, SA_JOBS_HEAD}
    assert run_sql(app.url, "SELECT to_regclass('sa_jobs.jobs_state_finished_idx')") == [(None,)]
    assert run_sql(app.url, "SELECT name FROM public.built_indexes WHERE name LIKE 'sa_jobs.%'") == []
    assert schema_mod.installed_record(app.url, "sa_jobs") == (newer, schema_mod.LATEST_VERSION)


def test_the_version_floor_revision_upgrades_and_downgrades(app: App) -> None:
    """sa_jobs_0015 adds ``schema_version.runs_from`` and records its floor; its downgrade
    takes the column away again, and the previous version reads as before."""
    floor_from = schema_mod.FLOOR_RECORDED_FROM
    app.alembic("upgrade", f"sa_jobs_{floor_from - 1:04d}")
    insert_jobs(app.url, "sa_jobs", 20)
    before = job_rows(app.url, "sa_jobs")
    app.alembic("upgrade", "heads")
    assert run_sql(app.url, "SELECT version, runs_from FROM sa_jobs.schema_version WHERE version >= %s ORDER BY 1",
                   (floor_from - 1,)) == [(floor_from - 1, None), *((m.version, m.floor)
                                                                   for m in schema_mod.MIGRATIONS[floor_from - 1:])]
    assert check_drift(app.url, "sa_jobs") == []

    app.alembic("downgrade", f"sa_jobs_{floor_from - 1:04d}")
    assert schema_mod.installed_record(app.url, "sa_jobs") == (floor_from - 1, floor_from - 1)
    assert "runs_from" not in {r[0] for r in run_sql(
        app.url, "SELECT column_name FROM information_schema.columns WHERE table_schema = 'sa_jobs'"
                 " AND table_name = 'schema_version'")}
    assert job_rows(app.url, "sa_jobs") == before
    app.alembic("upgrade", "heads")
    assert check_drift(app.url, "sa_jobs") == []


def test_an_upgrade_past_version_8_builds_no_index_version_8_drops(app: App) -> None:
    """From version 3, sa_jobs_0004 built jobs_running_partition_idx CONCURRENTLY (a read
    of the whole jobs table) even when the same run goes on to sa_jobs_0008, which drops
    it: ``sa-jobs migrate`` and ``install_sql`` leave it out; the branch now does too."""
    app.alembic("upgrade", "sa_jobs_0003")
    insert_jobs(app.url, "sa_jobs", 10)
    _log_index_builds(app.url)

    app.alembic("upgrade", "heads")

    built = {r[0] for r in run_sql(app.url, "SELECT name FROM public.built_indexes WHERE name LIKE 'sa_jobs.%'")}
    assert built == {"sa_jobs.jobs_partition_idx", "sa_jobs.jobs_running_idx", "sa_jobs.jobs_state_kind_idx",
                     "sa_jobs.jobs_state_finished_idx"}
    assert check_drift(app.url, "sa_jobs") == []
    offline = app.alembic("upgrade", "sa_jobs_0003:heads", "--sql").stdout
    builds = re.findall(r'CREATE INDEX CONCURRENTLY IF NOT EXISTS "(\w+)"', offline)
    assert builds == ["jobs_partition_idx", "jobs_running_idx", "jobs_state_kind_idx", "jobs_state_finished_idx"], builds


def test_an_upgrade_that_stops_before_version_8_builds_every_index_of_its_versions(app: App) -> None:
    """The control: a run whose destination is sa_jobs_0007 needs version 4's index."""
    app.alembic("upgrade", "sa_jobs_0003")
    app.alembic("upgrade", "sa_jobs_0007")
    assert run_sql(app.url, "SELECT to_regclass('sa_jobs.jobs_running_partition_idx') IS NOT NULL") == [(True,)]
    offline = app.alembic("upgrade", "sa_jobs_0003:sa_jobs_0007", "--sql").stdout
    builds = re.findall(r'CREATE INDEX CONCURRENTLY IF NOT EXISTS "(\w+)"', offline)
    assert builds == ["jobs_partition_idx", "jobs_running_partition_idx"], builds
    app.alembic("upgrade", "heads")
    assert check_drift(app.url, "sa_jobs") == []


def test_a_second_queue_schema_is_hidden_from_autogenerate(upgraded_app: App) -> None:
    """Two queues in one app: ``sa_jobs`` through the branch, ``billing_jobs`` installed by
    ``sa-jobs migrate``. With ``include_schemas=True`` the second schema's tables were
    reflected and proposed for dropping, as a real autogenerate compare shows."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import MetaData, create_engine

    app = upgraded_app  # at heads already: not what this test is about
    schema_mod.install(app.url, "billing_jobs")
    # The control: an app's own table named like a queue table is still compared.
    run_sql(app.url, "CREATE SCHEMA other; CREATE TABLE other.jobs (id integer, kind text)")
    engine = create_engine(make_url(app.url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "include_schemas": True, "include_object": alembic_ext.include_object,
                "include_name": alembic_ext.include_name})
            diffs = compare_metadata(ctx, MetaData())  # the app's tables (public) are left out below
    finally:
        engine.dispose()
    removed = {(d[1].schema, d[1].name) for d in diffs if d[0] == "remove_table" and d[1].schema is not None}
    assert removed == {("other", "jobs")}, diffs
    run_sql(app.url, "DROP SCHEMA other CASCADE")
    proc = app.alembic("check", ok=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _compare(url: str, metadata: Any) -> list[Any]:
    """Alembic's autogenerate comparison of ``metadata`` with the database, through the
    filters, as ``alembic check`` runs it with ``include_schemas=True``."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={
                "include_schemas": True, "include_object": alembic_ext.include_object,
                "include_name": alembic_ext.include_name})
            return compare_metadata(ctx, metadata)
    finally:
        engine.dispose()


def test_an_apps_own_objects_shaped_like_the_queues_are_compared(upgraded_app: App) -> None:
    """The filters told a second queue schema's tables by their columns alone: an app's
    own table named like a queue table, with those columns (a ``queues`` table of names,
    pause flags and update times), was hidden in whichever schema it was, and autogenerate
    never proposed dropping it once the app's models let it go. Indexes shaped like the
    queue's (same columns) on the app's tables are compared too."""
    from sqlalchemy import Column, DateTime, Index, Integer, MetaData, Table, Text

    app = upgraded_app  # at heads already: not what this test is about
    schema_mod.install(app.url, "billing_jobs")
    run_sql(app.url, "CREATE SCHEMA crm;"
            " CREATE TABLE crm.queues (name text PRIMARY KEY, paused boolean, updated_at timestamptz, agents int);"
            " CREATE TABLE crm.periodic (name text PRIMARY KEY, last_slot timestamptz, updated_at timestamptz);"
            " CREATE TABLE crm.tasks (id int PRIMARY KEY, kind text, state text, queue text, priority int,"
            "  scheduled_at timestamptz);"
            " CREATE INDEX tasks_claim_idx ON crm.tasks (queue, priority, scheduled_at, id)")
    metadata = MetaData()
    Table("tasks", metadata, Column("id", Integer, primary_key=True), Column("kind", Text), Column("state", Text),
          Column("queue", Text), Column("priority", Integer), Column("scheduled_at", DateTime(timezone=True)),
          Index("tasks_kind_state_idx", "kind", "state"), schema="crm")
    diffs = _compare(app.url, metadata)
    removed = {(d[1].schema, d[1].name) for d in diffs if d[0] == "remove_table" and d[1].schema is not None}
    assert removed == {("crm", "queues"), ("crm", "periodic")}, diffs
    indexes = {(d[0], d[1].name) for d in diffs if d[0] in ("add_index", "remove_index") and d[1].table.schema == "crm"}
    assert indexes == {("add_index", "tasks_kind_state_idx"), ("remove_index", "tasks_claim_idx")}, diffs
    # The queue's own objects, in both queue schemas, stay hidden.
    assert not [d for d in diffs if getattr(d[1], "schema", None) in ("sa_jobs", "billing_jobs")], diffs


# ---- a revision behind a long transaction: bounded lock waits ---------------------------


def _hold_jobs(url: str) -> psycopg.Connection[Any]:
    """An open transaction that read the jobs table: it holds ACCESS SHARE on it."""
    conn = psycopg.connect(url)
    conn.execute("SELECT count(*) FROM sa_jobs.jobs")
    return conn


def test_a_revision_behind_a_long_transaction_does_not_stall_claims(app: App) -> None:
    """Revision 3 alters the jobs table. Behind a transaction that read it, the ALTER
    waited, and every claim queued behind it for as long as that transaction lived. Now
    each wait is bounded and retried (a claim waits one of them at most), and the upgrade
    goes through once the blocker is gone."""
    app.alembic("upgrade", "sa_jobs_0002")
    blocker = _hold_jobs(app.url)
    env = {**os.environ, "DATABASE_URL": app.url, "PYTHONPATH": str(REPO_ROOT)}
    upgrade = subprocess.Popen([sys.executable, "-m", "alembic", "upgrade", "heads"], cwd=app.path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    waiting = ("SELECT 1 FROM pg_locks WHERE NOT granted AND mode = 'AccessExclusiveLock'"
               " AND relation = to_regclass('sa_jobs.jobs')")
    try:
        assert wait_for(lambda: bool(run_sql(app.url, waiting)), timeout=30)
        with psycopg.connect(app.url, autocommit=True) as conn:
            conn.execute("SELECT set_config('statement_timeout', '15000ms', false)")
            started = time.monotonic()
            try:
                conn.execute("SELECT id FROM sa_jobs.jobs WHERE state = 'available' LIMIT 1 FOR UPDATE SKIP LOCKED")
                stalled = time.monotonic() - started
            except psycopg.errors.QueryCanceled:
                stalled = float("inf")
    finally:
        blocker.close()
        output = upgrade.communicate(timeout=60)[0]
    assert stalled < 5.0, f"a claim waited {stalled:.1f}s behind the revision"
    assert upgrade.returncode == 0, output
    assert schema_mod.installed_version(app.url, "sa_jobs") == schema_mod.LATEST_VERSION


def test_a_revision_that_never_gets_its_lock_fails_naming_the_blocker(app: App) -> None:
    app.alembic("upgrade", "sa_jobs_0002")
    blocker = _hold_jobs(app.url)
    try:
        started = time.monotonic()
        # A real process, as the test was written: BLOCKERS_SQL names a session whose transaction
        # is a lock wait older than now() (the revision's transaction start), which in-process
        # begins within 0.2 s of the blocker's.
        proc = app.alembic("-x", "sa_jobs_lock_timeout=0.2", "-x", "sa_jobs_lock_retries=1",
                           "upgrade", "sa_jobs_0003", ok=False, cli=True)
        elapsed = time.monotonic() - started
        pid = blocker.info.backend_pid
    finally:
        blocker.close()
    assert proc.returncode != 0
    assert "SchemaLockTimeoutError" in proc.stderr and f"pid {pid}" in proc.stderr, proc.stderr
    assert elapsed < 20, elapsed
    assert schema_mod.installed_version(app.url, "sa_jobs") == 2
    # The setting is put back after the revision: the app's own revisions keep theirs.
    app.alembic("upgrade", "heads")
    assert check_drift(app.url, "sa_jobs") == []
