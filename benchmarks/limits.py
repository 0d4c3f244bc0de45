"""What queue limits cost: sa-jobs drains with and without cluster-wide limits, same run.

    python -m benchmarks.limits                       # 20k jobs, 4 processes x 100, 3 runs
    python -m benchmarks.limits --n 10000 --runs 1    # a quick look
    python -m benchmarks.limits --report benchmarks/results/limits-*.json   # rounds pooled over runs

Every drain is verified from SQL (each job ran exactly once). The limits of the measured
variants do not bind, so the difference to ``none`` is the cost of the limited claim
itself; ``concurrency-binding`` (50 at once) is shown for scale, not compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional

from .__main__ import at_least_one, fmt_rate, machine
from .cluster import Cluster
from .runner import System, drain_once, loadavg, summarize_runs

HERE = Path(__file__).resolve().parent
VARIANTS = ("none", "concurrency", "rate", "partition", "all", "concurrency-binding", "keys-only",
            "none-kind-state-nodedup", "partition-auto-plans", "partition-v5", "partition-v8", "partition-keylocks", "all-v8", "partition-window2x",
            "concurrency-auto-plans", "none-v7-indexes", "partition-v7-indexes", "keys-v7-indexes", "keys-leaseidx",
            "none-v9-kind-index", "concurrency-v11", "partition-v11", "all-v11", "none-serialized", "none-join", "none-noav", "keys-noav", "partition-noav",
            "keys-collate-c", "partition-collate-c", "all-collate-c",
            "concurrency-v15", "partition-v15", "all-v15")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.limits")
    ap.add_argument("--n", type=at_least_one, default=20_000, help="jobs per drain")
    ap.add_argument("--workers", type=at_least_one, default=4)
    ap.add_argument("--concurrency", type=at_least_one, default=100)
    ap.add_argument("--runs", type=at_least_one, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", help="JSON path (default benchmarks/results/limits-<timestamp>.json)")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="run nothing: pool the rounds of these result files (each paired with the none drain"
                         " of its round) and print each variant's median ratio to none")
    a = ap.parse_args(argv)
    if a.report:
        try:
            results = [json.loads(Path(f).read_text()) for f in a.report]
        except (OSError, ValueError) as exc:
            ap.error(f"--report: {exc}")
        print(pooled_report(results))
        return 0
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
        # load during the run spreads over every variant instead of one. The rounds follow
        # a balanced order (round_orders), so no variant always runs first or after the
        # same one (background work such as a checkpoint or the autovacuum of the last
        # drain's rows then falls on each in turn). In a fixed order
        # limits-20261206T071709Z measured concurrency and rate 8% faster than none, which
        # does strictly less work.
        per_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for order in round_orders(variants, a.runs):
            for v in order:
                s = systems[v]
                r = drain_once(cluster, s, workers=a.workers, concurrency=a.concurrency, n=a.n)
                print(f"{v:>20}: {r['jobs_per_s']:,.0f} jobs/s", file=sys.stderr)
                per_variant[v].append(r)
        for v in variants:
            result["variants"][v] = {"limits": systems[v].info["limits"],
                                     **summarize_runs(per_variant[v], ("jobs_per_s", "server_cpu_us_per_job",
                                                                       "client_cpu_us_per_job", *WAL_KEYS))}
    result["meta"]["loadavg_end"] = loadavg()
    out.write_text(json.dumps(result, indent=1, default=str))
    print(table(result, variants, a))
    print(f"\nJSON: {out}")
    return 0


# Cluster-wide WAL per job (runner.wal_counters): steady where the host's load is not.
WAL_KEYS = ("wal_records_per_job", "wal_fpi_per_job", "wal_bytes_per_job")


def round_orders(variants: list[str], runs: int) -> list[list[str]]:
    """The order of each round: rows of a Williams design (0, 1, n-1, 2, n-2, ... shifted by
    the round). Over n rounds every variant runs once in every place and, for an even n,
    after every other variant at most once. Starting each round one variant further on
    (what this did before) kept each variant after the same one in every round but the
    one it opened, so whatever a drain leaves behind always fell on the same successor."""
    n = len(variants)
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        if len(first) % 2:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    return [[variants[(i + r) % n] for i in first] for r in range(runs)]


def round_ratios(runs: list[float], base_runs: list[float]) -> list[float]:
    """Each round's variant / none - 1 (a round's drains run back to back): on a host whose
    speed drifts, their median is steadier than the ratio of the two medians."""
    return [r / b - 1 for r, b in zip(runs, base_runs) if b]


def pooled_report(results: list[dict[str, Any]]) -> str:
    """Each variant's ratio to none, round by round, pooled over several result files."""
    ratios: dict[str, list[float]] = {}
    for result in results:
        base = result["variants"].get("none", {}).get("jobs_per_s", {}).get("runs")
        if not base:
            continue
        for v, r in result["variants"].items():
            if v != "none":
                ratios.setdefault(v, []).extend(round_ratios(r["jobs_per_s"]["runs"], base))
    lines = ["| variant | rounds | vs none, median of rounds | middle half of rounds |", "|---|---|---|---|"]
    for v, xs in ratios.items():
        xs.sort()
        q1, q3 = statistics.quantiles(xs, n=4, method="inclusive")[0::2] if len(xs) > 1 else (xs[0], xs[0])
        lines.append(f"| {v} | {len(xs)} | {statistics.median(xs):+.1%} | {q1:+.1%} to {q3:+.1%} |")
    return "\n".join(lines)


def table(result: dict[str, Any], variants: list[str], a: argparse.Namespace) -> str:
    none = result["variants"].get("none", {}).get("jobs_per_s", {})
    lines = [f"| limits ({a.workers} procs x {a.concurrency}, {a.n:,} jobs) | jobs/s median (min-max)"
             " | vs none (medians) | vs none (median of rounds) | server / client CPU µs per job"
             " | WAL per job: records / full pages / bytes |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        r = result["variants"][v]
        rel = f"{r['jobs_per_s']['median'] / none['median'] - 1:+.1%}" if none else "-"
        ratios = round_ratios(r["jobs_per_s"]["runs"], none["runs"]) if none and v != "none" else []
        paired = statistics.median(ratios) if ratios else None
        lines.append(f"| {v} | {fmt_rate(r['jobs_per_s'])} | {rel} | {'-' if paired is None else f'{paired:+.1%}'} |"
                     f" {r['server_cpu_us_per_job']['median']:.0f} / {r['client_cpu_us_per_job']['median']:.0f} |"
                     f" {wal_cell(r)} |")
    return "\n".join(lines)


def wal_cell(r: dict[str, Any]) -> str:
    """Median WAL records / full-page images / bytes per job, or '-' where not measured."""
    if not all(k in r for k in WAL_KEYS):
        return "-"
    rec, fpi, size = (r[k]["median"] for k in WAL_KEYS)
    return f"{rec:.2f} / {fpi:.3f} / {size:,.0f}"


if __name__ == "__main__":
    raise SystemExit(main())
