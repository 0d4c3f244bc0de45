"""The examples run as documented: the quickstart (in-app worker, `sa-jobs worker myapp.jobs`), and the alembic heads the docs show."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from sa_jobs._url import sqlalchemy_url

from .conftest import REPO_ROOT
from .helpers import wait_for

QUICKSTART = REPO_ROOT / "examples" / "quickstart"


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
