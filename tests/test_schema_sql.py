"""The schema and the SQL the worker runs: plans, NOTIFY, quoting, idempotent install."""

from __future__ import annotations

import ast
import re
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from sa_jobs import InvalidIdentifierError, schema as schema_mod
from sa_jobs._url import to_conninfo
from sa_jobs.queries import Queries

from .conftest import new_schema_name, pg_bin
from .helpers import jobs_sql, q, run_worker_until, states

PACKAGE = Path(__file__).resolve().parent.parent / "sa_jobs"


def _nodes(plan: dict) -> list[dict]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


def test_claim_plan_is_an_index_scan_without_sort_at_100k_backlog(database_url, schema):
    q(database_url, jobs_sql(schema,
        "INSERT INTO {jobs} (kind, queue, args, priority, state, finished_at)"
        " SELECT 'k', CASE WHEN g % 10 = 0 THEN 'other' ELSE 'default' END, '{{}}', g % 3,"
        "  CASE WHEN g > 100000 THEN 'completed' ELSE 'available' END,"
        "  CASE WHEN g > 100000 THEN now() END"
        " FROM generate_series(1, 150000) g"))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    queries = Queries.for_schema(schema)
    with psycopg.connect(to_conninfo(database_url)) as conn:  # a transaction, rolled back
        (plan_json,) = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries.claim,
            {"queue": "default", "limit": 100, "token": uuid.uuid4(), "owner": "x", "lease": 30},
        ).fetchone()
        conn.rollback()
    nodes = _nodes(plan_json[0]["Plan"])
    types = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in types and "Sort" not in types, types
    scans = [n for n in nodes if n.get("Index Name") == "jobs_claim_idx"]
    assert scans and scans[0]["Node Type"] in ("Index Scan", "Index Only Scan"), types
    # It stops after the batch: it reads a small multiple of LIMIT, not the backlog.
    assert scans[0]["Actual Rows"] <= 300, scans[0]["Actual Rows"]
    assert plan_json[0]["Plan"]["Actual Rows"] == 100


def test_a_resumed_claim_skips_the_dead_head_of_the_queue(database_url, schema):
    # Claimed jobs leave dead entries at the head of jobs_claim_idx until VACUUM; a claim
    # from the start steps over all of them, a resumed one descends past them.
    q(database_url, jobs_sql(schema, "ALTER TABLE {jobs} SET (autovacuum_enabled = false)"))
    q(database_url, jobs_sql(schema,
        "INSERT INTO {jobs} (kind, queue, args) SELECT 'k', 'default', '{{}}' FROM generate_series(1, 40000)"))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    queries = Queries.for_schema(schema)
    claim = {"queue": "default", "owner": "x", "lease": 30}
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(40):  # 20,000 claimed and completed, in claim order
            rows = conn.execute(queries.claim, {**claim, "limit": 500, "token": uuid.uuid4()}).fetchall()
            conn.execute(jobs_sql(schema, "UPDATE {jobs} SET state = 'completed' WHERE id = ANY(%s)"),
                         ([r[0] for r in rows],))
        last = max((r[6], r[9], r[0]) for r in rows)
        resume = {"after_priority": last[0], "after_scheduled": last[1], "after_id": last[2]}

        def claim_scan(statement: str, params: dict) -> tuple[dict, list[int]]:
            with conn.transaction(force_rollback=True):
                (plan_json,) = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement,
                                            {**claim, **params, "limit": 100, "token": uuid.uuid4()}).fetchone()
            scan = next(n for n in _nodes(plan_json[0]["Plan"]) if n.get("Index Name") == "jobs_claim_idx")
            return scan, [n["Node Type"] for n in _nodes(plan_json[0]["Plan"])]

        resumed, types = claim_scan(queries.claim_after, resume)
        from_start, _ = claim_scan(queries.claim, {})
        with conn.transaction(force_rollback=True):
            got = sorted(r[0] for r in conn.execute(queries.claim_after, {**claim, **resume, "limit": 100,
                                                                            "token": uuid.uuid4()}).fetchall())
    assert "Seq Scan" not in types and "Sort" not in types, types
    assert resumed["Actual Rows"] == 100
    # The next 100 jobs in claim order, read from a handful of pages...
    assert got == list(range(last[2] + 1, last[2] + 101))
    assert resumed["Shared Hit Blocks"] + resumed.get("Shared Read Blocks", 0) <= 20, resumed
    # ...where the claim from the start walks the 20,000 dead entries first.
    assert from_start["Shared Hit Blocks"] + from_start.get("Shared Read Blocks", 0) >= 50, from_start


def _notifications(conn: psycopg.Connection, wait: float = 0.3) -> list[psycopg.Notify]:
    return list(conn.notifies(timeout=wait))


def test_insert_trigger_notifies_once_per_statement_without_payload(database_url, schema):
    channel = schema_mod.channel_name(schema)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as listener, psycopg.connect(
        to_conninfo(database_url), autocommit=True
    ) as writer:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        insert = jobs_sql(schema, "INSERT INTO {jobs} (kind, args) SELECT 'k', jsonb_build_object('secret', 's3cr3t') FROM generate_series(1, %s)")
        writer.execute(insert, (500,))
        got = _notifications(listener)
        assert [(n.channel, n.payload) for n in got] == [(channel, "")]
        writer.execute(insert, (1,))
        writer.execute(insert, (1,))
        assert len(_notifications(listener)) == 2
        with writer.transaction():
            writer.execute(insert, (3,))
            writer.execute(insert, (3,))
        # Equal notifications collapse within a transaction: one wake-up at commit.
        assert len(_notifications(listener)) == 1
        with pytest.raises(RuntimeError):
            with writer.transaction():
                writer.execute(insert, (1,))
                raise RuntimeError
        assert _notifications(listener) == []


