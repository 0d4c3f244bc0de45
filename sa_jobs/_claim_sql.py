"""The SQL of the limited claim, shared by the worker's statements and the schema's
claim function (``<schema>.claim_limited``), so both are one text.

Templates use ``{jobs}``/``{queues}`` for the tables and ``%(name)s`` for the values;
:func:`function_body` turns the latter into the function's ``p_name`` arguments.

A schema version's function text is frozen once released (``sa-jobs check`` compares
installs against it, tests/test_schema_versions.py pins it): a change to these
statements is a new schema version, with the older text kept for the older version.
"""

from __future__ import annotations

import re

# Column list every claim returns, in the order ClaimedJob reads it.
CLAIM_COLUMNS = (
    "id, kind, queue, args, attempt, max_attempts, priority,"
    " extract(epoch FROM (attempted_at - scheduled_at))::float8 AS wait_seconds,"
    " extract(epoch FROM created_at)::float8 AS created_epoch"
)


# A queue whose row sets any limit is claimed only through the limited path below.
LIMITED = "(concurrency IS NOT NULL OR partition_concurrency IS NOT NULL OR rate_limit IS NOT NULL)"

# How many jobs a limited claim may take, computed under the queue row's lock (taken by
# an earlier statement of the claim function, so this statement's snapshot already sees
# every claim committed by the claimer before us). ``running`` counts the queue's running
# jobs; by default in the queue's range of jobs_running_idx.
_COUNT_RUNNING = "(SELECT count(*) FROM {jobs} r WHERE r.state = 'running' AND r.queue = %(queue)s)"


def _room(running: str = _COUNT_RUNNING) -> str:
    """The ``qc`` CTE: the room left by the queue's limits, ``running`` its running jobs."""
    return (
        "qc AS ("
        " SELECT CASE WHEN q.paused THEN 0 ELSE greatest(0, least(%(limit)s,"
        "  CASE WHEN q.concurrency IS NULL THEN %(limit)s ELSE q.concurrency"
        "   - " + running + " END,"
        "  CASE WHEN q.rate_limit IS NULL THEN %(limit)s ELSE q.rate_limit"
        "   - CASE WHEN q.rate_window_start = w.start THEN q.rate_window_count ELSE 0 END END)) END AS room,"
        " w.start AS window_start"
        " FROM {queues} q CROSS JOIN LATERAL (SELECT to_timestamp(floor(extract(epoch FROM now())"
        "  / extract(epoch FROM q.rate_period)) * extract(epoch FROM q.rate_period)) AS start) w"
        " WHERE q.name = %(queue)s)"
    )


_ROOM = _room()

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


CLAIM_LIMITED = (
    "WITH " + _ROOM + ","
    " picked AS MATERIALIZED ("
    " SELECT id FROM {jobs}"
    " WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
    " ORDER BY queue, priority, scheduled_at, id"
    " LIMIT coalesce((SELECT room FROM qc), 0) FOR UPDATE SKIP LOCKED),"
    + _CLAIM_AND_COUNT
)

# Schema version 16: the limited claim of a queue whose running bound leaves every limit
# slack (see schema._claim_function_v12): the bound, a variable of the function, stands
# for the running jobs, which are not counted.
CLAIM_LIMITED_WITHIN_BOUND = CLAIM_LIMITED.replace(_COUNT_RUNNING, "v_bound")
assert CLAIM_LIMITED_WITHIN_BOUND != CLAIM_LIMITED


def _head_window(*, limit: str = "%(scan)s", lock: str = "") -> str:
    """The queue's next ``limit`` waiting jobs in claim order (one index range)."""
    return (" head AS MATERIALIZED (SELECT id, partition_key, priority, scheduled_at FROM {jobs}"
            "  WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
            "  ORDER BY queue, priority, scheduled_at, id LIMIT " + limit + lock + "),")


