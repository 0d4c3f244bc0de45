"""The benchmark harness's own accounting: orders of the limits rounds, and (on a private
cluster, tiny sizes) that its drains and enqueues count what they claim to count."""

from __future__ import annotations

import pytest

from benchmarks.limits import round_orders


@pytest.mark.parametrize("n", range(4, 26))
def test_limits_rounds_never_keep_a_variant_after_the_same_one(n):
    variants = [f"v{i}" for i in range(n)]
    for runs in range(2, n + 1):
        orders = round_orders(variants, runs)
        assert [sorted(o) for o in orders] == [sorted(variants)] * runs
        for v in variants:
            places = [o.index(v) for o in orders]
            assert len(set(places)) == runs, (v, orders)  # every round in another place
            before = [o[o.index(v) - 1] for o in orders if o.index(v) > 0]
            assert len(before) < runs or len(set(before)) > 1, (v, orders)
            if n % 2 == 0:  # a Williams design: each ordered pair at most once in n rounds
                assert len(set(before)) == len(before), (v, orders)


# --- On a private cluster: drivers that misbehave in one way each, around the plain baseline.

PLAIN = "benchmarks/drivers/plain.py"
PRELUDE = '''
import json, runpy, sys, time
from pathlib import Path
DRIVERS = Path(@DRIVERS@)
sys.path.insert(0, str(DRIVERS))
import _proto
a = _proto.parser().parse_args()
'''
RUN_PLAIN = "runpy.run_path(str(DRIVERS / 'plain.py'), run_name='__main__')\n"

# The checker's pending query burns about a second of server CPU per call.
SLOW_CHECK = PRELUDE + '''
if a.command == "info":
    _proto.emit({"system": "plain, slow pending query", "version": "0", "driver": "psycopg",
                 "pending_sql": "SELECT count(*) FROM plain_jobs WHERE state <> 'done'"
                                " AND (SELECT count(*) FROM generate_series(1, 10000000)) > 0",
                 "verify_sql": "SELECT count(*) FILTER (WHERE state = 'done'),"
                               " count(*) FILTER (WHERE state <> 'done'), count(*) FROM plain_jobs"})
else:
''' + "    " + RUN_PLAIN

# Enqueues one job fewer than asked (and says so in its own JSON).
SHORT_ENQUEUE = PRELUDE + '''
if a.command == "enqueue":
    i = sys.argv.index("--n")
    sys.argv[i + 1] = str(int(sys.argv[i + 1]) - 1)
''' + RUN_PLAIN

# Spends about a second of server CPU on its own start-up before enqueueing as plain does.
SLOW_START_ENQUEUE = PRELUDE + """
if a.command == "enqueue":
    import psycopg
    with psycopg.connect(a.dsn) as c:
        c.execute("SELECT count(*) FROM generate_series(1, 10000000)").fetchone()
""" + RUN_PLAIN

# A worker that claims every job, spends 2 ms of CPU on each, then starts them all at once.
BURST = PRELUDE + '''
if a.command == "worker":
    import psycopg
    conn = psycopg.connect(a.dsn, autocommit=True)
    _proto.say("ready")
    _proto.wait_for("go")
    _proto.start_progress()
    rows = conn.execute("UPDATE plain_jobs SET state = 'running' RETURNING id, args").fetchall()
    end = time.process_time() + 0.002 * len(rows)
    while time.process_time() < end:
        pass
    for _id, args in rows:
        _proto.record(args["n"])
    conn.execute("UPDATE plain_jobs SET state = 'done'")
    _proto.wait_for("stop")
    _proto.finish_worker(a.out)
else:
''' + "    " + RUN_PLAIN


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("psutil")
    try:
        from benchmarks.cluster import Cluster, find_bin_dir

        find_bin_dir()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no PostgreSQL binaries for the benchmark cluster: {exc}")
    with Cluster() as c:
        yield c


def _system(cluster, tmp_path, name, text):
    import sys

    from benchmarks.runner import DRIVERS, System

    path = tmp_path / f"{name}.py"
    path.write_text(text.replace("@DRIVERS@", repr(str(DRIVERS))))
    s = System(name, str(path.with_suffix("")), sys.executable)  # DRIVERS / an absolute path
    s.dsn = cluster.create_database(f"bench_{name}")
    s.info = s.run_json("info")
    return s


def test_drain_server_cpu_leaves_out_the_checkers_own_queries(cluster, tmp_path):
    from benchmarks.runner import drain_once

    s = _system(cluster, tmp_path, "slow_check", SLOW_CHECK)
    r = drain_once(cluster, s, workers=1, concurrency=100, n=1000)
    assert r["verify"]["ok"]
    # plain costs tens of µs per job; each of the checker's polls about 1,000 µs per job here
    assert r["server_cpu_us_per_job"] < 300, r["server_cpu_us_per_job"]


def test_enqueue_that_loses_a_job_is_not_reported(cluster, tmp_path):
    from benchmarks.runner import enqueue_once

    s = _system(cluster, tmp_path, "short_enqueue", SHORT_ENQUEUE)
    for mode in ("single", "bulk"):
        with pytest.raises(RuntimeError, match="enqueue"):
            enqueue_once(cluster, s, mode=mode, n=50)
    plain = _system(cluster, tmp_path, "plain_enqueue", PRELUDE + RUN_PLAIN)
    assert enqueue_once(cluster, plain, mode="bulk", n=50)["jobs_per_s"] > 0


