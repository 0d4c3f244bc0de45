"""Prometheus metrics for sa-jobs workers and queues.

Two sources, kept apart on purpose:

* :class:`PrometheusObserver` implements the worker's :class:`~sa_jobs.events.WorkerObserver`
  hooks. It only touches in-memory counters, so it is cheap on the claim/complete hot path
  and never talks to the database.
* :class:`QueueDepthCollector` reads queue depth from PostgreSQL at scrape time, at most
  once per TTL, from the partial indexes of *live* jobs only (never the finished history),
  so its cost does not grow with the number of completed rows kept in the table.

Every label comes from a bounded set: queue names (configured, or validated names in the
table for depth and rescued dead jobs), kind names (declared in
code; anything else is reported as ``other``), outcomes (:data:`OUTCOMES`), states and
worker loop names. Job ids, args and error text never reach a label.

Serving: :func:`start_metrics_server` (a daemon HTTP thread, loopback by default),
:func:`make_asgi_app` (mount in FastAPI/Starlette), or register into your own registry.
See ``docs/metrics.md``.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
from bisect import bisect_left
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import anyio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import make_asgi_app as _prometheus_asgi_app
from prometheus_client import start_http_server
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import sql

from . import _validate
from .errors import ConfigurationError
from .schema import DEFAULT_SCHEMA, JOBS_TABLE, QUEUES_TABLE
from .events import OUTCOMES

log = logging.getLogger("sa_jobs.metrics")

PREFIX = "sa_jobs"

# Outcomes after which the job will not run again: the end-to-end latency is observed there.
TERMINAL_OUTCOMES = ("completed", "dead", "cancelled")
# Outcomes of an attempt that actually ran to a verdict: the run duration is observed there.
# (released = shutdown gave the job back; lease_lost = another worker owns it now.)
RUN_OUTCOMES = ("completed", "retried", "dead", "cancelled", "timed_out", "snoozed")
# Every outcome label we accept; the worker reports "snoozed" (Snooze) beyond events.OUTCOMES.
LABEL_OUTCOMES = frozenset((*OUTCOMES, "snoozed"))
# The worker's own loops that report errors (WorkerObserver.loop_error).
LOOP_COMPONENTS = ("producer", "completer", "heartbeat", "notifier", "maintenance")
# States the depth collector reports: the live ones, each served by a partial index, plus
# dead (the dead-letter backlog), reached through jobs_state_kind_idx.
DEPTH_STATES = ("available", "scheduled", "retryable", "running", "dead")
OTHER = "other"

# Jobs run from milliseconds to an hour; waits can reach hours during an outage.
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
CLAIM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# One run of a maintenance service: a promotion of a few rows up to a pruner run of many batches.
MAINTENANCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# le="0" counts empty polls: a claim that found nothing.
BATCH_BUCKETS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


class PrometheusObserver:
    """The worker's observer, backed by prometheus-client metrics in ``registry``.

    Children are cached per label tuple so the hot path is a dict lookup plus an
    increment (``.labels()`` costs several times more). One observer per registry; all
    Workers of a process may share it, but the per-queue gauges then mix them.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        p = PREFIX
        if f"{p}_jobs_claimed" in getattr(reg, "_names_to_collectors", {}):
            # prometheus-client's own ValueError ("Duplicated timeseries") named no way out.
            raise ConfigurationError(
                "this registry has an sa-jobs PrometheusObserver already: share that one between the"
                " process's workers, or give each its own CollectorRegistry")
        self.jobs_finished = _LoopFamily(
            f"{p}_jobs_finished", "Job attempts finished by this worker (or, outcome dead, whose lost last attempt its rescuer found), by outcome.",
            ["queue", "kind", "outcome"], reg,
        )
        self.jobs_claimed = Counter(f"{p}_jobs_claimed", "Jobs claimed by this worker.", ["queue"], registry=reg)
        self.claims = Counter(f"{p}_claims", "Claim statements run (including empty polls).", ["queue"], registry=reg)
        self.jobs_rescued = Counter(
            f"{p}_jobs_rescued", "Jobs with an expired lease returned to the queue (or sent to dead) by this worker's rescuer.",
            registry=reg,
        )
        # Maintenance: labels are the service and periodic names declared in code, and
        # the finished states retention prunes.
        self.jobs_promoted = Counter(
            f"{p}_jobs_promoted", "Scheduled and retryable jobs made available when due, by this worker.", registry=reg,
        )
        self.jobs_pruned = Counter(
            f"{p}_jobs_pruned", "Finished jobs deleted by retention, by this worker as leader.", ["state"], registry=reg,
        )
        self.periodic_jobs_enqueued = Counter(
            f"{p}_periodic_jobs_enqueued", "Jobs enqueued for periodic (cron) slots, by this worker as leader.",
            ["periodic"], registry=reg,
        )
        self.maintenance_duration = Histogram(
            f"{p}_maintenance_duration_seconds", "Duration of one successful run of a maintenance service.",
            ["service"], buckets=MAINTENANCE_BUCKETS, registry=reg,
        )
        self.maintenance_last_run = Gauge(
            f"{p}_maintenance_last_run_timestamp_seconds",
            "Unix time a maintenance service last finished a tick without error on this worker.", ["service"],
            registry=reg,
        )
        self.horizon_held_seconds = Gauge(
            f"{p}_xmin_horizon_held_seconds",
            "How long the oldest snapshot (xmin) has held back cleanup of claimed jobs; 0 while it moves.",
            registry=reg,
        )
        self.loop_errors = Counter(
            f"{p}_worker_loop_errors", "Errors in the worker's own loops (database unreachable, timeouts).",
            ["component"], registry=reg,
        )
        self.run_duration = _LoopFamily(
            f"{p}_job_run_duration_seconds", "From claim to the handler's verdict, per attempt.",
            ["queue", "kind"], reg, buckets=RUN_BUCKETS,
        )
        self.queue_wait = _LoopFamily(
            f"{p}_job_queue_wait_seconds", "From the job becoming due (scheduled_at) to its attempt starting.",
            ["queue"], reg, buckets=WAIT_BUCKETS,
        )
        self.end_to_end = _LoopFamily(
            f"{p}_job_end_to_end_seconds", "From enqueue (created_at) to the final outcome.",
            ["queue", "outcome"], reg, buckets=WAIT_BUCKETS,
        )
        self.claim_duration = Histogram(
            f"{p}_claim_duration_seconds", "Duration of one claim statement.",
            ["queue"], buckets=CLAIM_BUCKETS, registry=reg,
        )
        self.claim_batch = Histogram(
            f"{p}_claim_batch_size", "Jobs returned by one claim statement.",
            ["queue"], buckets=BATCH_BUCKETS, registry=reg,
        )
        self.in_flight = Gauge(f"{p}_jobs_in_flight", "Jobs claimed and not yet finished.", ["queue"], registry=reg)
        self.slots_total = Gauge(f"{p}_worker_slots", "Concurrency limit of this worker, per queue.", ["queue"], registry=reg)
        self.slots_free = Gauge(f"{p}_worker_slots_free", "Free slots of this worker, per queue.", ["queue"], registry=reg)
        self.is_leader = Gauge(f"{p}_worker_is_leader", "1 while this worker holds the maintenance leadership.", registry=reg)
        self.last_heartbeat = Gauge(
            f"{p}_worker_last_heartbeat_timestamp_seconds", "Unix time of the last successful heartbeat.", registry=reg,
        )
        self.heartbeat_age = Gauge(
            f"{p}_worker_heartbeat_age_seconds",
            "Seconds since the last successful heartbeat (since start if none yet); computed at scrape;"
            " 0 before the worker starts and once it stopped as asked.",
            registry=reg,
        )
        self._last_beat = time.monotonic()
        # Worker runs reporting here that are under way, and whether the last one to end
        # stopped as asked: a stopped worker holds no lease, and its age must not grow into
        # an alert while the process (an app embedding it) goes on serving metrics. Nor
        # does a worker that has not run yet (an app that starts it later, or on some
        # replicas only): until a run starts, it reads as stopped.
        self._runs = 0
        self._stopped = True
        self._leading = 0  # workers reporting here that lead (each reports its changes)
        self.heartbeat_age.set_function(
            lambda: 0.0 if self._stopped and self._runs <= 0 else time.monotonic() - self._last_beat)

        self._known_kinds: set[str] = set()
        self._finished: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._started: dict[str, Any] = {}
        self._claim: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._slots: dict[str, tuple[Any, Any, Any]] = {}
        self._in_flight_n: dict[str, int] = {}
        self._limits: dict[str, int] = {}
        self._errors: dict[str, Any] = {}
        # Zero-initialised so rate() and increase() see the first error, not a new series.
        for component in (*LOOP_COMPONENTS, OTHER):
            self._errors[component] = self.loop_errors.labels(component)
        self.jobs_rescued.inc(0)
        self.jobs_promoted.inc(0)
        self.is_leader.set(0)
        _OBSERVERS[reg] = self

    def collectors(self) -> list[Collector]:
        """The metrics this observer registered, to unregister them."""
        return [value for value in vars(self).values() if isinstance(value, (MetricWrapperBase, _LoopFamily))]

    # ---- bounded labels ----------------------------------------------------------

    def _kind_label(self, kind: str) -> str:
        """A declared kind, or ``other``: a row's kind column must not mint series. A kind
        declared after the observer was made counts as itself from then on."""
        if kind in self._known_kinds:
            return kind
        from .model import is_registered_kind

        if not is_registered_kind(kind):
            return OTHER
        self._known_kinds.add(kind)
        return kind

    def _zero_dead(self, queue: str) -> None:
        """The dead series of the kinds declared for ``queue``, at 0 from its first claim:
        ``increase()`` cannot see a series' first sample, so one first scraped at 1 (a job
        dies in milliseconds) never fired the dead-jobs alert. Dead only, and only the
        kinds of the queues this worker serves: no more series than that."""
        from .model import registered_kinds

        for kind, cls in registered_kinds().items():
            if cls.kind_options().queue == queue:
                self.jobs_finished.labels(queue, kind, "dead")

    def _finished_children(self, queue: str, kind: str, outcome: str) -> tuple[Any, Any, Any]:
        label = self._kind_label(kind)
        out = outcome if outcome in LABEL_OUTCOMES else OTHER
        children = (
            self.jobs_finished.labels(queue, label, out),
            self.run_duration.labels(queue, label) if out in RUN_OUTCOMES else None,
            self.end_to_end.labels(queue, out) if out in TERMINAL_OUTCOMES else None,
        )
        if label == kind and out == outcome:  # cache only what maps to itself
            self._finished[(queue, kind, outcome)] = children
        return children

    # ---- WorkerObserver ----------------------------------------------------------

    def claimed(self, queue: str, count: int, seconds: float) -> None:
        c = self._claim.get(queue)
        if c is None:
            c = self._claim[queue] = (
                self.claims.labels(queue), self.jobs_claimed.labels(queue),
                self.claim_duration.labels(queue), self.claim_batch.labels(queue),
            )
            self._zero_dead(queue)
        c[0].inc()
        if count:
            c[1].inc(count)
            self._set_in_flight(queue, self._in_flight_n.get(queue, 0) + count)
        c[2].observe(seconds)
        c[3].observe(count)

    def job_started(self, queue: str, kind: str, wait_seconds: float) -> None:
        h = self._started.get(queue)
        if h is None:
            h = self._started[queue] = self.queue_wait.labels(queue)
        h.observe(wait_seconds if wait_seconds > 0 else 0.0)

    def job_finished(self, queue: str, kind: str, outcome: str, run_seconds: float, since_enqueue_seconds: float) -> None:
        c = self._finished.get((queue, kind, outcome))
        if c is None:
            c = self._finished_children(queue, kind, outcome)
        c[0].inc()
        if c[1] is not None:
            c[1].observe(run_seconds)
        if c[2] is not None:  # 0 or less: the worker's clock is behind the database's; still a job
            c[2].observe(since_enqueue_seconds if since_enqueue_seconds > 0 else 0.0)
        self._set_in_flight(queue, self._in_flight_n.get(queue, 1) - 1)

    def slots(self, queue: str, in_flight: int, limit: int) -> None:
        # The worker's own count, after each claim: it re-syncs the running tally that
        # claimed()/job_finished() keep between claims (the producer may sleep a while).
        self._limits[queue] = limit
        self._slot_gauges(queue)
        self._set_in_flight(queue, in_flight)

    def _slot_gauges(self, queue: str) -> None:
        """Gauges read at scrape time: the hot path only updates two ints."""
        if queue in self._slots:
            return
        self._slots[queue] = (self.in_flight.labels(queue), self.slots_total.labels(queue), self.slots_free.labels(queue))
        self._in_flight_n.setdefault(queue, 0)
        self.in_flight.labels(queue).set_function(lambda: self._in_flight_n.get(queue, 0))
        self.slots_total.labels(queue).set_function(lambda: self._limits.get(queue, 0))
        self.slots_free.labels(queue).set_function(
            lambda: max(0, self._limits.get(queue, 0) - self._in_flight_n.get(queue, 0)))

    def _set_in_flight(self, queue: str, n: int) -> None:
        self._in_flight_n[queue] = n if n > 0 else 0
        if queue not in self._slots:
            self._slot_gauges(queue)

    def rescued(self, count: int) -> None:
        self.jobs_rescued.inc(count)

    def loop_error(self, component: str) -> None:
        self._errors.get(component, self._errors[OTHER]).inc()

    def heartbeat_ok(self) -> None:
        self._last_beat = time.monotonic()
        self.last_heartbeat.set(time.time())

    def leader(self, is_leader: bool) -> None:
        # The worker reports changes: count the workers leading, as several may report here.
        self._leading = max(0, self._leading + (1 if is_leader else -1))
        self.is_leader.set(1 if self._leading else 0)

    def worker_started(self) -> None:
        if self._runs <= 0:  # the age of a new run counts from its start
            self._last_beat = time.monotonic()
        self._runs += 1

    def worker_stopped(self, asked: bool = True) -> None:
        self._runs -= 1
        self._stopped = asked  # a run that failed keeps its age growing: that is an alarm

    def promoted(self, count: int) -> None:
        self.jobs_promoted.inc(count)

    def rescued_dead(self, queue: str, kind: str, count: int) -> None:
        # The counter only (no empty run-time or end-to-end series): the attempt's worker
        # died with those. ``queue`` is the row's, which this worker may not serve: still
        # a bounded set (validated names of queues in the table, as the depth gauges').
        self.jobs_finished.labels(queue, self._kind_label(kind), "dead").inc(count)

    def pruned(self, state: str, count: int) -> None:
        self.jobs_pruned.labels(state).inc(count)

    def periodic_enqueued(self, name: str, count: int) -> None:
        self.periodic_jobs_enqueued.labels(name).inc(count)

    def horizon_held(self, seconds: float) -> None:
        self.horizon_held_seconds.set(seconds)

    def maintenance_ran(self, service: str, seconds: float) -> None:
        self.maintenance_duration.labels(service).observe(seconds)
        self.maintenance_last_run.labels(service).set(time.time())