def test_install_is_idempotent_and_concurrent_safe(database_url):
    import threading

    name = new_schema_name()
    errors: list[BaseException] = []

    def install() -> None:
        try:
            schema_mod.install(database_url, name)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert schema_mod.install(database_url, name) == schema_mod.LATEST_VERSION
        assert schema_mod.installed_version(to_conninfo(database_url), name) == schema_mod.LATEST_VERSION
    finally:
        schema_mod.uninstall(database_url, name)
    assert schema_mod.installed_version(to_conninfo(database_url), name) == 0


@pytest.mark.parametrize(
    "bad",
    ['a"b', "a;drop table x", "A", "1abc", "", "a b", "%s", "$1", "é", "a\x00b", "x" * 41, "a-b", None, 5],
)
def test_schema_names_are_validated_before_any_sql(database_url, bad):
    with pytest.raises(InvalidIdentifierError):
        schema_mod.install(database_url, bad)
    with pytest.raises(InvalidIdentifierError):
        Queries.for_schema(bad)
    with pytest.raises(InvalidIdentifierError):
        schema_mod.install_sql(bad)


def test_state_check_constraint_rejects_unknown_states(database_url, schema):
    with pytest.raises(psycopg.errors.CheckViolation):
        q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, state) VALUES ('k', 'pending')"))


def test_migrate_sql_is_complete_ddl(database_url):
    name = new_schema_name()
    script = schema_mod.install_sql(name)
    # As a team applying SQL by hand would: psql, statement by statement, stop on error.
    import subprocess

    subprocess.run(
        [pg_bin("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", to_conninfo(database_url)],
        input=script.encode(), check=True, capture_output=True,
    )
    try:
        assert schema_mod.installed_version(to_conninfo(database_url), name) == schema_mod.LATEST_VERSION
        assert schema_mod.install(database_url, name) == schema_mod.LATEST_VERSION  # nothing left to do
    finally:
        schema_mod.uninstall(database_url, name)


def test_package_builds_no_sql_from_python_string_formatting():
    """SQL text in the package is composed with psycopg.sql/SQLAlchemy, never f-strings or %."""
    sql_words = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|LISTEN|NOTIFY)\b")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
                if sql_words.search(text):
                    offenders.append(f"{path.name}:{node.lineno} f-string")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant):
                if isinstance(node.left.value, str) and sql_words.search(node.left.value):
                    offenders.append(f"{path.name}:{node.lineno} % formatting")
            elif (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                and isinstance(node.func.value, ast.Constant) and isinstance(node.func.value.value, str)
                and sql_words.search(node.func.value.value)
            ):
                offenders.append(f"{path.name}:{node.lineno} str.format")
    assert offenders == []


def test_package_has_no_pickle_marshal_or_eval():
    banned = re.compile(r"\b(pickle|marshal|eval|exec)\s*[\.(]|import (pickle|marshal)")
    hits = [f"{p.name}" for p in PACKAGE.rglob("*.py") if banned.search(p.read_text())]
    assert hits == []


def test_outcome_flush_looks_jobs_up_by_primary_key_under_churn(database_url, schema):
    """The fenced flush must not scan the partial index of running jobs (it scanned
    jobs_lease_idx, jobs_running_idx's predecessor, 10x slower under churn)."""
    # Churn as a busy worker leaves it: 50k jobs ran and finished (dead entries in the
    # partial index of running jobs, not yet vacuumed), statistics say almost nothing is running,
    # and 100 jobs are running now.
    q(database_url, jobs_sql(schema, "ALTER TABLE {jobs} SET (autovacuum_enabled = false)"))
    running = "SELECT 'k', 'running', gen_random_uuid(), now() + interval '1 hour', 1 FROM generate_series(1, %s)"
    insert = "INSERT INTO {jobs} (kind, state, claim_token, lease_expires_at, attempt) " + running
    q(database_url, jobs_sql(schema, insert), (50_000,))
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', lease_expires_at = NULL, finished_at = now()"))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    q(database_url, jobs_sql(schema, insert), (100,))
    rows = q(database_url, jobs_sql(schema, "SELECT id, claim_token FROM {jobs} WHERE state = 'running'"))
    ids, tokens = [r[0] for r in rows], [r[1] for r in rows]
    queries = Queries.for_schema(schema)
    params = {
        "c_ids": ids, "c_tokens": tokens, "c_results": ["1"] * len(ids), "c_progress": [None] * len(ids),
        "f_ids": [], "f_tokens": [], "f_targets": [], "f_errors": [], "f_delays": [], "f_progress": [],
        "r_ids": [], "r_tokens": [], "r_reported": [], "n": len(ids),
    }
    with psycopg.connect(to_conninfo(database_url)) as conn:  # rolled back
        (plan_json,) = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries.flush_outcomes, params).fetchone()
        conn.rollback()
    nodes = _nodes(plan_json[0]["Plan"])
    index_names = {n.get("Index Name") for n in nodes}
    assert "jobs_running_idx" not in index_names, index_names
    assert "Seq Scan" not in [n["Node Type"] for n in nodes]
    assert any(name and name.endswith("_pkey") for name in index_names), index_names
    # Every one of the 100 fenced rows was found and updated.
    assert sum(n["Actual Rows"] for n in nodes if n["Node Type"] == "ModifyTable") == 100
    # The claims written are listed only when some were not (the UNION ALL of the three
    # outcome CTEs): a flush that wrote its whole batch never runs that list.
    unions = [n for n in nodes if n["Node Type"] == "Append"]
    assert len(unions) == 1 and unions[0]["Actual Loops"] == 0, unions



