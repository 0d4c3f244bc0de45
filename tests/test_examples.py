"""The examples run as documented: the quickstart (in-app worker, `sa-jobs worker myapp.jobs`),
docs/queue-control.md's examples and commands as the page writes them, and the alembic heads the docs show."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from sa_jobs._url import sqlalchemy_url

from .conftest import REPO_ROOT
from .helpers import q, wait_for

QUICKSTART = REPO_ROOT / "examples" / "quickstart"
QUEUE_CONTROL = REPO_ROOT / "docs" / "queue-control.md"


def test_quickstart_app_enqueues_and_runs_in_process(database_url):
    env = {**os.environ, "SA_JOBS_DATABASE_URL": database_url}
    proc = subprocess.run([sys.executable, "app.py"], cwd=QUICKSTART, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "receipt_sent=True" in proc.stdout and "completed on attempt 1" in proc.stdout


def test_quickstart_jobs_run_under_the_cli_worker(database_url):
    sys.path.insert(0, str(QUICKSTART))
    try:
        from myapp.jobs import SendReceipt
        from myapp.models import Base, Order
    finally:
        sys.path.remove(str(QUICKSTART))
    import sa_jobs

    sa_jobs.install(database_url)
    engine = create_engine(sqlalchemy_url(database_url))
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        order = Order(total=7)
        session.add(order)
        session.flush()
        session.add(SendReceipt(order_id=order.id))
        order_id = order.id
    env = {**os.environ, "SA_JOBS_DATABASE_URL": database_url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "sa_jobs", "worker", "myapp.jobs", "--queue", "emails=3"],
        cwd=QUICKSTART, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        def sent() -> bool:
            with Session(engine) as session:
                return bool(session.scalar(select(Order.receipt_sent).where(Order.id == order_id)))

        assert wait_for(sent, 30), worker.stdout.read().decode() if worker.poll() is not None else "not sent"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
        engine.dispose()


def test_the_documented_alembic_heads_name_the_latest_schema_revision():
    """`alembic heads` as docs/alembic.md and the example app's README show it: the sa_jobs
    branch's head is the latest schema version's revision (the README still showed
    sa_jobs_0011 after schema v12 shipped)."""
    from sa_jobs import schema as schema_mod

    head = f"sa_jobs_{schema_mod.LATEST_VERSION:04d}"
    for doc in (REPO_ROOT / "docs" / "alembic.md", REPO_ROOT / "examples" / "alembic_app" / "README.md"):
        shown = re.findall(r"(sa_jobs_\d{4}) \(sa_jobs\)", doc.read_text())
        assert shown and set(shown) == {head}, f"{doc.name} shows {shown} as the sa_jobs head, not {head}"


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    """queue-control.md's examples use the default ``sa_jobs`` schema and fixed queue names
    (``emails``, ``crm``): a database of their own, dropped afterwards."""
    name = "sa_jobs_docs_" + uuid.uuid4().hex[:12]
    q(database_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        q(database_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _write_queue_control_examples(dest: Path) -> list[str]:
    """Each ```python block of the page as a file of ``dest``: one whose first line is
    ``# example_x.py ...`` under that name (the page's other blocks import them), the others
    as block_N.py. Returns the commands of its ```bash block, one a line, comments dropped."""
    text = QUEUE_CONTROL.read_text()
    for n, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
        named = re.match(r"# (example_\w+\.py)", block)
        (dest / (named.group(1) if named else f"block_{n}.py")).write_text(block)
    (commands,) = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [line.split("#")[0].strip() for line in commands.splitlines() if line.split("#")[0].strip()]


def test_the_queue_control_pages_examples_and_commands_run_as_written(own_database, tmp_path):
    """docs/queue-control.md: "Every example below runs as is against a database where the
    queue is installed". Its unique-jobs block (which asserts its own outcome), the limits
    script, and a `sa-jobs worker` of the periodic, limits and retention modules run as the
    page writes them; then each admin command of its section 4, with the placeholders (Q, K,
    S, N) filled in and the optional parts given, is accepted (no usage error, no traceback)."""
    commands = _write_queue_control_examples(tmp_path)
    (retention,) = [p.stem for p in tmp_path.glob("block_*.py") if "SA_JOBS_MAINTENANCE" in p.read_text()]
    env = {**os.environ, "SA_JOBS_DATABASE_URL": own_database,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO_ROOT)])}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    for argv in (["-m", "sa_jobs", "migrate"], *([p.name] for p in sorted(tmp_path.glob("block_*.py"))),
                 ["example_limits.py"]):
        proc = run(*argv)
        assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
    crm = next(row for row in json.loads(run("-m", "sa_jobs", "queues", "--json").stdout) if row["queue"] == "crm")
    assert (crm["available"], crm["concurrency"], crm["partition_concurrency"], crm["rate"]) == (500, 20, 2, "10/1s")

    worker = subprocess.Popen([sys.executable, "-m", "sa_jobs", "worker", "example_limits", "example_periodic", retention],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def ran_and_registered() -> bool:
            completed = q(own_database, "SELECT count(*) FROM sa_jobs.jobs WHERE kind = 'sync_customer' AND state = 'completed'")
            periodic = q(own_database, "SELECT name FROM sa_jobs.periodic")
            return completed[0][0] >= 5 and {name for (name,) in periodic} == {"morning_digest", "five_minutes"}

        assert wait_for(ran_and_registered, 30), worker.stdout.read().decode() if worker.poll() is not None else "not yet"
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0

    placeholders = {"Q": "crm", "K": "sync_customer", "S": "available", "N": "10"}
    for command in commands + ["sa-jobs queues limit crm --concurrency 20 --partition-concurrency 2 --rate 10/1s"]:
        words = [placeholders.get(word, word) for word in command.replace("[", " ").replace("]", " ").split()]
        assert words[0] == "sa-jobs", command
        proc = run("-m", "sa_jobs", *words[1:])
        assert proc.returncode in (0, 1) and "usage:" not in proc.stderr and "Traceback" not in proc.stderr, (
            f"{command}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
