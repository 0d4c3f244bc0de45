"""Every statement the worker and maintenance services run, named once per schema.

The schema reaches SQL only through :class:`psycopg.sql.Identifier`; every value is a
bound parameter. Statements are rendered to text once per :class:`Queries` so psycopg
can prepare them server-side (``prepare=True``) on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from . import _validate
from ._claim_sql import CLAIM_COLUMNS, LIMITED
from .schema import CLAIM_FUNCTION, DEFAULT_SCHEMA, JOBS_TABLE, QUEUES_TABLE, channel_name

# The fence's state test, written so that it cannot match the predicate of the partial
# index of running jobs (jobs_running_idx, WHERE state = 'running'): when it could, the
# planner scanned that whole index (dead entries included, under churn) for every batch
# instead of looking the batch's ids up in the primary key, costing 10x the server CPU
# per job.
RUNNING_FENCE = "(j.state || '') = 'running'"

# Outcome statements, with ``{p}`` as the prefix of their parameter names so that the
# completer can join all three into one statement (see ``flush_outcomes``). A completion
# or an unsuccessful end also writes the handler's last progress report if no heartbeat
# has yet (heartbeats write it at most about once a second: a report just before the
# handler returned was lost).
_COMPLETE = (
    "UPDATE {{jobs}} AS j SET state = 'completed', finished_at = now(),"
    " lease_expires_at = NULL, result = u.result::jsonb, progress = coalesce(u.progress::jsonb, j.progress)"
    " FROM unnest(%({p}ids)s::bigint[], %({p}tokens)s::uuid[], %({p}results)s::text[], %({p}progress)s::text[])"
    " AS u(id, token, result, progress)"
    " WHERE j.id = u.id AND j.claim_token = u.token AND {{running}}"
)
# Every unsuccessful end, by target state per row: retryable (backoff), dead, cancelled
# (by the handler), or scheduled (a snooze, which refunds the attempt). Errors are
# appended only when given. A snooze of no delay is available at once: 'scheduled' waited
# for a maintenance tick to promote it. Except for a unique job whose key 'available'
# would hold and 'scheduled' would not: the promotion waits while another job holds it.
_FINISH = (
    "UPDATE {{jobs}} AS j SET state = CASE WHEN u.target = 'scheduled' AND u.delay <= 0"
    "  AND (j.unique_key IS NULL OR coalesce('scheduled' = ANY (j.unique_states)"
    "   OR 'available' <> ALL (j.unique_states), true))"
    "  THEN 'available' ELSE u.target END,"
    " finished_at = CASE WHEN u.target IN ('dead', 'cancelled') THEN now() END,"
    " scheduled_at = CASE WHEN u.target IN ('retryable', 'scheduled')"
    "  THEN now() + make_interval(secs => u.delay) ELSE j.scheduled_at END,"
    " attempt = CASE WHEN u.target = 'scheduled' THEN greatest(j.attempt - 1, 0) ELSE j.attempt END,"
    " lease_expires_at = NULL,"
    " errors = CASE WHEN u.error IS NULL THEN j.errors"
    "  ELSE j.errors || jsonb_build_array(u.error::jsonb || jsonb_build_object('at', now())) END,"
    " progress = coalesce(u.progress::jsonb, j.progress)"
    " FROM unnest(%({p}ids)s::bigint[], %({p}tokens)s::uuid[], %({p}targets)s::text[],"
    "  %({p}errors)s::text[], %({p}delays)s::float8[], %({p}progress)s::text[])"
    " AS u(id, token, target, error, delay, progress)"
    " WHERE j.id = u.id AND j.claim_token = u.token AND {{running}}"
)
# Shutdown gives claimed-but-unfinished jobs back at once; the interrupted attempt is
# not the job's fault, so it is not counted. The next run therefore has the same attempt
# number, and would show the interrupted run's progress as its own: a run that reported
# (``reported``) has its report dropped; one that did not keeps what the row shows (a
# snoozed run's report, or an earlier attempt's, which job_status hides).
_RELEASE = (
    "UPDATE {{jobs}} AS j SET state = 'available', attempt = greatest(j.attempt - 1, 0),"
    " scheduled_at = now(), lease_expires_at = NULL,"
    " progress = CASE WHEN u.reported THEN NULL ELSE j.progress END"
    " FROM unnest(%({p}ids)s::bigint[], %({p}tokens)s::uuid[], %({p}reported)s::bool[]) AS u(id, token, reported)"
    " WHERE j.id = u.id AND j.claim_token = u.token AND {{running}}"
)

# The outcome statements of flush_outcomes_around_locks touch only the rows it could lock.
_LOCKED = " AND j.id IN (SELECT id FROM locked)"

# The outcome statements of a flush return the claims they wrote; its last column names
# them ("id/token") only when some outcome of the batch (%(n)s) was not written: fenced off
# (the row is another claim's now, or was cancelled or rescued), or, writing around locks,
# skipped. The usual flush, which wrote every one, spends nothing on it (an InitPlan runs
# only when read).
_WRITTEN = " RETURNING j.id, j.claim_token"
_LANDED = (
    " CASE WHEN (SELECT count(*) FROM c) + (SELECT count(*) FROM f) + (SELECT count(*) FROM r) < %(n)s"
    " THEN ARRAY(SELECT w.id::text || '/' || w.claim_token::text"
    "  FROM (SELECT * FROM c UNION ALL SELECT * FROM f UNION ALL SELECT * FROM r) AS w) END"
)

# Another job holding the key of the row aliased ``{row}`` (what puts a row in
# jobs_unique_idx: its state is one of its own unique states); NULL keys match nothing.
# The predicate is the index's, so this is one probe of jobs_unique_idx.
_HOLDER = (
    "SELECT h.id FROM {{jobs}} AS h WHERE h.kind = {row}.kind AND h.unique_key = {row}.unique_key"
    " AND h.id <> {row}.id AND h.state = ANY (h.unique_states) LIMIT 1"
)


def _window_of(time: str) -> str:
    """The start of the rate window ``time`` falls in, as the claim function computes it."""
    return ("to_timestamp(floor(extract(epoch FROM " + time + ") / extract(epoch FROM rate_period))"
            " * extract(epoch FROM rate_period))")


def _claim_statement(*, after: bool) -> str:
    """Claim up to %(limit)s jobs of one queue in one statement.

    The CTE is MATERIALIZED so the locked id list is computed exactly once: a join that
    re-scans an inlined subquery could lock and return more rows than LIMIT. ORDER BY
    matches jobs_claim_idx column for column: an index scan, no sort. With ``after``, the
    scan starts past the row (priority, scheduled_at, id) given: a row comparison on the
    index's columns, so the btree descends straight to it. Rows also return their
    scheduled_at (last column), from which the worker keeps its next starting point.
    """
    resume = (" AND (priority, scheduled_at, id) > (%(after_priority)s::smallint,"
              " %(after_scheduled)s::timestamptz, %(after_id)s::bigint)") if after else ""
    return (
        "WITH picked AS MATERIALIZED ("
        " SELECT id FROM {jobs}"
        " WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()" + resume +
        # A paused queue claims nothing, and a limited one nothing through this path;
        # uncorrelated, so evaluated once per claim.
        "  AND NOT EXISTS (SELECT 1 FROM {queues} WHERE name = %(queue)s AND (paused OR " + LIMITED + "))"
        " ORDER BY queue, priority, scheduled_at, id"
        " LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
        " UPDATE {jobs} AS j SET state = 'running', attempt = j.attempt + 1,"
        " attempted_at = now(), claim_token = %(token)s, lease_owner = %(owner)s,"
        " lease_expires_at = now() + make_interval(secs => %(lease)s)"
        # An id array, as the limited claim has (_claim_sql._CLAIM_AND_COUNT), not a join
        # with ``picked``: 10.6% more jobs/s in a 4 x 100 drain, server CPU 35 -> 31 us
        # per job (benchmarks/RESULTS.md, variant none-array).
        " WHERE j.id = ANY(ARRAY(SELECT id FROM picked))"
        " RETURNING " + CLAIM_COLUMNS.replace("id,", "j.id,", 1) + ", j.scheduled_at"
    )


# How long the rescue and the promotion wait on another transaction (set in the
# statement: no round trip of its own).
RESCUE_LOCK_TIMEOUT = "500ms"


def _kept_key(job_id: str) -> str:
    """The advisory lock (two int4 keys) by which a live worker says it holds the outcome
    of job ``job_id`` (an SQL expression): the schema's, then the id modulo 2**31. Ids
    that share a key only make the rescue pass over an expired job while the other is kept."""
    return "hashtext('sa_jobs.kept.' || {channel}), mod(" + job_id + ", 2147483648)::int"


# Passes over an expired job whose outcome a live worker keeps (Heartbeat._guard_kept): its
# advisory lock is taken, and let go again at once, only if no session holds it. The CASE
# keeps the lock functions to the running, expired rows the rescue is about to lock.
_NOT_KEPT = (
    "CASE WHEN e.state = 'running' AND e.lease_expires_at < now() THEN"
    " CASE WHEN pg_try_advisory_lock(" + _kept_key("e.id") + ") THEN pg_advisory_unlock(" + _kept_key("e.id") + ")"
    " ELSE false END ELSE false END"
)


def _rescue_statement(*, only_ids: bool) -> str:
    """Return up to %(limit)s expired jobs (``only_ids``: of %(ids)s) to retryable, or dead.

    A unique job going back to a state that holds its key waits while another
    transaction has inserted a job of that key and not committed (the unique index cannot
    tell yet whether the key is taken). One such job held up the rescue of every expired
    job on every worker for as long as that transaction lasted (each tick ran into its
    deadline and dropped leadership). The statement sets its own lock_timeout (local to
    its transaction, set before it locks anything): past it, it fails with
    LockNotAvailable, and the Rescuer rescues the jobs one at a time."""
    only = " AND e.id = ANY(%(ids)s::bigint[])" if only_ids else ""
    return (
        "WITH expired AS MATERIALIZED ("
        " SELECT e.id, CASE WHEN e.attempt >= e.max_attempts THEN 'dead' ELSE 'retryable' END AS due,"
        "  e.unique_states, (" + _HOLDER.format(row="e") + ") AS holder"
        " FROM {jobs} AS e WHERE e.state = 'running' AND e.lease_expires_at < now()" + only +
        "  AND (SELECT set_config('lock_timeout', '" + RESCUE_LOCK_TIMEOUT + "', true)) IS NOT NULL"
        "  AND " + _NOT_KEPT +
        " LIMIT %(limit)s FOR UPDATE OF e SKIP LOCKED),"
        " outcome AS (SELECT id, due, holder, unique_states, CASE"
        "  WHEN holder IS NULL OR due <> ALL (unique_states) THEN due"
        "  WHEN 'dead' <> ALL (unique_states) THEN 'dead' ELSE 'cancelled' END AS target FROM expired)"
        " UPDATE {jobs} AS j SET state = o.target,"
        " unique_key = CASE WHEN o.target <> o.due AND o.target = ANY (o.unique_states)"
        "  THEN NULL ELSE j.unique_key END,"
        " finished_at = CASE WHEN o.target <> 'retryable' THEN now() END,"
        " scheduled_at = now(), lease_expires_at = NULL,"
        " errors = j.errors || jsonb_build_array(jsonb_build_object("
        "  'attempt', j.attempt, 'at', now(), 'worker', j.lease_owner,"
        "  'error', 'LeaseExpired: the worker stopped heartbeating (crashed, killed"
        " or partitioned); the attempt is counted' || CASE WHEN o.target <> o.due"
        "  THEN '; not retried: job ' || o.holder || ' holds its unique key' ELSE '' END))"
        " FROM outcome AS o WHERE j.id = o.id"
        " RETURNING j.id, j.state, j.queue, j.kind"
    )


# A job the promotion makes available: due, and not waiting for its unique key.
_DUE = (
    "state IN ('scheduled', 'retryable') AND scheduled_at <= now()"
    " AND NOT (d.unique_key IS NOT NULL AND coalesce('available' = ANY (d.unique_states), false)"
    "  AND EXISTS (" + _HOLDER.format(row="d") + "))"
)


def _promote_statement(*, only_ids: bool) -> str:
    """Make up to %(limit)s due jobs (``only_ids``: of %(ids)s) available.

    As the rescue (see _rescue_statement): a unique job whose key another transaction has
    inserted and not committed makes its promotion wait on that transaction, which held
    up the promotion of every due job on every worker; the statement's own lock_timeout
    ends that wait, and the Scheduler then promotes the jobs one at a time."""
    only = " AND d.id = ANY(%(ids)s::bigint[])" if only_ids else ""
    return (
        "WITH due AS MATERIALIZED ("
        " SELECT id FROM {jobs} AS d WHERE " + _DUE + only +
        "  AND (SELECT set_config('lock_timeout', '" + RESCUE_LOCK_TIMEOUT + "', true)) IS NOT NULL"
        " ORDER BY scheduled_at LIMIT %(limit)s"
        " FOR UPDATE SKIP LOCKED)"
        " UPDATE {jobs} AS j SET state = 'available' FROM due WHERE j.id = due.id"
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
    claim_after: str
    cancel_channel: str
    complete_many: str
    finish_many: str
    release_many: str
    flush_outcomes: str
    flush_outcomes_around_locks: str
    heartbeat_many: str
    extend_lease_waiting: str
    keep_claims: str
    unkeep_claims: str
    rescue_expired: str
    rescue_expired_ids: str
    expired_ids: str
    promote_due: str
    promote_due_ids: str
    due_ids: str
    notify: str
    try_leader_lock: str
    listen: str
    listen_cancel: str
    states_of: str
    claims_of: str
    queue_settings: str
    claim_limited: str
    unique_holder: str
    drop_unique_key: str

    @classmethod
    def for_schema(cls, schema: str = DEFAULT_SCHEMA) -> "Queries":
        schema = _validate.schema_name(schema)
        r = lambda t: _render(t, schema)  # noqa: E731
        return cls(
            schema=schema,
            channel=channel_name(schema),
            cancel_channel=cancel_channel_name(schema),
            claim=r(_claim_statement(after=False)),
            # The same claim, resuming after the last row of this worker's previous full
            # batch (see Worker._claim_resuming): under a backlog, the rows before it are the jobs
            # claimed since the last VACUUM, whose dead entries a scan from the start of
            # jobs_claim_idx would step over one by one.
            claim_after=r(_claim_statement(after=True)),
            # Outcomes are fenced by (id, claim_token, state): a worker whose lease was
            # taken over changes nothing. Each runs for a whole batch via unnest.
            complete_many=r(_COMPLETE.format(p="") + " RETURNING j.id"),
            finish_many=r(_FINISH.format(p="") + " RETURNING j.id"),
            release_many=r(_RELEASE.format(p="") + " RETURNING j.id"),
            # The completer's flush: all three as data-modifying CTEs of ONE statement,
            # so a batch costs one round trip and lands (or fails) as a unit. A job has
            # one outcome, so no row is touched by two of them.
            flush_outcomes=r(
                "WITH c AS (" + _COMPLETE.format(p="c_") + _WRITTEN + "),"
                " f AS (" + _FINISH.format(p="f_") + _WRITTEN + "),"
                " r AS (" + _RELEASE.format(p="r_") + _WRITTEN + ")"
                " SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM f), (SELECT count(*) FROM r)," + _LANDED
            ),
            # The same flush, writing around the rows another transaction holds locked
            # (an app's cancel() not committed yet), which the flush above waits for with
            # the whole batch: it locks its rows first, skipping those, and names them in
            # its last column (rows that exist but were not locked) for the completer to
            # keep. Only run once a flush met such a lock (see Completer._write): the
            # extra pass costs the flush about a third more.
            flush_outcomes_around_locks=r(
                "WITH locked AS MATERIALIZED (SELECT l.id FROM {jobs} AS l"
                " WHERE l.id = ANY(%(ids)s::bigint[]) FOR NO KEY UPDATE SKIP LOCKED),"
                " c AS (" + _COMPLETE.format(p="c_") + _LOCKED + _WRITTEN + "),"
                " f AS (" + _FINISH.format(p="f_") + _LOCKED + _WRITTEN + "),"
                " r AS (" + _RELEASE.format(p="r_") + _LOCKED + _WRITTEN + ")"
                " SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM f), (SELECT count(*) FROM r),"
                " ARRAY(SELECT s.id FROM {jobs} AS s WHERE s.id = ANY(%(ids)s::bigint[])"
                "  AND s.id NOT IN (SELECT id FROM locked)),"
                + _LANDED
            ),
            # For an outcome the unique index refused (see Completer._write_superseded):
            # the job that took this running job's key meanwhile (NULL if none holds it
            # now: the holder left its states since), and the key's states; no row if the
            # job is no longer this claim's.
            unique_holder=r(
                "SELECT h.id, me.unique_states FROM {jobs} AS me LEFT JOIN LATERAL ("
                + _HOLDER.format(row="me") + ") AS h ON true"
                " WHERE me.id = %(id)s AND me.claim_token = %(token)s AND (me.state || '') = 'running'"
            ),
            drop_unique_key=r(
                "UPDATE {jobs} AS j SET unique_key = NULL"
                " WHERE j.id = %(id)s AND j.claim_token = %(token)s AND {running}"
            ),
            # Progress rides along: a handler's progress report costs no round trip.
            # Rows another transaction has locked are skipped, not waited for: one job's
            # row held by an app's open transaction (a cancel() it has not committed yet)
            # kept the one beat of all the worker's jobs waiting, so none of their leases
            # was extended and the rescuer re-ran every one. A skipped row is missing from
            # the result; the heartbeat then reads it (claims_of) and leaves it be.
            heartbeat_many=r(
                "WITH mine AS MATERIALIZED ("
                " SELECT j.id, u.progress FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[], %(progress)s::text[])"
                " AS u(id, token, progress) JOIN {jobs} AS j ON j.id = u.id AND j.claim_token = u.token AND {running}"
                " FOR NO KEY UPDATE OF j SKIP LOCKED)"
                " UPDATE {jobs} AS j SET lease_expires_at = now() + make_interval(secs => %(lease)s),"
                " progress = coalesce(m.progress::jsonb, j.progress)"
                " FROM mine AS m WHERE j.id = m.id"
                " RETURNING j.id, j.claim_token"
            ),
            # One job's lease, waiting for its row lock (see Heartbeat._keep_awaiting): a
            # waiter holds the row's tuple lock, so the rescuer (SKIP LOCKED) cannot take
            # the row between the locker's end and this update.
            extend_lease_waiting=r(
                "UPDATE {jobs} AS j SET lease_expires_at = now() + make_interval(secs => %(lease)s)"
                " WHERE j.id = %(id)s AND j.claim_token = %(token)s AND {running}"
            ),
            # A live worker's claim of jobs whose outcomes it keeps (their writes wait on
            # another transaction's lock): the rescue passes over them however long their
            # leases have run out (see _NOT_KEPT), until the worker lets go (unkeep_claims)
            # or its session ends. Returns the ids it holds now (not one another session
            # holds: the rescue, for an instant, or a kept job whose id shares its key).
            keep_claims=r(
                "SELECT k.id FROM unnest(%(ids)s::bigint[]) AS k(id)"
                " WHERE pg_try_advisory_lock(" + _kept_key("k.id") + ")"
            ),
            unkeep_claims=r(
                "SELECT count(*) FILTER (WHERE pg_advisory_unlock(" + _kept_key("k.id") + "))"
                " FROM unnest(%(ids)s::bigint[]) AS k(id)"
            ),
            # Run by every worker (SKIP LOCKED makes concurrent rescuers safe): jobs whose
            # lease ran out belong to a worker presumed dead.
            # The lost attempt counts; exhausted jobs go dead with the reason recorded.
            # No ORDER BY: jobs_running_idx is ordered by queue first, so ordering by lease
            # would sort every expired job under LockRows (which keeps the sort unbounded)
            # on every batch; unordered, the index scan stops after ``limit`` expired jobs.
            # A unique job need not hold its key while running: if another job took the
            # key meanwhile, going back to retryable would make a duplicate (and the
            # UniqueViolation failed every rescue, and the promotion after it, on every
            # worker, for good). Such a job ends dead instead (cancelled if dead is one of
            # its key's states), naming the holder; the Rescuer rescues one job per
            # statement when two of one batch share a key. If cancelled holds the key too,
            # the job gives its key up, as the completer's superseded outcome does.
            rescue_expired=r(_rescue_statement(only_ids=False)),
            # The same for the given expired jobs, and the expired jobs' ids: the rescue
            # one job at a time once a batch waited on another transaction (Rescuer).
            rescue_expired_ids=r(_rescue_statement(only_ids=True)),
            expired_ids=r("SELECT id FROM {jobs} WHERE state = 'running' AND lease_expires_at < now() LIMIT %(limit)s"),
            # A due job whose unique key another job holds, and that would hold it once
            # available, waits (stays scheduled/retryable) until the key is free: promoting
            # it would make a duplicate, and the UniqueViolation failed every promotion on
            # every worker. Two due jobs of one key: see Scheduler.
            promote_due=r(_promote_statement(only_ids=False)),
            # The same for the given jobs, and the due jobs' ids: the promotion one job at
            # a time once a batch waited on another transaction (Scheduler).
            promote_due_ids=r(_promote_statement(only_ids=True)),
            due_ids=r("SELECT id FROM {jobs} AS d WHERE " + _DUE + " ORDER BY scheduled_at LIMIT %(limit)s"),
            notify=r("SELECT pg_notify({channel}, '')"),
            try_leader_lock=r("SELECT pg_try_advisory_lock(hashtext('sa_jobs.leader'), hashtext({channel}))"),
            listen=sql.SQL("LISTEN {}").format(sql.Identifier(channel_name(schema))).as_string(),
            listen_cancel=sql.SQL("LISTEN {}").format(sql.Identifier(cancel_channel_name(schema))).as_string(),
            states_of=r("SELECT id, state FROM {jobs} WHERE id = ANY(%(ids)s::bigint[])"),
            claims_of=r("SELECT id, state, claim_token FROM {jobs} WHERE id = ANY(%(ids)s::bigint[])"),
            # Read after a claim that came back empty. It also brings back a rate window
            # that lies in the future, which only a step back of the database's clock
            # makes: the claim never moves the window back (schema v11), so every claim
            # counted against that window until the clock caught up, and a spent one
            # started nothing for as long as the step. The window becomes the current
            # one, keeping its count (the claims made since the step count: no more than
            # the rate in it), and the next one opens afresh. When nothing is in the
            # future it writes nothing. "Future" is past clock_timestamp(), not now():
            # a claim that began after this statement, in the next window, may have
            # committed before it reads the row (its window starts at or before its own
            # now(), which no claim committed by then can pass); rewinding that one
            # would restart the next window's count, as v10's claims did.
            # Its last two columns say whether the rate stopped that claim: the queue's
            # window is the current one (or a later one) and full, or a newer window
            # opened since (see Worker._read_settings).
            queue_settings=r(
                "WITH rewound AS (UPDATE {queues} SET rate_window_start = " + _window_of("clock_timestamp()") +
                " WHERE name = %(queue)s AND rate_window_start > clock_timestamp())"
                " SELECT paused, " + LIMITED + ", partition_concurrency IS NOT NULL,"
                " extract(epoch FROM rate_period)::float8,"
                " coalesce(rate_window_start >= w.start AND rate_window_count >= rate_limit, false),"
                " coalesce(rate_window_start < w.start, false)"
                " FROM {queues} CROSS JOIN LATERAL (SELECT " + _window_of("now()") + " AS start) w WHERE name = %(queue)s"
            ),
            # A limited queue's claim: one call of the schema's claim function, which
            # locks the queue row, then counts and claims in a second statement (see
            # schema._claim_function): one statement and one round trip per batch. The
            # after_* values (all None: from the start) resume it, as claim_after does.
            claim_limited=sql.SQL(
                "SELECT * FROM {}(%(queue)s, %(limit)s, %(token)s, %(owner)s, %(lease)s, %(scan)s,"
                " %(after_priority)s::smallint, %(after_scheduled)s::timestamptz, %(after_id)s::bigint)"
            ).format(sql.Identifier(schema, CLAIM_FUNCTION)).as_string(),
        )