def test_a_partitioned_claim_without_room_locks_no_waiting_job(database_url, schema):
    """Schema v6's partitioned claims lock jobs as they read them. A queue with no room
    (paused, or at its queue concurrency) is polled by every worker: those polls must not
    lock its waiting jobs, or an admin's cancel or a priority change would wait on them.
    (They do not: the window is read only through the LIMIT of the room, which is 0.)"""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    fn = sql.Identifier(schema, "claim_limited")
    q(database_url, sql.SQL("INSERT INTO {} (name, partition_concurrency, paused) VALUES ('paused', 5, true),"
                            " ('full', 5, false)").format(queues))
    q(database_url, sql.SQL("UPDATE {} SET concurrency = 1 WHERE name = 'full'").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', q, 'key' || (g % 3)"
                            " FROM generate_series(1, 20) g, unnest(ARRAY['paused', 'full']) q").format(jobs))
    call = sql.SQL("SELECT count(*) FROM {}(%s, 50, %s, 'x', 30, 100)").format(fn)
    lockable = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE state = 'available'"
                       " FOR UPDATE SKIP LOCKED) s").format(jobs)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as poller, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as other:
        assert poller.execute(call, ("full", uuid.uuid4())).fetchone()[0] == 1  # 'full' is now at its limit
        with poller.transaction():
            for queue in ("full", "paused", "full"):
                assert poller.execute(call, (queue, uuid.uuid4())).fetchone()[0] == 0
            with other.transaction():
                assert other.execute(lockable).fetchone()[0] == 39


def test_the_partitioned_skip_scan_locks_only_the_jobs_it_claims(database_url, schema):
    """When busy keys fill the head window, the skip scan offers one job of every key with
    room. Schema v6 locked each offer as it read it (here 300 row locks, and WAL records,
    to claim 50); v7 locks only the jobs it picks."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    fn = sql.Identifier(schema, "claim_limited")
    q(database_url, sql.SQL("INSERT INTO {} (name, partition_concurrency) VALUES ('p', 1)").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key, priority)"
                            " SELECT 'k', 'p', 'hot', -1 FROM generate_series(1, 100)").format(jobs))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key)"
                            " SELECT 'k', 'p', 'key' || g FROM generate_series(1, 300) g").format(jobs))
    call = sql.SQL("SELECT partition_key FROM {fn}(%s, %s, %s, 'x', 30, 16) c JOIN {jobs} USING (id)").format(
        fn=fn, jobs=jobs)
    lockable = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE state = 'available'"
                       " FOR UPDATE SKIP LOCKED) s").format(jobs)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as claimer, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as other:
        assert claimer.execute(call, ("p", 1, uuid.uuid4())).fetchall() == [("hot",)]  # 'hot' is at its limit
        with claimer.transaction():
            keys = [k for (k,) in claimer.execute(call, ("p", 50, uuid.uuid4())).fetchall()]
            assert len(keys) == len(set(keys)) == 50 and "hot" not in keys
            with other.transaction():
                # 399 waiting: the head window's 16 'hot' jobs and the 50 claimed are locked.
                assert other.execute(lockable).fetchone()[0] == 399 - 16 - 50


def test_a_partitioned_claim_with_little_room_locks_a_window_near_its_room(database_url, schema):
    """The head window is locked as it is read. When a queue concurrency limit leaves room
    for 2 jobs, a claim asking for 50 locks at most max(16, 2 x room) jobs, not 50."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    fn = sql.Identifier(schema, "claim_limited")
    q(database_url, sql.SQL("INSERT INTO {} (name, partition_concurrency, concurrency) VALUES ('p', 5, 2)").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key)"
                            " SELECT 'k', 'p', 'key' || (g % 10) FROM generate_series(1, 100) g").format(jobs))
    lockable = sql.SQL("SELECT count(*) FROM (SELECT 1 FROM {} WHERE state = 'available'"
                       " FOR UPDATE SKIP LOCKED) s").format(jobs)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as claimer, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as other:
        with claimer.transaction():
            got = claimer.execute(sql.SQL("SELECT count(*) FROM {}('p', 50, %s, 'x', 30, 50)").format(fn),
                                  (uuid.uuid4(),)).fetchone()[0]
            assert got == 2
            with other.transaction():
                assert other.execute(lockable).fetchone()[0] == 100 - 16


def tuples_read(conn: psycopg.Connection, schema: str) -> int:
    """Tuples this transaction read from the jobs table's heap (pg_stat_xact_user_tables).
    Includes counts of earlier transactions not yet reported: take differences."""
    return conn.execute("SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
                        " FROM pg_stat_xact_user_tables WHERE relid = %s::regclass",
                        (f'"{schema}".jobs',)).fetchone()[0]


def _claim_limited(conn: psycopg.Connection, schema: str, queue: str, limit: int, scan: int) -> tuple[list, int]:
    """Claim through the schema's function and roll back: the (queue, key) of each claimed
    job, sorted, and the jobs table tuples the claim read from the heap."""
    fn, jobs = sql.Identifier(schema, "claim_limited"), sql.Identifier(schema, "jobs")
    with conn.transaction(force_rollback=True):
        before = tuples_read(conn, schema)
        ids = [r[0] for r in conn.execute(sql.SQL("SELECT id FROM {}(%s, %s, %s, 'x', 30, %s)").format(fn),
                                          (queue, limit, uuid.uuid4(), scan))]
        tuples = tuples_read(conn, schema) - before
        rows = conn.execute(sql.SQL("SELECT queue, partition_key FROM {} WHERE id = ANY(%s)").format(jobs),
                            (ids,)).fetchall()
    return sorted(rows, key=lambda r: (r[1] is not None, r[1] or "")), tuples


RUNNING = ("INSERT INTO {} (kind, queue, partition_key, state, claim_token, lease_expires_at, attempt)"
           " SELECT 'k', %s, %s, 'running', gen_random_uuid(), now() + interval '1 hour', 1"
           " FROM generate_series(1, %s)")


