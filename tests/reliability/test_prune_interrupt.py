"""Ctrl-C during ``sa-jobs prune``: the count it reports is what it deleted."""

from __future__ import annotations

import signal
import threading

import psycopg
from psycopg import sql

from sa_jobs import cli

from .proxy import Proxy
from .support import wait_for


def _left(url: str, schema: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, "jobs"))).fetchone()[0])


def test_a_prune_interrupted_as_its_batch_commits_counts_that_batch(cluster, rel_url, rel_schema, capsys):
    """psycopg answers Ctrl-C by cancelling the running statement. A batch that committed
    before the cancel reached the server (its result still on the way) was not counted:
    "interrupted after 0 job(s) deleted" while 10 were. Here the result is 1 s away (a
    proxy's latency) when the Ctrl-C comes, after the server committed the batch."""
    with psycopg.connect(rel_url, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (kind, state, finished_at) SELECT 'old', 'completed',"
                             " now() - interval '2 days' FROM generate_series(1, 30)").format(
            sql.Identifier(rel_schema, "jobs")))
    proxy = Proxy(cluster.port)
    main = threading.get_ident()

    def interrupt_once_a_batch_committed() -> None:
        wait_for(lambda: _left(rel_url, rel_schema) < 30, 30)
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_a_batch_committed)
    try:
        url = cluster.url_via(proxy.port)
        proxy.latency = 1.0  # each way
        thread.start()
        code = cli.main(["prune", "--older-than", "1d", "--batch", "10", "--database-url", url, "--schema", rel_schema])
    finally:
        thread.join(30)
        proxy.close()
    _, err = capsys.readouterr()
    left = _left(rel_url, rel_schema)
    assert code == 130 and "Traceback" not in err, err
    assert left == 20 and f"interrupted after {30 - left} job(s) deleted" in err, (left, err)


def test_a_bulk_action_interrupted_as_its_batch_commits_counts_that_batch(cluster, rel_url, rel_schema, capsys):
    """As the prune above, for `jobs delete` (and every bulk action): Ctrl-C while a batch's
    COMMIT was on its way back was raised out of the commit, so the batch the server had
    committed was left out of the count and of the --json list of ids acted on."""
    import json

    with psycopg.connect(rel_url, autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (kind, state, finished_at) SELECT 'old', 'completed', now()"
                             " FROM generate_series(1, 30)").format(sql.Identifier(rel_schema, "jobs")))
    proxy = Proxy(cluster.port)
    main = threading.get_ident()

    def interrupt_once_a_batch_committed() -> None:
        wait_for(lambda: _left(rel_url, rel_schema) < 30, 60)
        signal.pthread_kill(main, signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_a_batch_committed)
    try:
        url = cluster.url_via(proxy.port)
        proxy.latency = 0.5  # each way
        thread.start()
        code = cli.main(["jobs", "delete", "--kind", "old", "--batch", "10", "--json", "--database-url", url,
                         "--schema", rel_schema])
    finally:
        thread.join(60)
        proxy.close()
    out, err = capsys.readouterr()
    left = _left(rel_url, rel_schema)
    assert code == 130 and "Traceback" not in err, err
    assert left == 20 and f"interrupted after {30 - left} job(s) deleted" in err, (left, err)
    assert len(json.loads(out)["deleted"]) == 30 - left, out
