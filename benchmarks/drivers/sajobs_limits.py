"""Benchmark driver for sa-jobs with cluster-wide queue limits set (see _proto.py).

``--variant`` picks the limits set on the benchmark queue at setup:

- ``none``: no limits (the plain claim; the baseline).
- ``concurrency``: a queue concurrency limit far above what the workers can run.
- ``rate``: a rate limit far above the drain rate.
- ``partition``: a per-partition limit above what a key can use; jobs spread over 100 keys.
- ``all``: the three together.
- ``concurrency-binding``: a queue concurrency limit of 50 that does bind (informative).
- ``keys-only``: jobs spread over 100 partition keys, no limit (what the keys' partial
  indexes cost on their own, without the partitioned claim).
- ``partition-auto-plans``, ``concurrency-auto-plans``: partition, concurrency with the
  claim function's ``plan_cache_mode`` reset, as in schema v4 (diagnostic: what planning
  every call costs; see sa_jobs.schema._claim_function for why v5 does).
- ``none-kind-state-nodedup``: none with B-tree deduplication off on the kind index
  (diagnostic of schema v9, when ``jobs_kind_state_idx`` took an entry on every claim;
  since v10 it applies to ``jobs_state_kind_idx``, which drains no longer write to).
- ``partition-window2x``: partition with the head window of v6's first measurements, twice
  the batch (``sa_jobs.worker.worker.PARTITION_HEAD_WINDOW = 2``; diagnostic).
- ``none-v7-indexes``, ``partition-v7-indexes``, ``keys-v7-indexes``: none, partition and
  keys-only with schema v7's two indexes of running jobs (``jobs_lease_idx`` on the lease,
  ``jobs_running_partition_idx`` on queue and key for keyed rows) in place of v8's one
  ``jobs_running_idx`` (diagnostic: a keyed claim inserts into both).
- ``partition-v5``: partition with schema v5's claim function put back (diagnostic: v5
  read the head window, then locked by id, and planned every call; v6 locks as it reads
  and plans once per session).
- ``partition-keylocks``: partition with an experimental claim function (below, not in
  the library): claimers of a partition-only queue share the queue row (``FOR SHARE``) and
  serialize per key instead, with transaction advisory locks on the keys of their head
  window, so claims of disjoint keys run side by side (diagnostic: what the queue-wide
  serialization costs a partition limit).
- ``keys-leaseidx``: keys-only with ``jobs_running_idx`` rebuilt as ``(queue, lease_expires_at)
  INCLUDE (partition_key)``, so that keyed claims insert at the index's right edge instead of
  at one place per key (diagnostic: whether that scatter is what keyed rows cost).
- ``none-v9-kind-index``: none with schema v9's ``jobs_kind_state_idx`` on (kind, state) over
  every row in place of v10's ``jobs_state_kind_idx`` over resting states (diagnostic: what
  the index entry that v9 wrote on every claim and completion cost a drain).
- ``partition-v8``, ``all-v8``: partition, all with schema v8's claim function put back (diagnostic: up to v8 a queue
  with both a concurrency and a partition limit read its running jobs twice per claim).
- ``concurrency-v11``, ``partition-v11``, ``all-v11``: concurrency, partition, all with schema v11's claim
  function put back (diagnostic: up to v11 every limited claim read its queue from the start,
  stepping over the dead entries of every job claimed since the last VACUUM; since v12 it
  resumes past its last batch, as the plain claim does).
- ``concurrency-v15``, ``partition-v15``, ``all-v15``: concurrency, partition, all with the claim
  function of schema versions 12-15 put back (diagnostic: since v16 a claim whose queue's
  running bound leaves every limit slack does not count the running jobs).
- ``none-serialized`` (experiment, not in the library): none whose claimers take turns on a
  transaction-scoped advisory lock of the queue, as limited claimers do on its row.
- ``none-join`` (diagnostic): none with the plain claim's join on ``picked`` that the id
  array replaced in session 12.
- ``keys-collate-c``, ``partition-collate-c``, ``all-collate-c`` (diagnostic): keys-only,
  partition, all with ``partition_key`` declared ``COLLATE "C"`` (its indexes rebuilt), so
  that the keyed index entries compare bytes instead of going through the database's
  collation (C.UTF-8 in the benchmark's cluster; a profile of keys-only showed the text
  comparisons of ``jobs_running_idx`` inserts among its extra server work).
- ``none-noav``, ``keys-noav``, ``partition-noav`` (diagnostic): none, keys-only and partition
  with autovacuum off on the jobs table after the load, so that no vacuum (of the keyed
  rows' extra index entries, say) runs during the drain or the next variant's.

Older functions are put back behind the current signature (``_put_back_an_older_function``).

Only the limit machinery's cost is measured by the non-binding variants: the claim takes
the queue row's lock, counts, and claims in a second statement.
"""

