"""The server's flat CPU profile during limit-benchmark drains, variant against variant.

    python benchmarks/experiments/perf_drain.py none,keys-only,partition [--n 100000] [--rounds 2]

On a private cluster (benchmarks/cluster.py), runs ``--rounds`` drains of each variant of
``benchmarks.limits`` (4 worker processes x 100 slots, ``--n`` no-op jobs) and records each
with ``perf record -a -F 1999`` from the workers' go to the end of the drain (root, and perf
on PATH). Then it sums the samples of the ``postgres`` processes per symbol over the rounds
and prints each variant's total, and for each variant after the first the symbols whose
sample counts grew most against the variant before it. The drains do the same number of
jobs, so samples compare as server work per job.
"""
from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import runner  # noqa: E402
from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.runner import System, drain_once  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", help="comma list of benchmarks.limits variants, e.g. none,keys-only,partition")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    variants = a.variants.split(",")
    out_dir = Path(tempfile.mkdtemp(prefix="perf_drain_"))
    state: dict[str, Any] = {"perf": None, "out": None}
    send = runner.WorkerProc.send

    def send_and_record(self: Any, msg: str) -> None:
        if msg == "go" and state["perf"] is None:  # the first worker's go starts the recording
            state["perf"] = subprocess.Popen(["perf", "record", "-a", "-F", "1999", "-o", state["out"]],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.2)
        send(self, msg)

    runner.WorkerProc.send = send_and_record  # type: ignore[method-assign]
    files: dict[str, list[Path]] = {v: [] for v in variants}
    with Cluster() as cluster:
        systems = {}
        for v in variants:
            s = System(f"sa-jobs limits={v}", "sajobs_limits", sys.executable, variant=v)
            s.dsn = cluster.create_database("perf_" + v.replace("-", "_"))
            s.info = s.run_json("info")
            systems[v] = s
        for r in range(a.rounds):
            for v in variants:
                state["out"], state["perf"] = str(out_dir / f"{v}-{r}.data"), None
                result = drain_once(cluster, systems[v], workers=4, concurrency=100, n=a.n)
                state["perf"].send_signal(signal.SIGINT)
                state["perf"].wait()
                files[v].append(Path(state["out"]))
                print(f"{v} round {r + 1}: {result['jobs_per_s']:,.0f} jobs/s, server / client CPU"
                      f" {result['server_cpu_us_per_job']:.0f} / {result['client_cpu_us_per_job']:.0f} µs per job",
                      flush=True)
    samples = {v: _samples(files[v]) for v in variants}
    for v in variants:
        print(f"{v}: {sum(samples[v].values()):,} samples in postgres processes")
    for before, after in zip(variants, variants[1:]):
        grown = {s: samples[after][s] - samples[before][s] for s in set(samples[before]) | set(samples[after])}
        print(f"\n{after} against {before}: symbol, samples gained ({before} -> {after})")
        for sym, gained in sorted(grown.items(), key=lambda t: -t[1])[:a.top]:
            print(f"  {gained:+6}  ({samples[before][sym]} -> {samples[after][sym]})  {sym}")
    print(f"\nperf data: {out_dir}")


def _samples(paths: list[Path]) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in paths:
        report = subprocess.run(["perf", "report", "-i", str(path), "--comm", "postgres", "--sort", "sym",
                                 "--stdio", "-n"], capture_output=True, text=True, check=True).stdout
        for line in report.splitlines():
            parts = line.split()
            if line.startswith("#") or len(parts) < 4 or not parts[1].isdigit():
                continue
            counts[" ".join(parts[3:])] += int(parts[1])
    return counts


if __name__ == "__main__":
    main()
