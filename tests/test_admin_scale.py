"""The operator's bulk commands on 100k rows while real worker processes claim and
complete the same rows (slow: run with ``-m slow``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from psycopg import sql

from .conftest import REPO_ROOT, start_worker_process
from .helpers import jobs_sql, q, wait_for
from .jobs_core import effects_ddl

ROWS = 100_000


def _effects(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, "effects")


@pytest.mark.slow
@pytest.mark.parametrize("argv, verb", [
    (("jobs", "retry", "--kind", "core_noop"), "retried"),
    (("jobs", "cancel", "--kind", "core_noop"), "cancelled"),
    (("jobs", "delete", "--kind", "core_noop"), "deleted"),
    (("dead", "replay", "--kind", "core_noop"), "replayed"),
], ids=["retry", "cancel", "delete", "replay"])
def test_a_bulk_command_on_100k_rows_that_workers_claim_and_complete(database_url, schema, argv, verb):
    """A third each of waiting, dead and completed jobs; two worker processes claim and
    complete the waiting ones (oldest first, as the command goes) while the command runs.
    Checked: the command does what it announced (its progress bar's total is the jobs it
    reports done or not done: each batch listed its matches anew, so `jobs retry` replayed
    jobs the workers completed meanwhile, past its total, and ran them twice), its count is
    the rows changed, no row is left in an impossible state, and the claims never stall."""
    q(database_url, effects_ddl(schema))
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state, attempt, max_attempts, finished_at)"
                                     " SELECT 'core_noop', 'core', s, CASE WHEN s = 'dead' THEN 3 ELSE 0 END, 3,"
                                     " CASE WHEN s <> 'available' THEN now() - interval '2 days' END"
                                     " FROM generate_series(1, %s) AS g,"
                                     " LATERAL (SELECT (ARRAY['available', 'dead', 'completed'])[1 + g %% 3] AS s) AS x"),
      (ROWS,))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    env = {"SA_JOBS_DATABASE_URL": database_url}
    workers = [start_worker_process(database_url, schema, "tests.jobs_core", "--concurrency", "20", env=env)
               for _ in range(2)]
    try:
        assert wait_for(lambda: q(database_url, sql.SQL("SELECT count(*) FROM {}").format(_effects(schema)))[0][0] > 200,
                        60), "the workers never started"
        before = dict(q(database_url, jobs_sql(schema, "SELECT state, count(*) FROM {jobs} GROUP BY state")))
        started = time.monotonic()
        run = subprocess.run([sys.executable, "-m", "sa_jobs", *argv, "--database-url", database_url, "--schema", schema,
                              "--json", "--progress"], cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                             capture_output=True, text=True, timeout=600)
        elapsed = time.monotonic() - started
        time.sleep(1)  # the workers go on a moment after the command
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.communicate(timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)  # the whole of stdout: the bar and any warning are stderr's
    done, not_done = result[verb], result["not_" + verb]
    frames = re.findall(r"(\d+)/(\d+) +\d+%", run.stderr)
    announced = int(frames[0][1])
    assert len(done) + len(not_done) == announced == int(frames[-1][0]) == int(frames[-1][1]), (
        len(done), len(not_done), frames[0], frames[-1], before)
    rows = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
    if verb == "deleted":
        assert not set(done) & set(rows) and len(rows) == ROWS - len(done), "the count is not the rows deleted"
    else:
        expected = "cancelled" if verb == "cancelled" else {"available", "running", "completed", "retryable", "dead"}
        assert all(rows[i] in expected if isinstance(expected, set) else rows[i] == expected for i in done)
        if verb == "cancelled":
            assert sum(1 for s in rows.values() if s == "cancelled") == len(done)
    # The longest pause between two completions while the command ran: the claims never
    # waited for a batch (SKIP LOCKED, batches of 1000 rows).
    gap = q(database_url, sql.SQL("SELECT extract(epoch FROM max(d)) FROM (SELECT at - lag(at) OVER (ORDER BY at) AS d"
                                  " FROM {}) AS x").format(_effects(schema)))[0][0]
    print(f"\n{' '.join(argv)}: {len(done)} {verb}, {len(not_done)} not, in {elapsed:.1f} s;"
          f" longest pause between completions {float(gap) * 1000:.0f} ms")
    assert float(gap) < 5, gap


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["deleted", "cancelled"])
def test_ctrl_c_midway_through_a_bulk_command_on_100k_rows_says_what_it_did(database_url, schema, verb):
    """SIGINT once a few batches are done, while workers claim and complete the rows: exit
    130, the --json result of what was done (the rows changed, no more, no fewer), and the
    line saying how many."""
    import signal

    q(database_url, effects_ddl(schema))
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, state) SELECT 'core_noop', 'core', 'available'"
                                     " FROM generate_series(1, %s)"), (ROWS,))
    env = {"SA_JOBS_DATABASE_URL": database_url}
    workers = [start_worker_process(database_url, schema, "tests.jobs_core", "--concurrency", "20", env=env)
               for _ in range(2)]
    try:
        assert wait_for(lambda: q(database_url, sql.SQL("SELECT count(*) FROM {}").format(_effects(schema)))[0][0] > 200,
                        60), "the workers never started"
        command = subprocess.Popen(
            [sys.executable, "-m", "sa_jobs", "jobs", "delete" if verb == "deleted" else "cancel", "--kind", "core_noop",
             "--database-url", database_url, "--schema", schema, "--json", "--progress", "--batch", "500"],
            cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        assert command.stderr is not None
        shown = ""
        while not re.search(r"\] ([2-9]\d{3}|\d{5})/", shown):  # a few batches done
            char = command.stderr.read(1)
            assert char, shown
            shown += char
        command.send_signal(signal.SIGINT)
        out, err = command.communicate(timeout=60)
        err = shown + err
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.communicate(timeout=60)
    assert command.returncode == 130 and "Traceback" not in err, err[-2000:]
    result = json.loads(out)
    done = result[verb]
    assert result["interrupted"] is True and f"interrupted after {len(done)} job(s) {verb}" in err, err[-500:]
    rows = dict(q(database_url, jobs_sql(schema, "SELECT id, state FROM {jobs}")))
    if verb == "deleted":
        assert len(rows) == ROWS - len(done) and not set(done) & set(rows)
    else:
        cancelled = {i for i, s in rows.items() if s == "cancelled"}
        assert cancelled == set(done)
    assert 0 < len(done) < ROWS
