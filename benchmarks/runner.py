"""Orchestrates the scenarios: drives each system's driver script in subprocesses, times
drains from SQL, samples CPU (server: the postmaster's process tree; client: the worker
processes) and RSS with psutil, and verifies exactly-once from SQL after every drain."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import psycopg

from .cluster import Cluster

HERE = Path(__file__).resolve().parent
DRIVERS = HERE / "drivers"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class System:
    name: str            # label in the table, e.g. "pgqueuer (asyncpg)"
    driver: str          # drivers/<driver>.py
    python: str          # interpreter that has the system installed
    dsn: str = ""
    variant: str = ""    # passed as --variant (e.g. the pgqueuer driver)
    info: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    skip: tuple = ()     # scenarios this system does not take part in
    drain_scale: float = 1.0  # fraction of the mode's drain size (a poll-bound peer, to bound runtime)

    def argv(self, command: str, **opts: Any) -> list[str]:
        argv = [self.python, str(DRIVERS / f"{self.driver}.py"), command, "--dsn", self.dsn]
        if self.variant:
            argv += ["--variant", self.variant]
        for k, v in opts.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        return argv

    def run(self, command: str, timeout: float = 3600, **opts: Any) -> str:
        proc = subprocess.run(self.argv(command, **opts), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})
        if proc.returncode != 0:
            raise RuntimeError(f"{self.name} {command} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return proc.stdout

    def run_json(self, command: str, **opts: Any) -> Any:
        lines = [ln for ln in self.run(command, **opts).splitlines() if ln.startswith("{")]
        return json.loads(lines[-1])


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def _proc_cpu(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for c in p.children(recursive=True):
            try:
                ct = c.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


def _proc_rss(p: psutil.Process) -> int:
    try:
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
    except psutil.Error:
        return 0


class WorkerProc:
    def __init__(self, system: System, concurrency: int, max_claim: int, out: str) -> None:
        opts: dict[str, Any] = {"concurrency": concurrency, "out": out}
        if max_claim:
            opts["max_claim"] = max_claim
        self.out = out
        self.popen = subprocess.Popen(
            system.argv("worker", **opts), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, env={**os.environ, **system.env},
        )
        self.ps = psutil.Process(self.popen.pid)
        self.progress = 0
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.startswith("p "):
                self.progress = int(line[2:])
            elif line.startswith("ready"):
                self.ready.set()
            elif line.startswith("stopped"):
                self.progress = int(line.split()[1])
                self.stopped.set()

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.stderr_tail = (self.stderr_tail + [line])[-40:]

    def send(self, word: str) -> None:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(word + "\n")
            self.popen.stdin.flush()
        except BrokenPipeError:
            pass

    def wait_ready(self, timeout: float = 120) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError("worker not ready:\n" + "".join(self.stderr_tail))

    def finish(self, timeout: float = 120) -> None:
        self.send("stop")
        if not self.stopped.wait(timeout):
            self.popen.kill()
            raise RuntimeError("worker did not stop:\n" + "".join(self.stderr_tail))
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def read_handled(paths: list[str]) -> list[tuple[int, float]]:
    rows = []
    for p in paths:
        with open(p) as f:
            for line in f:
                n, t = line.split("\t")
                rows.append((int(n), float(t)))
    return rows


def verify_sql(system: System, handled: list[tuple[int, float]], n_expected: int, completed_preload: int,
               full: bool) -> dict[str, Any]:
    """From SQL: every handled n is distinct and in range, and the system's own table agrees."""
    with psycopg.connect(system.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_handled")
        conn.execute("CREATE UNLOGGED TABLE bench_handled (n bigint NOT NULL)")
        with conn.cursor() as cur, cur.copy("COPY bench_handled (n) FROM STDIN") as copy:
            for n, _ in handled:
                copy.write_row((n,))
        total, distinct, in_range = conn.execute(
            "SELECT count(*), count(DISTINCT n), count(*) FILTER (WHERE n >= 0 AND n < %s) FROM bench_handled",
            (n_expected,)).fetchone()
        finished, other, rows = conn.execute(system.info["verify_sql"]).fetchone()
        stuck = conn.execute(system.info["stuck_sql"]).fetchone()[0] if "stuck_sql" in system.info else 0
        # Counts alone balance a handled job put back to wait (it would run again) against an
        # unhandled one left 'running': where a driver can, tie each handled n to its row.
        mismatched = (conn.execute(system.info["mismatch_sql"]).fetchone()[0]
                      if "mismatch_sql" in system.info else 0)
        conn.execute("DROP TABLE bench_handled")
    finished -= completed_preload
    if full:
        ok = total == distinct == in_range == finished == n_expected and other == 0
    else:
        # A partial drain stops workers mid-flight: a handled job must be finished, or (a
        # shutdown that did not flush its outcome) still 'running', to be rescued later.
        ok = total == distinct == in_range and finished + stuck == distinct
    ok = ok and mismatched == 0
    return {"ok": ok, "handled": total, "distinct": distinct, "in_range": in_range,
            "rows_not_matching_handled": mismatched, "finished_in_sql": finished, "not_finished_in_sql": other,
            "rows": rows, "running_after_workers_exited": stuck}


def drain_once(cluster: Cluster, system: System, *, workers: int, concurrency: int, n: int,
               completed: int = 0, target: Optional[int] = None, max_claim: int = 0,
               timeout: Optional[float] = None, rss_every: float = 0.5) -> dict[str, Any]:
    """Load n jobs (plus `completed` finished rows), start `workers` processes, time the drain.

    target=None: drain everything; the end is when SQL shows no job pending.
    target=k: stop at the k-th handler start (claim cost with a large backlog), by start times.
    """
    system.run("setup")
    system.run("load", n=n, completed=completed)
    tmp = tempfile.mkdtemp(prefix="bench_handled_")
    procs = [WorkerProc(system, concurrency, max_claim, f"{tmp}/w{i}.tsv") for i in range(workers)]
    timeout = timeout or (120 + n / 200)
    conn: Optional[psycopg.Connection] = None
    try:
        for p in procs:
            p.wait_ready()
        # The checker's connection opens before the meters start, and its backend's CPU
        # (the pending polls) is taken out of the server's: it is the harness's, not the system's.
        conn = psycopg.connect(system.dsn, autocommit=True)
        checker = conn.info.backend_pid
        time.sleep(0.2)
        la0 = loadavg()
        checker0 = cluster.backend_cpu_seconds(checker)
        server0 = cluster.cpu_seconds()
        wal0 = wal_counters(conn)
        client0 = sum(_proc_cpu(p.ps) for p in procs)
        rss_start = [_proc_rss(p.ps) for p in procs]
        rss_samples: list[tuple[float, int, int]] = []
        t0_wall = time.time()
        t0 = time.perf_counter()
        for p in procs:
            p.send("go")
        goal = n if target is None else target
        next_rss = t0
        with conn:
            while True:
                now = time.perf_counter()
                done = sum(p.progress for p in procs)
                if now >= next_rss:
                    rss_samples.append((round(now - t0, 3), done, sum(_proc_rss(p.ps) for p in procs)))
                    next_rss = now + rss_every
                if now - t0 > timeout:
                    raise RuntimeError(f"{system.name}: drain timed out at {done}/{goal}")
                for p in procs:
                    if p.popen.poll() is not None:
                        raise RuntimeError(f"{system.name}: worker exited:\n" + "".join(p.stderr_tail))
                if done >= goal:
                    if target is not None:
                        break
                    if conn.execute(system.info["pending_sql"]).fetchone()[0] == 0:
                        break
                    time.sleep(0.002)
                else:
                    time.sleep(0.01)
            t_end = time.perf_counter()
            t_end_wall = time.time()
            server1 = cluster.cpu_seconds()
            checker1 = cluster.backend_cpu_seconds(checker)
            client1 = sum(_proc_cpu(p.ps) for p in procs)
        rss_end = [_proc_rss(p.ps) for p in procs]
        la1 = loadavg()
        for p in procs:
            p.finish()
        handled = read_handled([p.out for p in procs])
        # Read once the workers have gone: a backend reports its WAL counters when it
        # exits or goes idle for a second, so a read at the drain's end would miss some.
        with psycopg.connect(system.dsn, autocommit=True) as after:
            wal1 = wal_counters(after)
    finally:
        if conn is not None:
            conn.close()
        for p in procs:
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    starts = sorted(t for _, t in handled)
    if target is None:
        elapsed = t_end - t0
        counted = cpu_jobs = n
    else:
        counted = target
        elapsed = starts[target - 1] - t0_wall
        # The meters stop when the harness sees the target reached, by then more jobs have
        # started: CPU is per job started in the metered window, not per target job.
        cpu_jobs = max(target, sum(1 for t in starts if t <= t_end_wall))
    check = verify_sql(system, handled, n, completed, full=target is None)
    if not check["ok"]:
        raise RuntimeError(f"{system.name}: exactly-once check failed: {check}")
    result = {
        "jobs_per_s": counted / elapsed,
        "seconds": elapsed,
        "jobs": counted,
        "server_cpu_us_per_job": ((server1 - server0) - (checker1 - checker0)) / cpu_jobs * 1e6,
        "client_cpu_us_per_job": (client1 - client0) / cpu_jobs * 1e6,
        "cpu_jobs": cpu_jobs,
        # Cluster-wide WAL per job (autovacuum included): unlike CPU time or throughput,
        # it does not move with the host's load, so small differences in the work each
        # job's statements do show through a noisy machine.
        **({f"{k}_per_job": (wal1[k] - wal0[k]) / cpu_jobs for k in wal0} if wal0 and wal1 else {}),
        "rss_start_mb": [round(r / 2**20, 1) for r in rss_start],
        "rss_end_mb": [round(r / 2**20, 1) for r in rss_end],
        "rss_samples": rss_samples if len(rss_samples) <= 50 else rss_samples[:: max(1, len(rss_samples) // 50)],
        "loadavg_before": la0, "loadavg_after": la1,
        "verify": check,
    }
    # Throughput in the first and last tenth of the jobs, from handler start times.
    if len(starts) >= 1000:
        k = len(starts) // 10
        result["first_tenth_jobs_per_s"] = k / max(1e-9, starts[k - 1] - t0_wall)
        result["last_tenth_jobs_per_s"] = k / max(1e-9, starts[-1] - starts[-k - 1])
    return result


def wal_counters(conn: psycopg.Connection) -> dict[str, float]:
    """The server's WAL counters (pg_stat_wal, PostgreSQL 14+; empty before)."""
    if conn.info.server_version < 140000:
        return {}
    row = conn.execute("SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal").fetchone()
    return {"wal_records": float(row[0]), "wal_fpi": float(row[1]), "wal_bytes": float(row[2])}


def latency_once(cluster: Cluster, system: System, *, rate: float, seconds: float, workers: int = 2,
                 concurrency: int = 10) -> dict[str, Any]:
    system.run("setup")
    tmp = tempfile.mkdtemp(prefix="bench_latency_")
    procs = [WorkerProc(system, concurrency, 0, f"{tmp}/w{i}.tsv") for i in range(workers)]
    try:
        for p in procs:
            p.wait_ready()
        for p in procs:
            p.send("go")
        time.sleep(1.0)  # let them reach their idle wait
        la0 = loadavg()
        produced_path = f"{tmp}/produced.tsv"
        system.run("produce", rate=rate, seconds=seconds, out=produced_path, timeout=seconds * 10 + 120)
        total = int(rate * seconds)
        deadline = time.time() + 60
        while sum(p.progress for p in procs) < total + 1 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        la1 = loadavg()
        for p in procs:
            p.finish()
        handled = read_handled([p.out for p in procs])
    finally:
        for p in procs:
            p.kill()
    try:
        produced = {}
        with open(produced_path) as f:
            for line in f:
                n, a, b = line.split("\t")
                produced[int(n)] = (float(a), float(b))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with psycopg.connect(system.dsn, autocommit=True) as conn:
        pending = conn.execute(system.info["pending_sql"]).fetchone()[0]
    warm_up = [n for n, _ in handled if n < 0]
    handled = [(n, t) for n, t in handled if n >= 0]  # drop the warm-up job (n = -1)
    check = verify_sql(system, handled, total, 1, full=True)
    # The warm-up is one of the jobs the workers ran: it too must have run exactly once.
    check["warm_up_handled"] = warm_up
    check["ok"] = check["ok"] and warm_up == [-1]
    if not check["ok"]:
        raise RuntimeError(f"{system.name}: latency run lost or duplicated jobs: {check} pending={pending}")
    from_commit = sorted((t - produced[n][1]) * 1000 for n, t in handled)
    from_call = sorted((t - produced[n][0]) * 1000 for n, t in handled)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "jobs": total, "rate": rate,
        "p50_ms": pct(from_commit, 0.5), "p99_ms": pct(from_commit, 0.99), "max_ms": from_commit[-1],
        "p50_from_call_ms": pct(from_call, 0.5), "p99_from_call_ms": pct(from_call, 0.99),
        "loadavg_before": la0, "loadavg_after": la1, "verify": check,
    }


def enqueue_once(cluster: Cluster, system: System, *, mode: str, n: int, batch: int = 1000) -> dict[str, Any]:
    system.run("setup")
    la0 = loadavg()
    # The server's CPU is sampled where the driver marks its timed section (its start-up,
    # connections and warm-up job are no more in the CPU per job than in the jobs/s).
    cpu: dict[str, float] = {}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(system.argv("enqueue", mode=mode, n=n, batch=batch), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1,
                                env={**os.environ, **system.env})
        assert proc.stdin is not None and proc.stdout is not None
        last = ""
        try:
            for line in proc.stdout:
                if line.strip() in ("timing", "timed"):
                    cpu[line.strip()] = cluster.cpu_seconds()
                    proc.stdin.write("go\n")
                    proc.stdin.flush()
                elif line.startswith("{"):
                    last = line
            proc.wait(3600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        if proc.returncode != 0 or not last or set(cpu) != {"timing", "timed"}:
            raise RuntimeError(f"{system.name} enqueue failed ({proc.returncode}, marks {sorted(cpu)}):\n"
                               + err.read()[-4000:])
    r = json.loads(last)
    s0, s1 = cpu["timing"], cpu["timed"]
    # Every driver enqueues one warm-up job, then the n it is timed on: a figure is only
    # reported for an enqueue whose jobs are all in the table (and none extra).
    with psycopg.connect(system.dsn, autocommit=True) as conn:
        pending = conn.execute(system.info["pending_sql"]).fetchone()[0]
    if pending != n + 1 or r.get("n") != n:
        raise RuntimeError(f"{system.name}: enqueue {mode} of {n} jobs left {pending} pending"
                           f" (expected {n} and the warm-up job); the driver says n={r.get('n')}")
    r.update({"jobs_per_s": n / r["seconds"], "server_cpu_us_per_job": (s1 - s0) / n * 1e6,
              "loadavg_before": la0, "loadavg_after": loadavg()})
    if "client_cpu_seconds" in r:
        r["client_cpu_us_per_job"] = r["client_cpu_seconds"] / n * 1e6
    return r


def repeat(runs: int, fn: Callable[[], dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    return summarize_runs([fn() for _ in range(runs)], keys)


def summarize_runs(results: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Median/min/max of ``keys`` over runs already made (interleaved ones, say)."""
    out: dict[str, Any] = {k: summarize([r[k] for r in results if k in r]) for k in keys
                           if any(k in r for r in results)}
    out["loadavg_before"] = results[0]["loadavg_before"]
    out["loadavg_after"] = results[-1]["loadavg_after"]
    out["all_verified"] = all(r.get("verify", {}).get("ok", True) for r in results)
    out["details"] = results
    return out
