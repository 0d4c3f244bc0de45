"""The bodies of the branch's ``upgrade()``/``downgrade()``: sa_jobs.schema's SQL via ``op``.

Online, each step takes the installer's advisory lock and reads
``<schema>.schema_version`` first, so a schema installed by ``sa-jobs migrate`` is adopted
rather than created twice, and both tools keep recording the same versions. Offline
(``alembic upgrade --sql``) the statements are emitted as they are.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Connection

from sa_jobs import schema as schema_mod
from sa_jobs.errors import SchemaLockTimeoutError, SchemaVersionError

from ._config import configured_lock_policy, configured_schema

# Under "alembic" so the logging section of a stock alembic.ini shows these lines.
log = logging.getLogger("alembic.sa_jobs")


def _execute(stmt: str) -> None:
    from alembic import op

    # op.execute wraps strings in text(), which would read ":name" as a bind parameter;
    # escaping every colon keeps casts (::jsonb) and any literal exactly as written.
    op.execute(text(stmt.replace(":", "\\:")))


def _recorded(bind: Connection, schema: str) -> schema_mod.VersionRecord:
    """The recorded version and its floor (see sa_jobs.schema.VersionRecord)."""
    from psycopg import sql

    table = sql.Identifier(schema, schema_mod.VERSION_TABLE).as_string()
    if not bind.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}).scalar():
        return schema_mod.VersionRecord(0, 0)
    return schema_mod.record_of(bind.execute(text(schema_mod.version_record_query(schema))).first())


def _online_version(version: int, schema: str) -> tuple[bool, schema_mod.VersionRecord]:
    """(is_online, recorded version and floor) after taking the installer lock when online."""
    from alembic import op

    if op.get_context().as_sql:
        return False, schema_mod.VersionRecord(0, 0)
    _execute(schema_mod.lock_statement(schema))
    return True, _recorded(op.get_bind(), schema)


def upgrade_version(version: int) -> None:
    """Apply schema ``version`` to the configured schema, then its CONCURRENTLY statements."""
    from alembic import op

    schema = configured_schema()
    online, record = _online_version(version, schema)
    current = record.version
    if online and schema_mod.admits_this_release(record):
        # A newer release migrated it, additively enough to let this one run: record the
        # revision and change nothing (this release's index builds could put back an
        # index the newer version dropped).
        log.info("sa-jobs schema %r is at version %d, which lets releases of version %d and later run on it;"
                 " adopting it unchanged", schema, current, record.runs_from)
        return
    if online and current < version - 1:
        raise SchemaVersionError(
            f"schema {schema!r} is at sa-jobs version {current}, but Alembic records version"
            f" {version - 1} as applied; was the queue's schema name (-x sa_jobs_schema,"
            " sa_jobs_schema in alembic.ini) changed since the last upgrade?"
        )
    if online and current > schema_mod.LATEST_VERSION:
        # As install() does: adopting would re-run this release's index builds, which may
        # put back what the newer version dropped, and record a history it cannot undo.
        raise SchemaVersionError(
            f"schema {schema!r} is at sa-jobs version {current}, newer than this sa-jobs knows"
            f" ({schema_mod.LATEST_VERSION}); upgrade sa-jobs instead of adopting it"
        )
    if online and current >= version:
        log.info("sa-jobs schema %r already at version %d; adopting it", schema, current)
    else:
        _execute_bounded(schema_mod.upgrade_statements(version, schema), online, schema,
                         f"revision sa_jobs_{version:04d}")
    # Leave out builds of indexes that a later version drops (version 4's
    # jobs_running_partition_idx, dropped by 8) when that version is installed already
    # (adopting a migrated schema) or is applied by this same run, as install() does:
    # each build reads the whole table, only for that later revision to drop the index.
    upto = max(current, version, _destination_version())
    concurrent = schema_mod.concurrent_statements(version, schema, upto=upto)
    if concurrent and online and _in_callers_transaction():
        _build_in_callers_transaction(version, schema, upto)
    elif concurrent:
        # CREATE INDEX CONCURRENTLY cannot run inside a transaction: this commits what ran
        # so far (the version is recorded) and builds the index without blocking writers.
        # The statements are IF NOT EXISTS, so re-running the revision heals a failed build.
        with op.get_context().autocommit_block(), _one_builder(online, schema):
            if online:
                # A build that died in the server left an invalid index, which IF NOT EXISTS
                # would keep: drop it so that re-running the revision really builds it.
                invalid = _invalid_indexes(op.get_bind(), schema, version)
                concurrent = [*schema_mod.drop_invalid_statements(invalid, schema), *concurrent]
            for stmt in concurrent:
                _execute(stmt)


def _destination_version() -> int:
    """The highest sa-jobs version this ``alembic upgrade`` applies: the highest revision of
    the branch among its destination and their ancestors (``depends_on`` included); Alembic
    applies every one of them, or stops with an error. 0 when the destination does not name
    revisions (a relative ``+2``), so nothing is left out."""
    from alembic import op

    ctx = op.get_context()
    env = getattr(ctx, "environment_context", None)
    destination = ctx.opts.get("destination_rev")
    if env is None or destination is None:
        return 0
    try:
        script = env.script
        targets = tuple(rev.revision for rev in script.get_revisions(destination) if rev is not None)
        revisions = list(script.revision_map.iterate_revisions(targets, None, implicit_base=True)) if targets else []
    except Exception:  # noqa: BLE001 - a relative or unresolvable destination: skip nothing
        return 0
    versions = [getattr(getattr(rev, "module", None), "SA_JOBS_VERSION", 0) for rev in revisions
                if rev.revision.startswith("sa_jobs_")]
    return max((v for v in versions if isinstance(v, int)), default=0)


def _invalid_indexes(bind: Connection, schema: str, version: int) -> list[str]:
    names = list(schema_mod.migration(version).concurrent_indexes)
    if not names:
        return []
    return [r[0] for r in bind.execute(text(schema_mod.INVALID_INDEXES_SQL), {"schema": schema, "names": names})]


def _in_callers_transaction() -> bool:
    """Whether Alembic runs on a connection whose transaction its caller began
    (``engine.begin()``, Alembic's recipe for sharing a connection): nothing can be
    committed midway, so ``autocommit_block`` is unavailable."""
    from alembic import op

    return bool(getattr(op.get_context(), "_in_external_transaction", False))


def _build_in_callers_transaction(version: int, schema: str, upto: int) -> None:
    """Build ``version``'s indexes in the caller's transaction, if it already holds the
    jobs table exclusively (created or altered in it, so a plain build blocks nobody
    more than that transaction does); otherwise say why the upgrade cannot go on."""
    from alembic import op

    bind = op.get_bind()
    m = schema_mod.migration(version)
    invalid = _invalid_indexes(bind, schema, version)
    built = set(m.concurrent_indexes) - schema_mod._dropped_after(version, upto)
    exists = {n: bind.execute(text("SELECT to_regclass(:i) IS NOT NULL"), {"i": _regclass(schema, n)}).scalar()
              for n in {*built, *m.dropped_indexes}}
    if not invalid and all(exists[n] for n in built) and not any(exists[n] for n in m.dropped_indexes):
        return  # already done (an adopted schema): nothing to build or drop
    if not bind.execute(text(_HOLDS_JOBS_SQL), {"t": _regclass(schema, schema_mod.JOBS_TABLE)}).scalar():
        raise SchemaVersionError(
            f"revision sa_jobs_{version:04d} builds indexes on {schema}.{schema_mod.JOBS_TABLE} CONCURRENTLY,"
            " which cannot run inside the transaction the caller began on Alembic's connection"
            " (engine.begin()); building them in it would block every write to the table. Run"
            " this upgrade on a connection from engine.connect(), with no transaction begun (or with"
            " the alembic command line, or sa-jobs migrate)"
        )
    for stmt in [*schema_mod.drop_invalid_statements(invalid, schema, concurrently=False),
                 *schema_mod.concurrent_statements(version, schema, concurrently=False, upto=upto)]:
        _execute(stmt)


# Whether this session holds ACCESS EXCLUSIVE on the jobs table: nobody else can use it
# until this transaction ends, whatever this transaction does to it meanwhile.
_HOLDS_JOBS_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() AND granted"
    " AND locktype = 'relation' AND relation = to_regclass(:t) AND mode = 'AccessExclusiveLock')"
)


def _regclass(schema: str, name: str) -> str:
    from psycopg import sql

    return sql.Identifier(schema, name).as_string()


@contextlib.contextmanager
def _one_builder(online: bool, schema: str) -> Iterator[None]:
    """Build under the installers' session lock, outside any transaction.

    Without it, an ``install()``/``sa-jobs migrate`` starting meanwhile (a process of the
    app, while moving from it to Alembic) altered the table for the next version: its
    transaction waited for the build's table lock, the build for that transaction, and
    PostgreSQL failed the Alembic upgrade ("deadlock detected").
    """
    if not online:
        yield
        return
    from alembic import op

    bind = op.get_bind()
    key = {"key": schema_mod.builders_lock_key(schema)}
    # Polled, as the installers do: a session blocked in pg_advisory_lock() would hold a
    # snapshot that the other installer's CREATE INDEX CONCURRENTLY waits out.
    while not bind.execute(text("SELECT pg_try_advisory_lock(hashtext(:key))"), key).scalar():
        time.sleep(0.05)
    try:
        yield
    finally:
        if not bind.invalidated and not bind.closed:
            bind.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), key)


def downgrade_version(version: int) -> None:
    """Revert schema ``version`` in the configured schema (version 1 removes the queue)."""
    schema = configured_schema()
    online, record = _online_version(version, schema)
    current = record.version
    if online and current > version:
        # A version this release knows was installed past Alembic's record (sa-jobs
        # migrate, install() at start-up): recording it first is what unblocks the downgrade.
        advice = (f"record it first with `alembic upgrade sa_jobs_{current:04d}`, then downgrade"
                  if current <= schema_mod.LATEST_VERSION
                  else "downgrade with the sa-jobs release that installed it")
        raise SchemaVersionError(
            f"schema {schema!r} is at sa-jobs version {current}, newer than revision {version}"
            f" being downgraded; {advice}"
        )
    if online and current < version:
        log.info("sa-jobs schema %r is at version %d; nothing to remove for %d", schema, current, version)
        return
    _execute_bounded(schema_mod.downgrade_statements(version, schema), online, schema,
                     f"the downgrade of revision sa_jobs_{version:04d}")


def _execute_bounded(stmts: list[str], online: bool, schema: str, what: str) -> None:
    """Run a revision's transactional statements, each lock wait bounded by the configured
    ``lock_timeout`` and retried from a savepoint, as ``sa-jobs migrate`` does: behind a
    long transaction on the jobs table, an ALTER waited with every claim queued behind it.
    The setting is put back after, so the app's own revisions in this transaction keep
    theirs. Offline (``--sql``) the statements are printed as they are."""
    from alembic import op

    policy = configured_lock_policy()
    if not online or policy.timeout is None:
        for stmt in stmts:
            _execute(stmt)
        return
    bind = op.get_bind()
    previous = bind.execute(text("SELECT current_setting('lock_timeout')")).scalar()

    def attempt() -> None:
        # A savepoint: a timed-out statement aborts only it, releasing its locks for the pause.
        with bind.begin_nested():
            bind.execute(text(policy.statement()))
            for stmt in stmts:
                _execute(stmt)

    def give_up() -> SchemaLockTimeoutError:
        rows = bind.execute(text(schema_mod.BLOCKERS_SQL), {"schema": schema, "waited": policy.timeout}).all()
        return schema_mod.lock_timeout_error(schema, what, policy, [tuple(r) for r in rows])

    schema_mod.with_lock_retries(policy, attempt, give_up)
    bind.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": previous})