# Each key of the window may take its partition_concurrency minus its running jobs (in
# _HEAD_BUSY counted in the index of running jobs for the window's keys only; v9's counted
# head claim gives every key's); unkeyed jobs only the room.
_HEAD_BUSY = (
    " busy AS MATERIALIZED (SELECT k.key, (SELECT count(*) FROM {jobs} b WHERE b.state = 'running'"
    "  AND b.queue = %(queue)s AND b.partition_key = k.key) AS n"
    "  FROM (SELECT DISTINCT partition_key AS key FROM head WHERE partition_key IS NOT NULL) k),"
)
_HEAD_RANKED_CANDIDATES = (
    " ranked AS (SELECT h.id, h.priority, h.scheduled_at, h.partition_key,"
    "  row_number() OVER (PARTITION BY h.partition_key ORDER BY h.priority, h.scheduled_at, h.id) AS rn"
    "  FROM head h),"
    " candidates AS (SELECT r.id, r.priority, r.scheduled_at FROM ranked r"
    "  CROSS JOIN {queues} q LEFT JOIN busy ON busy.key = r.partition_key"
    "  WHERE q.name = %(queue)s AND (r.partition_key IS NULL"
    "   OR r.rn + coalesce(busy.n, 0) <= coalesce(q.partition_concurrency, %(limit)s))),"
)
_HEAD_CANDIDATES = _HEAD_BUSY + _HEAD_RANKED_CANDIDATES

# Versions 4 and 5 pick by an id lookup after reading, locking there.
_PICK_BY_ID = (
    " picked AS MATERIALIZED ("
    " SELECT id FROM {jobs} WHERE id = ANY(ARRAY("
    "  SELECT id FROM candidates ORDER BY priority, scheduled_at, id"
    "  LIMIT coalesce((SELECT room FROM qc), 0)))"
    " AND state = 'available' FOR UPDATE SKIP LOCKED),"
)

# Schema versions 4 and 5 (frozen). A partition-limited claim looks first at the queue's
# head window: each key may take its partition_concurrency minus its running jobs, unkeyed
# jobs only the queue's room. When that leaves the batch short and more jobs wait beyond
# the window (busy keys crowd its head), the skip scan below looks at every key.
CLAIM_PARTITIONED_HEAD_V4 = "WITH " + _ROOM + "," + _head_window() + _HEAD_CANDIDATES + _PICK_BY_ID + _CLAIM_AND_COUNT

# More waiting jobs than the head window holds (the skip scan's cue).
BEYOND_HEAD = (
    "SELECT 1 FROM {jobs} WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
    " ORDER BY queue, priority, scheduled_at, id OFFSET %(scan)s LIMIT 1"
)

# Per-key room: the distinct keys with waiting jobs come from a skip scan of
# jobs_partition_idx (one index probe per key); each key with room offers a fair share of
# the batch, best first across keys. Unkeyed jobs are limited by the queue only; they are
# looked for among the first %(scan)s waiting jobs of the queue.
_SKIP_SCAN_KEYS = (
    "WITH RECURSIVE keys(key) AS ("
    " (SELECT partition_key FROM {jobs} WHERE state = 'available' AND queue = %(queue)s"
    "  AND partition_key IS NOT NULL ORDER BY queue, partition_key LIMIT 1)"
    " UNION ALL"
    " SELECT (SELECT k.partition_key FROM {jobs} k WHERE k.state = 'available' AND k.queue = %(queue)s"
    "  AND k.partition_key > keys.key ORDER BY k.queue, k.partition_key LIMIT 1)"
    " FROM keys WHERE keys.key IS NOT NULL),"
)
_FREE_AND_OFFER = (
    " free AS MATERIALIZED (SELECT keys.key,"
    "  greatest(0, coalesce(q.partition_concurrency, %(limit)s) - coalesce(busy.n, 0)) AS free"
    "  FROM keys CROSS JOIN {queues} q LEFT JOIN busy ON busy.key = keys.key"
    "  WHERE keys.key IS NOT NULL AND q.name = %(queue)s),"
    # Each key with room offers a fair share of the batch (or its room, if
    # smaller), and at least one job: one candidate per key when many keys wait.
    " offer AS MATERIALIZED (SELECT key, least(free, ceil(coalesce((SELECT room FROM qc), 0)::numeric"
    "  / greatest(1, count(*) FILTER (WHERE free > 0) OVER ()))::int) AS room FROM free),"
)
_KEYS_AND_OFFERS = (
    _SKIP_SCAN_KEYS +
    " " + _ROOM + ","
    " busy AS MATERIALIZED (SELECT partition_key AS key, count(*) AS n FROM {jobs}"
    "  WHERE state = 'running' AND queue = %(queue)s AND partition_key IS NOT NULL GROUP BY partition_key),"
    + _FREE_AND_OFFER
)

