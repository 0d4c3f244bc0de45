"""sa-jobs benchmarks, side by side with the Python peers, on a private PostgreSQL.

    python -m benchmarks run --quick                 # a few minutes, peers included
    python -m benchmarks run --quick --peers none    # sa-jobs only
    python -m benchmarks run --quick --only drain --workers 1,2,4,8 --concurrency 10,100  # the drain grid, quick sizes
    python -m benchmarks run --full                  # 50k-job drains, W=1,2,4,8, 1M backlog (an hour+)

Writes JSON (``--out``, default benchmarks/results/<mode>-<timestamp>.json) and prints a table.
Every figure is the median of ``--runs`` runs (>= 3 by default) with min-max; every drain is
verified from SQL (each job ran exactly once, none lost).
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import psutil

from .cluster import Cluster
from .runner import System, drain_once, enqueue_once, latency_once, loadavg, repeat, summarize_runs

HERE = Path(__file__).resolve().parent
PEER_PINS = {
    "pgqueuer": ["pgqueuer==1.6.0", "asyncpg", "psycopg[binary]"],
    "procrastinate": ["procrastinate==3.10.0"],
    "chancy": ["chancy==0.26.0"],
}
OBAN_PIN = ["oban==0.7.0", "psycopg[binary]"]
ALL_PEERS = ("pgqueuer", "procrastinate", "chancy", "oban", "plain")

TARGETS = {
    "drain_4_procs_jobs_per_s": 16_000, "drain_1_proc_jobs_per_s": 12_000,
    "enqueue_single_jobs_per_s": 2_000, "enqueue_add_all_jobs_per_s": 30_000, "enqueue_bulk_jobs_per_s": 150_000,
    "latency_p50_ms": 2.0, "latency_p99_ms": 5.0, "backlog_ratio_min": 0.9, "rss_growth_max": 0.10,
}

MODES = {
    "quick": dict(runs=3, drain_n=10_000, peer_drain_n=2_000, workers=[1, 4], concurrency=[10, 100],
                  peer_concurrency=[10], enq_single=1_000, enq_batch=10_000, enq_bulk=50_000,
                  peer_enq_single=300, peer_enq_batch=3_000, peer_enq_bulk=10_000,
                  latency_rate=200, latency_seconds=5, backlog_small=10_000, backlog_large=100_000,
                  backlog_target=10_000, soak=0),
    "full": dict(runs=3, drain_n=50_000, peer_drain_n=50_000, workers=[1, 2, 4, 8], concurrency=[10, 100],
                 peer_concurrency=[10, 100], enq_single=5_000, enq_batch=50_000, enq_bulk=200_000,
                 peer_enq_single=5_000, peer_enq_batch=50_000, peer_enq_bulk=50_000,
                 latency_rate=200, latency_seconds=30, backlog_small=10_000, backlog_large=1_000_000,
                 backlog_target=10_000, soak=1_000_000),
    # tiny: the smoke test's mode (seconds; not a measurement)
    "tiny": dict(runs=1, drain_n=2_000, peer_drain_n=500, workers=[2], concurrency=[10], peer_concurrency=[10],
                 enq_single=100, enq_batch=1_000, enq_bulk=2_000, peer_enq_single=50, peer_enq_batch=500,
                 peer_enq_bulk=1_000, latency_rate=100, latency_seconds=1, backlog_small=1_000,
                 backlog_large=5_000, backlog_target=1_000, backlog_workers=1, soak=0),
}


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def at_least_one(text: str) -> int:
    """A count (runs, jobs, processes): 0 would make a median of nothing."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": psutil.cpu_count(), "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(), "python": sys.version.split()[0]}


def find_python312() -> Optional[str]:
    candidates = [os.environ.get("SA_JOBS_BENCH_PY312", "")]
    if sys.version_info >= (3, 12):
        candidates.append(sys.executable)
    candidates += [shutil.which(n) or "" for n in ("python3.13", "python3.12")]
    candidates += sorted(glob.glob("/root/.pyenv/versions/3.1[2-9]*/bin/python3"), reverse=True)
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")), reverse=True)
    for c in candidates:
        if not c:
            continue
        try:
            out = subprocess.run([c, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                                 capture_output=True, text=True, timeout=20)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.strip() == "True":
            return c
    return None


def make_venv(base_python: str, path: Path, packages: list[str]) -> str:
    log(f"creating {path} ({base_python}) with {' '.join(packages)}")
    subprocess.run([base_python, "-m", "venv", str(path)], check=True)
    py = str(path / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages, "psutil"], check=True)
    return py


