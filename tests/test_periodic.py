"""Periodic (cron) jobs: validated at declaration, fired by the leader, each slot exactly once.

This module is also imported by the worker subprocesses of the leader-change test
(``sa-jobs worker tests.test_periodic``), which pick up ``SA_JOBS_PERIODIC`` below.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
from typing import Any, Optional
from zoneinfo import ZoneInfo

import anyio
import psycopg
import pytest
from psycopg import sql
from sqlalchemy.orm import Session

from sa_jobs import ConfigurationError, InvalidArgsError, Job, JobContext, Unique, enqueue_many
from sa_jobs._url import to_conninfo
from sa_jobs.periodic import Periodic, PeriodicJobs
from sa_jobs.queries import Queries

from .helpers import jobs_sql, q, wait_for


class PerTick(Job, kind="per_tick", queue="periodic_q"):
    pass


@PerTick.handler
def per_tick(ctx: JobContext, **args: object) -> None:
    return None


class PerCustomer(Job, kind="per_customer", queue="periodic_q", partition_by=("customer",)):
    pass


# Unique kinds: never two waiting or running at once; one per user and hour; a replacing one.
class OneAtATime(Job, kind="one_at_a_time", queue="periodic_q", unique=Unique(by=())):
    pass


class HourlyPerUser(Job, kind="hourly_per_user", queue="periodic_q",
                    unique=Unique(by=("user",), period=dt.timedelta(hours=1))):
    pass


class ReplacedReport(Job, kind="replaced_report", queue="periodic_q", unique=Unique(by=(), on_conflict="replace")):
    pass


# Every second, catching up missed seconds: the worker processes of the leader-change test.
SA_JOBS_PERIODIC = [Periodic("* * * * * *", PerTick, args={"src": "cron"}, name="every_second", catch_up=True)]


UTC = dt.timezone.utc


def test_invalid_declarations_fail_at_construction():
    with pytest.raises(ConfigurationError, match="cron"):
        Periodic("61 * * * *", PerTick)
    with pytest.raises(ConfigurationError, match="cron"):
        Periodic("every day", PerTick)
    with pytest.raises(ConfigurationError, match="time zone"):
        Periodic("0 9 * * *", PerTick, timezone="Mars/Olympus")
    # A directory of the zone database, or a name too long for a file: OSError escaped.
    for zone in ("Europe", "America", "x" * 300):
        with pytest.raises(ConfigurationError, match="time zone"):
            Periodic("0 9 * * *", PerTick, timezone=zone)
    with pytest.raises(ConfigurationError, match="name"):
        Periodic("0 9 * * *", lambda: PerTick())
    with pytest.raises(InvalidArgsError):
        Periodic("0 9 * * *", PerTick, args={"when": dt.datetime.now()})
    with pytest.raises(ConfigurationError):
        Periodic("0 9 * * *", PerTick, name="bad name")
    with pytest.raises(ConfigurationError, match="unique"):
        PeriodicJobs([Periodic("0 9 * * *", PerTick), Periodic("0 10 * * *", PerTick)])


def test_a_time_zone_that_names_the_hosts_own_is_refused():
    """zoneinfo reads "localtime" from the zone directory, a link to the host's
    /etc/localtime: each worker fired the schedule in its own host's zone (a leader change
    from a UTC host to a Paris one moved every slot by an hour or two, and the schedule
    text, unchanged, hid it), and a host without that file refused the declaration at
    import. "posixrules" is the same kind of alias, chosen when the zone data was built."""
    for host_alias in ("localtime", "posixrules"):
        with pytest.raises(ConfigurationError, match="time zone"):
            Periodic("0 9 * * *", PerTick, timezone=host_alias)
    Periodic("0 9 * * *", PerTick, timezone="Etc/UTC")


class AbstractPeriodicBase(Job, queue="periodic_q"):
    __mapper_args__ = {"polymorphic_abstract": True}


def test_an_abstract_base_of_kinds_is_refused_as_no_kind():
    """A base of kinds (``polymorphic_abstract``) has options but is no kind: declared as
    a schedule's job it raised SQLAlchemy's InvalidRequestError, where every other job=
    that is not a kind raises ConfigurationError (and enqueue_many says it is abstract)."""
    with pytest.raises(ConfigurationError, match="abstract"):
        Periodic("0 9 * * *", AbstractPeriodicBase)


def test_slots_in_a_time_zone_across_dst():
    p = Periodic("0 9 * * *", PerTick, timezone="Europe/Paris", catch_up=True)
    paris = ZoneInfo("Europe/Paris")
    # 9:00 Paris is 08:00 UTC before the spring change (31 March 2024) and 07:00 UTC after.
    slots = p.due_slots(dt.datetime(2024, 3, 29, 12, tzinfo=UTC), dt.datetime(2024, 4, 1, 12, tzinfo=UTC))
    assert [s.astimezone(UTC).hour for s in slots] == [8, 7, 7]
    assert all(s.astimezone(paris).hour == 9 for s in slots)
    # A slot exactly at now is due; one at last_slot is not.
    at = dt.datetime(2024, 4, 1, 7, tzinfo=UTC)
    assert p.due_slots(at - dt.timedelta(days=1), at) == [at.astimezone(paris)]
    assert p.due_slots(at, at) == []
    # Without catch-up only the latest missed slot is due; with it, at most max_catch_up.
    plain = Periodic("*/5 * * * *", PerTick, name="five")
    start, end = dt.datetime(2024, 1, 1, tzinfo=UTC), dt.datetime(2024, 1, 1, 1, tzinfo=UTC)
    assert plain.due_slots(start, end) == [end]
    bounded = Periodic("*/5 * * * *", PerTick, name="five_b", catch_up=True, max_catch_up=3)
    assert [s.minute for s in bounded.due_slots(start, end)] == [50, 55, 0]


def test_six_fields_put_the_seconds_last(caplog):
    """croniter's order: "* * * * * */2" is every 2 seconds; "*/2 * * * * *" (seconds first,
    as in Quartz) is every second of every even minute, then nothing for a minute. That
    misreading made the S3 reliability test intermittent (docs/reliability.md, Finding 7)."""
    start = dt.datetime(2024, 1, 1, 16, 14, 50, tzinfo=UTC)
    caplog.set_level("WARNING", logger="sa_jobs.periodic")
    every_2s = Periodic("* * * * * */2", PerTick, name="every_2s", catch_up=True)
    assert caplog.records == []
    slots = every_2s.due_slots(start, start + dt.timedelta(seconds=20))
    assert [s.strftime("%M:%S") for s in slots] == ["14:52", "14:54", "14:56", "14:58", "15:00", "15:02", "15:04",
                                                     "15:06", "15:08", "15:10"]
    assert every_2s.next_slot(start) == start + dt.timedelta(seconds=2)
    seconds_first = Periodic("*/2 * * * * *", PerTick, name="seconds_first", catch_up=True)
    [record] = caplog.records
    assert "seconds_first" in record.getMessage() and "'* * * * * */N'" in record.getMessage()
    slots = seconds_first.due_slots(start, start + dt.timedelta(seconds=20))
    assert [s.strftime("%M:%S") for s in slots] == ["14:51", "14:52", "14:53", "14:54", "14:55", "14:56", "14:57",
                                                     "14:58", "14:59"]
    # Registered at 16:15:10, its first slot is 50 s away: the S3 test's wait timed out.
    assert seconds_first.next_slot(start + dt.timedelta(seconds=20)) == dt.datetime(2024, 1, 1, 16, 16, tzinfo=UTC)
    Periodic("*/5 * * * *", PerTick, name="five_fields")
    Periodic("* * * * * *", PerTick, name="every_second")
    Periodic("30 9 * * * 15", PerTick, name="at_9_30_15")
    Periodic("0 * * * * *", PerTick, name="meant_top_of_every_minute")  # every second of minute 0
    assert [r.getMessage().split("'")[1] for r in caplog.records] == ["seconds_first", "meant_top_of_every_minute"]


def test_a_cron_that_never_fires_fails_at_declaration():
    """croniter.is_valid accepts 31 February; without a check every leader tick then raised
    CroniterBadDateError ("could not be built; retrying next tick") forever."""
    for never in ("0 0 31 2 *", "0 0 30 2 *", "0 0 31 4,6 *", "0 0 31 2 * 5"):
        with pytest.raises(ConfigurationError, match="never"):
            Periodic(never, PerTick, name="never")
    Periodic("0 0 29 2 *", PerTick, name="leap_day")  # rare, but it fires


def test_a_random_cron_field_is_refused_at_declaration():
    """croniter draws an "R" field anew for every iterator, i.e. at every computation of
    the slots: "R 9 * * *" (once a day, at a random minute of 9 h) was accepted and a
    leader ticking every minute fired it a dozen times a day."""
    for random_field in ("R 9 * * *", "0 r * * *", "R(0-29) 9 * * *", "0 9 * * * R", "0 9 * * R(1-5)/2"):
        with pytest.raises(ConfigurationError, match="random"):
            Periodic(random_field, PerTick, name="random")
    # Names that merely contain an R are fixed values.
    Periodic("0 9 * MAR,APR FRI", PerTick, name="fridays_in_spring")


def _ticks(p: Periodic, start: dt.datetime, end: dt.datetime, every: dt.timedelta) -> list[dt.datetime]:
    """A live leader registered at ``start`` and ticking every ``every`` until ``end``: the
    slots it fires, in UTC."""
    last, now, fired = p.latest_slot(start), start, []
    while now <= end:
        slots = p.due_slots(last, now)
        if slots:
            fired += slots
            last = slots[-1]
        now += every
    return [s.astimezone(UTC) for s in fired]


def _utc_range(start: dt.datetime, end: dt.datetime, step: dt.timedelta) -> list[dt.datetime]:
    out = []
    while start <= end:
        out.append(start)
        start += step
    return out


# Europe/Paris falls back on 27 October 2024: 03:00 CEST (01:00 UTC) becomes 02:00 CET, so
# the local hour 02:00-03:00 happens twice (00:00-01:00 UTC, then 01:00-02:00 UTC).
FALL_BACK = dt.datetime(2024, 10, 27, 1, tzinfo=UTC)


@pytest.mark.parametrize("catch_up", [False, True])
def test_a_live_leader_fires_every_slot_of_the_repeated_hour_once(catch_up):
    """get_prev() maps a repeated wall time to its first occurrence, at or before last_slot:
    the leader fired nothing during the second 02:00-03:00 (01:00 and 01:30 UTC skipped)."""
    half_hourly = Periodic("*/30 * * * *", PerTick, name="half_hourly", timezone="Europe/Paris", catch_up=catch_up)
    start, end = FALL_BACK - dt.timedelta(hours=1, minutes=50), FALL_BACK + dt.timedelta(hours=1, minutes=40)
    assert _ticks(half_hourly, start, end, dt.timedelta(minutes=5)) == _utc_range(
        FALL_BACK - dt.timedelta(hours=1, minutes=30), FALL_BACK + dt.timedelta(hours=1, minutes=30),
        dt.timedelta(minutes=30))
    # A wall time the cron names fires at both of its occurrences (croniter's forward order).
    nightly = Periodic("30 2 * * *", PerTick, name="nightly", timezone="Europe/Paris", catch_up=catch_up)
    assert _ticks(nightly, FALL_BACK - dt.timedelta(hours=3), FALL_BACK + dt.timedelta(hours=3),
                  dt.timedelta(minutes=7)) == [FALL_BACK - dt.timedelta(minutes=30), FALL_BACK + dt.timedelta(minutes=30)]
    # Every minute of the night, New York (falls back at 06:00 UTC on 3 November 2024).
    ny_fall_back = dt.datetime(2024, 11, 3, 6, tzinfo=UTC)
    minutely = Periodic("* * * * *", PerTick, name="minutely", timezone="America/New_York", catch_up=catch_up)
    assert _ticks(minutely, ny_fall_back - dt.timedelta(minutes=70), ny_fall_back + dt.timedelta(minutes=70),
                  dt.timedelta(seconds=50)) == _utc_range(ny_fall_back - dt.timedelta(minutes=69),
                                                          ny_fall_back + dt.timedelta(minutes=70),
                                                          dt.timedelta(minutes=1))
    # Spring forward is unchanged: the nonexistent 02:30 fires at the next existing minute.
    spring = dt.datetime(2024, 3, 31, 1, tzinfo=UTC)  # 02:00 CET becomes 03:00 CEST
    assert _ticks(nightly, spring - dt.timedelta(hours=3), spring + dt.timedelta(hours=3),
                  dt.timedelta(minutes=7)) == [spring]
    assert _ticks(half_hourly, spring - dt.timedelta(minutes=50), spring + dt.timedelta(minutes=40),
                  dt.timedelta(minutes=5)) == _utc_range(spring - dt.timedelta(minutes=30), spring + dt.timedelta(minutes=30),
                                                         dt.timedelta(minutes=30))


def test_the_latest_slot_and_catch_up_across_the_repeated_hour():
    """Slots are local times: compared in UTC, as a slot with fold=1 (the second 02:30) is
    never == to a datetime of another zone (PEP 495)."""
    half_hourly = Periodic("*/30 * * * *", PerTick, name="half_hourly", timezone="Europe/Paris", catch_up=True)
    # Registered during the second 02:00-03:00: its last slot is the one just past, not an hour earlier.
    assert half_hourly.latest_slot(FALL_BACK + dt.timedelta(minutes=10)).astimezone(UTC) == FALL_BACK
    assert half_hourly.latest_slot(FALL_BACK + dt.timedelta(minutes=30)).astimezone(UTC) == (
        FALL_BACK + dt.timedelta(minutes=30))
    down_since = FALL_BACK - dt.timedelta(hours=2)
    back_at = FALL_BACK + dt.timedelta(hours=1, minutes=10)
    # Back after the repeated hour: every missed slot in absolute time, none twice.
    assert [s.astimezone(UTC) for s in half_hourly.due_slots(down_since, back_at)] == _utc_range(
        down_since + dt.timedelta(minutes=30), FALL_BACK + dt.timedelta(hours=1), dt.timedelta(minutes=30))
    # At most max_catch_up, the most recent.
    bounded = Periodic("*/30 * * * *", PerTick, name="bounded", timezone="Europe/Paris", catch_up=True, max_catch_up=3)
    assert [s.astimezone(UTC) for s in bounded.due_slots(down_since, back_at)] == _utc_range(
        FALL_BACK, FALL_BACK + dt.timedelta(hours=1), dt.timedelta(minutes=30))
    # Without catch-up, back during the repeated hour: only the latest slot, the one just past.
    plain = Periodic("*/30 * * * *", PerTick, name="plain", timezone="Europe/Paris")
    assert [s.astimezone(UTC) for s in plain.due_slots(down_since, FALL_BACK + dt.timedelta(minutes=40))] == [
        FALL_BACK + dt.timedelta(minutes=30)]
    # A week down on an every-second schedule, back just after the change: the walk is
    # bounded (no 600,000 steps) and still exact.
    every_second = Periodic("* * * * * *", PerTick, name="every_second", timezone="Europe/Paris", catch_up=True,
                            max_catch_up=5)
    back_at = FALL_BACK + dt.timedelta(seconds=2)
    week = dt.timedelta(days=7)
    assert [s.astimezone(UTC) for s in every_second.due_slots(back_at - week, back_at)] == _utc_range(
        back_at - dt.timedelta(seconds=4), back_at, dt.timedelta(seconds=1))
    latest_only = Periodic("* * * * * *", PerTick, name="latest_only", timezone="Europe/Paris")
    assert [s.astimezone(UTC) for s in latest_only.due_slots(back_at - week, back_at)] == [back_at]


def _fire(database_url: str, schema: str, periodic: Periodic, connections: int = 1,
          now: Optional[dt.datetime] = None, session_timezone: Optional[str] = None) -> list[list[int]]:
    """Fire ``periodic`` once per connection; ``now`` stands in for the database clock,
    ``session_timezone`` for the server's TimeZone (the zone its timestamps come back in)."""
    service = PeriodicJobs([periodic])
    statements = dict(service._statements(schema))
    if now is not None:
        statements["now"] = sql.SQL("SELECT {}::timestamptz").format(sql.Literal(now))

    async def main() -> list[list[int]]:
        conns = [await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) for _ in range(connections)]
        if session_timezone is not None:
            for c in conns:
                await c.execute("select set_config('TimeZone', %s, false)", (session_timezone,))
        results: list[list[int]] = [[] for _ in conns]
        try:
            async def one(i: int) -> None:
                results[i] = await service.fire(conns[i], statements, periodic)

            async with anyio.create_task_group() as tg:
                for i in range(connections):
                    tg.start_soon(one, i)
        finally:
            for c in conns:
                await c.close()
        return results

    return anyio.run(main)


