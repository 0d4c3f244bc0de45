"""Periodic (cron) jobs, declared in code and fired by the elected leader, each slot once.

::

    from sa_jobs.periodic import Periodic, PeriodicJobs

    digest = Periodic("0 9 * * *", SendDigest, args={"scope": "daily"}, timezone="Europe/Paris")
    async with Worker(url, kinds=[SendDigest], maintenance=[PeriodicJobs([digest])]):
        ...

or, for ``sa-jobs worker myapp.jobs``, a module attribute ``SA_JOBS_PERIODIC = [digest]``.

A *slot* is a time the cron expression names, in the declaration's time zone (croniter
does the calendar arithmetic, DST included). Every leader tick, in one transaction per
declaration: lock its row of ``<schema>.periodic`` (``FOR UPDATE``), read the database
clock, insert one job per due slot, and move ``last_slot`` forward. The row lock and
``last_slot`` (a slot at or before it is never due again) make a slot fire at most once,
even across leader changes and a frozen ex-leader. A kind without ``unique=`` adds a
second guarantee, the job's ``unique_key`` ``periodic:<name>:<slot>``, unique in every
state. A kind with ``unique=`` keeps its own key and states instead (users of Oban and
River expect a kind declared unique to stay unique when a cron fires it): a slot whose
key is held is skipped, logged, and not retried.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import re
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Optional, Sequence, Union

import anyio
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from . import _validate
from .errors import ConfigurationError, InvalidArgsError
from .events import hook
from .maintenance.leader import TickBudget, idle_limit
from .model import Job
from .queries import RESCUE_LOCK_TIMEOUT
from .schema import JOBS_TABLE, PERIODIC_TABLE, UNIQUE_PREDICATE
from .states import ALL_STATES
from .unique import key_sql

log = logging.getLogger("sa_jobs.periodic")

DEFAULT_MAX_CATCH_UP = 100

# Bound on the forward walk's steps beyond ``limit`` (see Periodic._slots): the slots that
# get_prev() skips, i.e. the second occurrences of a repeated (fall-back) hour, at most
# 3,600 for an every-second schedule; twice that for a two-hour shift, with room to spare.
_WALK_SLACK = 10_000

_UTC = dt.timezone.utc

# Bound on the on-time slots of one tick (see Periodic.due_slots): an every-second schedule
# with a grace of almost three hours.
_MAX_ON_TIME = 10_000

# The Maintainer's defaults (interval, timeout), for a PeriodicJobs it has not bound.
_DEFAULT_TICK = (1.0, 10.0)

# Slots inserted per pipelined statement batch of a catch-up (see PeriodicJobs.fire).
_INSERT_BATCH = 500

JobSpec = Union[type[Job], Job, Callable[[], Job]]


# A field croniter fills with a random value ("R", "R(0-29)", "R/15"): drawn again for every
# iterator, so for every computation of the slots. ("H", hashed, needs a hash_id: invalid here.)
_RANDOM_FIELD = re.compile(r"r(\(\d+-\d+\))?(/\d+)?", re.IGNORECASE)


def _parse_cron(expression: str) -> None:
    from croniter import croniter

    if not isinstance(expression, str) or not croniter.is_valid(expression):
        raise ConfigurationError(
            f"invalid cron expression {expression!r}: use 5 fields (minute hour day month weekday)"
            " or 6 (with seconds last)"
        )
    if any(_RANDOM_FIELD.fullmatch(f) for f in expression.split()):
        # Slots would move at every leader tick (and differ between leaders): a daily
        # "R 9 * * *" fired about a dozen times a day.
        raise ConfigurationError(
            f"cron expression {expression!r} has a random ('R') field, which croniter draws anew at"
            " every evaluation: write the value itself"
        )


def _seconds_first_suspect(expression: str) -> Optional[str]:
    """A warning for a 6-field expression that reads as "seconds first" (Quartz, Spring)
    but fires every second of some minutes, because croniter takes the seconds LAST:
    ``"*/2 * * * * *"`` is every second of every even minute, not every 2 seconds."""
    fields = expression.split()
    if len(fields) != 6 or fields[5] != "*" or fields[0] == "*":
        return None
    return (f"cron {expression!r} fires every second of the minutes {fields[0]!r} (60 slots, then none"
            f" until the next such minute): with 6 fields the seconds are the LAST field; every N"
            f" seconds is '* * * * * */N'")


def _fall_back_near(tz: dt.tzinfo, at: dt.datetime) -> Optional[tuple[dt.datetime, dt.timedelta]]:
    """The fall-back within three hours of ``at``, if any: the instant (UTC) its clocks go
    back, and by how much. (No zone has moved its clocks twice within six hours.)"""
    lo, hi = at - dt.timedelta(hours=3), at + dt.timedelta(hours=3)
    before, after = lo.astimezone(tz).utcoffset(), hi.astimezone(tz).utcoffset()
    assert before is not None and after is not None
    if after >= before:
        return None
    while hi - lo > dt.timedelta(microseconds=1):  # the first instant with the later offset
        mid = lo + (hi - lo) / 2
        if mid.astimezone(tz).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return hi, before - after


def _before(now: dt.datetime, grace: dt.timedelta) -> dt.datetime:
    """``grace`` before ``now``, in UTC. Subtracted from ``now`` as given, it is wall-clock
    arithmetic in ``now``'s zone (PEP 495): the database clock comes back in the session's
    TimeZone, and during a fall-back's repeated hour there it landed an hour early."""
    return now.astimezone(_UTC) - grace