from __future__ import annotations

import datetime as dt
import sys
from typing import Any
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from benchmarks.drivers import _proto, sajobs  # noqa: E402
from sa_jobs import QueueLimits, set_queue_limits  # noqa: E402
from sa_jobs._url import sqlalchemy_url  # noqa: E402

KEYS = 100
VARIANTS = {
    "none": QueueLimits(),
    "concurrency": QueueLimits(concurrency=100_000),
    "rate": QueueLimits(rate=(10_000_000, dt.timedelta(seconds=1))),
    "partition": QueueLimits(partition_concurrency=10_000),
    "none-serialized": QueueLimits(),
    "none-join": QueueLimits(),
    "all": QueueLimits(concurrency=100_000, partition_concurrency=10_000, rate=(10_000_000, dt.timedelta(seconds=1))),
    "concurrency-binding": QueueLimits(concurrency=50),
    "keys-only": QueueLimits(),
    "none-kind-state-nodedup": QueueLimits(),
    "partition-auto-plans": QueueLimits(partition_concurrency=10_000),
    "partition-v5": QueueLimits(partition_concurrency=10_000),
    "partition-v8": QueueLimits(partition_concurrency=10_000),
    "partition-keylocks": QueueLimits(partition_concurrency=10_000),
    "all-v8": QueueLimits(concurrency=100_000, partition_concurrency=10_000, rate=(10_000_000, dt.timedelta(seconds=1))),
    "partition-window2x": QueueLimits(partition_concurrency=10_000),
    "none-v7-indexes": QueueLimits(),
    "partition-v7-indexes": QueueLimits(partition_concurrency=10_000),
    "keys-v7-indexes": QueueLimits(),
    "concurrency-auto-plans": QueueLimits(concurrency=100_000),
    "keys-leaseidx": QueueLimits(),
    "none-v9-kind-index": QueueLimits(),
    "concurrency-v11": QueueLimits(concurrency=100_000),
    "partition-v11": QueueLimits(partition_concurrency=10_000),
    "all-v11": QueueLimits(concurrency=100_000, partition_concurrency=10_000, rate=(10_000_000, dt.timedelta(seconds=1))),
    "concurrency-v15": QueueLimits(concurrency=100_000),
    "partition-v15": QueueLimits(partition_concurrency=10_000),
    "all-v15": QueueLimits(concurrency=100_000, partition_concurrency=10_000, rate=(10_000_000, dt.timedelta(seconds=1))),
    "keys-collate-c": QueueLimits(),
    "partition-collate-c": QueueLimits(partition_concurrency=10_000),
    "all-collate-c": QueueLimits(concurrency=100_000, partition_concurrency=10_000, rate=(10_000_000, dt.timedelta(seconds=1))),
    "none-noav": QueueLimits(),
    "keys-noav": QueueLimits(),
    "partition-noav": QueueLimits(partition_concurrency=10_000),
}
KEYED = ("partition-v15", "all-v15", "keys-collate-c", "partition-collate-c", "all-collate-c", "keys-noav", "partition-noav", "partition", "partition-v11", "all-v11", "keys-leaseidx", "all", "all-v8", "partition-v8", "partition-keylocks", "keys-only", "partition-auto-plans", "partition-v5", "partition-window2x",
         "partition-v7-indexes", "keys-v7-indexes")


