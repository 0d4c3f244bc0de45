"""R16: a REPEATABLE READ transaction pins xmin during a steady load.

With finished rows in the table (100,000 by default, 1,000,000 under ``-m slow``) and
two workers draining a steady stream of jobs, one session opens a REPEATABLE READ
transaction, reads, and holds its snapshot (15 s by default, 2 minutes under
``-m slow``). Nothing can be vacuumed or pruned meanwhile: every claimed job leaves a
dead version behind, and the claim index keeps an entry for it that no one may remove.

The workers notice the held horizon (sa_jobs.maintenance.horizon) and claim past their
previous batch. Sampled every ~2 s with ``EXPLAIN (ANALYZE, BUFFERS)`` of the library's
resumed claim past the last claimed job (batch 10, in a transaction rolled back): an
Index Scan on ``jobs_claim_idx`` reading a small multiple of the batch, however long the
pin. Over the pin after they noticed, every claim the workers ran (from
``pg_stat_user_indexes``: rescans from the start included) reads on average a small
fraction of what a claim from the start reads; the finished rows cost nothing; the
workers keep up (no backlog, and it recovers after release);
``pg_stat_database.deadlocks`` is unchanged over the run.

A claim from the start of the queue still walks every entry left since the pin: that is
PostgreSQL MVCC, not the claim statement (strict xfail below; docs/reliability.md,
Finding 6). Workers run one only every ``HELD_RESCAN_INTERVAL`` while the horizon is held,
for the jobs that land behind their resume point.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from sa_jobs.maintenance.horizon import HELD_AFTER
from sa_jobs.queries import Queries

from .support import Sampler, WorkerProc, wait_for

BATCH = 10
RATE = 10  # jobs per tick
TICK = 0.1  # s: 100 jobs/s


def _scan_node(plan: dict) -> dict:
    """The scan of the jobs table inside the claim's CTE (below LockRows, past the Result
    that evaluates the paused-queue check once)."""
    def find(node: dict, below_lock: bool) -> dict | None:
        if below_lock and node.get("Relation Name") == "jobs":
            return node
        for child in node.get("Plans", []):
            found = find(child, below_lock or node.get("Node Type") == "LockRows")
            if found is not None:
                return found
        return None

    node = find(plan, False)
    assert node is not None, plan
    return node


# Where a worker's next claim resumes: past the last job claimed (ids rise with the
# stream, so the newest claimed row is near the top of the primary key).
LAST_CLAIMED = ('SELECT priority, scheduled_at, id FROM {jobs} WHERE id = (SELECT max(id) FROM {jobs}'
                " WHERE state <> 'available')")


def _probe(url: str, schema: str, *, resumed: bool = False):
    """EXPLAIN ANALYZE of the library's claim (rolled back): from the start of the queue,
    or, ``resumed``, past the last claimed job, as a worker claims while the horizon is held."""
    queries = Queries.for_schema(schema)
    conn = psycopg.connect(url, autocommit=True)
    last = LAST_CLAIMED.replace("{jobs}", f'"{schema}".jobs')

    def probe() -> tuple[str, int, int, float]:
        params = {"queue": "steady", "limit": BATCH, "token": uuid.uuid4(), "owner": "probe", "lease": 1}
        with conn.transaction(force_rollback=True):
            if resumed:
                p, at, i = conn.execute(last).fetchone()
                params.update(after_priority=p, after_scheduled=at, after_id=i)
            (plan,) = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
                                   + (queries.claim_after if resumed else queries.claim), params).fetchone()
        node = _scan_node(plan[0]["Plan"])
        kind = node["Node Type"] + ":" + node.get("Index Name", "-")
        pages = node["Shared Hit Blocks"] + node["Shared Read Blocks"]
        return kind, pages, node["Actual Rows"], plan[0]["Execution Time"]

    return probe, conn


def _run(db, rel_url: str, rel_schema: str, workers, finished: int, pin: float) -> dict:
    started = time.monotonic()
    db.q("INSERT INTO {jobs} (kind, queue, state, attempt, attempted_at, finished_at)"
         " SELECT 'rel_noop', 'steady', 'completed', 1, now(), now() FROM generate_series(1, %s)", (finished,))
    db.q("VACUUM ANALYZE {jobs}")
    loaded = time.monotonic() - started
    deadlocks = db.q("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()", raw=True)[0][0]
    ws = [WorkerProc(rel_url, rel_schema, "--queue", "steady=8", "--lease", "10", "--maintenance-interval", "0.5",
                     "--poll-interval", "0.5") for _ in range(2)]
    workers += ws

    halt = threading.Event()
    inserted = [0]

    def load() -> None:
        with psycopg.connect(rel_url, autocommit=True) as conn:
            ins = f'INSERT INTO "{rel_schema}".jobs (kind, queue) SELECT \'rel_noop\', \'steady\' FROM generate_series(1, %s)'
            nxt = time.monotonic()
            while not halt.is_set():
                conn.execute(ins, (RATE,))
                inserted[0] += RATE
                nxt += TICK
                halt.wait(max(0.0, nxt - time.monotonic()))

    def backlog() -> int:
        return db.one("SELECT count(*) FROM {jobs} WHERE state = 'available'")

    def claim_index_reads() -> tuple[int, int]:
        """(scans, entries read) of jobs_claim_idx so far: the workers' claims, all of them."""
        return db.q("SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE schemaname = %s"
                    " AND indexrelname = 'jobs_claim_idx'", (rel_schema,), raw=True)[0]

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    probe, probe_conn = _probe(rel_url, rel_schema)
    resumed_probe, resumed_conn = _probe(rel_url, rel_schema, resumed=True)
    pin_conn = psycopg.connect(rel_url)
    try:
        # Steady state first: the workers keep up with the stream.
        assert wait_for(lambda: db.one("SELECT count(*) FROM {jobs} WHERE state = 'completed'") > finished + 300, 60), \
            [w.output() for w in ws]
        before = [probe() for _ in range(3)]
        backlog_before = max(backlog() for _ in range(3))

        pin_conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        pin_conn.execute(f'SELECT count(*) FROM "{rel_schema}".jobs WHERE id < 10').fetchone()
        xmin = db.q("SELECT backend_xmin FROM pg_stat_activity WHERE pid = %s", (pin_conn.info.backend_pid,), raw=True)
        assert xmin and xmin[0][0] is not None
        done_at_pin = db.one("SELECT count(*) FROM {jobs} WHERE state = 'completed'")
        sampler = Sampler(lambda: (resumed_probe(), backlog()), every=2.0)
        pin_started = time.monotonic()
        sampler.start()
        # The workers see the held horizon within HELD_AFTER plus a maintenance tick; from
        # then on, count what their claims read. The pin itself is a fixed hold, not a
        # wait for a condition.
        time.sleep(HELD_AFTER + 2.0)
        window_start = time.monotonic()
        scans0, read0 = claim_index_reads()
        time.sleep(max(0.0, pin - (window_start - pin_started)))
        scans1, read1 = claim_index_reads()
        window = time.monotonic() - window_start
        samples = sampler.stop()
        from_start = probe()  # what a claim from the start (a worker's rescan) reads now
        done_in_pin = db.one("SELECT count(*) FROM {jobs} WHERE state = 'completed'") - done_at_pin
        pin_conn.rollback()
        released = time.monotonic()
        held = released - pin_started

        # Recovery: the backlog comes back to where it was before the pin.
        assert wait_for(lambda: backlog() <= max(backlog_before, 2 * RATE) + 2 * RATE, 60), backlog()
        recovered = time.monotonic() - released
        after = [probe() for _ in range(3)]
    finally:
        halt.set()
        loader.join(10)
        pin_conn.close()
        probe_conn.close()
        resumed_conn.close()
    assert all(w.alive() for w in ws), [w.output() for w in ws]
    noticed = sum("xmin horizon held" in w.output() for w in ws)
    assert db.q("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()", raw=True)[0][0] == deadlocks
    plans = [s[0] for s in samples]
    kinds = {p[0] for p in before + plans + after}
    pages = [p[1] for p in plans]
    ms = [p[3] for p in plans]
    scans, read = scans1 - scans0, read1 - read0
    print(f"\nR16: {finished} finished rows loaded in {loaded:.1f}s; stream {RATE / TICK:.0f} jobs/s, 2 workers;"
          f" xmin pinned {held:.1f}s ({done_in_pin} jobs completed meanwhile), noticed by {noticed}/2 workers;"
          f" resumed claim (batch {BATCH}) scan: {sorted(kinds)}, pages touched before {[p[1] for p in before]},"
          f" during {pages}, after {[p[1] for p in after]}; resumed claim execution ms during"
          f" {min(ms):.2f}-{max(ms):.2f}; a claim from the start at the end of the pin: {from_start[1]} pages,"
          f" {from_start[3]:.2f} ms; the workers' claims in the last {window:.0f} s of the pin: {scans} index scans,"
          f" {read} entries read ({read / max(1, scans):.0f} per scan); backlog before {backlog_before},"
          f" during max {max(s[1] for s in samples)}, recovered to {backlog()} {recovered:.1f}s after release;"
          f" deadlocks +0")
    return {"kinds": kinds, "pages": pages, "ms": ms, "done_in_pin": done_in_pin, "before": before, "after": after,
            "backlog_during": [s[1] for s in samples], "noticed": noticed, "scans": scans, "read": read,
            "from_start": from_start}