def test_claims_stay_index_reads_after_the_table_grows_under_a_live_session(database_url, schema):
    """A worker's session may claim from an empty queue many times, then face 100,000
    waiting jobs before any ANALYZE. Cached plans made from the empty table must not
    decide how a claim reads the full one: schema v4's claim function switched to such a
    generic plan after five calls and then scanned for the jobs it had picked (60-210 ms
    per claim at 200,000 jobs). Each claim here, limited (queue limit; partition limit,
    with a busy key at the head so the skip scan runs too) and plain (the worker's
    prepared statement), must read a small multiple of its batch: the tuples its
    transaction read from jobs, from pg_stat_xact_user_tables."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    fn = sql.Identifier(schema, "claim_limited")
    queries = Queries.for_schema(schema)
    q(database_url, jobs_sql(schema, "ALTER TABLE {jobs} SET (autovacuum_enabled = false)"))
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency) VALUES ('conc', 100000)").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (name, partition_concurrency) VALUES ('part', 3)").format(queues))

    def claim(conn: psycopg.Connection, queue: str) -> tuple[int, int]:
        with conn.transaction(force_rollback=True):
            before = tuples_read(conn, schema)
            if queue == "default":
                got = len(conn.execute(queries.claim, {"queue": queue, "limit": 50, "token": uuid.uuid4(),
                                                       "owner": "x", "lease": 30}, prepare=True).fetchall())
            else:
                got = conn.execute(sql.SQL("SELECT count(*) FROM {}(%s, 50, %s, 'x', 30, 100)").format(fn),
                                   (queue, uuid.uuid4()), prepare=True).fetchone()[0]
            return got, tuples_read(conn, schema) - before

    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(8):  # past the plan cache's five custom plans
            for queue in ("conc", "part", "default"):
                assert claim(conn, queue)[0] == 0
        # 100,000 waiting jobs per queue, claim order unrelated to table order.
        conn.execute(sql.SQL(
            "INSERT INTO {} (kind, queue, args, priority, partition_key)"
            " SELECT 'k', q, '{{}}', (g::bigint * 7919) % 10,"
            "  CASE WHEN q <> 'part' THEN NULL WHEN g <= 300 THEN 'hot' ELSE 'key' || ((g::bigint * 104729) % 500) END"
            " FROM generate_series(1, 100000) g, unnest(ARRAY['conc', 'part', 'default']) q").format(jobs))
        conn.execute(sql.SQL("UPDATE {} SET priority = -1 WHERE partition_key = 'hot'").format(jobs))
        for queue in ("conc", "part", "default", "conc", "part", "default"):
            got, read = claim(conn, queue)
            assert got == 50 and read <= 5_000, (queue, got, read)


def test_limited_claims_count_only_their_own_queues_running_jobs(database_url, schema):
    """A queue concurrency limit counts the queue's running jobs, and a partition limit a
    key's. Up to schema v7 the queue count read jobs_lease_idx, every running job of every
    queue, each fetched from the heap to check its queue: with 5,000 jobs running
    elsewhere, 5,000 tuples per claim, under the queue row's lock. Since v8 both counts
    read their own range of jobs_running_idx. The counts must also still be right."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency) VALUES ('conc', 40)").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (name, partition_concurrency) VALUES ('part', 3)").format(queues))
    q(database_url, sql.SQL(RUNNING).format(jobs), ("elsewhere", None, 5_000))
    q(database_url, sql.SQL(RUNNING).format(jobs), ("elsewhere", "a", 2_000))
    q(database_url, sql.SQL(RUNNING).format(jobs), ("conc", None, 25))
    q(database_url, sql.SQL(RUNNING).format(jobs), ("part", "a", 2))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', q, k"
                            " FROM generate_series(1, 30) g, (VALUES ('conc', NULL), ('part', 'a'), ('part', 'b')) v(q, k)"
                            ).format(jobs))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))

    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        def claim(queue: str) -> tuple[list[tuple], int]:
            return _claim_limited(conn, schema, queue, 50, 100)

        for _ in range(3):  # the function's plans are made on the first call and kept
            rows, read = claim("conc")
            assert rows == [("conc", None)] * (40 - 25) and read <= 300, (rows, read)
            rows, read = claim("part")
            assert sorted(k for _, k in rows) == ["a"] + ["b"] * 3 and read <= 300, (rows, read)


