"""What queue limits cost: sa-jobs drains with and without cluster-wide limits, same run.

    python -m benchmarks.limits                       # 20k jobs, 4 processes x 100, 3 runs
    python -m benchmarks.limits --n 10000 --runs 1    # a quick look

Every drain is verified from SQL (each job ran exactly once). The limits of the measured
variants do not bind, so the difference to ``none`` is the cost of the limited claim
itself; ``concurrency-binding`` (50 at once) is shown for scale, not compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any, Optional

from .__main__ import fmt_rate, machine
from .cluster import Cluster
from .runner import System, drain_once, loadavg, summarize_runs

HERE = Path(__file__).resolve().parent
VARIANTS = ("none", "concurrency", "rate", "partition", "all", "concurrency-binding", "keys-only",
            "none-kind-state-nodedup", "partition-auto-plans", "partition-v5", "partition-v8", "all-v8", "partition-window2x",
            "concurrency-auto-plans", "none-v7-indexes", "partition-v7-indexes", "keys-v7-indexes")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.limits")
    ap.add_argument("--n", type=int, default=20_000, help="jobs per drain")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", help="JSON path (default benchmarks/results/limits-<timestamp>.json)")
    a = ap.parse_args(argv)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out) if a.out else HERE / "results" / f"limits-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "meta": {"date": stamp, "command": "python -m benchmarks.limits " + " ".join(argv or sys.argv[1:]),
                 "n": a.n, "workers": a.workers, "concurrency": a.concurrency, "runs": a.runs,
                 "machine": machine(), "loadavg_start": loadavg()},
        "variants": {},
    }
    variants = a.variants.split(",")
    with Cluster() as cluster:
        result["meta"]["postgres"] = cluster.describe()
        systems = {v: System(f"sa-jobs limits={v}", "sajobs_limits", sys.executable, variant=v) for v in variants}
        for v, s in systems.items():
            s.dsn = cluster.create_database("bench_limits_" + v.replace("-", "_"))
            s.info = s.run_json("info")
        # Interleaved (none, concurrency, ..., none, concurrency, ...): a change of machine
        # load during the run spreads over every variant instead of one.
        per_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(a.runs):
            for v, s in systems.items():
                r = drain_once(cluster, s, workers=a.workers, concurrency=a.concurrency, n=a.n)
                print(f"{v:>20}: {r['jobs_per_s']:,.0f} jobs/s", file=sys.stderr)
                per_variant[v].append(r)
        for v in variants:
            result["variants"][v] = {"limits": systems[v].info["limits"],
                                     **summarize_runs(per_variant[v], ("jobs_per_s", "server_cpu_us_per_job",
                                                                       "client_cpu_us_per_job"))}
    result["meta"]["loadavg_end"] = loadavg()
    out.write_text(json.dumps(result, indent=1, default=str))
    base = result["variants"].get("none", {}).get("jobs_per_s", {}).get("median")
    print(f"| limits ({a.workers} procs x {a.concurrency}, {a.n:,} jobs) | jobs/s median (min-max)"
          " | vs none | server / client CPU µs per job |")
    print("|---|---|---|---|")
    for v in variants:
        r = result["variants"][v]
        rate = r["jobs_per_s"]["median"]
        rel = f"{rate / base - 1:+.1%}" if base else "-"
        print(f"| {v} | {fmt_rate(r['jobs_per_s'])} | {rel} | {r['server_cpu_us_per_job']['median']:.0f} /"
              f" {r['client_cpu_us_per_job']['median']:.0f} |")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
