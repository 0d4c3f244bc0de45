"""Render a results JSON as the Markdown tables of RESULTS.md.

    python -m benchmarks.report benchmarks/results/quick.json
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional


def r(s: Optional[dict], fmt: str = "{:,.0f}") -> str:
    if not s:
        return "–"
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def la(f: dict) -> str:
    return f"{f['loadavg_before'][0]:.1f}→{f['loadavg_after'][0]:.1f}"


def best(drain: dict, w: int) -> tuple[str, Optional[dict]]:
    c = {k: v for k, v in drain.items() if k.startswith(f"W={w},")}
    if not c:
        return "", None
    k = max(c, key=lambda k: c[k]["jobs_per_s"]["median"])
    return k.split(",")[1], c[k]


def render(res: dict[str, Any]) -> str:
    out = []
    m = res["meta"]
    out.append(f"Run {m['date']} (`{m['command']}`), mode {m['mode']}; machine {m['machine']};"
               f" load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.")
    pg = m["postgres"]
    out.append(f"\nServer: {pg['version']}; settings: " + ", ".join(f"{k}={v}" for k, v in pg["settings"].items())
               + "; set by the harness: " + ", ".join(pg["non_default_settings"]))
    out.append("\n| system | enqueue 1 job/txn | batch (1000/txn) | bulk | drain 1 proc | drain 4 procs |"
               " p50 / p99 enqueue→start at 200/s |")
    out.append("|---|---|---|---|---|---|---|")
    for name, s in res["systems"].items():
        e, d = s.get("enqueue", {}), s.get("drain", {})
        cells = []
        for w in (1, 4):
            c, f = best(d, w)
            cells.append(f"{r(f['jobs_per_s'])} [{c}]" if f else "–")
        lat = s.get("latency")
        latc = f"{lat['p50_ms']['median']:.1f} / {lat['p99_ms']['median']:.1f} ms" if lat else "–"
        if "error" in s:
            latc += " (error, see JSON)"
        out.append(f"| {name} {s['info'].get('version', '')} ({s['info'].get('driver', '')}) |"
                   f" {r(e.get('single', {}).get('jobs_per_s'))} | {r(e.get('batch', {}).get('jobs_per_s'))} |"
                   f" {r(e.get('bulk', {}).get('jobs_per_s'))} | {cells[0]} | {cells[1]} | {latc} |")
    for name, why in res.get("skipped", {}).items():
        out.append(f"| {name} | skipped: {why} | | | | | |")
    out.append("\nDrains (median (min–max) of the runs; CPU per job from psutil: server = postmaster tree,"
               " client = worker processes; load average before→after the figure):\n")
    out.append("| system | W,C | jobs | jobs/s | server CPU µs/job | client CPU µs/job | RSS/worker end MB | load |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, s in res["systems"].items():
        for k, f in s.get("drain", {}).items():
            rss = max(x for run in f["details"] for x in run["rss_end_mb"])
            out.append(f"| {name} | {k} | {f.get('jobs', '')} | {r(f['jobs_per_s'])} |"
                       f" {r(f['server_cpu_us_per_job'])} | {r(f['client_cpu_us_per_job'])} | {rss} | {la(f)} |")
    out.append("\nEnqueue (jobs/s; server CPU µs/job; client CPU µs/job):\n")
    out.append("| system | mode | API | jobs | jobs/s | server µs/job | client µs/job | load |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, s in res["systems"].items():
        for mode, f in s.get("enqueue", {}).items():
            d0 = f["details"][0]
            out.append(f"| {name} | {mode} | {d0.get('api', '')} | {d0['n']} | {r(f['jobs_per_s'])} |"
                       f" {r(f.get('server_cpu_us_per_job'))} | {r(f.get('client_cpu_us_per_job'))} | {la(f)} |")
    out.append("\nLatency, 2 idle worker processes (C=10), one job per transaction at a fixed rate; ms from the"
               " producer's commit returning to the handler starting (and from the enqueue call):\n")
    out.append("| system | jobs/run | p50 | p99 | max | p50 from call | p99 from call | load |")
    out.append("|---|---|---|---|---|---|---|---|")
    for name, s in res["systems"].items():
        f = s.get("latency")
        if f:
            out.append(f"| {name} | {f['details'][0]['jobs']} | {r(f['p50_ms'], '{:.1f}')} | {r(f['p99_ms'], '{:.1f}')} |"
                       f" {r(f['max_ms'], '{:.1f}')} | {r(f['p50_from_call_ms'], '{:.1f}')} |"
                       f" {r(f['p99_from_call_ms'], '{:.1f}')} | {la(f)} |")
    b = res.get("sa_jobs_backlog")
    if b:
        out.append(f"\nsa-jobs claim cost vs backlog: time to start the first {b['target_jobs']} jobs,"
                   f" {b['workers']} procs × C={b['concurrency']}:\n")
        out.append("| table contents | jobs/s | server µs/job | client µs/job | left 'running' after worker exit | load |")
        out.append("|---|---|---|---|---|---|")
        for k, f in b.items():
            if isinstance(f, dict):
                stuck = [run["verify"].get("running_after_workers_exited", 0) for run in f["details"]]
                out.append(f"| {k} | {r(f['jobs_per_s'])} | {r(f['server_cpu_us_per_job'])} |"
                           f" {r(f['client_cpu_us_per_job'])} | {stuck} | {la(f)} |")
        out.append(f"\nRatio large/small backlog: {b['ratio_large_queued']:.2f}; with completed rows:"
                   f" {b['ratio_large_completed']:.2f} (target ≥ 0.90).")
    s = res.get("sa_jobs_soak")
    if s:
        g = s["rss_growth_after_first_tenth"]
        out.append(f"\nsa-jobs soak: {s['jobs']} jobs at {s['jobs_per_s']:,.0f} jobs/s; RSS (all workers) after the first"
                   f" tenth {s.get('rss_warm_mb')} MB, growth to the end {'n/a' if g is None else f'{g:.1%}'}.")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(json.load(open(sys.argv[1]))))