def _offers_by_key(*, lock: str = "") -> str:
    """Each key's best waiting jobs, up to the room it offers (one index range per key),
    then UNION ALL: the first half of the skip scan's candidates."""
    return (" CROSS JOIN LATERAL (SELECT j.id, j.priority, j.scheduled_at FROM {jobs} j"
            "  WHERE j.state = 'available' AND j.queue = %(queue)s AND j.partition_key = offer.key"
            "  AND j.scheduled_at <= now() ORDER BY j.queue, j.partition_key, j.priority, j.scheduled_at, j.id"
            "  LIMIT offer.room" + lock + ") c"
            " WHERE offer.room > 0"
            " UNION ALL")


def _unkeyed_in_head(*, key_column: str = "", lock: str = "", gap: str = " ") -> str:
    """The unkeyed jobs among the queue's first %(scan)s waiting jobs: the second half of
    the skip scan's candidates (``gap`` keeps each frozen version's exact text)."""
    return (" SELECT h.id, h.priority, h.scheduled_at" + key_column + " FROM (SELECT id, priority, scheduled_at,"
            " partition_key  FROM {jobs} WHERE state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
            "  ORDER BY queue, priority, scheduled_at, id LIMIT %(scan)s" + lock + ") h" + gap
            + "WHERE h.partition_key IS NULL),")


CLAIM_PARTITIONED_V4 = (
    _KEYS_AND_OFFERS +
    " candidates AS ("
    " SELECT c.id, c.priority, c.scheduled_at FROM offer" + _offers_by_key() + _unkeyed_in_head()
    + _PICK_BY_ID + _CLAIM_AND_COUNT
)

# Schema version 6: the partitioned claims lock the rows they read in claim order, as the
# plain claim does, and then claim among them by primary key. Versions 4 and 5 read first
# and locked afterwards by an id lookup that repeated ``state = 'available'`` (needed to
# lock safely): that lookup matched jobs_claim_idx's predicate, and a plan made while the
# table was small walked that index for the ids (every waiting job of the queue per claim).
# That risk is why v5 planned every call; v6's statements have one sensible plan at any
# table size, so the function keeps one plan per session (tests/test_schema_sql.py).
_PICK_LOCKED = (
    " picked AS MATERIALIZED (SELECT id FROM candidates ORDER BY priority, scheduled_at, id"
    "  LIMIT coalesce((SELECT room FROM qc), 0)),"
)

CLAIM_PARTITIONED_HEAD_V6 = (
    "WITH " + _ROOM + "," + _head_window(lock=" FOR UPDATE SKIP LOCKED") + _HEAD_CANDIDATES + _PICK_LOCKED
    + _CLAIM_AND_COUNT
)

CLAIM_PARTITIONED_V6 = (
    _KEYS_AND_OFFERS +
    # Locked as read, per key and among the queue's first waiting jobs for unkeyed ones
    # (the window also locks the keyed jobs in it, released unclaimed at commit).
    " candidates AS MATERIALIZED ("
    " SELECT c.id, c.priority, c.scheduled_at FROM offer" + _offers_by_key(lock=" FOR UPDATE SKIP LOCKED")
    + _unkeyed_in_head(lock=" FOR UPDATE SKIP LOCKED", gap="  ")
    + _PICK_LOCKED + _CLAIM_AND_COUNT
)

