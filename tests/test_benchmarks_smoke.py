"""The benchmark harness runs end to end (sa-jobs only, tiny sizes): not a speed test.

It starts its own private PostgreSQL (initdb on a free loopback port), so it does not use
the suite's database; it checks that every drain was verified exactly-once from SQL and
that the JSON has the keys RESULTS.md is built from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_sa_jobs_only_and_writes_json(tmp_path):
    pytest.importorskip("psutil")
    try:
        from benchmarks.cluster import find_bin_dir

        find_bin_dir()
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"no PostgreSQL binaries for the benchmark cluster: {exc}")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--tiny", "--peers", "none", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| sa-jobs" in proc.stdout
    result = json.loads(out.read_text())
    assert {"meta", "targets", "systems", "skipped", "sa_jobs_backlog"} <= result.keys()
    meta = result["meta"]
    assert meta["postgres"]["settings"]["fsync"] == "on"
    assert "PostgreSQL" in meta["postgres"]["version"]
    assert {"machine", "loadavg_start", "loadavg_end", "command"} <= meta.keys()
    sa = result["systems"]["sa-jobs"]
    assert set(sa["enqueue"]) == {"single", "batch", "bulk"}
    for figure in [*sa["enqueue"].values(), *sa["drain"].values(), sa["latency"]]:
        assert figure["jobs_per_s" if "jobs_per_s" in figure else "p50_ms"]["median"] > 0
        assert {"loadavg_before", "loadavg_after"} <= figure.keys()
    for figure in [*sa["drain"].values(), sa["latency"]]:
        assert figure["all_verified"]
        for run in figure["details"]:
            v = run["verify"]
            assert v["ok"] and v["handled"] == v["distinct"] == v["finished_in_sql"]
    drain = next(iter(sa["drain"].values()))
    assert {"server_cpu_us_per_job", "client_cpu_us_per_job"} <= drain.keys()
    assert drain["details"][0]["rss_end_mb"]
    backlog = result["sa_jobs_backlog"]
    assert backlog["ratio_large_queued"] > 0 and backlog["ratio_large_completed"] > 0