# The observer made on each registry: start_metrics_server serves it rather than refuse it.
_OBSERVERS: "weakref.WeakKeyDictionary[CollectorRegistry, PrometheusObserver]" = weakref.WeakKeyDictionary()


def _observer_in(registry: CollectorRegistry) -> Optional[PrometheusObserver]:
    """The PrometheusObserver whose metrics ``registry`` holds, if any (none once unregistered)."""
    observer = _OBSERVERS.get(registry)
    names = getattr(registry, "_names_to_collectors", {})
    if observer is None or names.get(f"{PREFIX}_jobs_claimed") is not observer.jobs_claimed:
        return None
    return observer


# ---- per-job families without locks ----------------------------------------------------
#
# prometheus-client guards every increment with a lock, for threads. The per-job metrics
# are only ever written from the worker's event-loop thread, so they are kept as plain
# ints and floats and turned into samples at scrape time (on the HTTP thread: a reading
# that races a write is off by one observation, never torn, and every counter stays
# monotonic). Per job this costs a bisect and two additions instead of four locks.


class _LoopCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LoopHistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _LoopFamily(Collector):
    """A labelled counter or histogram family whose children are loop-local."""

    def __init__(self, name: str, doc: str, labelnames: Iterable[str], registry: CollectorRegistry,
                 buckets: Optional[tuple[float, ...]] = None) -> None:
        self._name, self._doc, self._labelnames = name, doc, tuple(labelnames)
        self._buckets = buckets
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = _LoopCounterChild() if self._buckets is None else _LoopHistogramChild(self._buckets)
            self._children[values] = child
        return child

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _family(self) -> Any:  # CounterMetricFamily or HistogramMetricFamily: add_metric differs
        if self._buckets is None:
            return CounterMetricFamily(self._name, self._doc, labels=self._labelnames)
        return HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            if self._buckets is None:
                family.add_metric(list(values), child.value)
            else:
                counts, total = list(child.counts), child.sum
                cumulative, buckets = 0, []
                for bound, n in zip((*self._buckets, float("inf")), counts):
                    cumulative += n
                    buckets.append((_le(bound), cumulative))
                family.add_metric(list(values), buckets, total)
        yield family


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