def _set_last_slot(database_url: str, schema: str, name: str, ago: str, at: Optional[dt.datetime] = None) -> None:
    """last_slot = the minute of ``at`` (the database clock) less ``ago``."""
    q(database_url, sql.SQL("UPDATE {} SET last_slot = date_trunc('minute', coalesce(%s, now())) - %s::interval"
                            " WHERE name = %s").format(sql.Identifier(schema, "periodic")), (at, ago, name))


def _mid_minute(database_url: str) -> dt.datetime:
    """A clock pinned mid-minute: a test that fires twice and expects nothing new the second
    time saw a new slot when a minute turned between the two (CI, once)."""
    (now,), = q(database_url, "SELECT date_trunc('minute', now()) + interval '30 seconds'")
    return now


def _periodic_jobs(database_url: str, schema: str) -> list[tuple[int, str, str]]:
    return q(database_url, jobs_sql(schema, "SELECT id, meta->>'periodic', meta->>'slot' FROM {jobs}"
                                            " WHERE meta ? 'periodic' ORDER BY (meta->>'slot')::timestamptz"))


def test_first_sighting_registers_then_catch_up_is_bounded(database_url, schema):
    p = Periodic("* * * * *", PerTick, args={"n": 1}, name="minutely", catch_up=True, max_catch_up=5)
    now = _mid_minute(database_url)
    assert _fire(database_url, schema, p, now=now) == [[]]  # registered; starts at the next slot
    _set_last_slot(database_url, schema, "minutely", "10 minutes", at=now)
    [ids] = _fire(database_url, schema, p, now=now)
    assert len(ids) == 5
    rows = _periodic_jobs(database_url, schema)
    slots = [dt.datetime.fromisoformat(r[2]) for r in rows]
    assert all((b - a) == dt.timedelta(minutes=1) for a, b in zip(slots, slots[1:]))
    assert _fire(database_url, schema, p, now=now) == [[]]  # nothing newly due
    kinds = q(database_url, jobs_sql(schema, "SELECT DISTINCT kind, args, unique_states FROM {jobs}"))
    assert kinds == [("per_tick", {"n": 1}, ["scheduled", "available", "running", "completed", "retryable", "dead", "cancelled"])]