# Schema version 7: the skip scan reads one job per key with room unlocked, as v4/v5 did,
# and locks only the jobs it picks, each through a primary-key lookup joined per row
# (version 6 locked every key's offered jobs as it read them: with 20,000 waiting keys, 20,000
# row locks and WAL records per claim to take 50). A picked job is claimed only if its
# locked version still has the queue, key and due time it was picked for.
def _skip_scan_pick(keys_and_offers: str) -> str:
    """The skip scan's pick and claim, after its CTEs keys, qc, busy, free and offer."""
    return (
        keys_and_offers +
        " candidates AS MATERIALIZED ("
        " SELECT c.id, c.priority, c.scheduled_at, offer.key FROM offer" + _offers_by_key()
        + _unkeyed_in_head(key_column=", NULL") +
        " chosen AS MATERIALIZED (SELECT id, key FROM candidates ORDER BY priority, scheduled_at, id"
        "  LIMIT coalesce((SELECT room FROM qc), 0)),"
        # The lookup names nothing but the primary key: with ``state = 'available'`` in it, a
        # plan made on a small table walked jobs_claim_idx once per job. The locked version
        # (the latest, under READ COMMITTED) is checked afterwards, in a materialized CTE so
        # that those checks are not pushed back into the lookup.
        " locked AS MATERIALIZED (SELECT l.id, l.state, l.queue, l.partition_key, l.scheduled_at, c.key"
        "  FROM chosen c CROSS JOIN LATERAL (SELECT j.id, j.state, j.queue, j.partition_key, j.scheduled_at"
        "   FROM {jobs} j WHERE j.id = c.id FOR UPDATE SKIP LOCKED) l),"
        " picked AS MATERIALIZED (SELECT id FROM locked WHERE state = 'available' AND queue = %(queue)s"
        "  AND partition_key IS NOT DISTINCT FROM key AND scheduled_at <= now()),"
        + _CLAIM_AND_COUNT
    )


CLAIM_PARTITIONED = _skip_scan_pick(_KEYS_AND_OFFERS)

# Version 7's head window: as v6's, but no wider than twice the room (at least 16) when a
# queue concurrency or rate limit leaves less room than the worker asked for, since every
# job in the window is locked.
_HEAD_WINDOW_NEAR_ROOM = _head_window(limit="least(%(scan)s, greatest(16, 2 * coalesce((SELECT room FROM qc), 0)))",
                                      lock=" FOR UPDATE SKIP LOCKED")
CLAIM_PARTITIONED_HEAD = (
    "WITH " + _ROOM + ","
    + _HEAD_WINDOW_NEAR_ROOM
    + _HEAD_CANDIDATES + _PICK_LOCKED + _CLAIM_AND_COUNT
)

# Schema version 9: a queue with both a concurrency and a partition limit reads its running
# jobs once per statement. Up to v8 each of its claim statements counted them twice under
# the queue row's lock: all of them for the queue's room, then again per key (the head
# window's keys, or every key for the skip scan), each a heap visit (running rows are
# recently updated, never all-visible). Now one range of jobs_running_idx, grouped by key
# (NULL for unkeyed jobs), gives both. Queues without a concurrency limit keep v7's
# statements, which count keyed running jobs only, and for the head only the window's keys.
_RUNNING_BY_KEY = (
    " busy AS MATERIALIZED (SELECT partition_key AS key, count(*) AS n FROM {jobs}"
    "  WHERE state = 'running' AND queue = %(queue)s GROUP BY partition_key),"
)
_ROOM_FROM_BUSY = _room("(SELECT coalesce(sum(n), 0)::bigint FROM busy)")

CLAIM_PARTITIONED_COUNTED = _skip_scan_pick(
    _SKIP_SCAN_KEYS + _RUNNING_BY_KEY + " " + _ROOM_FROM_BUSY + "," + _FREE_AND_OFFER)

CLAIM_PARTITIONED_HEAD_COUNTED = (
    "WITH" + _RUNNING_BY_KEY + " " + _ROOM_FROM_BUSY + ","
    + _HEAD_WINDOW_NEAR_ROOM
    + _HEAD_RANKED_CANDIDATES + _PICK_LOCKED + _CLAIM_AND_COUNT
)

# Schema version 11: the rate window never moves back. The window is taken from the
# claim's now() (its transaction's start), and claimers take the queue row's lock in
# their own order: one whose transaction began before a window boundary but took the
# lock after a claim of the next window used to count its own window as empty, claim up
# to the limit again and set the row back to its window, so the next window's claims
# counted theirs as empty too (2N starts in each of two windows). Now a row whose window
# is the same or later counts, and the row keeps the later window.
_RATE_WINDOW_V11 = (
    ("CASE WHEN q.rate_window_start = w.start THEN", "CASE WHEN q.rate_window_start >= w.start THEN"),
    ("SET rate_window_start = qc.window_start,", "SET rate_window_start = greatest(q.rate_window_start, qc.window_start),"),
    ("CASE WHEN q.rate_window_start = qc.window_start THEN", "CASE WHEN q.rate_window_start >= qc.window_start THEN"),
)