# ---- queue depth ---------------------------------------------------------------------

# One statement, each branch bounded by a partial index of live or dead rows; none reads
# completed/cancelled history. See docs/metrics.md for the plan and cost.
_DEPTH_SQL = """
SELECT 'available', queue, count(*), extract(epoch FROM now() - min(scheduled_at))::float8
  FROM {jobs} WHERE state = 'available' GROUP BY queue
UNION ALL
SELECT state, queue, count(*), NULL FROM {jobs}
  WHERE state IN ('scheduled', 'retryable') AND scheduled_at > '-infinity' GROUP BY state, queue
UNION ALL
SELECT 'running', queue, count(*), NULL FROM {jobs}
  WHERE state = 'running' AND lease_expires_at > '-infinity' GROUP BY queue
UNION ALL
SELECT 'dead', queue, count(*), NULL FROM {jobs} WHERE state = 'dead' GROUP BY queue
UNION ALL
SELECT CASE WHEN paused THEN 'paused' ELSE 'known' END, name, 1, NULL FROM {queues}
"""


def depth_query(schema: str = DEFAULT_SCHEMA) -> str:
    """The SQL the depth collector runs (exposed for EXPLAIN and the benchmark)."""
    name = _validate.schema_name(schema)
    return sql.SQL(_DEPTH_SQL).format(
        jobs=sql.Identifier(name, JOBS_TABLE), queues=sql.Identifier(name, QUEUES_TABLE)).as_string()