@pytest.mark.parametrize("catch_up", [False, True])
def test_the_repeated_hour_lands_as_rows_exactly_once(database_url, schema, catch_up):
    """The leader ticks through the Paris fall-back night (the database clock stood in by
    ``now``): one row per half-hour slot in absolute time, the repeated hour included."""
    p = Periodic("*/30 * * * *", PerTick, name="half_hourly", timezone="Europe/Paris", catch_up=catch_up)
    now = FALL_BACK - dt.timedelta(hours=1, minutes=50)
    assert _fire(database_url, schema, p, now=now) == [[]]  # registered
    while now < FALL_BACK + dt.timedelta(hours=1, minutes=40):
        now += dt.timedelta(minutes=10)
        [ids] = _fire(database_url, schema, p, now=now)
        # On time: each tick on a half hour fires its slot, the others nothing (before the
        # fix, catch-up fired the repeated hour's slots an hour late, at 02:00 UTC).
        assert len(ids) == (1 if now.minute % 30 == 0 else 0), now
    assert _fire(database_url, schema, p, now=now) == [[]]  # nothing newly due
    slots = [dt.datetime.fromisoformat(r[2]).astimezone(UTC) for r in _periodic_jobs(database_url, schema)]
    assert slots == _utc_range(FALL_BACK - dt.timedelta(hours=1, minutes=30), FALL_BACK + dt.timedelta(hours=1, minutes=30),
                               dt.timedelta(minutes=30))


def test_without_catch_up_only_the_latest_missed_slot_fires(database_url, schema):
    p = Periodic("* * * * *", PerTick, name="latest_only")
    _fire(database_url, schema, p)
    _set_last_slot(database_url, schema, "latest_only", "10 minutes")
    [ids] = _fire(database_url, schema, p)
    assert len(ids) == 1


def test_a_partitioned_kind_keeps_its_partition_key(database_url, schema):
    p = Periodic("* * * * *", PerCustomer, args={"customer": 7}, name="per_customer", catch_up=True, max_catch_up=2)
    _fire(database_url, schema, p)
    _set_last_slot(database_url, schema, "per_customer", "2 minutes")
    [ids] = _fire(database_url, schema, p)
    assert len(ids) == 2
    rows = q(database_url, jobs_sql(schema, "SELECT kind, args, partition_key FROM {jobs} ORDER BY id"))
    assert rows == [("per_customer", {"customer": 7}, "7")] * 2


def test_the_unique_key_is_a_second_guarantee(database_url, schema):
    """Even if last_slot is rewound (a restored backup, a bug), a fired slot never fires again."""
    p = Periodic("* * * * *", PerTick, name="rewound", catch_up=True, max_catch_up=3)
    now = _mid_minute(database_url)
    _fire(database_url, schema, p, now=now)
    _set_last_slot(database_url, schema, "rewound", "3 minutes", at=now)
    [first] = _fire(database_url, schema, p, now=now)
    assert len(first) == 3
    # The jobs ran to completion meanwhile: every state keeps a periodic key.
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now()"))
    _set_last_slot(database_url, schema, "rewound", "3 minutes", at=now)
    assert _fire(database_url, schema, p, now=now) == [[]]
    assert len(_periodic_jobs(database_url, schema)) == 3


def test_concurrent_leaders_fire_each_slot_once(database_url, schema):
    """A frozen ex-leader and the new one fire at the same time: the row lock serialises them."""
    p = Periodic("* * * * *", PerTick, name="raced", catch_up=True, max_catch_up=20)
    _fire(database_url, schema, p)
    # The clock pinned mid-minute: a minute turning while six connections open made 16 due.
    (now,), = q(database_url, "SELECT date_trunc('minute', now()) + interval '30 seconds'")
    q(database_url, sql.SQL("UPDATE {} SET last_slot = %s - interval '15 minutes 30 seconds' WHERE name = 'raced'").format(
        sql.Identifier(schema, "periodic")), (now,))
    results = _fire(database_url, schema, p, connections=6, now=now)
    assert sorted(len(r) for r in results)[-1] == 15 and sum(len(r) for r in results) == 15
    rows = _periodic_jobs(database_url, schema)
    assert len(rows) == len({r[2] for r in rows}) == 15


def test_a_broken_factory_does_not_stop_other_schedules(database_url, schema, caplog):
    def broken() -> Job:
        raise RuntimeError("factory bug")

    bad = Periodic("* * * * *", broken, name="broken")
    good = Periodic("* * * * *", PerTick, name="good")
    service = PeriodicJobs([bad, good])

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            await service.run_once(conn, Queries.for_schema(schema))  # registers both
            for name in ("broken", "good"):
                _set_last_slot(database_url, schema, name, "2 minutes")
            await service.run_once(conn, Queries.for_schema(schema))

    anyio.run(main)
    rows = _periodic_jobs(database_url, schema)
    assert [r[1] for r in rows] == ["good"]
    assert "factory bug" in caplog.text


def _maintainer_connected_since(database_url: str, since: dt.datetime) -> bool:
    """Whether a worker maintainer connection opened after ``since`` (the database's clock).

    Matched by start time, not client port: the embedded server is reached over a Unix
    socket, where backends have no port to match."""
    rows = q(database_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'sa_jobs:maintainer'"
                           " AND backend_start >= %s", (since,))
    return rows[0][0] > 0


def test_two_workers_and_a_leader_change_enqueue_every_slot_exactly_once(database_url, schema):
    """Worker processes (sa-jobs worker tests.test_periodic) fire an every-second schedule;
    the leader is SIGKILLed and the other takes over: every slot from the first to the last
    is enqueued exactly once (catch-up fills the failover gap)."""
    from .conftest import start_worker_process

    extra = ("--maintenance-interval", "0.2", "--poll-interval", "0.2", "--lease", "4", "--shutdown-grace", "2")
    env = {"SA_JOBS_DATABASE_URL": database_url}
    a = start_worker_process(database_url, schema, "tests.test_periodic", *extra, env=env)
    b = None
    try:
        b = _start_standby(database_url, schema, "tests.test_periodic", extra, env)
        before_kill = len(_periodic_jobs(database_url, schema))
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        killed_at = q(database_url, "SELECT now()")[0][0]

        def fired_after_kill() -> bool:
            rows = _periodic_jobs(database_url, schema)
            return len(rows) > before_kill and dt.datetime.fromisoformat(rows[-1][2]) > killed_at + dt.timedelta(seconds=2)

        assert wait_for(fired_after_kill, 30), "no worker took over the schedule"
        b.send_signal(signal.SIGTERM)
        b.wait(20)
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    rows = _periodic_jobs(database_url, schema)
    slots = [dt.datetime.fromisoformat(r[2]) for r in rows]
    assert len(slots) == len(set(slots)), "a slot was enqueued twice"
    gaps = [(x, y) for x, y in zip(slots, slots[1:]) if y - x != dt.timedelta(seconds=1)]
    assert gaps == [], "a slot was skipped"
    assert slots[-1] - slots[0] >= dt.timedelta(seconds=4)


def _start_standby(database_url: str, schema: str, module: str, extra: Any, env: Any) -> Any:
    """Once the leader has fired three slots, a second worker process whose maintainer is
    connected (running, and able to take over)."""
    from .conftest import start_worker_process

    assert wait_for(lambda: len(_periodic_jobs(database_url, schema)) >= 3, 30), "the leader fired nothing"
    started = q(database_url, "SELECT now()")[0][0]
    standby = start_worker_process(database_url, schema, module, *extra, env=env)
    if not wait_for(lambda: _maintainer_connected_since(database_url, started), 30):
        _kill_workers(standby)
        raise AssertionError("the second worker's maintainer never connected")
    return standby


def _stop_workers(*procs: Any) -> None:
    """SIGTERM each worker process, then wait for all of them to exit."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(20)


def _kill_workers(*procs: Any) -> None:
    """Kill what is still running of ``procs`` (None: never started), frozen ones too."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)


