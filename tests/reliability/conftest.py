"""Fixtures of the reliability suite: a private cluster per session, a schema per test."""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sa_jobs import schema as schema_mod
from sa_jobs._url import sqlalchemy_url

from .cluster import PrivateCluster
from .support import Db, WorkerProc, setup_schema


@pytest.fixture(scope="session")
def cluster() -> Iterator[PrivateCluster]:
    c = PrivateCluster().init().start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def rel_url(cluster: PrivateCluster) -> str:
    cluster.wait_ready(60)  # a previous test may have restarted it
    return cluster.url


@pytest.fixture
def rel_schema(rel_url: str) -> Iterator[str]:
    name = "r_" + uuid.uuid4().hex[:12]
    schema_mod.install(rel_url, name)
    setup_schema(rel_url, name)
    yield name
    import psycopg
    from psycopg import sql

    with psycopg.connect(rel_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def db(rel_url: str, rel_schema: str) -> Iterator[Db]:
    d = Db(rel_url, rel_schema)
    yield d
    d.close()


@pytest.fixture
def rel_engine(rel_url: str, rel_schema: str) -> Iterator[Engine]:
    eng = create_engine(sqlalchemy_url(rel_url)).execution_options(
        schema_translate_map={schema_mod.DEFAULT_SCHEMA: rel_schema}
    )
    yield eng
    eng.dispose()


@pytest.fixture
def workers() -> Iterator[list[WorkerProc]]:
    """Every worker a test starts goes here; whatever is left is killed afterwards."""
    started: list[WorkerProc] = []
    yield started
    for w in started:
        w.close()