def peer_systems(peers: list[str], tmp: Path, peer_python: Optional[str], oban_python: Optional[str],
                 skipped: dict[str, str]) -> list[System]:
    systems = []
    wanted = [p for p in peers if p not in ("oban", "plain")]
    if wanted:
        py = peer_python or make_venv(sys.executable, tmp / "peers-venv", [x for p in wanted for x in PEER_PINS[p]])
        for p in wanted:
            if p == "pgqueuer":
                systems += [System("pgqueuer (asyncpg)", "peer_pgqueuer", py, variant="asyncpg"),
                            System("pgqueuer (psycopg)", "peer_pgqueuer", py, variant="psycopg")]
            elif p == "chancy":
                # chancy fetches once per queue polling_interval (an int, >= 1 s) while a backlog
                # waits: a drain runs at most C jobs per worker per second, so it drains a quarter.
                systems.append(System(p, f"peer_{p}", py, drain_scale=0.25))
            else:
                systems.append(System(p, f"peer_{p}", py))
    if "oban" in peers:
        py312 = oban_python or find_python312()
        if py312 is None:
            skipped["oban"] = "needs Python >= 3.12; none found on this machine"
        else:
            if not oban_python:
                py312 = make_venv(py312, tmp / "oban-venv", OBAN_PIN)
            systems.append(System("oban", "peer_oban", py312))
    if "plain" in peers:  # our own ~60-line baseline on psycopg, in this environment
        systems.append(System("plain psycopg, claim 100 + batched ack (the limit)", "plain", sys.executable,
                              skip=("latency",)))
    return systems


def fmt_rate(s: Optional[dict]) -> str:
    if not s:
        return "-"
    m = s["median"]
    return f"{m:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("command", choices=["run"])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_const", dest="mode", const="quick")
    g.add_argument("--full", action="store_const", dest="mode", const="full")
    g.add_argument("--tiny", action="store_const", dest="mode", const="tiny", help="smoke test only")
    ap.add_argument("--peers", default="all", help="all, none, or a comma list of " + ",".join(ALL_PEERS))
    ap.add_argument("--only", default="enqueue,drain,latency,backlog,soak",
                    help="scenarios to run (comma list of enqueue,drain,latency,backlog,soak)")
    ap.add_argument("--runs", type=at_least_one, help="runs per figure (default 3)")
    ap.add_argument("--workers", type=_positive_ints, help="drain grid: worker processes, e.g. 1,2,4,8 (default: the mode's)")
    ap.add_argument("--concurrency", type=_positive_ints,
                    help="drain grid: slots per process, for sa-jobs and peers, e.g. 10,100")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<mode>-<timestamp>.json)")
    ap.add_argument("--peer-python", help="reuse a Python that already has the 3.11 peers installed")
    ap.add_argument("--oban-python", help="reuse a Python >= 3.12 that already has oban installed")
    a = ap.parse_args(argv)
    import signal

    def _term(signum, frame):  # SIGTERM: stop the private cluster and the workers on the way out
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)
    mode = a.mode or "quick"
    cfg = dict(MODES[mode])
    if a.runs is not None:
        cfg["runs"] = a.runs
    if a.workers:
        cfg["workers"] = a.workers
    if a.concurrency:
        cfg["concurrency"] = cfg["peer_concurrency"] = a.concurrency
    only = set(a.only.split(","))
    peers = [] if a.peers == "none" else list(ALL_PEERS) if a.peers == "all" else a.peers.split(",")
    unknown = [p for p in peers if p not in ALL_PEERS]
    if unknown:  # e.g. "none,plain": a KeyError deep in the peers' venv set-up before
        ap.error(f"--peers: unknown {', '.join(map(repr, unknown))}; use all, none, or a comma list of "
                 + ",".join(ALL_PEERS))
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(a.out) if a.out else HERE / "results" / f"{mode}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    skipped: dict[str, str] = {}
    tmp = Path(tempfile.mkdtemp(prefix="sa_jobs_bench_"))
    result: dict[str, Any] = {
        "meta": {"date": stamp, "mode": mode, "command": "python -m benchmarks " + " ".join(argv or sys.argv[1:]),
                 "config": cfg, "machine": machine(), "loadavg_start": loadavg(),
                 # Whether the machine was shared is read from the load averages recorded
                 # here and on every figure, not asserted by the harness.
                 "note": "load averages before/after every figure show what else ran on the machine"},
        "targets": TARGETS, "systems": {}, "skipped": skipped,
    }
    try:
        systems = [System("sa-jobs", "sajobs", sys.executable)]
        systems += peer_systems(peers, tmp, a.peer_python, a.oban_python, skipped)
        with Cluster() as cluster:
            result["meta"]["postgres"] = cluster.describe()
            for s in systems:
                s.dsn = cluster.create_database("bench_" + s.driver + (("_" + s.variant) if s.variant else ""))
                s.info = s.run_json("info")
                log(f"{s.name} {s.info['version']} ({s.info['driver']})")
                res: dict[str, Any] = {"info": {k: v for k, v in s.info.items() if not k.endswith("_sql")}}
                result["systems"][s.name] = res
                peer = s.name != "sa-jobs"
                try:
                    run_system(cluster, s, res, cfg, only, peer)
                except Exception as exc:  # a peer that breaks is reported, not fatal
                    if not peer:
                        raise
                    log(f"{s.name} FAILED: {exc}")
                    res["error"] = str(exc)[-2000:]
                _write(out, result)
            if "backlog" in only:
                result["sa_jobs_backlog"] = backlog(cluster, systems[0], cfg)
            if "soak" in only and cfg["soak"]:
                result["sa_jobs_soak"] = soak(cluster, systems[0], cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["meta"]["loadavg_end"] = loadavg()
    _write(out, result)
    print(render_table(result))
    print(f"\nJSON: {out}")
    return 0


def _write(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))