def test_target_drain_cpu_is_per_job_run_in_the_measured_window(cluster, tmp_path):
    from benchmarks.runner import drain_once

    s = _system(cluster, tmp_path, "burst", BURST)
    r = drain_once(cluster, s, workers=1, concurrency=10, n=200, target=20)
    # 2 ms of client CPU per job, and all 200 ran before the harness stopped its meters
    assert 1500 < r["client_cpu_us_per_job"] < 4000, r["client_cpu_us_per_job"]


# sa-jobs' own tables and info, and a worker whose graceful stop mixes up two jobs: job 0 ran
# but is put back to 'available' (it would run again), job 10 never ran but is left 'running'.
SWAPPED_STOP = '''
import runpy, sys
from pathlib import Path
DRIVERS = Path(@DRIVERS@)
sys.path.insert(0, str(DRIVERS))
import _proto
a = _proto.parser().parse_args()
if a.command == "worker":
    import psycopg
    conn = psycopg.connect(a.dsn, autocommit=True)
    _proto.say("ready")
    _proto.wait_for("go")
    _proto.start_progress()
    conn.execute("UPDATE sa_jobs.jobs SET state = 'running', attempt = 1, attempted_at = now(),"
                 " claim_token = gen_random_uuid(), lease_owner = 'x', lease_expires_at = now() + interval '1 h'"
                 " WHERE (args->>'n')::int <= 10")
    for n in range(10):
        _proto.record(n)
    conn.execute("UPDATE sa_jobs.jobs SET state = 'completed', finished_at = now()"
                 " WHERE (args->>'n')::int BETWEEN 1 AND 9")
    conn.execute("UPDATE sa_jobs.jobs SET state = 'available', attempt = 0, claim_token = NULL,"
                 " lease_owner = NULL, lease_expires_at = NULL WHERE (args->>'n')::int = 0")
    _proto.wait_for("stop")
    _proto.finish_worker(a.out)
else:
    runpy.run_path(str(DRIVERS / "sajobs.py"), run_name="__main__")
'''


def test_partial_drain_check_ties_each_handled_job_to_its_row(cluster, tmp_path):
    from benchmarks.runner import drain_once

    s = _system(cluster, tmp_path, "swapped_stop", SWAPPED_STOP)
    with pytest.raises(RuntimeError, match="exactly-once check failed"):
        drain_once(cluster, s, workers=1, concurrency=10, n=50, target=10)


def test_enqueue_server_cpu_is_that_of_the_timed_section(cluster, tmp_path):
    """The figure is per timed job: a driver's start-up (connections, warm-up, here a slow
    query) is not in its jobs/s and must not be in its CPU per job either (systems are
    enqueued with different n, so a fixed cost would weigh differently on each)."""
    from benchmarks.runner import enqueue_once

    s = _system(cluster, tmp_path, "slow_start_enqueue", SLOW_START_ENQUEUE)
    r = enqueue_once(cluster, s, mode="bulk", n=200)
    assert r["server_cpu_us_per_job"] < 1000, r["server_cpu_us_per_job"]


# sa-jobs' own driver, with a handler that records the producer's warm-up job (n = -1) twice.
WARMUP_TWICE = '''
import runpy, sys
from pathlib import Path
DRIVERS = Path(@DRIVERS@)
sys.path.insert(0, str(DRIVERS.parents[1]))
from benchmarks.drivers import _proto
record = _proto.record
_proto.record = lambda n: [record(n) for _ in range(2 if n == -1 else 1)] and None
runpy.run_path(str(DRIVERS / "sajobs.py"), run_name="__main__")
'''


def test_latency_check_counts_the_warm_up_job_too(cluster, tmp_path):
    from benchmarks.runner import latency_once

    s = _system(cluster, tmp_path, "warmup_twice", WARMUP_TWICE)
    with pytest.raises(RuntimeError, match="lost or duplicated"):
        latency_once(cluster, s, rate=50, seconds=1, workers=1)


@pytest.mark.parametrize("argv", [
    ["benchmarks", "run", "--runs", "0", "--peers", "none", "--only", "none"],
    ["benchmarks.limits", "--runs", "0", "--variants", "none", "--n", "10"],
    ["benchmarks.limits", "--runs", "-1", "--variants", "none", "--n", "10"],
    ["benchmarks.limits", "--n", "0", "--runs", "1", "--variants", "none"],
])
def test_benchmark_commands_refuse_a_run_count_or_size_below_one(argv, tmp_path):
    """No figure is a median of zero runs ('--runs 0' ran the default 3 without a word, or
    failed on an empty list after starting the cluster)."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", *argv, "--out", str(tmp_path / "x.json")],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "at least 1" in proc.stderr


def test_benchmark_run_refuses_an_unknown_peer_before_starting_anything(tmp_path):
    """'--peers none,plain' read 'none' as a peer's name and failed with a KeyError while
    setting up the peers' virtualenv."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--tiny", "--peers", "none,plain",
                           "--out", str(tmp_path / "x.json")],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "--peers: unknown 'none'" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_server_cpu_never_drops_while_backends_exit(cluster):
    """A backend reaped between the postmaster's read and its own is in neither: the server's
    CPU would dip by that backend's whole time and come back in the next sample, which lands a
    closed start-up connection's CPU in whichever timed section is sampled next."""
    import threading

    import psycopg

    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(cluster.cpu_seconds())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(40):
            conns = [psycopg.connect(cluster.url(), autocommit=True) for _ in range(3)]
            for c in conns:
                c.execute("SELECT count(*) FROM generate_series(1, 300000)").fetchone()
            for c in conns:
                c.close()
    finally:
        done.set()
        sampler.join()
    drops = [(a, b) for a, b in zip(samples, samples[1:]) if b < a - 0.02]
    assert len(samples) > 100
    assert not drops, drops[:5]