def test_a_frozen_leader_hands_over_and_its_schedule_fires(database_url, schema):
    """The leader is SIGSTOPped (docker pause, a debugger, a VM frozen): its kernel keeps the
    socket up and its backend kept the leader lock, so no worker fired a periodic slot or
    pruned for as long as it stayed frozen. The maintainer's session now ends after a
    bounded idle time (idle_session_timeout): the other worker takes over, and no slot
    fires twice when the frozen one wakes."""
    from .conftest import start_worker_process

    extra = ("--maintenance-interval", "0.2", "--poll-interval", "0.2", "--lease", "4", "--shutdown-grace", "2")
    env = {"SA_JOBS_DATABASE_URL": database_url}
    a = start_worker_process(database_url, schema, "tests.test_periodic", *extra, env=env)
    b = None
    try:
        b = _start_standby(database_url, schema, "tests.test_periodic", extra, env)
        a.send_signal(signal.SIGSTOP)
        stopped_at = q(database_url, "SELECT now()")[0][0]

        def fired_after_stop() -> bool:
            rows = _periodic_jobs(database_url, schema)
            return bool(rows) and dt.datetime.fromisoformat(rows[-1][2]) > stopped_at + dt.timedelta(seconds=2)

        took_over = wait_for(fired_after_stop, 40)
        a.send_signal(signal.SIGCONT)
        if not took_over:
            for proc in (a, b):
                proc.kill()
            holders = q(database_url, "SELECT a.pid, a.state, a.query, now() - a.state_change, a.backend_start, l.objid"
                                      " FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                                      " WHERE l.locktype = 'advisory' AND l.classid = hashtext('sa_jobs.leader')::oid")
            logs = [proc.communicate(timeout=10)[0].decode(errors="replace")[-2000:] for proc in (a, b)]
            raise AssertionError(f"no worker fired the schedule while the leader was frozen; logs: {logs}; {holders}")
        fired = len(_periodic_jobs(database_url, schema))
        assert wait_for(lambda: len(_periodic_jobs(database_url, schema)) >= fired + 3, 30), "firing stopped"
        _stop_workers(a, b)
    finally:
        _kill_workers(a, b)
    rows = _periodic_jobs(database_url, schema)
    slots = [dt.datetime.fromisoformat(r[2]) for r in rows]
    assert len(slots) == len(set(slots)), "a slot was enqueued twice"
    gaps = [(x, y) for x, y in zip(slots, slots[1:]) if y - x != dt.timedelta(seconds=1)]
    assert gaps == [], "a slot was skipped"


def test_a_leader_frozen_in_the_middle_of_a_firing_hands_over(database_url, schema, tmp_path):
    """The leader is frozen while it builds a slot's job (its factory, between the firing's
    statements): the firing was one pipeline whose Sync came only with COMMIT, and a
    backend between a pipeline's statements arms none of the server's timeouts (it reads
    'active'), so its session, the leader lock and the periodic row's lock outlived any
    idle limit. The firing now syncs before it builds the jobs: the session is then idle
    in a transaction, which the server ends."""
    from .conftest import start_worker_process

    marker = tmp_path / "freeze"
    extra = ("--maintenance-interval", "0.2", "--poll-interval", "0.2", "--lease", "4", "--shutdown-grace", "2")
    env = {"SA_JOBS_DATABASE_URL": database_url}
    a = start_worker_process(database_url, schema, "tests.jobs_periodic_freeze", *extra,
                             env={**env, "SA_JOBS_TEST_FREEZE_AT": str(marker)})
    b = None
    try:
        b = _start_standby(database_url, schema, "tests.jobs_periodic_freeze", extra, env)
        marker.touch()
        assert wait_for(lambda: not marker.exists(), 10), "the leader did not build a job"
        frozen_at = q(database_url, "SELECT now()")[0][0]

        def fired_after_freeze() -> bool:
            rows = _periodic_jobs(database_url, schema)
            return bool(rows) and dt.datetime.fromisoformat(rows[-1][2]) > frozen_at + dt.timedelta(seconds=2)

        took_over = wait_for(fired_after_freeze, 40)
        a.send_signal(signal.SIGCONT)
        assert took_over, "no worker fired the schedule while the leader was frozen mid-firing"
        _stop_workers(a, b)
    finally:
        _kill_workers(a, b)
    slots = [r[2] for r in _periodic_jobs(database_url, schema)]
    assert len(slots) == len(set(slots)), "a slot was enqueued twice"


def test_the_maintainer_session_bounds_its_idle_time_even_for_a_long_interval(database_url, schema):
    """The bound that frees a frozen leader's lock is set on the maintainer's session; an
    interval longer than the setting holds (24.8 days) is clamped, not refused by the
    server at every connect (which would have stopped maintenance for good)."""
    from sa_jobs.events import NullObserver
    from sa_jobs.maintenance.leader import Maintainer

    async def settings(interval: float) -> tuple[bool, list[str]]:
        maintainer = Maintainer(to_conninfo(database_url), Queries.for_schema(schema), NullObserver(), [],
                                interval=interval, timeout=2.0)
        try:
            await maintainer.tick()
            conn = await maintainer._conn.get()
            cur = await conn.execute("SELECT setting FROM pg_settings WHERE name IN"
                                     " ('idle_in_transaction_session_timeout', 'idle_session_timeout') ORDER BY name")
            return maintainer.is_leader, [row[0] for row in await cur.fetchall()]
        finally:
            await maintainer._conn.close()

    assert anyio.run(settings, 0.5) == (True, ["10000", "10000"])
    assert anyio.run(settings, 10.0 ** 9) == (True, [str(2**31 - 1), str(2**31 - 1)])


def test_a_long_catch_up_fits_the_maintenance_deadline_and_makes_progress(database_url, schema):
    """An every-second schedule back from three hours down owes max_catch_up=10,000 slots.
    Inserted in one transaction, one statement each, they outlived the tick's deadline (the
    worker's statement_timeout): the tick failed and rolled back, leadership dropped, and the
    next tick began the same catch-up again, so the schedule never fired again."""
    from sa_jobs.events import NullObserver
    from sa_jobs.maintenance.leader import Maintainer

    p = Periodic("* * * * * *", PerTick, name="long_catch_up", catch_up=True, max_catch_up=10_000)
    service = PeriodicJobs([p])
    maintainer = Maintainer(to_conninfo(database_url), Queries.for_schema(schema), NullObserver(), [service],
                            interval=0.05, timeout=4.0)
    _fire(database_url, schema, p)  # registered
    _set_last_slot(database_url, schema, "long_catch_up", "3 hours")

    async def tick_until_caught_up() -> int:
        try:
            with anyio.move_on_after(45):
                while True:
                    await maintainer.tick()
                    n = q(database_url, sql.SQL("SELECT count(*) FROM {} WHERE now() - last_slot < interval '10 s'").format(
                        sql.Identifier(schema, "periodic")))[0][0]
                    if n:
                        break
                    await anyio.sleep(0.05)
        finally:
            await maintainer._conn.close()
        return len(_periodic_jobs(database_url, schema))

    fired = anyio.run(tick_until_caught_up)
    assert fired >= 10_000
    rows = _periodic_jobs(database_url, schema)
    assert len(rows) == len({r[2] for r in rows})


def test_a_delayed_job_row_is_refused_at_declaration_and_a_factorys_clearly():
    """A row with options(delay=...) was accepted, then every slot failed at every tick with
    "enqueue_many takes run_at= schedules, not delay=": the schedule never fired."""
    with pytest.raises(ConfigurationError, match="delay"):
        Periodic("* * * * *", PerTick().options(delay=dt.timedelta(minutes=5)), name="delayed_row")
    p = Periodic("* * * * *", lambda: PerTick().options(delay=30), name="delayed_factory")
    with pytest.raises(ConfigurationError, match="delayed_factory.*delay"):
        p.build()


def test_a_schedule_bounded_by_its_year_field_fires_its_first_and_last_slots(database_url, schema):
    """croniter's 7th field (years) bounds a schedule: get_prev()/get_next() then raise
    CroniterBadDateError past either end. Registration (which walked two slots back) failed
    every tick until two slots had passed, so the first slot never fired, and after the last
    one every tick logged the error ("could not be built") forever."""
    yearly = Periodic("0 0 1 1 * 0 2027-2029", PerTick, name="bounded_years", catch_up=True)
    before = dt.datetime(2026, 12, 31, 23, 50, tzinfo=UTC)
    first = dt.datetime(2027, 1, 1, tzinfo=UTC)
    assert _ticks(yearly, before, before + dt.timedelta(minutes=20), dt.timedelta(minutes=1)) == [first]
    assert yearly.due_slots(dt.datetime(2029, 1, 1, tzinfo=UTC), dt.datetime(2031, 6, 1, tzinfo=UTC)) == []
    assert [s.year for s in yearly.due_slots(before, dt.datetime(2031, 6, 1, tzinfo=UTC))] == [2027, 2028, 2029]
    # Through the database: registered before its first slot, fired at it, then quiet.
    assert _fire(database_url, schema, yearly, now=before) == [[]]
    assert [len(ids) for ids in _fire(database_url, schema, yearly, now=first + dt.timedelta(seconds=1))] == [1]
    assert _fire(database_url, schema, yearly, now=dt.datetime(2035, 1, 1, tzinfo=UTC))[0] != []  # 2028, 2029
    assert _fire(database_url, schema, yearly, now=dt.datetime(2036, 1, 1, tzinfo=UTC)) == [[]]
    assert [r[2][:4] for r in _periodic_jobs(database_url, schema)] == ["2027", "2028", "2029"]



@pytest.mark.parametrize("pipeline", [True, False])
def test_a_row_the_database_refuses_does_not_stop_other_schedules(database_url, schema, caplog, monkeypatch, pipeline):
    """A declaration whose row the INSERT refuses (a constraint of the app's own; before
    b2dc3ee also a tag holding NUL, which the kind's validation let through): the error
    escaped run_once, so every tick failed, dropped leadership and no other schedule (nor
    the leader-only services) ever ran again. Pipelined, the error surfaces at the Sync,
    after COMMIT was sent and skipped: the failed transaction must still be rolled back
    (the next schedule's statements would fail in it). Without pipeline mode (libpq < 14)
    each statement is its own round trip, with the same outcome."""
    if not pipeline:
        monkeypatch.setattr(psycopg.AsyncPipeline, "is_supported", classmethod(lambda cls: False))
    q(database_url, jobs_sql(schema, "ALTER TABLE {jobs} ADD CONSTRAINT no_refused_tag CHECK (NOT 'refused' = ANY (tags))"))
    bad = Periodic("* * * * *", PerTick().options(tags=["refused"]), name="refused_row")
    good = Periodic("* * * * *", PerTick, name="good")
    service = PeriodicJobs([bad, good])

    async def main() -> None:
        async with await psycopg.AsyncConnection.connect(to_conninfo(database_url), autocommit=True) as conn:
            await service.run_once(conn, Queries.for_schema(schema))  # registers both
            for name in ("refused_row", "server_refused", "good", "good_too"):
                _set_last_slot(database_url, schema, name, "2 minutes")
            await service.run_once(conn, Queries.for_schema(schema))

    anyio.run(main)
    assert [r[1] for r in _periodic_jobs(database_url, schema)] == ["good"]
    assert "refused_row" in caplog.text
    # Refused by the server, in the pipelined insert (a constraint of the app's own).
    q(database_url, jobs_sql(schema, "ALTER TABLE {jobs} ADD CONSTRAINT no_bad_tag CHECK (NOT 'bad' = ANY (tags))"))
    server_bad = Periodic("* * * * *", PerTick().options(tags=["bad"]), name="server_refused")
    service = PeriodicJobs([server_bad, Periodic("* * * * *", PerTick, name="good_too")])
    anyio.run(main)
    assert sorted(r[1] for r in _periodic_jobs(database_url, schema)) == ["good", "good_too"]
    assert "server_refused" in caplog.text


def test_without_catch_up_a_live_leader_fires_every_slot_between_its_ticks(database_url, schema):
    """A schedule more frequent than the leader's tick (every 5 s, ticks 10 s apart): each
    tick fired only its most recent slot, so a live, healthy leader dropped every other
    slot, as if they had been missed in downtime. Slots late by less than the service's
    grace (a few ticks) all fire; catch_up only governs older ones."""
    p = Periodic("* * * * * */5", PerTick, name="every_5s")
    service = PeriodicJobs([p])
    grace = service.grace
    start = dt.datetime(2030, 1, 1, tzinfo=UTC)
    assert _fire(database_url, schema, p, now=start) == [[]]  # registered
    for tick in range(1, 4):
        [ids] = _fire(database_url, schema, p, now=start + dt.timedelta(seconds=10 * tick))
        assert len(ids) == 2, tick
    slots = [dt.datetime.fromisoformat(r[2]) for r in _periodic_jobs(database_url, schema)]
    assert slots == _utc_range(start + dt.timedelta(seconds=5), start + dt.timedelta(seconds=30), dt.timedelta(seconds=5))
    # Ten minutes without a leader: the slots older than the grace are skipped, the late
    # ones within it fire.
    back = start + dt.timedelta(minutes=10, seconds=30)
    [ids] = _fire(database_url, schema, p, now=back)
    fired = [dt.datetime.fromisoformat(r[2]) for r in _periodic_jobs(database_url, schema)][len(slots):]
    assert fired == [s for s in _utc_range(back - dt.timedelta(minutes=10), back, dt.timedelta(seconds=5))
                     if s > back - grace]
    # Later than the grace, only the most recent missed slot fires (a daily schedule back after a day).
    daily = Periodic("0 9 * * *", PerTick, name="daily")
    assert daily.due_slots(start - dt.timedelta(days=3), start + dt.timedelta(hours=10), grace=grace) == [
        start + dt.timedelta(hours=9)]


def test_a_maintainer_slower_than_the_schedule_fires_every_slot(database_url, schema):
    """The same through a Maintainer ticking every 1.5 s on an every-second schedule,
    without catch-up: each tick fired one slot, a second went missing every other tick."""
    from sa_jobs.events import NullObserver
    from sa_jobs.maintenance.leader import Maintainer

    p = Periodic("* * * * * *", PerTick, name="every_second_live")
    maintainer = Maintainer(to_conninfo(database_url), Queries.for_schema(schema), NullObserver(),
                            [PeriodicJobs([p])], interval=1.5, timeout=4.0)

    async def tick(times: int) -> None:
        try:
            for _ in range(times):
                await maintainer.tick()
                assert maintainer.is_leader
                await anyio.sleep(1.5)  # the maintainer's own interval (Maintainer.run)
        finally:
            await maintainer._conn.close()

    # Registers, then three ticks that fire: without the fix their slots step by 1 and 2 s
    # in turn (one slot per 1.5 s tick), so two steps always hold a gap.
    anyio.run(tick, 4)
    slots = [dt.datetime.fromisoformat(r[2]) for r in _periodic_jobs(database_url, schema)]
    assert len(slots) >= 4
    assert [(a, b) for a, b in zip(slots, slots[1:]) if b - a != dt.timedelta(seconds=1)] == []


# ---- a kind's own unique= (Oban's Cron and River's periodic jobs insert with it) ---------

_KIND_STATES = ["scheduled", "available", "running", "retryable"]


def _last_slot(database_url: str, schema: str, name: str) -> dt.datetime:
    return q(database_url, sql.SQL("SELECT last_slot FROM {} WHERE name = %s").format(
        sql.Identifier(schema, "periodic")), (name,))[0][0]


def _kind_rows(database_url: str, schema: str, kind: str) -> list[tuple[int, str, dict, str, list[str]]]:
    return q(database_url, jobs_sql(schema, "SELECT id, state, args, unique_key, unique_states FROM {jobs}"
                                            " WHERE kind = %s ORDER BY id"), (kind,))


def test_a_unique_kind_fires_only_while_its_key_is_free(database_url, schema, engine, caplog):
    """A slot whose kind's key is held (by an app's job or an earlier slot's) enqueues
    nothing, is logged with its slot, and is not retried: last_slot moves past it. Once
    the holder completes ('completed' is not one of the kind's states) the next slot fires.
    Before, every slot enqueued its own job under ``periodic:<name>:<slot>``."""
    caplog.set_level("INFO", logger="sa_jobs.periodic")
    p = Periodic("* * * * *", OneAtATime, args={"src": "cron"}, name="one_at_a_time")
    start = dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    assert _fire(database_url, schema, p, now=start) == [[]]  # registered
    with Session(engine) as session, session.begin():
        holder = OneAtATime(src="app")
        session.add(holder)
        session.flush()
        holder_id = holder.id
    slot = lambda minutes: dt.datetime(2030, 1, 1, 0, minutes, tzinfo=UTC)  # noqa: E731
    # Held by a waiting job, then by the same job running: both slots skipped, not retried.
    assert _fire(database_url, schema, p, now=slot(1) + dt.timedelta(seconds=1)) == [[]]
    assert _last_slot(database_url, schema, "one_at_a_time") == slot(1)
    assert f"skipped 1 slot(s) whose unique key was held: {slot(1).isoformat()}" in caplog.text
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'running', attempted_at = now(), claim_token = gen_random_uuid(),"
                                     " lease_expires_at = now() + interval '1 hour', lease_owner = 'test' WHERE id = %s"),
      (holder_id,))
    assert _fire(database_url, schema, p, now=slot(2) + dt.timedelta(seconds=1)) == [[]]
    assert _last_slot(database_url, schema, "one_at_a_time") == slot(2)
    assert slot(2).isoformat() in caplog.text
    assert _fire(database_url, schema, p, now=slot(2) + dt.timedelta(seconds=20)) == [[]]  # not retried
    assert [r[0] for r in _kind_rows(database_url, schema, "one_at_a_time")] == [holder_id]
    # The holder completes: its key is free, the next slot fires, under the kind's own key.
    q(database_url, jobs_sql(schema, "UPDATE {jobs} SET state = 'completed', finished_at = now() WHERE id = %s"),
      (holder_id,))
    [[fired]] = _fire(database_url, schema, p, now=slot(3) + dt.timedelta(seconds=1))
    rows = _kind_rows(database_url, schema, "one_at_a_time")
    assert [(r[0], r[1]) for r in rows] == [(holder_id, "completed"), (fired, "available")]
    assert rows[1][3] == rows[0][3] == OneAtATime(src="x").unique_key and rows[1][4] == _KIND_STATES
    assert [r[2] for r in _periodic_jobs(database_url, schema)] == [slot(3).isoformat()]
    # Now the periodic job holds the key: the next slot is skipped in turn.
    assert _fire(database_url, schema, p, now=slot(4) + dt.timedelta(seconds=1)) == [[]]
    assert _last_slot(database_url, schema, "one_at_a_time") == slot(4)
    assert len(_kind_rows(database_url, schema, "one_at_a_time")) == 2


