"""Fixtures: a real PostgreSQL for every test, never a mock.

``SA_JOBS_TEST_DATABASE_URL`` selects a server; without it the suite starts an embedded
one (``sa_jobs.embedded``: the ``pgserver`` wheel, else the machine's initdb/pg_ctl). Each test that asks for ``schema`` gets the queue
installed in a fresh Postgres schema of its own (dropped afterwards), which also
exercises the schema option end to end.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine


REPO_ROOT = Path(__file__).resolve().parent.parent

# The plugin users load; its fixtures (sa_jobs_schema, sa_jobs_engine) are tested here too.
pytest_plugins = ["sa_jobs.testing"]

# A suite started as a background job of a shell without job control (``bash .ci/run &``
# in a script) inherits SIGINT ignored, and so would every process it starts: the tests of
# Ctrl-C (the CLI's, the embedded server's) then waited out their timeouts (9 failed, one
# CI run here). Python's own handler is put back, so the children get the default again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# The suite dogfoods the plugin's fixtures under the short names its tests use.


@pytest.fixture(scope="session")
def database_url(sa_jobs_database_url: str) -> str:
    return sa_jobs_database_url


def new_schema_name() -> str:
    return "t_" + uuid.uuid4().hex[:12]


@pytest.fixture
def schema(sa_jobs_schema: str) -> str:
    return sa_jobs_schema


@pytest.fixture
def engine(sa_jobs_engine: Engine) -> Engine:
    """A sync Engine whose ``sa_jobs`` tables resolve to this test's schema."""
    return sa_jobs_engine


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
    def version(path: Path) -> tuple[int, ...]:  # 9.6 < 10 < 15, which a string sort got wrong
        parts = path.parent.parent.name.split(".")
        return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()

    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=version, reverse=True):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    import pgserver

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / name)
