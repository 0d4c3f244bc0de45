"""What a pruning batch costs when another finished state is kept for good, schema v12 vs v13.

    python benchmarks/experiments/prune_kept_state.py [--url URL] [--kept 950000] [--pruned 50000] [--batch 5000]

``Pruner(dead=None)`` (or a dead age much longer than the completed one) keeps the oldest
finished rows. Up to schema v12 the pruner's batch ``WHERE state = $1 AND finished_at < $2
ORDER BY finished_at LIMIT n`` read ``jobs_finished_idx (finished_at)`` in age order and
filtered the state, so each batch of completed jobs walked past every kept dead row
first, and ``prune --dry-run``'s count read them all. v13's ``jobs_state_finished_idx
(state, finished_at)`` gives each state its own range.

In its own schema of ``--url`` (default: the system server of the tests), it loads
``--kept`` dead rows finished 400+ days ago and ``--pruned`` completed rows finished 10+
days ago (``--kept + --pruned`` finished rows, a million by default), at schema v12; then
prunes the completed ones batch by batch, each batch the pruner's own statement run under
``EXPLAIN (ANALYZE, BUFFERS, TIMING OFF)`` in autocommit (so it really deletes and
commits), and the dry run's count. It loads the completed rows again, upgrades to v13
(``install()``: the index built CONCURRENTLY, the old one dropped), and does the same.
Prints, per schema version, each batch's wall time (client side, ms), the server's
execution time and the shared buffers it touched; then drops the schema.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from sa_jobs import schema as schema_mod  # noqa: E402
from sa_jobs.maintenance.pruner import count_statement, delete_statement  # noqa: E402

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _buffers(plan: dict[str, Any]) -> int:
    return int(plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0))


def _explain(conn: psycopg.Connection, statement: str, params: dict[str, Any]) -> tuple[float, float, int, int]:
    """(wall ms, server ms, shared buffers, rows) of one run of ``statement``, committed."""
    t = time.perf_counter()
    (plan_json,) = conn.execute("EXPLAIN (ANALYZE, BUFFERS, TIMING OFF, FORMAT JSON) " + statement,
                                params).fetchone()
    wall = (time.perf_counter() - t) * 1000
    top = plan_json[0]
    rows = top["Plan"].get("Actual Rows", 0)
    if top["Plan"]["Node Type"] == "ModifyTable":  # a DELETE's rows are its CTE's
        rows = next(p["Actual Rows"] for p in top["Plan"]["Plans"] if p.get("Subplan Name") == "CTE doomed")
    return wall, float(top["Execution Time"]), _buffers(top["Plan"]), int(rows)


def _load_pruned(conn: psycopg.Connection, jobs: sql.Composable, n: int) -> None:
    conn.execute(sql.SQL("INSERT INTO {} (kind, state, finished_at) SELECT 'k', 'completed',"
                         " now() - interval '10 days' - g * interval '1 second'"
                         " FROM generate_series(1, %s) g").format(jobs), (n,))
    conn.execute(sql.SQL("VACUUM ANALYZE {}").format(jobs))


def _run(conn: psycopg.Connection, schema: str, batch: int, label: str) -> None:
    params = {"state": "completed", "age": 86400.0, "limit": batch}
    count = count_statement(schema).as_string()
    t = time.perf_counter()
    (n,) = conn.execute(count, params).fetchone()
    c_plain = (time.perf_counter() - t) * 1000
    _, c_server, c_buf, _ = _explain(conn, count, params)
    print(f"{label}: dry-run count ({n} rows): wall {c_plain:.1f} ms; explained: server {c_server:.1f} ms,"
          f" {c_buf} buffers")
    walls, servers, bufs = [], [], []
    delete = delete_statement(schema).as_string()
    while True:
        wall, server, buf, rows = _explain(conn, delete, params)
        walls.append(wall)
        servers.append(server)
        bufs.append(buf)
        if rows < batch:
            break
    print(f"{label}: {len(walls)} batches of {batch}: wall ms per batch median {statistics.median(walls):.1f},"
          f" max {max(walls):.1f}; server ms median {statistics.median(servers):.1f};"
          f" buffers per batch median {statistics.median(bufs):.0f}, max {max(bufs)}")
    print(f"{label}:   per batch wall ms: {' '.join(f'{w:.0f}' for w in walls)}")
    print(f"{label}:   per batch buffers: {' '.join(str(b) for b in bufs)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=DEFAULT_URL)
    ap.add_argument("--kept", type=int, default=950_000, help="dead rows, kept forever")
    ap.add_argument("--pruned", type=int, default=50_000, help="completed rows, pruned")
    ap.add_argument("--batch", type=int, default=5000)
    a = ap.parse_args()
    schema = "prune_kept_" + uuid.uuid4().hex[:8]
    jobs = sql.Identifier(schema, schema_mod.JOBS_TABLE)
    schema_mod.install(a.url, schema, to_version=12)
    try:
        with psycopg.connect(a.url, autocommit=True) as conn:
            print(conn.execute("SELECT version()").fetchone()[0])
            t = time.perf_counter()
            conn.execute(sql.SQL("ALTER TABLE {} SET (autovacuum_enabled = false)").format(jobs))
            conn.execute(sql.SQL("INSERT INTO {} (kind, state, finished_at) SELECT 'k', 'dead',"
                                 " now() - interval '400 days' - g * interval '1 second'"
                                 " FROM generate_series(1, %s) g").format(jobs), (a.kept,))
            _load_pruned(conn, jobs, a.pruned)
            print(f"loaded {a.kept} dead (kept) + {a.pruned} completed rows in {time.perf_counter() - t:.1f} s")
            _run(conn, schema, a.batch, "v12")
            _load_pruned(conn, jobs, a.pruned)
            t = time.perf_counter()
            schema_mod.install(a.url, schema)
            size = conn.execute("SELECT pg_size_pretty(pg_relation_size(%s::regclass))",
                                (sql.Identifier(schema, schema_mod.STATE_FINISHED_INDEX).as_string(),)).fetchone()[0]
            print(f"upgrade to v{schema_mod.LATEST_VERSION} (build {schema_mod.STATE_FINISHED_INDEX} CONCURRENTLY,"
                  f" {size}; drop {schema_mod.FINISHED_INDEX}): {time.perf_counter() - t:.1f} s")
            conn.execute(sql.SQL("ANALYZE {}").format(jobs))
            _run(conn, schema, a.batch, f"v{schema_mod.LATEST_VERSION}")
    finally:
        schema_mod.uninstall(a.url, schema)


if __name__ == "__main__":
    main()