# Files of the zone directory that zoneinfo loads but that name no zone of their own:
# "localtime" links to the host's /etc/localtime, so every worker fired the schedule in
# its own host's zone; "posixrules" is whichever zone the data's build chose (and absent
# from the tzdata package), so a declaration loaded on one host and failed on another.
_HOST_ALIASES = frozenset({"localtime", "posixrules"})


def _zone(name: str) -> dt.tzinfo:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"invalid time zone {name!r}: use an IANA name such as 'Europe/Paris'")
    if name in _HOST_ALIASES:
        raise ConfigurationError(f"time zone {name!r} is the host's, not an IANA name: every worker would read its"
                                 " own; name the zone, such as 'Europe/Paris'")
    try:
        return ZoneInfo(name)
    # OSError: a directory of the zone database ("Europe"), or a name too long for a file.
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigurationError(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris'") from None


@dataclass(frozen=True)
class Periodic:
    """A job to enqueue at every slot of a cron expression.

    ``job`` is a kind (with ``args``), a job row to copy, or a callable returning a fresh
    row. ``name`` identifies the schedule (its row in ``<schema>.periodic`` and its slots'
    unique keys); it defaults to the kind's name when ``job`` is a kind. Every slot of a
    live leader fires, however many fall between two of its ticks. ``catch_up`` governs
    slots *missed*, later than the grace (two maintenance intervals plus tick deadlines)
    because no leader ticked: with it, they fire too (at most ``max_catch_up``, the most
    recent); without it only the most recent missed slot fires, late, and then only if no
    slot is on time. A schedule seen for the first time starts at its next slot.

    ``cron`` has 5 fields (minute hour day month weekday) or 6 with the **seconds last**
    (croniter's order): every 10 seconds is ``"* * * * * */10"``; ``"*/10 * * * * *"`` is
    every second of every tenth minute, and is logged as a likely mistake. A 7th field
    (years) bounds the schedule: its first and last slots fire, then it stays quiet.

    A kind declared ``unique=`` stays unique: each slot's job carries the kind's own
    ``unique_key`` and ``unique_states`` (as ``session.add()`` computes them, a period's
    bucket from the firing transaction's ``now()``). A slot whose key is held (an app's
    job, or an earlier slot's still waiting or running) enqueues nothing; it is logged and
    ``last_slot`` moves past it, so it is not retried. ``on_conflict="replace"`` is not
    applied: the slot is skipped, the waiting job left as it is. Other kinds get the
    key ``periodic:<name>:<slot>``, held in every state.
    """

    cron: str
    job: JobSpec
    args: Optional[Mapping[str, Any]] = None
    name: Optional[str] = None
    timezone: str = "UTC"
    catch_up: bool = False
    max_catch_up: int = DEFAULT_MAX_CATCH_UP
    _tz: dt.tzinfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _parse_cron(self.cron)
        object.__setattr__(self, "_tz", _zone(self.timezone))
        self._check_fires()
        job = self.job
        if isinstance(job, type):
            if not issubclass(job, Job) or job.__sa_jobs_options__ is None:
                raise ConfigurationError(f"Periodic job= takes a job kind, a job row or a factory, not {job!r}")
            if job.__sa_jobs_abstract__:  # else SQLAlchemy's InvalidRequestError from job(**args)
                raise ConfigurationError(f"Periodic job= takes a job kind, not {job.__name__}, an abstract base of kinds")
            if self.args is not None and (not isinstance(self.args, Mapping)
                                          or not all(isinstance(k, str) for k in self.args)):
                # dict() then **: ValueError or TypeError, not the kind's own InvalidArgsError.
                raise InvalidArgsError(f"periodic job {self.name or job.__name__!r}: args must be a mapping of"
                                       f" names to JSON values, not {self.args!r}")
            # Build one row now: bad args fail at declaration, not at 9 am.
            job(**dict(self.args or {}))
            if self.args is not None:
                # Its own copy of the args checked: kept by reference, a dict changed after the
                # declaration (one dict reused by declarations built in a loop) reached every slot.
                object.__setattr__(self, "args", copy.deepcopy(dict(self.args)))
            if self.name is None:
                object.__setattr__(self, "name", job.__sa_jobs_options__.kind)
        elif isinstance(job, Job):
            if self.args is not None:
                raise ConfigurationError("Periodic(args=...) goes with a job kind, not with a job row")
            self._check_row(job, self.name or "?")
        elif callable(job):
            if self.args is not None:
                raise ConfigurationError("Periodic(args=...) goes with a job kind, not with a factory")
        else:
            raise ConfigurationError(f"Periodic job= takes a job kind, a job row or a factory, not {job!r}")
        if self.name is None:
            raise ConfigurationError("Periodic(name=...) is required unless job= is a job kind")
        _validate.kind_name(self.name)
        if type(self.catch_up) is not bool:
            raise ConfigurationError("catch_up must be a bool")
        if type(self.max_catch_up) is not int or not 1 <= self.max_catch_up <= 10_000:
            raise ConfigurationError(f"max_catch_up must be an int in 1..10000, not {self.max_catch_up!r}")
        suspect = _seconds_first_suspect(self.cron)
        if suspect is not None:
            log.warning("periodic %r: %s", self.name, suspect)

    def build(self) -> Job:
        """A fresh job row for one slot."""
        job = self.job
        if isinstance(job, type):
            return job(**dict(self.args or {}))
        if isinstance(job, Job):
            return job
        built = job()
        if not isinstance(built, Job) or type(built).__sa_jobs_options__ is None:
            raise ConfigurationError(f"the factory of periodic job {self.name!r} returned {built!r}, not a job row")
        self._check_row(built, self.name or "?")
        return built

    @staticmethod
    def _check_row(job: Job, name: str) -> None:
        """Refuse a row with ``options(delay=...)``: its schedule is a SQL ``now() + delay``
        that the slot's insert cannot carry, so every slot failed, each tick, with a message
        about enqueue_many. A job row is checked at declaration, a factory's at each slot."""
        scheduled = job.__dict__.get("scheduled_at")
        if scheduled is not None and not isinstance(scheduled, dt.datetime):
            raise ConfigurationError(
                f"periodic job {name!r}: a row with options(delay=...) cannot be enqueued for a slot;"
                " the slot is its time (move the cron expression instead)"
            )

    def _check_fires(self) -> None:
        """Refuse an expression croniter accepts but that names no date ("0 0 31 2 *"):
        it would fail every leader tick, forever. One whose year field has ended has dates,
        all past: it is declared and stays quiet (refused, it made the app's module fail
        at import from the day after its last slot)."""
        from croniter import CroniterBadDateError

        now = dt.datetime.now(_UTC)
        try:
            self.next_slot(now)
        except CroniterBadDateError:
            past = self._slots(None, now, 1)
            if not past:
                raise ConfigurationError(
                    f"cron expression {self.cron!r} never fires (no date matches it, e.g. 31 February)"
                ) from None
            log.warning("periodic cron %r: its last slot, %s, has passed; it fires no more", self.cron,
                        past[-1].isoformat())

    def due_slots(self, last_slot: dt.datetime, now: dt.datetime,
                  grace: dt.timedelta = dt.timedelta(0)) -> list[dt.datetime]:
        """Slots in ``(last_slot, now]``, oldest first.

        Those later than ``now - grace`` are on time: a live leader's slots since its last
        tick (a schedule can be more frequent than the tick), all due whatever ``catch_up``
        says; before, each tick fired only its most recent slot and a healthy leader ticking
        every 10 s dropped every other slot of an every-5-s schedule. The older ones were
        missed (no leader ticked for longer than the grace): with catch-up, the most recent
        ``max_catch_up`` slots are due (on-time ones included); without it, only the most
        recent slot, late, when none is on time.
        """
        limit = self.max_catch_up if self.catch_up else 1
        # In UTC: aware datetimes sharing a ZoneInfo compare by wall time (see _slots).
        cut = max(last_slot.astimezone(_UTC), _before(now, grace))
        on_time = self._slots(cut, now, _MAX_ON_TIME) if cut < now.astimezone(_UTC) else []
        if len(on_time) >= limit:
            return on_time
        return self._slots(last_slot, now, limit)

    @property
    def schedule(self) -> str:
        """What decides the slots (the expression and the time zone), as the periodic
        table records it: a row fired for another schedule was edited, not left idle."""
        return " ".join(self.cron.split()) + " " + self.timezone

    def restart_point(self, last_slot: dt.datetime, now: dt.datetime, grace: dt.timedelta) -> dt.datetime:
        """The ``last_slot`` of a schedule edited since ``last_slot`` fired: its slots on
        time (within ``grace`` of ``now``) are due, none from before, whatever ``catch_up``
        says. The edit is not downtime; counted from the old ``last_slot``, changing
        "0 0 * * *" to "*/5 * * * *" at noon fired the 100 most recent of 144 "missed" slots."""
        restart = self.latest_slot(_before(now, grace))
        return max(last_slot, restart, key=lambda t: t.astimezone(_UTC))

    def is_due(self, last_slot: dt.datetime, now: dt.datetime) -> bool:
        """Whether a slot falls in ``(last_slot, now]``: :meth:`due_slots` is then not empty."""
        return bool(self._slots(last_slot, now, 1))

    def latest_slot(self, now: dt.datetime) -> dt.datetime:
        """The last slot at or before ``now`` (``now`` itself before a year field's first slot)."""
        slots = self._slots(None, now, 1)
        return slots[-1] if slots else now

    def _slots(self, after: Optional[dt.datetime], now: dt.datetime, limit: int) -> list[dt.datetime]:
        """The last ``limit`` slots in ``(after, now]`` (``after=None``: unbounded), oldest first.

        The slots come from croniter's forward iteration, the one that is right across a
        fall-back: get_next() yields both occurrences of a repeated wall time, while
        get_prev() maps it to its first occurrence only (so a leader that fired 02:30 CEST
        saw 02:00 and 02:30 CET as "at or before last_slot" and skipped them). get_prev()
        only picks where to start walking: its k-th answer back from ``now`` is at or
        before the k-th slot back (it can skip slots, never invent later ones), so the
        walk from its (limit+1)-th answer, or from ``after`` when it reaches it first,
        covers the last ``limit`` slots in at most ``limit`` + (skipped slots) steps, however
        long the downtime. Compared in UTC: aware datetimes sharing a ZoneInfo compare by
        wall time, which cannot tell the two occurrences of a repeated hour apart.
        """
        from croniter import CroniterBadDateError, croniter

        now_utc = now.astimezone(_UTC)
        after_utc = None if after is None else after.astimezone(_UTC)
        # get_prev() is strictly before its start: start a microsecond past now so a slot
        # exactly at now is due.
        back = croniter(self.cron, now.astimezone(self._tz) + dt.timedelta(microseconds=1))
        start = after_utc
        found = False
        for _ in range(limit + 1):
            try:
                slot = back.get_prev(dt.datetime).astimezone(_UTC)
            except CroniterBadDateError:
                # No earlier slot: a year field's first year. Walk from just before the
                # earliest slot found (nothing lies before it), or from ``after``.
                if not found:
                    return []
                assert start is not None
                start = after_utc if after_utc is not None else start - dt.timedelta(seconds=1)
                break
            if after_utc is not None and slot <= after_utc:
                start = after_utc
                break
            start, found = slot, True
        assert start is not None
        forward = croniter(self.cron, start.astimezone(self._tz))  # get_next() is strictly after
        slots: deque[dt.datetime] = deque(maxlen=limit)
        newest = start
        for _ in range(limit + _WALK_SLACK):
            try:
                slot = forward.get_next(dt.datetime)
            except CroniterBadDateError:  # no later slot: a year field's last year has passed
                break
            slot_utc = slot.astimezone(_UTC)
            if slot_utc > now_utc:
                break
            if slot_utc > newest:  # strictly increasing in absolute time, whatever croniter does
                slots.append(slot)
                newest = slot_utc
        else:
            # Not reached (see _WALK_SLACK); the slots kept are then not the latest ones, and
            # the next tick walks on from them: late, never twice.
            log.warning("periodic %r: the slots up to %s took over %d steps; walking on next tick",
                        self.name, now.isoformat(), limit + _WALK_SLACK)
            now_utc = newest
        by_instant = {s.astimezone(_UTC): s for s in self._second_passes(list(slots), start, now_utc)}
        by_instant.update((s.astimezone(_UTC), s) for s in slots)
        return [by_instant[k] for k in sorted(by_instant)[-limit:]]

    def _second_passes(self, walked: list[dt.datetime], start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
        """Slots in ``(start, end]`` that fall in the second pass of a repeated wall time
        and that croniter's forward walk may skip.

        Across a half-hour fall-back (Australia/Lord_Howe, 02:00 becomes 01:30) get_next()
        yields 01:30-02:00 once, the first time, and get_prev() inside the second pass
        answers the first one: a catching-up leader fired neither. Each walked slot at a
        repeated wall time has a twin in the second pass; a walk that starts between the
        two passes has seen neither, so that fall-back's second pass is enumerated in wall
        time.
        """
        from croniter import CroniterBadDateError, croniter

        tz = self._tz
        found = []
        for slot in walked:
            twin = slot.replace(fold=1).astimezone(_UTC)
            if twin.astimezone(tz).replace(tzinfo=None) == slot.replace(tzinfo=None, fold=0) and start < twin <= end:
                found.append(twin.astimezone(tz))
        back = _fall_back_near(tz, start)
        if back is not None:
            at, shift = back
            if at - shift <= start < at + shift:
                first_wall = at.astimezone(tz).replace(tzinfo=None)
                walls = croniter(self.cron, first_wall - dt.timedelta(microseconds=1))
                try:
                    while (wall := walls.get_next(dt.datetime)) < first_wall + shift:
                        slot = at + (wall - first_wall)
                        if start < slot <= end:
                            found.append(slot.astimezone(tz))
                except CroniterBadDateError:  # a year field's last year has passed
                    pass
        return found

    def next_slot(self, now: dt.datetime) -> dt.datetime:
        """The first slot strictly after ``now``."""
        from croniter import croniter

        return croniter(self.cron, now.astimezone(self._tz)).get_next(dt.datetime)

    def first_slot_after(self, now: dt.datetime) -> str:
        """:meth:`next_slot` for a log line: "none" once a year field's last slot has passed."""
        from croniter import CroniterBadDateError

        try:
            return self.next_slot(now).isoformat()
        except CroniterBadDateError:
            return "none (its last year has passed)"

    def unique_key(self, slot: dt.datetime) -> str:
        assert self.name is not None  # set or refused by __post_init__
        return "periodic:" + self.name + ":" + slot.astimezone(dt.timezone.utc).isoformat()


# The slot's key: the kind's own when it declares unique= (its base key, plus with a
# period the bucket of now(), computed as every enqueue path computes it), else
# ``periodic:<name>:<slot>``. A held key skips the slot, whatever the kind's on_conflict.
_INSERT_JOB = (
    "INSERT INTO {jobs} (kind, queue, args, state, priority, max_attempts, tags, meta, partition_key,"
    " scheduled_at, unique_key, unique_states)"
    " VALUES (%(kind)s, %(queue)s, %(args)s::jsonb, %(state)s, %(priority)s, %(max_attempts)s, %(tags)s,"
    " %(meta)s::jsonb, %(partition_key)s, coalesce(%(scheduled_at)s::timestamptz, now()),"
    " " + key_sql("%(unique_key)s::text", "%(period)s::bigint") + ","
    " %(unique_states)s)"
    " ON CONFLICT (kind, unique_key) WHERE {predicate} DO NOTHING RETURNING id"
)

# Skipped slots named in full in the log line (a long catch-up of a unique kind skips all but one).
_LOGGED_SKIPS = 5

# A firing's transaction, sent as statements: psycopg's transaction() in pipeline mode
# syncs after BEGIN and before COMMIT (a round trip each), so that errors surface inside it.
_BEGIN = sql.SQL("BEGIN")
# Sent with the inserts, after the row lock is held (waiting on a racing leader's firing
# is the guarantee): an insert of a unique kind whose key an app's transaction has
# inserted and not committed waits on that transaction, which failed the whole tick at
# its statement deadline, every tick, dropping leadership while the transaction lasted.
_INSERT_LOCK_TIMEOUT = sql.SQL("SELECT set_config('lock_timeout', {}, true)").format(
    sql.Literal(RESCUE_LOCK_TIMEOUT))
_COMMIT = sql.SQL("COMMIT")
# A plain statement after the tick's firings. psycopg ends a pipeline with a Sync and then
# a Flush request, and a backend that reads a message after its Sync's ReadyForQuery
# disarms its idle timeouts until the next Sync: a maintainer frozen after a firing (until
# its next tick) kept its session, and the leader lock, past its idle limit for good.
_REARM = sql.SQL("SELECT 1")
_ROLLBACK = sql.SQL("ROLLBACK")


class _NoPipeline:
    """Where libpq has no pipeline mode (before 14): each statement is its own round trip."""

    async def sync(self) -> None:
        pass


@asynccontextmanager
async def _pipeline(conn: Any) -> AsyncIterator[Any]:
    if psycopg.AsyncPipeline.is_supported():
        async with conn.pipeline() as pipeline:
            yield pipeline
    else:
        yield _NoPipeline()


async def _fetchone(conn: Any, pipeline: Any, statement: sql.Composable,
                    params: Optional[Mapping[str, Any]] = None) -> Any:
    """One row of ``statement``; in a pipeline, a round trip (a Sync) for everything sent so far.

    A Sync, not a cursor's flush: between a pipeline's statements until its Sync a backend
    arms none of its timeouts (it reads 'active'), so a maintainer frozen there (SIGSTOP
    while it builds a slot's job) kept its session, the leader lock and the periodic row
    locked for good. After a Sync it is idle in a transaction, which the maintainer's
    session bounds (leader.idle_limit)."""
    cur = conn.cursor()
    await cur.execute(statement, params)
    await pipeline.sync()
    return await cur.fetchone()


class PeriodicJobs:
    """The leader-only maintenance service that fires :class:`Periodic` declarations:
    ``Worker(..., maintenance=[PeriodicJobs([...])])``."""

    name = "periodic"
    leader_only = True

    def __init__(self, periodics: Sequence[Periodic]) -> None:
        periodics = list(periodics)
        names: set[str] = set()
        for p in periodics:
            if not isinstance(p, Periodic):
                raise ConfigurationError(f"PeriodicJobs takes Periodic declarations, not {p!r}")
            if p.name in names:
                raise ConfigurationError(f"two periodic jobs are named {p.name!r}; names must be unique")
            names.add(p.name)  # type: ignore[arg-type]
        self.periodics = periodics
        self._sql: dict[str, dict[str, sql.Composable]] = {}
        self._enqueued = hook(None, "periodic_enqueued")
        self.grace = self._grace(*_DEFAULT_TICK)
        self._build_seconds = self._build_time(*_DEFAULT_TICK)
        self._pipelined = False  # whether this run's firings ended a pipeline (see _REARM)

    def bind_observer(self, observer: Any) -> None:
        self._enqueued = hook(observer, "periodic_enqueued")

    def bind_tick(self, interval: float, timeout: float) -> None:
        """Called by the Maintainer with its tick's interval and deadline: they set the grace."""
        self.grace = self._grace(interval, timeout)
        self._build_seconds = self._build_time(interval, timeout)

    @staticmethod
    def _build_time(interval: float, timeout: float) -> float:
        """How long a firing builds rows (the factory's work) before it sends them: the
        backend waits meanwhile idle in the firing's transaction, and the server ends the
        maintainer's session once it has been so for its idle limit (leader.idle_limit).
        A quarter of it leaves room for a slow event loop around the build."""
        return idle_limit(interval, timeout) / 4

    @staticmethod
    def _grace(interval: float, timeout: float) -> dt.timedelta:
        """How late a slot may be and still count as on time (see Periodic.due_slots): two
        tick periods of a live leader, each at most ``interval`` plus a tick that ran until
        its deadline; two because a failed tick drops leadership until the next one."""
        return dt.timedelta(seconds=2 * (interval + timeout))

    def _statements(self, schema: str) -> dict[str, sql.Composable]:
        found = self._sql.get(schema)
        if found is None:
            jobs = sql.Identifier(schema, JOBS_TABLE)
            table = sql.Identifier(schema, PERIODIC_TABLE)
            found = self._sql[schema] = {
                "now": sql.SQL("SELECT now()"),
                "table": table,
                "register": sql.SQL(
                    "INSERT INTO {} (name, last_slot, schedule) VALUES (%(name)s, %(slot)s, %(schedule)s)"
                    " ON CONFLICT (name) DO NOTHING RETURNING name"
                ).format(table),
                "advance": sql.SQL(
                    "UPDATE {} SET last_slot = %(slot)s, schedule = %(schedule)s, updated_at = now()"
                    " WHERE name = %(name)s"
                ).format(table),
                "insert": sql.SQL(_INSERT_JOB).format(jobs=jobs, predicate=sql.SQL(UNIQUE_PREDICATE)),
            }
        return found

    async def run_once(self, conn: Any, queries: Any) -> None:
        statements = self._statements(queries.schema)
        self._pipelined = False
        await self._fire_all(conn, statements)
        if self._pipelined:
            await conn.execute(_REARM)

    async def _fire_all(self, conn: Any, statements: Mapping[str, sql.Composable]) -> None:
        for periodic in self.periodics:
            try:
                ids = await self.fire(conn, statements, periodic)
            except psycopg.errors.LockNotAvailable:
                # A slot's insert waited on an app's transaction past _INSERT_LOCK_TIMEOUT:
                # it rolled back, so the slot stays due; the other schedules go on.
                log.warning("periodic %r: a transaction not yet committed holds a job of its unique key; its"
                            " slot waits for the next tick", periodic.name)
            except (psycopg.DataError, psycopg.IntegrityError):
                # The row itself is refused (a value PostgreSQL cannot store): like a broken
                # factory, not the connection's fault, so it must not fail the whole tick
                # (and leadership) at every tick. Its transaction rolled back.
                log.exception("periodic job %r: its row was refused; retrying next tick", periodic.name)
            except psycopg.Error:
                raise  # the maintainer reconnects and retries
            except Exception:  # noqa: BLE001 - a broken factory is the user's bug
                # It must not stop the other schedules (or cost leadership); its
                # transaction rolled back, so its slot stays due and is retried next tick.
                log.exception("periodic job %r could not be built; retrying next tick", periodic.name)
            else:
                if ids:  # counted once committed: fire() returns after its transaction
                    self._enqueued(periodic.name, len(ids))

    async def fire(self, conn: Any, statements: Mapping[str, sql.Composable], periodic: Periodic) -> list[int]:
        """Enqueue ``periodic``'s due slots in one transaction; the new job ids.

        A tick lasts as long as its round trips, and the next tick's rescue and promotion
        wait for it. A registered declaration with no slot due (most ticks) stops after one
        unlocked read of the clock and its last slot (the transaction was 5 round trips even
        then). A firing sends BEGIN with the locking read of the clock and the last slot,
        then the inserts, the advance and COMMIT together (pipeline mode): 3 round trips
        with the peek, 9 before (4.5 s at +500 ms RTT, so a leader whose schedule was due
        every tick ticked every 6 s and skipped slots of a frequent schedule)."""
        # Composed from statements["now"], so that the clock read is the one the
        # statements give (tests give a fixed one).
        peek = sql.SQL("SELECT ({}), last_slot, schedule FROM {} WHERE name = %(name)s").format(
            statements["now"], statements["table"])
        row = await (await conn.execute(peek, {"name": periodic.name})).fetchone()
        if row is not None and row[2] == periodic.schedule and not periodic.is_due(row[1], row[0]):
            return []
        self._pipelined = self._pipelined or psycopg.AsyncPipeline.is_supported()
        try:
            async with _pipeline(conn) as pipeline:
                firing = await self._fire_locked(conn, pipeline, statements, periodic, row is not None,
                                                 sql.SQL("{} FOR UPDATE").format(peek))
        except Exception:
            # Pipelined, an error surfaces at the Sync, after COMMIT was sent and skipped:
            # the transaction is left open (failed), which every later statement would fail on.
            if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                await conn.execute(_ROLLBACK)
            raise
        return await self._report(periodic, *firing) if firing is not None else []

    async def _fire_locked(self, conn: Any, pipeline: Any, statements: Mapping[str, sql.Composable],
                           periodic: Periodic, seen: bool, lock: sql.Composable,
                           ) -> Optional[tuple[dt.datetime, list[dt.datetime], list[tuple[dt.datetime, Any]]]]:
        """The transaction of :meth:`fire`, in ``pipeline``: each statement is only sent,
        and a result read (or a Sync) is a round trip. None when it registered the
        declaration; else the clock, the due slots, and each slot inserted with its
        cursor, whose result is there once the pipeline has ended (committed)."""
        name = {"name": periodic.name, "schedule": periodic.schedule}
        await conn.execute(_BEGIN)
        row = await _fetchone(conn, pipeline, lock, name) if seen else None
        if row is None:
            now = (await _fetchone(conn, pipeline, statements["now"]))[0]
            if await _fetchone(conn, pipeline, statements["register"],
                               {**name, "slot": periodic.latest_slot(now)}) is not None:
                # First sighting: the schedule starts at its next slot (logged, so a slot
                # far later than the author expected is visible at once).
                log.info("periodic %r registered; its first slot is %s", periodic.name, periodic.first_slot_after(now))
                await conn.execute(_COMMIT)
                return None
            row = await _fetchone(conn, pipeline, lock, name)  # registered meanwhile by another leader
        now, last_slot, schedule = row
        edited = schedule != periodic.schedule
        if edited and schedule is not None:  # NULL: fired before the column existed; adopted
            last_slot = periodic.restart_point(last_slot, now, self.grace)
            log.info("periodic %r: schedule changed from %r to %r; slots before %s are not caught up",
                     periodic.name, schedule, periodic.schedule, _before(now, self.grace).isoformat())
        due = periodic.due_slots(last_slot, now, self.grace)
        # A long catch-up (up to 10,000 slots) is inserted in pipelined batches, within
        # this declaration's share of the tick: one statement per slot outlived the
        # tick's deadline, which rolled it all back and began it again every tick, so
        # the schedule never fired again. last_slot moves to the last slot inserted;
        # the rest are due at the next tick. The last batch goes with the advance and COMMIT.
        # Each batch's rows (the factory's work) are built before any of its statements is
        # sent, so the backend waits between a Sync and the next statements, where its
        # idle limit holds (see _fetchone), not between two statements of the pipeline.
        budget = TickBudget()
        inserted: list[tuple[dt.datetime, Any]] = []
        while len(inserted) < len(due):
            started = anyio.current_time()
            batch = self._build(periodic, due[len(inserted):len(inserted) + _INSERT_BATCH])
            if not inserted:
                await conn.execute(_INSERT_LOCK_TIMEOUT)
            for slot, params in batch:
                cur = conn.cursor()  # one per slot: a cursor keeps one pipelined result
                await cur.execute(statements["insert"], params)
                inserted.append((slot, cur))
            if len(inserted) == len(due):
                break
            await pipeline.sync()
            if budget.spent(anyio.current_time() - started):
                break
        if inserted or edited:
            await conn.execute(statements["advance"], {**name, "slot": inserted[-1][0] if inserted else last_slot})
        await conn.execute(_COMMIT)
        return now, due, inserted

    async def _report(self, periodic: Periodic, now: dt.datetime, due: list[dt.datetime],
                      inserted: list[tuple[dt.datetime, Any]]) -> list[int]:
        """The committed firing's job ids, logged."""
        ids: list[int] = []
        skipped: list[dt.datetime] = []
        for slot, cur in inserted:  # empty where the slot's key was taken
            rows = await cur.fetchall()
            if rows:
                ids += [row[0] for row in rows]
            else:
                skipped.append(slot)
        if inserted:
            slots = [slot for slot, _ in inserted]
            late = not periodic.catch_up and slots[0].astimezone(_UTC) <= _before(now, self.grace)
            skipped_late = " (late: the missed slots before it skipped)" if late else ""
            later = f"; {len(due) - len(slots)} more at the next tick" if len(slots) < len(due) else ""
            log.info("periodic %r: enqueued %d job(s) for %d slot(s), last %s%s%s", periodic.name, len(ids),
                     len(slots), slots[-1].isoformat(), skipped_late, later)
            if skipped:
                # Not retried (last_slot moved past them): the kind's unique key was held, by
                # a job still in its unique states (or, for a kind without unique=, the slot
                # had fired before last_slot was rewound).
                more = f" and {len(skipped) - _LOGGED_SKIPS} more" if len(skipped) > _LOGGED_SKIPS else ""
                log.info("periodic %r: skipped %d slot(s) whose unique key was held: %s%s", periodic.name,
                         len(skipped), ", ".join(s.isoformat() for s in skipped[:_LOGGED_SKIPS]), more)
        return ids

    def _build(self, periodic: Periodic, slots: list[dt.datetime]) -> list[tuple[dt.datetime, dict[str, Any]]]:
        """The rows of the first of ``slots`` (at least one) that are built within the
        build time (see _build_time): 500 slots of a factory taking 20 ms a call kept the
        backend idle in the firing's transaction past the idle limit (10 s), the server
        ended the leader's session, and every tick began the same batch again: the schedule
        never fired again."""
        started = time.monotonic()
        rows: list[tuple[dt.datetime, dict[str, Any]]] = []
        for slot in slots:
            rows.append((slot, self._params(periodic, slot)))
            if time.monotonic() - started >= self._build_seconds:
                break
        return rows

    @staticmethod
    def _params(periodic: Periodic, slot: dt.datetime) -> dict[str, Any]:
        from .enqueue import _kind_of_row, _row_of

        job = periodic.build()
        kind, queue, args, state, priority, max_attempts, tags, meta, partition_key, scheduled_at = _row_of(job)
        meta_dict = json.loads(meta)
        meta_dict.update(periodic=periodic.name, slot=slot.isoformat())
        unique = _kind_of_row(job).unique
        if unique is None:
            key, period, states = periodic.unique_key(slot), None, list(ALL_STATES)
        else:
            # The kind's own key, as session.add and enqueue_many compute it (from the row's
            # final queue and args; the bucket of a period is added in SQL, from now()).
            key = unique.base_key(kind, queue, json.loads(args))
            period, states = unique.period_seconds, list(unique.states)
        return {
            "kind": kind, "queue": queue, "args": args, "state": state, "priority": priority,
            "max_attempts": max_attempts, "tags": tags, "meta": json.dumps(meta_dict), "partition_key": partition_key,
            "scheduled_at": scheduled_at, "unique_key": key, "period": period, "unique_states": states,
        }


def collect(modules: Sequence[Any]) -> list[Periodic]:
    """The ``SA_JOBS_PERIODIC`` declarations of imported modules (for ``sa-jobs worker``),
    each once: a module that star-imports another, or one named twice, showed the worker
    the same declaration twice, which PeriodicJobs refused as two schedules of one name."""
    found: list[Periodic] = []
    for module in modules:
        declared = getattr(module, "SA_JOBS_PERIODIC", None)
        if declared is None:
            continue
        if isinstance(declared, Periodic):
            declared = [declared]
        for p in declared:
            if not isinstance(p, Periodic):
                raise ConfigurationError(f"{module.__name__}.SA_JOBS_PERIODIC holds {p!r}, not a Periodic")
            if p not in found:
                found.append(p)
    return found