def test_a_waiting_periodic_job_is_a_duplicate_for_the_apps_enqueue(database_url, schema, engine):
    """The periodic row carries the kind's key and states, so the app's own enqueue of the
    kind dedups against it (session.add returns it, enqueue_many writes nothing)."""
    p = Periodic("* * * * *", OneAtATime, name="one_at_a_time")
    start = dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    _fire(database_url, schema, p, now=start)
    [[fired]] = _fire(database_url, schema, p, now=start + dt.timedelta(minutes=1))
    with Session(engine) as session, session.begin():
        again = OneAtATime(src="app")
        session.add(again)
        session.flush()
        assert again.was_duplicate and again.id == fired
        assert again.meta == {"periodic": "one_at_a_time", "slot": "2030-01-01T00:01:00+00:00"}
        assert enqueue_many(session, OneAtATime, [{"src": "bulk"}]) == 0
    assert [r[0] for r in _kind_rows(database_url, schema, "one_at_a_time")] == [fired]


def test_a_catch_up_of_a_unique_kind_enqueues_one_job_per_key(database_url, schema, caplog):
    """Five missed slots, in one transaction: the first takes the key, the other four are
    skipped. With a period, the key's bucket is the database clock's at INSERT, as for any
    enqueue. A kind without unique= still gets one job per slot, keyed by the slot."""
    caplog.set_level("INFO", logger="sa_jobs.periodic")
    once = Periodic("* * * * *", OneAtATime, name="once_caught_up", catch_up=True, max_catch_up=5)
    hourly = Periodic("* * * * *", HourlyPerUser, args={"user": 7}, name="hourly_caught_up", catch_up=True,
                      max_catch_up=5)
    plain = Periodic("* * * * *", PerTick, name="plain_caught_up", catch_up=True, max_catch_up=5)
    for p in (once, hourly, plain):
        _fire(database_url, schema, p)
        _set_last_slot(database_url, schema, p.name, "10 minutes")
        [ids] = _fire(database_url, schema, p)
        assert len(ids) == (5 if p is plain else 1), p.name
        assert _last_slot(database_url, schema, p.name) == p.latest_slot(q(database_url, "SELECT now()")[0][0])
    assert "skipped 4 slot(s) whose unique key was held" in caplog.text
    [(key, states, created, slot)] = q(database_url, jobs_sql(
        schema, "SELECT unique_key, unique_states, created_at, meta->>'slot' FROM {jobs} WHERE kind = 'hourly_per_user'"))
    bucket = int(created.timestamp() // 3600)
    assert key == HourlyPerUser(user=7).unique_key + f":{bucket}" and states == _KIND_STATES
    plain_rows = q(database_url, jobs_sql(schema, "SELECT unique_key, unique_states, meta->>'slot' FROM {jobs}"
                                                  " WHERE kind = 'per_tick' ORDER BY id"))
    assert [r[0] for r in plain_rows] == [once.unique_key(dt.datetime.fromisoformat(r[2])).replace(
        "once_caught_up", "plain_caught_up") for r in plain_rows]
    assert all(len(r[1]) == 7 for r in plain_rows)
    # Six leaders at once on a unique kind: still one job for the key.
    q(database_url, jobs_sql(schema, "DELETE FROM {jobs}"))
    _set_last_slot(database_url, schema, "once_caught_up", "15 minutes")
    results = _fire(database_url, schema, once, connections=6)
    assert sum(len(r) for r in results) == 1
    assert len(_kind_rows(database_url, schema, "one_at_a_time")) == 1


def test_a_replacing_unique_kind_is_skipped_not_replaced(database_url, schema, engine):
    """on_conflict="replace" is for a caller with newer args; a schedule firing again has
    nothing newer than the job already waiting, and rewriting it would move its schedule
    and its slot. The slot is skipped as for any unique kind."""
    p = Periodic("* * * * *", ReplacedReport, args={"v": "cron"}, name="replaced_report")
    start = dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    _fire(database_url, schema, p, now=start)
    with Session(engine) as session, session.begin():
        session.add(ReplacedReport(v="app").options(run_at=dt.datetime(2031, 1, 1, tzinfo=UTC)))
    assert _fire(database_url, schema, p, now=start + dt.timedelta(minutes=1)) == [[]]
    assert _last_slot(database_url, schema, "replaced_report") == dt.datetime(2030, 1, 1, 0, 1, tzinfo=UTC)
    [row] = _kind_rows(database_url, schema, "replaced_report")
    assert row[1:3] == ("scheduled", {"v": "app"})


def test_a_service_that_is_not_one_is_refused_when_the_worker_is_built(database_url):
    """``Worker(maintenance=[digest])`` (the Periodic itself, not ``PeriodicJobs([digest])``)
    was taken as it was: every maintenance tick then failed with AttributeError after
    taking the leader lock, dropping it and the connection each second, and the schedule
    never fired. ``sa-jobs worker`` refused such an SA_JOBS_MAINTENANCE entry; the Worker
    now does too, and one service not in a list is taken as a list of one (a lone
    ``SA_JOBS_MAINTENANCE = Pruner(...)`` raised TypeError)."""
    from sa_jobs import Worker
    from sa_jobs.cli import _maintenance_of
    from sa_jobs.maintenance.pruner import Pruner

    digest = Periodic("0 9 * * *", PerTick, name="digest")
    for given in ([digest], [PerTick], [object()], "pruner", 5):
        with pytest.raises(ConfigurationError, match="maintenance service"):
            Worker(database_url, kinds=[PerTick], maintenance=given)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="PeriodicJobs"):
        Worker(database_url, kinds=[PerTick], maintenance=[digest])
    service, pruner = PeriodicJobs([digest]), Pruner()
    assert Worker(database_url, kinds=[PerTick], maintenance=service)._extra_maintenance == [service]  # type: ignore[arg-type]

    class Module:
        __name__ = "app_jobs"
        SA_JOBS_MAINTENANCE = pruner

    assert _maintenance_of([Module]) == [pruner]
    Module.SA_JOBS_MAINTENANCE = [digest]  # type: ignore[assignment]
    with pytest.raises(ConfigurationError, match="PeriodicJobs"):
        _maintenance_of([Module])


