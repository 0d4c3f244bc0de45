"""Every statement the worker and maintenance services run, named once per schema.

The schema reaches SQL only through :class:`psycopg.sql.Identifier`; every value is a
bound parameter. Statements are rendered to text once per :class:`Queries` so psycopg
can prepare them server-side (``prepare=True``) on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from . import _validate
from .schema import DEFAULT_SCHEMA, JOBS_TABLE, QUEUES_TABLE, channel_name

# Column list every claim returns, in the order ClaimedJob reads it.
CLAIM_COLUMNS = (
    "id, kind, queue, args, attempt, max_attempts, priority,"
    " extract(epoch FROM (attempted_at - scheduled_at))::float8 AS wait_seconds,"
    " extract(epoch FROM created_at)::float8 AS created_epoch"
)


# The fence's state test, written so that it cannot match the predicate of the partial
# jobs_lease_idx (WHERE state = 'running'): when it could, the planner scanned that whole
# index (dead entries included, under churn) for every batch instead of looking the
# batch's ids up in the primary key, costing 10x the server CPU per job.
RUNNING_FENCE = "(j.state || '') = 'running'"

# Outcome statements, with ``{p}`` as the prefix of their parameter names so that the
# completer can join all three into one statement (see ``flush_outcomes``).
_COMPLETE = (
    "UPDATE {{jobs}} AS j SET state = 'completed', finished_at = now(),"
    " lease_expires_at = NULL, result = u.result::jsonb"
    " FROM unnest(%({p}ids)s::bigint[], %({p}tokens)s::uuid[], %({p}results)s::text[])"
    " AS u(id, token, result)"
    " WHERE j.id = u.id AND j.claim_token = u.token AND {{running}}"
)
# Every unsuccessful end, by target state per row: retryable (backoff), dead, cancelled
# (by the handler), or scheduled (a snooze, which refunds the attempt). Errors are
# appended only when given.
_FINISH = (
    "UPDATE {{jobs}} AS j SET state = u.target,"
    " finished_at = CASE WHEN u.target IN ('dead', 'cancelled') THEN now() END,"
    " scheduled_at = CASE WHEN u.target IN ('retryable', 'scheduled')"
    "  THEN now() + make_interval(secs => u.delay) ELSE j.scheduled_at END,"
    " attempt = CASE WHEN u.target = 'scheduled' THEN greatest(j.attempt - 1, 0) ELSE j.attempt END,"
    " lease_expires_at = NULL,"
    " errors = CASE WHEN u.error IS NULL THEN j.errors"
    "  ELSE j.errors || jsonb_build_array(u.error::jsonb || jsonb_build_object('at', now())) END"
    " FROM unnest(%({p}ids)s::bigint[], %({p}tokens)s::uuid[], %({p}targets)s::text[],"
    "  %({p}errors)s::text[], %({p}delays)s::float8[]) AS u(id, token, target, error, delay)"
    " WHERE j.id = u.id AND j.claim_token = u.token AND {{running}}"
)
# Shutdown gives claimed-but-unfinished jobs back at once; the interrupted attempt is
# not the job's fault, so it is not counted.
_RELEASE = (
    "UPDATE {{jobs}} AS j SET state = 'available', attempt = greatest(j.attempt - 1, 0),"
    " scheduled_at = now(), lease_expires_at = NULL"
    " FROM unnest(%({p}ids)s::bigint[], %({p}tokens)s::uuid[]) AS u(id, token)"
    " WHERE j.id = u.id AND j.claim_token = u.token AND {{running}}"
)


# A queue whose row sets any limit is claimed only through the limited path below.
LIMITED = "(concurrency IS NOT NULL OR partition_concurrency IS NOT NULL OR rate_limit IS NOT NULL)"

# How many jobs a limited claim may take, computed under the queue row's lock (taken by
# ``lock_queue`` in an earlier statement of the same transaction, so this statement's
# snapshot already sees every claim committed by the claimer before us). No queue row:
# nothing (the worker re-reads the settings and claims through the plain path).
_ROOM = (
    "qc AS ("
    " SELECT CASE WHEN q.paused THEN 0 ELSE greatest(0, least(%(limit)s,"
    "  CASE WHEN q.concurrency IS NULL THEN %(limit)s ELSE q.concurrency"
    "   - (SELECT count(*) FROM {jobs} r WHERE r.state = 'running' AND r.queue = %(queue)s) END,"
    "  CASE WHEN q.rate_limit IS NULL THEN %(limit)s ELSE q.rate_limit"
    "   - CASE WHEN q.rate_window_start = w.start THEN q.rate_window_count ELSE 0 END END)) END AS room,"
    " w.start AS window_start, q.partition_concurrency IS NOT NULL AS partitioned"
    " FROM {queues} q CROSS JOIN LATERAL (SELECT to_timestamp(floor(extract(epoch FROM now())"
    "  / extract(epoch FROM q.rate_period)) * extract(epoch FROM q.rate_period)) AS start) w"
    " WHERE q.name = %(queue)s)"
)
# The claim proper and the rate window's bookkeeping, shared by both limited claims.
_CLAIM_AND_COUNT = (
    " claimed AS (UPDATE {jobs} AS j SET state = 'running', attempt = j.attempt + 1,"
    " attempted_at = now(), claim_token = %(token)s, lease_owner = %(owner)s,"
    " lease_expires_at = now() + make_interval(secs => %(lease)s)"
    # An id array, not a join: the planner cannot know how many rows ``picked`` holds
    # (its LIMIT is computed) and would otherwise hash-join against a scan of the table.
    " WHERE j.id = ANY(ARRAY(SELECT id FROM picked))"
    " RETURNING " + CLAIM_COLUMNS.replace("id,", "j.id,", 1) + "),"
    " counted AS (UPDATE {queues} AS q SET rate_window_start = qc.window_start,"
    " rate_window_count = CASE WHEN q.rate_window_start = qc.window_start THEN q.rate_window_count ELSE 0 END"
    "  + (SELECT count(*) FROM claimed)"
    " FROM qc WHERE q.name = %(queue)s AND q.rate_limit IS NOT NULL)"
    " SELECT * FROM claimed"
)


def cancel_channel_name(schema: str = DEFAULT_SCHEMA) -> str:
    """Channel on which cancelling a running job is announced; the payload is the job id."""
    return f"{_validate.schema_name(schema)}_jobs_cancelled"


def _render(template: str, schema: str) -> str:
    return sql.SQL(template).format(
        jobs=sql.Identifier(schema, JOBS_TABLE),
        queues=sql.Identifier(schema, QUEUES_TABLE),
        running=sql.SQL(RUNNING_FENCE),
        channel=sql.Literal(channel_name(schema)),
    ).as_string()


@dataclass(frozen=True)
class Queries:
    schema: str
    channel: str
    claim: str
    cancel_channel: str
    complete_many: str
    finish_many: str
    release_many: str
    flush_outcomes: str
    heartbeat_many: str
    rescue_expired: str
    promote_due: str
    notify: str
    try_leader_lock: str
    listen: str
    listen_cancel: str
    states_of: str
    queue_settings: str
    lock_queue: str
    claim_limited: str
    claim_partitioned: str
    async_commit: str

    @classmethod
    def for_schema(cls, schema: str = DEFAULT_SCHEMA) -> "Queries":
        schema = _validate.schema_name(schema)
        r = lambda t: _render(t, schema)  # noqa: E731
        return cls(
            schema=schema,
            channel=channel_name(schema),
            cancel_channel=cancel_channel_name(schema),
            # Claim up to %(limit)s jobs of one queue in one statement. The CTE is
            # MATERIALIZED so the locked id list is computed exactly once: a join that
            # re-scans an inlined subquery could lock and return more rows than LIMIT.
            # ORDER BY matches jobs_claim_idx column for column: an index scan, no sort.
            claim=r(
                "WITH picked AS MATERIALIZED ("
                " SELECT id FROM {jobs}"
                " WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
                # A paused queue claims nothing, and a limited one nothing through this
                # path; uncorrelated, so evaluated once per claim.
                "  AND NOT EXISTS (SELECT 1 FROM {queues} WHERE name = %(queue)s AND (paused OR " + LIMITED + "))"
                " ORDER BY queue, priority, scheduled_at, id"
                " LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE {jobs} AS j SET state = 'running', attempt = j.attempt + 1,"
                " attempted_at = now(), claim_token = %(token)s, lease_owner = %(owner)s,"
                " lease_expires_at = now() + make_interval(secs => %(lease)s)"
                " FROM picked WHERE j.id = picked.id"
                " RETURNING " + CLAIM_COLUMNS.replace("id,", "j.id,", 1)
            ),
            # Outcomes are fenced by (id, claim_token, state): a worker whose lease was
            # taken over changes nothing. Each runs for a whole batch via unnest.
            complete_many=r(_COMPLETE.format(p="") + " RETURNING j.id"),
            finish_many=r(_FINISH.format(p="") + " RETURNING j.id"),
            release_many=r(_RELEASE.format(p="") + " RETURNING j.id"),
            # The completer's flush: all three as data-modifying CTEs of ONE statement,
            # so a batch costs one round trip and lands (or fails) as a unit. A job has
            # one outcome, so no row is touched by two of them.
            flush_outcomes=r(
                "WITH c AS (" + _COMPLETE.format(p="c_") + " RETURNING 1),"
                " f AS (" + _FINISH.format(p="f_") + " RETURNING 1),"
                " r AS (" + _RELEASE.format(p="r_") + " RETURNING 1)"
                " SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM f), (SELECT count(*) FROM r)"
            ),
            # Progress rides along: a handler's progress report costs no round trip.
            heartbeat_many=r(
                "UPDATE {jobs} AS j SET lease_expires_at = now() + make_interval(secs => %(lease)s),"
                " progress = coalesce(u.progress::jsonb, j.progress)"
                " FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(progress)s::text[])"
                " AS u(id, token, progress)"
                " WHERE j.id = u.id AND j.claim_token = u.token AND {running}"
                " RETURNING j.id, j.claim_token"
            ),
            # Run by every worker (SKIP LOCKED makes concurrent rescuers safe): jobs whose
            # lease ran out belong to a worker presumed dead.
            # The lost attempt counts; exhausted jobs go dead with the reason recorded.
            rescue_expired=r(
                "WITH expired AS MATERIALIZED ("
                " SELECT id FROM {jobs} WHERE state = 'running' AND lease_expires_at < now()"
                " ORDER BY lease_expires_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
                " UPDATE {jobs} AS j SET"
                " state = CASE WHEN j.attempt >= j.max_attempts THEN 'dead' ELSE 'retryable' END,"
                " finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,"
                " scheduled_at = now(), lease_expires_at = NULL,"
                " errors = j.errors || jsonb_build_array(jsonb_build_object("
                "  'attempt', j.attempt, 'at', now(), 'worker', j.lease_owner,"
                "  'error', 'LeaseExpired: the worker stopped heartbeating (crashed, killed"
                " or partitioned); the attempt is counted'))"
                " FROM expired WHERE j.id = expired.id"
                " RETURNING j.id, j.state"
            ),
            promote_due=r(
                "WITH due AS MATERIALIZED ("
                " SELECT id FROM {jobs} WHERE state IN ('scheduled', 'retryable')"
                " AND scheduled_at <= now() ORDER BY scheduled_at LIMIT %(limit)s"
                " FOR UPDATE SKIP LOCKED)"
                " UPDATE {jobs} AS j SET state = 'available' FROM due WHERE j.id = due.id"
            ),
            notify=r("SELECT pg_notify({channel}, '')"),
            try_leader_lock=r("SELECT pg_try_advisory_lock(hashtext('sa_jobs.leader'), hashtext({channel}))"),
            listen=sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(schema))).as_string(),
            listen_cancel=sql.SQL("LISTEN {}").format(sql.Identifier(cancel_channel_name(schema))).as_string(),
            states_of=r("SELECT id, state FROM {jobs} WHERE id = ANY(%(ids)s::bigint[])"),
            queue_settings=r(
                "SELECT paused, " + LIMITED + ", partition_concurrency IS NOT NULL,"
                " extract(epoch FROM rate_period)::float8 FROM {queues} WHERE name = %(queue)s"
            ),
            # Serializes the claimers of one limited queue (and nothing else: FOR NO KEY
            # UPDATE does not block inserts of jobs, which reference no queue row).
            lock_queue=r(
                "SELECT " + LIMITED + ", partition_concurrency IS NOT NULL,"
                " extract(epoch FROM rate_period)::float8 FROM {queues} WHERE name = %(queue)s FOR NO KEY UPDATE"
            ),
            claim_limited=r(
                "WITH " + _ROOM + ","
                " picked AS MATERIALIZED ("
                " SELECT id FROM {jobs}"
                " WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
                " ORDER BY queue, priority, scheduled_at, id"
                # Partitioned since the worker looked: nothing (it retries with the other claim).
                " LIMIT coalesce((SELECT room FROM qc WHERE NOT qc.partitioned), 0) FOR UPDATE SKIP LOCKED),"
                + _CLAIM_AND_COUNT
            ),
            # Per-key room: the distinct keys with waiting jobs come from a skip scan of
            # jobs_partition_idx (one index probe per key), each key contributes at most
            # partition_concurrency minus its running jobs, best first across keys.
            # Unkeyed jobs are limited by the queue only; they are looked for among the
            # first %(scan)s waiting jobs of the queue.
            async_commit="SET LOCAL synchronous_commit = off",
            claim_partitioned=r(
                "WITH RECURSIVE keys(key) AS ("
                " (SELECT partition_key FROM {jobs} WHERE state = 'available' AND queue = %(queue)s"
                "  AND partition_key IS NOT NULL ORDER BY queue, partition_key LIMIT 1)"
                " UNION ALL"
                " SELECT (SELECT k.partition_key FROM {jobs} k WHERE k.state = 'available' AND k.queue = %(queue)s"
                "  AND k.partition_key > keys.key ORDER BY k.queue, k.partition_key LIMIT 1)"
                " FROM keys WHERE keys.key IS NOT NULL),"
                " " + _ROOM + ","
                " busy AS MATERIALIZED (SELECT partition_key AS key, count(*) AS n FROM {jobs}"
                "  WHERE state = 'running' AND queue = %(queue)s AND partition_key IS NOT NULL GROUP BY partition_key),"
                " free AS MATERIALIZED (SELECT keys.key,"
                "  greatest(0, coalesce(q.partition_concurrency, %(limit)s) - coalesce(busy.n, 0)) AS free"
                "  FROM keys CROSS JOIN {queues} q LEFT JOIN busy ON busy.key = keys.key"
                "  WHERE keys.key IS NOT NULL AND q.name = %(queue)s),"
                # Each key with room offers a fair share of the batch (or its room, if
                # smaller): candidates stay near the batch size however many keys wait.
                " offer AS MATERIALIZED (SELECT key, least(free, ceil(coalesce((SELECT room FROM qc), 0)::numeric"
                "  / greatest(1, count(*) FILTER (WHERE free > 0) OVER ()))::int) AS room FROM free),"
                " candidates AS ("
                " SELECT c.id, c.priority, c.scheduled_at FROM offer"
                " CROSS JOIN LATERAL (SELECT j.id, j.priority, j.scheduled_at FROM {jobs} j"
                "  WHERE j.state = 'available' AND j.queue = %(queue)s AND j.partition_key = offer.key"
                "  AND j.scheduled_at <= now() ORDER BY j.queue, j.partition_key, j.priority, j.scheduled_at, j.id"
                "  LIMIT offer.room) c"
                " WHERE offer.room > 0"
                " UNION ALL"
                " SELECT h.id, h.priority, h.scheduled_at FROM (SELECT id, priority, scheduled_at, partition_key"
                "  FROM {jobs} WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
                "  ORDER BY queue, priority, scheduled_at, id LIMIT %(scan)s) h WHERE h.partition_key IS NULL),"
                " picked AS MATERIALIZED ("
                " SELECT id FROM {jobs} WHERE id = ANY(ARRAY("
                "  SELECT id FROM candidates ORDER BY priority, scheduled_at, id"
                "  LIMIT coalesce((SELECT room FROM qc), 0)))"
                " AND state = 'available' FOR UPDATE SKIP LOCKED),"
                + _CLAIM_AND_COUNT
            ),
        )
