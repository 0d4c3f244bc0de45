"""Two real ``sa-jobs worker --metrics-port`` processes, scraped directly and by a real Prometheus.

The Prometheus test needs the Debian ``prometheus`` package (``.ci/run`` installs it) and
skips only when the binary is absent. It runs Prometheus on loopback with a 1 s scrape
interval and our alert rules loaded, runs two batches of jobs, and asserts through
Prometheus' HTTP API that the counters and histograms moved by exactly the batch sizes.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .conftest import start_worker_process
from .helpers import jobs_sql, q, wait_for
from .metrics_jobs import QUEUE, MetricsDoomed, MetricsFlaky, MetricsOk

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "examples" / "prometheus" / "alerts.yml"
WORKER_ARGS = ("--concurrency", "4", "--lease", "3", "--poll-interval", "0.2", "--maintenance-interval", "0.2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return (proc.stdout.read() if proc.stdout else b"").decode(errors="replace")


@pytest.fixture
def two_workers(database_url: str, schema: str) -> Iterator[list[int]]:
    """Two worker processes on the same schema, each with its own metrics port.

    Only the first runs the depth query (TTL 1 s); the second shows how to turn it off.
    """
    ports = [_free_port(), _free_port()]
    procs = [
        start_worker_process(database_url, schema, "tests.metrics_jobs", *WORKER_ARGS, "--metrics-port", str(ports[0]),
                             env={"SA_JOBS_METRICS_DEPTH_TTL": "1"}),
        start_worker_process(database_url, schema, "tests.metrics_jobs", *WORKER_ARGS, "--metrics-port", str(ports[1]),
                             env={"SA_JOBS_METRICS_DEPTH_TTL": "off"}),
    ]
    try:
        for port, proc in zip(ports, procs):
            def up(port: int = port) -> bool:
                try:
                    return "sa_jobs_worker_is_leader" in _get(f"http://127.0.0.1:{port}/metrics", 1)
                except OSError:
                    return False
            if not wait_for(up, 30, 0.2):
                proc.kill()
                pytest.fail(f"worker on metrics port {port} did not come up:\n{_stop(proc)}")
        yield ports
    finally:
        outputs = [_stop(p) for p in procs]
        for p, out in zip(procs, outputs):
            assert p.returncode == 0, out


def _enqueue(engine: Engine, ok: int = 0, flaky: int = 0, doomed: int = 0, sleep: float = 0.0) -> None:
    with Session(engine) as s, s.begin():
        s.add_all([MetricsOk(sleep=sleep) for _ in range(ok)] + [MetricsFlaky(fail_times=1) for _ in range(flaky)]
                  + [MetricsDoomed() for _ in range(doomed)])


def _drained(database_url: str, schema: str) -> Callable[[], bool]:
    sql = jobs_sql(schema, "SELECT count(*) FROM {jobs} WHERE state NOT IN ('completed', 'dead')")
    return lambda: q(database_url, sql)[0][0] == 0


def _scrape_sum(ports: list[int], name: str, **labels: str) -> float:
    total = 0.0
    for port in ports:
        for family in text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics")):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
    return total


def test_two_worker_processes_each_scraped_sum_to_the_exact_totals(
    database_url: str, schema: str, engine: Engine, two_workers: list[int]
) -> None:
    _enqueue(engine, ok=30, flaky=4, doomed=2)
    assert wait_for(_drained(database_url, schema), 60, 0.1)
    fin = "sa_jobs_jobs_finished_total"
    # The completer's flush and the counter increment race by microseconds: poll briefly.
    assert wait_for(lambda: _scrape_sum(two_workers, fin, outcome="completed") == 34, 10, 0.1)
    assert _scrape_sum(two_workers, fin, kind="metrics_ok", outcome="completed") == 30
    assert _scrape_sum(two_workers, fin, outcome="retried") == 4
    assert _scrape_sum(two_workers, fin, outcome="dead") == 2
    assert _scrape_sum(two_workers, "sa_jobs_jobs_claimed_total") == 40
    assert _scrape_sum(two_workers, "sa_jobs_job_queue_wait_seconds_count") == 40
    assert _scrape_sum(two_workers, "sa_jobs_worker_is_leader") == 1  # exactly one leader
    # Depth comes from the first worker only; the second was told not to query.
    assert wait_for(lambda: _scrape_sum(two_workers[:1], "sa_jobs_queue_jobs", queue=QUEUE, state="dead") == 2, 10, 0.2)
    assert "sa_jobs_queue_jobs{" not in _get(f"http://127.0.0.1:{two_workers[1]}/metrics")
    # Loopback only by default.
    with socket.socket() as s:
        s.settimeout(1)
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            assert s.connect_ex((addr, two_workers[0])) != 0


# ---- a real Prometheus ----------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus")


class _Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def api(self, path: str, **params: str) -> Any:
        body = json.loads(_get(f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"))
        assert body["status"] == "success", body
        return body["data"]

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["result"]
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_value(self, expr: str, expected: float, timeout: float = 30.0) -> None:
        seen: list[float | None] = []
        ok = wait_for(lambda: seen.append(self.value(expr)) or seen[-1] == expected, timeout, 0.5)
        assert ok, f"{expr}: expected {expected}, last values {seen[-5:]}"


@pytest.fixture
def prometheus(tmp_path: Path, two_workers: list[int]) -> Iterator[_Prom]:
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "sa-jobs", "static_configs": [
            {"targets": [f"127.0.0.1:{p}" for p in two_workers]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    prom = _Prom(port)
    try:
        def ready() -> bool:
            try:
                return proc.poll() is None and "Ready" in _get(f"{prom.base}/-/ready", 1)
            except OSError:
                return False
        if not wait_for(ready, 30, 0.2):
            pytest.fail("prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text()[-3000:])
        prom.wait_value('count(up{job="sa-jobs"} == 1)', 2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_real_prometheus_sees_exact_counter_and_histogram_deltas(
    database_url: str, schema: str, engine: Engine, two_workers: list[int], prometheus: _Prom
) -> None:
    p = prometheus
    fin = 'sum(sa_jobs_jobs_finished_total{{queue="metrics",{}}})'
    run = 'sum(sa_jobs_job_run_duration_seconds_{}{{queue="metrics",kind="metrics_ok"{}}})'

    # Batch 1: 10 fast ok, 2 flaky (one retry each), 1 doomed.
    _enqueue(engine, ok=10, flaky=2, doomed=1)
    assert wait_for(_drained(database_url, schema), 60, 0.1)
    p.wait_value(fin.format('outcome="completed"'), 12)
    assert p.value(fin.format('outcome="retried"')) == 2
    assert p.value(fin.format('outcome="dead",kind="metrics_doomed"')) == 1
    assert p.value('sum(sa_jobs_jobs_claimed_total{queue="metrics"})') == 15
    assert p.value('sum(sa_jobs_job_queue_wait_seconds_count{queue="metrics"})') == 15
    assert p.value(run.format("count", "")) == 10
    p.wait_value('max(sa_jobs_queue_jobs{queue="metrics",state="dead"})', 1)
    before = {
        "count": p.value(run.format("count", "")),
        "sum": p.value(run.format("sum", "")),
        "le_0.025": p.value(run.format("bucket", ',le="0.025"')),
        "le_inf": p.value(run.format("bucket", ',le="+Inf"')),
        "e2e": p.value('sum(sa_jobs_job_end_to_end_seconds_count{queue="metrics",outcome="completed"})'),
    }
    assert before["e2e"] == 12 and before["le_inf"] == 10

    # Batch 2: 20 ok jobs that each sleep 50 ms: every observation lands above 25 ms.
    _enqueue(engine, ok=20, sleep=0.05)
    assert wait_for(_drained(database_url, schema), 60, 0.1)
    p.wait_value(fin.format('outcome="completed"'), 32)
    assert p.value(run.format("count", "")) - before["count"] == 20
    assert p.value(run.format("bucket", ',le="+Inf"')) - before["le_inf"] == 20
    assert p.value(run.format("bucket", ',le="0.025"')) - before["le_0.025"] == 0
    assert p.value(run.format("sum", "")) - before["sum"] >= 20 * 0.05
    assert p.value('sum(sa_jobs_job_end_to_end_seconds_count{queue="metrics",outcome="completed"})') - before["e2e"] == 20
    assert p.value('sum(sa_jobs_jobs_in_flight{queue="metrics"})') == 0
    assert p.value('sum(sa_jobs_worker_slots{queue="metrics"})') == 8
    assert p.value("sum(sa_jobs_worker_is_leader)") == 1
    p.wait_value('max(sa_jobs_queue_jobs{queue="metrics",state="available"})', 0)
    time.sleep(2.5)  # two more scrapes: nothing is counted twice
    assert p.value(fin.format('outcome="completed"')) == 32
    assert p.value(fin.format('outcome="retried"')) == 2

    # Prometheus loaded our alert rules, evaluates them without error, and none fires.
    groups = p.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 8 and all(r["health"] == "ok" for r in rules), rules
    # The dead job above makes SaJobsDeadJobsRising pending (its `for:` is 5m), nothing else.
    active = {a["labels"]["alertname"] for a in p.api("alerts")["alerts"]}
    assert active <= {"SaJobsDeadJobsRising", "SaJobsDeadLetterGrowing"}, active

    # promtool lints what Prometheus scraped from each worker.
    promtool = shutil.which("promtool")
    if promtool:
        for port in two_workers:
            text = _get(f"http://127.0.0.1:{port}/metrics")
            proc = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
            assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), (proc.stdout, proc.stderr)