def test_args_that_are_no_mapping_of_names_fail_at_declaration_with_a_typed_error():
    """``args=`` went through dict() and then ``kind(**args)``: a string failed with
    ValueError, a number or a key that is no string with TypeError, not the
    InvalidArgsError a kind's own construction raises; a list of pairs was taken."""
    for args in ("user=1", 5, [("user", 1)], {1: "x"}):
        with pytest.raises(InvalidArgsError, match="args"):
            Periodic("0 9 * * *", PerTick, args=args)  # type: ignore[arg-type]
    assert Periodic("0 9 * * *", PerTick, args={"user": 1}).build().args == {"user": 1}


def test_a_schedule_whose_last_year_has_passed_still_declares_and_stays_quiet(database_url, schema, caplog):
    """A 7th field bounds a schedule, which then "stays quiet". But the declaration
    checked for a next slot, so once the last year had passed, the app's module (and
    ``sa-jobs worker`` with it) failed at import, the day after its last slot, with
    "never fires (no date matches it, e.g. 31 February)": a time bomb. A schedule with a
    past slot is declared (logged as over); one that names no date at all is refused."""
    with caplog.at_level("WARNING", logger="sa_jobs.periodic"):
        over = Periodic("0 9 * * * 0 2020-2025", PerTick, name="campaign_2025")
    assert "2025-12-31T09:00:00+00:00" in caplog.text
    for never in ("0 0 31 2 * 0 2030", "0 0 31 2 *", "0 0 30 2 * 0 2020"):
        with pytest.raises(ConfigurationError, match="never fires"):
            Periodic(never, PerTick, name="never")
    # Registered at its last slot; quiet from then on, without catch-up too.
    assert _fire(database_url, schema, over) == [[]]
    assert _last_slot(database_url, schema, "campaign_2025") == dt.datetime(2025, 12, 31, 9, tzinfo=UTC)
    assert _fire(database_url, schema, over) == [[]]
    assert _periodic_jobs(database_url, schema) == []


# Australia/Lord_Howe falls back half an hour on 5 April 2026: 02:00 (+11:00, 15:00 UTC)
# becomes 01:30 (+10:30), so the local 01:30-02:00 happens twice (14:30-15:00, 15:00-15:30 UTC).
LORD_HOWE_FALL_BACK = dt.datetime(2026, 4, 4, 15, tzinfo=UTC)