def run_system(cluster: Cluster, s: System, res: dict, cfg: dict, only: set[str], peer: bool) -> None:
    runs = cfg["runs"]
    only = only - set(s.skip)
    if "enqueue" in only:
        res["enqueue"] = {}
        for mode, key in (("single", "enq_single"), ("batch", "enq_batch"), ("bulk", "enq_bulk")):
            n = cfg["peer_" + key] if peer else cfg[key]
            log(f"{s.name}: enqueue {mode} x{n}")
            res["enqueue"][mode] = repeat(runs, lambda: enqueue_once(cluster, s, mode=mode, n=n, batch=1000),
                                          ("jobs_per_s", "server_cpu_us_per_job", "client_cpu_us_per_job"))
    if "drain" in only:
        res["drain"] = {}
        n = int((cfg["peer_drain_n"] if peer else cfg["drain_n"]) * s.drain_scale)
        for c in cfg["peer_concurrency"] if peer else cfg["concurrency"]:
            for w in cfg["workers"]:
                log(f"{s.name}: drain {n} jobs, W={w} C={c}")
                res["drain"][f"W={w},C={c}"] = repeat(
                    runs, lambda: drain_once(cluster, s, workers=w, concurrency=c, n=n),
                    ("jobs_per_s", "server_cpu_us_per_job", "client_cpu_us_per_job"))
                res["drain"][f"W={w},C={c}"]["jobs"] = n
    if "latency" in only:
        log(f"{s.name}: latency at {cfg['latency_rate']}/s for {cfg['latency_seconds']}s, 2 idle workers")
        res["latency"] = repeat(runs, lambda: latency_once(cluster, s, rate=cfg["latency_rate"],
                                                           seconds=cfg["latency_seconds"]),
                                ("p50_ms", "p99_ms", "max_ms", "p50_from_call_ms", "p99_from_call_ms"))


def backlog(cluster: Cluster, s: System, cfg: dict) -> dict[str, Any]:
    """Claim cost vs backlog: time to run the first `target` jobs with 4 procs x C=100
    (one process in the smoke test's tiny mode, where process start-up is most of the time)."""
    k, small, large = cfg["backlog_target"], cfg["backlog_small"], cfg["backlog_large"]
    procs = cfg.get("backlog_workers", 4)
    out: dict[str, Any] = {"target_jobs": k, "workers": procs, "concurrency": 100, "interleaved": True}
    cases = ((f"{small} queued", small, 0), (f"{large} queued", large, 0),
             (f"{small} queued + {large} completed", small, large))
    # Interleaved (small, large, completed, small, ...): a drift of the machine's speed
    # during the run spreads over every case instead of biasing their ratios.
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in cases}
    for i in range(cfg["runs"]):
        for label, n, completed in cases:
            log(f"sa-jobs backlog: {label} (run {i + 1})")
            runs[label].append(drain_once(cluster, s, workers=procs, concurrency=100, n=n, completed=completed,
                                          target=k))
    for label, _, _ in cases:
        out[label] = summarize_runs(runs[label], ("jobs_per_s", "server_cpu_us_per_job", "client_cpu_us_per_job"))
    base = out[f"{small} queued"]["jobs_per_s"]["median"]
    out["ratio_large_queued"] = out[f"{large} queued"]["jobs_per_s"]["median"] / base
    out["ratio_large_completed"] = out[f"{small} queued + {large} completed"]["jobs_per_s"]["median"] / base
    return out