def test_a_queue_with_concurrency_and_partition_limits_obeys_both(database_url, schema):
    """Both limits at once, in the head claim and in the skip scan: a key takes at most its
    partition_concurrency minus its running jobs, the queue at most its concurrency minus
    all its running jobs (unkeyed ones included)."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency, partition_concurrency) VALUES"
                            " ('head', 10, 3), ('skip', 10, 3)").format(queues))
    for queue in ("head", "skip"):  # 6 running: room 4; key a may take 1, b none, c 3
        for key, n in (("a", 2), ("b", 3), (None, 1)):
            q(database_url, sql.SQL(RUNNING).format(jobs), (queue, key, n))
    # 'head': waiting jobs in claim order a, b, c, unkeyed, a, b, c, unkeyed, ...
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 'head',"
                            " (ARRAY['a', 'b', 'c', NULL])[1 + g % 4] FROM generate_series(0, 11) g").format(jobs))
    # 'skip': 20 jobs of the full key b fill the head window, so only the skip scan finds more:
    # then c, a, d, c, a, d, c, a, d (d has no running job: room 3).
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 'skip', 'b'"
                            " FROM generate_series(1, 20)").format(jobs))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 'skip',"
                            " (ARRAY['c', 'a', 'd'])[1 + g % 3] FROM generate_series(0, 8) g").format(jobs))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(3):  # the function's plans are made on the first call and kept
            rows, _read = _claim_limited(conn, schema, "head", 50, 16)
            assert [k for _, k in rows] == [None, "a", "c", "c"], rows
            # Three keys with room share the queue's room of 4: a offers its 1, c and d their
            # fair share of 2 each; the best 4 of those 5 by claim order are c, a, d, c.
            rows, _read = _claim_limited(conn, schema, "skip", 50, 16)
            assert [k for _, k in rows] == ["a", "c", "c", "d"], rows


def test_a_queue_with_both_limits_reads_its_running_jobs_once_per_statement(database_url, schema):
    """With a concurrency and a partition limit, the claim needs the queue's running jobs
    and each key's. Up to schema v8 each claim statement read them twice under the queue
    row's lock (the queue's count, then each key's), each a heap visit; since v9 one
    grouped range of jobs_running_idx gives both. A queue with a partition limit only
    still counts keyed running jobs only."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency, partition_concurrency) VALUES"
                            " ('head', 100000, 1000), ('skip', 100000, 100), ('keyed', NULL, 100)").format(queues))
    for key in range(10):
        q(database_url, sql.SQL(RUNNING).format(jobs), ("head", f"k{key}", 100))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 'head', 'k' || (g % 10)"
                            " FROM generate_series(1, 200) g").format(jobs))
    # 'skip' and 'keyed': key k0 is full and its 60 waiting jobs fill the head window, so
    # the claim goes on to the skip scan; k1..k9 have 50 running jobs each and room.
    # 'keyed' also runs 1,000 unkeyed jobs, which its partition limit does not count.
    for queue in ("skip", "keyed"):
        q(database_url, sql.SQL(RUNNING).format(jobs), (queue, "k0", 100))
        for key in range(1, 10):
            q(database_url, sql.SQL(RUNNING).format(jobs), (queue, f"k{key}", 50))
        q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', %s, 'k0'"
                                " FROM generate_series(1, 60)").format(jobs), (queue,))
        q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', %s, 'k' || (1 + g %% 9)"
                                " FROM generate_series(0, 44) g").format(jobs), (queue,))
    q(database_url, sql.SQL(RUNNING).format(jobs), ("keyed", None, 1_000))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    # Each queue's running bound (v16) known and fresh: these claims count as they must.
    _set_bound(database_url, schema, None, "now() + interval '30 seconds'")
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(3):
            rows, read = _claim_limited(conn, schema, "head", 50, 50)
            # 1,000 running jobs read once, plus the window and the claimed jobs (v8: 2,100).
            assert len(rows) == 50 and read <= 1_300, ("head", len(rows), read)
            # 550 running jobs read once by each of the two statements, plus the window,
            # the keys' offers and the claimed jobs (v9: 1,396; v8: 2,046).
            rows, read = _claim_limited(conn, schema, "skip", 50, 50)
            assert len(rows) == 45 and read <= 1_600, ("skip", len(rows), read)
            # The same without the 1,000 unkeyed running jobs (946; counting them: ~1,950).
            rows, read = _claim_limited(conn, schema, "keyed", 50, 50)
            assert len(rows) == 45 and read <= 1_100, ("keyed", len(rows), read)


def _set_bound(database_url: str, schema: str, bound: int | None, counted_at: str, queue: str | None = None) -> None:
    """Set the running bound (schema v16) of ``queue`` (or every queue) to ``bound`` (None:
    the queue's running jobs, counted), as counted at ``counted_at`` (SQL)."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("UPDATE {queues} AS u SET running_bound = coalesce(%(bound)s::int, (SELECT count(*) FROM {jobs}"
                            " WHERE state = 'running' AND queue = u.name)), updated_at = now() - interval '1 minute',"
                            " running_counted_at = " + counted_at
                            + " WHERE %(queue)s::text IS NULL OR name = %(queue)s").format(queues=queues, jobs=jobs),
      {"queue": queue, "bound": bound})


def _claim_and_keep(conn: psycopg.Connection, schema: str, queue: str, limit: int) -> tuple[int, int]:
    """Claim through the schema's function and commit (the running bound is kept): the
    jobs claimed and the jobs table tuples the claim read from the heap."""
    fn = sql.Identifier(schema, "claim_limited")
    with conn.transaction():
        before = tuples_read(conn, schema)
        got = len(conn.execute(sql.SQL("SELECT id FROM {}(%s, %s, %s, 'x', 30, %s)").format(fn),
                               (queue, limit, uuid.uuid4(), 2 * limit)).fetchall())
        return got, tuples_read(conn, schema) - before


def _bound(database_url: str, schema: str, queue: str) -> int | None:
    return q(database_url, sql.SQL("SELECT running_bound FROM {} WHERE name = %s").format(
        sql.Identifier(schema, "queues")), (queue,))[0][0]


@pytest.mark.parametrize("limits", ["partition_concurrency", "concurrency", "both"])
def test_a_claim_under_slack_limits_does_not_count_the_running_jobs(database_url, schema, limits):
    """Schema v16: a limited queue keeps an upper bound of its running jobs on its row.
    While the bound plus the batch fits under its limits, no limit can bind, and the claim
    reads neither the queue's running jobs nor each key's (1,000 here, a heap visit each:
    v15 read them on every claim). The first claim counts them, to learn the bound; each
    claim adds what it took."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    values = {"partition_concurrency": "NULL, 10000", "concurrency": "100000, NULL", "both": "100000, 10000"}[limits]
    # Limits set a minute ago: a claim within a second of a change counts (see below).
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency, partition_concurrency, updated_at) VALUES ('slack', "
                            + values + ", now() - interval '1 minute')").format(queues))
    for key in range(10):
        q(database_url, sql.SQL(RUNNING).format(jobs), ("slack", f"k{key}", 100))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 'slack', 'k' || (g % 10)"
                            " FROM generate_series(1, 300) g").format(jobs))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    assert _bound(database_url, schema, "slack") is None
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        got, read = _claim_and_keep(conn, schema, "slack", 50)
        assert got == 50 and read >= 1_000, read  # counted: the bound was unknown
        assert _bound(database_url, schema, "slack") == 1_050
        for i in range(2, 5):
            got, read = _claim_and_keep(conn, schema, "slack", 50)
            assert got == 50 and read <= 150, (i, read)  # the window and the claimed jobs only
            assert _bound(database_url, schema, "slack") == 1_000 + 50 * i


