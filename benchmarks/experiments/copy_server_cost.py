"""Server CPU per row of a raw COPY into sa_jobs.jobs: which columns and indexes it pays for.

    python benchmarks/experiments/copy_server_cost.py [--rows 100000] [--reps 5]

On a private cluster (benchmarks/cluster.py), COPYs pre-built text (no Python work per row
on the client) with all 9 columns enqueue_many used to send, with the 3 columns a
default-valued kind needs (kind, queue, args), with 3 columns and schema v9's
``jobs_kind_state_idx`` over every row put back (v10 indexes kinds for resting states
only, so an available row no longer enters it), and with 3 columns without
``jobs_claim_idx``. Prints the median rate and the server's
CPU per row (postmaster tree, psutil), variants interleaved per repetition.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402

from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.drivers import sajobs as driver  # noqa: E402

NINE = "kind, queue, args, state, priority, max_attempts, tags, meta, partition_key"


def nine(i: int) -> str:
    return f'bench_noop\tbench\t{{"n":{i}}}\tavailable\t0\t20\t{{}}\t{{}}\t\\N\n'


def three(i: int) -> str:
    return f'bench_noop\tbench\t{{"n":{i}}}\n'


VARIANTS = {
    "9 columns, all indexes": (NINE, nine, None),
    "3 columns, all indexes": ("kind, queue, args", three, None),
    "3 columns, with v9's jobs_kind_state_idx": ("kind, queue, args", three,
                                                 "CREATE INDEX jobs_kind_state_idx ON sa_jobs.jobs (kind, state)"),
    "3 columns, without jobs_claim_idx": ("kind, queue, args", three, "DROP INDEX sa_jobs.jobs_claim_idx"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in VARIANTS}
    with Cluster() as c:
        dsn = c.create_database("copy_cost")
        for _ in range(a.reps):
            for name, (cols, line, ddl) in VARIANTS.items():
                driver.setup(dsn)
                data = "".join(line(i) for i in range(a.rows))
                with psycopg.connect(dsn) as conn:
                    if ddl:
                        conn.execute(ddl)
                    conn.commit()
                    s0, t0 = c.cpu_seconds(), time.perf_counter()
                    with conn.cursor() as cur, cur.copy(f"COPY sa_jobs.jobs ({cols}) FROM STDIN") as cp:
                        for k in range(0, len(data), 1 << 17):
                            cp.write(data[k:k + (1 << 17)])
                    conn.commit()
                    wall = time.perf_counter() - t0
                time.sleep(0.3)  # let the backend's CPU show in the postmaster tree
                res[name].append((a.rows / wall, (c.cpu_seconds() - s0) / a.rows * 1e6))
    for name, v in res.items():
        rates, cpu = [x for x, _ in v], [y for _, y in v]
        print(f"{name}: {statistics.median(rates):,.0f} rows/s; server {statistics.median(cpu):.2f} us/row"
              f" ({min(cpu):.2f}-{max(cpu):.2f})")


if __name__ == "__main__":
    main()