def rate_window_never_back(template: str) -> str:
    """A claim statement's text as of schema version 11 (see ``_RATE_WINDOW_V11``)."""
    if "rate_window_count" not in template:
        return template
    for old, new in _RATE_WINDOW_V11:
        assert old in template, old
        template = template.replace(old, new)
    return template


# Schema version 12.
# - The skip scan's cue agrees with the head window. A queue concurrency or rate limit
#   narrows the head window to about twice its room (at least 16 jobs), but the cue asked
#   whether more than ``scan`` jobs waited: other keys' jobs behind a busy key's backlog,
#   past the window and within ``scan``, were never looked at while the queue's room sat
#   idle. On such a queue (``v_capped``) the cue now asks whether more than the narrowest
#   window waits. (A claim with no room left does not walk the keys: the skip scan's
#   ``chosen`` is LIMIT 0, so nothing below it is read.)
# - A limited claim can resume past a position, as the plain claim does: every claimed
#   job leaves a dead entry at the head of jobs_claim_idx until VACUUM, and a claim from
#   the start steps over all of them (over a long drain, a growing cost per claim; while
#   an old snapshot pins them, every claim since the pin). Given ``after`` (priority,
#   scheduled_at, id), the limited claim, the head window and the cue start past it, a
#   row comparison the btree descends to; the skip scan, the rare path, still reads
#   each key from its start. Claims return each job's scheduled_at, for the next position,
#   and whether the job may be one (``resumable``): a partitioned claim passes over the
#   waiting jobs of keys at their limit, and a position past one of them would leave it
#   behind. A head claim's job is resumable when no job of its window before it was left
#   waiting; a plain limited claim's always (it takes the first jobs, as the plain claim
#   does); a skip scan's never.
HEAD_MIN_WINDOW = 16
BEYOND_HEAD_V12 = BEYOND_HEAD.replace(
    "OFFSET %(scan)s", f"OFFSET CASE WHEN v_capped THEN least(%(scan)s, {HEAD_MIN_WINDOW}) ELSE %(scan)s END")
_WAITING = "state = 'available' AND queue = %(queue)s AND scheduled_at <= now()"
_AFTER = (" AND (priority, scheduled_at, id) > (%(after_priority)s::smallint, %(after_scheduled)s::timestamptz,"
          " %(after_id)s::bigint)")
_RETURNING = ("AS created_epoch),", "AS created_epoch, j.scheduled_at),")


def returning_scheduled_at(template: str) -> str:
    """A claim statement's text as of schema version 12: it also returns scheduled_at."""
    old, new = _RETURNING
    assert template.count(old) == 1, template
    return template.replace(old, new)


_CLAIMED = " SELECT * FROM claimed"
_FIRST_LEFT = (" first_left AS MATERIALIZED (SELECT priority, scheduled_at, id FROM head"
               "  WHERE id <> ALL(ARRAY(SELECT id FROM picked)) ORDER BY priority, scheduled_at, id LIMIT 1),")
_RESUMABLE = {
    "head": " SELECT claimed.*, NOT EXISTS (SELECT 1 FROM first_left f WHERE (f.priority, f.scheduled_at, f.id)"
            " < (claimed.priority, claimed.scheduled_at, claimed.id)) FROM claimed",
    "always": " SELECT *, true FROM claimed",
    "never": " SELECT *, false FROM claimed",
}


def with_resumable(template: str, which: str) -> str:
    """A claim statement's text as of schema version 12, whose rows also say whether the
    next claim may resume past them: ``which`` is "head", "always" or "never"."""
    assert template.endswith(_CLAIMED) and template.count(" claimed AS (UPDATE") == 1, template
    if which == "head":
        template = template.replace(" claimed AS (UPDATE", _FIRST_LEFT + " claimed AS (UPDATE")
    return template[: -len(_CLAIMED)] + _RESUMABLE[which]


def resumed(template: str) -> str:
    """The head-of-queue read of ``template`` (a limited claim, a head claim or the cue)
    starting past %(after_*)s instead of at the queue's start (schema version 12)."""
    assert template.count(_WAITING) == 1, template
    return template.replace(_WAITING, _WAITING + _AFTER)


_PARAM = re.compile(r"%\((\w+)\)s")


def function_body(template: str) -> str:
    """The template with each ``%(name)s`` replaced by the function argument ``p_name``."""
    return _PARAM.sub(lambda m: "p_" + m.group(1), template)