def test_the_running_bound_is_counted_again_when_old_or_past_the_limits(database_url, schema):
    """The bound holds only jobs claimed through the function; one that started running
    another way (a plain claim that raced a new limit) is in it once it is counted again,
    at least every second. A bound grown past the limits (its jobs finished meanwhile) is
    counted again too, after 100 ms, rather than leaving every claim to count."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency, updated_at) VALUES ('c', 40, now() - interval '1 minute')"
                            ).format(queues))
    q(database_url, sql.SQL(RUNNING).format(jobs), ("c", None, 35))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue) SELECT 'k', 'c' FROM generate_series(1, 100)").format(jobs))
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        # A bound of 0 counted 2 s ago: counted again (35), so 5 of the 10 asked for.
        _set_bound(database_url, schema, 0, "clock_timestamp() - interval '2 seconds'", "c")
        assert _claim_and_keep(conn, schema, "c", 10)[0] == 5
        assert _bound(database_url, schema, "c") == 40
        # Four of those finish. A bound of 40 (past the limit) counted 200 ms ago is
        # counted again (36): 4 more.
        q(database_url, sql.SQL("UPDATE {} SET state = 'completed', finished_at = now()"
                                " WHERE id IN (SELECT id FROM {} WHERE state = 'running' LIMIT 4)").format(jobs, jobs))
        q(database_url, sql.SQL("UPDATE {} SET running_counted_at = clock_timestamp() - interval '200 milliseconds'"
                                ).format(queues))
        assert _claim_and_keep(conn, schema, "c", 10)[0] == 4
        # At the limit, counted just now: nothing, and the bound stays an upper bound.
        assert _claim_and_keep(conn, schema, "c", 10)[0] == 0
        assert _bound(database_url, schema, "c") == 40
        # An empty claim that did not count (an idle queue's poll) writes no row version.
        q(database_url, sql.SQL("UPDATE {} SET running_counted_at = now() + interval '30 seconds'").format(queues))
        version = sql.SQL("SELECT xmin::text FROM {} WHERE name = 'c'").format(queues)
        before = q(database_url, version)
        assert _claim_and_keep(conn, schema, "c", 10)[0] == 0
        assert q(database_url, version) == before
    assert q(database_url, jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state = 'running' AND queue = 'c'")
             ) == [(40,)]


def _count_running(database_url: str, schema: str, queue: str) -> int:
    return q(database_url, sql.SQL("SELECT count(*) FROM {} WHERE state = 'running' AND queue = %s").format(
        sql.Identifier(schema, "jobs")), (queue,))[0][0]


def test_a_plain_claim_that_raced_a_new_limit_is_counted_by_the_next_limited_claim(database_url, schema):
    """A worker that has not yet seen a new limit runs a plain claim; its statement's
    snapshot predates the limit, so it claims, and it commits after the first limited
    claim counted. The next claim must count those jobs (v15 counted at every claim), not
    go by the bound (found by review: 10 more jobs past the limit of 60). Since a claim
    within a second of a settings change counts, it does."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue) SELECT 'k', 'race' FROM generate_series(1, 200)").format(jobs))
    plain = Queries.for_schema(schema).claim
    with psycopg.connect(to_conninfo(database_url)) as racer, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        # The plain claim's statement runs (its snapshot: no limit yet) ...
        assert len(racer.execute(plain, {"queue": "race", "limit": 50, "token": uuid.uuid4(), "owner": "plain",
                                         "lease": 30}).fetchall()) == 50
        # ... the limit is set ...
        q(database_url, sql.SQL("INSERT INTO {} (name, concurrency) VALUES ('race', 60)").format(queues))
        assert _claim_and_keep(conn, schema, "race", 10)[0] == 10  # the racer's 50 not seen yet
        racer.commit()  # ... and the plain claim commits: 60 running
        assert _count_running(database_url, schema, "race") == 60
        assert _claim_and_keep(conn, schema, "race", 10)[0] == 0
    assert _count_running(database_url, schema, "race") == 60


def test_a_limit_an_older_release_sets_again_is_not_exceeded(database_url, schema):
    """A release of version 15 runs on v16 (floor 14), and its set_queue_limits does not
    clear running_bound. A limit it removes and sets again within a second of the last
    count left the bound of before, while the queue's plain claims had started jobs
    (found by review: 10 more past a limit of 20). A bound counted before the queue's
    last settings change (updated_at, which every release writes) is counted again."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue) SELECT 'k', 'old' FROM generate_series(1, 200)").format(jobs))
    plain = Queries.for_schema(schema).claim

    def older_release_sets(concurrency: int | None) -> None:  # version 15's upsert, exactly
        q(database_url, sql.SQL(
            "INSERT INTO {} (name, paused, concurrency, partition_concurrency, rate_limit, rate_period, updated_at)"
            " VALUES ('old', false, %(c)s, NULL, NULL, NULL, now()) ON CONFLICT (name) DO UPDATE SET"
            " concurrency = %(c)s, partition_concurrency = NULL, rate_limit = NULL, rate_period = NULL,"
            " updated_at = now()").format(queues), {"c": concurrency})

    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        older_release_sets(20)
        assert _claim_and_keep(conn, schema, "old", 10)[0] == 10  # counted (no bound): bound 10
        older_release_sets(None)  # unlimited: plain claims
        assert len(conn.execute(plain, {"queue": "old", "limit": 50, "token": uuid.uuid4(), "owner": "plain",
                                        "lease": 30}).fetchall()) == 50
        older_release_sets(20)  # 60 running, limit 20
        assert _claim_and_keep(conn, schema, "old", 10)[0] == 0
    assert _count_running(database_url, schema, "old") == 60


def test_a_rescue_batch_reads_about_its_batch_when_many_leases_expired(database_url, schema):
    """After a crash of many workers, thousands of leases expire together. Each rescue
    batch must stop after its limit: with jobs_running_idx ordered by queue first, an
    ORDER BY lease_expires_at under FOR UPDATE sorted every expired job per batch (LockRows
    keeps the sort unbounded), so draining them cost batches x expired jobs."""
    q(database_url, jobs_sql(schema,
        "INSERT INTO {jobs} (kind, queue, state, claim_token, lease_expires_at, attempt)"
        " SELECT 'k', 'q' || (g % 7), 'running', gen_random_uuid(), now() - interval '1 minute', 1"
        " FROM generate_series(1, 20000) g"))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    queries = Queries.for_schema(schema)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(3):
            with conn.transaction():
                before = tuples_read(conn, schema)
                rescued = conn.execute(queries.rescue_expired, {"limit": 100}).fetchall()
                tuples = tuples_read(conn, schema) - before
            assert len(rescued) == 100 and tuples <= 1_000, (len(rescued), tuples)
        left = conn.execute(jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state = 'running'")).fetchone()[0]
        assert left == 20_000 - 300


def test_jobs_that_run_to_completion_write_no_entry_in_the_state_kind_index(database_url, schema):
    """Since v10 jobs are indexed by state and kind only in resting states (scheduled,
    retryable, cancelled, dead): enqueue, claim and completion never write to that index.
    v9's (kind, state) index took an entry at each of the three."""
    from sa_jobs import Job, JobContext

    class SqlNoop(Job, kind="sql_noop", queue="sql"):
        pass

    @SqlNoop.handler
    async def sql_noop(ctx: JobContext, n: int) -> None:
        return None

    index = sql.Identifier(schema, "jobs_state_kind_idx").as_string()

    def size() -> int:
        return q(database_url, "SELECT pg_relation_size(%s::regclass)", (index,))[0][0]

    empty = size()
    q(database_url, jobs_sql(schema, "INSERT INTO {jobs} (kind, queue, args)"
                                     " SELECT 'sql_noop', 'sql', jsonb_build_object('n', i) FROM generate_series(1, 2000) i"))
    run_worker_until(database_url, schema, [SqlNoop], lambda: states(database_url, schema) == {"completed": 2000})
    assert states(database_url, schema) == {"completed": 2000}
    assert size() == empty, (size(), empty)  # not one entry: the index is still only its metapage
    # A job that comes to rest is indexed (so the check above can fail).
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'dead' WHERE id <= 10"))
    assert size() > empty


