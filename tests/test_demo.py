"""`sa-jobs demo`, run as a new user runs it: no database URL, an embedded server."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from .conftest import REPO_ROOT


def test_demo_runs_on_the_embedded_default_and_tells_the_story():
    env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
    proc = subprocess.run(
        [sys.executable, "-m", "sa_jobs", "demo"], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=180,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "starting an embedded PostgreSQL" in out
    assert "the rolled-back transaction left none" in out
    assert re.search(r"DoomedExport \d+ is dead after 2 attempts", out)
    # The metrics endpoint was scraped and counted what happened.
    assert 'outcome="retried",queue="demo"} 2.0' in out  # the flaky webhook's two failures
    assert re.search(r'kind="demo.doomed_export",outcome="dead",queue="demo"\} 1\.0', out)
    assert re.search(r"demo\.flaky_webhook\s+completed\s+3/5", out)
    assert "receipt_sent=True" in out
    assert out.rstrip().endswith("Demo finished: OK")
    assert "Traceback" not in proc.stderr


_WITH_PASSWORD = """
import os, sys
from sqlalchemy.engine import make_url
from sa_jobs import embedded
from sa_jobs.cli import main

url = make_url(embedded.start(cleanup="delete")).set(password="s3cr@t pw")  # trust: any password
os.environ["SA_JOBS_DATABASE_URL"] = url.render_as_string(hide_password=False)
sys.exit(main(["demo"]))
"""


def test_the_demo_does_not_print_the_databases_password():
    """`sa-jobs demo` with SA_JOBS_DATABASE_URL set printed "Database: " and the URL whole,
    its password included, to the terminal and the CI log."""
    env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-c", _WITH_PASSWORD], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Demo finished: OK" in proc.stdout
    assert "s3cr" not in proc.stdout + proc.stderr
    assert re.search(r"^Database: postgresql://postgres:\*\*\*@", proc.stdout, re.M), proc.stdout


def test_the_demo_gives_up_on_a_server_that_never_answers():
    """SA_JOBS_DATABASE_URL naming a host that accepts connections and never answers (a dead
    proxy, a full firewall queue, a wrong port with a silent service): every other command
    fails after 10 s (--connect-timeout); the demo, which took none, waited for ever with
    nothing on screen past "Database: ..."."""
    import socket
    import time

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel accepts; nobody ever answers
        port = listener.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k not in ("SA_JOBS_DATABASE_URL", "SA_JOBS_TEST_DATABASE_URL")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "sa_jobs", "demo", "--connect-timeout", "1",
                               "--database-url", f"postgresql://postgres@127.0.0.1:{port}/test"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - started < 20
    [line] = proc.stderr.splitlines()
    assert line.startswith("sa-jobs: database error:"), line


def test_the_demo_connects_with_the_default_connect_timeout(monkeypatch):
    """Without --connect-timeout, the demo's URL gets the commands' 10 s, as they do."""
    from sqlalchemy.engine import make_url

    from sa_jobs import cli, demo

    seen: list[str] = []
    monkeypatch.setattr(demo, "run_demo", lambda url, **kw: seen.append(url) or 0)
    monkeypatch.delenv("SA_JOBS_CONNECT_TIMEOUT", raising=False)
    assert cli.main(["demo", "--database-url", "postgresql://u@h/db"]) == 0
    assert make_url(seen[0]).query == {"connect_timeout": "10"}
    seen.clear()
    monkeypatch.delenv("SA_JOBS_DATABASE_URL", raising=False)
    assert cli.main(["demo"]) == 0
    assert seen == [None]  # no URL: the embedded server, started by the demo


def test_the_demo_prints_pgservers_url_without_an_empty_password():
    """pgserver's URL carries an empty password (``postgres:@``): the demo's first line of
    output, "Database: postgresql://postgres:@/postgres?host=...", looked like a URL with a
    password gone missing."""
    from sa_jobs._url import display_url

    assert display_url("postgresql://postgres:@/postgres?host=/tmp/sa_jobs_pg_x") == \
        "postgresql://postgres@/postgres?host=/tmp/sa_jobs_pg_x"
    assert display_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert display_url("postgresql://u@h/db") == "postgresql://u@h/db"