def _check(r: dict) -> None:
    assert r["kinds"] == {"Index Scan:jobs_claim_idx"}, r["kinds"]
    # Finished rows cost the claim nothing (outside the partial index): without a pin a
    # claim touches a page or two whatever the table holds.
    assert max(p[1] for p in r["before"]) <= 5 * BATCH, r["before"]
    # Both workers noticed the held horizon and claimed past their previous batch: such a
    # claim reads a small multiple of the batch however long the pin lasts.
    assert r["noticed"] == 2
    assert max(r["pages"]) <= 5 * BATCH, (r["pages"], r["done_in_pin"])
    assert max(r["ms"]) < 100, r["ms"]
    # A claim from the start (the workers' rescans) costs in proportion to the jobs
    # claimed since the pin (their dead index entries), never to the table: about one
    # page per 20 claimed jobs.
    assert r["from_start"][1] <= 5 * BATCH + r["done_in_pin"] / 10, (r["from_start"], r["done_in_pin"])
    # Every claim the workers ran, rescans from the start included: before, each read
    # every entry left since the pin (on average over half of what the pin ended with).
    assert r["scans"] > 20 and r["read"] / r["scans"] <= r["done_in_pin"] / 8, (r["scans"], r["read"], r["done_in_pin"])
    # The workers kept up with the stream throughout (no growing backlog).
    assert max(r["backlog_during"]) < 20 * RATE, r["backlog_during"]