def test_a_claim_that_takes_the_queue_lock_after_a_newer_window_opened_keeps_the_rate(database_url, schema):
    """Schema v11. A rate limit promises at most N claims started per window (attempted_at,
    the claim's now(), which is its transaction's start). Up to v10 a claimer whose transaction began in window W0
    but took the queue row's lock after a claim of W1 (it was descheduled, or held up
    before its lock) saw rate_window_start = W1, counted W0 as empty, claimed N more jobs
    stamped in W0 (2N in W0) and set the row back to W0, so the next claim in W1 counted
    W1 as empty too (2N in W1). The explicit transaction stands for that delayed claimer."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    fn = sql.Identifier(schema, "claim_limited")
    q(database_url, sql.SQL("INSERT INTO {} (name, rate_limit, rate_period) VALUES ('r', 3, '2 seconds')").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue) SELECT 'k', 'r' FROM generate_series(1, 50)").format(jobs))
    call = sql.SQL("SELECT count(*) FROM {}('r', 50, %s, 'x', 30, 16)").format(fn)
    window = "SELECT floor(extract(epoch FROM now()) / 2)"
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as late, \
            psycopg.connect(to_conninfo(database_url), autocommit=True) as other:
        # Start 0.2-1.0 s before a window boundary, so that the W0 claims fit before it.
        while not 1.0 <= time.time() % 2 <= 1.8:
            time.sleep(0.01)
        other.execute(call, (uuid.uuid4(),))  # W0's 3 claims
        with late.transaction():
            w0 = late.execute(window).fetchone()[0]  # the late claimer's transaction starts in W0
            while other.execute(window).fetchone()[0] == w0:
                time.sleep(0.05)
            other.execute(call, (uuid.uuid4(),))  # W1's 3 claims
            late.execute(call, (uuid.uuid4(),))  # then the late claimer takes the lock
        other.execute(call, (uuid.uuid4(),))  # and W1 again
    per_window = q(database_url, jobs_sql(schema, "SELECT floor(extract(epoch FROM attempted_at) / 2), count(*)"
                                                  " FROM {jobs} WHERE state = 'running' GROUP BY 1 ORDER BY 1"))
    assert max(n for _, n in per_window) <= 3, per_window


def test_a_claim_at_a_binding_queue_limit_does_not_walk_the_waiting_keys(database_url, schema):
    """At a binding queue concurrency (or rate) limit the room is 0, so the head claim takes
    nothing, the batch comes back short and more jobs wait than the window: the function
    goes on to the skip scan. Every worker polls such a queue after each completion, so
    walking every waiting key there (one index probe and heap visit each, 3,000 here, under
    the queue row's lock) would cost each poll; it does not, because the skip scan's pick is
    LIMIT 0 and nothing below it is read. A guard on that, not a fix."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency, partition_concurrency) VALUES"
                            " ('full', 2, 5), ('free', 100, 5)").format(queues))
    for queue in ("full", "free"):
        q(database_url, sql.SQL(RUNNING).format(jobs), (queue, "k1", 2))
        q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', %s, 'key' || g"
                                " FROM generate_series(1, 3000) g").format(jobs), (queue,))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(3):
            rows, read = _claim_limited(conn, schema, "full", 50, 50)
            assert rows == [] and read <= 200, ("full", len(rows), read)
            # With room, the head window fills the batch as before.
            rows, read = _claim_limited(conn, schema, "free", 50, 50)
            assert len(rows) == 50 and read <= 300, ("free", len(rows), read)


