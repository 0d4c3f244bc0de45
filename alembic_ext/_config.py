"""Which Postgres schema the revisions target, read from the running Alembic config."""

from __future__ import annotations

from typing import Any, Optional

from sa_jobs import _validate
from sa_jobs.schema import DEFAULT_LOCK_RETRIES, DEFAULT_LOCK_TIMEOUT, DEFAULT_SCHEMA, LockPolicy, lock_policy

# ``alembic -x sa_jobs_schema=NAME``; wins so a one-off command can name the schema.
SCHEMA_X_ARG = "sa_jobs_schema"
# ``config.attributes["sa_jobs_schema"] = NAME`` in env.py or programmatic Config use.
SCHEMA_ATTRIBUTE = "sa_jobs_schema"
# ``sa_jobs_schema = NAME`` in the ``[alembic]`` section of alembic.ini, or in
# ``[tool.alembic]`` of pyproject.toml (read there too: an app configured in pyproject.toml
# keeps its options there, and an ignored one put the queue in ``sa_jobs`` silently).
SCHEMA_OPTION = "sa_jobs_schema"
# How long each attempt of a revision's DDL waits for a table lock (seconds; 0: no limit)
# and how often it is retried: read as the schema is (``-x``, attributes, ini, pyproject).
LOCK_TIMEOUT_OPTION = "sa_jobs_lock_timeout"
LOCK_RETRIES_OPTION = "sa_jobs_lock_retries"


def _alembic_context() -> Optional[Any]:
    """The EnvironmentContext while env.py runs, else None (the proxy raises outside it)."""
    from alembic import context

    try:
        context.config  # noqa: B018 - probe the proxy
    except (NameError, AttributeError):  # proxy not installed (yet) in this process
        return None
    return context


def configured_schema() -> str:
    """The queue's schema for this Alembic run, validated so it reaches SQL only quoted.

    Order: ``-x sa_jobs_schema=``, ``config.attributes``, alembic.ini, pyproject.toml's
    ``[tool.alembic]``, then ``sa_jobs``.
    Outside an Alembic run it is the default schema.
    """
    ctx = _alembic_context()
    if ctx is None:
        return DEFAULT_SCHEMA
    config = ctx.config
    value = (
        ctx.get_x_argument(as_dictionary=True).get(SCHEMA_X_ARG)
        or config.attributes.get(SCHEMA_ATTRIBUTE)
        or config.get_alembic_option(SCHEMA_OPTION)
        or DEFAULT_SCHEMA
    )
    return _validate.schema_name(value)


def _setting(ctx: Any, name: str) -> Any:
    return (ctx.get_x_argument(as_dictionary=True).get(name) or ctx.config.attributes.get(name)
            or ctx.config.get_alembic_option(name))


def configured_lock_policy() -> LockPolicy:
    """The DDL's lock wait for this Alembic run (``-x sa_jobs_lock_timeout=SECONDS``,
    ``sa_jobs_lock_retries=N``, or those keys in config.attributes, alembic.ini or
    pyproject.toml); sa-jobs' defaults outside a run or when not set."""
    ctx = _alembic_context()
    if ctx is None:
        return lock_policy()
    timeout, retries = _setting(ctx, LOCK_TIMEOUT_OPTION), _setting(ctx, LOCK_RETRIES_OPTION)
    return lock_policy(DEFAULT_LOCK_TIMEOUT if timeout is None else timeout,
                       DEFAULT_LOCK_RETRIES if retries is None else retries)


def default_schema_name() -> Optional[str]:
    """The connection's default schema, which reflection reports as ``None``."""
    ctx = _alembic_context()
    if ctx is None:
        return None
    try:
        dialect = ctx.get_context().dialect
    except Exception:  # no MigrationContext configured yet
        return None
    return getattr(dialect, "default_schema_name", None)