def setup(dsn: str, variant: str) -> None:
    sajobs.setup(dsn)
    engine = create_engine(sqlalchemy_url(dsn))
    with Session(engine) as session, session.begin():
        set_queue_limits(session, "bench", VARIANTS[variant])
    engine.dispose()
    if variant.endswith("-auto-plans"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER FUNCTION sa_jobs.claim_limited(text, integer, uuid, text, double precision, integer,"
                         " smallint, timestamptz, bigint) RESET plan_cache_mode")
    if variant.endswith("-keylocks"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            _put_back_an_older_function(conn, _keylocks_function())
    old_function = {"-v5": 5, "-v8": 7, "v11": 11, "v15": 12}.get(variant[-3:])  # v8 kept v7's, v15 v12's
    if old_function == 12:  # the current signature: no wrapper needed
        from sa_jobs.schema import _claim_function
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(_claim_function("sa_jobs", 12))
    elif old_function:
        from sa_jobs.schema import _claim_function
        with psycopg.connect(dsn, autocommit=True) as conn:
            _put_back_an_older_function(conn, _claim_function("sa_jobs", old_function))


def _put_back_an_older_function(conn: psycopg.Connection, create: Any) -> None:
    """Install a claim function with the signature of schema versions 4-11 (which cannot
    resume) behind the current signature: the worker calls it through a wrapper whose rows
    say that no claim may resume past them, so it claims from the start as those did."""
    from sa_jobs.schema import _CLAIM_FUNCTION_ARGS_V12, _CLAIM_FUNCTION_RETURNS_V12
    conn.execute("DROP FUNCTION IF EXISTS sa_jobs.claim_limited_older(text, integer, uuid, text, double precision,"
                 " integer)")  # setup runs before every drain
    conn.execute(create)  # an overload beside the current function
    conn.execute("ALTER FUNCTION sa_jobs.claim_limited(text, integer, uuid, text, double precision, integer)"
                 " RENAME TO claim_limited_older")
    conn.execute(
        "CREATE OR REPLACE FUNCTION sa_jobs.claim_limited(" + _CLAIM_FUNCTION_ARGS_V12 + ")"
        + _CLAIM_FUNCTION_RETURNS_V12 + " LANGUAGE sql VOLATILE AS $w$"
        " SELECT o.*, NULL::timestamptz, false"
        " FROM sa_jobs.claim_limited_older(p_queue, p_limit, p_token, p_owner, p_lease, p_scan) o $w$")


def _keylocks_function() -> psycopg.sql.Composed:
    """The experimental claim function of ``partition-keylocks`` (partition-only queues).

    The queue row is locked FOR SHARE (pause and limit changes, which UPDATE it, still wait
    for claims in flight). The claim locks its head window's rows (SKIP LOCKED), then
    takes a transaction advisory lock on each of their keys in sorted order (claimers
    never wait for rows, so sorted key locks cannot deadlock), then counts and claims in a
    second statement, whose snapshot sees every claim committed by the previous holder of
    each key. At most 128 keys are locked per claim (the lock table is shared); jobs of
    other keys wait for the next claim. No skip scan: enough for limits that do not bind.
    """
    from psycopg import sql

    from sa_jobs import _claim_sql as c
    from sa_jobs.schema import _CLAIM_FUNCTION_ARGS, _CLAIM_FUNCTION_RETURNS
    jobs, queues = sql.Identifier("sa_jobs", "jobs"), sql.Identifier("sa_jobs", "queues")
    head = c.CLAIM_PARTITIONED_HEAD.replace(
        "   OR r.rn + coalesce(busy.n, 0) <= coalesce(q.partition_concurrency, %(limit)s))),",
        "   OR (r.partition_key = ANY(%(keys)s) AND r.rn + coalesce(busy.n, 0)"
        " <= coalesce(q.partition_concurrency, %(limit)s)))),")
    assert head != c.CLAIM_PARTITIONED_HEAD
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION sa_jobs.claim_limited(" + _CLAIM_FUNCTION_ARGS + ")" + _CLAIM_FUNCTION_RETURNS +
        " LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan SET enable_seqscan = off"
        " AS $claim$\n#variable_conflict use_column\n"
        "DECLARE v_keyed_only boolean; p_keys text[];"
        " BEGIN"
        " SELECT partition_concurrency IS NOT NULL AND concurrency IS NULL AND rate_limit IS NULL"
        " INTO v_keyed_only FROM {queues} WHERE name = p_queue FOR SHARE;"
        " IF NOT FOUND OR NOT v_keyed_only THEN RETURN; END IF;"
        " PERFORM set_config('synchronous_commit', 'off', true);"
        " SELECT coalesce(array_agg(k ORDER BY k), '{{}}') INTO p_keys FROM ("
        "  SELECT k, pg_advisory_xact_lock(hashtext('sa_jobs.partition'), hashtext(p_queue || '/' || k)) FROM ("
        "   SELECT DISTINCT w.partition_key AS k FROM (SELECT partition_key FROM {jobs}"
        "    WHERE state = 'available' AND queue = p_queue AND scheduled_at <= now()"
        "    ORDER BY queue, priority, scheduled_at, id LIMIT p_scan FOR UPDATE SKIP LOCKED) w"
        "   WHERE w.partition_key IS NOT NULL ORDER BY 1 LIMIT 128) ks) locked;"
        " RETURN QUERY " + c.function_body(head) + ";"
        " END $claim$"
    ).format(jobs=jobs, queues=queues)


def load(dsn: str, n: int, completed: int, variant: str) -> None:
    _load(dsn, n, completed, variant)
    if variant.endswith("-noav"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {sajobs.JOBS} SET (autovacuum_enabled = off)")


def _load(dsn: str, n: int, completed: int, variant: str) -> None:
    if variant.endswith("-collate-c"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute('ALTER TABLE sa_jobs.jobs ALTER COLUMN partition_key TYPE text COLLATE "C"')
    if variant.endswith("-leaseidx"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP INDEX IF EXISTS sa_jobs.jobs_running_idx")
            conn.execute("CREATE INDEX jobs_running_idx ON sa_jobs.jobs (queue, lease_expires_at)"
                         " INCLUDE (partition_key) WHERE state = 'running'")
    if variant.endswith("-v7-indexes"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP INDEX IF EXISTS sa_jobs.jobs_running_idx")
            conn.execute("CREATE INDEX IF NOT EXISTS jobs_lease_idx ON sa_jobs.jobs (lease_expires_at) WHERE state = 'running'")
            conn.execute("CREATE INDEX IF NOT EXISTS jobs_running_partition_idx ON sa_jobs.jobs (queue, partition_key)"
                         " WHERE state = 'running' AND partition_key IS NOT NULL")
    if variant not in KEYED:
        sajobs.load(dsn, n, completed)
        if variant == "none-kind-state-nodedup":
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("ALTER INDEX sa_jobs.jobs_state_kind_idx SET (deduplicate_items = off)")
        if variant == "none-v9-kind-index":
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DROP INDEX sa_jobs.jobs_state_kind_idx")
                conn.execute("CREATE INDEX jobs_kind_state_idx ON sa_jobs.jobs (kind, state)")
                conn.execute(f"VACUUM ANALYZE {sajobs.JOBS}")
        return
    # Keyed rows are inserted with their key (an UPDATE afterwards would leave the heap
    # twice the size of the unkeyed variants' and skew the comparison).
    sajobs.load(dsn, 0, completed)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"INSERT INTO {sajobs.JOBS} (kind, queue, args, partition_key)"
            " SELECT 'bench_noop', 'bench', jsonb_build_object('n', g), 'k' || (g %% %s)"
            " FROM generate_series(0, %s - 1) g", (KEYS, n))
        conn.execute(f"VACUUM ANALYZE {sajobs.JOBS}")


def _serialize_plain_claims() -> None:
    """``none-serialized`` (an experiment, not in the library): the plain claim first takes
    a transaction-scoped advisory lock on its queue, so claimers of one queue take turns,
    as a concurrency- or rate-limited claim does on the queue's row. Limited claims
    measured faster than none on a quiet host (limits-20261206T072211Z); the question is
    whether the turns, not the limits, make them so."""
    from sa_jobs import queries

    plain = queries._claim_statement

    def serialized(*, after: bool) -> str:
        return plain(after=after).replace(
            "  AND NOT EXISTS (SELECT 1 FROM {queues}",
            "  AND (SELECT true FROM (SELECT pg_advisory_xact_lock(hashtext(%(queue)s))) turn)"
            "  AND NOT EXISTS (SELECT 1 FROM {queues}", 1)

    queries._claim_statement = serialized


def _plain_claims_by_join() -> None:
    """``none-join`` (diagnostic): the plain claim as it was up to session 12, updating
    ``FROM picked WHERE j.id = picked.id`` (a join) where it now updates ``WHERE j.id =
    ANY(ARRAY(SELECT id FROM picked))``; measured as variant ``none-array`` against the
    join before the library took it (limits-20261206T073612Z)."""
    from sa_jobs import queries

    plain = queries._claim_statement

    def by_join(*, after: bool) -> str:
        text = plain(after=after)
        assert " WHERE j.id = ANY(ARRAY(SELECT id FROM picked))" in text
        return text.replace(" WHERE j.id = ANY(ARRAY(SELECT id FROM picked))", " FROM picked WHERE j.id = picked.id", 1)

    queries._claim_statement = by_join


def main() -> None:
    a = _proto.parser().parse_args()
    variant = a.variant or "none"
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}: {sorted(VARIANTS)}")
    if a.command == "setup":
        setup(a.dsn, variant)
    elif a.command == "load":
        load(a.dsn, a.n, a.completed, variant)
    elif a.command == "worker":
        if variant == "partition-window2x":
            from sa_jobs.worker import worker as worker_module
            worker_module.PARTITION_HEAD_WINDOW = 2
        if variant == "none-serialized":
            _serialize_plain_claims()
        if variant == "none-join":
            _plain_claims_by_join()
        sajobs.worker(a.dsn, a.concurrency, a.max_claim, a.out)
    elif a.command == "info":
        _proto.emit({**sajobs.info(), "limits": repr(VARIANTS[variant])})
    else:
        raise SystemExit(f"{a.command} is not measured with limits")


if __name__ == "__main__":
    main()