def test_a_narrowed_head_window_is_followed_by_the_skip_scan(database_url, schema):
    """Schema v12. A queue concurrency limit of 4 narrows the head window to 16 jobs; when
    a key at its partition limit fills them, the other keys' jobs wait behind. Up to v11
    the skip scan ran only when more than the worker's ``scan`` (here 50) jobs waited, so
    the 2 jobs of other keys behind 40 of the busy key's were not claimed; now they are."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency, partition_concurrency) VALUES"
                            " ('capped', 4, 2)").format(queues))
    q(database_url, sql.SQL(RUNNING).format(jobs), ("capped", "busy", 2))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 'capped', 'busy'"
                            " FROM generate_series(1, 40)").format(jobs))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 'capped', 'small' || g"
                            " FROM generate_series(1, 2) g").format(jobs))
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(3):
            rows, _read = _claim_limited(conn, schema, "capped", 50, 50)
            assert [k for _, k in rows] == ["small1", "small2"], rows


def _claim_index_blocks(conn: psycopg.Connection, schema: str) -> int:
    """Blocks of jobs_claim_idx this transaction has read so far."""
    return conn.execute("SELECT pg_stat_get_xact_blocks_fetched(%s::regclass)",
                        (f'"{schema}".jobs_claim_idx',)).fetchone()[0]


@pytest.mark.parametrize("limits", ["concurrency = 100000", "partition_concurrency = 10000"])
def test_a_resumed_limited_claim_skips_the_dead_head_of_the_queue(database_url, schema, limits):
    """Schema v12. Claimed jobs leave dead entries at the head of jobs_claim_idx until
    VACUUM, and the claim function read from the start of the queue every time (a cost
    that grew with every job claimed in a drain, and while an old snapshot pins the
    entries, for good). Given the last resumable job's position it descends past them."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    fn = sql.Identifier(schema, "claim_limited")
    q(database_url, jobs_sql(schema, "ALTER TABLE {jobs} SET (autovacuum_enabled = false)"))
    q(database_url, sql.SQL("INSERT INTO {} (name) VALUES ('lim')").format(queues))
    q(database_url, sql.SQL("UPDATE {} SET " + limits + " WHERE name = 'lim'").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, args, partition_key) SELECT 'k', 'lim', '{{}}',"
                            " CASE WHEN %s LIKE 'partition%%' THEN 'key' || (g %% 50) END"
                            " FROM generate_series(1, 40000) g").format(jobs), (limits,))
    q(database_url, jobs_sql(schema, "ANALYZE {jobs}"))
    call = sql.SQL("SELECT id, priority, scheduled_at, resumable FROM {}('lim', %s, %s, 'x', 30, %s, %s, %s, %s)").format(fn)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(40):  # 20,000 claimed and completed, in claim order
            rows = conn.execute(call, (500, uuid.uuid4(), 500, None, None, None)).fetchall()
            assert len(rows) == 500 and all(r[3] for r in rows)  # nothing left waiting behind them
            conn.execute(jobs_sql(schema, "UPDATE {jobs} SET state = 'completed' WHERE id = ANY(%s)"),
                         ([r[0] for r in rows],))
        last = max((r[1], r[2], r[0]) for r in rows)

        def claim(after: tuple) -> tuple[list[int], int]:
            with conn.transaction(force_rollback=True):
                before = _claim_index_blocks(conn, schema)
                ids = sorted(r[0] for r in conn.execute(call, (100, uuid.uuid4(), 100, *after)).fetchall())
                return ids, _claim_index_blocks(conn, schema) - before

        resumed, resumed_blocks = claim(last)
        from_start, from_start_blocks = claim((None, None, None))
    # The next 100 jobs in claim order, read from a handful of pages...
    assert resumed == from_start == list(range(last[2] + 1, last[2] + 101))
    assert resumed_blocks <= 20, resumed_blocks
    # ...where the claim from the start walks the 20,000 dead entries first.
    assert from_start_blocks >= 50, from_start_blocks


def test_a_partitioned_claim_never_offers_to_resume_past_a_job_it_left_waiting(database_url, schema):
    """Schema v12. A partitioned claim passes over the waiting jobs of keys at their limit.
    A claim resumed past one of them would leave it behind until the next claim from the
    start, so the function says which rows a claim may resume past: a head claim's rows
    before the first job it left waiting, a plain limited claim's all, a skip scan's none."""
    queues, jobs = sql.Identifier(schema, "queues"), sql.Identifier(schema, "jobs")
    fn = sql.Identifier(schema, "claim_limited")
    q(database_url, sql.SQL("INSERT INTO {} (name, partition_concurrency) VALUES ('p', 1), ('s', 1)").format(queues))
    q(database_url, sql.SQL("INSERT INTO {} (name, concurrency) VALUES ('c', 100)").format(queues))
    for queue in ("p", "s"):
        q(database_url, sql.SQL(RUNNING).format(jobs), (queue, "busy", 1))
    # 'p', in claim order: a1, a2, busy, a3, a4 (a job of a key at its limit in the middle).
    for key in ("a1", "a2", "busy", "a3", "a4"):
        q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) VALUES ('k', 'p', %s)").format(jobs), (key,))
    # 's': 20 jobs of the busy key fill the 16-job head window; two more keys behind them.
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) SELECT 'k', 's', 'busy'"
                            " FROM generate_series(1, 20)").format(jobs))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue, partition_key) VALUES ('k', 's', 'b1'), ('k', 's', 'b2')").format(jobs))
    q(database_url, sql.SQL("INSERT INTO {} (kind, queue) SELECT 'k', 'c' FROM generate_series(1, 5)").format(jobs))
    call = sql.SQL("SELECT j.partition_key, c.resumable FROM {}(%s, %s, %s, 'x', 30, 16) c"
                   " JOIN {} j USING (id) ORDER BY c.priority, c.scheduled_at, c.id").format(fn, jobs)
    with psycopg.connect(to_conninfo(database_url), autocommit=True) as conn:
        for _ in range(3):
            with conn.transaction(force_rollback=True):
                assert conn.execute(call, ("p", 4, uuid.uuid4())).fetchall() == [
                    ("a1", True), ("a2", True), ("a3", False), ("a4", False)]
                assert conn.execute(call, ("s", 4, uuid.uuid4())).fetchall() == [("b1", False), ("b2", False)]
                assert conn.execute(call, ("c", 3, uuid.uuid4())).fetchall() == [(None, True)] * 3