@dataclass
class _Snapshot:
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    oldest: dict[str, float] = field(default_factory=dict)
    paused: set[str] = field(default_factory=set)
    queues: tuple[str, ...] = ()  # those reported, sorted: seen now or within forget_after
    fetched_at: float = float("-inf")  # monotonic
    duration: float = 0.0
    ok: bool = False


# The depth query's timeouts and read-only mode, for its own transaction only (is_local).
_DEPTH_SETTINGS_SQL = (
    "SELECT set_config('statement_timeout', %(ms)s, true), set_config('lock_timeout', %(ms)s, true),"
    " set_config('transaction_read_only', 'on', true)"
)

# Seconds a queue with no live or dead rows and no queues-table row goes on being reported
# (at 0) before its series are dropped: longer than an alert's window (15 min), so the
# drain to 0 is seen, and a bursty queue's dashboard line has no gaps between bursts.
DEPTH_FORGET_AFTER = 3600.0

# Seconds a depth query may run past its statement_timeout before the client gives up on the
# server (which ends the statement itself at the timeout when it is there to).
DEPTH_QUERY_GRACE = 1.0


class QueueDepthCollector(Collector):
    """Jobs per queue and state, and the oldest available job's age, read at scrape time.

    The query runs at most once per ``ttl`` seconds (scrapes in between get the cached
    snapshot), on the scrape thread, under ``statement_timeout`` (and a client deadline just
    past it, for a server that no longer answers). It counts only live
    states (available, scheduled, retryable, running: each has a partial index, so the
    cost is O(live rows), independent of the completed history) plus dead rows, reached
    through ``jobs_state_kind_idx``. Completed and cancelled are not counted:
    use the ``sa_jobs_jobs_finished_total`` counters. A failed query keeps the last
    snapshot; ``sa_jobs_queue_depth_snapshot_age_seconds`` shows how stale it is.

    A queue is reported while it has live or dead rows or a row in the queues table (a
    pause or limits), and with zeros for ``forget_after`` seconds after it had neither:
    then its series go, or queues named per tenant or per run grew /metrics for ever.
    """

    def __init__(
        self,
        database_url: str,
        schema: str = DEFAULT_SCHEMA,
        *,
        ttl: float = 10.0,
        statement_timeout: float = 2.0,
        forget_after: float = DEPTH_FORGET_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from ._url import to_conninfo

        self._conninfo = to_conninfo(database_url)
        self.schema = _validate.schema_name(schema)
        # NaN passed every comparison: a collector whose TTL never ran out never queried.
        for name, value in (("ttl", ttl), ("statement_timeout", statement_timeout), ("forget_after", forget_after)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigurationError(f"QueueDepthCollector: {name} must be a positive number of seconds, not {value!r}")
        self.ttl = ttl
        self.statement_timeout = statement_timeout
        self.forget_after = forget_after
        self._clock = clock
        self._query = depth_query(self.schema)
        self._lock = threading.Lock()
        self._conn: Any = None
        self._aborted = False  # whether the last _fetch was given up on past its deadline
        self._snapshot = _Snapshot()
        # After a failed query, none until then (monotonic): back off for one TTL, without
        # touching the snapshot's own time, which its age (the staleness signal) counts from.
        self._retry_at = float("-inf")
        # Queues reported, each with when (clock) a query last found it: a drained queue
        # reports 0, not nothing, until forget_after has passed.
        self._queues: dict[str, float] = {}
        self.errors = 0
        self.queries = 0

    def _connect(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=max(1, int(self.statement_timeout + 0.999)),
                application_name="sa_jobs_metrics",
                # Nothing prepared on the server (psycopg would from a statement's fifth run):
                # behind a transaction-mode pooler the scrape may land on a server connection
                # that never saw the PREPARE. One query per scrape gains nothing from it.
                prepare_threshold=None,
                # As the worker's connections: keepalives find a dead peer on a real network;
                # the client deadline (_fetch) covers what they cannot (a proxy that still ACKs).
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
            )
        return self._conn

    def _fetch(self, conn: Any) -> list[Any]:
        """The depth query's rows, in a read-only transaction of its own under
        ``statement_timeout`` and ``lock_timeout``, within ``statement_timeout`` +
        :data:`DEPTH_QUERY_GRACE`.

        The settings are transaction-local: behind a transaction-mode pooler (PgBouncer) a
        session ``SET`` stayed on the server connection the pooler then gave other clients.

        The server's timeout cannot end a wait for a server that is gone (a NAT or firewall
        dropped the connection without a reset): the scrape hung until TCP gave up, minutes
        later, and every scrape after it on the collector's lock. Past the deadline the
        socket is shut down under the statement, which then fails as a lost connection."""
        fd = conn.pgconn.socket
        guard = threading.Lock()
        running = [True]

        def abort() -> None:
            with guard:
                if running[0]:
                    self._aborted = True
                    with socket.socket(fileno=os.dup(fd)) as sock:
                        sock.shutdown(socket.SHUT_RDWR)

        timer = threading.Timer(self.statement_timeout + DEPTH_QUERY_GRACE, abort)
        timer.daemon = True
        timer.start()
        try:
            with conn.transaction():
                conn.execute(_DEPTH_SETTINGS_SQL, {"ms": f"{int(self.statement_timeout * 1000)}ms"})
                return list(conn.execute(self._query).fetchall())
        finally:
            with guard:
                running[0] = False
            timer.cancel()

    def _rows(self) -> list[Any]:
        """The depth query's rows, on a new connection once more if the one kept idle since
        the last query was found closed: the server ended it meanwhile (a restart or
        failover, idle_session_timeout, a pooler), which says nothing of the server now.
        Not after a timeout, nor on a new connection: those are the server's answer."""
        import psycopg

        reused = self._conn is not None and not self._conn.closed
        conn = self._connect()
        self._aborted = False
        try:
            return self._fetch(conn)
        except psycopg.OperationalError:
            if not (reused and conn.broken and not self._aborted):
                raise
            log.info("queue depth connection was closed by the server; reconnecting")
        self._drop_connection()
        return self._fetch(self._connect())

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def refresh(self) -> _Snapshot:
        """Run the depth query now (callers hold no lock); keeps the old snapshot on failure."""
        started = time.perf_counter()
        self.queries += 1
        try:
            rows = self._rows()
        except Exception as exc:  # noqa: BLE001 - a scrape must answer even if the database does not
            self.errors += 1
            log.warning("queue depth query failed (%s); serving the previous snapshot", type(exc).__name__)
            self._drop_connection()
            self._retry_at = self._clock() + self.ttl  # do not hammer a failing server
            return self._snapshot
        snap = _Snapshot(fetched_at=self._clock(), duration=time.perf_counter() - started, ok=True)
        for state, queue, count, oldest in rows:
            self._queues[queue] = snap.fetched_at
            if state in ("paused", "known"):
                if state == "paused":
                    snap.paused.add(queue)
                continue
            snap.counts[(queue, state)] = int(count)
            if oldest is not None:
                snap.oldest[queue] = max(0.0, float(oldest))
        for queue, seen in list(self._queues.items()):
            if snap.fetched_at - seen > self.forget_after:
                del self._queues[queue]
        snap.queues = tuple(sorted(self._queues))
        self._snapshot = snap
        return snap

    def snapshot(self) -> _Snapshot:
        with self._lock:
            now = self._clock()
            if now - self._snapshot.fetched_at >= self.ttl and now >= self._retry_at:
                self.refresh()
            return self._snapshot

    def describe(self) -> Iterable[Metric]:
        # Registering must not query the database: describe without samples.
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        if _taken_in_thread.get() is self:  # make_asgi_app's collect, on the event loop
            return list(self._families(self._snapshot))
        return list(self._families(self.snapshot()))

    def _families(self, snap: Optional[_Snapshot]) -> Iterator[Metric]:
        p = PREFIX
        depth = GaugeMetricFamily(f"{p}_queue_jobs", "Jobs in the table per queue and live state (cached, see TTL).",
                                  labels=["queue", "state"])
        oldest = GaugeMetricFamily(f"{p}_queue_oldest_available_age_seconds",
                                   "Age of the oldest available job per queue (since it became due); 0 when none.",
                                   labels=["queue"])
        paused = GaugeMetricFamily(f"{p}_queue_paused", "1 while the queue is paused cluster-wide (its due jobs wait).",
                                   labels=["queue"])
        age = GaugeMetricFamily(f"{p}_queue_depth_snapshot_age_seconds",
                                "Seconds since the depth snapshot was taken successfully.")
        took = GaugeMetricFamily(f"{p}_queue_depth_query_duration_seconds", "Duration of the last depth query.")
        errors = CounterMetricFamily(f"{p}_queue_depth_query_errors", "Depth queries that failed or timed out.")
        if snap is not None:
            for queue in snap.queues:
                for state in DEPTH_STATES:
                    depth.add_metric([queue, state], snap.counts.get((queue, state), 0))
                oldest.add_metric([queue], snap.oldest.get(queue, 0.0))
                paused.add_metric([queue], 1.0 if queue in snap.paused else 0.0)
            if snap.ok:
                age.add_metric([], max(0.0, self._clock() - snap.fetched_at))
            took.add_metric([], snap.duration)
            errors.add_metric([], self.errors)
        yield from (depth, oldest, paused, age, took, errors)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


# ---- serving -------------------------------------------------------------------------

def _default_registry() -> CollectorRegistry:
    """A private registry with the process/platform/GC collectors operators expect."""
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    reg = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


def _register_depth(registry: CollectorRegistry, depth: QueueDepthCollector) -> None:
    """Register ``depth``; a second one fails with a way out, not prometheus-client's bare
    "Duplicated timeseries" (two collectors' series have the same names and labels)."""
    if f"{PREFIX}_queue_jobs" in getattr(registry, "_names_to_collectors", {}):
        raise ConfigurationError(
            "this registry has an sa-jobs queue depth collector already: one per registry (the series of two"
            " would collide); serve another schema's depth from its own CollectorRegistry")
    registry.register(depth)


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint: ``observer`` goes to ``Worker(observer=...)``."""

    observer: PrometheusObserver
    registry: CollectorRegistry
    host: str
    port: int
    depth: Optional[QueueDepthCollector]
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _registered: list[Collector] = field(default_factory=list, repr=False)  # until close()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving, and take what the server registered back out of its registry: a
        caller's registry may be served elsewhere too, where the closed depth collector
        opened a connection at each collect that nothing closed, and a new server on it
        failed with prometheus-client's duplicated-timeseries ValueError."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        registered, self._registered = self._registered, []  # once: close() may be called again
        for collector in registered:
            self.registry.unregister(collector)
        if self.depth is not None:
            self.depth.close()


def start_metrics_server(
    port: int,
    host: str = "127.0.0.1",
    *,
    database_url: Optional[str] = None,
    schema: str = DEFAULT_SCHEMA,
    registry: Optional[CollectorRegistry] = None,
    depth_ttl: float = 10.0,
) -> MetricsServer:
    """Serve ``/metrics`` from a daemon thread; ``port=0`` picks a free port.

    Binds loopback unless told otherwise: metrics reveal queue names and load, so
    exposing them (``host="0.0.0.0"``) is a deliberate choice. Without ``registry`` a
    private one (with process metrics) is created; a ``registry`` that has a
    :class:`PrometheusObserver` already is served with that one. With ``database_url`` the
    queue depth collector is registered too.
    """
    reg = registry if registry is not None else _default_registry()
    # Bound first: a failed bind must leave the caller's registry as it was (with the
    # observer's metrics left in it, the retry on another port failed as a duplicate).
    try:
        server, thread = start_http_server(port, addr=host, registry=reg)
    except (OSError, OverflowError, UnicodeError) as exc:  # taken, not ours, out of range: one clear line
        # UnicodeError: no host name the idna codec can write (a label past 63 characters,
        # an empty one, a byte that is not UTF-8): it was a traceback.
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from exc
    # A caller's registry may hold the observer its workers report to already: serve that
    # one, and leave it registered on close(), as it is the caller's.
    observer = _observer_in(reg)
    made = observer is None
    try:
        depth = None if database_url is None else QueueDepthCollector(database_url, schema, ttl=depth_ttl)
        if observer is None:
            observer = PrometheusObserver(reg)
        if depth is not None:
            _register_depth(reg, depth)
    except BaseException:
        for collector in observer.collectors() if made and observer is not None else []:  # the retry must find none
            reg.unregister(collector)
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        raise
    registered = [*(observer.collectors() if made else []), *([] if depth is None else [depth])]
    return MetricsServer(observer, reg, host, int(server.server_port), depth, server, thread, registered)


_SERVERS: list[MetricsServer] = []  # the CLI's server lives as long as the process


DEPTH_TTL_ENV = "SA_JOBS_METRICS_DEPTH_TTL"


def _depth_ttl_from_env() -> Optional[float]:
    """``SA_JOBS_METRICS_DEPTH_TTL``: seconds between depth queries; ``0``/``off`` disables them."""
    raw = os.environ.get(DEPTH_TTL_ENV, "").strip().lower()
    if not raw:
        return 10.0
    ttl = _validate.decimal_number(raw)  # ASCII digits: float() also took 'nan', '1_0', full-width digits
    if raw in ("off", "false", "no") or ttl == 0:  # 0.0 too, as 0
        return None
    if ttl is None or not 0 < ttl < float("inf"):  # a ConfigurationError: the CLI prints one line, not a traceback
        raise ConfigurationError(f"{DEPTH_TTL_ENV} must be a positive number of seconds or 'off', not {raw!r}")
    return ttl


def serve_worker_metrics(port: int, host: str = "127.0.0.1", *, schema: str, database_url: str) -> PrometheusObserver:
    """What ``sa-jobs worker --metrics-port`` runs: serve until the process exits.

    With many worker processes, let one (or a few) run the depth query: set
    ``SA_JOBS_METRICS_DEPTH_TTL=off`` on the others.
    """
    ttl = _depth_ttl_from_env()
    server = start_metrics_server(port, host, database_url=database_url if ttl else None, schema=schema,
                                  depth_ttl=ttl or 10.0)
    _SERVERS.append(server)
    log.info("serving Prometheus metrics on %s", server.url)
    return server.observer


# The collector whose snapshot make_asgi_app's request just brought up to date in a thread:
# its collect, run on the event loop by prometheus-client's ASGI app, must not query.
_taken_in_thread: contextvars.ContextVar[Optional[QueueDepthCollector]] = contextvars.ContextVar(
    "sa_jobs.metrics.depth_taken_in_thread", default=None)


def make_asgi_app(
    registry: Optional[CollectorRegistry] = None,
    *,
    database_url: Optional[str] = None,
    schema: str = DEFAULT_SCHEMA,
    depth_ttl: float = 10.0,
) -> Callable[..., Any]:
    """An ASGI app serving ``registry`` (default: the global one), to mount at ``/metrics``.

    Pass the same registry to :class:`PrometheusObserver` for the Worker you embed. With
    ``database_url`` the queue depth collector is registered into ``registry`` as well.
    """
    reg = REGISTRY if registry is None else registry
    app = _prometheus_asgi_app(reg)
    if database_url is None:
        return app
    depth = QueueDepthCollector(database_url, schema, ttl=depth_ttl)
    _register_depth(reg, depth)

    async def metrics_app(scope: Any, receive: Any, send: Any) -> None:
        # prometheus-client collects on the event loop, which also runs the app and the
        # Worker embedded in it: a due depth query (up to its 2 s timeouts, or a connect to
        # a server that does not answer) held them all still. It runs in a thread first,
        # and the collect that follows serves that snapshot: it may have aged past the TTL
        # meanwhile (a scrape interval equal to the TTL lands on it), and queried again.
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        await anyio.to_thread.run_sync(depth.snapshot)
        token = _taken_in_thread.set(depth)
        try:
            await app(scope, receive, send)
        finally:
            _taken_in_thread.reset(token)

    return metrics_app


__all__ = [
    "MetricsServer",
    "PrometheusObserver",
    "QueueDepthCollector",
    "depth_query",
    "make_asgi_app",
    "serve_worker_metrics",
    "start_metrics_server",
]
