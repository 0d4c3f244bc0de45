"""Watches the database's xmin horizon, so claims can stop paying for a held one.

While any snapshot stays open (a long transaction, a session idle in transaction, a
replication slot, a prepared transaction), VACUUM and page pruning may not remove the old
versions of claimed jobs, and ``jobs_claim_idx`` keeps an entry for each. A claim that
reads the queue from its start steps over every one of them, so its cost grows with the
jobs claimed since the horizon stopped (docs/reliability.md, Finding 6). The worker's
plain claim resumes past its previous batch instead while the horizon is held; this
service tells it when that is.

The oldest ``backend_xmin`` in ``pg_stat_activity`` (visible to every role, unlike
``xact_start``), of replication slots and of prepared transactions, read once per
maintenance tick. The horizon counts as held once the same xid has stayed the oldest for
``held_after`` seconds while newer transactions were assigned ids (something could be
left behind); it is released the tick the oldest xid changes. Runs on every worker: each
needs the answer for its own claims, and the query is one read of shared memory views.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import psycopg

from ..events import hook
from ..queries import Queries

log = logging.getLogger("sa_jobs.maintenance")

# The oldest xid that still holds back cleanup in this database, and how many xids were
# assigned after it. Sessions of other databases do not hold back this one's tables;
# backends without a database (walsenders, with hot_standby_feedback) and physical slots do.
# A session idle in a READ COMMITTED write transaction shows only its backend_xid. Lazy
# VACUUM shows a backend_xmin the horizon ignores: its backends are left out.
OLDEST_XMIN = (
    "SELECT h.x::text, age(h.x) FROM ("
    " SELECT unnest(ARRAY[backend_xmin, backend_xid]) AS x FROM pg_stat_activity"
    "  WHERE (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)"
    "  AND (datname = current_database() OR datname IS NULL)"
    "  AND pid NOT IN (SELECT pid FROM pg_stat_progress_vacuum)"
    " UNION ALL SELECT xmin FROM pg_replication_slots WHERE xmin IS NOT NULL"
    "  AND (database = current_database() OR database IS NULL)"
    " UNION ALL SELECT transaction FROM pg_prepared_xacts WHERE database = current_database()) h"
    " WHERE h.x IS NOT NULL ORDER BY age(h.x) DESC LIMIT 1"
)
# What makes the watch give up (it then never reports a held horizon): a server without
# these views, or a role refused them. Maintenance must go on without it.
UNSUPPORTED = (
    psycopg.errors.InsufficientPrivilege, psycopg.errors.UndefinedTable, psycopg.errors.UndefinedFunction,
    psycopg.errors.UndefinedColumn, psycopg.errors.FeatureNotSupported,
)

HELD_AFTER = 5.0


class HorizonWatch:
    name = "horizon"
    leader_only = False  # every worker decides its own claims

    def __init__(self, *, held_after: float = HELD_AFTER) -> None:
        self.held_after = held_after
        self.held = False
        self._oldest: Optional[str] = None
        self._age_at_first_sight = 0
        self._since = 0.0
        self._report = hook(None, "horizon_held")
        self.disabled = False
        self.statement = OLDEST_XMIN  # a seam: tests point it at a missing view

    def bind_observer(self, observer: Any) -> None:
        self._report = hook(observer, "horizon_held")

    def held_for(self) -> float:
        """Seconds the current oldest xid has held the horizon (0 while it is not held)."""
        return time.monotonic() - self._since if self.held else 0.0

    async def run_once(self, conn: Any, queries: Queries) -> None:
        if self.disabled:
            return
        try:
            row = await (await conn.execute(self.statement, prepare=True)).fetchone()
        except UNSUPPORTED as exc:
            # The connection is in autocommit: the failed statement leaves it usable.
            self.disabled, self.held = True, False
            log.warning("cannot read the xmin horizon (%s: %s); claims will not adapt to a held one",
                        type(exc).__name__, exc.diag.message_primary)
            self._report(0.0)
            return
        now = time.monotonic()
        if row is None or row[0] != self._oldest:
            if self.held:
                log.info("xmin horizon released (it had stayed at xid %s for %.0f s); claims read the queue"
                         " from its start again", self._oldest, now - self._since)
            self._oldest, self._age_at_first_sight, self._since = (row[0], row[1], now) if row else (None, 0, now)
            self.held = False
        elif not self.held and now - self._since >= self.held_after and row[1] > self._age_at_first_sight:
            self.held = True
            log.warning("xmin horizon held at xid %s for %.0f s (%d xids since): a long transaction, a session idle"
                        " in transaction or a replication slot keeps VACUUM from removing claimed jobs; claims"
                        " resume past their last batch until it moves", self._oldest, now - self._since, row[1])
        self._report(self.held_for())