@pytest.mark.parametrize("catch_up", [False, True])
def test_a_half_hour_fall_back_fires_both_passes(catch_up):
    """croniter's get_next() yields a wall time of a half-hour fall-back once (the first pass),
    and its get_prev() inside the second pass answers the first: with catch-up, a live leader
    ticking every 10 s fired nothing at 01:35-01:56 of the second pass (15:05-15:26 UTC)."""
    every = dt.timedelta(seconds=10)
    grace = PeriodicJobs._grace(every.total_seconds(), 10.0)
    every_7 = Periodic("*/7 0-3 * * *", PerTick, name="every_7", timezone="Australia/Lord_Howe", catch_up=catch_up)
    start, end = LORD_HOWE_FALL_BACK - dt.timedelta(minutes=40), LORD_HOWE_FALL_BACK + dt.timedelta(minutes=40)
    fired: list[tuple[dt.datetime, dt.datetime]] = []
    last, now = every_7.latest_slot(start), start
    while now <= end:
        slots = every_7.due_slots(last, now, grace)
        fired += [(s.astimezone(UTC), now) for s in slots]
        last = slots[-1] if slots else last
        now += every
    # Every minute whose Lord Howe wall time the cron names, in absolute time: both passes.
    expected = [m for m in _utc_range(start + dt.timedelta(minutes=1), end, dt.timedelta(minutes=1))
                if m.astimezone(ZoneInfo("Australia/Lord_Howe")).minute % 7 == 0
                and m.astimezone(ZoneInfo("Australia/Lord_Howe")).hour <= 3]
    assert [slot for slot, _ in fired] == expected
    assert all(dt.timedelta(0) <= at - slot < every for slot, at in fired)  # each on time, in the next tick
    second_pass = [m for m in expected if LORD_HOWE_FALL_BACK <= m < LORD_HOWE_FALL_BACK + dt.timedelta(minutes=30)]
    assert [m.strftime("%H:%M") for m in second_pass] == ["15:05", "15:12", "15:19", "15:26"]


def test_catch_up_across_a_half_hour_fall_back():
    """Down from just before the first pass until after the second: every slot of both
    passes is due once; down from inside the first pass, the second pass is still due."""
    every_7 = Periodic("*/7 0-3 * * *", PerTick, name="every_7", timezone="Australia/Lord_Howe", catch_up=True)
    back_at = LORD_HOWE_FALL_BACK + dt.timedelta(minutes=40)
    due = [s.astimezone(UTC).strftime("%H:%M") for s in every_7.due_slots(LORD_HOWE_FALL_BACK - dt.timedelta(minutes=40), back_at)]
    assert due == ["14:21", "14:28", "14:35", "14:42", "14:49", "14:56", "15:05", "15:12", "15:19", "15:26",
                   "15:30", "15:37"]
    inside = LORD_HOWE_FALL_BACK - dt.timedelta(minutes=4)  # 01:56, first pass
    due = [s.astimezone(UTC).strftime("%H:%M") for s in every_7.due_slots(inside, back_at)]
    assert due == ["15:05", "15:12", "15:19", "15:26", "15:30", "15:37"]
    # A nightly 01:45 fires at both of its passes, each once.
    nightly = Periodic("45 1 * * *", PerTick, name="nightly_145", timezone="Australia/Lord_Howe", catch_up=True)
    assert [s.astimezone(UTC).strftime("%H:%M") for s in nightly.due_slots(
        LORD_HOWE_FALL_BACK - dt.timedelta(hours=3), back_at)] == ["14:45", "15:15"]


def test_a_declaration_seen_through_two_modules_is_one_schedule():
    """``sa-jobs worker myapp.jobs myapp.cron``, where ``myapp.cron`` star-imports
    ``myapp.jobs`` (or re-exports its ``SA_JOBS_PERIODIC``), or one module named twice: the
    same declarations and services reach the worker through two modules. The worker
    refused to start ("two periodic jobs are named 'digest'") over one schedule, and ran
    the same Pruner twice per tick. A declaration is taken once; two different ones of
    one name are still refused."""
    import types

    from sa_jobs.cli import _maintenance_of
    from sa_jobs.maintenance.pruner import Pruner

    digest, pruner = Periodic("0 9 * * *", PerTick, name="digest"), Pruner()
    jobs = types.ModuleType("app_jobs")
    jobs.SA_JOBS_PERIODIC, jobs.SA_JOBS_MAINTENANCE = [digest], [pruner]  # type: ignore[attr-defined]
    cron = types.ModuleType("app_cron")
    cron.__dict__.update({k: v for k, v in vars(jobs).items() if not k.startswith("_")})  # from app_jobs import *
    for modules in ([jobs, cron], [jobs, jobs]):
        services = _maintenance_of(modules)
        assert len(services) == 2 and services[1] is pruner
        assert isinstance(services[0], PeriodicJobs) and services[0].periodics == [digest]
    cron.SA_JOBS_PERIODIC = [Periodic("0 10 * * *", PerTick, name="digest")]  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="two periodic jobs are named 'digest'"):
        _maintenance_of([jobs, cron])


def test_args_changed_after_declaration_do_not_reach_its_jobs(database_url, schema):
    """``args=`` was kept by reference: declarations built in a loop around one dict all
    fired with its last value, and args made non-JSON after the declaration checked them
    failed every slot at the leader ("could not be built; retrying next tick"). The
    declaration keeps its own copy, as checked."""
    args: dict[str, object] = {"tenant": "a", "opts": {"depth": 1}}
    a = Periodic("* * * * *", PerTick, args=args, name="per_tenant_a")
    args["tenant"] = "b"
    args["opts"]["depth"] = 2  # type: ignore[index]
    b = Periodic("* * * * *", PerTick, args=args, name="per_tenant_b")
    args["when"] = dt.datetime.now()  # not JSON, and after both declarations
    start = dt.datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)
    for p in (a, b):
        _fire(database_url, schema, p, now=start)
        [[fired]] = _fire(database_url, schema, p, now=start + dt.timedelta(minutes=1))
    rows = q(database_url, jobs_sql(schema, "SELECT meta->>'periodic', args FROM {jobs} ORDER BY id"))
    assert rows == [("per_tenant_a", {"tenant": "a", "opts": {"depth": 1}}),
                    ("per_tenant_b", {"tenant": "b", "opts": {"depth": 2}})]


def _schedule_of(database_url: str, schema: str, name: str) -> Optional[str]:
    (found,), = q(database_url, sql.SQL("SELECT schedule FROM {} WHERE name = %s").format(
        sql.Identifier(schema, "periodic")), (name,))
    return found


def test_an_edited_schedule_is_not_caught_up_as_downtime(database_url, schema, caplog):
    """Schema v14. A daily schedule edited to every 5 minutes and deployed at noon: the
    leader counted the new expression's slots from the old one's last slot (midnight) and,
    with catch-up, fired the 100 most recent of 144 "missed" slots at once. An edit now
    restarts the schedule: its slots on time fire, none from before the edit."""
    noon = dt.datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)  # noon's slot is on time (grace 22 s)
    daily = Periodic("0 0 * * *", PerTick, name="report", catch_up=True)
    assert _fire(database_url, schema, daily, now=noon - dt.timedelta(hours=13)) == [[]]  # registered
    [ids] = _fire(database_url, schema, daily, now=noon - dt.timedelta(hours=12))  # midnight's slot
    assert len(ids) == 1 and _schedule_of(database_url, schema, "report") == "0 0 * * * UTC"

    edited = Periodic("*/5   * * * *", PerTick, name="report", catch_up=True)
    with caplog.at_level(logging.INFO, logger="sa_jobs.periodic"):
        [ids] = _fire(database_url, schema, edited, now=noon)
    assert len(ids) == 1, len(ids)  # noon's slot, on time; before the fix 100
    assert "schedule changed from '0 0 * * * UTC' to '*/5 * * * * UTC'" in caplog.text
    assert _schedule_of(database_url, schema, "report") == "*/5 * * * * UTC"
    assert _last_slot(database_url, schema, "report") == noon.replace(second=0)
    # From then on it is the new schedule's own: downtime after the edit is caught up.
    [ids] = _fire(database_url, schema, edited, now=noon + dt.timedelta(minutes=30))
    assert len(ids) == 6
    slots = [dt.datetime.fromisoformat(r[2]).astimezone(UTC) for r in _periodic_jobs(database_url, schema)]
    assert slots == [noon.replace(hour=0, second=0)] + _utc_range(
        noon.replace(second=0), noon.replace(second=0) + dt.timedelta(minutes=30), dt.timedelta(minutes=5))


def test_an_edited_schedule_without_catch_up_waits_for_its_next_slot(database_url, schema):
    """"0 9 * * *" edited to "0 15 * * *" and deployed at 16:00: today's 15:00 was fired
    at once, late, as if the leader had been down since 09:00. The time zone is part of
    the schedule; a slot of the edited one within the grace still fires."""
    day = dt.datetime(2026, 12, 1, tzinfo=UTC)
    morning = Periodic("0 9 * * *", PerTick, name="digest")
    _fire(database_url, schema, morning, now=day + dt.timedelta(hours=8))  # registered
    [ids] = _fire(database_url, schema, morning, now=day + dt.timedelta(hours=9, seconds=5))
    assert len(ids) == 1

    afternoon = Periodic("0 15 * * *", PerTick, name="digest")
    assert _fire(database_url, schema, afternoon, now=day + dt.timedelta(hours=16)) == [[]]
    assert _last_slot(database_url, schema, "digest") == day + dt.timedelta(hours=15)  # passed, not fired
    assert _schedule_of(database_url, schema, "digest") == "0 15 * * * UTC"
    [ids] = _fire(database_url, schema, afternoon, now=day + dt.timedelta(days=1, hours=15, seconds=5))
    assert len(ids) == 1  # the next day's 15:00, as usual

    # Edited again, to a zone where 15:00 came two seconds ago: on time, so it fires.
    zoned = Periodic("0 15 * * *", PerTick, name="digest", timezone="Europe/Paris")
    [ids] = _fire(database_url, schema, zoned, now=day + dt.timedelta(days=2, hours=14, seconds=2))
    assert len(ids) == 1
    assert _schedule_of(database_url, schema, "digest") == "0 15 * * * Europe/Paris"


