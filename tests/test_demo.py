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
