"""The shop's Alembic environment, with the sa-jobs branch included.

The sa-jobs specific parts are the ``include_object``/``include_name`` filters and
``transaction_per_migration=True`` (the branch builds indexes CONCURRENTLY, which commits
the migrations before it).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, make_url, pool

import alembic_ext
from shop.models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

# Only the shop's own tables: sa-jobs' tables belong to the sa_jobs branch.
target_metadata = Base.metadata

CONFIGURE_OPTIONS = dict(
    target_metadata=target_metadata,
    include_schemas=True,
    include_object=alembic_ext.include_object,
    include_name=alembic_ext.include_name,
    transaction_per_migration=True,
)


def database_url() -> str:
    raw = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url") or ""
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3, as sa-jobs uses
    return url.render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    context.configure(url=database_url(), literal_binds=True, **CONFIGURE_OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, **CONFIGURE_OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