@pytest.mark.parametrize("catch_up", [False, True])
def test_the_servers_time_zone_does_not_stretch_the_grace_across_its_fall_back(database_url, schema, catch_up):
    """The database clock comes back in the session's TimeZone (a server set up with
    ``timezone = 'Europe/Paris'``, initdb's default on a Paris host). ``now - grace`` was
    computed on that wall clock: during the repeated hour it landed an hour early, so an
    hour of downtime counted as on time and fired in full, whatever catch_up and
    max_catch_up said; an edit fired the new schedule's slots of the past hour."""
    paris_second_pass = FALL_BACK + dt.timedelta(minutes=30, seconds=10)  # 02:30:10 CET, the second one
    minutely = Periodic("* * * * *", PerTick, name="minutely", catch_up=catch_up, max_catch_up=5)
    assert _fire(database_url, schema, minutely, now=paris_second_pass - dt.timedelta(hours=2)) == [[]]
    q(database_url, sql.SQL("UPDATE {} SET last_slot = %s WHERE name = 'minutely'").format(
        sql.Identifier(schema, "periodic")), (paris_second_pass - dt.timedelta(hours=1, seconds=10),))
    # Down for an hour: the latest missed slot, or the 5 latest with catch-up (before: 60).
    [ids] = _fire(database_url, schema, minutely, now=paris_second_pass, session_timezone="Europe/Paris")
    assert len(ids) == (5 if catch_up else 1), len(ids)

    # Edited from a daily schedule: its slot on time fires, none from before (before: 13).
    daily = Periodic("0 0 * * *", PerTick, name="report")
    assert _fire(database_url, schema, daily, now=paris_second_pass - dt.timedelta(hours=1)) == [[]]  # registered
    five = Periodic("*/5 * * * *", PerTick, name="report", catch_up=catch_up, max_catch_up=5)
    later = paris_second_pass + dt.timedelta(minutes=5)
    [ids] = _fire(database_url, schema, five, now=later, session_timezone="Europe/Paris")
    assert len(ids) == 1, len(ids)
    assert _last_slot(database_url, schema, "report") == later.replace(second=0)


def test_a_row_fired_before_the_schedule_was_recorded_is_adopted(database_url, schema):
    """A row from schema v13 (schedule NULL) is not an edit: its missed slots are caught
    up as before, and the schedule is recorded for the next edit."""
    p = Periodic("* * * * *", PerTick, name="older", catch_up=True, max_catch_up=5)
    now = _mid_minute(database_url)
    _fire(database_url, schema, p, now=now)
    q(database_url, sql.SQL("UPDATE {} SET schedule = NULL WHERE name = 'older'").format(
        sql.Identifier(schema, "periodic")))
    _set_last_slot(database_url, schema, "older", "3 minutes", at=now)
    [ids] = _fire(database_url, schema, p, now=now)
    assert len(ids) == 3
    assert _schedule_of(database_url, schema, "older") == "* * * * * UTC"


def test_an_apps_uncommitted_job_of_a_unique_kind_holds_up_no_other_schedule(database_url, schema, engine, caplog):
    """An app's transaction has enqueued a job of a unique kind and not committed: the
    slot's INSERT of that kind waits on it (the unique index cannot yet tell whether the
    key is taken). It waited for the whole statement deadline, failing the tick: the
    leader dropped its leadership at every tick for as long as the transaction lasted, and
    no other schedule fired (nor did the pruner run). Now only that schedule waits: its
    slot stays due and fires, or is skipped as held, once the transaction has ended."""
    from sa_jobs.events import NullObserver
    from sa_jobs.maintenance.leader import Maintainer

    class Errors(NullObserver):
        def __init__(self) -> None:
            self.errors = 0

        def loop_error(self, loop: str) -> None:
            self.errors += 1

    blocked = Periodic("* * * * * *", OneAtATime, args={"src": "cron"}, name="blocked_unique")
    free = Periodic("* * * * * *", PerTick, name="free_schedule")
    observer = Errors()
    maintainer = Maintainer(to_conninfo(database_url), Queries.for_schema(schema), observer,
                            [PeriodicJobs([blocked, free])], interval=0.05, timeout=2.0)

    def fired(name: str) -> int:
        return sum(1 for row in _periodic_jobs(database_url, schema) if row[1] == name)

    async def tick_while(done: object, seconds: float) -> bool:
        with anyio.move_on_after(seconds):
            while True:
                await maintainer.tick()
                if done():  # type: ignore[operator]
                    return True
                await anyio.sleep(0.05)
        return False

    async def main() -> None:
        try:
            await maintainer.tick()  # registers both
            with Session(engine) as session, session.begin():
                session.add(OneAtATime(src="app"))
                session.flush()  # the key is inserted, not committed
                assert await tick_while(lambda: fired("free_schedule") >= 3, 15), "the other schedule did not fire"
                assert observer.errors == 0 and maintainer.is_leader
                assert fired("blocked_unique") == 0
                assert "'blocked_unique': a transaction not yet committed holds a job of its unique key" in caplog.text
            # Committed: the app's job holds the key, and the waiting slots are skipped.
            assert await tick_while(lambda: q(database_url, sql.SQL(
                "SELECT now() - last_slot < interval '2 s' FROM {} WHERE name = 'blocked_unique'").format(
                    sql.Identifier(schema, "periodic")))[0][0], 10)
            assert observer.errors == 0 and fired("blocked_unique") == 0
        finally:
            await maintainer._conn.close()

    anyio.run(main)


@pytest.mark.parametrize("fires", [False, True])
def test_a_maintainer_that_stops_after_a_tick_loses_its_session_within_its_idle_limit(database_url, schema,
                                                                                      monkeypatch, fires):
    """What the server sees of a frozen leader: a tick, then nothing. After a tick that
    fired a slot, psycopg had ended the firing's pipeline with a Sync and then a Flush
    request, and a backend reading a message after its Sync's ReadyForQuery disarms its
    idle timeouts: the session (and the leader lock) outlived the idle limit for good
    (1 frozen leader in 5 kept it, in the worker-process test). The tick now ends with a
    plain statement."""
    from sa_jobs.events import NullObserver
    from sa_jobs.maintenance import leader

    monkeypatch.setattr(leader, "MIN_IDLE_LIMIT", 1.0)
    p = Periodic("* * * * * *", PerTick, name="idle_after_firing")
    maintainer = leader.Maintainer(to_conninfo(database_url), Queries.for_schema(schema), NullObserver(),
                                   [PeriodicJobs([p] if fires else [])], interval=0.05, timeout=0.5)
    assert maintainer.idle_limit == 1.0

    def alive(pid: int) -> bool:
        return bool(q(database_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)))

    async def main() -> None:
        try:
            await maintainer.tick()  # registers it
            assert maintainer.is_leader
            with anyio.fail_after(10):
                while fires and not _periodic_jobs(database_url, schema):
                    await anyio.sleep(0.05)
                    await maintainer.tick()
            pid = (await maintainer._conn.get()).info.backend_pid
            with anyio.move_on_after(6):  # the maintainer is "frozen": it sends nothing
                while alive(pid):
                    await anyio.sleep(0.1)
            assert not alive(pid), "the maintainer's session outlived its idle limit"
        finally:
            await maintainer._conn.close()

    anyio.run(main)


def test_a_catch_up_whose_factory_is_slow_keeps_the_leaders_session_and_makes_progress(database_url, schema,
                                                                                         monkeypatch):
    """A firing builds a batch's rows (up to 500 calls of the factory) inside its
    transaction, after a Sync, where the backend sits idle in transaction, bounded by the
    maintainer's idle limit. A catch-up whose factory took a few milliseconds a call
    (building args, reading a config) outlived that limit at every tick: the server ended
    the leader's session, the firing rolled back, and the next tick (any leader) began the
    same batch again, so the schedule never fired again and every tick lost leadership."""
    import time

    from sa_jobs.events import NullObserver
    from sa_jobs.maintenance import leader

    monkeypatch.setattr(leader, "MIN_IDLE_LIMIT", 1.0)

    def slow() -> PerTick:
        time.sleep(0.005)  # 500 slots: 2.5 s, past the 1 s idle limit
        return PerTick()

    p = Periodic("* * * * * *", slow, name="slow_catch_up", catch_up=True, max_catch_up=10_000)
    _fire(database_url, schema, p)  # registered
    _set_last_slot(database_url, schema, "slow_catch_up", "10 minutes")
    maintainer = leader.Maintainer(to_conninfo(database_url), Queries.for_schema(schema), NullObserver(),
                                   [PeriodicJobs([p])], interval=0.05, timeout=0.5)
    assert maintainer.idle_limit == 1.0

    async def main() -> None:
        try:
            with anyio.move_on_after(20):
                while len(_periodic_jobs(database_url, schema)) < 200:
                    await maintainer.tick()
                    await anyio.sleep(0.05)
        finally:
            await maintainer._conn.close()

    anyio.run(main)
    assert len(_periodic_jobs(database_url, schema)) >= 200, "the catch-up made no progress"