@pytest.fixture(scope="module")
def r16(cluster):
    """One default-size run shared by the two tests below (it costs ~20 s)."""
    from sa_jobs import schema as schema_mod

    from .support import Db, setup_schema

    cluster.wait_ready(60)
    schema = "r_" + uuid.uuid4().hex[:12]
    schema_mod.install(cluster.url, schema)
    setup_schema(cluster.url, schema)
    db = Db(cluster.url, schema)
    started: list[WorkerProc] = []
    try:
        yield _run(db, cluster.url, schema, started, finished=100_000, pin=15.0)
    finally:
        for w in started:
            w.close()
        db.q("DROP SCHEMA {} CASCADE".format(f'"{schema}"'), raw=True)
        db.close()


def test_r16_xmin_pin_during_steady_load(r16):
    _check(r16)


@pytest.mark.xfail(strict=True, reason="PostgreSQL MVCC, not fixable in the claim statement: while a snapshot pins"
                   " xmin, the claim index keeps an entry for every job claimed since, pointing to a version no one may"
                   " remove yet, and a claim from the start of the queue walks past them (about one page per 20 jobs"
                   " claimed during the pin). Workers run one only every HELD_RESCAN_INTERVAL while the horizon is held")
def test_r16_claim_from_the_start_reads_small_multiple_of_batch_while_pinned(r16):
    assert r16["from_start"][1] <= 5 * BATCH, r16["from_start"]


@pytest.mark.slow
def test_r16_xmin_pin_during_steady_load_full(db, rel_url, rel_schema, workers):
    """The issue's size: 1,000,000 finished rows, xmin pinned for 2 minutes."""
    _check(_run(db, rel_url, rel_schema, workers, finished=1_000_000, pin=120.0))
