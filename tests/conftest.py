"""Fixtures: a real PostgreSQL for every test, never a mock.

``SA_JOBS_TEST_DATABASE_URL`` selects a server; without it the suite starts an embedded
one from the ``pgserver`` wheel. Each test that asks for ``schema`` gets the queue
installed in a fresh Postgres schema of its own (dropped afterwards), which also
exercises the schema option end to end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from sa_jobs import schema as schema_mod
from sa_jobs._url import sqlalchemy_url

REPO_ROOT = Path(__file__).resolve().parent.parent

# The plugin users load; its fixtures (sa_jobs_schema, sa_jobs_engine) are tested here too.
pytest_plugins = ["sa_jobs.testing"]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("SA_JOBS_TEST_DATABASE_URL", "").strip()
    if url:
        yield url
        return
    from sa_jobs import embedded

    data_dir = tempfile.mkdtemp(prefix="sa_jobs_test_pg_")
    yield embedded.start(data_dir, cleanup="delete")


def new_schema_name() -> str:
    return "t_" + uuid.uuid4().hex[:12]


@pytest.fixture
def schema(database_url: str) -> Iterator[str]:
    name = new_schema_name()
    schema_mod.install(database_url, name)
    yield name
    schema_mod.uninstall(database_url, name)


@pytest.fixture
def engine(database_url: str, schema: str) -> Iterator[Engine]:
    """A sync Engine whose ``sa_jobs`` tables resolve to this test's schema."""
    eng = create_engine(sqlalchemy_url(database_url)).execution_options(
        schema_translate_map={schema_mod.DEFAULT_SCHEMA: schema}
    )
    yield eng
    eng.dispose()


def worker_command(database_url: str, schema: str, module: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sa_jobs", "--log-level", "WARNING", "worker", module,
        "--database-url", database_url, "--schema", schema, *extra,
    ]


def start_worker_process(database_url: str, schema: str, module: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A worker as a real OS process, importing ``module`` from the repo root."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.Popen(
        worker_command(database_url, schema, module, *extra),
        cwd=REPO_ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def pg_bin(name: str) -> str:
    """A PostgreSQL server binary for private clusters: Debian's when present, else pgserver's."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / name)