def soak(cluster: Cluster, s: System, cfg: dict) -> dict[str, Any]:
    n = cfg["soak"]
    log(f"sa-jobs soak: drain {n} jobs, W=4 C=100, RSS sampled")
    r = drain_once(cluster, s, workers=4, concurrency=100, n=n, rss_every=1.0, timeout=7200)
    # Growth from the first sample after a tenth of the jobs (warm: caches, pools, prepared
    # statements) to the end of the drain, all worker processes summed.
    warm = [x[2] for x in r["rss_samples"] if x[1] >= n // 10]
    end = sum(r["rss_end_mb"]) * 2**20
    r["rss_warm_mb"] = round(warm[0] / 2**20, 1) if warm else None
    r["rss_growth_after_first_tenth"] = (end / warm[0] - 1) if warm else None
    return r


def render_table(result: dict) -> str:
    lines = ["", "| system | enqueue 1/txn | batch 1000/txn | bulk | drain 1 proc | drain 4 procs |"
             " p50 / p99 enqueue->start at 200/s |", "|---|---|---|---|---|---|---|"]
    for name, r in result["systems"].items():
        enq = r.get("enqueue", {})
        drain = r.get("drain", {})
        lat = r.get("latency")

        def best(w: int) -> str:
            cands = {k: v for k, v in drain.items() if k.startswith(f"W={w},")}
            if not cands:
                return "-"
            k = max(cands, key=lambda k: cands[k]["jobs_per_s"]["median"])
            return f"{fmt_rate(cands[k]['jobs_per_s'])} [{k.split(',')[1]}]"

        latency = f"{lat['p50_ms']['median']:.1f} / {lat['p99_ms']['median']:.1f} ms" if lat else "-"
        if "error" in r:
            latency += " (FAILED: see JSON)"
        lines.append(f"| {name} {r['info'].get('version', '')} | {fmt_rate(enq.get('single', {}).get('jobs_per_s'))} |"
                     f" {fmt_rate(enq.get('batch', {}).get('jobs_per_s'))} | {fmt_rate(enq.get('bulk', {}).get('jobs_per_s'))} |"
                     f" {best(1)} | {best(4)} | {latency} |")
    for name, why in result.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {why} | | | | | |")
    lines.append("\nDrain grid (jobs/s, median (min-max); server / client CPU µs per job):")
    for name, r in result["systems"].items():
        for k, v in r.get("drain", {}).items():
            lines.append(f"  {name:22s} {k:12s} {fmt_rate(v['jobs_per_s']):>28s}  "
                         f"{v['server_cpu_us_per_job']['median']:6.0f} / {v['client_cpu_us_per_job']['median']:6.0f} µs"
                         f"  load {v['loadavg_before'][0]}->{v['loadavg_after'][0]}")
    b = result.get("sa_jobs_backlog")
    if b:
        lines.append(f"\nsa-jobs claim cost vs backlog (first {b['target_jobs']} jobs,"
                     f" {b.get('workers', 4)} procs x C={b.get('concurrency', 100)}):")
        for k, v in b.items():
            if isinstance(v, dict):
                lines.append(f"  {k:40s} {fmt_rate(v['jobs_per_s'])}")
        lines.append(f"  ratio large/small queued {b['ratio_large_queued']:.2f};"
                     f" with completed rows {b['ratio_large_completed']:.2f} (target >= 0.90)")
    s = result.get("sa_jobs_soak")
    if s:
        g = s["rss_growth_after_first_tenth"]
        lines.append(f"\nsa-jobs soak {s['jobs']} jobs: {s['jobs_per_s']:,.0f} jobs/s, RSS growth after the first tenth"
                     f" {'n/a (no sample after the first tenth)' if g is None else f'{g:.1%}'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
